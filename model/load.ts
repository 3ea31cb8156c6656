// One entry point for every model format: a .gguf, a llama2.c .bin (+ tokenizer), or a Hugging Face directory (or repo id).
import { closeSync, existsSync, openSync, readdirSync, readFileSync, readSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import type { ModelConfig } from './config.ts';
import { loadGgufModel } from './gguf.ts';
import { loadHfWeights, readHfConfig } from './hf.ts';
import { chatTemplateFromConfig, HfTokenizer } from './hf-tokenizer.ts';
import { parseRepoSpec, resolveModelPath } from './hub.ts';
import { loadLlama2cModel } from './llama2c.ts';
import { loadLlama2cTokenizer, loadSentencePieceModel } from './sentencepiece.ts';
import type { Tokenizer } from './tokenizer.ts';
import type { ModelWeights } from './weights.ts';

export interface LoadedModel {
  config: ModelConfig;
  weights: ModelWeights;
  tokenizer: Tokenizer;
  format: 'gguf' | 'llama2c' | 'hf';
  /** The resolved local path that was read. */
  path: string;
  chatTemplate?: string;
}

export interface LoadOptions {
  /** Tokenizer file for a llama2.c checkpoint (default: tok<vocab>.bin or tokenizer.bin beside it). */
  tokenizerPath?: string;
  /**
   * Context length to serve instead of the file's. GGUF metadata may state more than the model was trained on
   * (stories260K's GGUF says 2048, trained at 512) and nothing in the file tells which, so this is the caller's call.
   */
  maxSeqLen?: number;
}

function sniff(path: string): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(8);
    const n = readSync(fd, b, 0, 8, 0);
    return b.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}

/**
 * Loads a model and its tokenizer, weights as f32 (F16/BF16/Q8_0 dequantized on load). path: a `.gguf` file; a
 * llama2.c `.bin` checkpoint; a Hugging Face directory with config.json; or a Hugging Face repo id resolved through
 * the HF cache (see resolveModelPath).
 */
export async function loadModel(path: string, opts: LoadOptions = {}): Promise<LoadedModel> {
  if (!existsSync(path)) {
    if (!parseRepoSpec(path)) {
      throw new Error(`${path}: no such file or directory. Give a .gguf file, a llama2.c .bin, a Hugging Face directory with config.json, or a repo id (owner/name)`);
    }
    path = await resolveModelPath(path);
  }
  path = resolve(path);
  const st = statSync(path);
  let loaded: LoadedModel;
  if (st.isDirectory()) loaded = loadDirectory(path);
  else {
    const magic = sniff(path);
    if (magic.subarray(0, 4).toString('latin1') === 'GGUF') {
      const g = loadGgufModel(path, { maxSeqLen: opts.maxSeqLen });
      loaded = { config: g.config, weights: g.weights, tokenizer: g.tokenizer, format: 'gguf', path, chatTemplate: g.chatTemplate };
    } else if (path.endsWith('.gguf')) {
      throw new Error(`${path}: named .gguf but starts with ${JSON.stringify(magic.subarray(0, 4).toString('latin1'))}, not the "GGUF" magic: corrupt or not a GGUF file`);
    } else if (path.endsWith('.bin')) {
      loaded = loadLlama2c(path, opts.tokenizerPath);
    } else if (path.endsWith('.safetensors') || basename(path) === 'config.json') {
      loaded = loadDirectory(dirname(path));
    } else {
      throw new Error(`${path}: unknown model format (expected a .gguf file, a llama2.c .bin, or a Hugging Face directory with config.json)`);
    }
  }
  if (opts.maxSeqLen !== undefined) {
    if (!Number.isInteger(opts.maxSeqLen) || opts.maxSeqLen <= 0) throw new Error(`maxSeqLen ${opts.maxSeqLen} must be a positive integer`);
    loaded.config.maxSeqLen = opts.maxSeqLen;
  }
  return loaded;
}

function loadLlama2c(path: string, tokenizerPath?: string): LoadedModel {
  const { config, weights } = loadLlama2cModel(path);
  let tokPath = tokenizerPath;
  if (!tokPath) {
    const dir = dirname(path);
    const candidates = [`tok${config.vocabSize}.bin`, 'tokenizer.bin'].map((f) => join(dir, f));
    tokPath = candidates.find((c) => existsSync(c));
    if (!tokPath) {
      throw new Error(`${path}: no tokenizer beside the checkpoint (looked for ${candidates.join(', ')}); pass tokenizerPath (--tokenizer) to the llama2.c tokenizer file`);
    }
  }
  const tokenizer = loadLlama2cTokenizer(tokPath, config.vocabSize);
  return { config, weights, tokenizer, format: 'llama2c', path };
}

function loadDirectory(dir: string): LoadedModel {
  if (!existsSync(join(dir, 'config.json'))) {
    const ggufs = readdirSync(dir).filter((f) => f.endsWith('.gguf'));
    const hint = ggufs.length ? ` (it holds ${ggufs.join(', ')}: pass that file instead)` : '';
    throw new Error(`${dir}: a model directory needs config.json (Hugging Face layout)${hint}`);
  }
  // Tokenizer first: its BOS/EOS fill in when config.json does not name them.
  const tokenizer = loadHfDirTokenizer(dir);
  const { config } = readHfConfig(dir, { bosId: tokenizer.bosId, eosId: tokenizer.eosId });
  const weights = loadHfWeights(dir, config);
  return { config, weights, tokenizer, format: 'hf', path: dir, chatTemplate: hfChatTemplate(dir, tokenizer) };
}

function loadHfDirTokenizer(dir: string): Tokenizer {
  const json = join(dir, 'tokenizer.json');
  if (existsSync(json)) return HfTokenizer.fromFile(json);
  const spm = join(dir, 'tokenizer.model');
  if (existsSync(spm)) return loadSentencePieceModel(spm);
  throw new Error(`${dir}: no tokenizer.json or tokenizer.model; copy the tokenizer files of the original model into this directory`);
}

function hfChatTemplate(dir: string, tokenizer: Tokenizer): string | undefined {
  const jinja = join(dir, 'chat_template.jinja');
  if (existsSync(jinja)) return readFileSync(jinja, 'utf8');
  if (tokenizer instanceof HfTokenizer && tokenizer.chatTemplate) return tokenizer.chatTemplate;
  const cfg = join(dir, 'tokenizer_config.json');
  if (existsSync(cfg)) {
    try {
      return chatTemplateFromConfig(JSON.parse(readFileSync(cfg, 'utf8')) as { chat_template?: unknown });
    } catch {
      return undefined; // a broken tokenizer_config.json only costs the chat template
    }
  }
  return undefined;
}

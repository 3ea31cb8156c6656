// Hugging Face tokenizer.json (byte-level BPE, SentencePiece-style BPE, …) through @huggingface/tokenizers, behind the Tokenizer interface.
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Tokenizer as HfLibTokenizer } from '@huggingface/tokenizers';
import type { Tokenizer } from './tokenizer.ts';

interface TokenizerConfigJson {
  bos_token?: string | { content?: string } | null;
  eos_token?: string | { content?: string } | null;
  clean_up_tokenization_spaces?: boolean;
  chat_template?: string | { name: string; template: string }[];
  [key: string]: unknown;
}

function tokenContent(t: TokenizerConfigJson['bos_token']): string | null {
  if (typeof t === 'string') return t;
  if (t && typeof t === 'object' && typeof t.content === 'string') return t.content;
  return null;
}

function readJson(path: string, what: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new Error(`${path}: cannot read ${what} (${(e as Error).message})`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${path}: ${what} is not valid JSON (${(e as Error).message})`);
  }
}

/** The chat template of a tokenizer_config.json (a string, or the "default" of a named list). */
export function chatTemplateFromConfig(cfg: { chat_template?: unknown }): string | undefined {
  const t = cfg.chat_template;
  if (typeof t === 'string') return t;
  if (Array.isArray(t)) {
    const named = t as { name?: string; template?: string }[];
    return (named.find((x) => x.name === 'default') ?? named[0])?.template;
  }
  return undefined;
}

export class HfTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number | null;
  readonly chatTemplate: string | undefined;
  private readonly cleanUpSpaces: boolean;

  private constructor(
    private readonly lib: HfLibTokenizer,
    config: TokenizerConfigJson,
    ids: { bosId?: number | null; eosId?: number | null },
  ) {
    let maxId = -1;
    for (const id of lib.get_vocab(true).values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;
    const idOf = (t: TokenizerConfigJson['bos_token']): number | null => {
      const c = tokenContent(t);
      return c === null ? null : (lib.token_to_id(c) ?? null);
    };
    this.bosId = idOf(config.bos_token) ?? ids.bosId ?? null;
    this.eosId = idOf(config.eos_token) ?? ids.eosId ?? null;
    this.chatTemplate = chatTemplateFromConfig(config);
    // transformers' old default (true) rewrites " ." to "." and breaks round trips; off unless the config asks.
    this.cleanUpSpaces = config.clean_up_tokenization_spaces ?? false;
  }

  /**
   * Loads tokenizer.json, with tokenizer_config.json from the same directory when present. ids: fallbacks for
   * BOS/EOS (from config.json) when tokenizer_config.json does not name them.
   */
  static fromFile(tokenizerJsonPath: string, ids: { bosId?: number | null; eosId?: number | null } = {}): HfTokenizer {
    const json = readJson(tokenizerJsonPath, 'tokenizer.json');
    const cfgPath = join(dirname(tokenizerJsonPath), 'tokenizer_config.json');
    const config = (existsSync(cfgPath) ? readJson(cfgPath, 'tokenizer_config.json') : {}) as TokenizerConfigJson;
    let lib: HfLibTokenizer;
    try {
      lib = new HfLibTokenizer(json as object, config);
    } catch (e) {
      throw new Error(`${tokenizerJsonPath}: @huggingface/tokenizers cannot build this tokenizer: ${(e as Error).message}`);
    }
    return new HfTokenizer(lib, config, ids);
  }

  encode(text: string): number[] {
    if (text.length === 0) return [];
    return this.lib.encode(text, { add_special_tokens: false }).ids;
  }

  decode(ids: number[]): string {
    // Byte-level decoders turn an unfinished UTF-8 sequence at the end into U+FFFD; the interface drops it instead
    // (a later token completes it). A genuine trailing U+FFFD character is dropped the same way.
    return this.decodeForStreaming(ids).replace(/\uFFFD+$/u, '');
  }

  /** Decoded text with an unfinished UTF-8 sequence at the end shown as U+FFFD (what streaming needs to see). */
  decodeForStreaming(ids: number[]): string {
    const valid = ids.filter((id) => Number.isInteger(id) && id >= 0 && id < this.vocabSize);
    if (valid.length === 0) return '';
    return this.lib.decode(valid, { skip_special_tokens: true, clean_up_tokenization_spaces: this.cleanUpSpaces });
  }

  idToToken(id: number): string {
    return this.lib.id_to_token(id) ?? '';
  }
}

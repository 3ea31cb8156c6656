// `mla-serve convert`: a GQA checkpoint (GGUF llama, llama2.c, HF Llama/Qwen2/Mistral) → an MLA checkpoint in
// DeepSeek-V3 layout (TransMLA), with a progress bar per stage and the before/after table.
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import cliProgress from 'cli-progress';
import { gpuCalibration } from '../engine/calibration.ts';
import { scoreChunks, textChunks } from '../engine/perplexity.ts';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { Rng } from '../engine/rng.ts';
import type { GqaConfig } from '../model/config.ts';
import { readHfConfig } from '../model/hf.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';
import type { WriteDtype } from '../model/safetensors.ts';
import { writeMlaCheckpoint } from '../model/transmla/checkpoint.ts';
import { checkConvertible, convertToMla, parameterCount, type ConversionReport, type ConversionResult, type PerplexityScorer, type ProgressEvent } from '../model/transmla/convert.ts';
import type { Tokenizer } from '../model/tokenizer.ts';
import { dtypeOption, intOption, UsageError } from './local-runner.ts';

export const CONVERT_USAGE = `usage: mla-serve convert --model PATH --out DIR --calib-text FILE [options]

Converts a GQA/MHA checkpoint to MLA with TransMLA (RoRoPE + FreqFold, then balanced joint K/V PCA) and
writes a Hugging Face directory in DeepSeek-V3 layout (config.json + safetensors + tokenizer). Calibration
(and the perplexity table) runs the model forward on the GPU or on the CPU float64 reference (--device).

  --model PATH            .gguf (llama arch), llama2.c .bin, or Hugging Face Llama/Qwen2/Mistral directory
  --tokenizer PATH        tokenizer for a llama2.c .bin (default: tok<vocab>.bin beside it)
  --max-seq-len N         context length of the source (GGUF metadata may overstate it; stories260K: 512)
  --out DIR               output directory (must be empty or absent unless --force)
  --force                 write into a non-empty --out
  --calib-text FILE       UTF-8 text; paragraphs (split on blank lines) become BOS-prefixed chunks
  --rope-dim r            rope dims kept, qk_rope_head_dim (default min(64, head_dim)); must divide head_dim
  --kv-lora-rank R        latent rank (default: R + r = 9/16 of 2·n_kv·head_dim, a multiple of 4; at most 2L − r)
  --freqfold auto|f       frequencies folded together, a multiple of head_dim/r dividing head_dim/2; auto
                          (default) tries each and keeps the lowest Stage-1 perplexity on calibration chunks
  --q-lora-rank N         low-rank query: q_a_proj/q_b_proj from the PCA of the calibration queries
                          (models without q biases only; lossy below full rank)
  --calib-samples N       calibration chunks (default 128), drawn with --seed from the text minus the held-out part
  --calib-seq-len N       tokens per calibration chunk at most (default 256)
  --eval-chunks N         held-out chunks (every k-th paragraph of the text, never used for calibration) for
                          the perplexity table (default 200; 0 skips the perplexities)
  --fold-search-chunks N  calibration chunks scored per f by --freqfold auto (default 32)
  --seed N                calibration sampling seed (default 42); the same seed gives identical files
  --dtype f32|f16|bf16    dtype of the written weights (default f32)
  --rotation pca|identity identity skips the RoRoPE PCA (RoPE kept on the first r latent dims unrotated): the
                          naive baseline the method is measured against (default pca)
  --device auto|gpu|cpu   where calibration and perplexity forward passes run (default auto: gpu when the
                          source has more than 50M parameters, where the CPU reference would take hours; cpu
                          otherwise, bit-reproducible and quick for tiny models). The GPU runs f32 weights and
                          KV cache; K/V and their covariances are still formed in float64 on the CPU
  --json                  print the report as one JSON object instead of the table
`;

/** Above this many source parameters `--device auto` calibrates on the GPU. */
export const GPU_CALIBRATION_PARAMS = 50e6;

export interface ConvertCommandOptions {
  model: string;
  tokenizer?: string;
  maxSeqLen?: number;
  out: string;
  force: boolean;
  calibText: string;
  ropeDim?: number;
  kvLoraRank?: number;
  freqFold: number | 'auto';
  qLoraRank: number | null;
  calibSamples: number;
  calibSeqLen: number;
  evalChunks: number;
  foldSearchChunks: number;
  seed: number;
  dtype: WriteDtype;
  rotation: 'pca' | 'identity';
  /** Where calibration runs (auto: gpu above GPU_CALIBRATION_PARAMS source parameters). */
  device: 'auto' | 'gpu' | 'cpu';
  json: boolean;
}

export function parseConvertArgs(argv: string[]): ConvertCommandOptions | 'help' {
  let v;
  try {
    v = parseArgs({
      args: argv,
      allowPositionals: false,
      options: {
        model: { type: 'string' },
        tokenizer: { type: 'string' },
        'max-seq-len': { type: 'string' },
        out: { type: 'string' },
        force: { type: 'boolean' },
        'calib-text': { type: 'string' },
        'rope-dim': { type: 'string' },
        'kv-lora-rank': { type: 'string' },
        freqfold: { type: 'string' },
        'q-lora-rank': { type: 'string' },
        'calib-samples': { type: 'string' },
        'calib-seq-len': { type: 'string' },
        'eval-chunks': { type: 'string' },
        'fold-search-chunks': { type: 'string' },
        seed: { type: 'string' },
        dtype: { type: 'string' },
        rotation: { type: 'string' },
        device: { type: 'string' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    }).values;
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (v.help) return 'help';
  if (!v.model) throw new UsageError('--model is required');
  if (!v.out) throw new UsageError('--out is required');
  if (!v['calib-text']) throw new UsageError('--calib-text is required (calibration needs real text the model was trained on, e.g. a slice of its corpus)');
  const optInt = (flag: string, min = 1) => (v[flag as keyof typeof v] === undefined ? undefined : intOption(v[flag as keyof typeof v] as string, `--${flag}`, 0, min));
  const fold = v.freqfold ?? 'auto';
  let freqFold: number | 'auto';
  if (fold === 'auto') freqFold = 'auto';
  else freqFold = intOption(fold, '--freqfold', 0, 1);
  const seed = v.seed === undefined ? 42 : Number(v.seed);
  if (!Number.isInteger(seed)) throw new UsageError(`--seed must be an integer; got ${JSON.stringify(v.seed)}`);
  const rotation = v.rotation ?? 'pca';
  if (rotation !== 'pca' && rotation !== 'identity') throw new UsageError(`--rotation must be pca or identity; got ${JSON.stringify(rotation)}`);
  const device = v.device ?? 'auto';
  if (device !== 'auto' && device !== 'gpu' && device !== 'cpu') throw new UsageError(`--device must be auto, gpu or cpu; got ${JSON.stringify(device)}`);
  return {
    model: v.model,
    tokenizer: v.tokenizer,
    maxSeqLen: optInt('max-seq-len', 2),
    out: v.out,
    force: v.force ?? false,
    calibText: v['calib-text'],
    ropeDim: optInt('rope-dim', 1),
    kvLoraRank: optInt('kv-lora-rank', 1),
    freqFold,
    qLoraRank: optInt('q-lora-rank', 1) ?? null,
    calibSamples: optInt('calib-samples', 1) ?? 128,
    calibSeqLen: optInt('calib-seq-len', 2) ?? 256,
    evalChunks: optInt('eval-chunks', 0) ?? 200,
    foldSearchChunks: optInt('fold-search-chunks', 1) ?? 32,
    seed,
    dtype: dtypeOption<WriteDtype>(v.dtype, '--dtype', 'f32', ['f32', 'f16', 'bf16']),
    rotation,
    device,
    json: v.json ?? false,
  };
}

/**
 * Calibration and held-out chunks from a text: paragraphs as BOS-prefixed chunks of at most maxLen tokens. Every
 * k-th chunk (k = ⌊chunks / evalChunks⌋, at least 2) is held out, evalChunks of them, spread over the whole text and
 * fixed whatever the seed; calibSamples chunks are drawn with the seed from the others and cut to calibSeqLen tokens.
 */
export function calibrationSplit(
  text: string,
  tokenizer: Tokenizer,
  bosId: number,
  opts: { maxLen: number; calibSamples: number; calibSeqLen: number; evalChunks: number; seed: number },
): { calib: number[][]; heldOut: number[][] } {
  const chunks = textChunks(text, tokenizer, opts.maxLen, tokenizer.bosId ?? bosId);
  const stride = Math.max(2, Math.floor(chunks.length / Math.max(1, opts.evalChunks)));
  const held = new Set<number>();
  for (let i = stride - 1; i < chunks.length && held.size < opts.evalChunks; i += stride) held.add(i);
  const heldOut = [...held].map((i) => chunks[i]);
  const pool = chunks.filter((_, i) => !held.has(i));
  if (pool.length === 0) throw new Error('the calibration text has no paragraph with a token to predict');
  // Seeded partial Fisher–Yates: the first calibSamples positions of a shuffle of the pool.
  const rng = new Rng(opts.seed);
  const idx = pool.map((_, i) => i);
  const n = Math.min(opts.calibSamples, idx.length);
  for (let i = 0; i < n; i++) {
    const j = i + Math.floor(rng.nextFloat() * (idx.length - i));
    [idx[i], idx[j]] = [idx[j], idx[i]];
  }
  const calib = idx.slice(0, n).map((i) => pool[i].slice(0, opts.calibSeqLen)).filter((c) => c.length >= 2);
  return { calib, heldOut };
}

/** Perplexity through engine/perplexity.ts, for the converter's freqfold search and table. */
export const referenceScorer: PerplexityScorer = async (chunks, logitsFor) => (await scoreChunks(chunks, logitsFor)).perplexity;

/**
 * Refusals read off a Hugging Face config.json before any weight is loaded: what the loader refuses (Qwen3's per-head
 * q/k norms, MoE, unknown types) and sliding-window attention, which the MLA output would not reproduce.
 */
export function checkHfSource(dir: string): void {
  if (!existsSync(join(dir, 'config.json'))) return;
  const { raw } = readHfConfig(dir);
  const window = raw.sliding_window;
  const on = raw.model_type === 'mistral' ? typeof window === 'number' : raw.use_sliding_window === true;
  if (on && typeof window === 'number' && typeof raw.max_position_embeddings === 'number' && window < raw.max_position_embeddings) {
    throw new Error(
      `${dir}: sliding-window attention (sliding_window ${window} < max_position_embeddings ${raw.max_position_embeddings}) cannot be ` +
        `converted: the MLA output attends to the whole context, so it would differ from the source past ${window} tokens`,
    );
  }
}

/**
 * Loads, converts, writes. Exposed for tests; the CLI wraps it with argument parsing and printing. With the GPU device,
 * `gpu` is used when given (and left open), else a device is opened for the conversion and closed after it.
 */
export async function convertCheckpoint(
  opts: ConvertCommandOptions,
  onProgress?: (e: ProgressEvent) => void,
  gpu?: GpuContext,
): Promise<{ result: ConversionResult; files: string[]; source: LoadedModel; device: 'gpu' | 'cpu'; adapter?: string }> {
  if (existsSync(opts.out) && readdirSync(opts.out).length > 0 && !opts.force) {
    throw new Error(`${opts.out} exists and is not empty; choose another --out or pass --force to write into it`);
  }
  let text: string;
  try {
    text = readFileSync(opts.calibText, 'utf8');
  } catch (err) {
    throw new Error(`cannot read the calibration text ${opts.calibText}: ${(err as Error).message}`);
  }
  if (existsSync(opts.model) && statSync(opts.model).isDirectory()) checkHfSource(opts.model);
  const source = await loadModel(opts.model, { tokenizerPath: opts.tokenizer, maxSeqLen: opts.maxSeqLen });
  checkConvertible(source.config);
  const config = source.config;
  const split = calibrationSplit(text, source.tokenizer, config.bosId, {
    maxLen: Math.min(512, config.maxSeqLen),
    calibSamples: opts.calibSamples,
    calibSeqLen: opts.calibSeqLen,
    evalChunks: opts.evalChunks,
    seed: opts.seed,
  });
  const device = opts.device === 'auto' || opts.device === undefined ? (parameterCount(source.weights) > GPU_CALIBRATION_PARAMS ? 'gpu' : 'cpu') : opts.device;
  const ownGpu = device === 'gpu' && !gpu;
  const context = device === 'gpu' ? (gpu ?? (await openGpu())) : undefined;
  const longest = Math.max(...split.calib.map((c) => c.length), ...split.heldOut.map((c) => c.length));
  let result: ConversionResult;
  try {
    result = await convertToMla(config, source.weights, {
      ropeDim: opts.ropeDim,
      kvLoraRank: opts.kvLoraRank,
      freqFold: opts.freqFold,
      qLoraRank: opts.qLoraRank,
      calibChunks: split.calib,
      evalChunks: opts.evalChunks > 0 ? split.heldOut : undefined,
      foldSearchChunks: opts.foldSearchChunks,
      scorePerplexity: referenceScorer,
      device: context ? gpuCalibration(context, { maxChunkLen: longest }) : undefined,
      rotation: opts.rotation,
      onProgress,
    });
  } finally {
    if (ownGpu && context) {
      context.destroy();
      releaseGpu();
    }
  }
  const files = writeMlaCheckpoint(opts.out, result.config, result.weights, {
    dtype: opts.dtype,
    source: { config, format: source.format, path: source.path, tokenizer: source.tokenizer },
    report: result.report,
  });
  return { result, files, source, device, adapter: context?.adapterName };
}

function pct(before: number, after: number): string {
  const p = ((after - before) / before) * 100;
  return `${p > 0 ? '+' : p < 0 ? '−' : ''}${Math.abs(p).toFixed(2)} %`;
}

/** The table `convert` prints: KV values, parameters, held-out perplexity of the three models. */
export function formatReport(r: ConversionReport, source: { path: string; config: GqaConfig }, out: string): string {
  const c = source.config;
  const n = (x: number) => x.toLocaleString('en-US');
  const lines: string[] = [];
  lines.push(`TransMLA: ${source.path} → ${out}`);
  lines.push(
    `  source ${c.arch}, ${c.nLayers} layers, ${c.nHeads} q / ${c.nKvHeads} kv heads, head_dim ${c.headDim}, ${c.ropeLayout} RoPE; ` +
      `r ${r.ropeDim}, R ${r.kvLoraRank}, freqfold ${r.freqFold}${r.qLoraRank !== null ? `, q_lora_rank ${r.qLoraRank}` : ''}`,
  );
  if (r.foldSearch.length) {
    lines.push(`  freqfold search (Stage-1 perplexity on calibration chunks): ${r.foldSearch.map((x) => `f=${x.fold} ${x.perplexity.toFixed(4)}`).join(', ')}`);
  }
  lines.push(`  calibration ${r.calibChunks} chunks / ${n(r.calibTokens)} tokens; held-out ${r.evalChunks} chunks / ${n(r.evalTokens)} predicted tokens`);
  lines.push('');
  const rows: [string, string, string, string][] = [
    ['', 'GQA (original)', 'MLA', 'change'],
    ['KV values / token / layer', n(r.kvValuesBefore), n(r.kvValuesAfter), pct(r.kvValuesBefore, r.kvValuesAfter)],
    ['KV values / token (all layers)', n(r.kvValuesBefore * c.nLayers), n(r.kvValuesAfter * c.nLayers), pct(r.kvValuesBefore, r.kvValuesAfter)],
    ['parameters', n(r.paramsBefore), n(r.paramsAfter), pct(r.paramsBefore, r.paramsAfter)],
  ];
  const w = [0, 1, 2, 3].map((i) => Math.max(...rows.map((row) => row[i].length)));
  for (const row of rows) lines.push(`  ${row[0].padEnd(w[0])}  ${row[1].padStart(w[1])}  ${row[2].padStart(w[2])}  ${row[3].padStart(w[3])}`);
  lines.push('');
  if (r.perplexity) {
    const p = r.perplexity;
    const head = ['perplexity (held-out)', 'original', 'Stage 1 (RoRoPE/FreqFold)', 'Stage 2 (MLA)'];
    const vals = ['', p.original.toFixed(4), p.stage1.toFixed(4), p.mla.toFixed(4)];
    const pw = head.map((h, i) => Math.max(h.length, vals[i].length));
    lines.push(`  ${head.map((h, i) => (i === 0 ? h.padEnd(pw[i]) : h.padStart(pw[i]))).join('  ')}`);
    lines.push(`  ${vals.map((x, i) => (i === 0 ? x.padEnd(pw[i]) : x.padStart(pw[i]))).join('  ')}`);
  } else {
    lines.push('  perplexity: skipped (--eval-chunks 0)');
  }
  return lines.join('\n') + '\n';
}

/** One cli-progress bar per stage on stderr (a line per finished stage when stderr is not a terminal). */
function progressBars(): { onProgress: (e: ProgressEvent) => void; stop: () => void } {
  let bar: cliProgress.SingleBar | null = null;
  let stage = '';
  const tty = process.stderr.isTTY;
  const started = performance.now();
  let stageStart = started;
  const finish = () => {
    if (bar) bar.stop();
    bar = null;
  };
  return {
    onProgress(e) {
      if (e.stage !== stage) {
        finish();
        stage = e.stage;
        stageStart = performance.now();
        if (tty) {
          bar = new cliProgress.SingleBar(
            { format: `${e.stage.padEnd(26)} [{bar}] {value}/{total} ${e.unit}s | {duration_formatted}`, stream: process.stderr, hideCursor: true },
            cliProgress.Presets.shades_classic,
          );
          bar.start(e.total, 0);
        }
      }
      bar?.update(e.done);
      if (!tty && e.done === e.total) {
        process.stderr.write(`${e.stage}: ${e.total} ${e.unit}s in ${((performance.now() - stageStart) / 1000).toFixed(1)} s\n`);
      }
    },
    stop: finish,
  };
}

export async function runConvert(argv: string[]): Promise<number> {
  let opts: ConvertCommandOptions | 'help';
  try {
    opts = parseConvertArgs(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`mla-serve convert: ${err.message}\n\n${CONVERT_USAGE}`);
    return 2;
  }
  if (opts === 'help') {
    process.stdout.write(CONVERT_USAGE);
    return 0;
  }
  const bars = progressBars();
  let done;
  try {
    done = await convertCheckpoint(opts, bars.onProgress);
  } finally {
    bars.stop();
  }
  const { result, files, source, device, adapter } = done;
  if (opts.json) {
    process.stdout.write(JSON.stringify({ out: opts.out, files, source: source.path, device, adapter, ...result.report }) + '\n');
  } else {
    process.stdout.write(formatReport(result.report, { path: source.path, config: source.config as GqaConfig }, opts.out));
    process.stdout.write(`\ncalibrated on the ${device === 'gpu' ? `GPU (${adapter})` : 'CPU float64 reference'}`);
    process.stdout.write(`\nwrote ${files.map((f) => join(opts.out, f)).join(', ')} (${opts.dtype})\n`);
  }
  return 0;
}

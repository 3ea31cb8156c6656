// End-to-end decode benchmark: synthetic Qwen2.5-7B (GQA) and its MLA shape through the GPU step runner, batch 1/32/64 at
// context 512 and 4K; ms/step, tok/s, weight bytes per step against the HBM ceiling, and the H200 peers.
//
//   npm run bench:decode                          # real sizes (needs a real GPU: ~15 GB of weights + KV per model)
//   npm run bench:decode -- --quick               # tiny-qwen2 pair, context 32, batch 1 and 4: checks that it runs (SwiftShader, < 60 s)
//   npm run bench:decode -- --json decode.json    # also write every measurement as JSON
//   options: --models qwen2.5-7b,qwen2.5-7b-mla  --batches 1,32,64  --contexts 512,4096  --steps 32  --warmup 2
//            --prefill-chunk 512  --kv-budget 16GiB (capacity line only)  --ceiling-gbs 4300  --seed 0
//            --weight-dtype f16|int8  --kv-cache-dtype f16|f32|int8
//            --layers N  --vocab N (smaller than the real model: smoke tests of the real widths)
//            --logits full|argmax|sample (full: every row's logits read back, as host sampling needs; argmax: the greedy
//            pick made on the GPU and one id read back per row, as the engine does for plain greedy requests; sample: a
//            draw made on the GPU per row with temperature 0.8, top-k 50, top-p 0.95, as for plain sampled requests)
//            --submit-chunks 1,4 (command buffers per step, each configuration timed with each: 1 = the whole step
//            recorded before the GPU starts; more lets the GPU run the first layers while the host records the rest)
//            --pipeline off,on (with --logits argmax or sample; each configuration timed each way: on = every step's tokens
//            are the previous step's picks, taken on the GPU, and step N + 1 is submitted before step N is read back,
//            so the host records one step while the GPU runs the other; off = one step at a time)
//            --mla-int8-products off|dot4|three-pass|flash|flash-dot4|tensor-cores|emulate (MLA over the int8 cache: the f32 kernel, or an int8-product one;
//            flash needs --block-size 32; --mla-flash-score-tiles 1|2: its score tiles a subgroup per window)
//            --mla-head-tiled-from N (MLA: steps of ≥ N rows take the tiled W_UK / W_UV kernel; default 128)
//            --mla-head-slices 8|16|32 (MLA: k slices of the W_UK / W_UV decode kernel; default 16)
//            --mla-head-kernel sliced|staged|w8a8 (MLA: the W_UK / W_UV kernel of decode-sized steps; default staged; w8a8: int8
//            weights and inputs, tensor cores where the adapter has them; giving one turns the decode front below off
//            unless --mla-front-rows is given too, as serve's --mla-head-kernel staged|w8a8 does)
//            --mla-head-prefill tiled|w8a8 (MLA: the W_UK / W_UV kernel of steps from --mla-head-tiled-from rows on, prompt
//            chunks; default tiled; w8a8 as the decode kernel above; the profile's prefill chunk shows it)
//            --mla-front-rows N (MLA, int8 cache and products: steps of ≤ N rows run RoPE, the latent write, W_UK and
//            the query quantizer as one dispatch a layer, kernels/mla-front.ts; default 32; 0 = off)
//            --mla-back-rows N (MLA: steps of ≤ N rows run the attention's merge and W_UV as one dispatch a layer,
//            kernels/mla-back.ts; default 0 = off)
//            --mla-dot4-prefetch on|off (MLA, dot4 products: next window's cache rows loaded during this one; default on)
//            --mla-dot4-value-rounds N (MLA, dot4 products: the value phase's heads in N rounds; default 2)
//            --mla-dot4-softmax workgroup|subgroup|emulated (MLA, dot4 products: the window softmax; default workgroup)
//            --mla-3pass-products dot4|scores|values|both (MLA, three-pass products: which passes multiply on tensor cores;
//            unset: scores where the adapter has i8 subgroup matrices, values dot4)  --mla-3pass-parts N (MLA, three-pass: latent parts of the value pass; default 2)
//            --mla-window N (MLA over the int8 cache: the int8-product kernels' window, tokens; default 64)
//            --mla-min-chunk N (MLA: smallest context chunk of the attention split; default 64)
//            --profile (after each configuration, one step with every dispatch in its own timed pass: GPU µs per step
//            by pipeline, and their sum against the plain step's GPU span, which adds the gaps between dispatches; and
//            once per model the template's last prefill chunk, profiled the same way: where a prompt step goes)
//
// How a configuration (B sequences, context C) is measured:
//   1. One template sequence is prefilled once per model to the largest context, in chunks (untimed; its rate is shown).
//   2. Each of the B sequences gets its own copy of the template's first C/blockSize KV blocks (copyBlocks, GPU side):
//      distinct memory per sequence, so attention reads B·C tokens of KV from HBM as a real batch would.
//   3. `warmup` decode steps (pipelines compile for this row count), then `steps` timed decode steps: every sequence one
//      token, logits of every row read back ([B, vocab] f32 — part of the runner's step as the engine uses it for
//      sampling), or with --logits argmax one greedy id per row. Tokens are fixed pseudo-random ids, not the picks:
//      host sampling is not part of the figure.
// Weights: syntheticF16Model (model/synthetic.ts): generated straight into packed f16, one layer's values shared on the
// host, but every layer uploaded into its own GPU buffers (14.1 GB for Qwen2.5-7B), so each step streams all of them.
import type { CacheDtype } from '../cache/kv-layout.ts';
import { writeFileSync } from 'node:fs';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { summarizeProfile } from '../engine/step-profile.ts';
import { HEAD_DECODE_KERNELS, HEAD_PREFILL_KERNELS, type HeadDecodeKernel, type HeadPrefillKernel } from '../kernels/mla-head-matmul.ts';
import { mlaBlockFactory, type MlaBlockOptions } from '../engine/mla-block.ts';
import { DEFAULT_MLA_TUNING, type MlaAttentionTuning } from '../kernels/mla-attention.ts';
import type { StepSequence } from '../engine/types.ts';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { kvValuesPerToken, type ModelConfig } from '../model/config.ts';
import { SYNTHETIC_MODELS, syntheticF16Model, type SyntheticModelName } from '../model/synthetic.ts';
import type { ModelWeights, Tensor } from '../model/weights.ts';

interface Args {
  quick: boolean;
  json?: string;
  models: SyntheticModelName[];
  batches: number[];
  contexts: number[];
  steps: number;
  warmup: number;
  logits: 'full' | 'argmax' | 'sample';
  /** Command-buffer counts per step to time each configuration with (runner option submitChunks). */
  submitChunks: number[];
  /** Pipelined (step N + 1 submitted before N is read back, tokens = the previous picks) or one step at a time. */
  pipeline: boolean[];
  /** After each configuration, one step with every dispatch timed on its own (stdout table). */
  profile: boolean;
  /**
   * The MLA block's options from the --mla-* flags: the attention's tuning (int8Products from --mla-int8-products,
   * default 'off'; the dot4 kernel's prefetch, value rounds, softmax; the window) and the head products' kernel.
   */
  mlaBlock: MlaBlockOptions & { attentionTuning: Partial<MlaAttentionTuning> };
  prefillChunk: number;
  kvBudget: number;
  ceilingGBs: number;
  seed: number;
  blockSize: number;
  /** Projection weights: f16 (packed, default) or int8 per output channel (W8A8 above 8 rows). */
  weightDtype: 'f16' | 'int8';
  kvCacheDtype: CacheDtype;
  /** Fewer layers / a smaller vocabulary than the real model (smoke tests of real widths on a slow GPU). */
  layers?: number;
  vocab?: number;
}

const USAGE = 'see the top of bench/decode.ts';

const UNITS: Record<string, number> = { '': 1, b: 1, kb: 1e3, mb: 1e6, gb: 1e9, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30 };

/** "16GiB" → 17179869184, "8e9" → 8000000000. */
function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? UNITS[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new Error(`--kv-budget ${JSON.stringify(text)} is not a size; write e.g. 16GiB or 8e9`);
  return Math.floor(Number(m[1]) * unit);
}

function intList(text: string, flag: string): number[] {
  const v = text.split(',').map(Number);
  if (v.some((x) => !Number.isInteger(x) || x < 1)) throw new Error(`${flag} wants positive integers separated by commas; got ${JSON.stringify(text)}`);
  return v;
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    quick: false,
    models: ['qwen2.5-7b', 'qwen2.5-7b-mla'],
    batches: [1, 32, 64],
    contexts: [512, 4096],
    steps: 32,
    warmup: 2,
    logits: 'full',
    submitChunks: [6],
    pipeline: [false],
    profile: false,
    mlaBlock: { attentionTuning: { int8Products: DEFAULT_MLA_TUNING.int8Products } },
    prefillChunk: 512,
    kvBudget: 16 * 2 ** 30,
    ceilingGBs: 4300,
    seed: 0,
    blockSize: 16,
    weightDtype: 'f16',
    kvCacheDtype: 'f16',
  };
  const given = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    given.add(k);
    const val = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${k} needs a value; ${USAGE}`);
      return v;
    };
    if (k === '--quick') a.quick = true;
    else if (k === '--json') a.json = val();
    else if (k === '--models') {
      a.models = val().split(',') as SyntheticModelName[];
      const bad = a.models.find((m) => !SYNTHETIC_MODELS.includes(m));
      if (bad) throw new Error(`--models: unknown synthetic model ${JSON.stringify(bad)}; known: ${SYNTHETIC_MODELS.join(', ')}`);
    } else if (k === '--batches') a.batches = intList(val(), k);
    else if (k === '--contexts') a.contexts = intList(val(), k);
    else if (k === '--steps') a.steps = intList(val(), k)[0];
    else if (k === '--warmup') a.warmup = Number(val());
    else if (k === '--logits') {
      const v = val();
      if (v !== 'full' && v !== 'argmax' && v !== 'sample') throw new Error(`--logits is full, argmax or sample, got ${v}`);
      a.logits = v;
    }
    else if (k === '--submit-chunks') a.submitChunks = intList(val(), k);
    else if (k === '--pipeline') {
      a.pipeline = val().split(',').map((v) => {
        if (v !== 'on' && v !== 'off') throw new Error(`--pipeline takes on and/or off, got ${v}`);
        return v === 'on';
      });
    }
    else if (k === '--profile') a.profile = true;
    else if (k === '--mla-int8-products') {
      const v = val();
      if (v !== 'off' && v !== 'tensor-cores' && v !== 'emulate' && v !== 'dot4' && v !== 'three-pass' && v !== 'flash' && v !== 'flash-dot4') throw new Error(`--mla-int8-products is off, dot4, three-pass, flash, flash-dot4, tensor-cores or emulate, got ${v}`);
      a.mlaBlock.attentionTuning.int8Products = v;
    }
    else if (k === '--mla-flash-score-tiles') {
      const v = Number(val());
      if (v !== 1 && v !== 2) throw new Error(`--mla-flash-score-tiles is 1 or 2, got ${v}`);
      a.mlaBlock.attentionTuning.int8FlashScoreTiles = v;
    }
    else if (k === '--mla-head-tiled-from') a.mlaBlock.headTiledMinRows = intList(val(), k)[0];
    else if (k === '--mla-min-chunk') a.mlaBlock.minChunk = intList(val(), k)[0];
    else if (k === '--mla-head-slices') {
      const v = intList(val(), k)[0];
      if (v !== 8 && v !== 16 && v !== 32) throw new Error(`--mla-head-slices is 8, 16 or 32, got ${v}`);
      a.mlaBlock.headKSlices = v;
    }
    else if (k === '--mla-front-rows') {
      const v = Number(val());
      if (!Number.isInteger(v) || v < 0) throw new Error(`--mla-front-rows wants a row count (0: off), got ${v}`);
      a.mlaBlock.frontMaxRows = v;
    }
    else if (k === '--mla-back-rows') {
      const v = Number(val());
      if (!Number.isInteger(v) || v < 0) throw new Error(`--mla-back-rows wants a row count (0: off), got ${v}`);
      a.mlaBlock.backMaxRows = v;
    }
    else if (k === '--mla-head-prefill') {
      const v = val();
      if (!(HEAD_PREFILL_KERNELS as readonly string[]).includes(v)) throw new Error(`--mla-head-prefill is one of ${HEAD_PREFILL_KERNELS.join(', ')}, got ${v}`);
      a.mlaBlock.headPrefillKernel = v as HeadPrefillKernel;
    }
    else if (k === '--mla-head-kernel') {
      const v = val();
      if (!(HEAD_DECODE_KERNELS as readonly string[]).includes(v)) throw new Error(`--mla-head-kernel is one of ${HEAD_DECODE_KERNELS.join(', ')}, got ${v}`);
      a.mlaBlock.headDecodeKernel = v as HeadDecodeKernel;
      a.mlaBlock.frontMaxRows ??= 0;
    }
    else if (k === '--mla-dot4-prefetch') {
      const v = val();
      if (v !== 'on' && v !== 'off') throw new Error(`--mla-dot4-prefetch is on or off, got ${v}`);
      a.mlaBlock.attentionTuning.int8Prefetch = v === 'on';
    }
    else if (k === '--mla-dot4-value-rounds') a.mlaBlock.attentionTuning.int8ValueRounds = intList(val(), k)[0];
    else if (k === '--mla-dot4-softmax') {
      const v = val();
      if (v !== 'workgroup' && v !== 'subgroup' && v !== 'emulated') throw new Error(`--mla-dot4-softmax is workgroup, subgroup or emulated, got ${v}`);
      a.mlaBlock.attentionTuning.int8Softmax = v;
    }
    else if (k === '--mla-3pass-products') {
      const v = val();
      if (v !== 'dot4' && v !== 'scores' && v !== 'values' && v !== 'both') throw new Error(`--mla-3pass-products is dot4, scores, values or both, got ${v}`);
      a.mlaBlock.attentionTuning.int8ScoreProducts = v === 'scores' || v === 'both' ? 'tensor-cores' : 'dot4';
      a.mlaBlock.attentionTuning.int8ValueProducts = v === 'values' || v === 'both' ? 'tensor-cores' : 'dot4';
    }
    else if (k === '--mla-3pass-parts') a.mlaBlock.attentionTuning.int8LatentParts = intList(val(), k)[0];
    else if (k === '--mla-window') a.mlaBlock.attentionTuning.int8Window = intList(val(), k)[0];
    else if (k === '--prefill-chunk') a.prefillChunk = intList(val(), k)[0];
    else if (k === '--kv-budget') a.kvBudget = parseSize(val());
    else if (k === '--ceiling-gbs') a.ceilingGBs = Number(val());
    else if (k === '--seed') a.seed = Number(val());
    else if (k === '--block-size') a.blockSize = intList(val(), k)[0];
    else if (k === '--weight-dtype') {
      const v = val();
      if (v !== 'f16' && v !== 'int8') throw new Error(`--weight-dtype is f16 or int8, got ${v}`);
      a.weightDtype = v;
    } else if (k === '--kv-cache-dtype') {
      const v = val();
      if (v !== 'f16' && v !== 'f32' && v !== 'int8') throw new Error(`--kv-cache-dtype is f16, f32 or int8, got ${v}`);
      a.kvCacheDtype = v;
    }
    else if (k === '--layers') a.layers = intList(val(), k)[0];
    else if (k === '--vocab') a.vocab = intList(val(), k)[0];
    else throw new Error(`unknown option ${k}; ${USAGE}`);
  }
  if (a.quick) {
    if (!given.has('--models')) a.models = ['tiny-qwen2', 'tiny-qwen2-mla'];
    // SwiftShader takes ~1 s a step and compiles every new pipeline slowly: few steps, and prefill chunks of ≤ 8 rows so
    // they reuse the decode GEMV pipelines (~45 s in all on a loaded 2-core machine).
    if (!given.has('--batches')) a.batches = [1, 4];
    if (!given.has('--contexts')) a.contexts = [32];
    if (!given.has('--steps')) a.steps = 2;
    if (!given.has('--warmup')) a.warmup = 1;
    if (!given.has('--prefill-chunk')) a.prefillChunk = 8;
  }
  a.batches.sort((x, y) => x - y);
  a.contexts.sort((x, y) => x - y);
  for (const c of a.contexts) {
    if (c % a.blockSize) throw new Error(`--contexts: ${c} is not a multiple of the block size ${a.blockSize} (whole blocks are copied per sequence)`);
  }
  return a;
}

/** The published peers on the H200 (../shared/gpu/README.md), Qwen2.5-7B shapes, random weights. */
const PEERS = {
  pytorch: { name: 'PyTorch bf16 + CUDA graph', batch1: 213, b32ctx512: 6370, b32ctx4k: 4964 },
  llamacpp: { name: 'llama.cpp Vulkan', batch1: 160, b32: 286 },
};

function peerFor(model: string, batch: number, ctx: number): { pytorch?: number; llamacpp?: number } {
  if (!model.startsWith('qwen2.5-7b')) return {};
  if (batch === 1) return { pytorch: PEERS.pytorch.batch1, llamacpp: PEERS.llamacpp.batch1 };
  if (batch === 32 && ctx === 512) return { pytorch: PEERS.pytorch.b32ctx512, llamacpp: PEERS.llamacpp.b32 };
  if (batch === 32 && ctx === 4096) return { pytorch: PEERS.pytorch.b32ctx4k, llamacpp: PEERS.llamacpp.b32 };
  return {};
}

/** Bytes of weights one decode step reads: every matrix as padded f16 rows, the LM head included, the embedding not (B rows gathered). */
function weightBytesPerStep(w: ModelWeights, dtype: 'f16' | 'int8'): number {
  let bytes = 0;
  // int8: projections as one byte per value (rows padded to 32 values) plus an f32 scale per row; the MLA head
  // matrices made from kv_b_proj stay f16 (kernels/linear.ts).
  const add = (t: Tensor | undefined, int8: boolean) => {
    if (!t || t.shape.length !== 2) return;
    bytes += int8 ? t.shape[0] * (Math.ceil(t.shape[1] / 32) * 32 + 4) : t.shape[0] * Math.ceil(t.shape[1] / 8) * 8 * 2;
  };
  // Shared layers are still distinct GPU buffers: count every layer (no dedup across layers).
  for (const l of w.layers) {
    for (const [name, v] of Object.entries(l)) if (v && typeof v === 'object' && 'shape' in v) add(v as Tensor, dtype === 'int8' && name !== 'kvBProj');
  }
  add(w.output, dtype === 'int8');
  return bytes;
}

/** Deterministic token id for (sequence, position): a hash, so rows differ and nothing depends on sampling. */
function tokenAt(seq: number, pos: number, vocab: number, seed: number): number {
  let h = Math.imul(seq + 1, 0x9e3779b1) ^ Math.imul(pos + 7, 0x85ebca6b) ^ seed;
  h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d);
  h ^= h >>> 12;
  return (h >>> 0) % vocab;
}

interface ConfigResult {
  model: string;
  attention: string;
  batch: number;
  context: number;
  /** Command buffers each step was submitted in. */
  submitChunks: number;
  /** Step N + 1 submitted before step N was read back (its tokens the picks of N, on the GPU). */
  pipelined: boolean;
  /** With --profile: GPU ms per step by pipeline label (one profiled step), largest first. */
  profile?: Array<{ label: string; count: number; ms: number }>;
  steps: number;
  msPerStep: number;
  /** GPU time of the step's compute pass (timestamps; NaN without them): the rest of msPerStep is readback and host. */
  gpuMsPerStep: number;
  /** Host time from the step call to its last submit (runner.lastStepRecordMs): planning and recording. */
  recordMsPerStep: number;
  tokPerS: number;
  weightBytes: number;
  kvBytesRead: number;
  /** Weight bytes per step / step time. */
  weightGBs: number;
  /** (weights + KV read) / step time. */
  totalGBs: number;
  ceilingFraction: number;
  peers: { pytorch?: number; llamacpp?: number };
}

interface ModelResult {
  model: string;
  attention: string;
  config: ModelConfig;
  generateS: number;
  uploadS: number;
  weightBytes: number;
  kvBytesPerToken: number;
  kvValuesPerTokenPerLayer: number;
  prefillTokens: number;
  prefillS: number;
  /** With --profile: the template's last prefill chunk run again (same tokens, same KV), one dispatch a pass. */
  prefillProfile?: { rows: number; startPos: number; gpuMs: number; profile: Array<{ label: string; count: number; ms: number }> };
  kvBudgetBytes: number;
  kvBudgetTokens: number;
  configs: ConfigResult[];
}

/** A profiled step by pipeline: µs per step, dispatches, share; the sum against the plain step's GPU span. */
function profileTable(title: string, prof: Array<{ label: string; count: number; ms: number }>, spanMs: number): string {
  const sum = prof.reduce((t, e) => t + e.ms, 0);
  const count = prof.reduce((t, e) => t + e.count, 0);
  const lines = [`profile, ${title}: ${count} dispatches, their GPU times sum to ${fmt(sum, 2)} ms; the plain step's GPU span ${fmt(spanMs, 2)} ms`];
  for (const e of prof.slice(0, 16)) lines.push(`  ${fmt(e.ms * 1000, 0).padStart(7)} µs  ${String(e.count).padStart(4)}×  ${fmt((100 * e.ms) / sum, 1).padStart(5)} %  ${e.label}`);
  if (prof.length > 16) lines.push(`  ${fmt(prof.slice(16).reduce((t, e) => t + e.ms, 0) * 1000, 0).padStart(7)} µs  in ${prof.length - 16} more pipelines`);
  return lines.join('\n');
}

const fmt = (v: number, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : '—');
const GB = 1e9;

async function benchModel(gpu: GpuContext, name: SyntheticModelName, a: Args, log: (s: string) => void): Promise<ModelResult> {
  const t0 = performance.now();
  const m = syntheticF16Model(name, { seed: a.seed, layers: a.layers, vocabSize: a.vocab });
  const c = m.config;
  const generateS = (performance.now() - t0) / 1000;
  const maxCtx = a.contexts[a.contexts.length - 1];
  const maxB = a.batches[a.batches.length - 1];
  if (maxCtx + a.warmup + a.steps > c.maxSeqLen) throw new Error(`${name}: context ${maxCtx} + ${a.warmup + a.steps} steps passes its ${c.maxSeqLen}-token context`);
  const bs = a.blockSize;
  const templateBlocks = maxCtx / bs;
  const perSeq = Math.ceil((maxCtx + (a.warmup + a.steps) * a.submitChunks.length * a.pipeline.length + (a.profile ? 2 : 0)) / bs);
  const numBlocks = templateBlocks + maxB * perSeq;
  const weightBytes = weightBytesPerStep(m.weights, a.weightDtype);
  log(`${name}: weights generated in ${fmt(generateS)} s (${fmt(weightBytes / GB, 2)} GB of ${a.weightDtype} weights read per step); uploading, KV pool ${numBlocks} blocks × ${bs} tokens`);

  const t1 = performance.now();
  const runner = await createGpuRunner(gpu, m, {
    gpuTiming: true,
    blockSize: bs,
    numBlocks,
    weightDtype: a.weightDtype,
    cacheDtype: a.kvCacheDtype,
    maxRowsPerStep: Math.max(a.prefillChunk, maxB),
    ...(c.attention === 'mla'
      ? { attentionBlock: mlaBlockFactory(a.mlaBlock) }
      : {}),
  });
  const uploadS = (performance.now() - t1) / 1000;
  try {
    // 1. The template: one sequence prefilled to the largest context, in chunks.
    const template = Array.from({ length: templateBlocks }, (_, i) => i);
    const t2 = performance.now();
    for (let pos = 0; pos < maxCtx; pos += a.prefillChunk) {
      const n = Math.min(a.prefillChunk, maxCtx - pos);
      const tokens = Array.from({ length: n }, (_, i) => tokenAt(0, pos + i, c.vocabSize, a.seed));
      await runner.step([{ tokens, startPos: pos, blockTable: template, logits: pos + n === maxCtx ? 'last' : 'none' }]);
    }
    const prefillS = (performance.now() - t2) / 1000;
    log(`${name}: uploaded in ${fmt(uploadS)} s; template prefilled (${maxCtx} tokens in chunks of ${a.prefillChunk}) in ${fmt(prefillS)} s = ${fmt(maxCtx / prefillS, 0)} tok/s`);
    let prefillProfile: ModelResult['prefillProfile'];
    if (a.profile) {
      // Where a prompt step's time goes: the last chunk again (it rewrites the same KV), plain for its GPU span, then
      // profiled. Its rows attend to up to maxCtx positions, as a served prompt chunk that deep into its prompt does.
      const startPos = Math.max(0, maxCtx - a.prefillChunk);
      const chunk: StepSequence = {
        tokens: Array.from({ length: maxCtx - startPos }, (_, i) => tokenAt(0, startPos + i, c.vocabSize, a.seed)),
        startPos,
        blockTable: template,
        logits: 'last',
      };
      await runner.step([chunk]);
      const gpuMs = runner.lastStepGpuMs ?? NaN;
      const prof = await runner.stepProfile([chunk]);
      prefillProfile = { rows: chunk.tokens.length, startPos, gpuMs, profile: summarizeProfile(prof.dispatches) };
      console.log(profileTable(`${name} prefill chunk of ${chunk.tokens.length} rows at positions ${startPos}…${maxCtx - 1}`, prefillProfile.profile, gpuMs));
    }

    const configs: ConfigResult[] = [];
    const seqBlocks = (i: number) => Array.from({ length: perSeq }, (_, j) => templateBlocks + i * perSeq + j);
    for (const ctx of a.contexts) {
      let copied = 0; // sequences holding the template's first ctx/bs blocks (decode only writes past them)
      for (const batch of a.batches) {
        const pairs: Array<[number, number]> = [];
        for (let i = copied; i < batch; i++) {
          const dst = seqBlocks(i);
          for (let j = 0; j < ctx / bs; j++) pairs.push([template[j], dst[j]]);
        }
        runner.copyBlocks(pairs);
        copied = batch;
        // What each row asks for: its logits row, a greedy pick, or a draw (a fixed pseudo-random u per row and step).
        const rowLogits = (i: number, s: number): Pick<StepSequence, 'logits' | 'sample'> =>
          a.logits === 'full'
            ? { logits: 'last' }
            : a.logits === 'argmax'
              ? { logits: 'argmax' }
              : { logits: 'sample', sample: { temperature: 0.8, topK: 50, topP: 0.95, minP: 0, u: tokenAt(i + 7, ctx + s, 1 << 20, a.seed) / (1 << 20) } };
        const step = (s: number, fromPicks = false) =>
          runner.stepOutput(
            Array.from({ length: batch }, (_, i): StepSequence => ({
              tokens: [tokenAt(i + 1, ctx + s, c.vocabSize, a.seed)],
              startPos: ctx + s,
              blockTable: seqBlocks(i),
              ...rowLogits(i, s),
              ...(fromPicks ? { previousPick: i } : {}),
            })),
          );
        // Pipelined: the first step's tokens are fixed, every later one's are the picks of the step before, and one
        // step is always in flight while the next is recorded and submitted.
        const run = async (from: number, n: number, pipelined: boolean, onDone: () => void) => {
          if (!pipelined) {
            for (let s = 0; s < n; s++) {
              await step(from + s);
              onDone();
            }
            return;
          }
          let pending = step(from);
          for (let s = 1; s < n; s++) {
            const next = step(from + s, true);
            await pending;
            onDone();
            pending = next;
          }
          await pending;
          onDone();
        };
        // Positions keep growing across the settings; each setting warms up again (new pipelines: none).
        let pos = 0;
        for (const chunks of a.submitChunks) for (const pipelined of a.pipeline) {
          if (pipelined && a.logits === 'full') throw new Error('--pipeline on needs --logits argmax or sample (the picks are the next tokens)');
          runner.submitChunks = chunks;
          await run(pos, a.warmup, pipelined, () => {});
          pos += a.warmup;
          const t = performance.now();
          let gpuMs = 0;
          let recordMs = 0;
          await run(pos, a.steps, pipelined, () => {
            gpuMs += runner.lastStepGpuMs ?? NaN;
            recordMs += runner.lastStepRecordMs;
          });
          pos += a.steps;
          const ms = (performance.now() - t) / a.steps;
          // KV read per step: each sequence's cached tokens (ctx plus what warmup and the timed steps add, on average).
          const kvBytesRead = batch * (ctx + pos - a.steps / 2) * runner.kvBytesPerToken;
          const r: ConfigResult = {
            model: name,
            attention: c.attention,
            batch,
            context: ctx,
            submitChunks: chunks,
            pipelined,
            steps: a.steps,
            msPerStep: ms,
            gpuMsPerStep: gpuMs / a.steps,
            recordMsPerStep: recordMs / a.steps,
            tokPerS: (batch * 1000) / ms,
            weightBytes,
            kvBytesRead,
            weightGBs: weightBytes / (ms / 1000) / GB,
            totalGBs: (weightBytes + kvBytesRead) / (ms / 1000) / GB,
            ceilingFraction: (weightBytes + kvBytesRead) / (ms / 1000) / GB / a.ceilingGBs,
            // Peers ran the full model: no comparison for reduced layers or vocabulary.
            peers: a.layers === undefined && a.vocab === undefined ? peerFor(name, batch, ctx) : {},
          };
          if (a.profile) {
            await step(pos++); // the profiled step's own pipelines: none new, but keep the clocks where they were
            const prof = await runner.stepProfile(
              Array.from({ length: batch }, (_, i): StepSequence => ({
                tokens: [tokenAt(i + 1, ctx + pos, c.vocabSize, a.seed)],
                startPos: ctx + pos,
                blockTable: seqBlocks(i),
                ...rowLogits(i, pos),
              })),
            );
            pos++;
            r.profile = summarizeProfile(prof.dispatches);
            console.log(profileTable(`${name} batch ${batch} ctx ${ctx}`, r.profile, r.gpuMsPerStep));
          }
          configs.push(r);
          log(`${name}: batch ${batch} ctx ${ctx}, ${chunks} submit(s) a step: ${fmt(ms, 2)} ms/step, ${fmt(r.tokPerS, 0)} tok/s, ${fmt(r.totalGBs, 0)} GB/s (weights + KV)`);
        }
      }
    }
    const kvBudgetTokens = Math.floor(a.kvBudget / (bs * runner.kvBytesPerToken)) * bs;
    return {
      model: name,
      attention: c.attention,
      config: c,
      generateS,
      uploadS,
      weightBytes,
      kvBytesPerToken: runner.kvBytesPerToken,
      kvValuesPerTokenPerLayer: kvValuesPerToken(c),
      prefillTokens: maxCtx,
      prefillS,
      ...(prefillProfile ? { prefillProfile } : {}),
      kvBudgetBytes: a.kvBudget,
      kvBudgetTokens,
      configs,
    };
  } finally {
    runner.destroy();
  }
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('  ')).join('\n');
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  const log = (s: string) => process.stderr.write(`${s}\n`);
  const gpu = await openGpu({ log });
  const started = performance.now();
  const results: ModelResult[] = [];
  try {
    log(`adapter: ${gpu.adapterName}${gpu.isSoftware ? ' (software: timings are not meaningful)' : ''}`);
    for (const name of a.models) {
      results.push(await benchModel(gpu, name, a, log));
      // Let the destroyed runner's memory go before the next model uploads.
      await gpu.device.queue.onSubmittedWorkDone();
    }
  } finally {
    gpu.destroy();
    releaseGpu();
  }
  const totalS = (performance.now() - started) / 1000;

  if (a.json) {
    writeFileSync(
      a.json,
      JSON.stringify({ adapter: gpu.adapterName, software: gpu.isSoftware, args: a, ceilingGBs: a.ceilingGBs, peers: PEERS, totalSeconds: totalS, models: results }, null, 2),
    );
    log(`wrote ${a.json}`);
  }

  // Capacity at one KV budget, then the table last (the device tool shows the end of the output).
  const budgetGiB = a.kvBudget / 2 ** 30;
  const base = results.find((r) => r.attention === 'gqa');
  const lines: string[] = [];
  lines.push(`KV capacity at ${fmt(budgetGiB, budgetGiB % 1 ? 2 : 0)} GiB (f16 cache, blocks of ${a.blockSize}):`);
  for (const r of results) {
    const ratio = base && r !== base ? `  = ${fmt(r.kvBudgetTokens / base.kvBudgetTokens, 2)}× ${base.model}` : '';
    lines.push(`  ${r.model.padEnd(16)} ${r.attention}  ${r.kvValuesPerTokenPerLayer} values/token/layer, ${r.kvBytesPerToken} B/token → ${r.kvBudgetTokens} tokens${ratio}`);
  }
  lines.push('');
  const header = ['model', 'attn', 'batch', 'ctx', 'submits', 'pipelined', 'ms/step', 'GPU ms', 'record ms', 'tok/s', 'W GB/s', '(W+KV) GB/s', `% of ${fmt(a.ceilingGBs / 1000, 1)} TB/s`, 'vs PyTorch', 'vs llama.cpp'];
  const rows = [header];
  for (const r of results) {
    for (const c of r.configs) {
      rows.push([
        r.model,
        r.attention,
        String(c.batch),
        String(c.context),
        String(c.submitChunks),
        c.pipelined ? 'yes' : 'no',
        fmt(c.msPerStep, 2),
        fmt(c.gpuMsPerStep, 2),
        fmt(c.recordMsPerStep, 2),
        fmt(c.tokPerS, 0),
        fmt(c.weightGBs, 0),
        fmt(c.totalGBs, 0),
        `${fmt(100 * c.ceilingFraction, 0)}%`,
        c.peers.pytorch ? `${fmt(c.tokPerS / c.peers.pytorch, 2)}× (${c.peers.pytorch})` : '—',
        c.peers.llamacpp ? `${fmt(c.tokPerS / c.peers.llamacpp, 2)}× (${c.peers.llamacpp})` : '—',
      ]);
    }
  }
  lines.push(
    `decode through the GPU runner on ${gpu.adapterName}: ${a.steps} timed steps after ${a.warmup} warm-up, ` +
      (a.logits === 'argmax'
        ? 'greedy picks on the GPU (one id per row read back)'
        : a.logits === 'sample'
          ? 'draws on the GPU (temperature 0.8, top-k 50, top-p 0.95; one id per row read back)'
          : 'logits [batch, vocab] read back every step'),
  );
  lines.push(table(rows));
  lines.push(
    `peers (../shared/gpu/README.md, H200, Qwen2.5-7B): PyTorch ${PEERS.pytorch.batch1} tok/s batch 1, ${PEERS.pytorch.b32ctx512} at 32 seqs ctx 512, ` +
      `${PEERS.pytorch.b32ctx4k} at ctx 4K; llama.cpp Vulkan ${PEERS.llamacpp.batch1} / ${PEERS.llamacpp.b32}. Total ${fmt(totalS, 0)} s.`,
  );
  process.stdout.write(lines.join('\n') + '\n');
}

main().catch((err) => {
  process.stderr.write(`bench:decode: ${(err as Error).message}\n`);
  if (process.env.MLA_SERVE_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
  process.exitCode = 1;
});

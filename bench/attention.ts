// Attention micro-benchmark at Qwen2.5-7B shapes: GQA decode (28 q / 4 kv heads, d 128) vs absorbed MLA decode (28 heads,
// 512 + 64) over f16 paged caches, time per layer-step, GB/s over the cache bytes and FLOP/s against the H200 ceilings.
//
//   npm run bench:attention                         # batch 1/8/32/64 × context 1K/4K/16K (real GPU; ~3.3 GB of cache)
//   npm run bench:attention -- --quick              # tiny contexts, checks that it runs (SwiftShader)
//   npm run bench:attention -- --json out.json      # also write every measurement as JSON
//   options: --batches 1,8,32,64  --contexts 1024,4096,16384  --ceiling-gbs 4300  --ceiling-tflops 67
//            --target-ms 150 (GPU time per measurement)  --spin-ms 300 (warm-up)  --variants all|default (MLA workgroup/tile variants)
//            --prefill 512,2048|none (one prompt, every position a row: the absorbed form's prefill cost vs GQA)
//            --mla-int8 all|fast|FORM,FORM (MLA over the int8 cache; fast = the dot4 kernel's forms and the f32 kernel;
//            forms: MLA_INT8_FORMS below)  --block-size 16  --mla-row-align 4 (int8 MLA rows padded to 16 / 32 … bytes)
//
// Synthetic data: cache values are a hash of their index (f16 in ±[1/16, 1)), generated on the GPU; block tables are
// a fixed shuffle of the pool (pages scattered as a running server leaves them). Each measurement records many
// layer-steps (partial + merge dispatches) in one compute pass, one submit; timestamps when the adapter has them.
// Row 0 of each shape is checked against a float64 CPU computation from the same hash (max relative error column).
// GQA also runs over an int8 cache (kernels/kv-int8.ts rows: hashed int8 values, hashed scales in [2^-7, 2^-6)), default
// variant only, in the "GQA int8" column.
import { writeFileSync } from 'node:fs';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { GqaAttention, GQA_TARGET_WORKGROUPS, maxAttentionChunk, type GqaAttentionTuning } from '../kernels/attention.ts';
import { timeGpuPass } from './gpu-timing.ts';
import { StepProfiler, summarizeProfile } from '../engine/step-profile.ts';
import { int8RowFormat, type Int8RowFormat } from '../kernels/kv-int8.ts';
import { dequantizeLatentRowInt8, mlaInt8RowFormat, type MlaInt8RowFormat } from '../kernels/mla-kv-int8.ts';
import { MlaAttention, DEFAULT_MLA_TUNING, MLA_MAX_CHUNK, MLA_TARGET_WORKGROUPS, mlaSplit, planMlaAttention, type MlaAttentionTuning } from '../kernels/mla-attention.ts';
import { buildStepMeta, type StepMeta } from '../kernels/step-meta.ts';
import { bindBuffers, f16BitsToF32, gridFor, readF32, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { checkMlaTcDump, describeMlaTcDump } from './mla-tc-dump.ts';

const N_HEADS = 28;
const N_KV = 4;
const HEAD_DIM = 128;
const R = 512;
const ROPE = 64;
/** Tokens per cache block (--block-size; the one-pass tensor-core MLA kernel needs a multiple of 32). */
let BLOCK = 16;

interface Args {
  quick: boolean;
  json?: string;
  batches: number[];
  contexts: number[];
  ceilingGBs: number;
  ceilingTflops: number;
  targetMs: number;
  /** GPU warm-up before each measurement (ms). */
  spinMs: number;
  variants: 'all' | 'default';
  /** Prompt lengths for the prefill comparison (one sequence, every position a row). */
  prefill: number[];
  /** MLA over the int8 cache: the forms to run (MLA_INT8_FORMS keys). */
  mlaInt8: string[];
  blockSize: number;
  /** The int8 MLA cache's rows padded to a multiple of this many bytes (mlaInt8RowFormat; 4: packed, 584 B). */
  mlaRowAlign: number;
  /** Also time each dispatch of a layer-step on its own (query, partial, merge …: engine/step-profile.ts). */
  profile: boolean;
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    quick: false,
    batches: [1, 8, 32, 64],
    contexts: [1024, 4096, 16384],
    ceilingGBs: 4300,
    ceilingTflops: 67,
    targetMs: 150,
    spinMs: 300,
    variants: 'all',
    prefill: [512, 2048],
    mlaInt8: MLA_INT8_FORMS.map((f) => f.key),
    blockSize: 16,
    mlaRowAlign: 4,
    profile: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const val = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${k} needs a value`);
      return v;
    };
    const list = () => val().split(',').map((s) => {
      const n = Number(s);
      if (!Number.isInteger(n) || n < 1) throw new Error(`${k}: "${s}" is not a positive integer`);
      return n;
    });
    if (k === '--quick') a.quick = true;
    else if (k === '--json') a.json = val();
    else if (k === '--batches') a.batches = list();
    else if (k === '--contexts') a.contexts = list();
    else if (k === '--prefill') a.prefill = argv[i + 1] === 'none' ? (i++, []) : list();
    else if (k === '--ceiling-gbs') a.ceilingGBs = Number(val());
    else if (k === '--ceiling-tflops') a.ceilingTflops = Number(val());
    else if (k === '--target-ms') a.targetMs = Number(val());
    else if (k === '--spin-ms') a.spinMs = Number(val());
    else if (k === '--block-size') {
      a.blockSize = Number(val());
      if (!Number.isInteger(a.blockSize) || a.blockSize < 1) throw new Error(`--block-size takes a positive integer`);
    }
    else if (k === '--mla-row-align') a.mlaRowAlign = Number(val());
    else if (k === '--profile') a.profile = true;
    else if (k === '--mla-int8') {
      const v = val();
      const keys = MLA_INT8_FORMS.map((f) => f.key);
      a.mlaInt8 = v === 'all' ? keys : v === 'fast' ? MLA_INT8_FORMS.filter((f) => f.fast).map((f) => f.key) : v.split(',');
      for (const key of a.mlaInt8) if (!keys.includes(key)) throw new Error(`--mla-int8: no form "${key}"; forms: ${keys.join(', ')}`);
    } else if (k === '--variants') {
      const v = val();
      if (v !== 'all' && v !== 'default') throw new Error(`--variants takes all or default, not ${v}`);
      a.variants = v;
    } else throw new Error(`unknown option ${k}; see the top of bench/attention.ts`);
  }
  if (a.quick) {
    if (!argv.includes('--batches')) a.batches = [1, 3];
    if (!argv.includes('--contexts')) a.contexts = [40, 300];
    if (!argv.includes('--prefill')) a.prefill = [37];
    a.targetMs = Math.min(a.targetMs, 5);
    if (!argv.includes('--spin-ms')) a.spinMs = 0;
    if (!argv.includes('--variants')) a.variants = 'default';
  }
  return a;
}

/** MLA kernel variants the benchmark tries (the default first); the table shows the fastest. */
const MLA_VARIANTS: Array<{ name: string; tuning: Partial<MlaAttentionTuning>; chunkScale: number }> = [
  { name: 'wg256 b2', tuning: {}, chunkScale: 1 },
  { name: 'wg256 b2 chunk×2', tuning: {}, chunkScale: 2 },
  { name: 'wg256 b2 chunk÷2', tuning: {}, chunkScale: 0.5 },
  { name: 'wg256 b2 chunk÷4', tuning: {}, chunkScale: 0.25 },
  { name: 'wg256 b1', tuning: { tokensPerThread: 1 }, chunkScale: 1 },
  { name: 'wg128 b2', tuning: { workgroupSize: 128 }, chunkScale: 1 },
  { name: 'wg256 b2 14h', tuning: { maxHeadsPerThread: 14 }, chunkScale: 1 },
  { name: 'wg256 b2 q64', tuning: { qSliceValues: 64 }, chunkScale: 1 },
  { name: 'wg256 b2 q128', tuning: { qSliceValues: 128 }, chunkScale: 1 },
  { name: 'wg256 b2 q64 chunk×2', tuning: { qSliceValues: 64 }, chunkScale: 2 },
  // 7 heads × 4 tokens per thread: half the query loads per FMA, each latent row read by 4 head groups.
  { name: 'wg256 b4 7h', tuning: { tokensPerThread: 4, maxHeadsPerThread: 7 }, chunkScale: 1 },
];

/**
 * MLA over the int8 cache: the int8-product kernels (tensor cores where the adapter has i8 subgroup matrices, their
 * dot4 form in the tc layout, the dot4 kernel) and the f32 kernel unpacking int8 ('off'). `targetScale` multiplies the
 * workgroups the context split aims for (mlaSplit's target).
 */
/** The three-pass forms below multiply with dot4I8Packed unless they name tensor cores (unset, the kernels take them where the adapter has them). */
const DOT4_3PASS: Partial<MlaAttentionTuning> = { int8ScoreProducts: 'dot4', int8ValueProducts: 'dot4' };
const MLA_INT8_FORMS: Array<{ key: string; mode: MlaAttentionTuning['int8Products']; window: number; tuning?: Partial<MlaAttentionTuning>; targetScale?: number; variant: string; fast?: boolean }> = [
  { key: 'tensor-cores', mode: 'tensor-cores', window: 64, variant: 'int8 tensor cores' },
  // 32-token windows: less workgroup memory (41 KB instead of 46 KB at these shapes).
  { key: 'tensor-cores w32', mode: 'tensor-cores', window: 32, variant: 'int8 tensor cores w32' },
  { key: 'tc-scores', mode: 'tc-scores', window: 64, variant: 'int8 tc-scores only' },
  { key: 'tc-scores-bare', mode: 'tc-scores-bare', window: 64, variant: 'int8 tc-scores-bare only' },
  { key: 'tc-values', mode: 'tc-values', window: 64, variant: 'int8 tc-values only' },
  { key: 'emulate', mode: 'emulate', window: 64, variant: 'int8 dot4, tc layout' },
  { key: 'dot4', mode: 'dot4', window: 64, variant: 'int8 dot4', fast: true },
  { key: 'dot4 q-storage', mode: 'dot4', window: 64, tuning: { int8QueryStaged: false }, variant: 'int8 dot4', fast: true },
  { key: 'dot4 target×2', mode: 'dot4', window: 64, targetScale: 2, variant: 'int8 dot4, 2× workgroups', fast: true },
  { key: 'dot4 target÷2', mode: 'dot4', window: 64, targetScale: 0.5, variant: 'int8 dot4, ½ workgroups', fast: true },
  // Two workgroups per (row, chunk), 14 heads each: twice the workgroups where a small batch leaves SMs idle.
  { key: 'dot4 prefetch', mode: 'dot4', window: 64, tuning: { int8Prefetch: true }, variant: 'int8 dot4, prefetch', fast: true },
  { key: 'dot4 prefetch q-storage', mode: 'dot4', window: 64, tuning: { int8Prefetch: true, int8QueryStaged: false }, variant: 'int8 dot4, prefetch', fast: true },
  { key: 'dot4 prefetch v2', mode: 'dot4', window: 64, tuning: { int8Prefetch: true, int8ValueRounds: 2 }, variant: 'int8 dot4, prefetch, 2 value rounds', fast: true },
  // The softmax inside the score warps (subgroup reductions; 64-token windows fit with the query from storage).
  { key: 'dot4 warp', mode: 'dot4', window: 64, tuning: { int8Softmax: 'subgroup' }, variant: 'int8 dot4, warp softmax', fast: true },
  { key: 'dot4 warp w32', mode: 'dot4', window: 32, tuning: { int8Softmax: 'subgroup' }, variant: 'int8 dot4, warp softmax', fast: true },
  { key: 'dot4 warp v1', mode: 'dot4', window: 64, tuning: { int8Softmax: 'subgroup', int8ValueRounds: 1 }, variant: 'int8 dot4, warp softmax, 1 value round' },
  { key: 'dot4 warp v4', mode: 'dot4', window: 64, tuning: { int8Softmax: 'subgroup', int8ValueRounds: 4 }, variant: 'int8 dot4, warp softmax, 4 value rounds' },
  { key: 'dot4 warp emulated', mode: 'dot4', window: 64, tuning: { int8Softmax: 'emulated' }, variant: 'int8 dot4, warp softmax emulated' },
  { key: 'dot4 head splits 2', mode: 'dot4', window: 64, tuning: { int8HeadSplits: 2 }, variant: 'int8 dot4, 2 head splits', fast: true },
  { key: 'three-pass', mode: 'three-pass', window: 64, tuning: DOT4_3PASS, variant: 'int8 three-pass, dot4', fast: true },
  { key: 'three-pass auto', mode: 'three-pass', window: 64, variant: 'int8 three-pass (products: auto)', fast: true },
  { key: 'three-pass w32', mode: 'three-pass', window: 32, tuning: DOT4_3PASS, variant: 'int8 three-pass', fast: true },
  { key: 'three-pass parts 1', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8LatentParts: 1 }, variant: 'int8 three-pass', fast: true },
  { key: 'three-pass parts 4', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8LatentParts: 4 }, variant: 'int8 three-pass', fast: true },
  { key: 'three-pass target×2', mode: 'three-pass', window: 64, tuning: DOT4_3PASS, targetScale: 2, variant: 'int8 three-pass, 2× chunks', fast: true },
  { key: 'three-pass target×4', mode: 'three-pass', window: 64, tuning: DOT4_3PASS, targetScale: 4, variant: 'int8 three-pass, 4× chunks', fast: true },
  { key: 'three-pass tile 64', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8ScoreTile: 64 }, variant: 'int8 three-pass, score tile 64', fast: true },
  { key: 'three-pass tc', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8ScoreProducts: 'tensor-cores' }, variant: 'int8 three-pass, tensor-core scores', fast: true },
  { key: 'three-pass tc tile 64', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8ScoreProducts: 'tensor-cores', int8ScoreTile: 64 }, variant: 'int8 three-pass, tensor-core scores, tile 64', fast: true },
  { key: 'three-pass tc values', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8ValueProducts: 'tensor-cores' }, variant: 'int8 three-pass, tensor-core values', fast: true },
  { key: 'three-pass tc both', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8ScoreProducts: 'tensor-cores', int8ValueProducts: 'tensor-cores' }, variant: 'int8 three-pass, tensor-core scores and values', fast: true },
  { key: 'three-pass tc both parts 4', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8ScoreProducts: 'tensor-cores', int8ValueProducts: 'tensor-cores', int8LatentParts: 4 }, variant: 'int8 three-pass, tensor-core scores and values', fast: true },
  { key: 'three-pass tc both target÷2', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8ScoreProducts: 'tensor-cores', int8ValueProducts: 'tensor-cores' }, targetScale: 0.5, variant: 'int8 three-pass, tensor-core scores and values, ½ chunks', fast: true },
  { key: 'three-pass tc both target×2', mode: 'three-pass', window: 64, tuning: { ...DOT4_3PASS, int8ScoreProducts: 'tensor-cores', int8ValueProducts: 'tensor-cores' }, targetScale: 2, variant: 'int8 three-pass, tensor-core scores and values, 2× chunks', fast: true },
  { key: 'three-pass tc both w32', mode: 'three-pass', window: 32, tuning: { ...DOT4_3PASS, int8ScoreProducts: 'tensor-cores', int8ValueProducts: 'tensor-cores' }, variant: 'int8 three-pass, tensor-core scores and values', fast: true },
  { key: 'three-pass target÷2', mode: 'three-pass', window: 64, tuning: DOT4_3PASS, targetScale: 0.5, variant: 'int8 three-pass, ½ chunks', fast: true },
  // One pass, both products on tensor cores, the cache read straight from storage (needs --block-size 32 or 64).
  { key: 'flash', mode: 'flash', window: 64, variant: 'int8 one-pass tensor cores', fast: true },
  { key: 'flash target×2', mode: 'flash', window: 64, targetScale: 2, variant: 'int8 one-pass tensor cores, 2× workgroups', fast: true },
  { key: 'flash target÷2', mode: 'flash', window: 64, targetScale: 0.5, variant: 'int8 one-pass tensor cores, ½ workgroups', fast: true },
  { key: 'flash-dot4', mode: 'flash-dot4', window: 64, variant: 'int8 one-pass, dot4 form', fast: true },
  { key: 'flash tc-scores', mode: 'flash', window: 64, tuning: { int8FlashTensorCores: 'scores' }, variant: 'int8 one-pass, tensor-core scores only', fast: true },
  { key: 'flash tc-values', mode: 'flash', window: 64, tuning: { int8FlashTensorCores: 'values' }, variant: 'int8 one-pass, tensor-core values only', fast: true },
  { key: 'flash target×4', mode: 'flash', window: 64, targetScale: 4, variant: 'int8 one-pass tensor cores, 4× workgroups', fast: true },
  { key: 'flash transposed', mode: 'flash', window: 64, tuning: { int8FlashValueForm: 'transposed' }, variant: 'int8 one-pass tensor cores, values Cᵀ·p′ᵀ', fast: true },
  { key: 'flash fold 1', mode: 'flash', window: 64, tuning: { int8FlashMaxFold: 1 }, variant: 'int8 one-pass tensor cores, 1 latent tile a fold', fast: true },
  { key: 'flash fold 1 tc-values', mode: 'flash', window: 64, tuning: { int8FlashMaxFold: 1, int8FlashTensorCores: 'values' }, variant: 'int8 one-pass, tensor-core values only, 1 latent tile a fold', fast: true },
  { key: 'flash skip scores', mode: 'flash', window: 64, tuning: { int8FlashSkip: 'scores' }, variant: 'int8 one-pass tc, no score products (timing)', fast: true },
  { key: 'flash skip values', mode: 'flash', window: 64, tuning: { int8FlashSkip: 'values' }, variant: 'int8 one-pass tc, no value products (timing)', fast: true },
  { key: 'flash skip products', mode: 'flash', window: 64, tuning: { int8FlashSkip: 'products' }, variant: 'int8 one-pass tc, no products: the skeleton (timing)', fast: true },
  { key: 'flash skip fold', mode: 'flash', window: 64, tuning: { int8FlashSkip: 'fold' }, variant: 'int8 one-pass tc, no folds (timing)', fast: true },
  { key: 'flash batch 1', mode: 'flash', window: 64, tuning: { int8FlashScoreBatch: 1 }, variant: 'int8 one-pass tensor cores, score loads one at a time', fast: true },
  { key: 'flash tiles 2', mode: 'flash', window: 64, tuning: { int8FlashScoreTiles: 2 }, variant: 'int8 one-pass tensor cores, 2 score tiles a subgroup', fast: true },
  { key: 'flash tiles 2 target×2', mode: 'flash', window: 64, tuning: { int8FlashScoreTiles: 2 }, targetScale: 2, variant: 'int8 one-pass tensor cores, 2 score tiles a subgroup, 2× workgroups', fast: true },
  { key: 'flash-dot4 tiles 2', mode: 'flash-dot4', window: 64, tuning: { int8FlashScoreTiles: 2 }, variant: 'int8 one-pass, dot4 form, 2 score tiles a subgroup', fast: true },
  { key: 'flash tiled scores', mode: 'flash', window: 64, tuning: { int8FlashTiledProbe: 'scores' }, variant: 'int8 one-pass tc, score loads as a tiled layout\'s (timing)', fast: true },
  { key: 'flash tiled values', mode: 'flash', window: 64, tuning: { int8FlashTiledProbe: 'values' }, variant: 'int8 one-pass tc, value loads as a tiled layout\'s (timing)', fast: true },
  { key: 'flash tiled', mode: 'flash', window: 64, tuning: { int8FlashTiledProbe: 'both' }, variant: 'int8 one-pass tc, all loads as a tiled layout\'s (timing)', fast: true },
  { key: 'flash batch 18', mode: 'flash', window: 64, tuning: { int8FlashScoreBatch: 18 }, variant: 'int8 one-pass tensor cores, all 18 score loads at once', fast: true },
  { key: 'off', mode: 'off', window: 64, variant: 'f32 over int8', fast: true },
];

// ---- synthetic cache values: the same hash on the GPU (fill kernel) and on the CPU (check) ----

const HASH_WGSL = /* wgsl */ `
fn hashWord(i: u32, seed: u32) -> u32 {
  var x = i * 747796405u + seed;
  x = ((x >> ((x >> 28u) + 4u)) ^ x) * 277803737u;
  return (x >> 22u) ^ x;
}
fn halfBits(r: u32) -> u32 { return ((r & 1u) << 15u) | ((11u + ((r >> 1u) & 3u)) << 10u) | ((r >> 3u) & 0x3ffu); }
`;

function hashWord(i: number, seed: number): number {
  let x = (Math.imul(i, 747796405) + seed) >>> 0;
  x = Math.imul(((x >>> ((x >>> 28) + 4)) ^ x) >>> 0, 277803737) >>> 0;
  return ((x >>> 22) ^ x) >>> 0;
}
const halfBits = (r: number) => ((r & 1) << 15) | ((11 + ((r >>> 1) & 3)) << 10) | ((r >>> 3) & 0x3ff);

/** f16 value pair of word i (low half first), as the fill kernel writes it. */
function wordValues(i: number, seed: number): [number, number] {
  const r = hashWord(i, seed);
  return [f16BitsToF32(halfBits(r & 0xffff)), f16BitsToF32(halfBits(r >>> 16))];
}

function fillCache(gpu: GpuContext, buf: GPUBuffer, seed: number): void {
  const WG = 256;
  const code = /* wgsl */ `
${HASH_WGSL}
@group(0) @binding(0) var<storage, read_write> cache: array<u32>;
@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = id.x + id.y * nwg.x * ${WG}u;
  if (i >= arrayLength(&cache)) { return; }
  let r = hashWord(i, ${seed >>> 0}u);
  cache[i] = halfBits(r & 0xffffu) | (halfBits(r >> 16u) << 16u);
}`;
  const pipeline = gpu.pipeline('bench fill cache', code);
  const enc = gpu.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(pipeline);
  pass.setBindGroup(0, bindBuffers(gpu, pipeline, 'fill', [buf]));
  const [x, y] = gridFor(gpu, Math.ceil(buf.size / 4 / WG));
  pass.dispatchWorkgroups(x, y);
  pass.end();
  gpu.device.queue.submit([enc.finish()]);
}

/** An int8 cache row's words: hashed bytes for the values, f32 scales in [2^-7, 2^-6) built from hash bits (exact on both sides). */
function fillCacheInt8(gpu: GpuContext, buf: GPUBuffer, seed: number, f: { rowWords: number; scaleWord: number }): void {
  const WG = 256;
  const code = /* wgsl */ `
${HASH_WGSL}
@group(0) @binding(0) var<storage, read_write> cache: array<u32>;
@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = id.x + id.y * nwg.x * ${WG}u;
  if (i >= arrayLength(&cache)) { return; }
  let r = hashWord(i, ${seed >>> 0}u);
  cache[i] = select(r, 0x3c000000u | (r & 0x7fffffu), i % ${f.rowWords}u >= ${f.scaleWord}u);
}`;
  const pipeline = gpu.pipeline('bench fill int8 cache', code);
  const enc = gpu.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(pipeline);
  pass.setBindGroup(0, bindBuffers(gpu, pipeline, 'fill int8', [buf]));
  const [x, y] = gridFor(gpu, Math.ceil(buf.size / 4 / WG));
  pass.dispatchWorkgroups(x, y);
  pass.end();
  gpu.device.queue.submit([enc.finish()]);
}

function randomF32(n: number, seed: number, scale: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = ((hashWord(i, seed) / 4294967296) * 2 - 1) * scale;
  return out;
}

// ---- timing ----

async function timePass(gpu: GpuContext, iterations: number, encodeOne: (pass: GPUComputePassEncoder) => void): Promise<{ ns: number; timestamps: boolean }> {
  return timeGpuPass(gpu, (pass) => {
    for (let i = 0; i < iterations; i++) encodeOne(pass);
  });
}

/**
 * Runs a few iterations (compiles), keeps the GPU busy for spinMs (the H200 idles at 345 MHz and clocks up only under
 * sustained load: a variant timed right after a pipeline compile read up to 5× slow), then enough iterations for
 * ~targetMs of GPU time; µs per iteration.
 */
async function measure(gpu: GpuContext, args: Args, encodeOne: (pass: GPUComputePassEncoder) => void): Promise<{ us: number; iterations: number; timestamps: boolean; profile?: DispatchUs[] }> {
  let warm = await timePass(gpu, 3, encodeOne);
  const t0 = performance.now();
  while (performance.now() - t0 < args.spinMs) warm = await timePass(gpu, 3, encodeOne);
  const per = warm.ns / 3;
  const iterations = Math.max(3, Math.min(5000, Math.ceil((args.targetMs * 1e6) / Math.max(per, 1))));
  const r = await timePass(gpu, iterations, encodeOne);
  return { us: r.ns / iterations / 1e3, iterations, timestamps: r.timestamps, profile: args.profile && r.timestamps ? await profileDispatches(gpu, encodeOne) : undefined };
}

interface DispatchUs {
  label: string;
  /** µs per layer-step (dispatches of this label summed). */
  us: number;
}

/** Each dispatch of `reps` layer-steps in a timestamped pass of its own: µs per layer-step by pipeline label. */
async function profileDispatches(gpu: GpuContext, encodeOne: (pass: GPUComputePassEncoder) => void, reps = 20): Promise<DispatchUs[]> {
  const profiler = new StepProfiler(gpu.device);
  try {
    const enc = gpu.device.createCommandEncoder();
    const pass = profiler.begin(enc);
    for (let i = 0; i < reps; i++) encodeOne(pass as unknown as GPUComputePassEncoder);
    profiler.finish(enc, pass);
    gpu.device.queue.submit([enc.finish()]);
    return summarizeProfile(await profiler.times(pass)).map((e) => ({ label: e.label, us: (e.ms * 1000) / reps }));
  } finally {
    profiler.destroy();
  }
}

// ---- one shape ----

interface Measurement {
  kernel: 'gqa' | 'gqa-int8' | 'mla' | 'mla-int8';
  /** decode: one row per sequence; prefill: one sequence's every position (context rows, causal). */
  mode: 'decode' | 'prefill';
  variant: string;
  batch: number;
  context: number;
  chunk: number;
  usPerLayerStep: number;
  iterations: number;
  timestamps: boolean;
  cacheBytes: number;
  flops: number;
  gbPerS: number;
  bandwidthRatio: number;
  tflops: number;
  flopRatio: number;
  /** Row 0 vs float64 (NaN when not checked). */
  maxRelError: number;
  aliasedBlocks: boolean;
  /** --profile: the layer-step's dispatches timed one by one. */
  profile?: DispatchUs[];
}

interface Pool {
  buffer: GPUBuffer;
  blocks: number;
  rowValues: number;
  /** Bytes per token row (f16: 2 per value; int8: values, scales, padding). */
  rowBytes: number;
  seed: number;
  /** Set for an int8 pool (f16 otherwise). */
  int8?: Int8RowFormat;
  /** Set for an int8 MLA latent pool ([c | k_pe] int8, two f32 scales: kernels/mla-kv-int8.ts). */
  mlaInt8?: MlaInt8RowFormat;
}

function makePool(gpu: GpuContext, label: string, rowValues: number, wantBlocks: number, seed: number, int8?: Int8RowFormat, mlaInt8?: MlaInt8RowFormat): Pool {
  const rowBytes = int8 ? int8.rowWords * 4 : mlaInt8 ? mlaInt8.rowWords * 4 : rowValues * 2;
  const blockBytes = BLOCK * rowBytes;
  const blocks = Math.max(1, Math.min(wantBlocks, Math.floor(gpu.limits.maxStorageBufferBindingSize / blockBytes)));
  const buffer = storageBuffer(gpu, `${label} cache (${blocks} blocks)`, blocks * blockBytes);
  if (int8 || mlaInt8) fillCacheInt8(gpu, buffer, seed, (int8 ?? mlaInt8)!);
  else fillCache(gpu, buffer, seed);
  return { buffer, blocks, rowValues, rowBytes, seed, int8, mlaInt8 };
}

/** Block tables of `batch` sequences of `context` tokens: a fixed shuffle of the pool, wrapping when it is too small. */
function blockTables(batch: number, context: number, poolBlocks: number): { tables: number[][]; aliased: boolean } {
  const perSeq = Math.ceil(context / BLOCK);
  const order = Array.from({ length: poolBlocks }, (_, i) => i);
  for (let i = poolBlocks - 1; i > 0; i--) {
    const j = hashWord(i, 99) % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const tables = Array.from({ length: batch }, (_, s) => Array.from({ length: perSeq }, (_, b) => order[(s * perSeq + b) % poolBlocks]));
  return { tables, aliased: batch * perSeq > poolBlocks };
}

/** Cache value (token t of a sequence, value v) through the block table, as the fill kernel wrote it. */
function cacheValue(pool: Pool, table: number[], t: number, v: number): number {
  const row = table[Math.floor(t / BLOCK)] * BLOCK + (t % BLOCK);
  const f = pool.int8;
  if (f) {
    const base = row * f.rowWords;
    const byte = (hashWord(base + (v >> 2), pool.seed) >>> (8 * (v & 3))) & 0xff;
    const scaleBits = 0x3c000000 | (hashWord(base + f.scaleWord + Math.floor(v / f.groupValues), pool.seed) & 0x7fffff);
    return (byte >= 128 ? byte - 256 : byte) * new Float32Array(new Uint32Array([scaleBits]).buffer)[0];
  }
  const idx = row * pool.rowValues + v;
  return wordValues(idx >>> 1, pool.seed)[idx & 1];
}

function softmaxWeights(scores: Float64Array): Float64Array {
  let mx = -Infinity;
  for (const s of scores) mx = Math.max(mx, s);
  let sum = 0;
  const p = scores.map((s) => Math.exp(s - mx));
  for (const x of p) sum += x;
  return p.map((x) => x / sum);
}

/** Float64 absorbed attention of row 0 (its N_HEADS queries at the start of qLatent) over `context` latent rows [c | k_pe]. */
function mlaReferenceRow(qLatent: Float32Array, rows: Float64Array, context: number): Float64Array {
  const RV = R + ROPE;
  const want = new Float64Array(N_HEADS * R);
  for (let h = 0; h < N_HEADS; h++) {
    const s = new Float64Array(context);
    for (let t = 0; t < context; t++) {
      let d = 0;
      for (let k = 0; k < RV; k++) d += qLatent[h * RV + k] * rows[t * RV + k];
      s[t] = d;
    }
    const p = softmaxWeights(s);
    for (let t = 0; t < context; t++) for (let k = 0; k < R; k++) want[h * R + k] += p[t] * rows[t * RV + k];
  }
  return want;
}

/** max |got − want| / max |want|; Infinity where got holds a non-finite value. */
function relErr(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let d = 0;
  let m = 0;
  for (let i = 0; i < want.length; i++) {
    if (!Number.isFinite(got[i])) return Infinity;
    d = Math.max(d, Math.abs(got[i] - want[i]));
    m = Math.max(m, Math.abs(want[i]));
  }
  return d / Math.max(m, 1e-30);
}

/** Decode: one row per sequence at position context − 1. Prefill: every position 0..context − 1 of each sequence. */
/** The step metadata the runner would build (its chunk from targetWorkgroups), the chunk scaled for a variant. */
function metaFor(tables: number[][], context: number, poolBlocks: number, parallelHeads: number, maxChunk: number, targetWorkgroups: number, chunkScale = 1, prefill = false, minChunk = 16): StepMeta {
  const seqs = tables.map((blockTable) =>
    prefill
      ? { tokens: new Array<number>(context).fill(0), startPos: 0, blockTable, logits: 'none' as const }
      : { tokens: [0], startPos: context - 1, blockTable, logits: 'none' as const },
  );
  const m = buildStepMeta(seqs, { blockSize: BLOCK, numBlocks: poolBlocks, nKvHeads: parallelHeads, maxChunkSize: maxChunk, targetWorkgroups, minChunkSize: minChunk });
  if (chunkScale === 1) return m;
  return buildStepMeta(seqs, { blockSize: BLOCK, numBlocks: poolBlocks, nKvHeads: parallelHeads, maxChunkSize: maxChunk, chunkSize: Math.max(minChunk, Math.min(maxChunk, m.chunkSize * chunkScale)) });
}

function figures(args: Args, us: number, cacheBytes: number, flops: number) {
  const gbPerS = cacheBytes / (us * 1e-6) / 1e9;
  const tflops = flops / (us * 1e-6) / 1e12;
  return { gbPerS, bandwidthRatio: gbPerS / args.ceilingGBs, tflops, flopRatio: tflops / args.ceilingTflops };
}

/** GQA kernel variants the benchmark tries (the default first); the table shows the fastest, the variant table all. */
const GQA_VARIANTS: Array<{ name: string; tuning: Partial<GqaAttentionTuning>; chunkScale: number }> = [
  { name: 'wg128 u4', tuning: {}, chunkScale: 1 },
  { name: 'wg256 u4', tuning: { workgroupSize: 256 }, chunkScale: 1 },
  { name: 'wg128 u4 chunk×2', tuning: {}, chunkScale: 2 },
  { name: 'wg128 u4 chunk÷2', tuning: {}, chunkScale: 0.5 },
  { name: 'wg128 u2', tuning: { unroll: 2 }, chunkScale: 1 },
  { name: 'wg128 u4 no subgroups', tuning: { useSubgroups: false }, chunkScale: 1 },
];

async function benchGqa(gpu: GpuContext, args: Args, pool: Pool, batch: number, context: number, prefill = false): Promise<Measurement[]> {
  const D = HEAD_DIM;
  const qkvStride = (N_HEADS + 2 * N_KV) * D;
  const outStride = N_HEADS * D;
  const { tables, aliased } = blockTables(batch, context, pool.blocks);
  const shape = { nHeads: N_HEADS, nKvHeads: N_KV, headDim: D };
  const chunkMax = maxAttentionChunk(shape);
  const rows = prefill ? batch * context : batch;
  // q of every row; the k/v columns of qkv are not read by the attention kernel.
  const qkvData = new Float32Array(rows * qkvStride);
  const q = randomF32(rows * N_HEADS * D, 7, 1);
  for (let b = 0; b < rows; b++) qkvData.set(q.subarray(b * N_HEADS * D, (b + 1) * N_HEADS * D), b * qkvStride);
  const qkv = uploadArray(gpu, 'qkv', qkvData);
  const out = storageBuffer(gpu, 'gqa out', rows * outStride * 4);
  const variants = args.variants === 'all' && !prefill && !pool.int8 ? GQA_VARIANTS : GQA_VARIANTS.slice(0, 1);
  const layout = pool.int8 ? { rowValues: pool.rowValues, blockSize: BLOCK, dtype: 'int8' as const, int8: pool.int8 } : { rowValues: pool.rowValues, blockSize: BLOCK, dtype: 'f16' as const };
  const results: Measurement[] = [];
  let want: Float64Array | undefined;
  for (const v of variants) {
    const m = metaFor(tables, context, pool.blocks, N_KV, chunkMax, GQA_TARGET_WORKGROUPS, v.chunkScale, prefill);
    if (v.chunkScale !== 1 && results.some((x) => x.chunk === m.chunkSize && x.variant.startsWith(v.name.split(' chunk')[0] + ' ('))) continue;
    const meta = uploadArray(gpu, 'meta', m.data);
    const att = new GqaAttention(gpu, shape, layout, { meta, qkv, qkvStride, out, outStride, layerCaches: [pool.buffer] }, v.tuning);
    att.prepare(m.nRows, m.maxChunks);
    const r = await measure(gpu, args, (p) => att.encode(p, 0, m.nRows, m.maxChunks));
    let maxRelError = NaN;
    if (context <= 4096 && !prefill) {
      const got = await readF32(gpu, out, outStride);
      if (!want) {
        want = new Float64Array(outStride);
        const scale = 1 / Math.sqrt(D);
        const RV = pool.rowValues;
        const cached = new Float64Array(context * RV);
        for (let t = 0; t < context; t++) for (let k = 0; k < RV; k++) cached[t * RV + k] = cacheValue(pool, tables[0], t, k);
        for (let h = 0; h < N_HEADS; h++) {
          const kv = Math.floor(h / (N_HEADS / N_KV));
          const sc = new Float64Array(context);
          for (let t = 0; t < context; t++) {
            let d = 0;
            for (let i = 0; i < D; i++) d += q[h * D + i] * cached[t * RV + kv * D + i];
            sc[t] = d * scale;
          }
          const p = softmaxWeights(sc);
          for (let t = 0; t < context; t++) for (let i = 0; i < D; i++) want[h * D + i] += p[t] * cached[t * RV + (N_KV + kv) * D + i];
        }
      }
      maxRelError = relErr(got, want);
    }
    const plan = att.plan;
    att.destroy();
    meta.destroy();
    const tokensRead = prefill ? (batch * context * (context + 1)) / 2 : batch * context;
    const cacheBytes = tokensRead * pool.rowBytes;
    const flops = tokensRead * N_HEADS * 4 * D;
    results.push({
      kernel: pool.int8 ? 'gqa-int8' : 'gqa',
      mode: prefill ? 'prefill' : 'decode',
      variant: `${v.name} (ran wg${plan.workgroupSize}, ${plan.lanes} lanes/row, u${plan.unroll})`,
      batch,
      context,
      chunk: m.chunkSize,
      usPerLayerStep: r.us,
      profile: r.profile,
      iterations: r.iterations,
      timestamps: r.timestamps,
      cacheBytes,
      flops,
      ...figures(args, r.us, cacheBytes, flops),
      maxRelError,
      aliasedBlocks: aliased,
    });
  }
  qkv.destroy();
  out.destroy();
  return results;
}

async function benchMla(gpu: GpuContext, args: Args, pool: Pool, batch: number, context: number, prefill = false): Promise<Measurement[]> {
  const RV = R + ROPE;
  const outStride = N_HEADS * R;
  const { tables, aliased } = blockTables(batch, context, pool.blocks);
  const rows = prefill ? batch * context : batch;
  const qLatentData = randomF32(rows * N_HEADS * RV, 11, 1 / Math.sqrt(RV));
  const qLatent = uploadArray(gpu, 'qLatent', qLatentData);
  const out = storageBuffer(gpu, 'mla out', rows * outStride * 4);
  const variants = args.variants === 'all' && !prefill ? MLA_VARIANTS : MLA_VARIANTS.slice(0, 1);
  const results: Measurement[] = [];
  let want: Float64Array | undefined;
  for (const v of variants) {
    const shape = { nHeads: N_HEADS, kvLoraRank: R, qkRopeHeadDim: ROPE };
    // The runner's chunk policy (engine/gpu-runner.ts → buildStepMeta), optionally scaled.
    const headSplits = planMlaAttention(shape, { ...DEFAULT_MLA_TUNING, ...v.tuning }).headSplits;
    const m = metaFor(tables, context, pool.blocks, headSplits, MLA_MAX_CHUNK, MLA_TARGET_WORKGROUPS, v.chunkScale, prefill);
    const meta = uploadArray(gpu, 'meta', m.data);
    let att: MlaAttention;
    try {
      att = new MlaAttention(gpu, shape, { rowValues: RV, blockSize: BLOCK, dtype: 'f16' }, { meta, qLatent, out, outStride, layerCaches: [pool.buffer] }, v.tuning);
    } catch (e) {
      process.stderr.write(`mla ${v.name}: ${(e as Error).message}\n`);
      meta.destroy();
      continue;
    }
    att.prepare(m.nRows, m.maxChunks, m.chunkSize);
    const r = await measure(gpu, args, (p) => att.encode(p, 0, m.nRows, m.maxChunks, m.chunkSize));
    let maxRelError = NaN;
    if (context <= 4096 && !prefill) {
      const got = await readF32(gpu, out, outStride);
      if (!want) {
        const rows = new Float64Array(context * RV);
        for (let t = 0; t < context; t++) for (let k = 0; k < RV; k++) rows[t * RV + k] = cacheValue(pool, tables[0], t, k);
        want = mlaReferenceRow(qLatentData, rows, context);
      }
      maxRelError = relErr(got, want);
    }
    const picked = att.variantFor(m.chunkSize);
    att.destroy();
    meta.destroy();
    const tokensRead = prefill ? (batch * context * (context + 1)) / 2 : batch * context;
    const cacheBytes = tokensRead * RV * 2;
    const flops = tokensRead * N_HEADS * (2 * RV + 2 * R);
    results.push({
      kernel: 'mla',
      mode: prefill ? 'prefill' : 'decode',
      variant: `${v.name} (ran wg${picked.tuning.workgroupSize}, tile ${picked.plan.tileTokens})`,
      batch,
      context,
      chunk: m.chunkSize,
      usPerLayerStep: r.us,
      profile: r.profile,
      iterations: r.iterations,
      timestamps: r.timestamps,
      cacheBytes,
      flops,
      ...figures(args, r.us, cacheBytes, flops),
      maxRelError,
      aliasedBlocks: aliased,
    });
  }
  qLatent.destroy();
  out.destroy();
  return results;
}

/**
 * MLA over the int8 latent cache, three ways: products on tensor cores ('tensor-cores'; only where the adapter has i8
 * subgroup matrices), the same integers with dot4I8Packed ('emulate'), and the f32 kernel unpacking int8 ('off').
 * maxRelError: tensor cores vs dot4 (same integers: ~1e-6), the others vs float64 over the dequantized cache.
 * prefill: one prompt of `context` tokens, every position a row (the fast forms only, no checks).
 */
async function benchMlaInt8(gpu: GpuContext, args: Args, pool: Pool, batch: number, context: number, prefill = false): Promise<Measurement[]> {
  const f = pool.mlaInt8!;
  const RV = R + ROPE;
  const outStride = N_HEADS * R;
  const rows = prefill ? batch * context : batch;
  const { tables, aliased } = blockTables(batch, context, pool.blocks);
  const qLatentData = randomF32(rows * N_HEADS * RV, 11, 1 / Math.sqrt(RV));
  const qLatent = uploadArray(gpu, 'qLatent', qLatentData);
  const out = storageBuffer(gpu, 'mla int8 out', rows * outStride * 4);
  const shape = { nHeads: N_HEADS, kvLoraRank: R, qkRopeHeadDim: ROPE };
  const results: Measurement[] = [];
  const outputs = new Map<string, Float32Array>();
  const partials = new Map<string, { data: Float32Array; chunks: number; ctxChunks: number }>();
  let want: Float64Array | undefined;
  // Stored words of row 0's token t (fillCacheInt8's hash).
  const words = (t: number) => {
    const row = tables[0][Math.floor(t / BLOCK)] * BLOCK + (t % BLOCK);
    return Uint32Array.from({ length: f.rowWords }, (_, w) => {
      const i = row * f.rowWords + w;
      const h = hashWord(i, pool.seed);
      return w >= f.scaleWord ? (0x3c000000 | (h & 0x7fffff)) >>> 0 : h;
    });
  };
  for (const form of MLA_INT8_FORMS.filter((f) => args.mlaInt8.includes(f.key) && (!prefill || f.fast))) {
    const { key: formKey, mode, window } = form;
    const tuning: Partial<MlaAttentionTuning> = { int8Products: mode, int8Window: window, ...form.tuning };
    // The split the runner would choose for this kernel (the int8-product kernels: one workgroup per chunk and row).
    const split = mlaSplit(shape, 'int8', tuning);
    const target = Math.round(split.targetWorkgroups * (form.targetScale ?? 1));
    const m = metaFor(tables, context, pool.blocks, split.parallelHeads, MLA_MAX_CHUNK, target, 1, prefill, split.minChunk);
    const meta = uploadArray(gpu, 'meta', m.data);
    let att: MlaAttention;
    try {
      att = new MlaAttention(gpu, shape, { rowValues: RV, blockSize: BLOCK, dtype: 'int8', mlaInt8: pool.mlaInt8 }, { meta, qLatent, out, outStride, layerCaches: [pool.buffer] }, tuning);
    } catch (e) {
      process.stderr.write(`mla int8 ${formKey}: ${(e as Error).message}\n`);
      meta.destroy();
      continue;
    }
    att.prepare(m.nRows, m.maxChunks, m.chunkSize);
    const r = await measure(gpu, args, (p) => att.encode(p, 0, m.nRows, m.maxChunks, m.chunkSize));
    const got = await readF32(gpu, out, outStride);
    outputs.set(formKey, got);
    // Row 0's split partials (m and l depend only on the scores): which heads and chunks a wrong form gets wrong.
    partials.set(formKey, { data: await readF32(gpu, att.partialsBuffer!, N_HEADS * m.maxChunks * (R + 2)), chunks: m.maxChunks, ctxChunks: Math.ceil(context / m.chunkSize) });
    let maxRelError = NaN;
    if (context <= 4096 && !prefill) {
      if (!want) {
        const rows = new Float64Array(context * RV);
        for (let t = 0; t < context; t++) rows.set(dequantizeLatentRowInt8(words(t), f), t * RV);
        want = mlaReferenceRow(qLatentData, rows, context);
      }
      maxRelError = relErr(got, want);
    }
    att.destroy();
    meta.destroy();
    const tokensRead = prefill ? (batch * context * (context + 1)) / 2 : batch * context;
    const cacheBytes = tokensRead * f.rowWords * 4;
    const flops = tokensRead * N_HEADS * (2 * RV + 2 * R);
    results.push({
      kernel: 'mla-int8', mode: prefill ? 'prefill' : 'decode',
      // The dot4 kernel's window and query placement are what the plan made of the form's wishes and the device's memory.
      variant:
        form.variant +
        (att.lastStepThreePass && att.threePassPlan
          ? ` w${att.threePassPlan.window}, ${att.threePassPlan.latentParts} latent part(s)${att.threePassPlan.queryStaged ? '' : ', query from storage'}`
          : att.dot4Plan
            ? `${mode === 'three-pass' ? ' (ran dot4)' : ''} w${att.dot4Plan.window}${att.dot4Plan.queryStaged ? '' : ', query from storage'}`
            : ''),
      batch, context, chunk: m.chunkSize, usPerLayerStep: r.us, profile: r.profile, iterations: r.iterations, timestamps: r.timestamps,
      cacheBytes, flops, ...figures(args, r.us, cacheBytes, flops), maxRelError, aliasedBlocks: aliased,
    });
  }
  // Each tensor-core form against the dot4 form (the same integers): ~1e-6 when right; the per-phase forms say which
  // phase of a wrong kernel is wrong.
  if (prefill) {
    qLatent.destroy();
    out.destroy();
    return results;
  }
  // The one-pass tensor-core kernel against its dot4 form (the same integers).
  const flash = outputs.get('flash');
  const flashDot4 = outputs.get('flash-dot4');
  if (flash && flashDot4) {
    process.stdout.write(`mla int8 b${batch} ctx${context}: flash vs flash-dot4 max |Δ| / max |y| = ${relErr(flash, flashDot4).toExponential(2)}\n`);
  }
  // The three-pass forms against the plain one (the same integers: tensor-core scores must agree to f32 rounding).
  const three = outputs.get('three-pass');
  for (const key of ['three-pass tc', 'three-pass tc tile 64', 'three-pass tile 64', 'three-pass parts 4', 'three-pass tc values', 'three-pass tc both', 'three-pass tc both parts 4']) {
    const got = outputs.get(key);
    if (!three || !got) continue;
    process.stdout.write(`mla int8 b${batch} ctx${context}: ${key} vs three-pass max |Δ| / max |y| = ${relErr(got, three).toExponential(2)}\n`);
  }
  const d4 = outputs.get('emulate');
  for (const [mode, variant] of [['tensor-cores', 'int8 tensor cores'], ['tensor-cores w32', 'int8 tensor cores w32'], ['tc-scores', 'int8 tc-scores only'], ['tc-scores-bare', 'int8 tc-scores-bare only'], ['tc-values', 'int8 tc-values only']] as const) {
    const tc = outputs.get(mode);
    const row = results.find((r) => r.variant === variant);
    if (!tc || !d4 || !row) continue;
    const vsDot4 = relErr(tc, d4);
    process.stderr.write(`mla int8 b${batch} ctx${context}: ${mode} vs dot4 form max |Δ| / max |y| = ${vsDot4.toExponential(2)}\n`);
    const pt = partials.get(mode);
    const pd = partials.get('emulate');
    if (pt && pd && pt.chunks === pd.chunks) {
      // m (the split's largest score) and l (Σ exp) of row 0, per head and chunk of the context.
      const bad: string[] = [];
      const heads = new Set<number>();
      const chunks = new Set<number>();
      for (let h = 0; h < N_HEADS; h++) {
        for (let c = 0; c < pt.ctxChunks; c++) {
          const i = (h * pt.chunks + c) * (R + 2);
          const dm = Math.abs(pt.data[i] - pd.data[i]);
          const dl = Math.abs(pt.data[i + 1] - pd.data[i + 1]) / Math.max(1e-30, Math.abs(pd.data[i + 1]));
          if (!(dm <= 1e-3 * Math.max(1, Math.abs(pd.data[i])) && dl <= 1e-3)) {
            heads.add(h);
            chunks.add(c);
            if (bad.length < 4) bad.push(`h${h} c${c}: m ${pt.data[i].toPrecision(5)} vs ${pd.data[i].toPrecision(5)}, l ${pt.data[i + 1].toPrecision(5)} vs ${pd.data[i + 1].toPrecision(5)}`);
          }
        }
      }
      const list = (x: Set<number>) => [...x].sort((a, b) => a - b).join(',');
      process.stdout.write(
        `partials ${mode} vs dot4, row 0, ${N_HEADS} heads × ${pt.ctxChunks} chunks: ${heads.size ? `heads [${list(heads)}], chunks [${list(chunks)}] differ; ${bad.join('; ')}` : 'm and l agree'}\n`,
      );
    }
    row.variant += ` (vs dot4 ${vsDot4.toExponential(1)})`;
  }
  // What the score phase of (chunk 0, row 0) saw and made in its first window, each form against host integer
  // arithmetic on the same inputs (bench/mla-tc-dump.ts): wrong staged rows, a wrong query, wrong tiles or wrong scaling.
  for (const mode of (['emulate', 'tc-scores-bare', 'tc-scores', 'tensor-cores'] as const).filter((k) => args.mlaInt8.includes(k))) {
    const split = mlaSplit(shape, 'int8', { int8Products: mode });
    const m = metaFor(tables, context, pool.blocks, split.parallelHeads, MLA_MAX_CHUNK, split.targetWorkgroups);
    const meta = uploadArray(gpu, 'meta', m.data);
    try {
      const att = new MlaAttention(gpu, shape, { rowValues: RV, blockSize: BLOCK, dtype: 'int8', mlaInt8: pool.mlaInt8 }, { meta, qLatent, out, outStride, layerCaches: [pool.buffer] }, { int8Products: mode, int8Debug: true });
      att.prepare(m.nRows, m.maxChunks);
      const enc = gpu.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      att.encode(pass, 0, m.nRows, m.maxChunks, m.chunkSize);
      pass.end();
      gpu.device.queue.submit([enc.finish()]);
      const dump = att.int8DebugDump!;
      const data = new Int32Array((await readF32(gpu, dump.buffer, dump.buffer.size / 4)).buffer);
      // MLA_TC_DUMP_DIR keeps the raw dump, to test guesses about a wrong tile offline against the same inputs.
      if (process.env.MLA_TC_DUMP_DIR) writeFileSync(`${process.env.MLA_TC_DUMP_DIR}/tc-dump-${mode}-b${batch}-ctx${context}.bin`, data);
      const check = checkMlaTcDump(data, {
        nHeads: N_HEADS,
        format: f,
        plan: dump.plan,
        q: qLatentData.subarray(0, N_HEADS * RV),
        rowWords: words,
        windowTokens: Math.min(dump.plan.window, m.chunkSize, context),
        tiles: mode !== 'emulate',
      });
      process.stdout.write(`score-phase dump ${mode}, b${batch} ctx${context} (chunk 0, row 0, first window): ${describeMlaTcDump(check, dump.plan)}\n`);
      att.destroy();
    } catch (e) {
      process.stderr.write(`score-phase dump ${mode}: ${(e as Error).message}\n`);
    }
    meta.destroy();
  }
  qLatent.destroy();
  out.destroy();
  return results;
}

function table(rows: string[][]): string {
  const w = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) => r.map((s, c) => (c === 0 ? s.padEnd(w[c]) : s.padStart(w[c]))).join('  ')).join('\n');
}

const fmt = (v: number, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : '—');
const pct = (v: number) => `${(100 * v).toFixed(0)}%`;
const errText = (v: number) => (Number.isNaN(v) ? '—' : v.toExponential(1));

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  BLOCK = args.blockSize;
  const gpu = await openGpu();
  const all: Measurement[] = [];
  try {
    const maxBatch = Math.max(...args.batches);
    const maxCtx = Math.max(...args.contexts);
    const wantBlocks = maxBatch * Math.ceil(maxCtx / BLOCK);
    const gqaPool = makePool(gpu, 'gqa', 2 * N_KV * HEAD_DIM, wantBlocks, 1234);
    const mlaPool = makePool(gpu, 'mla', R + ROPE, wantBlocks, 4321);
    const gqaInt8Pool = makePool(gpu, 'gqa int8', 2 * N_KV * HEAD_DIM, wantBlocks, 5678, int8RowFormat(2 * N_KV, HEAD_DIM));
    const mlaInt8Pool = makePool(gpu, 'mla int8', R + ROPE, wantBlocks, 8765, undefined, mlaInt8RowFormat(R, ROPE, args.mlaRowAlign));
    process.stderr.write(
      `${gpu.adapterName}${gpu.isSoftware ? ' (software: timings meaningless)' : ''}; pools: GQA ${gqaPool.blocks} blocks (${((gqaPool.blocks * BLOCK * 2048) / 2 ** 30).toFixed(2)} GiB), ` +
        `MLA ${mlaPool.blocks} blocks (${((mlaPool.blocks * BLOCK * 1152) / 2 ** 30).toFixed(2)} GiB)\n`,
    );
    for (const context of args.contexts) {
      for (const batch of args.batches) {
        const gs = [...(await benchGqa(gpu, args, gqaPool, batch, context)), ...(await benchGqa(gpu, args, gqaInt8Pool, batch, context))];
        const ms = [...(await benchMla(gpu, args, mlaPool, batch, context)), ...(await benchMlaInt8(gpu, args, mlaInt8Pool, batch, context))];
        all.push(...gs, ...ms);
        for (const m of [...gs, ...ms]) {
          process.stderr.write(
            `${m.kernel} ${m.variant} b${batch} ctx${context} chunk ${m.chunk}: ${fmt(m.usPerLayerStep)} µs, ${fmt(m.gbPerS, 0)} GB/s, ` +
              `${fmt(m.tflops, 2)} TFLOP/s, err ${errText(m.maxRelError)}${m.aliasedBlocks ? ' (blocks shared between sequences)' : ''}\n`,
          );
        }
      }
    }
    for (const context of args.prefill) {
      const gs = [...(await benchGqa(gpu, args, gqaPool, 1, context, true)), ...(await benchGqa(gpu, args, gqaInt8Pool, 1, context, true))];
      const ms = [...(await benchMla(gpu, args, mlaPool, 1, context, true)), ...(await benchMlaInt8(gpu, args, mlaInt8Pool, 1, context, true))];
      all.push(...gs, ...ms);
      for (const m of [...gs, ...ms]) {
        process.stderr.write(`${m.kernel} ${m.variant} prefill ${context} chunk ${m.chunk}: ${fmt(m.usPerLayerStep)} µs, ${fmt(m.tflops, 2)} TFLOP/s\n`);
      }
    }
    gqaPool.buffer.destroy();
    gqaInt8Pool.buffer.destroy();
    mlaInt8Pool.buffer.destroy();
    mlaPool.buffer.destroy();
    if (args.json) {
      writeFileSync(
        args.json,
        JSON.stringify({ adapter: gpu.adapterName, software: gpu.isSoftware, ceilingGBs: args.ceilingGBs, ceilingTflops: args.ceilingTflops, quick: args.quick, defaultMlaTuning: DEFAULT_MLA_TUNING, measurements: all }, null, 2),
      );
    }
  } finally {
    gpu.destroy();
    releaseGpu();
  }
  // Every MLA variant at the goal shape (batch 32 × 4K, or the largest measured), then the short table, last.
  const goalBatch = args.batches.includes(32) ? 32 : Math.max(...args.batches);
  const goalCtx = args.contexts.includes(4096) ? 4096 : Math.max(...args.contexts);
  const decode = all.filter((m) => m.mode === 'decode');
  const fastest = (kernel: Measurement['kernel'], batch: number, context: number, mode: 'decode' | 'prefill' = 'decode') =>
    all.filter((m) => m.kernel === kernel && m.mode === mode && m.batch === batch && m.context === context).sort((a, b) => a.usPerLayerStep - b.usPerLayerStep)[0];
  const goalGqa = fastest('gqa', goalBatch, goalCtx);
  const gqaRows = [['GQA variant @ ' + `${goalBatch}×${goalCtx}`, 'chunk', 'µs', 'GB/s', 'max err']];
  for (const m of decode.filter((m) => m.kernel === 'gqa' && m.batch === goalBatch && m.context === goalCtx)) {
    gqaRows.push([m.variant, String(m.chunk), fmt(m.usPerLayerStep), `${fmt(m.gbPerS, 0)} (${pct(m.bandwidthRatio)})`, errText(m.maxRelError)]);
  }
  if (gqaRows.length > 2) console.log('\n' + table(gqaRows));
  const variantRows = [['MLA variant @ ' + `${goalBatch}×${goalCtx}`, 'chunk', 'µs', 'vs GQA', 'TFLOP/s', 'GB/s']];
  for (const m of decode.filter((m) => m.kernel === 'mla' && m.batch === goalBatch && m.context === goalCtx)) {
    variantRows.push([m.variant, String(m.chunk), fmt(m.usPerLayerStep), goalGqa ? fmt(m.usPerLayerStep / goalGqa.usPerLayerStep, 2) : '—', fmt(m.tflops, 1), fmt(m.gbPerS, 0)]);
  }
  if (variantRows.length > 2) console.log('\n' + table(variantRows));
  // Prefill: the absorbed form does 2(R+r)+2R = 2176 FLOP per head per (row, token); the expanded form would do
  // 2(dn+r)+2dv = 640 plus 2·R·(dn+dv) per head per prompt token to expand K/V from the latent.
  const prefillRows = [['prefill (1 prompt)', 'GQA µs', 'MLA absorbed µs', 'MLA/GQA', 'MLA TFLOP/s', 'expanded/absorbed FLOP', 'GQA int8 µs', 'MLA int8 µs (form)', 'MLA/GQA int8']];
  for (const P of args.prefill) {
    const g = fastest('gqa', 1, P, 'prefill');
    const mla = all.find((m) => m.mode === 'prefill' && m.kernel === 'mla' && m.context === P);
    if (!g || !mla) continue;
    const g8 = fastest('gqa-int8', 1, P, 'prefill');
    const m8 = fastest('mla-int8', 1, P, 'prefill');
    const pairs = (P * (P + 1)) / 2;
    const expanded = N_HEADS * (pairs * (2 * (HEAD_DIM + ROPE) + 2 * HEAD_DIM) + P * 2 * R * (2 * HEAD_DIM));
    prefillRows.push([
      String(P),
      fmt(g.usPerLayerStep),
      fmt(mla.usPerLayerStep),
      fmt(mla.usPerLayerStep / g.usPerLayerStep, 2),
      `${fmt(mla.tflops, 1)} (${pct(mla.flopRatio)})`,
      fmt(expanded / mla.flops, 2),
      g8 ? fmt(g8.usPerLayerStep) : '—',
      m8 ? `${fmt(m8.usPerLayerStep)} (${m8.variant})` : '—',
      g8 && m8 ? fmt(m8.usPerLayerStep / g8.usPerLayerStep, 2) : '—',
    ]);
  }
  if (prefillRows.length > 1) console.log('\n' + table(prefillRows));
  // The short table, last: per shape, the fastest GQA variant vs the fastest MLA variant (the default GQA variant's
  // time in brackets when another was faster).
  const rows = [['batch×ctx', 'GQA µs (default)', 'GQA GB/s', 'GQA variant', 'GQA int8 µs', 'int8/f16', 'MLA µs', 'MLA/GQA', 'MLA GB/s', 'MLA TFLOP/s', 'MLA variant', 'max err']];
  for (const context of args.contexts) {
    for (const batch of args.batches) {
      const g = fastest('gqa', batch, context);
      const gDefault = decode.find((m) => m.kernel === 'gqa' && m.batch === batch && m.context === context);
      const mla = fastest('mla', batch, context);
      const g8 = fastest('gqa-int8', batch, context);
      if (!g || !mla) continue;
      rows.push([
        `${batch}×${context}${g.aliasedBlocks ? '*' : ''}`,
        `${fmt(g.usPerLayerStep)}${gDefault && gDefault !== g ? ` (${fmt(gDefault.usPerLayerStep)})` : ''}`,
        `${fmt(g.gbPerS, 0)} (${pct(g.bandwidthRatio)})`,
        g.variant.split(' (')[0],
        g8 ? fmt(g8.usPerLayerStep) : '—',
        g8 ? fmt(g8.usPerLayerStep / g.usPerLayerStep, 2) : '—',
        fmt(mla.usPerLayerStep),
        fmt(mla.usPerLayerStep / g.usPerLayerStep, 2),
        `${fmt(mla.gbPerS, 0)} (${pct(mla.bandwidthRatio)})`,
        `${fmt(mla.tflops, 1)} (${pct(mla.flopRatio)})`,
        mla.variant.split(' (')[0],
        errText(Math.max(g.maxRelError, gDefault?.maxRelError ?? NaN, g8?.maxRelError ?? NaN, mla.maxRelError)),
      ]);
    }
  }
  console.log(
    `\nattention per layer-step, f16 caches (and GQA over an int8 cache: 1056 B/token), Qwen2.5-7B shapes (GQA 28q/4kv d128: 2048 B/token; MLA 28h 512+64: 1152 B/token = 56%)\n` +
      `ceilings: ${args.ceilingGBs} GB/s HBM, ${args.ceilingTflops} TFLOP/s f32; GB/s counts cache bytes only; FLOP: GQA 4·d, MLA 2·(R+r)+2·R per head per token` +
      `${rows.some((r) => r[0].endsWith('*')) ? '\n* pool smaller than batch×ctx: sequences share blocks (cache hits possible)' : ''}\n`,
  );
  console.log(table(rows));
  // MLA over the int8 cache, every form, against GQA over the int8 cache (the goal's comparison) and GQA f16.
  const int8Rows = [[`MLA over int8 cache (${mlaInt8RowFormat(R, ROPE, args.mlaRowAlign).rowWords * 4} B/token)`, 'variant', 'chunk', 'µs', 'vs GQA int8', 'vs GQA f16', 'GB/s', 'TFLOP/s', 'err vs f64 (dequantized)']];
  for (const m of decode.filter((m) => m.kernel === 'mla-int8')) {
    const g = fastest('gqa', m.batch, m.context);
    const g8 = fastest('gqa-int8', m.batch, m.context);
    const vs = (x: Measurement | undefined) => (x ? fmt(m.usPerLayerStep / x.usPerLayerStep, 2) : '—');
    int8Rows.push([`${m.batch}×${m.context}`, m.variant, String(m.chunk), fmt(m.usPerLayerStep), vs(g8), vs(g), fmt(m.gbPerS, 0), fmt(m.tflops, 1), errText(m.maxRelError)]);
  }
  if (int8Rows.length > 1) console.log('\n' + table(int8Rows));
  // --profile: each measurement's dispatches timed one by one.
  const profiled = all.filter((m) => m.profile?.length);
  if (profiled.length) {
    console.log('\ndispatches of a layer-step, timed one by one (µs; --profile)');
    for (const m of profiled) console.log(`${m.kernel} ${m.mode} ${m.batch}×${m.context} ${m.variant}: ${m.profile!.map((d) => `${d.label} ${fmt(d.us)}`).join('; ')}`);
  }
}

await main();

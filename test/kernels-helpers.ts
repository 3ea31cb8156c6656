// Shared pieces of the kernel tests: one GPU per test file, seeded random inputs and the relative-error measure.
import { after } from 'node:test';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import type { MatmulBindings } from '../kernels/matmul.ts';
import { pad8, poisonBuffer, readF32, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import type { PickSampling } from '../engine/sampler.ts';
import type { StepSeqInput } from '../kernels/step-meta.ts';
import type { MlaTcPlan } from '../kernels/mla-attention-tc.ts';

/**
 * The test file's GPU, opened on first use (quietly: no SwiftShader fallback line), destroyed after the file's tests
 * (a process holding a Dawn device does not exit).
 */
export function fileGpu(): () => Promise<GpuContext> {
  let gpuPromise: Promise<GpuContext> | undefined;
  after(async () => {
    if (gpuPromise) (await gpuPromise).destroy();
    releaseGpu();
  });
  return () => (gpuPromise ??= openGpu({ log: () => {} }));
}

/** Deterministic uniform numbers in [-scale, scale) (mulberry32); a fresh seed per test run unless fixed. */
export function randomArray(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    const u = ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    out[i] = (2 * u - 1) * scale;
  }
  return out;
}

/** A seed that differs between runs (fresh inputs each time), printed on failure through the message. */
export function freshSeed(): number {
  return (Date.now() ^ (Math.random() * 0x7fffffff)) >>> 0;
}

/**
 * Relative error of a GPU result against the float64 reference: max|a − b| / max|ref|.
 * NaN anywhere in `got` (e.g. an element left unwritten after NaN poisoning) gives Infinity.
 */
export function relError(got: ArrayLike<number>, want: ArrayLike<number>): number {
  if (got.length !== want.length) throw new Error(`relError: ${got.length} values vs ${want.length}`);
  let maxDiff = 0;
  let maxRef = 0;
  for (let i = 0; i < want.length; i++) {
    const g = got[i];
    if (!Number.isFinite(g)) return Infinity;
    maxDiff = Math.max(maxDiff, Math.abs(g - want[i]));
    maxRef = Math.max(maxRef, Math.abs(want[i]));
  }
  return maxDiff / Math.max(maxRef, 1e-30);
}

/** Rows [rows, cols] out of a buffer with row stride `stride`. */
export function unstride(data: Float32Array, rows: number, cols: number, stride: number, colOffset = 0): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) out.set(data.subarray(r * stride + colOffset, r * stride + colOffset + cols), r * cols);
  return out;
}

/** Rows [rows, cols] placed in a buffer with row stride `stride` (padding filled with `fill`). */
export function strided(data: Float32Array, rows: number, cols: number, stride: number, fill = NaN): Float32Array {
  const out = new Float32Array(rows * stride).fill(fill);
  for (let r = 0; r < rows; r++) out.set(data.subarray(r * cols, (r + 1) * cols), r * stride);
  return out;
}

/** The shape and options of one matmul kernel case. */
export interface MatmulShapeCase {
  M: number;
  N: number;
  K: number;
  bias?: boolean;
  accumulate?: boolean;
  yOffset?: number;
}

/**
 * Runs one matmul op on fresh random inputs: weights w [N, K] (±0.5), activations x [M, K] with NaN in the row
 * padding (a kernel reading past K shows up), optional bias b [N], and y either NaN-poisoned or holding y0 (fused
 * residual add). makeOp uploads w however the kernel wants it and builds the op over the given bindings.
 */
export async function runMatmulCase<Op extends { encode(pass: GPUComputePassEncoder, rows: number): void }>(
  g: GpuContext,
  c: MatmulShapeCase,
  seed: number,
  makeOp: (w: Float32Array, bindings: MatmulBindings) => { op: Op; destroy(): void },
): Promise<{ w: Float32Array; x: Float32Array; b: Float32Array; y0: Float32Array; got: Float32Array; op: Op }> {
  const w = randomArray(c.N * c.K, seed, 0.5);
  const x = randomArray(c.M * c.K, seed + 1);
  const b = randomArray(c.N, seed + 2);
  const y0 = randomArray(c.M * c.N, seed + 3);
  const xStride = pad8(c.K);
  const yOff = c.yOffset ?? 0;
  const yStride = pad8(c.N + yOff) + 8;
  const meta = uploadArray(g, 'meta', new Uint32Array(16).fill(c.M, 0, 1));
  const xBuf = uploadArray(g, 'x', strided(x, c.M, c.K, xStride));
  const yBuf = storageBuffer(g, 'y', c.M * yStride * 4);
  if (c.accumulate) {
    const init = new Float32Array(c.M * yStride).fill(NaN);
    for (let m = 0; m < c.M; m++) init.set(y0.subarray(m * c.N, (m + 1) * c.N), m * yStride + yOff);
    g.device.queue.writeBuffer(yBuf, 0, init);
  } else {
    poisonBuffer(g, yBuf);
  }
  const biasBuf = c.bias ? uploadArray(g, 'bias', b) : undefined;
  const made = makeOp(w, { meta, rowsSlot: 0, x: xBuf, xStride, y: yBuf, yStride, yOffset: yOff, bias: biasBuf, accumulate: c.accumulate });
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  made.op.encode(pass, c.M);
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const got = unstride(await readF32(g, yBuf, c.M * yStride), c.M, c.N, yStride, yOff);
  g.checkErrors();
  made.destroy();
  for (const buf of [meta, xBuf, yBuf, biasBuf]) buf?.destroy();
  return { w, x, b, y0, got, op: made.op };
}

/**
 * How far (in probability, or relative logit for the cuts) the float64 decision lies from flipping: the draw's u from
 * the nearest cumulative boundary, top-p's p from the kept mass on either side, min-p's and top-k's cuts from the
 * nearest value. The GPU works in f32, so only cases with a margin well past f32 rounding must match exactly.
 */
export function decisionMargin(raw: Float32Array, s: PickSampling): number {
  const y = Array.from(raw, (v) => v / s.temperature);
  const m = Math.max(...y);
  let margin = Infinity;
  let kept = y.map(() => true);
  if (s.minP > 0) {
    const cut = m + Math.log(s.minP);
    for (const v of y) margin = Math.min(margin, Math.abs(v - cut) / Math.max(1, Math.abs(cut)));
    kept = y.map((v) => v >= cut);
  }
  if (s.topK > 0 && s.topK < y.length) {
    const sorted = [...y].sort((a, b) => b - a);
    const gap = sorted[s.topK - 1] - sorted[s.topK];
    if (gap > 0) margin = Math.min(margin, gap / Math.max(1, Math.abs(sorted[s.topK])));
    kept = kept.map((k, i) => k && y[i] >= sorted[s.topK - 1]);
  }
  const e = y.map((v, i) => (kept[i] ? Math.exp(v - m) : 0));
  const z = e.reduce((a, b) => a + b, 0);
  if (s.topP < 1) {
    const desc = e.filter((v) => v > 0).sort((a, b) => b - a);
    let before = 0;
    for (const v of desc) {
      margin = Math.min(margin, Math.abs(before / z - s.topP));
      if (before / z >= s.topP) break;
      before += v;
    }
    margin = Math.min(margin, Math.abs(before / z - s.topP));
    // The draw's boundaries below are those of the host's kept set; a top-p cut far from p leaves it as computed.
    const keptIds = new Set<number>();
    const order = e.map((v, i) => i).filter((i) => e[i] > 0).sort((a, b) => e[b] - e[a] || a - b);
    let acc = 0;
    for (const i of order) {
      if (acc / z >= s.topP) break;
      keptIds.add(i);
      acc += e[i];
    }
    for (let i = 0; i < e.length; i++) if (!keptIds.has(i)) e[i] = 0;
  }
  const total = e.reduce((a, b) => a + b, 0);
  let cum = 0;
  for (const v of e) {
    if (v <= 0) continue;
    cum += v / total;
    margin = Math.min(margin, Math.abs(cum - s.u));
  }
  return margin;
}

/**
 * Paging for kernel tests of sequences that hold [cached, fresh] tokens: a pool of their blocks plus 3 spare, block ids
 * shuffled (seeded) so that the sequences' blocks interleave; each sequence's table; a token's row slot in the pool;
 * and the two steps a test runs: the cached prefixes (sequences with any), then every sequence's fresh tokens.
 */
export function shuffledPaging(
  seqs: ReadonlyArray<readonly [cached: number, fresh: number]>,
  blockSize: number,
  seed: number,
): { totalBlocks: number; tables: number[][]; slot: (seq: number, t: number) => number; prefixStep: StepSeqInput[]; freshStep: StepSeqInput[] } {
  const totalBlocks = seqs.reduce((a, [k, n]) => a + Math.ceil((k + n) / blockSize), 0) + 3;
  const ids = [...Array(totalBlocks).keys()];
  const rnd = randomArray(totalBlocks, seed + 7);
  ids.sort((a, b) => rnd[a] - rnd[b]);
  let next = 0;
  const tables = seqs.map(([k, n]) => ids.slice(next, (next += Math.ceil((k + n) / blockSize))));
  return {
    totalBlocks,
    tables,
    slot: (i, t) => tables[i][Math.floor(t / blockSize)] * blockSize + (t % blockSize),
    prefixStep: seqs.flatMap(([k], i) => (k ? [{ tokens: new Array<number>(k).fill(0), startPos: 0, blockTable: tables[i], logits: 'none' as const }] : [])),
    freshStep: seqs.map(([k, n], i) => ({ tokens: new Array<number>(n).fill(0), startPos: k, blockTable: tables[i], logits: 'none' as const })),
  };
}

/** Byte i of row `row`, head slot h's [q̃ | pad | q_pe | pad] in the tiled int8 queries (mla-attention-tc.ts qqWordWgsl). */
export function qqByte(qq: Int8Array, p: MlaTcPlan, row: number, h: number, i: number): number {
  const w = Math.floor(i / 4);
  const word = ((row * p.headTiles + Math.floor(h / 16)) * (p.rowPad / 32) + Math.floor(w / 8)) * 128 + (h % 16) * 8 + (w % 8);
  return qq[word * 4 + (i % 4)];
}

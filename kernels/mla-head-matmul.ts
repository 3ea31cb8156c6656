// Per-head batched matmul of MLA: y[row, h, n] = scale · Σ_k W_h[k, n] · x[row, h, k] — the absorption q̃ = W_UKᵀ q_nope and ô → W_UV.
//
// The per-head weights are stored k-major (W_h[k][n], a GpuMatrix [nHeads·K, N]) so that the threads of a
// workgroup, one output pair each, read consecutive words for every k while x[row, h, k] is the same address for
// all of them (a broadcast). Long K (W_UV: K = R = 512) splits each pair's k loop over up to 8 threads, summed in
// workgroup memory, so that a decode step has enough workgroups (28 heads × 64 pairs alone would be 28 × 1). Optional pass-through columns copy x's values after the K inputs of each head into
// y after the N outputs (scaled): the absorption uses them to place scale · q_pe next to scale · q̃.
import type { GpuContext } from './device.ts';
import { META_ROWS, metaWgsl } from './step-meta.ts';
import { bindBuffers, uploadMatrix, wgslF32, type GpuMatrix, type WeightDtype } from './tensors.ts';

const WG = 64;
const MAX_ROWS_PER_THREAD = 8;
/**
 * From this many rows on (prefill chunks), a step takes the tiled kernel by default: 64 (or 32, 16) rows × 64 outputs
 * of a head per workgroup, the x and W tiles staged in workgroup memory 16 k at a time, 4 × 4 outputs a thread. The one
 * above reads x from storage for every k of every output pair and W once per 8 rows (by estimate ~3 TFLOPS on the
 * H200: the W_UK / W_UV products took 1.9 ms of a 32-row MLA step, BENCHMARKS.md); where the tiled one starts to win
 * is not measured yet: HeadMatmulOptions.tiledMinRows (bench:decode --mla-head-tiled-from) moves the threshold, and
 * bench/device-run.sh decode times decode steps both ways.
 */
export const HEAD_MATMUL_TILED_MIN_ROWS = 128;
const TILE = 64;
const TILE_K = 16;

/** Rows of the tiled kernel's tile for a step: 64 from 64 rows on, else the fewest of 16 and 32 that hold them. */
export function headTileRows(rows: number): 16 | 32 | 64 {
  return rows >= 48 ? 64 : rows > 16 ? 32 : 16;
}

export interface HeadMatmulOptions {
  /** Steps of at least this many rows take the tiled kernel (default HEAD_MATMUL_TILED_MIN_ROWS). */
  tiledMinRows?: number;
}

export interface HeadMatmulSpec {
  nHeads: number;
  /** Inputs per head. */
  K: number;
  /** Outputs per head. */
  N: number;
  /** Input row stride, offset of head 0's inputs, distance between heads' inputs (values). */
  xStride: number;
  xOffset: number;
  xHeadStride: number;
  /** Output row stride, offset of head 0's outputs, distance between heads' outputs (values). */
  yStride: number;
  yOffset: number;
  yHeadStride: number;
  /** Multiplies every output (and the pass-through copies). */
  scale: number;
  /** y[row, h, N + i] = scale · x[row, h, K + i] for i < passCols. */
  passCols?: number;
}

/**
 * Uploads per-head matrices W_h[k][n] (k < K, n < N) as one k-major GpuMatrix [nHeads·K, N].
 * `value(h, k, n)` reads the checkpoint's element.
 */
export function uploadHeadMatrices(
  gpu: GpuContext,
  label: string,
  nHeads: number,
  K: number,
  N: number,
  dtype: WeightDtype,
  value: (h: number, k: number, n: number) => number,
): GpuMatrix {
  const data = new Float32Array(nHeads * K * N);
  for (let h = 0; h < nHeads; h++) {
    for (let k = 0; k < K; k++) {
      const base = (h * K + k) * N;
      for (let n = 0; n < N; n++) data[base + n] = value(h, k, n);
    }
  }
  const m = uploadMatrix(gpu, label, data, nHeads * K, N, dtype);
  if (m.pieces.length !== 1) {
    throw new Error(`${label}: per-head matrices of ${m.bytes} B exceed one storage binding (${gpu.limits.maxStorageBufferBindingSize} B)`);
  }
  return m;
}

/** Threads that split one output pair's k loop (their partial sums meet in workgroup memory): long K, more threads. */
export function headMatmulKSplit(K: number): number {
  let ks = 1;
  while (ks < 8 && K / (2 * ks) >= 64) ks *= 2;
  return ks;
}

function headMatmulWgsl(s: HeadMatmulSpec, w: GpuMatrix, mr: number): string {
  const f16 = w.dtype === 'f16';
  const NP = Math.ceil(s.N / 2);
  const pass = s.passCols ?? 0;
  const KS = headMatmulKSplit(s.K);
  const PPW = WG / KS; // output pairs per workgroup
  const ms = [...Array(mr).keys()];
  const wRow = w.stride / 2; // words (f16) or pairs (f32) per k
  const loadW = f16 ? `unpack2x16float(w[(h * ${s.K}u + k) * ${wRow}u + p])` : `w[(h * ${s.K}u + k) * ${wRow}u + p]`;
  const sc = wgslF32(s.scale);
  const store = (m: number, v: string) => `if (row0 + ${m}u < M) {
      let o${m} = ${v} * ${sc};
      y[yb${m} + 2u * p] = o${m}.x;
      ${s.N % 2 === 1 ? `if (2u * p + 1u < ${s.N}u) { y[yb${m} + 2u * p + 1u] = o${m}.y; }` : `y[yb${m} + 2u * p + 1u] = o${m}.y;`}
    }`;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<${f16 ? 'u32' : 'vec2<f32>'}>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
${KS > 1 ? `var<workgroup> red: array<vec2<f32>, ${WG * mr}>;` : ''}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${META_ROWS}];
  let pl = lid % ${PPW}u;
  let ks = lid / ${PPW}u;
  let p = wid.x * ${PPW}u + pl;
  let h = wid.y;
  let row0 = wid.z * ${mr}u;
  let mLast = max(M, 1u) - 1u;
  ${ms.map((m) => `let xb${m} = min(row0 + ${m}u, mLast) * ${s.xStride}u + ${s.xOffset}u + h * ${s.xHeadStride}u;`).join('\n  ')}
  ${ms.map((m) => `let yb${m} = (row0 + ${m}u) * ${s.yStride}u + ${s.yOffset}u + h * ${s.yHeadStride}u;`).join('\n  ')}
  ${ms.map((m) => `var acc${m} = vec2<f32>(0.0);`).join('\n  ')}
  if (p < ${NP}u) {
    for (var k = ks; k < ${s.K}u; k += ${KS}u) {
      let wk = ${loadW};
      ${ms.map((m) => `acc${m} += x[xb${m} + k] * wk;`).join('\n      ')}
    }
  }
  ${
    KS > 1
      ? `${ms.map((m) => `red[lid * ${mr}u + ${m}u] = acc${m};`).join('\n  ')}
  workgroupBarrier();
  if (ks == 0u && p < ${NP}u) {
    for (var q = 1u; q < ${KS}u; q++) {
      ${ms.map((m) => `acc${m} += red[(q * ${PPW}u + pl) * ${mr}u + ${m}u];`).join('\n      ')}
    }
    ${ms.map((m) => store(m, `acc${m}`)).join('\n    ')}
  }`
      : `if (p < ${NP}u) {
    ${ms.map((m) => store(m, `acc${m}`)).join('\n    ')}
  }`
  }
  if (ks == 0u && p >= ${NP}u && p < ${NP + pass}u) {
    let i = p - ${NP}u;
    ${ms.map((m) => `if (row0 + ${m}u < M) { y[yb${m} + ${s.N}u + i] = x[xb${m} + ${s.K}u + i] * ${sc}; }`).join('\n    ')}
  }
}`;
}

/** The tiled kernel: grid (⌈N / 64⌉, nHeads, ⌈rows / tm⌉), tm / 4 × 16 threads, each 4 rows × 4 outputs. */
function headMatmulTiledWgsl(s: HeadMatmulSpec, w: GpuMatrix, tm: number): string {
  const T = (tm / 4) * 16;
  const f16 = w.dtype === 'f16';
  const pass = s.passCols ?? 0;
  const sc = wgslF32(s.scale);
  // W element (k, n) of head h: f16 pairs packed in u32 words, or f32; zero past K and N.
  const wAt = f16
    ? `unpack2x16float(w[(h * ${s.K}u + k) * ${w.stride / 2}u + n / 2u])[n % 2u]`
    : `w[(h * ${s.K}u + k) * ${w.stride}u + n]`;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<${f16 ? 'u32' : 'f32'}>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
var<workgroup> xs: array<f32, ${tm * TILE_K}>;
var<workgroup> ws: array<f32, ${TILE_K * TILE}>;

@compute @workgroup_size(${T})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${META_ROWS}];
  let n0 = wid.x * ${TILE}u;
  let h = wid.y;
  let m0 = wid.z * ${tm}u;
  let tx = lid % 16u;
  let ty = lid / 16u;
  let mLast = max(M, 1u) - 1u;
  var acc: array<vec4<f32>, 4>;
  for (var k0 = 0u; k0 < ${s.K}u; k0 += ${TILE_K}u) {
    // ${tm} × 16 of x (four values a thread) and 16 × 64 of W.
    for (var e = lid; e < ${tm * TILE_K}u; e += ${T}u) {
      let xr = e / ${TILE_K}u;
      let xk = k0 + e % ${TILE_K}u;
      let row = min(m0 + xr, mLast);
      xs[e] = select(0.0, x[row * ${s.xStride}u + ${s.xOffset}u + h * ${s.xHeadStride}u + xk], xk < ${s.K}u);
    }
    for (var e = lid; e < ${TILE_K * TILE}u; e += ${T}u) {
      let k = k0 + e / ${TILE}u;
      let n = n0 + e % ${TILE}u;
      ws[e] = select(0.0, ${wAt}, k < ${s.K}u && n < ${s.N}u);
    }
    workgroupBarrier();
    for (var kk = 0u; kk < ${TILE_K}u; kk++) {
      let wv = vec4<f32>(ws[kk * ${TILE}u + tx * 4u], ws[kk * ${TILE}u + tx * 4u + 1u], ws[kk * ${TILE}u + tx * 4u + 2u], ws[kk * ${TILE}u + tx * 4u + 3u]);
      for (var i = 0u; i < 4u; i++) { acc[i] += xs[(ty * 4u + i) * ${TILE_K}u + kk] * wv; }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    let row = m0 + ty * 4u + i;
    if (row < M) {
      let yb = row * ${s.yStride}u + ${s.yOffset}u + h * ${s.yHeadStride}u;
      for (var j = 0u; j < 4u; j++) {
        let n = n0 + tx * 4u + j;
        if (n < ${s.N}u) { y[yb + n] = acc[i][j] * ${sc}; }
      }
    }
  }${
    pass > 0
      ? `
  // The pass-through columns of the tile's rows, by the first column tile.
  if (wid.x == 0u) {
    for (var e = lid; e < ${tm * pass}u; e += ${T}u) {
      let row = m0 + e / ${pass}u;
      let i = e % ${pass}u;
      if (row < M) {
        y[row * ${s.yStride}u + ${s.yOffset}u + h * ${s.yHeadStride}u + ${s.N}u + i] = x[row * ${s.xStride}u + ${s.xOffset}u + h * ${s.xHeadStride}u + ${s.K}u + i] * ${sc};
      }
    }
  }`
      : ''
  }
}`;
}

/** One per-head matmul site: weights and bindings fixed, rows chosen per dispatch (read from stepMeta's row count). */
export class HeadMatmul {
  private variants = new Map<number, { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup }>();
  private tiled = new Map<number, { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup }>();
  private readonly tiledMinRows: number;

  constructor(
    private gpu: GpuContext,
    readonly spec: HeadMatmulSpec,
    readonly weight: GpuMatrix,
    private b: { meta: GPUBuffer; x: GPUBuffer; y: GPUBuffer },
    opts: HeadMatmulOptions = {},
  ) {
    this.tiledMinRows = opts.tiledMinRows ?? HEAD_MATMUL_TILED_MIN_ROWS;
    if (weight.rows !== spec.nHeads * spec.K || weight.cols !== spec.N) {
      throw new Error(`${weight.label}: per-head weights are [${weight.rows}, ${weight.cols}], expected [${spec.nHeads}·${spec.K}, ${spec.N}]`);
    }
  }

  /** A pipeline (labelled by shape, not by layer: every layer's site shares it) bound to this site's buffers. */
  private bind(label: string, code: string): { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup } {
    const pipeline = this.gpu.pipeline(label, code);
    return { pipeline, bindGroup: bindBuffers(this.gpu, pipeline, this.weight.label, [this.b.meta, this.b.x, this.weight.pieces[0].buffer, this.b.y]) };
  }

  encode(pass: GPUComputePassEncoder, rows: number): void {
    if (rows <= 0) return;
    if (rows >= this.tiledMinRows) {
      const tm = headTileRows(rows);
      let t = this.tiled.get(tm);
      if (!t) {
        t = this.bind(`mla head-matmul ${this.spec.nHeads}×[${this.spec.K}→${this.spec.N}] ${this.weight.dtype} tiled ${tm}`, headMatmulTiledWgsl(this.spec, this.weight, tm));
        this.tiled.set(tm, t);
      }
      pass.setPipeline(t.pipeline);
      pass.setBindGroup(0, t.bindGroup);
      pass.dispatchWorkgroups(Math.ceil(this.spec.N / TILE), this.spec.nHeads, Math.ceil(rows / tm));
      return;
    }
    let mr = 1;
    while (mr < rows && mr < MAX_ROWS_PER_THREAD) mr *= 2;
    let v = this.variants.get(mr);
    if (!v) {
      const { nHeads, K, N } = this.spec;
      v = this.bind(`mla head-matmul ${nHeads}×[${K}→${N}] ${this.weight.dtype} mr${mr}`, headMatmulWgsl(this.spec, this.weight, mr));
      this.variants.set(mr, v);
    }
    pass.setPipeline(v.pipeline);
    pass.setBindGroup(0, v.bindGroup);
    const slots = Math.ceil(this.spec.N / 2) + (this.spec.passCols ?? 0);
    pass.dispatchWorkgroups(Math.ceil(slots / (WG / headMatmulKSplit(this.spec.K))), this.spec.nHeads, Math.ceil(rows / mr));
  }
}

// Matmul y[m, n] (+)= Σ_k x[m, k] · W[n, k] (+ b[n]) with f32 or packed-f16 weights: a GEMV path for few rows, tiled GEMM for many.
import type { GpuContext } from './device.ts';
import { bindBuffers, gridFor, type GpuMatrix, type WeightDtype } from './tensors.ts';

export interface MatmulTuning {
  /** Rows up to this go through the GEMV kernel (each weight read once for all rows); above it, tiled GEMM. */
  gemvMaxRows: number;
  /** Threads that share one output feature in the GEMV kernel (a multiple of the subgroup size when subgroups are used). */
  gemvThreadsPerRow: number;
  /** Output features per GEMV workgroup (workgroup size = threadsPerRow · rowsPerWorkgroup ≤ 256). */
  gemvRowsPerWorkgroup: number;
  /** Reduce with subgroupAdd when the device has subgroups (else a workgroup-memory tree). */
  useSubgroups: boolean;
  /** Weight words (8 values each) a GEMV thread loads before using them: more loads in flight per thread. */
  gemvUnroll: number;
}

export function defaultMatmulTuning(gpu: GpuContext, cols: number): MatmulTuning {
  const tpr = cols >= 8192 ? 64 : 32;
  return {
    gemvMaxRows: 8,
    gemvThreadsPerRow: tpr,
    gemvRowsPerWorkgroup: 256 / tpr,
    useSubgroups: gpu.features.has('subgroups'),
    gemvUnroll: 2,
  };
}

interface GemvParams {
  dtype: WeightDtype;
  K: number;
  N: number;
  colOffset: number;
  biasOffset: number;
  stride: number;
  xStride: number;
  yStride: number;
  mr: number;
  tpr: number;
  rpw: number;
  unroll: number;
  rowsSlot: number;
  bias: boolean;
  accumulate: boolean;
  subgroups: boolean;
  sgMin: number;
}

/** GEMV: TPR threads per output feature read the weight row as vec4 words (8 values each) and accumulate MR input rows. */
export function gemvWgsl(p: GemvParams): string {
  const wg = p.tpr * p.rpw;
  const k8 = Math.floor(p.K / 8);
  const tail = p.K - k8 * 8;
  const ms = [...Array(p.mr).keys()];
  const f16 = p.dtype === 'f16';
  const wDecl = f16 ? 'array<vec4<u32>>' : 'array<vec4<f32>>';
  const wRowVec4 = f16 ? p.stride / 8 : p.stride / 4;
  // Word u of an unrolled iteration: raw loads first (all in flight), then unpack and multiply.
  const rawW = (u: number, c: string) => (f16 ? `let wv${u} = w[wBase + ${c}];` : `let wa${u} = w[wBase + 2u * (${c})];\n    let wb${u} = w[wBase + 2u * (${c}) + 1u];`);
  const useW = (u: number, c: string) =>
    (f16
      ? `let wa${u} = vec4<f32>(unpack2x16float(wv${u}.x), unpack2x16float(wv${u}.y));
    let wb${u} = vec4<f32>(unpack2x16float(wv${u}.z), unpack2x16float(wv${u}.w));\n    `
      : '') + ms.map((m) => `acc${m} += dot(wa${u}, x[xb${m} + 2u * (${c})]) + dot(wb${u}, x[xb${m} + 2u * (${c}) + 1u]);`).join('\n    ');
  const us = [...Array(p.unroll).keys()];
  const cOf = (u: number) => (u === 0 ? 'c' : `c + ${u * p.tpr}u`);
  const tailW = f16 ? `unpack2x16float(w[wBase + k / 8u][(k % 8u) / 2u])[k % 2u]` : `w[wBase + k / 4u][k % 4u]`;
  const slots = Math.max(1, p.tpr / p.sgMin);
  const bindings = [
    '@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;',
    '@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;',
    `@group(0) @binding(2) var<storage, read> w: ${wDecl};`,
    '@group(0) @binding(3) var<storage, read_write> y: array<f32>;',
  ];
  if (p.bias) bindings.push('@group(0) @binding(4) var<storage, read> bias: array<f32>;');
  const reduce = p.subgroups
    ? `
  let sgIndex = lane / sgSize;
  ${ms.map((m) => `let s${m} = subgroupAdd(acc${m});`).join('\n  ')}
  if (sgLane == 0u) {
    ${ms.map((m) => `red[(slot * ${p.mr}u + ${m}u) * ${slots}u + sgIndex] = s${m};`).join('\n    ')}
  }
  workgroupBarrier();
  let nSub = ${p.tpr}u / sgSize;
  ${ms.map((m) => `var t${m} = 0.0;`).join('\n  ')}
  for (var i = 0u; i < nSub; i++) {
    ${ms.map((m) => `t${m} += red[(slot * ${p.mr}u + ${m}u) * ${slots}u + i];`).join('\n    ')}
  }`
    : `
  ${ms.map((m) => `red[${m}u * ${wg}u + lid] = acc${m};`).join('\n  ')}
  workgroupBarrier();
  for (var s = ${p.tpr / 2}u; s > 0u; s >>= 1u) {
    if (lane < s) {
      ${ms.map((m) => `red[${m}u * ${wg}u + lid] += red[${m}u * ${wg}u + lid + s];`).join('\n      ')}
    }
    workgroupBarrier();
  }
  ${ms.map((m) => `let t${m} = red[${m}u * ${wg}u + lid];`).join('\n  ')}`;
  const redSize = p.subgroups ? p.rpw * p.mr * slots : wg * p.mr;
  const store = (m: number) => {
    const v = p.bias ? `t${m} + bias[${p.biasOffset}u + n]` : `t${m}`;
    const idx = `${m}u * ${p.yStride}u + ${p.colOffset}u + n`;
    return `if (${m}u < M) { ${p.accumulate ? `y[${idx}] += ${v};` : `y[${idx}] = ${v};`} }`;
  };
  return /* wgsl */ `${p.subgroups ? 'enable subgroups;\n' : ''}
${bindings.join('\n')}
var<workgroup> red: array<f32, ${redSize}>;

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>${p.subgroups ? ', @builtin(subgroup_size) sgSize: u32, @builtin(subgroup_invocation_id) sgLane: u32' : ''}) {
  let M = stepMeta[${p.rowsSlot}];
  let mLast = max(M, 1u) - 1u;
  let slot = lid / ${p.tpr}u;
  let lane = lid % ${p.tpr}u;
  let n = (wid.x + wid.y * nwg.x) * ${p.rpw}u + slot;
  let wBase = min(n, ${p.N - 1}u) * ${wRowVec4}u;
  ${ms.map((m) => `let xb${m} = min(${m}u, mLast) * ${p.xStride / 4}u;`).join('\n  ')}
  ${ms.map((m) => `var acc${m} = 0.0;`).join('\n  ')}
  var c = lane;
  for (; c + ${(p.unroll - 1) * p.tpr}u < ${k8}u; c += ${p.unroll * p.tpr}u) {
    ${us.map((u) => rawW(u, cOf(u))).join('\n    ')}
    ${us.map((u) => useW(u, cOf(u))).join('\n    ')}
  }
  for (; c < ${k8}u; c += ${p.tpr}u) {
    ${rawW(0, 'c')}
    ${useW(0, 'c')}
  }
  ${
    tail > 0
      ? `if (lane < ${tail}u) {
    let k = ${k8 * 8}u + lane;
    let wf = ${tailW};
    ${ms.map((m) => `acc${m} += wf * x[xb${m} + k / 4u][k % 4u];`).join('\n    ')}
  }`
      : ''
  }
  ${reduce}
  if (lane == 0u && n < ${p.N}u) {
    ${ms.map(store).join('\n    ')}
  }
}
`;
}

interface GemmParams {
  dtype: WeightDtype;
  K: number;
  N: number;
  colOffset: number;
  biasOffset: number;
  stride: number;
  xStride: number;
  yStride: number;
  bm: number;
  rowsSlot: number;
  bias: boolean;
  accumulate: boolean;
}

const GEMM_BN = 64;
const GEMM_BK = 16;
const GEMM_THREADS = 256;

/** Tiled GEMM: a workgroup computes a BM × 64 output tile from 16-deep tiles of x and W staged in workgroup memory. */
export function gemmWgsl(p: GemmParams): string {
  const BM = p.bm;
  const BN = GEMM_BN;
  const BK = GEMM_BK;
  const TM = BM / 16; // rows per thread; 16 × 16 threads, each TM × 4 outputs
  const f16 = p.dtype === 'f16';
  const xLoads = (BM * BK) / GEMM_THREADS;
  const wWords = f16 ? (BN * BK) / 2 : BN * BK;
  const wLoads = wWords / GEMM_THREADS;
  const ts = [...Array(TM).keys()];
  const wLoad = f16
    ? `let nn = idx / ${BK / 2}u;
      let kp = idx % ${BK / 2}u;
      let gn = tileN + nn;
      let gk = k0 + 2u * kp;
      var pair = vec2<f32>(0.0, 0.0);
      if (gn < ${p.N}u && gk < ${p.stride}u) { pair = unpack2x16float(w[gn * ${p.stride / 2}u + gk / 2u]); }
      ws[(2u * kp) * ${BN / 4}u + nn / 4u][nn % 4u] = pair.x;
      ws[(2u * kp + 1u) * ${BN / 4}u + nn / 4u][nn % 4u] = pair.y;`
    : `let nn = idx / ${BK}u;
      let kk = idx % ${BK}u;
      let gn = tileN + nn;
      let gk = k0 + kk;
      var v = 0.0;
      if (gn < ${p.N}u && gk < ${p.K}u) { v = w[gn * ${p.stride}u + gk]; }
      ws[kk * ${BN / 4}u + nn / 4u][nn % 4u] = v;`;
  const bindings = [
    '@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;',
    '@group(0) @binding(1) var<storage, read> x: array<f32>;',
    `@group(0) @binding(2) var<storage, read> w: array<${f16 ? 'u32' : 'f32'}>;`,
    '@group(0) @binding(3) var<storage, read_write> y: array<f32>;',
  ];
  if (p.bias) bindings.push('@group(0) @binding(4) var<storage, read> bias: array<f32>;');
  return /* wgsl */ `
${bindings.join('\n')}
var<workgroup> xs: array<f32, ${BK * BM}>;
var<workgroup> ws: array<vec4<f32>, ${(BK * BN) / 4}>;

@compute @workgroup_size(${GEMM_THREADS})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${p.rowsSlot}];
  let tileN = wid.x * ${BN}u;
  let tileM = wid.y * ${BM}u;
  let tx = lid % 16u;
  let ty = lid / 16u;
  ${ts.map((i) => `var acc${i} = vec4<f32>(0.0);`).join('\n  ')}
  for (var k0 = 0u; k0 < ${p.K}u; k0 += ${BK}u) {
    for (var e = 0u; e < ${xLoads}u; e++) {
      let idx = lid + e * ${GEMM_THREADS}u;
      let mm = idx / ${BK}u;
      let kk = idx % ${BK}u;
      let gm = tileM + mm;
      let gk = k0 + kk;
      var v = 0.0;
      if (gm < M && gk < ${p.K}u) { v = x[gm * ${p.xStride}u + gk]; }
      xs[kk * ${BM}u + mm] = v;
    }
    for (var e = 0u; e < ${wLoads}u; e++) {
      let idx = lid + e * ${GEMM_THREADS}u;
      ${wLoad}
    }
    workgroupBarrier();
    for (var kk = 0u; kk < ${BK}u; kk++) {
      let b = ws[kk * ${BN / 4}u + tx];
      ${ts.map((i) => `acc${i} += xs[kk * ${BM}u + ty * ${TM}u + ${i}u] * b;`).join('\n      ')}
    }
    workgroupBarrier();
  }
  ${
    p.bias
      ? `var bv = vec4<f32>(0.0);
  for (var j = 0u; j < 4u; j++) { if (tileN + tx * 4u + j < ${p.N}u) { bv[j] = bias[${p.biasOffset}u + tileN + tx * 4u + j]; } }`
      : ''
  }
  ${ts
    .map(
      (i) => `{
    let m = tileM + ty * ${TM}u + ${i}u;
    if (m < M) {
      for (var j = 0u; j < 4u; j++) {
        let n = tileN + tx * 4u + j;
        if (n < ${p.N}u) {
          let v = acc${i}[j]${p.bias ? ' + bv[j]' : ''};
          let o = m * ${p.yStride}u + ${p.colOffset}u + n;
          ${p.accumulate ? 'y[o] += v;' : 'y[o] = v;'}
        }
      }
    }
  }`,
    )
    .join('\n  ')}
}
`;
}

/** Where a matmul reads and writes: buffers bound once, rows chosen per dispatch. */
export interface MatmulBindings {
  /** Step metadata (kernels/step-meta.ts); the row count M is stepMeta[rowsSlot]. */
  meta: GPUBuffer;
  rowsSlot: number;
  /** Input rows [M, xStride] f32; xStride a multiple of 4. */
  x: GPUBuffer;
  xStride: number;
  /** Output rows [M, yStride] f32; this matmul writes columns [yOffset, yOffset + N). */
  y: GPUBuffer;
  yStride: number;
  yOffset?: number;
  /** Bias [N] f32. */
  bias?: GPUBuffer;
  /** y += result (fused residual add) instead of y = result. */
  accumulate?: boolean;
}

/** One matmul site (a weight and its bindings): caches its pipelines and bind groups, encodes a dispatch per weight piece. */
export class MatmulOp {
  readonly tuning: MatmulTuning;
  private groups = new Map<string, Array<{ pipeline: GPUComputePipeline; bindGroup: GPUBindGroup; rows: number }>>();

  constructor(
    private gpu: GpuContext,
    readonly weight: GpuMatrix,
    private b: MatmulBindings,
    tuning: Partial<MatmulTuning> = {},
  ) {
    this.tuning = { ...defaultMatmulTuning(gpu, weight.cols), ...tuning };
    if (b.xStride % 4 !== 0 || b.xStride < weight.cols) {
      throw new Error(`${weight.label}: input row stride ${b.xStride} must be a multiple of 4 and ≥ ${weight.cols} columns`);
    }
    const t = this.tuning;
    if (t.gemvThreadsPerRow * t.gemvRowsPerWorkgroup > gpu.limits.maxComputeInvocationsPerWorkgroup) {
      throw new Error(`${weight.label}: GEMV workgroup of ${t.gemvThreadsPerRow}×${t.gemvRowsPerWorkgroup} exceeds the device limit`);
    }
  }

  private variant(rows: number): { key: string; gemv: boolean; size: number } {
    if (rows <= this.tuning.gemvMaxRows) {
      let mr = 1;
      while (mr < rows) mr *= 2;
      return { key: `gemv${mr}`, gemv: true, size: mr };
    }
    const bm = rows <= 16 ? 16 : rows <= 32 ? 32 : 64;
    return { key: `gemm${bm}`, gemv: false, size: bm };
  }

  private build(v: { key: string; gemv: boolean; size: number }) {
    const { gpu, weight: w, b, tuning: t } = this;
    const sgMin = gpu.subgroupSize;
    const useSg = t.useSubgroups && gpu.features.has('subgroups') && t.gemvThreadsPerRow % Math.max(sgMin, 1) === 0 && sgMin <= t.gemvThreadsPerRow;
    const out: Array<{ pipeline: GPUComputePipeline; bindGroup: GPUBindGroup; rows: number }> = [];
    for (const piece of w.pieces) {
      const common = {
        dtype: w.dtype,
        K: w.cols,
        N: piece.rows,
        colOffset: (b.yOffset ?? 0) + piece.rowStart,
        biasOffset: piece.rowStart,
        stride: w.stride,
        xStride: b.xStride,
        yStride: b.yStride,
        rowsSlot: b.rowsSlot,
        bias: !!b.bias,
        accumulate: !!b.accumulate,
      };
      const code = v.gemv
        ? gemvWgsl({ ...common, mr: v.size, tpr: t.gemvThreadsPerRow, rpw: t.gemvRowsPerWorkgroup, unroll: t.gemvUnroll, subgroups: useSg, sgMin })
        : gemmWgsl({ ...common, bm: v.size });
      const pipeline = gpu.pipeline(`matmul ${v.key} ${w.dtype} ${w.rows}x${w.cols}`, code);
      const bufs = [b.meta, b.x, piece.buffer, b.y];
      if (b.bias) bufs.push(b.bias);
      out.push({ pipeline, bindGroup: bindBuffers(gpu, pipeline, `${w.label} ${v.key}`, bufs), rows: piece.rows });
    }
    return out;
  }

  /** Records the dispatches for `rows` input rows (the value the kernel reads at stepMeta[rowsSlot]). */
  encode(pass: GPUComputePassEncoder, rows: number): void {
    if (rows <= 0) return;
    const v = this.variant(rows);
    let list = this.groups.get(v.key);
    if (!list) {
      list = this.build(v);
      this.groups.set(v.key, list);
    }
    for (const g of list) {
      pass.setPipeline(g.pipeline);
      pass.setBindGroup(0, g.bindGroup);
      if (v.gemv) {
        const [gx, gy] = gridFor(this.gpu, Math.ceil(g.rows / this.tuning.gemvRowsPerWorkgroup));
        pass.dispatchWorkgroups(gx, gy);
      } else {
        pass.dispatchWorkgroups(Math.ceil(g.rows / GEMM_BN), Math.ceil(rows / v.size));
      }
    }
  }
}

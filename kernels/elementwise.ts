// Row-wise kernels of a decoder step: embedding gather, RMSNorm (optionally gathering logit rows), SiLU·mul, RoPE.
import type { GpuContext } from './device.ts';
import { metaWgsl, META_LOGIT_ROWS, META_ROWS } from './step-meta.ts';
import { bindBuffers, gridFor, uploadArray, wgslF32, type GpuMatrix } from './tensors.ts';
import { quantizeRowTailWgsl } from './matmul-int8.ts';
import type { RopeLayout } from '../model/config.ts';

const WG = 64;
/** Threads per row of RMSNorm. */
const NORM_WG = 256;

/** Linear thread id over a 2-D grid of WG-sized workgroups (grids wider than 65535 wrap into y). */
const linearId = `(wid.x + wid.y * nwg.x) * ${WG}u + lid`;
const builtins = '@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>';

function dispatchThreads(gpu: GpuContext, pass: GPUComputePassEncoder, threads: number): void {
  const [x, y] = gridFor(gpu, Math.ceil(threads / WG));
  pass.dispatchWorkgroups(x, y);
}

interface Dispatch {
  pipeline: GPUComputePipeline;
  bindGroup: GPUBindGroup;
}

function record(pass: GPUComputePassEncoder, d: Dispatch): void {
  pass.setPipeline(d.pipeline);
  pass.setBindGroup(0, d.bindGroup);
}

/** x[r, :] = table[token(r), :] for every row of the step; one dispatch per table piece (rows outside it are skipped). */
export class EmbeddingGather {
  private dispatches: Dispatch[] = [];
  private half: number;

  constructor(
    private gpu: GpuContext,
    table: GpuMatrix,
    out: { meta: GPUBuffer; x: GPUBuffer; xStride: number },
  ) {
    const dim = table.cols;
    if (dim % 2 !== 0) throw new Error(`embedding gather handles an even model dim; ${dim} is odd`);
    this.half = dim / 2;
    for (const piece of table.pieces) {
      const f16 = table.dtype === 'f16';
      const code = /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> table: array<${f16 ? 'u32' : 'f32'}>;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(${WG})
fn main(${builtins}) {
  let id = ${linearId};
  let r = id / ${this.half}u;
  let p = id % ${this.half}u;
  if (r >= metaRows()) { return; }
  let tok = rowToken(r);
  if (tok < ${piece.rowStart}u || tok >= ${piece.rowStart + piece.rows}u) { return; }
  let row = tok - ${piece.rowStart}u;
  ${
    f16
      ? `let v = unpack2x16float(table[row * ${table.stride / 2}u + p]);`
      : `let v = vec2<f32>(table[row * ${table.stride}u + 2u * p], table[row * ${table.stride}u + 2u * p + 1u]);`
  }
  x[r * ${out.xStride}u + 2u * p] = v.x;
  x[r * ${out.xStride}u + 2u * p + 1u] = v.y;
}`;
      const pipeline = gpu.pipeline(`embedding ${table.dtype}`, code);
      this.dispatches.push({ pipeline, bindGroup: bindBuffers(gpu, pipeline, `${table.label} gather`, [out.meta, piece.buffer, out.x]) });
    }
  }

  encode(pass: GPUComputePassEncoder, rows: number): void {
    for (const d of this.dispatches) {
      record(pass, d);
      dispatchThreads(this.gpu, pass, rows * this.half);
    }
  }
}

/**
 * out[i, :] = x[src(i), :] / rms(x[src(i), :]) · weight. src(i) = i over the step's rows, or (gatherLogitRows)
 * the i-th row whose logits were asked for, so the final norm runs only on those rows.
 */
export class RmsNorm {
  private d: Dispatch;

  constructor(
    private gpu: GpuContext,
    b: {
      meta: GPUBuffer;
      x: GPUBuffer;
      xStride: number;
      weight: GPUBuffer;
      out: GPUBuffer;
      outStride: number;
      /**
       * Also quantize each normed row for int8 W8A8 consumers (kernels/matmul-int8.ts layout: one scale a row, absmax
       * / 127, `words` i32 words a row, K padded with zeros): the same bytes the consumers' own quantizer writes from
       * `out`, so they skip it (MatmulBindings.xQuantized).
       */
      quantized?: { xq: GPUBuffer; xScale: GPUBuffer; words: number };
    },
    readonly dim: number,
    eps: number,
    readonly gatherLogitRows = false,
  ) {
    const rowsSlot = gatherLogitRows ? META_LOGIT_ROWS : META_ROWS;
    // One workgroup of NORM_WG threads a row; each thread loads its share once into registers (vec4 where the dim and
    // strides allow), so the sum of squares and the scaled write need one pass over x with every load in flight at
    // once. (64 threads looping over the row took ~35 µs for 32 rows × 3584 on the H200: bench:decode --profile.)
    const vec = dim % 4 === 0 && b.xStride % 4 === 0 && b.outStride % 4 === 0;
    const L = vec ? 4 : 1;
    const T = vec ? 'vec4<f32>' : 'f32';
    const n = dim / L;
    const q = b.quantized;
    if (q && (!vec || q.words * 4 < dim || q.words % 8 !== 0)) {
      throw new Error(`rmsnorm: a quantized output needs dim (${dim}) and strides in whole vec4s and ${q.words} words ≥ dim/4 in whole 32-value steps`);
    }
    // Registers a thread holds: its vec4s of the row, and for the quantized output the padding words past dim too.
    const per = Math.ceil((q ? q.words : n) / NORM_WG);
    // Quantized copy: the normed row's vec4s are in v (zero past dim: never assigned there).
    const quant = !q ? '' : `
  ${quantizeRowTailWgsl({ per, words: q.words, wg: NORM_WG, row: 'r', live: 'r < rows' })}`;
    const code = /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> x: array<${T}>;
@group(0) @binding(2) var<storage, read> weight: array<${T}>;
@group(0) @binding(3) var<storage, read_write> out: array<${T}>;
${q ? '@group(0) @binding(4) var<storage, read_write> xq: array<u32>;\n@group(0) @binding(5) var<storage, read_write> xScale: array<f32>;' : ''}
var<workgroup> red: array<f32, ${NORM_WG}>;
@compute @workgroup_size(${NORM_WG})
fn main(${builtins}) {
  let rows = stepMeta[${rowsSlot}];
  let r = wid.x + wid.y * nwg.x;
  let rc = min(r, max(rows, 1u) - 1u);
  let src = ${gatherLogitRows ? 'logitRow(rc)' : 'rc'} * ${b.xStride / L}u;
  var v: array<${T}, ${per}>;
  var ss = 0.0;
  for (var i = 0u; i < ${per}u; i++) {
    let c = lid + i * ${NORM_WG}u;
    if (c < ${n}u) {
      v[i] = x[src + c];
      ss += ${vec ? 'dot(v[i], v[i])' : 'v[i] * v[i]'};
    }
  }
  red[lid] = ss;
  workgroupBarrier();
  for (var s = ${NORM_WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  let inv = inverseSqrt(red[0] / ${dim}.0 + ${wgslF32(eps)});
  for (var i = 0u; i < ${per}u; i++) {
    let c = lid + i * ${NORM_WG}u;
    if (c < ${n}u) { v[i] = v[i] * inv * weight[c]; }
  }
  if (r < rows) {
    for (var i = 0u; i < ${per}u; i++) {
      let c = lid + i * ${NORM_WG}u;
      if (c < ${n}u) { out[r * ${b.outStride / L}u + c] = v[i]; }
    }
  }${q ? quant : ''}
}`;
    const pipeline = gpu.pipeline(`rmsnorm${gatherLogitRows ? ' gather' : ''}${q ? ' + int8 rows' : ''}`, code);
    const bufs = [b.meta, b.x, b.weight, b.out];
    if (q) bufs.push(q.xq, q.xScale);
    this.d = { pipeline, bindGroup: bindBuffers(gpu, pipeline, 'rmsnorm', bufs) };
  }

  encode(pass: GPUComputePassEncoder, rows: number): void {
    if (rows <= 0) return;
    record(pass, this.d);
    const [x, y] = gridFor(this.gpu, rows);
    pass.dispatchWorkgroups(x, y);
  }
}

/**
 * h[r, i] = silu(gu[r, i]) · gu[r, hidden + i]: gate and up come from one fused matmul. With `quantized`, a second
 * form writes h quantized per row for the int8 W8A8 down projection instead (one workgroup a row, the row's share in
 * registers; the bytes and scale the projection's own quantizer would write from h, which it then skips:
 * MatmulBindings.xQuantized); encode(pass, rows, true) records that form.
 */
export class SiluMul {
  private d: Dispatch;
  private q: Dispatch | undefined;

  constructor(
    private gpu: GpuContext,
    b: {
      meta: GPUBuffer;
      gateUp: GPUBuffer;
      gateUpStride: number;
      out: GPUBuffer;
      outStride: number;
      quantized?: { xq: GPUBuffer; xScale: GPUBuffer; words: number };
    },
    readonly hidden: number,
  ) {
    const code = /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> gu: array<f32>;
@group(0) @binding(2) var<storage, read_write> h: array<f32>;
@compute @workgroup_size(${WG})
fn main(${builtins}) {
  let id = ${linearId};
  let r = id / ${hidden}u;
  let i = id % ${hidden}u;
  if (r >= metaRows()) { return; }
  let g = gu[r * ${b.gateUpStride}u + i];
  let u = gu[r * ${b.gateUpStride}u + ${hidden}u + i];
  h[r * ${b.outStride}u + i] = g / (1.0 + exp(-g)) * u;
}`;
    const pipeline = gpu.pipeline('silu-mul', code);
    this.d = { pipeline, bindGroup: bindBuffers(gpu, pipeline, 'silu-mul', [b.meta, b.gateUp, b.out]) };
    const q = b.quantized;
    if (!q) return;
    if (hidden % 4 !== 0 || b.gateUpStride % 4 !== 0 || q.words * 4 < hidden || q.words % 8 !== 0) {
      throw new Error(`silu-mul: a quantized output needs hidden (${hidden}) and the gate/up stride in whole vec4s and ${q.words} words ≥ hidden/4 in whole 32-value steps`);
    }
    const n = hidden / 4;
    const per = Math.ceil(q.words / NORM_WG);
    const qcode = /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> gu: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> xq: array<u32>;
@group(0) @binding(3) var<storage, read_write> xScale: array<f32>;
var<workgroup> red: array<f32, ${NORM_WG}>;
@compute @workgroup_size(${NORM_WG})
fn main(${builtins}) {
  let rows = metaRows();
  let r = wid.x + wid.y * nwg.x;
  let live = r < rows;
  let gb = min(r, max(rows, 1u) - 1u) * ${b.gateUpStride / 4}u;
  var v: array<vec4<f32>, ${per}>;
  for (var i = 0u; i < ${per}u; i++) {
    let j = lid + i * ${NORM_WG}u;
    if (j < ${n}u) {
      let g = gu[gb + j];
      v[i] = g / (vec4<f32>(1.0) + exp(-g)) * gu[gb + ${n}u + j];
    }
  }
  ${quantizeRowTailWgsl({ per, words: q.words, wg: NORM_WG, row: 'r', live: 'live' })}
}`;
    const qp = gpu.pipeline('silu-mul + int8 rows', qcode);
    this.q = { pipeline: qp, bindGroup: bindBuffers(gpu, qp, 'silu-mul int8', [b.meta, b.gateUp, q.xq, q.xScale]) };
  }

  /** `quantized`: the form that writes the int8 rows (and not h), for a step whose down projection runs W8A8. */
  encode(pass: GPUComputePassEncoder, rows: number, quantized = false): void {
    if (rows <= 0) return;
    if (quantized) {
      if (!this.q) throw new Error('silu-mul: made without a quantized output');
      record(pass, this.q);
      const [x, y] = gridFor(this.gpu, rows);
      pass.dispatchWorkgroups(x, y);
      return;
    }
    record(pass, this.d);
    dispatchThreads(this.gpu, pass, rows * this.hidden);
  }
}

/** cos/sin of pos · θ^(−2j/dims) for pos < maxPos, j < dims/2, computed in float64: [pos][j] → (cos, sin). */
export function ropeTable(gpu: GpuContext, dims: number, theta: number, maxPos: number): GPUBuffer {
  const half = dims / 2;
  const data = new Float32Array(maxPos * half * 2);
  for (let j = 0; j < half; j++) {
    const freq = Math.pow(theta, (-2 * j) / dims);
    for (let p = 0; p < maxPos; p++) {
      data[(p * half + j) * 2] = Math.cos(p * freq);
      data[(p * half + j) * 2 + 1] = Math.sin(p * freq);
    }
  }
  return uploadArray(gpu, `rope table ${dims}×${maxPos}`, data);
}

export interface RopeSpan {
  /** Heads rotated, consecutive in the row: head h starts at colOffset + h · headStride. */
  nHeads: number;
  colOffset: number;
  headStride: number;
  /** The rotated part of each head: values [ropeOffset, ropeOffset + dims). */
  ropeOffset: number;
  dims: number;
  layout: RopeLayout;
}

/** Rotates heads of each row in place by the row's position (table from ropeTable). */
export class Rope {
  private d: Dispatch;
  private perRow: number;

  constructor(
    private gpu: GpuContext,
    b: { meta: GPUBuffer; table: GPUBuffer; x: GPUBuffer; xStride: number },
    span: RopeSpan,
  ) {
    if (span.dims % 2 !== 0) throw new Error(`RoPE rotates pairs; ${span.dims} dims is odd`);
    const half = span.dims / 2;
    this.perRow = span.nHeads * half;
    const [a, bIdx] = span.layout === 'interleaved' ? ['2u * j', '2u * j + 1u'] : ['j', `j + ${half}u`];
    const code = /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> table: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(${WG})
fn main(${builtins}) {
  let id = ${linearId};
  let r = id / ${this.perRow}u;
  let k = id % ${this.perRow}u;
  if (r >= metaRows()) { return; }
  let h = k / ${half}u;
  let j = k % ${half}u;
  let cs = table[rowPos(r) * ${half}u + j];
  let base = r * ${b.xStride}u + ${span.colOffset}u + h * ${span.headStride}u + ${span.ropeOffset}u;
  let x0 = x[base + ${a}];
  let x1 = x[base + ${bIdx}];
  x[base + ${a}] = x0 * cs.x - x1 * cs.y;
  x[base + ${bIdx}] = x0 * cs.y + x1 * cs.x;
}`;
    const pipeline = gpu.pipeline(`rope ${span.layout}`, code);
    this.d = { pipeline, bindGroup: bindBuffers(gpu, pipeline, 'rope', [b.meta, b.table, b.x]) };
  }

  encode(pass: GPUComputePassEncoder, rows: number): void {
    record(pass, this.d);
    dispatchThreads(this.gpu, pass, rows * this.perRow);
  }
}

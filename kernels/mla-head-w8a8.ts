// The MLA head products (y[row, h, n] = scale · Σ_k W_h[k, n] · x[row, h, k]: the absorption q̃ = W_UKᵀ q_nope and
// ô → W_UV) as W8A8: each head's weights quantized once per output column (int8, scale max |W[·, n]| / 127), each
// (row, head)'s inputs per step (scale max |x[row, h, ·]| / 127), the K sums exact in i32 — on tensor cores (i8 subgroup
// matrices, 16 rows × 16 outputs × 32 k a product) where the adapter has them, else the same integers by dot4I8Packed.
import type { GpuContext } from './device.ts';
import type { HeadMatmulSpec } from './mla-head-matmul.ts';
import { META_ROWS, metaWgsl } from './step-meta.ts';
import { bindBuffers, storageBuffer, wgslF32, type GpuMatrix } from './tensors.ts';

/** Rows a W8A8 head-product workgroup takes (one 16-row tile), and its subgroups (one 16-output tile each). */
const ROW_TILE = 16;
const SUBGROUPS = 8;
const WG = SUBGROUPS * 32;

/** Padded sizes: K to whole 32-value K steps, N to whole 16-output tiles. */
export function headW8a8Dims(spec: Pick<HeadMatmulSpec, 'K' | 'N'>): { Kp: number; Np: number } {
  return { Kp: Math.ceil(spec.K / 32) * 32, Np: Math.ceil(spec.N / 16) * 16 };
}

/**
 * One-shot weight quantization, grid (⌈Np / 4 / 64⌉, nHeads): a thread per four output columns finds their max |W|
 * over K, writes the scales and the int8 bytes k-major (wq byte (h·Kp + k)·Np + n; zero past K and N).
 */
export function headW8a8WeightWgsl(spec: HeadMatmulSpec, w: GpuMatrix): string {
  const { K, N } = spec;
  const { Kp, Np } = headW8a8Dims(spec);
  const f16 = w.dtype === 'f16';
  const at = (k: string, n: string) => (f16 ? `unpack2x16float(w[(h * ${K}u + ${k}) * ${w.stride / 2}u + ${n} / 2u])[${n} % 2u]` : `w[(h * ${K}u + ${k}) * ${w.stride}u + ${n}]`);
  return /* wgsl */ `
@group(0) @binding(0) var<storage, read> w: array<${f16 ? 'u32' : 'f32'}>;
@group(0) @binding(1) var<storage, read_write> wq: array<u32>;
@group(0) @binding(2) var<storage, read_write> ws: array<f32>;

fn wAt(h: u32, k: u32, n: u32) -> f32 {
  if (n >= ${N}u) { return 0.0; }
  return ${at('k', 'n')};
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let t = gid.x;
  let h = wid.y;
  if (t >= ${Np / 4}u) { return; }
  var mx = vec4<f32>(0.0);
  for (var k = 0u; k < ${K}u; k++) {
    mx = max(mx, abs(vec4<f32>(wAt(h, k, 4u * t), wAt(h, k, 4u * t + 1u), wAt(h, k, 4u * t + 2u), wAt(h, k, 4u * t + 3u))));
  }
  let inv = select(vec4<f32>(0.0), 127.0 / mx, mx > vec4<f32>(0.0));
  for (var j = 0u; j < 4u; j++) { ws[h * ${Np}u + 4u * t + j] = mx[j] / 127.0; }
  for (var k = 0u; k < ${Kp}u; k++) {
    var v = vec4<f32>(0.0);
    if (k < ${K}u) { v = vec4<f32>(wAt(h, k, 4u * t), wAt(h, k, 4u * t + 1u), wAt(h, k, 4u * t + 2u), wAt(h, k, 4u * t + 3u)) * inv; }
    wq[(h * ${Kp}u + k) * ${Np / 4}u + t] = pack4xI8(vec4<i32>(clamp(round(v), vec4<f32>(-127.0), vec4<f32>(127.0))));
  }
}
`;
}

/**
 * Per-step input quantization, grid (nHeads, rows): x[row, h, 0..K) → Kp int8 bytes at xq byte (row·nHeads + h)·Kp
 * and xs[row·nHeads + h] = max |x| / 127. The max is taken on |x|'s bits, so a NaN or Inf input gives its (row, head) a
 * non-finite scale and non-finite outputs rather than being dropped.
 */
export function headW8a8InputWgsl(spec: HeadMatmulSpec): string {
  const { nHeads: H, K } = spec;
  const { Kp } = headW8a8Dims(spec);
  return /* wgsl */ `
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> xq: array<u32>;
@group(0) @binding(2) var<storage, read_write> xs: array<f32>;
var<workgroup> red: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let h = wid.x;
  let row = wid.y;
  let xb = row * ${spec.xStride}u + ${spec.xOffset}u + h * ${spec.xHeadStride}u;
  var a = 0u;
  for (var k = lid; k < ${K}u; k += 64u) { a = max(a, bitcast<u32>(x[xb + k]) & 0x7fffffffu); }
  red[lid] = a;
  workgroupBarrier();
  for (var s = 32u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
    workgroupBarrier();
  }
  let absMax = bitcast<f32>(red[0]);
  let inv = select(0.0, 127.0 / absMax, absMax > 0.0);
  for (var wd = lid; wd < ${Kp / 4}u; wd += 64u) {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
      let k = 4u * wd + i;
      if (k < ${K}u) { v[i] = x[xb + k] * inv; }
    }
    xq[(row * ${H}u + h) * ${Kp / 4}u + wd] = pack4xI8(vec4<i32>(clamp(round(v), vec4<f32>(-127.0), vec4<f32>(127.0))));
  }
  if (lid == 0u) { xs[row * ${H}u + h] = absMax / 127.0; }
}
`;
}

/**
 * The product, grid (⌈Np / 16 / 8⌉, nHeads, ⌈rows / 16⌉): subgroup sg takes output tile wid.x·8 + sg of head h for the
 * workgroup's 16 rows. On tensor cores the left operand is 16 rows × 32 k of xq (row-major, stride nHeads·Kp; rows past
 * the step read stale bytes whose outputs are dropped), the right one 32 k × 16 outputs of wq (row-major, stride Np);
 * otherwise each thread sums its outputs' bytes with dot4I8Packed. Either way the i32 tile goes through workgroup memory
 * and y = f32(sum) · xs · ws · scale (plus the spec's pass-through columns, by the first output group; x is bound
 * only for them).
 */
export function headW8a8ProductWgsl(spec: HeadMatmulSpec, tensorCores: boolean): string {
  const { nHeads: H, K, N } = spec;
  const { Kp, Np } = headW8a8Dims(spec);
  const sc = wgslF32(spec.scale);
  const tcProducts = `let n0 = (wid.x * ${SUBGROUPS}u + sg) * 16u;
  if (n0 < ${Np}u) {
    var acc = subgroup_matrix_result<i32, 16, 16>();
    for (var k0 = 0u; k0 < ${Kp}u; k0 += 32u) {
      acc = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<subgroup_matrix_left<i8, 32, 16>>(&xq, (row0 * ${H}u + h) * ${Kp}u + k0, false, ${H * Kp}u), subgroupMatrixLoad<subgroup_matrix_right<i8, 16, 32>>(&wq, (h * ${Kp}u + k0) * ${Np}u + n0, false, ${Np}u), acc);
    }
    subgroupMatrixStore(&res, sg * 256u, acc, false, 16u);
  }`;
  // dot4 form: thread → outputs e = lid + i·256 of the workgroup's 8 tiles (tile e / 256, row and column in it).
  const dot4Products = `for (var e = lid; e < ${SUBGROUPS * 256}u; e += ${WG}u) {
    let g = e / 256u;
    let row = min(row0 + (e % 256u) / 16u, mLast);
    let n = (wid.x * ${SUBGROUPS}u + g) * 16u + e % 16u;
    var acc = 0;
    if (n < ${Np}u) {
      for (var kw = 0u; kw < ${Kp / 4}u; kw++) {
        let xw = xq[(row * ${H}u + h) * ${Kp / 4}u + kw];
        var wv = vec4<i32>(0);
        for (var i = 0u; i < 4u; i++) {
          let b = (h * ${Kp}u + 4u * kw + i) * ${Np}u + n;
          wv[i] = unpack4xI8(wq[b / 4u])[b % 4u];
        }
        acc += dot4I8Packed(xw, pack4xI8(wv));
      }
    }
    res[e] = acc;
  }`;
  return /* wgsl */ `${tensorCores ? 'enable chromium_experimental_subgroup_matrix;\ndiagnostic(off, chromium_experimental.subgroup_matrix_uniformity);\n' : ''}
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> xq: array<${tensorCores ? 'i32' : 'u32'}>;
@group(0) @binding(2) var<storage, read> xs: array<f32>;
@group(0) @binding(3) var<storage, read> wq: array<${tensorCores ? 'i32' : 'u32'}>;
@group(0) @binding(4) var<storage, read> ws: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
${spec.passCols ? '@group(0) @binding(6) var<storage, read> x: array<f32>;' : ''}
var<workgroup> res: array<i32, ${SUBGROUPS * 256}>;

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, ${tensorCores ? '@builtin(subgroup_id) sg: u32, ' : ''}@builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${META_ROWS}];
  let mLast = max(M, 1u) - 1u;
  let h = wid.y;
  let row0 = wid.z * ${ROW_TILE}u;
  ${tensorCores ? tcProducts : dot4Products}
  workgroupBarrier();
  for (var e = lid; e < ${SUBGROUPS * 256}u; e += ${WG}u) {
    let row = row0 + (e % 256u) / 16u;
    let n = (wid.x * ${SUBGROUPS}u + e / 256u) * 16u + e % 16u;
    if (row < M && n < ${N}u) {
      y[row * ${spec.yStride}u + ${spec.yOffset}u + h * ${spec.yHeadStride}u + n] = f32(res[e]) * xs[row * ${H}u + h] * ws[h * ${Np}u + n] * ${sc};
    }
  }${passThroughW8a8(spec)}
}
`;
}

/** y[row, h, N + i] = scale · x[row, h, K + i] for the workgroup's rows, by the first output group (as the f32 kernels). */
function passThroughW8a8(s: HeadMatmulSpec): string {
  const pass = s.passCols ?? 0;
  if (pass === 0) return '';
  return `
  if (wid.x == 0u) {
    for (var e = lid; e < ${ROW_TILE * pass}u; e += ${WG}u) {
      let row = row0 + e / ${pass}u;
      let i = e % ${pass}u;
      if (row < M) {
        y[row * ${s.yStride}u + ${s.yOffset}u + h * ${s.yHeadStride}u + ${s.N}u + i] = x[row * ${s.xStride}u + ${s.xOffset}u + h * ${s.xHeadStride}u + ${s.K}u + i] * ${wgslF32(s.scale)};
      }
    }
  }`;
}

/**
 * Input scratch shared by every site of a device (the sites of all layers run one after another, each quantizing its
 * inputs just before its product reads them): by label, grown to the largest request.
 */
const scratch = new WeakMap<GpuContext, Map<string, GPUBuffer>>();
function sharedScratch(gpu: GpuContext, label: string, bytes: number): GPUBuffer {
  let byLabel = scratch.get(gpu);
  if (!byLabel) scratch.set(gpu, (byLabel = new Map()));
  const have = byLabel.get(label);
  if (have && have.size >= bytes) return have;
  const b = storageBuffer(gpu, label, bytes);
  byLabel.set(label, b);
  return b;
}

/**
 * One site's W8A8 head products: the weights quantized on the GPU at construction, the inputs per step into scratch
 * sized for `maxRows` (rounded up to whole 16-row tiles, which the tensor-core loads read whole).
 */
export class HeadW8a8 {
  private readonly wq: GPUBuffer;
  private readonly ws: GPUBuffer;
  private readonly xq: GPUBuffer;
  private readonly xs: GPUBuffer;
  private readonly input: { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup };
  private readonly product: { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup };
  readonly tensorCores: boolean;

  constructor(
    gpu: GpuContext,
    readonly spec: HeadMatmulSpec,
    weight: GpuMatrix,
    b: { meta: GPUBuffer; x: GPUBuffer; y: GPUBuffer },
    readonly maxRows: number,
    tensorCores: boolean,
  ) {
    const { nHeads: H } = spec;
    const { Kp, Np } = headW8a8Dims(spec);
    this.tensorCores = tensorCores;
    const tiles = Math.ceil(maxRows / ROW_TILE) * ROW_TILE;
    this.wq = storageBuffer(gpu, `${weight.label} int8`, H * Kp * Np);
    this.ws = storageBuffer(gpu, `${weight.label} int8 scales`, 4 * H * Np);
    this.xq = sharedScratch(gpu, `mla head-matmul w8a8 inputs ${H}×${Kp}`, tiles * H * Kp);
    this.xs = sharedScratch(gpu, `mla head-matmul w8a8 input scales ${H}`, 4 * tiles * H);
    const quantize = gpu.pipeline(`mla head-matmul ${H}×[${spec.K}→${spec.N}] w8a8 weights ${weight.dtype}`, headW8a8WeightWgsl(spec, weight));
    const enc = gpu.device.createCommandEncoder({ label: `${weight.label} int8 quantization` });
    const pass = enc.beginComputePass();
    pass.setPipeline(quantize);
    pass.setBindGroup(0, bindBuffers(gpu, quantize, `${weight.label} int8 quantization`, [weight.pieces[0].buffer, this.wq, this.ws]));
    pass.dispatchWorkgroups(Math.ceil(Np / 4 / 64), H);
    pass.end();
    gpu.device.queue.submit([enc.finish()]);
    const inputPipe = gpu.pipeline(`mla head-matmul ${H}×[${spec.K}→${spec.N}] w8a8 inputs`, headW8a8InputWgsl(spec));
    this.input = { pipeline: inputPipe, bindGroup: bindBuffers(gpu, inputPipe, `${weight.label} w8a8 inputs`, [b.x, this.xq, this.xs]) };
    const productPipe = gpu.pipeline(`mla head-matmul ${H}×[${spec.K}→${spec.N}] w8a8${tensorCores ? ' tensor cores' : ' dot4'}`, headW8a8ProductWgsl(spec, tensorCores));
    this.product = { pipeline: productPipe, bindGroup: bindBuffers(gpu, productPipe, `${weight.label} w8a8`, [b.meta, this.xq, this.xs, this.wq, this.ws, b.y, ...(spec.passCols ? [b.x] : [])]) };
  }

  /** Records a step of `rows` rows (at most maxRows): the inputs' quantization, then the products. */
  encode(pass: GPUComputePassEncoder, rows: number): void {
    if (rows > this.maxRows) throw new Error(`W8A8 head products: ${rows} rows, scratch for ${this.maxRows}`);
    const { Np } = headW8a8Dims(this.spec);
    pass.setPipeline(this.input.pipeline);
    pass.setBindGroup(0, this.input.bindGroup);
    pass.dispatchWorkgroups(this.spec.nHeads, rows);
    pass.setPipeline(this.product.pipeline);
    pass.setBindGroup(0, this.product.bindGroup);
    pass.dispatchWorkgroups(Math.ceil(Np / 16 / SUBGROUPS), this.spec.nHeads, Math.ceil(rows / ROW_TILE));
  }
}

// GPU-resident tensors: f32 → f16 packing, weight matrices split at the binding limit, buffer helpers.
import type { GpuContext } from './device.ts';
import type { Tensor } from '../model/weights.ts';

export type WeightDtype = 'f32' | 'f16';

/** Rounds up to a multiple of 8 values: row strides of weights and activations (vec4 loads, f16 pairs). */
export function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** IEEE half bits of a float, rounded to nearest even (overflow → ±Inf, NaN kept). */
export function f32ToF16Bits(value: number): number {
  f32Scratch[0] = value;
  const x = u32Scratch[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && (half & 1))) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++;
  return sign | half;
}

/** Float value of IEEE half bits. */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** Rounds every value through f16 (what a kernel reading f16-packed data sees). */
export function roundToF16(data: ArrayLike<number>): Float32Array {
  const out = new Float32Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = f16BitsToF32(f32ToF16Bits(data[i]));
  return out;
}

/**
 * A weight matrix [rows, cols] on the GPU, row-major with the row stride padded to `stride` values
 * (zeros in the padding). f16 stores two values per u32 (element 2i in the low half, as unpack2x16float reads).
 * Split by rows into pieces so each fits one storage binding.
 */
export interface GpuMatrix {
  label: string;
  rows: number;
  cols: number;
  dtype: WeightDtype;
  /** Row stride in values (multiple of 8). */
  stride: number;
  pieces: Array<{ buffer: GPUBuffer; rowStart: number; rows: number }>;
  bytes: number;
}

export function bytesPerValue(dtype: WeightDtype): number {
  return dtype === 'f16' ? 2 : 4;
}

/** Rows of a [rows, cols] matrix that fit one binding of `maxBinding` bytes. */
function rowsPerPiece(cols: number, dtype: WeightDtype, maxBinding: number, label: string): number {
  const rowBytes = pad8(cols) * bytesPerValue(dtype);
  const n = Math.floor(maxBinding / rowBytes);
  if (n < 1) {
    throw new Error(
      `${label}: one row of ${cols} ${dtype} values (${rowBytes} B) exceeds this GPU's storage binding limit of ${maxBinding} B`,
    );
  }
  return n;
}

/** Packs rows [r0, r0+n) of a row-major [rows, cols] f32 array into the GPU layout of GpuMatrix. */
export function packMatrixRows(data: Float32Array, cols: number, r0: number, n: number, dtype: WeightDtype): Uint32Array | Float32Array {
  const stride = pad8(cols);
  if (dtype === 'f32') {
    const out = new Float32Array(n * stride);
    for (let r = 0; r < n; r++) out.set(data.subarray((r0 + r) * cols, (r0 + r + 1) * cols), r * stride);
    return out;
  }
  const out = new Uint32Array((n * stride) / 2);
  for (let r = 0; r < n; r++) {
    const src = (r0 + r) * cols;
    const dst = (r * stride) / 2;
    for (let c = 0; c < cols; c += 2) {
      const lo = f32ToF16Bits(data[src + c]);
      const hi = c + 1 < cols ? f32ToF16Bits(data[src + c + 1]) : 0;
      out[dst + c / 2] = (lo | (hi << 16)) >>> 0;
    }
  }
  return out;
}

/** Uploads a [rows, cols] matrix (row-major f32) as f32 or packed f16, split at the binding limit. */
export function uploadMatrix(
  gpu: GpuContext,
  label: string,
  data: Float32Array,
  rows: number,
  cols: number,
  dtype: WeightDtype,
  maxBinding = gpu.limits.maxStorageBufferBindingSize,
): GpuMatrix {
  if (data.length !== rows * cols) throw new Error(`${label}: ${data.length} values, shape [${rows}, ${cols}] needs ${rows * cols}`);
  const per = rowsPerPiece(cols, dtype, maxBinding, label);
  const stride = pad8(cols);
  const pieces: GpuMatrix['pieces'] = [];
  let bytes = 0;
  for (let r0 = 0; r0 < rows; r0 += per) {
    const n = Math.min(per, rows - r0);
    const packed = packMatrixRows(data, cols, r0, n, dtype);
    const buffer = gpu.device.createBuffer({
      label: `${label}[${r0}..${r0 + n})`,
      size: packed.byteLength,
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST,
    });
    gpu.device.queue.writeBuffer(buffer, 0, packed.buffer, packed.byteOffset, packed.byteLength);
    pieces.push({ buffer, rowStart: r0, rows: n });
    bytes += packed.byteLength;
  }
  return { label, rows, cols, dtype, stride, pieces, bytes };
}

/**
 * Uploads matrices stacked by rows into one GpuMatrix [Σ rows, cols] (fused projections such as q|k|v or gate|up);
 * `rows` is the total the caller expects. With dtype f16 and every part carrying packed f16 words (Tensor.f16), those
 * words go up as they are, piece by piece, without touching `data` (which may be a lazy getter); otherwise the f32
 * data is stacked and packed as uploadMatrix does.
 */
export function uploadWeight(
  gpu: GpuContext,
  label: string,
  parts: Tensor[],
  rows: number,
  cols: number,
  dtype: WeightDtype,
  maxBinding = gpu.limits.maxStorageBufferBindingSize,
): GpuMatrix {
  let total = 0;
  parts.forEach((t, i) => {
    if (t.shape.length !== 2 || t.shape[1] !== cols) throw new Error(`${label}: part ${i} has shape [${t.shape}], [rows, ${cols}] expected`);
    total += t.shape[0];
  });
  if (total !== rows) throw new Error(`${label}: parts hold ${total} rows, ${rows} expected`);
  if (dtype !== 'f16' || !parts.every((t) => t.f16)) {
    if (parts.length === 1) return uploadMatrix(gpu, label, parts[0].data, rows, cols, dtype, maxBinding);
    const data = new Float32Array(rows * cols);
    let off = 0;
    for (const t of parts) {
      if (t.data.length !== t.shape[0] * cols) throw new Error(`${label}: a part of shape [${t.shape}] has ${t.data.length} values`);
      data.set(t.data, off);
      off += t.data.length;
    }
    return uploadMatrix(gpu, label, data, rows, cols, dtype, maxBinding);
  }
  const stride = pad8(cols);
  const rowWords = stride / 2;
  parts.forEach((t, i) => {
    if (t.f16!.length !== t.shape[0] * rowWords) {
      throw new Error(`${label}: part ${i} has ${t.f16!.length} packed f16 words, [${t.shape}] padded to rows of ${stride} values needs ${t.shape[0] * rowWords}`);
    }
  });
  const per = rowsPerPiece(cols, dtype, maxBinding, label);
  const pieces: GpuMatrix['pieces'] = [];
  for (let r0 = 0; r0 < rows; r0 += per) {
    const n = Math.min(per, rows - r0);
    const buffer = gpu.device.createBuffer({ label: `${label}[${r0}..${r0 + n})`, size: n * rowWords * 4, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST });
    // Copy the rows of every part that falls into this piece.
    let partStart = 0;
    for (const t of parts) {
      const partEnd = partStart + t.shape[0];
      const from = Math.max(r0, partStart);
      const to = Math.min(r0 + n, partEnd);
      if (from < to) {
        const src = t.f16!.subarray((from - partStart) * rowWords, (to - partStart) * rowWords);
        gpu.device.queue.writeBuffer(buffer, (from - r0) * rowWords * 4, src.buffer, src.byteOffset, src.byteLength);
      }
      partStart = partEnd;
    }
    pieces.push({ buffer, rowStart: r0, rows: n });
  }
  // Hand the staged copies to the GPU now: a 7B model is ~15 GB of them, better not held until the first real submit.
  gpu.device.queue.submit([]);
  return { label, rows, cols, dtype, stride, pieces, bytes: rows * rowWords * 4 };
}

export function uploadTensor(gpu: GpuContext, label: string, t: Tensor, dtype: WeightDtype): GpuMatrix {
  if (t.shape.length !== 2) throw new Error(`${label}: expected a matrix, got shape [${t.shape}]`);
  return uploadMatrix(gpu, label, t.data, t.shape[0], t.shape[1], dtype);
}

export function destroyMatrix(m: GpuMatrix): void {
  for (const p of m.pieces) p.buffer.destroy();
}

/** A storage buffer (copy source and destination), sized at least 16 bytes. */
export function storageBuffer(gpu: GpuContext, label: string, bytes: number, extraUsage = 0): GPUBuffer {
  const size = Math.max(16, Math.ceil(bytes / 4) * 4);
  const max = gpu.limits.maxBufferSize;
  if (size > max) throw new Error(`${label}: ${size} B exceeds this GPU's max buffer size of ${max} B`);
  return gpu.device.createBuffer({
    label,
    size,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC | extraUsage,
  });
}

/** A storage buffer holding the given values. */
export function uploadArray(gpu: GpuContext, label: string, data: Float32Array | Uint32Array): GPUBuffer {
  const buf = storageBuffer(gpu, label, data.byteLength);
  gpu.device.queue.writeBuffer(buf, 0, data.buffer, data.byteOffset, data.byteLength);
  return buf;
}

/** Copies `bytes` from a GPU buffer into host memory (one submit + map). */
export async function readBuffer(gpu: GpuContext, src: GPUBuffer, bytes: number, offset = 0): Promise<ArrayBuffer> {
  const size = Math.ceil(bytes / 4) * 4;
  const staging = gpu.device.createBuffer({ label: 'readback', size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const enc = gpu.device.createCommandEncoder();
  enc.copyBufferToBuffer(src, offset, staging, 0, size);
  gpu.device.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const out = staging.getMappedRange().slice(0, bytes);
  staging.unmap();
  staging.destroy();
  gpu.checkErrors();
  return out;
}

export async function readF32(gpu: GpuContext, src: GPUBuffer, count: number, offset = 0): Promise<Float32Array> {
  return new Float32Array(await readBuffer(gpu, src, count * 4, offset));
}

/** Fills a buffer with NaN so that elements a kernel fails to write show up in comparisons. */
export function poisonBuffer(gpu: GpuContext, buf: GPUBuffer): void {
  const data = new Float32Array(buf.size / 4).fill(NaN);
  gpu.device.queue.writeBuffer(buf, 0, data);
}

/** Dispatch sizes for `workgroups` workgroups when one dimension holds at most 65535: [x, y]. */
export function gridFor(gpu: GpuContext, workgroups: number): [number, number] {
  const maxX = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (workgroups <= maxX) return [Math.max(1, workgroups), 1];
  const y = Math.ceil(workgroups / maxX);
  return [Math.ceil(workgroups / y), y];
}

/** Binds buffers (whole) at bindings 0..n-1 of group 0 of a pipeline with an 'auto' layout. */
export function bindBuffers(gpu: GpuContext, pipeline: GPUComputePipeline, label: string, buffers: GPUBuffer[]): GPUBindGroup {
  return gpu.device.createBindGroup({
    label,
    layout: pipeline.getBindGroupLayout(0),
    entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } })),
  });
}

/** Formats a float for WGSL source (always with a decimal point or exponent). */
export function wgslF32(v: number): string {
  if (!Number.isFinite(v)) throw new Error(`cannot write ${v} as a WGSL f32 literal`);
  const s = Math.fround(v).toPrecision(9);
  return /[.eE]/.test(s) ? s : s + '.0';
}

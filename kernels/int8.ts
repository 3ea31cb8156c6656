// Int8 weights with one scale per output channel: symmetric quantization at load, packing four per u32, GPU upload.
import type { GpuContext } from './device.ts';

/** Rounds up to a multiple of 16: int8 weight rows are allocated in 16-row groups (one subgroup-matrix tile). */
export function pad16(n: number): number {
  return Math.ceil(n / 16) * 16;
}

/** Rounds up to a multiple of 32 values: int8 row strides (one subgroup-matrix K step of 32; two vec4<u32> loads). */
export function pad32(n: number): number {
  return Math.ceil(n / 32) * 32;
}

/**
 * A [rows, cols] matrix quantized per row (output channel): w[r, c] ≈ q[r, c] · scales[r], q in [-127, 127].
 * `packed` holds rows of `stride / 4` u32 words; value c of a row sits in byte c % 4 of word c / 4 (low byte first,
 * the order WGSL's unpack4xI8 and dot4I8Packed read); the padding up to `stride` is zero.
 */
export interface Int8Rows {
  rows: number;
  cols: number;
  /** Row stride in values (a multiple of 32). */
  stride: number;
  packed: Uint32Array;
  /** Per-row scale max|w_row| / 127 (rounded to f32, the value the GPU multiplies by); 0 for an all-zero row. */
  scales: Float32Array;
}

/**
 * Symmetric int8 quantization per row: scale = max|w_row| / 127, q = round(w / scale).
 * Every value comes back within scale / 2 of the original (|w / scale| ≤ 127 up to f32 rounding of the scale).
 */
export function quantizeInt8Rows(data: ArrayLike<number>, rows: number, cols: number, label = 'matrix'): Int8Rows {
  if (data.length !== rows * cols) throw new Error(`${label}: ${data.length} values, shape [${rows}, ${cols}] needs ${rows * cols}`);
  const stride = pad32(cols);
  const words = stride / 4;
  // Rows up to a multiple of 16 (zero): a subgroup-matrix tile loads 16 weight rows at once.
  const packed = new Uint32Array(pad16(rows) * words);
  const scales = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    let absMax = 0;
    for (let c = 0; c < cols; c++) {
      const v = data[base + c];
      if (!Number.isFinite(v)) {
        throw new Error(`${label}: value at [${r}, ${c}] is ${v}; int8 quantization needs finite weights (load this model with --weight-dtype f32 or f16)`);
      }
      absMax = Math.max(absMax, Math.abs(v));
    }
    const scale = Math.fround(absMax / 127);
    scales[r] = scale;
    if (scale === 0) continue;
    const wb = r * words;
    for (let c = 0; c < cols; c++) {
      const q = Math.max(-127, Math.min(127, Math.round(data[base + c] / scale)));
      packed[wb + (c >> 2)] |= (q & 0xff) << (8 * (c & 3));
    }
  }
  return { rows, cols, stride, packed, scales };
}

/** The signed int8 value c of row r. */
export function int8At(q: Int8Rows, r: number, c: number): number {
  const byte = (q.packed[r * (q.stride / 4) + (c >> 2)] >>> (8 * (c & 3))) & 0xff;
  return byte >= 128 ? byte - 256 : byte;
}

/** The values the GPU computes with: q · scale per element, row-major [rows, cols] (float64). */
export function dequantizeInt8Rows(q: Int8Rows): Float64Array {
  const out = new Float64Array(q.rows * q.cols);
  for (let r = 0; r < q.rows; r++) {
    for (let c = 0; c < q.cols; c++) out[r * q.cols + c] = int8At(q, r, c) * q.scales[r];
  }
  return out;
}

/** u32 words in one 16-row × 32-value tile of the GPU layout. */
export const INT8_TILE_WORDS = 128;

/**
 * The GPU layout of an int8 matrix: 16-row × 32-value tiles of 512 contiguous bytes, K-major: tile (rowTile, kStep)
 * at word (kStep · rowTiles + rowTile) · 128, inside it row r's 32 values at word r · 8. A subgroup-matrix load of one
 * tile reads 512 contiguous bytes: measured on the H200 (`node --import tsx bench/probe-rates.ts`), such loads stream
 * at 2.2–2.6 TB/s, the same tiles read from plain rows (16 pieces of 32 bytes, 4 KB apart) at 0.8 TB/s. K-major keeps
 * the GPU's concurrent reads in one window (every column tile advances through K together) instead of one stream
 * per column tile spread over the whole matrix.
 */
export function tileInt8Rows(q: Pick<Int8Rows, 'rows' | 'stride' | 'packed'>): Uint32Array {
  const words = q.stride / 4;
  const steps = q.stride / 32;
  const rowTiles = Math.ceil(q.rows / 16);
  const out = new Uint32Array(rowTiles * 16 * words);
  for (let r = 0; r < q.rows; r++) {
    const src = r * words;
    const tileBase = Math.floor(r / 16) * INT8_TILE_WORDS + (r % 16) * 8;
    for (let s = 0; s < steps; s++) {
      const d = tileBase + s * rowTiles * INT8_TILE_WORDS;
      const o = src + 8 * s;
      for (let i = 0; i < 8; i++) out[d + i] = q.packed[o + i];
    }
  }
  return out;
}

/** Word index of (row, word w of the row) in the tiled layout of tileInt8Rows for a matrix of `rows` rows. */
export function tiledInt8Word(rows: number, row: number, w: number): number {
  return (Math.floor(w / 8) * Math.ceil(rows / 16) + Math.floor(row / 16)) * INT8_TILE_WORDS + (row % 16) * 8 + (w % 8);
}

/** An int8 weight matrix on the GPU: values in the tiled layout of tileInt8Rows, and the per-row scales (f32). */
export interface GpuInt8Matrix {
  label: string;
  rows: number;
  cols: number;
  dtype: 'int8';
  /** Row stride in values (a multiple of 32): stride / 32 tiles along K; the buffer holds pad16(rows) rows, the extra ones zero. */
  stride: number;
  buffer: GPUBuffer;
  scales: GPUBuffer;
  /** Bytes of the packed values (the scales add 4 per row). */
  bytes: number;
}

/** Quantizes a row-major [rows, cols] f32 matrix per row and uploads values and scales. */
export function uploadInt8Matrix(gpu: GpuContext, label: string, data: ArrayLike<number>, rows: number, cols: number): GpuInt8Matrix {
  const q = quantizeInt8Rows(data, rows, cols, label);
  return uploadQuantizedInt8(gpu, label, q);
}

/** Uploads an already quantized matrix (row-major packed) in the tiled GPU layout. */
export function uploadQuantizedInt8(gpu: GpuContext, label: string, q: Int8Rows): GpuInt8Matrix {
  const { rows, cols } = q;
  const maxBinding = gpu.limits.maxStorageBufferBindingSize;
  if (q.packed.byteLength > maxBinding) {
    // Unlike f32/f16 weights, int8 matrices are not split into pieces yet; a quarter of the f32 bytes rarely reaches the limit.
    throw new Error(`${label}: ${q.packed.byteLength} B of int8 weights exceed this GPU's storage binding limit of ${maxBinding} B; use --weight-dtype f16 for this model`);
  }
  // COPY_SRC: tests read the uploaded layout back.
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
  const tiled = tileInt8Rows(q);
  const buffer = gpu.device.createBuffer({ label: `${label} int8`, size: Math.max(16, tiled.byteLength), usage });
  gpu.device.queue.writeBuffer(buffer, 0, tiled.buffer, tiled.byteOffset, tiled.byteLength);
  const scales = gpu.device.createBuffer({ label: `${label} scales`, size: Math.max(16, Math.ceil(rows / 4) * 16), usage });
  gpu.device.queue.writeBuffer(scales, 0, q.scales.buffer, q.scales.byteOffset, q.scales.byteLength);
  return { label, rows, cols, dtype: 'int8', stride: q.stride, buffer, scales, bytes: q.packed.byteLength };
}

export function destroyInt8Matrix(m: GpuInt8Matrix): void {
  m.buffer.destroy();
  m.scales.destroy();
}

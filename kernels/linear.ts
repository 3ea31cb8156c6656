// Projection weights in any of the matmul dtypes (f32, packed f16, int8 per channel): one upload, op and destroy for all.
import type { GpuContext } from './device.ts';
import { destroyInt8Matrix, pad16, quantizeInt8Rows, uploadQuantizedInt8, type GpuInt8Matrix, type Int8Rows } from './int8.ts';
import { MatmulOp, type MatmulBindings, type MatmulTuning } from './matmul.ts';
import { Int8MatmulOp } from './matmul-int8.ts';
import { destroyMatrix, uploadWeight, type GpuMatrix, type WeightDtype } from './tensors.ts';
import type { Tensor } from '../model/weights.ts';

/** Dtypes of projection (matmul) weights: int8 applies only to these, embeddings and MLA head matrices stay f16/f32. */
export type LinearDtype = WeightDtype | 'int8';

export type LinearWeight = GpuMatrix | GpuInt8Matrix;

/** Anything that encodes `y (+)= x Wᵀ` for a number of rows. */
export interface LinearOp {
  encode(pass: GPUComputePassEncoder, rows: number): void;
}

/** The dtype the non-projection weights (embedding gather, MLA head matrices) use alongside `dtype`. */
export function denseDtypeFor(dtype: LinearDtype): WeightDtype {
  return dtype === 'int8' ? 'f16' : dtype;
}

/**
 * uploadWeight for f32/f16; for int8, quantizes each part per output row (kernels/int8.ts) and stacks the rows: per-row
 * quantization of the stacked matrix gives the same values and scales, and a `shared` part (synthetic models reuse one
 * layer's tensors in every layer) is quantized once.
 */
export function uploadLinear(gpu: GpuContext, label: string, parts: Tensor[], rows: number, cols: number, dtype: LinearDtype): LinearWeight {
  if (dtype !== 'int8') return uploadWeight(gpu, label, parts, rows, cols, dtype);
  let total = 0;
  parts.forEach((t, i) => {
    if (t.shape.length !== 2 || t.shape[1] !== cols) throw new Error(`${label}: part ${i} has shape [${t.shape}], [rows, ${cols}] expected`);
    total += t.shape[0];
  });
  if (total !== rows) throw new Error(`${label}: parts hold ${total} rows, ${rows} expected`);
  const quantized = parts.map((t) => quantizedPart(t, label));
  if (quantized.length === 1) return uploadQuantizedInt8(gpu, label, quantized[0]);
  const { stride } = quantized[0];
  const words = stride / 4;
  const packed = new Uint32Array(pad16(rows) * words);
  const scales = new Float32Array(rows);
  let row = 0;
  for (const q of quantized) {
    packed.set(q.packed.subarray(0, q.rows * words), row * words);
    scales.set(q.scales, row);
    row += q.rows;
  }
  return uploadQuantizedInt8(gpu, label, { rows, cols, stride, packed, scales });
}

/** Int8 quantizations of `shared` tensors, for as long as the tensor lives. */
const sharedQuantized = new WeakMap<Tensor, Int8Rows>();

/** A part's per-row int8 quantization; kept beside the tensor only when it is marked `shared`. */
export function quantizedPart(t: Tensor, label: string): Int8Rows {
  const kept = t.shared ? sharedQuantized.get(t) : undefined;
  if (kept) return kept;
  const q = quantizeInt8Rows(t.data, t.shape[0], t.shape[1], label);
  if (t.shared) sharedQuantized.set(t, q);
  return q;
}

/** The matmul op for a weight of any dtype (`tuning` applies to the f32/f16 kernels). */
export function linearOp(gpu: GpuContext, w: LinearWeight, b: MatmulBindings, tuning?: Partial<MatmulTuning>): LinearOp {
  return w.dtype === 'int8' ? new Int8MatmulOp(gpu, w, b) : new MatmulOp(gpu, w, b, tuning);
}

export function destroyLinear(w: LinearWeight): void {
  if (w.dtype === 'int8') destroyInt8Matrix(w);
  else destroyMatrix(w);
}

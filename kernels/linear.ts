// Projection weights in any of the matmul dtypes (f32, packed f16, int8 per channel): one upload, op and destroy for all.
import type { GpuContext } from './device.ts';
import { destroyInt8Matrix, uploadInt8Matrix, type GpuInt8Matrix } from './int8.ts';
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

/** uploadWeight for f32/f16; for int8, stacks the parts' f32 values and quantizes each output row (kernels/int8.ts). */
export function uploadLinear(gpu: GpuContext, label: string, parts: Tensor[], rows: number, cols: number, dtype: LinearDtype): LinearWeight {
  if (dtype !== 'int8') return uploadWeight(gpu, label, parts, rows, cols, dtype);
  let total = 0;
  parts.forEach((t, i) => {
    if (t.shape.length !== 2 || t.shape[1] !== cols) throw new Error(`${label}: part ${i} has shape [${t.shape}], [rows, ${cols}] expected`);
    total += t.shape[0];
  });
  if (total !== rows) throw new Error(`${label}: parts hold ${total} rows, ${rows} expected`);
  let data: Float32Array;
  if (parts.length === 1) data = parts[0].data;
  else {
    data = new Float32Array(rows * cols);
    let off = 0;
    for (const t of parts) {
      data.set(t.data, off);
      off += t.data.length;
    }
  }
  return uploadInt8Matrix(gpu, label, data, rows, cols);
}

/** The matmul op for a weight of any dtype (`tuning` applies to the f32/f16 kernels). */
export function linearOp(gpu: GpuContext, w: LinearWeight, b: MatmulBindings, tuning?: Partial<MatmulTuning>): LinearOp {
  return w.dtype === 'int8' ? new Int8MatmulOp(gpu, w, b) : new MatmulOp(gpu, w, b, tuning);
}

export function destroyLinear(w: LinearWeight): void {
  if (w.dtype === 'int8') destroyInt8Matrix(w);
  else destroyMatrix(w);
}

// Shared pieces of the kernel tests: one GPU per test file, seeded random inputs and the relative-error measure.
import { after } from 'node:test';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';

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

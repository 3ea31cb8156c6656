// Timing one compute pass on the GPU (timestamp queries when the adapter has them, else wall clock) and reading results back.
import type { GpuContext } from '../kernels/device.ts';

/** Runs one compute pass recorded by `encode`; ns from timestamps (GPU time) or the wall clock around submit → map; throws GPU errors. */
export async function timeGpuPass(gpu: GpuContext, encode: (pass: GPUComputePassEncoder) => void): Promise<{ ns: number; wallNs: number; timestamps: boolean }> {
  const dev = gpu.device;
  const hasTs = gpu.features.has('timestamp-query');
  const qs = hasTs ? dev.createQuerySet({ type: 'timestamp', count: 2 }) : undefined;
  const resolve = dev.createBuffer({ size: 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
  const read = dev.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const enc = dev.createCommandEncoder();
  const pass = enc.beginComputePass(qs ? { timestampWrites: { querySet: qs, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 } } : {});
  encode(pass);
  pass.end();
  if (qs) {
    enc.resolveQuerySet(qs, 0, 2, resolve, 0);
    enc.copyBufferToBuffer(resolve, 0, read, 0, 16);
  }
  const t0 = performance.now();
  dev.queue.submit([enc.finish()]);
  let tsNs: number | null = null;
  if (qs) {
    await read.mapAsync(GPUMapMode.READ);
    const t = new BigUint64Array(read.getMappedRange().slice(0));
    read.unmap();
    const wall = (performance.now() - t0) * 1e6;
    // A timestamp span longer than the wall clock around it is a broken counter: fall back to the wall clock.
    if (t[1] > t[0] && Number(t[1] - t[0]) < wall * 1.5) tsNs = Number(t[1] - t[0]);
  } else {
    await dev.queue.onSubmittedWorkDone();
  }
  const wallNs = (performance.now() - t0) * 1e6;
  qs?.destroy();
  resolve.destroy();
  read.destroy();
  gpu.checkErrors();
  return { ns: tsNs ?? wallNs, wallNs, timestamps: tsNs !== null };
}

/** Keeps the GPU busy for `ms` so its clocks leave the idle state (the H200 idles at 345 MHz between passes). */
export async function spinUpGpu(gpu: GpuContext, encode: (pass: GPUComputePassEncoder) => void, ms = 60): Promise<void> {
  const t0 = performance.now();
  do await timeGpuPass(gpu, encode);
  while (performance.now() - t0 < ms);
}

/** Copies `bytes` of a storage buffer to the host. */
export async function readBack(gpu: GpuContext, src: GPUBuffer, bytes: number): Promise<ArrayBuffer> {
  const staging = gpu.device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const enc = gpu.device.createCommandEncoder();
  enc.copyBufferToBuffer(src, 0, staging, 0, bytes);
  gpu.device.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const out = staging.getMappedRange().slice(0);
  staging.unmap();
  staging.destroy();
  return out;
}

export async function readBackF32(gpu: GpuContext, src: GPUBuffer, count: number): Promise<Float32Array> {
  return new Float32Array(await readBack(gpu, src, count * 4));
}

// The GPU device opens (hardware or SwiftShader), reports its adapter, and turns WGSL errors into thrown errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { openGpu, releaseGpu } from '../kernels/device.ts';

test('device opens and a bad WGSL shader throws with its label', async () => {
  const gpu = await openGpu({ log: () => {} });
  try {
    assert.ok(gpu.adapterName.length > 0);
    assert.ok(gpu.limits.maxStorageBufferBindingSize >= 128 * 1024 * 1024);
    gpu.pipeline('broken-kernel', '@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }');
    await gpu.device.queue.onSubmittedWorkDone();
    await new Promise((r) => setTimeout(r, 50));
    assert.throws(() => gpu.checkErrors(), /broken-kernel/);
  } finally {
    gpu.destroy();
    releaseGpu();
  }
});

// Writes each step row's new KV values into its slot of the paged cache, through the sequence's block table.
import type { GpuContext } from './device.ts';
import { cacheRowWgsl, metaWgsl } from './step-meta.ts';
import { bindBuffers, gridFor } from './tensors.ts';

/** What the writer needs of a cache layout (cache/kv-layout.ts KvLayout has these). */
export interface PagedRows {
  rowValues: number;
  blockSize: number;
  dtype: 'f16' | 'f32';
}

const WG = 64;

/**
 * cache[row of (seq(r), pos(r))] = src[r, srcOffset .. srcOffset + rowValues) for every row r of the step;
 * f16 caches store value pairs packed in u32. One bind group per layer buffer.
 */
export class KvWrite {
  private pipeline: GPUComputePipeline;
  private groups: GPUBindGroup[];
  private pairs: number;

  constructor(
    private gpu: GpuContext,
    layout: PagedRows,
    b: { meta: GPUBuffer; src: GPUBuffer; srcStride: number; srcOffset: number; layerCaches: GPUBuffer[] },
  ) {
    if (layout.rowValues % 2 !== 0) throw new Error(`KV rows are written in pairs; ${layout.rowValues} values per row is odd`);
    this.pairs = layout.rowValues / 2;
    const f16 = layout.dtype === 'f16';
    const code = /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<${f16 ? 'u32' : 'f32'}>;
${cacheRowWgsl(layout.blockSize)}
@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = (wid.x + wid.y * nwg.x) * ${WG}u + lid;
  let r = id / ${this.pairs}u;
  let p = id % ${this.pairs}u;
  if (r >= metaRows()) { return; }
  let slot = cacheRow(seqBlockTable(rowSeq(r)), rowPos(r));
  let s = r * ${b.srcStride}u + ${b.srcOffset}u + 2u * p;
  let v = vec2<f32>(src[s], src[s + 1u]);
  ${
    f16
      ? `cache[slot * ${this.pairs}u + p] = pack2x16float(v);`
      : `cache[slot * ${layout.rowValues}u + 2u * p] = v.x;
  cache[slot * ${layout.rowValues}u + 2u * p + 1u] = v.y;`
  }
}`;
    this.pipeline = gpu.pipeline(`kv-write ${layout.dtype}`, code);
    this.groups = b.layerCaches.map((cache, l) => bindBuffers(gpu, this.pipeline, `kv-write layer ${l}`, [b.meta, b.src, cache]));
  }

  encode(pass: GPUComputePassEncoder, layer: number, rows: number): void {
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, this.groups[layer]);
    const [x, y] = gridFor(this.gpu, Math.ceil((rows * this.pairs) / WG));
    pass.dispatchWorkgroups(x, y);
  }
}

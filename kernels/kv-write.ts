// Writes each step row's new KV values into its slot of the paged cache, through the sequence's block table.
import type { GpuContext } from './device.ts';
import type { Int8RowFormat } from './kv-int8.ts';
import type { MlaInt8RowFormat } from './mla-kv-int8.ts';
import { cacheRowWgsl, metaWgsl } from './step-meta.ts';
import { bindBuffers, gridFor } from './tensors.ts';

/** What the writer needs of a cache layout (cache/kv-layout.ts KvLayout has these). */
export interface PagedRows {
  rowValues: number;
  blockSize: number;
  dtype: 'f16' | 'f32' | 'int8';
  /** Where an int8 row keeps its values and scales (required when dtype is 'int8'). */
  int8?: Int8RowFormat;
  /** An int8 MLA latent row's format where it is not the packed default (mlaInt8RowFormat's rowAlignBytes). */
  mlaInt8?: MlaInt8RowFormat;
}

const WG = 64;

/**
 * The int8 write: one workgroup per (step row, group); the group's absmax comes from an atomicMax over the values'
 * |x| bit patterns (for non-negative floats the u32 order is the float order, and NaN/Inf bits sort above every finite
 * value, so no NaN-unsafe float max is needed); a non-finite group stores a NaN scale and zero values.
 */
function int8WriteWgsl(f: Int8RowFormat, blockSize: number, srcStride: number, srcOffset: number, wg: number): string {
  const words = f.groupValues / 4;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<u32>;
${cacheRowWgsl(blockSize)}
var<workgroup> absMaxBits: atomic<u32>;

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = wid.x + wid.y * nwg.x;
  let r = id / ${f.groups}u;
  let grp = id % ${f.groups}u;
  // r is the same for the whole workgroup: an early return keeps the barriers uniform.
  if (r >= metaRows()) { return; }
  if (lid == 0u) { atomicStore(&absMaxBits, 0u); }
  workgroupBarrier();
  let s = r * ${srcStride}u + ${srcOffset}u + grp * ${f.groupValues}u;
  var m = 0u;
  for (var w = lid; w < ${words}u; w += ${wg}u) {
    for (var i = 0u; i < 4u; i++) { m = max(m, bitcast<u32>(src[s + 4u * w + i]) & 0x7fffffffu); }
  }
  atomicMax(&absMaxBits, m);
  let bits = workgroupUniformLoad(&absMaxBits);
  let finite = bits < 0x7f800000u;
  // A quiet NaN built from the runtime bits (a constant NaN is not a valid WGSL f32 expression).
  let scale = select(bitcast<f32>(bits | 0x7fc00000u), bitcast<f32>(bits) / 127.0, finite);
  let slot = cacheRow(seqBlockTable(rowSeq(r)), rowPos(r));
  let row = slot * ${f.rowWords}u;
  for (var w = lid; w < ${words}u; w += ${wg}u) {
    var packed = 0u;
    if (finite && bits != 0u) {
      let x = vec4<f32>(src[s + 4u * w], src[s + 4u * w + 1u], src[s + 4u * w + 2u], src[s + 4u * w + 3u]);
      packed = pack4xI8(vec4<i32>(clamp(round(x / scale), vec4<f32>(-127.0), vec4<f32>(127.0))));
    }
    cache[row + grp * ${words}u + w] = packed;
  }
  if (lid == 0u) { cache[row + ${f.scaleWord}u + grp] = bitcast<u32>(scale); }
}`;
}

/**
 * cache[row of (seq(r), pos(r))] = src[r, srcOffset .. srcOffset + rowValues) for every row r of the step;
 * f16 caches store value pairs packed in u32; int8 caches quantize each group of the row (kernels/kv-int8.ts).
 * One bind group per layer buffer.
 */
export class KvWrite {
  private pipeline: GPUComputePipeline;
  private groups: GPUBindGroup[];
  private pairs: number;
  /** int8: workgroups per step row (one per group); 0 for f16/f32. */
  private int8Groups = 0;

  constructor(
    private gpu: GpuContext,
    layout: PagedRows,
    b: { meta: GPUBuffer; src: GPUBuffer; srcStride: number; srcOffset: number; layerCaches: GPUBuffer[] },
  ) {
    if (layout.rowValues % 2 !== 0) throw new Error(`KV rows are written in pairs; ${layout.rowValues} values per row is odd`);
    this.pairs = layout.rowValues / 2;
    if (layout.dtype === 'int8') {
      const f = layout.int8;
      if (!f) {
        throw new Error(
          `an int8 KV cache needs a layout with an int8 row format (values and scales); this ${layout.rowValues}-value layout has none, ` +
            'so this attention type has no int8 cache yet: use --kv-cache-dtype f16 or f32',
        );
      }
      if (f.groups * f.groupValues !== layout.rowValues) {
        throw new Error(`int8 row format covers ${f.groups} × ${f.groupValues} values; the row has ${layout.rowValues}`);
      }
      this.int8Groups = f.groups;
      let wg = 1;
      while (wg < Math.min(64, f.groupValues / 4)) wg *= 2;
      this.pipeline = gpu.pipeline(`kv-write int8 ${f.groups}x${f.groupValues}`, int8WriteWgsl(f, layout.blockSize, b.srcStride, b.srcOffset, wg));
      this.groups = b.layerCaches.map((cache, l) => bindBuffers(gpu, this.pipeline, `kv-write layer ${l}`, [b.meta, b.src, cache]));
      return;
    }
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
    const [x, y] = gridFor(this.gpu, this.int8Groups ? rows * this.int8Groups : Math.ceil((rows * this.pairs) / WG));
    pass.dispatchWorkgroups(x, y);
  }
}

// Paged causal GQA attention, split-K (flash-decoding): partial softmax per (row, kv head, context chunk), then a merge.
//
// Every row of a step (a prefill chunk's tokens or a decode token) attends to its own sequence's cache at
// positions 0..pos (its K/V were written by kv-write earlier in the same pass), which makes prefill chunks causal
// over the cached prefix plus themselves. One workgroup takes (row, kv head, chunk of `chunkSize` tokens) with the
// g query heads of that kv head together, so each K/V row it reads serves g heads; scores stay in workgroup memory.
// The merge rescales the chunks' partial sums by their maxima (online softmax across chunks).
import type { GpuContext } from './device.ts';
import type { PagedRows } from './kv-write.ts';
import { cacheRowWgsl, metaWgsl, META_CHUNK, META_MAX_CHUNKS } from './step-meta.ts';
import { bindBuffers, storageBuffer, wgslF32 } from './tensors.ts';

export interface GqaShape {
  nHeads: number;
  nKvHeads: number;
  headDim: number;
}

const WG = 128;
const MERGE_WG = 64;
const NEG_BIG = '-3.0e38';

/** Largest chunk whose scores (g heads × chunk) fit ~16 KiB of workgroup memory; a power of two in [16, 512]. */
export function maxAttentionChunk(shape: GqaShape): number {
  const g = shape.nHeads / shape.nKvHeads;
  let c = 512;
  while (c > 16 && g * c * 4 > 16384) c /= 2;
  return c;
}

function partialWgsl(s: GqaShape, layout: PagedRows, qkvStride: number, chunkMax: number): string {
  const G = s.nHeads / s.nKvHeads;
  const D = s.headDim;
  const RV = layout.rowValues;
  const f16 = layout.dtype === 'f16';
  const gs = [...Array(G).keys()];
  const loadPair = (base: string, d2: string) =>
    f16 ? `unpack2x16float(cache[(${base}) / 2u + ${d2}])` : `vec2<f32>(cache[${base} + 2u * ${d2}], cache[${base} + 2u * ${d2} + 1u])`;
  const tree = (op: (a: string, b: string) => string) => `
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) {
      ${gs.map((g) => `red[${g * WG}u + lid] = ${op(`red[${g * WG}u + lid]`, `red[${g * WG}u + lid + s]`)};`).join('\n      ')}
    }
    workgroupBarrier();
  }`;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cache: array<${f16 ? 'u32' : 'f32'}>;
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;
${cacheRowWgsl(layout.blockSize)}
var<workgroup> qs: array<f32, ${G * D}>;
var<workgroup> scores: array<f32, ${G * chunkMax}>;
var<workgroup> cacheRows: array<u32, ${chunkMax}>;
var<workgroup> red: array<f32, ${G * WG}>;
var<workgroup> stats: array<f32, ${2 * G}>;
var<workgroup> nShared: u32;

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let c = wid.x;
  let kh = wid.y;
  let r = wid.z;
  let chunk = stepMeta[${META_CHUNK}];
  let start = c * chunk;
  if (lid == 0u) {
    let ctx = rowPos(r) + 1u;
    var n = 0u;
    if (start < ctx) { n = min(chunk, ctx - start); }
    nShared = n;
  }
  let n = workgroupUniformLoad(&nShared);
  if (n == 0u) { return; }
  let bt = seqBlockTable(rowSeq(r));
  for (var i = lid; i < ${G * D}u; i += ${WG}u) {
    qs[i] = qkv[r * ${qkvStride}u + kh * ${G * D}u + i] * ${wgslF32(1 / Math.sqrt(D))};
  }
  for (var j = lid; j < n; j += ${WG}u) { cacheRows[j] = cacheRow(bt, start + j); }
  workgroupBarrier();

  for (var j = lid; j < n; j += ${WG}u) {
    let kBase = cacheRows[j] * ${RV}u + kh * ${D}u;
    ${gs.map((g) => `var dot${g} = 0.0;`).join('\n    ')}
    for (var d2 = 0u; d2 < ${D / 2}u; d2++) {
      let k = ${loadPair('kBase', 'd2')};
      ${gs.map((g) => `dot${g} += qs[${g * D}u + 2u * d2] * k.x + qs[${g * D}u + 2u * d2 + 1u] * k.y;`).join('\n      ')}
    }
    ${gs.map((g) => `scores[${g * chunkMax}u + j] = dot${g};`).join('\n    ')}
  }
  workgroupBarrier();

  ${gs.map((g) => `var mx${g} = ${NEG_BIG};`).join('\n  ')}
  for (var j = lid; j < n; j += ${WG}u) {
    ${gs.map((g) => `mx${g} = max(mx${g}, scores[${g * chunkMax}u + j]);`).join('\n    ')}
  }
  ${gs.map((g) => `red[${g * WG}u + lid] = mx${g};`).join('\n  ')}
  workgroupBarrier();
  ${tree((a, b) => `max(${a}, ${b})`)}
  if (lid < ${G}u) { stats[lid] = red[lid * ${WG}u]; }
  workgroupBarrier();

  ${gs.map((g) => `var sum${g} = 0.0;`).join('\n  ')}
  for (var j = lid; j < n; j += ${WG}u) {
    ${gs
      .map((g) => `{ let p = exp(scores[${g * chunkMax}u + j] - stats[${g}]); scores[${g * chunkMax}u + j] = p; sum${g} += p; }`)
      .join('\n    ')}
  }
  ${gs.map((g) => `red[${g * WG}u + lid] = sum${g};`).join('\n  ')}
  workgroupBarrier();
  ${tree((a, b) => `${a} + ${b}`)}
  if (lid < ${G}u) { stats[${G}u + lid] = red[lid * ${WG}u]; }
  workgroupBarrier();

  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  for (var idx = lid; idx < ${(G * D) / 2}u; idx += ${WG}u) {
    let g = idx / ${D / 2}u;
    let d2 = idx % ${D / 2}u;
    var acc = vec2<f32>(0.0, 0.0);
    for (var j = 0u; j < n; j++) {
      let vBase = cacheRows[j] * ${RV}u + ${s.nKvHeads * D}u + kh * ${D}u;
      acc += scores[g * ${chunkMax}u + j] * ${loadPair('vBase', 'd2')};
    }
    let base = ((r * ${s.nHeads}u + kh * ${G}u + g) * maxChunks + c) * ${D + 2}u;
    partials[base + 2u + 2u * d2] = acc.x;
    partials[base + 3u + 2u * d2] = acc.y;
  }
  if (lid < ${G}u) {
    let base = ((r * ${s.nHeads}u + kh * ${G}u + lid) * maxChunks + c) * ${D + 2}u;
    partials[base] = stats[lid];
    partials[base + 1u] = stats[${G}u + lid];
  }
}`;
}

function mergeWgsl(s: GqaShape, outStride: number): string {
  const D = s.headDim;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(${MERGE_WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let hq = wid.x;
  let r = wid.y;
  let chunk = stepMeta[${META_CHUNK}];
  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  let nc = (rowPos(r) + chunk) / chunk;
  let base0 = (r * ${s.nHeads}u + hq) * maxChunks * ${D + 2}u;
  var m = ${NEG_BIG};
  for (var c = 0u; c < nc; c++) { m = max(m, partials[base0 + c * ${D + 2}u]); }
  var l = 0.0;
  for (var c = 0u; c < nc; c++) {
    let b = base0 + c * ${D + 2}u;
    l += exp(partials[b] - m) * partials[b + 1u];
  }
  for (var d = lid; d < ${D}u; d += ${MERGE_WG}u) {
    var o = 0.0;
    for (var c = 0u; c < nc; c++) {
      let b = base0 + c * ${D + 2}u;
      o += exp(partials[b] - m) * partials[b + 2u + d];
    }
    out[r * ${outStride}u + hq * ${D}u + d] = o / l;
  }
}`;
}

/**
 * Attention of every step row over the paged GQA cache of one layer: reads roped q from qkv[r, 0 .. nHeads·headDim),
 * K/V from the layer buffer (row = [K heads | V heads]), writes out[r, 0 .. nHeads·headDim).
 */
export class GqaAttention {
  readonly chunkMax: number;
  private partialPipe: GPUComputePipeline;
  private mergePipe: GPUComputePipeline;
  private partials: GPUBuffer | undefined;
  private partialGroups: GPUBindGroup[] = [];
  private mergeGroup: GPUBindGroup | undefined;
  private capacity = 0;

  constructor(
    private gpu: GpuContext,
    readonly shape: GqaShape,
    layout: PagedRows,
    private b: { meta: GPUBuffer; qkv: GPUBuffer; qkvStride: number; out: GPUBuffer; outStride: number; layerCaches: GPUBuffer[] },
  ) {
    const { nHeads, nKvHeads, headDim } = shape;
    if (nHeads % nKvHeads !== 0) throw new Error(`GQA needs query heads (${nHeads}) to be a multiple of KV heads (${nKvHeads})`);
    if (headDim % 2 !== 0) throw new Error(`attention reads head dims in pairs; head dim ${headDim} is odd`);
    if (layout.rowValues !== 2 * nKvHeads * headDim) {
      throw new Error(`GQA cache rows hold ${layout.rowValues} values; 2 · ${nKvHeads} heads · ${headDim} = ${2 * nKvHeads * headDim} expected`);
    }
    this.chunkMax = maxAttentionChunk(shape);
    this.partialPipe = gpu.pipeline(`gqa-attention partial ${layout.dtype}`, partialWgsl(shape, layout, b.qkvStride, this.chunkMax));
    this.mergePipe = gpu.pipeline('gqa-attention merge', mergeWgsl(shape, b.outStride));
  }

  /** Makes room for a step's partial results (call before encoding the step; buffers grow, never shrink). */
  prepare(rows: number, maxChunks: number): void {
    const need = rows * this.shape.nHeads * maxChunks * (this.shape.headDim + 2);
    if (this.partials && need <= this.capacity) return;
    this.partials?.destroy();
    this.capacity = Math.max(need, Math.ceil(this.capacity * 1.5));
    this.partials = storageBuffer(this.gpu, 'attention partials', this.capacity * 4);
    const { meta, qkv, out, layerCaches } = this.b;
    this.partialGroups = layerCaches.map((cache, l) =>
      bindBuffers(this.gpu, this.partialPipe, `attention partial layer ${l}`, [meta, qkv, cache, this.partials!]),
    );
    this.mergeGroup = bindBuffers(this.gpu, this.mergePipe, 'attention merge', [meta, this.partials, out]);
  }

  encode(pass: GPUComputePassEncoder, layer: number, rows: number, maxChunks: number): void {
    if (!this.partials || rows * this.shape.nHeads * maxChunks * (this.shape.headDim + 2) > this.capacity) {
      throw new Error(`GqaAttention.encode: call prepare(${rows}, ${maxChunks}) before encoding the step`);
    }
    pass.setPipeline(this.partialPipe);
    pass.setBindGroup(0, this.partialGroups[layer]);
    pass.dispatchWorkgroups(maxChunks, this.shape.nKvHeads, rows);
    pass.setPipeline(this.mergePipe);
    pass.setBindGroup(0, this.mergeGroup!);
    pass.dispatchWorkgroups(this.shape.nHeads, rows);
  }

  destroy(): void {
    this.partials?.destroy();
  }
}

// The int8 MLA latent cache row ([c | k_pe] as int8, one f32 scale each), its CPU twin, and the quantizing cache write.
import type { GpuContext } from './device.ts';
import { quantizeInt8Rows } from './int8.ts';
import { cacheRowWgsl, metaWgsl } from './step-meta.ts';
import { bindBuffers, gridFor } from './tensors.ts';

/**
 * Where an int8 latent row keeps its parts, in u32 words: the latent c (kvLoraRank values, four per u32, low byte
 * first, zero-padded to a whole word) at word 0, the roped k_pe (qkRopeHeadDim values, likewise) at ropeWord, then two
 * f32 scales: c's at scaleWord, k_pe's at scaleWord + 1. Each part is quantized symmetrically on its own
 * (scale = max|x| / 127, q = round(x / scale) in [−127, 127]): c and k_pe have different magnitudes, and one scale
 * for both would spend the rope part's few values on the latent's range. A part holding a NaN or ±Inf gets a NaN
 * scale and zero values, so every value read back from it is NaN, as with an f16/f32 cache.
 * 512 + 64 (DeepSeek / TransMLA on Qwen2.5-7B): 128 + 16 + 2 = 146 words = 584 bytes (f16: 1152).
 */
export interface MlaInt8RowFormat {
  kvLoraRank: number;
  qkRopeHeadDim: number;
  /** Words of the latent part (⌈kvLoraRank / 4⌉). */
  latentWords: number;
  /** First word of k_pe. */
  ropeWord: number;
  /** Words of the k_pe part (⌈qkRopeHeadDim / 4⌉). */
  ropeWords: number;
  /** Word of c's scale; k_pe's follows. */
  scaleWord: number;
  /** u32 words per row. */
  rowWords: number;
}

/** `rowAlignBytes` pads each row to a multiple of that many bytes (4: no padding; 16 / 32 align the tensor cores' row loads). */
export function mlaInt8RowFormat(kvLoraRank: number, qkRopeHeadDim: number, rowAlignBytes = 4): MlaInt8RowFormat {
  if (!Number.isInteger(rowAlignBytes) || rowAlignBytes < 4 || rowAlignBytes % 4 !== 0) throw new Error(`an int8 latent row aligns to a positive multiple of 4 bytes, got ${rowAlignBytes}`);
  for (const [name, v] of [['kv_lora_rank', kvLoraRank], ['qk_rope_head_dim', qkRopeHeadDim]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`an int8 latent row needs a positive ${name}, got ${v}`);
  }
  const latentWords = Math.ceil(kvLoraRank / 4);
  const ropeWords = Math.ceil(qkRopeHeadDim / 4);
  const scaleWord = latentWords + ropeWords;
  const align = rowAlignBytes / 4;
  return { kvLoraRank, qkRopeHeadDim, latentWords, ropeWord: latentWords, ropeWords, scaleWord, rowWords: Math.ceil((scaleWord + 2) / align) * align };
}

/** One part's words and scale as the GPU stores them (non-finite part: NaN scale, zero words). */
function quantizePart(values: ArrayLike<number>, words: Uint32Array, firstWord: number): number {
  if (!Array.prototype.every.call(values, Number.isFinite)) return NaN;
  const q = quantizeInt8Rows(values, 1, values.length, 'latent row part');
  words.set(q.packed.subarray(0, Math.ceil(values.length / 4)), firstWord);
  return q.scales[0];
}

/**
 * The CPU twin of the int8 latent write: one token's row [c (kvLoraRank) | k_pe (qkRopeHeadDim)] as the u32 words the
 * GPU stores. Rounding differs from the GPU only at exact halves (JS rounds them up, WGSL to even) and where the f32
 * division x / scale lands within a few ulp of a half.
 */
export function quantizeLatentRowInt8(row: ArrayLike<number>, f: MlaInt8RowFormat): Uint32Array {
  const R = f.kvLoraRank;
  const r = f.qkRopeHeadDim;
  if (row.length !== R + r) throw new Error(`int8 latent row: ${row.length} values, the format holds ${R} + ${r}`);
  const words = new Uint32Array(f.rowWords);
  const scales = new Float32Array(words.buffer, f.scaleWord * 4, 2);
  const part = (a: number, n: number) => Float64Array.from({ length: n }, (_, i) => row[a + i]);
  scales[0] = quantizePart(part(0, R), words, 0);
  scales[1] = quantizePart(part(R, r), words, f.ropeWord);
  return words;
}

/** Signed int8 value i of the part starting at word `firstWord`. */
function int8In(words: Uint32Array, firstWord: number, i: number): number {
  const byte = (words[firstWord + (i >> 2)] >>> (8 * (i & 3))) & 0xff;
  return byte >= 128 ? byte - 256 : byte;
}

/** The stored int8 values of a row, [c | k_pe] (padding left out). */
export function latentRowInt8Values(words: Uint32Array, f: MlaInt8RowFormat): Int8Array {
  const out = new Int8Array(f.kvLoraRank + f.qkRopeHeadDim);
  for (let i = 0; i < f.kvLoraRank; i++) out[i] = int8In(words, 0, i);
  for (let i = 0; i < f.qkRopeHeadDim; i++) out[f.kvLoraRank + i] = int8In(words, f.ropeWord, i);
  return out;
}

/** The row's two scales: [latent c, k_pe]. */
export function latentRowInt8Scales(words: Uint32Array, f: MlaInt8RowFormat): [latent: number, rope: number] {
  const s = new Float32Array(words.buffer, words.byteOffset + f.scaleWord * 4, 2);
  return [s[0], s[1]];
}

/** The values an int8 latent row reads back as (q · its part's scale), float64 [c | k_pe]. */
export function dequantizeLatentRowInt8(words: Uint32Array, f: MlaInt8RowFormat): Float64Array {
  const q = latentRowInt8Values(words, f);
  const [sc, sp] = latentRowInt8Scales(words, f);
  return Float64Array.from(q, (v, i) => v * (i < f.kvLoraRank ? sc : sp));
}

const WG = 64;

/**
 * One workgroup per step row: each part's absmax from an atomicMax over |x| bit patterns (non-negative floats order
 * like their u32 bits, and NaN/Inf bits sort above every finite value, so no NaN-unsafe float max is needed), then
 * every thread packs whole words of both parts.
 */
function writeWgsl(f: MlaInt8RowFormat, blockSize: number, srcStride: number, srcOffset: number): string {
  const R = f.kvLoraRank;
  const r = f.qkRopeHeadDim;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<u32>;
${cacheRowWgsl(blockSize)}
var<workgroup> absMaxBits: array<atomic<u32>, 2>;

fn scaleOf(bits: u32) -> f32 {
  // A quiet NaN built from the runtime bits (a constant NaN is not a valid WGSL f32 expression).
  return select(bitcast<f32>(bits | 0x7fc00000u), bitcast<f32>(bits) / 127.0, bits < 0x7f800000u);
}

/** Word w of a part of n values starting at src[s]: values past n are zero padding. */
fn packWord(s: u32, n: u32, w: u32, bits: u32, scale: f32) -> u32 {
  if (bits >= 0x7f800000u || bits == 0u) { return 0u; }
  var x = vec4<f32>(0.0);
  for (var k = 0u; k < 4u; k++) {
    let i = 4u * w + k;
    if (i < n) { x[k] = src[s + i]; }
  }
  return pack4xI8(vec4<i32>(clamp(round(x / scale), vec4<f32>(-127.0), vec4<f32>(127.0))));
}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = wid.x + wid.y * nwg.x;
  // r is the same for the whole workgroup: an early return keeps the barriers uniform.
  if (r >= metaRows()) { return; }
  if (lid < 2u) { atomicStore(&absMaxBits[lid], 0u); }
  workgroupBarrier();
  let s = r * ${srcStride}u + ${srcOffset}u;
  var mc = 0u;
  for (var i = lid; i < ${R}u; i += ${WG}u) { mc = max(mc, bitcast<u32>(src[s + i]) & 0x7fffffffu); }
  var mp = 0u;
  for (var i = lid; i < ${r}u; i += ${WG}u) { mp = max(mp, bitcast<u32>(src[s + ${R}u + i]) & 0x7fffffffu); }
  atomicMax(&absMaxBits[0], mc);
  atomicMax(&absMaxBits[1], mp);
  workgroupBarrier();
  let bc = atomicLoad(&absMaxBits[0]);
  let bp = atomicLoad(&absMaxBits[1]);
  let sc = scaleOf(bc);
  let sp = scaleOf(bp);
  let row = cacheRow(seqBlockTable(rowSeq(r)), rowPos(r)) * ${f.rowWords}u;
  for (var w = lid; w < ${f.latentWords}u; w += ${WG}u) { cache[row + w] = packWord(s, ${R}u, w, bc, sc); }
  for (var w = lid; w < ${f.ropeWords}u; w += ${WG}u) { cache[row + ${f.ropeWord}u + w] = packWord(s + ${R}u, ${r}u, w, bp, sp); }
  if (lid == 0u) {
    cache[row + ${f.scaleWord}u] = bitcast<u32>(sc);
    cache[row + ${f.scaleWord + 1}u] = bitcast<u32>(sp);
  }
}`;
}

/**
 * cache[row of (seq(r), pos(r))] = int8 row of src[r, srcOffset .. srcOffset + kvLoraRank + qkRopeHeadDim) for every
 * row r of the step (the MLA block's latent rows [c | RoPE(k_pe)]). One bind group per layer buffer.
 */
export class MlaLatentWriteInt8 {
  private pipeline: GPUComputePipeline;
  private groups: GPUBindGroup[];

  constructor(
    private gpu: GpuContext,
    readonly format: MlaInt8RowFormat,
    blockSize: number,
    b: { meta: GPUBuffer; src: GPUBuffer; srcStride: number; srcOffset: number; layerCaches: GPUBuffer[] },
  ) {
    if (b.srcStride < b.srcOffset + format.kvLoraRank + format.qkRopeHeadDim) {
      throw new Error(`latent source stride ${b.srcStride} cannot hold offset ${b.srcOffset} + ${format.kvLoraRank} + ${format.qkRopeHeadDim} values`);
    }
    const key = `${format.kvLoraRank}+${format.qkRopeHeadDim} bs${blockSize} stride ${b.srcStride}+${b.srcOffset}`;
    this.pipeline = gpu.pipeline(`mla latent write int8 ${key}`, writeWgsl(format, blockSize, b.srcStride, b.srcOffset));
    this.groups = b.layerCaches.map((cache, l) => bindBuffers(gpu, this.pipeline, `mla latent write int8 layer ${l}`, [b.meta, b.src, cache]));
  }

  encode(pass: GPUComputePassEncoder, layer: number, rows: number): void {
    if (rows <= 0) return;
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, this.groups[layer]);
    const [x, y] = gridFor(this.gpu, rows);
    pass.dispatchWorkgroups(x, y);
  }
}

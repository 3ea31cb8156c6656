// The int8 KV cache row format (values four per u32, one f32 scale per group in the same row) and its CPU twin.
import { quantizeInt8Rows } from './int8.ts';

/**
 * How an int8 KV row is laid out. The row is `groups` groups of `groupValues` values, each quantized symmetrically
 * with its own f32 scale (scale = max|x| / 127, q = round(x / scale) in [-127, 127]); values packed four per u32, low
 * byte first (the order WGSL's unpack4xI8 reads); group g's words start at g · groupValues / 4; the scales follow the
 * values, one f32 per group, padded to a multiple of four words so that a row stays 16-byte aligned. A group whose
 * inputs hold a NaN or ±Inf gets a NaN scale and zero values: every value read back from it is NaN, as with f16/f32.
 */
export interface Int8RowFormat {
  groups: number;
  /** Values per group (a multiple of 4). */
  groupValues: number;
  /** u32 word of the row where group 0's scale sits (group g's at scaleWord + g). */
  scaleWord: number;
  /** u32 words per row: values, scales, padding. */
  rowWords: number;
}

/** The int8 row format of `groups` groups of `groupValues` values each (see Int8RowFormat). */
export function int8RowFormat(groups: number, groupValues: number): Int8RowFormat {
  if (!Number.isInteger(groups) || groups < 1) throw new Error(`an int8 KV row needs at least one group, got ${groups}`);
  if (!Number.isInteger(groupValues) || groupValues < 4 || groupValues % 4 !== 0) {
    throw new Error(
      `an int8 KV cache packs each head's values four per u32; a head of ${groupValues} values is not a multiple of 4 (use --kv-cache-dtype f16 for this model)`,
    );
  }
  const scaleWord = (groups * groupValues) / 4;
  return { groups, groupValues, scaleWord, rowWords: scaleWord + Math.ceil(groups / 4) * 4 };
}

/**
 * The CPU twin of the int8 cache write: one token's row of `groups · groupValues` values as the u32 words the GPU
 * stores (packed values, scales as f32 bits, zero padding). Quantizes with the weight quantizer (kernels/int8.ts), one
 * group per matrix row. Rounding differs from the GPU only at exact halves (JS rounds them up, WGSL to even) and where
 * the f32 division x / scale lands within a few ulp of a half.
 */
export function quantizeKvRowInt8(values: ArrayLike<number>, f: Int8RowFormat): Uint32Array {
  if (values.length !== f.groups * f.groupValues) throw new Error(`int8 KV row: ${values.length} values, the format holds ${f.groups * f.groupValues}`);
  const words = new Uint32Array(f.rowWords);
  const scales = new Float32Array(words.buffer, f.scaleWord * 4, f.groups);
  const gw = f.groupValues / 4;
  for (let g = 0; g < f.groups; g++) {
    const group = Float64Array.from({ length: f.groupValues }, (_, i) => values[g * f.groupValues + i]);
    if (!group.every(Number.isFinite)) {
      scales[g] = NaN;
      continue;
    }
    const q = quantizeInt8Rows(group, 1, f.groupValues, 'KV group');
    words.set(q.packed.subarray(0, gw), g * gw);
    scales[g] = q.scales[0];
  }
  return words;
}

/** The signed int8 value i (counted over the whole row) of an int8 row's words. */
export function kvInt8At(words: Uint32Array, i: number): number {
  const byte = (words[i >> 2] >>> (8 * (i & 3))) & 0xff;
  return byte >= 128 ? byte - 256 : byte;
}

/** Scale of group g of an int8 row. */
export function kvInt8Scale(words: Uint32Array, f: Int8RowFormat, g: number): number {
  return new Float32Array(words.buffer, words.byteOffset + (f.scaleWord + g) * 4, 1)[0];
}

/** The values an int8 row reads back as (q · scale per value), float64. */
export function dequantizeKvRowInt8(words: Uint32Array, f: Int8RowFormat): Float64Array {
  const out = new Float64Array(f.groups * f.groupValues);
  for (let i = 0; i < out.length; i++) out[i] = kvInt8At(words, i) * kvInt8Scale(words, f, Math.floor(i / f.groupValues));
  return out;
}

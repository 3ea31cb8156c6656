// The MLA head products folded into the kernels on either side of the attention, for decode-sized steps: the
// absorption q̃ = W_UKᵀ q_nope inside the int8 query quantizer, and ô → W_UV inside the split-K merge. Both kernels
// already take one workgroup per (head, row) with the whole vector in hand, so the product is a workgroup's
// K × N matrix-vector product from workgroup memory, and the step loses two dispatches a layer and the f32 round trips
// of q̃ and ô. Each workgroup reads its head's weights once, so a step of M rows reads them M times (from L2).
//
// Off by default (MlaBlockOptions.fusedHeadsMaxRows; bench:decode --mla-fused-heads N; serve --mla-head-kernel fused): on an H100 (2026-12-06,
// Qwen2.5-7B-MLA, int8 weights and cache, dot4 attention, ctx 512) it took the same time as the staged head kernels
// plus the plain query quantizer and merge when each dispatch is timed alone (1437 against 1476 µs a step at 8 rows,
// 56 dispatches fewer), but the pipelined step was slower: GPU span 8.12 against 7.81 ms at 8 rows, 9.27 against
// 8.57 at 16; served (128 in + 512 out, 256 MiB, both pools full) MLA's decode step took 8.68 against 8.38 ms of GPU.
// Every (head, row) workgroup streams its head's whole 128 KB matrix, one 16-byte load a k per thread, 32 k deep:
// a kernel that shares each weight load between rows (the staged kernel's 8–32-row tiles) is what it lacks.
import type { GpuMatrix } from './tensors.ts';

/** The weights of one fused product: every layer's per-head matrices [nHeads · K, N] (one binding each). */
export interface FusedHeadWeights {
  K: number;
  N: number;
  dtype: GpuMatrix['dtype'];
  /** Row stride in values (a multiple of 8, as GpuMatrix). */
  stride: number;
}

/** The shape of a per-head matrix [nHeads · K, N] as the fused products read it. */
export function fusedHeadWeights(m: GpuMatrix, nHeads: number): FusedHeadWeights {
  return { K: m.rows / nHeads, N: m.cols, dtype: m.dtype, stride: m.stride };
}

/**
 * How a workgroup of `threads` threads splits a K × N product: each thread takes a unit of `per` consecutive outputs
 * (one 16-byte load a k: 8 f16 or 4 f32 weights) over a slice of `kc` k values; `slices` slices of every unit run
 * side by side and their sums meet in workgroup memory (`partWords` f32).
 */
export interface FusedHeadPlan {
  per: number;
  units: number;
  slices: number;
  kc: number;
  partWords: number;
}

export function planFusedHead(w: FusedHeadWeights, threads: number): FusedHeadPlan | string {
  const per = w.dtype === 'f16' ? 8 : 4;
  const units = Math.ceil(w.N / per);
  if (w.stride % 8 !== 0 || w.stride < units * per) return `weight row stride ${w.stride} is not a multiple of 8 covering ${w.N} outputs`;
  if (units > threads) return `${w.N} outputs need ${units} threads of ${per}; the workgroup has ${threads}`;
  const slices = Math.min(Math.floor(threads / units), w.K);
  const kc = Math.ceil(w.K / slices);
  return { per, units, slices, kc, partWords: slices * units * per };
}

/** The weight binding and the partial-sum scratch of a fused product (module scope). */
export function fusedHeadDeclsWgsl(w: FusedHeadWeights, p: FusedHeadPlan, binding: number, name: string): string {
  return `@group(0) @binding(${binding}) var<storage, read> ${name}: array<${w.dtype === 'f16' ? 'vec4<u32>' : 'vec4<f32>'}>;
var<workgroup> ${name}Part: array<f32, ${p.partWords}>;`;
}

/**
 * Statements (inside main, after a barrier that made src[0..K) visible): thread lid sums its unit's outputs over its k
 * slice, the slices' sums meet in workgroup memory, and `emit(n, v)` runs for each output n < N with its sum v (after
 * a barrier; every thread reaches both barriers). `h` is the head.
 */
export function fusedHeadProductWgsl(w: FusedHeadWeights, p: FusedHeadPlan, threads: number, name: string, src: (k: string) => string, emit: (n: string, v: string) => string): string {
  const rowUnits = w.stride / (w.dtype === 'f16' ? 8 : 4);
  const f16 = w.dtype === 'f16';
  const load = `${name}[(h * ${w.K}u + k) * ${rowUnits}u + u]`;
  const body = f16
    ? `let wv = ${load};
        let x = ${src('k')};
        a0 += x * vec4<f32>(unpack2x16float(wv.x), unpack2x16float(wv.y));
        a1 += x * vec4<f32>(unpack2x16float(wv.z), unpack2x16float(wv.w));`
    : `a0 += ${src('k')} * ${load};`;
  return `{
    let u = lid % ${p.units}u;
    let sl = lid / ${p.units}u;
    if (sl < ${p.slices}u) {
      var a0 = vec4<f32>(0.0);
      ${f16 ? 'var a1 = vec4<f32>(0.0);' : ''}
      let k1 = min((sl + 1u) * ${p.kc}u, ${w.K}u);
      for (var k = sl * ${p.kc}u; k < k1; k++) {
        ${body}
      }
      let pb = (sl * ${p.units}u + u) * ${p.per}u;
      for (var j = 0u; j < 4u; j++) { ${name}Part[pb + j] = a0[j]; }
      ${f16 ? `for (var j = 0u; j < 4u; j++) { ${name}Part[pb + 4u + j] = a1[j]; }` : ''}
    }
  }
  workgroupBarrier();
  for (var n = lid; n < ${w.N}u; n += ${threads}u) {
    var v = 0.0;
    for (var s = 0u; s < ${p.slices}u; s++) { v += ${name}Part[s * ${p.units * p.per}u + n]; }
    ${emit('n', 'v')}
  }`;
}

/** k values of a slice whose weight loads a group product issues together. */
const GROUP_UNROLL = 4;

/**
 * How a workgroup multiplies one head's K × N matrix for a group of rows at once (kernels/mla-front.ts, mla-back.ts):
 * each thread takes a unit of `per` consecutive outputs over a slice of `kc` k values (a multiple of the unroll), so
 * each weight load serves every row of the group; `slices` slices of every unit meet in workgroup memory in slice
 * order. The rows' inputs are staged zero-padded to `kp` = slices × kc values.
 */
export interface GroupProductPlan {
  per: 2 | 4 | 8;
  units: number;
  slices: number;
  kc: number;
  kp: number;
  /** Weight words (of `per` values) a k row. */
  rowUnits: number;
}

/** The plan for `threads` threads and `per` outputs a thread (f32 weights: at most 4), or why it does not fit. */
export function planGroupProduct(w: FusedHeadWeights, threads: number, perWanted: 2 | 4 | 8): GroupProductPlan | string {
  const per = w.dtype === 'f32' && perWanted === 8 ? 4 : perWanted;
  const units = Math.ceil(w.N / per);
  if (w.stride % 8 !== 0 || w.stride < units * per) return `weight row stride ${w.stride} is not a multiple of 8 covering ${w.N} outputs`;
  if (units > threads) return `${w.N} outputs need ${units} threads of ${per}; the workgroup has ${threads}`;
  const slices = Math.min(Math.floor(threads / units), w.K);
  const kc = Math.ceil(Math.ceil(w.K / slices) / GROUP_UNROLL) * GROUP_UNROLL;
  return { per, units, slices, kc, kp: slices * kc, rowUnits: w.stride / per };
}

/** The weight binding of a group product (module scope): one word of `per` f16 or f32 values. */
export function groupProductDeclWgsl(w: FusedHeadWeights, p: GroupProductPlan, binding: number, name: string): string {
  const word = w.dtype === 'f16' ? { 2: 'u32', 4: 'vec2<u32>', 8: 'vec4<u32>' }[p.per] : p.per === 2 ? 'vec2<f32>' : 'vec4<f32>';
  return `@group(0) @binding(${binding}) var<storage, read> ${name}: array<${word}>;`;
}

/**
 * Statements (inside main, after a barrier that made the inputs visible; every thread reaches the barriers): the
 * product of head `h`'s matrix with G rows, row j's k-th input at `src[j · kp + k]` (zero past K). In the slices'
 * meeting, each output n < N of row j goes through `acc(j, n)` (a workgroup f32 the earlier slices' sums wait in)
 * and, in the last slice, `last(j, n, v)` with the whole sum v instead.
 */
export function groupProductWgsl(
  w: FusedHeadWeights,
  p: GroupProductPlan,
  G: number,
  name: string,
  src: string,
  acc: (j: number, n: string) => string,
  last: (j: number, n: string, v: string) => string,
): string {
  const f16 = w.dtype === 'f16';
  const js = [...Array(G).keys()];
  const us = [...Array(GROUP_UNROLL).keys()];
  // Accumulators a{j}0 (and a{j}1 for 8 outputs): vec2 for 2 outputs, vec4 for 4 and 8.
  const accType = p.per === 2 ? 'vec2<f32>' : 'vec4<f32>';
  const load = (i: number) => {
    const word = `${name}[(h * ${w.K}u + min(k + ${i}u, ${w.K - 1}u)) * ${p.rowUnits}u + u]`;
    if (!f16) return `let lo${i} = ${word};`;
    if (p.per === 2) return `let lo${i} = unpack2x16float(${word});`;
    if (p.per === 4) return `let w${i} = ${word};\n          let lo${i} = vec4<f32>(unpack2x16float(w${i}.x), unpack2x16float(w${i}.y));`;
    return `let w${i} = ${word};
          let lo${i} = vec4<f32>(unpack2x16float(w${i}.x), unpack2x16float(w${i}.y));
          let hi${i} = vec4<f32>(unpack2x16float(w${i}.z), unpack2x16float(w${i}.w));`;
  };
  const fma = (i: number) =>
    js.map((j) => `{ let x = ${src}[${j * p.kp}u + k + ${i}u]; a${j}0 += x * lo${i};${p.per === 8 ? ` a${j}1 += x * hi${i};` : ''} }`).join('\n          ');
  const outs = js
    .map((j) =>
      [...Array(p.per).keys()]
        .map((i) => {
          const v = i < 4 ? `a${j}0[${i}]` : `a${j}1[${i - 4}]`;
          const n = `n${j}_${i}`;
          return `{ let ${n} = u * ${p.per}u + ${i}u; if (${n} < ${w.N}u) { let t = select(${acc(j, n)}, 0.0, s == 0u) + ${v}; if (s == ${p.slices - 1}u) { ${last(j, n, 't')} } else { ${acc(j, n)} = t; } } }`;
        })
        .join('\n        '),
    )
    .join('\n        ');
  return `{
    let u = lid % ${p.units}u;
    let sl = lid / ${p.units}u;
    ${js.map((j) => `var a${j}0 = ${accType}(0.0);${p.per === 8 ? ` var a${j}1 = vec4<f32>(0.0);` : ''}`).join('\n    ')}
    if (sl < ${p.slices}u) {
      for (var k = sl * ${p.kc}u; k < (sl + 1u) * ${p.kc}u; k += ${GROUP_UNROLL}u) {
          ${us.map(load).join('\n          ')}
          ${us.map(fma).join('\n          ')}
      }
    }
    for (var s = 0u; s < ${p.slices}u; s++) {
      if (sl == s) {
        ${outs}
      }
      workgroupBarrier();
    }
  }`;
}

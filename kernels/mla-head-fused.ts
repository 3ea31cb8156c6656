// The MLA head products inside the kernels on either side of the attention, for decode-sized steps: W_UK in the
// decode front (kernels/mla-front.ts, with RoPE, the int8 latent write and the query quantizer) and W_UV in the
// decode back (kernels/mla-back.ts, with the split-K merge). Both multiply one head's matrix for a group of up to 8
// rows per workgroup, so each weight load serves the whole group.
//
// The first fused form (2026-12-06, removed) took one workgroup per (head, row) inside the int8 query quantizer and the
// merge: every workgroup streamed its head's whole 128 KB matrix, one 16-byte load a k per thread, 32 k deep, and on
// an H100 (Qwen2.5-7B-MLA, int8 weights and cache, ctx 512) the pipelined step was slower than the staged head kernels
// (GPU span 8.12 against 7.81 ms at 8 rows, 9.27 against 8.57 at 16). Grouping rows is what it lacked.
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

// Paged causal GQA attention, split-K (flash-decoding): partial softmax per (row, kv head, context chunk), then a merge.
//
// Every row of a step (a prefill chunk's tokens or a decode token) attends to its own sequence's cache at
// positions 0..pos (its K/V were written by kv-write earlier in the same pass), which makes prefill chunks causal
// over the cached prefix plus themselves. One workgroup takes (row, kv head, chunk of `chunkSize` tokens) with the
// g query heads of that kv head together, so each K/V row it reads serves g heads; scores stay in workgroup memory.
// The merge rescales the chunks' partial sums by their maxima (online softmax across chunks).
import type { GpuContext } from './device.ts';
import type { PagedRows } from './kv-write.ts';
import { NEG_BIG, splitKMergeWgsl } from './split-merge.ts';
import { cacheRowWgsl, metaWgsl, META_CHUNK, META_MAX_CHUNKS } from './step-meta.ts';
import { bindBuffers, storageBuffer, wgslF32 } from './tensors.ts';

export interface GqaShape {
  nHeads: number;
  nKvHeads: number;
  headDim: number;
}


/**
 * Workgroups the GQA partial pass aims for when the step's chunk size is chosen (buildStepMeta's targetWorkgroups).
 * Fewer, longer chunks win on the H200 (bench:attention --batches 32 --contexts 512,4096 --variants all, 2026-12-04):
 * at 32 × 512 the 128-thread kernel took 58 / 38 / 28 µs with 64- / 128- / 256-token chunks (targets 1024 / 512 /
 * 256); at 32 × 4K the chunk stays at its 512-token cap (186 µs) and 256-token chunks took 223.
 */
export const GQA_TARGET_WORKGROUPS = 256;

/** Largest chunk whose scores (g heads × chunk) fit ~16 KiB of workgroup memory; a power of two in [16, 512]. */
export function maxAttentionChunk(shape: GqaShape): number {
  const g = shape.nHeads / shape.nKvHeads;
  let c = 512;
  while (c > 16 && g * c * 4 > 16384) c /= 2;
  return c;
}

/** Knobs of the partial kernel (tests force the fallbacks; defaults come from the shape and the device). */
export interface GqaAttentionTuning {
  /** Threads per workgroup (a power of two ≥ 32). */
  workgroupSize: number;
  /** Reduce K-row dot products across lanes with subgroup shuffles (needs the `subgroups` feature). */
  useSubgroups: boolean;
  /** Largest number of lanes sharing one K row (a power of two; capped by the smallest subgroup size). */
  maxLanesPerRow: number;
  /** Rows each thread loads before using them (memory requests in flight). */
  unroll: number;
}

/**
 * How the partial kernel lays threads over a chunk. A "piece" is one 16-byte load (8 f16 or 4 f32 values) when the head
 * dim allows it, else a pair of values. Score phase: `lanes` neighbouring threads share a K row (each reads its pieces,
 * consecutive lanes consecutive pieces, so a subgroup reads whole rows in order), dot products for the g query heads
 * of the group summed over the lanes by a shuffle butterfly. Value phase: thread = (piece of the V row, token group),
 * consecutive threads consecutive pieces; each keeps g × piece accumulators, summed over token groups at the end.
 */
export interface GqaAttentionPlan {
  workgroupSize: number;
  piece: number;
  piecesPerRow: number;
  lanes: number;
  tokenGroups: number;
  unroll: number;
}

export function planGqaAttention(shape: GqaShape, dtype: 'f32' | 'f16' | 'int8', tuning: GqaAttentionTuning, subgroupMin: number): GqaAttentionPlan {
  const D = shape.headDim;
  let piece: number;
  if (dtype === 'int8') {
    // One u32 holds 4 int8 values: pieces of 16 (vec4<u32>), 8 or 4 values; the row format needs D % 4 = 0.
    piece = [16, 8, 4].find((p) => D % p === 0) ?? 0;
    if (!piece) throw new Error(`the int8 KV cache reads head dims in groups of 4; head dim ${D} is not a multiple of 4 (use an f16 cache)`);
  } else {
    const wide = dtype === 'f16' ? 8 : 4;
    piece = D % wide === 0 ? wide : 2;
  }
  const piecesPerRow = D / piece;
  let lanes = 1;
  if (tuning.useSubgroups) {
    const cap = Math.min(tuning.maxLanesPerRow, Math.max(1, subgroupMin));
    while (lanes * 2 <= cap && piecesPerRow % (lanes * 2) === 0) lanes *= 2;
  }
  let workgroupSize = tuning.workgroupSize;
  while (workgroupSize < piecesPerRow) workgroupSize *= 2;
  return { workgroupSize, piece, piecesPerRow, lanes, tokenGroups: Math.floor(workgroupSize / piecesPerRow), unroll: tuning.unroll };
}

export function defaultGqaTuning(gpu: GpuContext, shape: GqaShape): GqaAttentionTuning {
  // 128 threads, not 256: on the H200 at 32 × 4K 186 vs 222 µs, at 32 × 512 (64-token chunks) 58 vs 91 µs
  // (bench:attention --batches 32 --contexts 512,4096 --variants all, 2026-12-04).
  return { workgroupSize: shape.headDim >= 64 ? 128 : 64, useSubgroups: gpu.features.has('subgroups'), maxLanesPerRow: 16, unroll: 4 };
}

function partialWgsl(s: GqaShape, layout: PagedRows, qkvStride: number, chunkMax: number, plan: GqaAttentionPlan): string {
  const G = s.nHeads / s.nKvHeads;
  const D = s.headDim;
  const f16 = layout.dtype === 'f16';
  const i8 = layout.int8;
  if (layout.dtype === 'int8' && !i8) throw new Error('an int8 GQA cache needs its row format (values and scales); the layout has none');
  const { workgroupSize: WG, piece: P, piecesPerRow: NP, lanes: L, tokenGroups: TG, unroll: U } = plan;
  const PPL = NP / L;
  const P2 = P / 2;
  const gs = [...Array(G).keys()];
  const us = [...Array(U).keys()];
  const pps = [...Array(PPL).keys()];
  const k2s = [...Array(P2).keys()];
  const cacheType = i8
    ? ({ 16: 'vec4<u32>', 8: 'vec2<u32>', 4: 'u32' } as Record<number, string>)[P]
    : f16
      ? P === 8
        ? 'vec4<u32>'
        : 'u32'
      : P === 4
        ? 'vec4<f32>'
        : 'vec2<f32>';
  // A row's length in pieces (the cache array's elements).
  const rowPieces = i8 ? (i8.rowWords * 4) / P : layout.rowValues / P;
  // The piece's values as P/2 vec2<f32> expressions (int8: unscaled; the scales multiply scores and probabilities).
  const pairs = (w: string): string[] => {
    if (i8) {
      const words = P === 4 ? [w] : (P === 16 ? ['x', 'y', 'z', 'w'] : ['x', 'y']).map((c) => `${w}.${c}`);
      return words.flatMap((x) => [`vec4<f32>(unpack4xI8(${x})).xy`, `vec4<f32>(unpack4xI8(${x})).zw`]);
    }
    if (f16) return P === 8 ? ['x', 'y', 'z', 'w'].map((c) => `unpack2x16float(${w}.${c})`) : [`unpack2x16float(${w})`];
    return P === 4 ? [`${w}.xy`, `${w}.zw`] : [w];
  };
  const tree = (op: (a: string, b: string) => string) => `
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) {
      ${gs.map((g) => `red[${g * WG}u + lid] = ${op(`red[${g * WG}u + lid]`, `red[${g * WG}u + lid + s]`)};`).join('\n      ')}
    }
    workgroupBarrier();
  }`;
  const rowsPerIter = (WG / L) * U;
  const scale = wgslF32(1 / Math.sqrt(D));
  // Lane reduction of the g dot products as a reduce-scatter: at each butterfly step a lane keeps half of its list
  // (upper half when its lane bit is set) and adds the partner's copy of that half, so g heads (padded to a power of
  // two) cost g/2 + g/4 + ... + 1 shuffles instead of g per step. A lane ends with the heads hBase + i; steps left once
  // the list is down to one value are plain butterflies, and only lanes with those bits clear write.
  const m = L > 1 ? 2 ** Math.ceil(Math.log2(G)) : G;
  let len = m;
  const reduce: string[] = [];
  const baseTerms: string[] = [];
  let plainMask = 0;
  const lists = us.map((u) => [...gs.map((g) => `d${u}_${g}`), ...Array(m - G).fill('0.0')]);
  let step = 0;
  for (let o = L / 2; o >= 1; o /= 2, step++) {
    if (len > 1) {
      const half = len / 2;
      baseTerms.push(`select(0u, ${half}u, (lane & ${o}u) != 0u)`);
      reduce.push(`let hi${step} = (lane & ${o}u) != 0u;`);
      for (const u of us) {
        const l = lists[u];
        const next: string[] = [];
        for (let i = 0; i < half; i++) {
          const name = `r${u}_${step}_${i}`;
          reduce.push(`var ${name} = select(${l[i]}, ${l[half + i]}, hi${step}) + subgroupShuffleXor(select(${l[half + i]}, ${l[i]}, hi${step}), ${o}u);`);
          next.push(name);
        }
        lists[u] = next;
      }
      len = half;
    } else {
      plainMask |= o;
      for (const u of us) for (const v of lists[u]) reduce.push(`${v} += subgroupShuffleXor(${v}, ${o}u);`);
    }
  }
  const finals = [...Array(len).keys()];
  // int8 pieces of 16 values would double the token-group sum's workgroup memory (TG · D = WG · P floats) past 32 KiB
  // at g = 7: that sum then goes through in S slices of the piece, each the size an f16 piece of 8 needs.
  const S = i8 && P === 16 ? 2 : 1;
  const redSize = Math.max(G * WG, (TG * D) / S);
  return /* wgsl */ `${L > 1 ? 'enable subgroups;\n' : ''}
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cache: array<${cacheType}>;
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;
${cacheRowWgsl(layout.blockSize)}${
    i8
      ? `
/** The f32 scale at u32 word wi of the int8 cache. */
fn kvScale(wi: u32) -> f32 { return bitcast<f32>(${P === 4 ? 'cache[wi]' : `cache[wi / ${P / 4}u][wi % ${P / 4}u]`}); }`
      : ''
  }
var<workgroup> scores: array<f32, ${G * chunkMax}>;
var<workgroup> cacheRows: array<u32, ${chunkMax}>;
var<workgroup> red: array<f32, ${redSize}>;
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
  for (var j = lid; j < n; j += ${WG}u) { cacheRows[j] = cacheRow(bt, start + j); }

  // This lane's slice of the g query heads (pieces lane, lane + ${L}, ...), pre-scaled, in registers.
  let lane = lid % ${L}u;
  let slot = lid / ${L}u;
  let qBase = r * ${qkvStride}u + kh * ${G * D}u + lane * ${P}u;
  ${gs.flatMap((g) => pps.flatMap((pp) => k2s.map((k2) => {
    const o = g * D + pp * L * P + 2 * k2;
    return `let q${g}_${pp}_${k2} = vec2<f32>(qkv[qBase + ${o}u], qkv[qBase + ${o + 1}u]) * ${scale};`;
  }))).join('\n  ')}
  let hBase = ${baseTerms.length ? baseTerms.join(' + ') : '0u'};
  let writer = (lane & ${plainMask}u) == 0u;
  ${finals.map((i) => `var mx${i} = ${NEG_BIG};`).join('\n  ')}
  workgroupBarrier();

  // Scores: ${WG / L} rows at a time${U > 1 ? `, ${U} such sets loaded before use` : ''}; the loop count is uniform (shuffles need every lane).
  let kOff = kh * ${D / P}u + lane;
  let nIter = (n + ${rowsPerIter - 1}u) / ${rowsPerIter}u;
  for (var it = 0u; it < nIter; it++) {
    ${us.map((u) => `let j${u} = it * ${rowsPerIter}u + ${u * (WG / L)}u + slot;
    let kb${u} = cacheRows[min(j${u}, n - 1u)] * ${rowPieces}u + kOff;${
      i8 ? `
    let ks${u} = kvScale(cacheRows[min(j${u}, n - 1u)] * ${i8.rowWords}u + ${i8.scaleWord}u + kh);` : ''
    }
    ${pps.map((pp) => `let w${u}_${pp} = cache[kb${u} + ${pp * L}u];`).join('\n    ')}`).join('\n    ')}
    ${us.map((u) => gs.map((g) => `var d${u}_${g} = ${pps.flatMap((pp) => pairs(`w${u}_${pp}`).map((v, k2) => `dot(q${g}_${pp}_${k2}, ${v})`)).join(' + ')};`).join('\n    ')).join('\n    ')}
    ${reduce.join('\n    ')}
    ${us.map((u) => `if (writer && j${u} < n) {
      ${finals.map((i) => {
        const sc = i8 ? `(${lists[u][i]} * ks${u})` : lists[u][i];
        return `${m > G ? `if (hBase + ${i}u < ${G}u) ` : ''}{ scores[(hBase + ${i}u) * ${chunkMax}u + j${u}] = ${sc}; mx${i} = max(mx${i}, ${sc}); }`;
      }).join('\n      ')}
    }`).join('\n    ')}
  }
  ${gs.map((g) => `red[${g * WG}u + lid] = ${NEG_BIG};`).join('\n  ')}
  ${finals.map((i) => `${m > G ? `if (hBase + ${i}u < ${G}u) ` : ''}{ red[(hBase + ${i}u) * ${WG}u + lid] = mx${i}; }`).join('\n  ')}
  workgroupBarrier();
  ${tree((a, b) => `max(${a}, ${b})`)}
  if (lid < ${G}u) { stats[lid] = red[lid * ${WG}u]; }
  workgroupBarrier();

  ${gs.map((g) => `var sum${g} = 0.0;`).join('\n  ')}
  for (var j = lid; j < n; j += ${WG}u) {
    ${i8 ? `// int8: the stored probability carries the V row's scale (Σ p·s·q = Σ p·v); the sum does not.
    let vs = kvScale(cacheRows[j] * ${i8.rowWords}u + ${i8.scaleWord + s.nKvHeads}u + kh);
    ` : ''}${gs
      .map((g) => `{ let p = exp(scores[${g * chunkMax}u + j] - stats[${g}]); scores[${g * chunkMax}u + j] = p${i8 ? ' * vs' : ''}; sum${g} += p; }`)
      .join('\n    ')}
  }
  ${gs.map((g) => `red[${g * WG}u + lid] = sum${g};`).join('\n  ')}
  workgroupBarrier();
  ${tree((a, b) => `${a} + ${b}`)}
  if (lid < ${G}u) { stats[${G}u + lid] = red[lid * ${WG}u]; }
  workgroupBarrier();

  // Values: thread = (piece pc of the V row, token group tg); consecutive threads read consecutive pieces.
  let pc = lid % ${NP}u;
  let tg = lid / ${NP}u;
  let vOff = ${(s.nKvHeads * D) / P}u + kh * ${D / P}u + pc;
  ${gs.flatMap((g) => k2s.map((k2) => `var a${g}_${k2} = vec2<f32>(0.0, 0.0);`)).join('\n  ')}
  var j = select(n, tg, tg < ${TG}u);
  for (; j + ${(U - 1) * TG}u < n; j += ${U * TG}u) {
    ${us.map((u) => `let v${u} = cache[cacheRows[j + ${u * TG}u] * ${rowPieces}u + vOff];`).join('\n    ')}
    ${us.map((u) => `{
      ${pairs(`v${u}`).map((v, k2) => `let x${k2} = ${v};`).join(' ')}
      ${gs.map((g) => `{ let p = scores[${g * chunkMax}u + j + ${u * TG}u]; ${k2s.map((k2) => `a${g}_${k2} += p * x${k2};`).join(' ')} }`).join('\n      ')}
    }`).join('\n    ')}
  }
  for (; j < n; j += ${TG}u) {
    let v0 = cache[cacheRows[j] * ${rowPieces}u + vOff];
    ${pairs('v0').map((v, k2) => `let x${k2} = ${v};`).join(' ')}
    ${gs.map((g) => `{ let p = scores[${g * chunkMax}u + j]; ${k2s.map((k2) => `a${g}_${k2} += p * x${k2};`).join(' ')} }`).join('\n    ')}
  }

  // Sum the token groups' accumulators one head at a time through workgroup memory, then write the partial.
  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  let inGroup = tg < ${TG}u;
  ${S === 1 ? gs.map((g) => `if (inGroup) {
    ${k2s.map((k2) => `red[tg * ${D}u + pc * ${P}u + ${2 * k2}u] = a${g}_${k2}.x; red[tg * ${D}u + pc * ${P}u + ${2 * k2 + 1}u] = a${g}_${k2}.y;`).join('\n    ')}
  }
  workgroupBarrier();
  for (var d = lid; d < ${D}u; d += ${WG}u) {
    var o = 0.0;
    for (var t = 0u; t < ${TG}u; t++) { o += red[t * ${D}u + d]; }
    partials[((r * ${s.nHeads}u + kh * ${G}u + ${g}u) * maxChunks + c) * ${D + 2}u + 2u + d] = o;
  }
  workgroupBarrier();`).join('\n  ') : gs.flatMap((g) => [...Array(S).keys()].map((sl) => {
    // Slice sl holds values [sl · P/S, (sl + 1) · P/S) of every piece: slot d' is dim (d' / (P/S)) · P + sl · P/S + d' % (P/S).
    const PS = P / S;
    const DS = D / S;
    const mine = k2s.filter((k2) => Math.floor((2 * k2) / PS) === sl);
    return `if (inGroup) {
    ${mine.map((k2) => `red[tg * ${DS}u + pc * ${PS}u + ${2 * k2 - sl * PS}u] = a${g}_${k2}.x; red[tg * ${DS}u + pc * ${PS}u + ${2 * k2 + 1 - sl * PS}u] = a${g}_${k2}.y;`).join('\n    ')}
  }
  workgroupBarrier();
  for (var d = lid; d < ${DS}u; d += ${WG}u) {
    var o = 0.0;
    for (var t = 0u; t < ${TG}u; t++) { o += red[t * ${DS}u + d]; }
    partials[((r * ${s.nHeads}u + kh * ${G}u + ${g}u) * maxChunks + c) * ${D + 2}u + 2u + (d / ${PS}u) * ${P}u + ${sl * PS}u + d % ${PS}u] = o;
  }
  workgroupBarrier();`;
  })).join('\n  ')}
  if (lid < ${G}u) {
    let base = ((r * ${s.nHeads}u + kh * ${G}u + lid) * maxChunks + c) * ${D + 2}u;
    partials[base] = stats[lid];
    partials[base + 1u] = stats[${G}u + lid];
  }
}`;
}

/**
 * Attention of every step row over the paged GQA cache of one layer: reads roped q from qkv[r, 0 .. nHeads·headDim),
 * K/V from the layer buffer (row = [K heads | V heads]), writes out[r, 0 .. nHeads·headDim).
 */
export class GqaAttention {
  readonly chunkMax: number;
  readonly plan: GqaAttentionPlan;
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
    tuning: Partial<GqaAttentionTuning> = {},
  ) {
    const { nHeads, nKvHeads, headDim } = shape;
    if (nHeads % nKvHeads !== 0) throw new Error(`GQA needs query heads (${nHeads}) to be a multiple of KV heads (${nKvHeads})`);
    if (headDim % 2 !== 0) throw new Error(`attention reads head dims in pairs; head dim ${headDim} is odd`);
    if (layout.rowValues !== 2 * nKvHeads * headDim) {
      throw new Error(`GQA cache rows hold ${layout.rowValues} values; 2 · ${nKvHeads} heads · ${headDim} = ${2 * nKvHeads * headDim} expected`);
    }
    this.chunkMax = maxAttentionChunk(shape);
    const t = { ...defaultGqaTuning(gpu, shape), ...tuning };
    if (t.useSubgroups && !gpu.features.has('subgroups')) t.useSubgroups = false;
    this.plan = planGqaAttention(shape, layout.dtype, t, gpu.subgroupSize);
    const p = this.plan;
    this.partialPipe = gpu.pipeline(
      `gqa-attention partial ${layout.dtype} wg${p.workgroupSize} piece${p.piece} lanes${p.lanes} u${p.unroll}`,
      partialWgsl(shape, layout, b.qkvStride, this.chunkMax, p),
    );
    this.mergePipe = gpu.pipeline('gqa-attention merge', splitKMergeWgsl(shape.nHeads, shape.headDim, b.outStride));
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

// Absorbed MLA decode attention over the int8 latent cache in three passes: scores, softmax, values. The integers and
// the softmax windows are those of kernels/mla-attention-tc.ts (and its dot4 kernel); only the split of the work differs.
import type { MlaInt8RowFormat } from './mla-kv-int8.ts';
import { NEG_BIG } from './split-merge.ts';
import { qqWordWgsl, stagedRowFnsWgsl, type MlaTcPlan } from './mla-attention-tc.ts';
import { TRANSPOSE4_WGSL } from './mla-attention-dot4.ts';
import { cacheRowWgsl, metaWgsl, META_CHUNK, META_MAX_CHUNKS, CHUNK_START_WGSL } from './step-meta.ts';

/**
 * Why three passes: the one-pass dot4 kernel keeps every head's 512 outputs of its chunk in registers (56 f32 a
 * thread at 28 heads) beside the score sums, so an SM holds two of its workgroups, and each 32-token window waits on
 * ~15 barriers (staging, scores, a tree softmax, values): at 32 × 4K it ran at ~20 % of the dot4 rate. Here
 *  1. scores: one workgroup per (row, 32- or 64-token tile) writes f32 scores s[r, h, t] (and c's scale of token t); no
 *     outputs live, so many workgroups share an SM;
 *  2. softmax: one workgroup per (row, head) finds the exact max m over the whole context (no running rescale), then
 *     per split chunk l = Σ exp(s − m) and p′ = exp(s − m) · sc_t, quantized per 64-token window of the chunk (the
 *     windows of the one-pass kernels, so the same integers) to packed int8 with one scale per window;
 *  3. values: one workgroup per (row, chunk, part of the latent) sums p′q · cq in i32 per window and folds it into f32
 *     with the window's scale; each part reads only its own latent words of the cache.
 * The partials are the one-pass kernels' (m, l, o per head and chunk; m the same for every chunk of a row), so the same
 * merge finishes. Scores and p′ go through memory: 112 + 28 B per (row, token) against 584 B of cache read. Passes 1
 * and 3 each have a tensor-core form (i8 subgroup matrices, the same integers). Timed on an H100 (2026-12-06, 32 × 4K):
 * 716 µs with dot4 products, 410 with tensor-core scores (the default where the adapter has them), 718 with both on
 * tensor cores — against 359 for the one-pass dot4 kernel, which therefore stays the default.
 */
export interface Mla3PassPlan {
  /** Tokens of a score tile (32 or 64: one or two a score thread) and of a softmax window (a multiple of 4 that divides MLA3_MAX_CHUNK). */
  tile: number;
  window: number;
  /** Score pass: head quads (one warp each) and vec4 slots a staged row takes. */
  headQuads: number;
  rowWords: number;
  latentWords: number;
  rowStride4: number;
  /** Whether the score pass stages the quantized query in workgroup memory (else reads it from storage, L1-cached). */
  queryStaged: boolean;
  /** Value pass: workgroups along the latent, latent words each, head parts, heads a thread. */
  latentParts: number;
  partWords: number;
  headParts: number;
  headsPerThread: number;
  scoreBytes: number;
  valueBytes: number;
  /** Head rows of p′ and its window scales a row: the heads padded to 16 as the query tiles (MlaTcPlan.headsPadded; the tensor-core value pass loads 16 at a time). */
  headRows: number;
}

const WG = 256;
/** The longest split chunk the softmax pass takes (MLA_MAX_CHUNK): p′ and window scales are laid out per chunk. */
export const MLA3_MAX_CHUNK = 512;
/** Default tokens of a score workgroup. */
export const MLA3_SCORE_TILE = 32;
/**
 * Default workgroups along the latent in the value pass (4: 32 words × 8 head parts of 4 heads at Qwen2.5-7B). On an
 * H100 (bench:attention, 2026-12-06) 4 against 2 took 675.1 against 716.4 µs at 32 × 4K, 119.9 against 125.5 at
 * 32 × 512, 236.4 against 259.8 at 8 × 4K; 1 was slower than 2.
 */
export const MLA3_LATENT_PARTS = 4;

/** The plan for a shape, or why the three-pass kernels do not take it. */
export function planMla3Pass(nHeads: number, tc: MlaTcPlan, storageLimit: number, latentParts = MLA3_LATENT_PARTS, tile = MLA3_SCORE_TILE): Mla3PassPlan | string {
  const W = tc.window;
  if (W % 4 !== 0 || MLA3_MAX_CHUNK % W !== 0) return `window ${W}: a multiple of 4 tokens that divides ${MLA3_MAX_CHUNK}`;
  if (nHeads > 32) return `${nHeads} heads: at most 32 (8 head quads of the score pass)`;
  if (!Number.isInteger(latentParts) || latentParts < 1) return `latent parts ${latentParts}: a positive integer`;
  const rowWords = tc.rowPad / 4;
  const latentWords = tc.latentPad / 4;
  const rowStride4 = rowWords / 4 + ((rowWords / 4) % 2 === 0 ? 1 : 0);
  if (tile !== 32 && tile !== 64) return `score tile ${tile}: 32 or 64 tokens`;
  const rowBytes = 16 * tile * rowStride4 + 16;
  const queryStaged = rowBytes + 4 * nHeads * rowWords <= storageLimit;
  const scoreBytes = rowBytes + (queryStaged ? 4 * nHeads * rowWords : 0);
  if (scoreBytes > storageLimit) return `score pass: ${scoreBytes} B of workgroup memory, the device allows ${storageLimit}`;
  const partWords = Math.ceil(latentWords / latentParts);
  if (partWords > WG) return `${partWords} latent words a value workgroup: at most ${WG}`;
  const headParts = Math.min(nHeads, Math.floor(WG / partWords));
  const headsPerThread = Math.ceil(nHeads / headParts);
  if (headsPerThread > 16) return `${nHeads} heads over ${headParts} head parts: more than 16 heads a thread`;
  const valueBytes = 4 * W * partWords + nHeads * W + 16;
  if (valueBytes > storageLimit) return `value pass: ${valueBytes} B of workgroup memory, the device allows ${storageLimit}`;
  const headRows = tc.headsPadded;
  return { tile, window: W, headQuads: Math.ceil(nHeads / 4), rowWords, latentWords, rowStride4, queryStaged, latentParts, partWords, headParts, headsPerThread, scoreBytes, valueBytes, headRows };
}

/**
 * Scratch sizes (bytes) for `rows` rows of up to `maxChunks` chunks of `chunk` tokens: scores, token scales, p′ (whole
 * windows a chunk), window scales.
 */
export function mla3ScratchBytes(nHeads: number, p: Mla3PassPlan, rows: number, maxChunks: number, chunk = MLA3_MAX_CHUNK): { scores: number; tscale: number; pq: number; ps: number } {
  const ctx = maxChunks * chunk;
  const windows = Math.ceil(chunk / p.window);
  return {
    scores: 4 * rows * nHeads * ctx,
    tscale: 4 * rows * ctx,
    pq: rows * p.headRows * maxChunks * windows * p.window,
    ps: 4 * rows * p.headRows * maxChunks * windows,
  };
}

/** WGSL: windows a chunk (chunkWindows) and p′ words a chunk (chunkWords) from the step's chunk size. */
const chunkLayoutWgsl = (W: number) => `let chunkWindows = (stepMeta[${META_CHUNK}] + ${W - 1}u) / ${W}u;
  let chunkWords = chunkWindows * ${W / 4}u;`;

/**
 * WGSL opening both value passes, grid (chunks, latent parts, rows): chunk c, part and row r, the chunk's token span
 * bnd (a workgroup whose chunk is past the row's context returns), its block table bt and the p′ layout.
 */
function valueStartWgsl(W: number): string {
  return `let c = wid.x;
  let part = wid.y;
  let r = wid.z;
  ${CHUNK_START_WGSL}
  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  ${chunkLayoutWgsl(W)}`;
}

/** WGSL: the row stride of the scores and token scales (every chunk slot of the step, MLA3_MAX_CHUNK or less each). */
const strideWgsl = `stepMeta[${META_MAX_CHUNKS}] * stepMeta[${META_CHUNK}]`;

/**
 * WGSL opening both score passes: row r, tile tokens t0 … t0 + n − 1 of its context (a workgroup past it returns), its
 * block table bt and the scores' row stride.
 */
function tileStartWgsl(T: number): string {
  return `let r = wid.z;
  let t0 = wid.x * ${T}u;
  let ctx = rowPos(r) + 1u;
  if (t0 >= ctx) { return; }
  let n = min(${T}u, ctx - t0);
  let bt = seqBlockTable(rowSeq(r));
  let stride = ${strideWgsl};`;
}

/**
 * Pass 1, grid (tiles, 1, rows): the scores of one row's tile (32 or 64 tokens) for every head, s = Σ q̃q·cq · sq̃ · sc_t +
 * Σ q_peq·k_peq · sq_pe · spe_t, to scores[(r·H + h)·stride + t], and sc_t to tscale[r·stride + t]. Thread = (head
 * quad, token and token + 32) as in the dot4 kernel: each warp's query loads uniform (staged where it fits).
 */
export function mla3ScoresWgsl(nHeads: number, f: MlaInt8RowFormat, blockSize: number, tc: MlaTcPlan, p: Mla3PassPlan): string {
  const H = nHeads;
  const S4 = p.rowStride4;
  const RW = p.rowWords;
  const RW4 = RW / 4;
  const LW4 = p.latentWords / 4;
  const T = p.tile;
  const ks = [0, 1, 2, 3];
  const bs = [...Array(T / 32).keys()];
  const loop = (from: number, to: number, acc: string) => `for (var w4 = ${from}u; w4 < ${to}u; w4++) {
      ${bs.map((b) => `let cv${b} = ct[(tl + ${32 * b}u) * ${S4}u + w4];`).join('\n      ')}
      ${ks.map((k) => `{
        let qv = ${p.queryStaged ? `qsm[ql${k} * ${RW4}u + w4]` : `qq[qb${k} + (w4 >> 1u) * 32u + (w4 & 1u)]`};
        ${bs.map((b) => `${acc}${b}[${k}] += dot4I8Packed(qv.x, cv${b}.x) + dot4I8Packed(qv.y, cv${b}.y) + dot4I8Packed(qv.z, cv${b}.z) + dot4I8Packed(qv.w, cv${b}.w);`).join('\n        ')}
      }`).join('\n      ')}
    }`;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> qq: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> qs: array<f32>;
@group(0) @binding(3) var<storage, read> cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> tscale: array<f32>;
${cacheRowWgsl(blockSize)}
${qqWordWgsl(tc)}
${stagedRowFnsWgsl(f, tc)}
var<workgroup> ct: array<vec4<u32>, ${T * S4}>;
${p.queryStaged ? `var<workgroup> qsm: array<vec4<u32>, ${H * RW4}>;` : ''}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  ${tileStartWgsl(T)}
  ${p.queryStaged ? `for (var i = lid; i < ${H * RW4}u; i += ${WG}u) {
    let w4 = i % ${RW4}u;
    qsm[i] = qq[qqWord(r, i / ${RW4}u, 0u) / 4u + (w4 >> 1u) * 32u + (w4 & 1u)];
  }` : ''}
  for (var e = lid; e < ${T * RW}u; e += ${WG}u) {
    let t = e / ${RW}u;
    let w = e % ${RW}u;
    ct[t * ${S4}u + w / 4u][w % 4u] = stagedWord(cacheRow(bt, t0 + min(t, n - 1u)) * ${f.rowWords}u, w);
  }
  workgroupBarrier();
  let hq = lid / 32u;
  let tl = lid % 32u;
  if (hq < ${p.headQuads}u) {
    ${ks.map((k) => `let ql${k} = min(hq * 4u + ${k}u, ${H - 1}u);\n    let qb${k} = qqWord(r, ql${k}, 0u) / 4u;`).join('\n    ')}
    ${bs.map((b) => `var aL${b} = vec4<i32>(0);\n    var aP${b} = vec4<i32>(0);`).join('\n    ')}
    ${loop(0, LW4, 'aL')}
    ${loop(LW4, RW4, 'aP')}
    ${ks.map((k) => `let sq${k} = vec2<f32>(qs[2u * (r * ${tc.headsPadded}u + ql${k})], qs[2u * (r * ${tc.headsPadded}u + ql${k}) + 1u]);`).join('\n    ')}
    ${bs.map((b) => `if (tl + ${32 * b}u < n) {
      let t = t0 + tl + ${32 * b}u;
      let ts = tokenScales(cacheRow(bt, t) * ${f.rowWords}u);
      if (hq == 0u) { tscale[r * stride + t] = ts.x; }
      ${ks.map((k) => `if (hq * 4u + ${k}u < ${H}u) { scores[(r * ${H}u + ql${k}) * stride + t] = f32(aL${b}[${k}]) * sq${k}.x * ts.x + f32(aP${b}[${k}]) * sq${k}.y * ts.y; }`).join('\n      ')}
    }`).join('\n    ')}
  }
}
`;
}

/**
 * Why the tensor-core score pass cannot read this row format, if it cannot: its K steps read whole 32-byte runs of
 * each cache row (past R and r they meet zero query padding), so the last one must end inside the row — a run past
 * it reads the next row, and past the pool's last row the subgroup-matrix load leaves the buffer (on an H100 a
 * 56-byte row, R 40 and r 8, gave wrong scores for the last block's tokens).
 */
export function mla3ScoresTcProblem(f: MlaInt8RowFormat, tc: MlaTcPlan): string | undefined {
  const end = 4 * f.ropeWord + tc.ropePad;
  if (tc.latentPad > 4 * f.ropeWord || end > 4 * f.rowWords) {
    return `the score K steps read ${Math.max(end, tc.latentPad)} bytes of a ${4 * f.rowWords}-byte cache row (R ${f.kvLoraRank}, rope ${f.qkRopeHeadDim}: R must be a multiple of 32 and the rope bytes + 8 of scales at least the rope padded to 32)`;
  }
  return undefined;
}

/**
 * Pass 1 on tensor cores (i8 subgroup matrices), grid (tiles, 1, rows), one subgroup per (16-head tile, 16-token
 * group) of the tile: the left operand is the quantized query's 512-byte tile (16 heads × 32 K, row-major, stride 32:
 * the W8A8 GEMM's activation load), the right one 16 cache rows straight from storage (32 K × 16 tokens, column-major
 * with the row's byte stride: a 16-token group of a block is 16 consecutive rows, so blockSize must be a multiple of
 * 16). Latent and rope K steps accumulate apart; K steps past R or r read the row's next bytes against zero query
 * padding. Same integers as the dot4 form, so the same scores.
 */
export function mla3ScoresTcWgsl(nHeads: number, f: MlaInt8RowFormat, blockSize: number, tc: MlaTcPlan, p: Mla3PassPlan): string {
  if (blockSize % 16 !== 0) throw new Error(`MLA three-pass tensor-core scores: block size ${blockSize} is not a multiple of 16`);
  const problem = mla3ScoresTcProblem(f, tc);
  if (problem) throw new Error(`MLA three-pass tensor-core scores: ${problem}`);
  const H = nHeads;
  const T = p.tile;
  const TT = T / 16;
  const SG = tc.headTiles * TT;
  if (SG > 8) throw new Error(`MLA three-pass tensor-core scores: ${SG} subgroups (at most 8)`);
  const rowBytes = f.rowWords * 4;
  const steps = tc.rowPad / 32;
  const left = 'subgroup_matrix_left<i8, 32, 16>';
  const right = 'subgroup_matrix_right<i8, 16, 32>';
  const result = 'subgroup_matrix_result<i32, 16, 16>';
  const mma = (acc: string, k: number, cacheByte: number) =>
    `${acc} = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<${left}>(&qq, qBase + ${k * 512}u, false, 32u), subgroupMatrixLoad<${right}>(&cache, rowByte + ${cacheByte}u, true, ${rowBytes}u), ${acc});`;
  const lat = [...Array(tc.latentPad / 32).keys()].map((k) => mma('accL', k, 32 * k));
  const rope = [...Array(tc.ropePad / 32).keys()].map((k) => mma('accP', tc.latentPad / 32 + k, 4 * f.ropeWord + 32 * k));
  return /* wgsl */ `enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> qq: array<i32>;
@group(0) @binding(2) var<storage, read> qs: array<f32>;
@group(0) @binding(3) var<storage, read> cache: array<i32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> tscale: array<f32>;
${cacheRowWgsl(blockSize)}
var<workgroup> res: array<i32, ${SG * 512}>;

@compute @workgroup_size(${SG * 32})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  ${tileStartWgsl(T)}
  // Subgroup sg: head tile sg / ${TT}, tokens t0 + (sg % ${TT})·16 …; a group past the context reads the last one's block.
  let first = min(t0 + (sg % ${TT}u) * 16u, ctx - 1u);
  let rowByte = cacheRow(bt, first - first % 16u) * ${rowBytes}u;
  let qBase = (r * ${tc.headTiles}u + sg / ${TT}u) * ${steps * 512}u;
  var accL = ${result}();
  var accP = ${result}();
  ${lat.join('\n  ')}
  ${rope.join('\n  ')}
  subgroupMatrixStore(&res, sg * 512u, accL, false, 16u);
  subgroupMatrixStore(&res, sg * 512u + 256u, accP, false, 16u);
  workgroupBarrier();
  for (var e = lid; e < ${SG * 256}u; e += ${SG * 32}u) {
    let g = e / 256u;
    let el = e % 256u;
    let h = (g / ${TT}u) * 16u + el / 16u;
    let tl = (g % ${TT}u) * 16u + el % 16u;
    if (h < ${H}u && tl < n) {
      let t = t0 + tl;
      let rb = cacheRow(bt, t) * ${f.rowWords}u;
      let ts = vec2<f32>(bitcast<f32>(cache[rb + ${f.scaleWord}u]), bitcast<f32>(cache[rb + ${f.scaleWord + 1}u]));
      let sq = vec2<f32>(qs[2u * (r * ${tc.headsPadded}u + h)], qs[2u * (r * ${tc.headsPadded}u + h) + 1u]);
      scores[(r * ${H}u + h) * stride + t] = f32(res[g * 512u + el]) * sq.x * ts.x + f32(res[g * 512u + 256u + el]) * sq.y * ts.y;
      if (h == 0u) { tscale[r * stride + t] = ts.x; }
    }
  }
}
`;
}

/**
 * Pass 2, grid (heads, rows): the exact max m of the row's scores for the head; then chunks in batches, a thread per
 * token quad of a chunk's windows: p = exp(s − m) and p′ = p · sc_t for its four tokens, the window's max p′ as u32
 * atomics (p′ ≥ 0 orders like its bits), l = Σ p per chunk by a segmented tree, and p′ quantized per window with scale
 * max p′ / 127 — one barrier round a batch of chunks (the chunks of a 512-token row in one) rather than a tree a chunk.
 * Writes p′ to pq (whole windows of the chunk, zero past the context; head rows padded to headRows), the window scales
 * to ps, and m, l to the partials. A non-finite score poisons the head (l = NaN), found from the bits as in the
 * one-pass kernels.
 */
export function mla3SoftmaxWgsl(nHeads: number, R: number, p: Mla3PassPlan): string {
  const H = nHeads;
  const W = p.window;
  const Q = W / 4;
  const ks = [0, 1, 2, 3];
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read> tscale: array<f32>;
@group(0) @binding(3) var<storage, read_write> pq: array<u32>;
@group(0) @binding(4) var<storage, read_write> ps: array<f32>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;
var<workgroup> red: array<vec2<f32>, ${WG}>;
var<workgroup> lsum: array<f32, ${WG}>;
var<workgroup> wmax: array<atomic<u32>, ${WG / Q}>;

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let h = wid.x;
  let r = wid.y;
  let ctx = rowPos(r) + 1u;
  let chunk = min(stepMeta[${META_CHUNK}], ${MLA3_MAX_CHUNK}u);
  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  let stride = ${strideWgsl};
  let sb = (r * ${H}u + h) * stride;
  ${chunkLayoutWgsl(W)}
  var mx = ${NEG_BIG};
  var bad = 0.0;
  for (var t = lid; t < ctx; t += ${WG}u) {
    let s = scores[sb + t];
    mx = max(mx, s);
    bad = select(bad, 1.0, (bitcast<u32>(s) & 0x7f800000u) == 0x7f800000u);
  }
  red[lid] = vec2<f32>(mx, bad);
  workgroupBarrier();
  for (var st = ${WG / 2}u; st > 0u; st >>= 1u) {
    if (lid < st) { red[lid] = max(red[lid], red[lid + st]); }
    workgroupBarrier();
  }
  let m = red[0].x;
  let poisoned = red[0].y > 0.0;
  let nc = (ctx + chunk - 1u) / chunk;
  // A batch: G chunks of QC token quads each (whole windows), one thread a quad.
  let QC = chunkWords;
  let G = ${WG}u / QC;
  let ci = lid / QC;
  let qi = lid % QC;
  for (var c0 = 0u; c0 < nc; c0 += G) {
    if (lid < ${WG / Q}u) { atomicStore(&wmax[lid], 0u); }
    workgroupBarrier();
    let c = c0 + ci;
    let live = ci < G && c < nc;
    let n = select(0u, min(chunk, ctx - c * chunk), live);
    var pp = vec4<f32>(0.0);
    var l = 0.0;
    ${ks.map((k) => `if (4u * qi + ${k}u < n) {
      let t = c * chunk + 4u * qi + ${k}u;
      let pt = exp(scores[sb + t] - m);
      l += pt;
      pp[${k}] = pt * tscale[r * stride + t];
    }`).join('\n    ')}
    if (4u * qi < n) { atomicMax(&wmax[lid / ${Q}u], bitcast<u32>(max(max(pp.x, pp.y), max(pp.z, pp.w)))); }
    lsum[lid] = l;
    workgroupBarrier();
    for (var st = 1u; st < QC; st <<= 1u) {
      if (qi % (2u * st) == 0u && qi + st < QC) { lsum[lid] += lsum[lid + st]; }
      workgroupBarrier();
    }
    // Windows with a token of the chunk write their words (zero past it) and scale.
    if (live && (qi / ${Q}u) * ${W}u < n) {
      let pm = bitcast<f32>(atomicLoad(&wmax[lid / ${Q}u]));
      let inv = select(0.0, 127.0 / pm, pm > 0.0);
      let pbase = (r * ${p.headRows}u + h) * maxChunks + c;
      pq[pbase * chunkWords + qi] = pack4xI8(vec4<i32>(clamp(round(pp * inv), vec4<f32>(-127.0), vec4<f32>(127.0))));
      if (qi % ${Q}u == 0u) { ps[pbase * chunkWindows + qi / ${Q}u] = pm / 127.0; }
    }
    if (live && qi == 0u) {
      let base = (r * ${H}u + h) * maxChunks + c;
      let lc = lsum[lid];
      partials[base * ${R + 2}u] = m;
      partials[base * ${R + 2}u + 1u] = select(lc, bitcast<f32>(bitcast<u32>(lc) | 0x7fc00000u), poisoned);
    }
    workgroupBarrier();
  }
}
`;
}

/**
 * Pass 3, grid (chunks, latent parts, rows): thread = (latent word dq of the part, head part hp); per window the part's
 * cache words of its tokens are staged, four tokens' words transposed into one word per value, and Σ_t p′_t · c_t is a
 * dot4 of p′'s word (4 tokens) with it, summed in i32 over the window; o += f32(O) · ps_window. Writes o to the
 * partials (after m and l).
 */
export function mla3ValuesWgsl(nHeads: number, f: MlaInt8RowFormat, blockSize: number, p: Mla3PassPlan): string {
  const H = nHeads;
  const R = f.kvLoraRank;
  const W = p.window;
  const DQ = p.partWords;
  const HPT = p.headsPerThread;
  const vs = [...Array(HPT).keys()];
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> cache: array<u32>;
@group(0) @binding(2) var<storage, read> pq: array<u32>;
@group(0) @binding(3) var<storage, read> ps: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
${cacheRowWgsl(blockSize)}
${TRANSPOSE4_WGSL}
var<workgroup> cw: array<u32, ${W * DQ}>;
var<workgroup> pqs: array<u32, ${(H * W) / 4}>;
var<workgroup> bounds: vec2<u32>;

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  ${valueStartWgsl(W)}
  let dq = lid % ${DQ}u;
  let hp = lid / ${DQ}u;
  let gw = part * ${DQ}u + dq;
  let valueThread = hp < ${p.headParts}u && gw < ${p.latentWords}u;
  ${vs.map((k) => `let vh${k} = min(hp * ${HPT}u + ${k}u, ${H - 1}u);\n  var o${k} = vec4<f32>(0.0);`).join('\n  ')}
  for (var w0 = bnd.x; w0 < bnd.y; w0 += ${W}u) {
    let n = min(${W}u, bnd.y - w0);
    let wi = (w0 - bnd.x) / ${W}u;
    // Only the window's tokens, in whole quads (p′ is zero past n, so a quad's extra rows may hold anything finite).
    let quads = (n + 3u) / 4u;
    for (var e = lid; e < quads * ${4 * DQ}u; e += ${WG}u) {
      let t = e / ${DQ}u;
      let d = part * ${DQ}u + e % ${DQ}u;
      var v = 0u;
      if (d < ${p.latentWords}u) { v = cache[cacheRow(bt, w0 + min(t, n - 1u)) * ${f.rowWords}u + d]; }
      cw[e] = v;
    }
    for (var e = lid; e < ${(H * W) / 4}u; e += ${WG}u) {
      let h = e / ${W / 4}u;
      pqs[e] = pq[((r * ${p.headRows}u + h) * maxChunks + c) * chunkWords + wi * ${W / 4}u + e % ${W / 4}u];
    }
    workgroupBarrier();
    if (valueThread) {
      ${vs.map((k) => `var acc${k} = vec4<i32>(0);`).join('\n      ')}
      for (var tq = 0u; tq < quads; tq++) {
        let at = 4u * tq * ${DQ}u + dq;
        let cv = transpose4(cw[at], cw[at + ${DQ}u], cw[at + ${2 * DQ}u], cw[at + ${3 * DQ}u]);
        ${vs.map((k) => `{
          let pw = pqs[vh${k} * ${W / 4}u + tq];
          acc${k} += vec4<i32>(dot4I8Packed(pw, cv.x), dot4I8Packed(pw, cv.y), dot4I8Packed(pw, cv.z), dot4I8Packed(pw, cv.w));
        }`).join('\n        ')}
      }
      ${vs.map((k) => `o${k} += vec4<f32>(acc${k}) * ps[((r * ${p.headRows}u + vh${k}) * maxChunks + c) * chunkWindows + wi];`).join('\n      ')}
    }
    workgroupBarrier();
  }
  if (valueThread) {
    ${vs.map((k) => `if (hp * ${HPT}u + ${k}u < ${H}u) {
      let base = ((r * ${H}u + vh${k}) * maxChunks + c) * ${R + 2}u + 2u + 4u * gw;
      for (var d = 0u; d < 4u; d++) {
        if (4u * gw + d < ${R}u) { partials[base + d] = o${k}[d]; }
      }
    }`).join('\n    ')}
  }
}
`;
}

/**
 * How the tensor-core value pass splits a workgroup's tiles (16 heads × 16 latent bytes each): subgroups, tiles a
 * subgroup, and tiles a subgroup stores at once through workgroup memory (what fits beside the staged cache rows).
 */
export function planMla3ValuesTc(nHeads: number, p: Mla3PassPlan, storageLimit: number): { subgroups: number; tilesPerSubgroup: number; storeTiles: number; cacheBytes: number } | string {
  if (p.window % 32 !== 0) return `window ${p.window}: the tensor-core value pass takes 32-token K steps`;
  const partBytes = 4 * p.partWords;
  if (partBytes % 16 !== 0) return `${partBytes} latent bytes a part: a multiple of 16`;
  const tiles = (p.headRows / 16) * (partBytes / 16);
  const subgroups = Math.min(8, tiles);
  if (tiles % subgroups !== 0) return `${tiles} value tiles over ${subgroups} subgroups`;
  const tilesPerSubgroup = tiles / subgroups;
  const cacheBytes = 32 * partBytes;
  let storeTiles = tilesPerSubgroup;
  while (storeTiles > 1 && (tilesPerSubgroup % storeTiles !== 0 || cacheBytes + subgroups * storeTiles * 1024 + 16 > storageLimit)) storeTiles--;
  if (cacheBytes + subgroups * storeTiles * 1024 + 16 > storageLimit) return `value pass on tensor cores: ${cacheBytes + subgroups * 1024} B of workgroup memory, the device allows ${storageLimit}`;
  return { subgroups, tilesPerSubgroup, storeTiles, cacheBytes };
}

/**
 * Pass 3 on tensor cores (i8 subgroup matrices), grid (chunks, latent parts, rows): per window and 32-token K step the
 * part's cache bytes of the 32 tokens are staged in workgroup memory (a K step may span blocks), the left operand is
 * p′ of 16 heads × 32 tokens straight from storage (row-major, a head's p′ of the chunk contiguous: the softmax pass
 * lays p′ out for 16 heads at a time, pad heads zero), the right one the staged 32 tokens × 16 latent bytes
 * (row-major); each window's i32 tile goes through workgroup memory into f32 sums with the window's scale. p′ is zero
 * past the context inside a window, so the staged rows there (the last token's, repeated) add nothing. Same integers as
 * the dot4 value pass, so the same outputs (bench:attention on an H100: max |Δ| 0 at 8 / 32 rows × 512 / 4K), but
 * slower there (717.7 against 410.4 µs for the whole attention at 32 × 4K): each K step stages 32 rows between two
 * barriers for only a few products a subgroup. Off unless int8ValueProducts asks for it.
 */
export function mla3ValuesTcWgsl(nHeads: number, f: MlaInt8RowFormat, blockSize: number, p: Mla3PassPlan, storageLimit: number): string {
  const v = planMla3ValuesTc(nHeads, p, storageLimit);
  if (typeof v === 'string') throw new Error(`MLA three-pass tensor-core values: ${v}`);
  const H = nHeads;
  const R = f.kvLoraRank;
  const W = p.window;
  const HP = p.headRows;
  const PB = 4 * p.partWords;
  const NT = PB / 16;
  const { subgroups: SG, tilesPerSubgroup: TPS, storeTiles: ST } = v;
  const js = [...Array(TPS).keys()];
  const left = 'subgroup_matrix_left<i8, 32, 16>';
  const right = 'subgroup_matrix_right<i8, 16, 32>';
  const result = 'subgroup_matrix_result<i32, 16, 16>';
  // Tile j of subgroup sg: g = sg·TPS + j, head tile g / NT, latent tile g % NT.
  const tileOf = (j: number) => `let g${j} = sg * ${TPS}u + ${j}u;
  let ht${j} = g${j} / ${NT}u;
  let nt${j} = g${j} % ${NT}u;`;
  const rounds = [...Array(TPS / ST).keys()];
  return /* wgsl */ `enable subgroups;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> cache: array<u32>;
@group(0) @binding(2) var<storage, read> pq: array<i32>;
@group(0) @binding(3) var<storage, read> ps: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
${cacheRowWgsl(blockSize)}
var<workgroup> cw: array<i32, ${(32 * PB) / 4}>;
var<workgroup> res: array<i32, ${SG * ST * 256}>;
var<workgroup> bounds: vec2<u32>;

@compute @workgroup_size(${SG * 32})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  ${valueStartWgsl(W)}
  // p′ bytes: head h of (row r, chunk c) starts at ((r·HP + h)·maxChunks + c)·chunkWords·4; heads are maxChunks·chunkWords·4 apart.
  let headStride = maxChunks * chunkWords * 4u;
  ${js.map(tileOf).join('\n  ')}
  var o = array<f32, ${TPS * 8}>();
  for (var w0 = bnd.x; w0 < bnd.y; w0 += ${W}u) {
    let n = min(${W}u, bnd.y - w0);
    let wi = (w0 - bnd.x) / ${W}u;
    ${js.map((j) => `var acc${j} = ${result}();`).join('\n    ')}
    for (var k0 = 0u; k0 < n; k0 += 32u) {
      for (var e = lid; e < ${(32 * PB) / 4}u; e += ${SG * 32}u) {
        let t = e / ${PB / 4}u;
        let d = part * ${p.partWords}u + e % ${PB / 4}u;
        var word = 0u;
        if (d < ${p.latentWords}u) { word = cache[cacheRow(bt, w0 + min(k0 + t, n - 1u)) * ${f.rowWords}u + d]; }
        cw[e] = bitcast<i32>(word);
      }
      workgroupBarrier();
      ${js.map((j) => `acc${j} = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<${left}>(&pq, ((r * ${HP}u + ht${j} * 16u) * maxChunks + c) * chunkWords * 4u + wi * ${W}u + k0, false, headStride), subgroupMatrixLoad<${right}>(&cw, nt${j} * 16u, false, ${PB}u), acc${j});`).join('\n      ')}
      workgroupBarrier();
    }
    ${rounds.map((q) => `${[...Array(ST).keys()].map((i) => `subgroupMatrixStore(&res, (sg * ${ST}u + ${i}u) * 256u, acc${q * ST + i}, false, 16u);`).join('\n    ')}
    workgroupBarrier();
    ${[...Array(ST * 8).keys()].map((i) => {
      const j = q * ST + Math.floor(i / 8);
      const k = i % 8;
      return `o[${j * 8 + k}] += f32(res[sg * ${ST * 256}u + ${i * 32}u + lane]) * ps[((r * ${HP}u + ht${j} * 16u + ${2 * k}u + lane / 16u) * maxChunks + c) * chunkWindows + wi];`;
    }).join('\n    ')}
    workgroupBarrier();`).join('\n    ')}
  }
  ${js.map((j) => [...Array(8).keys()].map((k) => `{
    let h = ht${j} * 16u + ${2 * k}u + lane / 16u;
    let d = part * ${PB}u + nt${j} * 16u + lane % 16u;
    if (h < ${H}u && d < ${R}u) { partials[((r * ${H}u + h) * maxChunks + c) * ${R + 2}u + 2u + d] = o[${j * 8 + k}]; }
  }`).join('\n  ')).join('\n  ')}
}
`;
}

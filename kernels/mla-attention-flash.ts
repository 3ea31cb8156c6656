// Absorbed MLA decode attention over the int8 latent cache in one pass with both products on tensor cores, every
// operand of the cache read straight from storage (no staged rows): the FlashMLA shape on Dawn's i8 subgroup matrices.
//
// Status (H100, 2026-12-06; BENCHMARKS.md "eleventh" and "twelfth pass"): exact — its outputs equal its dot4 form's
// ('flash-dot4', which runs anywhere) bit for bit, and its device test holds both products to the float64 model —
// since p′ reaches the value products through a storage scratch (pqStorage): loaded as a subgroup matrix from the
// workgroup array it read as zeros on the H100 (bench/flash-dump.ts), though the same load is exact in a kernel of its
// own (bench/probe-device.ts --value-loads). Selected by int8Products 'flash' (--mla-int8-attention flash). 32 × 4K:
// 314–323 µs against 355–430 for the dot4 kernel and ~178 for GQA's; slower than dot4 at 8 × 4K and below. Without
// its products the kernel takes 89.5 µs, and the same tiles stream in ~100. 16 subgroups, the latent over two
// workgroups, value products a K step at a time and two score tiles a subgroup were all timed and lost or tied
// (BENCHMARKS.md "twelfth" and "thirteenth pass").
import type { MlaInt8RowFormat } from './mla-kv-int8.ts';
import { NEG_BIG } from './split-merge.ts';
import { mla3ScoresTcProblem } from './mla-attention-3pass.ts';
import { planMlaTc, qqWordWgsl, type MlaTcPlan } from './mla-attention-tc.ts';
import { cacheRowWgsl, metaWgsl, META_MAX_CHUNKS, CHUNK_START_WGSL } from './step-meta.ts';

/**
 * One workgroup per (row, chunk), `subgroups` subgroups of 32 threads, windows of `window` tokens (16 · tokenGroups).
 * Per window, the same integers as the other int8-product kernels (kernels/mla-attention-tc.ts):
 *  1. scores: subgroup sg takes score tile sg (head tile sg / tokenGroups, 16 tokens sg % tokenGroups): the quantized
 *     query's 512-byte tiles (16 heads × 32 K, row-major) against 16 cache rows straight from storage (32 K × 16 tokens,
 *     column-major with the row's byte stride: the three-pass score pass's loads, exact on the H100), latent and rope
 *     K steps apart; the two i32 tiles go to workgroup memory;
 *  2. softmax: threadsPerHead threads a head, tokensPerThread tokens each: the window's online softmax (m, l kept in
 *     registers), p′ = p · sc_t quantized per head with scale max p′ / 127 into workgroup memory;
 *  3. values: subgroup sg owns latent tiles sg · latentTilesPerSubgroup …, for every head tile; per 32-token K step the
 *     right operand is 32 cache rows × 16 latent bytes straight from storage (row-major with the row's byte stride: 32
 *     consecutive rows, so the block size is a multiple of 32 and chunks start on 32-token bounds) and the left one p′
 *     of 16 heads × 32 tokens from this workgroup's slice of a storage scratch (or workgroup memory: pqStorage);
 *     foldLatentTiles latent tiles at a time, each i32 tile goes through workgroup memory into the lane's f32
 *     outputs, o = o · α + f32(O) · ps.
 * Without tensor cores (MlaFlashProducts) the same data flow runs with dot4I8Packed and byte products in place of the
 * subgroup-matrix calls (SwiftShader and CI: the tests hold that form to the float64 model).
 */
export interface MlaFlashPlan {
  headTiles: number;
  headsPadded: number;
  subgroups: number;
  tokenGroups: number;
  window: number;
  latentTiles: number;
  latentTilesPerSubgroup: number;
  foldLatentTiles: number;
  threadsPerHead: number;
  tokensPerThread: number;
  /** i32 words of the shared score / fold scratch. */
  scratchWords: number;
  workgroupBytes: number;
  /** The query layout (qqWordWgsl) the query quantizer and the decode front write. */
  tc: MlaTcPlan;
  /** Tensor-core value products as p′ · C ('rows') or Cᵀ · p′ᵀ ('transposed'); the same integers. */
  valueForm: MlaFlashValueForm;
  /** Score K steps whose loads are issued together before their products. */
  scoreBatch: number;
  /** Score tiles a subgroup computes per window (window = 16 · tokenGroups · scoreTiles): fewer folds and barriers a token. */
  scoreTiles: number;
}

export type MlaFlashValueForm = 'rows' | 'transposed';
/**
 * Defaults of the tensor-core forms, timed while the value products were still wrong on an H100 (bench:attention
 * --block-size 32, 2026-12-06): 'rows' 293–300 µs at 32 × 4K against 'transposed' 302, 97.5 against 152.5 at 8 × 4K;
 * score loads in batches of 1, 6 or 18: 300.6, 296, 300.4.
 */
export const MLA_FLASH_VALUE_FORM: MlaFlashValueForm = 'rows';
export const MLA_FLASH_SCORE_BATCH = 6;
/**
 * The most subgroups a workgroup: 8 (256 threads). 16 (half the f32 outputs a lane, 128-token windows) timed 403.5
 * against 318.1 µs at 32 × 4K on an H100, and the latent split over two workgroups per (row, chunk) 448.7 (BENCHMARKS.md
 * "thirteenth pass"); both were taken out.
 */
const MLA_FLASH_MAX_SUBGROUPS = 8;
/** Score tiles a subgroup per window: 1 (64-token windows at 28 heads; 2 timed 337.7 against 319.9 µs at 32 × 4K on an H100). */
export const MLA_FLASH_SCORE_TILES = 1;
/** p′ through storage by default (MlaFlashProducts.pqStorage): its workgroup-memory loads read zeros on the H100 (bench/flash-dump.ts); through storage exact. */
export const MLA_FLASH_PQ_STORAGE = true;

/** The smallest chunk the kernel takes (its K steps start on 32-token bounds). */
export const MLA_FLASH_MIN_CHUNK = 32;

/** The plan's choices (MlaAttentionTuning's int8Flash* fields); each unset one takes its default. */
export interface MlaFlashOptions {
  valueForm?: MlaFlashValueForm;
  scoreBatch?: number;
  /** The most latent tiles a subgroup folds at a time (default: as many as workgroup memory holds). */
  maxFold?: number;
  scoreTiles?: number;
}

/** The plan for a shape, or why the one-pass tensor-core kernel does not take it. */
export function planMlaFlash(nHeads: number, f: MlaInt8RowFormat, blockSize: number, storageLimit: number, o: MlaFlashOptions = {}): MlaFlashPlan | string {
  const { valueForm = MLA_FLASH_VALUE_FORM, scoreBatch = MLA_FLASH_SCORE_BATCH, maxFold = 8, scoreTiles = MLA_FLASH_SCORE_TILES } = o;
  if (!Number.isInteger(scoreBatch) || scoreBatch < 1) return `score batch ${scoreBatch}: a positive integer`;
  if (scoreTiles !== 1 && scoreTiles !== 2) return `${scoreTiles} score tiles a subgroup: 1 or 2`;
  if (nHeads > 32) return `${nHeads} heads: at most 32 (two 16-head tiles)`;
  if (blockSize % 32 !== 0) return `block size ${blockSize}: the value products read 32 consecutive cache rows, so a multiple of 32 (--block-size 32)`;
  const tc = planMlaTc(nHeads, f, 64);
  if (typeof tc === 'string') return tc;
  const problem = mla3ScoresTcProblem(f, tc);
  if (problem) return problem;
  const HT = tc.headTiles;
  const HP = tc.headsPadded;
  const NT = tc.latentPad / 16;
  let SG = MLA_FLASH_MAX_SUBGROUPS;
  while (SG > 1 && (NT % SG !== 0 || SG % HT !== 0)) SG /= 2;
  if (NT % SG !== 0 || SG % HT !== 0) return `${NT} latent tiles and ${HT} head tiles: no subgroup count of 1–${MLA_FLASH_MAX_SUBGROUPS} divides both`;
  const TG = SG / HT;
  const W = 16 * TG * scoreTiles;
  if (W % 32 !== 0) return `${SG} subgroups over ${HT} head tiles give ${W}-token windows: not a whole 32-token K step`;
  const WG = 32 * SG;
  const TPH = WG / HP;
  const TPT = W / TPH;
  if (!Number.isInteger(TPH) || ![4, 8, 16].includes(TPT)) return `${WG} threads over ${HP} heads × ${W} tokens: not 4, 8 or 16 tokens a thread`;
  const LPS = NT / SG;
  const fixed = HP * W + 2 * 8 * WG + 8 * W + 8 * HP + 16;
  const bytes = (fl: number) => fixed + 4 * SG * Math.max(512 * scoreTiles, fl * HT * 256);
  let FL = Math.min(LPS, maxFold);
  while (FL > 1 && (LPS % FL !== 0 || bytes(FL) > storageLimit)) FL--;
  if (bytes(FL) > storageLimit) return `${bytes(FL)} B of workgroup memory, the device allows ${storageLimit}`;
  return {
    headTiles: HT,
    headsPadded: HP,
    subgroups: SG,
    tokenGroups: TG,
    window: W,
    latentTiles: NT,
    latentTilesPerSubgroup: LPS,
    foldLatentTiles: FL,
    threadsPerHead: TPH,
    tokensPerThread: TPT,
    scratchWords: SG * Math.max(512 * scoreTiles, FL * HT * 256),
    workgroupBytes: bytes(FL),
    tc,
    valueForm,
    scoreBatch,
    scoreTiles,
  };
}

/** Which products run on subgroup matrices (the rest in the dot4 form: one phase alone tells which one a wrong kernel gets wrong). */
export interface MlaFlashProducts {
  scores: boolean;
  values: boolean;
  /** Timing diagnosis only (wrong outputs): leave out the score products, the value products (with their folds), the folds of the value tiles, or both products (the skeleton: loop, scales, softmax, p′). */
  skip?: 'scores' | 'values' | 'fold' | 'products';
  /**
   * p′ in a storage scratch (binding 5, flashPqScratchBytes: one slice per (row, chunk) workgroup) instead of workgroup
   * memory: on the H100 the value products' subgroup-matrix loads of p′ from workgroup memory read zeros.
   */
  pqStorage?: boolean;
  /**
   * Timing diagnosis only (wrong outputs): the tensor-core loads of the score tiles, the value tiles or both at the
   * addresses a tile-by-tile block layout would give them — each 32-token block as 18 pieces of 32 tokens × 32 bytes, so
   * a score tile is 512 contiguous bytes (column-major, stride 32) and so is a value tile read as 16 tokens × 2 latent
   * halves (row-major, stride 16; two products each, against a p′ of 8 heads × 2 halves, to keep the products' count of
   * that form) — to tell whether contiguous loads would pay for a new cache layout before building it.
   */
  tiledProbe?: 'scores' | 'values' | 'both';
  /** Diagnosis only: workgroup (chunk 0, row 0) dumps its first window's value tiles of round 0, p′ and K-step rows (mlaFlashDumpLayout) to binding 5. */
  debug?: boolean;
}

/**
 * Word offsets of the debug dump: round 0's value tiles (every subgroup's, as stored), p′ words, the window's K-step
 * cache rows and n, then per subgroup the operands of its first value product as the tensor cores loaded them (p′ of
 * head tile 0 and K step 0, 16 × 32 bytes row-major; its first latent tile's 32 cache rows × 16 bytes row-major; the
 * 'rows' form on tensor cores only).
 */
export function mlaFlashDumpLayout(p: MlaFlashPlan): { tiles: number; pq: number; rows: number; operands: number; words: number } {
  const tiles = 0;
  const pq = tiles + p.subgroups * p.foldLatentTiles * p.headTiles * 256;
  const rows = pq + (p.headsPadded * p.window) / 4;
  const operands = rows + p.window / 32 + 1;
  return { tiles, pq, rows, operands, words: operands + p.subgroups * 256 };
}

/** Bytes of the p′ storage scratch (MlaFlashProducts.pqStorage) for `rows` rows of up to `maxChunks` chunks. */
export function flashPqScratchBytes(p: MlaFlashPlan, rows: number, maxChunks: number): number {
  return Math.max(16, rows * maxChunks * p.headsPadded * p.window);
}

/** The split kernel, grid (chunks, 1, rows); partials as the other MLA kernels write them ([m, l, o] per head and chunk). */
export function mlaFlashPartialWgsl(nHeads: number, f: MlaInt8RowFormat, blockSize: number, p: MlaFlashPlan, products: MlaFlashProducts): string {
  const tensorCores = products.scores || products.values;
  // Where p′ lives: the workgroup array pq, or this workgroup's slice of the storage scratch pqs (word pqBase on).
  const PQ = products.pqStorage ? 'pqs' : 'pq';
  const PQW = products.pqStorage ? 'pqBase + ' : '';
  const PQB = products.pqStorage ? 'pqBase * 4u + ' : '';
  const tiledScores = products.tiledProbe === 'scores' || products.tiledProbe === 'both';
  const tiledValues = products.tiledProbe === 'values' || products.tiledProbe === 'both';
  if (tiledValues && p.valueForm !== 'rows') throw new Error(`MLA flash attention: the tiled-layout probe of the value loads times the 'rows' value form, not '${p.valueForm}'`);
  const H = nHeads;
  const R = f.kvLoraRank;
  const { headTiles: HT, headsPadded: HP, subgroups: SG, tokenGroups: TG, window: W, latentTilesPerSubgroup: LPS, foldLatentTiles: FL, threadsPerHead: TPH, tokensPerThread: TPT, tc } = p;
  const WG = 32 * SG;
  const rowBytes = 4 * f.rowWords;
  const LW = tc.latentPad / 4;
  const ropeByte = 4 * f.ropeWord;
  const steps = tc.rowPad / 32;
  const KS = W / 32;
  const left = 'subgroup_matrix_left<i8, 32, 16>';
  const right = 'subgroup_matrix_right<i8, 16, 32>';
  const result = 'subgroup_matrix_result<i32, 16, 16>';
  const range = (n: number) => [...Array(n).keys()];

  // Phase 1: this subgroup's score tile s (head tile ht, 16 tokens from g0) into scr[(sg·S + s)·512 …] (latent) and
  // scr[(sg·S + s)·512 + 256 …] (rope). K steps in batches of scoreBatch: every load of a batch issued before its
  // products, so their latencies overlap.
  const S = p.scoreTiles;
  const scoreTc = (s: number) => {
    const ks = [...range(tc.latentPad / 32).map((k) => ({ k, acc: 'accL', byte: 32 * k })), ...range(tc.ropePad / 32).map((k) => ({ k: tc.latentPad / 32 + k, acc: 'accP', byte: ropeByte + 32 * k }))];
    const lines = [`var accL = ${result}();`, `var accP = ${result}();`];
    for (let b0 = 0; b0 < ks.length; b0 += p.scoreBatch) {
      const batch = ks.slice(b0, b0 + p.scoreBatch);
      lines.push('{');
      for (const { k, byte } of batch) {
        lines.push(`  let ql${k} = subgroupMatrixLoad<${left}>(&qq, qBase + ${k * 512}u, false, 32u);`);
        lines.push(tiledScores ? `  let cr${k} = subgroupMatrixLoad<${right}>(&cache, tileByte + ${k * 1024}u, true, 32u);` : `  let cr${k} = subgroupMatrixLoad<${right}>(&cache, rowByte + ${byte}u, true, ${rowBytes}u);`);
      }
      for (const { k, acc } of batch) lines.push(`  ${acc} = subgroupMatrixMultiplyAccumulate(ql${k}, cr${k}, ${acc});`);
      lines.push('}');
    }
    lines.push(`subgroupMatrixStore(&scr, (sg * ${S}u + ${s}u) * 512u, accL, false, 16u);`, `subgroupMatrixStore(&scr, (sg * ${S}u + ${s}u) * 512u + 256u, accP, false, 16u);`);
    return lines.join('\n      ');
  };
  // The same integers: lane element e = lane·8 + i of the 16 × 16 tile (head e / 16, token e % 16), stored row-major.
  const scoreDot4 = (s: number) => `for (var i = 0u; i < 8u; i++) {
        let e = lane * 8u + i;
        let h = ht * 16u + e / 16u;
        let rw = rowByte / 4u + (e % 16u) * ${f.rowWords}u;
        var sL = 0i;
        var sP = 0i;
        for (var w = 0u; w < ${LW}u; w++) { sL += dot4I8Packed(u32(qq[qqWord(r, h, w)]), u32(cache[rw + w])); }
        for (var w = 0u; w < ${tc.ropePad / 4}u; w++) { sP += dot4I8Packed(u32(qq[qqWord(r, h, ${LW}u + w)]), u32(cache[rw + ${f.ropeWord}u + w])); }
        scr[(sg * ${S}u + ${s}u) * 512u + e] = sL;
        scr[(sg * ${S}u + ${s}u) * 512u + 256u + e] = sP;
      }`;

  // Phase 3, round q: latent tiles lt_j = sg·LPS + q·FL + j; tile (ht, j) stored at scr[(sg·FL·HT + j·HT + ht)·256 …].
  const tileIdx = (j: number, ht: number) => j * HT + ht;
  // 'rows': O = p′ · C (p′ of 16 heads × 32 tokens as the left operand, 32 cache rows × 16 latent bytes row-major from
  // storage as the right one); 'transposed': Oᵀ = Cᵀ · p′ᵀ (the cache bytes column-major from storage as the left
  // operand, p′ column-major from workgroup memory as the right one), stored column-major so the tile reads the same.
  // Every load of a round is issued before its products.
  const valuesTc = (q: number) => {
    const lines: string[] = [];
    const T = p.valueForm === 'transposed';
    for (const j of range(FL)) for (const ht of range(HT)) lines.push(`var acc${tileIdx(j, ht)} = ${result}();`);
    for (const ks of range(KS)) lines.push(`let kRow${ks} = rowOfStep(bt, w0, wLast, ${ks}u) * ${rowBytes}u;`);
    for (const ks of range(KS)) {
      for (const ht of range(HT)) lines.push(T ? `let pr${ks}_${ht} = subgroupMatrixLoad<${right}>(&${PQ}, ${PQB}${ht * 16 * W + ks * 32}u, true, ${W}u);` : `let pl${ks}_${ht} = subgroupMatrixLoad<${left}>(&${PQ}, ${PQB}${ht * 16 * W + ks * 32}u, false, ${W}u);`);
      // The tiled form's p′ is twice the bytes (8 heads × 2 halves a tile): a second load of each, 16 bytes on.
      if (tiledValues) for (const ht of range(HT)) lines.push(`let pm${ks}_${ht} = subgroupMatrixLoad<${left}>(&${PQ}, ${PQB}${ht * 16 * W + ks * 32 + 16}u, false, ${W}u);`);
      for (const j of range(FL)) {
        const tile = `(sg * ${LPS}u + ${q * FL + j}u)`;
        if (tiledValues) lines.push(`let cr${ks}_${j} = subgroupMatrixLoad<${right}>(&cache, kRow${ks} + ${tile} * 512u, false, 16u);`);
        else lines.push(T ? `let cl${ks}_${j} = subgroupMatrixLoad<${left}>(&cache, kRow${ks} + ${tile} * 16u, true, ${rowBytes}u);` : `let cr${ks}_${j} = subgroupMatrixLoad<${right}>(&cache, kRow${ks} + ${tile} * 16u, false, ${rowBytes}u);`);
      }
    }
    if (products.debug && !T && q === 0) {
      const o = mlaFlashDumpLayout(p).operands;
      lines.push(`if (c == 0u && r == 0u && w0 == bnd.x) {
        subgroupMatrixStore(&dbg, (${o}u + sg * 256u) * 4u, pl0_0, false, 32u);
        subgroupMatrixStore(&dbg, (${o}u + sg * 256u) * 4u + 512u, cr0_0, false, 16u);
      }`);
    }
    for (const ks of range(KS)) {
      for (const j of range(FL)) {
        for (const ht of range(HT)) {
          const a = `acc${tileIdx(j, ht)}`;
          lines.push(T ? `${a} = subgroupMatrixMultiplyAccumulate(cl${ks}_${j}, pr${ks}_${ht}, ${a});` : `${a} = subgroupMatrixMultiplyAccumulate(pl${ks}_${ht}, cr${ks}_${j}, ${a});`);
          if (tiledValues) lines.push(`${a} = subgroupMatrixMultiplyAccumulate(pm${ks}_${ht}, cr${ks}_${j}, ${a});`);
        }
      }
    }
    for (const j of range(FL)) for (const ht of range(HT)) lines.push(`subgroupMatrixStore(&scr, (sg * ${FL * HT}u + ${tileIdx(j, ht)}u) * 256u, acc${tileIdx(j, ht)}, ${T}, 16u);`);
    return lines.join('\n      ');
  };
  const valuesDot4 = (q: number) => `for (var tj = 0u; tj < ${FL * HT}u; tj++) {
        let lb = (sg * ${LPS}u + ${q * FL}u + tj / ${HT}u) * 16u;
        for (var i = 0u; i < 8u; i++) {
          let e = lane * 8u + i;
          let h = (tj % ${HT}u) * 16u + e / 16u;
          let b = lb + e % 16u;
          var sum = 0i;
          for (var ks = 0u; ks < ${KS}u; ks++) {
            let kw = rowOfStep(bt, w0, wLast, ks) * ${f.rowWords}u;
            for (var k = 0u; k < 32u; k++) {
              let pb = h * ${W}u + ks * 32u + k;
              sum += unpack4xI8(u32(${PQ}[${PQW}pb / 4u]))[pb % 4u] * unpack4xI8(u32(cache[kw + k * ${f.rowWords}u + b / 4u]))[b % 4u];
            }
          }
          scr[(sg * ${FL * HT}u + tj) * 256u + e] = sum;
        }
      }`;
  // Fold round q's tiles: lane's elements lane·8 … lane·8 + 7 of a tile are head ht·16 + lane / 2, latent lt·16 + (lane % 2)·8 + i.
  const fold = (q: number) =>
    range(FL)
      .flatMap((j) =>
        range(HT).map((ht) => {
          const o = ((q * FL + j) * HT + ht) * 8;
          return `{
        let h = ${ht * 16}u + lane / 2u;
        let al = alpha[h];
        let ps = pscale[h];
        let base = (sg * ${FL * HT}u + ${tileIdx(j, ht)}u) * 256u + lane * 8u;
        ${range(8).map((i) => `o[${o + i}] = o[${o + i}] * al + f32(scr[base + ${i}u]) * ps;`).join('\n        ')}
      }`;
        }),
      )
      .join('\n      ');
  const dump = products.debug ? mlaFlashDumpLayout(p) : undefined;
  const dumpWgsl = dump
    ? `if (c == 0u && r == 0u && w0 == bnd.x) {
        for (var i = lid; i < ${dump.pq - dump.tiles}u; i += ${WG}u) { dbg[${dump.tiles}u + i] = scr[i]; }
        for (var i = lid; i < ${dump.rows - dump.pq}u; i += ${WG}u) { dbg[${dump.pq}u + i] = ${PQ}[${PQW}i]; }
        if (lid < ${KS}u) { dbg[${dump.rows}u + lid] = i32(rowOfStep(bt, w0, wLast, lid)); }
        if (lid == 0u) { dbg[${dump.rows + KS}u] = i32(n); }
      }`
    : '';
  const rounds = range(LPS / FL)
    .map((q) => `{
      ${products.values ? valuesTc(q) : valuesDot4(q)}
      workgroupBarrier();
      ${q === 0 ? dumpWgsl : ''}
      ${products.skip === 'fold' ? '' : fold(q)}
      workgroupBarrier();
    }`)
    .join('\n    ');
  const writeOut = range(LPS).flatMap((lt) =>
    range(HT).map((ht) => {
      const o = (lt * HT + ht) * 8;
      return `{
    let h = ${ht * 16}u + lane / 2u;
    let d = (sg * ${LPS}u + ${lt}u) * 16u + (lane % 2u) * 8u;
    if (h < ${H}u) {
      let base = ((r * ${H}u + h) * maxChunks + c) * ${R + 2}u + 2u + d;
      ${range(8).map((i) => `if (d + ${i}u < ${R}u) { partials[base + ${i}u] = o[${o + i}]; }`).join('\n      ')}
    }
  }`;
    }),
  );

  return /* wgsl */ `${tensorCores ? 'enable subgroups;\nenable chromium_experimental_subgroup_matrix;\ndiagnostic(off, chromium_experimental.subgroup_matrix_uniformity);' : ''}
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> qq: array<i32>;
@group(0) @binding(2) var<storage, read> qs: array<f32>;
@group(0) @binding(3) var<storage, read> cache: array<i32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
${products.pqStorage ? '@group(0) @binding(5) var<storage, read_write> pqs: array<i32>;' : ''}
${products.debug ? `@group(0) @binding(${products.pqStorage ? 6 : 5}) var<storage, read_write> dbg: array<i32>;` : ''}
${cacheRowWgsl(blockSize)}
${qqWordWgsl(tc)}
var<workgroup> scr: array<i32, ${p.scratchWords}>;
${products.pqStorage ? '' : `var<workgroup> pq: array<i32, ${(HP * W) / 4}>;`}
var<workgroup> red: array<vec2<f32>, ${WG}>;
var<workgroup> red2: array<vec2<f32>, ${WG}>;
var<workgroup> tokScale: array<vec2<f32>, ${W}>;
var<workgroup> alpha: array<f32, ${HP}>;
var<workgroup> pscale: array<f32, ${HP}>;
var<workgroup> bounds: vec2<u32>;

/**
 * Cache row of K step ks's first token of the window from w0 to wLast (a step wholly past it reads the last token's
 * step: p′ is zero there). Arguments rather than private variables: the subgroup-matrix loads need uniform offsets.
 */
fn rowOfStep(bt: u32, w0: u32, wLast: u32, ks: u32) -> u32 {
  return cacheRow(bt, min(w0 + ks * 32u, wLast - wLast % 32u));
}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, ${tensorCores ? '@builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32, ' : ''}@builtin(workgroup_id) wid: vec3<u32>) {
  ${tensorCores ? '' : 'let sg = lid / 32u;\n  let lane = lid % 32u;'}
  let c = wid.x;
  let r = wid.z;
  ${CHUNK_START_WGSL}
  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  let pqBase = (r * maxChunks + c) * ${(HP * W) / 4}u;
  let ht = sg / ${TG}u;
  let qBase = (r * ${HT}u + ht) * ${steps * 512}u;
  // Softmax thread: head sh, tokens st0 … st0 + ${TPT - 1} of the window.
  let sh = lid / ${TPH}u;
  let sub = lid % ${TPH}u;
  let first = lid - sub;
  let st0 = sub * ${TPT}u;
  // The score tile of (head sh, tokens st0 …): token group st0 / 16 is subgroup (sh / 16)·TG + its remainder's tile s.
  let sa = ((sh / 16u) * ${TG}u + (st0 / 16u) % ${TG}u) * ${S}u + st0 / ${16 * TG}u;
  let se = (sh % 16u) * 16u + st0 % 16u;
  let sq = vec2<f32>(qs[2u * (r * ${HP}u + sh)], qs[2u * (r * ${HP}u + sh) + 1u]);
  var mRun = ${NEG_BIG};
  var lRun = 0.0;
  var o: array<f32, ${LPS * HT * 8}>;

  for (var w0 = bnd.x; w0 < bnd.y; w0 += ${W}u) {
    let n = min(${W}u, bnd.y - w0);
    let wLast = w0 + n - 1u;
    for (var j = lid; j < ${W}u; j += ${WG}u) {
      let rb = cacheRow(bt, w0 + min(j, n - 1u)) * ${f.rowWords}u;
      tokScale[j] = select(vec2<f32>(0.0), vec2<f32>(bitcast<f32>(cache[rb + ${f.scaleWord}u]), bitcast<f32>(cache[rb + ${f.scaleWord + 1}u])), j < n);
    }
    // Phase 1: a group wholly past the window reads the last token's group (its scores are masked below).
    ${range(S).map((s) => `{
      let g0 = min(w0 + (sg % ${TG}u + ${s * TG}u) * 16u, wLast - wLast % 16u);
      let rowByte = cacheRow(bt, g0) * ${rowBytes}u;
      ${tiledScores ? `let tileByte = cacheRow(bt, g0 - g0 % 32u) * ${rowBytes}u + ((g0 % 32u) / 16u) * 512u;` : ''}
      ${products.skip === 'scores' || products.skip === 'products' ? 'if (w0 == 0xffffffffu) { scr[0] = qq[0]; } // keeps the binding' : products.scores ? scoreTc(s) : scoreDot4(s)}
    }`).join('\n    ')}
    workgroupBarrier();

    // Phase 2: the window's softmax for head sh.
    var mx = ${NEG_BIG};
    var bad = 0.0;
    ${range(TPT).map((i) => `let ts${i} = tokScale[st0 + ${i}u];
    let s${i} = f32(scr[sa * 512u + se + ${i}u]) * sq.x * ts${i}.x + f32(scr[sa * 512u + 256u + se + ${i}u]) * sq.y * ts${i}.y;
    if (st0 + ${i}u < n) {
      mx = max(mx, s${i});
      bad = select(bad, 1.0, (bitcast<u32>(s${i}) & 0x7f800000u) == 0x7f800000u);
    }`).join('\n    ')}
    red[lid] = vec2<f32>(mx, bad);
    workgroupBarrier();
    var wm = red[first];
    for (var j = 1u; j < ${TPH}u; j++) { wm = max(wm, red[first + j]); }
    let mNew = max(mRun, wm.x);
    let poisoned = wm.y > 0.0;
    var l = 0.0;
    var pmax = 0.0;
    ${range(TPT).map((i) => `var pp${i} = 0.0;
    if (st0 + ${i}u < n) {
      let pt = exp(s${i} - mNew);
      l += pt;
      pp${i} = pt * ts${i}.x;
      pmax = max(pmax, pp${i});
    }`).join('\n    ')}
    red2[lid] = vec2<f32>(l, pmax);
    workgroupBarrier();
    var tot = red2[first];
    for (var j = 1u; j < ${TPH}u; j++) {
      let u = red2[first + j];
      tot = vec2<f32>(tot.x + u.x, max(tot.y, u.y));
    }
    let al = exp(mRun - mNew);
    let lNew = lRun * al + tot.x;
    lRun = select(lNew, bitcast<f32>(bitcast<u32>(lNew) | 0x7fc00000u), poisoned);
    mRun = mNew;
    if (sub == 0u) {
      alpha[sh] = al;
      pscale[sh] = tot.y / 127.0;
    }
    let inv = select(0.0, 127.0 / tot.y, tot.y > 0.0);
    ${range(TPT / 4).map((qd) => `${PQ}[${PQW}sh * ${W / 4}u + st0 / 4u + ${qd}u] = bitcast<i32>(pack4xI8(vec4<i32>(clamp(round(vec4<f32>(pp${4 * qd}, pp${4 * qd + 1}, pp${4 * qd + 2}, pp${4 * qd + 3}) * inv), vec4<f32>(-127.0), vec4<f32>(127.0)))));`).join('\n    ')}
    ${products.pqStorage ? 'storageBarrier();' : ''}
    workgroupBarrier();

    // Phase 3: the value products, ${FL} latent tile(s) of ${LPS} a round, folded into o.
    ${products.skip === 'values' || products.skip === 'products' ? '' : rounds}
  }

  ${writeOut.join('\n  ')}
  if (sub == 0u && sh < ${H}u) {
    let base = ((r * ${H}u + sh) * maxChunks + c) * ${R + 2}u;
    partials[base] = mRun;
    partials[base + 1u] = lRun;
  }
}
`;
}

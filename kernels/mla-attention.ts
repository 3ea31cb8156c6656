// Absorbed MLA attention over the paged latent cache, split-K (flash-decoding): partial softmax per (row, chunk), then a merge.
//
// Inputs per step row r and head h: qLatent[r, h, 0..R+r) = scale · [q̃_h | RoPE(q_pe,h)] (from the absorption),
// the cache rows [c | RoPE(k_pe)] of the row's sequence at positions 0..pos (written earlier in the same pass).
// score_hj = qLatent[r, h] · row_j; ô_h = Σ_j softmax(score)_hj c_j. Output ô[r, h, 0..R).
//
// One workgroup takes (chunk of context, head split, row) with ALL heads of the row together (head splits only
// past 32 heads, or in the smaller workgroups picked for short chunks, where ô would not fit the registers), so each
// latent row is fetched from memory once per workgroup and used by every head. Inside, it walks the chunk in
// tiles of T tokens:
//   scores:  thread = (head group, b tokens); each keeps A·b accumulators over the whole 576-wide dot product;
//            latent values come straight from the cache into registers; the query is a warp-uniform load, or
//            (qSliceValues) staged slice by slice in workgroup memory;
//   softmax: online, per head, over the tile (max/sum through workgroup memory), rescale factor α per head;
//   ô:       thread = (latent pair, heads), heads × 2 accumulators in registers, P[j][h] broadcast as vec4.
// The merge pass combines the chunks' (max, sum, ô) into ô per head.
// Workgroup memory: P (T × heads f32) + row indices + reductions: ~31 KiB at 28 heads, T = 256.
//
// int8 cache (kernels/mla-kv-int8.ts): the same plan and phases; rows are read a u32 word (4 values) at a time,
// unpack4xI8 → f32 times the row's scale (c's or k_pe's) as they load, so q̃, q_pe, P, softmax and ô stay f32 and the
// split-K merge is the same. The query is always read from memory there (no staged slices).
import type { GpuContext } from './device.ts';
import type { PagedRows } from './kv-write.ts';
import { mlaInt8RowFormat, type MlaInt8RowFormat } from './mla-kv-int8.ts';
import { NEG_BIG, splitKMergeWgsl } from './split-merge.ts';
import type { FusedHeadWeights } from './mla-head-fused.ts';
import { frontGrid, frontRowsPerWorkgroup, mlaFrontWgsl, type FrontRowsPerWorkgroup, type MlaFrontSpec } from './mla-front.ts';
import { backGrid, mlaBackWgsl, type MlaBackSpec } from './mla-back.ts';
import { cacheRowWgsl, metaWgsl, META_MAX_CHUNKS, CHUNK_START_WGSL } from './step-meta.ts';
import { bindBuffers, storageBuffer } from './tensors.ts';
import { mlaTcDumpLayout, mlaTcOnTensorCores, mlaTcPartialWgsl, mlaTcQueryWgsl, planMlaTc, type MlaTcPlan } from './mla-attention-tc.ts';
import { mlaDot4PartialWgsl, planMlaDot4, type Dot4Softmax, type MlaDot4Plan } from './mla-attention-dot4.ts';
import { flashPqScratchBytes, MLA_FLASH_MIN_CHUNK, MLA_FLASH_PQ_STORAGE, mlaFlashDumpLayout, mlaFlashPartialWgsl, planMlaFlash, type MlaFlashPlan, type MlaFlashProducts, type MlaFlashValueForm } from './mla-attention-flash.ts';
import { MLA3_MAX_CHUNK, mla3ScoresTcWgsl, mla3ScoresWgsl, mla3ScratchBytes, mla3SoftmaxWgsl, mla3ValuesTcWgsl, mla3ValuesWgsl, mla3ScoresTcProblem, planMla3Pass, type Mla3PassPlan } from './mla-attention-3pass.ts';

/** The int8-product path of one MlaAttention: query quantizer, split kernel, their scratch and bind groups. */
interface TcPath {
  plan: MlaTcPlan;
  /** The dot4 kernel's plan ('dot4'); absent for the tc kernel and its diagnosis forms. */
  dot4?: MlaDot4Plan;
  tensorCores: boolean;
  queryPipe: GPUComputePipeline;
  partialPipe: GPUComputePipeline;
  qq?: GPUBuffer;
  qs?: GPUBuffer;
  /** The debug dump (tuning.int8Debug). */
  dump?: GPUBuffer;
  rows: number;
  queryGroup?: GPUBindGroup;
  partialGroups: GPUBindGroup[];
  /** int8Products 'three-pass': its passes, scratch and bind groups (steps it cannot take run the dot4 kernel above). */
  three?: ThreePass;
  /** int8Products 'flash' / 'flash-dot4': the one-pass kernel's plan (partialPipe is that kernel). */
  flash?: MlaFlashPlan;
  /** Its p′ storage scratch (MlaFlashProducts.pqStorage), sized by prepare. */
  flashPq?: { buffer?: GPUBuffer; bytes: number };
}

interface ThreePass {
  plan: Mla3PassPlan;
  scoresPipe: GPUComputePipeline;
  softmaxPipe: GPUComputePipeline;
  valuesPipe: GPUComputePipeline;
  /** Bytes each scratch buffer holds (none yet: zeros). */
  capacity: { scores: number; tscale: number; pq: number; ps: number };
  buffers?: { scores: GPUBuffer; tscale: GPUBuffer; pq: GPUBuffer; ps: GPUBuffer };
  scoreGroups: GPUBindGroup[];
  softmaxGroup?: GPUBindGroup;
  valueGroups: GPUBindGroup[];
}

/**
 * The most scratch the three-pass kernels take (scores, p′ and scales); a step needing more (long prompts: every prompt
 * row has its own context) runs the one-pass dot4 kernel.
 */
export const MLA3_MAX_SCRATCH = 256 * 2 ** 20;

export interface MlaAttentionShape {
  nHeads: number;
  kvLoraRank: number;
  qkRopeHeadDim: number;
}

/** The int8 latent row the cache holds: the layout's own (padded) format, or the packed default for the shape. */
function latentRowFormat(layout: PagedRows, s: MlaAttentionShape): MlaInt8RowFormat {
  return layout.mlaInt8 ?? mlaInt8RowFormat(s.kvLoraRank, s.qkRopeHeadDim);
}

export interface MlaAttentionTuning {
  /** Threads per workgroup. */
  workgroupSize: number;
  /** Tokens each thread scores per tile (tile = workgroupSize / headGroups · tokensPerThread). */
  tokensPerThread: number;
  /** Most heads one thread scores (more heads → more head groups). */
  maxHeadsPerThread: number;
  /** Most heads one workgroup holds; past it the heads split over workgroups. */
  maxHeadsPerWorkgroup: number;
  /**
   * 0: every thread loads the query from memory (warp-uniform loads, L1-cached). n > 0: the score loop walks the
   * row in slices of n values (a multiple of 8) and stages each slice of every head's query in workgroup memory.
   */
  qSliceValues: number;
  /**
   * Over an int8 latent cache: 'off' (default) keeps the f32 kernel that unpacks int8 values; 'tensor-cores' runs the
   * int8-product kernel (kernels/mla-attention-tc.ts) on i8 subgroup matrices — experimental: on the H200 its score
   * products disagree with its own dot4 form (0.8–1.3 of max |y|; the value products agree exactly, and the score
   * tiles alone agree in bench/probe-device.ts), and it took ~1.2 ms at 32 × 4K, so nothing selects it by default; 'emulate'
   * runs that kernel's integer arithmetic with dot4I8Packed (tests, and the reference the tensor-core form must match);
   * 'tc-scores-bare' runs the scores on tensor cores and skips the value products (outputs zero; the split partials'
   * m and l, which depend on the scores alone, show whether the score phase is right on its own: diagnosis only);
   * 'tc-scores' / 'tc-values' run only the score or only the value products on tensor cores (to find which phase
   * disagrees with the dot4 form); 'dot4' runs the same integer arithmetic in kernels/mla-attention-dot4.ts, laid out
   * for speed rather than to mirror the tensor-core tiles (its window is the largest multiple of 32 up to int8Window
   * whose workgroup memory the device has); 'three-pass' the same arithmetic in three passes (scores, softmax, values:
   * kernels/mla-attention-3pass.ts) for steps whose scratch fits MLA3_MAX_SCRATCH with chunks of at most 512 tokens,
   * and the dot4 kernel for the others; 'flash' one pass with both products on tensor cores, every cache operand read
   * straight from storage (kernels/mla-attention-flash.ts: needs i8 subgroup matrices, 32-wide subgroups, a block size
   * that is a multiple of 32 and chunks of a multiple of 32 tokens; exact on the H100 with p′ through storage, the
   * default; faster than dot4 from ~128K cached tokens a step); 'flash-dot4' that kernel's data flow with dot4I8Packed
   * (any adapter: what the CI tests hold to the float64 model).
   */
  int8Products: 'off' | 'tensor-cores' | 'emulate' | 'tc-scores' | 'tc-values' | 'tc-scores-bare' | 'dot4' | 'three-pass' | 'flash' | 'flash-dot4';
  /** Tokens per softmax window of the int8-product kernel (a multiple of 32; workgroup memory grows with it). */
  int8Window: number;
  /** 'dot4': stage the quantized query in workgroup memory (default: where it fits) or read it from storage. */
  int8QueryStaged?: boolean;
  /** 'dot4': workgroups per (row, chunk) along heads (default 1; 2 doubles the workgroups of a small batch). */
  int8HeadSplits?: number;
  /**
   * 'dot4': load the next window's cache rows into registers while this one is computed (MlaDot4Plan.prefetch; default
   * DOT4_PREFETCH, on).
   */
  int8Prefetch?: boolean;
  /** 'dot4': rounds of the value phase (MlaDot4Plan.valueRounds; default DOT4_VALUE_ROUNDS, 2). */
  int8ValueRounds?: number;
  /**
   * 'dot4': the window softmax (MlaDot4Plan.softmax; default 'workgroup'); 'subgroup' needs 32-wide subgroups,
   * 'emulated' runs anywhere.
   */
  int8Softmax?: Dot4Softmax;
  /** Diagnosis only: the int8-product kernel dumps its first score window of (chunk 0, row 0) (int8DebugDump). */
  int8Debug?: boolean;
  /** 'three-pass': workgroups along the latent in the value pass (default MLA3_LATENT_PARTS). */
  int8LatentParts?: number;
  /** 'three-pass': tokens a score workgroup takes (32 or 64; default MLA3_SCORE_TILE). */
  int8ScoreTile?: number;
  /**
   * 'three-pass': the score products as dot4I8Packed or on tensor cores (i8 subgroup matrices reading the cache rows
   * from storage; needs them, 32-wide subgroups, a block size that is a multiple of 16 and a row whose 32-byte K runs
   * end inside it: mla3ScoresTcProblem). Unset: tensor cores where the adapter, block size and row allow, else dot4.
   */
  int8ScoreProducts?: 'dot4' | 'tensor-cores';
  /**
   * 'three-pass': the value products as dot4I8Packed (default) or on tensor cores (p′ of 16 heads × 32 tokens against
   * the staged cache bytes of 32 tokens; needs i8 subgroup matrices, 32-wide subgroups and windows of a multiple of 32
   * tokens). On an H100 (bench:attention, 2026-12-06) the tensor-core form was slower: 717.7 against 410.4 µs at
   * 32 × 4K (568.3 with 4 latent parts), 101.7 against 73.6 at 32 × 512 — a staged 32-token K step feeds only 4
   * products a subgroup between two barriers.
   */
  int8ValueProducts?: 'dot4' | 'tensor-cores';
  /** 'three-pass': the most scratch bytes (default MLA3_MAX_SCRATCH); steps needing more run the dot4 kernel. */
  int8MaxScratch?: number;
  /** 'flash', diagnosis: only the score or only the value products on tensor cores (the other in the dot4 form). */
  int8FlashTensorCores?: 'scores' | 'values';
  /** 'flash': the tensor-core value products as p′ · C or Cᵀ · p′ᵀ (default MLA_FLASH_VALUE_FORM). */
  int8FlashValueForm?: MlaFlashValueForm;
  /** 'flash': score K steps whose loads issue together (default MLA_FLASH_SCORE_BATCH). */
  int8FlashScoreBatch?: number;
  /** 'flash': the most latent tiles a subgroup folds at a time (default: as many as workgroup memory holds). */
  int8FlashMaxFold?: number;
  /** 'flash': score tiles a subgroup computes per window, 1 or 2 (2: 128-token windows at 28 heads; default MLA_FLASH_SCORE_TILES). */
  int8FlashScoreTiles?: number;
  /** 'flash', timing diagnosis only (wrong outputs): loads at a tile-by-tile layout's addresses (MlaFlashProducts.tiledProbe). */
  int8FlashTiledProbe?: MlaFlashProducts['tiledProbe'];
  /** 'flash': p′ through a storage scratch rather than workgroup memory (MlaFlashProducts.pqStorage; default MLA_FLASH_PQ_STORAGE). */
  int8FlashPqStorage?: boolean;
  /** 'flash', diagnosis only: dump the first window's value tiles of (chunk 0, row 0) (MlaFlashProducts.debug; int8DebugDump). */
  int8FlashDebug?: boolean;
  /** 'flash', timing diagnosis only (wrong outputs): leave a phase out (MlaFlashProducts.skip). */
  int8FlashSkip?: MlaFlashProducts['skip'];
}

export const DEFAULT_MLA_TUNING: MlaAttentionTuning = {
  workgroupSize: 256,
  tokensPerThread: 2,
  maxHeadsPerThread: 16,
  maxHeadsPerWorkgroup: 32,
  qSliceValues: 0,
  int8Products: 'off',
  int8Window: 64,
};


/** How a shape and tuning map onto threads; exported for the benchmark's report and for tests' coverage checks. */
export interface MlaAttentionPlan {
  /** Workgroups per row along heads, and heads in each. */
  headSplits: number;
  headsPerWorkgroup: number;
  /** Score phase: head groups, heads per group, threads per group, tokens per tile. */
  scoreGroups: number;
  headsPerScoreThread: number;
  threadsPerScoreGroup: number;
  tileTokens: number;
  /** ô phase: head groups, heads per thread (multiple of 4), latent pairs per thread. */
  outGroups: number;
  headsPerOutThread: number;
  pairsPerThread: number;
  /** Heads per P row (P is [tile token][head]). */
  pStride: number;
  /** Row values and whether rows load as 8-value groups (row length a multiple of 8). */
  rowValues: number;
  aligned: boolean;
  /** 8-value groups per staged query slice (0: query read from memory). */
  qSliceGroups: number;
  workgroupBytes: number;
}

export function planMlaAttention(shape: MlaAttentionShape, tuning: MlaAttentionTuning): MlaAttentionPlan {
  const { nHeads, kvLoraRank: R, qkRopeHeadDim: r } = shape;
  const WG = tuning.workgroupSize;
  if (R % 2 !== 0 || r % 2 !== 0) throw new Error(`MLA attention reads values in pairs; kv_lora_rank ${R} and rope dim ${r} must be even`);
  // ô lives in registers: heads × latent pairs per thread × 2. Keep it ≤ 64 floats (a thread of a small workgroup
  // covers more latent pairs, so its workgroup holds fewer heads and the row's heads split over more workgroups).
  const pairsPerThreadMax = Math.ceil(R / 2 / WG);
  const headCap = Math.max(4, Math.floor(32 / pairsPerThreadMax));
  const headSplits = Math.ceil(nHeads / Math.min(tuning.maxHeadsPerWorkgroup, headCap));
  const HW = Math.ceil(nHeads / headSplits);
  const scoreGroups = Math.ceil(HW / tuning.maxHeadsPerThread);
  const headsPerScoreThread = Math.ceil(HW / scoreGroups);
  if (WG < HW || WG < scoreGroups) throw new Error(`MLA attention: a workgroup of ${WG} threads cannot hold ${HW} heads; raise workgroupSize`);
  const threadsPerScoreGroup = Math.floor(WG / scoreGroups);
  const tileTokens = threadsPerScoreGroup * tuning.tokensPerThread;
  const pairs = R / 2;
  const outGroups = pairs >= WG ? 1 : Math.max(1, Math.min(Math.floor(WG / pairs), Math.ceil(HW / 4)));
  const headsPerOutThread = Math.ceil(Math.ceil(HW / outGroups) / 4) * 4;
  const pairsPerThread = Math.ceil(pairs / Math.floor(WG / outGroups));
  const pStride = outGroups * headsPerOutThread;
  const rowValues = R + r;
  const parts = Math.floor(WG / HW);
  if (tuning.qSliceValues % 8 !== 0) throw new Error(`MLA attention: qSliceValues ${tuning.qSliceValues} is not a multiple of 8`);
  const aligned = rowValues % 8 === 0;
  const qSliceGroups = aligned ? Math.min(tuning.qSliceValues, rowValues) / 8 : 0;
  const workgroupBytes = 4 * (tileTokens * pStride + tileTokens + 2 * HW * parts + 3 * HW + 4 + HW * 8 * qSliceGroups);
  return {
    headSplits,
    headsPerWorkgroup: HW,
    scoreGroups,
    headsPerScoreThread,
    threadsPerScoreGroup,
    tileTokens,
    outGroups,
    headsPerOutThread,
    pairsPerThread,
    pStride,
    rowValues,
    aligned,
    qSliceGroups,
    workgroupBytes,
  };
}

/**
 * The score loop over int8 rows: per part (c, then k_pe), whole words as vec4 against the query's two pairs, and a
 * last half word when the part's length is 2 mod 4 (its padding bytes are never multiplied with the next part's
 * query values). Values are scaled as they load: one multiply per value per token, shared by the thread's heads.
 */
function int8Scores(f: MlaInt8RowFormat, as: number[], bs: number[], qBase: (a: number) => string): string {
  const part = (firstWord: number, qPair: number, n: number, scale: string) => {
    const full = Math.floor(n / 4);
    const lines: string[] = [];
    if (full > 0) {
      lines.push(`for (var g = 0u; g < ${full}u; g++) {
        ${bs.map((i) => `let u${i} = vec4<f32>(unpack4xI8(cacheS[rb${i} + ${firstWord}u + g])) * ${scale}${i};`).join('\n        ')}
        ${as
          .map(
            (a) => `let q${a} = vec4<f32>(qLatent[${qBase(a)} + ${qPair}u + 2u * g], qLatent[${qBase(a)} + ${qPair}u + 2u * g + 1u]);
        ${bs.map((i) => `s${a}_${i} += dot(q${a}, u${i});`).join(' ')}`,
          )
          .join('\n        ')}
      }`);
    }
    if (n % 4 !== 0) {
      lines.push(`{
        ${bs.map((i) => `let u${i} = vec4<f32>(unpack4xI8(cacheS[rb${i} + ${firstWord + full}u])).xy * ${scale}${i};`).join('\n        ')}
        ${as
          .map(
            (a) => `let q${a} = qLatent[${qBase(a)} + ${qPair + 2 * full}u];
        ${bs.map((i) => `s${a}_${i} += dot(q${a}, u${i});`).join(' ')}`,
          )
          .join('\n        ')}
      }`);
    }
    return lines.join('\n      ');
  };
  return [
    ...bs.map((i) => `let sc${i} = bitcast<f32>(cacheS[rb${i} + ${f.scaleWord}u]);
      let sp${i} = bitcast<f32>(cacheS[rb${i} + ${f.scaleWord + 1}u]);`),
    part(0, 0, f.kvLoraRank, 'sc'),
    part(f.ropeWord, f.kvLoraRank / 2, f.qkRopeHeadDim, 'sp'),
  ].join('\n      ');
}

function partialWgsl(s: MlaAttentionShape, layout: PagedRows, t: MlaAttentionTuning, p: MlaAttentionPlan): string {
  const WG = t.workgroupSize;
  const nH = s.nHeads;
  const R = s.kvLoraRank;
  const RV = p.rowValues;
  const HW = p.headsPerWorkgroup;
  const T = p.tileTokens;
  const A = p.headsPerScoreThread;
  const B = t.tokensPerThread;
  const TPG = p.threadsPerScoreGroup;
  const Av = p.headsPerOutThread;
  const PPT = p.pairsPerThread;
  const HP = p.pStride;
  const parts = Math.floor(WG / HW);
  const f16 = layout.dtype === 'f16';
  const i8 = layout.dtype === 'int8' ? latentRowFormat(layout, s) : undefined;
  const as = [...Array(A).keys()];
  const bs = [...Array(B).keys()];
  const avs = [...Array(Av).keys()];
  const a4s = [...Array(Av / 4).keys()];
  const ps = [...Array(PPT).keys()];
  const pairsPerGroup = Math.floor(WG / p.outGroups);

  // Score view of the cache: 8-value groups when rows allow, else pairs.
  const scoreCacheDecl = p.aligned
    ? `array<${f16 ? 'vec4<u32>' : 'vec4<f32>'}>`
    : `array<${f16 ? 'u32' : 'vec2<f32>'}>`;
  const groupsPerRow = p.aligned ? RV / 8 : RV / 2;
  const loadGroup = (i: number) =>
    p.aligned
      ? f16
        ? `let w${i} = cacheS[rb${i} + g];
      let ca${i} = vec4<f32>(unpack2x16float(w${i}.x), unpack2x16float(w${i}.y));
      let cb${i} = vec4<f32>(unpack2x16float(w${i}.z), unpack2x16float(w${i}.w));`
        : `let ca${i} = cacheS[rb${i} + 2u * g];
      let cb${i} = cacheS[rb${i} + 2u * g + 1u];`
      : f16
        ? `let cp${i} = unpack2x16float(cacheS[rb${i} + g]);`
        : `let cp${i} = cacheS[rb${i} + g];`;
  const rowBase = (row: string) =>
    i8 ? `${row} * ${i8.rowWords}u` : p.aligned ? (f16 ? `${row} * ${RV / 8}u` : `${row} * ${RV / 4}u`) : `${row} * ${RV / 2}u`;
  const scoreFma = (a: number, i: number) =>
    p.aligned
      ? `s${a}_${i} += dot(q${a}a, ca${i}) + dot(q${a}b, cb${i});`
      : `s${a}_${i} += dot(q${a}, cp${i});`;
  const loadQ = (a: number) =>
    p.aligned
      ? `let q${a}a = qLatent[${qBase(a)} + 2u * g];
      let q${a}b = qLatent[${qBase(a)} + 2u * g + 1u];`
      : `let q${a} = qLatent[${qBase(a)} + g];`;
  const qUnit = p.aligned && !i8 ? 4 : 2;
  // Every score thread's A heads exist (no padded group, no partial head split): address heads as base + constant.
  const exactHeads = HW % A === 0 && HW / A === p.scoreGroups && nH % HW === 0;
  const qBase = (a: number) => (exactHeads ? `qb0 + ${(a * RV) / qUnit}u` : `qb${a}`);
  // Query slices staged in workgroup memory (8-value groups per slice), only on the 8-value path.
  const stage = p.qSliceGroups > 0 && !i8;
  const SG = p.qSliceGroups;
  const sBase = (a: number) => (exactHeads ? `(hs0 + ${a}u) * ${2 * SG}u` : `hs${a} * ${2 * SG}u`);

  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> qLatent: array<vec${qUnit}<f32>>;
@group(0) @binding(2) var<storage, read> cacheS: ${i8 ? 'array<u32>' : scoreCacheDecl};
@group(0) @binding(3) var<storage, read> cacheP: array<${f16 || i8 ? 'u32' : 'vec2<f32>'}>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
${cacheRowWgsl(layout.blockSize)}
var<workgroup> P: array<vec4<f32>, ${(T * HP) / 4}>;
var<workgroup> tileRows: array<u32, ${T}>;
var<workgroup> redMax: array<f32, ${HW * parts}>;
var<workgroup> redSum: array<f32, ${HW * parts}>;
var<workgroup> mRun: array<f32, ${HW}>;
var<workgroup> lRun: array<f32, ${HW}>;
var<workgroup> alpha: array<f32, ${HW}>;
var<workgroup> bounds: vec2<u32>;
${stage ? `var<workgroup> qs: array<vec4<f32>, ${HW * 2 * SG}>;` : ''}

fn setP(j: u32, h: u32, v: f32) {
  let i = j * ${HP}u + h;
  P[i / 4u][i % 4u] = v;
}
fn getP(j: u32, h: u32) -> f32 {
  let i = j * ${HP}u + h;
  return P[i / 4u][i % 4u];
}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let c = wid.x;
  let hBase = wid.y * ${HW}u;
  let r = wid.z;
  ${CHUNK_START_WGSL}
  if (lid < ${HW}u) {
    mRun[lid] = ${NEG_BIG};
    lRun[lid] = 0.0;
  }

  // Score-phase roles: head group sg, token slot tt.
  let sg = lid / ${TPG}u;
  let tt = lid % ${TPG}u;
  let scoring = sg < ${p.scoreGroups}u;
  ${
    exactHeads
      ? `// Head groups tile the heads exactly: one base, constant offsets per head (fewer live registers).
  let hs0 = min(sg, ${p.scoreGroups - 1}u) * ${A}u;
  let qb0 = ((r * ${nH}u + hBase + hs0) * ${RV}u) / ${qUnit}u;`
      : `${as.map((a) => `let hs${a} = min(sg * ${A}u + ${a}u, ${HW - 1}u);`).join('\n  ')}
  ${as.map((a) => `let qb${a} = ((r * ${nH}u + min(hBase + hs${a}, ${nH - 1}u)) * ${RV}u) / ${qUnit}u;`).join('\n  ')}`
  }
  // Softmax roles: head hm, part pm.
  let hm = lid / ${parts}u;
  let pm = lid % ${parts}u;
  // Output roles: head group og (heads og·Av ..), latent pairs pp.
  let og = lid / ${pairsPerGroup}u;
  let pl = lid % ${pairsPerGroup}u;
  let outActive = og < ${p.outGroups}u;
  let hv0 = min(og, ${p.outGroups - 1}u) * ${Av}u;
  ${ps.map((i) => `let pp${i} = pl + ${i * pairsPerGroup}u;`).join('\n  ')}
  ${i8 ? ps.map((i) => `let pw${i} = min(pp${i}, ${R / 2 - 1}u) / 2u;
  let hi${i} = (min(pp${i}, ${R / 2 - 1}u) & 1u) == 1u;`).join('\n  ') : ''}
  ${ps.map((i) => avs.map((a) => `var o${i}_${a} = vec2<f32>(0.0);`).join(' ')).join('\n  ')}

  for (var t0 = bnd.x; t0 < bnd.y; t0 += ${T}u) {
    let n = min(${T}u, bnd.y - t0);
    for (var j = lid; j < n; j += ${WG}u) { tileRows[j] = cacheRow(bt, t0 + j); }
    workgroupBarrier();

    // Scores of this thread's tokens for its heads (whole dot product in registers).
    ${bs.map((i) => `let j${i} = tt + ${i * TPG}u;`).join('\n    ')}
    ${bs.map((i) => `let rb${i} = ${rowBase(`tileRows[min(j${i}, n - 1u)]`)};`).join('\n    ')}
    ${as.map((a) => bs.map((i) => `var s${a}_${i} = 0.0;`).join(' ')).join('\n    ')}
    ${
      stage
        ? `for (var s0 = 0u; s0 < ${groupsPerRow}u; s0 += ${SG}u) {
      // The query slice [8·s0, 8·(s0 + gl)) of every head into workgroup memory, read back as broadcasts.
      let gl = min(${SG}u, ${groupsPerRow}u - s0);
      for (var idx = lid; idx < ${HW}u * 2u * gl; idx += ${WG}u) {
        let h = idx / (2u * gl);
        let c4 = idx % (2u * gl);
        qs[h * ${2 * SG}u + c4] = qLatent[((r * ${nH}u + min(hBase + h, ${nH - 1}u)) * ${RV}u) / 4u + 2u * s0 + c4];
      }
      workgroupBarrier();
      if (scoring) {
        for (var gg = 0u; gg < gl; gg++) {
          let g = s0 + gg;
          ${bs.map(loadGroup).join('\n          ')}
          ${as
            .map(
              (a) => `let q${a}a = qs[${sBase(a)} + 2u * gg];
          let q${a}b = qs[${sBase(a)} + 2u * gg + 1u];
          ${bs.map((i) => scoreFma(a, i)).join(' ')}`,
            )
            .join('\n          ')}
        }
      }
      workgroupBarrier();
    }`
        : i8
          ? `if (scoring) {
      ${int8Scores(i8, as, bs, qBase)}
    }`
          : `if (scoring) {
      for (var g = 0u; g < ${groupsPerRow}u; g++) {
        ${bs.map(loadGroup).join('\n        ')}
        ${as.map((a) => `${loadQ(a)}\n        ${bs.map((i) => scoreFma(a, i)).join(' ')}`).join('\n        ')}
      }
    }`
    }
    if (scoring) {
      ${bs
        .map(
          (i) => `if (j${i} < n) {
        ${as.map((a) => `if (sg * ${A}u + ${a}u < ${HW}u) { setP(j${i}, sg * ${A}u + ${a}u, s${a}_${i}); }`).join('\n        ')}
      }`,
        )
        .join('\n      ')}
    }
    workgroupBarrier();

    // Online softmax over the tile, per head.
    var mNew = ${NEG_BIG};
    if (hm < ${HW}u) {
      var mx = ${NEG_BIG};
      for (var j = pm; j < n; j += ${parts}u) { mx = max(mx, getP(j, hm)); }
      redMax[hm * ${parts}u + pm] = mx;
    }
    workgroupBarrier();
    if (hm < ${HW}u) {
      var tmax = ${NEG_BIG};
      for (var q = 0u; q < ${parts}u; q++) { tmax = max(tmax, redMax[hm * ${parts}u + q]); }
      mNew = max(mRun[hm], tmax);
      var sum = 0.0;
      for (var j = pm; j < n; j += ${parts}u) {
        let e = exp(getP(j, hm) - mNew);
        setP(j, hm, e);
        sum += e;
      }
      redSum[hm * ${parts}u + pm] = sum;
    }
    workgroupBarrier();
    if (hm < ${HW}u && pm == 0u) {
      var tsum = 0.0;
      for (var q = 0u; q < ${parts}u; q++) { tsum += redSum[hm * ${parts}u + q]; }
      let a = exp(mRun[hm] - mNew);
      alpha[hm] = a;
      lRun[hm] = lRun[hm] * a + tsum;
      mRun[hm] = mNew;
    }
    workgroupBarrier();

    // ô += P · c over the tile: this thread's latent pairs for its heads.
    if (outActive) {
      ${avs.map((a) => `let al${a} = alpha[min(hv0 + ${a}u, ${HW - 1}u)];`).join('\n      ')}
      ${ps.map((i) => avs.map((a) => `o${i}_${a} *= al${a};`).join(' ')).join('\n      ')}
      for (var j = 0u; j < n; j++) {
        ${
          i8
            ? `// int8: this thread's pair is half of one word; the row's latent scale goes on as it loads.
        let cw = tileRows[j] * ${i8.rowWords}u;
        let scj = bitcast<f32>(cacheP[cw + ${i8.scaleWord}u]);
        ${ps.map((i) => `let u${i} = vec4<f32>(unpack4xI8(cacheP[cw + pw${i}]));
        let c${i} = select(u${i}.xy, u${i}.zw, hi${i}) * scj;`).join('\n        ')}`
            : `let cw = tileRows[j] * ${RV / 2}u;
        ${ps.map((i) => `let c${i} = ${f16 ? `unpack2x16float(cacheP[cw + min(pp${i}, ${R / 2 - 1}u)])` : `cacheP[cw + min(pp${i}, ${R / 2 - 1}u)]`};`).join('\n        ')}`
        }
        let pb = (j * ${HP}u + hv0) / 4u;
        ${a4s
          .map(
            (q) => `{
          let pv = P[pb + ${q}u];
          ${ps.map((i) => [0, 1, 2, 3].map((e) => `o${i}_${4 * q + e} += pv[${e}] * c${i};`).join(' ')).join('\n          ')}
        }`,
          )
          .join('\n        ')}
      }
    }
    workgroupBarrier();
  }

  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  if (outActive) {
    ${ps
      .map((i) =>
        avs
          .map(
            (a) => `if (hv0 + ${a}u < ${HW}u && hBase + hv0 + ${a}u < ${nH}u && pp${i} < ${R / 2}u) {
      let base = ((r * ${nH}u + hBase + hv0 + ${a}u) * maxChunks + c) * ${R + 2}u + 2u + 2u * pp${i};
      partials[base] = o${i}_${a}.x;
      partials[base + 1u] = o${i}_${a}.y;
    }`,
          )
          .join('\n    '),
      )
      .join('\n    ')}
  }
  if (lid < ${HW}u && hBase + lid < ${nH}u) {
    let base = ((r * ${nH}u + hBase + lid) * maxChunks + c) * ${R + 2}u;
    partials[base] = mRun[lid];
    partials[base + 1u] = lRun[lid];
  }
}`;
}

/**
 * Workgroups the f32 MLA partial pass aims for when the step's chunk size is chosen (buildStepMeta's targetWorkgroups),
 * and the largest chunk (MLA_MAX_CHUNK). Longer chunks win on the H200 (bench:attention --batches 32 --contexts
 * 512,4096 --variants all, 2026-12-04): at 32 × 512, 64-token chunks 124 µs against 238 µs for 32 (target 512); at
 * 32 × 4K, 512-token chunks 659–729 µs against 782 µs for 256.
 */
export const MLA_TARGET_WORKGROUPS = 256;
export const MLA_MAX_CHUNK = 512;
/**
 * The smallest chunk: a split's partials (m, l and 512 f32 of ô for each of 28 heads, ~57 KB) are written and read
 * back by the merge, against 584 B of int8 cache read per token, so chunks of 16 tokens (what MLA_TARGET_WORKGROUPS
 * chose for 8 rows × 512) moved 6× more partial bytes than cache bytes: on the H200 (2026-12-05, 8 × 512,
 * bench:decode --profile) the partial pass took 77 µs a layer and the merge 47 µs.
 */
export const MLA_MIN_CHUNK = 64;

/**
 * The int8-product kernel runs one workgroup per (chunk, row) for all heads, two 64-token windows in a 128-token
 * chunk at 32 × 4K with this target (512-token chunks gave 256 workgroups of 8 windows each: 2 per SM).
 */
export const MLA_TC_TARGET_WORKGROUPS = 1024;
/**
 * The dot4 kernel's target: its splits write 28 × 514 f32 of partials each (57 KB, read back by the merge), and each
 * pays for staging the query and writing those partials, so few long chunks: on an H100 (bench:attention, 2026-12-05)
 * 256 workgroups against 512 took 488.9 against 505.7 µs at 32 × 4K (512-token chunks), 74.8 against 103.6 at
 * 32 × 512, 138.1 against 314.3 at 8 × 4K; 128 against 256 (2026-12-06) 55.2 against 64.2 at 32 × 512 and 29.8
 * against 45.5 at 8 × 512, the same at 32 × 4K (chunks of 512 either way); 64 was slower at 512 tokens (35.1 at
 * 8 × 512, 86.7 at 32 × 512).
 */
export const MLA_DOT4_TARGET_WORKGROUPS = 128;
/**
 * Rows × chunks the three-pass kernels aim for (their value pass runs chunks × latent parts workgroups a row; the
 * score pass is split by tiles whatever the chunk). On an H100 (bench:attention, 2026-12-06, dot4 products) 128
 * against 256 took 99.6 against 125.5 µs at 32 × 512, 68.4 against 106.2 at 8 × 512, 187.2 against 259.8 at 8 × 4K
 * and the same at 32 × 4K (chunks of 512 either way).
 */
export const MLA3_TARGET_WORKGROUPS = 128;
/**
 * Rows × chunks the one-pass tensor-core kernel aims for (int8Products 'flash'): the dot4 kernel's. On an H100
 * (bench:attention --block-size 32, 2026-12-06, its values still wrong) twice the target took 128.6 against 149.8 µs
 * at 8 × 4K but 93.7 against 67.2 at 32 × 512, half of it 44.8 against 56.0 at 8 × 512; 32 × 4K runs 512-token chunks
 * at any of them.
 */
export const MLA_FLASH_TARGET_WORKGROUPS = 128;

/**
 * How a step's context split is sized for the MLA kernel a layout and tuning select: parallel workgroups per row and
 * chunk (head splits of the f32 kernel, 1 for the int8-product kernel) and the workgroups to aim for.
 */
export function mlaSplit(shape: MlaAttentionShape, cacheDtype: string, tuning: Partial<MlaAttentionTuning> = {}): { parallelHeads: number; targetWorkgroups: number; minChunk?: number } {
  const t = { ...DEFAULT_MLA_TUNING, ...tuning };
  if (cacheDtype === 'int8' && t.int8Products !== 'off') {
    if (t.int8Products === 'three-pass') return { parallelHeads: 1, targetWorkgroups: MLA3_TARGET_WORKGROUPS };
    if (t.int8Products === 'flash' || t.int8Products === 'flash-dot4') return { parallelHeads: 1, targetWorkgroups: MLA_FLASH_TARGET_WORKGROUPS, minChunk: MLA_FLASH_MIN_CHUNK };
    if (t.int8Products !== 'dot4') return { parallelHeads: 1, targetWorkgroups: MLA_TC_TARGET_WORKGROUPS };
    const splits = t.int8HeadSplits ?? 1;
    return { parallelHeads: Math.ceil(shape.nHeads / Math.ceil(shape.nHeads / splits)), targetWorkgroups: MLA_DOT4_TARGET_WORKGROUPS };
  }
  return { parallelHeads: planMlaAttention(shape, t).headSplits, targetWorkgroups: MLA_TARGET_WORKGROUPS };
}

/**
 * The decode front (kernels/mla-front.ts) for steps of at most `maxRows` rows, int8 products only: RoPE, the int8
 * latent write, W_UK and the query quantizer in one dispatch, which then replaces the query quantizer (the block skips
 * its RoPE, latent write and absorption for those steps). `layers`: each layer's W_UK buffer.
 */
export interface MlaAttentionFront {
  maxRows: number;
  q: GPUBuffer;
  latent: GPUBuffer;
  table: GPUBuffer;
  spec: Omit<MlaFrontSpec, 'nHeads' | 'format' | 'plan' | 'blockSize' | 'rowsPerWorkgroup'>;
  layers: GPUBuffer[];
}

/**
 * The decode back (kernels/mla-back.ts) for steps of at most `maxRows` rows, any products: the merge and W_UV in one
 * dispatch, which replaces the merge (the block skips its W_UV product for those steps). `layers`: each layer's W_UV.
 */
export interface MlaAttentionBack {
  maxRows: number;
  w: FusedHeadWeights;
  out: GPUBuffer;
  outStride: number;
  outHeadStride: number;
  layers: GPUBuffer[];
}

/** One compiled workgroup size of the partial kernel, with its bind groups (an 'auto' layout is per pipeline). */
interface PartialVariant {
  tuning: MlaAttentionTuning;
  plan: MlaAttentionPlan;
  /** Compiled on first use (SwiftShader takes seconds per variant; most steps need one size). */
  pipeline?: GPUComputePipeline;
  groups: GPUBindGroup[];
}

/**
 * Absorbed attention of every step row over one layer's latent cache. Reads qLatent[r, h, 0..R+r) (already scaled,
 * q_pe roped), the cache (rows [c | k_pe]), writes ô to out[r, h·R .. (h+1)·R) (row stride outStride).
 *
 * The partial kernel comes in workgroup sizes tuning.workgroupSize, /2, /4 (not below 32 threads or the heads):
 * a step uses the smallest whose tile still covers its context chunk, so short contexts (prefill of short prompts,
 * small batches) do not leave most threads of a 512-token tile idle.
 */
export class MlaAttention {
  /** The plan of the largest workgroup (what long-context decode runs). */
  readonly plan: MlaAttentionPlan;
  readonly tuning: MlaAttentionTuning;
  private variants: PartialVariant[] = [];
  private mergePipe: GPUComputePipeline;
  private partials: GPUBuffer | undefined;
  private mergeGroup: GPUBindGroup | undefined;
  private capacity = 0;
  private tc: TcPath | undefined;
  private ranThree = false;
  private readonly layout: PagedRows;
  /** The decode front's pipelines and per-layer bind groups by rows a workgroup (front given, int8 products). */
  private front?: {
    f: MlaAttentionFront;
    /** Per rows-a-workgroup: the kernel's spec and pipeline (built once) and per-layer bind groups. */
    byRows: Map<FrontRowsPerWorkgroup, { spec: MlaFrontSpec; pipe: GPUComputePipeline; groups: GPUBindGroup[] }>;
  };
  /** The decode back's pipelines and per-layer bind groups by rows a workgroup (back given). */
  private back?: {
    b: MlaAttentionBack;
    byRows: Map<FrontRowsPerWorkgroup, { spec: MlaBackSpec; pipe: GPUComputePipeline; groups: GPUBindGroup[] }>;
  };

  constructor(
    private gpu: GpuContext,
    readonly shape: MlaAttentionShape,
    layout: PagedRows,
    private b: { meta: GPUBuffer; qLatent: GPUBuffer; out: GPUBuffer; outStride: number; layerCaches: GPUBuffer[] },
    tuning: Partial<MlaAttentionTuning> = {},
    front?: MlaAttentionFront,
    back?: MlaAttentionBack,
  ) {
    this.tuning = { ...DEFAULT_MLA_TUNING, ...tuning };
    const R = shape.kvLoraRank;
    if (layout.rowValues !== R + shape.qkRopeHeadDim) {
      throw new Error(`MLA cache rows hold ${layout.rowValues} values; kv_lora_rank ${R} + rope dim ${shape.qkRopeHeadDim} expected`);
    }
    if (b.outStride < shape.nHeads * R) throw new Error(`MLA attention output stride ${b.outStride} < ${shape.nHeads} heads × ${R}`);
    if (this.tuning.workgroupSize > gpu.limits.maxComputeInvocationsPerWorkgroup) {
      throw new Error(`MLA attention workgroup of ${this.tuning.workgroupSize} threads exceeds the device's ${gpu.limits.maxComputeInvocationsPerWorkgroup}`);
    }
    const minWg = Math.min(this.tuning.workgroupSize, 32);
    for (let wg = this.tuning.workgroupSize; wg >= minWg && this.variants.length < 3; wg = Math.floor(wg / 2)) {
      let t = { ...this.tuning, workgroupSize: wg };
      let plan = planMlaAttention(shape, t);
      const limit = gpu.limits.maxComputeWorkgroupStorageSize;
      // Many heads on a device with little workgroup memory (SwiftShader: 32 KiB): halve the tile before giving up.
      while (plan.workgroupBytes > limit && t.tokensPerThread > 1) {
        t = { ...t, tokensPerThread: t.tokensPerThread / 2 };
        plan = planMlaAttention(shape, t);
      }
      if (plan.workgroupBytes > limit) {
        throw new Error(
          `MLA attention needs ${plan.workgroupBytes} B of workgroup memory (tile of ${plan.tileTokens} tokens × ${plan.pStride} heads), ` +
            `the device allows ${limit} B; lower tokensPerThread or workgroupSize`,
        );
      }
      this.variants.push({ tuning: t, plan, groups: [] });
    }
    this.layout = layout;
    this.plan = this.variants[0].plan;
    this.tc = this.makeTcPath();
    if (front && front.maxRows > 0 && this.tc) this.front = { f: front, byRows: new Map() };
    if (back && back.maxRows > 0) {
      if (back.w.K !== shape.kvLoraRank) throw new Error(`MLA attention back: W_UV's K ${back.w.K} is not kv_lora_rank ${shape.kvLoraRank}`);
      this.back = { b: back, byRows: new Map() };
    }
    this.mergePipe = gpu.pipeline(`mla-attention merge ${shape.nHeads}h ${R}`, splitKMergeWgsl(shape.nHeads, shape.kvLoraRank, b.outStride));
  }

  /**
   * Whether a step of `rows` rows runs the decode front (the block then skips its RoPE, latent write and absorption):
   * int8 products, a front given, rows within its bound.
   */
  fusesFront(rows: number): boolean {
    return this.front !== undefined && rows <= this.front.f.maxRows;
  }

  /** Whether a step of `rows` rows runs the decode back (merge and W_UV in one dispatch; the block skips W_UV). */
  fusesBack(rows: number): boolean {
    return this.back !== undefined && rows <= this.back.b.maxRows;
  }

  /**
   * Which kernel computes the scores and values (the runner reports it as RunnerDescription.attentionProducts): 'f32',
   * 'int8-tensor-cores', 'int8-dot4' (the fast dot4 kernel), 'int8-three-pass' (the three passes, dot4 for the steps
   * they do not take), 'int8-flash' / 'int8-flash-dot4' (the one-pass tensor-core kernel and its dot4 form) or
   * 'int8-dot4-tc-layout' (the tensor-core kernel's own dot4 form; the same integers throughout).
   */
  get products(): 'f32' | 'int8-tensor-cores' | 'int8-dot4' | 'int8-three-pass' | 'int8-dot4-tc-layout' | 'int8-flash' | 'int8-flash-dot4' {
    if (!this.tc) return 'f32';
    if (this.tc.three) return 'int8-three-pass';
    if (this.tc.flash) return this.tc.tensorCores ? 'int8-flash' : 'int8-flash-dot4';
    return this.tc.tensorCores ? 'int8-tensor-cores' : this.tc.dot4 ? 'int8-dot4' : 'int8-dot4-tc-layout';
  }

  /** The dot4 kernel's plan (int8Products 'dot4'), for reports and tests. */
  get dot4Plan(): MlaDot4Plan | undefined {
    return this.tc?.dot4;
  }

  /** The one-pass tensor-core kernel's plan (int8Products 'flash' / 'flash-dot4'), for reports and tests. */
  get flashPlan(): MlaFlashPlan | undefined {
    return this.tc?.flash;
  }

  private makeTcPath(): TcPath | undefined {
    const { gpu, shape, layout } = this;
    const mode = this.tuning.int8Products;
    if (layout.dtype !== 'int8' || mode === 'off') return undefined;
    const products = {
      scores: mode === 'tensor-cores' || mode === 'tc-scores' || mode === 'tc-scores-bare',
      values: mode === 'tensor-cores' || mode === 'tc-values',
      skipValues: mode === 'tc-scores-bare',
      debug: this.tuning.int8Debug === true,
    };
    const tensorCores = products.scores || products.values;
    if (tensorCores && !mlaTcOnTensorCores(gpu)) {
      throw new Error(`MLA attention: int8Products ${mode} needs i8 subgroup matrices and 32-wide subgroups; this adapter has none`);
    }
    const f = latentRowFormat(this.layout, shape);
    if (mode === 'dot4') return this.makeDot4Path(f);
    if (mode === 'three-pass') return this.makeThreePass(f);
    if (mode === 'flash' || mode === 'flash-dot4') {
      const only = this.tuning.int8FlashTensorCores;
      if (only !== undefined && mode !== 'flash') throw new Error(`MLA attention: int8FlashTensorCores applies to int8Products 'flash'`);
      return this.makeFlashPath(f, { scores: mode === 'flash' && only !== 'values', values: mode === 'flash' && only !== 'scores', skip: this.tuning.int8FlashSkip, tiledProbe: this.tuning.int8FlashTiledProbe, debug: this.tuning.int8FlashDebug === true, pqStorage: this.tuning.int8FlashPqStorage ?? MLA_FLASH_PQ_STORAGE });
    }
    const dot4Only = [this.tuning.int8QueryStaged, this.tuning.int8HeadSplits, this.tuning.int8Prefetch, this.tuning.int8ValueRounds, this.tuning.int8Softmax];
    if (dot4Only.some((v) => v !== undefined)) {
      throw new Error(`MLA attention: int8QueryStaged, int8HeadSplits, int8Prefetch, int8ValueRounds and int8Softmax apply to int8Products 'dot4', not '${mode}'`);
    }
    const plan = planMlaTc(shape.nHeads, f, this.tuning.int8Window);
    if (typeof plan === 'string') throw new Error(`MLA int8-product attention: ${plan}`);
    if (plan.workgroupBytes > gpu.limits.maxComputeWorkgroupStorageSize) {
      throw new Error(`MLA int8-product attention needs ${plan.workgroupBytes} B of workgroup memory, the device allows ${gpu.limits.maxComputeWorkgroupStorageSize}`);
    }
    const key = `${shape.nHeads}h ${shape.kvLoraRank}+${shape.qkRopeHeadDim} bs${layout.blockSize} ${mode} w${plan.window}`;
    return {
      plan,
      tensorCores,
      queryPipe: gpu.pipeline(`mla-attention int8 query ${key}`, mlaTcQueryWgsl(shape.nHeads, f, plan)),
      partialPipe: gpu.pipeline(`mla-attention int8 products ${key}${products.debug ? ' debug' : ''}`, mlaTcPartialWgsl(shape.nHeads, f, layout.blockSize, plan, products)),
      dump: products.debug ? storageBuffer(gpu, 'mla attention int8 debug dump', mlaTcDumpLayout(plan).words * 4) : undefined,
      rows: 0,
      partialGroups: [],
    };
  }

  /** 'flash' / 'flash-dot4': the query quantizer and the one-pass kernel. */
  private makeFlashPath(f: MlaInt8RowFormat, products: MlaFlashProducts): TcPath {
    const { gpu, shape, layout } = this;
    const tensorCores = products.scores || products.values;
    if (tensorCores && !mlaTcOnTensorCores(gpu)) {
      throw new Error(`MLA attention: int8Products 'flash' needs i8 subgroup matrices and 32-wide subgroups; this adapter has none ('flash-dot4' runs anywhere)`);
    }
    const other = [this.tuning.int8QueryStaged, this.tuning.int8HeadSplits, this.tuning.int8Prefetch, this.tuning.int8ValueRounds, this.tuning.int8Softmax, this.tuning.int8Debug];
    if (other.some((v) => v !== undefined && v !== false)) throw new Error(`MLA attention: the dot4 kernel's and the debug dump's options do not apply to int8Products 'flash'`);
    const t = this.tuning;
    const plan = planMlaFlash(shape.nHeads, f, layout.blockSize, gpu.limits.maxComputeWorkgroupStorageSize, {
      valueForm: t.int8FlashValueForm,
      scoreBatch: t.int8FlashScoreBatch,
      maxFold: t.int8FlashMaxFold,
      scoreTiles: t.int8FlashScoreTiles,
    });
    if (typeof plan === 'string') throw new Error(`MLA int8 one-pass tensor-core attention: ${plan}`);
    const key = `${shape.nHeads}h ${shape.kvLoraRank}+${shape.qkRopeHeadDim} bs${layout.blockSize} w${plan.window} sg${plan.subgroups} fold ${plan.foldLatentTiles} ${plan.valueForm} batch ${plan.scoreBatch}`;
    return {
      plan: plan.tc,
      flash: plan,
      tensorCores,
      queryPipe: gpu.pipeline(`mla-attention int8 query ${key}`, mlaTcQueryWgsl(shape.nHeads, f, plan.tc)),
      partialPipe: gpu.pipeline(`mla-attention int8 flash ${key} ${products.scores ? 'tc' : 'dot4'} scores ${products.values ? 'tc' : 'dot4'} values${products.skip ? ` skip ${products.skip}` : ''}${products.pqStorage ? ' pq storage' : ''}${products.tiledProbe ? ` tiled probe ${products.tiledProbe}` : ''}${products.debug ? ' debug' : ''}`, mlaFlashPartialWgsl(shape.nHeads, f, layout.blockSize, plan, products)),
      dump: products.debug ? storageBuffer(gpu, 'mla attention flash debug dump', mlaFlashDumpLayout(plan).words * 4) : undefined,
      flashPq: products.pqStorage ? { bytes: 0 } : undefined,
      rows: 0,
      partialGroups: [],
    };
  }

  /** 'three-pass': the dot4 path (for steps the passes do not take) with the three passes beside it. */
  private makeThreePass(f: MlaInt8RowFormat): TcPath {
    const { gpu, shape, layout } = this;
    const path = this.makeDot4Path(f);
    const window = this.tuning.int8Window;
    const tc = planMlaTc(shape.nHeads, f, window);
    if (typeof tc === 'string') throw new Error(`MLA int8 three-pass attention: ${tc}`);
    const plan = planMla3Pass(shape.nHeads, tc, gpu.limits.maxComputeWorkgroupStorageSize, this.tuning.int8LatentParts, this.tuning.int8ScoreTile);
    if (typeof plan === 'string') throw new Error(`MLA int8 three-pass attention: ${plan}`);
    const key = `${shape.nHeads}h ${shape.kvLoraRank}+${shape.qkRopeHeadDim} bs${layout.blockSize} w${window}`;
    // Unset score products take the tensor cores where the adapter has i8 subgroup matrices and the block size and row
    // suit them; the value products only when asked (int8ValueProducts; mla3ValuesTcWgsl says why a plan cannot).
    const onTc = mlaTcOnTensorCores(gpu);
    const limit = gpu.limits.maxComputeWorkgroupStorageSize;
    const scoresTc = (this.tuning.int8ScoreProducts ?? (onTc && layout.blockSize % 16 === 0 && !mla3ScoresTcProblem(f, tc) ? 'tensor-cores' : 'dot4')) === 'tensor-cores';
    const valuesTc = this.tuning.int8ValueProducts === 'tensor-cores';
    for (const [on, name] of [[scoresTc, 'int8ScoreProducts'], [valuesTc, 'int8ValueProducts']] as const) {
      if (on && !onTc) throw new Error(`MLA int8 three-pass attention: ${name} 'tensor-cores' needs i8 subgroup matrices and 32-wide subgroups; this adapter has none`);
    }
    // The passes read the query the dot4 path's query kernel quantizes (same plan padding at any window).
    path.three = {
      plan,
      scoresPipe: scoresTc
        ? gpu.pipeline(`mla-attention int8 3-pass scores ${key} tile ${plan.tile} tensor cores`, mla3ScoresTcWgsl(shape.nHeads, f, layout.blockSize, tc, plan))
        : gpu.pipeline(`mla-attention int8 3-pass scores ${key} tile ${plan.tile}${plan.queryStaged ? ' q staged' : ''}`, mla3ScoresWgsl(shape.nHeads, f, layout.blockSize, tc, plan)),
      softmaxPipe: gpu.pipeline(`mla-attention int8 3-pass softmax ${key}`, mla3SoftmaxWgsl(shape.nHeads, shape.kvLoraRank, plan)),
      valuesPipe: valuesTc
        ? gpu.pipeline(`mla-attention int8 3-pass values ${key} parts ${plan.latentParts} tensor cores`, mla3ValuesTcWgsl(shape.nHeads, f, layout.blockSize, plan, limit))
        : gpu.pipeline(`mla-attention int8 3-pass values ${key} parts ${plan.latentParts}`, mla3ValuesWgsl(shape.nHeads, f, layout.blockSize, plan)),
      capacity: { scores: 0, tscale: 0, pq: 0, ps: 0 },
      scoreGroups: [],
      valueGroups: [],
    };
    return path;
  }

  /** The three-pass plan (int8Products 'three-pass'), for reports and tests. */
  get threePassPlan(): Mla3PassPlan | undefined {
    return this.tc?.three?.plan;
  }

  /** Whether the last encoded step ran the three passes (else, in 'three-pass' mode, the dot4 kernel). */
  get lastStepThreePass(): boolean {
    return this.ranThree;
  }

  /** Whether the scratch holds a step of this size. */
  private threeFits(rows: number, maxChunks: number, chunkSize: number): boolean {
    const three = this.tc!.three!;
    const need = mla3ScratchBytes(this.shape.nHeads, three.plan, rows, maxChunks, chunkSize);
    return (Object.keys(need) as Array<keyof typeof need>).every((k) => need[k] <= three.capacity[k]);
  }

  /** Sizes the three-pass scratch for a step (grows; none when it would pass int8MaxScratch: such steps run dot4). */
  private prepareThree(rows: number, maxChunks: number, chunkSize: number): void {
    const three = this.tc?.three;
    if (!three || chunkSize > MLA3_MAX_CHUNK || this.threeFits(rows, maxChunks, chunkSize)) return;
    const need = mla3ScratchBytes(this.shape.nHeads, three.plan, rows, maxChunks, chunkSize);
    const sizes = { ...need };
    for (const k of Object.keys(sizes) as Array<keyof typeof sizes>) sizes[k] = Math.max(need[k], three.capacity[k]);
    const total = sizes.scores + sizes.tscale + sizes.pq + sizes.ps;
    if (total > (this.tuning.int8MaxScratch ?? MLA3_MAX_SCRATCH) || Object.values(sizes).some((b) => b > this.gpu.limits.maxStorageBufferBindingSize)) return;
    for (const b of Object.values(three.buffers ?? {})) b.destroy();
    three.buffers = {
      scores: storageBuffer(this.gpu, 'mla attention 3-pass scores', sizes.scores),
      tscale: storageBuffer(this.gpu, 'mla attention 3-pass token scales', sizes.tscale),
      pq: storageBuffer(this.gpu, 'mla attention 3-pass p′', sizes.pq),
      ps: storageBuffer(this.gpu, 'mla attention 3-pass p′ scales', sizes.ps),
    };
    three.capacity = sizes;
    three.scoreGroups = [];
    three.softmaxGroup = undefined;
    three.valueGroups = [];
  }

  /** Records the three passes if this step fits them (returns false: run the dot4 kernel). */
  private encodeThree(pass: GPUComputePassEncoder, layer: number, rows: number, maxChunks: number, chunkSize: number | undefined): boolean {
    const tc = this.tc!;
    const three = tc.three;
    if (!three?.buffers || chunkSize === undefined || chunkSize > MLA3_MAX_CHUNK || !this.threeFits(rows, maxChunks, chunkSize)) return false;
    const { scores, tscale, pq, ps } = three.buffers;
    const { meta, layerCaches } = this.b;
    if (three.scoreGroups.length === 0) {
      three.scoreGroups = layerCaches.map((cache, l) => bindBuffers(this.gpu, three.scoresPipe, `mla attention 3-pass scores layer ${l}`, [meta, tc.qq!, tc.qs!, cache, scores, tscale]));
      three.valueGroups = layerCaches.map((cache, l) => bindBuffers(this.gpu, three.valuesPipe, `mla attention 3-pass values layer ${l}`, [meta, cache, pq, ps, this.partials!]));
    }
    three.softmaxGroup ??= bindBuffers(this.gpu, three.softmaxPipe, 'mla attention 3-pass softmax', [meta, scores, tscale, pq, ps, this.partials!]);
    pass.setPipeline(three.scoresPipe);
    pass.setBindGroup(0, three.scoreGroups[layer]);
    pass.dispatchWorkgroups(Math.ceil((maxChunks * chunkSize) / three.plan.tile), 1, rows);
    pass.setPipeline(three.softmaxPipe);
    pass.setBindGroup(0, three.softmaxGroup);
    pass.dispatchWorkgroups(this.shape.nHeads, rows);
    pass.setPipeline(three.valuesPipe);
    pass.setBindGroup(0, three.valueGroups[layer]);
    pass.dispatchWorkgroups(maxChunks, three.plan.latentParts, rows);
    return true;
  }

  private makeDot4Path(f: MlaInt8RowFormat): TcPath {
    const { gpu, shape, layout } = this;
    if (this.tuning.int8Debug) throw new Error(`MLA attention: int8Debug dumps the tensor-core kernel's tiles; int8Products 'dot4' has none`);
    const limit = gpu.limits.maxComputeWorkgroupStorageSize;
    const softmax = this.tuning.int8Softmax ?? 'workgroup';
    if (softmax === 'subgroup' && !(gpu.features.has('subgroups') && gpu.subgroupSize === 32)) {
      throw new Error(`MLA int8 dot4 attention: int8Softmax 'subgroup' needs 32-wide subgroups; this adapter's are ${gpu.features.has('subgroups') ? gpu.subgroupSize : 'absent'} ('emulated' runs anywhere)`);
    }
    let why = '';
    for (let window = this.tuning.int8Window; window >= 32; window -= 32) {
      const plan = planMlaTc(shape.nHeads, f, window);
      if (typeof plan === 'string') {
        why = plan;
        continue;
      }
      const dot4 = planMlaDot4(shape.nHeads, plan, limit, this.tuning.int8QueryStaged, this.tuning.int8HeadSplits, this.tuning.int8Prefetch, this.tuning.int8ValueRounds, softmax);
      if (typeof dot4 === 'string') {
        why = dot4;
        continue;
      }
      const key = `${shape.nHeads}h ${shape.kvLoraRank}+${shape.qkRopeHeadDim} bs${layout.blockSize} w${window}`;
      const split = dot4.headSplits > 1 ? ` ${dot4.headSplits} head splits` : '';
      return {
        plan,
        dot4,
        tensorCores: false,
        queryPipe: gpu.pipeline(`mla-attention int8 query ${key}`, mlaTcQueryWgsl(shape.nHeads, f, plan)),
        partialPipe: gpu.pipeline(`mla-attention int8 dot4 ${key}${dot4.queryStaged ? ' q staged' : ''}${split}${dot4.prefetch ? ' prefetch' : ''}${dot4.valueRounds > 1 ? ` v${dot4.valueRounds}` : ''}${softmax === 'workgroup' ? '' : ` ${softmax} softmax`}`, mlaDot4PartialWgsl(shape.nHeads, f, layout.blockSize, plan, dot4)),
        rows: 0,
        partialGroups: [],
      };
    }
    throw new Error(`MLA int8 dot4 attention: ${why || `int8Window ${this.tuning.int8Window} is below 32 tokens`}`);
  }

  /**
   * The split partials of the last encoded step, [row][head][chunk][m, l, o(R)] f32 (benchmarks compare kernels by
   * them: m and l depend only on the scores).
   */
  get partialsBuffer(): GPUBuffer | undefined {
    return this.partials;
  }

  /** The int8-product kernel's debug dump and its plan (tuning.int8Debug), for a host check (bench/mla-tc-dump.ts). */
  get int8DebugDump(): { buffer: GPUBuffer; plan: MlaTcPlan } | undefined {
    return this.tc?.dump ? { buffer: this.tc.dump, plan: this.tc.plan } : undefined;
  }

  /** The workgroup size a step with this context chunk runs. */
  variantFor(chunkSize: number): { tuning: MlaAttentionTuning; plan: MlaAttentionPlan } {
    return this.pick(chunkSize);
  }

  private pick(chunkSize: number | undefined): PartialVariant {
    let best = this.variants[0];
    if (chunkSize !== undefined) for (const v of this.variants) if (v.plan.tileTokens >= chunkSize) best = v;
    return best;
  }

  /** Compiles a variant and binds it to the current partials buffer, if not done yet. */
  private ready(v: PartialVariant): Required<PartialVariant> {
    const { shape, layout } = this;
    if (!v.pipeline) {
      const key = `${layout.dtype} ${shape.nHeads}h ${shape.kvLoraRank}+${shape.qkRopeHeadDim} bs${layout.blockSize} ${JSON.stringify(v.tuning)}`;
      v.pipeline = this.gpu.pipeline(`mla-attention partial ${key}`, partialWgsl(shape, layout, v.tuning, v.plan));
    }
    if (v.groups.length === 0 && this.partials) {
      const { meta, qLatent, layerCaches } = this.b;
      v.groups = layerCaches.map((cache, l) =>
        bindBuffers(this.gpu, v.pipeline!, `mla attention partial layer ${l} wg ${v.tuning.workgroupSize}`, [meta, qLatent, cache, cache, this.partials!]),
      );
    }
    return v as Required<PartialVariant>;
  }

  /**
   * Makes room for a step's partial results (call before encoding the step; grows, never shrinks); chunkSize (the
   * step's META_CHUNK) sizes the three-pass scratch (unknown: chunks of MLA3_MAX_CHUNK).
   */
  prepare(rows: number, maxChunks: number, chunkSize?: number): void {
    const tc = this.tc;
    if (tc && rows > tc.rows) {
      tc.qq?.destroy();
      tc.qs?.destroy();
      tc.rows = Math.max(rows, Math.ceil(tc.rows * 1.5));
      tc.qq = storageBuffer(this.gpu, 'mla attention int8 queries', tc.rows * tc.plan.headsPadded * tc.plan.rowPad);
      tc.qs = storageBuffer(this.gpu, 'mla attention int8 query scales', tc.rows * tc.plan.headsPadded * 8);
      tc.queryGroup = bindBuffers(this.gpu, tc.queryPipe, 'mla attention int8 query', [this.b.qLatent, tc.qq, tc.qs]);
      tc.partialGroups = [];
      if (tc.three) tc.three.scoreGroups = [];
      for (const e of this.front?.byRows.values() ?? []) e.groups = [];
    }
    this.prepareThree(rows, maxChunks, chunkSize ?? MLA3_MAX_CHUNK);
    if (tc?.flash && tc.flashPq) {
      const need = flashPqScratchBytes(tc.flash, rows, maxChunks);
      if (need > tc.flashPq.bytes) {
        tc.flashPq.buffer?.destroy();
        tc.flashPq.bytes = Math.max(need, Math.ceil(tc.flashPq.bytes * 1.5));
        tc.flashPq.buffer = storageBuffer(this.gpu, 'mla attention flash p′', tc.flashPq.bytes);
        tc.partialGroups = [];
      }
    }
    const need = rows * this.shape.nHeads * maxChunks * (this.shape.kvLoraRank + 2);
    if (this.partials && need <= this.capacity) return;
    this.partials?.destroy();
    this.capacity = Math.max(need, Math.ceil(this.capacity * 1.5));
    this.partials = storageBuffer(this.gpu, 'mla attention partials', this.capacity * 4);
    for (const v of this.variants) {
      v.groups = [];
      if (v.pipeline) this.ready(v);
    }
    this.mergeGroup = bindBuffers(this.gpu, this.mergePipe, 'mla attention merge', [this.b.meta, this.partials, this.b.out]);
    for (const e of this.back?.byRows.values() ?? []) e.groups = [];
    if (this.tc) this.tc.partialGroups = [];
    if (this.tc?.three) {
      this.tc.three.scoreGroups = [];
      this.tc.three.softmaxGroup = undefined;
    }
  }

  /** Records the partial and merge passes; chunkSize (the step's META_CHUNK) picks the workgroup size. */
  encode(pass: GPUComputePassEncoder, layer: number, rows: number, maxChunks: number, chunkSize?: number): void {
    if (!this.partials || rows * this.shape.nHeads * maxChunks * (this.shape.kvLoraRank + 2) > this.capacity) {
      throw new Error(`MlaAttention.encode: call prepare(${rows}, ${maxChunks}) before encoding the step`);
    }
    if (rows <= 0) return;
    const tc = this.tc;
    if (tc?.flash && (chunkSize === undefined || chunkSize % MLA_FLASH_MIN_CHUNK !== 0)) {
      throw new Error(`MlaAttention.encode: the one-pass tensor-core kernel takes chunks of a multiple of ${MLA_FLASH_MIN_CHUNK} tokens, got ${chunkSize ?? 'none'} (mlaSplit's minChunk)`);
    }
    if (tc) {
      if (!tc.qq || rows > tc.rows) throw new Error(`MlaAttention.encode: call prepare(${rows}, ${maxChunks}) before encoding the step`);
      if (tc.partialGroups.length === 0) {
        tc.partialGroups = this.b.layerCaches.map((cache, l) =>
          bindBuffers(this.gpu, tc.partialPipe, `mla attention int8 products layer ${l}`, [this.b.meta, tc.qq!, tc.qs!, cache, this.partials!, ...(tc.flashPq?.buffer ? [tc.flashPq.buffer] : []), ...(tc.dump ? [tc.dump] : [])]),
        );
      }
      if (this.fusesFront(rows)) {
        this.encodeFront(pass, layer, rows, tc);
      } else {
        pass.setPipeline(tc.queryPipe);
        pass.setBindGroup(0, tc.queryGroup!);
        pass.dispatchWorkgroups(tc.plan.headsPadded, rows);
      }
      this.ranThree = this.encodeThree(pass, layer, rows, maxChunks, chunkSize);
      if (!this.ranThree) {
        pass.setPipeline(tc.partialPipe);
        pass.setBindGroup(0, tc.partialGroups[layer]);
        pass.dispatchWorkgroups(maxChunks, tc.dot4?.headSplits ?? 1, rows);
      }
    } else {
      const v = this.ready(this.pick(chunkSize));
      pass.setPipeline(v.pipeline);
      pass.setBindGroup(0, v.groups[layer]);
      pass.dispatchWorkgroups(maxChunks, v.plan.headSplits, rows);
    }
    if (this.fusesBack(rows)) {
      this.encodeBack(pass, layer, rows);
      return;
    }
    pass.setPipeline(this.mergePipe);
    pass.setBindGroup(0, this.mergeGroup!);
    pass.dispatchWorkgroups(this.shape.nHeads, rows);
  }

  /** The decode front of a step (fusesFront): its int8 queries and the layer's latent rows, one dispatch. */
  private encodeFront(pass: GPUComputePassEncoder, layer: number, rows: number, tc: TcPath): void {
    const fr = this.front!;
    const G = frontRowsPerWorkgroup(this.shape.nHeads, rows);
    let e = fr.byRows.get(G);
    if (!e) {
      const spec: MlaFrontSpec = {
        ...fr.f.spec,
        nHeads: this.shape.nHeads,
        format: latentRowFormat(this.layout, this.shape),
        plan: tc.plan,
        blockSize: this.layout.blockSize,
        rowsPerWorkgroup: G,
      };
      const key = `${this.shape.nHeads}h ${this.shape.kvLoraRank}+${this.shape.qkRopeHeadDim} W_UK ${spec.dn} ${spec.w.dtype} bs${spec.blockSize} g${G}`;
      e = { spec, pipe: this.gpu.pipeline(`mla decode front ${key}`, mlaFrontWgsl(spec)), groups: [] };
      fr.byRows.set(G, e);
    }
    e.groups[layer] ??= bindBuffers(this.gpu, e.pipe, `mla decode front layer ${layer}`, [
      this.b.meta,
      fr.f.q,
      fr.f.latent,
      fr.f.table,
      fr.f.layers[layer],
      this.b.layerCaches[layer],
      tc.qq!,
      tc.qs!,
    ]);
    pass.setPipeline(e.pipe);
    pass.setBindGroup(0, e.groups[layer]);
    const [x, y] = frontGrid(e.spec, rows);
    pass.dispatchWorkgroups(x, y);
  }

  /** The decode back of a step (fusesBack): the merge and W_UV, one dispatch. */
  private encodeBack(pass: GPUComputePassEncoder, layer: number, rows: number): void {
    const bk = this.back!;
    const G = frontRowsPerWorkgroup(this.shape.nHeads, rows);
    let e = bk.byRows.get(G);
    if (!e) {
      const spec: MlaBackSpec = {
        nHeads: this.shape.nHeads,
        width: this.shape.kvLoraRank,
        w: bk.b.w,
        outStride: bk.b.outStride,
        outHeadStride: bk.b.outHeadStride,
        rowsPerWorkgroup: G,
      };
      e = { spec, pipe: this.gpu.pipeline(`mla decode back ${this.shape.nHeads}h ${spec.width} W_UV ${spec.w.N} ${spec.w.dtype} g${G}`, mlaBackWgsl(spec)), groups: [] };
      bk.byRows.set(G, e);
    }
    e.groups[layer] ??= bindBuffers(this.gpu, e.pipe, `mla decode back layer ${layer}`, [this.b.meta, this.partials!, bk.b.layers[layer], bk.b.out]);
    pass.setPipeline(e.pipe);
    pass.setBindGroup(0, e.groups[layer]);
    pass.dispatchWorkgroups(...backGrid(e.spec, rows));
  }

  destroy(): void {
    this.partials?.destroy();
    this.tc?.qq?.destroy();
    this.tc?.qs?.destroy();
    this.tc?.dump?.destroy();
    this.tc?.flashPq?.buffer?.destroy();
    for (const b of Object.values(this.tc?.three?.buffers ?? {})) b.destroy();
  }
}

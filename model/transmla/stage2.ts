// TransMLA Stage 2: balanced K/V (BKV α) + joint K/V PCA of the Stage-1 model's latent keys and values, written as
// DeepSeek MLA weights (q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj), exactly as ../shared/docs/transmla.md states.
import type { GqaConfig, MlaConfig } from '../config.ts';
import type { DenseMatrix } from '../reference/ops.ts';
import type { MlaLayerLike, MlaModelLike } from '../reference/mla.ts';
import type { LatentModelWeights } from '../reference/stage1.ts';
import { dampDiagonal, symmetricEigen } from './eigen.ts';

export interface Stage2Options {
  ropeDim: number;
  kvLoraRank: number;
  /** Low-rank query (q_a_proj/q_b_proj) of this rank from the PCA of the query outputs; null: full q_proj. */
  qLoraRank?: number | null;
}

export interface Stage2Result {
  config: MlaConfig;
  /** Exact (f64) MLA weights; round to f32 with mlaWeightsToF32 before writing. */
  weights: MlaModelLike;
  /** BKV α per layer. */
  alphas: number[];
  /** Fraction of the damped joint K/V spectrum kept by the first R components, per layer (diagnostic). */
  energyKept: number[];
}

/** The largest kv_lora_rank the method allows: 2L − r. */
export function maxKvLoraRank(config: GqaConfig, ropeDim: number): number {
  return 2 * config.nKvHeads * config.headDim - ropeDim;
}

/** Checks R (and the q LoRA rank) against the model, with the numbers in the message. */
export function checkRanks(config: GqaConfig, ropeDim: number, kvLoraRank: number, qLoraRank: number | null): void {
  const max = maxKvLoraRank(config, ropeDim);
  if (!Number.isInteger(kvLoraRank) || kvLoraRank < 1 || kvLoraRank > max) {
    throw new Error(
      `kv_lora_rank R = ${kvLoraRank} is impossible: it must be an integer in 1 … 2L − r = 2·${config.nKvHeads}·${config.headDim} − ${ropeDim} = ${max} ` +
        `(the joint K/V space has only ${max} dimensions)`,
    );
  }
  if (qLoraRank !== null) {
    const qRows = config.nHeads * (config.headDim + ropeDim);
    const cap = Math.min(qRows, config.dim);
    if (!Number.isInteger(qLoraRank) || qLoraRank < 1 || qLoraRank > cap) {
      throw new Error(`q_lora_rank ${qLoraRank} must be an integer in 1 … min(n_q·(d + r), hidden) = min(${qRows}, ${config.dim}) = ${cap}`);
    }
    if (config.attentionBias) {
      throw new Error(`--q-lora-rank is not available for models with q biases (${config.arch}): DeepSeek's q_a_proj/q_b_proj carry no bias; convert without it`);
    }
  }
}

/** The MLA config a conversion produces. */
export function convertedConfig(config: GqaConfig, opts: Stage2Options): MlaConfig {
  return {
    arch: 'deepseek_v3',
    attention: 'mla',
    dim: config.dim,
    hiddenDim: config.hiddenDim,
    nLayers: config.nLayers,
    nHeads: config.nHeads,
    vocabSize: config.vocabSize,
    maxSeqLen: config.maxSeqLen,
    ropeTheta: config.ropeTheta,
    rmsEps: config.rmsEps,
    tiedEmbeddings: config.tiedEmbeddings,
    bosId: config.bosId,
    eosId: config.eosId,
    kvLoraRank: opts.kvLoraRank,
    qLoraRank: opts.qLoraRank ?? null,
    qkRopeHeadDim: opts.ropeDim,
    qkNopeHeadDim: config.headDim,
    vHeadDim: config.headDim,
    attentionBias: config.attentionBias,
    qkLatentLayernorm: false,
    ropeLayout: 'interleaved',
    softmaxScale: 1 / Math.sqrt(config.headDim + opts.ropeDim),
  };
}

function mat(rows: number, cols: number): DenseMatrix & { data: Float64Array } {
  return { shape: [rows, cols], data: new Float64Array(rows * cols) };
}

/**
 * Builds the MLA model from the Stage-1 model and, per layer, the Gram matrix of [k' ; v] (2L×2L, pre-RoPE rotated
 * latent keys then values, biases included) gathered by running the Stage-1 model on calibration text. inputGrams
 * (Σ xn xnᵀ per layer, dim×dim) are needed only for a low-rank query.
 */
export function buildMla(
  config: GqaConfig,
  stage1: LatentModelWeights,
  kvGrams: Float64Array[],
  opts: Stage2Options,
  inputGrams?: Float64Array[],
  onLayer?: (done: number) => void,
): Stage2Result {
  const r = opts.ropeDim;
  const R = opts.kvLoraRank;
  const qLoraRank = opts.qLoraRank ?? null;
  checkRanks(config, r, R, qLoraRank);
  if (qLoraRank !== null && (!inputGrams || inputGrams.length !== config.nLayers)) {
    throw new Error(`buildMla: a q LoRA rank needs one input Gram per layer (${config.nLayers})`);
  }
  const d = config.headDim;
  const D = config.dim;
  const nQ = config.nHeads;
  const L = config.nKvHeads * d;
  const group = nQ / config.nKvHeads;
  const n = 2 * L - r; // joint no-rope key + value width
  const s = Math.sqrt((d + r) / d);
  const alphas: number[] = [];
  const energyKept: number[] = [];

  const layers: MlaLayerLike[] = stage1.layers.map((l, li) => {
    const g = kvGrams[li];
    if (g.length !== 4 * L * L) throw new Error(`buildMla: layer ${li} K/V Gram has ${g.length} values, 2L = ${2 * L} needs ${4 * L * L}`);
    // BKV: α = mean column norm of K[:, r:] over mean column norm of V[:, r:] (column norm² = Gram diagonal).
    let kNorm = 0;
    let vNorm = 0;
    for (let i = r; i < L; i++) {
      kNorm += Math.sqrt(g[i * 2 * L + i]);
      vNorm += Math.sqrt(g[(L + i) * 2 * L + L + i]);
    }
    const alpha = vNorm > 0 && kNorm > 0 ? kNorm / vNorm : 1;
    alphas.push(alpha);
    // Joint coordinates z = [k'[r:]/α ; v]: index t < L − r is key coordinate r + t, the rest are values.
    const src = (t: number) => (t < L - r ? r + t : L + (t - (L - r)));
    const zScale = (t: number) => (t < L - r ? 1 / alpha : 1);
    const h = new Float64Array(n * n);
    for (let i = 0; i < n; i++) for (let k = 0; k < n; k++) h[i * n + k] = g[src(i) * 2 * L + src(k)] * zScale(i) * zScale(k);
    dampDiagonal(h, n);
    const eig = symmetricEigen(h, n);
    const rkv = eig.vectors; // n×n, column p = component p
    let total = 0;
    let kept = 0;
    for (let p = 0; p < n; p++) {
      total += eig.values[p];
      if (p < R) kept += eig.values[p];
    }
    energyKept.push(total > 0 ? kept / total : 1);

    // Joint weight rows W_z [n, D] and bias b_z [n] (the bias is the extra input column, projected like a weight).
    const wk = l.wk.data;
    const wv = l.wv.data;
    const hasBias = !!(l.bk || l.bv);
    const wz = (t: number, j: number) => (t < L - r ? wk[(r + t) * D + j] / alpha : wv[(t - (L - r)) * D + j]);
    const bz = (t: number) => (t < L - r ? (l.bk ? l.bk.data[r + t] : 0) / alpha : l.bv ? l.bv.data[t - (L - r)] : 0);

    // kv_a_proj_with_mqa [R + r, D] = [ (R_kvᵀ W_z)[:R] ; W_K'[:r] ].
    const kvA = mat(R + r, D);
    const kvABias = hasBias ? mat(R + r, 1) : null;
    for (let p = 0; p < R; p++) {
      const row = p * D;
      let bsum = 0;
      for (let t = 0; t < n; t++) {
        const u = rkv[t * n + p];
        if (u === 0) continue;
        for (let j = 0; j < D; j++) kvA.data[row + j] += u * wz(t, j);
        bsum += u * bz(t);
      }
      if (kvABias) kvABias.data[p] = bsum;
    }
    for (let m = 0; m < r; m++) {
      for (let j = 0; j < D; j++) kvA.data[(R + m) * D + j] = wk[m * D + j];
      if (kvABias) kvABias.data[R + m] = l.bk ? l.bk.data[m] : 0;
    }

    // kv_b_proj [nQ·2d, R] = (M R_kv)[:, :R]; per head: k_nope rows α·W_UK,h[:, r:] on key coordinates, v rows the
    // identity at kv block ⌊h/g⌋ on value coordinates.
    const uk = l.wUk.data;
    const kvB = mat(nQ * 2 * d, R);
    for (let hd = 0; hd < nQ; hd++) {
      const kvh = Math.floor(hd / group);
      for (let i = 0; i < d; i++) {
        const kRow = (hd * 2 * d + i) * R;
        const ukRow = (hd * d + i) * L;
        for (let t = 0; t < L - r; t++) {
          const m = alpha * uk[ukRow + r + t];
          if (m === 0) continue;
          for (let p = 0; p < R; p++) kvB.data[kRow + p] += m * rkv[t * n + p];
        }
        const vRow = (hd * 2 * d + d + i) * R;
        const t = L - r + kvh * d + i;
        for (let p = 0; p < R; p++) kvB.data[vRow + p] = rkv[t * n + p];
      }
    }

    // q_proj [nQ·(d + r), D] = s · concat_h [ W_Q,h ; (W_UK,h[:, :r])ᵀ W_Q,h ] (bias likewise).
    const wq = l.wq.data;
    const qProj = mat(nQ * (d + r), D);
    const qBias = l.bq ? mat(nQ * (d + r), 1) : null;
    for (let hd = 0; hd < nQ; hd++) {
      const base = hd * (d + r);
      for (let i = 0; i < d; i++) {
        for (let j = 0; j < D; j++) qProj.data[(base + i) * D + j] = s * wq[(hd * d + i) * D + j];
        if (qBias) qBias.data[base + i] = s * l.bq!.data[hd * d + i];
      }
      for (let m = 0; m < r; m++) {
        const row = (base + d + m) * D;
        let bsum = 0;
        for (let i = 0; i < d; i++) {
          const u = uk[(hd * d + i) * L + m];
          if (u === 0) continue;
          const src = (hd * d + i) * D;
          for (let j = 0; j < D; j++) qProj.data[row + j] += u * wq[src + j];
          if (qBias) bsum += u * l.bq!.data[hd * d + i];
        }
        for (let j = 0; j < D; j++) qProj.data[row + j] *= s;
        if (qBias) qBias.data[base + d + m] = s * bsum;
      }
    }

    const attention: Partial<MlaLayerLike> =
      qLoraRank === null
        ? { qProj, qProjBias: qBias ? { shape: [nQ * (d + r)], data: qBias.data } : undefined }
        : lowRankQuery(qProj, inputGrams![li], qLoraRank);
    onLayer?.(li + 1);
    return {
      kind: 'mla',
      attnNorm: l.attnNorm,
      ...attention,
      kvAProj: kvA,
      kvAProjBias: kvABias ? { shape: [R + r], data: kvABias.data } : undefined,
      kvBProj: kvB,
      wo: l.wo,
      ffnNorm: l.ffnNorm,
      wGate: l.wGate,
      wUp: l.wUp,
      wDown: l.wDown,
    };
  });

  return {
    config: convertedConfig(config, opts),
    weights: { tokenEmbedding: stage1.tokenEmbedding, layers, finalNorm: stage1.finalNorm, output: stage1.output },
    alphas,
    energyKept,
  };
}

/**
 * Low-rank query by PCA of the query outputs: with C = E[xn xnᵀ] (calibration inputs), the query covariance is
 * W_q C W_qᵀ; its top k eigenvectors U give q_b_proj = U and q_a_proj = Uᵀ W_q, so U Uᵀ W_q x is the best rank-k
 * approximation of the queries actually seen (not merely of the weight). The output says qk_latent_layernorm: false,
 * which (as in TransMLA's modeling code) drops q_a_layernorm as well as kv_a_layernorm, so the factorization is
 * linear and exact at full rank. No q_a_layernorm weight is written: a stock DeepSeek loader then fails loudly
 * instead of normalizing the query latent and producing garbage.
 */
function lowRankQuery(qProj: DenseMatrix, inputGram: Float64Array, rank: number): Partial<MlaLayerLike> {
  const [rows, D] = qProj.shape;
  const w = qProj.data;
  if (inputGram.length !== D * D) throw new Error(`lowRankQuery: input Gram has ${inputGram.length} values, dim ${D} needs ${D * D}`);
  // WC = W C [rows, D], then H = WC Wᵀ [rows, rows].
  const wc = new Float64Array(rows * D);
  for (let i = 0; i < rows; i++) {
    for (let k = 0; k < D; k++) {
      const wik = w[i * D + k];
      if (wik === 0) continue;
      for (let j = 0; j < D; j++) wc[i * D + j] += wik * inputGram[k * D + j];
    }
  }
  const h = new Float64Array(rows * rows);
  for (let i = 0; i < rows; i++) {
    for (let k = i; k < rows; k++) {
      let sum = 0;
      for (let j = 0; j < D; j++) sum += wc[i * D + j] * w[k * D + j];
      h[i * rows + k] = sum;
      h[k * rows + i] = sum;
    }
  }
  dampDiagonal(h, rows);
  const u = symmetricEigen(h, rows).vectors;
  const qA = mat(rank, D);
  const qB = mat(rows, rank);
  for (let p = 0; p < rank; p++) {
    for (let i = 0; i < rows; i++) {
      const uip = u[i * rows + p];
      qB.data[i * rank + p] = uip;
      if (uip === 0) continue;
      for (let j = 0; j < D; j++) qA.data[p * D + j] += uip * w[i * D + j];
    }
  }
  return { qAProj: qA, qBProj: qB };
}

/**
 * The Stage-1 model written as the full-rank MLA model (R = 2L − r): exact, because at full rank any orthogonal joint
 * rotation reproduces Stage 1. Identity "Grams" give α = 1 and R_kv = I (no PCA, no calibration), so this is how the
 * Stage-1 model runs on the GPU's MLA path (Stage-2 calibration, freqfold search, perplexity).
 */
export function stage1AsFullRankMla(config: GqaConfig, stage1: LatentModelWeights, ropeDim: number): Stage2Result {
  const L = config.nKvHeads * config.headDim;
  const identity = () => {
    const g = new Float64Array(4 * L * L);
    for (let i = 0; i < 2 * L; i++) g[i * 2 * L + i] = 1;
    return g;
  };
  return buildMla(config, stage1, stage1.layers.map(identity), { ropeDim, kvLoraRank: maxKvLoraRank(config, ropeDim), qLoraRank: null });
}

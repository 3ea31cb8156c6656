// TransMLA Stage 0 (GQA as MQA over one latent key) and Stage 1 (RoRoPE + FreqFold): the orthogonal rotation P of the
// latent key space and the rotated model, exactly as ../shared/docs/transmla.md states.
import type { GqaConfig, RopeLayout } from '../config.ts';
import type { GqaLayerWeights, ModelWeights } from '../weights.ts';
import type { DenseMatrix } from '../reference/ops.ts';
import type { LatentLayerWeights, LatentModelWeights, RopePair } from '../reference/stage1.ts';
import { dampDiagonal, symmetricEigen } from './eigen.ts';

/** The shape of one RoRoPE/FreqFold problem: n_kv heads of width d, r rope dims kept, f frequencies folded. */
export interface FoldSpec {
  nKvHeads: number;
  headDim: number;
  ropeDim: number;
  fold: number;
  layout: RopeLayout;
}

/** Row of k_proj (column of the latent) holding coordinate (kvh, half s, frequency j) in the source layout. */
export function sourceColumn(kvh: number, s: number, j: number, headDim: number, layout: RopeLayout): number {
  return kvh * headDim + (layout === 'interleaved' ? 2 * j + s : j + s * (headDim / 2));
}

/** Throws a readable error when r or f cannot be used with this head dimension. */
export function checkFoldSpec(spec: FoldSpec): void {
  const { headDim: d, ropeDim: r, fold: f } = spec;
  if (!Number.isInteger(r) || r < 2 || r % 2 !== 0 || r > d || d % r !== 0) {
    throw new Error(`rope dim r = ${r} must be an even divisor of head_dim ${d} (so c = d/r is whole); try ${evenDivisors(d).join(', ')}`);
  }
  const c = d / r;
  if (!Number.isInteger(f) || f < 1 || f % c !== 0) {
    throw new Error(`freqfold f = ${f} must be a multiple of c = head_dim/r = ${d}/${r} = ${c}; try ${foldCandidates(d, r).join(', ')}`);
  }
  if (f > d / 2 || (d / 2) % f !== 0) {
    throw new Error(`freqfold f = ${f} must divide the ${d / 2} rope frequencies of head_dim ${d}; try ${foldCandidates(d, r).join(', ')}`);
  }
}

function evenDivisors(d: number): number[] {
  const out: number[] = [];
  for (let r = 2; r <= d; r += 2) if (d % r === 0) out.push(r);
  return out;
}

/** Every valid f for head_dim d and rope dim r: multiples of c = d/r that divide d/2, ascending. */
export function foldCandidates(d: number, r: number): number[] {
  const c = d / r;
  const out: number[] = [];
  for (let f = c; f <= d / 2; f += c) if ((d / 2) % f === 0) out.push(f);
  return out;
}

/**
 * The L×L orthogonal rotation P (row-major, rows = new latent positions, columns = source k_proj rows) of RoRoPE with
 * FreqFold, from the uncentred Gram matrix G = Σ k kᵀ of pre-RoPE keys (L×L, source layout).
 *
 * Per frequency group a, H_a[ch, ch'] = Σ_s G[col(ch, a, s), col(ch', a, s)] (rows of X_a are (token, s)), damped by
 * 1 % of its mean diagonal; its eigenvectors U_a (descending) place component p at
 * pos(p, a, s) = ((p_a·n_kv + p_b)·(d/2f) + a)·(f/c)·2 + p_c·2 + s.
 * With `identity`, U_a = I: the same placement without the PCA (the naive "keep RoPE on the first r dims" baseline).
 */
export function roropeRotation(keyGram: Float64Array, spec: FoldSpec, opts: { identity?: boolean } = {}): Float64Array {
  checkFoldSpec(spec);
  const { nKvHeads: nKv, headDim: d, ropeDim: r, fold: f, layout } = spec;
  const L = nKv * d;
  if (keyGram.length !== L * L) throw new Error(`roropeRotation: key Gram has ${keyGram.length} values, L = ${L} needs ${L * L}`);
  const c = d / r;
  const fc = f / c;
  const groups = d / (2 * f);
  const width = nKv * f; // channels per group
  const p = new Float64Array(L * L);
  // Channel ch = c2·(n_kv·f/c) + kvh·(f/c) + c1 ↔ frequency j = a·f + c1·c + c2 of kv head kvh.
  const chKvh = new Int32Array(width);
  const chFreqInGroup = new Int32Array(width);
  for (let c2 = 0; c2 < c; c2++) {
    for (let kvh = 0; kvh < nKv; kvh++) {
      for (let c1 = 0; c1 < fc; c1++) {
        const ch = c2 * (nKv * fc) + kvh * fc + c1;
        chKvh[ch] = kvh;
        chFreqInGroup[ch] = c1 * c + c2;
      }
    }
  }
  for (let a = 0; a < groups; a++) {
    const col = (ch: number, s: number) => sourceColumn(chKvh[ch], s, a * f + chFreqInGroup[ch], d, layout);
    let u: Float64Array;
    if (opts.identity) {
      u = new Float64Array(width * width);
      for (let i = 0; i < width; i++) u[i * width + i] = 1;
    } else {
      const h = new Float64Array(width * width);
      for (let i = 0; i < width; i++) {
        for (let k = 0; k < width; k++) {
          let sum = 0;
          for (let s = 0; s < 2; s++) sum += keyGram[col(i, s) * L + col(k, s)];
          h[i * width + k] = sum;
        }
      }
      dampDiagonal(h, width);
      u = symmetricEigen(h, width).vectors;
    }
    for (let comp = 0; comp < width; comp++) {
      const pa = Math.floor(comp / (nKv * fc));
      const pb = Math.floor(comp / fc) % nKv;
      const pc = comp % fc;
      for (let s = 0; s < 2; s++) {
        const pos = ((pa * nKv + pb) * groups + a) * fc * 2 + pc * 2 + s;
        for (let ch = 0; ch < width; ch++) p[pos * L + col(ch, s)] = u[ch * width + comp];
      }
    }
  }
  return p;
}

/** RoPE of the Stage-1 latent: the first r coordinates, interleaved; pair m turns with θ^(−2m/r). */
export function stage1RopePairs(ropeDim: number, theta: number): RopePair[] {
  const pairs: RopePair[] = [];
  for (let m = 0; m < ropeDim / 2; m++) pairs.push({ a: 2 * m, b: 2 * m + 1, freq: Math.pow(theta, (-2 * m) / ropeDim) });
  return pairs;
}

/**
 * RoPE on every rotated coordinate, exact only without folding (f = c = 1, so r = d): component p_b of frequency a sits
 * at pair (p_b·d/2 + a) and turns with θ^(−2a/d). This is the "rotation changes nothing" check of Stage 1.
 */
export function stage1FullRopePairs(nKvHeads: number, headDim: number, theta: number): RopePair[] {
  const pairs: RopePair[] = [];
  for (let k = 0; k < (nKvHeads * headDim) / 2; k++) {
    const a = k % (headDim / 2);
    pairs.push({ a: 2 * k, b: 2 * k + 1, freq: Math.pow(theta, (-2 * a) / headDim) });
  }
  return pairs;
}

/** RoPE of the Stage-0 latent: the source layout inside every kv block, frequency θ^(−2j/d). */
export function stage0RopePairs(nKvHeads: number, headDim: number, theta: number, layout: RopeLayout): RopePair[] {
  const pairs: RopePair[] = [];
  for (let kvh = 0; kvh < nKvHeads; kvh++) {
    for (let j = 0; j < headDim / 2; j++) {
      pairs.push({
        a: sourceColumn(kvh, 0, j, headDim, layout),
        b: sourceColumn(kvh, 1, j, headDim, layout),
        freq: Math.pow(theta, (-2 * j) / headDim),
      });
    }
  }
  return pairs;
}

function gqaLayers(weights: ModelWeights): GqaLayerWeights[] {
  return weights.layers.map((l, i) => {
    if (l.kind !== 'gqa') throw new Error(`TransMLA: layer ${i} is already ${l.kind}; the converter takes GQA checkpoints`);
    return l;
  });
}

/** y = P x for the L×L rotation and a length-L vector (bias). */
function rotateVector(p: Float64Array, L: number, x: ArrayLike<number>): Float64Array {
  const out = new Float64Array(L);
  for (let i = 0; i < L; i++) {
    let s = 0;
    for (let k = 0; k < L; k++) s += p[i * L + k] * x[k];
    out[i] = s;
  }
  return out;
}

/** P W for W [L, dim]. */
function rotateRows(p: Float64Array, L: number, w: DenseMatrix): DenseMatrix {
  const dim = w.shape[1];
  const out = new Float64Array(L * dim);
  for (let i = 0; i < L; i++) {
    for (let k = 0; k < L; k++) {
      const pik = p[i * L + k];
      if (pik === 0) continue;
      const src = k * dim;
      const dst = i * dim;
      for (let j = 0; j < dim; j++) out[dst + j] += pik * w.data[src + j];
    }
  }
  return { shape: [L, dim], data: out };
}

/**
 * Stage 0 rotated by P (P = null: identity, plain Stage 0): W_K ← P W_K, b_K ← P b_K, W_UK ← W_UK Pᵀ where the Stage-0
 * W_UK,h is the identity at kv head ⌊h/g⌋'s columns, so W_UK,h[i, m] = P[m, kvh·d + i]. RoPE follows ropePairs.
 */
export function rotatedLatentModel(
  config: GqaConfig,
  weights: ModelWeights,
  p: Float64Array | null,
  ropePairs: RopePair[],
): LatentModelWeights {
  const d = config.headDim;
  const L = config.nKvHeads * d;
  const group = config.nHeads / config.nKvHeads;
  const layers: LatentLayerWeights[] = gqaLayers(weights).map((l) => {
    const wUk = new Float64Array(config.nHeads * d * L);
    for (let h = 0; h < config.nHeads; h++) {
      const kvh = Math.floor(h / group);
      for (let i = 0; i < d; i++) {
        const row = (h * d + i) * L;
        if (p) for (let m = 0; m < L; m++) wUk[row + m] = p[m * L + kvh * d + i];
        else wUk[row + kvh * d + i] = 1;
      }
    }
    return {
      attnNorm: l.attnNorm,
      wq: l.wq,
      bq: l.bq,
      wk: p ? rotateRows(p, L, l.wk) : l.wk,
      bk: l.bk ? (p ? { shape: [L], data: rotateVector(p, L, l.bk.data) } : l.bk) : undefined,
      wv: l.wv,
      bv: l.bv,
      wUk: { shape: [config.nHeads * d, L], data: wUk },
      wo: l.wo,
      ffnNorm: l.ffnNorm,
      wGate: l.wGate,
      wUp: l.wUp,
      wDown: l.wDown,
    };
  });
  return { tokenEmbedding: weights.tokenEmbedding, layers, finalNorm: weights.finalNorm, output: weights.output, ropePairs };
}

/** Stage 0: the GQA model as MQA over the latent key, exact. */
export function stage0(config: GqaConfig, weights: ModelWeights): LatentModelWeights {
  return rotatedLatentModel(config, weights, null, stage0RopePairs(config.nKvHeads, config.headDim, config.ropeTheta, config.ropeLayout));
}

/**
 * Stage 1: per layer rotation from that layer's key Gram, RoPE kept on the first r latent coordinates only.
 * `fullRope` keeps RoPE on every coordinate (only with f = c = 1): the exactness check of the rotation itself.
 */
export function stage1(
  config: GqaConfig,
  weights: ModelWeights,
  keyGrams: Float64Array[],
  ropeDim: number,
  fold: number,
  opts: { identity?: boolean; fullRope?: boolean; onLayer?: (done: number) => void } = {},
): LatentModelWeights {
  const spec: FoldSpec = { nKvHeads: config.nKvHeads, headDim: config.headDim, ropeDim, fold, layout: config.ropeLayout };
  checkFoldSpec(spec);
  if (opts.fullRope && (ropeDim !== config.headDim || fold !== 1)) {
    throw new Error(`RoPE on every coordinate is exact only with f = c = 1 (r = head_dim ${config.headDim}); got r = ${ropeDim}, f = ${fold}`);
  }
  const pairs = opts.fullRope
    ? stage1FullRopePairs(config.nKvHeads, config.headDim, config.ropeTheta)
    : stage1RopePairs(ropeDim, config.ropeTheta);
  const rotations = keyGrams.map((g, i) => {
    const p = roropeRotation(g, spec, { identity: opts.identity });
    opts.onLayer?.(i + 1);
    return p;
  });
  const layers = gqaLayers(weights).map((_, i) => rotatedLatentModel(config, { ...weights, layers: [weights.layers[i]] }, rotations[i], pairs).layers[0]);
  return { tokenEmbedding: weights.tokenEmbedding, layers, finalNorm: weights.finalNorm, output: weights.output, ropePairs: pairs };
}

// CPU float64 forward of a GQA model written as MQA over one latent key (TransMLA Stage 0 / Stage 1): the oracle
// between the original GQA model and the converted MLA model.
//
// Per layer and token: k_lat = W_K x (+b_K) ∈ R^L, v_lat = W_V x (+b_V) ∈ R^L, q_h = W_Q,h x (+b_Q,h) ∈ R^d.
// Head h's latent query is W_UK,hᵀ q_h ∈ R^L; RoPE acts on latent coordinates through an explicit list of pairs
// (Stage 0: the source layout in every kv block; Stage 1: the first r coordinates, interleaved). Values are not
// touched by the method until Stage 2, so W_UV stays implicit: head h reads kv block ⌊h / g⌋ of v_lat.
import type { GqaConfig } from '../config.ts';
import type { Tensor } from '../weights.ts';
import type { ForwardOptions, LayerObservation } from './gqa.ts';
import { addInto, addMlpBlock, embedToken, forwardTokens, matvec, rmsnorm, softmaxInPlace, type DenseMatrix, type Vec } from './ops.ts';

/** Latent coordinates a and b turn together by angle pos · freq (a gets cos·x_a − sin·x_b). */
export interface RopePair {
  a: number;
  b: number;
  freq: number;
}

export interface LatentLayerWeights {
  attnNorm: Tensor;
  wq: DenseMatrix; // [nHeads*headDim, dim]
  bq?: DenseMatrix;
  /** Latent key projection [L, dim] (Stage 1: P W_K). */
  wk: DenseMatrix;
  bk?: DenseMatrix;
  wv: DenseMatrix; // [L, dim]
  bv?: DenseMatrix;
  /** Key up-projection [nHeads*headDim, L]: head h's d×L block maps the latent key to its d-dim key. */
  wUk: DenseMatrix;
  wo: Tensor; // [dim, nHeads*headDim]
  ffnNorm: Tensor;
  wGate: Tensor;
  wUp: Tensor;
  wDown: Tensor;
}

export interface LatentModelWeights {
  tokenEmbedding: Tensor;
  layers: LatentLayerWeights[];
  finalNorm: Tensor;
  output: Tensor;
  /** RoPE on latent coordinates, the same in every layer; coordinates in no pair carry no position. */
  ropePairs: RopePair[];
}

export class ReferenceLatent {
  private keys: Vec[][];
  private values: Vec[][];
  private readonly latentDim: number;

  constructor(
    readonly config: GqaConfig,
    readonly weights: LatentModelWeights,
  ) {
    this.latentDim = config.nKvHeads * config.headDim;
    weights.layers.forEach((l, i) => {
      const want = [config.nHeads * config.headDim, this.latentDim];
      if (l.wUk.shape[0] !== want[0] || l.wUk.shape[1] !== want[1]) {
        throw new Error(`ReferenceLatent: layer ${i} W_UK is [${l.wUk.shape}], expected [${want}]`);
      }
    });
    this.keys = weights.layers.map(() => []);
    this.values = weights.layers.map(() => []);
  }

  get position(): number {
    return this.keys[0].length;
  }

  reset(): void {
    for (const k of this.keys) k.length = 0;
    for (const v of this.values) v.length = 0;
  }

  /** Appends tokens to the cache; returns logits per token (only the last one when opts.logits = 'last'). */
  forward(tokens: number[], opts: ForwardOptions = {}): Float64Array[] {
    return forwardTokens(tokens, opts.logits, (token, wantLogits) => this.step(token, wantLogits, opts.observe));
  }

  private applyRope(v: Float64Array, pos: number): void {
    for (const { a, b, freq } of this.weights.ropePairs) {
      const angle = pos * freq;
      const cos = Math.cos(angle);
      const sin = Math.sin(angle);
      const x0 = v[a];
      const x1 = v[b];
      v[a] = x0 * cos - x1 * sin;
      v[b] = x0 * sin + x1 * cos;
    }
  }

  private step(token: number, wantLogits: boolean, observe?: (o: LayerObservation) => void): Float64Array | null {
    const c = this.config;
    const w = this.weights;
    const pos = this.position;
    const L = this.latentDim;
    const d = c.headDim;
    const group = c.nHeads / c.nKvHeads;
    const scale = 1 / Math.sqrt(d);
    const x = embedToken(w.tokenEmbedding, token, c.dim, c.vocabSize);

    for (let l = 0; l < c.nLayers; l++) {
      const lw = w.layers[l];
      const xn = rmsnorm(x, lw.attnNorm.data, c.rmsEps);
      const q = matvec(lw.wq, xn, lw.bq);
      const k = matvec(lw.wk, xn, lw.bk);
      const v = matvec(lw.wv, xn, lw.bv);
      observe?.({ layer: l, pos, xn, k: k.slice(), v });
      this.applyRope(k, pos);
      this.keys[l].push(k);
      this.values[l].push(v);
      const keys = this.keys[l];
      const values = this.values[l];
      const len = keys.length;
      const att = new Float64Array(c.nHeads * d);
      const scores = new Float64Array(len);
      const qLat = new Float64Array(L);
      const uk = lw.wUk.data;
      for (let h = 0; h < c.nHeads; h++) {
        qLat.fill(0);
        for (let i = 0; i < d; i++) {
          const qi = q[h * d + i];
          const row = (h * d + i) * L;
          for (let m = 0; m < L; m++) qLat[m] += uk[row + m] * qi;
        }
        this.applyRope(qLat, pos);
        for (let t = 0; t < len; t++) {
          const kt = keys[t];
          let s = 0;
          for (let m = 0; m < L; m++) s += qLat[m] * kt[m];
          scores[t] = s * scale;
        }
        softmaxInPlace(scores, len);
        const vo = Math.floor(h / group) * d;
        for (let t = 0; t < len; t++) {
          const p = scores[t];
          const vt = values[t];
          for (let i = 0; i < d; i++) att[h * d + i] += p * vt[vo + i];
        }
      }
      const o = matvec(lw.wo, att);
      addInto(x, o);
      addMlpBlock(x, lw, c.rmsEps);
    }
    if (!wantLogits) return null;
    const xo = rmsnorm(x, w.finalNorm.data, c.rmsEps);
    return matvec(w.output, xo);
  }
}

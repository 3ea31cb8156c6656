// CPU float64 forward of an MLA decoder (DeepSeek-V2/V3 attention, dense MLP), naive and absorbed: the oracle for
// the GPU MLA kernels and for the TransMLA converter.
//
// Per layer and token (R = kvLoraRank, r = qkRopeHeadDim, dn = qkNopeHeadDim, dv = vHeadDim):
//   q = q_proj x (+b)  or  q_b_proj(q_a_layernorm?(q_a_proj x));  per head [q_nope (dn) | q_pe (r)], RoPE on q_pe
//   [c (R) | k_pe (r)] = kv_a_proj_with_mqa x (+b);  c ← kv_a_layernorm(c) only when qkLatentLayernorm;  RoPE on k_pe
//   cache one latent row [c | RoPE(k_pe)] per token
//   naive:    k_nope,h = W_UK,h c, v_h = W_UV,h c (expanded per head from the latent), ordinary attention
//   absorbed: q̃_h = W_UK,hᵀ q_nope,h; score = q̃_h·c_j + q_pe,h·k_pe,j; ô_h = Σ p c_j; o_h = W_UV,h ô_h
//   scores scaled by softmaxScale; out = o_proj(concat o_h).
// qkLatentLayernorm governs both latent norms, q_a_layernorm and kv_a_layernorm, as in TransMLA's modeling code
// (`qk_latent_layernorm`; stock DeepSeek always applies both, i.e. true).
import type { MlaConfig } from '../config.ts';
import type { ModelWeights, Tensor } from '../weights.ts';
import { addInto, addMlpBlock, embedToken, forwardTokens, matvec, rmsnorm, rope, softmaxInPlace, type DenseMatrix, type Vec } from './ops.ts';

/** MlaLayerWeights whose attention matrices may be f64 (the converter's exact intermediates) or f32 (checkpoints). */
export interface MlaLayerLike {
  kind: 'mla';
  attnNorm: Tensor;
  qProj?: DenseMatrix;
  qProjBias?: DenseMatrix;
  qAProj?: DenseMatrix;
  qANorm?: DenseMatrix;
  qBProj?: DenseMatrix;
  kvAProj: DenseMatrix;
  kvAProjBias?: DenseMatrix;
  kvANorm?: DenseMatrix;
  kvBProj: DenseMatrix;
  wo: DenseMatrix;
  ffnNorm: Tensor;
  wGate: Tensor;
  wUp: Tensor;
  wDown: Tensor;
}

export interface MlaModelLike {
  tokenEmbedding: Tensor;
  layers: MlaLayerLike[];
  finalNorm: Tensor;
  output: Tensor;
}

/** What an MLA layer cached for one token: the oracle for GPU cache writes. */
export interface MlaObservation {
  layer: number;
  pos: number;
  xn: Vec;
  /** Latent c after the optional kv_a_layernorm [kvLoraRank]. */
  latent: Vec;
  /** k_pe after RoPE [qkRopeHeadDim]. */
  kPe: Vec;
}

export interface MlaForwardOptions {
  observe?: (o: MlaObservation) => void;
  logits?: 'all' | 'last';
}

export type MlaAttentionForm = 'naive' | 'absorbed';

export class ReferenceMla {
  private latents: Vec[][];
  private kPes: Vec[][];
  /** Naive form only: per position, every head's expanded [k_nope | v] (nHeads·(dn+dv)). */
  private expanded: Vec[][];
  private readonly layers: MlaLayerLike[];
  readonly form: MlaAttentionForm;

  constructor(
    readonly config: MlaConfig,
    readonly weights: MlaModelLike | ModelWeights,
    opts: { form?: MlaAttentionForm } = {},
  ) {
    this.form = opts.form ?? 'absorbed';
    const c = config;
    const rowsPerHead = c.qkNopeHeadDim + c.vHeadDim;
    this.layers = weights.layers.map((l, i) => {
      if (l.kind !== 'mla') throw new Error(`ReferenceMla: layer ${i} is ${l.kind}, not mla`);
      const kvb = l.kvBProj.shape;
      if (kvb[0] !== c.nHeads * rowsPerHead || kvb[1] !== c.kvLoraRank) {
        throw new Error(`ReferenceMla: layer ${i} kv_b_proj is [${kvb}], config wants [${c.nHeads * rowsPerHead}, ${c.kvLoraRank}]`);
      }
      if (l.kvAProj.shape[0] !== c.kvLoraRank + c.qkRopeHeadDim) {
        throw new Error(`ReferenceMla: layer ${i} kv_a_proj_with_mqa has ${l.kvAProj.shape[0]} rows, config wants ${c.kvLoraRank + c.qkRopeHeadDim}`);
      }
      if (c.qLoraRank === null ? !l.qProj : !(l.qAProj && l.qBProj)) {
        throw new Error(`ReferenceMla: layer ${i} lacks ${c.qLoraRank === null ? 'q_proj' : 'q_a_proj/q_b_proj'} (q_lora_rank ${c.qLoraRank})`);
      }
      if (c.qkLatentLayernorm && (!l.kvANorm || (c.qLoraRank !== null && !l.qANorm))) {
        throw new Error(`ReferenceMla: layer ${i} lacks kv_a_layernorm${c.qLoraRank !== null ? '/q_a_layernorm' : ''}, which qk_latent_layernorm asks for`);
      }
      return l as MlaLayerLike;
    });
    this.latents = this.layers.map(() => []);
    this.kPes = this.layers.map(() => []);
    this.expanded = this.layers.map(() => []);
  }

  get position(): number {
    return this.latents[0].length;
  }

  reset(): void {
    for (const a of this.latents) a.length = 0;
    for (const a of this.kPes) a.length = 0;
    for (const a of this.expanded) a.length = 0;
  }

  /** Appends tokens to the latent cache; returns logits per token (only the last one when opts.logits = 'last'). */
  forward(tokens: number[], opts: MlaForwardOptions = {}): Float64Array[] {
    return forwardTokens(tokens, opts.logits, (token, wantLogits) => this.step(token, wantLogits, opts.observe));
  }

  private step(token: number, wantLogits: boolean, observe?: (o: MlaObservation) => void): Float64Array | null {
    const c = this.config;
    const w = this.layers;
    const pos = this.position;
    const R = c.kvLoraRank;
    const r = c.qkRopeHeadDim;
    const dn = c.qkNopeHeadDim;
    const dv = c.vHeadDim;
    const qRow = dn + r;
    const x = embedToken(this.weights.tokenEmbedding, token, c.dim, c.vocabSize);

    for (let l = 0; l < c.nLayers; l++) {
      const lw = w[l];
      const xn = rmsnorm(x, lw.attnNorm.data, c.rmsEps);
      let q: Vec;
      if (lw.qProj) {
        q = matvec(lw.qProj, xn, lw.qProjBias);
      } else {
        let qa = matvec(lw.qAProj!, xn);
        if (c.qkLatentLayernorm) qa = rmsnorm(qa, lw.qANorm!.data, c.rmsEps);
        q = matvec(lw.qBProj!, qa);
      }
      const kva = matvec(lw.kvAProj, xn, lw.kvAProjBias);
      let latent: Vec = kva.slice(0, R);
      if (c.qkLatentLayernorm) latent = rmsnorm(latent, lw.kvANorm!.data, c.rmsEps);
      const kPe = kva.slice(R, R + r);
      rope(kPe, 0, r, pos, c.ropeTheta, c.ropeLayout);
      for (let h = 0; h < c.nHeads; h++) rope(q, h * qRow + dn, r, pos, c.ropeTheta, c.ropeLayout);
      observe?.({ layer: l, pos, xn, latent, kPe });
      this.latents[l].push(latent);
      this.kPes[l].push(kPe);
      const att = this.form === 'naive' ? this.attendNaive(l, lw, q, latent) : this.attendAbsorbed(l, lw, q);
      const o = matvec(lw.wo, att);
      addInto(x, o);
      addMlpBlock(x, lw, c.rmsEps);
    }
    if (!wantLogits) return null;
    const xo = rmsnorm(x, this.weights.finalNorm.data, c.rmsEps);
    return matvec(this.weights.output, xo);
  }

  /** Expands this token's k_nope and v for every head from its latent (kv_b_proj c), then plain attention. */
  private attendNaive(l: number, lw: MlaLayerLike, q: Vec, latent: Vec): Vec {
    const c = this.config;
    const r = c.qkRopeHeadDim;
    const dn = c.qkNopeHeadDim;
    const dv = c.vHeadDim;
    const qRow = dn + r;
    const kvRow = dn + dv;
    this.expanded[l].push(matvec(lw.kvBProj, latent));
    const rows = this.expanded[l];
    const kPes = this.kPes[l];
    const len = rows.length;
    const scores = new Float64Array(len);
    const out = new Float64Array(c.nHeads * dv);
    for (let h = 0; h < c.nHeads; h++) {
      const qo = h * qRow;
      const ko = h * kvRow;
      for (let t = 0; t < len; t++) {
        const kv = rows[t];
        const kp = kPes[t];
        let s = 0;
        for (let i = 0; i < dn; i++) s += q[qo + i] * kv[ko + i];
        for (let i = 0; i < r; i++) s += q[qo + dn + i] * kp[i];
        scores[t] = s * c.softmaxScale;
      }
      softmaxInPlace(scores, len);
      for (let t = 0; t < len; t++) {
        const p = scores[t];
        const kv = rows[t];
        for (let i = 0; i < dv; i++) out[h * dv + i] += p * kv[ko + dn + i];
      }
    }
    return out;
  }

  /** Attention on the latent rows directly: W_UK absorbed into the query, W_UV applied after the weighted sum. */
  private attendAbsorbed(l: number, lw: MlaLayerLike, q: Vec): Vec {
    const c = this.config;
    const R = c.kvLoraRank;
    const r = c.qkRopeHeadDim;
    const dn = c.qkNopeHeadDim;
    const dv = c.vHeadDim;
    const qRow = dn + r;
    const kvRow = dn + dv;
    const kvb = lw.kvBProj.data;
    const latents = this.latents[l];
    const kPes = this.kPes[l];
    const len = latents.length;
    const scores = new Float64Array(len);
    const qTilde = new Float64Array(R);
    const oHat = new Float64Array(R);
    const out = new Float64Array(c.nHeads * dv);
    for (let h = 0; h < c.nHeads; h++) {
      const qo = h * qRow;
      qTilde.fill(0);
      for (let i = 0; i < dn; i++) {
        const qi = q[qo + i];
        const row = (h * kvRow + i) * R;
        for (let m = 0; m < R; m++) qTilde[m] += kvb[row + m] * qi;
      }
      for (let t = 0; t < len; t++) {
        const lat = latents[t];
        const kp = kPes[t];
        let s = 0;
        for (let m = 0; m < R; m++) s += qTilde[m] * lat[m];
        for (let i = 0; i < r; i++) s += q[qo + dn + i] * kp[i];
        scores[t] = s * c.softmaxScale;
      }
      softmaxInPlace(scores, len);
      oHat.fill(0);
      for (let t = 0; t < len; t++) {
        const p = scores[t];
        const lat = latents[t];
        for (let m = 0; m < R; m++) oHat[m] += p * lat[m];
      }
      for (let i = 0; i < dv; i++) {
        const row = (h * kvRow + dn + i) * R;
        let s = 0;
        for (let m = 0; m < R; m++) s += kvb[row + m] * oHat[m];
        out[h * dv + i] = s;
      }
    }
    return out;
  }
}

/**
 * The absorbed attention of one step row on latent rows alone (what kernels/mla-attention.ts computes), float64:
 * qLatent [nHeads, R + r] is already scaled and roped (softmaxScale · [W_UK,hᵀ q_nope,h | q_pe,h]), rows[j] is token
 * j's cached [c (R) | RoPE(k_pe) (r)]; returns ô [nHeads, R] = Σ_j softmax_j(qLatent_h · row_j) c_j per head.
 */
export function attendLatentRows(qLatent: ArrayLike<number>, rows: ArrayLike<number>[], nHeads: number, kvLoraRank: number, qkRopeHeadDim: number): Vec {
  const RV = kvLoraRank + qkRopeHeadDim;
  const out = new Float64Array(nHeads * kvLoraRank);
  const scores = new Float64Array(rows.length);
  for (let h = 0; h < nHeads; h++) {
    rows.forEach((row, j) => {
      let s = 0;
      for (let k = 0; k < RV; k++) s += qLatent[h * RV + k] * row[k];
      scores[j] = s;
    });
    softmaxInPlace(scores, rows.length);
    rows.forEach((row, j) => {
      for (let m = 0; m < kvLoraRank; m++) out[h * kvLoraRank + m] += scores[j] * row[m];
    });
  }
  return out;
}

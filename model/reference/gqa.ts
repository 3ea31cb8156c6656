// CPU float64 forward pass of a GQA decoder (Llama/Qwen2/Mistral, both RoPE layouts): the oracle for the GPU.
import type { GqaConfig } from '../config.ts';
import type { GqaLayerWeights, ModelWeights } from '../weights.ts';
import { addInto, addMlpBlock, attendGqa, embedToken, forwardTokens, matvec, rmsnorm, rope, type Vec } from './ops.ts';

/** What a layer saw for one token, for calibration (TransMLA) and debugging. */
export interface LayerObservation {
  layer: number;
  pos: number;
  /** Attention input after RMSNorm [dim]. */
  xn: Vec;
  /** Keys before RoPE [nKvHeads*headDim] (bias included). */
  k: Vec;
  /** Values [nKvHeads*headDim]. */
  v: Vec;
}

export interface ForwardOptions {
  observe?: (o: LayerObservation) => void;
  /** Skip the classifier for tokens whose logits are not needed (all but the last when 'last'). */
  logits?: 'all' | 'last';
}

export class ReferenceGqa {
  private keys: Vec[][];
  private values: Vec[][];
  private layers: GqaLayerWeights[];

  constructor(
    readonly config: GqaConfig,
    readonly weights: ModelWeights,
  ) {
    this.layers = weights.layers.map((l, i) => {
      if (l.kind !== 'gqa') throw new Error(`ReferenceGqa: layer ${i} is ${l.kind}, not gqa`);
      return l;
    });
    this.keys = this.layers.map(() => []);
    this.values = this.layers.map(() => []);
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

  private step(token: number, wantLogits: boolean, observe?: (o: LayerObservation) => void): Float64Array | null {
    const c = this.config;
    const w = this.weights;
    const pos = this.position;
    const x = embedToken(w.tokenEmbedding, token, c.dim, c.vocabSize);

    for (let l = 0; l < c.nLayers; l++) {
      const lw = this.layers[l];
      const xn = rmsnorm(x, lw.attnNorm.data, c.rmsEps);
      const q = matvec(lw.wq, xn, lw.bq);
      const k = matvec(lw.wk, xn, lw.bk);
      const v = matvec(lw.wv, xn, lw.bv);
      observe?.({ layer: l, pos, xn, k: k.slice(), v });
      for (let h = 0; h < c.nHeads; h++) rope(q, h * c.headDim, c.headDim, pos, c.ropeTheta, c.ropeLayout);
      for (let h = 0; h < c.nKvHeads; h++) rope(k, h * c.headDim, c.headDim, pos, c.ropeTheta, c.ropeLayout);
      this.keys[l].push(k);
      this.values[l].push(v);
      const att = attendGqa(q, this.keys[l], this.values[l], c.nHeads, c.nKvHeads, c.headDim);
      const o = matvec(lw.wo, att);
      addInto(x, o);
      addMlpBlock(x, lw, c.rmsEps);
    }
    if (!wantLogits) return null;
    const xo = rmsnorm(x, w.finalNorm.data, c.rmsEps);
    return matvec(w.output, xo);
  }
}

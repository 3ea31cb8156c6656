// A ModelRunner on the CPU: the float64 reference ops over a paged KV store, so the engine runs (and is checked) without a GPU.
import { kvValuesPerToken, type GqaConfig, type ModelConfig } from '../model/config.ts';
import { attendGqa, matvec, mlp, rmsnorm, rope, type Vec } from '../model/reference/ops.ts';
import type { GqaLayerWeights, ModelWeights } from '../model/weights.ts';
import { pickAdjustError, pickOnHost, pickSamplingError, rawLogprobs, withPendingToken, type SampledLogprobs } from './sampler.ts';
import type { ModelRunner, StepOutput, StepSequence } from './types.ts';

export interface CpuRunnerOptions {
  blockSize: number;
  numBlocks: number;
}

/**
 * Runs GQA models token by token in float64, reading and writing K/V through each sequence's block
 * table exactly as the GPU runner's paged cache does: a wrong block table gives wrong text here too.
 * Slow (no batching of matmuls); meant for tests and for checking the engine against the reference.
 */
export class CpuRunner implements ModelRunner {
  readonly config: GqaConfig;
  readonly blockSize: number;
  readonly numBlocks: number;
  readonly kvBytesPerToken: number;
  readonly adapterName = 'cpu (float64 reference ops)';
  readonly cacheDtype = 'f64';
  private readonly layers: GqaLayerWeights[];
  private readonly keys: Float64Array[];
  private readonly values: Float64Array[];
  private readonly kvDim: number;
  private destroyed = false;

  constructor(
    model: { config: ModelConfig; weights: ModelWeights },
    opts: CpuRunnerOptions,
  ) {
    if (model.config.attention !== 'gqa') throw new Error(`the CPU runner runs GQA models; this one is ${model.config.attention}`);
    this.config = model.config;
    this.blockSize = opts.blockSize;
    this.numBlocks = opts.numBlocks;
    this.kvDim = this.config.nKvHeads * this.config.headDim;
    this.kvBytesPerToken = this.config.nLayers * kvValuesPerToken(this.config) * 8;
    this.layers = model.weights.layers.map((l, i) => {
      if (l.kind !== 'gqa') throw new Error(`layer ${i} is ${l.kind}, not gqa`);
      return l;
    });
    const slots = opts.numBlocks * opts.blockSize;
    this.keys = this.layers.map(() => new Float64Array(slots * this.kvDim).fill(NaN));
    this.values = this.layers.map(() => new Float64Array(slots * this.kvDim).fill(NaN));
    this.weights = model.weights;
  }

  private readonly weights: ModelWeights;
  /** The last step's picks (what a later step's previousPick names). */
  private lastPicks: number[] = [];

  async step(seqs: StepSequence[]): Promise<Float32Array> {
    if (seqs.some((s) => s.logits === 'argmax' || s.logits === 'sample')) throw new Error(`step: a sequence asks for a pick; use stepOutput`);
    return (await this.stepOutput(seqs)).logits;
  }

  async stepOutput(seqs: StepSequence[]): Promise<StepOutput> {
    if (this.destroyed) throw new Error('the CPU runner was destroyed');
    const c = this.config;
    const rows: Vec[] = [];
    const picks: number[] = [];
    const pickLogprobs: Array<SampledLogprobs | null> = [];
    const previous = this.lastPicks;
    for (const [i, s] of seqs.entries()) {
      if (s.previousPick !== undefined) {
        if (s.tokens.length !== 1 || !(s.previousPick >= 0 && s.previousPick < previous.length)) {
          throw new Error(`step: previousPick ${s.previousPick} needs one token and a previous step with more than ${s.previousPick} picks (it had ${previous.length})`);
        }
      }
      const bad = (s.logits === 'sample' ? pickSamplingError(s.sample) : null) ?? pickAdjustError(s, this.config.vocabSize);
      if (bad) throw new Error(`step: sequence ${i}: ${bad}`);
    }
    for (const s of seqs) {
      const needBlocks = Math.ceil((s.startPos + s.tokens.length) / this.blockSize);
      if (s.blockTable.length < needBlocks) {
        throw new Error(`a sequence at positions ${s.startPos}..${s.startPos + s.tokens.length - 1} needs ${needBlocks} blocks, its table has ${s.blockTable.length}`);
      }
      for (let i = 0; i < s.tokens.length; i++) {
        const pos = s.startPos + i;
        const last = i === s.tokens.length - 1;
        const want = s.logits === 'all' || (last && s.logits !== 'none');
        const token = s.previousPick === undefined ? s.tokens[i] : previous[s.previousPick];
        const logits = this.token(token, pos, s.blockTable, want);
        // Picks over the f32 values a logits row would have carried (the GPU runner's semantics), in float64.
        if (logits && (s.logits === 'argmax' || s.logits === 'sample')) {
          const row = Float32Array.from(logits);
          const adjust = s.adjust && withPendingToken(s.adjust, token);
          const id = pickOnHost(row, s.logits === 'sample' ? s.sample! : null, adjust);
          picks.push(id);
          pickLogprobs.push(s.logprobs === undefined ? null : rawLogprobs(row, id, s.logprobs));
        } else if (logits) rows.push(logits);
      }
    }
    const out = new Float32Array(rows.length * c.vocabSize);
    rows.forEach((r, i) => out.set(r, i * c.vocabSize));
    this.lastPicks = picks;
    return { logits: out, picks: Uint32Array.from(picks), pickLogprobs };
  }

  copyBlocks(pairs: Array<[src: number, dst: number]>): void {
    const n = this.blockSize * this.kvDim;
    for (const [src, dst] of pairs) {
      for (const store of [...this.keys, ...this.values]) store.copyWithin(dst * n, src * n, (src + 1) * n);
    }
  }

  destroy(): void {
    this.destroyed = true;
  }

  private slot(blockTable: number[], pos: number): number {
    const b = blockTable[Math.floor(pos / this.blockSize)];
    if (b === undefined || b < 0 || b >= this.numBlocks) throw new Error(`block id ${b} for position ${pos} is outside the pool of ${this.numBlocks}`);
    return b * this.blockSize + (pos % this.blockSize);
  }

  private token(token: number, pos: number, blockTable: number[], wantLogits: boolean): Vec | null {
    const c = this.config;
    const w = this.weights;
    if (token < 0 || token >= c.vocabSize) throw new Error(`token id ${token} outside vocabulary of ${c.vocabSize}`);
    const x = new Float64Array(c.dim);
    for (let i = 0; i < c.dim; i++) x[i] = w.tokenEmbedding.data[token * c.dim + i];
    const slots = Array.from({ length: pos + 1 }, (_, p) => this.slot(blockTable, p));
    for (let l = 0; l < c.nLayers; l++) {
      const lw = this.layers[l];
      const xn = rmsnorm(x, lw.attnNorm.data, c.rmsEps);
      const q = matvec(lw.wq, xn, lw.bq);
      const k = matvec(lw.wk, xn, lw.bk);
      const v = matvec(lw.wv, xn, lw.bv);
      for (let h = 0; h < c.nHeads; h++) rope(q, h * c.headDim, c.headDim, pos, c.ropeTheta, c.ropeLayout);
      for (let h = 0; h < c.nKvHeads; h++) rope(k, h * c.headDim, c.headDim, pos, c.ropeTheta, c.ropeLayout);
      const own = slots[pos] * this.kvDim;
      this.keys[l].set(k, own);
      this.values[l].set(v, own);
      const ks = slots.map((s) => this.keys[l].subarray(s * this.kvDim, (s + 1) * this.kvDim));
      const vs = slots.map((s) => this.values[l].subarray(s * this.kvDim, (s + 1) * this.kvDim));
      const att = attendGqa(q, ks, vs, c.nHeads, c.nKvHeads, c.headDim);
      const o = matvec(lw.wo, att);
      for (let i = 0; i < c.dim; i++) x[i] += o[i];
      const xf = rmsnorm(x, lw.ffnNorm.data, c.rmsEps);
      const m = mlp(xf, lw.wGate, lw.wUp, lw.wDown);
      for (let i = 0; i < c.dim; i++) x[i] += m[i];
    }
    if (!wantLogits) return null;
    return matvec(w.output, rmsnorm(x, w.finalNorm.data, c.rmsEps));
  }
}

// The TransMLA pipeline on the CPU float64 reference: calibrate, Stage 1 (RoRoPE + FreqFold, f searched by calibration
// perplexity when asked), re-calibrate on the Stage-1 model, Stage 2 (BKV + joint K/V PCA), and the numbers users read
// (KV values per token, parameters, held-out perplexity of original / Stage 1 / MLA).
//
// Calibration runs the reference forward, so this is for models the CPU can run (stories260K, small synthetic
// models); the covariances are accumulated in float64, one token at a time, never holding activations.
import type { GqaConfig, MlaConfig } from '../config.ts';
import { kvValuesPerToken } from '../config.ts';
import type { ModelWeights, Tensor } from '../weights.ts';
import { ReferenceGqa } from '../reference/gqa.ts';
import { ReferenceLatent, type LatentModelWeights } from '../reference/stage1.ts';
import { ReferenceMla, type MlaModelLike } from '../reference/mla.ts';
import type { DenseMatrix } from '../reference/ops.ts';
import { GramAccumulator } from './eigen.ts';
import { checkFoldSpec, foldCandidates, stage1 } from './rorope.ts';
import { buildMla, checkRanks, maxKvLoraRank } from './stage2.ts';

/** Scores chunks: perplexity of a logits source (engine/perplexity.ts's scoreChunks in the CLI). */
export type PerplexityScorer = (chunks: number[][], logitsFor: (chunk: number[]) => Float64Array[]) => Promise<number>;

export interface ProgressEvent {
  /** e.g. 'calibrate original', 'freqfold f=2', 'stage 2 PCA'. */
  stage: string;
  done: number;
  total: number;
  /** Unit of `done`: calibration chunks or layers. */
  unit: 'chunk' | 'layer';
}

export interface ConvertOptions {
  /** r; default min(64, head_dim). */
  ropeDim?: number;
  /** R; default: R + r = 9/16 of 2·n_kv·d rounded to a multiple of 4, at most 2L − r. */
  kvLoraRank?: number;
  /** f, or 'auto' (default): the valid f with the lowest Stage-1 perplexity on calibration chunks. */
  freqFold?: number | 'auto';
  qLoraRank?: number | null;
  /** Calibration token chunks (BOS-prefixed). */
  calibChunks: number[][];
  /** Held-out chunks for the perplexity table (never the calibration ones); none: no perplexities. */
  evalChunks?: number[][];
  /** Calibration chunks scored per f candidate in the freqfold search (default 32). */
  foldSearchChunks?: number;
  /** Needed for the freqfold search and the perplexity table. */
  scorePerplexity?: PerplexityScorer;
  /** 'identity': skip the RoRoPE PCA (keep RoPE on the first r latent dims unrotated), the naive baseline. */
  rotation?: 'pca' | 'identity';
  onProgress?: (e: ProgressEvent) => void;
}

export interface ConversionReport {
  ropeDim: number;
  kvLoraRank: number;
  freqFold: number;
  qLoraRank: number | null;
  /** Stage-1 calibration perplexity per f tried (empty when f was given). */
  foldSearch: { fold: number; perplexity: number }[];
  kvValuesBefore: number;
  kvValuesAfter: number;
  paramsBefore: number;
  paramsAfter: number;
  calibChunks: number;
  calibTokens: number;
  evalChunks: number;
  evalTokens: number;
  perplexity: { original: number; stage1: number; mla: number } | null;
  alphas: number[];
  energyKept: number[];
}

export interface ConversionResult {
  config: MlaConfig;
  /** Exact f64 MLA weights (attention matrices f64; embeddings, norms, MLP shared with the source). */
  weights: MlaModelLike;
  stage1: LatentModelWeights;
  report: ConversionReport;
}

/** Default r and R (see ConvertOptions); R default is the 576-of-1024 ratio of Qwen2.5-7B at 512 + 64. */
export function defaultRanks(config: GqaConfig, ropeDim?: number): { ropeDim: number; kvLoraRank: number } {
  const r = ropeDim ?? Math.min(64, config.headDim);
  const row = 2 * config.nKvHeads * config.headDim;
  const target = Math.round((row * 9) / 16 / 4) * 4;
  return { ropeDim: r, kvLoraRank: Math.max(1, Math.min(target - r, maxKvLoraRank(config, r))) };
}

/** Refuses sources the method cannot convert exactly, and impossible shapes, before any work is done. */
export function checkConvertible(config: GqaConfig | MlaConfig): asserts config is GqaConfig {
  if (config.attention !== 'gqa') {
    throw new Error(`the model is already MLA (${config.arch}, kv_lora_rank ${config.kvLoraRank}); convert takes GQA/MHA checkpoints (Llama, Qwen2, Mistral)`);
  }
  if (config.nHeads % config.nKvHeads !== 0) {
    throw new Error(`${config.nHeads} query heads are not a multiple of ${config.nKvHeads} kv heads`);
  }
  if (config.headDim % 2 !== 0) throw new Error(`head_dim ${config.headDim} is odd: RoPE needs pairs`);
}

/** Number of parameters of a model: every distinct tensor once (a tied classifier is the embedding). */
export function parameterCount(weights: ModelWeights | MlaModelLike | LatentModelWeights): number {
  const seen = new Set<unknown>();
  let n = 0;
  const visit = (t: unknown) => {
    if (!t || typeof t !== 'object' || seen.has(t)) return;
    const m = t as Partial<DenseMatrix>;
    if (Array.isArray(m.shape) && (m.data instanceof Float32Array || m.data instanceof Float64Array)) {
      seen.add(t);
      n += m.data.length;
    }
  };
  visit(weights.tokenEmbedding);
  visit(weights.finalNorm);
  visit(weights.output);
  for (const l of weights.layers as object[]) for (const v of Object.values(l)) visit(v);
  return n;
}

/** Converts a GQA model to MLA on the CPU reference. Throws readable errors for impossible options before working. */
export async function convertToMla(config: GqaConfig, weights: ModelWeights, opts: ConvertOptions): Promise<ConversionResult> {
  checkConvertible(config);
  const d = config.headDim;
  const L = config.nKvHeads * d;
  const defaults = defaultRanks(config, opts.ropeDim);
  const r = defaults.ropeDim;
  const R = opts.kvLoraRank ?? defaults.kvLoraRank;
  const qLoraRank = opts.qLoraRank ?? null;
  const foldOpt = opts.freqFold ?? 'auto';
  // Refuse impossible shapes first, with the numbers.
  checkFoldSpec({ nKvHeads: config.nKvHeads, headDim: d, ropeDim: r, fold: foldOpt === 'auto' ? d / r : foldOpt, layout: config.ropeLayout });
  checkRanks(config, r, R, qLoraRank);
  if (opts.calibChunks.length === 0) throw new Error('no calibration chunks: give calibration text with at least one paragraph');
  if ((foldOpt === 'auto' || opts.evalChunks) && !opts.scorePerplexity) {
    throw new Error('convertToMla: freqfold auto and the perplexity table need scorePerplexity');
  }
  const progress = opts.onProgress ?? (() => {});

  // Stage 1 calibration: pre-RoPE keys of the original model.
  const keyGrams = Array.from({ length: config.nLayers }, () => new GramAccumulator(L));
  const original = new ReferenceGqa(config, weights);
  const calibTotal = opts.calibChunks.length;
  let calibTokens = 0;
  opts.calibChunks.forEach((chunk, i) => {
    original.reset();
    original.forward(chunk, { logits: 'last', observe: (o) => keyGrams[o.layer].add(o.k) });
    calibTokens += chunk.length;
    progress({ stage: 'calibrate original', done: i + 1, total: calibTotal, unit: 'chunk' });
  });
  const keyGramMatrices = keyGrams.map((g) => g.matrix());

  // FreqFold: try every valid f on calibration chunks unless one was given.
  const foldSearch: { fold: number; perplexity: number }[] = [];
  let fold: number;
  const rotationOpts = { identity: opts.rotation === 'identity' };
  if (foldOpt === 'auto') {
    const searchChunks = opts.calibChunks.slice(0, opts.foldSearchChunks ?? 32);
    for (const f of foldCandidates(d, r)) {
      const model = new ReferenceLatent(config, stage1(config, weights, keyGramMatrices, r, f, rotationOpts));
      let done = 0;
      const ppl = await opts.scorePerplexity!(searchChunks, (chunk) => {
        model.reset();
        const out = model.forward(chunk);
        progress({ stage: `freqfold f=${f}`, done: ++done, total: searchChunks.length, unit: 'chunk' });
        return out;
      });
      foldSearch.push({ fold: f, perplexity: ppl });
    }
    // Lowest perplexity; ties go to the smaller f (less folding).
    fold = foldSearch.reduce((best, x) => (x.perplexity < best.perplexity ? x : best)).fold;
  } else {
    fold = foldOpt;
  }
  const stage1Weights = stage1(config, weights, keyGramMatrices, r, fold, {
    ...rotationOpts,
    onLayer: (done) => progress({ stage: `stage 1 RoRoPE f=${fold}`, done, total: config.nLayers, unit: 'layer' }),
  });

  // Stage 2 calibration on the Stage-1 model (RoPE removal upstream changes later layers' inputs).
  const kvGrams = Array.from({ length: config.nLayers }, () => new GramAccumulator(2 * L));
  const inputGrams = qLoraRank !== null ? Array.from({ length: config.nLayers }, () => new GramAccumulator(config.dim)) : null;
  const stage1Model = new ReferenceLatent(config, stage1Weights);
  const z = new Float64Array(2 * L);
  opts.calibChunks.forEach((chunk, i) => {
    stage1Model.reset();
    stage1Model.forward(chunk, {
      logits: 'last',
      observe: (o) => {
        z.set(o.k, 0);
        z.set(o.v, L);
        kvGrams[o.layer].add(z);
        inputGrams?.[o.layer].add(o.xn);
      },
    });
    progress({ stage: 'calibrate stage 1', done: i + 1, total: calibTotal, unit: 'chunk' });
  });
  const mla = buildMla(
    config,
    stage1Weights,
    kvGrams.map((g) => g.matrix()),
    { ropeDim: r, kvLoraRank: R, qLoraRank },
    inputGrams?.map((g) => g.matrix()),
    (done) => progress({ stage: 'stage 2 PCA', done, total: config.nLayers, unit: 'layer' }),
  );

  let perplexity: ConversionReport['perplexity'] = null;
  const evalChunks = opts.evalChunks ?? [];
  if (opts.evalChunks && opts.scorePerplexity) {
    const score = async (name: string, model: { reset(): void; forward(t: number[]): Float64Array[] }) => {
      let done = 0;
      return opts.scorePerplexity!(evalChunks, (chunk) => {
        model.reset();
        const out = model.forward(chunk);
        progress({ stage: `perplexity ${name}`, done: ++done, total: evalChunks.length, unit: 'chunk' });
        return out;
      });
    };
    perplexity = {
      original: await score('original', original),
      stage1: await score('stage 1', stage1Model),
      mla: await score('MLA', new ReferenceMla(mla.config, mla.weights)),
    };
  }

  return {
    config: mla.config,
    weights: mla.weights,
    stage1: stage1Weights,
    report: {
      ropeDim: r,
      kvLoraRank: R,
      freqFold: fold,
      qLoraRank,
      foldSearch,
      kvValuesBefore: kvValuesPerToken(config),
      kvValuesAfter: kvValuesPerToken(mla.config),
      paramsBefore: parameterCount(weights),
      paramsAfter: parameterCount(mla.weights),
      calibChunks: calibTotal,
      calibTokens,
      evalChunks: evalChunks.length,
      evalTokens: evalChunks.reduce((a, c) => a + c.length - 1, 0),
      perplexity,
      alphas: mla.alphas,
      energyKept: mla.energyKept,
    },
  };
}

/** Rounds f64 attention matrices to f32: the weights exactly as a f32 checkpoint holds them. */
export function mlaWeightsToF32(weights: MlaModelLike): ModelWeights {
  const f32 = (t: DenseMatrix | undefined): Tensor | undefined =>
    t === undefined ? undefined : { shape: [...t.shape], data: t.data instanceof Float32Array ? t.data : Float32Array.from(t.data) };
  return {
    tokenEmbedding: weights.tokenEmbedding,
    finalNorm: weights.finalNorm,
    output: weights.output,
    layers: weights.layers.map((l) => ({
      kind: 'mla',
      attnNorm: l.attnNorm,
      qProj: f32(l.qProj),
      qProjBias: f32(l.qProjBias),
      qAProj: f32(l.qAProj),
      qANorm: f32(l.qANorm),
      qBProj: f32(l.qBProj),
      kvAProj: f32(l.kvAProj)!,
      kvAProjBias: f32(l.kvAProjBias),
      kvANorm: f32(l.kvANorm),
      kvBProj: f32(l.kvBProj)!,
      wo: f32(l.wo)!,
      ffnNorm: l.ffnNorm,
      wGate: l.wGate,
      wUp: l.wUp,
      wDown: l.wDown,
    })),
  };
}

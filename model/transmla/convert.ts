// The TransMLA pipeline: calibrate, Stage 1 (RoRoPE + FreqFold, f searched by calibration perplexity when asked),
// re-calibrate on the Stage-1 model, Stage 2 (BKV + joint K/V PCA), and the numbers users read (KV values per token,
// parameters, held-out perplexity of original / Stage 1 / MLA).
//
// The forward passes run on a CalibrationDevice: the CPU float64 reference here (referenceCalibration, for models the
// CPU can run such as stories260K), or the GPU runner (engine/calibration.ts, for real sizes; model/ does not import
// engine/, so it is passed in). Either way the device only yields each layer's attention input xn; K = W_K xn (+b) and
// V = W_V xn (+b) are computed here in float64 and their Gram matrices accumulated streaming, never holding activations.
import type { GqaConfig, MlaConfig } from '../config.ts';
import { kvValuesPerToken } from '../config.ts';
import type { ModelWeights, Tensor } from '../weights.ts';
import { ReferenceGqa } from '../reference/gqa.ts';
import { ReferenceLatent, type LatentModelWeights } from '../reference/stage1.ts';
import { ReferenceMla, type MlaModelLike } from '../reference/mla.ts';
import { matvec, type DenseMatrix } from '../reference/ops.ts';
import { GramAccumulator } from './eigen.ts';
import { checkFoldSpec, foldCandidates, stage1 } from './rorope.ts';
import { buildMla, checkRanks, maxKvLoraRank } from './stage2.ts';

/** Scores chunks: perplexity of a logits source (engine/perplexity.ts's scoreChunks in the CLI). */
export type PerplexityScorer = (chunks: number[][], logitsFor: (chunk: number[]) => Float64Array[]) => Promise<number>;

/** Attention inputs after RMSNorm of `rows` tokens of one layer, [rows, dim] row-major (f64 on the CPU, f32 on the GPU). */
export type AttnInputSink = (layer: number, xn: Float32Array | Float64Array, rows: number) => void;

/** One model as the converter drives it: its attention inputs over calibration chunks, and its perplexity. */
export interface CalibrationModel {
  /** Runs every chunk from position 0; the sink sees every token of every layer. onChunks(done) as chunks finish. */
  attnInputs(chunks: number[][], sink: AttnInputSink, onChunks?: (done: number) => void): Promise<void>;
  /** Perplexity over chunks (every position predicted, averaged over tokens). */
  perplexity(chunks: number[][], onChunks?: (done: number) => void): Promise<number>;
  /** Frees what the model holds (GPU weights and KV pool); the converter calls it as soon as a model is done. */
  dispose(): void;
}

/** Where the forward passes of a conversion run: the CPU reference (referenceCalibration) or the GPU (engine/calibration.ts). */
export interface CalibrationDevice {
  /** 'cpu' or 'gpu', for reports. */
  readonly name: string;
  original(config: GqaConfig, weights: ModelWeights): Promise<CalibrationModel>;
  /** The Stage-1 model (r rope dims); a device may run it in any exact form (the GPU: full-rank MLA). */
  stage1(config: GqaConfig, weights: LatentModelWeights, ropeDim: number): Promise<CalibrationModel>;
  mla(config: MlaConfig, weights: MlaModelLike): Promise<CalibrationModel>;
}

interface ReferenceForward {
  reset(): void;
  forward(tokens: number[], opts?: { logits?: 'all' | 'last'; observe?: (o: { layer: number; xn: Float64Array }) => void }): Float64Array[];
}

/** The CPU float64 reference as a calibration device; perplexities go through `scorePerplexity`. */
export function referenceCalibration(scorePerplexity?: PerplexityScorer): CalibrationDevice {
  const wrap = (model: ReferenceForward): CalibrationModel => ({
    async attnInputs(chunks, sink, onChunks) {
      chunks.forEach((chunk, i) => {
        model.reset();
        model.forward(chunk, { logits: 'last', observe: (o) => sink(o.layer, o.xn, 1) });
        onChunks?.(i + 1);
      });
    },
    async perplexity(chunks, onChunks) {
      if (!scorePerplexity) throw new Error('the CPU calibration device was made without a perplexity scorer');
      let done = 0;
      return scorePerplexity(chunks, (chunk) => {
        model.reset();
        const out = model.forward(chunk);
        onChunks?.(++done);
        return out;
      });
    },
    dispose() {},
  });
  return {
    name: 'cpu',
    original: async (config, weights) => wrap(new ReferenceGqa(config, weights)),
    stage1: async (config, weights) => wrap(new ReferenceLatent(config, weights)),
    mla: async (config, weights) => wrap(new ReferenceMla(config, weights)),
  };
}

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
  /** Needed for the freqfold search and the perplexity table on the CPU reference (no `device` given). */
  scorePerplexity?: PerplexityScorer;
  /** Where the forward passes run (default: the CPU reference with scorePerplexity). */
  device?: CalibrationDevice;
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

/** Converts a GQA model to MLA, forward passes on opts.device (default the CPU reference). Throws readable errors for impossible options before working. */
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
  if ((foldOpt === 'auto' || opts.evalChunks) && !opts.scorePerplexity && !opts.device) {
    throw new Error('convertToMla: freqfold auto and the perplexity table need scorePerplexity (or a calibration device)');
  }
  const device = opts.device ?? referenceCalibration(opts.scorePerplexity);
  const progress = opts.onProgress ?? (() => {});
  const D = config.dim;
  const rowOf = (xn: Float32Array | Float64Array, row: number) => (xn.length === D ? xn : xn.subarray(row * D, (row + 1) * D));
  const evalChunks = opts.evalChunks ?? [];
  const wantTable = !!opts.evalChunks;
  const score = async (name: string, model: CalibrationModel) =>
    model.perplexity(evalChunks, (done) => progress({ stage: `perplexity ${name}`, done, total: evalChunks.length, unit: 'chunk' }));

  // Stage 1 calibration: pre-RoPE keys K = W_K xn (+b_K) of the original model, in float64.
  const sourceLayers = weights.layers.map((l, i) => {
    if (l.kind !== 'gqa') throw new Error(`TransMLA: layer ${i} is already ${l.kind}; the converter takes GQA checkpoints`);
    return l;
  });
  const keyGrams = Array.from({ length: config.nLayers }, () => new GramAccumulator(L));
  const calibTotal = opts.calibChunks.length;
  const calibTokens = opts.calibChunks.reduce((n, c) => n + c.length, 0);
  let originalPpl = NaN;
  {
    const original = await device.original(config, weights);
    try {
      await original.attnInputs(
        opts.calibChunks,
        (layer, xn, rows) => {
          const lw = sourceLayers[layer];
          for (let row = 0; row < rows; row++) keyGrams[layer].add(matvec(lw.wk, rowOf(xn, row), lw.bk));
        },
        (done) => progress({ stage: 'calibrate original', done, total: calibTotal, unit: 'chunk' }),
      );
      if (wantTable) originalPpl = await score('original', original);
    } finally {
      original.dispose();
    }
  }
  const keyGramMatrices = keyGrams.map((g) => g.matrix());

  // FreqFold: try every valid f on calibration chunks unless one was given.
  const foldSearch: { fold: number; perplexity: number }[] = [];
  let fold: number;
  const rotationOpts = { identity: opts.rotation === 'identity' };
  if (foldOpt === 'auto') {
    const searchChunks = opts.calibChunks.slice(0, opts.foldSearchChunks ?? 32);
    for (const f of foldCandidates(d, r)) {
      const model = await device.stage1(config, stage1(config, weights, keyGramMatrices, r, f, rotationOpts), r);
      try {
        const ppl = await model.perplexity(searchChunks, (done) => progress({ stage: `freqfold f=${f}`, done, total: searchChunks.length, unit: 'chunk' }));
        foldSearch.push({ fold: f, perplexity: ppl });
      } finally {
        model.dispose();
      }
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

  // Stage 2 calibration on the Stage-1 model (RoPE removal upstream changes later layers' inputs): z = [k' ; v] with
  // k' = W_K' xn (+b_K'), v = W_V xn (+b_V) from the Stage-1 weights, in float64.
  const kvGrams = Array.from({ length: config.nLayers }, () => new GramAccumulator(2 * L));
  const inputGrams = qLoraRank !== null ? Array.from({ length: config.nLayers }, () => new GramAccumulator(config.dim)) : null;
  const z = new Float64Array(2 * L);
  let stage1Ppl = NaN;
  {
    const stage1Model = await device.stage1(config, stage1Weights, r);
    try {
      await stage1Model.attnInputs(
        opts.calibChunks,
        (layer, xn, rows) => {
          const lw = stage1Weights.layers[layer];
          for (let row = 0; row < rows; row++) {
            const x = rowOf(xn, row);
            z.set(matvec(lw.wk, x, lw.bk), 0);
            z.set(matvec(lw.wv, x, lw.bv), L);
            kvGrams[layer].add(z);
            inputGrams?.[layer].add(x);
          }
        },
        (done) => progress({ stage: 'calibrate stage 1', done, total: calibTotal, unit: 'chunk' }),
      );
      if (wantTable) stage1Ppl = await score('stage 1', stage1Model);
    } finally {
      stage1Model.dispose();
    }
  }
  const mla = buildMla(
    config,
    stage1Weights,
    kvGrams.map((g) => g.matrix()),
    { ropeDim: r, kvLoraRank: R, qLoraRank },
    inputGrams?.map((g) => g.matrix()),
    (done) => progress({ stage: 'stage 2 PCA', done, total: config.nLayers, unit: 'layer' }),
  );

  let perplexity: ConversionReport['perplexity'] = null;
  if (wantTable) {
    const mlaModel = await device.mla(mla.config, mla.weights);
    try {
      perplexity = { original: originalPpl, stage1: stage1Ppl, mla: await score('MLA', mlaModel) };
    } finally {
      mlaModel.dispose();
    }
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

// Small random MLA models for GPU tests: a DeepSeek-style config with overrides, random weights with random norms.
import type { MlaConfig } from '../model/config.ts';
import type { ModelWeights } from '../model/weights.ts';
import { syntheticModel } from '../model/synthetic.ts';
import { roundToF16 } from '../kernels/tensors.ts';
import { randomArray } from './kernels-helpers.ts';

/** A 2-layer, 4-head MLA config (dim 48, R 24, rope 8, nope 12, v 10); softmax scale from the head dims unless given. */
export function tinyMlaConfig(over: Partial<MlaConfig>): MlaConfig {
  const base: MlaConfig = {
    arch: 'deepseek_v3',
    attention: 'mla',
    dim: 48,
    hiddenDim: 64,
    nLayers: 2,
    nHeads: 4,
    vocabSize: 97,
    maxSeqLen: 128,
    ropeTheta: 10000,
    rmsEps: 1e-5,
    tiedEmbeddings: false,
    bosId: 1,
    eosId: 2,
    kvLoraRank: 24,
    qLoraRank: null,
    qkRopeHeadDim: 8,
    qkNopeHeadDim: 12,
    vHeadDim: 10,
    attentionBias: false,
    qkLatentLayernorm: false,
    ropeLayout: 'interleaved',
    softmaxScale: 0,
  };
  const c = { ...base, ...over };
  if (!over.softmaxScale) c.softmaxScale = 1 / Math.sqrt(c.qkNopeHeadDim + c.qkRopeHeadDim);
  return c;
}

/** Random weights; norm weights randomized too (synthetic ones are all 1), so a misplaced norm shows. */
export function randomMlaModel(config: MlaConfig, seed: number, f16Weights = false): { config: MlaConfig; weights: ModelWeights } {
  const m = syntheticModel(config, { seed, std: 0.3 });
  let s = seed;
  for (const l of m.weights.layers) {
    if (l.kind !== 'mla') throw new Error('synthetic MLA model has a non-MLA layer');
    for (const t of [l.attnNorm, l.ffnNorm, l.kvANorm, l.qANorm]) if (t) t.data.set(randomArray(t.data.length, ++s, 0.5).map((v) => 1 + v));
    // f16 weights on the GPU: give the reference the same values, so only the f16 cache differs.
    if (f16Weights) for (const t of Object.values(l)) if (typeof t === 'object' && t.data.length > t.shape[0]) t.data.set(roundToF16(t.data));
  }
  if (f16Weights) for (const t of [m.weights.tokenEmbedding, m.weights.output]) t.data.set(roundToF16(t.data));
  return { config, weights: m.weights };
}

// Small random MLA models for GPU tests: a DeepSeek-style config with overrides, random weights with random norms.
import type { ModelRunner, StepSequence } from '../engine/types.ts';
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

/**
 * Three random prompts (11, 6 and 14 tokens) through a runner in steps of 3 + 2 + 3 rows — prefill chunks of each,
 * mixed with decode rows once a prompt is nearly done — on fixed, interleaved block tables (blocks of 4 tokens, a pool
 * of at least 41); every row's logits back, per prompt and token.
 */
export async function runPromptSteps(runner: ModelRunner, vocabSize: number, seed: number): Promise<{ prompts: number[][]; logits: Float32Array[][] }> {
  const tok = (n: number, s: number) => Array.from(randomArray(n, s), (v) => Math.floor((v + 1) * 0.5 * (vocabSize - 3)) + 3);
  const prompts = [tok(11, seed + 1), tok(6, seed + 2), tok(14, seed + 3)];
  const tables = [[5, 9, 1], [7, 3], [40, 2, 30, 11]];
  const quota = [3, 2, 3];
  const logits: Float32Array[][] = prompts.map(() => []);
  const done = prompts.map(() => 0);
  while (done.some((d, i) => d < prompts[i].length)) {
    const step: StepSequence[] = [];
    const who: number[] = [];
    prompts.forEach((p, i) => {
      const n = Math.min(quota[i], p.length - done[i]);
      if (n === 0) return;
      step.push({ tokens: p.slice(done[i], done[i] + n), startPos: done[i], blockTable: tables[i], logits: 'all' });
      who.push(i);
      done[i] += n;
    });
    const out = await runner.step(step);
    let row = 0;
    step.forEach((s, k) => {
      for (let t = 0; t < s.tokens.length; t++, row++) logits[who[k]].push(out.slice(row * vocabSize, (row + 1) * vocabSize));
    });
  }
  return { prompts, logits };
}

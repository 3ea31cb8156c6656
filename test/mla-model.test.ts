// Whole random MLA models on the GPU runner (which picks the MLA block from the config) vs the float64 MLA reference in
// both forms (absorbed and naive): q_proj and q_a/q_b (+ q_a_layernorm), kv_a_layernorm, biases, both RoPE layouts,
// batches of prefill chunks and decode rows.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import type { ModelRunner, StepSequence } from '../engine/types.ts';
import type { MlaConfig } from '../model/config.ts';
import type { ModelWeights } from '../model/weights.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import { syntheticModel } from '../model/synthetic.ts';
import { roundToF16 } from '../kernels/tensors.ts';
import { fileGpu, freshSeed, randomArray, relError } from './kernels-helpers.ts';

const gpu = fileGpu();

function mlaConfig(over: Partial<MlaConfig>): MlaConfig {
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
function randomModel(config: MlaConfig, seed: number, f16Weights: boolean): { config: MlaConfig; weights: ModelWeights } {
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
 * Runs three prompts through the runner in steps of at most 8 rows (3 + 2 + 3 tokens per step: prefill chunks of
 * each, mixed with decode rows once a prompt is nearly done; small steps keep to the GEMV matmul pipelines, which
 * compile fast on SwiftShader) and compares every row's logits with the reference's.
 */
async function checkModel(config: MlaConfig, opts: { cacheDtype?: 'f32' | 'f16'; weightDtype?: 'f32' | 'f16'; bar: number }): Promise<number> {
  const g = await gpu();
  const seed = freshSeed();
  const model = randomModel(config, seed, opts.weightDtype === 'f16');
  const runner: ModelRunner = await createGpuRunner(g, model, {
    weightDtype: opts.weightDtype ?? 'f32',
    cacheDtype: opts.cacheDtype ?? 'f32',
    blockSize: 4,
    numBlocks: 64,
    maxRowsPerStep: 8,
  });
  try {
    const V = config.vocabSize;
    const tok = (n: number, s: number) => Array.from(randomArray(n, s), (v) => Math.floor((v + 1) * 0.5 * (V - 3)) + 3);
    const prompts = [tok(11, seed + 1), tok(6, seed + 2), tok(14, seed + 3)];
    const tables = [[5, 9, 1], [7, 3], [40, 2, 30, 11]];
    const quota = [3, 2, 3];
    const got: Float32Array[][] = prompts.map(() => []);
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
      const logits = await runner.step(step);
      let row = 0;
      step.forEach((s, k) => {
        for (let t = 0; t < s.tokens.length; t++, row++) got[who[k]].push(logits.subarray(row * V, (row + 1) * V));
      });
    }
    let worst = 0;
    prompts.forEach((p, i) => {
      // Absorbed on the GPU must equal both reference forms: absorbed, and naive (K/V expanded per head).
      for (const form of ['absorbed', 'naive'] as const) {
        const want = new ReferenceMla(config, model.weights, { form }).forward(p);
        for (let t = 0; t < p.length; t++) {
          const err = relError(got[i][t], want[t]);
          worst = Math.max(worst, err);
          assert.ok(err <= opts.bar, `prompt ${i} token ${t} vs ${form} reference: relative error ${err} > ${opts.bar} (seed ${seed}, ${JSON.stringify(config)})`);
        }
      }
    });
    assert.equal(runner.kvBytesPerToken, config.nLayers * (config.kvLoraRank + config.qkRopeHeadDim) * (opts.cacheDtype === 'f16' ? 2 : 4));
    return worst;
  } finally {
    runner.destroy();
  }
}

test('random MLA model, q_proj with biases, no latent norms, interleaved RoPE: GPU logits ≤ 1e-4 of the reference', async () => {
  await checkModel(mlaConfig({ attentionBias: true }), { bar: 1e-4 });
});

test('random MLA model, q_a/q_b with q_a_layernorm and kv_a_layernorm (DeepSeek style), rotate-half RoPE', async () => {
  await checkModel(mlaConfig({ qLoraRank: 20, qkLatentLayernorm: true, ropeLayout: 'rotate_half', nHeads: 3 }), { bar: 1e-4 });
});

test('random MLA model at 512 + 64 with two heads, biases and latent norms', async () => {
  await checkModel(
    mlaConfig({ kvLoraRank: 512, qkRopeHeadDim: 64, qkNopeHeadDim: 16, vHeadDim: 16, nHeads: 2, nLayers: 1, attentionBias: true, qkLatentLayernorm: true }),
    { bar: 1e-4 },
  );
});

test('random MLA model with f16 weights and f16 latent cache stays within 1e-2 of the reference on the same f16 weights', async () => {
  await checkModel(mlaConfig({ attentionBias: true }), { bar: 1e-2, cacheDtype: 'f16', weightDtype: 'f16' });
});

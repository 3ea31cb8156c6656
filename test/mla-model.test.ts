// Whole random MLA models on the GPU runner (which picks the MLA block from the config) vs the float64 MLA reference in
// both forms (absorbed and naive): q_proj and q_a/q_b (+ q_a_layernorm), kv_a_layernorm, biases, both RoPE layouts,
// batches of prefill chunks and decode rows.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { mlaBlockFactory, type MlaBlockOptions } from '../engine/mla-block.ts';
import type { ModelRunner } from '../engine/types.ts';
import type { MlaConfig } from '../model/config.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import { fileGpu, freshSeed, relError } from './kernels-helpers.ts';
import { randomMlaModel, runPromptSteps, tinyMlaConfig } from './mla-fixtures.ts';

const gpu = fileGpu();



/**
 * Runs three prompts through the runner in steps of at most 8 rows (3 + 2 + 3 tokens per step: prefill chunks of
 * each, mixed with decode rows once a prompt is nearly done; small steps keep to the GEMV matmul pipelines, which
 * compile fast on SwiftShader) and compares every row's logits with the reference's.
 */
async function checkModel(config: MlaConfig, opts: { cacheDtype?: 'f32' | 'f16'; weightDtype?: 'f32' | 'f16'; bar: number; block?: MlaBlockOptions }): Promise<number> {
  const g = await gpu();
  const seed = freshSeed();
  const model = randomMlaModel(config, seed, opts.weightDtype === 'f16');
  const runner: ModelRunner = await createGpuRunner(g, model, {
    weightDtype: opts.weightDtype ?? 'f32',
    cacheDtype: opts.cacheDtype ?? 'f32',
    blockSize: 4,
    numBlocks: 64,
    maxRowsPerStep: 8,
    ...(opts.block ? { attentionBlock: mlaBlockFactory(opts.block) } : {}),
  });
  try {
    const { prompts, logits: got } = await runPromptSteps(runner, config.vocabSize, seed);
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

test('random MLA model, q_proj with biases, no latent norms (fused q + kv_a, one RoPE), interleaved RoPE: GPU logits ≤ 1e-4 of the reference', async () => {
  await checkModel(tinyMlaConfig({ attentionBias: true }), { bar: 1e-4 });
});

test("random MLA model with the block's options: 4-token split chunks (rows of 14 tokens merge 4 chunks), the head products on 8 k slices or staged, or W_UV with the merge in the decode back (every step, or steps of ≤ 4 rows)", async () => {
  // Steps here have 2 to 8 rows: backMaxRows 16 runs the merge and W_UV as one kernel in all of them, 4 mixes the
  // back with separate steps.
  const config = tinyMlaConfig({ attentionBias: true });
  await checkModel(config, { bar: 1e-4, block: { minChunk: 4, headKSlices: 8 } });
  await checkModel(config, { bar: 1e-4, block: { headDecodeKernel: 'staged' } });
  await checkModel(config, { bar: 1e-4, block: { backMaxRows: 16 } });
  await checkModel(config, { bar: 1e-4, block: { backMaxRows: 4, minChunk: 4 } });
  const g = await gpu();
  await assert.rejects(
    createGpuRunner(g, randomMlaModel(config, 1, false), { weightDtype: 'f32', cacheDtype: 'f32', blockSize: 4, numBlocks: 8, attentionBlock: mlaBlockFactory({ minChunk: 3 }) }),
    /minChunk 3 is not a power of two from 1 to 512/,
  );
});

test('random MLA model, kv_lora_rank below the nope dims: the fused q + kv_a projection with two RoPE dispatches', async () => {
  // Without q LoRA and latent norms the block fuses kv_a_proj and q_proj (rows [c | k_pe | q]) and rotates k_pe with
  // the q heads in one dispatch where R ≥ dn; here R < dn, so k_pe and q_pe take a dispatch each.
  await checkModel(tinyMlaConfig({ kvLoraRank: 8, qkNopeHeadDim: 12, attentionBias: true }), { bar: 1e-4 });
});

test('random MLA model, q_a/q_b with q_a_layernorm and kv_a_layernorm (DeepSeek style), rotate-half RoPE', async () => {
  await checkModel(tinyMlaConfig({ qLoraRank: 20, qkLatentLayernorm: true, ropeLayout: 'rotate_half', nHeads: 3 }), { bar: 1e-4 });
});

test('random MLA model at 512 + 64 with two heads, biases and latent norms', async () => {
  await checkModel(
    tinyMlaConfig({ kvLoraRank: 512, qkRopeHeadDim: 64, qkNopeHeadDim: 16, vHeadDim: 16, nHeads: 2, nLayers: 1, attentionBias: true, qkLatentLayernorm: true }),
    { bar: 1e-4 },
  );
});

test('random MLA model with f16 weights and f16 latent cache stays within 3e-2 of the reference on the same f16 weights', async () => {
  // The f16 cache rounds every latent value (2^-11 relative) and 2 layers amplify it: 12 fresh seeds gave 1.5e-3 …
  // 4.2e-3, and seed 599745172 1.07e-2 (near-cancelling logits of a random model); a wrong kernel is off by O(1).
  await checkModel(tinyMlaConfig({ attentionBias: true }), { bar: 3e-2, cacheDtype: 'f16', weightDtype: 'f16' });
});

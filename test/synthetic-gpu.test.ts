// Real-size synthetic models' fast path: matrices generated as packed f16 (syntheticF16Model) go up to the GPU runner
// as they are, and give the same logits as the same values packed by the runner from f32; GQA and MLA, SwiftShader.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import type { StepSequence } from '../engine/types.ts';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import type { GqaConfig, ModelConfig } from '../model/config.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import { f16BitsToF32 } from '../model/safetensors.ts';
import { mlaShapeOf, syntheticF16Model } from '../model/synthetic.ts';
import type { LayerWeights, ModelWeights, Tensor } from '../model/weights.ts';
import { relError } from './kernels-helpers.ts';

// Small shapes with an MLP width that is not a multiple of 8 (padded f16 rows) and biases (Qwen2 style).
const TINY_GQA: GqaConfig = {
  arch: 'qwen2',
  attention: 'gqa',
  dim: 64,
  hiddenDim: 132,
  nLayers: 3,
  nHeads: 4,
  nKvHeads: 2,
  headDim: 16,
  vocabSize: 300,
  maxSeqLen: 256,
  ropeTheta: 10000,
  rmsEps: 1e-6,
  tiedEmbeddings: false,
  bosId: 1,
  eosId: 2,
  ropeLayout: 'rotate_half',
  attentionBias: true,
};
const TINY_MLA = mlaShapeOf(TINY_GQA, 8, 24);

let gpu: GpuContext;
before(async () => {
  gpu = await openGpu({ log: () => {} });
});
after(() => {
  gpu.destroy();
  releaseGpu();
});

/** The same weights as plain f32 tensors (no f16 words): the runner packs them itself. */
function materialized(w: ModelWeights): ModelWeights {
  const plain = (t: Tensor): Tensor => ({ shape: t.shape, data: new Float32Array(t.data) });
  const layer = (l: LayerWeights): LayerWeights => {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(l)) out[k] = v && typeof v === 'object' && 'shape' in v ? plain(v as Tensor) : v;
    return out as unknown as LayerWeights;
  };
  return { tokenEmbedding: plain(w.tokenEmbedding), layers: w.layers.map(layer), finalNorm: plain(w.finalNorm), output: plain(w.output) };
}

/** A prompt of 20 tokens and then 3 decode steps; all logits of every step, concatenated. */
async function runSteps(config: ModelConfig, weights: ModelWeights): Promise<Float32Array[]> {
  const runner = await createGpuRunner(gpu, { config, weights }, { weightDtype: 'f16', cacheDtype: 'f32', blockSize: 16, numBlocks: 8, maxRowsPerStep: 24 });
  try {
    const prompt = Array.from({ length: 20 }, (_, i) => (i * 37 + 5) % config.vocabSize);
    const table = [3, 5];
    const out = [await runner.step([{ tokens: prompt, startPos: 0, blockTable: table, logits: 'all' }])];
    for (let s = 0; s < 3; s++) {
      const seq: StepSequence = { tokens: [(s * 101 + 7) % config.vocabSize], startPos: 20 + s, blockTable: table, logits: 'last' };
      out.push(await runner.step([seq]));
    }
    return out;
  } finally {
    runner.destroy();
  }
}

test('packed f16 generation: deterministic per seed, uniform with the requested std, padding zero, lazy f32 view = the f16 words', () => {
  const a = syntheticF16Model(TINY_GQA, { seed: 3 });
  const b = syntheticF16Model(TINY_GQA, { seed: 3 });
  const c = syntheticF16Model(TINY_GQA, { seed: 4 });
  const down = a.weights.layers[0].wDown; // [64, 132]: rows padded to 136 values = 68 words
  assert.deepEqual(down.shape, [64, 132]);
  assert.equal(down.f16!.length, 64 * 68);
  assert.deepEqual(down.f16, b.weights.layers[0].wDown.f16);
  assert.notDeepEqual(down.f16!.subarray(0, 8), c.weights.layers[0].wDown.f16!.subarray(0, 8));
  // Shared layers by default: one tensor object for every layer; distinct tensors differ.
  assert.equal(a.weights.layers[2].wDown, down);
  assert.notDeepEqual(a.weights.layers[0].wUp.f16!.subarray(0, 8), a.weights.layers[0].wGate.f16!.subarray(0, 8));
  for (let r = 0; r < 64; r++) for (let w = 66; w < 68; w++) assert.equal(down.f16![r * 68 + w], 0, `padding word ${w} of row ${r}`);
  const data = down.data;
  assert.equal(data.length, 64 * 132);
  for (const [r, col] of [[0, 0], [0, 131], [17, 64], [63, 77]]) {
    const word = down.f16![r * 68 + (col >> 1)];
    assert.equal(data[r * 132 + col], f16BitsToF32(col & 1 ? word >>> 16 : word & 0xffff));
  }
  // Down projections use 0.02/√(2·layers); a big matrix for the statistics: the LM head, std 0.02, 300 × 64 values.
  const head = a.weights.output.data;
  let sum = 0;
  let sq = 0;
  let max = 0;
  for (const v of head) {
    sum += v;
    sq += v * v;
    max = Math.max(max, Math.abs(v));
  }
  const mean = sum / head.length;
  const std = Math.sqrt(sq / head.length - mean * mean);
  assert.ok(Math.abs(mean) < 0.001, `mean ${mean}`);
  assert.ok(Math.abs(std / 0.02 - 1) < 0.03, `std ${std}`);
  assert.ok(max <= Math.sqrt(3) * 0.02 * 1.001, `max ${max}`);
  // Distinct layers on request.
  const distinct = syntheticF16Model(TINY_GQA, { seed: 3, shareLayers: false });
  assert.notDeepEqual(distinct.weights.layers[1].wDown.f16!.subarray(0, 8), distinct.weights.layers[0].wDown.f16!.subarray(0, 8));
});

test('GQA: the runner uploads pre-packed f16 without reading f32 data, and its logits equal the f32-packed path bit for bit (and the float64 reference)', async () => {
  const m = syntheticF16Model(TINY_GQA, { seed: 1, std: 0.2 });
  const plain = materialized(m.weights);
  // Every pre-packed matrix's data now throws: the upload must not touch it.
  const guarded: ModelWeights = {
    ...m.weights,
    tokenEmbedding: guard(m.weights.tokenEmbedding),
    output: guard(m.weights.output),
    layers: m.weights.layers.map((l) => {
      const out: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(l)) out[k] = v && typeof v === 'object' && 'f16' in v ? guard(v as Tensor) : v;
      return out as unknown as LayerWeights;
    }),
  };
  const got = await runSteps(m.config, guarded);
  const want = await runSteps(m.config, plain);
  got.forEach((g, i) => assert.deepEqual(g, want[i], `step ${i}`));
  // The same model through the float64 reference (weights exact f16 values, cache f32 here): prompt rows.
  const ref = new ReferenceGqa(TINY_GQA, plain).forward(Array.from({ length: 20 }, (_, i) => (i * 37 + 5) % 300));
  const V = TINY_GQA.vocabSize;
  for (const t of [0, 9, 19]) {
    const err = relError(got[0].subarray(t * V, (t + 1) * V), ref[t]);
    assert.ok(err < 1e-4, `prompt row ${t}: relative error ${err}`);
  }
});

test('MLA shape: pre-packed f16 upload = f32-packed upload, bit for bit', async () => {
  const m = syntheticF16Model(TINY_MLA, { seed: 2, std: 0.2 });
  assert.equal(m.config.attention, 'mla');
  const got = await runSteps(m.config, m.weights);
  const want = await runSteps(m.config, materialized(m.weights));
  got.forEach((g, i) => {
    assert.ok(g.every(Number.isFinite), `step ${i} has non-finite logits`);
    assert.deepEqual(g, want[i], `step ${i}`);
  });
});

/** The tensor with its f16 words and a `data` that throws when read. */
function guard(t: Tensor): Tensor {
  const out = { shape: t.shape, f16: t.f16 } as Tensor;
  Object.defineProperty(out, 'data', {
    get() {
      throw new Error(`f32 data of a pre-packed [${t.shape}] tensor was read`);
    },
  });
  return out;
}

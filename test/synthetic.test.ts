// Synthetic models: real configurations (sizes checked against the published parameter counts), seeded and
// deterministic values, lazy f32 / packed-f16 generation, shared layers, and a clear refusal when too big for the host.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { kvValuesPerToken } from '../model/config.ts';
import { f16BitsToF32 } from '../model/safetensors.ts';
import { syntheticConfig, syntheticModel, syntheticSource } from '../model/synthetic.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';

const count = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

test('real configurations: parameter counts and KV values per token match the published models', () => {
  const params = (name: Parameters<typeof syntheticSource>[0]) => syntheticSource(name).tensors.reduce((a, t) => a + count(t.shape), 0);
  // Qwen2.5-7B: 7.62 B parameters; Llama-3-8B: 8.03 B; Llama-2-7B: 6.74 B.
  assert.ok(Math.abs(params('qwen2.5-7b') / 1e9 - 7.62) < 0.01, `qwen2.5-7b has ${params('qwen2.5-7b')}`);
  assert.ok(Math.abs(params('llama-3-8b') / 1e9 - 8.03) < 0.01, `llama-3-8b has ${params('llama-3-8b')}`);
  assert.ok(Math.abs(params('llama-2-7b') / 1e9 - 6.74) < 0.01, `llama-2-7b has ${params('llama-2-7b')}`);
  assert.equal(kvValuesPerToken(syntheticConfig('qwen2.5-7b')), 1024);
  assert.equal(kvValuesPerToken(syntheticConfig('qwen2.5-7b-mla')), 576);
  assert.equal(kvValuesPerToken(syntheticConfig('llama-2-7b')), 8192);
  assert.equal(kvValuesPerToken(syntheticConfig('deepseek-v2-lite-attn')), 576);
  const mla = syntheticSource('qwen2.5-7b-mla');
  assert.deepEqual(mla.spec('model.layers.0.self_attn.kv_b_proj.weight').shape, [28 * 256, 512]);
  assert.deepEqual(mla.spec('model.layers.0.self_attn.q_proj.weight').shape, [28 * 192, 3584]);
  assert.deepEqual(mla.spec('model.layers.0.self_attn.kv_a_proj_with_mqa.bias').shape, [576]);
  const qwen = syntheticSource('qwen2.5-7b', { layers: 2 });
  assert.equal(qwen.config.nLayers, 2);
  assert.deepEqual(qwen.spec('model.layers.1.self_attn.k_proj.bias').shape, [512]);
  assert.throws(() => qwen.spec('model.layers.2.self_attn.k_proj.bias'), /no tensor/);
});

test('values are seeded, deterministic, have the requested spread, and packed f16 equals f16(f32)', () => {
  const a = syntheticSource('llama-3-8b', { layers: 1, seed: 7 });
  const b = syntheticSource('llama-3-8b', { layers: 1, seed: 7 });
  const c = syntheticSource('llama-3-8b', { layers: 1, seed: 8 });
  const name = 'model.layers.0.self_attn.k_proj.weight';
  const x = a.f32(name);
  assert.deepEqual(x, b.f32(name));
  assert.notDeepEqual(x.subarray(0, 16), c.f32(name).subarray(0, 16));
  assert.notDeepEqual(x.subarray(0, 16), a.f32('model.layers.0.self_attn.v_proj.weight').subarray(0, 16));
  let mean = 0;
  let sq = 0;
  for (const v of x) {
    mean += v;
    sq += v * v;
  }
  mean /= x.length;
  const std = Math.sqrt(sq / x.length - mean * mean);
  assert.ok(Math.abs(mean) < 1e-4 && Math.abs(std - 0.02) < 2e-4, `mean ${mean}, std ${std}`);
  const packed = a.packedF16(name);
  assert.equal(packed.length, x.length / 2);
  for (let i = 0; i < 1000; i++) {
    const h = i & 1 ? packed[i >> 1] >>> 16 : packed[i >> 1] & 0xffff;
    assert.equal(f16BitsToF32(h), Math.fround(f16BitsToF32(h)));
    assert.ok(Math.abs(f16BitsToF32(h) - x[i]) <= Math.abs(x[i]) * 2 ** -11 + 2 ** -25, `f16 of element ${i}`);
  }
  const norm = a.f32('model.layers.0.input_layernorm.weight');
  assert.ok(norm.every((v) => v === 1));
});

test('shared layers reuse layer 0; oversized models are refused with the options named', () => {
  const small = { ...syntheticConfig('qwen2.5-7b'), dim: 128, hiddenDim: 256, nHeads: 4, nKvHeads: 2, headDim: 32 };
  const { weights } = syntheticModel(small, { layers: 3, vocabSize: 1000, shareLayers: true });
  assert.equal(weights.layers.length, 3);
  const l0 = weights.layers[0];
  const l2 = weights.layers[2];
  assert.ok(l0.kind === 'gqa' && l2.kind === 'gqa');
  assert.equal(l0.wq, l2.wq);
  assert.equal(l0.bk, l2.bk);
  assert.throws(() => syntheticModel('qwen2.5-7b'), /GiB of f32 weights.*shareLayers.*layers.*syntheticSource/);
});

test('a small synthetic GQA model runs in the reference with sane activations', () => {
  // Qwen2.5-7B's layer shape at a quarter of its width (a full layer is ~1 GB of f32: too much for a unit test).
  const quarter = { ...syntheticConfig('qwen2.5-7b'), dim: 896, hiddenDim: 4736, nHeads: 7, nKvHeads: 1 };
  const { config, weights } = syntheticModel(quarter, { layers: 4, vocabSize: 300 });
  assert.equal(config.attention, 'gqa');
  if (config.attention !== 'gqa') return;
  const logits = new ReferenceGqa(config, weights).forward([1, 2, 3], { logits: 'last' })[0];
  assert.equal(logits.length, 300);
  const max = logits.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  assert.ok(Number.isFinite(max) && max > 1e-3 && max < 50, `logit magnitude ${max}`);
});

// The float64 MLA reference: absorbed attention over the latent equals the naive form that expands K/V per head, on
// random MLA models with every option the config has (q LoRA, latent layernorms, biases, softmax scale).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { MlaConfig } from '../model/config.ts';
import { syntheticConfig, syntheticModel } from '../model/synthetic.ts';
import { ReferenceMla, type MlaObservation } from '../model/reference/mla.ts';

function mla(over: Partial<MlaConfig>): MlaConfig {
  return {
    arch: 'deepseek_v3',
    attention: 'mla',
    dim: 32,
    hiddenDim: 48,
    nLayers: 2,
    nHeads: 4,
    vocabSize: 41,
    maxSeqLen: 64,
    ropeTheta: 10000,
    rmsEps: 1e-6,
    tiedEmbeddings: false,
    bosId: 1,
    eosId: 2,
    kvLoraRank: 12,
    qLoraRank: null,
    qkRopeHeadDim: 4,
    qkNopeHeadDim: 6,
    vHeadDim: 5,
    attentionBias: false,
    qkLatentLayernorm: false,
    ropeLayout: 'interleaved',
    softmaxScale: 1 / Math.sqrt(10),
    ...over,
  };
}

function relErr(a: Float64Array[], b: Float64Array[]): number {
  let err = 0;
  let scale = 0;
  for (let t = 0; t < a.length; t++) {
    for (let i = 0; i < a[t].length; i++) {
      err = Math.max(err, Math.abs(a[t][i] - b[t][i]));
      scale = Math.max(scale, Math.abs(a[t][i]));
    }
  }
  return err / scale;
}

const CASES: [string, Partial<MlaConfig>][] = [
  ['plain (TransMLA output shape)', {}],
  ['biases', { attentionBias: true }],
  ['q LoRA + latent layernorms (stock DeepSeek)', { qLoraRank: 10, qkLatentLayernorm: true }],
  ['q LoRA without latent layernorms', { qLoraRank: 10 }],
  ['kv_a_layernorm only', { qkLatentLayernorm: true }],
  ['custom softmax scale, rotate_half rope', { softmaxScale: 0.7, ropeLayout: 'rotate_half' }],
  ['kv_lora_rank larger than the heads', { kvLoraRank: 40, nHeads: 3 }],
];

for (const [name, over] of CASES) {
  test(`absorbed MLA equals naive MLA: ${name}`, () => {
    const config = mla(over);
    const { weights } = syntheticModel(config, { seed: 5, std: 0.35 });
    // Non-trivial norm weights, so skipping or applying a latent layernorm shows.
    for (const l of weights.layers) {
      if (l.kind !== 'mla') throw new Error('expected mla layers');
      for (const norm of [l.kvANorm, l.qANorm]) if (norm) for (let i = 0; i < norm.data.length; i++) norm.data[i] = 0.5 + (i % 5) * 0.3;
    }
    const toks = [1, 7, 3, 30, 12, 5, 5, 9, 40, 2, 17, 8, 22];
    const absorbed = new ReferenceMla(config, weights, { form: 'absorbed' });
    const naive = new ReferenceMla(config, weights, { form: 'naive' });
    const rows: MlaObservation[] = [];
    const a = absorbed.forward(toks, { observe: (o) => rows.push(o) });
    const b = naive.forward(toks);
    const err = relErr(b, a);
    assert.ok(err <= 1e-9, `absorbed vs naive: ${err.toExponential(3)}`);
    assert.equal(rows.length, toks.length * config.nLayers);
    assert.equal(rows[0].latent.length, config.kvLoraRank);
    assert.equal(rows[0].kPe.length, config.qkRopeHeadDim);
    // Decoding in two calls over the cache gives the same logits as one call.
    absorbed.reset();
    const first = absorbed.forward(toks.slice(0, 6));
    const rest = absorbed.forward(toks.slice(6));
    assert.ok(relErr(a, [...first, ...rest]) === 0, 'split decode differs');
  });
}

test('qkLatentLayernorm decides whether the latent norms act', () => {
  const on = mla({ qLoraRank: 10, qkLatentLayernorm: true });
  const { weights } = syntheticModel(on, { seed: 9, std: 0.35 });
  const toks = [1, 4, 9, 16, 25, 36];
  const withNorm = new ReferenceMla(on, weights).forward(toks);
  const without = new ReferenceMla({ ...on, qkLatentLayernorm: false }, weights).forward(toks);
  assert.ok(relErr(withNorm, without) > 1e-3, 'the latent layernorms made no difference');
  assert.throws(() => new ReferenceMla(on, { ...weights, layers: weights.layers.map((l) => ({ ...l, kvANorm: undefined })) }), /kv_a_layernorm/);
});

test('DeepSeek-V2-Lite attention shape (1 layer, small vocab): absorbed equals naive', () => {
  const config = syntheticConfig('deepseek-v2-lite-attn', { layers: 1, vocabSize: 64 }) as MlaConfig;
  assert.equal(config.kvLoraRank, 512);
  assert.equal(config.qkRopeHeadDim, 64);
  const { weights } = syntheticModel(config, { layers: 1, vocabSize: 64, seed: 1, std: 0.05 });
  const toks = [1, 5, 9];
  const a = new ReferenceMla(config, weights, { form: 'absorbed' }).forward(toks);
  const b = new ReferenceMla(config, weights, { form: 'naive' }).forward(toks);
  assert.ok(relErr(b, a) <= 1e-9, `absorbed vs naive: ${relErr(b, a)}`);
});

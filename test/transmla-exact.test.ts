// The exact steps of TransMLA on random small GQA models (float64): RoRoPE with f = c = 1 and RoPE on every coordinate
// changes nothing; MLA at full rank R = 2L − r reproduces the Stage-1 model; absorbed MLA equals naive MLA.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { GqaConfig, RopeLayout } from '../model/config.ts';
import { syntheticModel } from '../model/synthetic.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import { ReferenceLatent } from '../model/reference/stage1.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import type { ModelWeights } from '../model/weights.ts';
import { GramAccumulator } from '../model/transmla/eigen.ts';
import { roropeRotation, stage0, stage1 } from '../model/transmla/rorope.ts';
import { buildMla } from '../model/transmla/stage2.ts';

function gqa(nHeads: number, nKvHeads: number, headDim: number, layout: RopeLayout, bias: boolean): GqaConfig {
  return {
    arch: 'llama',
    attention: 'gqa',
    dim: 24,
    hiddenDim: 40,
    nLayers: 2,
    nHeads,
    nKvHeads,
    headDim,
    vocabSize: 37,
    maxSeqLen: 64,
    ropeTheta: 10000,
    rmsEps: 1e-5,
    tiedEmbeddings: false,
    bosId: 1,
    eosId: 2,
    ropeLayout: layout,
    attentionBias: bias,
  };
}

/** max |a − b| / max |a| over all logits. */
function relErr(a: Float64Array[], b: Float64Array[]): number {
  assert.equal(a.length, b.length);
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

function tokens(seed: number, n: number, vocab: number): number[] {
  const out: number[] = [];
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    out.push(x % vocab);
  }
  return out;
}

/** Key Grams of the original model over a few random sequences (the Stage-1 calibration). */
function keyGrams(config: GqaConfig, weights: ModelWeights): Float64Array[] {
  const grams = Array.from({ length: config.nLayers }, () => new GramAccumulator(config.nKvHeads * config.headDim));
  const ref = new ReferenceGqa(config, weights);
  for (let s = 0; s < 3; s++) {
    ref.reset();
    ref.forward(tokens(100 + s, 20, config.vocabSize), { observe: (o) => grams[o.layer].add(o.k), logits: 'last' });
  }
  return grams.map((g) => g.matrix());
}

const SHAPES: [number, number, number][] = [
  [4, 4, 8], // MHA
  [6, 2, 8],
  [8, 2, 16],
  [4, 1, 4], // MQA
];

for (const [nq, nkv, d] of SHAPES) {
  for (const layout of ['interleaved', 'rotate_half'] as const) {
    for (const bias of [false, true]) {
      const name = `n_q ${nq}, n_kv ${nkv}, d ${d}, ${layout}${bias ? ', biases' : ''}`;
      test(`RoRoPE with f = c = 1 and RoPE on every coordinate reproduces the original logits (${name})`, () => {
        const config = gqa(nq, nkv, d, layout, bias);
        const { weights } = syntheticModel(config, { seed: nq * 7 + nkv + d, std: 0.3 });
        const toks = tokens(1, 17, config.vocabSize);
        const original = new ReferenceGqa(config, weights).forward(toks);
        const grams = keyGrams(config, weights);
        // The rotation really rotates (not the identity), or the test would prove nothing.
        const p = roropeRotation(grams[0], { nKvHeads: nkv, headDim: d, ropeDim: d, fold: 1, layout });
        const L = nkv * d;
        let offDiagonal = 0;
        for (let i = 0; i < L; i++) for (let j = 0; j < L; j++) if (i !== j) offDiagonal += Math.abs(p[i * L + j]);
        if (nkv > 1) assert.ok(offDiagonal > 0.1, `rotation is nearly a permutation (off-diagonal mass ${offDiagonal})`);
        const rotated = new ReferenceLatent(config, stage1(config, weights, grams, d, 1, { fullRope: true })).forward(toks);
        const err = relErr(original, rotated);
        assert.ok(err <= 1e-9, `RoRoPE changed the logits by ${err.toExponential(3)} (relative)`);
        // Stage 0 (GQA as MQA over the latent key) is exact too.
        const s0 = new ReferenceLatent(config, stage0(config, weights)).forward(toks);
        assert.ok(relErr(original, s0) <= 1e-12, `Stage 0 changed the logits by ${relErr(original, s0)}`);
      });

      test(`MLA at full rank reproduces the Stage-1 model; absorbed == naive (${name})`, () => {
        const config = gqa(nq, nkv, d, layout, bias);
        const { weights } = syntheticModel(config, { seed: nq * 11 + nkv + d, std: 0.3 });
        const grams = keyGrams(config, weights);
        const r = Math.max(2, d / 2);
        const c = d / r;
        const f = d / 2 >= 2 * c ? 2 * c : c; // fold when the head has room, so the lossy path is exercised
        const s1 = stage1(config, weights, grams, r, f);
        const L = nkv * d;
        const kv = Array.from({ length: config.nLayers }, () => new GramAccumulator(2 * L));
        const s1Model = new ReferenceLatent(config, s1);
        const z = new Float64Array(2 * L);
        for (let s = 0; s < 3; s++) {
          s1Model.reset();
          s1Model.forward(tokens(200 + s, 20, config.vocabSize), {
            logits: 'last',
            observe: (o) => {
              z.set(o.k, 0);
              z.set(o.v, L);
              kv[o.layer].add(z);
            },
          });
        }
        const full = 2 * L - r;
        const mla = buildMla(config, s1, kv.map((g) => g.matrix()), { ropeDim: r, kvLoraRank: full });
        assert.equal(mla.config.kvLoraRank, full);
        assert.ok(mla.alphas.every((a) => Number.isFinite(a) && a > 0));
        const toks = tokens(3, 15, config.vocabSize);
        s1Model.reset();
        const expected = s1Model.forward(toks);
        const absorbed = new ReferenceMla(mla.config, mla.weights, { form: 'absorbed' }).forward(toks);
        const naive = new ReferenceMla(mla.config, mla.weights, { form: 'naive' }).forward(toks);
        const err = relErr(expected, absorbed);
        assert.ok(err <= 1e-9, `full-rank MLA differs from Stage 1 by ${err.toExponential(3)}`);
        assert.ok(relErr(naive, absorbed) <= 1e-9, `absorbed differs from naive by ${relErr(naive, absorbed).toExponential(3)}`);
        // Truncating R must change the model (the test would be vacuous if every rank were exact).
        const small = buildMla(config, s1, kv.map((g) => g.matrix()), { ropeDim: r, kvLoraRank: Math.max(1, Math.floor(full / 4)) });
        const truncated = new ReferenceMla(small.config, small.weights).forward(toks);
        assert.ok(relErr(expected, truncated) > 1e-4, `rank ${small.config.kvLoraRank} of ${full} is still exact: calibration too thin`);
      });
    }
  }
}

// TransMLA on the real stories260K model and real held-out text: full-rank MLA keeps the Stage-1 perplexity to 4
// decimals, RoRoPE's PCA beats keeping RoPE on the first r latent dims unrotated, and truncating R costs perplexity.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { loadModel } from '../model/load.ts';
import { convertToMla } from '../model/transmla/convert.ts';
import { GramAccumulator } from '../model/transmla/eigen.ts';
import { stage1 } from '../model/transmla/rorope.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import { ReferenceLatent } from '../model/reference/stage1.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import { maxKvLoraRank } from '../model/transmla/stage2.ts';
import { calibrationSplit, referenceScorer } from '../server/convert-command.ts';

const source = await loadModel('../shared/models/stories260K/stories260K.gguf', { maxSeqLen: 512 });
const config = source.config;
if (config.attention !== 'gqa') throw new Error('stories260K should load as GQA');
const text = readFileSync('../shared/data/tinystories_valid_a.txt', 'utf8');
// Few calibration chunks keep this fast; the CLI defaults to 128.
const split = calibrationSplit(text, source.tokenizer, config.bosId, { maxLen: 512, calibSamples: 20, calibSeqLen: 256, evalChunks: 20, seed: 42 });

test('held-out chunks are disjoint from calibration chunks', () => {
  assert.equal(split.heldOut.length, 20);
  assert.equal(split.calib.length, 20);
  const held = new Set(split.heldOut.map((c) => c.join(',')));
  for (const c of split.calib) assert.ok(![...held].some((h) => h.startsWith(c.join(','))), 'a calibration chunk is held out too');
});

const r = 4;
const fold = 2; // c = d / r = 2: no folding beyond the collapse
const full = maxKvLoraRank(config, r); // 2L − r = 60
const perplexity = (model: { reset(): void; forward(t: number[]): Float64Array[] }) =>
  referenceScorer(split.heldOut, (chunk) => {
    model.reset();
    return model.forward(chunk);
  });

// Pre-RoPE key Grams of the original model: the Stage-1 calibration, shared by the PCA and unrotated variants.
const keyGrams = Array.from({ length: config.nLayers }, () => new GramAccumulator(config.nKvHeads * config.headDim));
const original = new ReferenceGqa(config, source.weights);
for (const chunk of split.calib) {
  original.reset();
  original.forward(chunk, { logits: 'last', observe: (o) => keyGrams[o.layer].add(o.k) });
}
const grams = keyGrams.map((g) => g.matrix());

test(`stories260K r ${r}: full-rank MLA (R = ${full}) has the Stage-1 perplexity to 4 decimals`, async () => {
  const result = await convertToMla(config, source.weights, {
    ropeDim: r, freqFold: fold, kvLoraRank: full, calibChunks: split.calib, evalChunks: split.heldOut, scorePerplexity: referenceScorer,
  });
  const p = result.report.perplexity!;
  assert.equal(p.mla.toFixed(4), p.stage1.toFixed(4), `Stage 1 ${p.stage1}, full-rank MLA ${p.mla}`);
  assert.ok(Math.abs(p.original - 4.9) < 1.5, `original perplexity ${p.original} is not stories260K's`);
  assert.ok(p.stage1 > p.original, 'dropping RoPE on most dims should cost perplexity');
  // The converter's own calibration saw the same chunks: its Stage 1 is the one built from the shared Grams.
  assert.equal(p.stage1, await perplexity(new ReferenceLatent(config, stage1(config, source.weights, grams, r, fold))));
});

for (const [rope, f] of [[4, 2], [8, 1]]) {
  test(`stories260K r ${rope}: Stage 1 with the RoRoPE PCA beats keeping RoPE on the first r latent dims unrotated`, async () => {
    const pca = await perplexity(new ReferenceLatent(config, stage1(config, source.weights, grams, rope, f)));
    const naive = await perplexity(new ReferenceLatent(config, stage1(config, source.weights, grams, rope, f, { identity: true })));
    assert.ok(pca < naive, `RoRoPE PCA Stage 1 ${pca.toFixed(4)} should beat unrotated ${naive.toFixed(4)}`);
  });
}

test('stories260K r 8: a smaller kv_lora_rank costs perplexity', async () => {
  const stage1Ppl = await perplexity(new ReferenceLatent(config, stage1(config, source.weights, grams, 8, 1)));
  const small = await convertToMla(config, source.weights, { ropeDim: 8, freqFold: 1, kvLoraRank: 12, calibChunks: split.calib });
  assert.equal(small.report.kvValuesBefore, 64);
  assert.equal(small.report.kvValuesAfter, 20);
  const mla = await perplexity(new ReferenceMla(small.config, small.weights));
  assert.ok(mla > stage1Ppl * 1.05, `R 12 (${mla}) should be clearly worse than full rank, i.e. Stage 1 (${stage1Ppl})`);
});

// TransMLA on the real stories260K model and real held-out text: full-rank MLA keeps the Stage-1 perplexity to 4
// decimals, RoRoPE's PCA beats keeping RoPE on the first r latent dims unrotated, and truncating R costs perplexity.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { loadModel } from '../model/load.ts';
import { convertToMla } from '../model/transmla/convert.ts';
import { maxKvLoraRank } from '../model/transmla/stage2.ts';
import { calibrationSplit, referenceScorer } from '../server/convert-command.ts';

const source = await loadModel('../shared/models/stories260K/stories260K.gguf', { maxSeqLen: 512 });
const config = source.config;
if (config.attention !== 'gqa') throw new Error('stories260K should load as GQA');
const text = readFileSync('../shared/data/tinystories_valid_a.txt', 'utf8');
// Few calibration chunks keep this fast; the CLI defaults to 128.
const split = calibrationSplit(text, source.tokenizer, config.bosId, { maxLen: 512, calibSamples: 24, calibSeqLen: 256, evalChunks: 24, seed: 42 });

test('held-out chunks are disjoint from calibration chunks', () => {
  assert.equal(split.heldOut.length, 24);
  assert.equal(split.calib.length, 24);
  const held = new Set(split.heldOut.map((c) => c.join(',')));
  for (const c of split.calib) assert.ok(![...held].some((h) => h.startsWith(c.join(','))), 'a calibration chunk is held out too');
});

const r = 4;
const fold = 2; // c = d / r = 2: no folding beyond the collapse
const full = maxKvLoraRank(config, r); // 2L − r = 60

test(`stories260K r ${r}: full-rank MLA (R = ${full}) has the Stage-1 perplexity to 4 decimals; PCA beats the unrotated baseline`, async () => {
  const common = { ropeDim: r, freqFold: fold, calibChunks: split.calib, evalChunks: split.heldOut, scorePerplexity: referenceScorer };
  const pca = await convertToMla(config, source.weights, { ...common, kvLoraRank: full });
  const p = pca.report.perplexity!;
  assert.equal(p.mla.toFixed(4), p.stage1.toFixed(4), `Stage 1 ${p.stage1}, full-rank MLA ${p.mla}`);
  assert.ok(Math.abs(p.original - 4.9) < 1.5, `original perplexity ${p.original} is not stories260K's`);
  assert.ok(p.stage1 > p.original, 'dropping RoPE on most dims should cost perplexity');

  const naive = await convertToMla(config, source.weights, { ...common, kvLoraRank: full, rotation: 'identity' });
  const n = naive.report.perplexity!;
  assert.equal(n.original, p.original);
  assert.ok(p.stage1 < n.stage1, `RoRoPE PCA Stage 1 ${p.stage1.toFixed(4)} should beat unrotated ${n.stage1.toFixed(4)}`);
});

test('stories260K r 8 (c = 1): PCA beats the unrotated baseline; a smaller R costs perplexity', async () => {
  const common = { ropeDim: 8, freqFold: 1, calibChunks: split.calib, evalChunks: split.heldOut, scorePerplexity: referenceScorer };
  const small = await convertToMla(config, source.weights, { ...common, kvLoraRank: 12 });
  const naive = await convertToMla(config, source.weights, { ...common, kvLoraRank: 12, rotation: 'identity' });
  const s = small.report.perplexity!;
  // Full rank equals Stage 1 (previous test), so Stage 1 is the full-rank figure R = 12 is held against.
  assert.ok(s.mla > s.stage1, `R 12 (${s.mla}) should be worse than full rank (${s.stage1})`);
  assert.ok(s.stage1 < naive.report.perplexity!.stage1, `PCA ${s.stage1} vs unrotated ${naive.report.perplexity!.stage1}`);
  assert.equal(small.report.kvValuesAfter, 20);
  assert.equal(small.report.kvValuesBefore, 64);
});

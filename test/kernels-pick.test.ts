// The GPU picks (kernels/pick.ts) against the host: greedy rows = the host's argmax (ties, −∞, NaN); sampled rows =
// engine/sampler.ts samplePick in float64 (temperature, min-p, top-k, top-p with ties, the inverse-CDF draw).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PICK_PARAM_WORDS, RowPick, writePickParams, type PickSpec } from '../kernels/pick.ts';
import { HEADER_WORDS, META_FULL_LOGIT_ROWS, META_LOGIT_ROWS } from '../kernels/step-meta.ts';
import { storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { readBack } from '../bench/gpu-timing.ts';
import { argmax, samplePick, type PickSampling } from '../engine/sampler.ts';
import { decisionMargin, fileGpu, freshSeed, randomArray } from './kernels-helpers.ts';

const gpu = fileGpu();

/** Runs the pick kernel over `rows` (the first `full` rows are full logits rows it must skip) with one spec per pick row. */
async function runPicks(vocab: number, rows: Float32Array, full: number, specs: PickSpec[]): Promise<number[]> {
  const g = await gpu();
  const meta = new Uint32Array(HEADER_WORDS);
  meta[META_LOGIT_ROWS] = full + specs.length;
  meta[META_FULL_LOGIT_ROWS] = full;
  const params = new Uint32Array(specs.length * PICK_PARAM_WORDS);
  specs.forEach((s, k) => writePickParams(params, k, s));
  const metaBuf = uploadArray(g, 'meta', meta);
  const logits = uploadArray(g, 'logits', rows);
  const paramBuf = uploadArray(g, 'pick params', params);
  const picks = storageBuffer(g, 'picks', Math.max(16, specs.length * 4));
  const op = new RowPick(g, { meta: metaBuf, logits, params: paramBuf, picks }, vocab);
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  op.encode(pass, specs.length);
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const got = [...new Uint32Array(await readBack(g, picks, specs.length * 4))];
  g.checkErrors();
  for (const b of [metaBuf, logits, paramBuf, picks]) b.destroy();
  return got;
}

test('greedy pick rows = the host argmax (first index of the largest value), after the full rows', async () => {
  const seed = freshSeed();
  const vocab = 1037; // not a multiple of the 256-thread workgroup
  const full = 2;
  const picked = 5;
  const rows = randomArray((full + picked) * vocab, seed, 3);
  const row = (k: number) => rows.subarray((full + k) * vocab, (full + k + 1) * vocab);
  // Row 0: ties of the maximum far apart (the lower index wins); row 1: −∞ everywhere but one value; row 2: NaNs
  // before and after the maximum; row 3: all −∞ (the host answers 0); row 4: the maximum at the last index.
  row(0).fill(-1);
  row(0)[900] = 5;
  row(0)[17] = 5;
  row(0)[600] = 5;
  row(1).fill(-Infinity);
  row(1)[333] = -7;
  row(2)[10] = NaN;
  row(2)[1000] = NaN;
  row(2)[500] = 40;
  row(3).fill(-Infinity);
  row(4)[vocab - 1] = 99;
  const got = await runPicks(vocab, rows, full, Array.from({ length: picked }, () => ({ kind: 'argmax' as const })));
  const want = Array.from({ length: picked }, (_, k) => argmax(row(k)));
  assert.deepEqual(got, want, `seed ${seed}`);
  assert.deepEqual(want.slice(0, 5), [17, 333, 500, 0, vocab - 1]);
});

test('sampled pick rows = the host draw (temperature, min-p, top-k, top-p, u) on fresh random rows', async () => {
  const seed = freshSeed();
  const vocab = 1037;
  const settings: Omit<PickSampling, 'u'>[] = [
    { temperature: 1, topK: 0, topP: 1, minP: 0 },
    { temperature: 0.7, topK: 0, topP: 1, minP: 0 },
    { temperature: 1.3, topK: 50, topP: 1, minP: 0 },
    { temperature: 1, topK: 1, topP: 1, minP: 0 },
    { temperature: 0.8, topK: 0, topP: 0.9, minP: 0 },
    { temperature: 1, topK: 0, topP: 0.5, minP: 0 },
    { temperature: 1, topK: 0, topP: 1, minP: 0.05 },
    { temperature: 0.6, topK: 40, topP: 0.95, minP: 0.02 },
  ];
  const rowsPerSetting = 6;
  const n = settings.length * rowsPerSetting;
  // Peaky rows (scale 8: a handful of tokens hold the mass) and flat ones (scale 1: hundreds do), alternately.
  const rows = new Float32Array(n * vocab);
  for (let r = 0; r < n; r++) rows.set(randomArray(vocab, seed + 7919 * r, r % 2 === 0 ? 8 : 1), r * vocab);
  const us = randomArray(n, seed ^ 0x5bd1e995, 0.5).map((v) => v + 0.5);
  const specs: PickSampling[] = Array.from({ length: n }, (_, r) => ({ ...settings[Math.floor(r / rowsPerSetting)], u: us[r] }));
  const got = await runPicks(vocab, rows, 0, specs.map((s) => ({ kind: 'sample', ...s })));
  let exact = 0;
  for (let r = 0; r < n; r++) {
    const row = rows.subarray(r * vocab, (r + 1) * vocab);
    const want = samplePick(row, specs[r]);
    const margin = decisionMargin(row, specs[r]);
    const what = `seed ${seed}, row ${r} (${JSON.stringify(specs[r])}), margin ${margin.toExponential(2)}`;
    if (margin > 1e-5) {
      assert.equal(got[r], want, what);
      exact++;
    } else {
      // Within f32 rounding of a boundary: a neighbour of the host's token in the draw's order is as right.
      assert.ok(got[r] >= 0 && got[r] < vocab && Number.isFinite(row[got[r]]), what);
    }
  }
  assert.ok(exact >= n - 4, `only ${exact} of ${n} draws were far enough from a boundary to compare (seed ${seed})`);
});

test('sampled picks: top-p keeps the first tied tokens in index order; NaN and −∞ are never drawn; mixed with greedy rows', async () => {
  const vocab = 700;
  const ties = [40, 90, 130, 300, 410, 555, 600, 650, 680, 699];
  const tiedRow = () => {
    const r = new Float32Array(vocab).fill(-30);
    for (const i of ties) r[i] = 5;
    return r;
  };
  // 10 tokens of ≈ 0.1 each. top_p 0.35 keeps 4 of them (the first four by index), so u picks among ids 40..300.
  const cases: Array<{ row: Float32Array; spec: PickSpec; want: number }> = [
    { row: tiedRow(), spec: { kind: 'sample', temperature: 1, topK: 0, topP: 0.35, minP: 0, u: 0.9 }, want: 300 },
    { row: tiedRow(), spec: { kind: 'sample', temperature: 1, topK: 0, topP: 0.35, minP: 0, u: 0.1 }, want: 40 },
    { row: tiedRow(), spec: { kind: 'sample', temperature: 1, topK: 0, topP: 0.35, minP: 0, u: 0.6 }, want: 130 },
    // Without top-p all ten share u: 0.95 falls in the last one's tenth.
    { row: tiedRow(), spec: { kind: 'sample', temperature: 1, topK: 0, topP: 1, minP: 0, u: 0.95 }, want: 699 },
    // top-k 3 keeps every token tied with the 3rd largest (all ten, like the host).
    { row: tiedRow(), spec: { kind: 'sample', temperature: 2, topK: 3, topP: 1, minP: 0, u: 0.05 }, want: 40 },
    { row: tiedRow(), spec: { kind: 'argmax' }, want: 40 },
  ];
  const nanRow = tiedRow();
  nanRow[41] = NaN;
  nanRow[100] = NaN;
  nanRow[699] = -Infinity;
  // ids 40 … 680 hold the mass (699 is −∞ now): u near 1 must land on 680, never on a NaN or the −∞ token.
  cases.push({ row: nanRow, spec: { kind: 'sample', temperature: 1, topK: 0, topP: 1, minP: 0, u: 0.999 }, want: 680 });
  cases.push({ row: nanRow, spec: { kind: 'sample', temperature: 1, topK: 0, topP: 1, minP: 0, u: 0.15 }, want: 90 });
  const rows = new Float32Array(cases.length * vocab);
  cases.forEach((c, i) => rows.set(c.row, i * vocab));
  const got = await runPicks(vocab, rows, 0, cases.map((c) => c.spec));
  assert.deepEqual(got, cases.map((c) => c.want));
  // The host agrees on every case without NaN (its float64 softmax does not skip NaN).
  cases.forEach((c, i) => {
    if (c.spec.kind === 'sample' && c.row === nanRow) return;
    const host = c.spec.kind === 'argmax' ? argmax(c.row) : samplePick(c.row, c.spec);
    assert.equal(host, c.want, `case ${i}`);
  });
});

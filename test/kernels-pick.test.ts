// The GPU picks (kernels/pick.ts) against the host: greedy rows = the host's argmax (ties, −∞, NaN); sampled rows =
// engine/sampler.ts pickOnHost in float64 (temperature, min-p, top-k, top-p with ties, the inverse-CDF draw); logit
// bias and penalties applied first = pickOnHost.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PICK_ADJUST_WORDS, PICK_INFO_WORDS, PICK_PARAM_WORDS, readPickLogprobs, RowPick, writePickAdjustments, writePickParams, type PickSpec } from '../kernels/pick.ts';
import { HEADER_WORDS, META_FULL_LOGIT_ROWS, META_LOGIT_ROWS, META_OFF_TOKENS } from '../kernels/step-meta.ts';
import { storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { readBack } from '../bench/gpu-timing.ts';
import {
  applyLogitAdjustments,
  argmax,
  logitAdjustments,
  newSamplingState,
  pendingPenalty,
  pickOnHost,
  rawLogprobs,
  recordOutputToken,
  samplingParams,
  withPendingToken,
  type LogitAdjustments,
  type PickSampling,
  type SampledLogprobs,
} from '../engine/sampler.ts';
import { decisionMargin, fileGpu, freshSeed, randomArray } from './kernels-helpers.ts';

const gpu = fileGpu();

/** n random rows of `vocab` logits, row r from seed + step · r with spread `scale` (or scale(r)). */
function randomRows(n: number, vocab: number, seed: number, step: number, scale: number | ((r: number) => number)): Float32Array {
  const rows = new Float32Array(n * vocab);
  for (let r = 0; r < n; r++) rows.set(randomArray(vocab, seed + step * r, typeof scale === 'number' ? scale : scale(r)), r * vocab);
  return rows;
}

/**
 * Runs the pick kernel over `rows` (the first `full` rows are full logits rows it must skip) with one spec per pick row
 * and, per pick row, its logit adjustments (or none).
 */
async function runPicks(vocab: number, rows: Float32Array, full: number, specs: PickSpec[], adjusts: Array<LogitAdjustments | null> = []): Promise<number[]> {
  return (await runPicksWithLogprobs(vocab, rows, full, specs, adjusts, [])).picks;
}

/** runPicks, with per pick row the number of top logprobs it asks for (null: none); the logprobs read back too. */
async function runPicksWithLogprobs(
  vocab: number,
  rows: Float32Array,
  full: number,
  specs: PickSpec[],
  adjusts: Array<LogitAdjustments | null>,
  logprobs: Array<number | null>,
  tokens: number[] = [],
): Promise<{ picks: number[]; logprobs: Array<SampledLogprobs | null>; adjusted: Float32Array }> {
  const g = await gpu();
  // `tokens`: the step rows' input tokens; pick row k's pending token (adjustments with `pending`) is row k's.
  const meta = new Uint32Array(HEADER_WORDS + tokens.length);
  meta[META_LOGIT_ROWS] = full + specs.length;
  meta[META_FULL_LOGIT_ROWS] = full;
  meta[META_OFF_TOKENS] = HEADER_WORDS;
  meta.set(tokens, HEADER_WORDS);
  const params = new Uint32Array(specs.length * PICK_PARAM_WORDS);
  const entries = new Uint32Array(Math.max(4, adjusts.reduce((n, a) => n + (a?.ids.length ?? 0), 0) * PICK_ADJUST_WORDS));
  let first = 0;
  specs.forEach((s, k) => {
    const a = adjusts[k];
    const pending = a?.pending ? { row: k, penalty: a.pending } : null;
    writePickParams(params, k, s, { first, count: a?.ids.length ?? 0, logprobs: logprobs[k] ?? null, pending });
    if (a) writePickAdjustments(entries, first, a);
    first += a?.ids.length ?? 0;
  });
  const metaBuf = uploadArray(g, 'meta', meta);
  const logits = uploadArray(g, 'logits', rows);
  const paramBuf = uploadArray(g, 'pick params', params);
  const adjustBuf = uploadArray(g, 'pick adjustments', entries);
  const picks = storageBuffer(g, 'picks', Math.max(16, specs.length * 4));
  const info = storageBuffer(g, 'pick logprobs', specs.length * PICK_INFO_WORDS * 4);
  const op = new RowPick(g, { meta: metaBuf, logits, params: paramBuf, picks, adjust: adjustBuf, info }, vocab);
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  op.encode(pass, specs.length);
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const got = [...new Uint32Array(await readBack(g, picks, specs.length * 4))];
  const infoWords = new Uint32Array(await readBack(g, info, specs.length * PICK_INFO_WORDS * 4));
  // The rows as the picks saw them: the adjustments are applied in place.
  const adjusted = new Float32Array(await readBack(g, logits, rows.byteLength));
  g.checkErrors();
  for (const b of [metaBuf, logits, paramBuf, adjustBuf, picks, info]) b.destroy();
  return { picks: got, logprobs: specs.map((_, k) => (logprobs[k] === null || logprobs[k] === undefined ? null : readPickLogprobs(infoWords, k))), adjusted };
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
  const rows = randomRows(n, vocab, seed, 7919, (r) => (r % 2 === 0 ? 8 : 1));
  const us = randomArray(n, seed ^ 0x5bd1e995, 0.5).map((v) => v + 0.5);
  const specs: PickSampling[] = Array.from({ length: n }, (_, r) => ({ ...settings[Math.floor(r / rowsPerSetting)], u: us[r] }));
  const got = await runPicks(vocab, rows, 0, specs.map((s) => ({ kind: 'sample', ...s })));
  let exact = 0;
  for (let r = 0; r < n; r++) {
    const row = rows.subarray(r * vocab, (r + 1) * vocab);
    const want = pickOnHost(row, specs[r]);
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
    const host = c.spec.kind === 'argmax' ? argmax(c.row) : pickOnHost(c.row, c.spec);
    assert.equal(host, c.want, `case ${i}`);
  });
});

test('logit bias and penalties (repetition, frequency, presence) change the row before greedy and sampled picks = pickOnHost', async () => {
  const seed = freshSeed();
  const vocab = 900;
  const n = 12;
  const rows = randomRows(n, vocab, seed, 131, (r) => (r % 2 ? 6 : 2));
  const rnd = randomArray(n * 200, seed ^ 0x2545f491, 0.5).map((v) => v + 0.5);
  const specs: PickSpec[] = [];
  const adjusts: LogitAdjustments[] = [];
  for (let r = 0; r < n; r++) {
    // Distinct ids: the row's top few (so the changes matter), then spread ones; bias ±5, repetition 1.3 on some,
    // a frequency/presence subtrahend on others.
    const row = rows.subarray(r * vocab, (r + 1) * vocab);
    const top = [...row.keys()].sort((a, b) => row[b] - row[a]).slice(0, 4);
    const ids = [...new Set([...top, ...Array.from({ length: 40 }, (_, i) => Math.floor(rnd[r * 200 + i] * vocab))])];
    adjusts.push({
      ids,
      bias: ids.map((_, i) => (i % 3 === 0 ? (rnd[r * 200 + 50 + i] - 0.5) * 10 : 0)),
      repetition: ids.map((_, i) => (i % 2 === 0 ? 1.3 : 1)),
      subtract: ids.map((_, i) => (i % 4 === 1 ? rnd[r * 200 + 100 + i] * 3 : 0)),
    });
    specs.push(r < 4 ? { kind: 'argmax' } : { kind: 'sample', temperature: 0.9, topK: r % 3 === 0 ? 20 : 0, topP: r % 2 ? 0.9 : 1, minP: 0, u: rnd[r * 200 + 199] });
  }
  const got = await runPicks(vocab, rows, 0, specs, adjusts);
  let compared = 0;
  for (let r = 0; r < n; r++) {
    const row = rows.subarray(r * vocab, (r + 1) * vocab);
    const s = specs[r];
    const want = pickOnHost(row, s.kind === 'sample' ? s : null, adjusts[r]);
    const adjusted = Float64Array.from(row);
    applyLogitAdjustments(adjusted, adjusts[r]);
    if (s.kind === 'sample' && decisionMargin(Float32Array.from(adjusted), s) <= 1e-5) continue;
    compared++;
    assert.equal(got[r], want, `seed ${seed}, row ${r} (${s.kind})`);
  }
  assert.ok(compared >= n - 2, `only ${compared} of ${n} compared (seed ${seed})`);
  // The adjustments moved picks: without them at least one greedy row picks differently.
  const plain = await runPicks(vocab, rows, 0, specs);
  assert.ok(plain.some((id, r) => id !== got[r]), `seed ${seed}: the adjustments changed no pick`);
});

test("logprobs of pick rows: the raw row's log-softmax of the chosen token (its adjustment undone) and the top n, ties in index order", async () => {
  const seed = freshSeed();
  const vocab = 777;
  const n = 8;
  const rows = randomRows(n, vocab, seed, 17, 4);
  // Row 7: ties — ids 5, 300 and 600 share the largest value, ids 10 and 20 the next.
  const tied = rows.subarray(7 * vocab, 8 * vocab);
  tied.fill(-3);
  for (const i of [600, 5, 300]) tied[i] = 2;
  for (const i of [20, 10]) tied[i] = 1;
  const rnd = randomArray(n, seed ^ 0x68e31da4, 0.5).map((v) => v + 0.5);
  const specs: PickSpec[] = Array.from({ length: n }, (_, r) => (r % 2 ? { kind: 'sample', temperature: 1.2, topK: 0, topP: 0.95, minP: 0, u: rnd[r] } : { kind: 'argmax' }));
  // Rows 2 and 3 push their chosen token with a bias (and row 3 a repetition penalty): its logprob stays the raw one.
  const adjusts: Array<LogitAdjustments | null> = specs.map((_, r) => (r === 2 || r === 3 ? { ids: [11, 12], bias: [30, 30], repetition: [1, r === 3 ? 1.5 : 1], subtract: [0, 0.5] } : null));
  const wants = [0, 1, 5, 20, 3, 0, 2, 4];
  const got = await runPicksWithLogprobs(vocab, rows, 0, specs, adjusts, wants.map((w, r) => (r === 6 ? null : w)));
  for (let r = 0; r < n; r++) {
    const row = rows.subarray(r * vocab, (r + 1) * vocab);
    const id = got.picks[r];
    if (r === 2 || r === 3) assert.ok(id === 11 || id === 12, `row ${r}: the bias should win, got ${id}`);
    if (r === 6) {
      assert.equal(got.logprobs[r], null);
      continue;
    }
    const want = rawLogprobs(row, id, wants[r]);
    const lp = got.logprobs[r]!;
    const where = `seed ${seed}, row ${r}`;
    assert.ok(Math.abs(lp.logprob - want.logprob) < 1e-5, `${where}: logprob ${lp.logprob} vs ${want.logprob}`);
    assert.deepEqual(lp.top.map((t) => t.tokenId), want.top.map((t) => t.tokenId), where);
    lp.top.forEach((t, a) => assert.ok(Math.abs(t.logprob - want.top[a].logprob) < 1e-5, `${where}: top ${a}`));
  }
  assert.deepEqual(got.logprobs[7]!.top.map((t) => t.tokenId), [5, 300, 600, 10]);
});

test("a pending output token (a pipelined row's input, read on the device) takes its penalties = withPendingToken on the host", async () => {
  const seed = freshSeed();
  const vocab = 997;
  const n = 8;
  const rows = randomRows(n, vocab, seed, 71, 3);
  const rnd = randomArray(n * 8, seed ^ 0x1b873593, 0.5).map((v) => v + 0.5);
  const specs: PickSpec[] = [];
  const adjusts: LogitAdjustments[] = [];
  const tokens: number[] = [];
  const wants: Array<number | null> = [];
  for (let r = 0; r < n; r++) {
    const row = rows.subarray(r * vocab, (r + 1) * vocab);
    const best = argmax(Float64Array.from(row));
    // A request with every penalty: prompt 5, 6, 7; output 11, 12, 11; a bias on 3 and on the row's best token. Rows 6
    // and 7 have no output yet and pull their pending token up (negative penalties), so it is picked and its raw
    // logprob undone.
    const p = samplingParams({
      logitBias: new Map([[3, 1.5], [best, 0.25]]),
      repetitionPenalty: r === 1 ? 1 : 1.4,
      frequencyPenalty: r >= 6 ? -30 : 2,
      presencePenalty: r === 2 ? 0 : r >= 6 ? -30 : 3,
    });
    const st = newSamplingState(p, [5, 6, 7]);
    for (const t of r >= 6 ? [] : [11, 12, 11]) recordOutputToken(st, t);
    // The pending token: an output token, a prompt token, a biased one, the row's best, one without an entry.
    const pending = [11, 5, 3, best, 500, best, 600, 5][r];
    tokens.push(pending);
    adjusts.push({ ...logitAdjustments(p, st)!, pending: pendingPenalty(p)! });
    specs.push(r % 2 ? { kind: 'sample', temperature: 0.8, topK: r === 3 ? 30 : 0, topP: 0.95, minP: 0, u: rnd[r] } : { kind: 'argmax' });
    wants.push(r >= 5 ? 3 : null);
  }
  const got = await runPicksWithLogprobs(vocab, rows, 0, specs, adjusts, wants, tokens);
  let compared = 0;
  for (let r = 0; r < n; r++) {
    const row = rows.subarray(r * vocab, (r + 1) * vocab);
    const s = specs[r];
    const resolved = withPendingToken(adjusts[r], tokens[r]);
    const where = `seed ${seed}, row ${r} (${s.kind}, pending ${tokens[r]})`;
    if (r >= 6) assert.equal(got.picks[r], tokens[r], `${where}: the pulled-up pending token is picked`);
    const adjusted = Float64Array.from(row);
    applyLogitAdjustments(adjusted, resolved);
    // The row after its adjustments, value for value (f32 arithmetic against float64).
    const onGpu = got.adjusted.subarray(r * vocab, (r + 1) * vocab);
    for (let i = 0; i < vocab; i++) assert.ok(Math.abs(onGpu[i] - adjusted[i]) <= 1e-5 * Math.max(1, Math.abs(adjusted[i])), `${where}: token ${i} adjusted to ${onGpu[i]}, host ${adjusted[i]}`);
    if (s.kind === 'sample' && decisionMargin(Float32Array.from(adjusted), s) <= 1e-5) continue;
    compared++;
    assert.equal(got.picks[r], pickOnHost(row, s.kind === 'sample' ? s : null, resolved), where);
    if (wants[r] !== null) {
      const want = rawLogprobs(row, got.picks[r], wants[r]!);
      assert.ok(Math.abs(got.logprobs[r]!.logprob - want.logprob) < 1e-5, `${where}: logprob ${got.logprobs[r]!.logprob} vs ${want.logprob}`);
    }
  }
  assert.ok(compared >= n - 2, `only ${compared} of ${n} compared (seed ${seed})`);
  // The pending tokens matter: without them row 6 (its pending token has no other entry) picks something else.
  const without = await runPicks(vocab, rows, 0, specs, adjusts.map(({ pending: _, ...a }) => a));
  assert.ok(without.some((id, r) => id !== got.picks[r]), `seed ${seed}: the pending tokens changed no pick`);
});

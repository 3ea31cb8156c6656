// The whole stories260K model on the GPU step runner (f32 weights, f32 cache) vs the float64 reference forward.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { createGpuRunner, submitBoundaries } from '../engine/gpu-runner.ts';
import { summarizeProfile } from '../engine/step-profile.ts';
import type { ModelRunner, StepSequence } from '../engine/types.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import type { GqaConfig } from '../model/config.ts';
import { decisionMargin, freshSeed, randomArray, relError } from './kernels-helpers.ts';
import { pickOnHost } from '../engine/sampler.ts';

const MODEL = '../shared/models/stories260K/stories260K.bin';
let gpu: GpuContext;
let model: LoadedModel;
let runner: ModelRunner;

before(async () => {
  gpu = await openGpu({ log: () => {} });
  model = await loadModel(MODEL);
  runner = await createGpuRunner(gpu, model, { weightDtype: 'f32', cacheDtype: 'f32', blockSize: 16, numBlocks: 96, maxRowsPerStep: 8 });
});
after(() => {
  runner?.destroy();
  gpu?.destroy();
  releaseGpu();
});

function argmax(v: ArrayLike<number>, offset = 0, n = v.length - offset): number {
  let best = 0;
  for (let i = 1; i < n; i++) if (v[offset + i] > v[offset + best]) best = i;
  return best;
}

/** Blocks [first, first + n). */
const blocks = (first: number, n: number) => Array.from({ length: n }, (_, i) => first + i);

test('stories260K: GPU logits of a 32-token prompt match the float64 reference (≤ 1e-4 relative, every row)', async () => {
  const c = model.config as GqaConfig;
  const tokens = [c.bosId, ...model.tokenizer.encode('Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog.')].slice(0, 32);
  assert.equal(tokens.length, 32);
  // Blocks out of order, to exercise the block table.
  const got = await runner.step([{ tokens, startPos: 0, blockTable: [7, 3], logits: 'all' }]);
  const want = new ReferenceGqa(c, model.weights).forward(tokens);
  assert.equal(got.length, 32 * c.vocabSize);
  for (let t = 0; t < 32; t++) {
    const err = relError(got.subarray(t * c.vocabSize, (t + 1) * c.vocabSize), want[t]);
    assert.ok(err <= 1e-4, `token ${t}: relative error ${err}`);
  }
});

test('stories260K: greedy decoding of 100 tokens from BOS gives the same ids on GPU and reference', async () => {
  const c = model.config as GqaConfig;
  const ref = new ReferenceGqa(c, model.weights);
  const table = blocks(20, 7);
  const gpuIds: number[] = [];
  const refIds: number[] = [];
  let gpuTok = c.bosId;
  let refTok = c.bosId;
  for (let pos = 0; pos < 100; pos++) {
    const logits = await runner.step([{ tokens: [gpuTok], startPos: pos, blockTable: table, logits: 'last' }]);
    gpuTok = argmax(logits);
    gpuIds.push(gpuTok);
    refTok = argmax(ref.forward([refTok])[0]);
    refIds.push(refTok);
  }
  assert.deepEqual(gpuIds, refIds);
  assert.ok(new Set(gpuIds).size > 10, 'the story should not be one repeated token');
});

test('stories260K: a batched step (prefill chunks + decodes of 3 sequences) equals running them one by one', async () => {
  const c = model.config as GqaConfig;
  const V = c.vocabSize;
  const text = model.tokenizer.encode('The cat sat on the mat. It was a sunny day and the birds were singing in the trees.');
  const seqA = [c.bosId, ...text.slice(0, 20)];
  const seqB = [c.bosId, ...text.slice(5, 14)];
  const seqC = [c.bosId, ...text.slice(2, 9)];
  // Batched: step 1 prefills A[0..17) and B[0..5); step 2 decodes A[17], prefills B[5..10) and C[0..8) (logits 'all' for C).
  const tA = blocks(40, 2);
  const tB = blocks(42, 1);
  const tC = blocks(43, 1);
  const step1 = await runner.step([
    { tokens: seqA.slice(0, 17), startPos: 0, blockTable: tA, logits: 'last' },
    { tokens: seqB.slice(0, 5), startPos: 0, blockTable: tB, logits: 'none' },
  ]);
  assert.equal(step1.length, V);
  const step2Seqs: StepSequence[] = [
    { tokens: seqA.slice(17, 18), startPos: 17, blockTable: tA, logits: 'last' },
    { tokens: seqB.slice(5, 10), startPos: 5, blockTable: tB, logits: 'last' },
    { tokens: seqC, startPos: 0, blockTable: tC, logits: 'all' },
  ];
  const step2 = await runner.step(step2Seqs);
  assert.equal(step2.length, (2 + seqC.length) * V);

  // One by one, each sequence alone in its own blocks.
  const alone = async (tokens: number[], first: number) => {
    const table = blocks(first, 2);
    const out: Float32Array[] = [];
    for (let p = 0; p < tokens.length; p++) out.push(await runner.step([{ tokens: [tokens[p]], startPos: p, blockTable: table, logits: 'last' }]));
    return out;
  };
  const aAlone = await alone(seqA.slice(0, 18), 60);
  const bAlone = await alone(seqB.slice(0, 10), 62);
  const cAlone = await alone(seqC, 64);
  const check = (got: Float32Array, want: Float32Array, what: string) => {
    const err = relError(got, want);
    assert.ok(err <= 1e-4, `${what}: relative error ${err} between batched and one-by-one`);
  };
  check(step1, aAlone[16], 'A after prefill');
  check(step2.subarray(0, V), aAlone[17], 'A decode');
  check(step2.subarray(V, 2 * V), bAlone[9], 'B chunk');
  for (let t = 0; t < seqC.length; t++) check(step2.subarray((2 + t) * V, (3 + t) * V), cAlone[t], `C row ${t}`);
  // And against the reference for the decode row.
  const ref = new ReferenceGqa(c, model.weights).forward(seqA.slice(0, 18), { logits: 'last' })[0];
  assert.ok(relError(step2.subarray(0, V), ref) <= 1e-4);
});

test('stories260K: copyBlocks copies whole blocks in every layer (decode from the copy = decode from the original)', async () => {
  const c = model.config as GqaConfig;
  const tokens = [c.bosId, ...model.tokenizer.encode('A little dog ran to the park and found a stick.')].slice(0, 20);
  await runner.step([{ tokens, startPos: 0, blockTable: [80, 81], logits: 'none' }]);
  runner.copyBlocks([
    [80, 90],
    [81, 91],
  ]);
  const fromCopy = await runner.step([{ tokens: [5], startPos: 20, blockTable: [90, 91], logits: 'last' }]);
  const want = new ReferenceGqa(c, model.weights).forward([...tokens, 5], { logits: 'last' })[0];
  assert.ok(relError(fromCopy, want) <= 1e-4, `relative error ${relError(fromCopy, want)}`);
});

test('stories260K: f16 weights and f16 cache stay within 1e-2 of the reference', async () => {
  const c = model.config as GqaConfig;
  const r16 = await createGpuRunner(gpu, model, { blockSize: 16, numBlocks: 8 });
  try {
    const tokens = [c.bosId, ...model.tokenizer.encode('Once upon a time, there was a big red ball.')];
    const got = await r16.step([{ tokens, startPos: 0, blockTable: [1, 0], logits: 'all' }]);
    const want = new ReferenceGqa(c, model.weights).forward(tokens);
    for (let t = 0; t < tokens.length; t++) {
      const err = relError(got.subarray(t * c.vocabSize, (t + 1) * c.vocabSize), want[t]);
      assert.ok(err <= 1e-2, `token ${t}: relative error ${err}`);
    }
  } finally {
    r16.destroy();
  }
});

test("stories260K: 'argmax' sequences return the first arg max of the row 'last' returns; full rows stay as they were", async () => {
  const c = model.config as GqaConfig;
  const text = model.tokenizer.encode('A little bird sang a song in the tall green tree every morning.');
  const seqs = [text.slice(0, 9), text.slice(3, 7), text.slice(1, 12)].map((t, i) => ({ tokens: [c.bosId, ...t], startPos: 0, blockTable: [60 + i] }));
  const full = await runner.step(seqs.map((s) => ({ ...s, logits: 'last' as const })));
  // The same tokens into the same blocks again (idempotent), now picking on the GPU for the first and last sequence.
  const out = await runner.stepOutput(seqs.map((s, i) => ({ ...s, logits: i === 1 ? ('last' as const) : ('argmax' as const) })));
  const V = c.vocabSize;
  assert.deepEqual([...out.picks], [argmax(full, 0, V), argmax(full, 2 * V, V)]);
  assert.deepEqual(out.logits, full.subarray(V, 2 * V), 'the full row comes back unchanged, alone');
  await assert.rejects(runner.step([{ ...seqs[0], logits: 'argmax' }]), /use stepOutput/);
  const none = await runner.stepOutput([{ ...seqs[0], logits: 'none' }]);
  assert.equal(none.logits.length + none.picks.length, 0);
});

test("stories260K: 'sample' sequences draw what the host draws from the row 'last' returns (temperature, top-k, top-p, min-p)", async () => {
  const c = model.config as GqaConfig;
  const text = model.tokenizer.encode('The sun was warm and the flowers were bright, so the children ran to the garden.');
  const seqs = Array.from({ length: 8 }, (_, i) => ({ tokens: [c.bosId, ...text.slice(i, i + 3 + i)], startPos: 0, blockTable: [60 + i] }));
  const full = await runner.step(seqs.map((s) => ({ ...s, logits: 'last' as const })));
  const V = c.vocabSize;
  const seed = freshSeed();
  const us = randomArray(seqs.length * 4, seed, 0.5).map((u) => u + 0.5);
  const settings = [
    { temperature: 1, topK: 0, topP: 1, minP: 0 },
    { temperature: 0.7, topK: 10, topP: 1, minP: 0 },
    { temperature: 1.2, topK: 0, topP: 0.8, minP: 0 },
    { temperature: 0.9, topK: 30, topP: 0.9, minP: 0.05 },
  ];
  let compared = 0;
  for (let round = 0; round < 4; round++) {
    // Every other sequence samples, the rest pick greedily: both kinds in one dispatch, in sequence order.
    const specs = seqs.map((_, i) => ({ ...settings[(i + round) % settings.length], u: us[round * seqs.length + i] }));
    const out = await runner.stepOutput(seqs.map((s, i) => (i % 2 === 0 ? { ...s, logits: 'sample' as const, sample: specs[i] } : { ...s, logits: 'argmax' as const })));
    assert.equal(out.logits.length, 0);
    seqs.forEach((_, i) => {
      const row = full.subarray(i * V, (i + 1) * V);
      if (i % 2 === 1) return assert.equal(out.picks[i], argmax(row), `greedy row ${i}`);
      if (decisionMargin(row, specs[i]) <= 1e-5) return;
      compared++;
      assert.equal(out.picks[i], pickOnHost(row, specs[i]), `seed ${seed}, round ${round}, row ${i}: ${JSON.stringify(specs[i])}`);
    });
  }
  assert.ok(compared >= 12, `only ${compared} of 16 draws compared (seed ${seed})`);
  await assert.rejects(runner.stepOutput([{ ...seqs[0], logits: 'sample' }]), /needs its sample settings/);
  await assert.rejects(runner.stepOutput([{ ...seqs[0], logits: 'sample', sample: { ...settings[0], u: 1 } }]), /u 1 is outside/);
});

test('stories260K: pipelined greedy steps (previousPick, submitted before the previous step is read back) give the ids of one step at a time; misuse is refused', async () => {
  const c = model.config as GqaConfig;
  const prompts = ['The cat sat on the mat.', 'Tom had a red ball', 'One day, a big'].map((t) => [c.bosId, ...model.tokenizer.encode(t)]);
  const STEPS = 10;
  // One step at a time, tokens sent from the host: the reference ids.
  const tablesA = prompts.map((_, i) => [70 + 2 * i, 71 + 2 * i]);
  let picks = (await runner.stepOutput(prompts.map((p, i) => ({ tokens: p, startPos: 0, blockTable: tablesA[i], logits: 'argmax' as const })))).picks;
  const want: number[][] = prompts.map((_, i) => [picks[i]]);
  for (let s = 0; s < STEPS; s++) {
    picks = (await runner.stepOutput(prompts.map((p, i) => ({ tokens: [picks[i]], startPos: p.length + s, blockTable: tablesA[i], logits: 'argmax' as const })))).picks;
    picks.forEach((id, i) => want[i].push(id));
  }
  // Pipelined, the sequences in reverse order from the second step on (pick k of the previous step is not row k).
  const tablesB = prompts.map((_, i) => [80 + 2 * i, 81 + 2 * i]);
  const order = (s: number) => (s === 0 ? [0, 1, 2] : [2, 1, 0]);
  const got: number[][] = prompts.map(() => []);
  const submit = (s: number) => {
    const prev = s === 0 ? null : order(s - 1);
    return runner.stepOutput(
      order(s).map((i) =>
        s === 0
          ? { tokens: prompts[i], startPos: 0, blockTable: tablesB[i], logits: 'argmax' as const }
          : { tokens: [0], previousPick: prev!.indexOf(i), startPos: prompts[i].length + s - 1, blockTable: tablesB[i], logits: 'argmax' as const },
      ),
    );
  };
  let pending = submit(0);
  for (let s = 1; s <= STEPS + 1; s++) {
    const next = s <= STEPS ? submit(s) : null;
    const out = await pending;
    order(s - 1).forEach((i, k) => got[i].push(out.picks[k]));
    if (!next) break;
    pending = next;
  }
  assert.deepEqual(got, want);
  assert.ok(new Set(want.flat()).size > 5, 'the continuations should not be one repeated token');

  // Misuse: a third step in flight, a pick the previous step did not make, a capture beside a step in flight.
  const one = (pos: number, extra: Partial<StepSequence> = {}): StepSequence[] => [{ tokens: [0], previousPick: 0, startPos: pos, blockTable: [90], logits: 'argmax', ...extra }];
  await runner.stepOutput([{ tokens: [c.bosId], startPos: 0, blockTable: [90], logits: 'argmax' }]);
  const first = runner.stepOutput(one(1));
  const second = runner.stepOutput(one(2));
  await assert.rejects(runner.stepOutput(one(3)), /two steps of this runner are in flight/);
  await assert.rejects((runner as unknown as { stepCapture(s: StepSequence[]): Promise<unknown> }).stepCapture(one(3, { previousPick: undefined })), /runs alone/);
  await Promise.all([first, second]);
  await assert.rejects(runner.stepOutput(one(3, { previousPick: 1 })), /previousPick 1/);
  await assert.rejects(runner.stepOutput(one(3, { tokens: [0, 0] })), /previousPick 0: it needs one token/);
});

test('submitBoundaries: chunks of 1, 2, 4, … layers, the last takes the rest; never after the last layer; one chunk = one submit', () => {
  const sorted = (x: Set<number>) => [...x].sort((a, b) => a - b);
  assert.deepEqual(sorted(submitBoundaries(28, 6)), [0, 2, 6, 14]); // 1, 2, 4, 8, 13 layers
  assert.deepEqual(sorted(submitBoundaries(28, 4)), [0, 2, 6]); // 1, 2, 4, 21
  assert.deepEqual(sorted(submitBoundaries(5, 4)), [0, 2]); // 1, 2, 2
  assert.deepEqual(sorted(submitBoundaries(28, 1)), []);
  assert.deepEqual(sorted(submitBoundaries(2, 8)), [0]);
  assert.deepEqual(sorted(submitBoundaries(1, 4)), []);
  for (const [n, k] of [[28, 6], [32, 3], [5, 3], [80, 8], [3, 9]]) {
    const b = sorted(submitBoundaries(n, k));
    assert.ok(b.length <= k - 1 && b.every((l, i) => Number.isInteger(l) && l >= 0 && l < n - 1 && (i === 0 || l > b[i - 1])), `${n} layers, ${k} chunks: ${b}`);
  }
});

test('stories260K: a step submitted in several command buffers gives the logits of one submitted whole; the GPU span is timed; a profiled step times each dispatch', async () => {
  const c = model.config as GqaConfig;
  const tokens = [c.bosId, ...model.tokenizer.encode('The sun was warm and the sky was blue.')];
  const whole = await createGpuRunner(gpu, model, { weightDtype: 'f32', cacheDtype: 'f32', blockSize: 16, numBlocks: 8, submitChunks: 1 });
  const split = await createGpuRunner(gpu, model, { weightDtype: 'f32', cacheDtype: 'f32', blockSize: 16, numBlocks: 8, submitChunks: 5, gpuTiming: true });
  try {
    const seq = { tokens, startPos: 0, blockTable: [1, 2], logits: 'all' as const };
    const a = await whole.step([seq]);
    const b = await split.step([seq]);
    assert.deepEqual(b, a);
    const next = { tokens: [argmax(a, (tokens.length - 1) * c.vocabSize, c.vocabSize)], startPos: tokens.length, blockTable: [1, 2], logits: 'last' as const };
    assert.deepEqual(await split.step([next]), await whole.step([next]));
    if (gpu.features.has('timestamp-query')) {
      const ms = split.lastStepGpuMs;
      assert.ok(ms !== null && ms > 0 && ms < 60_000, `GPU span ${ms} ms`);
      // Profiled: the same logits, one timed entry per dispatch, labelled by pipeline (every layer's norms, GEMVs, …).
      const prof = await split.stepProfile([next]);
      assert.deepEqual(prof.logits, await whole.step([next]));
      assert.ok(prof.dispatches.length >= 1 + 6 * c.nLayers, `${prof.dispatches.length} dispatches`);
      assert.ok(prof.dispatches.every((d) => d.label.length > 0 && d.label !== '(unlabelled)' && d.ms >= 0 && d.ms < 60_000));
      const norms = summarizeProfile(prof.dispatches).filter((e) => e.label.startsWith('rmsnorm'));
      assert.equal(norms.reduce((n, e) => n + e.count, 0), 2 * c.nLayers + 1, 'RMSNorm dispatches: two a layer and the final one');
    }
  } finally {
    whole.destroy();
    split.destroy();
  }
});

test('runner rejects bad steps with readable errors, and MLA configs over GQA weights', async () => {
  await assert.rejects(runner.step([{ tokens: [600], startPos: 0, blockTable: [0], logits: 'last' }]), /outside the vocabulary of 512/);
  await assert.rejects(runner.step([{ tokens: [1, 2], startPos: 15, blockTable: [0], logits: 'last' }]), /needs 2 blocks of 16/);
  await assert.rejects(runner.step([{ tokens: [1], startPos: 0, blockTable: [500], logits: 'last' }]), /block table entry 0 is 500/);
  // Pick rows: logprobs and adjustments only on picks, within the limits, distinct ids inside the vocabulary.
  const pick = { tokens: [1], startPos: 0, blockTable: [0], logits: 'argmax' as const };
  const adjust = (ids: number[]) => ({ ids, bias: ids.map(() => 1), repetition: ids.map(() => 1), subtract: ids.map(() => 0) });
  await assert.rejects(runner.stepOutput([{ ...pick, logits: 'last', logprobs: 2 }]), /logprobs come with 'argmax' or 'sample' rows/);
  await assert.rejects(runner.stepOutput([{ ...pick, logprobs: 21 }]), /logprobs 21 is not an integer in 0 … 20/);
  await assert.rejects(runner.stepOutput([{ ...pick, adjust: adjust([3, 3]) }]), /token id 3 is listed twice/);
  await assert.rejects(runner.stepOutput([{ ...pick, adjust: adjust([512]) }]), /token id 512 is outside the vocabulary of 512/);
  await assert.rejects(runner.stepOutput([{ ...pick, logits: 'none', adjust: adjust([5]) }]), /adjustments come with 'argmax' or 'sample' rows/);
  const mla = { ...model.config, attention: 'mla' } as unknown as LoadedModel['config'];
  await assert.rejects(createGpuRunner(gpu, { config: mla, weights: model.weights }), /layer 0 is gqa; an MLA model/);
});

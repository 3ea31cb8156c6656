// Sampler against hand-computed values: greedy, top-k/top-p/min-p masks, penalties, logit_bias, seeded draws, raw logprobs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  applyLogitAdjustments,
  applyLogitBias,
  applyMinP,
  applyPenalties,
  applyTopK,
  applyTopP,
  argmax,
  drawFromLogits,
  logitAdjustments,
  logSoftmax,
  newSamplingState,
  pendingPenalty,
  recordOutputToken,
  sampleNext,
  samplingParams,
  softmax,
  topN,
  withPendingToken,
} from '../engine/sampler.ts';
import { Rng } from '../engine/rng.ts';
import type { SamplingParams } from '../engine/types.ts';

/** Temperature 1, the rest neutral. */
const params = (p: Partial<SamplingParams> = {}): SamplingParams => samplingParams({ temperature: 1, ...p });

/** Logits whose softmax is exactly `probs`. */
const logitsOf = (probs: number[]) => Float64Array.from(probs, (p) => Math.log(p));
const kept = (v: Float64Array) => [...v.keys()].filter((i) => v[i] !== -Infinity);

test('greedy takes the arg max, lower id on ties', () => {
  assert.equal(argmax([0.1, 3, -2, 3]), 1);
  const st = newSamplingState(params({ temperature: 0 }), []);
  assert.equal(sampleNext(Float32Array.from([1, 5, 2, 4.9]), params({ temperature: 0 }), st).tokenId, 1);
});

test('top-k keeps the k largest logits', () => {
  const v = Float64Array.from([0.5, 3, -1, 2, 2.5, 0]);
  applyTopK(v, 3);
  assert.deepEqual(kept(v), [1, 3, 4]);
  const off = Float64Array.from([1, 2]);
  applyTopK(off, -1);
  assert.deepEqual(kept(off), [0, 1]);
});

test('top-p keeps the smallest head whose preceding mass is below p (vLLM)', () => {
  // Sorted: 0.5, 0.3, 0.15, 0.05. Mass before each: 0, 0.5, 0.8, 0.95.
  const probs = [0.15, 0.5, 0.05, 0.3];
  const cases: Array<[number, number[]]> = [
    [0.4, [1]],
    [0.7, [1, 3]],
    [0.85, [0, 1, 3]],
    [0.99, [0, 1, 2, 3]],
  ];
  for (const [p, want] of cases) {
    const v = logitsOf(probs);
    applyTopP(v, p);
    assert.deepEqual(kept(v), want, `top_p ${p}`);
  }
});

test('top-p over a large flat-tailed vocabulary matches a full sort', () => {
  const rng = new Rng(3);
  const n = 50_000;
  const logits = Float64Array.from({ length: n }, () => rng.nextFloat() * 4);
  logits[17] = 12;
  const v = logits.slice();
  applyTopP(v, 0.9);
  // Full-sort reference.
  const p = logSoftmax(logits).map(Math.exp);
  const order = [...p.keys()].sort((a, b) => p[b] - p[a]);
  const want: number[] = [];
  let before = 0;
  for (const i of order) {
    if (before >= 0.9) break;
    want.push(i);
    before += p[i];
  }
  assert.deepEqual(kept(v), want.sort((a, b) => a - b));
  assert.ok(want.length > 100);
});

test('top-p with many exact ties at the cutoff keeps the tied tokens in index order (vLLM sort order)', () => {
  const rng = new Rng(11);
  for (const p of [0.3, 0.5, 0.77, 0.95]) {
    // Logits from a handful of values: whole groups of equal probabilities, one of them straddling the cutoff.
    const logits = Float64Array.from({ length: 3000 }, () => Math.floor(rng.nextFloat() * 4));
    const v = logits.slice();
    applyTopP(v, p);
    const probs = softmax(logits);
    const order = [...probs.keys()].sort((a, b) => probs[b] - probs[a] || a - b);
    const want: number[] = [];
    let before = 0;
    for (const i of order) {
      if (before >= p) break;
      want.push(i);
      before += probs[i];
    }
    assert.deepEqual(kept(v), want.sort((a, b) => a - b), `p = ${p}`);
  }
});

test('min-p masks tokens below min_p × the top probability', () => {
  const v = logitsOf([0.5, 0.3, 0.15, 0.05]);
  applyMinP(v, 0.2); // threshold 0.1
  assert.deepEqual(kept(v), [0, 1, 2]);
});

test('penalties: repetition on prompt and output, frequency and presence on output only', () => {
  const v = Float64Array.from([2, -2, 1, 3, 0.5]);
  const prompt = new Set([0, 1]);
  const out = new Map([
    [1, 1],
    [3, 2],
  ]);
  applyPenalties(v, { repetitionPenalty: 2, frequencyPenalty: 0.5, presencePenalty: 0.25 }, prompt, out);
  // id0: 2/2 = 1; id1: −2·2 = −4, then −0.5·1 −0.25 → −4.75; id2 untouched; id3: 3/2 = 1.5 −0.5·2 −0.25 = 0.25; id4 untouched.
  assert.deepEqual([...v], [1, -4.75, 1, 0.25, 0.5]);
});

test('logit_bias steers greedy and sampling', () => {
  const raw = Float32Array.from([5, 0, 0, 0]);
  const p = params({ temperature: 0, logitBias: new Map([[2, 10]]) });
  assert.equal(sampleNext(raw, p, newSamplingState(p, [])).tokenId, 2);
  const banned = params({ temperature: 1, logitBias: new Map([[0, -100]]), seed: 1 });
  const st = newSamplingState(banned, []);
  for (let i = 0; i < 200; i++) assert.notEqual(sampleNext(raw, banned, st).tokenId, 0);
});

test('inverse-CDF draw picks the token whose cumulative interval holds u', () => {
  const v = logitsOf([0.2, 0.5, 0.3]);
  assert.equal(drawFromLogits(v.slice(), 0.0), 0);
  assert.equal(drawFromLogits(v.slice(), 0.19), 0);
  assert.equal(drawFromLogits(v.slice(), 0.21), 1);
  assert.equal(drawFromLogits(v.slice(), 0.69), 1);
  assert.equal(drawFromLogits(v.slice(), 0.71), 2);
  assert.equal(drawFromLogits(v.slice(), 0.999999), 2);
});

test('same seed → same draws; another seed differs; frequencies follow the distribution', () => {
  const raw = Float32Array.from([Math.log(0.1), Math.log(0.6), Math.log(0.3)]);
  const draws = (seed: number, n: number) => {
    const p = params({ seed });
    const st = newSamplingState(p, []);
    return Array.from({ length: n }, () => sampleNext(raw, p, st).tokenId);
  };
  assert.deepEqual(draws(42, 64), draws(42, 64));
  assert.notDeepEqual(draws(42, 64), draws(43, 64));
  const counts = [0, 0, 0];
  for (const t of draws(7, 30000)) counts[t]++;
  // 4 standard deviations of a binomial with n = 30000.
  for (const [i, p] of [0.1, 0.6, 0.3].entries()) {
    const sd = Math.sqrt(30000 * p * (1 - p));
    assert.ok(Math.abs(counts[i] - 30000 * p) < 4 * sd, `token ${i}: ${counts[i]} draws, expected ${30000 * p}`);
  }
  // Large and negative seeds work and differ.
  assert.notDeepEqual(draws(-1, 16), draws(2 ** 62, 16));
});

test('logprobs: log-softmax of the raw logits with top-N, whatever the sampling settings', () => {
  const raw = Float32Array.from([1, 2, 3, 0.5]);
  const lse = Math.log(Math.exp(1) + Math.exp(2) + Math.exp(3) + Math.exp(0.5));
  const p = params({ temperature: 0.7, repetitionPenalty: 1.3, topK: 2, logprobs: 2, seed: 5 });
  const st = newSamplingState(p, [2]);
  const r = sampleNext(raw, p, st);
  assert.ok(r.logprobs);
  assert.ok(Math.abs(r.logprobs.logprob - (raw[r.tokenId] - lse)) < 1e-6);
  assert.deepEqual(r.logprobs.top.map((t) => t.tokenId), [2, 1]);
  assert.ok(Math.abs(r.logprobs.top[0].logprob - (3 - lse)) < 1e-6);
  assert.ok(Math.abs(r.logprobs.top[1].logprob - (2 - lse)) < 1e-6);
  assert.deepEqual(topN([5, 1, 5, 9, 0], 3), [3, 0, 2]);
});

test('output counts feed the frequency penalty between tokens', () => {
  const p = params({ temperature: 0, frequencyPenalty: 1.5 });
  const st = newSamplingState(p, []);
  const raw = Float32Array.from([2, 1, 0]);
  const picks: number[] = [];
  for (let i = 0; i < 4; i++) {
    const t = sampleNext(raw, p, st).tokenId;
    recordOutputToken(st, t);
    picks.push(t);
  }
  // 2 → 0.5 after one use → token 1 (1) wins; then both at ≤ 0.5 and −0.5 …
  assert.deepEqual(picks, [0, 1, 0, 2]);
});

test('logitAdjustments: bias and penalties as per-token changes = applyLogitBias then applyPenalties', () => {
  const rng = new Rng(42);
  for (let trial = 0; trial < 20; trial++) {
    const vocab = 60;
    const raw = Float64Array.from({ length: vocab }, () => (rng.nextFloat() - 0.5) * 8);
    const pick = () => Math.floor(rng.nextFloat() * vocab);
    const p = params({
      logitBias: new Map(Array.from({ length: 5 }, () => [pick(), (rng.nextFloat() - 0.5) * 20] as [number, number])),
      repetitionPenalty: trial % 3 === 0 ? 1 : 1 + rng.nextFloat(),
      frequencyPenalty: trial % 4 === 1 ? 0 : rng.nextFloat(),
      presencePenalty: trial % 5 === 2 ? 0 : rng.nextFloat(),
    });
    const st = newSamplingState(p, Array.from({ length: 8 }, pick));
    for (let i = 0; i < 10; i++) recordOutputToken(st, pick());
    const want = raw.slice();
    applyLogitBias(want, p.logitBias);
    applyPenalties(want, p, st.promptTokens, st.outputCounts);
    const a = logitAdjustments(p, st)!;
    assert.equal(new Set(a.ids).size, a.ids.length, 'distinct ids');
    const got = raw.slice();
    applyLogitAdjustments(got, a);
    for (let i = 0; i < vocab; i++) assert.ok(Math.abs(got[i] - want[i]) < 1e-12, `trial ${trial} id ${i}: ${got[i]} vs ${want[i]}`);
  }
  assert.equal(logitAdjustments(params({}), newSamplingState(params({}), [1, 2])), null);
});

test('withPendingToken: the adjustments before a token, with the token pending, = the adjustments after it', () => {
  const rng = new Rng(7);
  const vocab = 40;
  for (let trial = 0; trial < 12; trial++) {
    const p = params({
      logitBias: new Map([[3, 2.5], [9, -4]]),
      repetitionPenalty: trial % 3 === 0 ? 1 : 1.3,
      frequencyPenalty: trial % 4 === 1 ? 0 : 0.4,
      presencePenalty: trial % 2 === 0 ? 0 : 0.7,
    });
    const st = newSamplingState(p, [5, 6, 7]);
    for (const t of [11, 12, 11]) recordOutputToken(st, t);
    // An output token (11), a prompt token (5), a biased one (3), one with no entry (20), and a random one.
    for (const token of [11, 5, 3, 20, Math.floor(rng.nextFloat() * vocab)]) {
      const before = logitAdjustments(p, st)!;
      const pending = withPendingToken({ ...before, pending: pendingPenalty(p)! }, token);
      assert.equal(pending.pending, undefined);
      const after = newSamplingState(p, [5, 6, 7]);
      for (const t of [11, 12, 11, token]) recordOutputToken(after, t);
      const raw = Float64Array.from({ length: vocab }, () => (rng.nextFloat() - 0.5) * 8);
      const want = raw.slice();
      applyLogitAdjustments(want, logitAdjustments(p, after)!);
      const got = raw.slice();
      applyLogitAdjustments(got, pending);
      for (let i = 0; i < vocab; i++) assert.ok(Math.abs(got[i] - want[i]) < 1e-12, `trial ${trial} token ${token} id ${i}: ${got[i]} vs ${want[i]}`);
    }
  }
  assert.equal(pendingPenalty(params({ logitBias: new Map([[1, 1]]) })), null);
});

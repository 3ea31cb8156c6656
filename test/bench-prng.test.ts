// Seeded workload generation: Poisson gaps have the right mean and spread, and the same seed gives the same schedule and prompts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng, poissonSchedule } from '../bench/prng.ts';
import { randomTokenPrompts, splitParagraphs, pickParagraphs, truncateChars } from '../bench/dataset.ts';
import { mean, std } from '../bench/stats.ts';

test('Poisson arrivals: exponential gaps with mean 1/rate and coefficient of variation 1', () => {
  const n = 20000;
  const rate = 20;
  const times = poissonSchedule(n, rate, 0);
  assert.equal(times[0], 0);
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  assert.ok(gaps.every((g) => g >= 0));
  // Standard error of the mean gap = (1/rate)/sqrt(n) ≈ 0.00035 s; allow 5 of them.
  const m = mean(gaps);
  assert.ok(Math.abs(m - 1 / rate) < 5 * (1 / rate) / Math.sqrt(n), `mean gap ${m} vs ${1 / rate}`);
  // Exponential: std = mean; and P(gap > mean) = e^-1.
  assert.ok(Math.abs(std(gaps) / m - 1) < 0.05, `cv ${std(gaps) / m}`);
  const above = gaps.filter((g) => g > 1 / rate).length / gaps.length;
  assert.ok(Math.abs(above - Math.exp(-1)) < 0.02, `P(gap > mean) = ${above}`);
});

test('the same seed gives the same schedule and prompts; another seed does not', () => {
  assert.deepEqual(poissonSchedule(100, 5, 7), poissonSchedule(100, 5, 7));
  assert.notDeepEqual(poissonSchedule(100, 5, 7), poissonSchedule(100, 5, 8));
  assert.deepEqual(poissonSchedule(4, Infinity, 3), [0, 0, 0, 0]);
  assert.throws(() => poissonSchedule(4, 0, 3), /request rate must be > 0/);

  const a = randomTokenPrompts(50, 128, 512, 0);
  assert.deepEqual(a, randomTokenPrompts(50, 128, 512, 0));
  assert.notDeepEqual(a, randomTokenPrompts(50, 128, 512, 1));
  assert.ok(a.every((p) => p.length === 128 && p.every((id) => Number.isInteger(id) && id >= 0 && id < 512)));
  // Prompt ids and arrival times come from separate streams: more prompts do not shift the schedule.
  assert.deepEqual(poissonSchedule(10, 5, 0), poissonSchedule(10, 5, 0));
});

test('uniform generator: ids cover the vocabulary evenly', () => {
  const rng = createRng(123);
  const counts = new Array<number>(16).fill(0);
  const n = 160000;
  for (let i = 0; i < n; i++) counts[rng.int(16)]++;
  // Each bucket ~ Binomial(n, 1/16): sd ≈ 97; allow 5 sd.
  for (const c of counts) assert.ok(Math.abs(c - n / 16) < 500, `bucket ${c}`);
  const u = Array.from({ length: 10000 }, () => createRng(5).next());
  assert.ok(u.every((x) => x === u[0])); // same seed, same first draw
});

test('dataset paragraphs: split on blank lines, seeded pick, character cut at a word', () => {
  const text = 'One  fish.\n\n  Two fish.  \n \nRed fish\nblue fish.\r\n\r\n\n\nLast.';
  const paragraphs = splitParagraphs(text);
  assert.deepEqual(paragraphs, ['One  fish.', 'Two fish.', 'Red fish\nblue fish.', 'Last.']);
  const picked = pickParagraphs(paragraphs, 10, 0);
  assert.deepEqual(picked, pickParagraphs(paragraphs, 10, 0));
  assert.equal(picked.length, 10);
  // Cycling through one shuffle: each paragraph appears in every block of four.
  assert.deepEqual([...picked.slice(0, 4)].sort(), [...paragraphs].sort());
  assert.deepEqual(picked.slice(4, 8), picked.slice(0, 4));
  assert.equal(truncateChars('the quick brown fox', 12), 'the quick');
  assert.equal(truncateChars('short', 12), 'short');
});

// The load runner against a fake upstream with known delays: measured TTFT/ITL/TPOT/E2EL, failures, caps, arrivals, KV scrapes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Agent } from 'undici';
import { runLoad } from '../bench/load.ts';
import { summarizeRun } from '../bench/report.ts';
import { poissonSchedule } from '../bench/prng.ts';
import { randomTokenPrompts } from '../bench/dataset.ts';
import { near, retryOnTimingMiss, startFakeUpstream, type Behavior } from './bench-fake-upstream.ts';

const FIRST_MS = 150;
const GAP_MS = 40;
const MODELS = [
  { name: 'stories260K', bytesPerToken: 640, capacityBytes: 64 * 1024 * 1024, attention: 'gqa' as const },
  { name: 'stories260K-mla', bytesPerToken: 384, capacityBytes: 64 * 1024 * 1024, attention: 'mla' as const },
];


test('latencies match the injected delays; throughput = tokens / duration; KV figures come from /metrics', (t) =>
  retryOnTimingMiss(3, latencyScenario, (m) => t.diagnostic(m)));

async function latencyScenario(): Promise<void> {
  // finish_reason in its own empty-text chunk, as mla-serve sends it: no token, so no ITL gap.
  const fake = await startFakeUpstream({ firstChunkMs: FIRST_MS, chunkGapMs: GAP_MS, models: MODELS, preemptionsPerRequest: 2, finishChunk: 'separate' });
  const dispatcher = new Agent();
  try {
    const outputLen = 6;
    const prompts = randomTokenPrompts(8, 32, 512, 0);
    // An untimed pass first, as the CLI's warm-up: opens the 8 connections and JIT-compiles the
    // client and the fake (both share this process), which otherwise adds tens of ms to the first TTFTs.
    const warm = await runLoad({
      baseUrl: fake.url,
      model: 'stories260K-mla',
      prompts,
      outputLen: 2,
      ignoreEos: true,
      timeoutMs: 10_000,
      requestRate: Infinity,
      seed: 0,
      scrapeIntervalMs: 50,
      dispatcher,
    });
    assert.equal(warm.outcomes.filter((o) => o.ok).length, 8);
    fake.requests.length = 0;
    const result = await runLoad({
      baseUrl: fake.url,
      model: 'stories260K',
      prompts,
      outputLen,
      ignoreEos: true,
      timeoutMs: 10_000,
      requestRate: Infinity,
      seed: 0,
      scrapeIntervalMs: 50,
      dispatcher,
    });
    const r = summarizeRun(result);
    assert.equal(r.completed, 8);
    assert.equal(r.failed, 0);
    assert.equal(r.total_output_tokens, 8 * outputLen);
    assert.equal(r.total_input_tokens, 8 * 32);

    // What went over the wire: token-id prompts, max_tokens, usage requested, ignore_eos.
    assert.equal(fake.requests.length, 8);
    for (const q of fake.requests) {
      assert.equal(q.model, 'stories260K');
      assert.equal(q.maxTokens, outputLen);
      assert.equal(q.includeUsage, true);
      assert.equal(q.ignoreEos, true);
    }
    assert.deepEqual(
      fake.requests.map((q) => q.prompt).sort(),
      prompts.map((p) => p).sort(),
    );

    // Each request: first chunk after 150 ms, then one every 40 ms; the usage chunk follows the last at once.
    near(r.mean_ttft_ms, FIRST_MS, 'mean TTFT');
    near(r.median_ttft_ms, FIRST_MS, 'median TTFT');
    near(r.mean_itl_ms, GAP_MS, 'mean ITL');
    near(r.median_itl_ms, GAP_MS, 'median ITL');
    near(r.mean_tpot_ms, GAP_MS, 'mean TPOT');
    near(r.mean_e2el_ms, FIRST_MS + (outputLen - 1) * GAP_MS, 'mean E2EL');
    assert.deepEqual(r.itls.map((gaps) => gaps.length), new Array(8).fill(outputLen - 1));
    near(Math.min(...r.itls.flat()) * 1000, GAP_MS, 'smallest ITL');
    for (let i = 0; i < 8; i++) {
      // TPOT per request is exactly (E2EL - TTFT) / (n - 1) of that request.
      assert.ok(r.ttfts[i] <= r.e2els[i]);
    }
    assert.ok(r.p99_ttft_ms >= r.median_ttft_ms);

    assert.ok(Math.abs(r.output_throughput - r.total_output_tokens / r.duration) < 1e-9);
    assert.ok(Math.abs(r.request_throughput - 8 / r.duration) < 1e-9);
    assert.ok(Math.abs(r.total_token_throughput - (8 * 32 + 8 * outputLen) / r.duration) < 1e-9);
    near(r.duration * 1000, FIRST_MS + (outputLen - 1) * GAP_MS, 'duration of 8 parallel requests');
    assert.equal(r.max_concurrent_requests, 8);
    assert.equal(r.max_concurrency, null);

    // /metrics: bytes per token, capacity, and the peak is the highest value the fake actually served.
    assert.equal(r.kv_cache_bytes_per_token, 640);
    assert.equal(r.kv_cache_capacity_bytes, 64 * 1024 * 1024);
    assert.equal(r.kv_cache_capacity_tokens, Math.floor((64 * 1024 * 1024) / 640));
    assert.equal(r.attention, 'gqa');
    assert.ok(fake.metricsScrapes() >= 5, `scraped ${fake.metricsScrapes()} times`);
    assert.equal(r.peak_kv_cache_usage_perc, Math.max(...(fake.servedKvUsage.get('stories260K') as number[])));
    assert.equal(r.peak_kv_cache_usage_perc, 0.8); // all 8 in flight for ~350 ms, scraped every 50 ms
    assert.equal(r.num_preemptions, 2 * 8);
    assert.equal(r.kv_usage_timeline.length, r.metrics_scrapes);
    // Throughput over time adds back up to every output token.
    const tl = r.throughput_timeline;
    const summed = tl.output_tokens_per_s.reduce((s, v) => s + v * tl.bucket_s, 0);
    assert.ok(Math.abs(summed - 8 * outputLen) < 1e-6);

    // Goodput: requests meeting every SLO per second of the run.
    assert.equal(r.request_goodput, null);
    assert.equal(summarizeRun(result, { ttft: 1000, tpot: 100, e2el: 2000 }).request_goodput, r.request_throughput);
    assert.equal(summarizeRun(result, { ttft: FIRST_MS - 50 }).request_goodput, 0);
    assert.equal(summarizeRun(result, { tpot: GAP_MS - 20 }).request_goodput, 0);
    const e2elSlo = r.median_e2el_ms;
    const meeting = r.e2els.filter((e) => e * 1000 <= e2elSlo).length;
    assert.ok(meeting >= 4 && meeting < 8);
    assert.equal(summarizeRun(result, { e2el: e2elSlo }).request_goodput, meeting / r.duration);
  } finally {
    await dispatcher.close();
    await fake.close();
  }
}

test('failures are counted, never thrown: HTTP 500, dropped connection, malformed JSON, missing usage/[DONE], timeout', (t) =>
  retryOnTimingMiss(3, failureScenario, (m) => t.diagnostic(m)));

async function failureScenario(): Promise<void> {
  const plan: Behavior[] = ['ok', 'http500', 'drop', 'malformed', 'no-usage', 'no-done', 'hang', 'ok', 'ok', 'ok'];
  // Order of arrival is not order of sending when all go at once, so the fake picks by arrival index.
  const fake = await startFakeUpstream({ firstChunkMs: 20, chunkGapMs: 10, models: MODELS, behavior: (i) => plan[i] ?? 'ok' });
  const dispatcher = new Agent();
  try {
    const result = await runLoad({
      baseUrl: fake.url,
      model: 'stories260K-mla',
      prompts: randomTokenPrompts(plan.length, 8, 512, 1),
      outputLen: 4,
      ignoreEos: false,
      timeoutMs: 800,
      requestRate: Infinity,
      seed: 1,
      scrapeIntervalMs: 100,
      dispatcher,
    });
    const r = summarizeRun(result);
    assert.equal(r.completed, 4);
    assert.equal(r.failed, 6);
    assert.equal(r.total_output_tokens, 4 * 4);
    const errors = r.errors.filter(Boolean).sort();
    assert.equal(errors.length, 6);
    assert.ok(errors.some((e) => /^HTTP 500: injected failure$/.test(e)), errors.join(' | '));
    assert.ok(errors.some((e) => /^connection error/.test(e)), errors.join(' | '));
    assert.ok(errors.some((e) => /^malformed SSE chunk \(not JSON\)/.test(e)), errors.join(' | '));
    assert.ok(errors.some((e) => /no usage chunk/.test(e)), errors.join(' | '));
    assert.ok(errors.some((e) => /without data: \[DONE\]/.test(e)), errors.join(' | '));
    assert.ok(errors.some((e) => /^timed out after 0.8 s/.test(e)), errors.join(' | '));
    // Only successful requests enter the latency figures.
    assert.equal(r.ttfts.filter((t, i) => t > 0 && r.errors[i] === '').length, 4);
    near(r.median_ttft_ms, 20, 'median TTFT of the successful requests');
  } finally {
    await dispatcher.close();
    await fake.close();
  }
}

test('Poisson arrivals follow the seeded schedule; max-concurrency caps requests in flight', (t) =>
  retryOnTimingMiss(3, arrivalScenario, (m) => t.diagnostic(m)));

async function arrivalScenario(): Promise<void> {
  const fake = await startFakeUpstream({ firstChunkMs: 30, chunkGapMs: 10, models: MODELS });
  const dispatcher = new Agent();
  try {
    const count = 12;
    const rate = 20;
    await runLoad({
      baseUrl: fake.url,
      model: 'stories260K',
      prompts: randomTokenPrompts(count, 4, 512, 3),
      outputLen: 3,
      ignoreEos: false,
      timeoutMs: 10_000,
      requestRate: rate,
      seed: 3,
      scrapeIntervalMs: 250,
      dispatcher,
    });
    const schedule = poissonSchedule(count, rate, 3);
    const arrived = fake.requests.map((q) => q.arrivedMs);
    for (let i = 1; i < count; i++) {
      const expectedGap = (schedule[i] - schedule[0]) * 1000;
      near(arrived[i] - arrived[0], expectedGap, `arrival ${i} after the first`);
    }

    const capped = await startFakeUpstream({ firstChunkMs: 60, chunkGapMs: 20, models: MODELS });
    try {
      const result = await runLoad({
        baseUrl: capped.url,
        model: 'stories260K',
        prompts: randomTokenPrompts(9, 4, 512, 4),
        outputLen: 3,
        ignoreEos: false,
        timeoutMs: 10_000,
        requestRate: Infinity,
        maxConcurrency: 3,
        seed: 4,
        scrapeIntervalMs: 250,
        dispatcher,
      });
      const r = summarizeRun(result);
      assert.equal(capped.maxInFlight(), 3);
      assert.equal(r.max_concurrent_requests, 3);
      assert.equal(r.max_concurrency, 3);
      assert.equal(r.completed, 9);
      // Three waves of three: 3 × (60 + 2·20) ms.
      near(r.duration * 1000, 3 * (60 + 2 * 20), 'duration of 3 capped waves');
    } finally {
      await capped.close();
    }
  } finally {
    await dispatcher.close();
    await fake.close();
  }
}

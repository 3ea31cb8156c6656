// `mla-serve bench` end to end against fake upstreams: the table, report.json keys and ratios, report.html charts, sweeps, datasets.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent } from 'undici';
import { runBench, parseBenchArgs, type BenchIo } from '../bench/cli.ts';
import { probeVocabSize } from '../bench/server-info.ts';
import type { BenchReport } from '../bench/report.ts';
import { splitParagraphs, pickParagraphs } from '../bench/dataset.ts';
import { fakeTokenize, near, retryOnTimingMiss, startFakeUpstream } from './bench-fake-upstream.ts';

const CAPACITY = 64 * 1024 * 1024;
const GQA = { name: 'stories260K', bytesPerToken: 640, capacityBytes: CAPACITY, attention: 'gqa' as const };
const MLA = { name: 'stories260K-mla', bytesPerToken: 384, capacityBytes: CAPACITY, attention: 'mla' as const };

function captureIo(): BenchIo & { out: () => string; err: () => string } {
  let out = '';
  let err = '';
  return {
    stdout: (t) => void (out += t),
    stderr: (t) => void (err += t),
    out: () => out,
    err: () => err,
  };
}

const VLLM_KEYS = [
  'completed', 'failed', 'duration', 'total_input_tokens', 'total_output_tokens', 'request_throughput', 'output_throughput',
  'total_token_throughput', 'max_concurrency', 'max_concurrent_requests', 'request_rate', 'num_prompts',
  ...['ttft', 'tpot', 'itl', 'e2el'].flatMap((m) => [`mean_${m}_ms`, `median_${m}_ms`, `std_${m}_ms`, `p99_${m}_ms`]),
  'kv_cache_bytes_per_token', 'kv_cache_capacity_bytes', 'kv_cache_capacity_tokens', 'peak_kv_cache_usage_perc', 'num_preemptions',
  'input_lens', 'output_lens', 'ttfts', 'itls', 'errors',
];

test('two models on two servers: same workload, table with ratios, report.json and report.html', (t) =>
  retryOnTimingMiss(3, twoServerScenario, (m) => t.diagnostic(m)));

async function twoServerScenario(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'bench-cli-'));
  const a = await startFakeUpstream({ firstChunkMs: 60, chunkGapMs: 15, models: [GQA], preemptionsPerRequest: 1 });
  const b = await startFakeUpstream({ firstChunkMs: 30, chunkGapMs: 10, models: [MLA] });
  try {
    const io = captureIo();
    const code = await runBench(
      [
        '--url', a.url, '--url', `${b.url}/v1/`,
        '--model', GQA.name, '--model', MLA.name,
        '--num-prompts', '6', '--request-rate', 'inf', '--input-len', '16', '--output-len', '4', '--seed', '0',
        '--ignore-eos', '--scrape-interval', '50', '--no-progress', '--out', join(dir, 'report'),
      ],
      io,
    );
    assert.equal(code, 0, io.err());

    // One warm-up plus the six timed requests on each server, each server only its own model.
    assert.equal(a.requests.length, 7);
    assert.equal(b.requests.length, 7);
    assert.ok(a.requests.every((q) => q.model === GQA.name) && b.requests.every((q) => q.model === MLA.name));
    const sortedPrompts = (rs: typeof a.requests): string[] => rs.slice(1).map((q) => JSON.stringify(q.prompt)).sort();
    assert.deepEqual(sortedPrompts(a.requests), sortedPrompts(b.requests));
    assert.ok(a.requests.every((q) => Array.isArray(q.prompt) && q.prompt.length === 16 && q.maxTokens === 4 && q.ignoreEos));

    const report = JSON.parse(await readFile(join(dir, 'report.json'), 'utf8')) as BenchReport;
    assert.equal(report.runs.length, 2);
    for (const run of report.runs) {
      for (const key of VLLM_KEYS) assert.ok(key in run, `report.json run lacks ${key}`);
      assert.equal(run.completed, 6);
      assert.equal(run.failed, 0);
      assert.equal(run.total_output_tokens, 24);
      assert.ok(Math.abs(run.output_throughput - 24 / run.duration) < 1e-9);
    }
    const [gqa, mla] = report.runs;
    assert.equal(gqa.model_id, GQA.name);
    assert.equal(gqa.kv_cache_capacity_tokens, Math.floor(CAPACITY / 640));
    assert.equal(mla.kv_cache_capacity_tokens, Math.floor(CAPACITY / 384));
    assert.equal(gqa.num_preemptions, 6);
    assert.equal(mla.num_preemptions, 0);
    near(gqa.median_ttft_ms, 60, 'GQA server median TTFT');
    near(mla.median_ttft_ms, 30, 'MLA server median TTFT');
    assert.equal(report.config.request_rate, 'inf');
    assert.deepEqual(report.config.urls, [a.url, b.url]);
    assert.equal(report.ratios.length, 1);
    const ratios = report.ratios[0];
    assert.equal(ratios.model_id, MLA.name);
    assert.equal(ratios.baseline_model_id, GQA.name);
    assert.equal(ratios.ratios.kv_cache_bytes_per_token, 384 / 640);
    assert.equal(ratios.ratios.kv_cache_capacity_tokens, Math.floor(CAPACITY / 384) / Math.floor(CAPACITY / 640));
    assert.ok(Math.abs((ratios.ratios.mean_ttft_ms as number) - mla.mean_ttft_ms / gqa.mean_ttft_ms) < 1e-12);
    assert.equal(ratios.ratios.num_preemptions, 0); // 0 MLA preemptions over 6 GQA ones

    // The human table: a column per model, the ratio column, a row per figure.
    const table = io.out();
    assert.match(table, /stories260K \(gqa\)\s+stories260K-mla \(mla\)\s+ratio 2nd\/1st/);
    assert.match(table, /KV bytes per token\s+640\s+384\s+0\.600x/);
    assert.match(table, /requests ok\s+6\s+6\s+1\.000x/);
    for (const row of ['TTFT p99 (ms)', 'TPOT median (ms)', 'ITL mean (ms)', 'E2EL p99 (ms)', 'peak concurrency', 'KV capacity (tokens)', 'peak KV usage (%)', 'preemptions']) {
      assert.ok(table.includes(row), `table lacks ${row}`);
    }

    const html = await readFile(join(dir, 'report.html'), 'utf8');
    assert.equal((html.match(/<svg /g) ?? []).length, 6); // 4 latency-percentile charts, throughput, KV usage
    for (const title of ['TTFT percentiles', 'TPOT percentiles', 'ITL percentiles', 'E2EL percentiles', 'Output token throughput over time', 'KV cache usage over time']) {
      assert.ok(html.includes(`<title>${title}</title>`), `html lacks chart ${title}`);
    }
    // Both models drawn in the time charts; nothing fetched from the network.
    assert.equal((html.match(/<polyline class="series" data-series="stories260K \(gqa\)"/g) ?? []).length, 2);
    assert.equal((html.match(/<polyline class="series" data-series="stories260K-mla \(mla\)"/g) ?? []).length, 2);
    assert.doesNotMatch(html, /<script|<link|src=|href=|@import/);
  } finally {
    await a.close();
    await b.close();
    await rm(dir, { recursive: true, force: true });
  }
}

test('--json prints the report to stdout; a concurrency sweep runs every level; the vocabulary is probed', (t) =>
  retryOnTimingMiss(3, sweepScenario, (m) => t.diagnostic(m)));

async function sweepScenario(): Promise<void> {
  const fake = await startFakeUpstream({ firstChunkMs: 40, chunkGapMs: 10, models: [GQA], vocabSize: 300, reportVocabSize: false });
  const dir = await mkdtemp(join(tmpdir(), 'bench-cli-'));
  try {
    const io = captureIo();
    const code = await runBench(
      ['--url', fake.url, '--model', GQA.name, '--num-prompts', '6', '--input-len', '64', '--output-len', '3', '--concurrency', '1,3', '--warmups', '0', '--json', '--out', join(dir, 'sweep.json')],
      io,
    );
    assert.equal(code, 0, io.err());
    const report = JSON.parse(io.out()) as BenchReport;
    assert.deepEqual(report.config.concurrency_levels, [1, 3]);
    assert.deepEqual(report.runs.map((r) => r.max_concurrency), [1, 3]);
    assert.deepEqual(report.runs.map((r) => r.max_concurrent_requests), [1, 3]);
    assert.deepEqual(report.runs.map((r) => r.completed), [6, 6]);
    // Serial requests take 6 × (40 + 2·10) ms; three at a time, two waves.
    near(report.runs[0].duration * 1000, 6 * 60, 'duration of 6 serial requests', 50);
    near(report.runs[1].duration * 1000, 2 * 60, 'duration of 6 requests 3 at a time', 30);
    assert.match(io.err(), /max concurrency 1/); // the table went to stderr
    // Random ids stayed inside the probed vocabulary (the fake answers 400 to any id ≥ 300).
    assert.equal(fake.requests.length, 12);
    const ids = fake.requests.flatMap((q) => q.prompt as number[]);
    assert.ok(ids.every((id) => id < 300) && Math.max(...ids) > 250);
    const html = await readFile(join(dir, 'sweep.html'), 'utf8');
    assert.ok(html.includes('<title>Output throughput vs concurrency</title>'));
    assert.equal((html.match(/<svg /g) ?? []).length, 3 + 2 * 6);

    const dispatcher = new Agent();
    const before = fake.detokenizeCalls();
    assert.equal(await probeVocabSize(fake.url, GQA.name, dispatcher), 300);
    assert.ok(fake.detokenizeCalls() - before <= 20);
    await dispatcher.close();
  } finally {
    await fake.close();
    await rm(dir, { recursive: true, force: true });
  }
}

test('--dataset: paragraphs tokenized by the server, cut to --input-len, same pick for the same seed', async () => {
  const fake = await startFakeUpstream({ firstChunkMs: 20, chunkGapMs: 5, models: [GQA] });
  const dir = await mkdtemp(join(tmpdir(), 'bench-cli-'));
  try {
    const file = join(dir, 'stories.txt');
    const text = [
      'Once upon a time there was a little dog named Max who loved to run in the park every morning.',
      'Lily had a red ball.',
      'The sun was hot and the sky was blue, so the children went to the lake to swim and play games together.',
    ].join('\n\n');
    await writeFile(file, text);
    const io = captureIo();
    const code = await runBench(['--url', fake.url, '--model', GQA.name, '--dataset', file, '--num-prompts', '5', '--input-len', '8', '--output-len', '2', '--seed', '3', '--warmups', '0'], io);
    assert.equal(code, 0, io.err());
    const picked = pickParagraphs(splitParagraphs(text), 5, 3);
    const expected = picked.map((p) => JSON.stringify(fakeTokenize(p).slice(0, 8))).sort();
    assert.deepEqual(fake.requests.map((q) => JSON.stringify(q.prompt)).sort(), expected);
    // The short paragraph stays whole (BOS + 5 words), the long ones are cut to 8 tokens.
    assert.ok(fake.requests.some((q) => (q.prompt as number[]).length === 6));
    assert.ok(fake.requests.some((q) => (q.prompt as number[]).length === 8));

    // A server without /tokenize: text cut at 4 characters per token, at a word boundary, with a warning.
    const plain = await startFakeUpstream({ firstChunkMs: 20, chunkGapMs: 5, models: [GQA], serveTokenize: false });
    try {
      const io2 = captureIo();
      assert.equal(await runBench(['--url', plain.url, '--model', GQA.name, '--dataset', file, '--num-prompts', '3', '--input-len', '8', '--output-len', '2', '--seed', '3', '--warmups', '0'], io2), 0);
      assert.match(io2.err(), /has no POST \/tokenize: dataset prompts are cut at 32 characters/);
      const sent = plain.requests.map((q) => q.prompt as string).sort();
      const cut = (p: string): string => (p.length <= 32 ? p : p.slice(0, p.slice(0, 32).lastIndexOf(' ')));
      assert.deepEqual(sent, picked.slice(0, 3).map(cut).sort());
      assert.ok(sent.includes('Lily had a red ball.') || picked.slice(0, 3).every((p) => p.length > 32));
    } finally {
      await plain.close();
    }
  } finally {
    await fake.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('mistakes are reported readably: bad flags (exit 2), unknown model, prompt longer than the context', async () => {
  const io = captureIo();
  assert.equal(await runBench(['--model', 'x', '--request-rate', 'fast'], io), 2);
  assert.match(io.err(), /--request-rate must be > 0 or 'inf', got 'fast'/);
  assert.equal(await runBench(['--model', 'a', '--model', 'b', '--model', 'c', '--url', 'http://127.0.0.1:1', '--url', 'http://127.0.0.1:2'], io), 2);
  assert.match(io.err(), /got 2 urls for 3 models/);
  assert.equal(await runBench(['--model', 'x', '--max-concurrency', '4', '--concurrency', '1,2'], io), 2);
  assert.equal(await runBench(['--help'], io), 0);
  assert.match(io.out(), /usage: mla-serve bench/);
  const opts = parseBenchArgs(['--model', 'm', '--request-rate', '20', '--timeout', '1.5', '--out', 'r.json']);
  assert.ok(opts !== 'help');
  assert.equal(opts.requestRate, 20);
  assert.equal(opts.timeoutS, 1.5);
  assert.equal(opts.out, 'r');
  assert.deepEqual(opts.concurrencyLevels, [undefined]);
  assert.deepEqual(opts.slos, {});
  const withSlos = parseBenchArgs(['--model', 'm', '--goodput', 'ttft:200,tpot:50', '--goodput', 'e2el:1500.5']);
  assert.ok(withSlos !== 'help');
  assert.deepEqual(withSlos.slos, { ttft: 200, tpot: 50, e2el: 1500.5 });
  assert.equal(await runBench(['--model', 'm', '--goodput', 'itl:5'], io), 2);
  assert.match(io.err(), /--goodput 'itl:5' is not KEY:MS/);

  const fake = await startFakeUpstream({ firstChunkMs: 10, chunkGapMs: 5, models: [GQA] });
  try {
    await assert.rejects(runBench(['--url', fake.url, '--model', 'nope', '--no-progress'], io), /model 'nope' is not served at http:\/\/127\.0\.0\.1:\d+; it serves: stories260K/);
    await assert.rejects(
      runBench(['--url', fake.url, '--model', GQA.name, '--input-len', '500', '--output-len', '64'], io),
      /--input-len 500 \+ --output-len 64 = 564 tokens exceeds model 'stories260K' max_model_len 512/,
    );
    assert.equal(fake.requests.length, 0);
  } finally {
    await fake.close();
  }
  await assert.rejects(runBench(['--url', 'http://127.0.0.1:9', '--model', 'm'], io), /cannot reach http:\/\/127\.0\.0\.1:9 .*is 'mla-serve serve' running there\?/);
});

// The bench against the real server: `mla-serve serve` on stories260K (SwiftShader) on a loopback port, 20 requests, figures checked against usage and /metrics.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { existsSync } from 'node:fs';
import { request } from 'undici';
import { runBench, type BenchIo } from '../bench/cli.ts';
import { parsePromText, modelValue } from '../bench/prom-text.ts';
import type { BenchReport } from '../bench/report.ts';

const MODEL = 'stories260K';
// stories260K: 5 layers × (K + V) × 4 kv heads × head_dim 8 × 2 bytes (f16 cache).
const KV_BYTES_PER_TOKEN = 5 * 2 * 4 * 8 * 2;
const NUM_PROMPTS = 20;
const INPUT_LEN = 8;
const OUTPUT_LEN = 4;

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}

async function get(url: string): Promise<{ status: number; text: string }> {
  const res = await request(url, { signal: AbortSignal.timeout(60_000) });
  return { status: res.statusCode, text: await res.body.text() };
}

/** Polls /health until 200, at most `limitMs`; fails early with the server's stderr when it exits. */
async function waitHealthy(url: string, child: ChildProcess, stderr: () => string, limitMs: number): Promise<void> {
  const deadline = Date.now() + limitMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`mla-serve serve exited with ${child.exitCode} before it was healthy:\n${stderr().slice(-2000)}`);
    try {
      if ((await get(`${url}/health`)).status === 200) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`mla-serve serve was not healthy after ${limitMs / 1000} s:\n${stderr().slice(-2000)}`);
}

async function stopServer(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  await exited;
  clearTimeout(timer);
}

async function generationTokens(url: string): Promise<number> {
  const { status, text } = await get(`${url}/metrics`);
  assert.equal(status, 200);
  const value = modelValue(parsePromText(text), 'mla_serve_generation_tokens_total', MODEL);
  assert.ok(value !== undefined, 'the server exports mla_serve_generation_tokens_total');
  return value;
}

// The serve command is another engineer's; until server/serve-command.ts is in the tree there is no server to start.
const serveMissing = existsSync(new URL('../server/serve-command.ts', import.meta.url)) ? false : 'server/serve-command.ts (mla-serve serve) is not in this checkout yet';

test('bench against mla-serve serve: no failures, usage-consistent tokens, TTFT ≤ E2EL, throughput = tokens / duration', { timeout: 600_000, skip: serveMissing }, async () => {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  let stderr = '';
  const child = spawn(
    process.execPath,
    ['bin/mla-serve.js', 'serve', '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '16MiB', '--model', '../shared/models/stories260K/stories260K.bin', '--name', MODEL],
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, LOG_LEVEL: 'warn' } },
  );
  child.stderr?.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
  try {
    await waitHealthy(url, child, () => stderr, 300_000);
    const tokensBefore = await generationTokens(url);

    let out = '';
    let err = '';
    const io: BenchIo = { stdout: (t) => void (out += t), stderr: (t) => void (err += t) };
    const code = await runBench(
      [
        '--url', url, '--model', MODEL, '--num-prompts', String(NUM_PROMPTS), '--request-rate', 'inf',
        '--input-len', String(INPUT_LEN), '--output-len', String(OUTPUT_LEN), '--ignore-eos', '--seed', '0',
        '--timeout', '90', '--scrape-interval', '250', '--json', '--no-progress',
      ],
      io,
    );
    assert.equal(code, 0, err);
    const report = JSON.parse(out) as BenchReport;
    assert.equal(report.runs.length, 1);
    const run = report.runs[0];
    assert.equal(run.failed, 0, `errors: ${run.errors.filter(Boolean).join(' | ')}`);
    assert.equal(run.completed, NUM_PROMPTS);

    // Tokens: usage says exactly what was asked (ignore_eos), and the server's own counter agrees
    // (the warm-up request adds one more OUTPUT_LEN).
    assert.deepEqual(run.output_lens, new Array(NUM_PROMPTS).fill(OUTPUT_LEN));
    assert.deepEqual(run.input_lens, new Array(NUM_PROMPTS).fill(INPUT_LEN));
    assert.equal(run.total_output_tokens, NUM_PROMPTS * OUTPUT_LEN);
    assert.equal(run.total_input_tokens, NUM_PROMPTS * INPUT_LEN);
    assert.equal((await generationTokens(url)) - tokensBefore, (NUM_PROMPTS + 1) * OUTPUT_LEN);

    // Latencies are consistent per request.
    const tpots: number[] = [];
    for (let i = 0; i < NUM_PROMPTS; i++) {
      assert.ok(run.ttfts[i] > 0 && run.ttfts[i] <= run.e2els[i], `request ${i}: TTFT ${run.ttfts[i]} s, E2EL ${run.e2els[i]} s`);
      // At most one gap per token after the first; together they fit between first and last chunk.
      assert.ok(run.itls[i].length >= 1 && run.itls[i].length <= OUTPUT_LEN - 1, `request ${i}: ${run.itls[i].length} gaps`);
      const gaps = run.itls[i].reduce((s, g) => s + g, 0);
      assert.ok(gaps <= run.e2els[i] - run.ttfts[i] + 1e-9);
      assert.ok(run.e2els[i] <= run.duration);
      tpots.push(((run.e2els[i] - run.ttfts[i]) / (OUTPUT_LEN - 1)) * 1000);
    }
    assert.ok(Math.abs(run.mean_tpot_ms - tpots.reduce((s, v) => s + v, 0) / NUM_PROMPTS) < 1e-6);
    assert.ok(run.median_ttft_ms <= run.p99_ttft_ms && run.p99_ttft_ms <= Math.max(...run.ttfts) * 1000 + 1e-6);

    // Throughputs are tokens (and requests) over the run's duration.
    assert.ok(Math.abs(run.output_throughput - run.total_output_tokens / run.duration) < 1e-9);
    assert.ok(Math.abs(run.total_token_throughput - (run.total_input_tokens + run.total_output_tokens) / run.duration) < 1e-9);
    assert.ok(Math.abs(run.request_throughput - NUM_PROMPTS / run.duration) < 1e-9);
    assert.equal(run.max_concurrent_requests, NUM_PROMPTS);

    // KV figures from the server's /metrics.
    assert.equal(run.attention, 'gqa');
    assert.equal(run.kv_cache_bytes_per_token, KV_BYTES_PER_TOKEN);
    assert.ok(run.kv_cache_capacity_bytes !== null && run.kv_cache_capacity_bytes <= 16 * 1024 * 1024);
    assert.equal(run.kv_cache_capacity_tokens, Math.floor((run.kv_cache_capacity_bytes as number) / KV_BYTES_PER_TOKEN));
    assert.ok(run.metrics_scrapes >= 2);
    assert.ok(run.peak_kv_cache_usage_perc !== null && run.peak_kv_cache_usage_perc >= 0 && run.peak_kv_cache_usage_perc <= 1);
    assert.equal(run.num_preemptions, 0); // 20 × 12 tokens in a pool of thousands
  } finally {
    await stopServer(child);
  }
});

// Two `mla-serve serve` replicas on one machine (loopback ports, stories260K on SwiftShader): drive each in turn and see
// its own /metrics move (running, waiting, KV usage, generation tokens) while the other's stay put — what the gateway's
// endpoint picker relies on when it picks a replica by its metrics.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { after, before, test } from 'node:test';
import { modelValue, parsePromText, type PromSample } from '../bench/prom-text.ts';
import { parseSseBody } from '../server/sse.ts';

const MODEL = 'stories260K';
const MAX_NUM_SEQS = 4;
const MAX_TOKENS = 12;

interface Replica {
  label: string;
  child: ChildProcess;
  base: string;
  stderr: string;
}

const replicas: Replica[] = [];

async function startReplica(label: string): Promise<Replica> {
  const args = ['bin/mla-serve.js', 'serve', '--model', '../shared/models/stories260K/stories260K.bin', '--name', MODEL, '--port', '0'];
  args.push('--kv-cache-memory', '1MiB', '--max-model-len', '256', '--max-num-seqs', String(MAX_NUM_SEQS), '--shutdown-timeout', '0');
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, MLA_SERVE_LOG_LEVEL: 'warn' } });
  const r: Replica = { label, child, base: '', stderr: '' };
  let stdout = '';
  child.stdout!.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
  child.stderr!.on('data', (c: Buffer) => (r.stderr += c.toString('utf8')));
  const deadline = Date.now() + 300_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`replica ${label} exited with ${child.exitCode}:\n${r.stderr.slice(-2000)}`);
    const m = /mla-serve listening on (http:\/\/[\d.]+:\d+)/.exec(stdout);
    if (m) {
      r.base = m[1];
      return r;
    }
    if (Date.now() > deadline) throw new Error(`replica ${label} did not start in 75 s:\n${r.stderr.slice(-2000)}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}

before(async () => {
  replicas.push(...(await Promise.all([startReplica('A'), startReplica('B')])));
});

after(async () => {
  await Promise.all(
    replicas.map(
      (r) =>
        new Promise<void>((resolve) => {
          if (r.child.exitCode !== null) return resolve();
          r.child.once('exit', () => resolve());
          r.child.kill('SIGTERM');
          setTimeout(() => r.child.kill('SIGKILL'), 10_000).unref();
        }),
    ),
  );
});

interface View {
  running: number;
  waiting: number;
  kvUsage: number;
  generated: number;
}

async function view(r: Replica): Promise<View> {
  const res = await fetch(`${r.base}/metrics`, { signal: AbortSignal.timeout(120_000) });
  assert.equal(res.status, 200);
  const samples: PromSample[] = parsePromText(await res.text());
  const get = (name: string) => {
    const v = modelValue(samples, name, MODEL);
    assert.ok(v !== undefined, `replica ${r.label}: no ${name}`);
    return v;
  };
  return {
    running: get('vllm:num_requests_running'),
    waiting: get('vllm:num_requests_waiting'),
    kvUsage: get('vllm:kv_cache_usage_perc'),
    generated: get('mla_serve_generation_tokens_total'),
  };
}

function drive(r: Replica, count: number): Promise<void>[] {
  return Array.from({ length: count }, async (_, i) => {
    const res = await fetch(`${r.base}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: `Once upon a time ${r.label}${i}`, max_tokens: MAX_TOKENS, ignore_eos: true, stream: true }),
      signal: AbortSignal.timeout(540_000),
    });
    assert.equal(res.status, 200);
    const chunks = parseSseBody(await res.text());
    assert.equal(chunks.at(-1), '[DONE]', `replica ${r.label} stream ${i}`);
  });
}

/** Scrapes `busy` until it shows `running` + `waiting`, checking at each scrape that `idle` stays at zero. */
async function watch(busy: Replica, idle: Replica, running: number, waiting: number, idleGenerated: number): Promise<View> {
  const t0 = Date.now();
  for (;;) {
    const [b, i] = await Promise.all([view(busy), view(idle)]);
    assert.deepEqual(i, { running: 0, waiting: 0, kvUsage: 0, generated: idleGenerated }, `replica ${idle.label} moved while only ${busy.label} was driven`);
    if (b.running === running && b.waiting === waiting) return b;
    assert.ok(Date.now() - t0 < 300_000, `replica ${busy.label} never showed ${running} running + ${waiting} waiting; last ${JSON.stringify(b)}`);
    await new Promise((res) => setTimeout(res, 20));
  }
}

test('two replicas on loopback: each one’s running/waiting/KV/generation metrics move with its own traffic only', { timeout: 600_000 }, async () => {
  const [a, b] = replicas;
  assert.notEqual(a.base, b.base);
  const a0 = await view(a);
  const b0 = await view(b);
  assert.deepEqual([a0.running, a0.waiting, b0.running, b0.waiting], [0, 0, 0, 0]);

  // Replica A: 6 streams, 4 run (max-num-seqs) and 2 wait; B stays idle throughout.
  const onA = drive(a, MAX_NUM_SEQS + 2);
  const aBusy = await watch(a, b, MAX_NUM_SEQS, 2, b0.generated);
  assert.ok(aBusy.kvUsage > 0);
  await Promise.all(onA);
  const a1 = await view(a);
  assert.deepEqual([a1.running, a1.waiting, a1.kvUsage], [0, 0, 0]);
  assert.equal(a1.generated - a0.generated, (MAX_NUM_SEQS + 2) * MAX_TOKENS);
  assert.equal((await view(b)).generated, b0.generated);

  // Replica B: 3 streams, all running; A stays idle.
  const onB = drive(b, 3);
  const bBusy = await watch(b, a, 3, 0, a1.generated);
  assert.ok(bBusy.kvUsage > 0);
  await Promise.all(onB);
  const b1 = await view(b);
  assert.deepEqual([b1.running, b1.waiting, b1.kvUsage], [0, 0, 0]);
  assert.equal(b1.generated - b0.generated, 3 * MAX_TOKENS);
  assert.equal((await view(a)).generated, a1.generated);
});

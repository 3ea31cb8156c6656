// `mla-serve serve` as a real process on stories260K (SwiftShader): the resolved configuration it prints (env + YAML file,
// API key redacted), the API-key matrix (missing, wrong, right) per route, one request log line per request, and the
// SIGTERM drain with streams in flight (none lost: each completes or gets a 503 error chunk before the deadline; new
// requests are refused; exit 0).
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { parseSseBody } from '../server/sse.ts';

const MODEL = '../shared/models/stories260K/stories260K.bin';
const KEY = 'sk-test-6f1c0e-drain';
const SHUTDOWN_TIMEOUT_S = 4;

let child: ChildProcess;
let base = '';
let stdout = '';
let stderr = '';
let exited: Promise<number | null>;
let dir = '';

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'mla-serve-ops-'));
  const config = join(dir, 'serve.yaml');
  // File < env < flag: the file's port and block size lose to env/flag, its max_num_seqs and max-queue stand.
  writeFileSync(config, ['port: 1', 'block_size: 64', 'max_num_seqs: 8', 'max-queue: 32', `shutdown-timeout: 999`].join('\n') + '\n');
  child = spawn(
    process.execPath,
    ['bin/mla-serve.js', 'serve', '--model', MODEL, '--name', 'stories260K', '--port', '0', '--kv-cache-memory', '1MiB', '--max-model-len', '256', '--config', config],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LOG_LEVEL: '', MLA_SERVE_API_KEY: KEY, MLA_SERVE_LOG_LEVEL: 'info', MLA_SERVE_BLOCK_SIZE: '16', MLA_SERVE_SHUTDOWN_TIMEOUT: String(SHUTDOWN_TIMEOUT_S) },
    },
  );
  exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  child.stdout!.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
  const deadline = Date.now() + 300_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`serve exited with ${child.exitCode}:\n${stderr.slice(-2000)}`);
    const m = /mla-serve listening on (http:\/\/[\d.]+:\d+)/.exec(stdout);
    if (m) {
      base = m[1];
      break;
    }
    if (Date.now() > deadline) throw new Error(`serve did not start in 60 s:\n${stderr.slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
});

after(() => {
  if (child && child.exitCode === null) child.kill('SIGKILL');
  if (dir) rmSync(dir, { recursive: true, force: true });
});

async function call(method: string, path: string, opts: { body?: unknown; key?: string | null; auth?: string; requestId?: string } = {}) {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (opts.auth !== undefined) headers.authorization = opts.auth;
  else if (opts.key) headers.authorization = `Bearer ${opts.key}`;
  if (opts.requestId) headers['x-request-id'] = opts.requestId;
  const res = await fetch(`${base}${path}`, { method, headers, body: opts.body === undefined ? undefined : JSON.stringify(opts.body), signal: AbortSignal.timeout(300_000) });
  const text = await res.text();
  return { status: res.status, headers: res.headers, text, json: () => JSON.parse(text) };
}

/** pino's JSON lines on stdout with msg 'request done'. */
function requestLogLines(): Array<Record<string, unknown>> {
  return stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => l.msg === 'request done');
}

test('serve prints the resolved configuration: each value with its source (flag > env > file > default), the API key redacted', () => {
  const line = (flag: string) => stderr.split('\n').find((l) => l.trimStart().startsWith(`${flag} `)) ?? '';
  assert.match(stderr, /configuration \(flags > environment > config file \S+serve\.yaml > defaults\)/);
  assert.match(line('port'), /^\s+port\s+0\s+\[flag --port\]$/);
  assert.match(line('block-size'), /16\s+\[env MLA_SERVE_BLOCK_SIZE\]$/);
  assert.match(line('max-num-seqs'), /8\s+\[file \S+serve\.yaml\]$/);
  assert.match(line('max-queue'), /32\s+\[file \S+serve\.yaml\]$/);
  assert.match(line('shutdown-timeout'), new RegExp(`${SHUTDOWN_TIMEOUT_S}\\s+\\[env MLA_SERVE_SHUTDOWN_TIMEOUT\\]$`));
  assert.match(line('host'), /127\.0\.0\.1\s+\[default\]$/);
  assert.match(line('api-key'), /<redacted>\s+\[env MLA_SERVE_API_KEY\]$/);
  assert.ok(!stderr.includes(KEY) && !stdout.includes(KEY), 'the API key must never be printed');
  assert.match(stdout, /auth: Bearer API key on every route but GET \/health and GET \/metrics/);
});

test('API key matrix: missing and wrong → 401 OpenAI error body on /v1/*, /tokenize, /detokenize; right → 200; /health and /metrics need none', async () => {
  const routes: Array<[string, string, unknown]> = [
    ['POST', '/v1/completions', { prompt: 'Once', max_tokens: 1 }],
    ['POST', '/v1/chat/completions', { messages: [{ role: 'user', content: 'Hi' }], max_tokens: 1 }],
    ['GET', '/v1/models', undefined],
    ['POST', '/tokenize', { prompt: 'Once upon' }],
    ['POST', '/detokenize', { tokens: [1, 403] }],
  ];
  for (const [method, path, body] of routes) {
    for (const [label, opts, status] of [
      ['missing', {}, 401],
      ['wrong', { key: `${KEY}x` }, 401],
      ['wrong, same length', { key: `${KEY.slice(0, -1)}y` }, 401],
      ['wrong scheme', { auth: `Basic ${Buffer.from(`u:${KEY}`).toString('base64')}` }, 401],
      ['right', { key: KEY }, 200],
    ] as const) {
      const r = await call(method, path, { ...opts, body });
      assert.equal(r.status, status, `${label} key on ${method} ${path}: ${r.text.slice(0, 300)}`);
      if (status === 401) {
        const err = r.json().error;
        assert.deepEqual(Object.keys(err).sort(), ['code', 'message', 'param', 'type']);
        assert.equal(err.type, 'invalid_request_error');
        assert.equal(err.code, 401);
        assert.equal(err.param, null);
        assert.match(err.message, label === 'missing' ? /didn't provide an API key.*Authorization: Bearer/ : /Incorrect API key/);
        assert.equal(r.headers.get('www-authenticate'), 'Bearer');
        assert.ok(!r.text.includes(KEY), 'the 401 body must not echo the key');
      }
    }
  }
  // Probes and scrapers carry no key.
  assert.equal((await call('GET', '/health')).status, 200);
  const metrics = await call('GET', '/metrics');
  assert.equal(metrics.status, 200);
  assert.match(metrics.text, /mla_serve_request_errors_total\{model_name="unknown",code="401"\} 20/);
  // Exempt means GET: a POST to /metrics is still checked.
  assert.equal((await call('POST', '/metrics', { body: {} })).status, 401);
});

test('one request log line per finished request: request id, model, prompt/completion tokens, finish reason, latency', async () => {
  const requestId = 'ops-log-check-1';
  const r = await call('POST', '/v1/completions', { key: KEY, requestId, body: { prompt: ['Once upon', 'The dog'], max_tokens: 3, n: 2, ignore_eos: true } });
  assert.equal(r.status, 200, r.text);
  const usage = r.json().usage;
  // The line is written when the response is done; give the pipe a moment.
  let line: Record<string, unknown> | undefined;
  for (let i = 0; i < 50 && !line; i++) {
    line = requestLogLines().find((l) => l.requestId === requestId);
    if (!line) await new Promise((res) => setTimeout(res, 20));
  }
  assert.ok(line, `no 'request done' line with requestId ${requestId} in:\n${stdout.slice(-2000)}`);
  assert.equal(line.model, 'stories260K');
  assert.equal(line.url, '/v1/completions');
  assert.equal(line.statusCode, 200);
  assert.equal(line.promptTokens, usage.prompt_tokens);
  assert.equal(line.completionTokens, 12); // 2 prompts × n 2 × 3 tokens
  assert.equal(line.completionTokens, usage.completion_tokens);
  assert.equal(line.finishReason, 'length,length,length,length');
  assert.equal(typeof line.ms, 'number');
  assert.equal(requestLogLines().filter((l) => l.requestId === requestId).length, 1);
});

interface StreamOutcome {
  label: string;
  chunks: unknown[];
  firstTokenAt: number;
  endedAt: number;
}

test('SIGTERM with streams in flight: short ones finish, long ones get a 503 error chunk at the deadline, new requests are refused, exit 0', { timeout: 400_000 }, async () => {
  // Short streams need a few steps after SIGTERM (they finish while draining); long ones cannot finish within the deadline
  // on SwiftShader (240 steps), so they are cancelled and told so.
  const specs = [
    ...Array.from({ length: 4 }, (_, i) => ({ label: `short${i}`, maxTokens: 6 })),
    ...Array.from({ length: 2 }, (_, i) => ({ label: `long${i}`, maxTokens: 240 })),
  ];
  let markFirst!: () => void;
  let firsts = 0;
  const allStarted = new Promise<void>((r) => (markFirst = r));
  const streams = specs.map(async ({ label, maxTokens }): Promise<StreamOutcome> => {
    const res = await fetch(`${base}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${KEY}`, 'x-request-id': `drain-${label}` },
      body: JSON.stringify({ prompt: 'Once upon a time', max_tokens: maxTokens, ignore_eos: true, stream: true }),
      signal: AbortSignal.timeout(380_000),
    });
    assert.equal(res.status, 200, `${label}: ${res.status}`);
    const decoder = new TextDecoder();
    let body = '';
    let firstTokenAt = 0;
    for await (const piece of res.body!) {
      body += decoder.decode(piece as Uint8Array, { stream: true });
      if (!firstTokenAt && body.includes('"text"')) {
        firstTokenAt = performance.now();
        if (++firsts === specs.length) markFirst();
      }
    }
    return { label, chunks: parseSseBody(body), firstTokenAt, endedAt: performance.now() };
  });
  await allStarted;
  const sigtermAt = performance.now();
  assert.ok(child.kill('SIGTERM'));

  // A new request while draining is refused with a retryable 503 (the long streams keep the server draining).
  await new Promise((r) => setTimeout(r, 300));
  const late = await call('POST', '/v1/completions', { key: KEY, body: { prompt: 'Once', max_tokens: 1 } });
  assert.equal(late.status, 503, late.text);
  assert.equal(late.json().error.code, 503);
  assert.match(late.json().error.message, /shutting down/);
  assert.equal(late.headers.get('retry-after'), '1');

  const outcomes = await Promise.all(streams);
  const code = await exited;
  const exitAt = performance.now();
  assert.equal(code, 0, `exit code ${code}:\n${stderr.slice(-1500)}`);

  const deadline = sigtermAt + SHUTDOWN_TIMEOUT_S * 1000;
  let completed = 0;
  let cut = 0;
  for (const o of outcomes) {
    // Every stream ends properly: [DONE] last, after either a finish_reason or an error object.
    assert.equal(o.chunks.at(-1), '[DONE]', `${o.label}: no [DONE]`);
    const last = o.chunks.at(-2) as { choices?: Array<{ finish_reason: string | null }>; error?: { code: number; message: string } };
    if (last.error) {
      cut++;
      assert.equal(last.error.code, 503, `${o.label}: ${JSON.stringify(last.error)}`);
      assert.match(last.error.message, /shut down before this request finished; retry it/);
      // Cut at the deadline, not before it (the drain waited), and promptly after it.
      assert.ok(o.endedAt >= deadline - 250, `${o.label} cut ${(deadline - o.endedAt).toFixed(0)} ms before the deadline`);
      assert.ok(o.endedAt <= deadline + 5000, `${o.label} ended ${(o.endedAt - deadline).toFixed(0)} ms after the deadline`);
    } else {
      completed++;
      assert.ok(last.choices?.[0]?.finish_reason === 'length', `${o.label}: last chunk ${JSON.stringify(last)}`);
      const tokens = o.chunks.filter((c) => typeof c === 'object' && (c as { choices: Array<{ text: string }> }).choices[0]?.text).length;
      assert.ok(tokens >= 1);
    }
  }
  // The short ones were running at SIGTERM and finished during the drain (their first token came before it).
  for (const o of outcomes.filter((x) => x.label.startsWith('short'))) {
    assert.ok(o.firstTokenAt < sigtermAt && o.endedAt > sigtermAt, `${o.label} did not span the SIGTERM`);
    assert.equal(o.chunks.some((c) => typeof c === 'object' && 'error' in (c as object)), false, `${o.label} was cut: ${JSON.stringify(o.chunks.at(-2))}`);
  }
  assert.equal(completed + cut, specs.length);
  assert.ok(cut >= 1, 'the 240-token streams should outlast the 4 s deadline on SwiftShader');
  assert.ok(exitAt <= deadline + 10_000, `exited ${(exitAt - deadline).toFixed(0)} ms after the deadline`);
  // Every drained request got its log line, the cut ones with finish reason abort.
  const lines = requestLogLines().filter((l) => String(l.requestId).startsWith('drain-'));
  assert.equal(lines.length, specs.length, JSON.stringify(lines));
  for (const o of outcomes) {
    const l = lines.find((x) => x.requestId === `drain-${o.label}`);
    const wasCut = (o.chunks.at(-2) as { error?: unknown }).error !== undefined;
    assert.equal(l?.finishReason, wasCut ? 'abort' : 'length', `${o.label}: ${JSON.stringify(l)}`);
  }
  assert.match(stderr, /shutting down: no new requests; running ones get up to 4 s to finish/);
});

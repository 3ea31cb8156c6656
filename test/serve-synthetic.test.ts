// `mla-serve serve --synthetic` over real HTTP (SwiftShader): the tiny-qwen2 pair (GQA and its MLA shape), one greedy
// completion each, checked token by token against the float64 reference forward of the same synthetic weights; the
// --step-trace file they leave.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { request } from 'undici';
import { BYTE_OFFSET, ByteTokenizer } from '../model/byte-tokenizer.ts';
import type { GqaConfig, MlaConfig } from '../model/config.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import { syntheticF16Model } from '../model/synthetic.ts';

const PAIR = ['tiny-qwen2', 'tiny-qwen2-mla'] as const;
const MAX_TOKENS = 4;
/** --max-num-batched-tokens of the traced server: its prompts (27 tokens) prefill in two steps. */
const STEP_TOKENS = 16;

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

async function call(url: string, body?: unknown): Promise<{ status: number; json: any }> {
  const res = await request(url, {
    method: body === undefined ? 'GET' : 'POST',
    headers: { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(300_000),
  });
  const text = await res.body.text();
  return { status: res.statusCode, json: text.startsWith('{') ? JSON.parse(text) : text };
}

function logSoftmax(v: Float64Array, i: number): number {
  let max = -Infinity;
  for (const x of v) max = Math.max(max, x);
  let sum = 0;
  for (const x of v) sum += Math.exp(x - max);
  return v[i] - max - Math.log(sum);
}

test('byte tokenizer: bytes round trip, specials decode to nothing, other ids are distinct words, unfinished UTF-8 held back', () => {
  const t = new ByteTokenizer(512, 1, 2);
  const ids = t.encode('héllo ✓');
  assert.deepEqual(ids.slice(0, 2), [BYTE_OFFSET + 0x68, BYTE_OFFSET + 0xc3]);
  assert.equal(t.decode([1, ...ids, 2]), 'héllo ✓');
  assert.equal(t.decode(ids.slice(0, -1)), 'héllo '); // ✓ is 3 bytes: two of them make nothing yet
  assert.ok(t.decodeForStreaming(ids.slice(0, -1)).endsWith('\uFFFD'));
  assert.equal(t.decode([300, 301]), ' wlo wlp');
  const pieces = new Set(Array.from({ length: 512 }, (_, i) => t.idToToken(i)));
  assert.equal(pieces.size, 512);
  // A vocabulary with less room than 256 bytes folds them (deterministic, lossy).
  assert.deepEqual(new ByteTokenizer(100, null, null).encode('\u00ff'), [BYTE_OFFSET + (0xc3 % 97), BYTE_OFFSET + (0xbf % 97)]);
});

test('serve --synthetic tiny-qwen2 --synthetic tiny-qwen2-mla: one greedy completion each over HTTP = the float64 reference; one trace line per step', { timeout: 600_000 }, async () => {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  let stderr = '';
  let stdout = '';
  const dir = mkdtempSync(join(tmpdir(), 'mla-serve-trace-'));
  const tracePath = join(dir, 'steps.jsonl');
  const prompts = new Map<string, number>();
  const args = ['bin/mla-serve.js', 'serve', '--port', String(port), '--kv-cache-memory', '1MiB', '--max-model-len', '128', '--step-trace', tracePath, '--max-num-batched-tokens', String(STEP_TOKENS)];
  for (const name of PAIR) args.push('--synthetic', name);
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LOG_LEVEL: 'warn' } });
  child.stdout!.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
  try {
    const deadline = Date.now() + 300_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`serve exited with ${child.exitCode}:\n${stderr.slice(-2000)}`);
      const ok = await call(`${url}/health`).then((r) => r.status === 200, () => false);
      if (ok) break;
      if (Date.now() > deadline) throw new Error(`serve not healthy after 60 s:\n${stderr.slice(-2000)}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    // The banner names each model with its KV layout: 2 layers × (2·2·64 | 128 + 32) values × 2 bytes per token.
    assert.match(stdout, /tiny-qwen2 +gqa .* at 1024 B\/token .*from synthetic:tiny-qwen2/);
    assert.match(stdout, /tiny-qwen2-mla +mla .* at 640 B\/token .*from synthetic:tiny-qwen2-mla/);
    const listed = await call(`${url}/v1/models`);
    assert.deepEqual(listed.json.data.map((m: { id: string }) => m.id).sort(), [...PAIR].sort());

    for (const name of PAIR) {
      const { config, weights } = syntheticF16Model(name, { seed: 0 });
      const tokenizer = new ByteTokenizer(config.vocabSize, config.bosId, config.eosId);
      const prompt = [config.bosId, ...tokenizer.encode('Once upon a synthetic time')];
      prompts.set(name, prompt.length);
      const res = await call(`${url}/v1/completions`, { model: name, prompt, max_tokens: MAX_TOKENS, temperature: 0, ignore_eos: true, logprobs: 0 });
      assert.equal(res.status, 200, JSON.stringify(res.json));
      const body = res.json;
      assert.equal(body.object, 'text_completion');
      assert.equal(body.model, name);
      assert.equal(body.usage.prompt_tokens, prompt.length);
      assert.equal(body.usage.completion_tokens, MAX_TOKENS);
      const choice = body.choices[0];
      assert.equal(choice.finish_reason, 'length');
      // Token pieces back to ids (every id has its own piece), then the text is their decode.
      const byPiece = new Map(Array.from({ length: config.vocabSize }, (_, i) => [tokenizer.idToToken(i), i] as const));
      const ids = (choice.logprobs.tokens as string[]).map((p) => byPiece.get(p)!);
      assert.equal(ids.length, MAX_TOKENS);
      assert.equal(choice.text, tokenizer.decode(ids));

      // Reference (float64, the exact f16 weight values): each served token is the reference's argmax up to the f16
      // KV cache's error (ε = 0.01 on logits of spread ~0.3), and its logprob agrees to 0.01.
      const ref = config.attention === 'gqa' ? new ReferenceGqa(config as GqaConfig, weights) : new ReferenceMla(config as MlaConfig, weights);
      let logits = ref.forward(prompt, { logits: 'last' })[0];
      ids.forEach((id, step) => {
        let best = 0;
        for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
        assert.ok(logits[id] >= logits[best] - 0.01, `${name} step ${step}: served id ${id} (logit ${logits[id]}), reference argmax ${best} (${logits[best]})`);
        const lp = choice.logprobs.token_logprobs[step] as number;
        assert.ok(Math.abs(lp - logSoftmax(logits, id)) < 0.01, `${name} step ${step}: logprob ${lp} vs reference ${logSoftmax(logits, id)}`);
        logits = ref.forward([id])[0];
      });
    }
    // The trace is complete once the server has exited: per model, the prompt in chunks of --max-num-batched-tokens,
    // then one decode row a step (the request's first token comes from the last prefill step).
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill('SIGTERM');
    await exited;
    const lines = readFileSync(tracePath, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    for (const name of PAIR) {
      const steps = lines.filter((l) => l.model === name);
      const n = prompts.get(name)!;
      assert.ok(n > STEP_TOKENS && n <= 2 * STEP_TOKENS, `prompt of ${n} tokens: two chunks`);
      assert.equal(steps.length, MAX_TOKENS + 1, `${name}: ${JSON.stringify(steps)}`);
      assert.deepEqual(
        steps.map((s) => [s.seqs, s.rows, s.promptRows]),
        [[1, STEP_TOKENS, STEP_TOKENS], [1, n - STEP_TOKENS, n - STEP_TOKENS], ...Array(MAX_TOKENS - 1).fill([1, 1, 0])],
      );
      for (const s of steps) {
        assert.ok(s.seconds > 0 && s.t > 0 && typeof s.pipelined === 'boolean', JSON.stringify(s));
        assert.ok(s.gpuSeconds === null || s.gpuSeconds > 0, JSON.stringify(s));
      }
    }
    assert.ok(lines.every((l, i) => i === 0 || l.t >= lines[i - 1].t), 'trace lines in time order');
  } finally {
    rmSync(dir, { recursive: true, force: true });
    if (child.exitCode === null) {
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
      await exited;
      clearTimeout(timer);
    }
  }
});

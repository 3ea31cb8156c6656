// The HTTP face over real engines on stories260K: the official openai client, SSE shapes, the bad-input matrix, /metrics, disconnects, 429, shutdown.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../server/app.ts';
import { METRIC_NAMES } from '../server/metrics.ts';
import { parseSseBody } from '../server/sse.ts';
import { testEngines, type TestEngines } from './server-engines.ts';

let served: TestEngines;
let app: FastifyInstance;
let base: string;
let client: OpenAI;
const GQA = 'stories260K';

before(async () => {
  served = await testEngines();
  app = buildApp({ engines: served.engines, bodyLimit: 1024 * 1024, limits: { maxN: 4 }, ownsEngines: false });
  base = await app.listen({ port: 0, host: '127.0.0.1' });
  client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
});

after(async () => {
  await app?.close();
  await served?.close();
});

async function post(path: string, body: unknown, headers: Record<string, string> = {}): Promise<{ status: number; headers: Headers; text: string; json: () => unknown }> {
  const res = await fetch(`${base}${path}`, {
    signal: AbortSignal.timeout(300_000),
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' || body instanceof Uint8Array ? body : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, text, json: () => JSON.parse(text) };
}

async function metricsText(): Promise<string> {
  const res = await fetch(`${base}/metrics`);
  assert.equal(res.status, 200);
  return res.text();
}

/** The value of one series, e.g. metricValue(text, 'mla_serve_kv_cache_blocks', {model_name: 'x', state: 'used'}). */
function metricValue(text: string, name: string, labels: Record<string, string>): number {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    const inner = line.slice(name.length + 1, line.lastIndexOf('}'));
    const got = Object.fromEntries([...inner.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    if (Object.entries(labels).every(([k, v]) => got[k] === v)) return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return Number.NaN;
}

/** `mla-serve generate --json` on a model's checkpoint: the CLI's greedy text for a prompt (CPU float64 reference for GQA; GPU for MLA, which the CPU runner lacks). */
async function cliGreedy(engine: TestEngines['engines'][number], prompt: string, maxTokens: number): Promise<string> {
  const source = served.sources[served.engines.indexOf(engine)];
  const args = ['bin/mla-serve.js', 'generate', '--model', source, '--prompt', prompt, '--max-tokens', String(maxTokens), '--temperature', '0', '--json'];
  if (engine.info.config.attention === 'gqa') args.push('--cpu');
  const { stdout } = await promisify(execFile)(process.execPath, args, { timeout: 600_000 });
  return (JSON.parse(stdout) as { text: string }).text;
}

/** vLLM-style fields the openai SDK does not type (it sends them as given). */
function vllmExtras(fields: { ignore_eos?: boolean }): object {
  return fields;
}

async function tokenCount(model: string, prompt: string): Promise<number> {
  const r = await post('/tokenize', { model, prompt });
  assert.equal(r.status, 200, r.text);
  return (r.json() as { count: number }).count;
}

test('GET /v1/models lists every model with max_model_len and its attention type', async () => {
  const list = await client.models.list();
  const cards = list.data as unknown as Array<{ id: string; object: string; max_model_len: number; attention: string }>;
  assert.deepEqual(
    cards.map((c) => [c.id, c.object, c.max_model_len, c.attention]),
    served.engines.map((e) => [e.info.name, 'model', e.info.maxModelLen, e.info.config.attention]),
  );
  assert.ok(cards.some((c) => c.attention === 'gqa'), 'no GQA model listed');
});

/** Reads an openai completions stream: text per choice index, the finish reasons, the usage chunk, the chunk count. */
async function drainCompletionStream(stream: AsyncIterable<OpenAI.Completion>) {
  const texts: string[] = [];
  const finishes: Array<string | null> = [];
  let usage: OpenAI.CompletionUsage | null | undefined = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    if (chunk.choices.length === 0) usage = chunk.usage;
    for (const c of chunk.choices) {
      texts[c.index] = (texts[c.index] ?? '') + c.text;
      if (c.finish_reason) finishes[c.index] = c.finish_reason;
    }
  }
  return { texts, finishes, usage, chunks };
}

// SwiftShader steps are slow: requests that do not depend on each other run at once and share steps (the engine batches them).

test('completions through the openai client: greedy text equal to the generate CLI, usage that adds up, streamed text equal to the JSON one', async () => {
  const prompt = 'Once upon a time';
  await Promise.all(
    served.engines.map(async (e) => {
      const model = e.info.name;
      const [cli, promptTokens, full, streamed] = await Promise.all([
        cliGreedy(e, prompt, 6),
        tokenCount(model, prompt),
        client.completions.create({ model, prompt, max_tokens: 6, temperature: 0 }),
        client.completions.create({ model, prompt, max_tokens: 6, temperature: 0, stream: true, stream_options: { include_usage: true } }).then(drainCompletionStream),
      ]);
      assert.equal(full.object, 'text_completion');
      assert.equal(full.model, model);
      assert.equal(full.choices.length, 1);
      assert.ok(full.choices[0].text.length > 0, `${model}: empty completion`);
      assert.equal(full.choices[0].text, cli, `${model}: temperature 0 over HTTP differs from the generate CLI`);
      const usage = full.usage!;
      assert.equal(usage.prompt_tokens, promptTokens);
      if (full.choices[0].finish_reason === 'length') assert.equal(usage.completion_tokens, 6);
      else assert.equal(full.choices[0].finish_reason, 'stop');
      assert.equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);

      assert.ok(streamed.chunks >= 4, `${model}: expected a chunk per token, got ${streamed.chunks}`);
      assert.equal(streamed.texts[0], full.choices[0].text, `${model}: streamed text differs from the JSON response`);
      assert.equal(streamed.finishes[0], full.choices[0].finish_reason);
      assert.deepEqual(streamed.usage, usage);
    }),
  );
});

test('raw SSE framing: data lines, one id, a finish chunk, then a usage chunk with empty choices, then [DONE]', async () => {
  const [r, promptTokens] = await Promise.all([
    post('/v1/completions', { model: GQA, prompt: 'Lily', max_tokens: 4, temperature: 0, stream: true, stream_options: { include_usage: true }, ignore_eos: true }, { 'x-request-id': 'gateway-req-42' }),
    tokenCount(GQA, 'Lily'),
  ]);
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type') ?? '', /^text\/event-stream/);
  assert.equal(r.headers.get('x-request-id'), 'gateway-req-42', 'the caller\'s x-request-id is not echoed');
  assert.ok(r.text.endsWith('data: [DONE]\n\n'), 'the stream does not end with [DONE]');
  assert.ok(r.text.split('\n\n').every((block) => block === '' || block.startsWith('data: ')), 'an event is not a data: line');
  const events = parseSseBody(r.text) as Array<Record<string, unknown> | string>;
  assert.equal(events.at(-1), '[DONE]');
  const chunks = events.slice(0, -1) as Array<{ id: string; object: string; choices: Array<{ index: number; text: string; finish_reason: string | null }>; usage: unknown }>;
  assert.equal(new Set(chunks.map((c) => c.id)).size, 1);
  assert.equal(chunks[0].id, 'cmpl-gateway-req-42');
  assert.ok(chunks.every((c) => c.object === 'text_completion'), 'a chunk is not a text_completion');
  const usageChunk = chunks.at(-1)!;
  assert.deepEqual(usageChunk.choices, []);
  const finishChunk = chunks.at(-2)!;
  assert.deepEqual(finishChunk.choices.map((c) => [c.index, c.text, c.finish_reason]), [[0, '', 'length']]);
  assert.ok(chunks.slice(0, -2).every((c) => c.choices[0].finish_reason === null && c.usage === null), 'a token chunk carries finish_reason or usage');
  const usage = usageChunk.usage as { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  assert.deepEqual([usage.prompt_tokens, usage.completion_tokens, usage.total_tokens], [promptTokens, 4, promptTokens + 4]);
});

test('chat through the openai client: template applied, streamed deltas equal the JSON message, usage adds up, cached prompt tokens reported', async () => {
  const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Tell me a story about a cat.' }];
  await Promise.all(
    served.engines.map(async (e) => {
      const model = e.info.name;
      // The default template for a model without one: a transcript ending in "Assistant:".
      const rendered = await post('/detokenize', { model, tokens: ((await post('/tokenize', { model, messages })).json() as { tokens: number[] }).tokens });
      assert.match((rendered.json() as { prompt: string }).prompt, /User: Tell me a story about a cat\.\nAssistant:$/);
      const promptTokens = ((await post('/tokenize', { model, messages })).json() as { count: number }).count;

      const [full, stream] = await Promise.all([
        client.chat.completions.create({ model, messages, max_tokens: 4, temperature: 0 }),
        client.chat.completions.create({ model, messages, max_tokens: 4, temperature: 0, stream: true, stream_options: { include_usage: true } }),
      ]);
      assert.equal(full.object, 'chat.completion');
      assert.equal(full.choices[0].message.role, 'assistant');
      assert.ok((full.choices[0].message.content ?? '').length > 0, `${model}: empty chat message`);
      assert.equal(full.usage!.prompt_tokens, promptTokens);
      assert.equal(full.usage!.total_tokens, full.usage!.prompt_tokens + full.usage!.completion_tokens);

      let content = '';
      let role: string | undefined;
      let finish: string | null = null;
      let usage: OpenAI.CompletionUsage | null | undefined;
      for await (const chunk of stream) {
        assert.equal(chunk.object, 'chat.completion.chunk');
        if (chunk.choices.length === 0) usage = chunk.usage;
        for (const c of chunk.choices) {
          role ??= c.delta.role;
          content += c.delta.content ?? '';
          finish ??= c.finish_reason;
        }
      }
      assert.equal(role, 'assistant');
      assert.equal(content, full.choices[0].message.content);
      assert.equal(finish, full.choices[0].finish_reason);
      const strip = (u: OpenAI.CompletionUsage) => [u.prompt_tokens, u.completion_tokens, u.total_tokens];
      assert.deepEqual(strip(usage!), strip(full.usage!));

      // The same prompt again: its full blocks come from the prefix cache, and usage says so.
      const again = await client.chat.completions.create({ model, messages, max_tokens: 1, temperature: 0 });
      const blockSize = e.stats().kv.blockSize;
      assert.equal(again.usage!.prompt_tokens_details!.cached_tokens, Math.floor((promptTokens - 1) / blockSize) * blockSize, `${model}: cached prompt tokens`);
    }),
  );
});

test('same seed → same text; n and several prompts give indexed choices; usage counts each prompt once', async () => {
  const seeded = { model: GQA, prompt: 'The dog', max_tokens: 4, temperature: 1, seed: 1234 };
  const [a, b, r, single, prompts] = await Promise.all([
    client.completions.create(seeded),
    client.completions.create(seeded),
    client.completions.create({ model: GQA, prompt: ['The dog', 'A bird'], n: 2, max_tokens: 4, temperature: 0.8, seed: 7, ...vllmExtras({ ignore_eos: true }) }),
    client.completions.create({ model: GQA, prompt: 'A bird', max_tokens: 4, temperature: 0.8, seed: 7, ...vllmExtras({ ignore_eos: true }) }),
    Promise.all([tokenCount(GQA, 'The dog'), tokenCount(GQA, 'A bird')]),
  ]);
  assert.equal(a.choices[0].text, b.choices[0].text);
  assert.deepEqual(
    r.choices.map((c) => c.index),
    [0, 1, 2, 3],
  );
  assert.equal(r.usage!.prompt_tokens, prompts[0] + prompts[1]);
  assert.equal(r.usage!.completion_tokens, 16); // 2 prompts × n 2 × 4 tokens (ignore_eos)
  // Choice j of a prompt is seeded seed + j: the first choice of 'A bird' equals an n=1 request with the same seed.
  assert.equal(r.choices[2].text, single.choices[0].text);
});

test('echo and legacy logprobs: prompt text first; logprobs in the {tokens, token_logprobs, top_logprobs, text_offset} shape', async () => {
  const prompt = 'Once upon a time';
  const [echo, lp, chat] = await Promise.all([
    client.completions.create({ model: GQA, prompt, max_tokens: 4, temperature: 0, echo: true }),
    client.completions.create({ model: GQA, prompt, max_tokens: 4, temperature: 0, logprobs: 3 }),
    client.chat.completions.create({ model: GQA, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 3, temperature: 0, logprobs: true, top_logprobs: 2 }),
  ]);
  assert.equal(echo.choices[0].text, prompt + lp.choices[0].text);

  const l = lp.choices[0].logprobs!;
  assert.deepEqual([l.tokens!.length, l.token_logprobs!.length, l.top_logprobs!.length, l.text_offset!.length], [4, 4, 4, 4]);
  assert.equal(l.text_offset![0], 0);
  for (let i = 0; i < 4; i++) {
    const top = l.top_logprobs![i] as Record<string, number>;
    assert.equal(Object.keys(top).length, 3);
    // Greedy: the chosen token is the most likely one, and logprobs are ≤ 0.
    assert.ok(l.token_logprobs![i]! <= 0, `logprob ${l.token_logprobs![i]} > 0`);
    assert.ok(Math.abs(Math.max(...Object.values(top)) - l.token_logprobs![i]!) < 1e-6, `token ${i}: greedy pick is not the top logprob`);
    if (i > 0) assert.equal(l.text_offset![i], l.text_offset![i - 1] + l.tokens![i - 1].length);
  }

  const content = chat.choices[0].logprobs!.content!;
  assert.equal(content.length, chat.usage!.completion_tokens);
  for (const c of content) {
    assert.equal(c.top_logprobs.length, 2);
    assert.deepEqual(c.bytes, [...Buffer.from(c.token, 'utf8')]);
    assert.ok(Math.abs(c.top_logprobs[0].logprob - c.logprob) < 1e-6, `greedy token ${c.token} is not the top logprob`);
  }
});

test('/tokenize and /detokenize round-trip', async () => {
  const t = await post('/tokenize', { model: GQA, prompt: 'Once upon a time' });
  const body = t.json() as { count: number; max_model_len: number; tokens: number[] };
  assert.equal(body.count, body.tokens.length);
  assert.equal(body.tokens[0], served.engines[0].info.tokenizer.bosId);
  assert.equal(body.max_model_len, served.engines[0].info.maxModelLen);
  const d = await post('/detokenize', { model: GQA, tokens: body.tokens.slice(1) });
  assert.deepEqual(d.json(), { prompt: 'Once upon a time' });
});

test('bad input: each gets its status and an OpenAI error body, and the server stays healthy', async () => {
  const maxLen = served.engines[0].info.maxModelLen;
  const long = Array.from({ length: maxLen + 5 }, () => 300);
  const cases: Array<{ name: string; path?: string; body: unknown; headers?: Record<string, string>; status: number; param?: string | null; message: RegExp }> = [
    { name: 'malformed JSON', body: '{"model": "stories260K", "prompt": ', status: 400, param: null, message: /not valid JSON/ },
    { name: 'non-UTF-8 bytes', body: Buffer.from([...Buffer.from('{"prompt": "Once '), 0xff, 0xfe, ...Buffer.from('"}')]), status: 400, param: null, message: /not valid UTF-8/ },
    { name: 'body not an object', body: '[1, 2]', status: 400, param: null, message: /must be a JSON object; got an array/ },
    { name: 'wrong type', body: { model: GQA, prompt: 'x', max_tokens: 'ten' }, status: 400, param: 'max_tokens', message: /max_tokens must be a number; got string "ten"/ },
    { name: 'unknown model', body: { model: 'gpt-17', prompt: 'x' }, status: 404, param: 'model', message: new RegExp(`'gpt-17' does not exist.*available models: ${GQA}`) },
    { name: 'max_tokens 0', body: { model: GQA, prompt: 'x', max_tokens: 0 }, status: 400, param: 'max_tokens', message: /max_tokens must be >= 1; got 0/ },
    { name: 'max_tokens negative', body: { model: GQA, prompt: 'x', max_tokens: -3 }, status: 400, param: 'max_tokens', message: /max_tokens must be >= 1; got -3/ },
    {
      name: 'max_tokens beyond context',
      body: { model: GQA, prompt: 'Once upon a time', max_tokens: maxLen },
      status: 400,
      param: 'max_tokens',
      message: new RegExp(`maximum context length is ${maxLen} tokens, but you requested ${maxLen + 5} tokens \\(5 in the prompt \\+ ${maxLen} for max_tokens\\)`),
    },
    { name: 'prompt longer than context', body: { model: GQA, prompt: long }, status: 400, param: 'prompt', message: new RegExp(`prompt is ${maxLen + 5} tokens, but this model's maximum context length is ${maxLen}`) },
    { name: 'empty prompt', body: { model: GQA, prompt: '' }, status: 400, param: 'prompt', message: /prompt must not be empty/ },
    { name: 'token id outside the vocabulary', body: { model: GQA, prompt: [1, 99999] }, status: 400, param: 'prompt', message: /prompt\[1\] = 99999 is not a token id of this model \(vocabulary 0\.\.511\)/ },
    { name: 'n too large', body: { model: GQA, prompt: 'x', n: 50 }, status: 400, param: 'n', message: /n must be <= 4; got 50/ },
    { name: 'negative temperature', body: { model: GQA, prompt: 'x', temperature: -1 }, status: 400, param: 'temperature', message: /temperature must be >= 0; got -1/ },
    { name: 'top_p 0', body: { model: GQA, prompt: 'x', top_p: 0 }, status: 400, param: 'top_p', message: /top_p must be > 0; got 0/ },
    { name: 'top_p above 1', body: { model: GQA, prompt: 'x', top_p: 1.2 }, status: 400, param: 'top_p', message: /top_p must be <= 1; got 1.2/ },
    { name: 'logit_bias key not a token id', body: { model: GQA, prompt: 'x', logit_bias: { dog: 10 } }, status: 400, param: 'logit_bias', message: /logit_bias keys must be token ids.*"dog"/ },
    { name: 'logit_bias key outside the vocabulary', body: { model: GQA, prompt: 'x', logit_bias: { '100000': 10 } }, status: 400, param: 'logit_bias', message: /logit_bias key "100000" is not a token id of this model \(vocabulary 0\.\.511\)/ },
    { name: 'chat without messages', path: '/v1/chat/completions', body: { model: GQA, messages: [] }, status: 400, param: 'messages', message: /messages must have at least 1 items; got 0/ },
    { name: 'chat image part', path: '/v1/chat/completions', body: { model: GQA, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] }, status: 400, message: /only text content parts/ },
    { name: 'oversized body', body: JSON.stringify({ model: GQA, prompt: 'a'.repeat(10 * 1024 * 1024) }), status: 413, param: null, message: /larger than the limit of 1048576 bytes/ },
    { name: 'unknown route', path: '/v1/embeddings', body: { input: 'x' }, status: 404, param: null, message: /no route for POST \/v1\/embeddings/ },
  ];
  const metricsBefore = await metricsText();
  for (const c of cases) {
    const r = await post(c.path ?? '/v1/completions', c.body, c.headers);
    assert.equal(r.status, c.status, `${c.name}: ${r.text}`);
    const body = r.json() as { error: { message: string; type: string; param: string | null; code: number } };
    assert.deepEqual(Object.keys(body), ['error'], c.name);
    assert.deepEqual(Object.keys(body.error).sort(), ['code', 'message', 'param', 'type'], c.name);
    assert.equal(body.error.code, c.status, c.name);
    assert.match(r.headers.get('x-request-id') ?? '', /^[0-9a-f]{24}$/, `${c.name}: no generated x-request-id`);
    assert.equal(typeof body.error.type, 'string', c.name);
    assert.match(body.error.message, c.message, c.name);
    if (c.param !== undefined) assert.equal(body.error.param, c.param, c.name);
    assert.doesNotMatch(r.text, /\.ts:\d+|at [\w.]+ \(/, `${c.name}: a stack trace leaked`);
  }

  // Unknown fields are ignored, like OpenAI.
  const ok = await post('/v1/completions', { model: GQA, prompt: 'Once', max_tokens: 1, temperature: 0, frobnicate: true, response_format: { type: 'text' } });
  assert.equal(ok.status, 200, ok.text);
  assert.equal((ok.json() as { choices: unknown[] }).choices.length, 1);

  // The openai client surfaces the same errors as typed exceptions.
  await assert.rejects(client.completions.create({ model: 'nope', prompt: 'x' }), (e: unknown) => e instanceof OpenAI.NotFoundError && /does not exist/.test(e.message));
  await assert.rejects(client.completions.create({ model: GQA, prompt: 'x', temperature: -2 }), (e: unknown) => e instanceof OpenAI.BadRequestError);

  // Still healthy, still serving.
  const health = await fetch(`${base}/health`);
  assert.equal(health.status, 200);
  assert.deepEqual(await health.json(), { status: 'ok', models: served.engines.map((e) => e.info.name) });
  const after = await client.completions.create({ model: GQA, prompt: 'Once', max_tokens: 3, temperature: 0 });

  assert.equal(after.usage!.completion_tokens, 3);
  const m = await metricsText();
  // Errors are counted per model once the body names a served one, under model_name="unknown" before that.
  const errors = (text: string, model: string, code: string) => metricValue(text, 'mla_serve_request_errors_total', { model_name: model, code }) || 0;
  const gqa400 = cases.filter((c) => c.status === 400 && (c.body as { model?: string }).model === GQA).length + 1; // + the openai client's temperature -2
  assert.equal(errors(m, GQA, '400') - errors(metricsBefore, GQA, '400'), gqa400);
  assert.equal(errors(m, 'unknown', '404') - errors(metricsBefore, 'unknown', '404'), 3); // gpt-17, /v1/embeddings, 'nope'

  assert.equal(errors(m, 'unknown', '413') - errors(metricsBefore, 'unknown', '413'), 1);
});

test('/metrics: every name of api-and-metrics.md with the model label, figures consistent with the engine', async () => {
  const text = await metricsText();
  for (const e of served.engines) {
    const model = e.info.name;
    for (const name of METRIC_NAMES) {
      const series = text.split('\n').filter((l) => (l.startsWith(`${name}{`) || l.startsWith(`${name}_bucket{`) || l.startsWith(`${name}_count{`)) && l.includes(`model_name="${model}"`));
      assert.ok(series.length > 0, `${name} has no series for ${model}`);
    }
    const s = e.stats();
    assert.equal(metricValue(text, 'mla_serve_kv_cache_bytes_per_token', { model_name: model }), s.kv.bytesPerToken);
    assert.equal(metricValue(text, 'mla_serve_kv_cache_capacity_bytes', { model_name: model }), s.kv.capacityBytes);
    assert.equal(metricValue(text, 'vllm:cache_config_info', { model_name: model, block_size: String(s.kv.blockSize), num_gpu_blocks: String(s.kv.numBlocks), attention: e.info.config.attention }), 1);
    const blocks = ['free', 'used', 'cached'].map((state) => metricValue(text, 'mla_serve_kv_cache_blocks', { model_name: model, state }));
    assert.equal(blocks[0] + blocks[1] + blocks[2], s.kv.numBlocks);
    assert.equal(metricValue(text, 'mla_serve_generation_tokens_total', { model_name: model }), s.generationTokens);
  }
  // vLLM's TTFT buckets, not prom-client's defaults.
  assert.match(text, /mla_serve_time_to_first_token_seconds_bucket\{le="2560",model_name="stories260K"\}/);
  assert.match(text, /mla_serve_e2e_request_latency_seconds_bucket\{le="7680",model_name="stories260K"\}/);
  assert.ok(metricValue(text, 'mla_serve_request_success_total', { model_name: GQA, finish_reason: 'length' }) > 0, 'no finished request counted');
  assert.ok(metricValue(text, 'mla_serve_batch_size_count', { model_name: GQA }) > 0, 'no engine step observed');

  // Cheap enough for a 50 ms scrape interval.
  const t0 = performance.now();
  for (let i = 0; i < 50; i++) await metricsText();
  const perScrape = (performance.now() - t0) / 50;
  assert.ok(perScrape < 20, `a scrape takes ${perScrape.toFixed(1)} ms`);
});

test('a client that disconnects mid-stream cancels its request: KV usage rises during the stream and falls to zero, abort is counted', async () => {
  const before = await metricsText();
  const aborted0 = metricValue(before, 'mla_serve_request_success_total', { model_name: GQA, finish_reason: 'abort' });
  const ctl = new AbortController();
  const res = await fetch(`${base}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: GQA, prompt: 'Once upon a time', max_tokens: 200, temperature: 0, stream: true, ignore_eos: true }),
    signal: ctl.signal,
  });
  const reader = res.body!.getReader();
  const first = await reader.read();
  assert.match(new TextDecoder().decode(first.value), /^data: \{/);
  // Under load the pool is in use: the gateway gauge rises above zero with the blocks the stream holds...
  const during = await metricsText();
  const usedDuring = metricValue(during, 'mla_serve_kv_cache_blocks', { model_name: GQA, state: 'used' });
  assert.ok(usedDuring >= 1, `no KV block in use during a stream (${usedDuring})`);
  assert.equal(metricValue(during, 'vllm:kv_cache_usage_perc', { model_name: GQA }), usedDuring / served.engines[0].stats().kv.numBlocks);
  assert.equal(metricValue(during, 'vllm:num_requests_running', { model_name: GQA }), 1);
  ctl.abort();
  await reader.cancel().catch(() => {});
  const deadline = performance.now() + 60_000;
  let m = '';
  for (;;) {
    m = await metricsText();
    if (metricValue(m, 'mla_serve_kv_cache_blocks', { model_name: GQA, state: 'used' }) === 0 && metricValue(m, 'vllm:num_requests_running', { model_name: GQA }) === 0) break;
    assert.ok(performance.now() < deadline, 'blocks still held 60 s after the client left');
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(metricValue(m, 'mla_serve_request_success_total', { model_name: GQA, finish_reason: 'abort' }), aborted0 + 1);
  // ...and falls back to zero once the client is gone.
  assert.equal(metricValue(m, 'vllm:kv_cache_usage_perc', { model_name: GQA }), 0);
  assert.equal(metricValue(m, 'mla_serve_kv_cache_used_bytes', { model_name: GQA }), 0);
  const generated = metricValue(m, 'mla_serve_generation_tokens_total', { model_name: GQA }) - metricValue(before, 'mla_serve_generation_tokens_total', { model_name: GQA });
  assert.ok(generated < 200, `the cancelled request still generated ${generated} of its 200 tokens`);
});

test('a client that gives up on a non-streamed request cancels it too: blocks freed, counted as 499', async () => {
  const errors499 = (t: string) => metricValue(t, 'mla_serve_request_errors_total', { model_name: GQA, code: '499' }) || 0;
  const before = await metricsText();
  const ctl = new AbortController();
  const pending = fetch(`${base}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: GQA, prompt: 'Once upon a time', max_tokens: 200, temperature: 0, ignore_eos: true }),
    signal: ctl.signal,
  }).catch((e: Error) => e);
  const deadline = performance.now() + 60_000;
  const waitFor = async (what: string, ok: (m: string) => boolean): Promise<string> => {
    for (;;) {
      const m = await metricsText();
      if (ok(m)) return m;
      assert.ok(performance.now() < deadline, `timed out waiting until ${what}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  await waitFor('the request runs', (m) => metricValue(m, 'vllm:num_requests_running', { model_name: GQA }) === 1);
  ctl.abort();
  assert.equal(((await pending) as Error).name, 'AbortError');
  const m = await waitFor('its blocks are free', (t) => metricValue(t, 'mla_serve_kv_cache_blocks', { model_name: GQA, state: 'used' }) === 0 && errors499(t) > errors499(before));
  assert.equal(errors499(m), errors499(before) + 1);
  assert.equal(metricValue(m, 'vllm:num_requests_running', { model_name: GQA }), 0);
});

test('a full queue answers 429 with Retry-After; shutdown lets a running stream finish, answers 503, then closes', async () => {
  // Its own engine with one running slot and one waiting slot; the app owns it, so app.close() drains and frees it.
  const small = await testEngines({ maxQueue: 1, maxNumSeqs: 1, gqaOnly: true });
  const own = buildApp({ engines: small.engines, shutdownDeadlineMs: 60_000 });
  const url = await own.listen({ port: 0, host: '127.0.0.1' });
  const send = (body: unknown) =>
    fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }).then(async (r) => ({
      status: r.status,
      retryAfter: r.headers.get('retry-after'),
      body: (await r.json()) as { error?: { code: number; message: string; type: string }; choices?: Array<{ text: string }> },
    }));
  try {
    const results = await Promise.all(Array.from({ length: 5 }, () => send({ prompt: 'Once', max_tokens: 2, temperature: 0 })));
    const limited = results.filter((r) => r.status === 429);
    const done = results.filter((r) => r.status === 200);
    assert.ok(limited.length >= 1 && done.length >= 2, `statuses ${results.map((r) => r.status).join(',')}`);
    assert.equal(limited.length + done.length, results.length);
    for (const r of limited) {
      assert.equal(r.retryAfter, '1');
      assert.deepEqual(Object.keys(r.body.error!).sort(), ['code', 'message', 'param', 'type']);
      assert.equal(r.body.error!.code, 429);
      assert.match(r.body.error!.message, /the waiting queue is full \(1 of 1 requests\); retry later/);
    }
    // Greedy: every admitted request wrote the same text.
    assert.equal(new Set(done.map((r) => r.body.choices![0].text)).size, 1);

    // Shutdown while a stream runs: it still gets all its tokens, new requests get 503, then the app closes.
    const res = await fetch(`${url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'Once upon a time', max_tokens: 4, temperature: 0, stream: true, ignore_eos: true }),
    });
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    let text = decoder.decode((await reader.read()).value, { stream: true });
    const closing = own.close();
    await new Promise((r) => setTimeout(r, 50));
    const late = await send({ prompt: 'x', max_tokens: 1 }).catch(() => null); // null: the listener is already closed
    if (late) {
      assert.equal(late.status, 503);
      assert.match(late.body.error!.message, /shutting down/);
      assert.equal(late.retryAfter, '1');
    }
    for (;;) {
      const { done: end, value } = await reader.read();
      if (end) break;
      text += decoder.decode(value, { stream: true });
    }
    await closing;
    const events = parseSseBody(text);
    assert.equal(events.at(-1), '[DONE]');
    const chunks = events.slice(0, -1) as Array<{ choices: Array<{ finish_reason: string | null }> }>;
    assert.equal(chunks.at(-1)!.choices[0].finish_reason, 'length');
    assert.equal(chunks.length, 5, 'four token chunks and the finish chunk'); // each stories260K token here is printable text
    assert.equal(small.engines[0].healthy(), true);
  } finally {
    await own.close();
    await small.close();
  }
});

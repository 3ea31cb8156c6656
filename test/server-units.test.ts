// Server pieces that need no engine: body schemas and their 400 messages, error mapping, SSE framing, KV metric arithmetic.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { InvalidRequestError } from '../engine/engine.ts';
import { QueueFullError } from '../engine/types.ts';
import type { EngineStats } from '../engine/types.ts';
import { ApiError, mapError } from '../server/errors.ts';
import { kvBlockStates, kvUsageFraction } from '../server/metrics.ts';
import { chatSchema, completionSchema, parseBody } from '../server/schemas.ts';
import { parseByteSize, parseServeArgs } from '../server/serve-options.ts';
import { parseSseBody, SSE_DONE, sseEvent, sseStream } from '../server/sse.ts';

const completion = completionSchema({ maxN: 8, maxLogprobs: 5 });
const chat = chatSchema({ maxN: 8, maxLogprobs: 5 });

function rejects(schema: Parameters<typeof parseBody>[0], body: unknown): ApiError {
  try {
    parseBody(schema, body);
  } catch (err) {
    assert.ok(err instanceof ApiError, `expected an ApiError, got ${err}`);
    assert.equal(err.status, 400);
    return err;
  }
  assert.fail(`accepted ${JSON.stringify(body)}`);
}

test('prompt: the four OpenAI forms normalize to texts or token-id lists', () => {
  assert.deepEqual(parseBody(completion, { prompt: 'Once' }).prompt, { kind: 'text', texts: ['Once'] });
  assert.deepEqual(parseBody(completion, { prompt: ['a', 'b'] }).prompt, { kind: 'text', texts: ['a', 'b'] });
  assert.deepEqual(parseBody(completion, { prompt: [1, 2, 3] }).prompt, { kind: 'ids', ids: [[1, 2, 3]] });
  assert.deepEqual(parseBody(completion, { prompt: [[1], [2, 3]] }).prompt, { kind: 'ids', ids: [[1], [2, 3]] });
});

test('bad completion bodies: 400 naming the parameter and the offending value', () => {
  const cases: Array<[unknown, string | null, RegExp]> = [
    [{ prompt: '' }, null, /prompt must not be empty/],
    [{ prompt: [] }, null, /prompt must not be empty/],
    [{ prompt: [[1], []] }, null, /prompt\[1\] must not be empty/],
    [{ prompt: [1, -2] }, null, /prompt\[1\] must be a token id.*-2/],
    [{ prompt: [1, 'a'] }, null, /array mixing number and string/],
    [{ prompt: 5 }, null, /prompt must be a string.*got number 5/],
    [{}, null, /prompt must be a string.*got nothing/],
    [{ prompt: 'x', max_tokens: 0 }, 'max_tokens', /max_tokens must be >= 1; got 0/],
    [{ prompt: 'x', max_tokens: -5 }, 'max_tokens', /max_tokens must be >= 1; got -5/],
    [{ prompt: 'x', max_tokens: 'ten' }, 'max_tokens', /max_tokens must be a number; got string "ten"/],
    [{ prompt: 'x', max_tokens: 2.5 }, 'max_tokens', /max_tokens must be an integer; got 2.5/],
    [{ prompt: 'x', temperature: -0.5 }, 'temperature', /temperature must be >= 0; got -0.5/],
    [{ prompt: 'x', top_p: 0 }, 'top_p', /top_p must be > 0; got 0/],
    [{ prompt: 'x', top_p: 1.5 }, 'top_p', /top_p must be <= 1; got 1.5/],
    [{ prompt: 'x', n: 9 }, 'n', /n must be <= 8; got 9/],
    [{ prompt: 'x', logprobs: 6 }, 'logprobs', /logprobs must be <= 5; got 6/],
    [{ prompt: 'x', logit_bias: { hello: 5 } }, 'logit_bias', /logit_bias keys must be token ids.*"hello"/],
    [{ prompt: 'x', logit_bias: { '7': 500 } }, 'logit_bias', /logit_bias.7 must be <= 100; got 500/],
    [{ prompt: 'x', stop: 7 }, 'stop', /stop must be a string or an array; got number 7/],
    [{ prompt: 'x', stream: 'yes' }, 'stream', /stream must be a boolean.*got string "yes"/],
  ];
  for (const [body, param, message] of cases) {
    const err = rejects(completion, body);
    assert.match(err.message, message, JSON.stringify(body));
    if (param !== null) assert.equal(err.param, param, JSON.stringify(body));
  }
});

test('echo with logprobs is accepted (prompt logprobs are computed), as vLLM does', () => {
  const b = parseBody(completion, { prompt: 'x', echo: true, logprobs: 2 });
  assert.equal(b.echo, true);
  assert.equal(b.logprobs, 2);
});

test('non-object bodies are a 400, not a crash', () => {
  assert.match(rejects(completion, null).message, /must be a JSON object; got null/);
  assert.match(rejects(completion, [1, 2]).message, /must be a JSON object; got an array/);
  assert.match(rejects(completion, 'hi').message, /must be a JSON object; got string "hi"/);
});

test('unknown fields are dropped, like OpenAI; null means "left out"', () => {
  const b = parseBody(completion, { prompt: 'x', frobnicate: 3, response_format: { type: 'json' }, seed: null, stop: null });
  assert.equal('frobnicate' in b, false);
  assert.equal(b.seed, null);
  assert.equal(b.stop, null);
});

test('chat: messages are required and only text content parts are accepted', () => {
  assert.match(rejects(chat, { messages: [] }).message, /messages must have at least 1 items; got 0/);
  assert.match(rejects(chat, { messages: [{ role: 'wizard', content: 'x' }] }).message, /messages\[0\]\.role must be one of .*got string "wizard"/);
  assert.match(rejects(chat, { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: {} }] }] }).message, /only text content parts.*image_url/);
  assert.match(rejects(chat, { messages: [{ role: 'user', content: 'x' }], top_logprobs: 2 }).message, /top_logprobs needs logprobs: true/);
  const ok = parseBody(chat, { messages: [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }], max_completion_tokens: 4 });
  assert.equal(ok.max_completion_tokens, 4);
});

test('error mapping: queue full → 429 with Retry-After; Fastify client errors keep their status; server faults hide the stack', () => {
  const q = mapError(new QueueFullError(256, 256), 1000);
  assert.equal(q.status, 429);
  assert.equal(q.retryAfterSeconds, 1);
  assert.deepEqual(q.body, { error: { message: 'the waiting queue is full (256 of 256 requests); retry later', type: 'rate_limit_error', param: null, code: 429 } });

  const big = Object.assign(new Error('Request body is too large'), { statusCode: 413, code: 'FST_ERR_CTP_BODY_TOO_LARGE' });
  const m = mapError(big, 4096);
  assert.equal(m.status, 413);
  assert.equal(m.body.error.code, 413);
  assert.match(m.body.error.message, /larger than the limit of 4096 bytes/);

  const crash = mapError(new TypeError('x is undefined'), 1000);
  assert.equal(crash.status, 500);
  assert.equal(crash.serverFault, true);
  assert.equal(crash.body.error.message, 'internal server error: x is undefined');
  assert.doesNotMatch(JSON.stringify(crash.body), /at .*\.ts:\d+/);

  const api = mapError(new ApiError(404, 'no such model', 'model'), 1000);
  assert.deepEqual(api.body, { error: { message: 'no such model', type: 'not_found_error', param: 'model', code: 404 } });
});

test('SSE: one data line per chunk, [DONE] last, and a mid-stream failure becomes an error event before [DONE]', async () => {
  const chunk = { text: 'a\nb "quoted"', n: 1 };
  assert.equal(sseEvent(chunk), `data: ${JSON.stringify(chunk)}\n\n`);
  assert.equal(sseEvent(chunk).split('\n').length, 3); // the newline inside the text stays escaped

  async function* failing(): AsyncGenerator<unknown> {
    yield { i: 0 };
    yield { i: 1 };
    throw new Error('device lost');
  }
  let body = '';
  for await (const piece of sseStream(failing(), (err) => ({ error: { message: (err as Error).message } }))) body += piece;
  assert.ok(body.endsWith(SSE_DONE));
  assert.deepEqual(parseSseBody(body), [{ i: 0 }, { i: 1 }, { error: { message: 'device lost' } }, '[DONE]']);
});

test('KV metrics arithmetic: usage counts only blocks held by running sequences; states add up to the pool', () => {
  const stats: EngineStats = {
    running: 2,
    waiting: 0,
    kv: { blockSize: 16, numBlocks: 100, freeBlocks: 70, usedBlocks: 30, cachedBlocks: 12, bytesPerToken: 640, capacityBytes: 100 * 16 * 640, usedBytes: 30 * 16 * 640, cacheDtype: 'f16' },
    preemptions: 0,
    prefixCacheQueries: 0,
    prefixCacheHits: 0,
    promptTokens: 0,
    generationTokens: 0,
    steps: 0,
  };
  assert.equal(kvUsageFraction(stats), 0.3);
  assert.deepEqual(kvBlockStates(stats), { free: 58, used: 30, cached: 12 });
});

test('serve options: sizes and defaults', () => {
  assert.equal(parseByteSize('2GiB'), 2 * 2 ** 30);
  assert.equal(parseByteSize('1.5GB'), 1.5e9);
  assert.equal(parseByteSize('512 MiB'), 512 * 2 ** 20);
  assert.equal(parseByteSize('4096'), 4096);
  assert.throws(() => parseByteSize('lots'), /not a size; write e.g. 2GiB/);

  const o = parseServeArgs(['--model', 'a', '--model', 'b', '--name', 'A', '--port', '9000', '--kv-cache-memory', '64MiB', '--max-model-len', '256']);
  assert.ok(o !== 'help');
  assert.deepEqual([o.models, o.names, o.host, o.port, o.kvCacheMemory, o.blockSize, o.maxNumSeqs, o.maxModelLen, o.maxQueue], [['a', 'b'], ['A'], '127.0.0.1', 9000, 64 * 2 ** 20, 16, 64, 256, 256]);
  assert.throws(() => parseServeArgs(['--block-size', '0']), /--block-size must be an integer >= 1; got "0"/);
  assert.throws(() => parseServeArgs(['--bogus']), /Unknown option '--bogus'/);
  assert.equal(parseServeArgs(['--help']), 'help');
});

test("the engine's own request checks come back as 400 with their parameter", () => {
  const m = mapError(new InvalidRequestError('prompt (300 tokens) + max_tokens (10) = 310 tokens do not fit in the KV cache of 16 blocks × 16 = 256 tokens', 'max_tokens'), 1000);
  assert.equal(m.status, 400);
  assert.deepEqual(m.body.error, { message: 'prompt (300 tokens) + max_tokens (10) = 310 tokens do not fit in the KV cache of 16 blocks × 16 = 256 tokens', type: 'invalid_request_error', param: 'max_tokens', code: 400 });
});

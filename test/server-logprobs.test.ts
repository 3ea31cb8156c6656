// Completions echo + logprobs (prompt logprobs) and logprob token strings over HTTP, on a real GPU engine, against the float64 reference.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { createEngine, type Engine } from '../engine/engine.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { argmax, logSoftmax, topN } from '../engine/sampler.ts';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import type { GqaConfig } from '../model/config.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import { buildApp } from '../server/app.ts';
import { parseSseBody } from '../server/sse.ts';
import { STORIES_GGUF } from './engine-helpers.ts';

// f32 weights and KV so that the GPU's logprobs can be held to 1e-3 of the float64 reference.
const TOLERANCE = 1e-3;
// Long enough for two full 16-token blocks (prefix-cache hits) and, with 8-token steps, a prefill in several chunks.
const PROMPT = 'Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her café ☕ friends.';

let gpu: GpuContext;
let model: LoadedModel;
let engine: Engine;
let app: FastifyInstance;
let base: string;

before(async () => {
  gpu = await openGpu({ log: () => {} });
  model = await loadModel(STORIES_GGUF, { maxSeqLen: 256 });
  const runner = await createGpuRunner(gpu, model, { blockSize: 16, numBlocks: 64, weightDtype: 'f32', cacheDtype: 'f32' });
  engine = createEngine({ runner, info: { name: 'stories260K', config: model.config, tokenizer: model.tokenizer, maxModelLen: 256 }, maxBatchedTokens: 8 });
  app = buildApp({ engines: [engine], ownsEngines: false });
  base = await app.listen({ port: 0, host: '127.0.0.1' });
});

after(async () => {
  await app?.close();
  await engine?.shutdown(5_000);
  gpu?.destroy();
  releaseGpu();
});

interface Legacy {
  tokens: string[];
  token_logprobs: Array<number | null>;
  top_logprobs: Array<Record<string, number> | null>;
  text_offset: number[];
}
interface CompletionChoice {
  index: number;
  text: string;
  logprobs: Legacy | null;
  finish_reason: string | null;
}

async function post(path: string, body: unknown): Promise<{ status: number; text: string }> {
  const res = await fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), signal: AbortSignal.timeout(300_000) });
  return { status: res.status, text: await res.text() };
}

async function completion(body: object): Promise<CompletionChoice[]> {
  const r = await post('/v1/completions', { model: 'stories260K', temperature: 0, ...body });
  assert.equal(r.status, 200, r.text);
  return (JSON.parse(r.text) as { choices: CompletionChoice[] }).choices;
}

/** A streamed completion folded into whole choices: texts and logprob arrays concatenated in chunk order. */
async function streamedCompletion(body: object): Promise<CompletionChoice[]> {
  const r = await post('/v1/completions', { model: 'stories260K', temperature: 0, ...body, stream: true });
  assert.equal(r.status, 200, r.text);
  const events = parseSseBody(r.text);
  assert.equal(events[events.length - 1], '[DONE]');
  const chunks = events.slice(0, -1) as Array<{ choices: CompletionChoice[] }>;
  const out: CompletionChoice[] = [];
  for (const chunk of chunks) {
    for (const c of chunk.choices) {
      const acc = (out[c.index] ??= { index: c.index, text: '', logprobs: { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] }, finish_reason: null });
      acc.text += c.text;
      if (c.finish_reason) acc.finish_reason = c.finish_reason;
      if (c.logprobs) {
        acc.logprobs!.tokens.push(...c.logprobs.tokens);
        acc.logprobs!.token_logprobs.push(...c.logprobs.token_logprobs);
        acc.logprobs!.top_logprobs.push(...c.logprobs.top_logprobs);
        acc.logprobs!.text_offset.push(...c.logprobs.text_offset);
      }
    }
  }
  return out;
}

/** Float64 truth for a sequence: log-softmax of the logits at every position, and the greedy continuation. */
function reference(promptIds: number[], generate: number): { ids: number[]; logprobs: Float64Array[] } {
  const ref = new ReferenceGqa(model.config as GqaConfig, model.weights);
  const rows = ref.forward(promptIds);
  const ids = promptIds.slice();
  for (let i = 0; i < generate; i++) {
    const next = argmax(rows[rows.length - 1]);
    ids.push(next);
    if (i < generate - 1) rows.push(...ref.forward([next]));
  }
  return { ids, logprobs: rows.map((r) => logSoftmax(r)) };
}

const promptIds = (text: string) => [model.tokenizer.bosId!, ...model.tokenizer.encode(text)];

/** Every entry i ≥ 1 scores ids[i] with row i - 1 of the reference; entry 0 (first prompt token) is null. */
function assertMatchesReference(lp: Legacy, ids: number[], logprobs: Float64Array[], topCount: number): void {
  assert.equal(lp.tokens.length, ids.length, 'one logprob entry per prompt and generated token');
  assert.equal(lp.token_logprobs[0], null, 'the first prompt token has no logprob');
  assert.equal(lp.top_logprobs[0], null, 'the first prompt token has no top_logprobs');
  for (let i = 1; i < ids.length; i++) {
    const row = logprobs[i - 1];
    const got = lp.token_logprobs[i]!;
    assert.ok(Math.abs(got - row[ids[i]]) < TOLERANCE, `token ${i} (id ${ids[i]}, ${JSON.stringify(lp.tokens[i])}): logprob ${got} vs reference ${row[ids[i]]}`);
    const top = lp.top_logprobs[i]!;
    const want = topN(row, topCount).map((id) => row[id]);
    const values = Object.values(top).sort((a, b) => b - a);
    // Alternatives that read the same text share a key; the keys kept are the likeliest ones.
    assert.ok(values.length >= 1 && values.length <= topCount, `token ${i}: ${values.length} top_logprobs`);
    values.forEach((v, k) => assert.ok(Math.abs(v - want[k]) < TOLERANCE, `token ${i}: top ${k} logprob ${v} vs reference ${want[k]}`));
  }
}

/** Token strings are the text: they concatenate to it and each text_offset points at its token. */
function assertOffsetsMatchText(lp: Legacy, text: string): void {
  assert.equal(lp.tokens.join(''), text, 'token strings concatenate to the choice text');
  let offset = 0;
  lp.tokens.forEach((t, i) => {
    assert.equal(lp.text_offset[i], offset, `text_offset of token ${i} (${JSON.stringify(t)})`);
    assert.equal(text.slice(offset, offset + t.length), t);
    offset += t.length;
  });
  assert.ok(!lp.tokens.some((t) => t.includes('\u2581')), `SentencePiece pieces leaked into the token strings: ${JSON.stringify(lp.tokens)}`);
}

test('echo + logprobs: prompt and generated logprobs equal the float64 log-softmax; token strings and text_offset follow the text', async () => {
  const ids = promptIds(PROMPT);
  assert.ok(ids.length > 40, `the prompt is ${ids.length} tokens; it should span more than two blocks`);
  // Cache the prompt's blocks first: the echo request must still score every prompt row.
  const warm = await completion({ prompt: PROMPT, max_tokens: 2 });
  assert.equal(warm[0].logprobs, null);
  const hitsBefore = engine.stats().prefixCacheHits;

  const maxTokens = 6;
  const choices = await completion({ prompt: PROMPT, max_tokens: maxTokens, echo: true, logprobs: 3, ignore_eos: true, n: 2 });
  const truth = reference(ids, maxTokens);
  const generatedText = model.tokenizer.decode(truth.ids).slice(model.tokenizer.decode(ids).length);
  assert.equal(choices.length, 2);
  for (const c of choices) {
    assert.equal(c.text, PROMPT + generatedText, 'echoed prompt + the reference greedy continuation');
    assertMatchesReference(c.logprobs!, truth.ids, truth.logprobs, 3);
    assertOffsetsMatchText(c.logprobs!, c.text);
    // Generated tokens read with their spacing in context (" there", not "▁there").
    assert.ok(c.logprobs!.tokens.slice(ids.length).some((t) => t.startsWith(' ')), JSON.stringify(c.logprobs!.tokens.slice(ids.length)));
  }
  assert.equal(engine.stats().prefixCacheHits, hitsBefore, 'an echo + logprobs request took prefix-cache hits (its prompt rows would have no logits)');
  // A plain request with the same prompt still hits the cache.
  await completion({ prompt: PROMPT, max_tokens: 1 });
  assert.ok(engine.stats().prefixCacheHits >= hitsBefore + 32, 'the prefix cache no longer serves plain requests');
  assert.equal(engine.heldBlocks(), 0);
});

test('echo + logprobs streamed: the same tokens, offsets and logprobs as the whole response; a one-token prompt has only its null entry', async () => {
  const body = { prompt: PROMPT, max_tokens: 5, echo: true, logprobs: 2, ignore_eos: true };
  const [whole, streamed] = await Promise.all([completion(body), streamedCompletion(body)]);
  const a = whole[0];
  const b = streamed[0];
  assert.equal(b.text, a.text);
  assert.equal(b.finish_reason, 'length');
  assert.deepEqual(b.logprobs!.tokens, a.logprobs!.tokens);
  assert.deepEqual(b.logprobs!.text_offset, a.logprobs!.text_offset);
  assert.equal(b.logprobs!.token_logprobs.length, a.logprobs!.token_logprobs.length);
  b.logprobs!.token_logprobs.forEach((v, i) => {
    const w = a.logprobs!.token_logprobs[i];
    assert.ok(v === null ? w === null : Math.abs(v - w!) < 1e-5, `token ${i}: streamed ${v} vs whole ${w}`);
  });
  assert.deepEqual(Object.keys(b.logprobs!.top_logprobs[7]!), Object.keys(a.logprobs!.top_logprobs[7]!));
  assertOffsetsMatchText(b.logprobs!, b.text);

  // Token ids as the prompt: BOS alone. Its entry reads '' (no text), logprob null; then the generated ones.
  const bos = model.tokenizer.bosId!;
  const one = await completion({ prompt: [bos], max_tokens: 3, echo: true, logprobs: 1, ignore_eos: true });
  const truth = reference([bos], 3);
  assertMatchesReference(one[0].logprobs!, truth.ids, truth.logprobs, 1);
  assertOffsetsMatchText(one[0].logprobs!, one[0].text);
  assert.equal(one[0].logprobs!.tokens[0], '');
});

test('chat logprobs: tokens are decoded text that concatenates to the content, bytes their UTF-8, logprobs the reference ones', async () => {
  const messages = [{ role: 'user', content: 'Tell me about Lily' }];
  const tok = await post('/tokenize', { model: 'stories260K', messages });
  assert.equal(tok.status, 200, tok.text);
  const ids = (JSON.parse(tok.text) as { tokens: number[] }).tokens;
  const r = await post('/v1/chat/completions', { model: 'stories260K', messages, max_tokens: 6, temperature: 0, logprobs: true, top_logprobs: 2, ignore_eos: true });
  assert.equal(r.status, 200, r.text);
  const choice = (JSON.parse(r.text) as { choices: Array<{ message: { content: string }; logprobs: { content: Array<{ token: string; logprob: number; bytes: number[]; top_logprobs: Array<{ token: string; logprob: number; bytes: number[] }> }> } }> }).choices[0];
  const content = choice.logprobs.content;
  assert.equal(content.length, 6);
  assert.equal(content.map((c) => c.token).join(''), choice.message.content);
  const truth = reference(ids, 6);
  content.forEach((c, i) => {
    assert.deepEqual(c.bytes, [...Buffer.from(c.token, 'utf8')]);
    assert.ok(!c.token.includes('\u2581'), `piece ${JSON.stringify(c.token)} instead of text`);
    const row = truth.logprobs[ids.length - 1 + i];
    assert.ok(Math.abs(c.logprob - row[truth.ids[ids.length + i]]) < TOLERANCE, `token ${i}: ${c.logprob} vs reference ${row[truth.ids[ids.length + i]]}`);
    assert.equal(c.top_logprobs[0].token, c.token, 'greedy: the chosen token is the top alternative, under the same text');
    for (const t of c.top_logprobs) assert.deepEqual(t.bytes, [...Buffer.from(t.token, 'utf8')]);
  });
});

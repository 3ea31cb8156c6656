// What completions and chat share: model lookup, context checks, sampling params, and running a request's choices on an engine.
import type { FinishReason, GenerationEvent, PromptTokenLogprob, SamplingParams, ServingEngine, TokenLogprob } from '../../engine/types.ts';
import { ChatFormatter } from '../chat.ts';
import type { FastifyRequest } from 'fastify';
import { ApiError, mapError } from '../errors.ts';
import type { ServerMetrics } from '../metrics.ts';
import type { SamplingBody } from '../schemas.ts';

/** One hosted model as the routes see it. */
export interface HostedModel {
  name: string;
  engine: ServingEngine;
  chat: ChatFormatter;
}

/** Everything a route needs from the app; made once by buildApp. */
export interface ServerContext {
  models: HostedModel[];
  metrics: ServerMetrics;
  /** True once shutdown began: new generation requests get 503. */
  draining(): boolean;
  /** The token tally of a request, for its log line (buildApp sets it; absent: nothing is tallied). */
  tally?(request: FastifyRequest): RequestTally;
}

/** What a generation request used, summed over its choices: for the request log. */
export interface RequestTally {
  /** Each distinct prompt once (n > 1 shares one), as usage counts it. */
  promptTokens: number;
  completionTokens: number;
  /** One per finished choice, in finishing order ('stop' | 'length' | 'abort'). */
  finishReasons: string[];
}

export function resolveModel(ctx: ServerContext, name: string | null | undefined): HostedModel {
  // Like vLLM: with no `model` the first served model answers.
  if (name == null || name === '') return ctx.models[0];
  const m = ctx.models.find((x) => x.name === name);
  if (!m) {
    throw new ApiError(404, `The model '${name}' does not exist on this server; available models: ${ctx.models.map((x) => x.name).join(', ')}`, 'model');
  }
  return m;
}

/** Token ids of a text prompt: BOS (when the tokenizer has one) then the text's tokens. */
export function encodePrompt(model: HostedModel, text: string): number[] {
  const tok = model.engine.info.tokenizer;
  return tok.bosId === null ? tok.encode(text) : [tok.bosId, ...tok.encode(text)];
}

export function checkTokenIds(model: HostedModel, ids: number[], param: string): void {
  const vocab = model.engine.info.tokenizer.vocabSize;
  const bad = ids.findIndex((id) => id >= vocab);
  if (bad >= 0) throw new ApiError(400, `${param}[${bad}] = ${ids[bad]} is not a token id of this model (vocabulary 0..${vocab - 1})`, param);
}

/**
 * The max_tokens to generate for a prompt of `promptLen` tokens, or a 400 that names both numbers.
 * `requested` null means the client left it out: `fallback` (capped to what fits) or, when that is null, all the room left.
 */
export function resolveMaxTokens(model: HostedModel, promptLen: number, requested: number | null | undefined, fallback: number | null, param = 'max_tokens'): number {
  const maxLen = model.engine.info.maxModelLen;
  if (promptLen >= maxLen) {
    throw new ApiError(400, `The prompt is ${promptLen} tokens, but this model's maximum context length is ${maxLen} tokens (max_model_len), which leaves no room to generate; shorten the prompt.`, 'prompt');
  }
  const room = maxLen - promptLen;
  if (requested == null) return fallback == null ? room : Math.min(fallback, room);
  if (promptLen + requested > maxLen) {
    throw new ApiError(
      400,
      `This model's maximum context length is ${maxLen} tokens, but you requested ${promptLen + requested} tokens (${promptLen} in the prompt + ${requested} for ${param}); reduce ${param} to at most ${room} or shorten the prompt.`,
      param,
    );
  }
  return requested;
}

/** Sampling parameters for one choice from the body's fields; `logprobs` is the engine's top-N (null = none). */
export function samplingParams(model: HostedModel, body: SamplingBody, maxTokens: number, logprobs: number | null, choiceInBatch: number): SamplingParams {
  const vocab = model.engine.info.tokenizer.vocabSize;
  const logitBias = new Map<number, number>();
  for (const [key, bias] of Object.entries(body.logit_bias ?? {})) {
    const id = Number(key);
    if (id >= vocab) throw new ApiError(400, `logit_bias key "${key}" is not a token id of this model (vocabulary 0..${vocab - 1})`, 'logit_bias');
    logitBias.set(id, bias);
  }
  const stop = body.stop == null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop;
  return {
    maxTokens,
    temperature: body.temperature ?? 1,
    topP: body.top_p ?? 1,
    topK: body.top_k ?? -1,
    minP: body.min_p ?? 0,
    presencePenalty: body.presence_penalty ?? 0,
    frequencyPenalty: body.frequency_penalty ?? 0,
    repetitionPenalty: body.repetition_penalty ?? 1,
    logitBias,
    // n > 1 with a seed: each choice its own seed, so the choices differ yet the request stays reproducible.
    seed: body.seed == null ? undefined : body.seed + choiceInBatch,
    stop: stop.filter((s) => s.length > 0),
    stopTokenIds: body.stop_token_ids ?? [],
    ignoreEos: body.ignore_eos ?? false,
    logprobs,
  };
}

/** nginx's status for "client closed request": never sent (nobody is listening), only logged and counted. */
export const CLIENT_CLOSED = 499;

let runSerial = 0;

/** One choice to generate: its index in the response, its prompt and parameters. */
export interface ChoiceSpec {
  index: number;
  promptTokens: number[];
  params: SamplingParams;
  /** Top-N logprobs of the prompt tokens too (completions' echo + logprobs); absent = none. */
  promptLogprobs?: number | null;
}

export type FinishEvent = Extract<GenerationEvent, { type: 'finish' }>;
export type ChoiceEvent = { index: number; event: GenerationEvent };

/**
 * The running choices of one HTTP request. Started by `start()`, which returns only once every choice
 * was accepted by the engine (its first event arrived) so a full queue is still a clean 429;
 * then `events()` yields all choices' events interleaved as they come.
 */
export class ChoiceRun {
  private readonly abort = new AbortController();
  private iterators: Array<AsyncIterator<GenerationEvent>> = [];
  private pending: Array<Promise<IteratorResult<GenerationEvent>> | null> = [];
  private readonly arrival: number;
  private readonly lastTokenAt: number[] = [];
  // Client request ids (x-request-id) may repeat; the engine's must not.
  private readonly serial = ++runSerial;

  constructor(
    private readonly ctx: ServerContext,
    private readonly model: HostedModel,
    private readonly requestId: string,
    private readonly choices: ChoiceSpec[],
    /** Where this run adds its tokens and finish reasons (the request's log line). */
    private readonly tally: RequestTally | null = null,
  ) {
    this.arrival = performance.now();
    // The n choices of one prompt share its token array: count each array once.
    if (tally) for (const p of new Set(choices.map((c) => c.promptTokens))) tally.promptTokens += p.length;
  }

  get signal(): AbortSignal {
    return this.abort.signal;
  }

  /** The client went away: the engine frees its blocks within a step. */
  cancel(): void {
    this.abort.abort();
  }

  async start(): Promise<void> {
    if (this.ctx.draining()) throw new ApiError(503, 'the server is shutting down and takes no new requests; retry on another replica', null, 1);
    if (!this.model.engine.healthy()) throw new ApiError(503, `the engine of ${this.model.name} failed (GPU device lost or a step error) and serves no requests; see /health and the server log`);
    try {
      for (const c of this.choices) {
        const it = this.model.engine
          .generate({ requestId: `${this.requestId}-${this.serial}-${c.index}`, promptTokens: c.promptTokens, params: c.params, promptLogprobs: c.promptLogprobs ?? null, signal: this.abort.signal })
          [Symbol.asyncIterator]();
        this.iterators.push(it);
        this.pending.push(it.next());
      }
      // A queue-full error may come from generate() itself or from the first next(): wait for all first events.
      const firsts = await Promise.allSettled(this.pending);
      const failed = firsts.find((r) => r.status === 'rejected');
      if (failed) throw (failed as PromiseRejectedResult).reason;
      this.pending = firsts.map((r) => Promise.resolve((r as PromiseFulfilledResult<IteratorResult<GenerationEvent>>).value));
    } catch (err) {
      this.cancel();
      await Promise.allSettled(this.iterators.map((it) => it.return?.()));
      throw err;
    }
  }

  /** Events of all choices as they arrive; metrics are recorded here. */
  async *events(): AsyncGenerator<ChoiceEvent> {
    const live = new Set(this.pending.map((_, i) => i));
    const tagged = (i: number) => this.pending[i]!.then((r) => ({ i, r }));
    const racing = new Map<number, Promise<{ i: number; r: IteratorResult<GenerationEvent> }>>();
    for (const i of live) racing.set(i, tagged(i));
    try {
      while (racing.size) {
        const { i, r } = await Promise.race(racing.values());
        if (r.done) {
          racing.delete(i);
          continue;
        }
        this.observe(i, r.value);
        yield { index: this.choices[i].index, event: r.value };
        if (r.value.type === 'finish') {
          racing.delete(i);
          continue;
        }
        this.pending[i] = this.iterators[i].next();
        racing.set(i, tagged(i));
      }
    } finally {
      if (racing.size) {
        // Left early (client gone, error): stop the engine's work for the rest.
        this.cancel();
        await Promise.allSettled(this.iterators.map((it) => it.return?.()));
      }
    }
  }

  private observe(i: number, ev: GenerationEvent): void {
    const name = this.model.name;
    const m = this.ctx.metrics;
    const now = performance.now();
    if (ev.type === 'token') {
      const last = this.lastTokenAt[i];
      if (last === undefined) m.observeTtft(name, (now - this.arrival) / 1000);
      else m.observeInterToken(name, (now - last) / 1000);
      this.lastTokenAt[i] = now;
    } else {
      m.observeE2e(name, (now - this.arrival) / 1000);
      m.observeQueue(name, ev.queueSeconds);
      m.finished(name, ev.finishReason);
      if (this.tally) {
        this.tally.completionTokens += ev.completionTokens;
        this.tally.finishReasons.push(ev.finishReason);
      }
    }
  }
}

/** A finish the client should hear about as an error rather than a normal end (or, when the client itself left, 499 for the logs and metrics). */
export function abortedError(ctx: ServerContext, run: ChoiceRun): ApiError {
  if (run.signal.aborted) return new ApiError(CLIENT_CLOSED, 'the client closed the connection before the response was complete');
  return ctx.draining()
    ? new ApiError(503, 'the server shut down before this request finished; retry it', null, 1)
    : new ApiError(500, 'the engine aborted this request before it finished');
}

export function openAiFinishReason(r: FinishReason): 'stop' | 'length' {
  return r === 'length' ? 'length' : 'stop';
}

/** Completions' legacy logprobs: {tokens, token_logprobs, top_logprobs, text_offset}; null for the first echoed prompt token. */
export interface LegacyLogprobs {
  tokens: string[];
  token_logprobs: Array<number | null>;
  top_logprobs: Array<Record<string, number> | null>;
  text_offset: number[];
}

/**
 * Appends token logprobs (generated, or echoed prompt ones); returns the offset after them. Token strings are the text
 * each token adds, so text_offset is each token's character offset in the choice's text, as vLLM counts it.
 */
export function appendLegacyLogprobs(out: LegacyLogprobs, lps: Array<TokenLogprob | PromptTokenLogprob>, offset: number): number {
  for (const lp of lps) {
    out.tokens.push(lp.token);
    out.token_logprobs.push(lp.logprob);
    let top: Record<string, number> | null = null;
    if (lp.top) {
      // Two alternatives may read the same: the likelier one (listed first) keeps the key. fromEntries makes
      // own properties even of keys like "__proto__".
      const byText = new Map<string, number>();
      for (const t of lp.top) if (!byText.has(t.token)) byText.set(t.token, t.logprob);
      top = Object.fromEntries(byText);
    }
    out.top_logprobs.push(top);
    out.text_offset.push(offset);
    offset += lp.token.length;
  }
  return offset;
}

/** Chat's logprobs entries: {token, logprob, bytes, top_logprobs[{token, logprob, bytes}]}. */
export interface ChatLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  top_logprobs: Array<{ token: string; logprob: number; bytes: number[] }>;
}

export function chatLogprobs(lps: TokenLogprob[]): ChatLogprob[] {
  const bytes = (s: string) => [...Buffer.from(s, 'utf8')];
  return lps.map((lp) => ({
    token: lp.token,
    logprob: lp.logprob,
    bytes: bytes(lp.token),
    top_logprobs: lp.top.map((t) => ({ token: t.token, logprob: t.logprob, bytes: bytes(t.token) })),
  }));
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details?: { cached_tokens: number };
}

/** Usage of a request: each prompt counted once (as OpenAI does for n > 1), every choice's completion tokens. */
export function usageOf(promptLens: number[], finishes: FinishEvent[], cachedTokens: number): Usage {
  const prompt = promptLens.reduce((a, b) => a + b, 0);
  const completion = finishes.reduce((a, f) => a + f.completionTokens, 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion, prompt_tokens_details: { cached_tokens: cachedTokens } };
}

export function unixSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

/** The last SSE event of a stream that failed after its 200 went out; counted and logged like any error. */
export function streamErrorChunk(err: unknown, request: FastifyRequest, ctx: ServerContext, modelName: string): unknown {
  const mapped = mapError(err, 0);
  if (mapped.serverFault) request.log.error({ err }, 'stream failed');
  else request.log.info({ status: mapped.status, message: mapped.body.error.message }, 'stream ended early');
  ctx.metrics.failed(modelName, mapped.status);
  return mapped.body;
}

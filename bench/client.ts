// One streamed /v1/completions request, timed chunk by chunk; every way it can go wrong becomes a failed outcome, never a throw.
import { request, type Dispatcher } from 'undici';
import { performance } from 'node:perf_hooks';
import { SseParser } from './sse.ts';

export interface CompletionSpec {
  /** Server base URL, e.g. http://127.0.0.1:8000 */
  baseUrl: string;
  model: string;
  /** Token ids (random or tokenized dataset) or text when the server could not tokenize. */
  prompt: number[] | string;
  maxTokens: number;
  ignoreEos: boolean;
  timeoutMs: number;
  dispatcher: Dispatcher;
}

/** What one request measured. Times are seconds; `sentAtS`/`contentTimesS` are relative to `epochMs`. */
export interface RequestOutcome {
  ok: boolean;
  /** Why it failed, readable; undefined when ok. */
  error?: string;
  /** Prompt tokens: usage.prompt_tokens when the server sent it, else the ids sent (0 for text). */
  promptTokens: number;
  /** usage.completion_tokens (0 when it failed before the usage chunk). */
  outputTokens: number;
  /** Send → first chunk with non-empty choices. */
  ttftS: number;
  /** Send → last chunk (the usage chunk when it comes last). */
  e2elS: number;
  /** Gaps between successive chunks with content: from the first chunk with choices, then chunks with non-empty text. */
  itlS: number[];
  sentAtS: number;
  /** Arrival of the first chunk and of each later chunk with text, for throughput over time. */
  contentTimesS: number[];
  generatedText: string;
}

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

function isObject(v: Json | undefined): v is { [key: string]: Json } {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Sends one request and measures it; `epochMs` is the run's start on the performance.now() clock. */
export async function sendCompletion(spec: CompletionSpec, epochMs: number): Promise<RequestOutcome> {
  const body: Record<string, unknown> = {
    model: spec.model,
    prompt: spec.prompt,
    max_tokens: spec.maxTokens,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  };
  if (spec.ignoreEos) body.ignore_eos = true;

  const controller = new AbortController();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    controller.abort();
  }, spec.timeoutMs);

  const sentMs = performance.now();
  const outcome: RequestOutcome = {
    ok: false,
    promptTokens: Array.isArray(spec.prompt) ? spec.prompt.length : 0,
    outputTokens: 0,
    ttftS: 0,
    e2elS: 0,
    itlS: [],
    sentAtS: (sentMs - epochMs) / 1000,
    contentTimesS: [],
    generatedText: '',
  };
  const fail = (why: string): RequestOutcome => {
    outcome.ok = false;
    outcome.error = why;
    return outcome;
  };

  try {
    const res = await request(`${spec.baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'text/event-stream' },
      body: JSON.stringify(body),
      dispatcher: spec.dispatcher,
      signal: controller.signal,
      // The overall deadline is the timer above; undici's own timers would only add a second clock.
      headersTimeout: 0,
      bodyTimeout: 0,
    });
    if (res.statusCode !== 200) {
      const text = await readCapped(res.body, 4096);
      return fail(`HTTP ${res.statusCode}: ${errorMessageOf(text)}`);
    }

    const decoder = new TextDecoder();
    const parser = new SseParser();
    let firstContentMs: number | undefined;
    let lastContentMs = 0;
    let lastChunkMs = 0;
    let sawDone = false;
    let completionTokens: number | undefined;
    let failure: string | undefined;

    for await (const piece of res.body) {
      const nowMs = performance.now();
      for (const data of parser.push(decoder.decode(piece as Buffer, { stream: true }))) {
        if (data === '[DONE]') {
          sawDone = true;
          continue;
        }
        if (sawDone) {
          failure = `data after [DONE]: ${JSON.stringify(data.slice(0, 120))}`;
          break;
        }
        let chunk: Json;
        try {
          chunk = JSON.parse(data) as Json;
        } catch {
          failure = `malformed SSE chunk (not JSON): ${JSON.stringify(data.slice(0, 120))}`;
          break;
        }
        if (!isObject(chunk)) {
          failure = `malformed SSE chunk (not an object): ${JSON.stringify(data.slice(0, 120))}`;
          break;
        }
        if (chunk.error !== undefined) {
          const e = chunk.error;
          failure = `error in stream: ${isObject(e) && typeof e.message === 'string' ? e.message : JSON.stringify(e)}`;
          break;
        }
        lastChunkMs = nowMs;
        const choices = chunk.choices;
        if (Array.isArray(choices) && choices.length > 0) {
          const text = choices.map((c) => (isObject(c) && typeof c.text === 'string' ? c.text : '')).join('');
          if (firstContentMs === undefined) {
            firstContentMs = nowMs;
            lastContentMs = nowMs;
            outcome.contentTimesS.push((nowMs - epochMs) / 1000);
          } else if (text !== '') {
            // A chunk that only carries finish_reason (empty text) is no token: counting it would add a ~0 ms gap.
            outcome.itlS.push((nowMs - lastContentMs) / 1000);
            lastContentMs = nowMs;
            outcome.contentTimesS.push((nowMs - epochMs) / 1000);
          }
          outcome.generatedText += text;
        }
        const usage = chunk.usage;
        if (isObject(usage)) {
          if (typeof usage.completion_tokens === 'number') completionTokens = usage.completion_tokens;
          if (typeof usage.prompt_tokens === 'number') outcome.promptTokens = usage.prompt_tokens;
        }
      }
      if (failure !== undefined) break;
    }
    if (failure !== undefined) {
      controller.abort(); // free the connection; the server sees a client disconnect
      return fail(failure);
    }
    if (!sawDone) return fail('stream ended without data: [DONE]');
    if (firstContentMs === undefined) return fail('stream had no chunk with choices');
    if (completionTokens === undefined) return fail('stream had no usage chunk with completion_tokens (stream_options.include_usage)');
    outcome.outputTokens = completionTokens;
    outcome.ttftS = (firstContentMs - sentMs) / 1000;
    outcome.e2elS = (lastChunkMs - sentMs) / 1000;
    outcome.ok = true;
    return outcome;
  } catch (err) {
    if (timedOut) return fail(`timed out after ${spec.timeoutMs / 1000} s (--timeout)`);
    const e = err as Error & { code?: string; cause?: Error };
    const detail = e.cause?.message ? `${e.message} (${e.cause.message})` : e.message;
    return fail(`connection error: ${e.code ? `${e.code} ` : ''}${detail}`);
  } finally {
    clearTimeout(timer);
  }
}

/** Reads at most `cap` bytes of an error body, then drops the rest. */
async function readCapped(body: AsyncIterable<unknown> & { destroy?: () => void }, cap: number): Promise<string> {
  const parts: Buffer[] = [];
  let size = 0;
  for await (const piece of body) {
    const buf = piece as Buffer;
    parts.push(buf);
    size += buf.length;
    if (size >= cap) break; // breaking out of for-await destroys the stream
  }
  return Buffer.concat(parts).toString('utf8').slice(0, cap);
}

/** The OpenAI error object's message when the body is one, else the body text itself. */
function errorMessageOf(text: string): string {
  try {
    const parsed = JSON.parse(text) as Json;
    if (isObject(parsed) && isObject(parsed.error) && typeof parsed.error.message === 'string') return parsed.error.message;
  } catch {
    // not JSON: fall through to the raw text
  }
  return text.trim().slice(0, 300) || '(empty body)';
}

// What the bench asks a server before a run: is the model there, its context length, its vocabulary size.
import { request, type Dispatcher } from 'undici';

/** What GET /v1/models says about one model. */
export interface ServedModel {
  maxModelLen?: number;
  /** Only when the server's model card has `vocab_size` (not part of OpenAI's card). */
  vocabSize?: number;
}

export async function describeModel(baseUrl: string, model: string, dispatcher: Dispatcher): Promise<ServedModel> {
  let text: string;
  let status: number;
  try {
    const res = await request(`${baseUrl}/v1/models`, { dispatcher, signal: AbortSignal.timeout(10_000) });
    status = res.statusCode;
    text = await res.body.text();
  } catch (err) {
    throw new Error(`cannot reach ${baseUrl} (GET /v1/models: ${(err as Error).message}); is 'mla-serve serve' running there?`);
  }
  if (status !== 200) throw new Error(`GET ${baseUrl}/v1/models answered HTTP ${status}: ${text.slice(0, 200)}`);
  let entries: Array<Record<string, unknown>>;
  try {
    entries = (JSON.parse(text) as { data: Array<Record<string, unknown>> }).data;
    if (!Array.isArray(entries)) throw new Error('no data array');
  } catch (err) {
    throw new Error(`GET ${baseUrl}/v1/models is not an OpenAI model list (${(err as Error).message})`);
  }
  const entry = entries.find((e) => e.id === model);
  if (!entry) {
    throw new Error(`model '${model}' is not served at ${baseUrl}; it serves: ${entries.map((e) => String(e.id)).join(', ') || '(none)'}`);
  }
  const num = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);
  return { maxModelLen: num(entry.max_model_len), vocabSize: num(entry.vocab_size) };
}

/** Largest id the probe tries: 2^24 covers every tokenizer in use (the largest are ~260k). */
const PROBE_LIMIT = 1 << 24;

/**
 * The vocabulary size found by asking POST /detokenize which single ids it accepts (200) and which
 * it rejects (400): doubling to the first rejected id, then bisecting — at most ~50 small requests.
 * Undefined when the server has no /detokenize or never rejects an id.
 */
export async function probeVocabSize(baseUrl: string, model: string, dispatcher: Dispatcher): Promise<number | undefined> {
  const accepts = async (id: number): Promise<boolean | undefined> => {
    const res = await request(`${baseUrl}/detokenize`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model, tokens: [id] }),
      dispatcher,
      signal: AbortSignal.timeout(10_000),
    });
    await res.body.dump();
    if (res.statusCode === 200) return true;
    if (res.statusCode === 400) return false;
    return undefined; // no such endpoint, or a server error: no answer
  };
  if ((await accepts(0)) !== true) return undefined;
  let valid = 0;
  let invalid: number | undefined;
  for (let id = 1; id <= PROBE_LIMIT; id *= 2) {
    const ok = await accepts(id);
    if (ok === undefined) return undefined;
    if (!ok) {
      invalid = id;
      break;
    }
    valid = id;
  }
  if (invalid === undefined) return undefined;
  while (invalid - valid > 1) {
    const mid = Math.floor((valid + invalid) / 2);
    const ok = await accepts(mid);
    if (ok === undefined) return undefined;
    if (ok) valid = mid;
    else invalid = mid;
  }
  return invalid;
}

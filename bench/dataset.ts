// Workloads for the load test: seeded random token-id prompts, or real paragraphs from a text file cut to input-len tokens.
import { readFile } from 'node:fs/promises';
import { request, type Dispatcher } from 'undici';
import { createRng, PROMPT_STREAM } from './prng.ts';

/**
 * `count` prompts of exactly `inputLen` token ids drawn uniformly from [0, vocabSize) — the same
 * for every model given the same seed, so both models see an identical workload.
 */
export function randomTokenPrompts(count: number, inputLen: number, vocabSize: number, seed: number): number[][] {
  if (!(vocabSize >= 2)) throw new RangeError(`vocab size must be at least 2, got ${vocabSize}`);
  const rng = createRng(seed, PROMPT_STREAM);
  const prompts: number[][] = [];
  for (let i = 0; i < count; i++) {
    const ids = new Array<number>(inputLen);
    for (let j = 0; j < inputLen; j++) ids[j] = rng.int(vocabSize);
    prompts.push(ids);
  }
  return prompts;
}

/** Paragraphs of a text file: split on blank lines, trimmed, empty ones dropped. */
export function splitParagraphs(text: string): string[] {
  return text
    .split(/\r?\n[ \t]*\r?\n/)
    .map((p) => p.trim())
    .filter((p) => p.length > 0);
}

/**
 * Picks `count` paragraphs in a seeded shuffled order (cycling through the shuffle again when the
 * file has fewer paragraphs than requests).
 */
export function pickParagraphs(paragraphs: string[], count: number, seed: number): string[] {
  if (paragraphs.length === 0) throw new Error('the dataset has no paragraphs (text separated by blank lines)');
  const rng = createRng(seed, PROMPT_STREAM);
  const order = paragraphs.map((_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  return Array.from({ length: count }, (_, i) => paragraphs[order[i % order.length]]);
}

export async function readDatasetParagraphs(file: string, count: number, seed: number): Promise<string[]> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new Error(`cannot read --dataset ${file}: ${(err as Error).message}`);
  }
  const paragraphs = splitParagraphs(text);
  if (paragraphs.length === 0) throw new Error(`--dataset ${file} has no paragraphs (text separated by blank lines)`);
  return pickParagraphs(paragraphs, count, seed);
}

/** Roughly four characters per token for English BPE; used only when the server cannot tokenize. */
export const CHARS_PER_TOKEN_FALLBACK = 4;

/** Cuts text to at most `maxChars`, at the last space before the cut when there is one. */
export function truncateChars(text: string, maxChars: number): string {
  if (text.length <= maxChars) return text;
  const cut = text.slice(0, maxChars);
  const space = cut.lastIndexOf(' ');
  return space > maxChars / 2 ? cut.slice(0, space) : cut;
}

/**
 * Turns paragraphs into prompts for one model: token ids from the server's POST /tokenize, cut to
 * `inputLen` (shorter paragraphs stay whole). When the server has no /tokenize (404/405), falls back
 * to text cut at `inputLen * 4` characters and says so through `warn`.
 */
export async function tokenizeParagraphs(
  paragraphs: string[],
  inputLen: number,
  baseUrl: string,
  model: string,
  dispatcher: Dispatcher,
  warn: (message: string) => void,
): Promise<Array<number[] | string>> {
  const unique = [...new Set(paragraphs)];
  const byText = new Map<string, number[]>();
  let missingEndpoint = false;
  const tokenizeOne = async (text: string): Promise<void> => {
    if (missingEndpoint) return;
    const res = await request(`${baseUrl}/tokenize`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model, prompt: text }),
      dispatcher,
      signal: AbortSignal.timeout(30_000),
    });
    const body = await res.body.text();
    if (res.statusCode === 404 || res.statusCode === 405) {
      missingEndpoint = true;
      return;
    }
    if (res.statusCode !== 200) throw new Error(`POST ${baseUrl}/tokenize for model ${model}: HTTP ${res.statusCode}: ${body.slice(0, 300)}`);
    const parsed = JSON.parse(body) as { tokens?: unknown };
    if (!Array.isArray(parsed.tokens) || !parsed.tokens.every((t) => Number.isInteger(t))) {
      throw new Error(`POST ${baseUrl}/tokenize for model ${model}: answer has no integer 'tokens' array: ${body.slice(0, 200)}`);
    }
    byText.set(text, (parsed.tokens as number[]).slice(0, inputLen));
  };
  // A few at a time: enough to hide latency, few enough not to load the server before the run.
  const inFlight = 8;
  for (let i = 0; i < unique.length && !missingEndpoint; i += inFlight) {
    await Promise.all(unique.slice(i, i + inFlight).map(tokenizeOne));
  }
  if (missingEndpoint) {
    warn(
      `${baseUrl} has no POST /tokenize: dataset prompts are cut at ${inputLen * CHARS_PER_TOKEN_FALLBACK} characters ` +
        `(${CHARS_PER_TOKEN_FALLBACK} per token) and sent as text; input token counts come from usage.prompt_tokens`,
    );
    return paragraphs.map((p) => truncateChars(p, inputLen * CHARS_PER_TOKEN_FALLBACK));
  }
  return paragraphs.map((p) => byText.get(p) as number[]);
}

// Token sampling with vLLM's semantics: logit_bias → penalties → greedy, or temperature → min_p → top_k → top_p → seeded draw; raw logprobs.
import { Rng } from './rng.ts';
import type { SamplingParams } from './types.ts';

/** vLLM treats temperatures below this as greedy. */
export const GREEDY_TEMPERATURE = 1e-5;

/** What the sampler remembers about one sequence between its tokens. */
export interface SequenceSamplingState {
  rng: Rng;
  /** Tokens of the prompt (repetition penalty looks at prompt and output). */
  promptTokens: Set<number>;
  /** Generated tokens and how often each came (frequency/presence penalties count output only). */
  outputCounts: Map<number, number>;
}

/** Neutral settings (greedy, nothing truncated, biased or penalized, no stops, 16 tokens: OpenAI's default), with overrides. */
export function samplingParams(p: Partial<SamplingParams> = {}): SamplingParams {
  return {
    maxTokens: 16,
    temperature: 0,
    topP: 1,
    topK: -1,
    minP: 0,
    presencePenalty: 0,
    frequencyPenalty: 0,
    repetitionPenalty: 1,
    logitBias: new Map(),
    stop: [],
    stopTokenIds: [],
    ignoreEos: false,
    logprobs: null,
    ...p,
  };
}

export function newSamplingState(params: SamplingParams, promptTokens: readonly number[]): SequenceSamplingState {
  return {
    rng: new Rng(params.seed ?? Rng.randomSeed()),
    promptTokens: new Set(promptTokens),
    outputCounts: new Map(),
  };
}

export function recordOutputToken(state: SequenceSamplingState, tokenId: number): void {
  state.outputCounts.set(tokenId, (state.outputCounts.get(tokenId) ?? 0) + 1);
}

export interface SampledLogprobs {
  /** Log-probability of the chosen token under the raw model distribution. */
  logprob: number;
  /** The N most likely tokens under the raw distribution, most likely first. */
  top: Array<{ tokenId: number; logprob: number }>;
}

export interface SampleResult {
  tokenId: number;
  logprobs?: SampledLogprobs;
}

/**
 * Picks the next token from one row of logits. Logprobs are the log-softmax of the RAW logits (before
 * bias, penalties, temperature and truncation): vLLM v1's default `logprobs_mode = raw_logprobs`.
 */
export function sampleNext(raw: Float32Array, params: SamplingParams, state: SequenceSamplingState): SampleResult {
  const greedy = params.temperature < GREEDY_TEMPERATURE;
  const untouched = params.logitBias.size === 0 && !hasPenalties(params);
  let tokenId: number;
  if (greedy && untouched) {
    // The f32 row orders exactly as its f64 copy would: no copy (a 152K-token row costs ~1 ms to copy in JS).
    tokenId = argmax(raw);
  } else {
    // One reused f64 scratch row per vocabulary size: sampling runs synchronously, nothing keeps it.
    const logits = scratchRow(raw.length, 0);
    logits.set(raw);
    applyLogitBias(logits, params.logitBias);
    applyPenalties(logits, params, state.promptTokens, state.outputCounts);
    tokenId = greedy ? argmax(logits) : sampleScaled(logits, params, state);
  }
  const result: SampleResult = { tokenId };
  if (params.logprobs !== null) result.logprobs = rawLogprobs(raw, tokenId, params.logprobs);
  return result;
}

/**
 * Whether the next token is the plain arg max of the raw logits and nothing else of the row is needed (greedy, no
 * logit bias, no penalties, no logprobs): the runner can then pick it on the GPU ('argmax' rows) and skip the row.
 */
export function isPlainGreedy(params: SamplingParams): boolean {
  return params.temperature < GREEDY_TEMPERATURE && params.logitBias.size === 0 && !hasPenalties(params) && params.logprobs === null;
}

/** Temperature, then min-p, top-k and top-p truncation (vLLM's order), then the inverse-CDF draw. */
function sampleScaled(logits: Float64Array, params: SamplingParams, state: SequenceSamplingState): number {
  return drawScaled(logits, params, state.rng.nextFloat());
}

/** sampleScaled with the uniform given; `logits` (float64, scratch) is overwritten. */
function drawScaled(logits: Float64Array, p: Pick<SamplingParams, 'temperature' | 'minP' | 'topK' | 'topP'>, u: number): number {
  const inv = 1 / p.temperature;
  for (let i = 0; i < logits.length; i++) logits[i] *= inv;
  applyMinP(logits, p.minP);
  applyTopK(logits, p.topK);
  applyTopP(logits, p.topP);
  return drawFromLogits(logits, u);
}

/** What a 'sample' row of a step draws with: the request's truncation settings and its next uniform. */
export interface PickSampling {
  temperature: number;
  /** 0 = off. */
  topK: number;
  topP: number;
  minP: number;
  /** The request's next draw from its Rng, in [0, 1). */
  u: number;
}

/** The settings of a request's next 'sample' row; takes one uniform from its Rng, as sampleNext would. */
export function pickSampling(params: SamplingParams, state: SequenceSamplingState): PickSampling {
  return { temperature: params.temperature, topK: Math.max(0, params.topK), topP: params.topP, minP: params.minP, u: state.rng.nextFloat() };
}

/** Why a step's 'sample' settings are unusable (a runner refuses the step), or null. */
export function pickSamplingError(s: PickSampling | undefined): string | null {
  if (!s) return "a 'sample' sequence needs its sample settings";
  if (!(s.temperature >= GREEDY_TEMPERATURE) || !Number.isFinite(s.temperature)) return `sample temperature ${s.temperature} is not a positive finite number`;
  if (!Number.isInteger(s.topK) || s.topK < 0) return `sample topK ${s.topK} is not an integer ≥ 0`;
  if (!(s.topP > 0 && s.topP <= 1)) return `sample topP ${s.topP} is outside (0, 1]`;
  if (!(s.minP >= 0 && s.minP <= 1)) return `sample minP ${s.minP} is outside [0, 1]`;
  if (!(s.u >= 0 && s.u < 1)) return `sample u ${s.u} is outside [0, 1)`;
  return null;
}

/** Most top logprobs a pick row returns (OpenAI's limit; kernels/pick.ts MAX_TOP_LOGPROBS sizes its output to it). */
export const MAX_PICK_LOGPROBS = 20;

/** Most tokens a row's adjustments may list for its pick to be made on the runner (a repetition penalty lists the whole prompt); past it the row comes back and is sampled on the host. */
export const MAX_PICK_ADJUSTMENTS = 4096;

/**
 * A request's logit bias and penalties as changes to single tokens, which a runner applies before its pick:
 * v' = rep(v + bias) − subtract, with rep(x) = x > 0 ? x / r : x · r (r = repetition, 1 = none): applyLogitBias then
 * applyPenalties, token by token. Ids are distinct.
 */
export interface LogitAdjustments {
  ids: number[];
  bias: number[];
  repetition: number[];
  subtract: number[];
  /** Per entry: the token is among the output tokens counted here (its presence penalty is in `subtract`). Absent: none is. */
  output?: boolean[];
  /**
   * The penalties of one more output token that these adjustments do not count yet: the row's own input token (the
   * sequence's last token in the step), which a pipelined step only has on the device (the previous step's pick).
   * The runner adds it where it knows the token (withPendingToken).
   */
  pending?: PendingPenalty;
}

/** A request's penalties for one more output token (LogitAdjustments.pending). */
export interface PendingPenalty {
  repetition: number;
  frequency: number;
  presence: number;
}

/** The penalties a request's next output token adds (null: it has none). */
export function pendingPenalty(params: SamplingParams): PendingPenalty | null {
  return hasPenalties(params) ? { repetition: params.repetitionPenalty, frequency: params.frequencyPenalty, presence: params.presencePenalty } : null;
}

/**
 * The adjustments with `a.pending` counted for `token` (a copy without `pending`; `a` itself if it has none):
 * the token's entry takes the repetition penalty, the frequency penalty once more and the presence penalty if it
 * was no output token yet; a token without an entry gets one. What logitAdjustments gives once the token is known.
 */
export function withPendingToken(a: LogitAdjustments, token: number): LogitAdjustments {
  const p = a.pending;
  if (!p) return a;
  const out: LogitAdjustments = { ids: [...a.ids], bias: [...a.bias], repetition: [...a.repetition], subtract: [...a.subtract], output: a.ids.map((_, k) => a.output?.[k] ?? false) };
  let k = out.ids.indexOf(token);
  if (k < 0) {
    k = out.ids.push(token) - 1;
    out.bias.push(0);
    out.repetition.push(1);
    out.subtract.push(0);
    out.output!.push(false);
  }
  out.repetition[k] = p.repetition;
  out.subtract[k] += p.frequency + (out.output![k] ? 0 : p.presence);
  out.output![k] = true;
  return out;
}

/** The adjustments of a request's next token (null: none): logit bias, repetition over prompt and output, frequency and presence over the output. */
export function logitAdjustments(params: SamplingParams, state: SequenceSamplingState): LogitAdjustments | null {
  const at = new Map<number, number>();
  const a: LogitAdjustments = { ids: [], bias: [], repetition: [], subtract: [], output: [] };
  const entry = (id: number) => {
    let k = at.get(id);
    if (k === undefined) {
      k = a.ids.length;
      at.set(id, k);
      a.ids.push(id);
      a.bias.push(0);
      a.repetition.push(1);
      a.subtract.push(0);
      a.output!.push(false);
    }
    return k;
  };
  for (const [id, b] of params.logitBias) if (Number.isInteger(id) && id >= 0) a.bias[entry(id)] += b;
  if (params.repetitionPenalty !== 1) {
    for (const id of state.promptTokens) a.repetition[entry(id)] = params.repetitionPenalty;
    for (const id of state.outputCounts.keys()) a.repetition[entry(id)] = params.repetitionPenalty;
  }
  if (params.frequencyPenalty !== 0 || params.presencePenalty !== 0) {
    for (const [id, count] of state.outputCounts) a.subtract[entry(id)] = params.frequencyPenalty * count + params.presencePenalty;
  }
  for (const id of state.outputCounts.keys()) {
    const k = at.get(id);
    if (k !== undefined) a.output![k] = true;
  }
  return a.ids.length > 0 ? a : null;
}

/** Applies adjustments to a float64 row (ids outside the row are skipped, as applyLogitBias does). */
export function applyLogitAdjustments(logits: Float64Array, a: LogitAdjustments): void {
  if (a.pending) throw new Error('adjustments with a pending token: resolve them with withPendingToken first');
  a.ids.forEach((id, k) => {
    if (id < 0 || id >= logits.length) return;
    let v = logits[id] + a.bias[k];
    const r = a.repetition[k];
    if (r !== 1) v = v > 0 ? v / r : v * r;
    logits[id] = v - a.subtract[k];
  });
}

/** Why a step sequence's adjustments or logprobs are unusable (only pick rows take them), or null. */
export function pickAdjustError(s: { logits: string; adjust?: LogitAdjustments; logprobs?: number }, vocab: number): string | null {
  if (s.logprobs !== undefined) {
    if (s.logits !== 'argmax' && s.logits !== 'sample') return `logprobs come with 'argmax' or 'sample' rows, not '${s.logits}'`;
    const most = Math.min(MAX_PICK_LOGPROBS, vocab);
    if (!Number.isInteger(s.logprobs) || s.logprobs < 0 || s.logprobs > most) return `logprobs ${s.logprobs} is not an integer in 0 … ${most}`;
  }
  if (!s.adjust) return null;
  if (s.logits !== 'argmax' && s.logits !== 'sample') return `adjustments come with 'argmax' or 'sample' rows, not '${s.logits}'`;
  return logitAdjustmentsError(s.adjust, vocab);
}

/** Why a step's adjustments are unusable for a row of `vocab` logits, or null. */
function logitAdjustmentsError(a: LogitAdjustments, vocab: number): string | null {
  const n = a.ids.length;
  if (a.bias.length !== n || a.repetition.length !== n || a.subtract.length !== n || (a.output && a.output.length !== n)) {
    return 'adjustments: ids, bias, repetition, subtract and output differ in length';
  }
  const p = a.pending;
  if (p && (!(p.repetition > 0) || !Number.isFinite(p.repetition) || !Number.isFinite(p.frequency) || !Number.isFinite(p.presence))) {
    return `adjustments: pending penalties repetition ${p.repetition}, frequency ${p.frequency}, presence ${p.presence}`;
  }
  const seen = new Set<number>();
  for (let k = 0; k < n; k++) {
    const id = a.ids[k];
    if (!Number.isInteger(id) || id < 0 || id >= vocab) return `adjustments: token id ${id} is outside the vocabulary of ${vocab}`;
    if (seen.has(id)) return `adjustments: token id ${id} is listed twice`;
    seen.add(id);
    if (!Number.isFinite(a.bias[k]) || !(a.repetition[k] > 0) || !Number.isFinite(a.repetition[k]) || !Number.isFinite(a.subtract[k])) {
      return `adjustments: token ${id} has bias ${a.bias[k]}, repetition ${a.repetition[k]}, subtract ${a.subtract[k]}`;
    }
  }
  return null;
}

/**
 * The token a pick row makes, in float64 on the host (the CPU runner; the GPU kernel's reference): the adjustments,
 * then the greedy arg max or the draw.
 */
export function pickOnHost(raw: ArrayLike<number>, sample: PickSampling | null, adjust?: LogitAdjustments | null): number {
  const logits = scratchRow(raw.length, 0);
  logits.set(raw);
  if (adjust) applyLogitAdjustments(logits, adjust);
  return sample ? drawScaled(logits, sample, sample.u) : argmax(logits);
}

/** Raw logprobs of a row (before bias, penalties, temperature): the token's and the n most likely (vLLM's raw_logprobs). */
export function rawLogprobs(raw: ArrayLike<number>, tokenId: number, n: number): SampledLogprobs {
  const lp = logSoftmax(raw);
  return { logprob: lp[tokenId], top: topN(lp, n).map((i) => ({ tokenId: i, logprob: lp[i] })) };
}


/** Whether a request penalizes tokens (repetition, frequency, presence): its changes depend on its output so far. */
export function hasPenalties(p: Pick<SamplingParams, 'repetitionPenalty' | 'frequencyPenalty' | 'presencePenalty'>): boolean {
  return p.repetitionPenalty !== 1 || p.frequencyPenalty !== 0 || p.presencePenalty !== 0;
}

const scratch = new Map<string, Float64Array>();

/** A reused f64 row of `length` values (slot 0: the logits being sampled, 1: their probabilities). */
function scratchRow(length: number, slot: 0 | 1): Float64Array {
  const key = `${slot}:${length}`;
  let row = scratch.get(key);
  if (!row) {
    row = new Float64Array(length);
    scratch.set(key, row);
  }
  return row;
}

export function applyLogitBias(logits: Float64Array, bias: ReadonlyMap<number, number>): void {
  for (const [id, b] of bias) {
    if (id >= 0 && id < logits.length) logits[id] += b;
  }
}

/**
 * vLLM's penalties: repetition (prompt and output tokens: positive logits divided by it, negative
 * multiplied), then frequency (× output count) and presence (once if in the output) subtracted.
 */
export function applyPenalties(
  logits: Float64Array,
  p: Pick<SamplingParams, 'repetitionPenalty' | 'frequencyPenalty' | 'presencePenalty'>,
  promptTokens: ReadonlySet<number>,
  outputCounts: ReadonlyMap<number, number>,
): void {
  if (p.repetitionPenalty !== 1) {
    const r = p.repetitionPenalty;
    const penalize = (id: number) => {
      logits[id] = logits[id] > 0 ? logits[id] / r : logits[id] * r;
    };
    for (const id of promptTokens) penalize(id);
    for (const id of outputCounts.keys()) if (!promptTokens.has(id)) penalize(id);
  }
  if (p.frequencyPenalty !== 0 || p.presencePenalty !== 0) {
    for (const [id, count] of outputCounts) logits[id] -= p.frequencyPenalty * count + p.presencePenalty;
  }
}

/** First index of the largest value (ties go to the lower token id). */
export function argmax(v: ArrayLike<number>): number {
  let best = 0;
  let bestValue = v[0];
  for (let i = 1; i < v.length; i++) {
    if (v[i] > bestValue) {
      best = i;
      bestValue = v[i];
    }
  }
  return best;
}

/** Softmax probabilities (float64; masked −∞ entries get 0). */
export function softmax(logits: ArrayLike<number>, out?: Float64Array): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  const p = out ?? new Float64Array(logits.length);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) {
    const e = Math.exp(logits[i] - max);
    p[i] = e;
    sum += e;
  }
  for (let i = 0; i < p.length; i++) p[i] /= sum;
  return p;
}

export function logSoftmax(logits: ArrayLike<number>): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  const lse = max + Math.log(sum);
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i] - lse;
  return out;
}

/** Masks tokens whose probability is below minP × the top token's probability. */
export function applyMinP(logits: Float64Array, minP: number): void {
  if (!(minP > 0)) return;
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  // p_i < minP · p_max  ⇔  logit_i < logit_max + ln(minP)
  const cut = max + Math.log(minP);
  for (let i = 0; i < logits.length; i++) if (logits[i] < cut) logits[i] = -Infinity;
}

/** Keeps the k largest logits (and any tied with the k-th); k ≤ 0 or ≥ vocab is off. */
export function applyTopK(logits: Float64Array, k: number): void {
  if (k <= 0 || k >= logits.length) return;
  const kth = kthLargest(logits, k);
  for (let i = 0; i < logits.length; i++) if (logits[i] < kth) logits[i] = -Infinity;
}

/**
 * Nucleus: keeps the most likely tokens, in order, while the probability of those before them is < p
 * (vLLM: sorted ascending, masks where the cumulative sum ≤ 1 − p; the top token always stays).
 */
export function applyTopP(logits: Float64Array, p: number): void {
  if (p >= 1) return;
  const probs = softmax(logits, scratchRow(logits.length, 1));
  // The nucleus lies inside {i : prob_i ≥ t} as soon as that set holds ≥ p of the mass, so only it is sorted.
  let t = 0;
  for (let i = 0; i < probs.length; i++) if (probs[i] > t) t = probs[i];
  for (;;) {
    let mass = 0;
    for (let i = 0; i < probs.length; i++) if (probs[i] >= t) mass += probs[i];
    if (mass >= p || t === 0) break;
    t = t < 1e-300 ? 0 : t / 16;
  }
  // The kept set in (probability desc, index asc) order is decided by the sorted values alone: sort just the
  // candidates' probabilities (a native numeric sort), find how many are kept and the last kept value c, then keep
  // every token above c and the first few (in index order) equal to it.
  let n = 0;
  for (let i = 0; i < probs.length; i++) if (probs[i] >= t && probs[i] > 0) n++;
  const sorted = new Float64Array(n);
  n = 0;
  for (let i = 0; i < probs.length; i++) if (probs[i] >= t && probs[i] > 0) sorted[n++] = probs[i];
  sorted.sort();
  let before = 0;
  let kept = 0;
  for (let j = n - 1; j >= 0 && before < p; j--) {
    before += sorted[j];
    kept++;
  }
  const c = sorted[n - kept];
  let equalKept = 0;
  for (let j = n - kept; j < n && sorted[j] === c; j++) equalKept++;
  for (let i = 0; i < logits.length; i++) {
    if (probs[i] > c) continue;
    if (probs[i] === c && equalKept > 0) {
      equalKept--;
      continue;
    }
    logits[i] = -Infinity;
  }
}

/** Inverse-CDF draw over softmax(logits) with a uniform u ∈ [0, 1). */
export function drawFromLogits(logits: Float64Array, u: number): number {
  const probs = softmax(logits, scratchRow(logits.length, 1));
  const target = u; // probs sum to 1 up to rounding
  let cum = 0;
  let last = -1;
  for (let i = 0; i < probs.length; i++) {
    if (probs[i] <= 0) continue;
    cum += probs[i];
    last = i;
    if (cum > target) return i;
  }
  if (last < 0) throw new Error('every token is masked; nothing to sample');
  return last;
}

/** Indices of the n largest values, largest first (ties: lower index first). */
export function topN(values: ArrayLike<number>, n: number): number[] {
  const k = Math.min(n, values.length);
  if (k <= 0) return [];
  const out: number[] = [];
  for (let i = 0; i < values.length; i++) {
    if (out.length < k) out.push(i);
    else if (values[i] > values[out[k - 1]]) out[k - 1] = i;
    else continue;
    // Bubble into place in a short sorted list: n is small (OpenAI caps logprobs at 20).
    for (let j = out.length - 1; j > 0 && values[out[j]] > values[out[j - 1]]; j--) {
      const tmp = out[j];
      out[j] = out[j - 1];
      out[j - 1] = tmp;
    }
  }
  return out;
}

/** The k-th largest value (1-based) through a size-k min-heap. */
function kthLargest(values: Float64Array, k: number): number {
  const heap = new Float64Array(k);
  let size = 0;
  const siftDown = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < size && heap[l] < heap[m]) m = l;
      if (r < size && heap[r] < heap[m]) m = r;
      if (m === i) return;
      const tmp = heap[i];
      heap[i] = heap[m];
      heap[m] = tmp;
      i = m;
    }
  };
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (size < k) {
      let c = size++;
      heap[c] = v;
      while (c > 0) {
        const parent = (c - 1) >> 1;
        if (heap[parent] <= heap[c]) break;
        const tmp = heap[parent];
        heap[parent] = heap[c];
        heap[c] = tmp;
        c = parent;
      }
    } else if (v > heap[0]) {
      heap[0] = v;
      siftDown(0);
    }
  }
  return heap[0];
}

// The serving engine of one model: a step loop that batches every running request into one runner step, samples, streams events.
import { BlockPool } from '../cache/block-pool.ts';
import { KvCacheManager } from '../cache/kv-manager.ts';
import { IncrementalDetokenizer, tokenTextInContext } from '../model/detokenize.ts';
import type { Tokenizer } from '../model/tokenizer.ts';
import {
  GREEDY_TEMPERATURE,
  isPlainGreedy,
  logitAdjustments,
  logSoftmax,
  MAX_PICK_ADJUSTMENTS,
  MAX_PICK_LOGPROBS,
  newSamplingState,
  pendingPenalty,
  pickSampling,
  recordOutputToken,
  sampleNext,
  topN,
  type SampleResult,
  type SequenceSamplingState,
} from './sampler.ts';
import { Scheduler, type SchedRequest, type StepPlan } from './scheduler.ts';
import { isStopToken, StopStringMatcher } from './stop.ts';
import type {
  EngineStats,
  FinishReason,
  GenerationEvent,
  GenerationRequest,
  ModelInfo,
  ModelRunner,
  PromptTokenLogprob,
  ServingEngine,
  StepObservation,
  StepOutput,
  StepSequence,
} from './types.ts';

/** A request the engine refuses before queueing it (bad ids, too long for the context or the KV pool). */
export class InvalidRequestError extends Error {
  constructor(
    message: string,
    readonly param: string | null = null,
  ) {
    super(message);
  }
}

/** Turns generated ids into text deltas that never end inside a UTF-8 character. */
export interface TextDeltaStream {
  push(ids: number[]): string;
  flush(): string;
}

export interface EngineOptions {
  runner: ModelRunner;
  info: ModelInfo;
  /** Most sequences in one step (default 256). */
  maxNumSeqs?: number;
  /** Most requests waiting for admission before QueueFullError (default 1024). */
  maxQueue?: number;
  /** Most token rows in one step: decode tokens plus prompt chunks (default 2048). */
  maxBatchedTokens?: number;
  /** KV cache element type, for stats (default: the runner's `cacheDtype` if it has one, else 'f16'). */
  cacheDtype?: string;
  /** Text delta stream per request, given the prompt as context (default: model/detokenize.ts IncrementalDetokenizer). */
  detokenizer?: (tokenizer: Tokenizer, promptTokens: number[]) => TextDeltaStream;
  /**
   * Pipelined decode (default true): while a step of picked decodes (greedy or drawn on the runner) runs, the next one is planned and submitted with
   * the running step's picks as its tokens (on the device), so the host's recording, detokenizing and streaming
   * overlap the device instead of alternating with it (vLLM's async scheduling). Admissions wait for a plan made after
   * results, so it only runs while nothing waiting could be admitted; a row of a request that finished in the step
   * before is computed and dropped.
   */
  pipelineDecode?: boolean;
  /**
   * Every request's tokens are picked on the runner (default true): a 'sample' row with the request's settings and its
   * next uniform, or an 'argmax' row, after the request's logit bias and penalties (up to MAX_PICK_ADJUSTMENTS tokens
   * of them), with its raw logprobs where it wants them, so one id (and ≤ 20 logprobs) comes back instead of a vocab
   * row. Picked rows pipeline like greedy ones (a penalized row's in-flight token is added on the runner). Off: only plain greedy rows are picked;
   * every other row comes back and is sampled on the host.
   */
  samplePicks?: boolean;
}

/** A step handed to the runner and not yet processed. */
interface SubmittedStep {
  plan: StepPlan<EngineRequest>;
  seqs: StepSequence[];
  /** Per chunk: every row's logits come back (prompt logprobs); the token is picked on the runner (no row back). */
  allRows: boolean[];
  picked: boolean[];
  submittedAt: number;
  result: Promise<StepOutput>;
}

/** The engine's extra figures beyond ServingEngine (tests and the CLI read them). */
export interface Engine extends ServingEngine {
  readonly runner: ModelRunner;
  /** Blocks held by live requests right now (0 once everything finished: no leaks). */
  heldBlocks(): number;
}

/** One request inside the engine. */
interface EngineRequest extends SchedRequest {
  tokens: number[];
  params: GenerationRequest['params'];
  sampling: SequenceSamplingState;
  detok: TextDeltaStream;
  stopMatcher: StopStringMatcher;
  events: EventChannel<GenerationEvent>;
  arrivalMs: number;
  queueSeconds: number | null;
  completionTokens: number;
  done: boolean;
  abortRequested: boolean;
  detachSignal: () => void;
  /** Top-N of prompt logprobs (echo + logprobs), null = none. */
  promptLogprobsN: number | null;
  /** Prompt logprobs by position, filled as prefill chunks run; sent (and dropped) with the first token. */
  promptLogprobs: PromptTokenLogprob[] | null;
}

export function createEngine(opts: EngineOptions): Engine {
  return new BatchingEngine(opts);
}

class BatchingEngine implements Engine {
  readonly info: ModelInfo;
  readonly runner: ModelRunner;
  private readonly pool: BlockPool;
  private readonly kv: KvCacheManager;
  private readonly scheduler: Scheduler<EngineRequest>;
  private readonly listeners: Array<(o: StepObservation) => void> = [];
  private readonly makeDetok: (t: Tokenizer, promptTokens: number[]) => TextDeltaStream;
  private readonly cacheDtype: string;
  private readonly live = new Map<string, EngineRequest>();
  private counters = { prefixCacheQueries: 0, prefixCacheHits: 0, promptTokens: 0, generationTokens: 0, steps: 0 };
  private stepping = false;
  /** The pipelined step submitted behind the one being processed (its tokens are that one's picks). */
  private next: SubmittedStep | null = null;
  private readonly pipelineDecode: boolean;
  private readonly samplePicks: boolean;
  private readonly maxNumSeqs: number;
  private lastStepDoneAt = 0;
  private loopRunning = false;
  private accepting = true;
  private fatal: Error | null = null;
  private wake: (() => void) | null = null;
  private loopDone: Promise<void> = Promise.resolve();

  constructor(opts: EngineOptions) {
    this.info = opts.info;
    this.runner = opts.runner;
    this.pool = new BlockPool(opts.runner.numBlocks);
    this.kv = new KvCacheManager(this.pool, opts.runner.blockSize);
    this.pipelineDecode = opts.pipelineDecode ?? true;
    this.samplePicks = opts.samplePicks ?? true;
    this.maxNumSeqs = opts.maxNumSeqs ?? 256;
    this.scheduler = new Scheduler<EngineRequest>(this.kv, {
      maxNumSeqs: this.maxNumSeqs,
      maxBatchedTokens: opts.maxBatchedTokens ?? 2048,
      maxQueue: opts.maxQueue ?? 1024,
    });
    this.makeDetok = opts.detokenizer ?? ((t, prompt) => new IncrementalDetokenizer(t, prompt));
    this.cacheDtype = opts.cacheDtype ?? (opts.runner as { cacheDtype?: string }).cacheDtype ?? 'f16';
  }

  generate(req: GenerationRequest): AsyncIterable<GenerationEvent> {
    if (this.fatal) throw new Error(`model ${this.info.name} is unavailable after an engine failure: ${this.fatal.message}`);
    if (!this.accepting) throw new Error(`model ${this.info.name} is shutting down and takes no new requests`);
    this.validate(req);
    if (this.live.has(req.requestId)) throw new InvalidRequestError(`request id ${req.requestId} is already in use`);

    const events = new EventChannel<GenerationEvent>(() => this.abort(r));
    const r: EngineRequest = {
      requestId: req.requestId,
      tokens: req.promptTokens.slice(),
      blockHashes: [],
      numComputed: 0,
      cachedPromptTokens: null,
      promptLength: req.promptTokens.length,
      preemptions: 0,
      params: req.params,
      sampling: newSamplingState(req.params, req.promptTokens),
      detok: this.makeDetok(this.info.tokenizer, req.promptTokens),
      stopMatcher: new StopStringMatcher(req.params.stop),
      events,
      arrivalMs: performance.now(),
      queueSeconds: null,
      completionTokens: 0,
      done: false,
      abortRequested: false,
      detachSignal: () => {},
      promptLogprobsN: req.promptLogprobs ?? null,
      promptLogprobs: null,
      bypassPrefixCache: req.promptLogprobs != null,
    };
    this.scheduler.add(r); // throws QueueFullError before anything is registered
    this.live.set(r.requestId, r);
    if (req.signal) {
      const signal = req.signal;
      const onAbort = () => this.abort(r);
      if (signal.aborted) queueMicrotask(onAbort);
      else {
        signal.addEventListener('abort', onAbort, { once: true });
        r.detachSignal = () => signal.removeEventListener('abort', onAbort);
      }
    }
    this.kick();
    return events;
  }

  stats(): EngineStats {
    const c = this.pool.counts();
    const bytesPerToken = this.runner.kvBytesPerToken;
    const blockBytes = this.runner.blockSize * bytesPerToken;
    return {
      running: this.scheduler.running.length,
      waiting: this.scheduler.waiting.length,
      kv: {
        blockSize: this.runner.blockSize,
        numBlocks: c.numBlocks,
        freeBlocks: c.free,
        usedBlocks: c.used,
        cachedBlocks: c.cached,
        bytesPerToken,
        capacityBytes: c.numBlocks * blockBytes,
        usedBytes: c.used * blockBytes,
        cacheDtype: this.cacheDtype,
      },
      preemptions: this.scheduler.preemptions,
      ...this.counters,
    };
  }

  onStep(listener: (o: StepObservation) => void): void {
    this.listeners.push(listener);
  }

  healthy(): boolean {
    return this.fatal === null;
  }

  heldBlocks(): number {
    return this.pool.counts().used;
  }

  async shutdown(deadlineMs = 30_000): Promise<void> {
    this.accepting = false;
    const until = performance.now() + deadlineMs;
    while (this.live.size > 0 && performance.now() < until && !this.fatal) {
      await new Promise((r) => setTimeout(r, Math.min(20, Math.max(1, until - performance.now()))));
    }
    for (const r of [...this.live.values()]) this.abort(r);
    this.kick();
    await this.loopDone;
    this.runner.destroy();
  }

  private validate(req: GenerationRequest): void {
    const { promptTokens, params } = req;
    const vocab = this.info.config.vocabSize;
    const blockSize = this.runner.blockSize;
    if (promptTokens.length === 0) throw new InvalidRequestError('the prompt is empty; give at least one token', 'prompt');
    for (const id of promptTokens) {
      if (!Number.isInteger(id) || id < 0 || id >= vocab) throw new InvalidRequestError(`prompt token id ${id} is outside the vocabulary (0..${vocab - 1})`, 'prompt');
    }
    for (const id of params.logitBias.keys()) {
      if (!Number.isInteger(id) || id < 0 || id >= vocab) throw new InvalidRequestError(`logit_bias token id ${id} is outside the vocabulary (0..${vocab - 1})`, 'logit_bias');
    }
    if (req.promptLogprobs != null && (!Number.isInteger(req.promptLogprobs) || req.promptLogprobs < 0)) {
      throw new InvalidRequestError(`prompt logprobs must be a whole number >= 0, got ${req.promptLogprobs}`, 'logprobs');
    }
    if (!Number.isInteger(params.maxTokens) || params.maxTokens < 1) throw new InvalidRequestError(`max_tokens must be a positive integer, got ${params.maxTokens}`, 'max_tokens');
    const total = promptTokens.length + params.maxTokens;
    if (total > this.info.maxModelLen) {
      throw new InvalidRequestError(
        `prompt (${promptTokens.length} tokens) + max_tokens (${params.maxTokens}) = ${total} exceeds the model's context of ${this.info.maxModelLen} tokens`,
        'max_tokens',
      );
    }
    // A sequence that could outgrow the whole pool would preempt itself forever: refuse it up front.
    const capacity = this.runner.numBlocks * blockSize;
    if (total > capacity) {
      throw new InvalidRequestError(
        `prompt (${promptTokens.length} tokens) + max_tokens (${params.maxTokens}) = ${total} tokens do not fit in the KV cache of ${this.runner.numBlocks} blocks × ${blockSize} = ${capacity} tokens; lower max_tokens or give the model more KV memory`,
        'max_tokens',
      );
    }
  }

  /** Cancels a request (client gone, iterator closed, shutdown); its blocks are freed at once, or right after the step in flight. */
  private abort(r: EngineRequest): void {
    if (r.done) return;
    r.abortRequested = true;
    if (!this.stepping) this.finish(r, 'abort');
  }

  private kick(): void {
    if (this.wake) {
      const w = this.wake;
      this.wake = null;
      w();
    }
    if (!this.loopRunning && !this.fatal) {
      this.loopRunning = true;
      // Start on the next turn of the event loop: requests submitted in the same tick join the first step.
      this.loopDone = new Promise((resolve) => setImmediate(resolve)).then(() => this.loop()).finally(() => {
        this.loopRunning = false;
      });
    }
  }

  private async loop(): Promise<void> {
    while (!this.fatal) {
      if (!this.scheduler.hasWork() && !this.next) {
        if (!this.accepting) return;
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
        continue;
      }
      try {
        await this.step();
      } catch (err) {
        // A pipelined step behind the failed one still runs on the device: let it end before the runner can go.
        const behind = this.next;
        this.next = null;
        if (behind) await behind.result.catch(() => {});
        this.stepping = false;
        this.fail(err instanceof Error ? err : new Error(String(err)));
        return;
      }
      // Let HTTP handlers, aborts and new submissions in between steps.
      await new Promise((resolve) => setImmediate(resolve));
    }
  }

  private async step(): Promise<void> {
    let current = this.next;
    this.next = null;
    if (!current) {
      const plan = this.scheduler.schedule();
      if (plan.chunks.length === 0) {
        if (plan.preempted.length > 0 || this.scheduler.running.length > 0) return;
        // Nothing runs and the head of the queue still cannot be admitted: fail it rather than spin.
        const head = this.scheduler.waiting[0];
        if (head) this.finishWithError(head, new Error(`request ${head.requestId} (${head.tokens.length} tokens) cannot be admitted: the KV pool has ${this.pool.numFree} free blocks of ${this.runner.blockSize} tokens and nothing running to wait for`));
        return;
      }
      this.account(plan);
      current = this.submit(plan, null);
    }
    // While it runs, the step after it goes in too when it can be planned without its results.
    if (this.pipelineDecode) this.next = this.pipelined(current);
    let out: StepOutput;
    try {
      out = await current.result;
    } finally {
      if (!this.next) this.stepping = false;
    }
    const seconds = (performance.now() - Math.max(current.submittedAt, this.lastStepDoneAt)) / 1000;
    this.lastStepDoneAt = performance.now();
    const { plan, seqs, allRows, picked } = current;
    const { logits, picks } = out;
    // Rows of requests that ended before this step's results (a pipelined step's rows for a request that finished in
    // the step before it, or one that failed) are dropped: their blocks are gone, nothing is committed for them.
    this.scheduler.completeStep({ ...plan, chunks: plan.chunks.filter((c) => !c.req.done) });
    this.counters.steps++;

    const vocab = this.info.config.vocabSize;
    const rowsWanted = plan.chunks.reduce((n, c, i) => n + (allRows[i] ? c.numNewTokens : c.samples && !picked[i] ? 1 : 0), 0);
    const picksWanted = picked.filter(Boolean).length;
    if (logits.length < rowsWanted * vocab || picks.length < picksWanted) {
      throw new Error(`the runner returned ${logits.length / vocab} logits rows and ${picks.length} picks where the step asked for ${rowsWanted} and ${picksWanted}`);
    }
    let row = 0;
    let pick = 0;
    plan.chunks.forEach((c, i) => {
      const first = row;
      row += allRows[i] ? c.numNewTokens : c.samples && !picked[i] ? 1 : 0;
      const k = picked[i] ? pick++ : -1;
      const tokenId = k >= 0 ? picks[k] : -1;
      if (c.req.done || c.req.abortRequested) return;
      if (allRows[i]) this.recordPromptLogprobs(c.req, c.startPos, logits.subarray(first * vocab, row * vocab));
      if (picked[i]) this.acceptToken(c.req, tokenId, out.pickLogprobs?.[k] ?? undefined);
      else if (c.samples) this.emitToken(c.req, logits.subarray((row - 1) * vocab, row * vocab));
    });
    // Cancellations that arrived during the step free their blocks now, before the next plan. (A pipelined step still
    // in flight may write into them: the device runs steps in order, so whoever gets a block next writes after it.)
    for (const r of [...this.live.values()]) if (r.abortRequested && !r.done) this.finish(r, 'abort');

    const tokens = seqs.reduce((n, s) => n + s.tokens.length, 0);
    const decodeRows = plan.chunks.filter((c) => c.numNewTokens === 1 && c.startPos >= c.req.promptLength).length;
    const obs: StepObservation = {
      seconds,
      batchSize: seqs.length,
      tokens,
      promptTokens: tokens - decodeRows,
      pipelined: seqs.some((s) => s.previousPick !== undefined),
      ...(out.gpuMs !== undefined ? { gpuSeconds: out.gpuMs / 1000 } : {}),
    };
    for (const l of this.listeners) l(obs);
  }

  /** Hands a plan to the runner; `previousPicks[i]` (pipelined steps) is chunk i's pick number in the step in flight. */
  private submit(plan: StepPlan<EngineRequest>, previousPicks: number[] | null): SubmittedStep {
    // A chunk with rows that predict prompt tokens of a prompt-logprobs request returns every row; others the last or none.
    const allRows = plan.chunks.map((c) => c.req.bypassPrefixCache === true && c.req.promptLogprobsN !== null && c.startPos < c.req.promptLength - 1);
    // Sampling rows get their token picked where the logits are (one id, and the raw logprobs asked for, come back
    // instead of a vocab row), after the request's bias and penalties; a sampled row takes the request's next uniform
    // now, as the host sampler would for that token. Past the runner's limits (adjustments, top logprobs) the row
    // comes back and is sampled here.
    const rows = plan.chunks.map((c, i) => {
      const p = c.req.params;
      if (allRows[i] || !c.samples) return null;
      if (isPlainGreedy(p)) return { kind: 'argmax' as const, adjust: null };
      if (!this.samplePicks) return null;
      // A pipelined row's input token is the step in flight's pick, which the request's output does not hold yet:
      // the runner adds its penalties (pending) where the token is.
      const known = logitAdjustments(p, c.req.sampling);
      const pending = previousPicks ? pendingPenalty(p) : null;
      const adjust = pending ? { ...(known ?? { ids: [], bias: [], repetition: [], subtract: [], output: [] }), pending } : known;
      if (adjust && adjust.ids.length + (pending ? 1 : 0) > MAX_PICK_ADJUSTMENTS) return null;
      if (p.logprobs !== null && p.logprobs > Math.min(MAX_PICK_LOGPROBS, this.info.config.vocabSize)) return null;
      return { kind: p.temperature < GREEDY_TEMPERATURE ? ('argmax' as const) : ('sample' as const), adjust };
    });
    const picked = rows.map((k) => k !== null);
    const seqs: StepSequence[] = plan.chunks.map((c, i) => {
      const r = rows[i];
      return {
        // A pipelined row's token is not known here: a placeholder id, replaced on the device by the pick it names.
        tokens: previousPicks ? [0] : c.req.tokens.slice(c.startPos, c.startPos + c.numNewTokens),
        startPos: c.startPos,
        blockTable: this.kv.blockTable(c.req.requestId),
        logits: allRows[i] ? 'all' : (r?.kind ?? (c.samples ? 'last' : 'none')),
        ...(r?.kind === 'sample' ? { sample: pickSampling(c.req.params, c.req.sampling) } : {}),
        ...(r?.adjust ? { adjust: r.adjust } : {}),
        ...(r && c.req.params.logprobs !== null ? { logprobs: c.req.params.logprobs } : {}),
        ...(previousPicks ? { previousPick: previousPicks[i] } : {}),
      };
    });
    this.stepping = true;
    const result = this.runner.stepOutput(seqs);
    // Awaited in its turn; a failure of a step nobody awaits yet must not count as unhandled meanwhile.
    result.catch(() => {});
    return { plan, seqs, allRows, picked, submittedAt: performance.now(), result };
  }

  /**
   * The step after `cur`, submitted now with cur's picks as its tokens, or null where it needs cur's results:
   * a row that is not picked on the runner, a request that may be admitted, a pool without the blocks. Requests that
   * cur's token ends for certain (max_tokens, the model's length) are left out; one that stops on a stop token or
   * string is only known afterwards, and its row is dropped then.
   */
  private pipelined(cur: SubmittedStep): SubmittedStep | null {
    const chunks = cur.plan.chunks;
    if (chunks.length === 0 || !cur.picked.every(Boolean)) return null;
    // A running request the step left out (token budget) would wait for as long as the pipeline runs.
    const inStep = new Set(chunks.map((c) => c.req));
    if (this.scheduler.running.some((r) => !inStep.has(r))) return null;
    const head = this.scheduler.waiting[0];
    if (head && this.scheduler.running.length < this.maxNumSeqs && this.kv.blocksFor(head.tokens.length) <= this.pool.numFree) return null;
    // Every chunk is picked, so chunk k's pick is pick number k.
    const going = chunks
      .map((c, k) => ({ c, k, end: c.startPos + c.numNewTokens }))
      .filter(({ c, end }) => !c.req.done && !c.req.abortRequested && c.req.completionTokens + 1 < c.req.params.maxTokens && end + 1 < this.info.maxModelLen);
    if (going.length === 0) return null;
    const need = going.reduce((n, { c, end }) => n + this.kv.blocksToReserve(c.req, end + 1), 0);
    if (need > this.pool.numFree) return null;
    for (const { c, end } of going) this.kv.reserve(c.req, end + 1);
    const plan: StepPlan<EngineRequest> = {
      chunks: going.map(({ c, end }) => ({ req: c.req, startPos: end, numNewTokens: 1, samples: true })),
      preempted: [],
      admitted: [],
      prefixQueries: 0,
      prefixHits: 0,
    };
    return this.submit(
      plan,
      going.map(({ k }) => k),
    );
  }

  private account(plan: StepPlan<EngineRequest>): void {
    this.counters.prefixCacheQueries += plan.prefixQueries;
    this.counters.prefixCacheHits += plan.prefixHits;
    for (const r of plan.admitted) {
      if (r.queueSeconds === null) {
        r.queueSeconds = (performance.now() - r.arrivalMs) / 1000;
        this.counters.promptTokens += r.promptLength;
      }
    }
  }

  /**
   * Keeps the logprobs of the prompt tokens that rows [startPos, startPos + rows) predict: row p's log-softmax
   * scores prompt token p + 1. Raw logits (no bias, penalties or temperature), as vLLM's prompt_logprobs.
   */
  private recordPromptLogprobs(r: EngineRequest, startPos: number, rows: Float32Array): void {
    const n = r.promptLogprobsN ?? 0;
    const vocab = this.info.config.vocabSize;
    const prompt = r.tokens.slice(0, r.promptLength);
    r.promptLogprobs ??= this.promptEntries(prompt);
    const numRows = rows.length / vocab;
    for (let k = 0; k < numRows; k++) {
      const target = startPos + k + 1;
      if (target >= r.promptLength) break;
      const lp = logSoftmax(rows.subarray(k * vocab, (k + 1) * vocab));
      const entry = r.promptLogprobs[target];
      entry.logprob = lp[entry.tokenId];
      const context = prompt.slice(Math.max(0, target - 6), target);
      entry.top = topN(lp, n).map((id) => ({ token: id === entry.tokenId ? entry.token : this.alternativeText(context, id), tokenId: id, logprob: lp[id] }));
    }
  }

  /** Prompt entries before any row ran: each token with the text it adds to the decoded prompt (their concatenation is decode(prompt)). */
  private promptEntries(prompt: number[]): PromptTokenLogprob[] {
    const detok = new IncrementalDetokenizer(this.info.tokenizer);
    const texts = prompt.map((id) => detok.push([id]));
    texts[texts.length - 1] += detok.flush();
    return texts.map((token, p) => ({ token, tokenId: prompt[p], logprob: null, top: null }));
  }

  /** A top-logprob alternative's display text: what it would add after `context`, or its piece when it adds none ("</s>"). */
  private alternativeText(context: readonly number[], id: number): string {
    return tokenTextInContext(this.info.tokenizer, context, id) || this.info.tokenizer.idToToken(id);
  }

  /** Samples a request's next token from its logits row, then accepts it. */
  private emitToken(r: EngineRequest, row: Float32Array): void {
    const { tokenId, logprobs } = sampleNext(row, r.params, r.sampling);
    this.acceptToken(r, tokenId, logprobs);
  }

  /** Streams a request's next token and ends the request when a stop condition holds. */
  private acceptToken(r: EngineRequest, tokenId: number, logprobs?: SampleResult['logprobs']): void {
    const context = r.tokens.slice(-6);
    recordOutputToken(r.sampling, tokenId);
    r.tokens.push(tokenId);
    r.completionTokens++;
    this.counters.generationTokens++;

    let text = '';
    // The text this token adds to the output, for its logprob entry (held-back bytes go to the token that completes them).
    let tokenText = '';
    let finish: FinishReason | null = null;
    if (isStopToken(tokenId, r.params, this.info.tokenizer.eosId ?? this.info.config.eosId)) {
      // Like vLLM: the stop token counts as generated but its text is not shown.
      finish = 'stop';
      tokenText = r.detok.flush();
      text = r.stopMatcher.push(tokenText).text + r.stopMatcher.flush();
    } else {
      tokenText = r.detok.push([tokenId]);
      const m = r.stopMatcher.push(tokenText);
      text = m.text;
      if (m.stopped) finish = 'stop';
      else if (r.completionTokens >= r.params.maxTokens || r.tokens.length >= this.info.maxModelLen) {
        const flushed = r.detok.flush();
        tokenText += flushed;
        const tail = r.stopMatcher.push(flushed);
        text += tail.text;
        if (tail.stopped) finish = 'stop';
        else {
          text += r.stopMatcher.flush();
          finish = 'length';
        }
      }
    }
    const event: GenerationEvent = { type: 'token', tokenIds: [tokenId], text };
    if (logprobs) {
      event.logprobs = [
        {
          token: tokenText,
          tokenId,
          logprob: logprobs.logprob,
          top: logprobs.top.map((t) => ({ token: t.tokenId === tokenId ? tokenText : this.alternativeText(context, t.tokenId), tokenId: t.tokenId, logprob: t.logprob })),
        },
      ];
    }
    if (r.promptLogprobsN !== null && r.bypassPrefixCache) {
      // A one-token prompt has no rows to score: its entry alone, logprob null.
      event.promptLogprobs = r.promptLogprobs ?? this.promptEntries(r.tokens.slice(0, r.promptLength));
      r.promptLogprobs = null;
      // Prompt rows are done: a recompute after a preemption may reuse cached blocks again.
      r.bypassPrefixCache = false;
    }
    r.events.push(event);
    if (finish) this.finish(r, finish);
  }

  private finish(r: EngineRequest, reason: FinishReason): void {
    if (r.done) return;
    r.done = true;
    this.scheduler.remove(r);
    this.live.delete(r.requestId);
    r.detachSignal();
    r.events.push({
      type: 'finish',
      finishReason: reason,
      promptTokens: r.promptLength,
      completionTokens: r.completionTokens,
      cachedPromptTokens: r.cachedPromptTokens ?? 0,
      queueSeconds: r.queueSeconds ?? (performance.now() - r.arrivalMs) / 1000,
    });
    r.events.end();
  }

  private finishWithError(r: EngineRequest, err: Error): void {
    if (r.done) return;
    r.done = true;
    this.scheduler.remove(r);
    this.live.delete(r.requestId);
    r.detachSignal();
    r.events.fail(err);
  }

  /** A step threw: the engine is unhealthy and every request in flight fails with the error. */
  private fail(err: Error): void {
    this.fatal = err;
    const wrapped = new Error(`model ${this.info.name}: engine step failed: ${err.message}`, { cause: err });
    for (const r of [...this.live.values()]) this.finishWithError(r, wrapped);
  }
}

/**
 * An async-iterable queue of one request's events. Closing the iterator early (break, return) calls
 * onCancel so that the engine stops working for a consumer that left.
 */
class EventChannel<T> implements AsyncIterable<T> {
  private readonly buffer: T[] = [];
  private closed = false;
  private error: Error | null = null;
  private waiter: { resolve: (r: IteratorResult<T>) => void; reject: (e: Error) => void } | null = null;

  constructor(private readonly onCancel: () => void) {}

  push(value: T): void {
    if (this.closed) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve({ value, done: false });
    } else this.buffer.push(value);
  }

  end(): void {
    this.closed = true;
    this.settleWaiter();
  }

  fail(err: Error): void {
    this.error = err;
    this.closed = true;
    this.settleWaiter();
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return {
      next: () => {
        if (this.buffer.length > 0) return Promise.resolve({ value: this.buffer.shift()!, done: false });
        if (this.error) return Promise.reject(this.error);
        if (this.closed) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => {
          this.waiter = { resolve, reject };
        });
      },
      return: () => {
        if (!this.closed) this.onCancel();
        this.buffer.length = 0;
        this.closed = true;
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }

  private settleWaiter(): void {
    if (!this.waiter) return;
    const w = this.waiter;
    this.waiter = null;
    if (this.buffer.length > 0) w.resolve({ value: this.buffer.shift()!, done: false });
    else if (this.error) w.reject(this.error);
    else w.resolve({ value: undefined, done: true });
  }
}

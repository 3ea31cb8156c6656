// Continuous-batching scheduler: decides which tokens of which requests run in the next step (decode + chunked prefill), admission, preemption.
import type { KvCacheManager, KvRequest } from '../cache/kv-manager.ts';
import { QueueFullError } from './types.ts';

/** The scheduler's view of a request; the engine keeps everything else (sampling, streaming). */
export interface SchedRequest extends KvRequest {
  /** Tokens whose KV is in the cache; tokens[numComputed..] are still to run. */
  numComputed: number;
  /** Prompt tokens found in the prefix cache at first admission (null until admitted). */
  cachedPromptTokens: number | null;
  promptLength: number;
  /** Times this request lost its blocks to a preemption. */
  preemptions: number;
  /** True while every prompt row must be computed (prompt logprobs): admission takes no prefix-cache hits. */
  bypassPrefixCache?: boolean;
}

export interface ScheduledChunk<R extends SchedRequest = SchedRequest> {
  req: R;
  /** Position of the first new token. */
  startPos: number;
  numNewTokens: number;
  /** The chunk reaches the request's last known token: its logits pick the next token. */
  samples: boolean;
}

export interface StepPlan<R extends SchedRequest = SchedRequest> {
  /** In batch order: running requests (oldest first), then newly admitted ones. */
  chunks: Array<ScheduledChunk<R>>;
  /** Requests preempted while planning this step (already back at the front of the waiting queue). */
  preempted: R[];
  /** Requests admitted from the waiting queue this step. */
  admitted: R[];
  /** Prefix-cache figures for the admissions of this step, in tokens. */
  prefixQueries: number;
  prefixHits: number;
}

export interface SchedulerOptions {
  /** Most sequences in one step. */
  maxNumSeqs: number;
  /** Most token rows in one step (decode tokens + prompt chunks). */
  maxBatchedTokens: number;
  /** Most requests waiting for admission; past it add() throws QueueFullError. */
  maxQueue: number;
}

export class Scheduler<R extends SchedRequest = SchedRequest> {
  /** Admission order; the last one is the youngest and the first to be preempted. */
  readonly running: R[] = [];
  readonly waiting: R[] = [];
  preemptions = 0;

  constructor(
    readonly kv: KvCacheManager,
    readonly opts: SchedulerOptions,
  ) {
    if (opts.maxBatchedTokens < 1) throw new Error(`maxBatchedTokens must be at least 1, got ${opts.maxBatchedTokens}`);
    if (opts.maxNumSeqs < 1) throw new Error(`maxNumSeqs must be at least 1, got ${opts.maxNumSeqs}`);
  }

  /** Queues a new request; throws QueueFullError when the waiting queue is at its bound. */
  add(req: R): void {
    if (this.waiting.length >= this.opts.maxQueue) throw new QueueFullError(this.waiting.length, this.opts.maxQueue);
    this.waiting.push(req);
  }

  hasWork(): boolean {
    return this.running.length > 0 || this.waiting.length > 0;
  }

  /** Plans one step and allocates its KV blocks. Nothing is dropped: whatever does not fit stays queued. */
  schedule(): StepPlan<R> {
    const plan: StepPlan<R> = { chunks: [], preempted: [], admitted: [], prefixQueries: 0, prefixHits: 0 };
    let budget = this.opts.maxBatchedTokens;

    // 1. Running requests, oldest first: one decode token each, or the next chunk of a prompt being prefilled.
    let i = 0;
    while (i < this.running.length && budget > 0) {
      const req = this.running[i];
      const numNew = Math.min(req.tokens.length - req.numComputed, budget);
      if (numNew <= 0) {
        i++;
        continue;
      }
      let scheduled = false;
      for (;;) {
        if (this.kv.allocate(req, req.numComputed, numNew)) {
          scheduled = true;
          break;
        }
        // Out of blocks: recompute the youngest later rather than stall everyone.
        const victim = this.running.pop()!;
        this.preempt(victim);
        plan.preempted.push(victim);
        if (victim === req) break;
      }
      if (!scheduled) break;
      plan.chunks.push(this.chunk(req, numNew));
      budget -= numNew;
      i++;
    }

    // 2. Admit waiting requests in order while blocks, budget and sequence slots last; not in a step
    // that had to preempt (the freed blocks go to the preempted requests first).
    if (plan.preempted.length === 0) {
      while (this.waiting.length > 0 && budget > 0 && this.running.length < this.opts.maxNumSeqs) {
        const req = this.waiting[0];
        const prefix = req.bypassPrefixCache ? { blocks: [], numTokens: 0, nextBlockPending: false } : this.kv.findCachedPrefix(req);
        if (prefix.nextBlockPending) break;
        const numNew = Math.min(req.tokens.length - prefix.numTokens, budget);
        if (!this.kv.allocate(req, prefix.numTokens, numNew, prefix.blocks)) break;
        this.waiting.shift();
        req.numComputed = prefix.numTokens;
        if (req.cachedPromptTokens === null) req.cachedPromptTokens = Math.min(prefix.numTokens, req.promptLength);
        if (!req.bypassPrefixCache) {
          plan.prefixQueries += req.tokens.length;
          plan.prefixHits += prefix.numTokens;
        }
        this.running.push(req);
        plan.admitted.push(req);
        plan.chunks.push(this.chunk(req, numNew));
        budget -= numNew;
      }
    }
    return plan;
  }

  /** After the step ran: the planned tokens are in the KV cache. */
  completeStep(plan: StepPlan<R>): void {
    for (const c of plan.chunks) {
      c.req.numComputed = c.startPos + c.numNewTokens;
      this.kv.commit(c.req, c.req.numComputed);
    }
  }

  /** Removes a request (finished, aborted or failed) wherever it is and frees its blocks. */
  remove(req: R): void {
    const r = this.running.indexOf(req);
    if (r >= 0) this.running.splice(r, 1);
    const w = this.waiting.indexOf(req);
    if (w >= 0) this.waiting.splice(w, 1);
    this.kv.free(req);
  }

  private preempt(req: R): void {
    this.kv.free(req);
    req.numComputed = 0;
    req.preemptions++;
    this.preemptions++;
    this.waiting.unshift(req);
  }

  private chunk(req: R, numNew: number): ScheduledChunk<R> {
    return { req, startPos: req.numComputed, numNewTokens: numNew, samples: req.numComputed + numNew === req.tokens.length };
  }
}

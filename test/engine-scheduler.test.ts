// Scheduler decisions: admission by free blocks, chunked prefill within the token budget, preemption of the youngest, queue bound.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockPool } from '../cache/block-pool.ts';
import { KvCacheManager } from '../cache/kv-manager.ts';
import { Scheduler, type SchedRequest, type StepPlan } from '../engine/scheduler.ts';
import { QueueFullError } from '../engine/types.ts';

function request(id: string, prompt: number[]): SchedRequest & { tokens: number[] } {
  return { requestId: id, tokens: prompt.slice(), blockHashes: [], numComputed: 0, cachedPromptTokens: null, promptLength: prompt.length, preemptions: 0 };
}

function setup(numBlocks: number, blockSize: number, opts: Partial<{ maxNumSeqs: number; maxBatchedTokens: number; maxQueue: number }> = {}) {
  const pool = new BlockPool(numBlocks);
  const kv = new KvCacheManager(pool, blockSize);
  const s = new Scheduler(kv, { maxNumSeqs: 8, maxBatchedTokens: 64, maxQueue: 16, ...opts });
  return { pool, kv, s };
}

/** What a step did, by request: [id, startPos, numNew, samples]. */
function summary(plan: StepPlan): Array<[string, number, number, boolean]> {
  return plan.chunks.map((c) => [c.req.requestId, c.startPos, c.numNewTokens, c.samples]);
}

/** Runs the plan as the engine would: tokens computed, a new token for each sampling chunk. */
function finishStep(s: Scheduler, plan: StepPlan, nextToken = 7): void {
  s.completeStep(plan);
  for (const c of plan.chunks) if (c.samples) (c.req.tokens as number[]).push(nextToken);
}

const range = (n: number, from = 0) => Array.from({ length: n }, (_, i) => from + i);

test('chunked prefill: a long prompt runs in budget-sized chunks; only the last chunk samples', () => {
  const { s } = setup(16, 4, { maxBatchedTokens: 10 });
  const a = request('a', range(25));
  s.add(a);
  const steps: Array<[string, number, number, boolean]>[] = [];
  for (let i = 0; i < 4; i++) {
    const p = s.schedule();
    steps.push(summary(p));
    finishStep(s, p);
  }
  assert.deepEqual(steps, [[['a', 0, 10, false]], [['a', 10, 10, false]], [['a', 20, 5, true]], [['a', 25, 1, true]]]);
});

test('one batch: running decodes first, then chunks of waiting prompts within the budget', () => {
  const { s } = setup(32, 4, { maxBatchedTokens: 8 });
  const a = request('a', range(3));
  s.add(a);
  finishStep(s, s.schedule());
  const b = request('b', range(12, 50));
  const c = request('c', range(5, 80));
  s.add(b);
  s.add(c);
  const p = s.schedule();
  assert.deepEqual(summary(p), [['a', 3, 1, true], ['b', 0, 7, false]], 'decode of a + 7 tokens of b fill the budget of 8; c waits');
  finishStep(s, p);
  const p2 = s.schedule();
  assert.deepEqual(summary(p2), [['a', 4, 1, true], ['b', 7, 5, true], ['c', 0, 2, false]]);
});

test('admission stops when the KV pool has no free blocks; nothing is dropped', () => {
  const { s, pool } = setup(4, 4);
  const reqs = ['a', 'b', 'c'].map((id, i) => request(id, range(6, i * 100)));
  for (const r of reqs) s.add(r);
  const p = s.schedule();
  assert.deepEqual(p.admitted.map((r) => r.requestId), ['a', 'b'], 'each needs 2 blocks of 4');
  assert.equal(pool.numFree, 0);
  assert.deepEqual(s.waiting.map((r) => r.requestId), ['c']);
  finishStep(s, p);
  // a and b decode position 6 (still in their second block), c still cannot come in.
  const p2 = s.schedule();
  assert.deepEqual(summary(p2), [['a', 6, 1, true], ['b', 6, 1, true]]);
  finishStep(s, p2);
  s.remove(reqs[0]);
  const p3 = s.schedule();
  assert.deepEqual(summary(p3).map((x) => x[0]), ['b', 'c'], 'a finished: c is admitted');
});

test('preemption: the youngest running request is recomputed later, at the front of the queue', () => {
  const { s, pool } = setup(6, 4);
  const a = request('a', range(8));
  const b = request('b', range(8, 100));
  const c = request('c', range(7, 200));
  s.add(a);
  s.add(b);
  s.add(c);
  let p = s.schedule();
  assert.deepEqual(p.admitted.map((r) => r.requestId), ['a', 'b', 'c']);
  assert.equal(pool.numFree, 0);
  finishStep(s, p);
  // a and b now need a third block each for position 8: c (youngest) is preempted, then b for a.
  p = s.schedule();
  assert.deepEqual(p.preempted.map((r) => r.requestId), ['c']);
  assert.deepEqual(summary(p), [['a', 8, 1, true], ['b', 8, 1, true]]);
  assert.deepEqual(s.waiting.map((r) => r.requestId), ['c']);
  assert.equal(c.numComputed, 0);
  assert.equal(c.tokens.length, 8, 'its generated token is kept and recomputed with the prompt');
  assert.equal(s.preemptions, 1);
  assert.equal(p.admitted.length, 0, 'no admission in a step that had to preempt');
  finishStep(s, p);
  s.remove(a);
  p = s.schedule();
  assert.deepEqual(summary(p), [['b', 9, 1, true], ['c', 0, 8, true]], 'c re-runs all 8 known tokens and samples its 2nd token');
  assert.equal(c.preemptions, 1);
});

test('preemption frees the request being scheduled itself when it is the youngest', () => {
  const { s } = setup(4, 2, { maxBatchedTokens: 100 });
  const a = request('a', range(4));
  const b = request('b', range(3, 10));
  s.add(a);
  s.add(b);
  let p = s.schedule();
  finishStep(s, p); // a: 5 tokens, 2 blocks; b: 4 tokens, 2 blocks; pool full
  p = s.schedule();
  // a needs a 3rd block: b is preempted; b then is not scheduled this step.
  assert.deepEqual(summary(p), [['a', 4, 1, true]]);
  assert.deepEqual(p.preempted.map((r) => r.requestId), ['b']);
});

test('the waiting queue is bounded', () => {
  const { s } = setup(4, 4, { maxQueue: 2 });
  s.add(request('a', [1]));
  s.add(request('b', [1]));
  assert.throws(() => s.add(request('c', [1])), (e: unknown) => e instanceof QueueFullError && e.waiting === 2 && e.limit === 2);
});

test('maxNumSeqs caps the running set', () => {
  const { s } = setup(32, 4, { maxNumSeqs: 2 });
  for (const id of ['a', 'b', 'c']) s.add(request(id, [1, 2]));
  const p = s.schedule();
  assert.equal(p.chunks.length, 2);
  assert.equal(s.waiting.length, 1);
});

test('identical prompts: the second waits for the first one\'s full blocks, then shares them', () => {
  const { s, pool } = setup(32, 4);
  const prompt = range(14, 300);
  const a = request('a', prompt);
  const b = request('b', prompt);
  s.add(a);
  s.add(b);
  let p = s.schedule();
  assert.deepEqual(summary(p), [['a', 0, 14, true]], 'b defers: its blocks are being computed by a');
  finishStep(s, p, 5);
  p = s.schedule();
  assert.deepEqual(summary(p), [['a', 14, 1, true], ['b', 12, 2, true]], 'b hits 3 full blocks (12 tokens)');
  assert.equal(b.cachedPromptTokens, 12);
  assert.equal(p.prefixHits, 12);
  assert.equal(p.prefixQueries, 14);
  assert.equal(pool.counts().used, 4 + 1, 'a holds 4 blocks, b shares 3 and owns 1');
});

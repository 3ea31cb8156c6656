// Block pool and KV cache manager: reference counts, hash chains, LRU eviction of cached free blocks, no leaks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockPool, hashBlockTokens, hashFullBlocks } from '../cache/block-pool.ts';
import { KvCacheManager, type KvRequest } from '../cache/kv-manager.ts';

function req(id: string, tokens: number[]): KvRequest {
  return { requestId: id, tokens, blockHashes: [] };
}

test('pool: allocate, share through touch, release back to the free queue', () => {
  const pool = new BlockPool(4);
  const [a, b] = pool.allocate(2);
  assert.deepEqual(pool.counts(), { numBlocks: 4, free: 2, used: 2, cached: 0 });
  pool.touch([a]);
  assert.equal(a.refCount, 2);
  pool.release([a]);
  assert.equal(pool.numFree, 2, 'a still has an owner');
  pool.release([a, b]);
  assert.deepEqual(pool.counts(), { numBlocks: 4, free: 4, used: 0, cached: 0 });
  assert.throws(() => pool.release([a]), /released more often/);
  assert.throws(() => pool.allocate(5), /asked for 5 KV blocks, only 4 are free/);
});

test('hashes chain over the parent: the same block after a different prefix hashes differently', () => {
  const bs = 4;
  const x = hashFullBlocks([1, 2, 3, 4, 5, 6, 7, 8, 9], bs);
  const y = hashFullBlocks([9, 2, 3, 4, 5, 6, 7, 8], bs);
  assert.equal(x.length, 2, 'the partial third block has no hash');
  assert.notEqual(x[1], y[1], 'block 2 holds the same ids but follows another block');
  assert.equal(x[1], hashBlockTokens(x[0], [5, 6, 7, 8]));
  assert.equal(x[0], hashBlockTokens(null, [1, 2, 3, 4]));
  assert.deepEqual(hashFullBlocks([1, 2, 3, 4, 5, 6, 7, 8, 9], bs, x.slice(0, 1)), x, 'extending keeps the chain');
});

test('cached free blocks stay findable until evicted, least recently freed first', () => {
  const pool = new BlockPool(3);
  const [a, b, c] = pool.allocate(3);
  pool.cache(a, 'ha');
  pool.cache(b, 'hb');
  pool.release([b]); // freed first → evicted first
  pool.release([a]);
  pool.release([c]);
  assert.deepEqual(pool.counts(), { numBlocks: 3, free: 3, used: 0, cached: 2 });
  assert.deepEqual(pool.freeOrder(), [b.blockId, a.blockId, c.blockId]);
  assert.equal(pool.lookup('ha'), a);
  // A hit takes a cached block out of the middle of the free queue.
  pool.touch([a]);
  assert.deepEqual(pool.freeOrder(), [b.blockId, c.blockId]);
  assert.equal(pool.counts().cached, 1);
  const [d] = pool.allocate(1);
  assert.equal(d, b, 'front of the queue');
  assert.equal(pool.lookup('hb'), undefined, 'evicted on reuse');
  assert.equal(d.hash, null);
  assert.equal(pool.counts().cached, 0);
});

test('manager: prefix hits after commit, capped so one token is always computed', () => {
  const bs = 4;
  const pool = new BlockPool(10);
  const kv = new KvCacheManager(pool, bs);
  const prompt = Array.from({ length: 10 }, (_, i) => 100 + i);
  const a = req('a', prompt);
  assert.equal(kv.findCachedPrefix(a).numTokens, 0);
  assert.ok(kv.allocate(a, 0, 10));
  assert.equal(kv.heldBlocks('a'), 3);
  // While a computes, its full blocks are pending: an identical prompt should wait, not duplicate them.
  const b = req('b', prompt.slice());
  assert.deepEqual(kv.findCachedPrefix(b), { blocks: [], numTokens: 0, nextBlockPending: true });
  kv.commit(a, 10);
  const hit = kv.findCachedPrefix(b);
  assert.equal(hit.numTokens, 8);
  assert.equal(hit.nextBlockPending, false);
  assert.ok(kv.allocate(b, 8, 2, hit.blocks));
  assert.deepEqual(kv.blockTable('b').slice(0, 2), kv.blockTable('a').slice(0, 2), 'prefix blocks are shared');
  assert.notEqual(kv.blockTable('b')[2], kv.blockTable('a')[2]);
  assert.equal(pool.counts().used, 4);
  // A prompt that is exactly two full blocks hits only the first: its last token must run for logits.
  const c = req('c', prompt.slice(0, 8));
  assert.equal(kv.findCachedPrefix(c).numTokens, 4);
  kv.free(a);
  kv.free(b);
  assert.deepEqual(pool.counts(), { numBlocks: 10, free: 10, used: 0, cached: 2 });
  assert.equal(kv.numHolders, 0);
});

test('manager: a failed allocation changes nothing', () => {
  const pool = new BlockPool(3);
  const kv = new KvCacheManager(pool, 2);
  const a = req('a', [1, 2, 3, 4, 5]);
  assert.ok(kv.allocate(a, 0, 4));
  const b = req('b', [7, 8, 9, 10, 11]);
  assert.equal(kv.allocate(b, 0, 5), false);
  assert.equal(kv.heldBlocks('b'), 0);
  assert.equal(pool.numFree, 1);
  kv.commit(a, 4);
  // Cached free blocks that a hit would take out of the queue count against the free ones.
  kv.free(a);
  const a2 = req('a2', [1, 2, 3, 4, 5, 6]);
  const hit = kv.findCachedPrefix(a2);
  assert.equal(hit.numTokens, 4);
  assert.equal(kv.allocate(a2, 4, 3, hit.blocks), false, '2 hits + 2 new > 3 blocks');
  assert.ok(kv.allocate(a2, 4, 2, hit.blocks));
  assert.equal(pool.numFree, 0);
  kv.free(a2);
  assert.equal(pool.numFree, 3);
});

test('no leaks: random allocate/commit/free sequences return every block', () => {
  let seed = 12345;
  const rand = (n: number) => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return seed % n;
  };
  const bs = 4;
  const pool = new BlockPool(24);
  const kv = new KvCacheManager(pool, bs);
  const live: Array<{ r: KvRequest; computed: number }> = [];
  for (let op = 0; op < 3000; op++) {
    const choice = rand(3);
    if (choice === 0 || live.length === 0) {
      // Prompts from a few shared prefixes so that hits happen.
      const base = rand(3);
      const tokens = Array.from({ length: 1 + rand(20) }, (_, i) => (i < 8 ? base * 10 + i : rand(50)));
      const r = req(`r${op}`, tokens);
      const hit = kv.findCachedPrefix(r);
      const n = r.tokens.length - hit.numTokens;
      if (kv.allocate(r, hit.numTokens, n, hit.blocks)) {
        kv.commit(r, r.tokens.length);
        live.push({ r, computed: r.tokens.length });
      }
    } else if (choice === 1) {
      const e = live[rand(live.length)];
      (e.r.tokens as number[]).push(rand(50));
      if (kv.allocate(e.r, e.computed, 1)) {
        e.computed++;
        kv.commit(e.r, e.computed);
      }
    } else {
      const [e] = live.splice(rand(live.length), 1);
      kv.free(e.r);
    }
    const held = live.reduce((s, e) => s + kv.heldBlocks(e.r.requestId), 0);
    const c = pool.counts();
    assert.ok(c.used <= held, `op ${op}: ${c.used} used blocks but requests hold ${held} (shared ones count once)`);
    assert.equal(c.free + c.used, 24);
  }
  for (const e of live) kv.free(e.r);
  const c = pool.counts();
  assert.equal(c.used, 0);
  assert.equal(c.free, 24);
  assert.ok(c.cached > 0, 'some prefixes remain cached');
});

// Maps requests to KV blocks: prefix-cache lookup, allocation for a step's tokens, caching of computed full blocks, freeing.
import { BlockPool, hashFullBlocks, type BlockHash, type KvBlock } from './block-pool.ts';

/** What the manager needs to know about a request. `blockHashes` is filled in here and kept by the request. */
export interface KvRequest {
  readonly requestId: string;
  /** Every token id known so far (prompt, then generated ones). */
  readonly tokens: readonly number[];
  /** Hashes of the full blocks of `tokens`, extended lazily; survives preemption, so recompute finds its own blocks. */
  blockHashes: BlockHash[];
}

export interface CachedPrefix {
  /** Blocks holding the longest cached prefix of the request's tokens (not yet owned by it). */
  blocks: KvBlock[];
  /** Tokens those blocks cover (a multiple of the block size, always less than the request's length). */
  numTokens: number;
  /**
   * The next full block of the prompt is being computed right now by another request: waiting one step
   * turns it into a hit instead of a duplicate.
   */
  nextBlockPending: boolean;
}

interface Holding {
  blocks: KvBlock[];
  /** Leading blocks whose contents are computed and indexed in the prefix cache (or were hits). */
  cachedBlocks: number;
  /** Leading full blocks whose hashes are registered as pending (allocated, contents on their way). */
  pendingBlocks: number;
}

export class KvCacheManager {
  private readonly holdings = new Map<string, Holding>();
  /** Hash → how many held blocks are being computed with that content now. */
  private readonly pending = new Map<BlockHash, number>();

  constructor(
    readonly pool: BlockPool,
    readonly blockSize: number,
  ) {
    if (!Number.isInteger(blockSize) || blockSize < 1) throw new Error(`block size must be a positive integer, got ${blockSize}`);
  }

  /** Blocks needed to hold `numTokens` tokens. */
  blocksFor(numTokens: number): number {
    return Math.ceil(numTokens / this.blockSize);
  }

  /** Longest prefix of the request's tokens found in the prefix cache; at least one token is always left to compute. */
  findCachedPrefix(req: KvRequest): CachedPrefix {
    const maxBlocks = Math.floor((req.tokens.length - 1) / this.blockSize);
    this.extendHashes(req, maxBlocks * this.blockSize);
    const blocks: KvBlock[] = [];
    for (let i = 0; i < maxBlocks; i++) {
      const b = this.pool.lookup(req.blockHashes[i]);
      if (!b) break;
      blocks.push(b);
    }
    const nextBlockPending = blocks.length < maxBlocks && this.pending.has(req.blockHashes[blocks.length]);
    return { blocks, numTokens: blocks.length * this.blockSize, nextBlockPending };
  }

  /**
   * Makes the request hold blocks for positions [0, numComputed + numNew). `prefix` (first allocation
   * only) are prefix-cache hits covering its first numComputed tokens. Returns false, changing nothing,
   * when the pool has too few free blocks.
   */
  allocate(req: KvRequest, numComputed: number, numNew: number, prefix: readonly KvBlock[] = []): boolean {
    let h = this.holdings.get(req.requestId);
    if (prefix.length > 0 && h && h.blocks.length > 0) {
      throw new Error(`request ${req.requestId} already holds ${h.blocks.length} blocks; prefix hits apply to a first allocation`);
    }
    const held = (h?.blocks.length ?? 0) + prefix.length;
    const needed = Math.max(0, this.blocksFor(numComputed + numNew) - held);
    // Hits on free cached blocks take them out of the free queue too.
    const freeHits = prefix.reduce((n, b) => n + (b.refCount === 0 ? 1 : 0), 0);
    if (needed + freeHits > this.pool.numFree) return false;
    if (!h) {
      h = { blocks: [], cachedBlocks: 0, pendingBlocks: 0 };
      this.holdings.set(req.requestId, h);
    }
    if (prefix.length > 0) {
      this.pool.touch(prefix);
      h.blocks.push(...prefix);
      h.cachedBlocks = prefix.length;
      h.pendingBlocks = prefix.length;
    }
    if (needed > 0) h.blocks.push(...this.pool.allocate(needed));
    // Full blocks this step will compute become pending so that an identical prompt waits for them.
    const fullAfterStep = Math.floor((numComputed + numNew) / this.blockSize);
    this.extendHashes(req, fullAfterStep * this.blockSize);
    for (let i = h.pendingBlocks; i < fullAfterStep; i++) {
      const hash = req.blockHashes[i];
      this.pending.set(hash, (this.pending.get(hash) ?? 0) + 1);
    }
    h.pendingBlocks = Math.max(h.pendingBlocks, fullAfterStep);
    return true;
  }

  /**
   * Blocks `reserve` would have to add for the request to hold positions [0, numTokens): what a pipelined step needs.
   */
  blocksToReserve(req: KvRequest, numTokens: number): number {
    return Math.max(0, this.blocksFor(numTokens) - (this.holdings.get(req.requestId)?.blocks.length ?? 0));
  }

  /**
   * Makes a request that already holds blocks hold them for positions [0, numTokens), leaving the prefix-cache
   * bookkeeping alone: for a step planned before the tokens it computes are known (the engine's pipelined decode),
   * whose full blocks commit() indexes once they are. False, changing nothing, when the pool has too few free blocks.
   */
  reserve(req: KvRequest, numTokens: number): boolean {
    const h = this.holdings.get(req.requestId);
    if (!h) throw new Error(`request ${req.requestId} holds no KV blocks; reserve extends a running request`);
    const needed = this.blocksToReserve(req, numTokens);
    if (needed > this.pool.numFree) return false;
    if (needed > 0) h.blocks.push(...this.pool.allocate(needed));
    return true;
  }

  /** After a step: the request's first numComputed tokens are in the cache; index its full blocks for reuse. */
  commit(req: KvRequest, numComputed: number): void {
    const h = this.holdings.get(req.requestId);
    if (!h) throw new Error(`request ${req.requestId} holds no KV blocks`);
    const full = Math.min(Math.floor(numComputed / this.blockSize), h.blocks.length);
    this.extendHashes(req, full * this.blockSize);
    for (let i = h.cachedBlocks; i < full; i++) {
      this.pool.cache(h.blocks[i], req.blockHashes[i]);
      if (i < h.pendingBlocks) this.unpend(req.blockHashes[i]);
    }
    h.cachedBlocks = Math.max(h.cachedBlocks, full);
    h.pendingBlocks = Math.max(h.pendingBlocks, h.cachedBlocks);
  }

  /** Returns the request's blocks to the pool (finish, abort or preemption); cached ones stay reusable. */
  free(req: KvRequest): void {
    const h = this.holdings.get(req.requestId);
    if (!h) return;
    for (let i = h.cachedBlocks; i < h.pendingBlocks; i++) this.unpend(req.blockHashes[i]);
    // Tail first: the end of a sequence is evicted before the prefix others may share.
    this.pool.release(h.blocks.slice().reverse());
    this.holdings.delete(req.requestId);
  }

  blockTable(requestId: string): number[] {
    return (this.holdings.get(requestId)?.blocks ?? []).map((b) => b.blockId);
  }

  heldBlocks(requestId: string): number {
    return this.holdings.get(requestId)?.blocks.length ?? 0;
  }

  /** Requests holding blocks (for leak checks). */
  get numHolders(): number {
    return this.holdings.size;
  }

  private extendHashes(req: KvRequest, numTokens: number): void {
    if (req.blockHashes.length * this.blockSize >= numTokens) return;
    req.blockHashes = hashFullBlocks(req.tokens.slice(0, numTokens), this.blockSize, req.blockHashes);
  }

  private unpend(hash: BlockHash): void {
    const n = this.pending.get(hash) ?? 0;
    if (n <= 1) this.pending.delete(hash);
    else this.pending.set(hash, n - 1);
  }
}

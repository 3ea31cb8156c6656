// The KV block pool: counts blocks (reference counts, an LRU free queue) and indexes full blocks by content hash for prefix caching.
import { createHash } from 'node:crypto';

/** Content hash of one full block: a chain over the parent block's hash and this block's token ids. */
export type BlockHash = string;

/** One physical KV block's bookkeeping. The KV values themselves live on the GPU, indexed by blockId. */
export class KvBlock {
  refCount = 0;
  /** Set once the block is full and its contents are computed; it then serves prefix-cache hits. */
  hash: BlockHash | null = null;
  // Links of the free queue (null while the block is in use).
  prevFree: KvBlock | null = null;
  nextFree: KvBlock | null = null;
  inFreeQueue = false;

  constructor(readonly blockId: number) {}
}

/**
 * Free blocks in eviction order: the front is evicted (reused) first. A doubly linked list so that a
 * cached free block can be taken out of the middle in O(1) when a new request hits its prefix.
 */
export class FreeBlockQueue {
  private head: KvBlock | null = null;
  private tail: KvBlock | null = null;
  private count = 0;

  get length(): number {
    return this.count;
  }

  append(block: KvBlock): void {
    if (block.inFreeQueue) throw new Error(`block ${block.blockId} is already in the free queue`);
    block.prevFree = this.tail;
    block.nextFree = null;
    if (this.tail) this.tail.nextFree = block;
    else this.head = block;
    this.tail = block;
    block.inFreeQueue = true;
    this.count++;
  }

  popFront(): KvBlock {
    const block = this.head;
    if (!block) throw new Error('the free block queue is empty');
    this.remove(block);
    return block;
  }

  remove(block: KvBlock): void {
    if (!block.inFreeQueue) throw new Error(`block ${block.blockId} is not in the free queue`);
    if (block.prevFree) block.prevFree.nextFree = block.nextFree;
    else this.head = block.nextFree;
    if (block.nextFree) block.nextFree.prevFree = block.prevFree;
    else this.tail = block.prevFree;
    block.prevFree = null;
    block.nextFree = null;
    block.inFreeQueue = false;
    this.count--;
  }

  /** Block ids front (next evicted) to back, for tests and debugging. */
  ids(): number[] {
    const out: number[] = [];
    for (let b = this.head; b; b = b.nextFree) out.push(b.blockId);
    return out;
  }
}

/** Hash of a full block of token ids, chained to its parent block's hash (null for the first block). */
export function hashBlockTokens(parent: BlockHash | null, tokens: readonly number[]): BlockHash {
  const h = createHash('sha256');
  h.update(parent ?? 'root');
  h.update(Int32Array.from(tokens));
  return h.digest('base64');
}

/** Hashes of every full block of `tokens`, in order (a partial last block has none). */
export function hashFullBlocks(tokens: readonly number[], blockSize: number, from: BlockHash[] = []): BlockHash[] {
  const hashes = from.slice();
  const full = Math.floor(tokens.length / blockSize);
  for (let i = hashes.length; i < full; i++) {
    hashes.push(hashBlockTokens(i === 0 ? null : hashes[i - 1], tokens.slice(i * blockSize, (i + 1) * blockSize)));
  }
  return hashes;
}

export interface BlockPoolCounts {
  numBlocks: number;
  /** Blocks with no owner (including cached ones): what can be allocated now. */
  free: number;
  /** Blocks some request holds. */
  used: number;
  /** Free blocks that still hold a reusable cached prefix. */
  cached: number;
}

/**
 * Only counts and hashes: which blocks are free, who shares them (refCount), which full blocks hold
 * which prefix. It does not know requests; the KV cache manager does.
 */
export class BlockPool {
  private readonly blocks: KvBlock[];
  private readonly freeQueue = new FreeBlockQueue();
  private readonly cachedByHash = new Map<BlockHash, KvBlock>();
  private cachedFree = 0;

  constructor(readonly numBlocks: number) {
    if (!Number.isInteger(numBlocks) || numBlocks < 1) throw new Error(`a block pool needs at least one block, got ${numBlocks}`);
    this.blocks = Array.from({ length: numBlocks }, (_, i) => new KvBlock(i));
    for (const b of this.blocks) this.freeQueue.append(b);
  }

  get numFree(): number {
    return this.freeQueue.length;
  }

  counts(): BlockPoolCounts {
    return { numBlocks: this.numBlocks, free: this.numFree, used: this.numBlocks - this.numFree, cached: this.cachedFree };
  }

  block(blockId: number): KvBlock {
    const b = this.blocks[blockId];
    if (!b) throw new Error(`block id ${blockId} outside the pool of ${this.numBlocks}`);
    return b;
  }

  /** The cached block holding this prefix hash, in use or free, if any. */
  lookup(hash: BlockHash): KvBlock | undefined {
    return this.cachedByHash.get(hash);
  }

  /** Takes n blocks from the front of the free queue (least recently freed first), evicting their cached prefixes. */
  allocate(n: number): KvBlock[] {
    if (n > this.numFree) throw new Error(`asked for ${n} KV blocks, only ${this.numFree} are free`);
    const out: KvBlock[] = [];
    for (let i = 0; i < n; i++) {
      const b = this.freeQueue.popFront();
      if (b.hash !== null) {
        this.cachedFree--;
        this.evict(b);
      }
      b.refCount = 1;
      out.push(b);
    }
    return out;
  }

  /** Adds an owner to blocks found in the prefix cache; a free one leaves the free queue. */
  touch(blocks: readonly KvBlock[]): void {
    for (const b of blocks) {
      if (b.refCount === 0) {
        this.freeQueue.remove(b);
        if (b.hash !== null) this.cachedFree--;
      }
      b.refCount++;
    }
  }

  /**
   * Drops one owner from each block, in the given order; blocks nobody holds go to the back of the free
   * queue (cached ones stay findable until evicted). Callers pass a request's blocks tail first so that
   * the end of a sequence, the least likely to be shared, is evicted before its common prefix.
   */
  release(blocks: readonly KvBlock[]): void {
    for (const b of blocks) {
      if (b.refCount <= 0) throw new Error(`block ${b.blockId} released more often than it was taken`);
      b.refCount--;
      if (b.refCount === 0) {
        this.freeQueue.append(b);
        if (b.hash !== null) this.cachedFree++;
      }
    }
  }

  /**
   * Marks an in-use full block as holding the prefix `hash`. If another block already holds that prefix,
   * the first stays the cached one (this block simply is not indexed).
   */
  cache(block: KvBlock, hash: BlockHash): void {
    if (block.hash !== null) return;
    if (block.refCount === 0) throw new Error(`block ${block.blockId} is free; only held blocks can be cached`);
    if (this.cachedByHash.has(hash)) return;
    block.hash = hash;
    this.cachedByHash.set(hash, block);
  }

  /** Forgets every cached prefix of free blocks (e.g. after a model reload); held blocks keep theirs. */
  resetPrefixCache(): void {
    for (const b of this.blocks) if (b.refCount === 0 && b.hash !== null) this.evict(b);
    this.cachedFree = 0;
  }

  /** Block ids in eviction order, front first. */
  freeOrder(): number[] {
    return this.freeQueue.ids();
  }

  private evict(b: KvBlock): void {
    if (b.hash !== null && this.cachedByHash.get(b.hash) === b) this.cachedByHash.delete(b.hash);
    b.hash = null;
  }
}

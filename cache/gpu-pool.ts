// GPU memory of the paged KV pool: one storage buffer per layer, [block][token in block][row], sized from blocks or bytes.
import type { GpuContext } from '../kernels/device.ts';
import type { KvLayout } from './kv-layout.ts';

export interface PoolSize {
  /** Blocks in the pool (per layer buffer). */
  numBlocks?: number;
  /** Byte budget for the whole pool (all layers); numBlocks = ⌊budget / (blockSize · bytesPerToken)⌋. */
  kvCacheBytes?: number;
}

/** Number of blocks a size request gives for a layout, checked against the per-binding limit. */
export function poolBlocks(layout: KvLayout, size: PoolSize, maxBinding: number, defaultBlocks: number): number {
  let numBlocks: number;
  if (size.numBlocks !== undefined) {
    numBlocks = size.numBlocks;
  } else if (size.kvCacheBytes !== undefined) {
    numBlocks = Math.floor(size.kvCacheBytes / (layout.blockSize * layout.bytesPerToken));
    if (numBlocks < 1) {
      throw new Error(
        `KV cache budget of ${size.kvCacheBytes} B holds no block: one block of ${layout.blockSize} tokens takes ` +
          `${layout.blockSize * layout.bytesPerToken} B over ${layout.nLayers} layers; raise the budget`,
      );
    }
  } else {
    numBlocks = defaultBlocks;
  }
  if (!Number.isInteger(numBlocks) || numBlocks < 1) throw new Error(`KV pool needs a positive whole number of blocks, got ${numBlocks}`);
  const layerBytes = numBlocks * layout.blockBytesPerLayer;
  if (layerBytes > maxBinding) {
    const fit = Math.floor(maxBinding / layout.blockBytesPerLayer);
    throw new Error(
      `KV pool: one layer's share is ${layerBytes} B (${numBlocks} blocks × ${layout.blockBytesPerLayer} B), above this GPU's ` +
        `storage binding limit of ${maxBinding} B; use at most ${fit} blocks (${fit * layout.blockSize * layout.bytesPerToken} B ` +
        `for all ${layout.nLayers} layers)${layout.dtype === 'f32' ? ' or an f16 cache' : ''}`,
    );
  }
  return numBlocks;
}

/** The pool's GPU buffers. Which blocks are free is cache/block-pool's business, not this one's. */
export class GpuKvPool {
  readonly layerBuffers: GPUBuffer[];
  readonly numBlocks: number;
  private staging: GPUBuffer | undefined;

  constructor(
    private gpu: GpuContext,
    readonly layout: KvLayout,
    size: PoolSize,
    defaultBlocks = 64,
  ) {
    this.numBlocks = poolBlocks(layout, size, gpu.limits.maxStorageBufferBindingSize, defaultBlocks);
    const bytes = this.numBlocks * layout.blockBytesPerLayer;
    this.layerBuffers = [];
    for (let l = 0; l < layout.nLayers; l++) {
      this.layerBuffers.push(
        gpu.device.createBuffer({
          label: `kv-cache layer ${l} (${this.numBlocks} blocks × ${layout.blockSize} tokens × ${layout.rowValues} ${layout.dtype})`,
          size: bytes,
          usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
        }),
      );
    }
  }

  get capacityBytes(): number {
    return this.numBlocks * this.layout.blockBytesPerLayer * this.layout.nLayers;
  }

  /**
   * Records copies of whole blocks (src → dst) in every layer buffer. WebGPU forbids a copy within one buffer,
   * so blocks go through a staging buffer: all sources first, then all destinations (pairs act at once).
   */
  encodeCopyBlocks(encoder: GPUCommandEncoder, pairs: Array<[src: number, dst: number]>): void {
    const bb = this.layout.blockBytesPerLayer;
    const moves = pairs.filter(([s, d]) => s !== d);
    for (const [src, dst] of pairs) {
      for (const b of [src, dst]) {
        if (!Number.isInteger(b) || b < 0 || b >= this.numBlocks) throw new Error(`copyBlocks: block ${b} outside the pool of ${this.numBlocks}`);
      }
    }
    if (moves.length === 0) return;
    const need = moves.length * bb;
    if (!this.staging || this.staging.size < need) {
      this.staging?.destroy();
      this.staging = this.gpu.device.createBuffer({ label: 'kv copyBlocks staging', size: need, usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST });
    }
    for (const buf of this.layerBuffers) {
      moves.forEach(([src], i) => encoder.copyBufferToBuffer(buf, src * bb, this.staging!, i * bb, bb));
      moves.forEach(([, dst], i) => encoder.copyBufferToBuffer(this.staging!, i * bb, buf, dst * bb, bb));
    }
  }

  /** Copies whole blocks now (one submit). */
  copyBlocks(pairs: Array<[src: number, dst: number]>): void {
    if (pairs.length === 0) return;
    const enc = this.gpu.device.createCommandEncoder({ label: 'kv copyBlocks' });
    this.encodeCopyBlocks(enc, pairs);
    this.gpu.device.queue.submit([enc.finish()]);
  }

  destroy(): void {
    for (const b of this.layerBuffers) b.destroy();
    this.staging?.destroy();
  }
}

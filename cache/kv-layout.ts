// KV cache layouts: what one token stores per layer and how a kernel finds token t of a sequence in the paged pool.
import type { GqaConfig, ModelConfig } from '../model/config.ts';
import { kvValuesPerToken } from '../model/config.ts';
import { int8RowFormat, type Int8RowFormat } from '../kernels/kv-int8.ts';
import { cacheRowWgsl } from '../kernels/step-meta.ts';

export type CacheDtype = 'f16' | 'f32' | 'int8';
export { int8RowFormat, quantizeKvRowInt8, dequantizeKvRowInt8, type Int8RowFormat } from '../kernels/kv-int8.ts';

/**
 * A paged cache layout. Each layer has its own buffer laid out [block][token in block][row]; a row holds
 * `rowValues` values of `dtype`. Token t of a sequence lives in block `blockTable[⌊t / blockSize⌋]` at slot
 * `t mod blockSize`: row index `block · blockSize + slot` in its layer buffer.
 * The MLA latent layout implements the same interface with rows of kvLoraRank + qkRopeHeadDim values.
 */
export interface KvLayout {
  readonly kind: 'gqa' | 'mla';
  readonly nLayers: number;
  /** Values per token per layer. */
  readonly rowValues: number;
  readonly dtype: CacheDtype;
  readonly blockSize: number;
  /** Bytes per stored value (int8: 1; the row's scales come on top, see rowBytes). */
  readonly bytesPerValue: number;
  /** Where values and scales sit in an int8 row; set when dtype is 'int8'. */
  readonly int8?: Int8RowFormat;
  /** Bytes of one token's row in one layer (int8: values, scales and padding). */
  readonly rowBytes: number;
  /** Bytes one token takes across all layers (metrics, sizing). */
  readonly bytesPerToken: number;
  /** Bytes of one block in one layer buffer. */
  readonly blockBytesPerLayer: number;
  /** Row index of token t within a layer buffer, through the sequence's block table. */
  rowIndex(blockTable: ArrayLike<number>, t: number): number;
  /**
   * WGSL `fn cacheRow(blockTableOffset: u32, t: u32) -> u32`: the same lookup on the GPU, reading block ids
   * from the step metadata array `stepMeta` (kernels/step-meta.ts) starting at blockTableOffset.
   */
  wgslRowIndex(): string;
}

abstract class PagedLayout implements KvLayout {
  abstract readonly kind: 'gqa' | 'mla';
  readonly bytesPerValue: number;
  readonly rowBytes: number;
  readonly bytesPerToken: number;
  readonly blockBytesPerLayer: number;

  constructor(
    readonly nLayers: number,
    readonly rowValues: number,
    readonly dtype: CacheDtype,
    readonly blockSize: number,
    readonly int8?: Int8RowFormat,
  ) {
    if (!Number.isInteger(blockSize) || blockSize < 1) throw new Error(`KV block size must be a positive integer, got ${blockSize}`);
    if (dtype === 'f16' && rowValues % 2 !== 0) throw new Error(`an f16 KV row packs values in pairs; ${rowValues} values per row is odd`);
    if ((dtype === 'int8') !== (int8 !== undefined)) throw new Error(`a ${dtype} KV layout ${int8 ? 'cannot take' : 'needs'} an int8 row format`);
    if (int8 && int8.groups * int8.groupValues !== rowValues) {
      throw new Error(`int8 row format covers ${int8.groups} × ${int8.groupValues} values; the row has ${rowValues}`);
    }
    this.bytesPerValue = dtype === 'f16' ? 2 : dtype === 'int8' ? 1 : 4;
    this.rowBytes = int8 ? int8.rowWords * 4 : rowValues * this.bytesPerValue;
    this.bytesPerToken = nLayers * this.rowBytes;
    this.blockBytesPerLayer = blockSize * this.rowBytes;
  }

  rowIndex(blockTable: ArrayLike<number>, t: number): number {
    const b = Math.floor(t / this.blockSize);
    if (b >= blockTable.length) throw new Error(`token ${t} lies in block ${b}, the block table has ${blockTable.length} entries`);
    return blockTable[b] * this.blockSize + (t % this.blockSize);
  }

  wgslRowIndex(): string {
    return cacheRowWgsl(this.blockSize);
  }
}

/**
 * GQA: row = [K heads | V heads], 2 · nKvHeads · headDim values; K of head h at h·headDim, V at (nKvHeads + h)·headDim.
 * int8: the same order in bytes, one scale per (token, kv head, K or V): group h is K of head h, nKvHeads + h V of head h.
 */
export class GqaKvLayout extends PagedLayout {
  readonly kind = 'gqa' as const;
  readonly nKvHeads: number;
  readonly headDim: number;

  constructor(config: GqaConfig, blockSize: number, dtype: CacheDtype) {
    super(
      config.nLayers,
      kvValuesPerToken(config),
      dtype,
      blockSize,
      dtype === 'int8' ? int8RowFormat(2 * config.nKvHeads, config.headDim) : undefined,
    );
    this.nKvHeads = config.nKvHeads;
    this.headDim = config.headDim;
  }

  kOffset(head: number): number {
    return head * this.headDim;
  }

  vOffset(head: number): number {
    return (this.nKvHeads + head) * this.headDim;
  }
}

/** The layout a model's attention type calls for; MLA configs are served by the MLA layout (kernels/mla*). */
export function gqaLayoutFor(config: ModelConfig, blockSize: number, dtype: CacheDtype): GqaKvLayout {
  if (config.attention !== 'gqa') {
    throw new Error(`a GQA KV layout was asked for a ${config.attention} model (${config.arch}); MLA models use the latent layout`);
  }
  return new GqaKvLayout(config, blockSize, dtype);
}

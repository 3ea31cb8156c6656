// The MLA latent cache layout: one row [c (kvLoraRank) | RoPE(k_pe) (qkRopeHeadDim)] per token per layer, shared by all heads.
import type { MlaConfig, ModelConfig } from '../model/config.ts';
import { kvValuesPerToken } from '../model/config.ts';
import { cacheRowWgsl } from '../kernels/step-meta.ts';
import { mlaInt8RowFormat, type MlaInt8RowFormat } from '../kernels/mla-kv-int8.ts';
import type { CacheDtype, KvLayout } from './kv-layout.ts';

/**
 * Paged like the GQA layout ([block][token in block][row] per layer buffer), but a row is the latent vector of
 * kvLoraRank + qkRopeHeadDim values: the latent c at [0, kvLoraRank), the roped k_pe after it. Every query head reads
 * the same row, so the cache holds R + r values per token per layer instead of 2 · nKvHeads · headDim.
 * int8: the row is [c as int8 | k_pe as int8 | scale of c | scale of k_pe] (kernels/mla-kv-int8.ts MlaInt8RowFormat),
 * 584 bytes at 512 + 64 instead of 1152 in f16.
 */
export class MlaKvLayout implements KvLayout {
  readonly kind = 'mla' as const;
  readonly nLayers: number;
  readonly rowValues: number;
  readonly bytesPerValue: number;
  readonly rowBytes: number;
  readonly bytesPerToken: number;
  readonly blockBytesPerLayer: number;
  readonly kvLoraRank: number;
  readonly qkRopeHeadDim: number;
  /** Where an int8 row keeps c, k_pe and their scales; set when dtype is 'int8' (GQA's `int8` stays unset). */
  readonly latentInt8?: MlaInt8RowFormat;

  constructor(
    config: MlaConfig,
    readonly blockSize: number,
    readonly dtype: CacheDtype,
  ) {
    if (!Number.isInteger(blockSize) || blockSize < 1) throw new Error(`KV block size must be a positive integer, got ${blockSize}`);
    this.nLayers = config.nLayers;
    this.kvLoraRank = config.kvLoraRank;
    this.qkRopeHeadDim = config.qkRopeHeadDim;
    this.rowValues = kvValuesPerToken(config);
    if (this.rowValues % 2 !== 0) {
      throw new Error(
        `the latent cache stores values in pairs; kv_lora_rank ${config.kvLoraRank} + qk_rope_head_dim ${config.qkRopeHeadDim} = ${this.rowValues} is odd`,
      );
    }
    this.bytesPerValue = dtype === 'f16' ? 2 : dtype === 'int8' ? 1 : 4;
    if (dtype === 'int8') this.latentInt8 = mlaInt8RowFormat(this.kvLoraRank, this.qkRopeHeadDim);
    // int8: values, padding and the two scales (a whole number of u32 words).
    this.rowBytes = this.latentInt8 ? this.latentInt8.rowWords * 4 : this.rowValues * this.bytesPerValue;
    this.bytesPerToken = this.nLayers * this.rowBytes;
    this.blockBytesPerLayer = blockSize * this.rowBytes;
  }

  /** Offset of the latent c inside a row. */
  get latentOffset(): number {
    return 0;
  }

  /** Offset of the roped k_pe inside a row. */
  get ropeOffset(): number {
    return this.kvLoraRank;
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

/** The latent layout of an MLA model; throws for a GQA config (those use cache/kv-layout.ts GqaKvLayout). */
export function mlaLayoutFor(config: ModelConfig, blockSize: number, dtype: CacheDtype): MlaKvLayout {
  if (config.attention !== 'mla') {
    throw new Error(`an MLA latent layout was asked for a ${config.attention} model (${config.arch}); GQA models use GqaKvLayout`);
  }
  return new MlaKvLayout(config, blockSize, dtype);
}

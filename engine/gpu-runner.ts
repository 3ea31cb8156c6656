// The GPU step runner: turns one batch of sequences (prefill chunks and decode tokens mixed) into one compute pass.
import { StepProfiler, type DispatchTime } from './step-profile.ts';
import type { GpuContext } from '../kernels/device.ts';
import { GqaAttention, GQA_TARGET_WORKGROUPS, maxAttentionChunk } from '../kernels/attention.ts';
import { EmbeddingGather, RmsNorm, Rope, ropeTable, SiluMul } from '../kernels/elementwise.ts';
import { KvWrite } from '../kernels/kv-write.ts';
import type { MatmulTuning } from '../kernels/matmul.ts';
import { buildStepMeta, HEADER_WORDS, META_LOGIT_ROWS, META_ROWS, type StepMeta } from '../kernels/step-meta.ts';
import { destroyMatrix, pad8, storageBuffer, uploadArray, uploadWeight, type GpuMatrix, type WeightDtype } from '../kernels/tensors.ts';
import { denseDtypeFor, destroyLinear, linearOp, uploadLinear, type LinearDtype, type LinearOp, type LinearWeight } from '../kernels/linear.ts';
import { GpuKvPool } from '../cache/gpu-pool.ts';
import { gqaLayoutFor, type CacheDtype, type KvLayout } from '../cache/kv-layout.ts';
import type { GqaConfig, ModelConfig } from '../model/config.ts';
import type { GqaLayerWeights, ModelWeights, Tensor } from '../model/weights.ts';
import type { ModelRunner, StepOutput, StepSequence } from './types.ts';
import { MlaBlock } from './mla-block.ts';
import { createQuantizedRows, Int8MatmulOp, type QuantizedRows } from '../kernels/matmul-int8.ts';
import { PICK_ADJUST_WORDS, PICK_INFO_WORDS, PICK_PARAM_WORDS, readPickLogprobs, RowPick, writePickAdjustments, writePickParams, type PickSpec } from '../kernels/pick.ts';
import { pickAdjustError, pickSamplingError, type SampledLogprobs } from './sampler.ts';

export interface GpuRunnerOptions {
  /** Tokens per KV block (default 16). */
  blockSize?: number;
  /** Blocks in the pool; or give kvCacheBytes. Default: room for 4 full-length sequences, at most 1 GiB. */
  numBlocks?: number;
  kvCacheBytes?: number;
  /**
   * Weights on the GPU: f16 packed two per u32 (default), f32 (exact tests), or int8 per output channel for the
   * projections (GQA q|k|v or MLA q / kv_a, o, gate|up, down, lm_head; the embedding and MLA's W_UK / W_UV stay f16).
   */
  weightDtype?: LinearDtype;
  /**
   * KV cache values: f16 (default), f32, or int8 (one f32 scale per token, kv head and K/V in the row; GQA models,
   * cache/kv-layout.ts; an attention block whose layout has no int8 row format refuses it when it binds).
   */
  cacheDtype?: CacheDtype;
  /** Rows (tokens) per step the buffers are first sized for; they grow when a step needs more. */
  maxRowsPerStep?: number;
  matmulTuning?: Partial<MatmulTuning>;
  /** Replaces the per-layer attention block picked from the config (GQA built in, MLA from engine/mla-block.ts). */
  attentionBlock?: AttentionBlockFactory;
  /**
   * Time each step's compute pass with timestamp queries (adapters that have them): `lastStepGpuMs` then holds the
   * GPU time of the last step, which benchmarks set against the wall clock (readback and host work in between).
   */
  gpuTiming?: boolean;
  /**
   * Command buffers a step is submitted in, at most (default 6; 1 = the whole step at once): chunks of 1, 2, 4, …
   * layers (submitBoundaries). The host records hundreds of dispatches a step, and Dawn translates them at submit:
   * submitting the first layers early lets the GPU run them while the host records the rest.
   */
  submitChunks?: number;
}

/**
 * The layers after which a step's command buffer is submitted (the last layer's buffer also carries the head). Chunks
 * double from one layer: the GPU starts after one layer's recording, and while it runs a chunk the host records the
 * next, twice as long (recording a layer takes about half the GPU time of a layer at 32 rows on the H200: 4.5 ms of
 * host for 28 layers against 8.8 ms of GPU). The last of at most `chunks` chunks takes the remaining layers.
 */
export function submitBoundaries(nLayers: number, chunks: number): Set<number> {
  const out = new Set<number>();
  let end = 0;
  for (let size = 1, k = 1; k < Math.floor(chunks) && end + size < nLayers; k++, size *= 2) {
    end += size;
    out.add(end - 1);
  }
  return out;
}

/** Activation buffers an attention block reads and writes; re-sent whenever they are reallocated. */
export interface AttentionBindings {
  meta: GPUBuffer;
  /** Normed layer input [maxRows, xnStride]. */
  xn: GPUBuffer;
  xnStride: number;
  /** xn quantized per row for int8 W8A8 projections (MatmulBindings.xQuantized), when the weights are int8. */
  xnQuantized?: { xq: GPUBuffer; xScale: GPUBuffer };
  /** Attention output, the o_proj input [maxRows, outStride]. */
  out: GPUBuffer;
  outStride: number;
  maxRows: number;
  /** The KV pool's buffer of each layer. */
  layerCaches: GPUBuffer[];
}

/**
 * The attention part of every layer (from the normed input to the o_proj input, KV cache writes included):
 * the one piece that differs between GQA and MLA models.
 */
export interface AttentionBlock {
  readonly layout: KvLayout;
  /** Values per row written to the attention output (nHeads · head dim of V). */
  readonly outWidth: number;
  /** Largest context chunk (tokens) of the split-K attention; the step's chunk size is chosen ≤ this. */
  readonly maxChunk: number;
  /** Independent heads per row the split-K attention runs (kv heads for GQA), to size the split. */
  readonly parallelHeads: number;
  /** Workgroups the split-K attention's partial pass aims for (the step's chunk size is chosen from it). */
  readonly targetWorkgroups: number;
  /** Smallest context chunk of the split (default 16 tokens). */
  readonly minChunk?: number;
  /** What computes the attention's products (RunnerDescription.attentionProducts); 'f32' when absent. */
  readonly products?: AttentionProducts;
  /** What multiplies the block's per-head products in decode-sized steps (RunnerDescription.headProducts); absent: none. */
  readonly headProducts?: string;
  bind(b: AttentionBindings): void;
  /** Before the step's pass is encoded (grows scratch buffers). */
  prepare(meta: StepMeta): void;
  encodeLayer(pass: GPUComputePassEncoder, layer: number, meta: StepMeta): void;
  destroy(): void;
}

export interface AttentionBlockContext {
  gpu: GpuContext;
  config: ModelConfig;
  weights: ModelWeights;
  weightDtype: WeightDtype;
  /** Dtype of the block's projection weights when it differs from weightDtype (int8); blocks that ignore it keep weightDtype. */
  linearDtype?: LinearDtype;
  cacheDtype: CacheDtype;
  blockSize: number;
  matmulTuning?: Partial<MatmulTuning>;
  /** cos/sin table [maxSeqLen][dims/2] built on demand (kernels/elementwise.ts ropeTable). */
  ropeTable(dims: number): GPUBuffer;
}

export type AttentionBlockFactory = (ctx: AttentionBlockContext) => AttentionBlock;

/**
 * The arithmetic of the attention's score and value products: 'f32' (whatever the cache stores), 'int8-dot4' (MLA over
 * the int8 cache: query and probabilities quantized too, dot4I8Packed), 'int8-tensor-cores' (the same on subgroup
 * matrices), 'int8-dot4-tc-layout' (the tensor-core kernel's own dot4 form), 'int8-three-pass' (the same dot4 arithmetic
 * in three passes: kernels/mla-attention-3pass.ts), 'int8-flash' (one pass, both products on tensor cores:
 * kernels/mla-attention-flash.ts) and 'int8-flash-dot4' (its dot4 form).
 */
export type AttentionProducts = 'f32' | 'int8-dot4' | 'int8-three-pass' | 'int8-tensor-cores' | 'int8-dot4-tc-layout' | 'int8-flash' | 'int8-flash-dot4';

function concatRows(label: string, parts: Array<Tensor | undefined>, rowsOf: number[], cols: number): Float32Array {
  const out = new Float32Array(rowsOf.reduce((a, b) => a + b, 0) * cols);
  let off = 0;
  parts.forEach((t, i) => {
    const n = rowsOf[i] * cols;
    if (t) {
      if (t.data.length !== n) throw new Error(`${label}: part ${i} has ${t.data.length} values, ${n} expected`);
      out.set(t.data, off);
    }
    off += n;
  });
  return out;
}

/** GQA attention: fused q/k/v projection (+bias), RoPE on q and k, paged K/V write, split-K attention. */
class GqaBlock implements AttentionBlock {
  readonly layout: KvLayout;
  readonly outWidth: number;
  readonly maxChunk: number;
  readonly parallelHeads: number;
  readonly targetWorkgroups = GQA_TARGET_WORKGROUPS;
  private wqkv: LinearWeight[];
  private bqkv: GPUBuffer[];
  private qkvCols: number;
  private qkvStride: number;
  private qkv: GPUBuffer | undefined;
  private qkvOps: LinearOp[] = [];
  private rope: Rope | undefined;
  private kvWrite: KvWrite | undefined;
  private attention: GqaAttention | undefined;

  constructor(private ctx: AttentionBlockContext) {
    const c = ctx.config as GqaConfig;
    this.layout = gqaLayoutFor(c, ctx.blockSize, ctx.cacheDtype);
    const qRows = c.nHeads * c.headDim;
    const kvRows = c.nKvHeads * c.headDim;
    this.outWidth = qRows;
    this.parallelHeads = c.nKvHeads;
    this.qkvCols = qRows + 2 * kvRows;
    this.qkvStride = pad8(this.qkvCols);
    this.wqkv = [];
    this.bqkv = [];
    ctx.weights.layers.forEach((lw, l) => {
      if (lw.kind !== 'gqa') throw new Error(`layer ${l} is ${lw.kind}; a GQA model needs GQA layers`);
      const w = lw as GqaLayerWeights;
      // uploadWeight stacks the rows (and takes pre-packed f16 as is, see Tensor.f16).
      this.wqkv.push(uploadLinear(ctx.gpu, `layer ${l} wqkv`, [w.wq, w.wk, w.wv], this.qkvCols, c.dim, ctx.linearDtype ?? ctx.weightDtype));
      if (c.attentionBias) {
        this.bqkv.push(uploadArray(ctx.gpu, `layer ${l} bqkv`, concatRows(`layer ${l} bqkv`, [w.bq, w.bk, w.bv], [qRows, kvRows, kvRows], 1)));
      }
    });
    this.maxChunk = maxAttentionChunk({ nHeads: c.nHeads, nKvHeads: c.nKvHeads, headDim: c.headDim });
  }

  bind(b: AttentionBindings): void {
    const { gpu, config } = this.ctx;
    const c = config as GqaConfig;
    this.destroyActivations();
    this.qkv = storageBuffer(gpu, 'qkv rows', b.maxRows * this.qkvStride * 4);
    this.qkvOps = this.wqkv.map(
      (w, l) =>
        linearOp(
          gpu,
          w,
          { meta: b.meta, rowsSlot: META_ROWS, x: b.xn, xStride: b.xnStride, xQuantized: b.xnQuantized, y: this.qkv!, yStride: this.qkvStride, bias: this.bqkv[l] },
          this.ctx.matmulTuning,
        ),
    );
    this.rope = new Rope(
      gpu,
      { meta: b.meta, table: this.ctx.ropeTable(c.headDim), x: this.qkv, xStride: this.qkvStride },
      { nHeads: c.nHeads + c.nKvHeads, colOffset: 0, headStride: c.headDim, ropeOffset: 0, dims: c.headDim, layout: c.ropeLayout },
    );
    this.kvWrite = new KvWrite(gpu, this.layout, {
      meta: b.meta,
      src: this.qkv,
      srcStride: this.qkvStride,
      srcOffset: c.nHeads * c.headDim,
      layerCaches: b.layerCaches,
    });
    this.attention = new GqaAttention(gpu, { nHeads: c.nHeads, nKvHeads: c.nKvHeads, headDim: c.headDim }, this.layout, {
      meta: b.meta,
      qkv: this.qkv,
      qkvStride: this.qkvStride,
      out: b.out,
      outStride: b.outStride,
      layerCaches: b.layerCaches,
    });
  }

  prepare(meta: StepMeta): void {
    this.attention!.prepare(meta.nRows, meta.maxChunks);
  }

  encodeLayer(pass: GPUComputePassEncoder, layer: number, meta: StepMeta): void {
    this.qkvOps[layer].encode(pass, meta.nRows);
    this.rope!.encode(pass, meta.nRows);
    this.kvWrite!.encode(pass, layer, meta.nRows);
    this.attention!.encode(pass, layer, meta.nRows, meta.maxChunks);
  }

  private destroyActivations(): void {
    this.qkv?.destroy();
    this.attention?.destroy();
  }

  destroy(): void {
    this.destroyActivations();
    for (const w of this.wqkv) destroyLinear(w);
    for (const b of this.bqkv) b.destroy();
  }
}

interface LayerGpu {
  attnNorm: GPUBuffer;
  ffnNorm: GPUBuffer;
  wo: LinearWeight;
  wGateUp: LinearWeight;
  wDown: LinearWeight;
}

interface StepOps {
  embed: EmbeddingGather;
  attnNorm: RmsNorm[];
  ffnNorm: RmsNorm[];
  oProj: LinearOp[];
  gateUp: LinearOp[];
  siluMul: SiluMul;
  down: LinearOp[];
  finalNorm: RmsNorm;
  lmHead: LinearOp;
  pick: RowPick;
}

/** What stepCapture returns: the step's logits and, per layer, xn rows [rows, dim] (f32, row-major, step row order). */
export interface CaptureStep {
  logits: Float32Array;
  attnInputs: Float32Array[];
}

/** What a runner computes with, for the start-up lines and /metrics (read-only; figures from the live objects). */
export interface RunnerDescription {
  adapter: string;
  attention: ModelConfig['attention'];
  /** Projection weights: q/k/v (MLA: q, kv_a), o, gate/up, down, lm_head. */
  weightDtype: LinearDtype;
  /** The embedding gather and the MLA head matrices W_UK / W_UV (f16 when the projections are int8). */
  denseDtype: WeightDtype;
  cacheDtype: CacheDtype;
  kvBytesPerToken: number;
  attentionProducts: AttentionProducts;
  /**
   * MLA's absorbed head products (W_UK, W_UV) in steps of up to 128 rows: the weights' float dtype (staged kernel),
   * 'w8a8-sm' (int8 on subgroup matrices) or 'w8a8-dot4'; 'none' for GQA.
   */
  headProducts: string;
  /**
   * Int8 projections only: the kernels a step of up to `gemvMaxRows` rows takes (weights-only GEMV) and the one larger
   * steps take (W8A8: 'w8a8' on dot4I8Packed, 'w8a8-sm' on subgroup matrices), as the ops chose them on this adapter.
   */
  int8Matmul: { gemvMaxRows: number; fewRows: string; batched: string } | null;
}

/** The GPU runner: the serving contract plus the calibration step. */
export interface GpuModelRunner extends ModelRunner {
  stepCapture(seqs: StepSequence[]): Promise<CaptureStep>;
  /** A step with every dispatch in a pass of its own, timed (adapters with timestamp-query; benchmarks). */
  stepProfile(seqs: StepSequence[]): Promise<StepOutput & { dispatches: DispatchTime[] }>;
  describe(): RunnerDescription;
  /** GPU time of the last step's compute pass (ms) with opts.gpuTiming on an adapter with timestamps, else null. */
  readonly lastStepGpuMs: number | null;
  /** Host time of the last step from the call to its last submit (ms). */
  readonly lastStepRecordMs: number;
  /** Command buffers each step is submitted in (opts.submitChunks); benchmarks compare settings on one runner. */
  submitChunks: number;
}

class GpuRunner implements GpuModelRunner {
  readonly blockSize: number;
  readonly numBlocks: number;
  readonly kvBytesPerToken: number;
  readonly adapterName: string;
  private pool: GpuKvPool;
  private layers: LayerGpu[];
  private embedding: GpuMatrix;
  private lmHead: LinearWeight;
  private finalNorm: GPUBuffer;
  private dimStride: number;
  private hiddenStride: number;
  private gateUpStride: number;
  private attnStride: number;
  // Sized for capacity.rows / capacity.logitRows / capacity.metaWords; grown on demand.
  private capacity = { rows: 0, logitRows: 0, metaWords: 0 };
  private act: Record<'meta' | 'x' | 'xn' | 'attn' | 'gateUp' | 'h' | 'xLogit' | 'logits' | 'readback' | 'pickParams' | 'picks' | 'pickInfo', GPUBuffer> | undefined;
  /**
   * Where a step's picks and timestamps come back: two, used in turn, so a step can be submitted while the one
   * before it is still running or being read back (steps whose tokens are the previous picks, see StepSequence).
   */
  private slots: Array<{ picksReadback: GPUBuffer; timing?: { queries: GPUQuerySet; resolve: GPUBuffer; read: GPUBuffer }; busy: boolean }> = [];
  private nextSlot = 0;
  /** Steps submitted and not yet read back; capture and profile steps run alone. */
  private inFlight = 0;
  private exclusive = false;
  /** Picks of the last submitted step: what previousPick may name. */
  private lastSubmittedPicks = 0;
  private logitsReadbackBusy = false;
  /** xn quantized per row by the layer norms for the int8 W8A8 projections that read xn (int8 weights only). */
  private xnQ: QuantizedRows | undefined;
  /** The MLP's hidden rows quantized per row by the SiLU·mul kernel for an int8 W8A8 down projection. */
  private hQ: QuantizedRows | undefined;
  private ops: StepOps | undefined;
  /** Mapped-read buffer for stepCapture's xn rows; made on first use, so plain steps never pay for it. */
  private captureReadback: GPUBuffer | undefined;
  private profiler: StepProfiler | undefined;
  /** Pick rows' logit adjustments (bias, penalties) of a step, PICK_ADJUST_WORDS each; grown between steps. */
  private pickAdjust: GPUBuffer | undefined;
  /** Adjustments buffers replaced while a step that reads them was in flight; destroyed when none is. */
  private retiredAdjust: GPUBuffer[] = [];
  private pickAdjustEntries = 0;
  private readonly weightDtype: LinearDtype;
  /** GPU time of the last step's compute pass (ms) when opts.gpuTiming is set and the adapter has timestamps. */
  lastStepGpuMs: number | null = null;
  /**
   * Host time of the last step from the call to its last submit (ms): planning, recording and handing the command
   * buffers to Dawn — what the host spends before it can wait; benchmarks set it against the GPU time.
   */
  lastStepRecordMs = 0;

  constructor(
    private gpu: GpuContext,
    readonly config: ModelConfig,
    weights: ModelWeights,
    private block: AttentionBlock,
    private opts: GpuRunnerOptions,
    weightDtype: LinearDtype,
    /** RoPE tables the attention block asked for; destroyed with the runner. */
    private ropeTables: Map<number, GPUBuffer>,
  ) {
    this.weightDtype = weightDtype;
    this.submitChunks = opts.submitChunks ?? 6;
    const c = config;
    this.adapterName = gpu.adapterName;
    this.blockSize = block.layout.blockSize;
    this.kvBytesPerToken = block.layout.bytesPerToken;
    const tokensPerSeqBlocks = Math.ceil(c.maxSeqLen / this.blockSize);
    const defaultBlocks = Math.max(tokensPerSeqBlocks, Math.min(4 * tokensPerSeqBlocks, Math.floor(2 ** 30 / (this.blockSize * this.kvBytesPerToken))));
    this.pool = new GpuKvPool(gpu, block.layout, { numBlocks: opts.numBlocks, kvCacheBytes: opts.kvCacheBytes }, defaultBlocks);
    this.numBlocks = this.pool.numBlocks;
    this.dimStride = pad8(c.dim);
    this.hiddenStride = pad8(c.hiddenDim);
    this.gateUpStride = pad8(2 * c.hiddenDim);
    this.attnStride = pad8(block.outWidth);
    this.layers = weights.layers.map((lw, l) => ({
      attnNorm: uploadArray(gpu, `layer ${l} attn_norm`, lw.attnNorm.data),
      ffnNorm: uploadArray(gpu, `layer ${l} ffn_norm`, lw.ffnNorm.data),
      wo: uploadLinear(gpu, `layer ${l} wo`, [lw.wo], c.dim, block.outWidth, weightDtype),
      wGateUp: uploadLinear(gpu, `layer ${l} w_gate_up`, [lw.wGate, lw.wUp], 2 * c.hiddenDim, c.dim, weightDtype),
      wDown: uploadLinear(gpu, `layer ${l} w_down`, [lw.wDown], c.dim, c.hiddenDim, weightDtype),
    }));
    this.embedding = uploadWeight(gpu, 'token_embd', [weights.tokenEmbedding], c.vocabSize, c.dim, denseDtypeFor(weightDtype));
    // Tied when the tensors (or their storage) are one; pre-packed tensors are compared by their f16 words so that a
    // lazy f32 `data` is not built just for this test.
    const out = weights.output;
    const emb = weights.tokenEmbedding;
    const tied = out === emb || (out.f16 !== undefined || emb.f16 !== undefined ? out.f16 === emb.f16 : out.data === emb.data);
    // int8 keeps its own quantized lm_head even when tied (the gather reads the f16 embedding).
    this.lmHead = tied && weightDtype !== 'int8' ? this.embedding : uploadLinear(gpu, 'output', [out], c.vocabSize, c.dim, weightDtype);
    this.finalNorm = uploadArray(gpu, 'output_norm', weights.finalNorm.data);
    this.allocate(Math.max(1, opts.maxRowsPerStep ?? 64), 8, 4096);
  }

  /** (Re)allocates activation buffers and rebuilds the bind groups that point at them. */
  private allocate(rows: number, logitRows: number, metaWords: number): void {
    const g = this.gpu;
    const c = this.config;
    if (this.act) for (const b of Object.values(this.act)) b.destroy();
    this.destroySlots();
    const timed = this.opts.gpuTiming === true && g.features.has('timestamp-query');
    this.slots = [0, 1].map((i) => ({
      // Picks, then (for rows that asked) their logprobs.
      picksReadback: g.device.createBuffer({ label: `picks readback ${i}`, size: Math.max(16, logitRows * (1 + PICK_INFO_WORDS) * 4), usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }),
      // Timestamp queries around the step (opts.gpuTiming on an adapter with timestamp-query).
      timing: timed
        ? {
            queries: g.device.createQuerySet({ label: `step timestamps ${i}`, type: 'timestamp', count: 2 }),
            resolve: g.device.createBuffer({ label: `step timestamps resolve ${i}`, size: 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC }),
            read: g.device.createBuffer({ label: `step timestamps read ${i}`, size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }),
          }
        : undefined,
      busy: false,
    }));
    const f = 4;
    this.act = {
      meta: storageBuffer(g, 'step metadata', metaWords * 4),
      x: storageBuffer(g, 'residual rows', rows * this.dimStride * f),
      xn: storageBuffer(g, 'normed rows', rows * this.dimStride * f),
      attn: storageBuffer(g, 'attention rows', rows * this.attnStride * f),
      gateUp: storageBuffer(g, 'gate/up rows', rows * this.gateUpStride * f),
      h: storageBuffer(g, 'mlp hidden rows', rows * this.hiddenStride * f),
      xLogit: storageBuffer(g, 'logit rows (normed)', logitRows * this.dimStride * f),
      logits: storageBuffer(g, 'logits', logitRows * c.vocabSize * f),
      readback: g.device.createBuffer({ label: 'logits readback', size: Math.max(16, logitRows * c.vocabSize * f), usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }),
      pickParams: storageBuffer(g, 'pick settings', logitRows * PICK_PARAM_WORDS * 4),
      picks: storageBuffer(g, 'picks', Math.max(16, logitRows * 4)),
      pickInfo: storageBuffer(g, 'pick logprobs', logitRows * PICK_INFO_WORDS * 4),
    };
    this.capacity = { rows, logitRows, metaWords };
    const a = this.act;
    const t = this.opts.matmulTuning;
    // int8 weights: the attention and FFN norms also write xn quantized per row, the input of every W8A8 projection
    // that reads xn (q/k/v or MLA q and kv_a, gate/up), which then record no quantize dispatch of their own.
    for (const q of [this.xnQ, this.hQ]) {
      q?.xq.destroy();
      q?.xScale.destroy();
    }
    const gu = this.layers[0]?.wGateUp;
    this.xnQ = gu?.dtype === 'int8' && c.dim % 4 === 0 ? createQuantizedRows(g, 'normed rows', rows, gu.stride / 4) : undefined;
    // Likewise SiLU·mul writes the hidden rows quantized for an int8 down projection (steps on its W8A8 path).
    const down = this.layers[0]?.wDown;
    this.hQ =
      down?.dtype === 'int8' && c.hiddenDim % 4 === 0 && this.gateUpStride % 4 === 0 ? createQuantizedRows(g, 'mlp hidden rows', rows, down.stride / 4) : undefined;
    this.block.bind({
      meta: a.meta,
      xn: a.xn,
      xnStride: this.dimStride,
      ...(this.xnQ ? { xnQuantized: this.xnQ } : {}),
      out: a.attn,
      outStride: this.attnStride,
      maxRows: rows,
      layerCaches: this.pool.layerBuffers,
    });
    const norm = (w: GPUBuffer, gather = false) =>
      new RmsNorm(
        g,
        {
          meta: a.meta,
          x: a.x,
          xStride: this.dimStride,
          weight: w,
          out: gather ? a.xLogit : a.xn,
          outStride: this.dimStride,
          ...(this.xnQ && !gather ? { quantized: this.xnQ } : {}),
        },
        c.dim,
        c.rmsEps,
        gather,
      );
    this.ops = {
      embed: new EmbeddingGather(g, this.embedding, { meta: a.meta, x: a.x, xStride: this.dimStride }),
      attnNorm: this.layers.map((l) => norm(l.attnNorm)),
      ffnNorm: this.layers.map((l) => norm(l.ffnNorm)),
      oProj: this.layers.map(
        (l) => linearOp(g, l.wo, { meta: a.meta, rowsSlot: META_ROWS, x: a.attn, xStride: this.attnStride, y: a.x, yStride: this.dimStride, accumulate: true }, t),
      ),
      gateUp: this.layers.map(
        (l) => linearOp(g, l.wGateUp, { meta: a.meta, rowsSlot: META_ROWS, x: a.xn, xStride: this.dimStride, xQuantized: this.xnQ, y: a.gateUp, yStride: this.gateUpStride }, t),
      ),
      siluMul: new SiluMul(
        g,
        { meta: a.meta, gateUp: a.gateUp, gateUpStride: this.gateUpStride, out: a.h, outStride: this.hiddenStride, ...(this.hQ ? { quantized: this.hQ } : {}) },
        c.hiddenDim,
      ),
      down: this.layers.map(
        (l) =>
          linearOp(g, l.wDown, { meta: a.meta, rowsSlot: META_ROWS, x: a.h, xStride: this.hiddenStride, xQuantized: this.hQ, y: a.x, yStride: this.dimStride, accumulate: true }, t),
      ),
      finalNorm: norm(this.finalNorm, true),
      lmHead: linearOp(g, this.lmHead, { meta: a.meta, rowsSlot: META_LOGIT_ROWS, x: a.xLogit, xStride: this.dimStride, y: a.logits, yStride: c.vocabSize }, t),
      pick: this.pickOp(),
    };
  }

  private validate(seqs: StepSequence[]): void {
    const c = this.config;
    seqs.forEach((s, i) => {
      const end = s.startPos + s.tokens.length;
      if (!Number.isInteger(s.startPos) || s.startPos < 0) throw new Error(`step: sequence ${i} starts at position ${s.startPos}`);
      if (end > c.maxSeqLen) {
        throw new Error(`step: sequence ${i} reaches position ${end - 1}, past the model's context of ${c.maxSeqLen} tokens`);
      }
      for (const t of s.tokens) {
        if (!Number.isInteger(t) || t < 0 || t >= c.vocabSize) throw new Error(`step: sequence ${i} has token id ${t}, outside the vocabulary of ${c.vocabSize}`);
      }
      const bad = (s.logits === 'sample' ? pickSamplingError(s.sample) : null) ?? pickAdjustError(s, c.vocabSize);
      if (bad) throw new Error(`step: sequence ${i}: ${bad}`);
    });
  }

  step(seqs: StepSequence[]): Promise<Float32Array> {
    if (seqs.some((s) => s.logits === 'argmax' || s.logits === 'sample')) return Promise.reject(new Error('step: a sequence asks for a pick; use stepOutput'));
    return this.run(seqs, 'step').then((r) => r.logits);
  }

  stepOutput(seqs: StepSequence[]): Promise<StepOutput> {
    return this.run(seqs, 'step').then(({ logits, picks, pickLogprobs, gpuMs }) => ({
      logits,
      picks,
      ...(pickLogprobs ? { pickLogprobs } : {}),
      ...(gpuMs !== undefined ? { gpuMs } : {}),
    }));
  }

  /**
   * A step that also returns every layer's attention input after RMSNorm (xn) for every row: the calibration
   * activations of TransMLA. The copies are made in the step's own command encoder (the pass is split after each
   * attention norm); plain `step` encodes none of this.
   */
  stepCapture(seqs: StepSequence[]): Promise<CaptureStep> {
    return this.run(seqs, 'capture');
  }

  stepProfile(seqs: StepSequence[]): Promise<StepOutput & { dispatches: DispatchTime[] }> {
    if (!this.gpu.features.has('timestamp-query')) return Promise.reject(new Error('stepProfile: this adapter has no timestamp queries'));
    this.profiler ??= new StepProfiler(this.gpu.device);
    return this.run(seqs, 'profile');
  }

  submitChunks: number;
  private submitAfterCache: { nLayers: number; chunks: number; set: Set<number> } | undefined;
  private submitAfter(nLayers: number): Set<number> {
    const cached = this.submitAfterCache;
    if (cached?.nLayers === nLayers && cached.chunks === this.submitChunks) return cached.set;
    const set = submitBoundaries(nLayers, this.submitChunks);
    this.submitAfterCache = { nLayers, chunks: this.submitChunks, set };
    return set;
  }

  private async run(seqs: StepSequence[], mode: 'step' | 'capture' | 'profile'): Promise<CaptureStep & StepOutput & { dispatches: DispatchTime[] }> {
    const calledAt = performance.now();
    const capture = mode === 'capture';
    if (this.exclusive) throw new Error(`step: a capture or profile step of this runner has not finished; it runs alone`);
    if (mode !== 'step' && this.inFlight > 0) throw new Error(`step: ${mode} runs alone, and ${this.inFlight} step(s) of this runner have not finished`);
    if (this.slots[this.nextSlot].busy) throw new Error('step: two steps of this runner are in flight already; await one first');
    this.validate(seqs);
    seqs.forEach((s, i) => {
      if (s.previousPick === undefined) return;
      if (s.tokens.length !== 1 || !Number.isInteger(s.previousPick) || s.previousPick < 0 || s.previousPick >= this.lastSubmittedPicks) {
        throw new Error(`step: sequence ${i} takes previousPick ${s.previousPick}: it needs one token and a previous step with more than that many picks (it had ${this.lastSubmittedPicks})`);
      }
    });
    const isPick = (s: StepSequence) => s.logits === 'argmax' || s.logits === 'sample';
    const pickRows = seqs.filter(isPick);
    // Each pick sequence's last step row: its input token is the pending output token of adjustments with `pending`.
    const pickLastRows: number[] = [];
    seqs.reduce((row, s) => {
      if (isPick(s)) pickLastRows.push(row + s.tokens.length - 1);
      return row + s.tokens.length;
    }, 0);
    const pickSpecs = pickRows.map((s): PickSpec => (s.logits === 'sample' ? { kind: 'sample', ...s.sample! } : { kind: 'argmax' }));
    const meta = buildStepMeta(seqs, {
      blockSize: this.blockSize,
      numBlocks: this.numBlocks,
      nKvHeads: this.block.parallelHeads,
      maxChunkSize: this.block.maxChunk,
      ...(this.block.minChunk ? { minChunkSize: this.block.minChunk } : {}),
      targetWorkgroups: this.block.targetWorkgroups,
    });
    const vocab = this.config.vocabSize;
    const nLayers = this.layers.length;
    if (meta.nRows === 0) return { logits: new Float32Array(0), picks: new Uint32Array(0), attnInputs: capture ? this.layers.map(() => new Float32Array(0)) : [], dispatches: [] };
    if (meta.nRows > this.capacity.rows || meta.nLogitRows > this.capacity.logitRows || meta.data.length > this.capacity.metaWords) {
      if (this.inFlight > 0) throw new Error(`step: ${meta.nRows} rows need larger buffers, which cannot be made while a step is in flight; await it first`);
      const grow = (need: number, have: number) => (need > have ? Math.max(need, Math.ceil(have * 1.5)) : have);
      this.allocate(
        grow(meta.nRows, this.capacity.rows),
        grow(meta.nLogitRows, this.capacity.logitRows),
        grow(meta.data.length + HEADER_WORDS, this.capacity.metaWords),
      );
    }
    const adjustEntries = pickRows.reduce((n, s) => n + (s.adjust?.ids.length ?? 0), 0);
    const wantLogprobs = pickRows.some((s) => s.logprobs !== undefined);
    if (adjustEntries > this.pickAdjustEntries) {
      // A step in flight may still read the old buffer (penalized rows grow by a token a step while pipelined): it goes
      // once no step is in flight.
      this.pickAdjustEntries = Math.max(adjustEntries, Math.ceil(this.pickAdjustEntries * 1.5));
      if (this.pickAdjust && this.inFlight > 0) this.retiredAdjust.push(this.pickAdjust);
      else this.pickAdjust?.destroy();
      this.pickAdjust = undefined;
      this.ops!.pick = this.pickOp();
    }
    const rows = meta.nRows;
    // One layer's xn rows as the runner holds them (row stride dimStride), copied back to back per layer.
    const layerBytes = rows * this.dimStride * 4;
    if (capture && (!this.captureReadback || this.captureReadback.size < nLayers * layerBytes)) {
      this.captureReadback?.destroy();
      const size = nLayers * layerBytes;
      if (size > this.gpu.limits.maxBufferSize) {
        throw new Error(
          `stepCapture: ${rows} rows × ${nLayers} layers × ${this.config.dim} values need ${size} B of readback, more than this GPU's ` +
            `max buffer size of ${this.gpu.limits.maxBufferSize} B; capture fewer rows per step`,
        );
      }
      this.captureReadback = this.gpu.device.createBuffer({ label: 'attention inputs readback', size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    }
    // Picked after any growth: allocate() makes new slots.
    const slot = this.slots[this.nextSlot];
    const fullBytes = meta.nFullLogitRows * vocab * 4;
    if (fullBytes > 0 && this.logitsReadbackBusy) throw new Error('step: the step in flight reads back logits rows; await it before another step that does');
    slot.busy = true;
    this.nextSlot = (this.nextSlot + 1) % this.slots.length;
    this.inFlight++;
    this.exclusive = mode !== 'step';
    if (fullBytes > 0) this.logitsReadbackBusy = true;
    this.lastSubmittedPicks = meta.nLogitRows - meta.nFullLogitRows;
    try {
      const g = this.gpu;
      const a = this.act!;
      const ops = this.ops!;
      g.device.queue.writeBuffer(a.meta, 0, meta.data);
      if (pickSpecs.length > 0) {
        const words = new Uint32Array(pickSpecs.length * PICK_PARAM_WORDS);
        const entries = adjustEntries > 0 ? new Uint32Array(adjustEntries * PICK_ADJUST_WORDS) : undefined;
        let first = 0;
        pickSpecs.forEach((p, k) => {
          const adj = pickRows[k].adjust;
          const pending = adj?.pending ? { row: pickLastRows[k], penalty: adj.pending } : null;
          writePickParams(words, k, p, { first, count: adj?.ids.length ?? 0, logprobs: pickRows[k].logprobs ?? null, pending });
          if (adj && entries) writePickAdjustments(entries, first, adj);
          first += adj?.ids.length ?? 0;
        });
        g.device.queue.writeBuffer(a.pickParams, 0, words);
        if (entries) g.device.queue.writeBuffer(this.pickAdjust!, 0, entries);
      }
      this.block.prepare(meta);
      const timing = mode === 'step' ? slot.timing : undefined;
      const boundaries = mode === 'step' ? this.submitAfter(nLayers) : new Set<number>();
      const profiling = mode === 'profile' ? this.profiler! : undefined;
      const lastChunkStart = Math.max(-1, ...boundaries) + 1;
      // The step's first pass stamps its beginning and the last pass its end: with several submissions the span includes
      // any wait for the host between them.
      const beginPass = (label: string, firstLayer: number) => {
        const first = firstLayer === 0;
        const last = firstLayer === lastChunkStart;
        if (!timing || !(first || last)) return enc.beginComputePass({ label });
        const timestampWrites: GPUComputePassTimestampWrites = {
          querySet: timing.queries,
          ...(first ? { beginningOfPassWriteIndex: 0 } : {}),
          ...(last ? { endOfPassWriteIndex: 1 } : {}),
        };
        return enc.beginComputePass({ label, timestampWrites });
      };
      let enc = g.device.createCommandEncoder({ label: 'decoder step' });
      // Tokens that are the previous step's picks: copied on the GPU into the rows' token slots, over the placeholders
      // writeBuffer put there (queue order: the previous step has written its picks by then). Runs of consecutive rows
      // taking consecutive picks are one copy.
      if (seqs.some((s) => s.previousPick !== undefined)) {
        let row = 0;
        let run: { row: number; pick: number; n: number } | undefined;
        const flush = () => {
          if (run) enc.copyBufferToBuffer(a.picks, run.pick * 4, a.meta, (HEADER_WORDS + run.row) * 4, run.n * 4);
          run = undefined;
        };
        for (const s of seqs) {
          const k = s.previousPick;
          if (k !== undefined) {
            if (run && run.row + run.n === row && run.pick + run.n === k) run.n++;
            else {
              flush();
              run = { row, pick: k, n: 1 };
            }
          }
          row += s.tokens.length;
        }
        flush();
      }
      // Profiling: the ops record into a stand-in that puts each dispatch in a timestamped pass of its own.
      const profilePass = profiling?.begin(enc);
      let pass = profilePass ? (profilePass as unknown as GPUComputePassEncoder) : beginPass('decoder step', 0);
      ops.embed.encode(pass, rows);
      for (let l = 0; l < nLayers; l++) {
        ops.attnNorm[l].encode(pass, rows);
        if (capture) {
          // Buffer copies cannot sit inside a compute pass: end it, copy xn, go on in a fresh pass.
          pass.end();
          enc.copyBufferToBuffer(a.xn, 0, this.captureReadback!, l * layerBytes, layerBytes);
          pass = enc.beginComputePass({ label: `decoder step after layer ${l} capture` });
        }
        this.block.encodeLayer(pass, l, meta);
        ops.oProj[l].encode(pass, rows);
        ops.ffnNorm[l].encode(pass, rows);
        ops.gateUp[l].encode(pass, rows);
        const downOp = ops.down[l];
        ops.siluMul.encode(pass, rows, this.hQ !== undefined && downOp instanceof Int8MatmulOp && downOp.path(rows) !== 'gemv');
        downOp.encode(pass, rows);
        if (boundaries.has(l)) {
          pass.end();
          g.device.queue.submit([enc.finish()]);
          enc = g.device.createCommandEncoder({ label: `decoder step after layer ${l}` });
          pass = beginPass(`decoder step after layer ${l}`, l + 1);
        }
      }
      const nLogit = meta.nLogitRows;
      const nPicks = nLogit - meta.nFullLogitRows;
      if (nLogit > 0) {
        ops.finalNorm.encode(pass, nLogit);
        ops.lmHead.encode(pass, nLogit);
        ops.pick.encode(pass, nPicks);
      }
      pass.end();
      // Only the full rows come back; pick rows (after them) send their token.
      if (fullBytes > 0) enc.copyBufferToBuffer(a.logits, 0, a.readback, 0, fullBytes);
      if (nPicks > 0) enc.copyBufferToBuffer(a.picks, 0, slot.picksReadback, 0, nPicks * 4);
      if (wantLogprobs) enc.copyBufferToBuffer(a.pickInfo, 0, slot.picksReadback, nPicks * 4, nPicks * PICK_INFO_WORDS * 4);
      if (profilePass) profiling!.finish(enc, profilePass);
      if (timing) {
        enc.resolveQuerySet(timing.queries, 0, 2, timing.resolve, 0);
        enc.copyBufferToBuffer(timing.resolve, 0, timing.read, 0, 16);
      }
      g.device.queue.submit([enc.finish()]);
      this.lastStepRecordMs = performance.now() - calledAt;
      let logits = new Float32Array(0);
      let picks = new Uint32Array(0);
      let gpuMs: number | undefined;
      if (fullBytes === 0 && nPicks === 0) await g.device.queue.onSubmittedWorkDone();
      if (fullBytes > 0) {
        await a.readback.mapAsync(GPUMapMode.READ, 0, fullBytes);
        logits = new Float32Array(a.readback.getMappedRange(0, fullBytes).slice(0));
        a.readback.unmap();
      }
      let pickLogprobs: Array<SampledLogprobs | null> | undefined;
      if (nPicks > 0) {
        const bytes = nPicks * (wantLogprobs ? 1 + PICK_INFO_WORDS : 1) * 4;
        await slot.picksReadback.mapAsync(GPUMapMode.READ, 0, bytes);
        const words = new Uint32Array(slot.picksReadback.getMappedRange(0, bytes).slice(0));
        slot.picksReadback.unmap();
        picks = words.subarray(0, nPicks);
        if (wantLogprobs) {
          const info = words.subarray(nPicks);
          pickLogprobs = pickRows.map((s, k) => (s.logprobs === undefined ? null : readPickLogprobs(info, k)));
        }
      }
      if (timing) {
        await timing.read.mapAsync(GPUMapMode.READ, 0, 16);
        const t = new BigUint64Array(timing.read.getMappedRange(0, 16).slice(0));
        timing.read.unmap();
        this.lastStepGpuMs = t[1] > t[0] ? Number(t[1] - t[0]) / 1e6 : null;
        if (this.lastStepGpuMs !== null) gpuMs = this.lastStepGpuMs;
      }
      const dispatches = profilePass ? await profiling!.times(profilePass) : [];
      const attnInputs: Float32Array[] = [];
      if (capture) {
        const rb = this.captureReadback!;
        await rb.mapAsync(GPUMapMode.READ, 0, nLayers * layerBytes);
        const all = new Float32Array(rb.getMappedRange(0, nLayers * layerBytes));
        const dim = this.config.dim;
        const ds = this.dimStride;
        for (let l = 0; l < nLayers; l++) {
          const xn = new Float32Array(rows * dim);
          const base = l * rows * ds;
          for (let r = 0; r < rows; r++) xn.set(all.subarray(base + r * ds, base + r * ds + dim), r * dim);
          attnInputs.push(xn);
        }
        rb.unmap();
      }
      g.checkErrors();
      return { logits, picks, ...(pickLogprobs ? { pickLogprobs } : {}), gpuMs, attnInputs, dispatches };
    } finally {
      slot.busy = false;
      this.inFlight--;
      if (this.inFlight === 0) for (const b of this.retiredAdjust.splice(0)) b.destroy();
      this.exclusive = false;
      if (fullBytes > 0) this.logitsReadbackBusy = false;
    }
  }

  describe(): RunnerDescription {
    // lm_head is a projection like the others: its op shows which int8 kernels this adapter gets.
    const op = this.ops?.lmHead;
    const int8 = op instanceof Int8MatmulOp ? op : null;
    return {
      adapter: this.adapterName,
      attention: this.config.attention,
      weightDtype: this.weightDtype,
      denseDtype: denseDtypeFor(this.weightDtype),
      cacheDtype: this.block.layout.dtype,
      kvBytesPerToken: this.kvBytesPerToken,
      attentionProducts: this.block.products ?? 'f32',
      headProducts: this.block.headProducts ?? 'none',
      int8Matmul: int8 && { gemvMaxRows: int8.tuning.gemvMaxRows, fewRows: int8.path(1), batched: int8.path(int8.tuning.gemvMaxRows + 1) },
    };
  }

  copyBlocks(pairs: Array<[src: number, dst: number]>): void {
    this.pool.copyBlocks(pairs);
  }

  /** The pick op over the current activation buffers and adjustments buffer (made at pickAdjustEntries entries). */
  private pickOp(): RowPick {
    const a = this.act!;
    this.pickAdjustEntries = Math.max(this.pickAdjustEntries, 1024);
    this.pickAdjust ??= storageBuffer(this.gpu, 'pick logit adjustments', this.pickAdjustEntries * PICK_ADJUST_WORDS * 4);
    return new RowPick(this.gpu, { meta: a.meta, logits: a.logits, params: a.pickParams, picks: a.picks, adjust: this.pickAdjust, info: a.pickInfo }, this.config.vocabSize);
  }

  private destroySlots(): void {
    for (const s of this.slots) {
      s.picksReadback.destroy();
      s.timing?.queries.destroy();
      s.timing?.resolve.destroy();
      s.timing?.read.destroy();
    }
    this.slots = [];
  }

  destroy(): void {
    if (this.act) for (const b of Object.values(this.act)) b.destroy();
    this.xnQ?.xq.destroy();
    this.xnQ?.xScale.destroy();
    this.hQ?.xq.destroy();
    this.hQ?.xScale.destroy();
    this.destroySlots();
    this.act = undefined;
    this.captureReadback?.destroy();
    this.captureReadback = undefined;
    this.pickAdjust?.destroy();
    this.pickAdjust = undefined;
    for (const b of this.retiredAdjust.splice(0)) b.destroy();
    this.profiler?.destroy();
    this.profiler = undefined;
    this.block.destroy();
    this.pool.destroy();
    for (const l of this.layers) {
      l.attnNorm.destroy();
      l.ffnNorm.destroy();
      destroyLinear(l.wo);
      destroyLinear(l.wGateUp);
      destroyLinear(l.wDown);
    }
    if (this.lmHead !== this.embedding) destroyLinear(this.lmHead);
    destroyMatrix(this.embedding);
    this.finalNorm.destroy();
    for (const t of this.ropeTables.values()) t.destroy();
  }
}

/**
 * Uploads a model's weights once and returns its step runner over a paged KV pool. GQA models use the built-in
 * attention block, MLA models the latent-cache block (engine/mla-block.ts); `opts.attentionBlock` overrides.
 */
export async function createGpuRunner(
  gpu: GpuContext,
  model: { config: ModelConfig; weights: ModelWeights },
  opts: GpuRunnerOptions = {},
): Promise<GpuModelRunner> {
  const { config, weights } = model;
  const weightDtype = opts.weightDtype ?? 'f16';
  const cacheDtype = opts.cacheDtype ?? 'f16';
  const blockSize = opts.blockSize ?? 16;
  if (weights.layers.length !== config.nLayers) {
    throw new Error(`model has ${weights.layers.length} layers of weights, its config says ${config.nLayers}`);
  }
  // The layer type comes from the config: MLA models get the latent-cache block (engine/mla-block.ts).
  const factory: AttentionBlockFactory =
    opts.attentionBlock ?? (config.attention === 'mla' ? (ctx) => new MlaBlock(ctx) : (ctx) => new GqaBlock(ctx));
  // The rope table belongs to the runner; blocks ask for it through the context before the runner exists.
  const tables = new Map<number, GPUBuffer>();
  const ctx: AttentionBlockContext = {
    gpu,
    config,
    weights,
    weightDtype: denseDtypeFor(weightDtype),
    linearDtype: weightDtype,
    cacheDtype,
    blockSize,
    matmulTuning: opts.matmulTuning,
    ropeTable(dims) {
      let t = tables.get(dims);
      if (!t) tables.set(dims, (t = ropeTable(gpu, dims, config.ropeTheta, config.maxSeqLen)));
      return t;
    },
  };
  gpu.device.pushErrorScope('validation');
  gpu.device.pushErrorScope('out-of-memory');
  let runner: GpuRunner | undefined;
  let failure: unknown;
  let block: AttentionBlock | undefined;
  try {
    block = factory(ctx);
    runner = new GpuRunner(gpu, config, weights, block, opts, weightDtype, tables);
  } catch (e) {
    failure = e;
  }
  const oom = await gpu.device.popErrorScope();
  const invalid = await gpu.device.popErrorScope();
  if (failure || oom || invalid) {
    if (runner) runner.destroy();
    else {
      block?.destroy();
      for (const t of tables.values()) t.destroy();
    }
    if (failure) throw failure;
    throw new Error(`uploading ${config.arch} weights and the KV pool to the GPU failed: ${(oom ?? invalid)!.message}`);
  }
  await gpu.device.queue.onSubmittedWorkDone();
  gpu.checkErrors();
  return runner!;
}

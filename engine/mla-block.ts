// The MLA attention block of the GPU runner: q and latent projections, RoPE, latent cache write, absorbed attention, W_UV.
//
// Per layer, for every row of the step (R = kvLoraRank, r = qkRopeHeadDim, dn/dv = nope/v head dims):
//   q      = q_proj xn (+b)  or  q_b_proj(q_a_layernorm?(q_a_proj xn))           → q[row, h, 0..dn+r)
//   latent = kv_a_proj_with_mqa xn (+b); c ← kv_a_layernorm(c) when the config asks → [c | k_pe]
//   RoPE on q_pe (every head) and k_pe; the row [c | k_pe] goes into the paged latent cache
//   qLatent[row, h] = scale · [W_UK,hᵀ q_nope,h | q_pe,h]   (absorption, one per-head matmul for all rows)
//   ô[row, h]       = Σ_j softmax(qLatent·row_j) c_j         (kernels/mla-attention.ts)
//   out[row, h]     = W_UV,h ô[row, h]                        → the runner's o_proj input
// Prefill rows take the same absorbed path as decode rows: each row attends to its own prefix (causal).
import { RmsNorm, Rope } from '../kernels/elementwise.ts';
import { KvWrite } from '../kernels/kv-write.ts';
import { MlaLatentWriteInt8 } from '../kernels/mla-kv-int8.ts';
import { destroyLinear, linearOp, uploadLinear, type LinearOp, type LinearWeight } from '../kernels/linear.ts';
import { MLA_MAX_CHUNK, MLA_MIN_CHUNK, MlaAttention, mlaSplit, type MlaAttentionBack, type MlaAttentionFront, type MlaAttentionTuning } from '../kernels/mla-attention.ts';
import { fusedHeadWeights } from '../kernels/mla-head-fused.ts';
import { FRONT_MAX_ROWS } from '../kernels/mla-front.ts';
import { HeadMatmul, headDecodeProducts, uploadHeadMatrices, type HeadDecodeKernel, type HeadPrefillKernel } from '../kernels/mla-head-matmul.ts';
import { META_ROWS, type StepMeta } from '../kernels/step-meta.ts';
import { destroyMatrix, pad8, storageBuffer, uploadArray, type GpuMatrix } from '../kernels/tensors.ts';
import { MlaKvLayout } from '../cache/mla-layout.ts';
import type { MlaConfig } from '../model/config.ts';
import type { MlaLayerWeights, Tensor } from '../model/weights.ts';
import type { AttentionBindings, AttentionBlock, AttentionBlockContext, AttentionProducts } from './gpu-runner.ts';

/** One layer's MLA weights on the GPU. */
interface MlaLayerGpu {
  /** q_proj, or q_a_proj + q_b_proj (+ q_a_layernorm weight); projections in the runner's linear dtype (int8 too). */
  qProj?: LinearWeight;
  qProjBias?: GPUBuffer;
  qAProj?: LinearWeight;
  qANorm?: GPUBuffer;
  qBProj?: LinearWeight;
  /** Without kv_a_layernorm: all R + r rows in one matrix; with it, the c rows and the k_pe rows apart. */
  kvAProj?: LinearWeight;
  kvAProjBias?: GPUBuffer;
  kvACProj?: LinearWeight;
  kvACBias?: GPUBuffer;
  kvAPeProj?: LinearWeight;
  kvAPeBias?: GPUBuffer;
  kvANorm?: GPUBuffer;
  /**
   * Without q LoRA and kv_a_layernorm (TransMLA's conversions): kv_a_proj_with_mqa and q_proj as one matrix, rows
   * [c | k_pe | q], so one GEMM (and one RoPE) serves both; kvAProj and qProj are then absent.
   */
  qkvAProj?: LinearWeight;
  qkvABias?: GPUBuffer;
  /** W_UK per head, k-major [nHeads·dn, R]; W_UV per head, k-major [nHeads·R, dv] (f16/f32 even with int8 projections). */
  wUk: GpuMatrix;
  wUv: GpuMatrix;
}

interface MlaLayerOps {
  q: Array<LinearOp | RmsNorm>;
  kv: Array<LinearOp | RmsNorm>;
  absorb: HeadMatmul;
  wUv: HeadMatmul;
}

function rowsOf(t: Tensor, r0: number, n: number): Tensor {
  const cols = t.shape[1];
  return { shape: [n, cols], data: t.data.subarray(r0 * cols, (r0 + n) * cols) };
}

export interface MlaBlockOptions {
  attentionTuning?: Partial<MlaAttentionTuning>;
  /** Steps of at least this many rows take the tiled W_UK / W_UV kernel (HeadMatmulOptions.tiledMinRows). */
  headTiledMinRows?: number;
  /** K slices of the W_UK / W_UV decode kernel (HeadMatmulOptions.kSlices). */
  headKSlices?: 8 | 16 | 32;
  /** The W_UK / W_UV kernel of steps below headTiledMinRows (HeadMatmulOptions.decodeKernel; default 'staged'). */
  headDecodeKernel?: HeadDecodeKernel;
  /** The W_UK / W_UV kernel of steps from headTiledMinRows rows on (HeadMatmulOptions.prefillKernel; default 'tiled'). */
  headPrefillKernel?: HeadPrefillKernel;
  /** Smallest context chunk of the attention's split (default MLA_MIN_CHUNK; a power of two). */
  minChunk?: number;
  /**
   * Steps of at most this many rows run the decode front (kernels/mla-front.ts: RoPE, the int8 latent write, W_UK
   * and the query quantizer in one dispatch a layer) where the attention's products are int8; larger steps, and
   * f16/f32 caches, take the separate kernels. Default FRONT_MAX_ROWS (32); 0 turns it off. On an H100 (2026-12-06,
   * Qwen2.5-7B-MLA, int8 weights and cache, ctx 512) it took 0.20–0.24 ms off an 8-row step's 7.9 ms of GPU time and
   * 0.35 off a 32-row step's 11.5.
   */
  frontMaxRows?: number;
  /**
   * Steps of at most this many rows run the decode back (kernels/mla-back.ts: the attention's merge and W_UV in one
   * dispatch a layer); larger steps take the merge and the W_UV kernel. Default 0 (off: on an H100 it left 8- and
   * 32-row steps where they were, 7.99 against 7.96 and 11.50 against 11.50 ms of GPU time, 2026-12-06).
   */
  backMaxRows?: number;
}

export class MlaBlock implements AttentionBlock {
  readonly layout: MlaKvLayout;
  readonly outWidth: number;
  readonly maxChunk = MLA_MAX_CHUNK;
  readonly minChunk: number;
  readonly parallelHeads: number;
  readonly targetWorkgroups: number;
  private readonly config: MlaConfig;
  private readonly layers: MlaLayerGpu[];
  private readonly qCols: number;
  /** q and the latent rows [c | k_pe]: separate buffers, or (fused) one buffer of rows [c | k_pe | q]. */
  private readonly fused: boolean;
  private readonly qStride: number;
  private readonly qOffset: number;
  private readonly latentStride: number;
  private act: Record<string, GPUBuffer> = {};
  private ops: MlaLayerOps[] = [];
  /** One RoPE over k_pe and every head's q_pe where the fused row puts them a head stride apart, else two. */
  private ropes: Rope[] = [];
  /** f16/f32: the plain paged write; int8 (--kv-cache-dtype int8): quantizes c and k_pe, one scale each. */
  private kvWrite: KvWrite | MlaLatentWriteInt8 | undefined;
  private attention: MlaAttention | undefined;

  /** RunnerDescription.headProducts: what the W_UK / W_UV kernel of decode-sized steps multiplies in. */
  readonly headProducts: string;
  /** Steps of at most this many rows run the decode front (0: never; int8 products only). */
  readonly frontMaxRows: number;
  /** Steps of at most this many rows run the decode back (0: never). */
  readonly backMaxRows: number;

  get products(): AttentionProducts {
    return this.attention?.products ?? 'f32';
  }

  constructor(
    private ctx: AttentionBlockContext,
    private opts: MlaBlockOptions = {},
  ) {
    if (ctx.config.attention !== 'mla') throw new Error(`the MLA block serves MLA models; this one is ${ctx.config.attention} (${ctx.config.arch})`);
    const c = ctx.config;
    ctx.weights.layers.forEach((lw, l) => {
      if (lw.kind !== 'mla') throw new Error(`layer ${l} is ${lw.kind}; an MLA model (${c.arch}) needs MLA layers`);
    });
    this.config = c;
    const R = c.kvLoraRank;
    const r = c.qkRopeHeadDim;
    // Workgroups per row along heads in the widest attention variant (what long-context decode runs): sizes the split.
    const split = mlaSplit({ nHeads: c.nHeads, kvLoraRank: R, qkRopeHeadDim: r }, ctx.cacheDtype, opts.attentionTuning);
    this.parallelHeads = split.parallelHeads;
    this.targetWorkgroups = split.targetWorkgroups;
    const minChunk = opts.minChunk ?? MLA_MIN_CHUNK;
    if (!(minChunk >= 1 && minChunk <= MLA_MAX_CHUNK && (minChunk & (minChunk - 1)) === 0)) {
      throw new Error(`MLA block: minChunk ${minChunk} is not a power of two from 1 to ${MLA_MAX_CHUNK}`);
    }
    // A kernel whose K steps start on chunk bounds (the one-pass tensor-core kernel) raises it.
    this.minChunk = Math.max(minChunk, split.minChunk ?? 1);
    const dn = c.qkNopeHeadDim;
    const dv = c.vHeadDim;
    this.layout = new MlaKvLayout(c, ctx.blockSize, ctx.cacheDtype);
    this.outWidth = c.nHeads * dv;
    this.qCols = c.nHeads * (dn + r);
    this.fused = c.qLoraRank === null && !c.qkLatentLayernorm;
    this.latentStride = this.fused ? pad8(R + r + this.qCols) : pad8(R + r);
    this.qStride = this.fused ? this.latentStride : pad8(this.qCols);
    this.qOffset = this.fused ? R + r : 0;
    const g = ctx.gpu;
    const dt = ctx.weightDtype;
    // Projections follow the runner's linear dtype (int8 per output channel with --weight-dtype int8); the absorbed
    // head matrices W_UK / W_UV are uploaded in dt (the 'w8a8' head kernel quantizes its own copy on the GPU).
    const lt = ctx.linearDtype ?? dt;
    const int8Products = this.layout.latentInt8 !== undefined && (opts.attentionTuning?.int8Products ?? 'off') !== 'off';
    this.frontMaxRows = int8Products ? (opts.frontMaxRows ?? FRONT_MAX_ROWS) : 0;
    this.backMaxRows = opts.backMaxRows ?? 0;
    // 'front<=32+f16': W_UK of steps up to 32 rows in the decode front, larger steps and W_UV on the f16 kernel (as
    // int8_matmul's 'gemv+w8a8'); 'fused<=32+f16': W_UV in the decode back too ('back<=32+…' alone).
    const fusedRows = Math.max(this.frontMaxRows, this.backMaxRows);
    const form = this.frontMaxRows > 0 && this.backMaxRows > 0 ? 'fused' : this.frontMaxRows > 0 ? 'front' : 'back';
    const prefix = fusedRows > 0 ? `${form}<=${fusedRows}+` : '';
    this.headProducts = `${prefix}${headDecodeProducts(g, opts.headDecodeKernel ?? 'staged', dt)}`;
    this.layers = ctx.weights.layers.map((lw, l) => {
      if (lw.kind !== 'mla') throw new Error(`layer ${l} is ${lw.kind}; an MLA model (${c.arch}) needs MLA layers`);
      const w = lw as MlaLayerWeights;
      const shape = (t: Tensor | undefined, name: string, want: number[]) => {
        if (!t || t.shape.length !== want.length || t.shape.some((v, i) => v !== want[i])) {
          throw new Error(`layer ${l} ${name} is ${t ? `[${t.shape}]` : 'missing'}, the config wants [${want}]`);
        }
        return t;
      };
      const out: Partial<MlaLayerGpu> = {};
      const kva = shape(w.kvAProj, 'kv_a_proj_with_mqa', [R + r, c.dim]);
      if (this.fused) {
        const qp = shape(w.qProj, 'q_proj', [this.qCols, c.dim]);
        out.qkvAProj = uploadLinear(g, `layer ${l} kv_a_proj_with_mqa + q_proj`, [kva, qp], R + r + this.qCols, c.dim, lt);
        if (w.kvAProjBias || w.qProjBias) {
          const bias = new Float32Array(R + r + this.qCols);
          if (w.kvAProjBias) bias.set(w.kvAProjBias.data, 0);
          if (w.qProjBias) bias.set(w.qProjBias.data, R + r);
          out.qkvABias = uploadArray(g, `layer ${l} kv_a_proj + q_proj bias`, bias);
        }
      } else if (c.qLoraRank === null) {
        out.qProj = uploadLinear(g, `layer ${l} q_proj`, [shape(w.qProj, 'q_proj', [this.qCols, c.dim])], this.qCols, c.dim, lt);
        if (w.qProjBias) out.qProjBias = uploadArray(g, `layer ${l} q_proj bias`, w.qProjBias.data);
      } else {
        const qr = c.qLoraRank;
        out.qAProj = uploadLinear(g, `layer ${l} q_a_proj`, [shape(w.qAProj, 'q_a_proj', [qr, c.dim])], qr, c.dim, lt);
        out.qBProj = uploadLinear(g, `layer ${l} q_b_proj`, [shape(w.qBProj, 'q_b_proj', [this.qCols, qr])], this.qCols, qr, lt);
        if (c.qkLatentLayernorm) out.qANorm = uploadArray(g, `layer ${l} q_a_layernorm`, shape(w.qANorm, 'q_a_layernorm', [qr]).data);
      }
      if (c.qkLatentLayernorm) {
        out.kvACProj = uploadLinear(g, `layer ${l} kv_a_proj (latent rows)`, [rowsOf(kva, 0, R)], R, c.dim, lt);
        out.kvAPeProj = uploadLinear(g, `layer ${l} kv_a_proj (rope rows)`, [rowsOf(kva, R, r)], r, c.dim, lt);
        if (w.kvAProjBias) {
          out.kvACBias = uploadArray(g, `layer ${l} kv_a_proj bias (latent)`, w.kvAProjBias.data.subarray(0, R));
          out.kvAPeBias = uploadArray(g, `layer ${l} kv_a_proj bias (rope)`, w.kvAProjBias.data.subarray(R, R + r));
        }
        out.kvANorm = uploadArray(g, `layer ${l} kv_a_layernorm`, shape(w.kvANorm, 'kv_a_layernorm', [R]).data);
      } else if (!this.fused) {
        out.kvAProj = uploadLinear(g, `layer ${l} kv_a_proj_with_mqa`, [kva], R + r, c.dim, lt);
        if (w.kvAProjBias) out.kvAProjBias = uploadArray(g, `layer ${l} kv_a_proj bias`, w.kvAProjBias.data);
      }
      const kvb = shape(w.kvBProj, 'kv_b_proj', [c.nHeads * (dn + dv), R]).data;
      const headRow = (h: number) => h * (dn + dv);
      out.wUk = uploadHeadMatrices(g, `layer ${l} W_UK`, c.nHeads, dn, R, dt, (h, k, n) => kvb[(headRow(h) + k) * R + n]);
      out.wUv = uploadHeadMatrices(g, `layer ${l} W_UV`, c.nHeads, R, dv, dt, (h, k, n) => kvb[(headRow(h) + dn + n) * R + k]);
      return out as MlaLayerGpu;
    });
  }

  bind(b: AttentionBindings): void {
    const g = this.ctx.gpu;
    const c = this.config;
    const R = c.kvLoraRank;
    const r = c.qkRopeHeadDim;
    const dn = c.qkNopeHeadDim;
    const dv = c.vHeadDim;
    const rows = b.maxRows;
    this.destroyActivations();
    const f = 4;
    const a: Record<string, GPUBuffer> = {
      ...(this.fused
        ? { latent: storageBuffer(g, 'mla latent and q rows [c | k_pe | q]', rows * this.latentStride * f) }
        : { q: storageBuffer(g, 'mla q rows', rows * this.qStride * f), latent: storageBuffer(g, 'mla latent rows [c | k_pe]', rows * this.latentStride * f) }),
      qLatent: storageBuffer(g, 'mla absorbed queries', rows * c.nHeads * (R + r) * f),
      oHat: storageBuffer(g, 'mla latent outputs', rows * c.nHeads * R * f),
    };
    const qaStride = c.qLoraRank === null ? 0 : pad8(c.qLoraRank);
    if (c.qLoraRank !== null) {
      a.qa = storageBuffer(g, 'mla q_a rows', rows * qaStride * f);
      if (c.qkLatentLayernorm) a.qaNormed = storageBuffer(g, 'mla q_a rows (normed)', rows * qaStride * f);
    }
    if (c.qkLatentLayernorm) a.cRaw = storageBuffer(g, 'mla latent rows before kv_a_layernorm', rows * pad8(R) * f);
    this.act = a;
    const qRows = this.fused ? a.latent : a.q;
    const t = this.ctx.matmulTuning;
    // Projections of xn take the norm's int8 rows when the runner has them (int8 weights).
    const mm = (w: LinearWeight, x: GPUBuffer, xStride: number, y: GPUBuffer, yStride: number, bias?: GPUBuffer, yOffset = 0) =>
      linearOp(g, w, { meta: b.meta, rowsSlot: META_ROWS, x, xStride, ...(x === b.xn && b.xnQuantized ? { xQuantized: b.xnQuantized } : {}), y, yStride, yOffset, bias }, t);
    const norm = (x: GPUBuffer, xStride: number, weight: GPUBuffer, out: GPUBuffer, outStride: number, dim: number) =>
      new RmsNorm(g, { meta: b.meta, x, xStride, weight, out, outStride }, dim, c.rmsEps);

    const headOpts = {
      ...(this.opts.headTiledMinRows === undefined ? {} : { tiledMinRows: this.opts.headTiledMinRows }),
      ...(this.opts.headKSlices === undefined ? {} : { kSlices: this.opts.headKSlices }),
      ...(this.opts.headDecodeKernel === undefined ? {} : { decodeKernel: this.opts.headDecodeKernel }),
      ...(this.opts.headPrefillKernel === undefined ? {} : { prefillKernel: this.opts.headPrefillKernel }),
    };
    this.ops = this.layers.map((lg) => {
      const q: Array<LinearOp | RmsNorm> = [];
      if (lg.qkvAProj) {
        q.push(mm(lg.qkvAProj, b.xn, b.xnStride, a.latent, this.latentStride, lg.qkvABias));
      } else if (lg.qProj) {
        q.push(mm(lg.qProj, b.xn, b.xnStride, a.q, this.qStride, lg.qProjBias));
      } else {
        q.push(mm(lg.qAProj!, b.xn, b.xnStride, a.qa, qaStride));
        let qIn = a.qa;
        if (lg.qANorm) {
          q.push(norm(a.qa, qaStride, lg.qANorm, a.qaNormed, qaStride, c.qLoraRank!));
          qIn = a.qaNormed;
        }
        q.push(mm(lg.qBProj!, qIn, qaStride, a.q, this.qStride));
      }
      const kv: Array<LinearOp | RmsNorm> = [];
      if (lg.kvAProj) {
        kv.push(mm(lg.kvAProj, b.xn, b.xnStride, a.latent, this.latentStride, lg.kvAProjBias));
      } else if (lg.kvACProj) {
        kv.push(mm(lg.kvACProj, b.xn, b.xnStride, a.cRaw, pad8(R), lg.kvACBias));
        kv.push(norm(a.cRaw, pad8(R), lg.kvANorm!, a.latent, this.latentStride, R));
        kv.push(mm(lg.kvAPeProj!, b.xn, b.xnStride, a.latent, this.latentStride, lg.kvAPeBias, R));
      }
      const absorb = new HeadMatmul(
        g,
        {
          nHeads: c.nHeads,
          K: dn,
          N: R,
          xStride: this.qStride,
          xOffset: this.qOffset,
          xHeadStride: dn + r,
          yStride: c.nHeads * (R + r),
          yOffset: 0,
          yHeadStride: R + r,
          scale: c.softmaxScale,
          passCols: r,
        },
        lg.wUk,
        { meta: b.meta, x: qRows, y: a.qLatent },
        headOpts,
      );
      const wUv = new HeadMatmul(
        g,
        { nHeads: c.nHeads, K: R, N: dv, xStride: c.nHeads * R, xOffset: 0, xHeadStride: R, yStride: b.outStride, yOffset: 0, yHeadStride: dv, scale: 1 },
        lg.wUv,
        { meta: b.meta, x: a.oHat, y: b.out },
        headOpts,
      );
      return { q, kv, absorb, wUv };
    });
    const table = this.ctx.ropeTable(r);
    const ropeSpan = { headStride: dn + r, ropeOffset: dn, dims: r, layout: c.ropeLayout };
    if (this.fused && R >= dn) {
      // Rows [c | k_pe | q heads]: with head 0 starting at R − dn, k_pe is head 0's rotated part and q head h is head
      // h + 1, so one dispatch rotates all of them.
      this.ropes = [new Rope(g, { meta: b.meta, table, x: a.latent, xStride: this.latentStride }, { ...ropeSpan, nHeads: c.nHeads + 1, colOffset: R - dn })];
    } else {
      this.ropes = [
        new Rope(g, { meta: b.meta, table, x: qRows, xStride: this.qStride }, { ...ropeSpan, nHeads: c.nHeads, colOffset: this.qOffset }),
        new Rope(
          g,
          { meta: b.meta, table, x: a.latent, xStride: this.latentStride },
          { nHeads: 1, colOffset: R, headStride: r, ropeOffset: 0, dims: r, layout: c.ropeLayout },
        ),
      ];
    }
    const latentRows = { meta: b.meta, src: a.latent, srcStride: this.latentStride, srcOffset: 0, layerCaches: b.layerCaches };
    this.kvWrite = this.layout.latentInt8
      ? new MlaLatentWriteInt8(g, this.layout.latentInt8, this.layout.blockSize, latentRows)
      : new KvWrite(g, this.layout, latentRows);
    const front: MlaAttentionFront | undefined =
      this.frontMaxRows > 0
        ? {
            maxRows: this.frontMaxRows,
            q: qRows,
            latent: a.latent,
            table,
            spec: {
              q: { stride: this.qStride, offset: this.qOffset, headStride: dn + r },
              latent: { stride: this.latentStride, offset: 0 },
              dn,
              scale: c.softmaxScale,
              ropeLayout: c.ropeLayout,
              w: fusedHeadWeights(this.layers[0].wUk, c.nHeads),
            },
            layers: this.layers.map((l) => l.wUk.pieces[0].buffer),
          }
        : undefined;
    const back: MlaAttentionBack | undefined =
      this.backMaxRows > 0
        ? {
            maxRows: this.backMaxRows,
            w: fusedHeadWeights(this.layers[0].wUv, c.nHeads),
            out: b.out,
            outStride: b.outStride,
            outHeadStride: dv,
            layers: this.layers.map((l) => l.wUv.pieces[0].buffer),
          }
        : undefined;
    this.attention = new MlaAttention(
      g,
      { nHeads: c.nHeads, kvLoraRank: R, qkRopeHeadDim: r },
      this.layout,
      { meta: b.meta, qLatent: a.qLatent, out: a.oHat, outStride: c.nHeads * R, layerCaches: b.layerCaches },
      this.opts.attentionTuning,
      front,
      back,
    );
  }

  prepare(meta: StepMeta): void {
    this.attention!.prepare(meta.nRows, meta.maxChunks, meta.chunkSize);
  }

  encodeLayer(pass: GPUComputePassEncoder, layer: number, meta: StepMeta): void {
    const rows = meta.nRows;
    const ops = this.ops[layer];
    for (const op of ops.q) op.encode(pass, rows);
    for (const op of ops.kv) op.encode(pass, rows);
    const attention = this.attention!;
    // The decode front does RoPE, the latent write and W_UK inside the attention's first dispatch.
    const front = attention.fusesFront(rows);
    if (!front) {
      for (const rope of this.ropes) rope.encode(pass, rows);
      this.kvWrite!.encode(pass, layer, rows);
      ops.absorb.encode(pass, rows);
    }
    attention.encode(pass, layer, rows, meta.maxChunks, meta.chunkSize);
    if (!attention.fusesBack(rows)) ops.wUv.encode(pass, rows);
  }

  private destroyActivations(): void {
    for (const buf of Object.values(this.act)) buf.destroy();
    this.act = {};
    this.attention?.destroy();
  }

  destroy(): void {
    this.destroyActivations();
    for (const l of this.layers) {
      for (const m of [l.qkvAProj, l.qProj, l.qAProj, l.qBProj, l.kvAProj, l.kvACProj, l.kvAPeProj]) if (m) destroyLinear(m);
      destroyMatrix(l.wUk);
      destroyMatrix(l.wUv);
      for (const buf of [l.qkvABias, l.qProjBias, l.qANorm, l.kvAProjBias, l.kvACBias, l.kvAPeBias, l.kvANorm]) buf?.destroy();
    }
  }
}

/** The runner's factory for MLA models (engine/gpu-runner.ts AttentionBlockFactory). */
export function mlaBlockFactory(opts: MlaBlockOptions = {}): (ctx: AttentionBlockContext) => MlaBlock {
  return (ctx) => new MlaBlock(ctx, opts);
}

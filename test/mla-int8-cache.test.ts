// The int8 MLA latent cache (--kv-cache-dtype int8): the quantizing latent write vs its CPU twin, absorbed attention over
// int8 rows vs float64 within the bound derived from the quantization step, NaN propagation, and converted stories260K
// perplexity with the int8 cache vs the f32 cache.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { MlaAttention, MLA_MAX_CHUNK, mlaSplit, planMlaAttention, DEFAULT_MLA_TUNING, type MlaAttentionShape, type MlaAttentionTuning } from '../kernels/mla-attention.ts';
import { mlaTcDumpLayout, mlaTcOnTensorCores, planMlaTc, type MlaTcPlan } from '../kernels/mla-attention-tc.ts';
import { DOT4_PREFETCH, DOT4_VALUE_ROUNDS, type MlaDot4Plan } from '../kernels/mla-attention-dot4.ts';
import { mla3ScoresTcProblem, type Mla3PassPlan } from '../kernels/mla-attention-3pass.ts';
import { planMlaFlash, type MlaFlashPlan } from '../kernels/mla-attention-flash.ts';
import { checkMlaTcDump, describeMlaTcDump } from '../bench/mla-tc-dump.ts';
import {
  MlaLatentWriteInt8,
  dequantizeLatentRowInt8,
  latentRowInt8Scales,
  latentRowInt8Values,
  mlaInt8RowFormat,
  quantizeLatentRowInt8,
  type MlaInt8RowFormat,
} from '../kernels/mla-kv-int8.ts';
import { buildStepMeta, type StepSeqInput } from '../kernels/step-meta.ts';
import { poisonBuffer, readF32, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { MlaKvLayout } from '../cache/mla-layout.ts';
import type { KvLayout } from '../cache/kv-layout.ts';
import { createGpuRunner, type AttentionBlockContext } from '../engine/gpu-runner.ts';
import { MlaBlock } from '../engine/mla-block.ts';
import { scoreWithRunner } from '../engine/perplexity.ts';
import type { GqaConfig, MlaConfig } from '../model/config.ts';
import { loadModel } from '../model/load.ts';
import { attendLatentRows } from '../model/reference/mla.ts';
import { convertToMla, mlaWeightsToF32 } from '../model/transmla/convert.ts';
import { calibrationSplit } from '../server/convert-command.ts';
import { fileGpu, freshSeed, randomArray, relError, shuffledPaging } from './kernels-helpers.ts';

const gpu = fileGpu();

interface Step {
  shape: MlaAttentionShape;
  blockSize: number;
  /** Per sequence: tokens already cached, tokens this step. */
  seqs: Array<[cached: number, fresh: number]>;
  chunkSize?: number;
  tuning?: Partial<MlaAttentionTuning>;
  /** Every token's [c | k_pe] row, per sequence (default: random, c and k_pe of different magnitudes per token). */
  latent?: Float32Array[];
  /** Skip the attention (write-only cases). */
  writeOnly?: boolean;
  /** Changes the random queries [row][head][R + r] before they are uploaded. */
  editQuery?: (q: Float32Array) => void;
}

interface StepResult {
  latent: Float32Array[];
  q: Float32Array;
  /** ô rows [nRows, nHeads · R]. */
  out: Float32Array;
  /** Token t of sequence i's stored row words. */
  rowWords: (i: number, t: number) => Uint32Array;
  format: MlaInt8RowFormat;
  maxChunks: number;
  /** The step's context split. */
  chunkSize: number;
  /** The dot4 kernel's plan (int8Products 'dot4'). */
  dot4?: MlaDot4Plan;
  /** The three-pass plan, when the step ran the three passes (int8Products 'three-pass'). */
  three?: Mla3PassPlan;
  /** The one-pass tensor-core kernel's plan (int8Products 'flash' / 'flash-dot4'). */
  flash?: MlaFlashPlan;
  /** The int8-product kernel's debug dump (tuning.int8Debug) and its plan. */
  dump?: { words: Int32Array; plan: MlaTcPlan };
}

/**
 * Two steps through MlaLatentWriteInt8 (+ MlaAttention on an int8 layout on the second): the cached prefixes, then
 * the step rows (prefill chunks and decode tokens mixed). Block ids shuffled; cache and output poisoned with NaN.
 */
async function runStep(c: Step, seed: number): Promise<StepResult> {
  const g = await gpu();
  const { nHeads, kvLoraRank: R, qkRopeHeadDim: r } = c.shape;
  const RV = R + r;
  const format = mlaInt8RowFormat(R, r);
  const layout = { rowValues: RV, blockSize: c.blockSize, dtype: 'int8' as const };
  const paging = shuffledPaging(c.seqs, c.blockSize, seed);
  const { totalBlocks } = paging;
  // c around 1 · 2^±3 and k_pe ×8 of it, per token: each part of each token needs its own scale.
  const latent =
    c.latent ??
    c.seqs.map(([k, n], i) => {
      const v = randomArray((k + n) * RV, seed + 100 + i);
      const mags = randomArray(k + n, seed + 200 + i);
      for (let j = 0; j < v.length; j++) v[j] *= 2 ** Math.round(3 * mags[Math.floor(j / RV)]) * (j % RV >= R ? 8 : 1);
      return v;
    });
  const nRows = c.seqs.reduce((a, [, n]) => a + n, 0);
  // Query scaled so that softmax is far from uniform.
  const q = randomArray(nRows * nHeads * RV, seed + 3, 2 / Math.sqrt(RV));
  c.editQuery?.(q);
  const cacheBuf = storageBuffer(g, 'int8 latent cache', totalBlocks * c.blockSize * format.rowWords * 4);
  poisonBuffer(g, cacheBuf);
  const maxTok = Math.max(1, c.seqs.reduce((a, [k, n]) => a + k + n, 0));
  // Source rows with a stride past the row (as the block's latent buffer, padded to 8) and NaN padding.
  const srcStride = RV + 3;
  const src = storageBuffer(g, 'latent rows', 4 * srcStride * maxTok);
  const meta = storageBuffer(g, 'meta', 1 << 16);
  const qLatent = uploadArray(g, 'qLatent', q.length ? q : new Float32Array(4));
  const outStride = nHeads * R;
  const out = storageBuffer(g, 'out', 4 * outStride * Math.max(1, nRows));
  const writer = new MlaLatentWriteInt8(g, format, c.blockSize, { meta, src, srcStride, srcOffset: 0, layerCaches: [cacheBuf] });
  const attention = c.writeOnly ? undefined : new MlaAttention(g, c.shape, layout, { meta, qLatent, out, outStride, layerCaches: [cacheBuf] }, c.tuning);
  // The split the runner would make (MlaBlock: mlaSplit, chunks of at most MLA_MAX_CHUNK) unless the case fixes a chunk.
  const split = mlaSplit(c.shape, layout.dtype, c.tuning);
  const metaOpts = { blockSize: c.blockSize, numBlocks: totalBlocks, nKvHeads: split.parallelHeads, maxChunkSize: MLA_MAX_CHUNK, targetWorkgroups: split.targetWorkgroups, minChunkSize: split.minChunk };
  const run = async (seqs: StepSeqInput[], rows: Float32Array[], attend: boolean) => {
    const m = buildStepMeta(seqs, { ...metaOpts, chunkSize: c.chunkSize });
    g.device.queue.writeBuffer(meta, 0, m.data);
    const strided = new Float32Array(rows.length * srcStride).fill(NaN);
    rows.forEach((row, i) => strided.set(row, i * srcStride));
    g.device.queue.writeBuffer(src, 0, strided);
    if (attend && attention) attention.prepare(m.nRows, m.maxChunks, m.chunkSize);
    const enc = g.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    writer.encode(pass, 0, m.nRows);
    if (attend && attention) attention.encode(pass, 0, m.nRows, m.maxChunks, m.chunkSize);
    pass.end();
    g.device.queue.submit([enc.finish()]);
    await g.device.queue.onSubmittedWorkDone();
    g.checkErrors();
    return m;
  };
  const rowOf = (i: number, t: number) => latent[i].subarray(t * RV, (t + 1) * RV);
  if (paging.prefixStep.length) await run(paging.prefixStep, c.seqs.flatMap(([k], i) => Array.from({ length: k }, (_, t) => rowOf(i, t))), false);
  poisonBuffer(g, out);
  const m = await run(
    paging.freshStep,
    c.seqs.flatMap(([k, n], i) => Array.from({ length: n }, (_, t) => rowOf(i, k + t))),
    true,
  );
  const outRows = await readF32(g, out, nRows * outStride);
  const cacheF = await readF32(g, cacheBuf, cacheBuf.size / 4);
  const cache = new Uint32Array(cacheF.buffer, cacheF.byteOffset, cacheF.length);
  const dot4 = attention?.dot4Plan;
  const three = attention?.lastStepThreePass ? attention.threePassPlan : undefined;
  const flash = attention?.flashPlan;
  const dumpInfo = attention?.int8DebugDump;
  const dump = dumpInfo && { words: new Int32Array((await readF32(g, dumpInfo.buffer, dumpInfo.buffer.size / 4)).buffer), plan: dumpInfo.plan };
  attention?.destroy();
  for (const b of [cacheBuf, src, meta, qLatent, out]) b.destroy();
  const slot = paging.slot;
  return {
    latent,
    q,
    out: outRows,
    rowWords: (i, t) => cache.slice(slot(i, t) * format.rowWords, (slot(i, t) + 1) * format.rowWords),
    format,
    maxChunks: m.maxChunks,
    chunkSize: m.chunkSize,
    dot4,
    three,
    flash,
    dump,
  };
}

/**
 * Every token's stored row vs the CPU quantizer: int8 values bit-exact except where x / scale lies within 1e-4 of a
 * half (f32 division on the GPU is not correctly rounded, and WGSL rounds halves to even), scales within 4 f32 ulp
 * (the GPU divides absmax by 127 in f32), padding bytes zero. Returns how many values were compared.
 */
function checkStoredRows(res: StepResult, seqs: Array<[number, number]>, label: string): number {
  const f = res.format;
  const R = f.kvLoraRank;
  let compared = 0;
  seqs.forEach(([k, n], i) => {
    for (let t = 0; t < k + n; t++) {
      const x = res.latent[i].subarray(t * (R + f.qkRopeHeadDim), (t + 1) * (R + f.qkRopeHeadDim));
      const want = quantizeLatentRowInt8(x, f);
      const got = res.rowWords(i, t);
      const where = `${label}: seq ${i} token ${t}`;
      const ws = latentRowInt8Scales(want, f);
      const gs = latentRowInt8Scales(got, f);
      const wq = latentRowInt8Values(want, f);
      const gq = latentRowInt8Values(got, f);
      for (const part of [0, 1] as const) {
        if (Number.isNaN(ws[part])) {
          assert.ok(Number.isNaN(gs[part]), `${where} part ${part}: a non-finite input should give a NaN scale, got ${gs[part]}`);
          continue;
        }
        assert.ok(Math.abs(gs[part] - ws[part]) <= 4 * 2 ** -23 * ws[part], `${where} part ${part}: scale ${gs[part]} vs ${ws[part]}`);
        const [a, b] = part === 0 ? [0, R] : [R, x.length];
        for (let v = a; v < b; v++) {
          compared++;
          if (gq[v] === wq[v]) continue;
          const ratio = ws[part] === 0 ? 0 : x[v] / ws[part];
          const nearHalf = Math.abs(Math.abs(ratio - Math.trunc(ratio)) - 0.5) < 1e-4;
          assert.ok(nearHalf && Math.abs(gq[v] - wq[v]) === 1, `${where} value ${v}: int8 ${gq[v]}, CPU ${wq[v]} (x ${x[v]}, x/scale ${ratio})`);
        }
      }
      // Padding bytes of the last word of each part stay zero (the attention never reads them, but a row is whole).
      const padBytes = (firstWord: number, words: number, n: number) => {
        let bad = 0;
        for (let b = n; b < 4 * words; b++) bad |= (got[firstWord + (b >> 2)] >>> (8 * (b & 3))) & 0xff;
        return bad;
      };
      assert.equal(padBytes(0, f.latentWords, R), 0, `${where}: latent padding`);
      assert.equal(padBytes(f.ropeWord, f.ropeWords, f.qkRopeHeadDim), 0, `${where}: rope padding`);
    }
  });
  return compared;
}

test('int8 latent layout: 584 bytes per token per layer at 512 + 64 (f16 1152), odd parts padded to whole words', () => {
  const cfg = (kvLoraRank: number, qkRopeHeadDim: number) => ({ attention: 'mla', nLayers: 28, kvLoraRank, qkRopeHeadDim }) as MlaConfig;
  const l = new MlaKvLayout(cfg(512, 64), 16, 'int8');
  assert.equal(l.rowBytes, 512 + 64 + 8);
  assert.equal(l.bytesPerToken, 28 * 584);
  assert.equal(l.blockBytesPerLayer, 16 * 584);
  assert.equal(new MlaKvLayout(cfg(512, 64), 16, 'f16').rowBytes, 1152);
  assert.deepEqual(mlaInt8RowFormat(512, 64), { kvLoraRank: 512, qkRopeHeadDim: 64, latentWords: 128, ropeWord: 128, ropeWords: 16, scaleWord: 144, rowWords: 146 });
  // 18 → 5 words (2 padding bytes), 6 → 2 words, 2 scales: 9 words.
  const odd = new MlaKvLayout(cfg(18, 6), 4, 'int8');
  assert.equal(odd.rowBytes, 36);
  assert.equal(odd.latentInt8?.ropeWord, 5);
  assert.equal((odd as KvLayout).int8, undefined, 'the GQA row format stays unset on an MLA layout');
});

test('int8 latent write: values bit-exact and scales to f32 rounding vs the CPU quantizer, odd parts, zero/NaN/Inf parts', async () => {
  for (const [R, r] of [
    [20, 8],
    [18, 6], // both parts 2 mod 4: half-filled last words
    [30, 4],
    [512, 64], // 128 latent words: two words per thread of the 64-thread workgroup
  ]) {
    const seed = freshSeed();
    const RV = R + r;
    const seqs: Array<[number, number]> = [[0, 7], [9, 1], [3, 6]];
    const latent = seqs.map(([k, n], i) => randomArray((k + n) * RV, seed + 100 + i, i + 1));
    latent[0][1 * RV + 3] = NaN; // seq 0 token 1: NaN in c
    latent[1][5 * RV + R + 1] = Infinity; // seq 1 token 5: +Inf in k_pe
    latent[2][8 * RV + R - 1] = -Infinity; // seq 2 token 8: −Inf in c's last value
    latent[2].fill(0, 2 * RV, 2 * RV + R); // seq 2 token 2: all-zero c
    const shape = { nHeads: 1, kvLoraRank: R, qkRopeHeadDim: r };
    const res = await runStep({ shape, blockSize: 4, seqs, latent, writeOnly: true }, seed);
    const label = `${R} + ${r} seed ${seed}`;
    // 26 tokens; the three poisoned parts are skipped.
    assert.ok(checkStoredRows(res, seqs, label) >= 26 * RV - 2 * R - r);
    const sc = (i: number, t: number) => latentRowInt8Scales(res.rowWords(i, t), res.format);
    assert.ok(Number.isNaN(sc(0, 1)[0]) && Number.isFinite(sc(0, 1)[1]), `${label}: NaN in c → NaN latent scale only`);
    assert.ok(Number.isFinite(sc(1, 5)[0]) && Number.isNaN(sc(1, 5)[1]), `${label}: +Inf in k_pe → NaN rope scale only`);
    assert.ok(Number.isNaN(sc(2, 8)[0]), `${label}: −Inf in c → NaN latent scale`);
    assert.equal(sc(2, 2)[0], 0, `${label}: all-zero c → scale 0`);
    // Each part's scale is its own absmax / 127 (not the row's).
    const x = res.latent[1].subarray(0, RV);
    const absMax = (a: number, b: number) => Math.max(...Array.from(x.subarray(a, b), Math.abs));
    assert.ok(Math.abs(sc(1, 0)[0] - absMax(0, R) / 127) <= 4 * 2 ** -23 * sc(1, 0)[0]);
    assert.ok(Math.abs(sc(1, 0)[1] - absMax(R, RV) / 127) <= 4 * 2 ** -23 * sc(1, 0)[1]);
  }
});

/**
 * Float64 on the original latent rows, float64 on the dequantized rows, and the bound the int8 cache allows. Per step
 * row, head h and cached token j, every stored value lies within half its part's scale of the original (s_cj for c,
 * s_pj for k_pe), so with qLatent_h the (already scaled) query,
 *   |Δscore_hj| ≤ Σ_{m<R} |q_hm| · s_cj / 2 + Σ_{i<r} |q_h,R+i| · s_pj / 2 =: δ_hj,   δ_h = max_j δ_hj;
 *   each softmax weight moves by a factor within [e^{−2δ_h}, e^{2δ_h}], so |p̃_j − p_j| ≤ p_j (e^{2δ_h} − 1);
 *   |ô_hm − o_hm| ≤ Σ_j |p̃_j − p_j| |c̃_jm| + Σ_j p_j |c̃_jm − c_jm| ≤ (e^{2δ_h} − 1) max_j |c̃_jm| + max_j s_cj / 2,
 * plus 1e-5 · max|c̃| for the kernel's own f32 arithmetic.
 */
function referenceAndBound(res: StepResult, c: Step): { want: Float64Array; wantDequant: Float64Array; bound: Float64Array } {
  const { nHeads, kvLoraRank: R, qkRopeHeadDim: r } = c.shape;
  const RV = R + r;
  const nRows = c.seqs.reduce((a, [, n]) => a + n, 0);
  const want = new Float64Array(nRows * nHeads * R);
  const wantDequant = new Float64Array(nRows * nHeads * R);
  const bound = new Float64Array(nRows * nHeads * R);
  let row = 0;
  c.seqs.forEach(([k, n], i) => {
    const orig = Array.from({ length: k + n }, (_, t) => res.latent[i].subarray(t * RV, (t + 1) * RV));
    const deq = Array.from({ length: k + n }, (_, t) => dequantizeLatentRowInt8(res.rowWords(i, t), res.format));
    const scales = Array.from({ length: k + n }, (_, t) => latentRowInt8Scales(res.rowWords(i, t), res.format));
    for (let t = 0; t < n; t++, row++) {
      const ctx = k + t + 1;
      const q = res.q.subarray(row * nHeads * RV, (row + 1) * nHeads * RV);
      want.set(attendLatentRows(q, orig.slice(0, ctx), nHeads, R, r), row * nHeads * R);
      wantDequant.set(attendLatentRows(q, deq.slice(0, ctx), nHeads, R, r), row * nHeads * R);
      for (let h = 0; h < nHeads; h++) {
        let qc = 0;
        let qp = 0;
        for (let m = 0; m < R; m++) qc += Math.abs(q[h * RV + m]);
        for (let m = R; m < RV; m++) qp += Math.abs(q[h * RV + m]);
        let delta = 0;
        let sc = 0;
        for (let j = 0; j < ctx; j++) {
          delta = Math.max(delta, (qc * scales[j][0]) / 2 + (qp * scales[j][1]) / 2);
          sc = Math.max(sc, scales[j][0] / 2);
        }
        for (let m = 0; m < R; m++) {
          let cMax = 0;
          for (let j = 0; j < ctx; j++) cMax = Math.max(cMax, Math.abs(deq[j][m]));
          bound[(row * nHeads + h) * R + m] = Math.expm1(2 * delta) * cMax + sc + 1e-5 * cMax;
        }
      }
    }
  });
  return { want, wantDequant, bound };
}

const mixed: Array<[number, number]> = [
  [0, 13], // fresh prefill chunk
  [37, 1], // decode after an odd prefix
  [5, 20], // prefill chunk after a prefix (crosses blocks)
  [64, 1], // decode at a block boundary
  [0, 1], // first token alone
];

// Small workgroups give tiles of a few tokens, so that one chunk spans several tiles (online softmax inside a workgroup).
const smallTiles: Partial<MlaAttentionTuning> = { workgroupSize: 8, tokensPerThread: 1, maxHeadsPerThread: 4 };

test('mla attention over the int8 latent cache vs float64: within the quantization bound; odd R, rope dim 8, several chunks and blocks', async () => {
  for (const [shape, tuning, chunkSize, blockSize] of [
    [{ nHeads: 4, kvLoraRank: 20, qkRopeHeadDim: 8 }, smallTiles, 16, 4], // R not a multiple of 16, rope 8
    [{ nHeads: 7, kvLoraRank: 18, qkRopeHeadDim: 6 }, smallTiles, 16, 4], // both parts end in a half word; padded head groups
    [{ nHeads: 3, kvLoraRank: 30, qkRopeHeadDim: 8 }, { workgroupSize: 32, tokensPerThread: 4, maxHeadsPerThread: 2 }, 32, 5], // block size 5
    [{ nHeads: 2, kvLoraRank: 512, qkRopeHeadDim: 64 }, DEFAULT_MLA_TUNING, 32, 16], // DeepSeek / TransMLA width
    [{ nHeads: 7, kvLoraRank: 24, qkRopeHeadDim: 8 }, { qSliceValues: 16 }, 16, 4], // staged-slice tuning: int8 reads q from memory
  ] as const) {
    const seed = freshSeed();
    const c: Step = { shape, blockSize, seqs: mixed, chunkSize, tuning };
    const plan = planMlaAttention(shape, { ...DEFAULT_MLA_TUNING, ...tuning });
    const res = await runStep(c, seed);
    assert.ok(res.maxChunks > 1, 'the case should split contexts into several chunks');
    const where = `${JSON.stringify(shape)} tile ${plan.tileTokens} block ${blockSize} seed ${seed}`;
    const { want, wantDequant, bound } = referenceAndBound(res, c);
    // The kernel's own arithmetic: against float64 on the values the cache holds.
    const kernelErr = relError(res.out, wantDequant);
    assert.ok(kernelErr <= 1e-4, `${where}: relative error ${kernelErr} vs float64 on the dequantized cache`);
    let worst = 0;
    for (let i = 0; i < want.length; i++) {
      const e = Math.abs(res.out[i] - want[i]);
      assert.ok(e <= bound[i], `${where}: output ${i} is ${res.out[i]}, float64 ${want[i]}: error ${e} > bound ${bound[i]}`);
      worst = Math.max(worst, e / bound[i]);
    }
    // The quantization shows at all: a kernel that read unquantized rows would match float64 to ~1e-7.
    const quantErr = relError(res.out, want);
    assert.ok(quantErr > 1e-6, `${where}: output equals the unquantized reference (${quantErr}); was the cache quantized?`);
    assert.ok(worst <= 1);
  }
});

test('converted stories260K (TransMLA r 4 R 16, r 8 R 28): perplexity with the int8 latent cache within 5 % of the f32 cache (f32, dot4 and three-pass products; dot4 with W8A8 head products, and in 16-row steps with the head products in the decode front and back)', async () => {
  const g = await gpu();
  const source = await loadModel('../shared/models/stories260K/stories260K.gguf', { maxSeqLen: 512 });
  const gqa = source.config as GqaConfig;
  const text = readFileSync('../shared/data/tinystories_valid_a.txt', 'utf8');
  // The calibration split of test/mla-stories.test.ts.
  const split = calibrationSplit(text, source.tokenizer, gqa.bosId, { maxLen: 512, calibSamples: 8, calibSeqLen: 128, evalChunks: 6, seed: 42 });
  // Scored on 12 evenly spaced paragraphs (none of them a calibration sample), ≤ 96 tokens each: ~1,000 tokens.
  const isCalib = (c: number[]) => split.calib.some((k) => k.every((t, i) => c[i] === t));
  const chunks = calibrationSplit(text, source.tokenizer, gqa.bosId, { maxLen: 512, calibSamples: 0, calibSeqLen: 1, evalChunks: 12, seed: 42 })
    .heldOut.filter((c) => !isCalib(c))
    .map((c) => c.slice(0, 96));
  // The fixture's r 4, R 16 (ppl ~70: RoPE on 4 dims costs this tiny model much) and the converter's default r 8,
  // R 28 (ppl ~8).
  for (const [ropeDim, kvLoraRank, freqFold] of [
    [4, 16, 2],
    [8, 28, 1],
  ]) {
    const conv = await convertToMla(gqa, source.weights, { ropeDim, freqFold, calibChunks: split.calib, kvLoraRank });
    const model = { config: conv.config, weights: mlaWeightsToF32(conv.weights) };
    const score = async (cacheDtype: 'f32' | 'int8', int8Products: MlaAttentionTuning['int8Products'] = 'off', heads?: 'w8a8' | 'fused' | 'separate', stepTokens = 1024, scored = chunks) => {
      // Unset: the block's default (the decode front in steps of up to 32 rows); 'separate': no front.
      const headOpts =
        heads === 'w8a8' ? { headDecodeKernel: heads, frontMaxRows: 0 } : heads === 'fused' ? { frontMaxRows: 16, backMaxRows: 16 } : heads === 'separate' ? { frontMaxRows: 0 } : {};
      const attentionBlock = (ctx: AttentionBlockContext) => new MlaBlock(ctx, { attentionTuning: { int8Products }, ...headOpts });
      const runner = await createGpuRunner(g, model, { weightDtype: 'f32', cacheDtype, blockSize: 16, numBlocks: 64, attentionBlock });
      try {
        const c = conv.config;
        // int8: R + r int8 values (whole words) and two f32 scales; f32: R + r values of 4 bytes.
        const rowBytes = cacheDtype === 'int8' ? 4 * (Math.ceil(c.kvLoraRank / 4) + Math.ceil(c.qkRopeHeadDim / 4) + 2) : 4 * (c.kvLoraRank + c.qkRopeHeadDim);
        assert.equal(runner.kvBytesPerToken, c.nLayers * rowBytes);
        return await scoreWithRunner(runner, scored, stepTokens);
      } finally {
        runner.destroy();
      }
    };
    const base = await score('f32');
    const int8 = await score('int8');
    // The int8-product kernel's arithmetic (query and p′ quantized too: what the tensor cores compute).
    const products = await score('int8', 'emulate');
    const dProducts = products.perplexity / base.perplexity - 1;
    console.log(`  int8 products (tensor-core arithmetic, dot4 form): ppl ${products.perplexity.toFixed(4)} (${(100 * dProducts).toFixed(3)} %)`);
    assert.ok(Math.abs(dProducts) <= 0.05, `int8-product attention perplexity ${products.perplexity} vs f32 cache ${base.perplexity}`);
    // The same arithmetic in the dot4 kernel (windows of 64 here, as the emulated form): the same perplexity but for
    // f32 sums taken in another order.
    const dot4 = await score('int8', 'dot4');
    console.log(`  int8 products, dot4 kernel: ppl ${dot4.perplexity.toFixed(4)} (${(100 * (dot4.perplexity / base.perplexity - 1)).toFixed(3)} %)`);
    assert.ok(Math.abs(dot4.perplexity / products.perplexity - 1) <= 1e-3, `dot4 kernel perplexity ${dot4.perplexity} vs the emulated form's ${products.perplexity}`);
    // And in the three passes (scores, exact-max softmax, values): the same windows of 64, so the same perplexity.
    const three = await score('int8', 'three-pass');
    console.log(`  int8 products, three passes: ppl ${three.perplexity.toFixed(4)} (${(100 * (three.perplexity / base.perplexity - 1)).toFixed(3)} %)`);
    assert.ok(Math.abs(three.perplexity / products.perplexity - 1) <= 1e-3, `three-pass perplexity ${three.perplexity} vs the emulated form's ${products.perplexity}`);
    // W8A8 head products (W_UK / W_UV int8 per output column, their inputs per row and head) on top of the dot4
    // attention, in steps of at most 96 rows (the W8A8 kernel takes decode-sized steps only).
    const headsQ = await score('int8', 'dot4', 'w8a8', 96);
    const dHeads = headsQ.perplexity / base.perplexity - 1;
    console.log(`  int8 products, dot4 kernel, W8A8 head products: ppl ${headsQ.perplexity.toFixed(4)} (${(100 * dHeads).toFixed(3)} %)`);
    assert.ok(Math.abs(dHeads) <= 0.05, `W8A8 head products perplexity ${headsQ.perplexity} vs f32 cache ${base.perplexity}`);
    assert.notEqual(headsQ.perplexity, dot4.perplexity, 'the W8A8 head products changed nothing: did they run?');
    // Steps of 16 rows (4 of the paragraphs: SwiftShader takes ~40 s a pass at this step size): W_UK in the decode
    // front and W_UV in the decode back (kernels/mla-front.ts, mla-back.ts), against the separate kernels on the same
    // steps; the same arithmetic in another order (a query value at a rounding half may round the other way).
    const fused = await score('int8', 'dot4', 'fused', 16, chunks.slice(0, 4));
    const separate = await score('int8', 'dot4', 'separate', 16, chunks.slice(0, 4));
    console.log(`  int8 products, dot4 kernel, 16-row steps, 4 paragraphs: ppl fused heads ${fused.perplexity.toFixed(4)}, staged heads ${separate.perplexity.toFixed(4)}`);
    assert.ok(fused.predicted > 200, `only ${fused.predicted} tokens scored in 16-row steps`);
    assert.ok(Math.abs(fused.perplexity / separate.perplexity - 1) <= 1e-3, `fused head products perplexity ${fused.perplexity} vs staged ${separate.perplexity}`);
    assert.equal(int8.predicted, base.predicted);
    assert.ok(base.predicted > 700, `only ${base.predicted} tokens scored`);
    const delta = int8.perplexity / base.perplexity - 1;
    console.log(
      `converted stories260K r ${ropeDim} R ${kvLoraRank}, ${base.chunks} chunks, ${base.predicted} tokens: ppl f32 cache ${base.perplexity.toFixed(4)}, ` +
        `int8 cache ${int8.perplexity.toFixed(4)} (${(100 * delta).toFixed(3)} %)`,
    );
    assert.ok(Math.abs(delta) <= 0.05, `int8 latent cache perplexity ${int8.perplexity} vs f32 ${base.perplexity}: ${(100 * delta).toFixed(2)} %`);
    assert.ok(Math.abs(delta) > 1e-6, `int8 cache perplexity equals f32 (${delta}): was the cache quantized?`);
  }
});

/** WGSL's round(): halves to even. */
function roundEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * Float64 model of the int8-product kernel (kernels/mla-attention-tc.ts): q̃ and q_pe quantized per head, exact
 * integer score sums times the scales, online softmax per 64-token window of each split, p′ = p · sc_t quantized per
 * head per window, exact integer value sums, o = o·α + O·ps, splits merged exactly.
 */
function int8ProductsReference(res: StepResult, c: Step, chunkSize: number, window = 64): Float64Array {
  const { nHeads, kvLoraRank: R, qkRopeHeadDim: r } = c.shape;
  const RV = R + r;
  const nRows = c.seqs.reduce((a, [, n]) => a + n, 0);
  const out = new Float64Array(nRows * nHeads * R);
  const quant = (v: ArrayLike<number>) => {
    let m = 0;
    for (let i = 0; i < v.length; i++) m = Math.max(m, Math.abs(v[i]));
    const inv = m > 0 ? Math.fround(127 / m) : 0;
    return { q: Array.from(v, (x) => Math.max(-127, Math.min(127, roundEven(Math.fround(x * inv))))), s: Math.fround(m / 127) };
  };
  let row = 0;
  c.seqs.forEach(([k, n], i) => {
    const vals = Array.from({ length: k + n }, (_, t) => latentRowInt8Values(res.rowWords(i, t), res.format));
    const scales = Array.from({ length: k + n }, (_, t) => latentRowInt8Scales(res.rowWords(i, t), res.format));
    for (let t = 0; t < n; t++, row++) {
      const ctx = k + t + 1;
      for (let h = 0; h < nHeads; h++) {
        const qh = res.q.subarray((row * nHeads + h) * RV, (row * nHeads + h + 1) * RV);
        const ql = quant(qh.subarray(0, R));
        const qp = quant(qh.subarray(R));
        const splits: Array<{ m: number; l: number; o: Float64Array }> = [];
        for (let c0 = 0; c0 < ctx; c0 += chunkSize) {
          const c1 = Math.min(ctx, c0 + chunkSize);
          let m = -3e38;
          let l = 0;
          const o = new Float64Array(R);
          for (let w0 = c0; w0 < c1; w0 += window) {
            const w1 = Math.min(c1, w0 + window);
            const s: number[] = [];
            for (let j = w0; j < w1; j++) {
              let iL = 0;
              let iP = 0;
              for (let x = 0; x < R; x++) iL += ql.q[x] * vals[j][x];
              for (let x = 0; x < r; x++) iP += qp.q[x] * vals[j][R + x];
              s.push(iL * ql.s * scales[j][0] + iP * qp.s * scales[j][1]);
            }
            const mNew = Math.max(m, ...s);
            const alpha = Math.exp(m - mNew);
            const pp = s.map((v, idx) => Math.exp(v - mNew) * scales[w0 + idx][0]);
            l = l * alpha + s.reduce((a, v) => a + Math.exp(v - mNew), 0);
            m = mNew;
            const pmax = Math.max(...pp);
            const ps = pmax / 127;
            const pq = pp.map((v) => (pmax > 0 ? Math.max(-127, Math.min(127, roundEven(v * (127 / pmax)))) : 0));
            for (let x = 0; x < R; x++) {
              let sum = 0;
              for (let idx = 0; idx < pq.length; idx++) sum += pq[idx] * vals[w0 + idx][x];
              o[x] = o[x] * alpha + sum * ps;
            }
          }
          splits.push({ m, l, o });
        }
        const M = Math.max(...splits.map((sp) => sp.m));
        const L = splits.reduce((a, sp) => a + sp.l * Math.exp(sp.m - M), 0);
        for (let x = 0; x < R; x++) {
          out[(row * nHeads + h) * R + x] = splits.reduce((a, sp) => a + sp.o[x] * Math.exp(sp.m - M), 0) / L;
        }
      }
    }
  });
  return out;
}

test('mla attention int8 products (the tensor-core arithmetic, dot4 form) vs a float64 model of it; odd R, rope 8, several windows and splits, windows of 64 and 32', async () => {
  for (const [shape, chunkSize, blockSize, window] of [
    [{ nHeads: 4, kvLoraRank: 20, qkRopeHeadDim: 8 }, 16, 4, 64], // R and rope padded to 32 in the staged rows
    [{ nHeads: 7, kvLoraRank: 18, qkRopeHeadDim: 6 }, 128, 5, 64], // windows of 64 inside a split, block size 5
    [{ nHeads: 18, kvLoraRank: 64, qkRopeHeadDim: 32 }, 32, 16, 64], // two head tiles
    [{ nHeads: 18, kvLoraRank: 40, qkRopeHeadDim: 8 }, 128, 16, 32], // windows of 32: 4 a split, 4 tokens a softmax thread
  ] as const) {
    const seed = freshSeed();
    const c: Step = { shape, blockSize, seqs: [...mixed, [90, 2]], chunkSize, tuning: { int8Products: 'emulate', int8Window: window } };
    const res = await runStep(c, seed);
    checkInt8Products(res, c, `${JSON.stringify(shape)} chunk ${chunkSize} block ${blockSize} window ${window} seed ${seed}`);
  }
});

/**
 * An int8-product kernel's output against the float64 model of its arithmetic (tight) and against unquantized float64
 * attention (loose: only that the query and p′ quantization happened and stayed far from garbage).
 */
function checkInt8Products(res: StepResult, c: Step, where: string): void {
  const window = res.flash?.window ?? res.three?.window ?? res.dot4?.window ?? c.tuning?.int8Window ?? DEFAULT_MLA_TUNING.int8Window;
  const model = int8ProductsReference(res, c, res.chunkSize, window);
  // Same integers, but the GPU's f32 exp and scales against float64: a p′ (or q) value that lies at a rounding half
  // can round the other way, moving that head's output by one quantization step of one token (ps·|cq|, up to a few
  // 1e-3 of the largest output when that token's |c| is 64× the window's typical one: seed 1343776503 gave 5.9e-3 at
  // one of 648 heads). So: every head within 5e-2, and at most 1 % of the heads beyond 1e-4; a wrong kernel moves all.
  const R = c.shape.kvLoraRank;
  let maxOut = 0;
  for (const v of model) maxOut = Math.max(maxOut, Math.abs(v));
  let off = 0;
  let worst = 0;
  for (let rh = 0; rh < model.length / R; rh++) {
    let e = 0;
    for (let x = 0; x < R; x++) e = Math.max(e, Math.abs(res.out[rh * R + x] - model[rh * R + x]));
    e /= maxOut;
    worst = Math.max(worst, e);
    if (e > 1e-4) off++;
  }
  const heads = model.length / R;
  assert.ok(worst <= 5e-2 && off <= Math.max(1, heads / 100), `${where}: ${off} of ${heads} heads beyond 1e-4 of the float64 model of the int8-product arithmetic, worst ${worst}`);
  // Against the unquantized float64 attention: the query and p′ quantization on top of the cache's.
  const { want } = referenceAndBound(res, c);
  const quantErr = relError(res.out, want);
  // p′ carries c's per-token scale: in this data token magnitudes vary 2^±3 (64×), so tokens far below a window's
  // largest keep few of p′'s 7 bits and outputs move a lot: 10 fresh seeds per shape gave 0.03…0.14, seed 730361765
  // 0.169 (18 heads); on text the perplexity moves 0.5…1.2 % (below). The tight check is the one above; this one
  // only says the quantization happened and stayed far from garbage (≥ 1).
  assert.ok(quantErr > 1e-5 && quantErr < 0.4, `${where}: relative error ${quantErr} vs unquantized float64 (expected 1e-5 … 0.4)`);
}

test('mla attention int8 dot4 kernel vs the float64 model of the int8-product arithmetic: query staged and read from storage, windows of 32 and 64, partial windows, up to 32 heads, heads split over workgroups, the Qwen2.5-7B row shape; the next window prefetched into registers, value heads in rounds', async () => {
  for (const [shape, chunkSize, blockSize, window, queryStaged, headSplits, prefetch] of [
    [{ nHeads: 4, kvLoraRank: 20, qkRopeHeadDim: 8 }, 16, 4, 64, true, 1, false], // chunks shorter than a window; 4 value parts a head
    [{ nHeads: 4, kvLoraRank: 20, qkRopeHeadDim: 8 }, 16, 4, 64, true, 1, true], // the same, prefetched
    [{ nHeads: 7, kvLoraRank: 18, qkRopeHeadDim: 6 }, 128, 5, 64, false, 1, false], // two windows a split, block size 5, R not a multiple of 4
    [{ nHeads: 7, kvLoraRank: 18, qkRopeHeadDim: 6 }, 160, 5, 64, false, 1, true], // prefetched: three windows a split, the last partial
    [{ nHeads: 7, kvLoraRank: 18, qkRopeHeadDim: 6 }, 32, 5, 32, true, 3, false], // 3 heads a workgroup, the last holding 1
    [{ nHeads: 18, kvLoraRank: 64, qkRopeHeadDim: 32 }, 32, 16, 32, true, 1, true], // a partial head quad, prefetched; 2 heads a value thread in 2 rounds
    [{ nHeads: 32, kvLoraRank: 40, qkRopeHeadDim: 8 }, 64, 16, 32, false, 1, false], // the most heads, 2 windows a split
    [{ nHeads: 32, kvLoraRank: 40, qkRopeHeadDim: 8 }, 64, 16, 32, false, 4, true], // 8 heads a workgroup, prefetched
    [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, undefined, 16, 64, undefined, 1, undefined], // Qwen2.5-7B's MLA row, the runner's own split and the default plan
    [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, 96, 16, 32, undefined, 1, true], // prefetched, three 32-token windows a split; 14 value heads in rounds of 5, 5, 4
    [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, undefined, 16, 64, undefined, 2, false], // and 14 heads a workgroup
  ] as const) {
    const seed = freshSeed();
    const tuning = { int8Products: 'dot4', int8Window: window, int8QueryStaged: queryStaged, ...(prefetch === undefined ? {} : { int8Prefetch: prefetch, int8ValueRounds: prefetch ? 3 : 1 }), ...(headSplits > 1 ? { int8HeadSplits: headSplits } : {}) } as const;
    const c: Step = { shape, blockSize, seqs: [...mixed, [90, 2]], chunkSize, tuning };
    const res = await runStep(c, seed);
    assert.ok(res.dot4, 'no dot4 plan');
    if (queryStaged !== undefined) assert.equal(res.dot4.queryStaged, queryStaged);
    assert.equal(res.dot4.headSplits, headSplits);
    assert.equal(res.dot4.prefetch, prefetch ?? DOT4_PREFETCH);
    assert.equal(res.dot4.valueRounds, Math.min(prefetch === undefined ? DOT4_VALUE_ROUNDS : prefetch ? 3 : 1, res.dot4.headsPerValueThread));
    const where = `${JSON.stringify(shape)} chunk ${res.chunkSize} block ${blockSize} window ${res.dot4.window} q ${res.dot4.queryStaged ? 'staged' : 'storage'} ${headSplits} head split(s)${prefetch ? ' prefetched' : ''} seed ${seed}`;
    checkInt8Products(res, c, where);
  }
});

test('mla attention int8 three-pass kernels (scores, softmax, values) vs the float64 model of the int8-product arithmetic: windows of 64 and 32, partial windows and chunks, chunks of 5 tokens (p′ words across a window edge) up to 512, one to four latent parts, up to 32 heads, the Qwen2.5-7B row shape; a step past the scratch runs the dot4 kernel', async () => {
  for (const [shape, chunkSize, blockSize, window, latentParts, scoreTile] of [
    [{ nHeads: 4, kvLoraRank: 20, qkRopeHeadDim: 8 }, 16, 4, 64, 1], // chunks shorter than a window
    [{ nHeads: 7, kvLoraRank: 18, qkRopeHeadDim: 6 }, 160, 5, 64, 2], // three windows a chunk, the last partial; R not a multiple of 4
    [{ nHeads: 7, kvLoraRank: 18, qkRopeHeadDim: 6 }, 5, 5, 32, 1], // 5-token chunks: many chunks a row
    [{ nHeads: 18, kvLoraRank: 64, qkRopeHeadDim: 32 }, 96, 16, 32, 4], // a partial head quad; 4 words a latent part
    [{ nHeads: 9, kvLoraRank: 40, qkRopeHeadDim: 8 }, 128, 16, 64, 2, 64], // 64-token score tiles (two tokens a thread)
    [{ nHeads: 32, kvLoraRank: 40, qkRopeHeadDim: 8 }, 512, 16, 64, 3], // the most heads, the longest chunk; parts of 4, 4, 2 words
    [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, undefined, 16, 64, undefined], // Qwen2.5-7B's MLA row, the runner's split
  ] as const) {
    const seed = freshSeed();
    const tuning = { int8Products: 'three-pass', int8Window: window, ...(latentParts ? { int8LatentParts: latentParts } : {}), ...(scoreTile ? { int8ScoreTile: scoreTile } : {}) } as const;
    const c: Step = { shape, blockSize, seqs: [...mixed, [90, 2]], chunkSize, tuning };
    const res = await runStep(c, seed);
    assert.ok(res.three, `${JSON.stringify(shape)}: the step did not run the three passes`);
    assert.equal(res.three.window, window);
    if (latentParts) assert.equal(res.three.latentParts, latentParts);
    assert.equal(res.three.tile, scoreTile ?? 32);
    checkInt8Products(res, c, `three-pass ${JSON.stringify(shape)} chunk ${res.chunkSize} block ${blockSize} window ${window} parts ${res.three.latentParts} tile ${res.three.tile} seed ${seed}`);
  }
  // A step whose scores and p′ would pass the scratch limit (long prompts: each prompt row has its own context) runs the
  // dot4 kernel, with its own window (32 here: SwiftShader's workgroup memory).
  const seed = freshSeed();
  const c: Step = { shape: { nHeads: 4, kvLoraRank: 20, qkRopeHeadDim: 8 }, blockSize: 16, seqs: [[100, 1], [3, 20]], chunkSize: 64, tuning: { int8Products: 'three-pass', int8Window: 64, int8MaxScratch: 4096 } };
  const res = await runStep(c, seed);
  assert.equal(res.three, undefined, 'a step past int8MaxScratch ran the three passes');
  assert.ok(res.dot4, 'no dot4 plan');
  checkInt8Products(res, c, `three-pass fallback to dot4 seed ${seed}`);
});

test('three-pass tensor-core scores take only rows whose 32-byte K runs end inside the row (a run past the pool\'s last row leaves the buffer)', () => {
  for (const [R, r, ok] of [[512, 64, true], [64, 32, true], [128, 32, true], [40, 8, false], [18, 6, false], [16, 8, false]] as const) {
    const f = mlaInt8RowFormat(R, r);
    const tc = planMlaTc(9, f, 64);
    assert.ok(typeof tc !== 'string', `R ${R} r ${r}: ${tc as string}`);
    const problem = mla3ScoresTcProblem(f, tc);
    assert.equal(problem === undefined, ok, `R ${R} r ${r} (${4 * f.rowWords}-byte rows): ${problem ?? 'fits'}`);
    if (!ok) assert.match(problem!, new RegExp(`of a ${4 * f.rowWords}-byte cache row`));
  }
});

test('mla attention int8 three-pass kernels with the score and value products on tensor cores (i8 subgroup matrices) vs the float64 model of the int8-product arithmetic: windows of 64 and 32, partial windows and chunks, chunks of 16 tokens (a K step across chunk and block edges), padded head tiles, one to four latent parts, the Qwen2.5-7B row shape (where the adapter has subgroup matrices)', async (t) => {
  const g = await gpu();
  if (!mlaTcOnTensorCores(g)) {
    t.skip('this adapter has no i8 subgroup matrices with 32-wide subgroups (SwiftShader); bench/device-run.sh tests runs it on the H100 / H200');
    return;
  }
  for (const [shape, chunkSize, window, latentParts, scores, values] of [
    [{ nHeads: 4, kvLoraRank: 64, qkRopeHeadDim: 32 }, 16, 64, 1, 'tensor-cores', 'tensor-cores'], // chunks shorter than a window and a K step
    [{ nHeads: 18, kvLoraRank: 64, qkRopeHeadDim: 32 }, 160, 64, 2, 'dot4', 'tensor-cores'], // three windows a chunk, the last partial; two head tiles
    [{ nHeads: 28, kvLoraRank: 128, qkRopeHeadDim: 32 }, 96, 32, 2, 'tensor-cores', 'tensor-cores'], // 32-token windows
    [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, undefined, 64, 2, 'tensor-cores', 'tensor-cores'], // Qwen2.5-7B's row, the runner's split
    [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, 512, 64, 4, 'tensor-cores', 'tensor-cores'], // the longest chunk, four parts
  ] as const) {
    const seed = freshSeed();
    const tuning = { int8Products: 'three-pass', int8Window: window, int8LatentParts: latentParts, int8ScoreProducts: scores, int8ValueProducts: values } as const;
    const c: Step = { shape, blockSize: 16, seqs: [...mixed, [90, 2]], chunkSize, tuning };
    const res = await runStep(c, seed);
    assert.ok(res.three, `${JSON.stringify(shape)}: the step did not run the three passes`);
    checkInt8Products(res, c, `three-pass ${scores} scores, ${values} values ${JSON.stringify(shape)} chunk ${res.chunkSize} window ${window} parts ${latentParts} seed ${seed}`);
  }
});

/**
 * The one-pass tensor-core kernel (int8Products 'flash'; 'flash-dot4' is its data flow with dot4I8Packed, which is what
 * runs here without subgroup matrices) against the float64 model of the int8-product arithmetic.
 */
type FlashCase = readonly [shape: MlaAttentionShape, chunkSize: number | undefined, blockSize: number, window: number, latentTilesPerSubgroup: number];
const FLASH_CASES: readonly FlashCase[] = [
  [{ nHeads: 4, kvLoraRank: 64, qkRopeHeadDim: 32 }, 32, 32, 64, 1], // one head tile, 4 subgroups; chunks shorter than a window
  [{ nHeads: 18, kvLoraRank: 128, qkRopeHeadDim: 32 }, 160, 32, 64, 1], // two head tiles (the second partial), 8 subgroups; three windows a chunk, the last partial
  [{ nHeads: 12, kvLoraRank: 256, qkRopeHeadDim: 32 }, 96, 64, 128, 2], // one head tile over 8 subgroups: 128-token windows; two latent tiles a subgroup
  [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, undefined, 32, 64, 4], // Qwen2.5-7B's MLA row, the runner's split; 4 latent tiles a subgroup, folded 1 or 2 at a time
  [{ nHeads: 32, kvLoraRank: 512, qkRopeHeadDim: 64 }, 512, 64, 64, 4], // the most heads, the longest chunk
];
/** Two score tiles a subgroup (int8FlashScoreTiles 2): shapes whose workgroup memory fits SwiftShader's 32 KB. */
const FLASH_TWO_TILE_CASES: readonly FlashCase[] = [
  [{ nHeads: 4, kvLoraRank: 64, qkRopeHeadDim: 32 }, 32, 32, 128, 1], // one head tile, 4 subgroups: 128-token windows; chunks shorter than one
  [{ nHeads: 4, kvLoraRank: 64, qkRopeHeadDim: 32 }, 288, 32, 128, 1], // three windows a chunk, the last partial
  [{ nHeads: 20, kvLoraRank: 64, qkRopeHeadDim: 32 }, 96, 64, 64, 1], // two head tiles over 4 subgroups: 64-token windows
];
/** Two score tiles a subgroup at the Qwen2.5-7B row (42 KB of workgroup memory: the H100 / H200, not SwiftShader). */
const FLASH_TWO_TILE_DEVICE_CASES: readonly FlashCase[] = [
  ...FLASH_TWO_TILE_CASES,
  [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, undefined, 32, 128, 4],
  [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, 160, 32, 128, 4],
];
async function checkFlash(products: 'flash' | 'flash-dot4', tuning: Partial<MlaAttentionTuning> = {}, cases: readonly FlashCase[] = FLASH_CASES): Promise<void> {
  for (const [shape, chunkSize, blockSize, window, lps] of cases) {
    const seed = freshSeed();
    const c: Step = { shape, blockSize, seqs: [...mixed, [90, 2]], chunkSize, tuning: { int8Products: products, ...tuning } };
    const res = await runStep(c, seed);
    assert.ok(res.flash, 'no flash plan');
    assert.equal(res.flash.window, window);
    assert.equal(res.chunkSize % 32, 0, `chunk ${res.chunkSize}`);
    assert.equal(res.flash.latentTilesPerSubgroup, lps);
    checkInt8Products(res, c, `${products} ${JSON.stringify(shape)} chunk ${res.chunkSize} block ${blockSize} window ${res.flash.window} (${res.flash.scoreTiles} score tile(s) a subgroup) subgroups ${res.flash.subgroups} fold ${res.flash.foldLatentTiles}/${res.flash.latentTilesPerSubgroup} seed ${seed}`);
  }
}

test('mla attention int8 one-pass tensor-core kernel, its dot4 form, vs the float64 model of the int8-product arithmetic: one and two head tiles (a partial one), 4 and 8 subgroups, windows of 64 and 128, partial windows and chunks, 32- and 64-token blocks, the Qwen2.5-7B row shape with the runner\'s split; p′ through storage and through workgroup memory; two score tiles a subgroup', async () => {
  await checkFlash('flash-dot4');
  // p′ in workgroup memory rather than the storage scratch (the form whose tensor-core loads read zeros on the H100).
  await checkFlash('flash-dot4', { int8FlashPqStorage: false });
  await checkFlash('flash-dot4', { int8FlashScoreTiles: 2 }, FLASH_TWO_TILE_CASES);
});

test('mla attention int8 one-pass tensor-core kernel with its score products on tensor cores (i8 subgroup matrices) vs the float64 model of the int8-product arithmetic (where the adapter has subgroup matrices)', async (t) => {
  const g = await gpu();
  if (!mlaTcOnTensorCores(g)) {
    t.skip('this adapter has no i8 subgroup matrices with 32-wide subgroups (SwiftShader); bench/device-run.sh flash runs it on the H100 / H200');
    return;
  }
  await checkFlash('flash', { int8FlashTensorCores: 'scores' });
});

// p′ through the storage scratch (the default): its workgroup-memory form's loads read zeros on the H100.
test('mla attention int8 one-pass tensor-core kernel with both products on tensor cores vs the float64 model, one and two score tiles a subgroup (where the adapter has subgroup matrices)', async (t) => {
  const g = await gpu();
  if (!mlaTcOnTensorCores(g)) {
    t.skip('this adapter has no i8 subgroup matrices with 32-wide subgroups (SwiftShader); bench/device-run.sh flash runs it on the H100 / H200');
    return;
  }
  await checkFlash('flash');
  await checkFlash('flash', { int8FlashScoreTiles: 2 }, FLASH_TWO_TILE_DEVICE_CASES);
});

test('the one-pass tensor-core kernel takes blocks of a multiple of 32 tokens, rows whose K runs end inside them, and at most 32 heads; it says why not', () => {
  const f = mlaInt8RowFormat(512, 64);
  for (const [heads, block, limit, ok] of [[28, 32, 49152, true], [28, 16, 49152, false], [33, 32, 49152, false], [28, 64, 32768, true], [28, 32, 8192, false]] as const) {
    const p = planMlaFlash(heads, f, block, limit);
    assert.equal(typeof p !== 'string', ok, `${heads} heads, block ${block}, ${limit} B: ${typeof p === 'string' ? p : 'planned'}`);
    if (typeof p !== 'string') assert.ok(p.workgroupBytes <= limit);
  }
  assert.match(planMlaFlash(28, f, 16, 49152) as string, /multiple of 32/);
  assert.match(planMlaFlash(9, mlaInt8RowFormat(40, 8), 32, 49152) as string, /K steps read/);
});

test('mla attention int8 dot4 kernel, the softmax inside the score warps, vs the float64 model of the int8-product arithmetic: windows of 64 (two tokens a lane) and 32, partial windows, a partial head quad, heads split over workgroups, the Qwen2.5-7B row shape (emulated reductions; also on subgroups where the adapter has 32-wide ones)', async () => {
  const g = await gpu();
  const modes = ['emulated', ...(g.features.has('subgroups') && g.subgroupSize === 32 ? (['subgroup'] as const) : [])] as const;
  for (const softmax of modes) {
    for (const [shape, chunkSize, blockSize, window, headSplits] of [
      [{ nHeads: 4, kvLoraRank: 20, qkRopeHeadDim: 8 }, 16, 4, 64, 1], // chunks shorter than a window
      [{ nHeads: 7, kvLoraRank: 18, qkRopeHeadDim: 6 }, 160, 5, 64, 1], // three windows a split, the last partial
      [{ nHeads: 18, kvLoraRank: 64, qkRopeHeadDim: 32 }, 96, 16, 32, 1], // a partial head quad, 32-token windows
      [{ nHeads: 32, kvLoraRank: 40, qkRopeHeadDim: 8 }, 64, 16, 32, 4], // 8 heads a workgroup
      [{ nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 }, 128, 16, 64, 1], // Qwen2.5-7B's row: 64-token windows, query from storage
    ] as const) {
      const seed = freshSeed();
      const tuning = { int8Products: 'dot4', int8Window: window, int8Softmax: softmax, ...(headSplits > 1 ? { int8HeadSplits: headSplits } : {}) } as const;
      const c: Step = { shape, blockSize, seqs: [...mixed, [90, 2]], chunkSize, tuning };
      const res = await runStep(c, seed);
      assert.ok(res.dot4, 'no dot4 plan');
      assert.equal(res.dot4.softmax, softmax);
      const where = `${softmax} softmax ${JSON.stringify(shape)} chunk ${res.chunkSize} block ${blockSize} window ${res.dot4.window} q ${res.dot4.queryStaged ? 'staged' : 'storage'} ${headSplits} head split(s) seed ${seed}`;
      checkInt8Products(res, c, where);
    }
  }
});

test('mla attention over the int8 latent cache, f32 and dot4 products (both softmax forms), the three passes and the one-pass tensor-core kernel\'s dot4 form: a NaN in c, in k_pe or in a query value reaches exactly the rows and heads that use it', async () => {
  const seqs: Array<[number, number]> = [[40, 1], [3, 4], [6, 2]];
  for (const [int8Products, int8Softmax] of [['off', undefined], ['dot4', undefined], ['dot4', 'emulated'], ['three-pass', undefined], ['flash-dot4', undefined]] as const) {
    // The one-pass kernel takes R a multiple of 32, 32-token blocks and chunks.
    const flash = int8Products === 'flash-dot4';
    const R = flash ? 64 : 20;
    const RV = R + (flash ? 32 : 8);
    const shape = { nHeads: 5, kvLoraRank: R, qkRopeHeadDim: RV - R };
    const seed = freshSeed();
    const latent = seqs.map(([k, n], i) => randomArray((k + n) * RV, seed + i));
    latent[0][37 * RV + 5] = NaN; // seq 0, token 37, in c: the decode row at position 40 sees it
    latent[1][4 * RV + R + 2] = NaN; // seq 1, token 4, in k_pe: only rows at position ≥ 4 see it
    // And a NaN in one query value: row 6 (seq 2's second row), head 3, in q_pe.
    const editQuery = (q: Float32Array) => (q[(6 * 5 + 3) * RV + R + 3] = NaN);
    const res = await runStep({ shape, blockSize: flash ? 32 : 4, seqs, latent, chunkSize: flash ? 32 : 16, tuning: { int8Products, ...(int8Softmax ? { int8Softmax } : {}) }, editQuery }, seed);
    const rowOut = (row: number) => res.out.subarray(row * 5 * R, (row + 1) * 5 * R);
    const head = (row: number, h: number) => res.out.subarray((row * 5 + h) * R, (row * 5 + h + 1) * R);
    const where = `${int8Products}${int8Softmax ? ` ${int8Softmax} softmax` : ''} seed ${seed}`;
    assert.ok(rowOut(0).every(Number.isNaN), `${where}: seq 0 decode row: every head reads the NaN row`);
    for (let row = 1; row <= 4; row++) {
      const pos = 3 + row - 1;
      const values = rowOut(row);
      assert.ok(pos >= 4 ? values.every(Number.isNaN) : values.every(Number.isFinite), `${where}: seq 1 row at position ${pos}`);
    }
    assert.ok(rowOut(5).every(Number.isFinite), `${where}: seq 2 never sees a NaN cache row`);
    for (let h = 0; h < 5; h++) {
      assert.ok(h === 3 ? head(6, h).every(Number.isNaN) : head(6, h).every(Number.isFinite), `${where}: row 6 head ${h}: only head 3's query holds the NaN`);
    }
  }
});

test('int8-product kernel debug dump (dot4 form): staged rows, quantized query and window scores agree with the host check bench:attention applies to the tensor-core forms; planted tile faults are named', async () => {
  const shape = { nHeads: 18, kvLoraRank: 40, qkRopeHeadDim: 8 };
  const seed = freshSeed();
  // Row 0 is the first fresh token of a 90-token prefix: its chunk 0 (128 tokens) holds a full 64-token window.
  const c: Step = { shape, blockSize: 16, seqs: [[90, 2], [5, 1]], chunkSize: 128, tuning: { int8Products: 'emulate', int8Debug: true } };
  const res = await runStep(c, seed);
  assert.ok(res.dump, 'no dump');
  const inputs = {
    nHeads: shape.nHeads,
    format: res.format,
    plan: res.dump.plan,
    q: res.q.subarray(0, shape.nHeads * (shape.kvLoraRank + shape.qkRopeHeadDim)),
    rowWords: (t: number) => res.rowWords(0, t),
    windowTokens: 64,
    tiles: false,
  };
  const check = checkMlaTcDump(res.dump.words, inputs);
  assert.deepEqual([check.ctWrong, check.qqWrong, check.tilesWrong, check.scWrong], [0, 0, -1, 0], `seed ${seed}: ${describeMlaTcDump(check, res.dump.plan)}`);
  // The check sees a wrong staged row, a wrong query byte and a wrong score.
  const L = mlaTcDumpLayout(res.dump.plan);
  for (const [at, what] of [[L.ct + 5, 'ct'], [L.qq + 3, 'qq'], [L.sc + 7, 'sc']] as const) {
    const broken = res.dump.words.slice();
    // An exponent bit of the score (a mantissa bit of a score near 0 moves it less than the check's tolerance).
    broken[at] ^= what === 'sc' ? 1 << 30 : 0x40404040;
    const b = checkMlaTcDump(broken, inputs);
    assert.ok(b.ctWrong + b.qqWrong + b.scWrong > 0, `a flipped ${what} word went unnoticed`);
  }
  // Score tiles as the tensor-core forms dump them (region a: tokens (a % 2)·16…, heads ⌊a / 2⌋·16…, [token][head]
  // latent then rope), planted from the dumped query and rows: right ones pass, and two planted faults — every tile
  // transposed, and tile 1 holding tile 2's result — are named by the guesses.
  const p = res.dump.plan;
  const rowW = p.rowPad / 4;
  const byte = (w: number, b: number) => ((res.dump!.words[w + (b >> 2)] >>> (8 * (b & 3))) << 24) >> 24;
  const sums = (t: number, h: number) => {
    let sL = 0;
    let sP = 0;
    for (let b = 0; b < p.rowPad; b++) {
      const prod = byte(L.qq + h * rowW, b) * byte(L.ct + t * rowW, b);
      if (b < p.latentPad) sL += prod;
      else sP += prod;
    }
    return [sL, sP];
  };
  const plant = (at: (a: number, e: number) => [t: number, h: number]) => {
    const words = res.dump!.words.slice();
    for (let a = 0; a < p.headTiles * 2; a++) {
      for (let e = 0; e < 256; e++) {
        const [sL, sP] = sums(...at(a, e));
        words[L.tiles + a * 512 + e] = sL;
        words[L.tiles + a * 512 + 256 + e] = sP;
      }
    }
    return checkMlaTcDump(words, { ...inputs, tiles: true });
  };
  const right = plant((a, e) => [(a % 2) * 16 + Math.floor(e / 16), Math.floor(a / 2) * 16 + (e % 16)]);
  assert.deepEqual([right.tilesWrong, right.guesses], [0, []], describeMlaTcDump(right, p));
  const transposed = plant((a, e) => [Math.floor(a / 2) * 16 + (e % 16), (a % 2) * 16 + Math.floor(e / 16)]);
  assert.ok(transposed.tilesWrong > 0);
  assert.equal(transposed.guesses[0]?.guess, 'tokens and heads transposed in the tile', describeMlaTcDump(transposed, p));
  assert.equal(transposed.guesses[0].matches, transposed.guesses[0].of);
  const mixed = plant((a, e) => {
    const src = a === 1 ? 2 : a;
    return [(src % 2) * 16 + Math.floor(e / 16), Math.floor(src / 2) * 16 + (e % 16)];
  });
  assert.equal(mixed.guesses[0]?.guess, "tile 2's result", describeMlaTcDump(mixed, p));
});

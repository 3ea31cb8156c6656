// The int8 GQA KV cache: the quantizing cache write vs its CPU twin (bit-exact values, scales to f32 rounding, NaN and
// Inf groups), split-K attention over the int8 cache vs float64 within the bound derived from the quantization step,
// and stories260K perplexity with the int8 cache vs the f32 cache.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { GqaAttention, type GqaAttentionPlan, type GqaAttentionTuning, type GqaShape } from '../kernels/attention.ts';
import { KvWrite, type PagedRows } from '../kernels/kv-write.ts';
import { int8RowFormat, kvInt8At, kvInt8Scale, dequantizeKvRowInt8, quantizeKvRowInt8, type Int8RowFormat } from '../kernels/kv-int8.ts';
import { buildStepMeta, type StepSeqInput } from '../kernels/step-meta.ts';
import { pad8, poisonBuffer, readF32, storageBuffer } from '../kernels/tensors.ts';
import { attendGqa } from '../model/reference/ops.ts';
import { GqaKvLayout } from '../cache/kv-layout.ts';
import type { GqaConfig } from '../model/config.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { scoreWithRunner, textChunks } from '../engine/perplexity.ts';
import { loadModel } from '../model/load.ts';
import { cacheDtypeOption } from '../server/local-runner.ts';
import { fileGpu, freshSeed, randomArray, relError, shuffledPaging, strided, unstride } from './kernels-helpers.ts';

const gpu = fileGpu();

interface Step {
  shape: GqaShape;
  blockSize: number;
  /** Per sequence: tokens already cached, tokens this step. */
  seqs: Array<[cached: number, fresh: number]>;
  chunkSize?: number;
  tuning?: Partial<GqaAttentionTuning>;
  /** Every token's [K heads | V heads] row, per sequence (defaults: random with a per-group magnitude). */
  kv?: Float32Array[];
}

interface StepResult {
  /** Attention output rows [nRows, nHeads · D]. */
  out: Float32Array;
  q: Float32Array;
  kv: Float32Array[];
  /** The cache buffer's words after both steps, and every token's row index in it. */
  cache: Uint32Array;
  rowOf: (seq: number, t: number) => number;
  format: Int8RowFormat;
  maxChunks: number;
  plan: GqaAttentionPlan;
}

/**
 * Two steps through KvWrite (+ GqaAttention on the second): first the cached prefixes, then the step rows (prefill
 * chunks and decode tokens mixed) write their K/V and attend. Block ids shuffled across sequences; cache and output
 * poisoned with NaN before the kernels run.
 */
async function runStep(c: Step, seed: number): Promise<StepResult> {
  const g = await gpu();
  const { nHeads, nKvHeads, headDim: D } = c.shape;
  const rowValues = 2 * nKvHeads * D;
  const format = int8RowFormat(2 * nKvHeads, D);
  const layout: PagedRows = { rowValues, blockSize: c.blockSize, dtype: 'int8', int8: format };
  const qkvCols = (nHeads + 2 * nKvHeads) * D;
  const qkvStride = pad8(qkvCols);
  const outStride = pad8(nHeads * D);
  const paging = shuffledPaging(c.seqs, c.blockSize, seed);
  const { totalBlocks } = paging;
  // Groups of very different magnitudes (×2^-6 … ×2^3): each (token, head, K/V) must get its own scale.
  const kv =
    c.kv ??
    c.seqs.map(([k, n], i) => {
      const v = randomArray((k + n) * rowValues, seed + 100 + i);
      const mags = randomArray((k + n) * 2 * nKvHeads, seed + 200 + i);
      for (let j = 0; j < v.length; j++) v[j] *= 2 ** Math.round(4.5 * mags[Math.floor(j / D)] - 1.5);
      return v;
    });
  const cacheBuf = storageBuffer(g, 'int8 cache', totalBlocks * c.blockSize * format.rowWords * 4);
  poisonBuffer(g, cacheBuf);
  const maxRows = Math.max(1, ...c.seqs.map(([k, n]) => Math.max(k, n))) * c.seqs.length;
  const meta = storageBuffer(g, 'meta', 1 << 16);
  const qkv = storageBuffer(g, 'qkv', 4 * qkvStride * maxRows);
  const nRows = c.seqs.reduce((a, [, n]) => a + n, 0);
  const out = storageBuffer(g, 'out', 4 * outStride * Math.max(1, nRows));
  const writer = new KvWrite(g, layout, { meta, src: qkv, srcStride: qkvStride, srcOffset: nHeads * D, layerCaches: [cacheBuf] });
  const attention = new GqaAttention(g, c.shape, layout, { meta, qkv, qkvStride, out, outStride, layerCaches: [cacheBuf] }, c.tuning);
  const metaOpts = { blockSize: c.blockSize, numBlocks: totalBlocks, nKvHeads, maxChunkSize: attention.chunkMax, chunkSize: c.chunkSize };
  const run = async (seqs: StepSeqInput[], rows: Float32Array, attend: boolean) => {
    const m = buildStepMeta(seqs, metaOpts);
    g.device.queue.writeBuffer(meta, 0, m.data);
    g.device.queue.writeBuffer(qkv, 0, strided(rows, m.nRows, qkvCols, qkvStride));
    if (attend) attention.prepare(m.nRows, m.maxChunks);
    const enc = g.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    writer.encode(pass, 0, m.nRows);
    if (attend) attention.encode(pass, 0, m.nRows, m.maxChunks);
    pass.end();
    g.device.queue.submit([enc.finish()]);
    await g.device.queue.onSubmittedWorkDone();
    g.checkErrors();
    return m;
  };
  const kvRowsOf = (list: Array<[number, number, number]>) => {
    const rows = new Float32Array(list.length * qkvCols);
    list.forEach(([i, t], r) => rows.set(kv[i].subarray(t * rowValues, (t + 1) * rowValues), r * qkvCols + nHeads * D));
    return rows;
  };
  const prefix = c.seqs.flatMap(([k], i) => Array.from({ length: k }, (_, t) => [i, t, 0] as [number, number, number]));
  if (prefix.length) await run(paging.prefixStep, kvRowsOf(prefix), false);
  const fresh = c.seqs.flatMap(([k, n], i) => Array.from({ length: n }, (_, t) => [i, k + t, 0] as [number, number, number]));
  const rows = kvRowsOf(fresh);
  const q = randomArray(nRows * nHeads * D, seed + 3);
  for (let r = 0; r < nRows; r++) rows.set(q.subarray(r * nHeads * D, (r + 1) * nHeads * D), r * qkvCols);
  poisonBuffer(g, out);
  const m = await run(paging.freshStep, rows, true);
  const outRows = unstride(await readF32(g, out, nRows * outStride), nRows, nHeads * D, outStride);
  const cacheF = await readF32(g, cacheBuf, cacheBuf.size / 4);
  attention.destroy();
  for (const b of [cacheBuf, meta, qkv, out]) b.destroy();
  return {
    out: outRows,
    q,
    kv,
    cache: new Uint32Array(cacheF.buffer, cacheF.byteOffset, cacheF.length),
    rowOf: paging.slot,
    format,
    maxChunks: m.maxChunks,
    plan: attention.plan,
  };
}

const rowWordsOf = (r: StepResult, seq: number, t: number) =>
  r.cache.subarray(r.rowOf(seq, t) * r.format.rowWords, (r.rowOf(seq, t) + 1) * r.format.rowWords);

/**
 * Checks every token's stored row against the CPU quantizer: int8 values bit-exact except where x / scale lies within
 * 1e-4 of a half (f32 division on the GPU is not correctly rounded, and WGSL rounds halves to even), scales within
 * 4 f32 ulp (the GPU divides absmax by 127 in f32). Returns how many values were compared.
 */
function checkStoredRows(r: StepResult, seqs: Array<[number, number]>, label: string): number {
  const f = r.format;
  let compared = 0;
  seqs.forEach(([k, n], i) => {
    for (let t = 0; t < k + n; t++) {
      const x = r.kv[i].subarray(t * f.groups * f.groupValues, (t + 1) * f.groups * f.groupValues);
      const want = quantizeKvRowInt8(x, f);
      const got = rowWordsOf(r, i, t);
      for (let gi = 0; gi < f.groups; gi++) {
        const ws = kvInt8Scale(want, f, gi);
        const gs = kvInt8Scale(got, f, gi);
        const where = `${label}: seq ${i} token ${t} group ${gi}`;
        if (Number.isNaN(ws)) {
          assert.ok(Number.isNaN(gs), `${where}: a non-finite input should give a NaN scale, got ${gs}`);
          continue;
        }
        assert.ok(Math.abs(gs - ws) <= 4 * 2 ** -23 * ws, `${where}: scale ${gs} vs ${ws}`);
        for (let v = 0; v < f.groupValues; v++) {
          const idx = gi * f.groupValues + v;
          const a = kvInt8At(got, idx);
          const b = kvInt8At(want, idx);
          compared++;
          if (a === b) continue;
          const ratio = ws === 0 ? 0 : x[idx] / ws;
          const nearHalf = Math.abs(Math.abs(ratio - Math.trunc(ratio)) - 0.5) < 1e-4;
          assert.ok(nearHalf && Math.abs(a - b) === 1, `${where} value ${v}: int8 ${a}, CPU ${b} (x ${x[idx]}, x/scale ${ratio})`);
        }
      }
    }
  });
  return compared;
}

test('int8 KV write: values bit-exact and scales to f32 rounding vs the CPU quantizer, odd head dims, all-zero/NaN/Inf groups', async () => {
  for (const shape of [
    { nHeads: 4, nKvHeads: 2, headDim: 8 },
    { nHeads: 6, nKvHeads: 3, headDim: 12 },
    { nHeads: 2, nKvHeads: 1, headDim: 20 },
    // 128-value heads: 32 words, one workgroup of 32 threads per group; 1 kv head pads the two scales to 4 words.
    { nHeads: 4, nKvHeads: 1, headDim: 128 },
  ]) {
    const seed = freshSeed();
    const seqs: Array<[number, number]> = [[0, 7], [9, 1], [3, 6]];
    const { nKvHeads: H, headDim: D } = shape;
    const kv = seqs.map(([k, n], i) => randomArray((k + n) * 2 * H * D, seed + 100 + i, 3));
    // Poisoned groups: NaN in a K group, +Inf in a V group, −Inf in another, and an all-zero group (scale 0, values 0).
    kv[0][1 * 2 * H * D + 3] = NaN;
    kv[1][5 * 2 * H * D + H * D + 1] = Infinity;
    kv[2][8 * 2 * H * D + D - 1] = -Infinity;
    kv[2].fill(0, 2 * 2 * H * D, 2 * 2 * H * D + D);
    const r = await runStep({ shape, blockSize: 4, seqs, kv }, seed);
    const n = checkStoredRows(r, seqs, `${JSON.stringify(shape)} seed ${seed}`);
    assert.ok(n > 0);
    const f = r.format;
    assert.ok(Number.isNaN(kvInt8Scale(rowWordsOf(r, 0, 1), f, 0)), 'NaN group: NaN scale');
    assert.ok(Number.isNaN(kvInt8Scale(rowWordsOf(r, 1, 5), f, H)), '+Inf group: NaN scale');
    assert.ok(Number.isNaN(kvInt8Scale(rowWordsOf(r, 2, 8), f, 0)), '−Inf group: NaN scale');
    assert.equal(kvInt8Scale(rowWordsOf(r, 2, 2), f, 0), 0, 'all-zero group: scale 0');
    // A poisoned group does not leak into its neighbours.
    assert.ok(Number.isFinite(kvInt8Scale(rowWordsOf(r, 0, 1), f, 1)));
    // The scale of each finite group makes its largest |x| map to ±127 exactly.
    const row = rowWordsOf(r, 2, 0);
    const x = r.kv[2].subarray(0, D);
    let arg = 0;
    for (let v = 1; v < D; v++) if (Math.abs(x[v]) > Math.abs(x[arg])) arg = v;
    assert.equal(Math.abs(kvInt8At(row, arg)), 127);
  }
});

test('int8 KV layout: row bytes count values, scales and padding; rows stay whole u32 words', () => {
  // The layout reads nLayers, nKvHeads and headDim of the config (and its attention type).
  const cfg = (nKvHeads: number, headDim: number) => ({ attention: 'gqa', nLayers: 3, nKvHeads, headDim }) as GqaConfig;
  const l = new GqaKvLayout(cfg(4, 128), 16, 'int8');
  // 2 · 4 heads · 128 int8 values + 8 f32 scales = 1024 + 32 bytes (f16: 2048).
  assert.equal(l.rowBytes, 1056);
  assert.equal(l.bytesPerToken, 3 * 1056);
  assert.equal(l.blockBytesPerLayer, 16 * 1056);
  const odd = new GqaKvLayout(cfg(1, 12), 16, 'int8');
  // 24 values (6 words) + 2 scales padded to 4 words.
  assert.equal(odd.rowBytes, 40);
  assert.equal(odd.rowBytes % 4, 0);
  assert.throws(() => new GqaKvLayout(cfg(4, 6), 16, 'int8'), /not a multiple of 4/);
  assert.equal(new GqaKvLayout(cfg(4, 128), 16, 'f16').rowBytes, 2048);
});

/**
 * The float64 reference on the original (unquantized) K/V, and the error bound the int8 cache allows. Per (row, query
 * head h, cached token j), with s_kj / s_vj the scales of j's K / V group of h's kv head, every stored value is within
 * s/2 of the original, so
 *   |Δscore_j| ≤ Σ_i |q_i| · s_kj / 2 / √D =: δ_j,   δ = max_j δ_j,
 *   each softmax weight moves by a factor within [e^{−2δ}, e^{2δ}]: |p̃_j − p_j| ≤ p_j (e^{2δ} − 1),
 *   |õ_d − o_d| ≤ Σ_j |p̃_j − p_j| |ṽ_jd| + Σ_j p_j |ṽ_jd − v_jd| ≤ (e^{2δ} − 1) max_j |ṽ_jd| + max_j s_vj / 2,
 * plus 1e-5 · max|v| for the kernel's own f32 arithmetic.
 */
function referenceAndBound(r: StepResult, c: Step): { want: Float64Array; bound: Float64Array; wantDequant: Float64Array } {
  const { nHeads, nKvHeads: H, headDim: D } = c.shape;
  const G = nHeads / H;
  const f = r.format;
  const nRows = c.seqs.reduce((a, [, n]) => a + n, 0);
  const want = new Float64Array(nRows * nHeads * D);
  const wantDequant = new Float64Array(nRows * nHeads * D);
  const bound = new Float64Array(nRows * nHeads * D);
  let row = 0;
  c.seqs.forEach(([k, n], i) => {
    const rv = 2 * H * D;
    const deq = Array.from({ length: k + n }, (_, t) => dequantizeKvRowInt8(rowWordsOf(r, i, t), f));
    const scales = Array.from({ length: k + n }, (_, t) => Array.from({ length: 2 * H }, (_, gi) => kvInt8Scale(rowWordsOf(r, i, t), f, gi)));
    for (let t = 0; t < n; t++, row++) {
      const ctx = k + t + 1;
      const qRow = Float64Array.from(r.q.subarray(row * nHeads * D, (row + 1) * nHeads * D));
      const orig = (j: number, off: number) => Float64Array.from(r.kv[i].subarray(j * rv + off, j * rv + off + H * D));
      const keys = Array.from({ length: ctx }, (_, j) => orig(j, 0));
      const values = Array.from({ length: ctx }, (_, j) => orig(j, H * D));
      want.set(attendGqa(qRow, keys, values, nHeads, H, D), row * nHeads * D);
      const dk = Array.from({ length: ctx }, (_, j) => deq[j].subarray(0, H * D));
      const dv = Array.from({ length: ctx }, (_, j) => deq[j].subarray(H * D, 2 * H * D));
      wantDequant.set(attendGqa(qRow, dk, dv, nHeads, H, D), row * nHeads * D);
      for (let h = 0; h < nHeads; h++) {
        const kh = Math.floor(h / G);
        let qAbs = 0;
        for (let d = 0; d < D; d++) qAbs += Math.abs(qRow[h * D + d]);
        let delta = 0;
        let sv = 0;
        let vMax = 0;
        for (let j = 0; j < ctx; j++) {
          delta = Math.max(delta, (qAbs * scales[j][kh]) / 2 / Math.sqrt(D));
          sv = Math.max(sv, scales[j][H + kh] / 2);
          for (let d = 0; d < D; d++) vMax = Math.max(vMax, Math.abs(dv[j][kh * D + d]));
        }
        for (let d = 0; d < D; d++) bound[row * nHeads * D + h * D + d] = Math.expm1(2 * delta) * vMax + sv + 1e-5 * vMax;
      }
    }
  });
  return { want, bound, wantDequant };
}

const mixed: Array<[number, number]> = [
  [0, 13], // fresh prefill chunk
  [37, 1], // decode after an odd prefix
  [5, 20], // prefill chunk after a prefix (crosses blocks)
  [64, 1], // decode at a block boundary
  [0, 1], // first token alone
];

test('gqa attention over the int8 cache vs float64: within the quantization bound, odd head dims, several chunks and blocks', async () => {
  const tunings: Array<[string, Partial<GqaAttentionTuning>]> = [
    ['default', {}],
    ['no subgroups', { useSubgroups: false }],
    ['wg32 unroll1', { workgroupSize: 32, unroll: 1 }],
  ];
  const pieces = new Set<number>();
  for (const shape of [
    { nHeads: 4, nKvHeads: 2, headDim: 8 }, // piece 8 (vec2<u32>)
    { nHeads: 6, nKvHeads: 2, headDim: 12 }, // piece 4 (one u32)
    { nHeads: 7, nKvHeads: 1, headDim: 16 }, // piece 16 (vec4<u32>), g = 7
    { nHeads: 4, nKvHeads: 2, headDim: 20 }, // piece 4, 5 pieces a row (no lane sharing)
    { nHeads: 2, nKvHeads: 2, headDim: 32 }, // g = 1
  ]) {
    for (const [name, tuning] of tunings) {
      const seed = freshSeed();
      const c: Step = { shape, blockSize: 4, seqs: mixed, chunkSize: 16, tuning };
      const r = await runStep(c, seed);
      assert.ok(r.maxChunks > 1, 'the case should split contexts into several chunks');
      const { want, bound, wantDequant } = referenceAndBound(r, c);
      const where = `${JSON.stringify(shape)} ${name} seed ${seed}`;
      // The kernel's own arithmetic: against float64 on the values the cache holds.
      const kernelErr = relError(r.out, wantDequant);
      assert.ok(kernelErr <= 1e-4, `${where}: relative error ${kernelErr} vs float64 on the dequantized cache`);
      let worst = 0;
      for (let i = 0; i < want.length; i++) {
        const e = Math.abs(r.out[i] - want[i]);
        assert.ok(e <= bound[i], `${where}: output ${i} is ${r.out[i]}, float64 ${want[i]}: error ${e} > bound ${bound[i]}`);
        worst = Math.max(worst, e / bound[i]);
      }
      // The quantization shows at all: a kernel that read unquantized values would match the float64 reference to ~1e-7.
      assert.ok(relError(r.out, want) > 1e-6, `${where}: output equals the unquantized reference; was the cache quantized?`);
      pieces.add(r.plan.piece);
      assert.ok(worst <= 1);
    }
  }
  assert.deepEqual([...pieces].sort((a, b) => a - b), [4, 8, 16], 'every int8 piece width (u32, vec2<u32>, vec4<u32>) should be covered');
});

test('gqa attention over the int8 cache at Qwen2.5-7B head shape (28 q / 4 kv, d 128): 16-value pieces, sliced token-group sum', async () => {
  const shape = { nHeads: 28, nKvHeads: 4, headDim: 128 };
  const seed = freshSeed();
  const c: Step = { shape, blockSize: 16, seqs: [[300, 1], [0, 3], [40, 1]], chunkSize: 64 };
  const r = await runStep(c, seed);
  assert.equal(r.plan.piece, 16, '128-wide int8 rows load in 16-byte pieces');
  assert.ok(r.maxChunks >= 2);
  const { want, bound, wantDequant } = referenceAndBound(r, c);
  const kernelErr = relError(r.out, wantDequant);
  assert.ok(kernelErr <= 1e-4, `seed ${seed} ${JSON.stringify(r.plan)}: relative error ${kernelErr} vs float64 on the dequantized cache`);
  for (let i = 0; i < want.length; i++) {
    assert.ok(Math.abs(r.out[i] - want[i]) <= bound[i], `seed ${seed}: output ${i} is ${r.out[i]}, float64 ${want[i]}, bound ${bound[i]}`);
  }
});

test('gqa attention over the int8 cache: a NaN key reaches exactly the outputs whose context holds it', async () => {
  const shape = { nHeads: 4, nKvHeads: 2, headDim: 16 };
  const seqs: Array<[number, number]> = [[10, 1], [3, 4]];
  const seed = freshSeed();
  const rv = 2 * shape.nKvHeads * shape.headDim;
  const kv = seqs.map(([k, n], i) => randomArray((k + n) * rv, seed + i));
  kv[0][4 * rv + 5] = NaN; // seq 0, token 4, K of kv head 0
  kv[1][4 * rv + 3 * 16 + 2] = NaN; // seq 1, token 4, V of kv head 1 (only rows at position ≥ 4 see it)
  const c: Step = { shape, blockSize: 4, seqs, kv };
  const r = await runStep(c, seed);
  const D = shape.headDim;
  const isNaNHead = (row: number, h: number) => r.out.subarray((row * 4 + h) * D, (row * 4 + h + 1) * D).some(Number.isNaN);
  const allNaNHead = (row: number, h: number) => r.out.subarray((row * 4 + h) * D, (row * 4 + h + 1) * D).every(Number.isNaN);
  // Row 0: seq 0 decode at position 10: query heads 0, 1 (kv head 0) NaN, heads 2, 3 finite.
  assert.ok(allNaNHead(0, 0) && allNaNHead(0, 1), 'heads of the poisoned kv head should be NaN');
  assert.ok(!isNaNHead(0, 2) && !isNaNHead(0, 3), 'the other kv head should stay finite');
  // Rows 1..4: seq 1 positions 3..6; V of kv head 1 at token 4 is NaN: heads 2, 3 NaN from position 4 on.
  for (let row = 1; row <= 4; row++) {
    const pos = 3 + row - 1;
    for (let h = 0; h < 4; h++) {
      const poisoned = pos >= 4 && h >= 2;
      assert.equal(isNaNHead(row, h), poisoned, `row ${row} (position ${pos}) head ${h}`);
    }
  }
});

test('stories260K: perplexity with the int8 KV cache within 5 % of the f32 cache (f32 weights, batched prefill)', async () => {
  const g = await gpu();
  const model = await loadModel('../shared/models/stories260K/stories260K.gguf', { maxSeqLen: 256 });
  const text = readFileSync('../shared/data/tinystories_valid_a.txt', 'utf8');
  const chunks = textChunks(text, model.tokenizer, 64).slice(0, 12);
  const score = async (cacheDtype: 'f32' | 'int8') => {
    const runner = await createGpuRunner(g, model, { weightDtype: 'f32', cacheDtype, blockSize: 16, numBlocks: 24 * 8 + 8 });
    try {
      // 2 · 4 kv heads · 8 dims per layer: 64 int8 values + 8 f32 scales, or 64 f32 values.
      assert.equal(runner.kvBytesPerToken, model.config.nLayers * (cacheDtype === 'int8' ? 64 + 32 : 64 * 4));
      return await scoreWithRunner(runner, chunks, 1024);
    } finally {
      runner.destroy();
    }
  };
  const base = await score('f32');
  const int8 = await score('int8');
  assert.equal(int8.predicted, base.predicted);
  const delta = int8.perplexity / base.perplexity - 1;
  console.log(
    `stories260K, ${base.chunks} paragraphs, ${base.predicted} tokens: ppl f32 cache ${base.perplexity.toFixed(4)}, int8 cache ${int8.perplexity.toFixed(4)} (${(100 * delta).toFixed(3)} %)`,
  );
  assert.ok(Math.abs(delta) <= 0.05, `int8 KV cache perplexity ${int8.perplexity} vs f32 ${base.perplexity}: ${(100 * delta).toFixed(2)} %`);
  assert.ok(Math.abs(delta) > 1e-6, `int8 cache perplexity equals f32 (${delta}): was the cache quantized?`);
});

test('generate / eval-ppl option: --kv-cache-dtype, its alias --cache-dtype, disagreement and bad values', () => {
  assert.equal(cacheDtypeOption({}, 'f16'), 'f16');
  assert.equal(cacheDtypeOption({ 'kv-cache-dtype': 'int8' }, 'f16'), 'int8');
  assert.equal(cacheDtypeOption({ 'cache-dtype': 'f32' }, 'f16'), 'f32');
  assert.equal(cacheDtypeOption({ 'kv-cache-dtype': 'int8', 'cache-dtype': 'int8' }, 'f16'), 'int8');
  assert.throws(() => cacheDtypeOption({ 'kv-cache-dtype': 'int8', 'cache-dtype': 'f16' }, 'f16'), /disagree/);
  assert.throws(() => cacheDtypeOption({ 'kv-cache-dtype': 'fp8' }, 'f16'), /--kv-cache-dtype must be one of f32, f16, int8; got "fp8"/);
});

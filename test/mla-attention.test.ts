// Absorbed MLA attention over the paged latent cache vs float64: mixed prefill/decode rows, shuffled block tables,
// contexts crossing block, tile and chunk boundaries, f32 and f16 caches, R/r/heads combos incl. 512 + 64.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { MlaAttention, MLA_MAX_CHUNK, mlaSplit, planMlaAttention, DEFAULT_MLA_TUNING, type MlaAttentionShape, type MlaAttentionTuning } from '../kernels/mla-attention.ts';
import { KvWrite } from '../kernels/kv-write.ts';
import { buildStepMeta, type StepSeqInput } from '../kernels/step-meta.ts';
import { poisonBuffer, readF32, roundToF16, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { fileGpu, freshSeed, randomArray, relError, shuffledPaging } from './kernels-helpers.ts';

const gpu = fileGpu();

interface Case {
  shape: MlaAttentionShape;
  dtype: 'f32' | 'f16';
  blockSize: number;
  /** Per sequence: tokens already cached, tokens this step. */
  seqs: Array<[cached: number, fresh: number]>;
  chunkSize?: number;
  tuning?: Partial<MlaAttentionTuning>;
}

/** Float64 absorbed attention of one query (all heads) over latent rows 0..ctx-1: ô [nHeads·R]. */
function referenceAbsorbed(q: Float32Array, rows: Float32Array, ctx: number, s: MlaAttentionShape): Float64Array {
  const RV = s.kvLoraRank + s.qkRopeHeadDim;
  const out = new Float64Array(s.nHeads * s.kvLoraRank);
  const scores = new Float64Array(ctx);
  for (let h = 0; h < s.nHeads; h++) {
    let mx = -Infinity;
    for (let j = 0; j < ctx; j++) {
      let d = 0;
      for (let k = 0; k < RV; k++) d += q[h * RV + k] * rows[j * RV + k];
      scores[j] = d;
      mx = Math.max(mx, d);
    }
    let sum = 0;
    for (let j = 0; j < ctx; j++) sum += (scores[j] = Math.exp(scores[j] - mx));
    for (let j = 0; j < ctx; j++) {
      const p = scores[j] / sum;
      for (let m = 0; m < s.kvLoraRank; m++) out[h * s.kvLoraRank + m] += p * rows[j * RV + m];
    }
  }
  return out;
}

async function runCase(c: Case): Promise<{ err: number; maxChunks: number; seed: number; workgroupSize: number }> {
  const g = await gpu();
  const seed = freshSeed();
  const { nHeads, kvLoraRank: R, qkRopeHeadDim: r } = c.shape;
  const RV = R + r;
  const layout = { rowValues: RV, blockSize: c.blockSize, dtype: c.dtype };
  const { totalBlocks, tables } = shuffledPaging(c.seqs, c.blockSize, seed);
  // Latent rows of every token; scaled so that softmax is far from uniform.
  const latent = c.seqs.map(([k, n], i) => randomArray((k + n) * RV, seed + 100 + i));
  const nRows = c.seqs.reduce((a, [, n]) => a + n, 0);
  const q = randomArray(nRows * nHeads * RV, seed + 3, 4 / Math.sqrt(RV));
  const cacheBuf = storageBuffer(g, 'latent cache', totalBlocks * c.blockSize * RV * (c.dtype === 'f16' ? 2 : 4));
  poisonBuffer(g, cacheBuf);
  const maxTok = c.seqs.reduce((a, [k, n]) => a + k + n, 0);
  const src = storageBuffer(g, 'latent rows', 4 * RV * maxTok);
  const meta = storageBuffer(g, 'meta', 1 << 16);
  const qLatent = uploadArray(g, 'qLatent', q);
  const outStride = nHeads * R;
  const out = storageBuffer(g, 'out', 4 * outStride * nRows);
  const writer = new KvWrite(g, layout, { meta, src, srcStride: RV, srcOffset: 0, layerCaches: [cacheBuf] });
  const attention = new MlaAttention(g, c.shape, layout, { meta, qLatent, out, outStride, layerCaches: [cacheBuf] }, c.tuning);
  // The split the runner would make (MlaBlock: mlaSplit, chunks of at most MLA_MAX_CHUNK) unless the case fixes a chunk.
  const split = mlaSplit(c.shape, layout.dtype, c.tuning);
  const metaOpts = { blockSize: c.blockSize, numBlocks: totalBlocks, nKvHeads: split.parallelHeads, maxChunkSize: MLA_MAX_CHUNK, targetWorkgroups: split.targetWorkgroups };

  const run = async (seqs: StepSeqInput[], rows: Float32Array, attend: boolean) => {
    const m = buildStepMeta(seqs, { ...metaOpts, chunkSize: c.chunkSize });
    g.device.queue.writeBuffer(meta, 0, m.data);
    g.device.queue.writeBuffer(src, 0, rows);
    if (attend) attention.prepare(m.nRows, m.maxChunks);
    const enc = g.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    writer.encode(pass, 0, m.nRows);
    if (attend) attention.encode(pass, 0, m.nRows, m.maxChunks, m.chunkSize);
    pass.end();
    g.device.queue.submit([enc.finish()]);
    await g.device.queue.onSubmittedWorkDone();
    g.checkErrors();
    return m;
  };
  // Step 1: the cached prefixes, written by the same kernel as earlier steps would have.
  const prefixSeqs: StepSeqInput[] = [];
  const prefixRows: Float32Array[] = [];
  c.seqs.forEach(([k], i) => {
    if (k === 0) return;
    prefixSeqs.push({ tokens: new Array(k).fill(0), startPos: 0, blockTable: tables[i], logits: 'none' });
    prefixRows.push(latent[i].subarray(0, k * RV));
  });
  if (prefixSeqs.length) {
    const rows = new Float32Array(prefixRows.reduce((a, p) => a + p.length, 0));
    let o = 0;
    for (const p of prefixRows) rows.set(p, (o += p.length) - p.length);
    await run(prefixSeqs, rows, false);
  }
  // Step 2: the new rows write their latent rows and attend.
  const stepSeqs: StepSeqInput[] = c.seqs.map(([k, n], i) => ({ tokens: new Array(n).fill(0), startPos: k, blockTable: tables[i], logits: 'none' }));
  const rows = new Float32Array(nRows * RV);
  let ri = 0;
  c.seqs.forEach(([k, n], i) => {
    for (let t = 0; t < n; t++, ri++) rows.set(latent[i].subarray((k + t) * RV, (k + t + 1) * RV), ri * RV);
  });
  poisonBuffer(g, out);
  const m = await run(stepSeqs, rows, true);
  const workgroupSize = attention.variantFor(m.chunkSize).tuning.workgroupSize;
  const got = await readF32(g, out, nRows * outStride);

  const want = new Float64Array(nRows * outStride);
  ri = 0;
  c.seqs.forEach(([k, n], i) => {
    const stored = c.dtype === 'f16' ? roundToF16(latent[i]) : latent[i];
    for (let t = 0; t < n; t++, ri++) {
      want.set(referenceAbsorbed(q.subarray(ri * nHeads * RV, (ri + 1) * nHeads * RV), stored, k + t + 1, c.shape), ri * outStride);
    }
  });
  attention.destroy();
  for (const b of [cacheBuf, src, meta, qLatent, out]) b.destroy();
  return { err: relError(got, want), maxChunks: m.maxChunks, seed, workgroupSize };
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

for (const dtype of ['f32', 'f16'] as const) {
  test(`mla attention ${dtype}: mixed prefill/decode batch, chunks and tiles crossing blocks`, async () => {
    for (const shape of [
      { nHeads: 4, kvLoraRank: 16, qkRopeHeadDim: 4 }, // row of 20: the pairwise (unaligned) path
      { nHeads: 7, kvLoraRank: 24, qkRopeHeadDim: 8 }, // row of 32: 8-value groups; 7 heads → padded head groups
      { nHeads: 2, kvLoraRank: 512, qkRopeHeadDim: 64 }, // DeepSeek/TransMLA width with few heads
    ]) {
      for (const [chunkSize, tuning] of [
        [16, smallTiles],
        [32, DEFAULT_MLA_TUNING],
      ] as const) {
        const plan = planMlaAttention(shape, { ...DEFAULT_MLA_TUNING, ...tuning });
        const { err, maxChunks, seed } = await runCase({ shape, dtype, blockSize: 4, seqs: mixed, chunkSize, tuning });
        assert.ok(maxChunks > 1, 'the case should split contexts into several chunks');
        if (tuning === smallTiles) assert.ok(plan.tileTokens < chunkSize, `tile ${plan.tileTokens} should be smaller than chunk ${chunkSize}`);
        assert.ok(err <= 1e-4, `${dtype} ${JSON.stringify(shape)} chunk ${chunkSize} tile ${plan.tileTokens}: relative error ${err} > 1e-4 (seed ${seed})`);
      }
    }
  });
}

test('mla attention: long contexts with the default chunk policy and tile, block size 16', async () => {
  const shape = { nHeads: 8, kvLoraRank: 32, qkRopeHeadDim: 8 };
  const { err, seed } = await runCase({ shape, dtype: 'f16', blockSize: 16, seqs: [[299, 1], [250, 9], [3, 2]] });
  assert.ok(err <= 1e-4, `relative error ${err} (seed ${seed})`);
});

test('mla attention: 33 heads split over two workgroups, 512-token tiles, odd chunk count', async () => {
  const shape = { nHeads: 33, kvLoraRank: 16, qkRopeHeadDim: 4 };
  const plan = planMlaAttention(shape, DEFAULT_MLA_TUNING);
  assert.equal(plan.headSplits, 2);
  const { err, seed } = await runCase({ shape, dtype: 'f32', blockSize: 16, seqs: [[40, 1], [0, 7]], chunkSize: 16 });
  assert.ok(err <= 1e-4, `relative error ${err} (seed ${seed})`);
});

test('mla attention: each workgroup size (picked by chunk size) on a 450-token context, f16 cache', async () => {
  const shape = { nHeads: 8, kvLoraRank: 24, qkRopeHeadDim: 8 };
  const seen = new Set<number>();
  for (const chunkSize of [64, 200, 400]) {
    const { err, seed, workgroupSize } = await runCase({ shape, dtype: 'f16', blockSize: 16, seqs: [[449, 1], [120, 3]], chunkSize });
    seen.add(workgroupSize);
    assert.ok(err <= 1e-4, `chunk ${chunkSize} (workgroup ${workgroupSize}): relative error ${err} (seed ${seed})`);
  }
  assert.deepEqual([...seen].sort((a, b) => a - b), [64, 128, 256]);
});

test('mla attention: query slices staged in workgroup memory (partial last slice), f32 and f16', async () => {
  for (const [shape, tuning, chunkSize] of [
    [{ nHeads: 7, kvLoraRank: 24, qkRopeHeadDim: 8 }, { ...smallTiles, qSliceValues: 24 }, 16],
    [{ nHeads: 2, kvLoraRank: 512, qkRopeHeadDim: 64 }, { qSliceValues: 64 }, 32],
  ] as const) {
    assert.ok(planMlaAttention(shape, { ...DEFAULT_MLA_TUNING, ...tuning }).qSliceGroups > 0);
    for (const dtype of ['f32', 'f16'] as const) {
      const { err, seed } = await runCase({ shape, dtype, blockSize: 4, seqs: mixed, chunkSize, tuning });
      assert.ok(err <= 1e-4, `${dtype} ${JSON.stringify(shape)} ${JSON.stringify(tuning)}: relative error ${err} (seed ${seed})`);
    }
  }
});

test('mla attention: 28 heads at 512 + 64, each workgroup size (smaller ones split the heads), f16 cache', async () => {
  const shape = { nHeads: 28, kvLoraRank: 512, qkRopeHeadDim: 64 };
  const seen = new Map<number, number>();
  for (const chunkSize of [64, 200, 300]) {
    const { err, seed, workgroupSize } = await runCase({ shape, dtype: 'f16', blockSize: 16, seqs: [[309, 1], [20, 2]], chunkSize });
    seen.set(workgroupSize, planMlaAttention(shape, { ...DEFAULT_MLA_TUNING, workgroupSize }).headSplits);
    assert.ok(err <= 1e-4, `chunk ${chunkSize} (workgroup ${workgroupSize}): relative error ${err} (seed ${seed})`);
  }
  assert.deepEqual([...seen].sort((a, b) => a[0] - b[0]), [[64, 4], [128, 2], [256, 1]]);
});

test('mla attention: 4 tokens × 3 heads per thread (padded head groups), f16 cache', async () => {
  const shape = { nHeads: 7, kvLoraRank: 24, qkRopeHeadDim: 8 };
  const tuning = { workgroupSize: 32, tokensPerThread: 4, maxHeadsPerThread: 3 };
  assert.equal(planMlaAttention(shape, { ...DEFAULT_MLA_TUNING, ...tuning }).scoreGroups, 3);
  const { err, seed } = await runCase({ shape, dtype: 'f16', blockSize: 4, seqs: mixed, chunkSize: 16, tuning });
  assert.ok(err <= 1e-4, `relative error ${err} (seed ${seed})`);
});

// Paged KV write + split-K GQA attention vs the float64 reference: mixed prefill/decode rows, shuffled block tables,
// contexts crossing block and chunk boundaries, f32 and f16 caches.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { GqaAttention, type GqaAttentionPlan, type GqaAttentionTuning, type GqaShape } from '../kernels/attention.ts';
import { KvWrite } from '../kernels/kv-write.ts';
import { buildStepMeta, type StepSeqInput } from '../kernels/step-meta.ts';
import { pad8, poisonBuffer, readF32, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { attendGqa } from '../model/reference/ops.ts';
import { fileGpu, freshSeed, randomArray, relError, shuffledPaging, strided, unstride } from './kernels-helpers.ts';

const gpu = fileGpu();

interface Case {
  shape: GqaShape;
  dtype: 'f32' | 'f16';
  blockSize: number;
  /** Per sequence: tokens already cached, tokens this step. */
  seqs: Array<[cached: number, fresh: number]>;
  chunkSize?: number;
  tuning?: Partial<GqaAttentionTuning>;
}

/** Runs one step with the given rows; returns the attention output rows and the reference. */
async function runCase(c: Case): Promise<{ err: number; chunk: number; maxChunks: number; plan: GqaAttentionPlan }> {
  const g = await gpu();
  const seed = freshSeed();
  const { nHeads, nKvHeads, headDim: D } = c.shape;
  const rowValues = 2 * nKvHeads * D;
  const qkvCols = (nHeads + 2 * nKvHeads) * D;
  const qkvStride = pad8(qkvCols);
  const outStride = pad8(nHeads * D);
  const layout = { rowValues, blockSize: c.blockSize, dtype: c.dtype };
  const { totalBlocks, tables } = shuffledPaging(c.seqs, c.blockSize, seed);
  // Every token's K (roped or not, it does not matter here) and V, and the step rows' q.
  const kv = c.seqs.map(([k, n], i) => randomArray((k + n) * rowValues, seed + 100 + i));
  const cacheBuf = storageBuffer(g, 'cache', totalBlocks * c.blockSize * rowValues * (c.dtype === 'f16' ? 2 : 4));
  const metaOpts = { blockSize: c.blockSize, numBlocks: totalBlocks, nKvHeads, maxChunkSize: 512, chunkSize: c.chunkSize };

  // Step 1: write the cached prefixes (as if earlier steps had), through the same kernel.
  const prefixSeqs: StepSeqInput[] = [];
  const prefixRows: Float32Array[] = [];
  c.seqs.forEach(([k], i) => {
    if (k === 0) return;
    prefixSeqs.push({ tokens: new Array(k).fill(0), startPos: 0, blockTable: tables[i], logits: 'none' });
    prefixRows.push(kv[i].subarray(0, k * rowValues));
  });
  const meta = storageBuffer(g, 'meta', 1 << 16);
  const qkv = storageBuffer(g, 'qkv', 4 * qkvStride * Math.max(64, c.seqs.reduce((a, [k, n]) => a + Math.max(k, n), 0)));
  const out = storageBuffer(g, 'out', 4 * outStride * c.seqs.reduce((a, [, n]) => a + n, 0));
  const writer = new KvWrite(g, layout, { meta, src: qkv, srcStride: qkvStride, srcOffset: nHeads * D, layerCaches: [cacheBuf] });
  const run = async (seqs: StepSeqInput[], rows: Float32Array, attention?: GqaAttention) => {
    const m = buildStepMeta(seqs, { ...metaOpts, maxChunkSize: attention?.chunkMax ?? 512 });
    g.device.queue.writeBuffer(meta, 0, m.data);
    g.device.queue.writeBuffer(qkv, 0, strided(rows, m.nRows, qkvCols, qkvStride));
    attention?.prepare(m.nRows, m.maxChunks);
    const enc = g.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    writer.encode(pass, 0, m.nRows);
    attention?.encode(pass, 0, m.nRows, m.maxChunks);
    pass.end();
    g.device.queue.submit([enc.finish()]);
    await g.device.queue.onSubmittedWorkDone();
    g.checkErrors();
    return m;
  };
  if (prefixSeqs.length) {
    const rows = new Float32Array(prefixRows.reduce((a, r) => a + r.length / rowValues, 0) * qkvCols);
    let r = 0;
    for (const pr of prefixRows) {
      for (let t = 0; t < pr.length / rowValues; t++, r++) rows.set(pr.subarray(t * rowValues, (t + 1) * rowValues), r * qkvCols + nHeads * D);
    }
    await run(prefixSeqs, rows);
  }

  // Step 2: the new rows (prefill chunks and decode tokens mixed) write their K/V and attend.
  const stepSeqs: StepSeqInput[] = c.seqs.map(([k, n], i) => ({ tokens: new Array(n).fill(0), startPos: k, blockTable: tables[i], logits: 'none' }));
  const nRows = c.seqs.reduce((a, [, n]) => a + n, 0);
  const q = randomArray(nRows * nHeads * D, seed + 3);
  const rows = new Float32Array(nRows * qkvCols);
  let r = 0;
  c.seqs.forEach(([k, n], i) => {
    for (let t = 0; t < n; t++, r++) {
      rows.set(q.subarray(r * nHeads * D, (r + 1) * nHeads * D), r * qkvCols);
      rows.set(kv[i].subarray((k + t) * rowValues, (k + t + 1) * rowValues), r * qkvCols + nHeads * D);
    }
  });
  const attention = new GqaAttention(g, c.shape, layout, { meta, qkv, qkvStride, out, outStride, layerCaches: [cacheBuf] }, c.tuning);
  poisonBuffer(g, out);
  const m = await run(stepSeqs, rows, attention);
  const got = unstride(await readF32(g, out, nRows * outStride), nRows, nHeads * D, outStride);

  const want = new Float64Array(nRows * nHeads * D);
  r = 0;
  c.seqs.forEach(([k, n], i) => {
    const toVec = (t: number, off: number) => Float64Array.from(kv[i].subarray(t * rowValues + off, t * rowValues + off + nKvHeads * D));
    for (let t = 0; t < n; t++, r++) {
      const ctx = k + t + 1;
      const keys = Array.from({ length: ctx }, (_, j) => toVec(j, 0));
      const values = Array.from({ length: ctx }, (_, j) => toVec(j, nKvHeads * D));
      want.set(attendGqa(Float64Array.from(q.subarray(r * nHeads * D, (r + 1) * nHeads * D)), keys, values, nHeads, nKvHeads, D), r * nHeads * D);
    }
  });
  attention.destroy();
  for (const b of [cacheBuf, meta, qkv, out]) b.destroy();
  return { err: relError(got, want), chunk: m.chunkSize, maxChunks: m.maxChunks, plan: attention.plan };
}

const mixed: Array<[number, number]> = [
  [0, 13], // fresh prefill chunk
  [37, 1], // decode after an odd prefix
  [5, 20], // prefill chunk after a prefix (crosses blocks)
  [64, 1], // decode at a block boundary
  [0, 1], // first token alone
];

// Default tuning (subgroup butterfly where the device has subgroups), the workgroup-memory-only fallback, and a small
// workgroup with one row per load set (more iterations of the score loop per chunk).
const tunings: Array<[string, Partial<GqaAttentionTuning>]> = [
  ['default', {}],
  ['no subgroups', { useSubgroups: false }],
  ['wg32 unroll1', { workgroupSize: 32, unroll: 1 }],
];

for (const dtype of ['f32', 'f16'] as const) {
  const bar = dtype === 'f32' ? 1e-4 : 1e-2;
  test(`gqa attention ${dtype}: mixed prefill/decode batch, small chunks crossing blocks`, async () => {
    const lanesSeen = new Set<number>();
    for (const shape of [
      { nHeads: 4, nKvHeads: 2, headDim: 8 },
      { nHeads: 6, nKvHeads: 2, headDim: 6 },
      { nHeads: 7, nKvHeads: 1, headDim: 16 },
      // g = 2 and g = 1 over up to 4 lanes: the reduce-scatter ends early and finishes with plain butterfly steps.
      { nHeads: 4, nKvHeads: 2, headDim: 16 },
      { nHeads: 2, nKvHeads: 2, headDim: 16 },
    ]) {
      for (const [name, tuning] of tunings) {
        for (const chunkSize of name === 'default' ? [16, 32] : [32]) {
          const { err, maxChunks, plan } = await runCase({ shape, dtype, blockSize: 4, seqs: mixed, chunkSize, tuning });
          lanesSeen.add(plan.lanes);
          assert.ok(maxChunks > 1, 'the case should split contexts into several chunks');
          assert.ok(err <= bar, `${JSON.stringify(shape)} ${name} ${JSON.stringify(plan)} chunk ${chunkSize}: relative error ${err} > ${bar}`);
        }
      }
    }
    assert.ok(lanesSeen.has(1), 'some case should read whole rows per thread');
  });
}

test('gqa attention f16 at Qwen2.5-7B head shape (28 q / 4 kv, d 128): full 512-token chunks and short ones', async () => {
  const shape = { nHeads: 28, nKvHeads: 4, headDim: 128 };
  for (const chunkSize of [512, 64]) {
    const { err, maxChunks, plan } = await runCase({ shape, dtype: 'f16', blockSize: 16, seqs: [[700, 1], [0, 3], [130, 1]], chunkSize });
    assert.ok(maxChunks >= 2, 'the 700-token context should span two chunks');
    assert.equal(plan.piece, 8, '128-wide f16 rows load in 16-byte pieces');
    assert.ok(err <= 1e-2, `chunk ${chunkSize} ${JSON.stringify(plan)}: relative error ${err}`);
  }
});

test('gqa attention: long context (300 tokens) with the default chunk policy, block size 16', async () => {
  const { err } = await runCase({ shape: { nHeads: 8, nKvHeads: 4, headDim: 8 }, dtype: 'f32', blockSize: 16, seqs: [[299, 1], [250, 9], [3, 2]] });
  assert.ok(err <= 1e-4, `relative error ${err}`);
});

test('gqa attention: more than 256 split chunks in a row (the merge stages chunk weights 256 at a time), head dim past the merge workgroup (160)', async () => {
  // 4,200 tokens in chunks of 16: 263 chunks for the decode row; head dim 160 = one full and one partial pass of 128.
  const { err, maxChunks } = await runCase({ shape: { nHeads: 2, nKvHeads: 1, headDim: 160 }, dtype: 'f32', blockSize: 16, seqs: [[4199, 1], [40, 2]], chunkSize: 16 });
  assert.ok(maxChunks > 256, `only ${maxChunks} chunks`);
  assert.ok(err <= 1e-4, `relative error ${err}`);
});

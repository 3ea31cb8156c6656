// Row-wise kernels (embedding gather, RMSNorm incl. logit-row gather, SiLU·mul, RoPE both layouts) vs the float64 reference.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { type GpuContext } from '../kernels/device.ts';
import { EmbeddingGather, RmsNorm, Rope, ropeTable, SiluMul } from '../kernels/elementwise.ts';
import { buildStepMeta, type StepSeqInput } from '../kernels/step-meta.ts';
import { pad8, poisonBuffer, readF32, storageBuffer, uploadArray, uploadMatrix } from '../kernels/tensors.ts';
import { rmsnorm, rope, silu } from '../model/reference/ops.ts';
import { fileGpu, freshSeed, randomArray, relError, strided, unstride } from './kernels-helpers.ts';

const gpu = fileGpu();

/** Three sequences: a prefill chunk after a prefix, a decode token, a fresh prompt; logits for some rows. */
function stepOf(vocab: number, seed: number): StepSeqInput[] {
  const toks = (n: number, s: number) => Array.from(randomArray(n, s), (u) => Math.floor(((u + 1) / 2) * vocab) % vocab);
  return [
    { tokens: toks(7, seed), startPos: 21, blockTable: [0, 1, 2, 3, 4, 5, 6], logits: 'all' },
    { tokens: toks(1, seed + 1), startPos: 130, blockTable: Array.from({ length: 40 }, (_, i) => i), logits: 'last' },
    { tokens: toks(5, seed + 2), startPos: 0, blockTable: [9, 8], logits: 'last' },
  ];
}
const metaOpts = { blockSize: 4, numBlocks: 64, nKvHeads: 1, maxChunkSize: 512 };

async function submit(g: GpuContext, encode: (pass: GPUComputePassEncoder) => void): Promise<void> {
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  encode(pass);
  pass.end();
  g.device.queue.submit([enc.finish()]);
  await g.device.queue.onSubmittedWorkDone();
  g.checkErrors();
}

test('embedding gather: f32 and f16 tables, split into pieces, token ids from the step metadata', async () => {
  const g = await gpu();
  const seed = freshSeed();
  for (const dtype of ['f32', 'f16'] as const) {
    const vocab = 53;
    const dim = 22;
    const table = randomArray(vocab * dim, seed + 5);
    const gm = uploadMatrix(g, 'embed', table, vocab, dim, dtype, 10 * pad8(dim) * (dtype === 'f16' ? 2 : 4));
    assert.ok(gm.pieces.length > 1);
    const m = buildStepMeta(stepOf(vocab, seed), metaOpts);
    const meta = uploadArray(g, 'meta', m.data);
    const xStride = pad8(dim);
    const x = storageBuffer(g, 'x', m.nRows * xStride * 4);
    poisonBuffer(g, x);
    const op = new EmbeddingGather(g, gm, { meta, x, xStride });
    await submit(g, (p) => op.encode(p, m.nRows));
    const got = unstride(await readF32(g, x, m.nRows * xStride), m.nRows, dim, xStride);
    const tokens = Array.from(m.data.subarray(m.data[5], m.data[5] + m.nRows));
    const want = new Float64Array(m.nRows * dim);
    tokens.forEach((t, r) => want.set(table.subarray(t * dim, (t + 1) * dim), r * dim));
    const err = relError(got, want);
    assert.ok(err <= (dtype === 'f32' ? 0 : 1e-3), `${dtype}: relative error ${err}`);
    for (const b of [meta, x, ...gm.pieces.map((p) => p.buffer)]) b.destroy();
  }
});

test('rmsnorm over all rows and over the logit rows only (gather), odd dims', async () => {
  const g = await gpu();
  const seed = freshSeed();
  for (const dim of [64, 173, 7, 1540, 601]) {
    for (const gather of [false, true]) {
      const m = buildStepMeta(stepOf(10, seed), metaOpts);
      const stride = pad8(dim);
      const xs = randomArray(m.nRows * dim, seed + dim, 3);
      const w = randomArray(dim, seed + 1);
      const meta = uploadArray(g, 'meta', m.data);
      const x = uploadArray(g, 'x', strided(xs, m.nRows, dim, stride));
      const wb = uploadArray(g, 'w', w);
      const out = storageBuffer(g, 'out', m.nRows * stride * 4);
      poisonBuffer(g, out);
      const op = new RmsNorm(g, { meta, x, xStride: stride, weight: wb, out, outStride: stride }, dim, 1e-5, gather);
      const rows = gather ? m.nLogitRows : m.nRows;
      await submit(g, (p) => op.encode(p, rows));
      const got = unstride(await readF32(g, out, rows * stride), rows, dim, stride);
      const want = new Float64Array(rows * dim);
      const logitRows = Array.from(m.data.subarray(m.data[9], m.data[9] + m.nLogitRows));
      for (let i = 0; i < rows; i++) {
        const src = gather ? logitRows[i] : i;
        want.set(rmsnorm(xs.subarray(src * dim, (src + 1) * dim), w, 1e-5), i * dim);
      }
      const err = relError(got, want);
      assert.ok(err <= 1e-5, `dim ${dim} gather ${gather}: relative error ${err}`);
      for (const b of [meta, x, wb, out]) b.destroy();
    }
  }
});

test('silu·mul of a fused gate/up output', async () => {
  const g = await gpu();
  const seed = freshSeed();
  const hidden = 43;
  const m = buildStepMeta(stepOf(10, seed), metaOpts);
  const guStride = pad8(2 * hidden);
  const hStride = pad8(hidden);
  const gu = randomArray(m.nRows * 2 * hidden, seed, 6);
  const meta = uploadArray(g, 'meta', m.data);
  const guBuf = uploadArray(g, 'gu', strided(gu, m.nRows, 2 * hidden, guStride));
  const out = storageBuffer(g, 'h', m.nRows * hStride * 4);
  poisonBuffer(g, out);
  const op = new SiluMul(g, { meta, gateUp: guBuf, gateUpStride: guStride, out, outStride: hStride }, hidden);
  await submit(g, (p) => op.encode(p, m.nRows));
  const got = unstride(await readF32(g, out, m.nRows * hStride), m.nRows, hidden, hStride);
  const want = new Float64Array(m.nRows * hidden);
  for (let r = 0; r < m.nRows; r++) {
    for (let i = 0; i < hidden; i++) want[r * hidden + i] = silu(gu[r * 2 * hidden + i]) * gu[r * 2 * hidden + hidden + i];
  }
  const err = relError(got, want);
  assert.ok(err <= 1e-5, `relative error ${err}`);
  for (const b of [meta, guBuf, out]) b.destroy();
});

test('rope: interleaved and rotate_half, per-row positions, heads at an offset, partial rotary part', async () => {
  const g = await gpu();
  const seed = freshSeed();
  for (const layout of ['interleaved', 'rotate_half'] as const) {
    for (const { nHeads, headStride, ropeOffset, dims, colOffset } of [
      { nHeads: 6, headStride: 8, ropeOffset: 0, dims: 8, colOffset: 0 },
      { nHeads: 3, headStride: 12, ropeOffset: 4, dims: 8, colOffset: 5 },
    ]) {
      const m = buildStepMeta(stepOf(10, seed), metaOpts);
      const cols = colOffset + nHeads * headStride + 3;
      const stride = pad8(cols);
      const xs = randomArray(m.nRows * cols, seed + nHeads);
      const meta = uploadArray(g, 'meta', m.data);
      const x = uploadArray(g, 'x', strided(xs, m.nRows, cols, stride));
      const table = ropeTable(g, dims, 10000, 512);
      const op = new Rope(g, { meta, table, x, xStride: stride }, { nHeads, colOffset, headStride, ropeOffset, dims, layout });
      await submit(g, (p) => op.encode(p, m.nRows));
      const got = unstride(await readF32(g, x, m.nRows * stride), m.nRows, cols, stride);
      const want = Float64Array.from(xs);
      for (let r = 0; r < m.nRows; r++) {
        for (let h = 0; h < nHeads; h++) rope(want, r * cols + colOffset + h * headStride + ropeOffset, dims, m.rowPos[r], 10000, layout);
      }
      const err = relError(got, want);
      assert.ok(err <= 1e-5, `${layout} heads ${nHeads}: relative error ${err}`);
      for (const b of [meta, x, table]) b.destroy();
    }
  }
});

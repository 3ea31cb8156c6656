// The MLA decode back (kernels/mla-back.ts) vs float64 on fresh random inputs: each (row, head)'s split-K partials
// [m, l, o] merged (weights e^{m_c − max m}) and multiplied by the head's W_UV, for rows whose contexts span 1 to 11
// chunks; odd shapes, f32 and f16 weights, row groups of 1 to 8 with a partial last one; a NaN in one chunk's o
// reaching only its own (row, head)'s outputs. (The back inside whole models: test/mla-front.test.ts.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backGrid, mlaBackWgsl } from '../kernels/mla-back.ts';
import type { FrontRowsPerWorkgroup } from '../kernels/mla-front.ts';
import { fusedHeadWeights } from '../kernels/mla-head-fused.ts';
import { uploadHeadMatrices } from '../kernels/mla-head-matmul.ts';
import { buildStepMeta } from '../kernels/step-meta.ts';
import { bindBuffers, destroyMatrix, poisonBuffer, readF32, roundToF16, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { fileGpu, freshSeed, randomArray, shuffledPaging } from './kernels-helpers.ts';

const gpu = fileGpu();

interface Case {
  nHeads: number;
  /** Merged width (kv_lora_rank) and W_UV's outputs (v_head_dim). */
  width: number;
  N: number;
  /** Per sequence: [cached tokens, step rows]. */
  seqs: Array<[number, number]>;
  chunkSize: number;
  dtype: 'f32' | 'f16';
  group: FrontRowsPerWorkgroup;
  /** (row, head, chunk) whose o[1] is NaN. */
  nanAt?: [number, number, number];
}

async function runCase(c: Case, seed: number, where: string): Promise<void> {
  const g = await gpu();
  const { nHeads: H, width: W, N } = c;
  const P = W + 2;
  const paging = shuffledPaging(c.seqs, 4, seed);
  const meta = buildStepMeta(paging.freshStep, { blockSize: 4, numBlocks: paging.totalBlocks, nKvHeads: 1, maxChunkSize: 256, chunkSize: c.chunkSize });
  assert.equal(meta.chunkSize, c.chunkSize);
  const rows = meta.nRows;
  const positions = c.seqs.flatMap(([k, n]) => Array.from({ length: n }, (_, t) => k + t));
  const nChunks = positions.map((p) => Math.floor((p + c.chunkSize) / c.chunkSize));
  const maxChunks = meta.maxChunks;
  assert.equal(maxChunks, Math.max(...nChunks));
  // Partials: m spread over ±4 (weights e^{m − max} from ~1e-4 to 1), l positive, o of either sign; unused chunk
  // slots NaN (a merge that reads past a row's chunks shows).
  const partials = new Float32Array(rows * H * maxChunks * P).fill(NaN);
  const rnd = randomArray(partials.length, seed + 5);
  for (let row = 0; row < rows; row++) {
    for (let h = 0; h < H; h++) {
      for (let ch = 0; ch < nChunks[row]; ch++) {
        const b = ((row * H + h) * maxChunks + ch) * P;
        partials[b] = 4 * rnd[b];
        partials[b + 1] = 1 + Math.abs(rnd[b + 1]) * 3;
        for (let k = 0; k < W; k++) partials[b + 2 + k] = rnd[b + 2 + k];
      }
    }
  }
  if (c.nanAt) partials[((c.nanAt[0] * H + c.nanAt[1]) * maxChunks + c.nanAt[2]) * P + 3] = NaN;
  let w = randomArray(H * W * N, seed + 1, 0.5);
  if (c.dtype === 'f16') w = roundToF16(w);
  const weight = uploadHeadMatrices(g, 'W_UV', H, W, N, c.dtype, (h, k, n) => w[(h * W + k) * N + n]);
  const metaBuf = storageBuffer(g, 'meta', meta.data.byteLength);
  g.device.queue.writeBuffer(metaBuf, 0, meta.data);
  const partBuf = uploadArray(g, 'partials', partials);
  const outHeadStride = N + 1;
  const outStride = H * outHeadStride + 3;
  const out = storageBuffer(g, 'out', rows * outStride * 4);
  poisonBuffer(g, out);
  const spec = { nHeads: H, width: W, w: fusedHeadWeights(weight, H), outStride, outHeadStride, rowsPerWorkgroup: c.group };
  const pipe = g.pipeline(`test back ${where}`, mlaBackWgsl(spec));
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(pipe);
  pass.setBindGroup(0, bindBuffers(g, pipe, 'back', [metaBuf, partBuf, weight.pieces[0].buffer, out]));
  pass.dispatchWorkgroups(...backGrid(spec, rows));
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const got = await readF32(g, out, rows * outStride);
  g.checkErrors();
  destroyMatrix(weight);
  for (const b of [metaBuf, partBuf, out]) b.destroy();

  for (let row = 0; row < rows; row++) {
    for (let h = 0; h < H; h++) {
      const at = (n: number) => got[row * outStride + h * outHeadStride + n];
      const hat = `${where}: row ${row} (${nChunks[row]} chunks) head ${h}`;
      if (c.nanAt && c.nanAt[0] === row && c.nanAt[1] === h) {
        for (let n = 0; n < N; n++) assert.ok(Number.isNaN(at(n)), `${hat}: a NaN partial; output ${n} is ${at(n)}`);
        continue;
      }
      // float64: the merge, then W_UV.
      const base = (ch: number) => ((row * H + h) * maxChunks + ch) * P;
      let mMax = -Infinity;
      for (let ch = 0; ch < nChunks[row]; ch++) mMax = Math.max(mMax, partials[base(ch)]);
      let l = 0;
      const o = new Float64Array(W);
      for (let ch = 0; ch < nChunks[row]; ch++) {
        const e = Math.exp(partials[base(ch)] - mMax);
        l += e * partials[base(ch) + 1];
        for (let k = 0; k < W; k++) o[k] += e * partials[base(ch) + 2 + k];
      }
      let maxRef = 0;
      let maxDiff = 0;
      for (let n = 0; n < N; n++) {
        let want = 0;
        for (let k = 0; k < W; k++) want += w[(h * W + k) * N + n] * (o[k] / l);
        assert.ok(Number.isFinite(at(n)), `${hat}: output ${n} is ${at(n)}`);
        maxRef = Math.max(maxRef, Math.abs(want));
        maxDiff = Math.max(maxDiff, Math.abs(at(n) - want));
      }
      // f32 sums of up to 11 chunks and 512 products: a few ulp of the largest terms.
      assert.ok(maxDiff <= 1e-5 * maxRef, `${hat}: max |Δ| ${maxDiff} against max |y| ${maxRef}`);
    }
  }
}

test('MLA decode back vs float64: the split-K merge and W_UV of rows over 1 to 11 chunks; odd dims, f32 and f16 W_UV, row groups of 1 to 8 (a partial last one), the Qwen2.5-7B shape, a NaN reaching only its own (row, head)', async () => {
  const cases: Case[] = [
    { nHeads: 3, width: 20, N: 6, seqs: [[3, 1], [0, 2], [9, 2]], chunkSize: 4, dtype: 'f32', group: 2 },
    { nHeads: 5, width: 16, N: 10, seqs: [[5, 1], [1, 1]], chunkSize: 2, dtype: 'f16', group: 1 },
    { nHeads: 4, width: 42, N: 13, seqs: [[2, 3], [17, 1], [0, 1]], chunkSize: 4, dtype: 'f16', group: 4, nanAt: [1, 2, 0] },
    { nHeads: 28, width: 512, N: 128, seqs: [[40, 1], [7, 1], [30, 3], [0, 1], [12, 1], [3, 2]], chunkSize: 4, dtype: 'f16', group: 8, nanAt: [2, 5, 3] },
  ];
  for (const c of cases) {
    const seed = freshSeed();
    await runCase(c, seed, `${JSON.stringify(c)} seed ${seed}`);
  }
});

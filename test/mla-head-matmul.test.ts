// Per-head batched matmul (MLA absorption and W_UV) vs float64: the staged decode kernel (the default below 128 rows),
// the sliced one across its rows-per-workgroup variants and k slices, and the tiled kernel (prefill-sized steps, and
// decode-sized ones in 16-, 32- and 64-row tiles), K below, at and past 32, odd N, pass-through columns, f32 and f16
// weights, NaN-poisoned outputs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { HEAD_MATMUL_TILED_MIN_ROWS, HeadMatmul, headTileRows, uploadHeadMatrices, type HeadDecodeKernel, type HeadMatmulSpec } from '../kernels/mla-head-matmul.ts';
import { buildStepMeta } from '../kernels/step-meta.ts';
import { destroyMatrix, poisonBuffer, readF32, roundToF16, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { fileGpu, freshSeed, randomArray, relError } from './kernels-helpers.ts';

const gpu = fileGpu();

async function runCase(
  nHeads: number,
  K: number,
  N: number,
  passCols: number,
  rows: number,
  dtype: 'f32' | 'f16',
  tiledMinRows?: number,
  kSlices?: 8 | 16 | 32,
  decodeKernel?: HeadDecodeKernel,
  aligned = false,
): Promise<number> {
  const g = await gpu();
  const seed = freshSeed();
  // Gaps between heads' inputs; `aligned`: every head's inputs start on 16 bytes, as the runner lays them out.
  const xHeadStride = aligned ? Math.ceil((K + passCols) / 4) * 4 + 4 : K + passCols + 3;
  const xStride = aligned ? nHeads * xHeadStride + 8 : nHeads * xHeadStride + 5;
  const xOffset = aligned ? 4 : 1;
  const yHeadStride = N + passCols;
  const yStride = nHeads * yHeadStride + 2;
  const spec: HeadMatmulSpec = { nHeads, K, N, xStride, xOffset, xHeadStride, yStride, yOffset: 2, yHeadStride, scale: 0.37, passCols };
  let wData = randomArray(nHeads * K * N, seed);
  if (dtype === 'f16') wData = roundToF16(wData);
  const weight = uploadHeadMatrices(g, 'w', nHeads, K, N, dtype, (h, k, n) => wData[(h * K + k) * N + n]);
  const xData = randomArray(rows * xStride, seed + 1);
  const x = uploadArray(g, 'x', xData);
  const y = storageBuffer(g, 'y', rows * yStride * 4);
  const meta = uploadArray(g, 'meta', buildStepMeta([{ tokens: new Array(rows).fill(0), startPos: 0, blockTable: [0], logits: 'none' }], { blockSize: 4096, numBlocks: 1, nKvHeads: 1, maxChunkSize: 16 }).data);
  const op = new HeadMatmul(g, spec, weight, { meta, x, y }, {
    ...(tiledMinRows === undefined ? {} : { tiledMinRows }),
    // k slices belong to the sliced kernel.
    ...(kSlices ? { kSlices, decodeKernel: 'sliced' as const } : {}),
    ...(decodeKernel ? { decodeKernel } : {}),
  });
  poisonBuffer(g, y);
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  op.encode(pass, rows);
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const got = await readF32(g, y, rows * yStride);
  const gotOut: number[] = [];
  const want: number[] = [];
  for (let r = 0; r < rows; r++) {
    for (let h = 0; h < nHeads; h++) {
      const xb = r * xStride + xOffset + h * xHeadStride;
      const yb = r * yStride + 2 + h * yHeadStride;
      for (let n = 0; n < N; n++) {
        let acc = 0;
        for (let k = 0; k < K; k++) acc += wData[(h * K + k) * N + n] * xData[xb + k];
        want.push(acc * 0.37);
        gotOut.push(got[yb + n]);
      }
      for (let i = 0; i < passCols; i++) {
        want.push(xData[xb + K + i] * 0.37);
        gotOut.push(got[yb + N + i]);
      }
    }
  }
  destroyMatrix(weight);
  for (const b of [x, y, meta]) b.destroy();
  return relError(gotOut, want);
}

test('head matmul: absorption and W_UV shapes, the staged decode kernel, the sliced one at every rows-per-thread variant and 8/16/32 k slices, the tiled kernel, f32 and f16 weights', async () => {
  for (const dtype of ['f32', 'f16'] as const) {
    for (const [nHeads, K, N, passCols] of [
      [3, 16, 24, 4], // absorption: K = nope dims, N = R, q_pe passed through
      [2, 128, 40, 6], // 4 k a slice, N past 32 but not a whole 64-output workgroup
      [2, 512, 7, 0], // W_UV: K = R (16 k a slice), odd N
      [3, 128, 512, 64], // Qwen2.5-7B's absorption shape: 8 column groups of 8 per workgroup, whole
      [2, 512, 128, 0], // and its W_UV shape
      [2, 33, 9, 1], // K one past the 32 slices (slice 0 takes a second k), N one past a column group
      [2, 20, 71, 3], // K not a whole number of the tiled kernel's 16-k steps, N past one 64-wide tile
    ] as const) {
      // 128 and 200 rows: the tiled kernel (a partial 64-row tile at 200).
      for (const rows of [1, 3, 8, 13, HEAD_MATMUL_TILED_MIN_ROWS, 200]) {
        const err = await runCase(nHeads, K, N, passCols, rows, dtype);
        assert.ok(err <= 1e-5, `${dtype} heads ${nHeads} K ${K} N ${N} pass ${passCols} rows ${rows}: relative error ${err}`);
      }
      // The sliced decode kernel with 8, 16 and 32 k slices (64 / 128 / 256 threads), on f16 weights (what the server
      // uploads) at the shapes that take every k slice or leave some empty (each variant is a pipeline SwiftShader
      // compiles in seconds); the rows above ran the default, staged kernel.
      const slicesCase = dtype === 'f16' && ((K === 512 && N === 128) || (K === 128 && N === 512) || K === 33);
      for (const kSlices of slicesCase ? ([8, 16, 32] as const) : []) {
        for (const rows of [1, 2, 3, 13]) {
          const err = await runCase(nHeads, K, N, passCols, rows, dtype, undefined, kSlices);
          assert.ok(err <= 1e-5, `${dtype} heads ${nHeads} K ${K} N ${N} pass ${passCols} rows ${rows}, ${kSlices} k slices: relative error ${err}`);
        }
      }
      // The tiled kernel for decode-sized steps too (tiledMinRows 1): 16-, 32- and 64-row tiles, partial ones.
      for (const rows of [1, 13, 17, 40, 64]) {
        assert.equal(headTileRows(rows), rows <= 16 ? 16 : rows < 48 ? 32 : 64);
        const err = await runCase(nHeads, K, N, passCols, rows, dtype, 1);
        assert.ok(err <= 1e-5, `${dtype} heads ${nHeads} K ${K} N ${N} pass ${passCols} rows ${rows}, tiled ${headTileRows(rows)}: relative error ${err}`);
      }
    }
  }
});

test('head matmul, the staged decode kernel: absorption and W_UV shapes, 8-, 16- and 32-row workgroups (partial ones, steps past 32 rows), K in several chunks and not a multiple of 4, odd N, pass-through columns, aligned inputs read as vec4, f32 weights', async () => {
  for (const [nHeads, K, N, passCols, dtype] of [
    [3, 128, 512, 64, 'f16'], // Qwen2.5-7B's absorption: 64 outputs a workgroup, K in one chunk
    [2, 512, 128, 0, 'f16'], // its W_UV: 16 outputs a workgroup, K in four 128-k chunks over 4 to 8 k groups
    [2, 33, 9, 1, 'f16'], // K past a whole quad, N past a quad
    [3, 20, 71, 3, 'f32'], // f32 weights, N past one 64-output tile
    [2, 300, 40, 2, 'f32'], // f32 weights in 64-k chunks, the last partial
  ] as const) {
    for (const aligned of [false, true]) {
      for (const rows of [1, 7, 16, 17, 32, 45]) {
        const err = await runCase(nHeads, K, N, passCols, rows, dtype, undefined, undefined, 'staged', aligned);
        assert.ok(err <= 1e-5, `staged ${dtype} heads ${nHeads} K ${K} N ${N} pass ${passCols} rows ${rows}${aligned ? ' aligned' : ''}: relative error ${err}`);
      }
    }
  }
});

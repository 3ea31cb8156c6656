// The W8A8 MLA head products (kernels/mla-head-w8a8.ts) vs float64 on fresh random inputs: every output within the
// bound of its quantization steps, NaN inputs reaching exactly their (row, head), pass-through columns exact, and —
// where the adapter has i8 subgroup matrices — the tensor-core form equal to the dot4 one (the same i32 sums).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { HeadMatmul, uploadHeadMatrices, W8A8_HEAD_MAX_ROWS, type HeadMatmulSpec } from '../kernels/mla-head-matmul.ts';
import { HeadW8a8 } from '../kernels/mla-head-w8a8.ts';
import { hasInt8SubgroupMatrix } from '../kernels/matmul-int8.ts';
import { buildStepMeta } from '../kernels/step-meta.ts';
import { destroyMatrix, poisonBuffer, readF32, roundToF16, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { fileGpu, freshSeed, randomArray } from './kernels-helpers.ts';

const gpu = fileGpu();

interface Case {
  nHeads: number;
  K: number;
  N: number;
  passCols: number;
  rows: number;
  dtype: 'f32' | 'f16';
  /** Rows × heads whose first input is NaN. */
  nanAt?: Array<[row: number, head: number]>;
}

/** Runs one W8A8 step (tensor cores or dot4, or through HeadMatmul's 'w8a8' decode kernel) and returns y with its inputs. */
async function run(c: Case, seed: number, form: 'dot4' | 'tensor-cores' | 'head-matmul' | 'head-matmul-prefill') {
  const g = await gpu();
  const { nHeads, K, N, passCols, rows } = c;
  const xHeadStride = K + passCols + 3;
  const xStride = nHeads * xHeadStride + 5;
  const yHeadStride = N + passCols;
  const yStride = nHeads * yHeadStride + 2;
  const spec: HeadMatmulSpec = { nHeads, K, N, xStride, xOffset: 1, xHeadStride, yStride, yOffset: 2, yHeadStride, scale: 0.37, passCols };
  let w = randomArray(nHeads * K * N, seed);
  if (c.dtype === 'f16') w = roundToF16(w);
  const weight = uploadHeadMatrices(g, 'w', nHeads, K, N, c.dtype, (h, k, n) => w[(h * K + k) * N + n]);
  const x = randomArray(rows * xStride, seed + 1, 3);
  for (const [r, h] of c.nanAt ?? []) x[r * xStride + 1 + h * xHeadStride] = NaN;
  const xBuf = uploadArray(g, 'x', x);
  const y = storageBuffer(g, 'y', rows * yStride * 4);
  const meta = uploadArray(g, 'meta', buildStepMeta([{ tokens: new Array(rows).fill(0), startPos: 0, blockTable: [0], logits: 'none' }], { blockSize: 4096, numBlocks: 1, nKvHeads: 1, maxChunkSize: 16 }).data);
  const b = { meta, x: xBuf, y };
  const op =
    form === 'head-matmul'
      ? new HeadMatmul(g, spec, weight, b, { decodeKernel: 'w8a8' })
      : form === 'head-matmul-prefill'
        ? new HeadMatmul(g, spec, weight, b, { prefillKernel: 'w8a8', tiledMinRows: 64 })
        : new HeadW8a8(g, spec, weight, b, W8A8_HEAD_MAX_ROWS, form === 'tensor-cores');
  poisonBuffer(g, y);
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  op.encode(pass, rows);
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const got = await readF32(g, y, rows * yStride);
  destroyMatrix(weight);
  for (const buf of [xBuf, y, meta]) buf.destroy();
  return { got, w, x, spec };
}

/**
 * Checks every output against float64: |y − scale·Σ w·x| ≤ scale·(½sx·Σ|w| + ½sw·Σ|x| + ¼K·sx·sw)·(1 + 1e-5) + 1e-6·scale·Σ|w·x|,
 * with sx = max|x| / 127 of the (row, head) and sw = max|w[·, n]| / 127 of the column: rounding each int8 value moves
 * it by at most half a step, so x̃w̃ − xw = x(w̃ − w) + w(x̃ − x) + (x̃ − x)(w̃ − w) summed over K; the last term covers
 * the f32 scaling. Outputs of a (row, head) with a NaN input must be NaN, all others finite; pass-through columns exact
 * to f32 rounding.
 */
function check(c: Case, r: Awaited<ReturnType<typeof run>>, where: string): void {
  const { nHeads: H, K, N, passCols } = c;
  const { got, w, x, spec } = r;
  const nan = new Set((c.nanAt ?? []).map(([row, h]) => `${row},${h}`));
  const colMax = new Float64Array(H * N);
  for (let h = 0; h < H; h++) for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) colMax[h * N + n] = Math.max(colMax[h * N + n], Math.abs(w[(h * K + k) * N + n]));
  let worst = 0;
  // Σ err² against Σ of each output's predicted rounding variance (each int8 value off by a uniform ±½ step:
  // Var = scale²·Σ_k (x_k²·sw² + w_k²·sx²) / 12): a bias such as a scale off by 1 % shows here long before the bound.
  let errSq = 0;
  let predSq = 0;
  let outputs = 0;
  for (let row = 0; row < c.rows; row++) {
    for (let h = 0; h < H; h++) {
      const xb = row * spec.xStride + spec.xOffset + h * spec.xHeadStride;
      const yb = row * spec.yStride + spec.yOffset + h * spec.yHeadStride;
      if (nan.has(`${row},${h}`)) {
        for (let n = 0; n < N; n++) assert.ok(Number.isNaN(got[yb + n]), `${where}: row ${row} head ${h} output ${n} is ${got[yb + n]}, not NaN (its input is)`);
        continue;
      }
      let xMax = 0;
      let xAbs = 0;
      for (let k = 0; k < K; k++) {
        xMax = Math.max(xMax, Math.abs(x[xb + k]));
        xAbs += Math.abs(x[xb + k]);
      }
      const sx = xMax / 127;
      for (let n = 0; n < N; n++) {
        const sw = colMax[h * N + n] / 127;
        let exact = 0;
        let wAbs = 0;
        let prodAbs = 0;
        let variance = 0;
        for (let k = 0; k < K; k++) {
          const wk = w[(h * K + k) * N + n];
          exact += wk * x[xb + k];
          wAbs += Math.abs(wk);
          prodAbs += Math.abs(wk * x[xb + k]);
          variance += (x[xb + k] ** 2 * sw ** 2 + wk ** 2 * sx ** 2) / 12;
        }
        const bound = 0.37 * ((sx / 2) * wAbs + (sw / 2) * xAbs + (K * sx * sw) / 4) * (1 + 1e-5) + 1e-6 * 0.37 * prodAbs;
        const err = Math.abs(got[yb + n] - 0.37 * exact);
        assert.ok(Number.isFinite(got[yb + n]) && err <= bound, `${where}: row ${row} head ${h} output ${n}: ${got[yb + n]} against ${0.37 * exact}, error ${err} past the quantization bound ${bound}`);
        worst = Math.max(worst, err / bound);
        errSq += err ** 2;
        predSq += 0.37 ** 2 * variance;
        outputs++;
      }
      for (let i = 0; i < passCols; i++) {
        const want = x[xb + K + i] * 0.37;
        assert.ok(Math.abs(got[yb + N + i] - want) <= 1e-6 * Math.abs(want), `${where}: pass-through ${i} of row ${row} head ${h}: ${got[yb + N + i]} against ${want}`);
      }
    }
  }
  // The bound is loose by design (every rounding at its worst); the typical error sits well inside it.
  assert.ok(worst > 0 && worst < 1, `${where}: worst error / bound ${worst}`);
  if (outputs >= 500) {
    const ratio = Math.sqrt(errSq / predSq);
    assert.ok(ratio > 0.7 && ratio < 1.3, `${where}: rms error ${ratio.toFixed(3)}× the rms rounding error predicted from the quantization steps (${outputs} outputs)`);
  }
}

const CASES: Case[] = [
  { nHeads: 3, K: 128, N: 512, passCols: 64, rows: 7, dtype: 'f16' }, // Qwen2.5-7B's absorption: 4 K steps, 32 output tiles, q_pe passed through
  { nHeads: 2, K: 512, N: 128, passCols: 0, rows: 17, dtype: 'f16' }, // its W_UV: 16 K steps; a partial second row tile
  { nHeads: 2, K: 33, N: 9, passCols: 1, rows: 1, dtype: 'f32' }, // K past one K step, N inside one tile, one row
  { nHeads: 3, K: 20, N: 71, passCols: 3, rows: 45, dtype: 'f32', nanAt: [[4, 1], [44, 2]] }, // odd N, three row tiles, NaN inputs
];

test('W8A8 head products (dot4 form) vs float64: within the bound of the quantization steps, K and N not whole tiles, partial row tiles, pass-through columns, NaN inputs reach exactly their (row, head)', async () => {
  for (const c of CASES) {
    const seed = freshSeed();
    check(c, await run(c, seed, 'dot4'), `dot4 ${JSON.stringify(c)} seed ${seed}`);
  }
});

test("head matmul 'w8a8' decode kernel: steps up to W8A8_HEAD_MAX_ROWS take the W8A8 products (within their bound), larger ones the staged f32 kernel", async () => {
  const seed = freshSeed();
  const c: Case = { nHeads: 2, K: 40, N: 24, passCols: 2, rows: 9, dtype: 'f16' };
  check(c, await run(c, seed, 'head-matmul'), `head-matmul w8a8 seed ${seed}`);
  // Past the W8A8 rows the step runs the staged kernel: f32 products, far inside the int8 bound.
  const big: Case = { ...c, rows: W8A8_HEAD_MAX_ROWS + 3 };
  const r = await run(big, seed, 'head-matmul');
  const { spec } = r;
  let maxDiff = 0;
  let maxRef = 0;
  for (let row = 0; row < big.rows; row++) {
    for (let h = 0; h < big.nHeads; h++) {
      for (let n = 0; n < big.N; n++) {
        let exact = 0;
        for (let k = 0; k < big.K; k++) exact += r.w[(h * big.K + k) * big.N + n] * r.x[row * spec.xStride + spec.xOffset + h * spec.xHeadStride + k];
        maxDiff = Math.max(maxDiff, Math.abs(r.got[row * spec.yStride + spec.yOffset + h * spec.yHeadStride + n] - 0.37 * exact));
        maxRef = Math.max(maxRef, Math.abs(0.37 * exact));
      }
    }
  }
  assert.ok(maxDiff / maxRef < 1e-5, `${big.rows} rows: relative error ${maxDiff / maxRef}, not the f32 kernel's`);
});

test("head matmul 'w8a8' prefill kernel: a step past W8A8_HEAD_MAX_ROWS and tiledMinRows takes the W8A8 products, within their bound", async () => {
  const seed = freshSeed();
  const c: Case = { nHeads: 2, K: 40, N: 24, passCols: 2, rows: W8A8_HEAD_MAX_ROWS + 72, dtype: 'f16', nanAt: [[150, 1]] };
  check(c, await run(c, seed, 'head-matmul-prefill'), `head-matmul w8a8 prefill seed ${seed}`);
});

test('W8A8 head products on tensor cores: the same outputs as the dot4 form, bit for bit (where the adapter has i8 subgroup matrices)', async (t) => {
  const g = await gpu();
  if (!(hasInt8SubgroupMatrix(g) && g.subgroupSize === 32)) {
    t.skip('this adapter has no i8 subgroup matrices with 32-wide subgroups (SwiftShader); bench/device-run.sh tests runs it on the H100 / H200');
    return;
  }
  for (const c of CASES) {
    const seed = freshSeed();
    const tc = await run(c, seed, 'tensor-cores');
    check(c, tc, `tensor cores ${JSON.stringify(c)} seed ${seed}`);
    const d4 = await run(c, seed, 'dot4');
    for (let i = 0; i < tc.got.length; i++) {
      if (Number.isNaN(d4.got[i]) && Number.isNaN(tc.got[i])) continue;
      assert.equal(tc.got[i], d4.got[i], `tensor cores against dot4 ${JSON.stringify(c)} seed ${seed}: value ${i}`);
    }
  }
});

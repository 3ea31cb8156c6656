// Int8 weights: per-row quantization round trip, the weights-only int8 GEMV and the W8A8 path vs float64, within derived bounds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { destroyInt8Matrix, int8At, quantizeInt8Rows, tiledInt8Word, tileInt8Rows, uploadInt8Matrix } from '../kernels/int8.ts';
import { createQuantizedRows, hasInt8SubgroupMatrix, Int8MatmulOp, type Int8MatmulPath, type Int8MatmulTuning } from '../kernels/matmul-int8.ts';
import { RmsNorm, SiluMul } from '../kernels/elementwise.ts';
import { pad8, readF32, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { fileGpu, freshSeed, randomArray, runMatmulCase, strided } from './kernels-helpers.ts';
import { quantizedPart, uploadLinear, destroyLinear } from '../kernels/linear.ts';
import { readBack } from '../bench/gpu-timing.ts';
import type { Tensor } from '../model/weights.ts';

const gpu = fileGpu();

const U = 2 ** -24; // f32 unit roundoff

test('int8 quantization per row: |w − q·s| ≤ s/2, q in [-127, 127], max |q| = 127, zero rows and padding', () => {
  const seed = freshSeed();
  for (const [rows, cols] of [
    [37, 53],
    [5, 16],
    [3, 1],
    [64, 129],
  ] as const) {
    const w = randomArray(rows * cols, seed + cols, 0.7);
    w.fill(0, 0, cols); // an all-zero row → scale 0
    if (rows > 2) w[cols * 2 + (cols >> 1)] = 40; // one outlier dominates its row's scale
    const q = quantizeInt8Rows(w, rows, cols);
    assert.equal(q.stride % 16, 0);
    assert.equal(q.scales[0], 0, 'all-zero row has scale 0');
    for (let r = 0; r < rows; r++) {
      const s = q.scales[r];
      let maxQ = 0;
      for (let c = 0; c < cols; c++) {
        const v = int8At(q, r, c);
        assert.ok(v >= -127 && v <= 127, `q[${r},${c}] = ${v}`);
        maxQ = Math.max(maxQ, Math.abs(v));
        const err = Math.abs(w[r * cols + c] - v * s);
        assert.ok(err <= s / 2 + 1e-12, `seed ${seed} [${rows},${cols}] row ${r} col ${c}: |w − q·s| = ${err} > s/2 = ${s / 2}`);
      }
      if (r > 0) assert.equal(maxQ, 127, `row ${r}: the largest value maps to ±127`);
      for (let c = cols; c < q.stride; c++) assert.equal(int8At(q, r, c), 0, `padding [${r},${c}] is zero`);
    }
  }
  assert.throws(() => quantizeInt8Rows([1, NaN, 2, 3], 2, 2, 'wq'), /wq: value at \[0, 1\] is NaN/);
});

test('int8 GPU layout: every word of every row lands once in its 16 × 32 tile, rows padded to 16 with zeros', () => {
  const rows = 37;
  const stride = 96; // 3 K steps of 32
  const words = stride / 4;
  const packed = Uint32Array.from({ length: 48 * words }, (_, i) => (i < rows * words ? i + 1 : 0));
  const tiled = tileInt8Rows({ rows, stride, packed });
  assert.equal(tiled.length, 48 * words);
  const seen = new Set<number>();
  for (let r = 0; r < rows; r++) {
    for (let w = 0; w < words; w++) {
      const at = tiledInt8Word(rows, r, w);
      assert.equal(tiled[at], r * words + w + 1, `row ${r} word ${w}`);
      seen.add(at);
    }
  }
  // K-major: tile (row tile 1, K step 2) starts at word (2·3 + 1)·128 (3 row tiles) and holds row 16's words 16…23 first.
  assert.equal(tiled[(2 * 3 + 1) * 128], 16 * words + 16 + 1);
  for (let i = 0; i < tiled.length; i++) if (!seen.has(i)) assert.equal(tiled[i], 0, `padding word ${i}`);
});

test('int8 uploadLinear: parts quantized one by one and stacked = the stacked matrix quantized; shared parts once', async () => {
  const g = await gpu();
  const seed = freshSeed();
  const cols = 40;
  const parts: Tensor[] = [5, 7, 3].map((r, i) => ({ shape: [r, cols], data: randomArray(r * cols, seed + i, 0.5 + i) }));
  const stacked = new Float32Array(15 * cols);
  parts.forEach((t, i) => stacked.set(t.data, [0, 5, 12][i] * cols));
  const want = quantizeInt8Rows(stacked, 15, cols);
  const w = uploadLinear(g, 'qkv', parts, 15, cols, 'int8');
  assert.equal(w.dtype, 'int8');
  const tiled = tileInt8Rows(want);
  assert.deepEqual(new Uint32Array(await readBack(g, w.buffer, tiled.byteLength)), tiled, `seed ${seed}`);
  assert.deepEqual(new Float32Array(await readBack(g, (w as { scales: GPUBuffer }).scales, 60)), want.scales);
  destroyLinear(w);
  // A shared tensor keeps its quantization (one per object); an ordinary one is quantized afresh every time.
  const shared: Tensor = { ...parts[0], shared: true };
  assert.equal(quantizedPart(shared, 'a'), quantizedPart(shared, 'b'));
  assert.notEqual(quantizedPart(parts[0], 'a'), quantizedPart(parts[0], 'b'));
  assert.deepEqual(quantizedPart(shared, 'a').packed, quantizedPart(parts[0], 'a').packed);
});

interface Case {
  M: number;
  N: number;
  K: number;
  bias?: boolean;
  accumulate?: boolean;
  yOffset?: number;
  tuning?: Partial<Int8MatmulTuning>;
  /** Multiply the uploaded weight scales by this (a deliberately broken kernel input). */
  scaleFactor?: number;
}

interface Outcome {
  path: Int8MatmulPath;
  /** max over outputs of |got − exact| / bound (≤ 1 passes). */
  boundRatio: number;
  /** Largest |got − exact| and the bound at that output. */
  maxErr: number;
  /** Largest |got − exact| / max|exact|. */
  relErr: number;
  /** GEMV only: max |got − Σ x·(q·s)| / its f32 rounding bound (the kernel computes exactly the dequantized product). */
  dequantRatio: number;
}

/**
 * Runs one int8 matmul against the float64 product of the ORIGINAL (unquantized) weights and activations.
 * Bounds per output (row m, feature n), with s = the feature's scale and t = the row's activation scale:
 *   weights-only (GEMV):  |Σ x_k (w_k − q_k s)| ≤ s/2 · Σ|x_k|
 *   W8A8:                 x_k = p_k t + δ_k, w_k = q_k s + ε_k, |δ| ≤ t/2, |ε| ≤ s/2, so
 *                         |Σ x_k w_k − s t Σ p_k q_k| = |Σ (δ_k w_k + x_k ε_k − δ_k ε_k)| ≤ t/2 · Σ|w_k| + s/2 · Σ|x_k| + K · t s / 4
 * plus f32 rounding: the GEMV's f32 sum of K products costs at most (K + 8) u · Σ|x_k| (|w_k| + s/2); the W8A8 i32 sum
 * is exact and its conversion and two scale products cost 4 u · |result|; the activation scale 127/absmax computed in f32
 * moves p_k t by at most 256 u · t; bias and residual add 2 u · (|b| + |y0| + |result|).
 */
async function runCase(c: Case): Promise<Outcome> {
  const g = await gpu();
  let q = quantizeInt8Rows([0], 1, 1);
  const { w, x, b, y0, got, op } = await runMatmulCase(g, c, freshSeed(), (w, bindings) => {
    const weight = uploadInt8Matrix(g, 'test Wq', w, c.N, c.K);
    q = quantizeInt8Rows(w, c.N, c.K);
    if (c.scaleFactor !== undefined) g.device.queue.writeBuffer(weight.scales, 0, q.scales.map((s) => s * c.scaleFactor!));
    return { op: new Int8MatmulOp(g, weight, bindings, c.tuning), destroy: () => destroyInt8Matrix(weight) };
  });
  const path = op.path(c.M);

  let boundRatio = 0;
  let dequantRatio = 0;
  let maxErr = 0;
  let maxRef = 0;
  for (let m = 0; m < c.M; m++) {
    const xr = x.subarray(m * c.K, (m + 1) * c.K);
    let sumAbsX = 0;
    let absMax = 0;
    for (const v of xr) {
      sumAbsX += Math.abs(v);
      absMax = Math.max(absMax, Math.abs(v));
    }
    const t = Math.fround(absMax / 127);
    for (let n = 0; n < c.N; n++) {
      const s = q.scales[n];
      let exact = 0;
      let dequant = 0;
      let sumAbsW = 0;
      let sumAbsXW = 0;
      for (let k = 0; k < c.K; k++) {
        const wk = w[n * c.K + k];
        exact += xr[k] * wk;
        dequant += xr[k] * int8At(q, n, k) * s;
        sumAbsW += Math.abs(wk);
        sumAbsXW += Math.abs(xr[k] * wk);
      }
      const extra = (c.bias ? b[n] : 0) + (c.accumulate ? y0[m * c.N + n] : 0);
      const want = exact + extra;
      let bound: number;
      if (path === 'gemv') {
        bound = (s / 2) * sumAbsX + (c.K + 8) * U * (sumAbsXW + (s / 2) * sumAbsX);
      } else {
        bound = (t / 2 + 256 * U * t) * sumAbsW + (s / 2) * sumAbsX + (c.K * t * s) / 4 + 4 * U * (Math.abs(exact) + sumAbsXW);
      }
      bound += 2 * U * (Math.abs(b[n]) + Math.abs(y0[m * c.N + n]) + Math.abs(want));
      const gv = got[m * c.N + n];
      const err = Number.isFinite(gv) ? Math.abs(gv - want) : Infinity;
      boundRatio = Math.max(boundRatio, err / bound);
      if (path === 'gemv') {
        const roundBound = (c.K + 8) * U * (sumAbsXW + (s / 2) * sumAbsX) + 2 * U * (Math.abs(b[n]) + Math.abs(y0[m * c.N + n]) + Math.abs(want));
        dequantRatio = Math.max(dequantRatio, Number.isFinite(gv) ? Math.abs(gv - dequant - extra) / roundBound : Infinity);
      }
      maxErr = Math.max(maxErr, err);
      maxRef = Math.max(maxRef, Math.abs(want));
    }
  }
  return { path, boundRatio, maxErr, relErr: maxErr / maxRef, dequantRatio };
}

const report = (c: Case, o: Outcome) =>
  `${o.path} M=${c.M} N=${c.N} K=${c.K}${c.tuning ? ' ' + JSON.stringify(c.tuning) : ''}: max error ${o.maxErr.toExponential(3)} ` +
  `(${(o.relErr * 100).toFixed(3)} % of max |y|), ${(o.boundRatio * 100).toFixed(1)} % of the derived bound`;

test('int8 weights-only GEMV (1–8 rows) vs float64: within s/2·Σ|x| on odd shapes, NaN-poisoned outputs', async () => {
  for (const [M, N, K] of [
    [1, 37, 19],
    [1, 130, 64],
    [2, 67, 173],
    [3, 96, 300],
    [5, 41, 72],
    [8, 64, 129],
    [7, 33, 16],
  ] as const) {
    // Adapters with tensor cores send 3+ rows to them by default: pin the GEMV's row range.
    const c = { M, N, K, tuning: { gemvMaxRows: 8 } };
    const o = await runCase(c);
    assert.equal(o.path, 'gemv');
    assert.ok(o.boundRatio <= 1, report(c, o));
    assert.ok(o.dequantRatio <= 1, `${report(c, o)}; vs Σ x·q·s: ${o.dequantRatio} of the f32 rounding bound`);
    console.log(report(c, o));
  }
});

test('int8 W8A8 (> 8 rows) vs float64: within t/2·Σ|w| + s/2·Σ|x| + K·t·s/4 on odd shapes', async () => {
  for (const [M, N, K] of [
    [9, 70, 33],
    [17, 129, 90],
    [40, 65, 200],
    [67, 33, 47],
    [16, 64, 64],
    [260, 70, 90], // a prompt chunk past smWideFromRows with K ≤ 2·N: two column tiles a subgroup on tensor cores
    [300, 40, 130], // and with K > 2·N: one
  ] as const) {
    const c = { M, N, K };
    const o = await runCase(c);
    // The same integers on tensor cores where the adapter has them (the H200), dot4I8Packed elsewhere.
    assert.equal(o.path, hasInt8SubgroupMatrix(await gpu()) ? 'w8a8-sm' : 'w8a8');
    assert.ok(o.boundRatio <= 1, report(c, o));
    console.log(report(c, o));
  }
});

test('int8 matmuls: bias, fused residual add, column offset; W8A8 forced at few rows; other GEMV layouts', async () => {
  const cases: Case[] = [
    { M: 1, N: 45, K: 40, bias: true, accumulate: true, yOffset: 5 },
    { M: 4, N: 45, K: 77, bias: true, accumulate: true, yOffset: 3 },
    { M: 20, N: 45, K: 77, bias: true, accumulate: true, yOffset: 5 },
    { M: 1, N: 50, K: 100, bias: true, tuning: { gemvMaxRows: 0 } },
    { M: 3, N: 50, K: 33, accumulate: true, tuning: { gemvMaxRows: 0 } },
    { M: 3, N: 45, K: 77, bias: true, tuning: { gemvGroups: 1, gemvUnroll: 1 } },
    { M: 8, N: 45, K: 300, tuning: { gemvGroups: 8, gemvUnroll: 4 } },
    { M: 150, N: 45, K: 77, bias: true, tuning: { smRowTiles: 8 } }, // eight row tiles a tensor-core workgroup
    { M: 40, N: 45, K: 77, accumulate: true, tuning: { smRowTiles: 1, smColTiles: 2 } },
    { M: 2, N: 45, K: 77, accumulate: true, tuning: { gemvGroups: 3, gemvUnroll: 2 } },
  ];
  for (const c of cases) {
    const o = await runCase(c);
    assert.ok(o.boundRatio <= 1, report(c, o));
    assert.ok(o.dequantRatio <= 1, `${report(c, o)}; vs Σ x·q·s: ${o.dequantRatio} of the f32 rounding bound`);
  }
});

test('int8 bounds are tight enough to catch a wrong weight scale (×1.2, or /255 instead of /127)', async () => {
  for (const [M, N, K] of [
    [1, 200, 300],
    [4, 200, 300],
    [20, 200, 300],
  ] as const) {
    for (const scaleFactor of [1.2, 127 / 255]) {
      const c = { M, N, K, scaleFactor };
      const o = await runCase(c);
      assert.ok(Number.isFinite(o.boundRatio), `broken scale ×${scaleFactor}: outputs must still be written (${report(c, o)})`);
      assert.ok(o.boundRatio > 1, `a broken scale ×${scaleFactor.toFixed(3)} passed: ${report(c, o)}`);
    }
  }
});

test('SiluMul with int8 rows out = the W8A8 quantizer over the plain SiluMul rows: identical products, K padded; a 1 % scale error shows', async () => {
  const g = await gpu();
  const seed = freshSeed();
  // hidden 72: 18 words padded to 24 (zero words written too); 20 and 37 rows on the W8A8 path.
  for (const [M, N, hidden] of [
    [20, 40, 72],
    [37, 33, 256],
  ] as const) {
    const where = `M ${M} N ${N} hidden ${hidden} seed ${seed}`;
    const guStride = 2 * hidden + 8;
    const hStride = pad8(hidden);
    // gate and up values of either sign, some large enough for silu's tails.
    const gu = uploadArray(g, 'gate|up', strided(randomArray(M * 2 * hidden, seed + hidden, 6), M, 2 * hidden, guStride, 0));
    const meta = uploadArray(g, 'meta', new Uint32Array(16).fill(M, 0, 1));
    const weight = uploadInt8Matrix(g, 'test Wdown', randomArray(N * hidden, seed + 2, 0.5), N, hidden);
    const words = weight.stride / 4;
    const q = createQuantizedRows(g, 'x', M, words);
    const h = storageBuffer(g, 'h', M * hStride * 4);
    const y = [storageBuffer(g, 'y fused', M * N * 4), storageBuffer(g, 'y own quantizer', M * N * 4)];
    const silu = new SiluMul(g, { meta, gateUp: gu, gateUpStride: guStride, out: h, outStride: hStride, quantized: q }, hidden);
    const b = { meta, rowsSlot: 0, x: h, xStride: hStride, yStride: N };
    const ops = [new Int8MatmulOp(g, weight, { ...b, y: y[0], xQuantized: q }), new Int8MatmulOp(g, weight, { ...b, y: y[1] })];
    assert.notEqual(ops[0].path(M), 'gemv');
    const run = async () => {
      const enc = g.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      silu.encode(pass, M, true);
      silu.encode(pass, M);
      for (const op of ops) op.encode(pass, M);
      pass.end();
      g.device.queue.submit([enc.finish()]);
      const out = [await readF32(g, y[0], M * N), await readF32(g, y[1], M * N)];
      g.checkErrors();
      return out;
    };
    const [a, bb] = await run();
    assert.ok(a.every(Number.isFinite), `${where}: finite products`);
    assert.deepEqual(a, bb, `${where}: ${ops[0].path(M)} over SiluMul's int8 rows = over its own quantizer's`);
    // The products do read the fused rows: scales 1 % off change them.
    const scales = await readF32(g, q.xScale, M);
    const enc = g.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    ops[0].encode(pass, M);
    pass.end();
    g.device.queue.writeBuffer(q.xScale, 0, scales.map((v) => v * 1.01));
    g.device.queue.submit([enc.finish()]);
    const skewed = await readF32(g, y[0], M * N);
    assert.ok(skewed.some((v, i) => v !== bb[i]), `${where}: a 1 % scale error did not change the products`);
    for (const buf of [gu, meta, q.xq, q.xScale, h, ...y]) buf.destroy();
    destroyInt8Matrix(weight);
  }
});

test('RmsNorm with int8 rows out = the W8A8 quantizer over its f32 rows: identical products (W8A8 and GEMV paths), K padded', async () => {
  const g = await gpu();
  const seed = freshSeed();
  // 72 values: 24 words padded to 32 (zero words the norm writes too); 20 and 37 rows take W8A8 here, 3 the GEMV.
  for (const [M, N, K] of [
    [20, 40, 72],
    [37, 33, 128],
    [3, 16, 72],
  ] as const) {
    const where = `M ${M} N ${N} K ${K} seed ${seed}`;
    const stride = pad8(K);
    const x = uploadArray(g, 'x', strided(randomArray(M * K, seed + K, 2), M, K, stride, 0));
    const normW = uploadArray(g, 'norm weight', randomArray(K, seed + 1));
    const meta = uploadArray(g, 'meta', new Uint32Array(16).fill(M, 0, 1));
    const weight = uploadInt8Matrix(g, 'test Wq', randomArray(N * K, seed + 2, 0.5), N, K);
    const words = weight.stride / 4;
    const q = createQuantizedRows(g, 'x', M, words);
    const xn = storageBuffer(g, 'xn', M * stride * 4);
    const xnPlain = storageBuffer(g, 'xn plain', M * stride * 4);
    const y = [storageBuffer(g, 'y fused', M * N * 4), storageBuffer(g, 'y own quantizer', M * N * 4)];
    const fused = new RmsNorm(g, { meta, x, xStride: stride, weight: normW, out: xn, outStride: stride, quantized: q }, K, 1e-5);
    const plain = new RmsNorm(g, { meta, x, xStride: stride, weight: normW, out: xnPlain, outStride: stride }, K, 1e-5);
    const b = { meta, rowsSlot: 0, x: xn, xStride: stride, yStride: N };
    const ops = [new Int8MatmulOp(g, weight, { ...b, y: y[0], xQuantized: q }), new Int8MatmulOp(g, weight, { ...b, y: y[1] })];
    const enc = g.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    fused.encode(pass, M);
    plain.encode(pass, M);
    for (const op of ops) op.encode(pass, M);
    pass.end();
    g.device.queue.submit([enc.finish()]);
    const [a, bb] = [await readF32(g, y[0], M * N), await readF32(g, y[1], M * N)];
    g.checkErrors();
    assert.deepEqual(await readF32(g, xn, M * stride), await readF32(g, xnPlain, M * stride), `${where}: the f32 rows are the plain norm's`);
    assert.ok(a.every(Number.isFinite), `${where}: finite products`);
    assert.deepEqual(a, bb, `${where}: ${ops[0].path(M)} over the norm's int8 rows = over its own quantizer's`);
    for (const buf of [x, normW, meta, q.xq, q.xScale, xn, xnPlain, ...y]) buf.destroy();
    destroyInt8Matrix(weight);
  }
});

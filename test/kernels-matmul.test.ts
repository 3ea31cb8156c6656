// Matmul kernels (GEMV and tiled GEMM; f32 and packed-f16 weights; bias, fused residual, split pieces) vs the float64 reference.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MatmulOp, type MatmulTuning } from '../kernels/matmul.ts';
import { pad8, uploadMatrix, type WeightDtype } from '../kernels/tensors.ts';
import { matvec } from '../model/reference/ops.ts';
import { tensor } from '../model/weights.ts';
import { fileGpu, freshSeed, relError, runMatmulCase } from './kernels-helpers.ts';

const gpu = fileGpu();

interface Case {
  M: number;
  N: number;
  K: number;
  dtype: WeightDtype;
  bias?: boolean;
  accumulate?: boolean;
  /** Force the weight into pieces of at most this many rows (binding split). */
  pieceRows?: number;
  tuning?: Partial<MatmulTuning>;
  yOffset?: number;
}

async function runCase(c: Case): Promise<number> {
  const g = await gpu();
  let pieces = 0;
  const { w, x, b, y0, got } = await runMatmulCase(g, c, freshSeed(), (w, bindings) => {
    const maxBinding = c.pieceRows ? c.pieceRows * pad8(c.K) * (c.dtype === 'f16' ? 2 : 4) : undefined;
    const weight = uploadMatrix(g, 'test W', w, c.N, c.K, c.dtype, maxBinding);
    pieces = weight.pieces.length;
    return { op: new MatmulOp(g, weight, bindings, c.tuning), destroy: () => weight.pieces.forEach((p) => p.buffer.destroy()) };
  });
  if (c.pieceRows) assert.ok(pieces > 1, 'weight should be split into pieces');
  const W = tensor([c.N, c.K], w);
  const want = new Float64Array(c.M * c.N);
  for (let m = 0; m < c.M; m++) {
    const r = matvec(W, x.subarray(m * c.K, (m + 1) * c.K), c.bias ? tensor([c.N], b) : undefined);
    for (let n = 0; n < c.N; n++) want[m * c.N + n] = r[n] + (c.accumulate ? y0[m * c.N + n] : 0);
  }
  return relError(got, want);
}

const shapes: Array<[M: number, N: number, K: number]> = [
  [1, 37, 19],
  [1, 130, 64],
  [2, 67, 173],
  [3, 96, 300],
  [5, 41, 72],
  [8, 64, 129],
  [9, 70, 33],
  [17, 129, 90],
  [40, 65, 200],
  [67, 33, 47],
];

for (const dtype of ['f32', 'f16'] as const) {
  const bar = dtype === 'f32' ? 1e-4 : 1e-2;
  test(`matmul ${dtype}: GEMV and GEMM shapes, odd sizes`, async () => {
    for (const [M, N, K] of shapes) {
      const e = await runCase({ M, N, K, dtype });
      assert.ok(e <= bar, `${dtype} M=${M} N=${N} K=${K}: relative error ${e} > ${bar}`);
    }
  });
  test(`matmul ${dtype}: bias, fused residual add, column offset, split weight pieces`, async () => {
    for (const [M, N, K] of [
      [1, 45, 40],
      [4, 45, 40],
      [20, 45, 40],
    ] as const) {
      const e = await runCase({ M, N, K, dtype, bias: true, accumulate: true, pieceRows: 16, yOffset: 5 });
      assert.ok(e <= bar, `${dtype} M=${M}: relative error ${e} > ${bar}`);
    }
  });
}

test('matmul GEMV reduction without subgroups and with other thread counts', async () => {
  for (const tuning of [
    { useSubgroups: false, gemvThreadsPerRow: 32, gemvRowsPerWorkgroup: 4 },
    { useSubgroups: true, gemvThreadsPerRow: 64, gemvRowsPerWorkgroup: 2 },
    { useSubgroups: false, gemvThreadsPerRow: 8, gemvRowsPerWorkgroup: 16, gemvUnroll: 4 },
    { useSubgroups: true, gemvThreadsPerRow: 32, gemvRowsPerWorkgroup: 4, gemvUnroll: 1 },
  ]) {
    for (const [M, N, K] of [
      [1, 50, 300],
      [3, 33, 77],
    ] as const) {
      const e = await runCase({ M, N, K, dtype: 'f32', tuning, bias: true });
      assert.ok(e <= 1e-4, `${JSON.stringify(tuning)} M=${M}: relative error ${e}`);
    }
  }
});

test('matmul GEMV layouts: rows per thread, grid-stride workgroups, shuffle / subgroup / tree / no reduction', async () => {
  for (const tuning of [
    { gemvThreadsPerRow: 4, gemvRowsPerThread: 3, gemvRowsPerWorkgroup: 8, gemvUnroll: 2 },
    { gemvThreadsPerRow: 1, gemvRowsPerThread: 2, gemvRowsPerWorkgroup: 32, gemvUnroll: 1 },
    // Grid stride with the subgroup + workgroup reduction (4 rows per thread here makes SwiftShader's compiler stall at M=8).
    { gemvThreadsPerRow: 16, gemvRowsPerThread: 2, gemvRowsPerWorkgroup: 2, gemvUnroll: 2, gemvWorkgroups: 3 },
    { useSubgroups: false, gemvThreadsPerRow: 8, gemvRowsPerThread: 2, gemvRowsPerWorkgroup: 4, gemvWorkgroups: 2 },
  ]) {
    for (const M of [1, 3, 8]) {
      const e = await runCase({ M, N: 45, K: 77, dtype: 'f16', tuning, bias: true, accumulate: true, yOffset: 3 });
      assert.ok(e <= 1e-2, `${JSON.stringify(tuning)} M=${M}: relative error ${e}`);
    }
  }
});

test('matmul GEMM tilings and split-K (explicit, automatic, none) with bias and fused residual', async () => {
  for (const [tuning, M, dtype] of [
    [{ gemmSplitK: 3 }, 9, 'f16'],
    [{ gemmSplitK: 1, gemmTileN: 64, gemmTileK: 32, gemmThreadM: 4, gemmThreadN: 4 }, 40, 'f32'],
    [{ gemmTileM: 64, gemmTileN: 256, gemmTileK: 8, gemmThreadM: 8, gemmThreadN: 8, gemmTargetWorkgroups: 64 }, 70, 'f16'],
  ] as const) {
    const e = await runCase({ M, N: 70, K: 101, dtype, tuning, bias: true, accumulate: true, pieceRows: 48 });
    assert.ok(e <= (dtype === 'f16' ? 1e-2 : 1e-4), `${JSON.stringify(tuning)} ${dtype} M=${M}: relative error ${e}`);
  }
});

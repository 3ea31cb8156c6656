// W_UK folded into the int8 query quantizer (kernels/mla-head-fused.ts, mlaTcQueryWgsl with `absorb`) vs float64 on
// fresh random inputs: each (row, head)'s [W_UKᵀ q_nope | q_pe]·scale quantized per part (scale max|part| / 127,
// values rounded to int8), in the tiled layout the int8-product kernels read; padded heads zero; a NaN query value
// reaching exactly its (row, head)'s latent scale. (W_UV folded into the merge runs in every decode-sized step of the
// whole-model tests, test/mla-model.test.ts, against the float64 reference.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mlaTcQueryWgsl, planMlaTc } from '../kernels/mla-attention-tc.ts';
import { fusedHeadWeights } from '../kernels/mla-head-fused.ts';
import { uploadHeadMatrices } from '../kernels/mla-head-matmul.ts';
import { mlaInt8RowFormat } from '../kernels/mla-kv-int8.ts';
import { bindBuffers, destroyMatrix, poisonBuffer, readBuffer, readF32, roundToF16, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { fileGpu, freshSeed, qqByte, randomArray } from './kernels-helpers.ts';

const gpu = fileGpu();

interface Case {
  nHeads: number;
  dn: number;
  R: number;
  r: number;
  rows: number;
  dtype: 'f32' | 'f16';
  /** (row, head) whose first q_nope value is NaN. */
  nanAt?: [number, number];
}

async function runCase(c: Case, seed: number, where: string): Promise<void> {
  const g = await gpu();
  const { nHeads: H, dn, R, r, rows } = c;
  const f = mlaInt8RowFormat(R, r);
  const plan = planMlaTc(H, f);
  if (typeof plan === 'string') throw new Error(plan);
  // q rows as the block lays them out: [c | k_pe | q heads], each head [q_nope | q_pe] and a gap.
  const headStride = dn + r + 3;
  const offset = R + r;
  const stride = offset + H * headStride + 5;
  const scale = 0.21;
  let w = randomArray(H * dn * R, seed, 0.5);
  if (c.dtype === 'f16') w = roundToF16(w);
  const q = randomArray(rows * stride, seed + 1, 2);
  if (c.nanAt) q[c.nanAt[0] * stride + offset + c.nanAt[1] * headStride] = NaN;
  const weight = uploadHeadMatrices(g, 'W_UK', H, dn, R, c.dtype, (h, k, n) => w[(h * dn + k) * R + n]);
  const qBuf = uploadArray(g, 'q rows', q);
  const qq = storageBuffer(g, 'qq', rows * plan.headsPadded * plan.rowPad);
  const qs = storageBuffer(g, 'qs', rows * plan.headsPadded * 8);
  poisonBuffer(g, qs);
  const absorb = { stride, offset, headStride, dn, scale, w: fusedHeadWeights(weight, H) };
  const pipe = g.pipeline(`test fused query ${where}`, mlaTcQueryWgsl(H, f, plan, absorb));
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(pipe);
  pass.setBindGroup(0, bindBuffers(g, pipe, 'fused query', [qBuf, qq, qs, weight.pieces[0].buffer]));
  pass.dispatchWorkgroups(plan.headsPadded, rows);
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const bytes = new Int8Array(await readBuffer(g, qq, rows * plan.headsPadded * plan.rowPad));
  const scales = await readF32(g, qs, rows * plan.headsPadded * 2);
  destroyMatrix(weight);
  for (const b of [qBuf, qq, qs]) b.destroy();

  let exact = 0;
  let total = 0;
  for (let row = 0; row < rows; row++) {
    for (let h = 0; h < plan.headsPadded; h++) {
      const s0: number = scales[2 * (row * plan.headsPadded + h)];
      const s1: number = scales[2 * (row * plan.headsPadded + h) + 1];
      if (h >= H) {
        assert.deepEqual([s0, s1], [0, 0], `${where}: padded head ${h} row ${row} scales`);
        for (let i = 0; i < plan.rowPad; i++) assert.equal(qqByte(bytes, plan, row, h, i), 0, `${where}: padded head ${h} row ${row} byte ${i}`);
        continue;
      }
      const xb = row * stride + offset + h * headStride;
      if (c.nanAt && c.nanAt[0] === row && c.nanAt[1] === h) {
        assert.ok(Number.isNaN(s0), `${where}: row ${row} head ${h} has a NaN q_nope value; its latent scale is ${s0}`);
        assert.ok(Number.isFinite(s1), `${where}: row ${row} head ${h}: the RoPE part has no NaN; its scale is ${s1}`);
        continue;
      }
      // float64: q̃ = scale · W_UKᵀ q_nope, q_pe · scale; per part scale max|·| / 127.
      const qt = new Float64Array(R);
      for (let n = 0; n < R; n++) {
        let acc = 0;
        for (let k = 0; k < dn; k++) acc += w[(h * dn + k) * R + n] * q[xb + k];
        qt[n] = acc * scale;
      }
      const qp = Array.from({ length: r }, (_, i) => q[xb + dn + i] * scale);
      const parts: Array<[part: string, vals: ArrayLike<number>, got: number, at: number]> = [
        ['latent', qt, s0, 0],
        ['rope', qp, s1, plan.latentPad],
      ];
      for (const [part, vals, got, at] of parts) {
        let m = 0;
        for (let i = 0; i < vals.length; i++) m = Math.max(m, Math.abs(vals[i]));
        assert.ok(Math.abs(got - m / 127) <= 1e-5 * (m / 127), `${where}: row ${row} head ${h} ${part} scale ${got}, float64 ${m / 127}`);
        for (let i = 0; i < vals.length; i++) {
          const want = (vals[i] / m) * 127;
          const gotQ = qqByte(bytes, plan, row, h, at + i);
          // f32 sums in another order than float64: a value at a rounding half may land on either side.
          assert.ok(Math.abs(gotQ - want) <= 0.5 + 1e-3, `${where}: row ${row} head ${h} ${part} value ${i}: int8 ${gotQ}, float64 ${want.toFixed(4)}`);
          if (gotQ === Math.round(want)) exact++;
          total++;
        }
        const pad = part === 'latent' ? plan.latentPad : plan.ropePad;
        for (let i = vals.length; i < pad; i++) assert.equal(qqByte(bytes, plan, row, h, at + i), 0, `${where}: row ${row} head ${h} ${part} padding byte ${i}`);
      }
    }
  }
  assert.ok(exact >= 0.99 * total, `${where}: only ${exact} of ${total} int8 query values equal float64's rounding`);
}

test('int8 query quantizer with W_UK folded in vs float64: f32 and f16 weights, odd dims, two head tiles, the Qwen2.5-7B shape, a NaN reaching its own (row, head)', async () => {
  const cases: Case[] = [
    { nHeads: 5, dn: 12, R: 20, r: 8, rows: 3, dtype: 'f32' },
    { nHeads: 18, dn: 16, R: 40, r: 6, rows: 2, dtype: 'f16', nanAt: [1, 17] },
    { nHeads: 28, dn: 128, R: 512, r: 64, rows: 2, dtype: 'f16', nanAt: [0, 3] },
  ];
  for (const c of cases) {
    const seed = freshSeed();
    await runCase(c, seed, `${JSON.stringify(c)} seed ${seed}`);
  }
});

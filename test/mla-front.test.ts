// The MLA decode front (kernels/mla-front.ts) vs float64 on fresh random inputs: per step row and head, the int8 query
// [W_UKᵀ q_nope | RoPE(q_pe)]·scale quantized per part (scale max|part| / 127) in the attention's tiled layout, padded
// heads zero; per row, the int8 latent cache row [c | RoPE(k_pe)] at its paged slot (each part its own scale); odd
// shapes, both RoPE layouts, f32 and f16 weights, row groups of 1 to 8 with a partial last group; a NaN in q_nope
// reaching exactly its (row, head)'s latent scale, a NaN in c exactly its row's latent scale. (The front inside whole
// models, with the decode back (kernels/mla-back.ts): random MLA models below, whose logits must match the separate
// kernels' and be no further from the float64 reference's; the
// converted stories260K's perplexity in test/mla-int8-cache.test.ts.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { planMlaTc } from '../kernels/mla-attention-tc.ts';
import { frontGrid, frontRowsPerWorkgroup, mlaFrontWgsl, type FrontRowsPerWorkgroup } from '../kernels/mla-front.ts';
import { fusedHeadWeights } from '../kernels/mla-head-fused.ts';
import { uploadHeadMatrices } from '../kernels/mla-head-matmul.ts';
import { latentRowInt8Scales, latentRowInt8Values, mlaInt8RowFormat } from '../kernels/mla-kv-int8.ts';
import { buildStepMeta } from '../kernels/step-meta.ts';
import { bindBuffers, destroyMatrix, poisonBuffer, readBuffer, readF32, roundToF16, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { mlaBlockFactory } from '../engine/mla-block.ts';
import type { MlaConfig, RopeLayout } from '../model/config.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import { fileGpu, freshSeed, qqByte, randomArray, relError, shuffledPaging } from './kernels-helpers.ts';
import { randomMlaModel, runPromptSteps, tinyMlaConfig } from './mla-fixtures.ts';

const gpu = fileGpu();

interface Case {
  nHeads: number;
  dn: number;
  R: number;
  r: number;
  /** Per sequence: [cached tokens, step rows]. */
  seqs: Array<[number, number]>;
  dtype: 'f32' | 'f16';
  layout: RopeLayout;
  group: FrontRowsPerWorkgroup;
  /** (row, head) whose first q_nope value is NaN. */
  nanQ?: [number, number];
  /** Row whose first latent value c_0 is NaN. */
  nanC?: number;
}

/** |got − want| ≤ ½ step (+ slack for f32 sums in another order); returns whether got is float64's own rounding. */
function checkInt8(got: number, want: number, where: string): boolean {
  assert.ok(Math.abs(got - want) <= 0.5 + 1e-3, `${where}: int8 ${got}, float64 ${want.toFixed(4)}`);
  return got === Math.round(want);
}

async function runCase(c: Case, seed: number, where: string): Promise<void> {
  const g = await gpu();
  const { nHeads: H, dn, R, r } = c;
  const RV = R + r;
  const f = mlaInt8RowFormat(R, r);
  const plan = planMlaTc(H, f);
  if (typeof plan === 'string') throw new Error(plan);
  const blockSize = 4;
  const paging = shuffledPaging(c.seqs, blockSize, seed);
  const meta = buildStepMeta(paging.freshStep, { blockSize, numBlocks: paging.totalBlocks, nKvHeads: 1, maxChunkSize: 256 });
  const rows = meta.nRows;
  const positions = c.seqs.flatMap(([k, n]) => Array.from({ length: n }, (_, t) => k + t));
  // Rows as the block lays them out: [c | k_pe | q heads], each head [q_nope | q_pe] and a gap; q and the latent
  // bound to the same buffer, as the fused projection's rows are.
  const headStride = dn + r + 3;
  const offset = RV;
  const stride = offset + H * headStride + 5;
  const scale = 0.21;
  let w = randomArray(H * dn * R, seed, 0.5);
  if (c.dtype === 'f16') w = roundToF16(w);
  const x = randomArray(rows * stride, seed + 1, 2);
  // k_pe ×8: each latent part needs its own scale.
  for (let row = 0; row < rows; row++) for (let i = R; i < RV; i++) x[row * stride + i] *= 8;
  if (c.nanQ) x[c.nanQ[0] * stride + offset + c.nanQ[1] * headStride] = NaN;
  if (c.nanC !== undefined) x[c.nanC * stride] = NaN;
  // The RoPE table as kernels/elementwise.ts ropeTable builds it (f32 cos / sin per position and pair).
  const half = r / 2;
  const maxPos = Math.max(...positions) + 1;
  const table = new Float32Array(maxPos * half * 2);
  for (let p = 0; p < maxPos; p++) {
    for (let j = 0; j < half; j++) {
      const freq = Math.pow(10000, (-2 * j) / r);
      table[(p * half + j) * 2] = Math.cos(p * freq);
      table[(p * half + j) * 2 + 1] = Math.sin(p * freq);
    }
  }
  const weight = uploadHeadMatrices(g, 'W_UK', H, dn, R, c.dtype, (h, k, n) => w[(h * dn + k) * R + n]);
  const metaBuf = storageBuffer(g, 'meta', meta.data.byteLength);
  g.device.queue.writeBuffer(metaBuf, 0, meta.data);
  const xBuf = uploadArray(g, 'rows', x);
  const tableBuf = uploadArray(g, 'rope table', table);
  const cache = storageBuffer(g, 'int8 latent cache', paging.totalBlocks * blockSize * f.rowWords * 4);
  const qq = storageBuffer(g, 'qq', rows * plan.headsPadded * plan.rowPad);
  const qs = storageBuffer(g, 'qs', rows * plan.headsPadded * 8);
  for (const b of [cache, qq, qs]) poisonBuffer(g, b);
  const spec = {
    nHeads: H,
    q: { stride, offset, headStride },
    latent: { stride, offset: 0 },
    dn,
    scale,
    ropeLayout: c.layout,
    w: fusedHeadWeights(weight, H),
    format: f,
    plan,
    blockSize,
    rowsPerWorkgroup: c.group,
  };
  const pipe = g.pipeline(`test front ${where}`, mlaFrontWgsl(spec));
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(pipe);
  pass.setBindGroup(0, bindBuffers(g, pipe, 'front', [metaBuf, xBuf, xBuf, tableBuf, weight.pieces[0].buffer, cache, qq, qs]));
  pass.dispatchWorkgroups(...frontGrid(spec, rows));
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const bytes = new Int8Array(await readBuffer(g, qq, rows * plan.headsPadded * plan.rowPad));
  const scales = await readF32(g, qs, rows * plan.headsPadded * 2);
  const cacheF = await readF32(g, cache, cache.size / 4);
  const cacheWords = new Uint32Array(cacheF.buffer, cacheF.byteOffset, cacheF.length);
  g.checkErrors();
  destroyMatrix(weight);
  for (const b of [metaBuf, xBuf, tableBuf, cache, qq, qs]) b.destroy();

  // float64 RoPE of the r values at base, at position pos (pairs (2j, 2j+1) or (j, j + r/2)).
  const rope = (base: number, pos: number): Float64Array => {
    const out = new Float64Array(r);
    for (let j = 0; j < half; j++) {
      const [a, b] = c.layout === 'interleaved' ? [2 * j, 2 * j + 1] : [j, j + half];
      const cs = table[(pos * half + j) * 2];
      const sn = table[(pos * half + j) * 2 + 1];
      out[a] = x[base + a] * cs - x[base + b] * sn;
      out[b] = x[base + a] * sn + x[base + b] * cs;
    }
    return out;
  };
  const absMax = (v: ArrayLike<number>) => {
    let m = 0;
    for (let i = 0; i < v.length; i++) m = Math.max(m, Math.abs(v[i]));
    return m;
  };
  let exact = 0;
  let total = 0;
  let row = 0;
  c.seqs.forEach(([k, n], seq) => {
    for (let t = 0; t < n; t++, row++) {
      const pos = k + t;
      // The latent row at its paged slot.
      const slot = paging.slot(seq, pos);
      const words = cacheWords.slice(slot * f.rowWords, (slot + 1) * f.rowWords);
      const [sc, sp] = latentRowInt8Scales(words, f);
      const vals = latentRowInt8Values(words, f);
      const cPart = Float64Array.from({ length: R }, (_, i) => x[row * stride + i]);
      const kPart = rope(row * stride + R, pos);
      const at = `${where}: row ${row} (seq ${seq}, pos ${pos})`;
      if (c.nanC === row) {
        assert.ok(Number.isNaN(sc), `${at}: c holds a NaN; its cache scale is ${sc}`);
        for (let i = 0; i < R; i++) assert.equal(vals[i], 0, `${at}: NaN part value ${i}`);
      } else {
        const m = absMax(cPart);
        assert.ok(Math.abs(sc - m / 127) <= 1e-5 * (m / 127), `${at}: latent scale ${sc}, float64 ${m / 127}`);
        for (let i = 0; i < R; i++) if (checkInt8(vals[i], (cPart[i] / m) * 127, `${at} latent ${i}`)) exact++;
        total += R;
      }
      const mp = absMax(kPart);
      assert.ok(Math.abs(sp - mp / 127) <= 1e-5 * (mp / 127), `${at}: k_pe scale ${sp}, float64 ${mp / 127}`);
      for (let i = 0; i < r; i++) if (checkInt8(vals[R + i], (kPart[i] / mp) * 127, `${at} k_pe ${i}`)) exact++;
      total += r;
      for (const [wd, used] of [[R >> 2, R % 4], [f.ropeWord + (r >> 2), r % 4]]) {
        if (used) assert.equal(words[wd] >>> (8 * used), 0, `${at}: padding bytes of word ${wd}`);
      }
      // Every head slot's int8 query.
      for (let h = 0; h < plan.headsPadded; h++) {
        const s0: number = scales[2 * (row * plan.headsPadded + h)];
        const s1: number = scales[2 * (row * plan.headsPadded + h) + 1];
        const hat = `${at} head ${h}`;
        if (h >= H) {
          assert.deepEqual([s0, s1], [0, 0], `${hat}: padded head scales`);
          for (let i = 0; i < plan.rowPad; i++) assert.equal(qqByte(bytes, plan, row, h, i), 0, `${hat}: padded head byte ${i}`);
          continue;
        }
        const xb = row * stride + offset + h * headStride;
        const qp = Array.from(rope(xb + dn, pos), (v) => v * scale);
        if (c.nanQ && c.nanQ[0] === row && c.nanQ[1] === h) {
          assert.ok(Number.isNaN(s0), `${hat}: a NaN q_nope value; its latent scale is ${s0}`);
          assert.ok(Number.isFinite(s1), `${hat}: the RoPE part has no NaN; its scale is ${s1}`);
          continue;
        }
        const qt = new Float64Array(R);
        for (let m = 0; m < R; m++) {
          let acc = 0;
          for (let kk = 0; kk < dn; kk++) acc += w[(h * dn + kk) * R + m] * x[xb + kk];
          qt[m] = acc * scale;
        }
        const parts: Array<[part: string, v: ArrayLike<number>, got: number, first: number, pad: number]> = [
          ['latent', qt, s0, 0, plan.latentPad],
          ['rope', qp, s1, plan.latentPad, plan.ropePad],
        ];
        for (const [part, v, got, first, pad] of parts) {
          const m = absMax(v);
          assert.ok(Math.abs(got - m / 127) <= 1e-5 * (m / 127), `${hat}: ${part} scale ${got}, float64 ${m / 127}`);
          for (let i = 0; i < v.length; i++) if (checkInt8(qqByte(bytes, plan, row, h, first + i), (v[i] / m) * 127, `${hat} ${part} ${i}`)) exact++;
          total += v.length;
          for (let i = v.length; i < pad; i++) assert.equal(qqByte(bytes, plan, row, h, first + i), 0, `${hat}: ${part} padding byte ${i}`);
        }
      }
    }
  });
  assert.ok(exact >= 0.99 * total, `${where}: only ${exact} of ${total} int8 values equal float64's rounding`);
}

test('MLA decode front vs float64: int8 queries and int8 latent rows; odd dims, both RoPE layouts, f32 and f16 W_UK, row groups of 1 to 8 (a partial last one), two head tiles, the Qwen2.5-7B shape, NaNs reaching only their own scale', async () => {
  const cases: Case[] = [
    { nHeads: 5, dn: 12, R: 20, r: 8, seqs: [[3, 1], [0, 2], [9, 2]], dtype: 'f32', layout: 'interleaved', group: 2 },
    { nHeads: 3, dn: 8, R: 16, r: 4, seqs: [[5, 1], [1, 1]], dtype: 'f16', layout: 'rotate_half', group: 1 },
    { nHeads: 18, dn: 16, R: 42, r: 6, seqs: [[2, 3], [17, 1], [0, 1]], dtype: 'f16', layout: 'rotate_half', group: 4, nanQ: [1, 17], nanC: 3 },
    { nHeads: 28, dn: 128, R: 512, r: 64, seqs: [[40, 1], [7, 1], [130, 3], [0, 1], [12, 1], [3, 2]], dtype: 'f16', layout: 'interleaved', group: 8, nanQ: [0, 3] },
  ];
  for (const c of cases) {
    const seed = freshSeed();
    await runCase(c, seed, `${JSON.stringify(c)} seed ${seed}`);
  }
});

test('MLA decode front: rows a workgroup grow with the step so that heads × groups stays within 128 workgroups', () => {
  assert.deepEqual(
    [1, 4, 5, 8, 16, 17, 32, 64].map((rows) => frontRowsPerWorkgroup(28, rows)),
    [1, 1, 2, 2, 4, 8, 8, 8],
  );
});

/**
 * The prompts of runPromptSteps through two runners (int8 latent cache, dot4 products; one with the decode front and
 * back for steps of up to 8 rows, so every step there): the front runner's logits, the separate kernels', and the
 * labels of the pipelines the front runner built.
 */
async function frontAgainstSeparate(config: MlaConfig, seed: number): Promise<{ front: Float32Array[][]; separate: Float32Array[][]; labels: string[]; prompts: number[][] }> {
  const g = await gpu();
  const model = randomMlaModel(config, seed, false);
  const labels: string[] = [];
  const run = async (frontMaxRows: number) => {
    // The front runner's context records the pipelines it builds (the front compiles on its first step).
    const ctx = frontMaxRows > 0 ? { ...g, pipeline: (...a: Parameters<typeof g.pipeline>) => (labels.push(a[0]), g.pipeline(...a)) } : g;
    const runner = await createGpuRunner(ctx, model, {
      weightDtype: 'f32',
      cacheDtype: 'int8',
      blockSize: 4,
      numBlocks: 64,
      maxRowsPerStep: 8,
      attentionBlock: mlaBlockFactory({ attentionTuning: { int8Products: 'dot4' }, frontMaxRows, backMaxRows: frontMaxRows }),
    });
    try {
      return await runPromptSteps(runner, config.vocabSize, seed);
    } finally {
      runner.destroy();
    }
  };
  const front = await run(8);
  const separate = await run(0);
  return { front: front.logits, separate: separate.logits, labels, prompts: front.prompts };
}

test('random MLA models with the int8 latent cache: the decode front and back give the logits of the separate RoPE, latent write, W_UK, query, merge and W_UV kernels (fused q + kv_a; R below the nope dims; q LoRA with latent norms and rotate-half RoPE)', async () => {
  const configs = [
    tinyMlaConfig({ attentionBias: true }),
    tinyMlaConfig({ kvLoraRank: 8, qkNopeHeadDim: 12, attentionBias: true }),
    tinyMlaConfig({ qLoraRank: 20, qkLatentLayernorm: true, ropeLayout: 'rotate_half', nHeads: 3 }),
  ];
  for (const config of configs) {
    const seed = freshSeed();
    const where = `seed ${seed}, ${JSON.stringify(config)}`;
    const { front, separate, labels, prompts } = await frontAgainstSeparate(config, seed);
    for (const kernel of ['mla decode front', 'mla decode back']) {
      assert.ok(labels.some((l) => l.startsWith(kernel)), `${where}: the front runner built no '${kernel}' pipeline (${labels.length} pipelines)`);
    }
    let worstSame = 0;
    let worstRef = 0;
    let worstSep = 0;
    prompts.forEach((p, i) => {
      const want = new ReferenceMla(config, randomMlaModel(config, seed, false).weights, { form: 'absorbed' }).forward(p);
      for (let t = 0; t < p.length; t++) {
        // The same arithmetic, f32 sums in another order (a query value at a rounding half may land on the other side).
        const same = relError(front[i][t], separate[i][t]);
        worstSame = Math.max(worstSame, same);
        assert.ok(same <= 1e-3, `${where}: prompt ${i} token ${t}: front vs separate kernels, relative error ${same}`);
        // Against float64 (no quantization; tiny heads of 8 to 24 values round coarsely: up to ~0.2 here): no worse
        // than the separate kernels.
        const ref = relError(front[i][t], want[t]);
        const refSeparate = relError(separate[i][t], want[t]);
        worstRef = Math.max(worstRef, ref);
        worstSep = Math.max(worstSep, refSeparate);
        assert.ok(ref <= refSeparate + 1e-3, `${where}: prompt ${i} token ${t}: front vs float64, relative error ${ref}; the separate kernels' ${refSeparate}`);
      }
    });
    console.log(`  front vs separate: worst ${worstSame.toExponential(2)}; vs float64: front ${worstRef.toExponential(2)}, separate ${worstSep.toExponential(2)}`);
  }
});

// The GPU greedy pick (kernels/argmax.ts) against the host's argmax: random rows, ties, −∞ and NaN entries.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RowArgmax } from '../kernels/argmax.ts';
import { HEADER_WORDS, META_FULL_LOGIT_ROWS, META_LOGIT_ROWS } from '../kernels/step-meta.ts';
import { storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { readBack } from '../bench/gpu-timing.ts';
import { argmax } from '../engine/sampler.ts';
import { fileGpu, freshSeed, randomArray } from './kernels-helpers.ts';

const gpu = fileGpu();

test('argmax rows on the GPU = the host argmax (first index of the largest value), after the full rows', async () => {
  const g = await gpu();
  const seed = freshSeed();
  const vocab = 1037; // not a multiple of the 256-thread workgroup
  const full = 2;
  const picked = 5;
  const rows = randomArray((full + picked) * vocab, seed, 3);
  const row = (k: number) => rows.subarray((full + k) * vocab, (full + k + 1) * vocab);
  // Row 0: ties of the maximum far apart (the lower index wins); row 1: −∞ everywhere but one value; row 2: NaNs
  // before and after the maximum; row 3: all −∞ (the host answers 0); row 4: the maximum at the last index.
  row(0).fill(-1);
  row(0)[900] = 5;
  row(0)[17] = 5;
  row(0)[600] = 5;
  row(1).fill(-Infinity);
  row(1)[333] = -7;
  row(2)[10] = NaN;
  row(2)[1000] = NaN;
  row(2)[500] = 40;
  row(3).fill(-Infinity);
  row(4)[vocab - 1] = 99;
  const meta = new Uint32Array(HEADER_WORDS);
  meta[META_LOGIT_ROWS] = full + picked;
  meta[META_FULL_LOGIT_ROWS] = full;
  const metaBuf = uploadArray(g, 'meta', meta);
  const logits = uploadArray(g, 'logits', rows);
  const picks = storageBuffer(g, 'picks', 64);
  const op = new RowArgmax(g, { meta: metaBuf, logits, picks }, vocab);
  const enc = g.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  op.encode(pass, picked);
  pass.end();
  g.device.queue.submit([enc.finish()]);
  const got = [...new Uint32Array(await readBack(g, picks, picked * 4))];
  const want = Array.from({ length: picked }, (_, k) => argmax(row(k)));
  assert.deepEqual(got, want, `seed ${seed}`);
  assert.deepEqual(want.slice(0, 5), [17, 333, 500, 0, vocab - 1]);
  g.checkErrors();
  for (const b of [metaBuf, logits, picks]) b.destroy();
});

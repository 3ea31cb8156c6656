// Converted stories260K (TransMLA, r = 4) on the GPU with the MLA block: logits at R = 16 vs the float64 MLA reference,
// greedy text at full rank vs the Stage-1 reference, and eval-ppl on GPU vs the float64 reference to 3 decimals.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { scoreChunks } from '../engine/perplexity.ts';
import type { ModelRunner } from '../engine/types.ts';
import type { GqaConfig, MlaConfig } from '../model/config.ts';
import { loadModel } from '../model/load.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import { ReferenceLatent } from '../model/reference/stage1.ts';
import { writeMlaCheckpoint } from '../model/transmla/checkpoint.ts';
import { convertToMla, mlaWeightsToF32, type ConversionResult } from '../model/transmla/convert.ts';
import { maxKvLoraRank } from '../model/transmla/stage2.ts';
import { calibrationSplit } from '../server/convert-command.ts';
import { scoreWithRunner } from '../server/eval-ppl-command.ts';
import { relError } from './kernels-helpers.ts';

const source = await loadModel('../shared/models/stories260K/stories260K.gguf', { maxSeqLen: 512 });
const gqa = source.config as GqaConfig;
const text = readFileSync('../shared/data/tinystories_valid_a.txt', 'utf8');
const split = calibrationSplit(text, source.tokenizer, gqa.bosId, { maxLen: 512, calibSamples: 8, calibSeqLen: 128, evalChunks: 6, seed: 42 });
const ropeDim = 4;
let gpu: GpuContext;
let r16: ConversionResult;
let full: ConversionResult;

before(async () => {
  gpu = await openGpu({ log: () => {} });
  const common = { ropeDim, freqFold: 2, calibChunks: split.calib };
  r16 = await convertToMla(gqa, source.weights, { ...common, kvLoraRank: 16 });
  full = await convertToMla(gqa, source.weights, { ...common, kvLoraRank: maxKvLoraRank(gqa, ropeDim) });
});

// One runner per converted model, shared by the tests (pipeline compilation dominates SwiftShader's time).
const runners = new Map<ConversionResult, ModelRunner>();
after(() => {
  for (const r of runners.values()) r.destroy();
  gpu?.destroy();
  releaseGpu();
});

async function withRunner<T>(conv: ConversionResult, fn: (runner: ModelRunner, config: MlaConfig) => Promise<T>): Promise<T> {
  let runner = runners.get(conv);
  if (!runner) {
    runner = await createGpuRunner(gpu, { config: conv.config, weights: mlaWeightsToF32(conv.weights) }, { weightDtype: 'f32', cacheDtype: 'f32', blockSize: 16, numBlocks: 64 });
    runners.set(conv, runner);
  }
  return fn(runner, conv.config);
}

function argmax(v: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[best]) best = i;
  return best;
}

test('converted stories260K at R = 16: 20 values per token per layer, GPU logits ≤ 1e-4 of the MLA reference (prefill + decode)', async () => {
  await withRunner(r16, async (runner, c) => {
    assert.equal(c.kvLoraRank + c.qkRopeHeadDim, 20);
    assert.equal(runner.kvBytesPerToken, c.nLayers * 20 * 4);
    const tokens = [c.bosId, ...source.tokenizer.encode('Once upon a time, there was a little girl named Lily. She loved to play outside in the park.')].slice(0, 30);
    const ref = new ReferenceMla(c, mlaWeightsToF32(r16.weights));
    const want = ref.forward(tokens);
    const V = c.vocabSize;
    const got = await runner.step([{ tokens: tokens.slice(0, 25), startPos: 0, blockTable: [5, 2], logits: 'all' }]);
    for (let t = 0; t < 25; t++) {
      const err = relError(got.subarray(t * V, (t + 1) * V), want[t]);
      assert.ok(err <= 1e-4, `prefill token ${t}: relative error ${err}`);
    }
    for (let t = 25; t < tokens.length; t++) {
      const row = await runner.step([{ tokens: [tokens[t]], startPos: t, blockTable: [5, 2], logits: 'last' }]);
      const err = relError(row, want[t]);
      assert.ok(err <= 1e-4, `decode token ${t}: relative error ${err}`);
    }
  });
});

test('converted stories260K at R = 16: a 150-row prefill step (the tiled W_UK / W_UV kernel) gives the reference logits within 1e-4', async () => {
  await withRunner(r16, async (runner, c) => {
    const tokens = [c.bosId, ...source.tokenizer.encode(text.slice(0, 2000))].slice(0, 150);
    assert.equal(tokens.length, 150);
    const want = new ReferenceMla(c, mlaWeightsToF32(r16.weights)).forward(tokens);
    const V = c.vocabSize;
    const got = await runner.step([{ tokens, startPos: 0, blockTable: [20, 21, 22, 23, 24, 25, 26, 27, 28, 29], logits: 'all' }]);
    let worst = 0;
    for (let t = 0; t < tokens.length; t++) worst = Math.max(worst, relError(got.subarray(t * V, (t + 1) * V), want[t]));
    assert.ok(worst <= 1e-4, `worst row's relative error ${worst}`);
  });
});

test('converted stories260K at full rank: GPU greedy tokens from BOS equal the Stage-1 reference model for 100 tokens', async () => {
  await withRunner(full, async (runner, c) => {
    const stage1 = new ReferenceLatent(gqa, full.stage1);
    const table = Array.from({ length: 7 }, (_, i) => 10 + i);
    let gpuTok = c.bosId;
    let refTok = c.bosId;
    const gpuIds: number[] = [];
    const refIds: number[] = [];
    for (let pos = 0; pos < 100; pos++) {
      const logits = await runner.step([{ tokens: [gpuTok], startPos: pos, blockTable: table, logits: 'last' }]);
      gpuTok = argmax(logits);
      refTok = argmax(stage1.forward([refTok], { logits: 'last' })[0]);
      gpuIds.push(gpuTok);
      refIds.push(refTok);
    }
    assert.deepEqual(gpuIds, refIds, `GPU: ${source.tokenizer.decode(gpuIds)}\nStage 1: ${source.tokenizer.decode(refIds)}`);
  });
});

test('converted stories260K at R = 16: eval-ppl on the GPU equals the float64 MLA reference to 3 decimals', async () => {
  // Held-out chunks cut to 32 tokens: steps of ≤ 32 rows reuse the pipelines the first test compiled.
  const chunks = split.heldOut.map((c) => c.slice(0, 32));
  await withRunner(r16, async (runner, c) => {
    const gpuAcc = await scoreWithRunner(runner, chunks, 32);
    const ref = new ReferenceMla(c, r16.weights);
    const refAcc = await scoreChunks(chunks, (chunk) => {
      ref.reset();
      return ref.forward(chunk);
    });
    assert.equal(gpuAcc.predicted, refAcc.predicted);
    assert.ok(gpuAcc.predicted > 180, `only ${gpuAcc.predicted} tokens scored`);
    assert.equal(gpuAcc.perplexity.toFixed(3), refAcc.perplexity.toFixed(3), `GPU ${gpuAcc.perplexity}, reference ${refAcc.perplexity}`);
  });
});

test('converted stories260K at R = 16 written as a DeepSeek checkpoint, loaded back: GPU logits within 1e-4 (f32 cache) and 1e-2 (f16 cache)', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'mla-stories-'));
  try {
    writeMlaCheckpoint(dir, r16.config, r16.weights, {
      dtype: 'f32',
      source: { config: gqa, format: source.format, path: source.path, tokenizer: source.tokenizer },
    });
    const loaded = await loadModel(dir);
    assert.equal(loaded.config.attention, 'mla');
    const c = loaded.config as MlaConfig;
    assert.equal(c.kvLoraRank, 16);
    const tokens = [c.bosId, ...loaded.tokenizer.encode('The cat sat on the mat and looked at the sun.')].slice(0, 16);
    const want = new ReferenceMla(c, loaded.weights).forward(tokens);
    for (const cacheDtype of ['f32', 'f16'] as const) {
      const runner = await createGpuRunner(gpu, loaded, { weightDtype: 'f32', cacheDtype, blockSize: 16, numBlocks: 8 });
      try {
        assert.equal(runner.kvBytesPerToken, c.nLayers * 20 * (cacheDtype === 'f16' ? 2 : 4));
        const V = c.vocabSize;
        for (let t0 = 0; t0 < tokens.length; t0 += 8) {
          const got = await runner.step([{ tokens: tokens.slice(t0, t0 + 8), startPos: t0, blockTable: [3], logits: 'all' }]);
          for (let t = 0; t < 8; t++) {
            const err = relError(got.subarray(t * V, (t + 1) * V), want[t0 + t]);
            const bar = cacheDtype === 'f32' ? 1e-4 : 1e-2;
            assert.ok(err <= bar, `${cacheDtype} cache, token ${t0 + t}: relative error ${err} > ${bar}`);
          }
        }
      } finally {
        runner.destroy();
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

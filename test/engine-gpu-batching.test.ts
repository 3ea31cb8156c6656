// The engine over the GPU runner (SwiftShader here, f32), batching: 16 concurrent = one by one = float64 reference; 64 with aborts.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, type Engine } from '../engine/engine.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { argmax } from '../engine/sampler.ts';
import type { ModelInfo, StepObservation } from '../engine/types.ts';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import type { GqaConfig } from '../model/config.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import { collect, samplingParams, STORIES_GGUF, STORY_STARTS } from './engine-helpers.ts';

// SwiftShader runs these kernels in software: requests are kept short so the file stays near a minute.
let gpu: GpuContext;
let model: LoadedModel;
let info: ModelInfo;

before(async () => {
  gpu = await openGpu({ log: () => {} });
  model = await loadModel(STORIES_GGUF, { maxSeqLen: 512 });
  info = { name: 'stories260K', config: model.config, tokenizer: model.tokenizer, maxModelLen: 512 };
});

after(() => {
  gpu.destroy();
  releaseGpu();
});

async function engineWith(numBlocks: number, opts: { maxNumSeqs?: number } = {}): Promise<Engine> {
  const runner = await createGpuRunner(gpu, model, { blockSize: 16, numBlocks, weightDtype: 'f32', cacheDtype: 'f32' });
  return createEngine({ runner, info, ...opts });
}

const prompt = (text: string) => [model.tokenizer.bosId!, ...model.tokenizer.encode(text)];

/** Greedy ids of the float64 reference, each request on its own: the one-by-one truth. */
function referenceGreedy(ids: number[], n: number, stopAtEos = true): number[] {
  const ref = new ReferenceGqa(model.config as GqaConfig, model.weights);
  let logits = ref.forward(ids, { logits: 'last' })[0];
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = argmax(logits);
    out.push(t);
    if (stopAtEos && t === model.config.eosId) break;
    logits = ref.forward([t])[0];
  }
  return out;
}

function stepLog(engine: Engine): StepObservation[] {
  const seen: StepObservation[] = [];
  engine.onStep((o) => seen.push(o));
  return seen;
}

test('GPU: 16 concurrent greedy requests give the one-by-one texts, in fewer steps', async () => {
  const reqs = STORY_STARTS.map((s, i) => ({ requestId: `r${i}`, promptTokens: prompt(s), params: samplingParams({ maxTokens: 6, ignoreEos: true }) }));
  const engine = await engineWith(64);
  const seen = stepLog(engine);
  // A few of them one by one on the GPU: each takes one step per generated token.
  const alone = [];
  for (const r of reqs.slice(0, 3)) alone.push(await collect(engine, { ...r, requestId: `solo-${r.requestId}` }));
  const soloSteps = seen.length;
  assert.equal(soloSteps, 3 * 6);
  seen.length = 0;
  const together = await Promise.all(reqs.map((r) => collect(engine, r)));
  assert.deepEqual(together.slice(0, 3).map((o) => o.text), alone.map((o) => o.text));
  for (const [i, r] of reqs.entries()) assert.deepEqual(together[i].tokenIds, referenceGreedy(r.promptTokens, 6, false), `request ${i}`);
  assert.equal(seen.length, 6, `16 requests batched ran ${seen.length} steps; one by one they take 16 × 6 = 96`);
  assert.equal(Math.max(...seen.map((s) => s.batchSize)), 16);
  assert.equal(engine.stats().kv.usedBlocks, 0);
  await engine.shutdown(0);
});

test('GPU: 64 concurrent requests with a third aborted mid-way; all others finish; used blocks return to zero', async () => {
  const engine = await engineWith(128, { maxNumSeqs: 64 });
  const acs = Array.from({ length: 64 }, () => new AbortController());
  const outs = await Promise.all(
    acs.map((ac, i) =>
      collect(
        engine,
        { requestId: `q${i}`, promptTokens: prompt(STORY_STARTS[i % 16]), params: samplingParams({ maxTokens: 4, ignoreEos: true }), signal: ac.signal },
        (n) => {
          if (i % 3 === 0 && n === 2) ac.abort();
        },
      ),
    ),
  );
  for (const [i, o] of outs.entries()) {
    if (i % 3 === 0) assert.deepEqual([o.finish.finishReason, o.tokenIds.length], ['abort', 2], `q${i}`);
    else assert.deepEqual([o.finish.finishReason, o.tokenIds.length], ['length', 4], `q${i}`);
  }
  assert.deepEqual(outs[1].tokenIds, referenceGreedy(prompt(STORY_STARTS[1]), 4, false));
  assert.deepEqual(outs[1].tokenIds, outs[17].tokenIds);
  const s = engine.stats();
  assert.equal(s.kv.usedBlocks, 0);
  assert.equal(s.running + s.waiting, 0);
  assert.equal(engine.healthy(), true);
  await engine.shutdown(0);
});

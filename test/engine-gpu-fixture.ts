// Shared by the GPU engine tests: stories260K on the GPU runner (f32), engines over pools of a chosen size, the float64 greedy truth.
import { before, after } from 'node:test';
import { createEngine, type Engine } from '../engine/engine.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { argmax } from '../engine/sampler.ts';
import type { ModelInfo, StepObservation } from '../engine/types.ts';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import type { GqaConfig } from '../model/config.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import { STORIES_GGUF } from './engine-helpers.ts';

export interface GpuEngineFixture {
  /** An engine over a fresh runner whose pool has `numBlocks` blocks of 16 tokens. */
  engineWith(numBlocks: number, opts?: { maxNumSeqs?: number; samplePicks?: boolean; pipelineDecode?: boolean }): Promise<Engine>;
  /** BOS + the encoded text. */
  prompt(text: string): number[];
  /** The encoded text without BOS. */
  encode(text: string): number[];
  /** Greedy ids of the float64 reference, the request on its own: the one-by-one truth. */
  referenceGreedy(ids: number[], n: number, stopAtEos?: boolean): number[];
  /** Records every step the engine reports. */
  stepLog(engine: Engine): StepObservation[];
}

/** Registers before/after hooks that open and release the GPU and stories260K for the calling test file. */
export function useGpuEngineFixture(): GpuEngineFixture {
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
  return {
    async engineWith(numBlocks, opts = {}) {
      const runner = await createGpuRunner(gpu, model, { blockSize: 16, numBlocks, weightDtype: 'f32', cacheDtype: 'f32' });
      return createEngine({ runner, info, ...opts });
    },
    prompt: (text) => [model.tokenizer.bosId!, ...model.tokenizer.encode(text)],
    encode: (text) => model.tokenizer.encode(text),
    referenceGreedy(ids, n, stopAtEos = true) {
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
    },
    stepLog(engine) {
      const seen: StepObservation[] = [];
      engine.onStep((o) => seen.push(o));
      return seen;
    },
  };
}

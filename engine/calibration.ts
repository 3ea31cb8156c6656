// TransMLA calibration on the GPU: the converter's CalibrationDevice backed by the step runner (stepCapture for each
// layer's attention input xn, logits for perplexity), so `convert` can calibrate models the CPU reference cannot run.
import type { GpuContext } from '../kernels/device.ts';
import type { WeightDtype } from '../kernels/tensors.ts';
import type { GqaConfig, MlaConfig, ModelConfig } from '../model/config.ts';
import type { ModelWeights } from '../model/weights.ts';
import type { MlaModelLike } from '../model/reference/mla.ts';
import type { LatentModelWeights } from '../model/reference/stage1.ts';
import { mlaWeightsToF32, type CalibrationDevice, type CalibrationModel } from '../model/transmla/convert.ts';
import { stage1AsFullRankMla } from '../model/transmla/stage2.ts';
import { createGpuRunner, type GpuModelRunner } from './gpu-runner.ts';
import { MAX_SEQS_PER_STEP, scoreWithRunner } from './perplexity.ts';
import type { StepSequence } from './types.ts';

export interface GpuCalibrationOptions {
  /** Weights on the GPU (default f32: calibration wants the checkpoint's numbers, not f16-rounded ones). */
  weightDtype?: WeightDtype;
  /** Longest chunk (tokens) the device will be given; every step holds at least one. */
  maxChunkLen: number;
  /** Upper bound on tokens per step (default 2048); also capped by the capture and logits readback sizes. */
  maxRowsPerStep?: number;
}

const BLOCK_SIZE = 16;
/** Readback per step kept near this many bytes (captured xn of every layer, or logits of every row). */
const READBACK_BYTES = 2 ** 28;

/** Chunks packed into steps of at most rowBudget tokens and MAX_SEQS_PER_STEP sequences, each from position 0. */
function packSteps(chunks: readonly number[][], rowBudget: number): number[][][] {
  const steps: number[][][] = [];
  let cur: number[][] = [];
  let rows = 0;
  for (const c of chunks) {
    if (cur.length > 0 && (rows + c.length > rowBudget || cur.length >= MAX_SEQS_PER_STEP)) {
      steps.push(cur);
      cur = [];
      rows = 0;
    }
    cur.push(c);
    rows += c.length;
  }
  if (cur.length) steps.push(cur);
  return steps;
}

/** The converter's calibration device on the GPU runner: f32 weights and KV cache by default, one runner per model. */
export function gpuCalibration(gpu: GpuContext, opts: GpuCalibrationOptions): CalibrationDevice {
  const weightDtype = opts.weightDtype ?? 'f32';
  const maxRows = Math.max(opts.maxChunkLen, opts.maxRowsPerStep ?? 2048);

  const open = async (config: ModelConfig, weights: ModelWeights): Promise<CalibrationModel> => {
    const dimBytes = Math.ceil(config.dim / 8) * 8 * 4;
    const captureRows = Math.max(opts.maxChunkLen, Math.min(maxRows, Math.floor(READBACK_BYTES / (config.nLayers * dimBytes))));
    const logitRows = Math.max(opts.maxChunkLen, Math.min(maxRows, Math.floor(READBACK_BYTES / (4 * config.vocabSize))));
    const rowBudget = Math.max(captureRows, logitRows);
    const runner: GpuModelRunner = await createGpuRunner(
      gpu,
      { config, weights },
      {
        weightDtype,
        cacheDtype: 'f32',
        blockSize: BLOCK_SIZE,
        numBlocks: Math.ceil(rowBudget / BLOCK_SIZE) + MAX_SEQS_PER_STEP,
        maxRowsPerStep: rowBudget,
      },
    );
    return {
      async attnInputs(chunks, sink, onChunks) {
        let done = 0;
        for (const batch of packSteps(chunks, captureRows)) {
          let firstBlock = 0;
          const seqs: StepSequence[] = batch.map((c) => {
            if (c.length > config.maxSeqLen) throw new Error(`a calibration chunk of ${c.length} tokens is longer than the model's context of ${config.maxSeqLen}`);
            const n = Math.ceil(c.length / BLOCK_SIZE);
            const blockTable = Array.from({ length: n }, (_, i) => firstBlock + i);
            firstBlock += n;
            return { tokens: c, startPos: 0, blockTable, logits: 'none' };
          });
          const { attnInputs } = await runner.stepCapture(seqs);
          const rows = batch.reduce((n, c) => n + c.length, 0);
          attnInputs.forEach((xn, layer) => sink(layer, xn, rows));
          done += batch.length;
          onChunks?.(done);
        }
      },
      async perplexity(chunks, onChunks) {
        const acc = await scoreWithRunner(runner, chunks, logitRows, (a) => onChunks?.(a.chunks));
        return acc.perplexity;
      },
      dispose() {
        runner.destroy();
      },
    };
  };

  return {
    name: 'gpu',
    original: (config: GqaConfig, weights: ModelWeights) => open(config, weights),
    // Stage 1 runs as the full-rank MLA model (R = 2L − r), which reproduces it exactly, through the MLA block.
    stage1: (config: GqaConfig, weights: LatentModelWeights, ropeDim: number) => {
      const full = stage1AsFullRankMla(config, weights, ropeDim);
      return open(full.config, mlaWeightsToF32(full.weights));
    },
    mla: (config: MlaConfig, weights: MlaModelLike) => open(config, mlaWeightsToF32(weights)),
  };
}

// stories260K with int8 projection weights on the GPU: perplexity vs f32 weights (weights-only int8 through decode steps
// of ≤ 8 rows, W8A8 through batched prefill) and greedy text on the first 40 tokens.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { PerplexityAccumulator, scoreWithRunner, textChunks } from '../engine/perplexity.ts';
import type { ModelRunner } from '../engine/types.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';

const MODEL = '../shared/models/stories260K/stories260K.gguf';
const CHUNKS = 8;
const CHUNK_LEN = 32;
let gpu: GpuContext;
let model: LoadedModel;
let chunks: number[][];
const runners: ModelRunner[] = [];

before(async () => {
  gpu = await openGpu({ log: () => {} });
  model = await loadModel(MODEL, { maxSeqLen: 256 });
  const text = readFileSync('../shared/data/tinystories_valid_a.txt', 'utf8');
  // Paragraphs of at least CHUNK_LEN tokens (every decode step then has 8 rows: one GEMV variant to compile), every 5th.
  chunks = textChunks(text, model.tokenizer, CHUNK_LEN)
    .filter((c) => c.length === CHUNK_LEN)
    .filter((_, i) => i % 5 === 0)
    .slice(0, CHUNKS);
});
after(() => {
  for (const r of runners) r.destroy();
  gpu?.destroy();
  releaseGpu();
});

async function runner(weightDtype: 'f32' | 'int8'): Promise<ModelRunner> {
  const r = await createGpuRunner(gpu, model, { weightDtype, cacheDtype: 'f32', blockSize: 16, numBlocks: 8 * 4 * 2, maxRowsPerStep: 8 });
  runners.push(r);
  return r;
}

/** Scores chunks by decoding them token by token, 8 sequences per step: every matmul sees ≤ 8 rows (the GEMV path). */
async function scoreByDecode(r: ModelRunner, list: number[][]): Promise<PerplexityAccumulator> {
  const acc = new PerplexityAccumulator();
  const bs = r.blockSize;
  for (let g = 0; g < list.length; g += 8) {
    const group = list.slice(g, g + 8);
    const tables = group.map((_, i) => Array.from({ length: Math.ceil(CHUNK_LEN / bs) }, (_, b) => i * Math.ceil(CHUNK_LEN / bs) + b));
    const rows: Float32Array[][] = group.map(() => []);
    const longest = Math.max(...group.map((c) => c.length));
    for (let pos = 0; pos < longest - 1; pos++) {
      const live = group.map((c, i) => ({ c, i })).filter(({ c }) => pos < c.length - 1);
      const logits = await r.step(live.map(({ c, i }) => ({ tokens: [c[pos]], startPos: pos, blockTable: tables[i], logits: 'last' as const })));
      const vocab = r.config.vocabSize;
      live.forEach(({ i }, j) => rows[i].push(logits.slice(j * vocab, (j + 1) * vocab)));
    }
    group.forEach((c, i) => acc.add(c, rows[i]));
  }
  return acc;
}

function argmax(v: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[best]) best = i;
  return best;
}

async function greedy(r: ModelRunner, prompt: number[], n: number): Promise<number[]> {
  const table = Array.from({ length: Math.ceil((prompt.length + n) / r.blockSize) }, (_, i) => i);
  let logits = await r.step([{ tokens: prompt, startPos: 0, blockTable: table, logits: 'last' }]);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = argmax(logits);
    out.push(t);
    logits = await r.step([{ tokens: [t], startPos: prompt.length + i, blockTable: table, logits: 'last' }]);
  }
  return out;
}

test('stories260K int8 weights: perplexity within 2 % of f32 (weights-only, decode rows ≤ 8) and 5 % (W8A8, batched prefill)', async () => {
  const f32 = await runner('f32');
  const int8 = await runner('int8');
  const base = await scoreWithRunner(f32, chunks, 256);
  const w8a8 = await scoreWithRunner(int8, chunks, 256);
  const weightsOnly = await scoreByDecode(int8, chunks);
  assert.equal(weightsOnly.predicted, base.predicted);
  assert.ok(base.predicted >= CHUNKS * (CHUNK_LEN - 1), `only ${base.predicted} tokens scored`);
  const dW = weightsOnly.perplexity / base.perplexity - 1;
  const dA = w8a8.perplexity / base.perplexity - 1;
  console.log(
    `stories260K, ${chunks.length} paragraphs, ${base.predicted} tokens: ppl f32 ${base.perplexity.toFixed(4)}, ` +
      `int8 weights-only ${weightsOnly.perplexity.toFixed(4)} (${(100 * dW).toFixed(2)} %), W8A8 ${w8a8.perplexity.toFixed(4)} (${(100 * dA).toFixed(2)} %)`,
  );
  assert.ok(Math.abs(dW) <= 0.02, `int8 weights-only perplexity ${weightsOnly.perplexity} vs f32 ${base.perplexity}: ${(100 * dW).toFixed(2)} %`);
  assert.ok(Math.abs(dA) <= 0.05, `W8A8 perplexity ${w8a8.perplexity} vs f32 ${base.perplexity}: ${(100 * dA).toFixed(2)} %`);
  // Quantization must show up at all: a run that silently used the f32 kernels would match to rounding.
  assert.ok(Math.abs(dW) > 1e-5 && Math.abs(dA) > 1e-5, `int8 perplexities equal f32 (${dW}, ${dA}): the int8 path did not run`);
});

test('stories260K int8 weights: greedy text on the first 40 tokens equals f32', async () => {
  const [f32, int8] = runners.length === 2 ? runners : [await runner('f32'), await runner('int8')];
  const prompt = chunks[0].slice(0, 8);
  const want = await greedy(f32, prompt, 40);
  const got = await greedy(int8, prompt, 40);
  assert.deepEqual(got, want, `int8: ${model.tokenizer.decode(got)}\nf32:  ${model.tokenizer.decode(want)}`);
});

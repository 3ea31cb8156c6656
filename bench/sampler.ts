// Cost per decode step of picking the tokens of 32 rows for the sampling settings that take different paths (greedy,
// penalties, temperature, top-k, top-p, logprobs): on the host (the copy out of the mapped readback, then sampleNext
// per row) and, with --gpu, on the GPU (kernels/pick.ts over the same rows, one dispatch; every pick checked against
// the host's float64 one).
//
//   npm run bench:sampler                     # 32 rows × 152064 (Qwen2.5's vocabulary), synthetic logits, host
//   npm run bench:sampler -- --gpu            # also the GPU pick kernel (GPU time by timestamps where the adapter has them)
//   options: --rows 32  --vocab 152064  --repeats 5  --gpu
// The row is flat-ish (sin-based logits over ±4 plus every 13th token +3): a wide nucleus, top-p's worst case; real
// model rows are peakier. Every figure is the median over repeats of one step's rows.
import { logitAdjustments, newSamplingState, pickOnHost, pickSampling, recordOutputToken, sampleNext, samplingParams, GREEDY_TEMPERATURE } from '../engine/sampler.ts';
import type { SamplingParams } from '../engine/types.ts';
import { openGpu, releaseGpu } from '../kernels/device.ts';
import { HEADER_WORDS, META_FULL_LOGIT_ROWS, META_LOGIT_ROWS } from '../kernels/step-meta.ts';
import { PICK_ADJUST_WORDS, PICK_INFO_WORDS, PICK_PARAM_WORDS, RowPick, writePickAdjustments, writePickParams, type PickSpec } from '../kernels/pick.ts';
import { storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { readBack, spinUpGpu, timeGpuPass } from './gpu-timing.ts';

function parse(argv: string[]): { rows: number; vocab: number; repeats: number; gpu: boolean } {
  const a = { rows: 32, vocab: 152064, repeats: 5, gpu: false };
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i];
    if (k === '--gpu') {
      a.gpu = true;
      i--;
      continue;
    }
    const v = Number(argv[i + 1]);
    if (!Number.isInteger(v) || v <= 0) throw new Error(`${k} needs a positive integer; see the top of bench/sampler.ts`);
    if (k === '--rows') a.rows = v;
    else if (k === '--vocab') a.vocab = v;
    else if (k === '--repeats') a.repeats = v;
    else throw new Error(`unknown option ${k}; see the top of bench/sampler.ts`);
  }
  return a;
}

const a = parse(process.argv.slice(2));
const logits = new Float32Array(a.rows * a.vocab);
for (let i = 0; i < logits.length; i++) logits[i] = Math.sin((i % a.vocab) * 0.37 + Math.floor(i / a.vocab)) * 4 + (i % 13 === 0 ? 3 : 0);
const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
const time = (f: () => void) => median(Array.from({ length: a.repeats }, () => {
  const t = performance.now();
  f();
  return performance.now() - t;
}));

const params = (p: Partial<SamplingParams>): SamplingParams => samplingParams({ temperature: 1, seed: 1, ...p });
const cases: [string, Partial<SamplingParams>][] = [
  ['greedy', { temperature: 0 }],
  ['greedy + presence penalty 0.5', { temperature: 0, presencePenalty: 0.5 }],
  ['temperature 1', {}],
  ['temperature 1, top-k 50', { topK: 50 }],
  ['temperature 0.8, top-p 0.95', { temperature: 0.8, topP: 0.95 }],
  ['temperature 0.8, top-p 0.95, logprobs 5', { temperature: 0.8, topP: 0.95, logprobs: 5 }],
];
const lines = [`host cost per step, ${a.rows} rows × ${a.vocab} logits (median of ${a.repeats}):`];
lines.push(`  copy out of the readback (Float32Array.slice): ${time(() => logits.slice(0)).toFixed(2)} ms`);
for (const [name, p] of cases) {
  const sp = params(p);
  const state = newSamplingState(sp, [1, 2, 3]);
  const ms = time(() => {
    for (let r = 0; r < a.rows; r++) sampleNext(logits.subarray(r * a.vocab, (r + 1) * a.vocab), sp, state);
  });
  lines.push(`  sampleNext, ${name}: ${ms.toFixed(1)} ms`);
}
process.stdout.write(lines.join('\n') + '\n');

if (a.gpu) {
  // The same rows on the GPU: one pick dispatch for all of them per setting, after a spin-up (the H200 idles slowly).
  const gpu = await openGpu({ log: () => {} });
  const meta = new Uint32Array(HEADER_WORDS);
  meta[META_LOGIT_ROWS] = a.rows;
  meta[META_FULL_LOGIT_ROWS] = 0;
  const metaBuf = uploadArray(gpu, 'meta', meta);
  const rowsBuf = uploadArray(gpu, 'logits', logits);
  const paramBuf = storageBuffer(gpu, 'pick params', a.rows * PICK_PARAM_WORDS * 4);
  const picksBuf = storageBuffer(gpu, 'picks', Math.max(16, a.rows * 4));
  const infoBuf = storageBuffer(gpu, 'pick logprobs', a.rows * PICK_INFO_WORDS * 4);
  const out = [`GPU pick kernel on ${gpu.adapterName}, the same ${a.rows} rows (one dispatch a step, median of ${a.repeats}):`];
  for (const [name, p] of cases) {
    const sp = params(p);
    const state = newSamplingState(sp, [1, 2, 3]);
    for (const id of [5, 6, 7]) recordOutputToken(state, id);
    const adjust = logitAdjustments(sp, state);
    const draws = Array.from({ length: a.rows }, () => (sp.temperature < GREEDY_TEMPERATURE ? null : pickSampling(sp, state)));
    const specs: PickSpec[] = draws.map((d) => (d ? { kind: 'sample', ...d } : { kind: 'argmax' }));
    const words = new Uint32Array(a.rows * PICK_PARAM_WORDS);
    const entries = new Uint32Array(Math.max(4, a.rows * (adjust?.ids.length ?? 0) * PICK_ADJUST_WORDS));
    specs.forEach((spec, k) => {
      const n = adjust?.ids.length ?? 0;
      writePickParams(words, k, spec, { first: k * n, count: n, logprobs: sp.logprobs });
      if (adjust) writePickAdjustments(entries, k * n, adjust);
    });
    gpu.device.queue.writeBuffer(paramBuf, 0, words);
    const adjustBuf = uploadArray(gpu, 'pick adjustments', entries);
    const op = new RowPick(gpu, { meta: metaBuf, logits: rowsBuf, params: paramBuf, picks: picksBuf, adjust: adjustBuf, info: infoBuf }, a.vocab);
    // Adjustments change the rows in place: every run starts from the original rows.
    const run = () => {
      gpu.device.queue.writeBuffer(rowsBuf, 0, logits);
      return timeGpuPass(gpu, (pass) => op.encode(pass, a.rows));
    };
    await spinUpGpu(gpu, (pass) => op.encode(pass, a.rows), gpu.isSoftware ? 0 : 300);
    const times: number[] = [];
    let timestamps = false;
    for (let i = 0; i < a.repeats; i++) {
      const t = await run();
      times.push(t.ns / 1e6);
      timestamps = t.timestamps;
    }
    const got = new Uint32Array(await readBack(gpu, picksBuf, a.rows * 4));
    let wrong = 0;
    for (let r = 0; r < a.rows; r++) {
      if (got[r] !== pickOnHost(logits.subarray(r * a.vocab, (r + 1) * a.vocab), draws[r], adjust)) wrong++;
    }
    out.push(`  ${name}: ${median(times).toFixed(3)} ms ${timestamps ? 'GPU' : 'wall'}; ${wrong} of ${a.rows} picks differ from the host's float64 pick`);
    adjustBuf.destroy();
  }
  for (const b of [metaBuf, rowsBuf, paramBuf, picksBuf, infoBuf]) b.destroy();
  gpu.destroy();
  releaseGpu();
  process.stdout.write(out.join('\n') + '\n');
}

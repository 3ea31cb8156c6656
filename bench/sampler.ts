// Host-side cost per decode step of what the engine does with logits rows: the copy out of the mapped readback, and
// sampleNext per row for the sampling settings that take different paths (greedy, temperature, top-k, top-p).
//
//   npm run bench:sampler                     # 32 rows × 152064 (Qwen2.5's vocabulary), synthetic logits
//   options: --rows 32  --vocab 152064  --repeats 5
// The row is flat-ish (sin-based logits over ±4 plus every 13th token +3): a wide nucleus, top-p's worst case; real
// model rows are peakier. Every figure is the median over repeats of one step's rows.
import { newSamplingState, sampleNext } from '../engine/sampler.ts';
import type { SamplingParams } from '../engine/types.ts';

function parse(argv: string[]): { rows: number; vocab: number; repeats: number } {
  const a = { rows: 32, vocab: 152064, repeats: 5 };
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i];
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

const params = (p: Partial<SamplingParams>): SamplingParams => ({
  maxTokens: 16, temperature: 1, topP: 1, topK: -1, minP: 0, presencePenalty: 0, frequencyPenalty: 0, repetitionPenalty: 1,
  logitBias: new Map(), seed: 1, stop: [], stopTokenIds: [], ignoreEos: false, logprobs: null, ...p,
});
const cases: [string, Partial<SamplingParams>][] = [
  ['greedy', { temperature: 0 }],
  ['greedy + presence penalty 0.5', { temperature: 0, presencePenalty: 0.5 }],
  ['temperature 1', {}],
  ['temperature 1, top-k 50', { topK: 50 }],
  ['temperature 0.8, top-p 0.95', { temperature: 0.8, topP: 0.95 }],
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

// Summarizes a `mla-serve serve --step-trace FILE` trace: per model, the decode-only steps and the steps that hold
// prompt rows (prefill chunks, recomputes), each with count, share of the model's step time, mean wall and GPU ms,
// and mean sequences / rows; so a served TPOT can be taken apart into decode steps and the prefills between them.
//
//   node --import tsx bench/step-trace.ts steps.jsonl
import { readFileSync } from 'node:fs';

export interface TraceLine {
  model: string;
  t: number;
  seconds: number;
  gpuSeconds: number | null;
  seqs: number;
  rows: number;
  promptRows: number;
  pipelined: boolean;
}

export interface StepGroup {
  steps: number;
  seconds: number;
  /** Mean of the steps that were GPU-timed; null when none was. */
  meanGpuMs: number | null;
  meanMs: number;
  meanSeqs: number;
  meanRows: number;
  meanPromptRows: number;
  pipelined: number;
}

export interface ModelSummary {
  model: string;
  decode: StepGroup;
  prefill: StepGroup;
}

function group(lines: TraceLine[]): StepGroup {
  const n = lines.length;
  const sum = (f: (l: TraceLine) => number) => lines.reduce((s, l) => s + f(l), 0);
  const timed = lines.filter((l) => l.gpuSeconds !== null);
  return {
    steps: n,
    seconds: sum((l) => l.seconds),
    meanGpuMs: timed.length ? (1000 * timed.reduce((s, l) => s + l.gpuSeconds!, 0)) / timed.length : null,
    meanMs: n ? (1000 * sum((l) => l.seconds)) / n : 0,
    meanSeqs: n ? sum((l) => l.seqs) / n : 0,
    meanRows: n ? sum((l) => l.rows) / n : 0,
    meanPromptRows: n ? sum((l) => l.promptRows) / n : 0,
    pipelined: lines.filter((l) => l.pipelined).length,
  };
}

export function summarizeTrace(lines: TraceLine[]): ModelSummary[] {
  const models = [...new Set(lines.map((l) => l.model))];
  return models.map((model) => {
    const mine = lines.filter((l) => l.model === model);
    return { model, decode: group(mine.filter((l) => l.promptRows === 0)), prefill: group(mine.filter((l) => l.promptRows > 0)) };
  });
}

export function parseTrace(text: string): TraceLine[] {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l, i) => {
      try {
        return JSON.parse(l) as TraceLine;
      } catch {
        throw new Error(`step trace line ${i + 1} is not JSON: ${l.slice(0, 80)}`);
      }
    });
}

export function formatSummary(s: ModelSummary[]): string {
  const out = ['model            steps     n  time s  share  mean ms  GPU ms  seqs   rows  prompt rows  pipelined'];
  for (const m of s) {
    const total = m.decode.seconds + m.prefill.seconds;
    for (const [kind, g] of [['decode', m.decode], ['with prompt', m.prefill]] as const) {
      out.push(
        [
          m.model.padEnd(16),
          kind.padEnd(11),
          String(g.steps).padStart(4),
          g.seconds.toFixed(2).padStart(7),
          `${total > 0 ? ((100 * g.seconds) / total).toFixed(0) : '0'} %`.padStart(6),
          g.meanMs.toFixed(2).padStart(8),
          (g.meanGpuMs === null ? '—' : g.meanGpuMs.toFixed(2)).padStart(7),
          g.meanSeqs.toFixed(1).padStart(5),
          g.meanRows.toFixed(1).padStart(6),
          g.meanPromptRows.toFixed(1).padStart(12),
          String(g.pipelined).padStart(10),
        ].join(' '),
      );
    }
  }
  return out.join('\n');
}

if (process.argv[1]?.endsWith('step-trace.ts')) {
  const file = process.argv[2];
  if (!file) {
    process.stderr.write('usage: node --import tsx bench/step-trace.ts STEP_TRACE.jsonl\n');
    process.exit(2);
  }
  console.log(formatSummary(summarizeTrace(parseTrace(readFileSync(file, 'utf8')))));
}

// bench/step-trace.ts: a --step-trace file taken apart per model into decode-only steps and steps with prompt rows.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { formatSummary, parseTrace, summarizeTrace } from '../bench/step-trace.ts';

test('step trace summary: per model, decode steps and steps with prompt rows, their time share and means', () => {
  const line = (model: string, seconds: number, seqs: number, rows: number, promptRows: number, gpuSeconds: number | null, pipelined = false) =>
    JSON.stringify({ model, t: 1, seconds, gpuSeconds, seqs, rows, promptRows, pipelined });
  const text = [
    line('gqa', 0.1, 4, 512 + 3, 512, 0.09),
    line('gqa', 0.01, 4, 4, 0, 0.008, true),
    line('mla', 0.2, 2, 1024 + 1, 1024, null),
    line('gqa', 0.03, 4, 4, 0, 0.01, true),
    line('mla', 0.02, 2, 2, 0, null),
    '',
  ].join('\n');
  const [gqa, mla] = summarizeTrace(parseTrace(text));
  assert.equal(gqa.model, 'gqa');
  assert.deepEqual([gqa.decode.steps, gqa.decode.pipelined, gqa.prefill.steps], [2, 2, 1]);
  assert.ok(Math.abs(gqa.decode.seconds - 0.04) < 1e-12 && Math.abs(gqa.decode.meanMs - 20) < 1e-9);
  assert.ok(Math.abs(gqa.decode.meanGpuMs! - 9) < 1e-9);
  assert.deepEqual([gqa.prefill.meanRows, gqa.prefill.meanPromptRows, gqa.prefill.meanSeqs], [515, 512, 4]);
  assert.equal(mla.decode.meanGpuMs, null);
  assert.equal(mla.prefill.meanPromptRows, 1024);
  const table = formatSummary([gqa, mla]);
  // gqa: 0.1 s of 0.14 s in the prompt step (71 %), 29 % in decode steps.
  assert.match(table, /gqa +decode +2 +0\.04 +29 % +20\.00 +9\.00/);
  assert.match(table, /mla +with prompt +1 +0\.20 +91 % +200\.00 +— /);
  assert.throws(() => parseTrace('{"model":1}\nnot json'), /line 2 is not JSON/);
});

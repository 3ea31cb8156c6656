// bench:decode as the device runs call it (bench/device-run.sh): its --mla-* flags reach the MLA block — the dispatch
// labels of its profile name the kernels the flags chose — and a bad value stops it with the flag's name.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

interface DecodeJson {
  args: { mlaBlock: { attentionTuning: Record<string, unknown>; headDecodeKernel?: string } };
  models: Array<{
    model: string;
    configs: Array<{ batch: number; tokPerS: number; profile?: Array<{ label: string; count: number; ms: number }> }>;
    prefillProfile?: { rows: number; profile: Array<{ label: string; count: number; ms: number }> };
  }>;
}

function runBench(flags: string[]): { status: number | null; stderr: string; json?: DecodeJson } {
  const dir = mkdtempSync(join(tmpdir(), 'bench-decode-'));
  const file = join(dir, 'out.json');
  try {
    const r = spawnSync(
      process.execPath,
      ['--import', 'tsx', 'bench/decode.ts', '--models', 'tiny-qwen2-mla', '--weight-dtype', 'int8', '--kv-cache-dtype', 'int8', '--batches', '2', '--contexts', '16', '--warmup', '1', '--steps', '2', '--logits', 'argmax', '--pipeline', 'on', '--profile', ...flags, '--json', file],
      { encoding: 'utf8', timeout: 240_000 },
    );
    let json: DecodeJson | undefined;
    if (r.status === 0) json = JSON.parse(readFileSync(file, 'utf8')) as DecodeJson;
    return { status: r.status, stderr: r.stderr, json };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test('bench:decode --mla-* flags choose the MLA kernels its profile then names (dot4 with the emulated warp softmax and a 32-token window, the three passes with one latent part; staged, sliced or W8A8 head products; the decode front by default and the back by flag; the one-pass kernel\'s dot4 form; W8A8 head products in a prompt chunk)', () => {
  for (const [flags, attentionLabel, headLabel] of [
    [['--mla-int8-products', 'dot4', '--mla-dot4-softmax', 'emulated', '--mla-window', '32', '--mla-head-kernel', 'staged'], /int8 dot4 .* w32 .*emulated softmax/, /head-matmul .* staged r8/],
    [['--mla-int8-products', 'dot4', '--mla-dot4-prefetch', 'off', '--mla-dot4-value-rounds', '1', '--mla-head-kernel', 'sliced', '--mla-head-slices', '8'], /int8 dot4 .* w64 q staged$/, /head-matmul .* mr2 s8/],
    [['--mla-int8-products', 'three-pass', '--mla-3pass-parts', '1', '--mla-head-kernel', 'w8a8'], /3-pass values .* parts 1$/, /head-matmul .* w8a8 dot4$/],
    // The default decode front (W_UK with RoPE, the latent write and the query quantizer), and the back asked for.
    [['--mla-int8-products', 'dot4', '--mla-back-rows', '8'], /mla decode front .* g1$/, /mla decode back .* g1$/],
    // The one-pass tensor-core kernel's dot4 form through the runner: 32-token blocks, its chunks, the front beside it.
    [['--mla-int8-products', 'flash-dot4', '--block-size', '32', '--contexts', '32'], /int8 flash .* dot4 scores dot4 values pq storage$/, /mla decode front .* bs32 g1$/],
  ] as const) {
    const r = runBench([...flags]);
    assert.equal(r.status, 0, `bench:decode ${flags.join(' ')} exited ${r.status}: ${r.stderr.slice(-2000)}`);
    const run = r.json!.models[0].configs[0];
    assert.equal(run.batch, 2);
    assert.ok(run.tokPerS > 0, `tok/s ${run.tokPerS}`);
    const labels = (run.profile ?? []).map((p) => p.label);
    assert.ok(labels.some((l) => attentionLabel.test(l)), `${flags.join(' ')}: no dispatch like ${attentionLabel} in ${labels.join(' | ')}`);
    assert.ok(labels.some((l) => headLabel.test(l)), `${flags.join(' ')}: no dispatch like ${headLabel} in ${labels.join(' | ')}`);
  }
  // The template's 16-row prefill chunk, from 8 rows on a prompt step: W8A8 head products there (--mla-head-prefill).
  const pre = runBench(['--mla-int8-products', 'dot4', '--mla-head-prefill', 'w8a8', '--mla-head-tiled-from', '8']);
  assert.equal(pre.status, 0, `bench:decode --mla-head-prefill w8a8 exited ${pre.status}: ${pre.stderr.slice(-2000)}`);
  const chunk = pre.json!.models[0].prefillProfile!;
  const preLabels = chunk.profile.map((p) => p.label);
  assert.ok(chunk.rows >= 8, `prefill chunk of ${chunk.rows} rows`);
  assert.ok(preLabels.some((l) => /head-matmul .* w8a8 (dot4|tensor cores)$/.test(l)), `no W8A8 head products in the prefill chunk: ${preLabels.join(' | ')}`);
  assert.ok(!preLabels.some((l) => /head-matmul .* tiled/.test(l)), `the tiled kernel ran in the prefill chunk: ${preLabels.join(' | ')}`);
  const bad = runBench(['--mla-dot4-softmax', 'warp']);
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /--mla-dot4-softmax is workgroup, subgroup or emulated, got warp/);
});

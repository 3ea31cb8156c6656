// `generate` and `eval-ppl` as a user runs them: greedy text equals the float64 reference; nats/token equals the reference's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { loadModel } from '../model/load.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import type { GqaConfig } from '../model/config.ts';
import { argmax } from '../engine/sampler.ts';
import { scoreChunks, textChunks } from '../engine/perplexity.ts';

const MODEL = '../shared/models/stories260K/stories260K.gguf';
const TEXT = '../shared/data/tinystories_valid_a.txt';

function cli(args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['bin/mla-serve.js', ...args], { encoding: 'utf8', timeout: 900_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

async function referenceGreedy(promptText: string, n: number): Promise<string> {
  const m = await loadModel(MODEL);
  const ids = [m.tokenizer.bosId!, ...m.tokenizer.encode(promptText)];
  const ref = new ReferenceGqa(m.config as GqaConfig, m.weights);
  let logits = ref.forward(ids, { logits: 'last' })[0];
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = argmax(logits);
    if (t === m.config.eosId) break;
    out.push(t);
    logits = ref.forward([t])[0];
  }
  return m.tokenizer.decode([...ids, ...out]).slice(m.tokenizer.decode(ids).length);
}

test('generate --temperature 0 on the GPU (f32) prints the reference greedy text and its figures', async () => {
  const want = await referenceGreedy('Once upon a time', 40);
  const r = cli(['generate', '--model', MODEL, '--prompt', 'Once upon a time', '--max-tokens', '40', '--temperature', '0', '--weight-dtype', 'f32', '--cache-dtype', 'f32', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const f = JSON.parse(r.stdout);
  assert.equal(f.text, want);
  assert.equal(f.promptTokens, 5);
  assert.equal(f.generatedTokens, 40);
  assert.equal(f.attention, 'gqa');
  // 5 layers × 2 (K and V) × 4 kv heads × 8 dims × 4 bytes (f32 cache).
  assert.equal(f.kvBytesPerToken, 5 * 2 * 4 * 8 * 4);
  assert.ok(f.decodeTokensPerSecond > 0 && f.prefillTokensPerSecond > 0);
  assert.ok(typeof f.adapter === 'string' && f.adapter.length > 0);
});

test('generate streams the prompt and the story, then one line of figures (CPU reference path)', async () => {
  const want = await referenceGreedy('Once upon a time', 60);
  const s = cli(['generate', '--model', MODEL, '--prompt', 'Once upon a time', '--max-tokens', '60', '--temperature', '0', '--cpu']);
  assert.equal(s.code, 0, s.stderr);
  assert.ok(s.stdout.startsWith('Once upon a time' + want + '\n\n'), s.stdout);
  assert.match(s.stdout, /\n5 prompt tokens, 60 generated \(length\); prefill [\d.]+ tok\/s, decode [\d.]+ tok\/s; adapter cpu .*; gqa attention, KV 2560 bytes\/token \(f64\)/);
});

test('eval-ppl on the GPU (f32): nats/token equals the float64 reference on the first paragraphs to 1e-4', async () => {
  const m = await loadModel(MODEL);
  const chunks = textChunks(readFileSync(TEXT, 'utf8'), m.tokenizer, 512).slice(0, 4);
  const ref = new ReferenceGqa(m.config as GqaConfig, m.weights);
  const want = await scoreChunks(chunks, (c) => {
    ref.reset();
    return ref.forward(c);
  });
  const r = cli(['eval-ppl', '--model', MODEL, '--text', TEXT, '--limit', '4', '--weight-dtype', 'f32', '--cache-dtype', 'f32', '--batch-tokens', '256', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const f = JSON.parse(r.stdout);
  assert.equal(f.chunks, 4);
  assert.equal(f.predictedTokens, want.predicted);
  assert.ok(Math.abs(f.natsPerToken - want.natsPerToken) < 1e-4, `GPU ${f.natsPerToken} vs reference ${want.natsPerToken}`);
  assert.ok(Math.abs(f.perplexity - Math.exp(want.natsPerToken)) < 1e-3);
});

test('eval-ppl on the CPU reference path gives the reference figure; bad arguments say what is wrong', async () => {
  const r = cli(['eval-ppl', '--model', MODEL, '--text', TEXT, '--limit', '5', '--cpu', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const m = await loadModel(MODEL);
  const chunks = textChunks(readFileSync(TEXT, 'utf8'), m.tokenizer, 512).slice(0, 5);
  const ref = new ReferenceGqa(m.config as GqaConfig, m.weights);
  const want = await scoreChunks(chunks, (c) => {
    ref.reset();
    return ref.forward(c);
  });
  assert.ok(Math.abs(JSON.parse(r.stdout).natsPerToken - want.natsPerToken) < 1e-6);

  const noModel = cli(['generate', '--prompt', 'x']);
  assert.equal(noModel.code, 2);
  assert.match(noModel.stderr, /--model is required/);
  const badTemp = cli(['generate', '--model', MODEL, '--temperature=-1']);
  assert.equal(badTemp.code, 2);
  assert.match(badTemp.stderr, /--temperature must be a number >= 0; got "-1"/);
  const noText = cli(['eval-ppl', '--model', MODEL, '--text', '/nonexistent/file.txt', '--cpu']);
  assert.equal(noText.code, 1);
  assert.match(noText.stderr, /cannot read the text file \/nonexistent\/file\.txt/);
  const dot4NoInt8 = cli(['eval-ppl', '--model', MODEL, '--text', TEXT, '--mla-int8-attention', 'dot4']);
  assert.equal(dot4NoInt8.code, 2);
  assert.match(dot4NoInt8.stderr, /--mla-int8-attention dot4 computes on an int8 latent cache; add --kv-cache-dtype int8 \(the cache is f16\)/);
  const badProducts = cli(['generate', '--model', MODEL, '--kv-cache-dtype', 'int8', '--mla-int8-attention', 'tc']);
  assert.equal(badProducts.code, 2);
  assert.match(badProducts.stderr, /--mla-int8-attention must be one of auto, f32, dot4, three-pass, flash; got "tc"/);
  const badHeads = cli(['eval-ppl', '--model', MODEL, '--text', TEXT, '--mla-head-kernel', 'int4']);
  assert.equal(badHeads.code, 2);
  assert.match(badHeads.stderr, /--mla-head-kernel must be one of auto, staged, w8a8, fused; got "int4"/);
});

// The converted checkpoint: convert → write → load → reference forward equals the in-memory model bit for bit (f32),
// DeepSeek names and config, the same seed gives identical files, and impossible or unsupported inputs are refused.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadModel } from '../model/load.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import { readSafetensors } from '../model/safetensors.ts';
import { mlaWeightsToF32 } from '../model/transmla/convert.ts';
import { syntheticSource } from '../model/synthetic.ts';
import { writeSafetensors } from '../model/safetensors.ts';
import type { GqaConfig } from '../model/config.ts';
import { copyFileSync } from 'node:fs';
import { convertCheckpoint, parseConvertArgs, type ConvertCommandOptions } from '../server/convert-command.ts';

const tmp = mkdtempSync(join(tmpdir(), 'transmla-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const STORIES = '../shared/models/stories260K/stories260K.gguf';
const TEXT = '../shared/data/tinystories_valid_a.txt';

function options(out: string, extra: string[] = []): ConvertCommandOptions {
  const o = parseConvertArgs([
    '--model', STORIES, '--max-seq-len', '512', '--out', out, '--calib-text', TEXT,
    '--calib-samples', '8', '--eval-chunks', '0', '--rope-dim', '4', '--kv-lora-rank', '16', '--freqfold', '2', ...extra,
  ]);
  assert.notEqual(o, 'help');
  return o as ConvertCommandOptions;
}

function filesOf(dir: string): Map<string, Buffer> {
  return new Map(readdirSync(dir).sort().map((f) => [f, readFileSync(join(dir, f))]));
}

for (const [name, extra] of [['full q_proj', []], ['low-rank query', ['--q-lora-rank', '24']]] as [string, string[]][]) {
  test(`round trip (${name}): convert → write → load → reference forward is bit-identical to the in-memory model`, async () => {
    const out = join(tmp, `rt-${extra.length}`);
    const { result, files } = await convertCheckpoint(options(out, [...extra, '--dtype', 'f32']));
    assert.deepEqual(files.sort(), ['config.json', 'model.safetensors', 'tokenizer.model', 'tokenizer_config.json']);
    const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'));
    assert.equal(cfg.model_type, 'deepseek_v3');
    assert.deepEqual(cfg.architectures, ['DeepseekV3ForCausalLM']);
    assert.equal(cfg.num_key_value_heads, 8);
    assert.equal(cfg.kv_lora_rank, 16);
    assert.equal(cfg.qk_rope_head_dim, 4);
    assert.equal(cfg.qk_nope_head_dim, 8);
    assert.equal(cfg.v_head_dim, 8);
    assert.equal(cfg.q_lora_rank, extra.length ? 24 : null);
    assert.equal(cfg.qk_latent_layernorm, false);
    assert.equal(cfg.rope_interleave, true);
    assert.equal(cfg.n_routed_experts, null);
    assert.equal(cfg.rope_theta, 10000);
    assert.equal(cfg.max_position_embeddings, 512);
    const names = [...readSafetensors(join(out, 'model.safetensors')).tensors.keys()];
    const attn = extra.length ? ['q_a_proj', 'q_b_proj'] : ['q_proj'];
    for (const t of [...attn, 'kv_a_proj_with_mqa', 'kv_b_proj', 'o_proj']) assert.ok(names.includes(`model.layers.4.self_attn.${t}.weight`), `missing ${t}`);
    assert.ok(!names.some((n) => n.includes('layernorm.weight') && n.includes('self_attn')), 'no latent layernorm weights are written');
    assert.ok(!names.includes('lm_head.weight'), 'stories260K ties its classifier');

    const loaded = await loadModel(out);
    assert.equal(loaded.config.attention, 'mla');
    if (loaded.config.attention !== 'mla') return;
    assert.deepEqual(loaded.config, result.config);
    const sourceTok = (await loadModel(STORIES, { maxSeqLen: 512 })).tokenizer;
    const sample = 'Once upon a time, Lily saw a big red ball. "Wow!" she said. Ünïcödé 日本';
    assert.deepEqual(loaded.tokenizer.encode(sample), sourceTok.encode(sample));
    assert.equal(loaded.tokenizer.bosId, 1);
    assert.equal(loaded.tokenizer.eosId, 2);

    const toks = [1, ...sourceTok.encode('One day, Tom went to the park with his dog. They played all day.')];
    const inMemory = new ReferenceMla(result.config, mlaWeightsToF32(result.weights)).forward(toks);
    const fromDisk = new ReferenceMla(loaded.config, loaded.weights).forward(toks);
    for (let t = 0; t < toks.length; t++) assert.deepEqual(fromDisk[t], inMemory[t], `logits of token ${t} differ`);
  });
}

test('a Hugging Face Qwen2-style directory (rotate_half RoPE, q/k/v biases, tokenizer.json) converts and loads back bit-identically', async () => {
  // A small random Qwen2 checkpoint on disk, with GPT-2's real tokenizer.json (vocabulary 50257).
  const dir = join(tmp, 'qwen2-src');
  mkdirSync(dir, { recursive: true });
  const config: GqaConfig = {
    arch: 'qwen2', attention: 'gqa', dim: 32, hiddenDim: 48, nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 8, vocabSize: 50257,
    maxSeqLen: 256, ropeTheta: 1e6, rmsEps: 1e-6, tiedEmbeddings: false, bosId: 50256, eosId: 50256, ropeLayout: 'rotate_half', attentionBias: true,
  };
  const src = syntheticSource(config, { seed: 3, std: 0.2 });
  writeSafetensors(join(dir, 'model.safetensors'), Object.fromEntries(src.tensors.map((t) => [t.name, { shape: t.shape, data: src.f32(t.name) }])), 'f32');
  writeFileSync(
    join(dir, 'config.json'),
    JSON.stringify({
      model_type: 'qwen2', hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
      vocab_size: 50257, max_position_embeddings: 256, rope_theta: 1e6, rms_norm_eps: 1e-6, tie_word_embeddings: false,
      bos_token_id: 50256, eos_token_id: 50256, hidden_act: 'silu',
    }),
  );
  copyFileSync('../shared/models/gpt2-tokenizer/tokenizer.json', join(dir, 'tokenizer.json'));

  const out = join(tmp, 'qwen2-mla');
  const { result, files } = await convertCheckpoint({ ...options(out, ['--dtype', 'f32', '--kv-lora-rank', '20']), model: dir, maxSeqLen: undefined });
  assert.deepEqual(files.sort(), ['config.json', 'model.safetensors', 'tokenizer.json']);
  const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'));
  assert.equal(cfg.attention_bias, true);
  assert.equal(cfg.transmla.source_rope_layout, 'rotate_half');
  const names = [...readSafetensors(join(out, 'model.safetensors')).tensors.keys()];
  assert.ok(names.includes('model.layers.1.self_attn.q_proj.bias') && names.includes('model.layers.1.self_attn.kv_a_proj_with_mqa.bias'));
  assert.ok(names.includes('lm_head.weight'));
  const loaded = await loadModel(out);
  assert.deepEqual(loaded.config, result.config);
  const toks = [50256, ...loaded.tokenizer.encode('The quick brown fox jumps over the lazy dog.')];
  const inMemory = new ReferenceMla(result.config, mlaWeightsToF32(result.weights)).forward(toks);
  const fromDisk = new ReferenceMla(result.config, loaded.weights).forward(toks);
  for (let t = 0; t < toks.length; t++) assert.deepEqual(fromDisk[t], inMemory[t], `logits of token ${t} differ`);
});

test('converting twice with the same seed gives identical files; another seed changes the weights', async () => {
  const a = join(tmp, 'seed-a');
  const b = join(tmp, 'seed-b');
  const c = join(tmp, 'seed-c');
  await convertCheckpoint(options(a, ['--dtype', 'bf16', '--seed', '7']));
  await convertCheckpoint(options(b, ['--dtype', 'bf16', '--seed', '7']));
  await convertCheckpoint(options(c, ['--dtype', 'bf16', '--seed', '8']));
  const fa = filesOf(a);
  const fb = filesOf(b);
  assert.deepEqual([...fa.keys()], [...fb.keys()]);
  for (const [f, bytes] of fa) assert.ok(bytes.equals(fb.get(f)!), `${f} differs between two conversions with seed 7`);
  assert.ok(!fa.get('model.safetensors')!.equals(filesOf(c).get('model.safetensors')!), 'seed 8 samples other calibration chunks');
  const cfg = JSON.parse(fa.get('config.json')!.toString());
  assert.equal(cfg.torch_dtype, 'bfloat16');
});

test('refusals name the numbers', async () => {
  const out = join(tmp, 'refused');
  await assert.rejects(convertCheckpoint(options(out, ['--kv-lora-rank', '61'])), /R = 61 .*2L − r = 2·4·8 − 4 = 60/);
  await assert.rejects(convertCheckpoint(options(out, ['--rope-dim', '3'])), /r = 3 must be an even divisor of head_dim 8.*2, 4, 8/);
  await assert.rejects(convertCheckpoint(options(out, ['--rope-dim', '6'])), /r = 6 must be an even divisor of head_dim 8/);
  await assert.rejects(convertCheckpoint(options(out, ['--freqfold', '1'])), /f = 1 must be a multiple of c = head_dim\/r = 8\/4 = 2; try 2, 4/);
  await assert.rejects(convertCheckpoint(options(out, ['--freqfold', '3'])), /f = 3 must be a multiple of c/);
  await assert.rejects(convertCheckpoint(options(out, ['--q-lora-rank', '500'])), /q_lora_rank 500 must be an integer in 1 … min.*= min\(96, 64\) = 64/);

  // An output directory that is not empty is not overwritten silently.
  mkdirSync(join(tmp, 'busy'), { recursive: true });
  writeFileSync(join(tmp, 'busy', 'keep.txt'), 'x');
  await assert.rejects(convertCheckpoint({ ...options(join(tmp, 'busy')), force: false }), /not empty.*--force/);

  // Unsupported architectures, read off config.json before any weight is loaded.
  const hf = (name: string, cfg: Record<string, unknown>) => {
    const dir = join(tmp, name);
    mkdirSync(dir, { recursive: true });
    const base = { hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 100, max_position_embeddings: 32768 };
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...base, ...cfg }));
    return dir;
  };
  const run = (dir: string) => convertCheckpoint({ ...options(join(tmp, 'unused')), model: dir });
  await assert.rejects(run(hf('qwen3', { model_type: 'qwen3' })), /qwen3.*q_norm\/k_norm/);
  await assert.rejects(run(hf('mixtral', { model_type: 'mixtral' })), /mixture-of-experts/);
  await assert.rejects(run(hf('mistral-swa', { model_type: 'mistral', sliding_window: 4096 })), /sliding_window 4096 < max_position_embeddings 32768/);
  // An MLA checkpoint is already converted (rt-0 is the first round-trip test's output; tests in a file run in order).
  const mla = join(tmp, 'rt-0');
  await assert.rejects(run(mla), /already MLA/);
});

test('argument errors are usage errors', () => {
  assert.throws(() => parseConvertArgs(['--out', 'x', '--calib-text', 'y']), /--model is required/);
  assert.throws(() => parseConvertArgs(['--model', 'm', '--out', 'x', '--calib-text', 'y', '--dtype', 'f8']), /--dtype/);
  assert.throws(() => parseConvertArgs(['--model', 'm', '--out', 'x', '--calib-text', 'y', '--freqfold', 'best']), /--freqfold/);
  assert.equal(parseConvertArgs(['--help']), 'help');
});

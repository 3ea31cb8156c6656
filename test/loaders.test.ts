// Model loaders against real files: GGUF ≡ llama2.c .bin, F16/Q8_0 dequantization, safetensors round trips, HF Llama/Qwen2/MLA directories, clear errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { GgufFile, loadGgufModel } from '../model/gguf.ts';
import { loadLlama2cModel } from '../model/llama2c.ts';
import { loadModel } from '../model/load.ts';
import { interleavedToRotateHalfRows } from '../model/hf.ts';
import { resolveModelPath } from '../model/hub.ts';
import { f16BitsToF32, f32ToBf16Bits, f32ToF16Bits, readSafetensors, SafetensorsFile, writeSafetensors } from '../model/safetensors.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import type { GqaConfig, MlaConfig } from '../model/config.ts';
import type { GqaLayerWeights, MlaLayerWeights, ModelWeights, Tensor } from '../model/weights.ts';
import { ggufFromModel, STORIES, writeGguf, writeHfLlamaDir, type MetaValue } from './loaders-fixtures.ts';

const tmp = mkdtempSync(join(tmpdir(), 'mla-loaders-'));
process.on('exit', () => rmSync(tmp, { recursive: true, force: true }));

const GGUF = `${STORIES}/stories260K.gguf`;
const BIN = `${STORIES}/stories260K.bin`;
const LAYER_KEYS = ['attnNorm', 'wq', 'wk', 'wv', 'wo', 'ffnNorm', 'wGate', 'wUp', 'wDown'] as const;

function assertSameTensor(a: Tensor, b: Tensor, what: string): void {
  assert.deepEqual(a.shape, b.shape, `${what} shape`);
  assert.equal(a.data.length, b.data.length, `${what} length`);
  for (let i = 0; i < a.data.length; i++) {
    if (!Object.is(a.data[i], b.data[i])) assert.fail(`${what}[${i}]: ${a.data[i]} !== ${b.data[i]}`);
  }
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Deterministic pseudo-random numbers (xorshift), so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

function randomTensor(shape: number[], r: () => number, scale = 1): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = (r() * 2 - 1) * scale;
  return { shape, data };
}

test('stories260K: GGUF and llama2.c .bin load to identical weights and config', async () => {
  const g = await loadModel(GGUF, { maxSeqLen: 512 });
  const b = await loadModel(BIN);
  assert.equal(g.format, 'gguf');
  assert.equal(b.format, 'llama2c');
  const expected = { dim: 64, hiddenDim: 172, nLayers: 5, nHeads: 8, nKvHeads: 4, headDim: 8, vocabSize: 512, tiedEmbeddings: true };
  for (const m of [g, b]) {
    const c = m.config as GqaConfig;
    assert.equal(c.attention, 'gqa');
    for (const [k, v] of Object.entries(expected)) assert.equal(c[k as keyof GqaConfig], v, `${m.format} ${k}`);
    assert.equal(c.ropeLayout, 'interleaved');
    assert.equal(m.weights.output, m.weights.tokenEmbedding, `${m.format}: tied classifier is the embedding object`);
  }
  assert.deepEqual(g.config, b.config);
  assertSameTensor(g.weights.tokenEmbedding, b.weights.tokenEmbedding, 'tokenEmbedding');
  assertSameTensor(g.weights.finalNorm, b.weights.finalNorm, 'finalNorm');
  assert.equal(g.weights.layers.length, 5);
  for (let i = 0; i < 5; i++) {
    const gl = g.weights.layers[i] as GqaLayerWeights;
    const bl = b.weights.layers[i] as GqaLayerWeights;
    for (const k of LAYER_KEYS) assertSameTensor(gl[k], bl[k], `layer ${i} ${k}`);
  }
  // The metadata's own context length is kept unless the caller overrides it.
  const raw = loadGgufModel(GGUF);
  assert.equal(raw.config.maxSeqLen, 2048);
  assert.equal(raw.metadataContextLength, 2048);
  assert.equal(b.config.maxSeqLen, 512);
  assert.equal(raw.config.rmsEps, 1e-5, 'f32 metadata read back as the decimal the writer meant');
});

test('GGUF F16, BF16 and Q8_0 tensors dequantize to the known values', () => {
  // Hand-written half-precision bit patterns and their exact values.
  const f16Cases: [number, number][] = [
    [0x3c00, 1], [0xc000, -2], [0x3800, 0.5], [0x7bff, 65504], [0x0001, 2 ** -24], [0x0400, 2 ** -14],
    [0x3555, 0.333251953125], [0x8000, -0], [0x0000, 0], [0xfbff, -65504], [0x03ff, 1023 * 2 ** -24], [0x4248, 3.140625],
  ];
  const bf16Cases: [number, number][] = [[0x3f80, 1], [0xc040, -3], [0x3e80, 0.25], [0x4049, 3.140625], [0x0001, 2 ** -133]];
  const f16 = Buffer.alloc(2 * 16);
  const f16Want = new Float32Array(16);
  for (let i = 0; i < 16; i++) {
    const [bits, v] = f16Cases[i % f16Cases.length];
    f16.writeUInt16LE(bits, 2 * i);
    f16Want[i] = v;
  }
  const bf16 = Buffer.alloc(2 * 5);
  bf16Cases.forEach(([bits], i) => bf16.writeUInt16LE(bits, 2 * i));
  // Q8_0, two blocks: scale 0.5 (0x3800) with q = i − 16; scale 0x2e66 = 0.0999755859375 with q = 127 − 8i.
  const q8 = Buffer.alloc(68);
  const q8Want = new Float32Array(64);
  q8.writeUInt16LE(0x3800, 0);
  q8.writeUInt16LE(0x2e66, 34);
  for (let i = 0; i < 32; i++) {
    q8.writeInt8(i - 16, 2 + i);
    q8Want[i] = (i - 16) * 0.5;
    const q = Math.max(-128, 127 - 8 * i);
    q8.writeInt8(q, 36 + i);
    q8Want[32 + i] = q * 0.0999755859375;
  }
  const path = join(tmp, 'quant.gguf');
  writeGguf(
    path,
    [['general.architecture', { type: 'string', value: 'test' }], ['general.alignment', { type: 'u32', value: 32 }]],
    [
      { name: 'half', dims: [8, 2], type: 1, bytes: f16 },
      { name: 'brain', dims: [5], type: 30, bytes: bf16 },
      { name: 'q8', dims: [32, 2], type: 8, bytes: q8 },
    ],
  );
  const f = GgufFile.open(path);
  try {
    assert.deepEqual(f.tensors.get('half')!.dims, [8, 2]);
    const half = f.read('half');
    for (let i = 0; i < 16; i++) assert.ok(Object.is(half[i], f16Want[i]), `f16 ${i}: ${half[i]} vs ${f16Want[i]}`);
    assert.deepEqual(Array.from(f.read('brain')), bf16Cases.map(([, v]) => v));
    assert.deepEqual(Array.from(f.read('q8')), Array.from(q8Want));
  } finally {
    f.close();
  }
});

test('stories260K re-encoded as F16 and Q8_0 GGUF loads within each format’s rounding', async () => {
  const src = loadGgufModel(GGUF, { maxSeqLen: 512 });
  const f = GgufFile.open(GGUF);
  const vocab = {
    tokens: f.get('tokenizer.ggml.tokens') as string[],
    scores: (f.get('tokenizer.ggml.scores') as number[]).map(Number),
    types: (f.get('tokenizer.ggml.token_type') as number[]).map(Number),
  };
  f.close();
  for (const type of [1, 8] as const) {
    const path = join(tmp, `stories-${type}.gguf`);
    const { metadata, tensors } = ggufFromModel(src.config, src.weights, vocab, type);
    writeGguf(path, metadata, tensors);
    const m = await loadModel(path, { maxSeqLen: 512 });
    assert.deepEqual({ ...m.config, rmsEps: 0 }, { ...src.config, rmsEps: 0 });
    assert.deepEqual(m.tokenizer.encode('Once upon a time'), src.tokenizer.encode('Once upon a time'));
    const pairs: [Tensor, Tensor, string][] = [[m.weights.tokenEmbedding, src.weights.tokenEmbedding, 'emb']];
    m.weights.layers.forEach((l, i) => {
      for (const k of LAYER_KEYS) pairs.push([(l as GqaLayerWeights)[k], (src.weights.layers[i] as GqaLayerWeights)[k], `layer ${i} ${k}`]);
    });
    for (const [got, want, what] of pairs) {
      assert.deepEqual(got.shape, want.shape);
      for (let i = 0; i < want.data.length; i++) {
        const x = want.data[i];
        let bound: number;
        if (type === 1) bound = Math.max(Math.abs(x) * 2 ** -11, 2 ** -25);
        else {
          // Q8_0: half a quantization step of the block, plus the f16 rounding of the scale times 127.
          const b = Math.floor(i / 32) * 32;
          let amax = 0;
          for (let j = b; j < b + 32; j++) amax = Math.max(amax, Math.abs(want.data[j]));
          bound = (amax / 127) * (0.5 + 127 * 2 ** -11) + 1e-12;
        }
        if (Math.abs(got.data[i] - x) > bound) assert.fail(`${type === 1 ? 'F16' : 'Q8_0'} ${what}[${i}]: ${got.data[i]} vs ${x} (bound ${bound})`);
      }
      // Exact expected values: the test's own encoding, decoded independently.
      // (Norm vectors stay F32 in the file, as llama.cpp writes them.)
      if (type === 1 && !what.includes('Norm')) for (let i = 0; i < 64; i++) assert.equal(got.data[i], f16BitsToF32(f32ToF16Bits(want.data[i])), `${what}[${i}]`);
    }
    // Q8_0 really quantized (not a silent F32 path): most values moved.
    if (type === 8) assert.ok(maxAbsDiff(m.weights.tokenEmbedding.data, src.weights.tokenEmbedding.data) > 0);
  }
});

/** Nearest binary16 value by search over all finite halves, ties to the even bit pattern: an oracle independent of f32ToF16Bits. */
const halfValues = (() => {
  const vals: { v: number; bits: number }[] = [];
  for (let h = 0; h < 0x7c00; h++) vals.push({ v: f16BitsToF32(h), bits: h });
  return vals;
})();
function nearestF16(x: number): number {
  const a = Math.abs(x);
  let value: number;
  if (a >= 65520) value = Infinity; // halfway to 2^16 and above rounds to infinity
  else {
    let lo = 0;
    let hi = halfValues.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (halfValues[mid].v <= a) lo = mid;
      else hi = mid;
    }
    const dl = a - halfValues[lo].v;
    const dh = halfValues[hi].v - a;
    value = dl < dh || (dl === dh && (halfValues[lo].bits & 1) === 0) ? halfValues[lo].v : halfValues[hi].v;
  }
  return x < 0 || Object.is(x, -0) ? -value : value;
}
function nearestBf16(x: number): number {
  if (!Number.isFinite(x) || x === 0) return x;
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer);
  const down = new Uint32Array([u[0] & 0xffff0000]);
  const up = new Uint32Array([down[0] + 0x10000]);
  const vd = new Float32Array(down.buffer)[0];
  const vu = new Float32Array(up.buffer)[0];
  const dd = Math.abs(x - vd);
  const du = Math.abs(vu - x);
  return dd < du || (dd === du && ((down[0] >>> 16) & 1) === 0) ? vd : vu;
}

test('safetensors: f32/f16/bf16 write → read round trip with round-to-nearest-even, byte-identical rewrites', () => {
  const r = rng(7);
  const special = [0, -0, 1, -1, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504, 65519, 65520, 2 ** -25, 3 * 2 ** -25, 2 ** -24, 1e-8, 3.14159, 1e30, -1e-30, 1 + 2 ** -8, 1 + 3 * 2 ** -8];
  const wide = new Float32Array(4000);
  for (let i = 0; i < wide.length; i++) wide[i] = i < special.length ? special[i] : (r() * 2 - 1) * 10 ** (r() * 12 - 6);
  const tensors = {
    'b.weight': { shape: [40, 100], data: wide },
    'a.bias': { shape: [3], data: new Float32Array([0.1, -0.2, 0.3]) },
    'scalar.like': { shape: [1, 1], data: new Float32Array([42]) },
  };
  for (const dtype of ['f32', 'f16', 'bf16'] as const) {
    const p1 = join(tmp, `rt-${dtype}.safetensors`);
    const p2 = join(tmp, `rt-${dtype}-again.safetensors`);
    writeSafetensors(p1, tensors, dtype, { format: 'pt', source: 'test' });
    // Same tensors inserted in another order: the bytes must not change.
    writeSafetensors(p2, { 'scalar.like': tensors['scalar.like'], 'a.bias': tensors['a.bias'], 'b.weight': tensors['b.weight'] }, dtype, { source: 'test', format: 'pt' });
    const bytes = readFileSync(p1);
    assert.ok(bytes.equals(readFileSync(p2)), `${dtype}: two writes differ`);
    assert.equal((8 + Number(bytes.readBigUInt64LE(0))) % 8, 0, 'data section 8-byte aligned');
    const back = readSafetensors(p1);
    assert.deepEqual(back.metadata, { format: 'pt', source: 'test' });
    assert.deepEqual([...back.tensors.keys()].sort(), ['a.bias', 'b.weight', 'scalar.like']);
    for (const [name, t] of Object.entries(tensors)) {
      const got = back.tensors.get(name)!;
      assert.deepEqual(got.shape, t.shape);
      for (let i = 0; i < t.data.length; i++) {
        const x = t.data[i];
        const want = dtype === 'f32' ? x : dtype === 'f16' ? nearestF16(x) : nearestBf16(x);
        if (!Object.is(got.data[i], Math.fround(want))) assert.fail(`${dtype} ${name}[${i}]: ${x} → ${got.data[i]}, expected ${want}`);
      }
    }
  }
  // Ties to even, by hand: 1 + 2^-11 → 1; 1 + 3·2^-11 → 1 + 2^-9; 65520 → Inf; 3·2^-25 → 2^-23.
  assert.equal(f32ToF16Bits(1 + 2 ** -11), 0x3c00);
  assert.equal(f32ToF16Bits(1 + 3 * 2 ** -11), 0x3c02);
  assert.equal(f32ToF16Bits(65520), 0x7c00);
  assert.equal(f32ToF16Bits(3 * 2 ** -25), 0x0002);
  assert.equal(f32ToBf16Bits(1 + 2 ** -8), 0x3f80);
  assert.equal(f32ToBf16Bits(1 + 3 * 2 ** -8), 0x3f82);
});

async function storiesGguf(): Promise<{ config: GqaConfig; weights: ModelWeights }> {
  const m = await loadModel(GGUF, { maxSeqLen: 512 });
  return { config: m.config as GqaConfig, weights: m.weights };
}

/** The HF Llama copy of stories260K in tmp (written once; tests that only need a valid directory share it). */
let hfLlamaDir: string | null = null;
async function hfLlama(): Promise<string> {
  if (!hfLlamaDir) {
    const { config, weights } = await storiesGguf();
    hfLlamaDir = join(tmp, 'hf-llama-shared');
    writeHfLlamaDir(hfLlamaDir, config, weights);
  }
  return hfLlamaDir;
}

test('HF Llama directory from stories260K: rotate_half layout, permuted weights, same logits as the GGUF', async () => {
  const { config, weights } = await storiesGguf();
  const dir = join(tmp, 'hf-llama');
  const written = writeHfLlamaDir(dir, config, weights);
  const hf = await loadModel(dir);
  assert.equal(hf.format, 'hf');
  const c = hf.config as GqaConfig;
  assert.equal(c.attention, 'gqa');
  assert.equal(c.ropeLayout, 'rotate_half');
  assert.deepEqual({ ...c, ropeLayout: 'interleaved' }, config);
  assert.equal(hf.weights.output, hf.weights.tokenEmbedding);
  hf.weights.layers.forEach((l, i) => {
    const g = l as GqaLayerWeights;
    assertSameTensor(g.wq, written[`model.layers.${i}.self_attn.q_proj.weight`], `layer ${i} wq`);
    assertSameTensor(g.wk, written[`model.layers.${i}.self_attn.k_proj.weight`], `layer ${i} wk`);
    assertSameTensor(g.wv, (weights.layers[i] as GqaLayerWeights).wv, `layer ${i} wv`);
    assert.equal(g.bq, undefined);
  });
  // The permutation is a real reordering: row 1 of head 0 (interleaved imag of pair 0) moves to row headDim/2.
  const wq0 = (weights.layers[0] as GqaLayerWeights).wq;
  const hq0 = (hf.weights.layers[0] as GqaLayerWeights).wq;
  assert.deepEqual(Array.from(hq0.data.subarray(4 * 64, 5 * 64)), Array.from(wq0.data.subarray(1 * 64, 2 * 64)));
  // tokenizer.model (SentencePiece protobuf) encodes like the GGUF vocabulary.
  const text = 'Once upon a time, there was a little girl named Lily.';
  assert.deepEqual(hf.tokenizer.encode(text), [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]);
  const tokens = [1, ...hf.tokenizer.encode(text)];
  const a = new ReferenceGqa(config, weights).forward(tokens);
  const b = new ReferenceGqa(c, hf.weights).forward(tokens);
  let worst = 0;
  for (let t = 0; t < tokens.length; t++) for (let v = 0; v < a[t].length; v++) worst = Math.max(worst, Math.abs(a[t][v] - b[t][v]));
  assert.ok(worst <= 1e-9, `HF vs GGUF logits differ by ${worst}`);
  // And the logits are not trivially equal: the same weights read with the wrong layout give different logits.
  const wrong = new ReferenceGqa({ ...c, ropeLayout: 'interleaved' }, hf.weights).forward(tokens);
  let off = 0;
  for (let t = 0; t < tokens.length; t++) for (let v = 0; v < a[t].length; v++) off = Math.max(off, Math.abs(a[t][v] - wrong[t][v]));
  assert.ok(off > 1e-3, `layout mix-up should change logits (max diff ${off})`);
});

test('HF sharded bf16 directory (model.safetensors.index.json) loads every shard', async () => {
  const { config, weights } = await storiesGguf();
  const dir = join(tmp, 'hf-sharded');
  const written = writeHfLlamaDir(dir, config, weights, { dtype: 'bf16', maxShardBytes: 100_000 });
  const index = JSON.parse(readFileSync(join(dir, 'model.safetensors.index.json'), 'utf8')) as { weight_map: Record<string, string> };
  const shards = new Set(Object.values(index.weight_map));
  assert.ok(shards.size >= 3, `expected several shards, got ${shards.size}`);
  const hf = await loadModel(dir);
  for (const [name, t] of Object.entries(written)) {
    const m = /^model\.layers\.(\d+)\.(.+)$/.exec(name);
    if (!m || m[2] !== 'mlp.down_proj.weight') continue;
    const got = (hf.weights.layers[Number(m[1])] as GqaLayerWeights).wDown;
    for (let i = 0; i < t.data.length; i++) assert.equal(got.data[i], nearestBf16(t.data[i]), `${name}[${i}]`);
  }
});

test('HF Qwen2 directory: q/k/v biases, untied lm_head, sliding window caps the context', async () => {
  const r = rng(11);
  const dir = join(tmp, 'hf-qwen2');
  mkdirSync(dir, { recursive: true });
  const [dim, heads, kvHeads, hd, hidden, vocab] = [16, 4, 2, 4, 24, 40];
  const tensors: Record<string, Tensor> = {
    'model.embed_tokens.weight': randomTensor([vocab, dim], r),
    'lm_head.weight': randomTensor([vocab, dim], r),
    'model.norm.weight': randomTensor([dim], r),
  };
  for (let i = 0; i < 2; i++) {
    const p = `model.layers.${i}.`;
    Object.assign(tensors, {
      [p + 'input_layernorm.weight']: randomTensor([dim], r),
      [p + 'post_attention_layernorm.weight']: randomTensor([dim], r),
      [p + 'self_attn.q_proj.weight']: randomTensor([heads * hd, dim], r),
      [p + 'self_attn.q_proj.bias']: randomTensor([heads * hd], r),
      [p + 'self_attn.k_proj.weight']: randomTensor([kvHeads * hd, dim], r),
      [p + 'self_attn.k_proj.bias']: randomTensor([kvHeads * hd], r),
      [p + 'self_attn.v_proj.weight']: randomTensor([kvHeads * hd, dim], r),
      [p + 'self_attn.v_proj.bias']: randomTensor([kvHeads * hd], r),
      [p + 'self_attn.o_proj.weight']: randomTensor([dim, heads * hd], r),
      [p + 'mlp.gate_proj.weight']: randomTensor([hidden, dim], r),
      [p + 'mlp.up_proj.weight']: randomTensor([hidden, dim], r),
      [p + 'mlp.down_proj.weight']: randomTensor([dim, hidden], r),
    });
  }
  writeSafetensors(join(dir, 'model.safetensors'), tensors, 'f32');
  copyFileSync('../shared/models/gpt2-tokenizer/tokenizer.json', join(dir, 'tokenizer.json'));
  const cfg = {
    model_type: 'qwen2', architectures: ['Qwen2ForCausalLM'], hidden_size: dim, intermediate_size: hidden, num_hidden_layers: 2,
    num_attention_heads: heads, num_key_value_heads: kvHeads, vocab_size: vocab, max_position_embeddings: 32768, rope_theta: 1e6,
    rms_norm_eps: 1e-6, tie_word_embeddings: false, hidden_act: 'silu', use_sliding_window: true, sliding_window: 4096,
    bos_token_id: null, eos_token_id: [7, 8],
  };
  writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg));
  const m = await loadModel(dir);
  const c = m.config as GqaConfig;
  assert.equal(c.arch, 'qwen2');
  assert.equal(c.attentionBias, true);
  assert.equal(c.maxSeqLen, 4096);
  assert.equal(c.ropeTheta, 1e6);
  assert.equal(c.tiedEmbeddings, false);
  assert.equal(c.eosId, 7);
  assert.equal(c.bosId, -1, 'no BOS in config or tokenizer_config');
  assertSameTensor(m.weights.output, tensors['lm_head.weight'], 'lm_head');
  const l1 = m.weights.layers[1] as GqaLayerWeights;
  assertSameTensor(l1.bq!, tensors['model.layers.1.self_attn.q_proj.bias'], 'bq');
  assertSameTensor(l1.bk!, tensors['model.layers.1.self_attn.k_proj.bias'], 'bk');
  assertSameTensor(l1.bv!, tensors['model.layers.1.self_attn.v_proj.bias'], 'bv');
  // Refusals name the field.
  const refuse = async (patch: Record<string, unknown>, pattern: RegExp): Promise<void> => {
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, ...patch }));
    await assert.rejects(loadModel(dir), pattern);
  };
  await refuse({ model_type: 'qwen3' }, /model_type "qwen3".*q_norm\/k_norm/);
  await refuse({ rope_scaling: { rope_type: 'yarn', factor: 4 } }, /"rope_scaling".*yarn/);
  await refuse({ hidden_act: 'gelu' }, /"hidden_act"/);
  await refuse({ model_type: 'falcon' }, /model_type "falcon" is not supported/);
  await refuse({ sliding_window: null }, /"sliding_window"/);
});

function mlaFixture(dir: string, opts: { qLoraRank: number | null; latentNorm: boolean | undefined; withNorm: boolean; bias: boolean }): Record<string, Tensor> {
  const r = rng(5);
  mkdirSync(dir, { recursive: true });
  const [dim, heads, kvRank, rope, nope, v, hidden, vocab] = [16, 2, 8, 4, 8, 6, 24, 32];
  const q = heads * (nope + rope);
  const t: Record<string, Tensor> = {
    'model.embed_tokens.weight': randomTensor([vocab, dim], r),
    'lm_head.weight': randomTensor([vocab, dim], r),
    'model.norm.weight': randomTensor([dim], r),
  };
  for (let i = 0; i < 2; i++) {
    const p = `model.layers.${i}.`;
    Object.assign(t, {
      [p + 'input_layernorm.weight']: randomTensor([dim], r),
      [p + 'post_attention_layernorm.weight']: randomTensor([dim], r),
      [p + 'self_attn.kv_a_proj_with_mqa.weight']: randomTensor([kvRank + rope, dim], r),
      [p + 'self_attn.kv_b_proj.weight']: randomTensor([heads * (nope + v), kvRank], r),
      [p + 'self_attn.o_proj.weight']: randomTensor([dim, heads * v], r),
      [p + 'mlp.gate_proj.weight']: randomTensor([hidden, dim], r),
      [p + 'mlp.up_proj.weight']: randomTensor([hidden, dim], r),
      [p + 'mlp.down_proj.weight']: randomTensor([dim, hidden], r),
    });
    if (opts.qLoraRank === null) t[p + 'self_attn.q_proj.weight'] = randomTensor([q, dim], r);
    else {
      t[p + 'self_attn.q_a_proj.weight'] = randomTensor([opts.qLoraRank, dim], r);
      t[p + 'self_attn.q_a_layernorm.weight'] = randomTensor([opts.qLoraRank], r);
      t[p + 'self_attn.q_b_proj.weight'] = randomTensor([q, opts.qLoraRank], r);
    }
    if (opts.withNorm) t[p + 'self_attn.kv_a_layernorm.weight'] = randomTensor([kvRank], r);
    if (opts.bias) {
      t[p + 'self_attn.q_proj.bias'] = randomTensor([q], r);
      t[p + 'self_attn.kv_a_proj_with_mqa.bias'] = randomTensor([kvRank + rope], r);
    }
  }
  writeSafetensors(join(dir, 'model.safetensors'), t, 'f32');
  copyFileSync(`${STORIES}/tok512.model`, join(dir, 'tokenizer.model'));
  const cfg: Record<string, unknown> = {
    model_type: 'deepseek_v3', architectures: ['DeepseekV3ForCausalLM'], hidden_size: dim, intermediate_size: hidden,
    num_hidden_layers: 2, num_attention_heads: heads, num_key_value_heads: heads, vocab_size: vocab, max_position_embeddings: 512,
    rope_theta: 10000, rms_norm_eps: 1e-5, kv_lora_rank: kvRank, q_lora_rank: opts.qLoraRank, qk_rope_head_dim: rope,
    qk_nope_head_dim: nope, v_head_dim: v, attention_bias: opts.bias, rope_interleave: true, n_routed_experts: null,
    tie_word_embeddings: false, hidden_act: 'silu', bos_token_id: 1, eos_token_id: 2,
  };
  if (opts.latentNorm !== undefined) cfg.qk_latent_layernorm = opts.latentNorm;
  writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg));
  return t;
}

test('DeepSeek-style MLA directories load to MlaConfig / MlaLayerWeights; MoE is refused', async () => {
  // TransMLA output: full q_proj with bias, kv_a bias, no latent norm.
  const d1 = join(tmp, 'mla-transmla');
  const t1 = mlaFixture(d1, { qLoraRank: null, latentNorm: false, withNorm: false, bias: true });
  const m1 = await loadModel(d1);
  const c1 = m1.config as MlaConfig;
  assert.equal(c1.attention, 'mla');
  assert.deepEqual(
    [c1.kvLoraRank, c1.qLoraRank, c1.qkRopeHeadDim, c1.qkNopeHeadDim, c1.vHeadDim, c1.qkLatentLayernorm, c1.attentionBias, c1.ropeLayout],
    [8, null, 4, 8, 6, false, true, 'interleaved'],
  );
  assert.equal(c1.softmaxScale, 1 / Math.sqrt(12));
  const l1 = m1.weights.layers[1] as MlaLayerWeights;
  assert.equal(l1.kind, 'mla');
  assertSameTensor(l1.qProj!, t1['model.layers.1.self_attn.q_proj.weight'], 'qProj');
  assertSameTensor(l1.qProjBias!, t1['model.layers.1.self_attn.q_proj.bias'], 'qProjBias');
  assertSameTensor(l1.kvAProj, t1['model.layers.1.self_attn.kv_a_proj_with_mqa.weight'], 'kvAProj');
  assertSameTensor(l1.kvAProjBias!, t1['model.layers.1.self_attn.kv_a_proj_with_mqa.bias'], 'kvAProjBias');
  assertSameTensor(l1.kvBProj, t1['model.layers.1.self_attn.kv_b_proj.weight'], 'kvBProj');
  assertSameTensor(l1.wo, t1['model.layers.1.self_attn.o_proj.weight'], 'wo');
  assert.equal(l1.kvANorm, undefined);

  // Stock DeepSeek: low-rank query, latent norm on (field absent), no biases.
  const d2 = join(tmp, 'mla-stock');
  const t2 = mlaFixture(d2, { qLoraRank: 6, latentNorm: undefined, withNorm: true, bias: false });
  const m2 = await loadModel(d2);
  const c2 = m2.config as MlaConfig;
  assert.equal(c2.qLoraRank, 6);
  assert.equal(c2.qkLatentLayernorm, true);
  assert.equal(c2.attentionBias, false);
  const l2 = m2.weights.layers[0] as MlaLayerWeights;
  assertSameTensor(l2.qAProj!, t2['model.layers.0.self_attn.q_a_proj.weight'], 'qAProj');
  assertSameTensor(l2.qANorm!, t2['model.layers.0.self_attn.q_a_layernorm.weight'], 'qANorm');
  assertSameTensor(l2.qBProj!, t2['model.layers.0.self_attn.q_b_proj.weight'], 'qBProj');
  assertSameTensor(l2.kvANorm!, t2['model.layers.0.self_attn.kv_a_layernorm.weight'], 'kvANorm');
  assert.equal(l2.qProj, undefined);

  // Latent norm required but absent: the message says which flag to set.
  const d3 = join(tmp, 'mla-missing-norm');
  mlaFixture(d3, { qLoraRank: null, latentNorm: undefined, withNorm: false, bias: false });
  await assert.rejects(loadModel(d3), /kv_a_layernorm\.weight is missing.*qk_latent_layernorm/);

  // MoE: refused with the fields that make it MoE.
  const cfg = JSON.parse(readFileSync(join(d1, 'config.json'), 'utf8'));
  writeFileSync(join(d1, 'config.json'), JSON.stringify({ ...cfg, n_routed_experts: 64, first_k_dense_replace: 1, moe_layer_freq: 1 }));
  await assert.rejects(loadModel(d1), /"n_routed_experts": 64 makes layers 1 mixture-of-experts/);
  // Experts declared but every layer dense (first_k_dense_replace ≥ layers): loads.
  writeFileSync(join(d1, 'config.json'), JSON.stringify({ ...cfg, n_routed_experts: 64, first_k_dense_replace: 2 }));
  assert.equal((await loadModel(d1)).config.attention, 'mla');
  writeFileSync(join(d1, 'config.json'), JSON.stringify({ ...cfg, rope_scaling: { type: 'yarn', factor: 40 } }));
  await assert.rejects(loadModel(d1), /"rope_scaling"/);
});

test('bad paths, corrupt and truncated files fail with the file and the problem named', async () => {
  await assert.rejects(loadModel('/nonexistent/model.gguf'), /\/nonexistent\/model\.gguf: no such file or directory/);

  const badMagic = join(tmp, 'bad.gguf');
  writeFileSync(badMagic, Buffer.concat([Buffer.from('GGUX'), Buffer.alloc(60)]));
  await assert.rejects(loadModel(badMagic), (e: Error) => e.message.includes(badMagic) && /GGUF/.test(e.message));
  assert.throws(() => GgufFile.open(badMagic), /bad magic "GGUX"/);

  const gguf = readFileSync(GGUF);
  const cut = join(tmp, 'cut.gguf');
  writeFileSync(cut, gguf.subarray(0, 600_000));
  await assert.rejects(loadModel(cut), (e: Error) => e.message.startsWith(cut) && /tensor "blk\.\d\.[\w.]+".*truncated/.test(e.message));
  const cutHeader = join(tmp, 'cut-header.gguf');
  writeFileSync(cutHeader, gguf.subarray(0, 5000));
  await assert.rejects(loadModel(cutHeader), (e: Error) => e.message.startsWith(cutHeader) && /truncated|past the end/.test(e.message));

  const q4 = join(tmp, 'q4.gguf');
  writeGguf(q4, [['general.architecture', { type: 'string', value: 'llama' }]], [{ name: 'token_embd.weight', dims: [32, 2], type: 2, bytes: Buffer.alloc(36) }]);
  assert.throws(() => GgufFile.open(q4), (e: Error) => e.message.startsWith(q4) && /"token_embd\.weight" is Q4_0.*F32, F16, BF16, Q8_0/.test(e.message));

  const qwenGguf = join(tmp, 'qwen.gguf');
  const meta: [string, MetaValue][] = [['general.architecture', { type: 'string', value: 'qwen2' }]];
  writeGguf(qwenGguf, meta, []);
  await assert.rejects(loadModel(qwenGguf), /general\.architecture is "qwen2"/);

  const bin = readFileSync(BIN);
  const cutBin = join(tmp, 'stories-cut.bin');
  writeFileSync(cutBin, bin.subarray(0, 500_000));
  copyFileSync(`${STORIES}/tok512.bin`, join(tmp, 'tok512.bin'));
  await assert.rejects(loadModel(cutBin), (e: Error) => e.message.startsWith(cutBin) && /needs exactly 1056540: truncated/.test(e.message));
  const lonely = join(tmp, 'lonely');
  mkdirSync(lonely);
  copyFileSync(BIN, join(lonely, 'model.bin'));
  await assert.rejects(loadModel(join(lonely, 'model.bin')), /no tokenizer beside the checkpoint.*tokenizerPath/);
  const withTok = await loadModel(join(lonely, 'model.bin'), { tokenizerPath: `${STORIES}/tok512.bin` });
  assert.equal(withTok.tokenizer.vocabSize, 512);

  // safetensors whose header lies about the data.
  const st = join(tmp, 'ok.safetensors');
  writeSafetensors(st, { w: { shape: [4, 4], data: new Float32Array(16).fill(1) } }, 'f32');
  const good = readFileSync(st);
  const headerLen = Number(good.readBigUInt64LE(0));
  const header = JSON.parse(good.subarray(8, 8 + headerLen).toString());
  const withHeader = (h: unknown, data: Buffer): Buffer => {
    const json = Buffer.from(JSON.stringify(h));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    return Buffer.concat([len, json, data]);
  };
  const data = good.subarray(8 + headerLen);
  const lies = join(tmp, 'lies.safetensors');
  writeFileSync(lies, withHeader({ w: { ...header.w, shape: [4, 5] } }, data));
  assert.throws(() => SafetensorsFile.open(lies), (e: Error) => e.message.startsWith(lies) && /header lies about tensor "w": shape \[4,5\] F32 needs 80 bytes/.test(e.message));
  const past = join(tmp, 'past.safetensors');
  writeFileSync(past, withHeader({ w: { ...header.w, shape: [8, 4], data_offsets: [0, 128] } }, data));
  assert.throws(() => SafetensorsFile.open(past), /tensor "w" ends at data byte 128 but the data section has only 64 bytes/);
  const truncated = join(tmp, 'truncated.safetensors');
  writeFileSync(truncated, good.subarray(0, good.length - 10));
  assert.throws(() => SafetensorsFile.open(truncated), /truncated/);
  const notJson = join(tmp, 'notjson.safetensors');
  writeFileSync(notJson, Buffer.concat([good.subarray(0, 8), Buffer.alloc(headerLen, 0x7b), data]));
  assert.throws(() => SafetensorsFile.open(notJson), /header is not valid JSON/);
  const huge = join(tmp, 'huge.safetensors');
  writeFileSync(huge, Buffer.from('GGUF\x03\x00\x00\x00\x00\x00\x00\x00'));
  assert.throws(() => SafetensorsFile.open(huge), /header says it is \d+ bytes|100 MB/);
  const ints = join(tmp, 'ints.safetensors');
  writeFileSync(ints, withHeader({ w: { dtype: 'I64', shape: [2], data_offsets: [0, 16] } }, Buffer.alloc(16)));
  assert.throws(() => SafetensorsFile.open(ints), /tensor "w" has dtype I64, which this loader does not read \(supported: F32, F16, BF16\)/);

  // HF directory problems.
  const hfDir = await hfLlama();
  const noWeights = join(tmp, 'hf-pt');
  mkdirSync(noWeights);
  copyFileSync(join(hfDir, 'config.json'), join(noWeights, 'config.json'));
  copyFileSync(join(hfDir, 'tokenizer.model'), join(noWeights, 'tokenizer.model'));
  writeFileSync(join(noWeights, 'pytorch_model.bin'), 'x');
  await assert.rejects(loadModel(noWeights), /no \*\.safetensors weights \(found pytorch_model\.bin: only safetensors/);
  const noConfig = join(tmp, 'empty-dir');
  mkdirSync(noConfig);
  await assert.rejects(loadModel(noConfig), /needs config\.json/);
  const missingTensor = join(tmp, 'hf-missing');
  mkdirSync(missingTensor);
  for (const f of ['config.json', 'tokenizer.model']) copyFileSync(join(hfDir, f), join(missingTensor, f));
  const full = readSafetensors(join(hfDir, 'model.safetensors')).tensors;
  full.delete('model.layers.3.mlp.up_proj.weight');
  writeSafetensors(join(missingTensor, 'model.safetensors'), Object.fromEntries(full), 'f32');
  await assert.rejects(loadModel(missingTensor), /tensor "model\.layers\.3\.mlp\.up_proj\.weight" is missing/);
  const wrongShape = join(tmp, 'hf-shape');
  mkdirSync(wrongShape);
  copyFileSync(join(hfDir, 'tokenizer.model'), join(wrongShape, 'tokenizer.model'));
  const cfg = JSON.parse(readFileSync(join(hfDir, 'config.json'), 'utf8'));
  writeFileSync(join(wrongShape, 'config.json'), JSON.stringify({ ...cfg, intermediate_size: 170 }));
  copyFileSync(join(hfDir, 'model.safetensors'), join(wrongShape, 'model.safetensors'));
  await assert.rejects(loadModel(wrongShape), /model\.safetensors: tensor "model\.layers\.0\.mlp\.gate_proj\.weight" has shape \[172,64\], config\.json implies \[170,64\]/);
});

test('hub: repo ids resolve through the HF cache layout; offline and missing names where the files go', async () => {
  const home = join(tmp, 'hf-home');
  const saved = { HF_HOME: process.env.HF_HOME, HF_HUB_OFFLINE: process.env.HF_HUB_OFFLINE, HF_HUB_CACHE: process.env.HF_HUB_CACHE };
  process.env.HF_HOME = home;
  process.env.HF_HUB_OFFLINE = '1';
  delete process.env.HF_HUB_CACHE;
  try {
    // karpathy/tinyllamas: real files as huggingface_hub lays them out (blobs + relative symlinks from the snapshot).
    const repo = join(home, 'hub', 'models--karpathy--tinyllamas');
    const commit = 'a'.repeat(40);
    mkdirSync(join(repo, 'refs'), { recursive: true });
    writeFileSync(join(repo, 'refs', 'main'), commit);
    mkdirSync(join(repo, 'blobs'), { recursive: true });
    const snap = join(repo, 'snapshots', commit, 'stories260K');
    mkdirSync(snap, { recursive: true });
    for (const [f, blob] of [['stories260K.bin', 'b0a507e7'], ['tok512.bin', '037cb335']]) {
      copyFileSync(`${STORIES}/${f}`, join(repo, 'blobs', blob));
      symlinkSync(join('..', '..', '..', 'blobs', blob), join(snap, f));
    }
    const p = await resolveModelPath('karpathy/tinyllamas/stories260K/stories260K.bin');
    assert.equal(p, join(snap, 'stories260K.bin'));
    const m = await loadModel('karpathy/tinyllamas/stories260K/stories260K.bin');
    assert.equal(m.format, 'llama2c');
    assert.deepEqual(m.tokenizer.encode('Once upon a time'), [403, 407, 261, 378]);

    // A Hugging Face model directory in the cache, through refs/main.
    const { config, weights } = await storiesGguf();
    const repo2 = join(home, 'hub', 'models--someone--stories-hf');
    const commit2 = 'b'.repeat(40);
    writeHfLlamaDir(join(repo2, 'snapshots', commit2), config, weights);
    mkdirSync(join(repo2, 'refs'), { recursive: true });
    writeFileSync(join(repo2, 'refs', 'main'), commit2 + '\n');
    assert.equal(await resolveModelPath('someone/stories-hf'), join(repo2, 'snapshots', commit2));
    const hf = await loadModel('someone/stories-hf');
    assert.equal(hf.format, 'hf');
    assert.equal(hf.path, join(repo2, 'snapshots', commit2));
    // A pinned commit works without refs.
    assert.equal(await resolveModelPath(`someone/stories-hf@${commit2}`), join(repo2, 'snapshots', commit2));

    // Offline and missing: the message says where to put the files.
    await assert.rejects(resolveModelPath('nobody/absent-model'), (e: Error) =>
      e.message.includes('HF_HUB_OFFLINE') && e.message.includes(join(home, 'hub', 'models--nobody--absent-model', 'snapshots')) && e.message.includes('config.json'),
    );
    // Offline and incomplete: the missing weight file is named.
    rmSync(join(repo2, 'snapshots', commit2, 'model.safetensors'));
    await assert.rejects(resolveModelPath('someone/stories-hf'), /Missing: model\.safetensors.*Put the files in .*models--someone--stories-hf/);
    await assert.rejects(resolveModelPath('karpathy/tinyllamas/stories15M.bin'), /Missing: stories15M\.bin/);
    // A local path is returned as is.
    assert.equal(await resolveModelPath(GGUF), resolve(GGUF));
    // HF_HUB_CACHE wins over HF_HOME.
    process.env.HF_HUB_CACHE = join(home, 'hub');
    process.env.HF_HOME = join(tmp, 'elsewhere');
    assert.equal(await resolveModelPath('karpathy/tinyllamas/stories260K/tok512.bin'), join(snap, 'tok512.bin'));
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
});

test('interleaved → rotate_half row permutation matches the pair mapping', () => {
  const t = { shape: [8, 1], data: Float32Array.from([0, 1, 2, 3, 10, 11, 12, 13]) }; // 2 heads of 4
  assert.deepEqual(Array.from(interleavedToRotateHalfRows(t, 2, 4).data), [0, 2, 1, 3, 10, 12, 11, 13]);
});

test('llama2.c reader: header fields and classifier sharing', () => {
  const { header, weights } = loadLlama2cModel(BIN);
  assert.deepEqual(header, { dim: 64, hiddenDim: 172, nLayers: 5, nHeads: 8, nKvHeads: 4, vocabSize: 512, seqLen: 512, shared: true });
  // First embedding value straight from the file bytes (offset 28).
  assert.equal(weights.tokenEmbedding.data[0], readFileSync(BIN).readFloatLE(28));
  // Last final-norm value sits just before the RoPE tables.
  const bytes = readFileSync(BIN);
  assert.equal(weights.finalNorm.data[63], bytes.readFloatLE(bytes.length - 4 * 512 * 8 - 4));
});

test('hub download: files fetched over HTTP (HF_ENDPOINT) into blobs + snapshot links + refs, then served from the cache', async () => {
  const { createServer } = await import('node:http');
  const { createHash } = await import('node:crypto');
  const { lstatSync, readlinkSync } = await import('node:fs');
  const src = await hfLlama();
  const commit = 'c'.repeat(40);
  // Repo contents: an HF model directory and a llama2.c checkpoint with its tokenizer in a sub-folder.
  const files = new Map<string, Buffer>();
  for (const f of ['config.json', 'model.safetensors', 'tokenizer.model']) files.set(`owner/dl-model/${f}`, readFileSync(join(src, f)));
  files.set('owner/dl-model/sub/stories260K.bin', readFileSync(BIN));
  files.set('owner/dl-model/sub/tok512.bin', readFileSync(`${STORIES}/tok512.bin`));
  const blobs = new Map<string, Buffer>();
  const requests: string[] = [];
  const server = createServer((req, res) => {
    requests.push(req.url!);
    const resolveMatch = /^\/(\w+\/[\w-]+)\/resolve\/main\/(.+)$/.exec(req.url!);
    if (resolveMatch) {
      const body = files.get(`${resolveMatch[1]}/${decodeURIComponent(resolveMatch[2])}`);
      if (!body) {
        res.writeHead(404, { 'x-repo-commit': commit, 'x-error-code': 'EntryNotFound' }).end('Entry not found');
        return;
      }
      const sha = createHash('sha256').update(body).digest('hex');
      blobs.set(sha, body);
      // Like the hub: a redirect carrying the commit and the content hash, then the bytes from the "CDN".
      res.writeHead(302, { location: `/cdn/${sha}`, 'x-repo-commit': commit, 'x-linked-etag': `"${sha}"` }).end();
      return;
    }
    const cdn = /^\/cdn\/(\w+)$/.exec(req.url!);
    if (cdn && blobs.has(cdn[1])) {
      res.writeHead(200, { 'content-length': blobs.get(cdn[1])!.length }).end(blobs.get(cdn[1]));
      return;
    }
    res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  const saved = { HF_HOME: process.env.HF_HOME, HF_HUB_OFFLINE: process.env.HF_HUB_OFFLINE, HF_HUB_CACHE: process.env.HF_HUB_CACHE, HF_ENDPOINT: process.env.HF_ENDPOINT };
  const home = join(tmp, 'hf-home-download');
  process.env.HF_HOME = home;
  process.env.HF_ENDPOINT = `http://127.0.0.1:${port}`;
  delete process.env.HF_HUB_OFFLINE;
  delete process.env.HF_HUB_CACHE;
  try {
    const path = await resolveModelPath('owner/dl-model');
    const snap = join(home, 'hub', 'models--owner--dl-model', 'snapshots', commit);
    assert.equal(path, snap);
    assert.equal(readFileSync(join(home, 'hub', 'models--owner--dl-model', 'refs', 'main'), 'utf8'), commit);
    const link = join(snap, 'model.safetensors');
    assert.ok(lstatSync(link).isSymbolicLink());
    assert.match(readlinkSync(link), /^\.\.\/\.\.\/blobs\/[0-9a-f]{64}$/);
    assert.ok(readFileSync(link).equals(files.get('owner/dl-model/model.safetensors')!));
    const m = await loadModel('owner/dl-model');
    assert.equal(m.format, 'hf');
    assert.deepEqual(m.tokenizer.encode('Once upon a time'), [403, 407, 261, 378]);
    // Cached now: no more requests.
    const before = requests.length;
    await resolveModelPath('owner/dl-model');
    assert.equal(requests.length, before);
    // A llama2.c file in a sub-folder brings its tok<vocab>.bin along.
    const bin = await resolveModelPath('owner/dl-model/sub/stories260K.bin');
    assert.equal(bin, join(snap, 'sub', 'stories260K.bin'));
    assert.equal((await loadModel(bin)).tokenizer.encode('Once')[0], 403);
    // A file the repo does not have: the HTTP status is in the message.
    await assert.rejects(resolveModelPath('owner/dl-model/missing.gguf'), /downloading missing\.gguf got HTTP 404/);
  } finally {
    server.close();
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
});

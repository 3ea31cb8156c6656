// Test-side writers for loader tests: a minimal GGUF v3 writer, Q8_0 quantizer, HF directories built from stories260K.
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { interleavedToRotateHalfRows } from '../model/hf.ts';
import { f32ToF16Bits, writeSafetensors, writeSafetensorsShards, type TensorToWrite, type WriteDtype } from '../model/safetensors.ts';
import type { GqaConfig } from '../model/config.ts';
import type { GqaLayerWeights, ModelWeights } from '../model/weights.ts';

export const MODELS = '../shared/models';
export const STORIES = `${MODELS}/stories260K`;

export type MetaValue =
  | { type: 'u32'; value: number }
  | { type: 'i32'; value: number }
  | { type: 'f32'; value: number }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'strings'; value: string[] }
  | { type: 'f32s'; value: number[] }
  | { type: 'i32s'; value: number[] };

export interface GgufTensorSpec {
  name: string;
  /** GGUF order: dims[0] contiguous. */
  dims: number[];
  type: number;
  bytes: Uint8Array;
}

class Bytes {
  parts: Buffer[] = [];
  length = 0;
  push(b: Buffer): void {
    this.parts.push(b);
    this.length += b.length;
  }
  u32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.push(b);
  }
  u64(v: number): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.push(b);
  }
  str(s: string): void {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.push(b);
  }
}

/** Writes a GGUF v3 file (alignment 32) from metadata and raw tensor bytes. */
export function writeGguf(path: string, metadata: [string, MetaValue][], tensors: GgufTensorSpec[], opts: { magic?: string; version?: number } = {}): void {
  const w = new Bytes();
  w.push(Buffer.from(opts.magic ?? 'GGUF', 'latin1'));
  w.u32(opts.version ?? 3);
  w.u64(tensors.length);
  w.u64(metadata.length);
  for (const [key, v] of metadata) {
    w.str(key);
    switch (v.type) {
      case 'u32':
        w.u32(4);
        w.u32(v.value);
        break;
      case 'i32': {
        w.u32(5);
        const b = Buffer.alloc(4);
        b.writeInt32LE(v.value);
        w.push(b);
        break;
      }
      case 'f32': {
        w.u32(6);
        const b = Buffer.alloc(4);
        b.writeFloatLE(v.value);
        w.push(b);
        break;
      }
      case 'bool':
        w.u32(7);
        w.push(Buffer.from([v.value ? 1 : 0]));
        break;
      case 'string':
        w.u32(8);
        w.str(v.value);
        break;
      case 'strings':
        w.u32(9);
        w.u32(8);
        w.u64(v.value.length);
        for (const s of v.value) w.str(s);
        break;
      case 'f32s': {
        w.u32(9);
        w.u32(6);
        w.u64(v.value.length);
        const b = Buffer.alloc(4 * v.value.length);
        v.value.forEach((x, i) => b.writeFloatLE(x, 4 * i));
        w.push(b);
        break;
      }
      case 'i32s': {
        w.u32(9);
        w.u32(5);
        w.u64(v.value.length);
        const b = Buffer.alloc(4 * v.value.length);
        v.value.forEach((x, i) => b.writeInt32LE(x, 4 * i));
        w.push(b);
        break;
      }
    }
  }
  let offset = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    w.str(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.u64(d);
    w.u32(t.type);
    w.u64(offset);
    offsets.push(offset);
    offset += Math.ceil(t.bytes.length / 32) * 32;
  }
  const pad = (Math.ceil(w.length / 32) * 32) - w.length;
  w.push(Buffer.alloc(pad));
  for (const t of tensors) {
    w.push(Buffer.from(t.bytes));
    w.push(Buffer.alloc(Math.ceil(t.bytes.length / 32) * 32 - t.bytes.length));
  }
  writeFileSync(path, Buffer.concat(w.parts));
}

export function f32Bytes(data: Float32Array): Uint8Array {
  return new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
}

export function f16Bytes(data: Float32Array): Uint8Array {
  const out = Buffer.alloc(data.length * 2);
  data.forEach((x, i) => out.writeUInt16LE(f32ToF16Bits(x), 2 * i));
  return out;
}

/** Q8_0 as llama.cpp quantizes: per 32 values d = max|x| / 127 (stored f16), q = round(x / d). */
export function q8Bytes(data: Float32Array): Uint8Array {
  const out = Buffer.alloc((data.length / 32) * 34);
  for (let b = 0; b < data.length / 32; b++) {
    let amax = 0;
    for (let i = 0; i < 32; i++) amax = Math.max(amax, Math.abs(data[b * 32 + i]));
    const d = amax / 127;
    const id = d ? 1 / d : 0;
    out.writeUInt16LE(f32ToF16Bits(d), b * 34);
    for (let i = 0; i < 32; i++) out.writeInt8(Math.round(data[b * 32 + i] * id), b * 34 + 2 + i);
  }
  return out;
}

/** The llama-arch GGUF metadata and tensors of a loaded GQA model (vocabulary passed in), with a tensor encoder per type. */
export function ggufFromModel(
  config: GqaConfig,
  weights: ModelWeights,
  vocab: { tokens: string[]; scores: number[]; types: number[] },
  type: 0 | 1 | 8,
): { metadata: [string, MetaValue][]; tensors: GgufTensorSpec[] } {
  const enc = type === 0 ? f32Bytes : type === 1 ? f16Bytes : q8Bytes;
  // Norm vectors stay F32, as llama.cpp keeps them.
  const t = (name: string, shape: number[], data: Float32Array, keepF32 = false): GgufTensorSpec => ({
    name,
    dims: [...shape].reverse(),
    type: keepF32 ? 0 : type,
    bytes: keepF32 ? f32Bytes(data) : enc(data),
  });
  const tensors: GgufTensorSpec[] = [t('token_embd.weight', weights.tokenEmbedding.shape, weights.tokenEmbedding.data)];
  tensors.push(t('output_norm.weight', weights.finalNorm.shape, weights.finalNorm.data, true));
  weights.layers.forEach((l, i) => {
    const g = l as GqaLayerWeights;
    const p = `blk.${i}.`;
    tensors.push(t(p + 'attn_norm.weight', g.attnNorm.shape, g.attnNorm.data, true));
    tensors.push(t(p + 'attn_q.weight', g.wq.shape, g.wq.data));
    tensors.push(t(p + 'attn_k.weight', g.wk.shape, g.wk.data));
    tensors.push(t(p + 'attn_v.weight', g.wv.shape, g.wv.data));
    tensors.push(t(p + 'attn_output.weight', g.wo.shape, g.wo.data));
    tensors.push(t(p + 'ffn_norm.weight', g.ffnNorm.shape, g.ffnNorm.data, true));
    tensors.push(t(p + 'ffn_gate.weight', g.wGate.shape, g.wGate.data));
    tensors.push(t(p + 'ffn_up.weight', g.wUp.shape, g.wUp.data));
    tensors.push(t(p + 'ffn_down.weight', g.wDown.shape, g.wDown.data));
  });
  const metadata: [string, MetaValue][] = [
    ['general.architecture', { type: 'string', value: 'llama' }],
    ['llama.context_length', { type: 'u32', value: config.maxSeqLen }],
    ['llama.embedding_length', { type: 'u32', value: config.dim }],
    ['llama.feed_forward_length', { type: 'u32', value: config.hiddenDim }],
    ['llama.attention.head_count', { type: 'u32', value: config.nHeads }],
    ['llama.attention.head_count_kv', { type: 'u32', value: config.nKvHeads }],
    ['llama.block_count', { type: 'u32', value: config.nLayers }],
    ['llama.attention.layer_norm_rms_epsilon', { type: 'f32', value: config.rmsEps }],
    ['tokenizer.ggml.model', { type: 'string', value: 'llama' }],
    ['tokenizer.ggml.tokens', { type: 'strings', value: vocab.tokens }],
    ['tokenizer.ggml.scores', { type: 'f32s', value: vocab.scores }],
    ['tokenizer.ggml.token_type', { type: 'i32s', value: vocab.types }],
    ['tokenizer.ggml.bos_token_id', { type: 'u32', value: 1 }],
    ['tokenizer.ggml.eos_token_id', { type: 'u32', value: 2 }],
  ];
  return { metadata, tensors };
}

/**
 * Writes stories260K (interleaved RoPE) as a Hugging Face Llama directory: q/k rows permuted to rotate_half,
 * config.json, safetensors (one file, or shards when maxShardBytes is given), tokenizer.model. Returns the
 * permuted tensors by HF name.
 */
export function writeHfLlamaDir(
  dir: string,
  config: GqaConfig,
  weights: ModelWeights,
  opts: { dtype?: WriteDtype; maxShardBytes?: number } = {},
): Record<string, TensorToWrite> {
  mkdirSync(dir, { recursive: true });
  const tensors: Record<string, TensorToWrite> = {
    'model.embed_tokens.weight': weights.tokenEmbedding,
    'model.norm.weight': weights.finalNorm,
  };
  weights.layers.forEach((l, i) => {
    const g = l as GqaLayerWeights;
    const p = `model.layers.${i}.`;
    tensors[p + 'input_layernorm.weight'] = g.attnNorm;
    tensors[p + 'self_attn.q_proj.weight'] = interleavedToRotateHalfRows(g.wq, config.nHeads, config.headDim);
    tensors[p + 'self_attn.k_proj.weight'] = interleavedToRotateHalfRows(g.wk, config.nKvHeads, config.headDim);
    tensors[p + 'self_attn.v_proj.weight'] = g.wv;
    tensors[p + 'self_attn.o_proj.weight'] = g.wo;
    tensors[p + 'post_attention_layernorm.weight'] = g.ffnNorm;
    tensors[p + 'mlp.gate_proj.weight'] = g.wGate;
    tensors[p + 'mlp.up_proj.weight'] = g.wUp;
    tensors[p + 'mlp.down_proj.weight'] = g.wDown;
  });
  const cfg = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: config.dim,
    intermediate_size: config.hiddenDim,
    num_hidden_layers: config.nLayers,
    num_attention_heads: config.nHeads,
    num_key_value_heads: config.nKvHeads,
    vocab_size: config.vocabSize,
    max_position_embeddings: 512,
    rms_norm_eps: config.rmsEps,
    rope_theta: config.ropeTheta,
    hidden_act: 'silu',
    tie_word_embeddings: true,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'float32',
  };
  writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg, null, 2));
  if (opts.maxShardBytes) writeSafetensorsShards(dir, tensors, opts.dtype ?? 'f32', { maxShardBytes: opts.maxShardBytes });
  else writeSafetensors(join(dir, 'model.safetensors'), tensors, opts.dtype ?? 'f32', { format: 'pt' });
  copyFileSync(`${STORIES}/tok512.model`, join(dir, 'tokenizer.model'));
  return tensors;
}

// Writes a converted model as a Hugging Face checkpoint in DeepSeek-V3 layout: config.json, safetensors, tokenizer files.
// Deterministic: the same model and options give byte-identical files (sorted tensor names, fixed key order, no times).
import { copyFileSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import type { GqaConfig, MlaConfig } from '../config.ts';
import type { MlaModelLike } from '../reference/mla.ts';
import type { DenseMatrix } from '../reference/ops.ts';
import { writeSafetensorsShards, type TensorToWrite, type WriteDtype } from '../safetensors.ts';
import { SentencePieceTokenizer, type PieceType, type SentencePieceVocab } from '../sentencepiece.ts';
import type { Tokenizer } from '../tokenizer.ts';
import type { ConversionReport } from './convert.ts';

/** Tokenizer-side files of a Hugging Face directory that travel with the weights. */
const HF_TOKENIZER_FILES = [
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'tokenizer.model',
  'vocab.json',
  'merges.txt',
  'added_tokens.json',
  'chat_template.jinja',
  'generation_config.json',
];

export interface CheckpointSource {
  config: GqaConfig;
  format: 'gguf' | 'llama2c' | 'hf';
  /** The file or directory converted. */
  path: string;
  tokenizer: Tokenizer;
}

const TORCH_DTYPE: Record<WriteDtype, string> = { f32: 'float32', f16: 'float16', bf16: 'bfloat16' };

/** config.json of the converted model: DeepSeek-V3 fields plus a `transmla` block saying how it was made. */
export function deepseekConfigJson(config: MlaConfig, dtype: WriteDtype, source: CheckpointSource, report?: ConversionReport): Record<string, unknown> {
  const src = source.config;
  const json: Record<string, unknown> = {
    architectures: ['DeepseekV3ForCausalLM'],
    model_type: 'deepseek_v3',
    vocab_size: config.vocabSize,
    hidden_size: config.dim,
    intermediate_size: config.hiddenDim,
    // Stock DeepSeek code reads this even for dense layers; the MLP is dense everywhere (n_routed_experts null).
    moe_intermediate_size: config.hiddenDim,
    num_hidden_layers: config.nLayers,
    num_attention_heads: config.nHeads,
    num_key_value_heads: config.nHeads,
    n_routed_experts: null,
    n_shared_experts: null,
    first_k_dense_replace: config.nLayers,
    kv_lora_rank: config.kvLoraRank,
    q_lora_rank: config.qLoraRank,
    qk_rope_head_dim: config.qkRopeHeadDim,
    qk_nope_head_dim: config.qkNopeHeadDim,
    v_head_dim: config.vHeadDim,
    head_dim: config.qkRopeHeadDim,
    attention_bias: config.attentionBias,
    qk_latent_layernorm: config.qkLatentLayernorm,
    rope_interleave: config.ropeLayout === 'interleaved',
    rope_theta: config.ropeTheta,
    rope_scaling: null,
    rms_norm_eps: config.rmsEps,
    max_position_embeddings: config.maxSeqLen,
    hidden_act: 'silu',
    tie_word_embeddings: config.tiedEmbeddings,
    bos_token_id: config.bosId,
    eos_token_id: config.eosId,
    attention_dropout: 0,
    initializer_range: 0.02,
    use_cache: true,
    torch_dtype: TORCH_DTYPE[dtype],
    transmla: {
      note:
        'Converted by mla-serve convert (TransMLA: RoRoPE + FreqFold, BKV + joint K/V PCA). No q/kv latent layernorm ' +
        '(qk_latent_layernorm false) and q/kv biases when attention_bias: stock DeepSeek code that always applies ' +
        'kv_a_layernorm and has no biases will not compute this model correctly.',
      source: basename(source.path),
      source_format: source.format,
      source_arch: src.arch,
      source_num_key_value_heads: src.nKvHeads,
      source_head_dim: src.headDim,
      source_rope_layout: src.ropeLayout,
      ...(report
        ? {
            freqfold: report.freqFold,
            bkv_alpha: report.alphas,
            calibration_chunks: report.calibChunks,
            calibration_tokens: report.calibTokens,
          }
        : {}),
    },
  };
  return json;
}

function toF32(t: DenseMatrix): TensorToWrite {
  return { shape: [...t.shape], data: t.data instanceof Float32Array ? t.data : Float32Array.from(t.data) };
}

/** The converted weights under DeepSeek / Hugging Face tensor names, as f32. */
export function deepseekTensors(config: MlaConfig, weights: MlaModelLike): Record<string, TensorToWrite> {
  const out: Record<string, TensorToWrite> = {};
  out['model.embed_tokens.weight'] = toF32(weights.tokenEmbedding);
  out['model.norm.weight'] = toF32(weights.finalNorm);
  if (!config.tiedEmbeddings) out['lm_head.weight'] = toF32(weights.output);
  weights.layers.forEach((l, i) => {
    const p = `model.layers.${i}.`;
    const put = (name: string, t: DenseMatrix | undefined) => {
      if (t) out[p + name] = toF32(t);
    };
    put('input_layernorm.weight', l.attnNorm);
    put('self_attn.q_proj.weight', l.qProj);
    put('self_attn.q_proj.bias', l.qProjBias);
    put('self_attn.q_a_proj.weight', l.qAProj);
    put('self_attn.q_a_layernorm.weight', l.qANorm);
    put('self_attn.q_b_proj.weight', l.qBProj);
    put('self_attn.kv_a_proj_with_mqa.weight', l.kvAProj);
    put('self_attn.kv_a_proj_with_mqa.bias', l.kvAProjBias);
    put('self_attn.kv_a_layernorm.weight', l.kvANorm);
    put('self_attn.kv_b_proj.weight', l.kvBProj);
    put('self_attn.o_proj.weight', l.wo);
    put('post_attention_layernorm.weight', l.ffnNorm);
    put('mlp.gate_proj.weight', l.wGate);
    put('mlp.up_proj.weight', l.wUp);
    put('mlp.down_proj.weight', l.wDown);
  });
  return out;
}

// ---- SentencePiece tokenizer.model (protobuf ModelProto) ----

const PIECE_TYPE_NUMBER: Record<PieceType, number> = { normal: 1, unknown: 2, control: 3, user: 4, unused: 5, byte: 6 };

class ProtoWriter {
  private parts: number[] = [];

  varint(v: number | bigint): this {
    let x = BigInt.asUintN(64, BigInt(v));
    do {
      let b = Number(x & 0x7fn);
      x >>= 7n;
      if (x) b |= 0x80;
      this.parts.push(b);
    } while (x);
    return this;
  }
  key(field: number, wire: number): this {
    return this.varint(field * 8 + wire);
  }
  int(field: number, v: number | boolean): this {
    return this.key(field, 0).varint(typeof v === 'boolean' ? (v ? 1 : 0) : v);
  }
  bytes(field: number, b: Uint8Array): this {
    this.key(field, 2).varint(b.length);
    for (const x of b) this.parts.push(x);
    return this;
  }
  string(field: number, s: string): this {
    return this.bytes(field, new TextEncoder().encode(s));
  }
  float(field: number, v: number): this {
    this.key(field, 5);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, v, true);
    for (const x of b) this.parts.push(x);
    return this;
  }
  finish(): Uint8Array {
    return Uint8Array.from(this.parts);
  }
}

/** A SentencePiece BPE `tokenizer.model` holding this vocabulary (pieces, scores, types, special ids, whitespace rules). */
export function sentencePieceModelBytes(vocab: SentencePieceVocab): Uint8Array {
  const top = new ProtoWriter();
  vocab.pieces.forEach((piece, id) => {
    const m = new ProtoWriter().string(1, piece).float(2, vocab.scores[id]).int(3, PIECE_TYPE_NUMBER[vocab.types[id]]);
    top.bytes(1, m.finish());
  });
  const trainer = new ProtoWriter()
    .int(3, 2) // model_type BPE
    .int(4, vocab.pieces.length) // vocab_size
    .int(35, vocab.types.includes('byte')) // byte_fallback
    .int(40, vocab.unkId ?? -1)
    .int(41, vocab.bosId ?? -1)
    .int(42, vocab.eosId ?? -1)
    .int(43, -1); // pad_id
  top.bytes(2, trainer.finish());
  const normalizer = new ProtoWriter()
    .string(1, 'identity')
    .int(3, vocab.addDummyPrefix ?? true)
    .int(4, vocab.removeExtraWhitespaces ?? false)
    .int(5, true); // escape_whitespaces: spaces are ▁ in pieces
  top.bytes(3, normalizer.finish());
  return top.finish();
}

/** Writes or copies the tokenizer so this project's loader (and HF tooling) reads the same tokenizer back. */
function writeTokenizer(dir: string, source: CheckpointSource): string[] {
  if (source.format === 'hf') {
    const copied: string[] = [];
    for (const f of HF_TOKENIZER_FILES) {
      if (existsSync(join(source.path, f))) {
        copyFileSync(join(source.path, f), join(dir, f));
        copied.push(f);
      }
    }
    if (!copied.includes('tokenizer.json') && !copied.includes('tokenizer.model')) {
      throw new Error(`${source.path}: no tokenizer.json or tokenizer.model to copy into the converted checkpoint`);
    }
    return copied;
  }
  if (!(source.tokenizer instanceof SentencePieceTokenizer)) {
    throw new Error(`${source.path}: the ${source.format} tokenizer is not SentencePiece; cannot write a tokenizer.model for it`);
  }
  const vocab = source.tokenizer.vocabulary();
  writeFileSync(join(dir, 'tokenizer.model'), sentencePieceModelBytes(vocab));
  const special = (id: number | null) => (id === null ? null : vocab.pieces[id]);
  const tokConfig = {
    tokenizer_class: 'LlamaTokenizer',
    bos_token: special(vocab.bosId),
    eos_token: special(vocab.eosId),
    unk_token: special(vocab.unkId),
    add_bos_token: true,
    add_eos_token: false,
    legacy: true,
    model_max_length: source.config.maxSeqLen,
  };
  writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify(tokConfig, null, 2) + '\n');
  return ['tokenizer.model', 'tokenizer_config.json'];
}

/**
 * Writes the checkpoint into dir (created if needed): config.json, model.safetensors (or shards + index) in dtype,
 * tokenizer files. Returns the file names written.
 */
export function writeMlaCheckpoint(
  dir: string,
  config: MlaConfig,
  weights: MlaModelLike,
  opts: { dtype: WriteDtype; source: CheckpointSource; report?: ConversionReport; maxShardBytes?: number },
): string[] {
  mkdirSync(dir, { recursive: true });
  const files: string[] = [];
  writeFileSync(join(dir, 'config.json'), JSON.stringify(deepseekConfigJson(config, opts.dtype, opts.source, opts.report), null, 2) + '\n');
  files.push('config.json');
  files.push(...writeSafetensorsShards(dir, deepseekTensors(config, weights), opts.dtype, { maxShardBytes: opts.maxShardBytes, metadata: { format: 'pt' } }));
  files.push(...writeTokenizer(dir, opts.source));
  return files;
}

// Hugging Face checkpoint directories: config.json (Llama/Qwen2/Mistral GQA, DeepSeek-V2/V3 MLA, dense) + safetensors shards → config, weights.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { GqaConfig, MlaConfig, ModelConfig } from './config.ts';
import { SafetensorsFile } from './safetensors.ts';
import type { GqaLayerWeights, MlaLayerWeights, ModelWeights, Tensor } from './weights.ts';

/** config.json as far as this loader reads it (HF writes many more fields). */
export interface HfConfigJson {
  model_type?: string;
  architectures?: string[];
  hidden_size?: number;
  intermediate_size?: number;
  num_hidden_layers?: number;
  num_attention_heads?: number;
  num_key_value_heads?: number;
  head_dim?: number;
  vocab_size?: number;
  max_position_embeddings?: number;
  rope_theta?: number;
  rms_norm_eps?: number;
  tie_word_embeddings?: boolean;
  hidden_act?: string;
  bos_token_id?: number | number[] | null;
  eos_token_id?: number | number[] | null;
  rope_scaling?: { rope_type?: string; type?: string } | null;
  attention_bias?: boolean;
  mlp_bias?: boolean;
  partial_rotary_factor?: number;
  sliding_window?: number | null;
  use_sliding_window?: boolean;
  // DeepSeek MLA
  kv_lora_rank?: number;
  q_lora_rank?: number | null;
  qk_rope_head_dim?: number;
  qk_nope_head_dim?: number;
  v_head_dim?: number;
  qk_latent_layernorm?: boolean;
  rope_interleave?: boolean;
  softmax_scale?: number;
  n_routed_experts?: number | null;
  first_k_dense_replace?: number;
  moe_layer_freq?: number;
  [key: string]: unknown;
}

const GQA_TYPES = new Set(['llama', 'mistral', 'qwen2']);
const MLA_TYPES = new Set(['deepseek_v2', 'deepseek_v3']);

/** Model types people try that this loader refuses, with the reason users need. */
const REFUSED: Record<string, string> = {
  qwen3: "Qwen3 applies per-head RMSNorm to q and k (q_norm/k_norm), which this server's attention does not have (and which breaks the TransMLA rotation)",
  qwen2_moe: 'mixture-of-experts MLP is not supported',
  qwen3_moe: 'mixture-of-experts MLP and per-head q_norm/k_norm are not supported',
  mixtral: 'mixture-of-experts MLP is not supported',
  gemma: 'Gemma uses a GeGLU MLP, scaled embeddings and (1 + w) RMSNorm',
  gemma2: 'Gemma 2 uses soft-capping, sliding windows on alternate layers and extra norms',
  phi3: 'Phi-3 fuses qkv and gate/up projections',
};

function readJsonFile(path: string, what: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new Error(`${path}: cannot read ${what} (${(e as Error).message})`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${path}: ${what} is not valid JSON (${(e as Error).message})`);
  }
}

function firstId(v: number | number[] | null | undefined): number | undefined {
  if (typeof v === 'number') return v;
  if (Array.isArray(v) && typeof v[0] === 'number') return v[0];
  return undefined;
}

/** Turns config.json into the normalized ModelConfig, refusing what the server cannot run exactly. */
export function parseHfConfig(cfg: HfConfigJson, where: string, ids: { bosId?: number | null; eosId?: number | null } = {}): ModelConfig {
  const type = cfg.model_type;
  if (typeof type !== 'string') throw new Error(`${where}: config.json has no model_type`);
  if (REFUSED[type]) throw new Error(`${where}: model_type "${type}" is not supported: ${REFUSED[type]}`);
  if (!GQA_TYPES.has(type) && !MLA_TYPES.has(type)) {
    throw new Error(`${where}: model_type "${type}" is not supported (supported: ${[...GQA_TYPES, ...MLA_TYPES].join(', ')})`);
  }
  const need = (key: keyof HfConfigJson): number => {
    const v = cfg[key];
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new Error(`${where}: config.json field "${String(key)}" is missing or not a number`);
    return v;
  };
  const refuse = (field: string, value: unknown, why: string): never => {
    throw new Error(`${where}: config.json "${field}": ${JSON.stringify(value)} is not supported (${why})`);
  };
  if (cfg.hidden_act !== undefined && cfg.hidden_act !== 'silu') refuse('hidden_act', cfg.hidden_act, 'the MLP is SwiGLU with silu');
  const ropeType = cfg.rope_scaling ? (cfg.rope_scaling.rope_type ?? cfg.rope_scaling.type) : undefined;
  if (cfg.rope_scaling && ropeType !== 'default') refuse('rope_scaling', cfg.rope_scaling, 'plain RoPE only; scaled RoPE would give wrong positions');
  if (cfg.mlp_bias) refuse('mlp_bias', cfg.mlp_bias, 'MLP projections have no bias here');
  if (cfg.partial_rotary_factor !== undefined && cfg.partial_rotary_factor !== 1) refuse('partial_rotary_factor', cfg.partial_rotary_factor, 'RoPE covers the whole head');

  const dim = need('hidden_size');
  const nHeads = need('num_attention_heads');
  let maxSeqLen = need('max_position_embeddings');
  // Sliding-window attention equals full attention while the context fits in the window, so cap the context there.
  const window = cfg.sliding_window;
  const windowOn = type === 'mistral' ? typeof window === 'number' : cfg.use_sliding_window === true;
  if (windowOn) {
    if (typeof window !== 'number' || window <= 0) refuse('sliding_window', window, 'sliding-window attention needs a window size');
    maxSeqLen = Math.min(maxSeqLen, window as number);
  }
  const base = {
    arch: type,
    dim,
    hiddenDim: need('intermediate_size'),
    nLayers: need('num_hidden_layers'),
    nHeads,
    vocabSize: need('vocab_size'),
    maxSeqLen,
    ropeTheta: cfg.rope_theta ?? 10000,
    rmsEps: cfg.rms_norm_eps ?? 1e-6,
    tiedEmbeddings: cfg.tie_word_embeddings ?? false,
    bosId: firstId(cfg.bos_token_id) ?? ids.bosId ?? -1,
    eosId: firstId(cfg.eos_token_id) ?? ids.eosId ?? -1,
  };

  if (GQA_TYPES.has(type)) {
    const nKvHeads = cfg.num_key_value_heads ?? nHeads;
    const headDim = cfg.head_dim ?? dim / nHeads;
    if (!Number.isInteger(headDim) || headDim % 2) refuse('head_dim', headDim, 'the head dimension must be an even integer');
    if (nHeads % nKvHeads) refuse('num_key_value_heads', nKvHeads, `${nHeads} query heads must be a multiple of it`);
    const c: GqaConfig = { ...base, attention: 'gqa', nKvHeads, headDim, ropeLayout: 'rotate_half', attentionBias: type === 'qwen2' || cfg.attention_bias === true };
    return c;
  }

  // DeepSeek MLA, dense MLP only.
  const nLayers = base.nLayers;
  const experts = cfg.n_routed_experts ?? 0;
  if (experts > 0) {
    const firstDense = cfg.first_k_dense_replace ?? 0;
    const freq = cfg.moe_layer_freq ?? 1;
    const moeLayers: number[] = [];
    for (let i = 0; i < nLayers; i++) if (i >= firstDense && i % freq === 0) moeLayers.push(i);
    if (moeLayers.length) {
      throw new Error(
        `${where}: config.json "n_routed_experts": ${experts} makes layers ${moeLayers.slice(0, 8).join(', ')}${moeLayers.length > 8 ? ', …' : ''} mixture-of-experts ` +
          `(first_k_dense_replace ${firstDense}, moe_layer_freq ${freq}); only dense MLP checkpoints are supported (set n_routed_experts to null)`,
      );
    }
  }
  const qkRopeHeadDim = need('qk_rope_head_dim');
  const qkNopeHeadDim = need('qk_nope_head_dim');
  const qLoraRank = cfg.q_lora_rank ?? null;
  if (qLoraRank !== null && (!Number.isInteger(qLoraRank) || qLoraRank <= 0)) refuse('q_lora_rank', qLoraRank, 'a positive integer or null');
  if (qkRopeHeadDim % 2) refuse('qk_rope_head_dim', qkRopeHeadDim, 'RoPE pairs need an even width');
  const c: MlaConfig = {
    ...base,
    attention: 'mla',
    kvLoraRank: need('kv_lora_rank'),
    qLoraRank,
    qkRopeHeadDim,
    qkNopeHeadDim,
    vHeadDim: need('v_head_dim'),
    attentionBias: cfg.attention_bias ?? false,
    qkLatentLayernorm: cfg.qk_latent_layernorm ?? true,
    ropeLayout: (cfg.rope_interleave ?? true) ? 'interleaved' : 'rotate_half',
    softmaxScale: typeof cfg.softmax_scale === 'number' ? cfg.softmax_scale : 1 / Math.sqrt(qkNopeHeadDim + qkRopeHeadDim),
  };
  return c;
}

/** Tensor names → the safetensors file holding them (one file, or shards through model.safetensors.index.json). */
export class SafetensorsDirectory {
  private readonly files = new Map<string, SafetensorsFile>();
  private readonly where = new Map<string, string>();

  constructor(readonly dir: string) {
    const indexPath = join(dir, 'model.safetensors.index.json');
    if (existsSync(indexPath)) {
      const index = readJsonFile(indexPath, 'safetensors index') as { weight_map?: Record<string, string> };
      if (!index.weight_map || typeof index.weight_map !== 'object') throw new Error(`${indexPath}: no "weight_map" object`);
      for (const [name, file] of Object.entries(index.weight_map)) this.where.set(name, file);
      for (const file of new Set(this.where.values())) {
        if (!existsSync(join(dir, file))) throw new Error(`${indexPath}: lists shard "${file}", which is not in ${dir} (incomplete download?)`);
      }
    } else {
      const single = readdirSync(dir).filter((f) => f.endsWith('.safetensors')).sort();
      if (single.length === 0) {
        const other = readdirSync(dir).filter((f) => /\.(bin|pt|pth|ckpt|gguf)$/.test(f));
        throw new Error(
          `${dir}: no *.safetensors weights${other.length ? ` (found ${other.join(', ')}: only safetensors is read from Hugging Face directories; convert with save_pretrained(safe_serialization=True))` : ''}`,
        );
      }
      if (single.length > 1) throw new Error(`${dir}: ${single.length} safetensors files but no model.safetensors.index.json to say which tensor is where`);
      const f = this.open(single[0]);
      for (const name of f.names) this.where.set(name, single[0]);
    }
  }

  private open(file: string): SafetensorsFile {
    let f = this.files.get(file);
    if (!f) {
      f = SafetensorsFile.open(join(this.dir, file));
      this.files.set(file, f);
    }
    return f;
  }

  has(name: string): boolean {
    return this.where.has(name);
  }

  /** The tensor as f32 with its stored shape, checked against shape when given. */
  read(name: string, shape?: number[]): Tensor {
    const file = this.where.get(name);
    if (!file) throw new Error(`${this.dir}: tensor "${name}" is missing from the checkpoint`);
    const f = this.open(file);
    const e = f.entry(name);
    if (shape && (e.shape.length !== shape.length || e.shape.some((d, i) => d !== shape[i]))) {
      throw new Error(`${join(this.dir, file)}: tensor "${name}" has shape [${e.shape}], config.json implies [${shape}]`);
    }
    return { shape: e.shape, data: f.read(name) };
  }

  close(): void {
    for (const f of this.files.values()) f.close();
    this.files.clear();
  }
}

/** Reads and parses config.json of a directory. */
export function readHfConfig(dir: string, ids: { bosId?: number | null; eosId?: number | null } = {}): { config: ModelConfig; raw: HfConfigJson } {
  const path = join(dir, 'config.json');
  const raw = readJsonFile(path, 'config.json') as HfConfigJson;
  if (typeof raw !== 'object' || raw === null) throw new Error(`${path}: not a JSON object`);
  return { config: parseHfConfig(raw, path, ids), raw };
}

/** Loads the weights of a Hugging Face directory for an already parsed config; tensors read one at a time. */
export function loadHfWeights(dir: string, config: ModelConfig): ModelWeights {
  const st = new SafetensorsDirectory(dir);
  try {
    const { dim, hiddenDim, vocabSize } = config;
    const tokenEmbedding = st.read('model.embed_tokens.weight', [vocabSize, dim]);
    let output: Tensor;
    if (st.has('lm_head.weight') && !config.tiedEmbeddings) output = st.read('lm_head.weight', [vocabSize, dim]);
    else if (config.tiedEmbeddings) output = tokenEmbedding;
    else throw new Error(`${dir}: lm_head.weight is missing and config.json has tie_word_embeddings false`);
    const layers = [];
    for (let i = 0; i < config.nLayers; i++) {
      const p = `model.layers.${i}.`;
      const mlp = {
        ffnNorm: st.read(p + 'post_attention_layernorm.weight', [dim]),
        wGate: st.read(p + 'mlp.gate_proj.weight', [hiddenDim, dim]),
        wUp: st.read(p + 'mlp.up_proj.weight', [hiddenDim, dim]),
        wDown: st.read(p + 'mlp.down_proj.weight', [dim, hiddenDim]),
      };
      const attnNorm = st.read(p + 'input_layernorm.weight', [dim]);
      if (st.has(p + 'self_attn.o_proj.bias')) throw new Error(`${dir}: ${p}self_attn.o_proj.bias: an output-projection bias is not supported`);
      if (config.attention === 'gqa') {
        const q = config.nHeads * config.headDim;
        const kv = config.nKvHeads * config.headDim;
        for (const norm of ['q_norm', 'k_norm']) {
          if (st.has(`${p}self_attn.${norm}.weight`)) throw new Error(`${dir}: ${p}self_attn.${norm}.weight: per-head q/k norms (Qwen3-style) are not supported`);
        }
        const layer: GqaLayerWeights = {
          kind: 'gqa',
          attnNorm,
          wq: st.read(p + 'self_attn.q_proj.weight', [q, dim]),
          wk: st.read(p + 'self_attn.k_proj.weight', [kv, dim]),
          wv: st.read(p + 'self_attn.v_proj.weight', [kv, dim]),
          wo: st.read(p + 'self_attn.o_proj.weight', [dim, q]),
          ...mlp,
        };
        if (config.attentionBias) {
          layer.bq = st.read(p + 'self_attn.q_proj.bias', [q]);
          layer.bk = st.read(p + 'self_attn.k_proj.bias', [kv]);
          layer.bv = st.read(p + 'self_attn.v_proj.bias', [kv]);
        } else if (st.has(p + 'self_attn.q_proj.bias')) {
          throw new Error(`${dir}: ${p}self_attn.q_proj.bias exists but config.json says attention_bias false`);
        }
        layers.push(layer);
      } else {
        const c = config;
        const qRows = c.nHeads * (c.qkNopeHeadDim + c.qkRopeHeadDim);
        for (const bias of ['q_a_proj.bias', 'q_b_proj.bias']) {
          if (st.has(p + 'self_attn.' + bias)) throw new Error(`${dir}: ${p}self_attn.${bias}: low-rank query biases are not supported`);
        }
        const layer: MlaLayerWeights = {
          kind: 'mla',
          attnNorm,
          kvAProj: st.read(p + 'self_attn.kv_a_proj_with_mqa.weight', [c.kvLoraRank + c.qkRopeHeadDim, dim]),
          kvBProj: st.read(p + 'self_attn.kv_b_proj.weight', [c.nHeads * (c.qkNopeHeadDim + c.vHeadDim), c.kvLoraRank]),
          wo: st.read(p + 'self_attn.o_proj.weight', [dim, c.nHeads * c.vHeadDim]),
          ...mlp,
        };
        if (c.qLoraRank === null) {
          layer.qProj = st.read(p + 'self_attn.q_proj.weight', [qRows, dim]);
          if (st.has(p + 'self_attn.q_proj.bias')) layer.qProjBias = st.read(p + 'self_attn.q_proj.bias', [qRows]);
        } else {
          layer.qAProj = st.read(p + 'self_attn.q_a_proj.weight', [c.qLoraRank, dim]);
          // TransMLA's qk_latent_layernorm: false drops q_a_layernorm as well as kv_a_layernorm.
          if (st.has(p + 'self_attn.q_a_layernorm.weight')) layer.qANorm = st.read(p + 'self_attn.q_a_layernorm.weight', [c.qLoraRank]);
          else if (c.qkLatentLayernorm) {
            throw new Error(`${dir}: ${p}self_attn.q_a_layernorm.weight is missing; config.json needs "qk_latent_layernorm": false for a checkpoint without it`);
          }
          layer.qBProj = st.read(p + 'self_attn.q_b_proj.weight', [qRows, c.qLoraRank]);
        }
        if (st.has(p + 'self_attn.kv_a_proj_with_mqa.bias')) {
          layer.kvAProjBias = st.read(p + 'self_attn.kv_a_proj_with_mqa.bias', [c.kvLoraRank + c.qkRopeHeadDim]);
        }
        if (c.attentionBias && !layer.qProjBias && !layer.kvAProjBias) {
          throw new Error(`${dir}: config.json says attention_bias true but layer ${i} has no q_proj.bias or kv_a_proj_with_mqa.bias`);
        }
        if (st.has(p + 'self_attn.kv_a_layernorm.weight')) layer.kvANorm = st.read(p + 'self_attn.kv_a_layernorm.weight', [c.kvLoraRank]);
        else if (c.qkLatentLayernorm) {
          throw new Error(`${dir}: ${p}self_attn.kv_a_layernorm.weight is missing; config.json needs "qk_latent_layernorm": false for a checkpoint without it`);
        }
        layers.push(layer);
      }
    }
    if (config.attention === 'mla') {
      // attentionBias in the normalized config says whether biases are actually present.
      config.attentionBias = layers.some((l) => l.kind === 'mla' && (l.qProjBias !== undefined || l.kvAProjBias !== undefined));
    }
    const finalNorm = st.read('model.norm.weight', [dim]);
    return { tokenEmbedding, layers, finalNorm, output };
  } finally {
    st.close();
  }
}

/**
 * Reorders q/k rows of each head from the interleaved RoPE layout (pairs 2j, 2j+1: GGUF llama, llama2.c) to the
 * rotate_half layout (pairs j, j + d/2: Hugging Face), the inverse of llama.cpp's permute. Row-wise, so it applies to
 * a weight [nHeads·headDim, in] or a bias [nHeads·headDim] alike.
 */
export function interleavedToRotateHalfRows(t: Tensor, nHeads: number, headDim: number): Tensor {
  const rows = nHeads * headDim;
  if (t.shape[0] !== rows) throw new Error(`interleavedToRotateHalfRows: tensor has ${t.shape[0]} rows, ${nHeads} heads × ${headDim} need ${rows}`);
  const cols = t.data.length / rows;
  const out = new Float32Array(t.data.length);
  const half = headDim / 2;
  for (let h = 0; h < nHeads; h++) {
    for (let j = 0; j < half; j++) {
      for (const s of [0, 1]) {
        const from = h * headDim + 2 * j + s;
        const to = h * headDim + j + s * half;
        out.set(t.data.subarray(from * cols, (from + 1) * cols), to * cols);
      }
    }
  }
  return { shape: [...t.shape], data: out };
}

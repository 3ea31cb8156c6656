// Seeded random-weight models with real configurations (Qwen2.5-7B and its MLA shape, Llama-3-8B, Llama-2-7B,
// DeepSeek-V2-Lite attention), for speed work at real sizes without weight files and for small exact tests.
//
// Memory: the f32 weights of a 7B model are ~30 GB. Three ways to use a synthetic model, cheapest first:
//   syntheticSource(...)   lazy: names and shapes of every tensor; each tensor is generated on demand, as f32
//                          (`f32(name)`) or directly as f16 packed two per u32 (`packedF16(name)`, half the memory, no
//                          f32 copy), deterministically from (seed, tensor name). A GPU runner uploads tensor by tensor.
//   syntheticModel(..., { shareLayers: true })   ModelWeights whose layers all share layer 0's tensors: host memory of
//                          one layer plus embeddings; every layer computes the same function (fine for speed, not
//                          for anything that needs distinct layers).
//   syntheticF16Model(...) real size for GPU runs: matrices generated straight into packed f16 (Tensor.f16, uploaded as
//                          is; ~200 M words/s), one layer's tensors shared by all layers on the host (the runner still
//                          gives each layer its own GPU buffers), f32 `data` built only if read. Different values from
//                          the two above (another generator), same distribution.
//   syntheticModel(...)    every tensor distinct and materialized; refused above `maxHostBytes` (default 8 GiB) with
//                          a message naming the options above; use `layers` for small versions in tests.
// Values: uniform with the requested standard deviation (cheaper than Gaussian and just as good for timing);
// matrices std 0.02 (output projections 0.02/√(2·layers) so the residual stream stays O(1)), norms 1, biases 0.02.
import type { GqaConfig, MlaConfig, ModelConfig } from './config.ts';
import type { LayerWeights, ModelWeights, Tensor } from './weights.ts';
import { f32ToF16Bits } from './safetensors.ts';

export type SyntheticModelName =
  | 'qwen2.5-7b'
  | 'qwen2.5-7b-mla'
  | 'llama-3-8b'
  | 'llama-2-7b'
  | 'deepseek-v2-lite-attn'
  | 'tiny-qwen2'
  | 'tiny-qwen2-mla';

export const SYNTHETIC_MODELS: readonly SyntheticModelName[] = [
  'qwen2.5-7b',
  'qwen2.5-7b-mla',
  'llama-3-8b',
  'llama-2-7b',
  'deepseek-v2-lite-attn',
  'tiny-qwen2',
  'tiny-qwen2-mla',
];

const QWEN25_7B: GqaConfig = {
  arch: 'qwen2',
  attention: 'gqa',
  dim: 3584,
  hiddenDim: 18944,
  nLayers: 28,
  nHeads: 28,
  nKvHeads: 4,
  headDim: 128,
  vocabSize: 152064,
  maxSeqLen: 32768,
  ropeTheta: 1e6,
  rmsEps: 1e-6,
  tiedEmbeddings: false,
  bosId: 151643,
  eosId: 151643,
  ropeLayout: 'rotate_half',
  attentionBias: true,
};

const LLAMA3_8B: GqaConfig = {
  arch: 'llama',
  attention: 'gqa',
  dim: 4096,
  hiddenDim: 14336,
  nLayers: 32,
  nHeads: 32,
  nKvHeads: 8,
  headDim: 128,
  vocabSize: 128256,
  maxSeqLen: 8192,
  ropeTheta: 500000,
  rmsEps: 1e-5,
  tiedEmbeddings: false,
  bosId: 128000,
  eosId: 128001,
  ropeLayout: 'rotate_half',
  attentionBias: false,
};

const LLAMA2_7B: GqaConfig = {
  ...LLAMA3_8B,
  dim: 4096,
  hiddenDim: 11008,
  nLayers: 32,
  nHeads: 32,
  nKvHeads: 32,
  vocabSize: 32000,
  maxSeqLen: 4096,
  ropeTheta: 10000,
  bosId: 1,
  eosId: 2,
};

/**
 * A Qwen2-style pair small enough for software Vulkan (SwiftShader) in tests and `--quick` runs: the same code paths as
 * Qwen2.5-7B (biases, rotate_half RoPE, GQA 2:1) at dim 256; its MLA shape is rope 32 + latent 128.
 */
const TINY_QWEN2: GqaConfig = {
  ...QWEN25_7B,
  dim: 256,
  hiddenDim: 704,
  nLayers: 2,
  nHeads: 4,
  nKvHeads: 2,
  headDim: 64,
  vocabSize: 512,
  maxSeqLen: 2048,
  bosId: 1,
  eosId: 2,
};

/** TransMLA's shape for a GQA config: n_q heads of [d nope | r rope] queries, latent R + r, v_head_dim d. */
export function mlaShapeOf(src: GqaConfig, ropeDim: number, kvLoraRank: number): MlaConfig {
  return {
    arch: 'deepseek_v3',
    attention: 'mla',
    dim: src.dim,
    hiddenDim: src.hiddenDim,
    nLayers: src.nLayers,
    nHeads: src.nHeads,
    vocabSize: src.vocabSize,
    maxSeqLen: src.maxSeqLen,
    ropeTheta: src.ropeTheta,
    rmsEps: src.rmsEps,
    tiedEmbeddings: src.tiedEmbeddings,
    bosId: src.bosId,
    eosId: src.eosId,
    kvLoraRank,
    qLoraRank: null,
    qkRopeHeadDim: ropeDim,
    qkNopeHeadDim: src.headDim,
    vHeadDim: src.headDim,
    attentionBias: src.attentionBias,
    qkLatentLayernorm: false,
    ropeLayout: 'interleaved',
    softmaxScale: 1 / Math.sqrt(src.headDim + ropeDim),
  };
}

/**
 * DeepSeek-V2-Lite's attention (16 heads, kv_lora_rank 512, rope 64, nope 128, v 128, no q LoRA, kv_a_layernorm) with a
 * dense MLP of its first layer's width (10944) in every layer: the MoE layers are out of scope. Yarn scaling is not
 * modelled: context 4096 (its original length), softmax scale (128 + 64)^−½.
 */
const DEEPSEEK_V2_LITE_ATTN: MlaConfig = {
  arch: 'deepseek_v2',
  attention: 'mla',
  dim: 2048,
  hiddenDim: 10944,
  nLayers: 27,
  nHeads: 16,
  vocabSize: 102400,
  maxSeqLen: 4096,
  ropeTheta: 10000,
  rmsEps: 1e-6,
  tiedEmbeddings: false,
  bosId: 100000,
  eosId: 100001,
  kvLoraRank: 512,
  qLoraRank: null,
  qkRopeHeadDim: 64,
  qkNopeHeadDim: 128,
  vHeadDim: 128,
  attentionBias: false,
  qkLatentLayernorm: true,
  ropeLayout: 'interleaved',
  softmaxScale: 1 / Math.sqrt(192),
};

export interface SyntheticOptions {
  /** Fewer layers than the real model (small versions for tests). */
  layers?: number;
  seed?: number;
  /** Smaller vocabulary than the real model (the embedding dominates host memory of small versions). */
  vocabSize?: number;
  /** Every layer reuses layer 0's tensors (same values; with syntheticModel, the same objects). */
  shareLayers?: boolean;
  /** Standard deviation of matrix entries (default 0.02); tests use larger values so attention is not uniform. */
  std?: number;
}

/** The configuration of a named synthetic model, with the layer/vocab overrides applied. */
export function syntheticConfig(name: SyntheticModelName | ModelConfig, opts: SyntheticOptions = {}): ModelConfig {
  let base: ModelConfig;
  if (typeof name !== 'string') base = name;
  else if (name === 'qwen2.5-7b') base = QWEN25_7B;
  else if (name === 'qwen2.5-7b-mla') base = mlaShapeOf(QWEN25_7B, 64, 512);
  else if (name === 'llama-3-8b') base = LLAMA3_8B;
  else if (name === 'llama-2-7b') base = LLAMA2_7B;
  else if (name === 'deepseek-v2-lite-attn') base = DEEPSEEK_V2_LITE_ATTN;
  else if (name === 'tiny-qwen2') base = TINY_QWEN2;
  else if (name === 'tiny-qwen2-mla') base = mlaShapeOf(TINY_QWEN2, 32, 128);
  else throw new Error(`unknown synthetic model "${name as string}"; known: ${SYNTHETIC_MODELS.join(', ')}`);
  const out = { ...base };
  if (opts.layers !== undefined) {
    if (!Number.isInteger(opts.layers) || opts.layers < 1) throw new Error(`synthetic layers must be a positive integer, got ${opts.layers}`);
    out.nLayers = opts.layers;
  }
  if (opts.vocabSize !== undefined) {
    if (!Number.isInteger(opts.vocabSize) || opts.vocabSize < 3) throw new Error(`synthetic vocabSize must be an integer ≥ 3, got ${opts.vocabSize}`);
    out.vocabSize = opts.vocabSize;
    out.bosId = Math.min(out.bosId, opts.vocabSize - 1);
    out.eosId = Math.min(out.eosId, opts.vocabSize - 1);
  }
  return out;
}

/** One tensor of a synthetic model, named as in a Hugging Face checkpoint. */
export interface SyntheticTensorSpec {
  name: string;
  shape: number[];
  /** 'random': uniform with this std; 'ones': RMSNorm weights. */
  init: 'random' | 'ones';
  std: number;
  /** Name whose stream generates the values (differs from name for shared layers). */
  streamName: string;
}

export interface SyntheticSource {
  config: ModelConfig;
  tensors: SyntheticTensorSpec[];
  /** Bytes of all tensors as f32 (what syntheticModel would hold without sharing). */
  f32Bytes: number;
  spec(name: string): SyntheticTensorSpec;
  f32(name: string): Float32Array;
  /** f16 packed two per u32, element 2i in the low half (WGSL unpack2x16float order); odd counts padded with 0. */
  packedF16(name: string): Uint32Array;
}

// ---- deterministic streams ----

/** FNV-1a of a string, 32 bit. */
function hashString(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** xoshiro128** seeded through splitmix32: fast, good enough for weights, identical on every platform. */
class Stream {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(seed: number) {
    let x = seed >>> 0;
    const next = () => {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.s0 = next();
    this.s1 = next();
    this.s2 = next();
    this.s3 = next();
  }

  /** Uniform in [0, 1). */
  next(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result / 4294967296;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

function count(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

// ---- tensor lists ----

function layerTensors(c: ModelConfig, i: number, std: number, outStd: number): Omit<SyntheticTensorSpec, 'streamName'>[] {
  const p = `model.layers.${i}`;
  const m = (name: string, shape: number[], s = std): Omit<SyntheticTensorSpec, 'streamName'> => ({ name: `${p}.${name}`, shape, init: 'random', std: s });
  const ones = (name: string, n: number): Omit<SyntheticTensorSpec, 'streamName'> => ({ name: `${p}.${name}`, shape: [n], init: 'ones', std: 0 });
  const out = [ones('input_layernorm.weight', c.dim)];
  if (c.attention === 'gqa') {
    const qd = c.nHeads * c.headDim;
    const kd = c.nKvHeads * c.headDim;
    out.push(m('self_attn.q_proj.weight', [qd, c.dim]), m('self_attn.k_proj.weight', [kd, c.dim]), m('self_attn.v_proj.weight', [kd, c.dim]));
    if (c.attentionBias) out.push(m('self_attn.q_proj.bias', [qd]), m('self_attn.k_proj.bias', [kd]), m('self_attn.v_proj.bias', [kd]));
    out.push(m('self_attn.o_proj.weight', [c.dim, qd], outStd));
  } else {
    const qRows = c.nHeads * (c.qkNopeHeadDim + c.qkRopeHeadDim);
    if (c.qLoraRank === null) {
      out.push(m('self_attn.q_proj.weight', [qRows, c.dim]));
      if (c.attentionBias) out.push(m('self_attn.q_proj.bias', [qRows]));
    } else {
      out.push(m('self_attn.q_a_proj.weight', [c.qLoraRank, c.dim]));
      if (c.qkLatentLayernorm) out.push(ones('self_attn.q_a_layernorm.weight', c.qLoraRank));
      out.push(m('self_attn.q_b_proj.weight', [qRows, c.qLoraRank]));
    }
    out.push(m('self_attn.kv_a_proj_with_mqa.weight', [c.kvLoraRank + c.qkRopeHeadDim, c.dim]));
    if (c.attentionBias) out.push(m('self_attn.kv_a_proj_with_mqa.bias', [c.kvLoraRank + c.qkRopeHeadDim]));
    if (c.qkLatentLayernorm) out.push(ones('self_attn.kv_a_layernorm.weight', c.kvLoraRank));
    out.push(m('self_attn.kv_b_proj.weight', [c.nHeads * (c.qkNopeHeadDim + c.vHeadDim), c.kvLoraRank]));
    out.push(m('self_attn.o_proj.weight', [c.dim, c.nHeads * c.vHeadDim], outStd));
  }
  out.push(
    ones('post_attention_layernorm.weight', c.dim),
    m('mlp.gate_proj.weight', [c.hiddenDim, c.dim]),
    m('mlp.up_proj.weight', [c.hiddenDim, c.dim]),
    m('mlp.down_proj.weight', [c.dim, c.hiddenDim], outStd),
  );
  return out;
}

/** Lazy synthetic model: tensor list plus on-demand generation (f32 or packed f16). */
export function syntheticSource(name: SyntheticModelName | ModelConfig, opts: SyntheticOptions = {}): SyntheticSource {
  const config = syntheticConfig(name, opts);
  const seed = opts.seed ?? 0;
  const std = opts.std ?? 0.02;
  const outStd = std / Math.sqrt(2 * config.nLayers);
  const tensors: SyntheticTensorSpec[] = [];
  tensors.push({ name: 'model.embed_tokens.weight', shape: [config.vocabSize, config.dim], init: 'random', std, streamName: 'model.embed_tokens.weight' });
  for (let i = 0; i < config.nLayers; i++) {
    for (const t of layerTensors(config, i, std, outStd)) {
      const streamName = opts.shareLayers ? t.name.replace(`model.layers.${i}.`, 'model.layers.0.') : t.name;
      tensors.push({ ...t, streamName });
    }
  }
  tensors.push({ name: 'model.norm.weight', shape: [config.dim], init: 'ones', std: 0, streamName: 'model.norm.weight' });
  if (!config.tiedEmbeddings) tensors.push({ name: 'lm_head.weight', shape: [config.vocabSize, config.dim], init: 'random', std, streamName: 'lm_head.weight' });
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const spec = (n: string): SyntheticTensorSpec => {
    const t = byName.get(n);
    if (!t) throw new Error(`synthetic model has no tensor "${n}" (${tensors.length} tensors, e.g. ${tensors[1]?.name})`);
    return t;
  };
  const fill = (t: SyntheticTensorSpec, emit: (i: number, v: number) => void) => {
    const n = count(t.shape);
    if (t.init === 'ones') {
      for (let i = 0; i < n; i++) emit(i, 1);
      return;
    }
    const stream = new Stream(hashString(t.streamName) ^ Math.imul(seed + 1, 0x9e3779b1));
    const half = Math.sqrt(3) * t.std; // uniform on [−half, half] has this std
    for (let i = 0; i < n; i++) emit(i, (2 * stream.next() - 1) * half);
  };
  return {
    config,
    tensors,
    f32Bytes: tensors.reduce((a, t) => a + 4 * count(t.shape), 0),
    spec,
    f32(n: string): Float32Array {
      const t = spec(n);
      const out = new Float32Array(count(t.shape));
      fill(t, (i, v) => (out[i] = v));
      return out;
    },
    packedF16(n: string): Uint32Array {
      const t = spec(n);
      const out = new Uint32Array(Math.ceil(count(t.shape) / 2));
      fill(t, (i, v) => {
        const h = f32ToF16Bits(v);
        out[i >> 1] |= i & 1 ? h << 16 : h;
      });
      return out;
    },
  };
}

/**
 * Synthetic ModelWeights in memory. Refuses more than maxHostBytes (default 8 GiB) of distinct f32 tensors; with
 * shareLayers only layer 0 is generated and every layer points at its tensors.
 */
export function syntheticModel(
  name: SyntheticModelName | ModelConfig,
  opts: SyntheticOptions & { maxHostBytes?: number } = {},
): { config: ModelConfig; weights: ModelWeights } {
  const src = syntheticSource(name, opts);
  const c = src.config;
  const maxBytes = opts.maxHostBytes ?? 8 * 1024 ** 3;
  const distinct = new Map<string, SyntheticTensorSpec>();
  for (const t of src.tensors) distinct.set(t.streamName, t);
  const bytes = [...distinct.values()].reduce((a, t) => a + 4 * count(t.shape), 0);
  if (bytes > maxBytes) {
    throw new Error(
      `synthetic ${typeof name === 'string' ? name : c.arch} needs ${(bytes / 1024 ** 3).toFixed(1)} GiB of f32 weights on the host, ` +
        `over the ${(maxBytes / 1024 ** 3).toFixed(1)} GiB limit: pass { shareLayers: true } (one layer's tensors reused), ` +
        `{ layers: n } for a smaller model, use syntheticSource() to generate tensors one at a time (f32 or packed f16), or syntheticF16Model() for GPU runs at real size`,
    );
  }
  const cache = new Map<string, Tensor>();
  const get = (n: string): Tensor => {
    const t = src.spec(n);
    let out = cache.get(t.streamName);
    if (!out) {
      out = { shape: t.shape, data: src.f32(n) };
      cache.set(t.streamName, out);
    }
    return out;
  };
  return assembleWeights(src, get);
}

/** ModelWeights of a synthetic source, each tensor from `get` (which decides how it is generated and shared). */
function assembleWeights(src: SyntheticSource, get: (name: string) => Tensor): { config: ModelConfig; weights: ModelWeights } {
  const c = src.config;
  const has = (n: string) => src.tensors.some((t) => t.name === n);
  const layers: LayerWeights[] = [];
  for (let i = 0; i < c.nLayers; i++) {
    const p = `model.layers.${i}.`;
    const opt = (n: string) => (has(p + n) ? get(p + n) : undefined);
    const common = {
      attnNorm: get(p + 'input_layernorm.weight'),
      ffnNorm: get(p + 'post_attention_layernorm.weight'),
      wGate: get(p + 'mlp.gate_proj.weight'),
      wUp: get(p + 'mlp.up_proj.weight'),
      wDown: get(p + 'mlp.down_proj.weight'),
      wo: get(p + 'self_attn.o_proj.weight'),
    };
    if (c.attention === 'gqa') {
      layers.push({
        kind: 'gqa',
        ...common,
        wq: get(p + 'self_attn.q_proj.weight'),
        wk: get(p + 'self_attn.k_proj.weight'),
        wv: get(p + 'self_attn.v_proj.weight'),
        bq: opt('self_attn.q_proj.bias'),
        bk: opt('self_attn.k_proj.bias'),
        bv: opt('self_attn.v_proj.bias'),
      });
    } else {
      layers.push({
        kind: 'mla',
        ...common,
        qProj: opt('self_attn.q_proj.weight'),
        qProjBias: opt('self_attn.q_proj.bias'),
        qAProj: opt('self_attn.q_a_proj.weight'),
        qANorm: opt('self_attn.q_a_layernorm.weight'),
        qBProj: opt('self_attn.q_b_proj.weight'),
        kvAProj: get(p + 'self_attn.kv_a_proj_with_mqa.weight'),
        kvAProjBias: opt('self_attn.kv_a_proj_with_mqa.bias'),
        kvANorm: opt('self_attn.kv_a_layernorm.weight'),
        kvBProj: get(p + 'self_attn.kv_b_proj.weight'),
      });
    }
  }
  const tokenEmbedding = get('model.embed_tokens.weight');
  return {
    config: c,
    weights: {
      tokenEmbedding,
      layers,
      finalNorm: get('model.norm.weight'),
      output: c.tiedEmbeddings ? tokenEmbedding : get('lm_head.weight'),
    },
  };
}

// ---- real-size models for GPU runs: matrices generated directly as packed f16 ----

/** f16 bits of the 65536 quantiles of uniform[−half, half]: one random u32 picks two values through this table. */
function uniformF16Table(half: number): Uint16Array {
  const table = new Uint16Array(65536);
  for (let j = 0; j < 65536; j++) table[j] = f32ToF16Bits(((j + 0.5) / 65536) * 2 * half - half);
  return table;
}

let f16ToF32Table: Float32Array | undefined;

/** f32 value of every f16 bit pattern (for the lazy f32 view of a packed tensor). */
function f16Values(): Float32Array {
  if (!f16ToF32Table) {
    f16ToF32Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const sign = h & 0x8000 ? -1 : 1;
      const exp = (h >>> 10) & 0x1f;
      const mant = h & 0x3ff;
      f16ToF32Table[h] = exp === 0 ? sign * mant * 2 ** -24 : exp === 0x1f ? (mant ? NaN : sign * Infinity) : sign * (1 + mant / 1024) * 2 ** (exp - 15);
    }
  }
  return f16ToF32Table;
}

/**
 * A [rows, cols] matrix of uniform values with this std, packed f16 with rows padded to a multiple of 8 values.
 * xorshift32 per word and a 64K-entry quantile table: ~200 M words/s in V8 (the Stream path plus f32→f16 rounding
 * runs ~30 M values/s, minutes for a 7B model).
 */
function randomPackedF16(rows: number, cols: number, std: number, seed: number): Uint32Array {
  const table = uniformF16Table(Math.sqrt(3) * std);
  const rowWords = Math.ceil(cols / 8) * 4;
  const out = new Uint32Array(rows * rowWords);
  let x = seed | 0 || 0x2545f491;
  const n = out.length;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = table[x & 0xffff] | (table[x >>> 16] << 16);
  }
  if (rowWords * 2 !== cols) {
    // Zero the padding (the kernels read whole padded rows).
    for (let r = 0; r < rows; r++) {
      const base = r * rowWords;
      if (cols & 1) out[base + (cols >> 1)] &= 0xffff;
      out.fill(0, base + Math.ceil(cols / 2), base + rowWords);
    }
  }
  return out;
}

/** A Tensor holding packed f16 words whose `data` (unpadded f32 of the same values) is built on first read. */
function packedTensor(shape: number[], f16: Uint32Array): Tensor {
  let data: Float32Array | undefined;
  const [rows, cols] = shape;
  const rowWords = Math.ceil(cols / 8) * 4;
  const t = { shape, f16 } as Tensor;
  Object.defineProperty(t, 'data', {
    enumerable: true,
    get(): Float32Array {
      if (!data) {
        const v = f16Values();
        data = new Float32Array(rows * cols);
        for (let r = 0; r < rows; r++) {
          for (let c = 0; c < cols; c++) {
            const w = f16[r * rowWords + (c >> 1)];
            data[r * cols + c] = v[c & 1 ? w >>> 16 : w & 0xffff];
          }
        }
      }
      return data;
    },
  });
  return t;
}

/**
 * Synthetic ModelWeights at real size for GPU runs: every matrix is generated directly as packed f16 (Tensor.f16, the
 * form a GPU runner uploads as is), with `data` a lazy f32 view built only if something reads it; norms and biases are
 * plain f32 as in syntheticSource. The values are NOT those of syntheticSource/syntheticModel (a faster generator
 * draws them, same distribution); they are deterministic in (seed, tensor name).
 *
 * shareLayers (default TRUE here): host memory holds one layer (Qwen2.5-7B: 233 M values, 466 MB of f16) and every
 * layer's tensors are those objects; a GPU runner still uploads each layer into its own buffers, so a decode step
 * streams all 28 layers from GPU memory as with real weights (each layer's 466 MB is far over the H200's 50 MB L2; only
 * the numbers are the same in every layer, which timing does not see). shareLayers false generates every layer
 * (Qwen2.5-7B: ~15 GB of host memory, ~28× the generation time).
 */
export function syntheticF16Model(name: SyntheticModelName | ModelConfig, opts: SyntheticOptions = {}): { config: ModelConfig; weights: ModelWeights } {
  const shareLayers = opts.shareLayers ?? true;
  const src = syntheticSource(name, { ...opts, shareLayers });
  const seed = opts.seed ?? 0;
  const cache = new Map<string, Tensor>();
  const get = (n: string): Tensor => {
    const t = src.spec(n);
    let out = cache.get(t.streamName);
    if (!out) {
      if (t.shape.length === 2 && t.init === 'random') {
        const wordSeed = hashString(t.streamName) ^ Math.imul(seed + 1, 0x9e3779b1);
        out = packedTensor(t.shape, randomPackedF16(t.shape[0], t.shape[1], t.std, wordSeed));
      } else {
        out = { shape: t.shape, data: src.f32(n) };
      }
      // One object for every layer that shares this stream: an int8 upload quantizes it once, not once per layer.
      if (shareLayers) out.shared = true;
      cache.set(t.streamName, out);
    }
    return out;
  };
  return assembleWeights(src, get);
}

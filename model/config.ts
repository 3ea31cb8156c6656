// Normalized model configuration: one vocabulary for GQA (Llama/Qwen2/Mistral) and MLA (DeepSeek-style) models.

/** Where RoPE pairs live inside a head: GGUF `llama` / llama2.c pair (2j, 2j+1); HF pairs (j, j + d/2). */
export type RopeLayout = 'interleaved' | 'rotate_half';

export interface BaseConfig {
  /** Source architecture name, e.g. 'llama', 'qwen2', 'mistral', 'deepseek_v3'. */
  arch: string;
  dim: number;
  hiddenDim: number;
  nLayers: number;
  nHeads: number;
  vocabSize: number;
  /** Context length the model serves (trained length, not an inflated metadata value). */
  maxSeqLen: number;
  ropeTheta: number;
  rmsEps: number;
  /** Classifier shares the token embedding. */
  tiedEmbeddings: boolean;
  bosId: number;
  eosId: number;
}

export interface GqaConfig extends BaseConfig {
  attention: 'gqa';
  nKvHeads: number;
  headDim: number;
  ropeLayout: RopeLayout;
  /** q/k/v projections carry biases (Qwen2). */
  attentionBias: boolean;
}

export interface MlaConfig extends BaseConfig {
  attention: 'mla';
  kvLoraRank: number;
  /** null: q_proj is one full matrix; a number: q_a_proj → q_a_layernorm → q_b_proj. */
  qLoraRank: number | null;
  qkRopeHeadDim: number;
  qkNopeHeadDim: number;
  vHeadDim: number;
  /** q_proj / kv_a_proj_with_mqa carry biases (converted Qwen2). */
  attentionBias: boolean;
  /**
   * Apply kv_a_layernorm to the latent c, and q_a_layernorm to the query latent when qLoraRank is set (TransMLA's
   * `qk_latent_layernorm` governs both; stock DeepSeek: true; TransMLA output: false).
   */
  qkLatentLayernorm: boolean;
  /** MLA rope part is interleaved (DeepSeek, `rope_interleave: true`). */
  ropeLayout: RopeLayout;
  /** Softmax scale applied to scores; default (qkNopeHeadDim + qkRopeHeadDim)^-1/2. */
  softmaxScale: number;
}

export type ModelConfig = GqaConfig | MlaConfig;

/** Values stored per token per layer in the KV cache. */
export function kvValuesPerToken(c: ModelConfig): number {
  return c.attention === 'mla' ? c.kvLoraRank + c.qkRopeHeadDim : 2 * c.nKvHeads * c.headDim;
}

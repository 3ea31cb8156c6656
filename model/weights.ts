// In-memory weights: f32 tensors, row-major, matrices stored [out, in] (y = W x), as HF and llama2.c store them.

export interface Tensor {
  shape: number[];
  data: Float32Array;
  /**
   * Optional: the same matrix [rows, cols] already as f16, packed two per u32 (element 2i in the low half), rows padded
   * to a multiple of 8 values (zeros). A GPU runner uploading f16 weights takes these words as they are instead of
   * converting `data`; sources that generate or read f16 directly (synthetic models at real size) set it, and may make
   * `data` a lazy getter so the f32 copy is only built if something reads it.
   */
  f16?: Uint32Array;
  /**
   * Optional: this Tensor object stands for the same weights in several places (synthetic models share one layer's
   * tensors across all layers). Uploads may then keep forms derived from it (the int8 quantization) on the side for
   * the object's lifetime; real checkpoints never set it, so nothing derived from their weights is kept.
   */
  shared?: boolean;
}

export interface MlpWeights {
  ffnNorm: Tensor; // [dim]
  wGate: Tensor; // [hiddenDim, dim]
  wUp: Tensor; // [hiddenDim, dim]
  wDown: Tensor; // [dim, hiddenDim]
}

export interface GqaLayerWeights extends MlpWeights {
  kind: 'gqa';
  attnNorm: Tensor; // [dim]
  wq: Tensor; // [nHeads*headDim, dim]
  wk: Tensor; // [nKvHeads*headDim, dim]
  wv: Tensor; // [nKvHeads*headDim, dim]
  wo: Tensor; // [dim, nHeads*headDim]
  bq?: Tensor;
  bk?: Tensor;
  bv?: Tensor;
}

export interface MlaLayerWeights extends MlpWeights {
  kind: 'mla';
  attnNorm: Tensor; // [dim]
  /** q_proj [nHeads*(nope+rope), dim] when qLoraRank is null. Per head: nope rows, then rope rows. */
  qProj?: Tensor;
  qProjBias?: Tensor;
  /** Low-rank query: q_a_proj [qLoraRank, dim], q_a_layernorm [qLoraRank], q_b_proj [nHeads*(nope+rope), qLoraRank]. */
  qAProj?: Tensor;
  qANorm?: Tensor;
  qBProj?: Tensor;
  /** kv_a_proj_with_mqa [kvLoraRank + rope, dim]: latent c rows, then k_pe rows. */
  kvAProj: Tensor;
  kvAProjBias?: Tensor;
  /** kv_a_layernorm [kvLoraRank], used only when config.qkLatentLayernorm. */
  kvANorm?: Tensor;
  /** kv_b_proj [nHeads*(nope+v), kvLoraRank]. Per head: k_nope rows, then v rows. */
  kvBProj: Tensor;
  wo: Tensor; // [dim, nHeads*vHeadDim]
}

export type LayerWeights = GqaLayerWeights | MlaLayerWeights;

export interface ModelWeights {
  tokenEmbedding: Tensor; // [vocab, dim]
  layers: LayerWeights[];
  finalNorm: Tensor; // [dim]
  /** Classifier [vocab, dim]; the same object as tokenEmbedding when tied. */
  output: Tensor;
}

export function tensor(shape: number[], data?: Float32Array): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  if (data && data.length !== n) throw new Error(`tensor data has ${data.length} values, shape [${shape}] needs ${n}`);
  return { shape, data: data ?? new Float32Array(n) };
}

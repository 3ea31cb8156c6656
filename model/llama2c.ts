// llama2.c checkpoint reader (.bin: 7×int32 header, f32 weights in llama2.c order) into GqaConfig + ModelWeights.
import { closeSync, fstatSync, openSync } from 'node:fs';
import type { GqaConfig } from './config.ts';
import { readExactly } from './safetensors.ts';
import type { GqaLayerWeights, ModelWeights, Tensor } from './weights.ts';

export interface Llama2cHeader {
  dim: number;
  hiddenDim: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  vocabSize: number;
  seqLen: number;
  /** Positive vocab_size in the file: the classifier is the token embedding. */
  shared: boolean;
}

const HEADER_BYTES = 28;

/**
 * Loads a llama2.c "legacy" (version 0) checkpoint. Order after the header: token_embedding [vocab, dim],
 * rms_att [L, dim], wq [L, dim, dim], wk [L, kvDim, dim], wv [L, kvDim, dim], wo [L, dim, dim], rms_ffn [L, dim],
 * w1 (gate) [L, hidden, dim], w2 (down) [L, dim, hidden], w3 (up) [L, hidden, dim], rms_final [dim],
 * two RoPE tables [seqLen, headDim/2] (skipped: RoPE is recomputed), then wcls [vocab, dim] when not shared.
 * RoPE pairs are interleaved (2j, 2j+1); θ 10000 and eps 1e-5 are llama2.c's constants.
 */
export function loadLlama2cModel(path: string): { config: GqaConfig; weights: ModelWeights; header: Llama2cHeader } {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    throw new Error(`${path}: cannot open llama2.c checkpoint (${(e as Error).message})`);
  }
  try {
    const size = fstatSync(fd).size;
    if (size < HEADER_BYTES) throw new Error(`${path}: ${size} bytes is too short for a llama2.c checkpoint (28-byte header)`);
    const hb = new Uint8Array(HEADER_BYTES);
    readExactly(fd, hb, 0, path);
    const dv = new DataView(hb.buffer);
    if (dv.getUint32(0, true) === 0x616b3432) {
      throw new Error(`${path}: llama2.c version-1/2 export ("ak42" magic) is not supported; export with --version 0 (legacy) or use the GGUF`);
    }
    const raw = Array.from({ length: 7 }, (_, i) => dv.getInt32(4 * i, true));
    const [dim, hiddenDim, nLayers, nHeads, nKvHeads, vocabRaw, seqLen] = raw;
    const header: Llama2cHeader = { dim, hiddenDim, nLayers, nHeads, nKvHeads, vocabSize: Math.abs(vocabRaw), seqLen, shared: vocabRaw > 0 };
    const sane =
      dim > 0 && hiddenDim > 0 && nLayers > 0 && nHeads > 0 && nKvHeads > 0 && vocabRaw !== 0 && seqLen > 0 &&
      dim % nHeads === 0 && nHeads % nKvHeads === 0 && dim < 1 << 16 && nLayers < 1024 && seqLen < 1 << 24;
    if (!sane) {
      throw new Error(
        `${path}: header [dim ${dim}, hidden ${hiddenDim}, layers ${nLayers}, heads ${nHeads}, kv heads ${nKvHeads}, vocab ${vocabRaw}, seq ${seqLen}] is not a llama2.c checkpoint`,
      );
    }
    const headDim = dim / nHeads;
    const kvDim = nKvHeads * headDim;
    const V = header.vocabSize;
    const L = nLayers;
    const ropeValues = seqLen * headDim; // two tables of seqLen × headDim/2
    const weightValues =
      V * dim + L * dim + L * dim * dim + 2 * L * kvDim * dim + L * dim * dim + L * dim + 3 * L * hiddenDim * dim + dim;
    const expected = HEADER_BYTES + 4 * (weightValues + ropeValues + (header.shared ? 0 : V * dim));
    if (size !== expected) {
      throw new Error(
        `${path}: ${size} bytes, but its header (dim ${dim}, hidden ${hiddenDim}, ${L} layers, ${nHeads}/${nKvHeads} heads, vocab ${V}, seq ${seqLen}, ${header.shared ? 'shared' : 'separate'} classifier) needs exactly ${expected}: ${size < expected ? 'truncated' : 'corrupt or not llama2.c'}`,
      );
    }

    let pos = HEADER_BYTES;
    const next = (shape: number[]): Tensor => {
      const n = shape.reduce((a, b) => a * b, 1);
      const data = new Float32Array(n);
      readExactly(fd, new Uint8Array(data.buffer), pos, path);
      pos += 4 * n;
      return { shape, data };
    };
    // Per-layer stacks are read layer by layer into their own arrays (no views into a shared block: GPU uploads
    // and other consumers may take .data.buffer as the tensor).
    const stack = (rows: number, cols: number): Tensor[] =>
      Array.from({ length: L }, () => next(cols === 1 ? [rows] : [rows, cols]));
    const tokenEmbedding = next([V, dim]);
    const rmsAtt = stack(dim, 1);
    const wq = stack(dim, dim);
    const wk = stack(kvDim, dim);
    const wv = stack(kvDim, dim);
    const wo = stack(dim, dim);
    const rmsFfn = stack(dim, 1);
    const w1 = stack(hiddenDim, dim);
    const w2 = stack(dim, hiddenDim);
    const w3 = stack(hiddenDim, dim);
    const finalNorm = next([dim]);
    pos += 4 * ropeValues;
    const output = header.shared ? tokenEmbedding : next([V, dim]);

    const layers: GqaLayerWeights[] = [];
    for (let i = 0; i < L; i++) {
      layers.push({
        kind: 'gqa',
        attnNorm: rmsAtt[i],
        wq: wq[i],
        wk: wk[i],
        wv: wv[i],
        wo: wo[i],
        ffnNorm: rmsFfn[i],
        wGate: w1[i],
        wDown: w2[i],
        wUp: w3[i],
      });
    }
    const config: GqaConfig = {
      arch: 'llama',
      attention: 'gqa',
      dim,
      hiddenDim,
      nLayers: L,
      nHeads,
      nKvHeads,
      headDim,
      vocabSize: V,
      maxSeqLen: seqLen,
      ropeTheta: 10000,
      rmsEps: 1e-5,
      tiedEmbeddings: header.shared,
      bosId: 1,
      eosId: 2,
      ropeLayout: 'interleaved',
      attentionBias: false,
    };
    return { config, weights: { tokenEmbedding, layers, finalNorm, output }, header };
  } finally {
    closeSync(fd);
  }
}

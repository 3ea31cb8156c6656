// Float64 building blocks of the CPU reference forward: the oracle every GPU kernel is tested against.
import type { RopeLayout } from '../config.ts';
import type { Tensor } from '../weights.ts';

export type Vec = Float64Array;

/** A row-major matrix [out, in] in f32 (checkpoint weights) or f64 (converter intermediates kept exact). */
export interface DenseMatrix {
  shape: number[];
  data: Float32Array | Float64Array;
}

export function rmsnorm(x: ArrayLike<number>, weight: ArrayLike<number>, eps: number): Vec {
  const n = x.length;
  let ss = 0;
  for (let i = 0; i < n; i++) ss += x[i] * x[i];
  const inv = 1 / Math.sqrt(ss / n + eps);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
  return out;
}

/** y = W x (+ b) for W stored [out, in]. */
export function matvec(w: Tensor | DenseMatrix, x: ArrayLike<number>, bias?: Tensor | DenseMatrix): Vec {
  const [rows, cols] = w.shape;
  if (x.length !== cols) throw new Error(`matvec: input has ${x.length} values, matrix [${rows}, ${cols}] wants ${cols}`);
  const out = new Float64Array(rows);
  const d = w.data;
  for (let r = 0; r < rows; r++) {
    let acc = 0;
    const base = r * cols;
    for (let c = 0; c < cols; c++) acc += d[base + c] * x[c];
    out[r] = bias ? acc + bias.data[r] : acc;
  }
  return out;
}

/** Index of the partner pair (a, b) for rotation pair j of a head of width dims. */
export function ropePair(j: number, dims: number, layout: RopeLayout): [number, number] {
  return layout === 'interleaved' ? [2 * j, 2 * j + 1] : [j, j + dims / 2];
}

/**
 * Rotates v[offset .. offset+dims) in place for position pos: pair j turns by pos · θ^(−2j/dims).
 */
export function rope(v: Float64Array, offset: number, dims: number, pos: number, theta: number, layout: RopeLayout): void {
  for (let j = 0; j < dims / 2; j++) {
    const freq = Math.pow(theta, (-2 * j) / dims);
    const angle = pos * freq;
    const cos = Math.cos(angle);
    const sin = Math.sin(angle);
    const [a, b] = ropePair(j, dims, layout);
    const x0 = v[offset + a];
    const x1 = v[offset + b];
    v[offset + a] = x0 * cos - x1 * sin;
    v[offset + b] = x0 * sin + x1 * cos;
  }
}

export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

export function softmaxInPlace(v: Float64Array, n = v.length): void {
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (v[i] > max) max = v[i];
  let sum = 0;
  for (let i = 0; i < n; i++) {
    v[i] = Math.exp(v[i] - max);
    sum += v[i];
  }
  for (let i = 0; i < n; i++) v[i] /= sum;
}

/** SwiGLU MLP: down(silu(gate x) * up x). */
export function mlp(x: ArrayLike<number>, wGate: Tensor, wUp: Tensor, wDown: Tensor): Vec {
  const g = matvec(wGate, x);
  const u = matvec(wUp, x);
  for (let i = 0; i < g.length; i++) g[i] = silu(g[i]) * u[i];
  return matvec(wDown, g);
}

/**
 * Causal attention of one query position over cached keys/values (rows 0..len-1), grouped heads:
 * query head h reads kv head ⌊h / (nHeads / nKvHeads)⌋. q [nHeads*headDim], keys/values rows [nKvHeads*headDim].
 */
export function attendGqa(
  q: Vec,
  keys: Vec[],
  values: Vec[],
  nHeads: number,
  nKvHeads: number,
  headDim: number,
  scale = 1 / Math.sqrt(headDim),
): Vec {
  const group = nHeads / nKvHeads;
  const len = keys.length;
  const out = new Float64Array(nHeads * headDim);
  const scores = new Float64Array(len);
  for (let h = 0; h < nHeads; h++) {
    const kvh = Math.floor(h / group);
    const qo = h * headDim;
    const ko = kvh * headDim;
    for (let t = 0; t < len; t++) {
      let s = 0;
      const k = keys[t];
      for (let i = 0; i < headDim; i++) s += q[qo + i] * k[ko + i];
      scores[t] = s * scale;
    }
    softmaxInPlace(scores, len);
    for (let t = 0; t < len; t++) {
      const p = scores[t];
      const v = values[t];
      for (let i = 0; i < headDim; i++) out[qo + i] += p * v[ko + i];
    }
  }
  return out;
}

/** Log-softmax value of one entry, computed stably in float64. */
export function logSoftmaxAt(logits: ArrayLike<number>, index: number): number {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  return logits[index] - max - Math.log(sum);
}

/** Runs `step` for each token in order; keeps logits of every token, or of the last only when mode is 'last'. */
export function forwardTokens(
  tokens: number[],
  mode: 'all' | 'last' | undefined,
  step: (token: number, wantLogits: boolean) => Float64Array | null,
): Float64Array[] {
  const out: Float64Array[] = [];
  for (let i = 0; i < tokens.length; i++) {
    const logits = step(tokens[i], mode !== 'last' || i === tokens.length - 1);
    if (logits) out.push(logits);
  }
  return out;
}

/** The token's embedding row as the residual stream; a clear error for ids outside the vocabulary. */
export function embedToken(embedding: Tensor, token: number, dim: number, vocabSize: number): Vec {
  if (!Number.isInteger(token) || token < 0 || token >= vocabSize) throw new Error(`token id ${token} outside vocabulary of ${vocabSize}`);
  return Float64Array.from(embedding.data.subarray(token * dim, (token + 1) * dim));
}

/** Adds `delta` into the residual stream `x`. */
export function addInto(x: Vec, delta: ArrayLike<number>): void {
  for (let i = 0; i < x.length; i++) x[i] += delta[i];
}

/** The feed-forward half of a decoder layer: x += mlp(rmsnorm(x)). */
export function addMlpBlock(x: Vec, lw: { ffnNorm: Tensor; wGate: Tensor; wUp: Tensor; wDown: Tensor }, eps: number): void {
  addInto(x, mlp(rmsnorm(x, lw.ffnNorm.data, eps), lw.wGate, lw.wUp, lw.wDown));
}

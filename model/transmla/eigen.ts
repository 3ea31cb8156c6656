// Symmetric eigendecomposition (cyclic Jacobi, float64) and Gram-matrix accumulation for the TransMLA PCAs.
//
// Why Jacobi: the matrices here are small (RoRoPE groups n_kv·f, joint K/V PCA 2L − r ≤ ~1000 for 7B GQA models),
// Jacobi is short, has no failure modes, and gives eigenvectors orthogonal to machine precision, which the
// full-rank exactness tests (≤ 1e-9) rely on. Cost is O(n³) per sweep with ~6–10 sweeps: fine up to n ≈ 1000
// (tens of seconds), too slow for MHA sources like Llama-2-7B (2L − r = 8128); those would want Householder
// tridiagonalisation + implicit QL instead.

/** Eigenvalues (descending) and eigenvectors (column p of the row-major n×n `vectors` is component p). */
export interface Eigen {
  n: number;
  values: Float64Array;
  /** Row-major n×n: vectors[i*n + p] = component i of eigenvector p. */
  vectors: Float64Array;
}

/**
 * Eigendecomposition of the symmetric n×n matrix a (row-major; only read, never modified).
 * Eigenvectors are sorted by descending eigenvalue, and each is signed so its largest-magnitude entry is positive,
 * so the result is a deterministic function of the input.
 */
export function symmetricEigen(a: Float64Array, n: number, opts: { maxSweeps?: number } = {}): Eigen {
  if (a.length !== n * n) throw new Error(`symmetricEigen: matrix has ${a.length} values, ${n}×${n} needs ${n * n}`);
  const m = Float64Array.from(a);
  // Symmetrize: callers accumulate only approximately symmetric sums in some paths.
  for (let i = 0; i < n; i++) {
    for (let j = i + 1; j < n; j++) {
      const s = 0.5 * (m[i * n + j] + m[j * n + i]);
      m[i * n + j] = s;
      m[j * n + i] = s;
    }
  }
  const v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) v[i * n + i] = 1;
  const maxSweeps = opts.maxSweeps ?? 60;

  let total = 0;
  for (let i = 0; i < n * n; i++) total += m[i] * m[i];
  for (let sweep = 0; ; sweep++) {
    let off = 0;
    for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) off += m[i * n + j] * m[i * n + j];
    if (off <= 1e-32 * total || off === 0) break;
    if (sweep >= maxSweeps) {
      throw new Error(`symmetricEigen: no convergence after ${maxSweeps} Jacobi sweeps (n = ${n}, off-diagonal mass ${off.toExponential(3)})`);
    }
    for (let p = 0; p < n - 1; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = m[p * n + q];
        if (apq === 0) continue;
        const app = m[p * n + p];
        const aqq = m[q * n + q];
        // Skip rotations that cannot change the diagonal in float64.
        if (Math.abs(apq) < 1e-300 || Math.abs(apq) <= 1e-18 * Math.sqrt(Math.abs(app * aqq))) {
          m[p * n + q] = 0;
          m[q * n + p] = 0;
          continue;
        }
        const theta = (aqq - app) / (2 * apq);
        const t = (theta >= 0 ? 1 : -1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        const tau = s / (1 + c);
        m[p * n + p] = app - t * apq;
        m[q * n + q] = aqq + t * apq;
        m[p * n + q] = 0;
        m[q * n + p] = 0;
        for (let k = 0; k < n; k++) {
          if (k === p || k === q) continue;
          const akp = m[k * n + p];
          const akq = m[k * n + q];
          const nkp = akp - s * (akq + tau * akp);
          const nkq = akq + s * (akp - tau * akq);
          m[k * n + p] = nkp;
          m[p * n + k] = nkp;
          m[k * n + q] = nkq;
          m[q * n + k] = nkq;
        }
        for (let k = 0; k < n; k++) {
          const vkp = v[k * n + p];
          const vkq = v[k * n + q];
          v[k * n + p] = vkp - s * (vkq + tau * vkp);
          v[k * n + q] = vkq + s * (vkp - tau * vkq);
        }
      }
    }
  }

  const order = Array.from({ length: n }, (_, i) => i);
  // Stable sort by descending eigenvalue: ties keep their index order, so the result stays deterministic.
  order.sort((x, y) => m[y * n + y] - m[x * n + x] || x - y);
  const values = new Float64Array(n);
  const vectors = new Float64Array(n * n);
  order.forEach((src, dst) => {
    values[dst] = m[src * n + src];
    let big = 0;
    let sign = 1;
    for (let i = 0; i < n; i++) {
      const x = v[i * n + src];
      if (Math.abs(x) > big) {
        big = Math.abs(x);
        sign = x < 0 ? -1 : 1;
      }
    }
    for (let i = 0; i < n; i++) vectors[i * n + dst] = sign * v[i * n + src];
  });
  return { n, values, vectors };
}

/** Adds `fraction · mean(diag)` to the diagonal in place (the method's 1 % damping). */
export function dampDiagonal(h: Float64Array, n: number, fraction = 0.01): void {
  let mean = 0;
  for (let i = 0; i < n; i++) mean += h[i * n + i];
  mean /= n;
  for (let i = 0; i < n; i++) h[i * n + i] += fraction * mean;
}

/**
 * Streaming uncentred second moment Σ x xᵀ in float64: one vector at a time, never the activations themselves.
 * Only the upper triangle is updated per vector; `matrix()` returns the full symmetric matrix.
 */
export class GramAccumulator {
  private readonly sum: Float64Array;
  count = 0;

  constructor(readonly n: number) {
    this.sum = new Float64Array(n * n);
  }

  add(x: ArrayLike<number>): void {
    const n = this.n;
    if (x.length !== n) throw new Error(`GramAccumulator: vector has ${x.length} values, expected ${n}`);
    const s = this.sum;
    for (let i = 0; i < n; i++) {
      const xi = x[i];
      if (xi === 0) continue;
      const base = i * n;
      for (let j = i; j < n; j++) s[base + j] += xi * x[j];
    }
    this.count++;
  }

  matrix(): Float64Array {
    const n = this.n;
    const out = Float64Array.from(this.sum);
    for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) out[j * n + i] = out[i * n + j];
    return out;
  }
}

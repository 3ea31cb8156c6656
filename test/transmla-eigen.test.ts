// The converter's symmetric eigendecomposition (cyclic Jacobi, float64) and streaming Gram accumulation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GramAccumulator, symmetricEigen } from '../model/transmla/eigen.ts';

function randomSymmetric(n: number, seed: number, spread = 1): Float64Array {
  let x = seed;
  const rnd = () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 4294967296 - 0.5;
  };
  const a = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = i; j < n; j++) {
      const v = rnd() * (i === j ? spread : 1);
      a[i * n + j] = v;
      a[j * n + i] = v;
    }
  }
  return a;
}

for (const [n, spread] of [[1, 1], [2, 1], [7, 1], [33, 1], [64, 1e6]] as const) {
  test(`symmetricEigen: A V = V Λ, Vᵀ V = I, descending (n = ${n}${spread > 1 ? ', widely spread diagonal' : ''})`, () => {
    const a = randomSymmetric(n, 17 + n, spread);
    const { values, vectors: v } = symmetricEigen(a, n);
    let norm = 0;
    for (const x of a) norm = Math.max(norm, Math.abs(x));
    for (let p = 1; p < n; p++) assert.ok(values[p - 1] >= values[p], `eigenvalues not descending at ${p}`);
    for (let i = 0; i < n; i++) {
      for (let p = 0; p < n; p++) {
        let av = 0;
        for (let k = 0; k < n; k++) av += a[i * n + k] * v[k * n + p];
        assert.ok(Math.abs(av - values[p] * v[i * n + p]) <= 1e-12 * norm * n, `A v ≠ λ v at (${i}, ${p})`);
        let vtv = 0;
        for (let k = 0; k < n; k++) vtv += v[k * n + i] * v[k * n + p];
        assert.ok(Math.abs(vtv - (i === p ? 1 : 0)) <= 1e-13 * n, `Vᵀ V ≠ I at (${i}, ${p}): ${vtv}`);
      }
    }
    // Trace is preserved.
    let trace = 0;
    let sum = 0;
    for (let i = 0; i < n; i++) {
      trace += a[i * n + i];
      sum += values[i];
    }
    assert.ok(Math.abs(trace - sum) <= 1e-10 * norm * n);
  });
}

test('symmetricEigen: known spectrum, repeated eigenvalues, deterministic signs', () => {
  // Q diag(5, 2, 2, -1) Qᵀ for a fixed rotation Q.
  const c = Math.cos(0.3);
  const s = Math.sin(0.3);
  const q = [c, -s, 0, 0, s, c, 0, 0, 0, 0, c, s, 0, 0, -s, c];
  const lambda = [5, 2, 2, -1];
  const a = new Float64Array(16);
  for (let i = 0; i < 4; i++) for (let j = 0; j < 4; j++) for (let k = 0; k < 4; k++) a[i * 4 + j] += q[i * 4 + k] * lambda[k] * q[j * 4 + k];
  const e = symmetricEigen(a, 4);
  assert.deepEqual([...e.values].map((x) => Math.round(x * 1e12) / 1e12), [5, 2, 2, -1]);
  const again = symmetricEigen(a, 4);
  assert.deepEqual([...again.vectors], [...e.vectors]);
  for (let p = 0; p < 4; p++) {
    let big = 0;
    for (let i = 0; i < 4; i++) if (Math.abs(e.vectors[i * 4 + p]) > Math.abs(big)) big = e.vectors[i * 4 + p];
    assert.ok(big > 0, `eigenvector ${p} is not sign-normalized`);
  }
});

test('GramAccumulator sums x xᵀ exactly and symmetrically', () => {
  const g = new GramAccumulator(3);
  g.add([1, 2, 0]);
  g.add([0, -1, 3]);
  assert.equal(g.count, 2);
  assert.deepEqual([...g.matrix()], [1, 2, 0, 2, 5, -3, 0, -3, 9]);
  assert.throws(() => g.add([1, 2]), /2 values, expected 3/);
});

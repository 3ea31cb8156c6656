// Matmul y[m, n] (+)= Σ_k x[m, k] · W[n, k] (+ b[n]) with f32 or packed-f16 weights: a GEMV path for few rows, register-tiled GEMM for many.
import type { GpuContext } from './device.ts';
import { bindBuffers, gridFor, type GpuMatrix, type WeightDtype } from './tensors.ts';

export interface MatmulTuning {
  /** Rows up to this go through the GEMV kernel (each weight read once for all rows); above it, tiled GEMM. */
  gemvMaxRows: number;
  /** Threads that share one group of output features along K in the GEMV kernel (a power of two). */
  gemvThreadsPerRow: number;
  /** Row groups per GEMV workgroup (workgroup size = threadsPerRow · rowsPerWorkgroup). */
  gemvRowsPerWorkgroup: number;
  /** Reduce with subgroup operations when the device has subgroups (else a workgroup-memory tree). */
  useSubgroups: boolean;
  /** Weight words (8 values each) per row a GEMV thread loads before using them: more loads in flight per thread. */
  gemvUnroll: number;
  /** Output features each GEMV thread accumulates: every x load is shared by that many weight rows. */
  gemvRowsPerThread: number;
  /** GEMV workgroups launched, each looping over row groups (grid stride); 0 = one workgroup per block of rows. */
  gemvWorkgroups: number;
  /** Largest GEMM tile height (input rows); smaller row counts use 32 or 16. */
  gemmTileM: number;
  /** GEMM tile width (output features). */
  gemmTileN: number;
  /** GEMM tile depth (K values staged in workgroup memory per step; a multiple of 8). */
  gemmTileK: number;
  /** Input rows per GEMM thread (a multiple of 4). */
  gemmThreadM: number;
  /** Output features per GEMM thread (4 or 8). */
  gemmThreadN: number;
  /**
   * Split K over this many GEMM workgroups per tile (partial sums, then a reduction dispatch) so that few
   * tiles still fill the GPU; 0 = automatic (aim for gemmTargetWorkgroups), 1 = never.
   */
  gemmSplitK: number;
  /** Workgroups the automatic split-K aims for (a few per multiprocessor). */
  gemmTargetWorkgroups: number;
}

/**
 * Defaults measured on the H200 through Dawn/Vulkan (bench/kernels.ts; figures in the commit log).
 * GEMV: 4 output features per thread (each x load feeds 4 weight rows). One input row: enough threads along K
 * that ~128K threads run (short matrices get 64–128 threads per row group). Several input rows (x traffic
 * dominates): one subgroup per row group, 64 threads for short matrices with long K.
 * GEMM: 64 × 128 tiles, 4 × 8 outputs per thread, K tiles of 16, split-K when few tiles.
 * `outFeatures` is the weight's row count, `rows` the input rows of the dispatch.
 */
export function defaultMatmulTuning(gpu: GpuContext, cols: number, outFeatures = 0, rows = 1): MatmulTuning {
  const rowGroups = Math.max(1, (outFeatures || 4 * 4096) / 4);
  const oneRowTpr = Math.min(128, Math.max(32, 2 ** Math.round(Math.log2(131072 / rowGroups))));
  const shortLongK = outFeatures > 0 && outFeatures <= 8192 && cols >= 8192;
  const tpr = rows > 1 ? (shortLongK ? 64 : 32) : oneRowTpr;
  return {
    gemvMaxRows: 8,
    gemvThreadsPerRow: tpr,
    gemvRowsPerWorkgroup: tpr === 32 ? 4 : 256 / tpr,
    useSubgroups: gpu.features.has('subgroups'),
    gemvUnroll: rows > 1 && tpr === 64 ? 2 : 1,
    gemvRowsPerThread: 4,
    gemvWorkgroups: 0,
    gemmTileM: 64,
    gemmTileN: 128,
    gemmTileK: 16,
    gemmThreadM: 4,
    gemmThreadN: 8,
    gemmSplitK: 0,
    gemmTargetWorkgroups: 512,
  };
}

/** How a GEMV kernel sums the partial dot products of the threads that share a row group. */
export type GemvReduce = 'none' | 'shuffle' | 'subgroup' | 'tree';

export interface GemvParams {
  dtype: WeightDtype;
  K: number;
  N: number;
  colOffset: number;
  biasOffset: number;
  stride: number;
  xStride: number;
  yStride: number;
  /** Input rows compiled in (the kernel handles 1..mr at run time). */
  mr: number;
  tpr: number;
  rpt: number;
  rpw: number;
  unroll: number;
  /** Grid-stride loop over row groups (launch fewer workgroups than row blocks). */
  gridStride: boolean;
  rowsSlot: number;
  bias: boolean;
  accumulate: boolean;
  reduce: GemvReduce;
  sgMin: number;
}

const range = (n: number) => [...Array(n).keys()];

/**
 * GEMV: TPR threads share a group of RPT output features; each thread walks K in words of 8 values
 * (one vec4<u32> of packed f16, or two vec4<f32>), loads the x words once and uses them for all RPT rows.
 */
export function gemvWgsl(p: GemvParams): string {
  const { tpr, rpt: R, rpw, unroll: U, mr } = p;
  const wg = tpr * rpw;
  const k8 = Math.floor(p.K / 8);
  const f16 = p.dtype === 'f16';
  const wDecl = f16 ? 'array<vec4<u32>>' : 'array<vec4<f32>>';
  const wRowWords = f16 ? p.stride / 8 : p.stride / 4;
  const xs4 = p.xStride / 4;
  const ms = range(mr);
  const rs = range(R);
  const us = range(U);
  const blockRows = R * rpw;
  const blocks = Math.ceil(p.N / blockRows);
  const off = (u: number) => (u === 0 ? 'c' : `c + ${u * tpr}u`);
  // Raw weight loads for one unrolled word u of every row r (all issued before any use).
  const loadW = (u: number) =>
    rs
      .map((r) =>
        f16 ? `let w${u}_${r} = w[wb${r} + ${off(u)}];` : `let w${u}_${r}a = w[wb${r} + 2u * (${off(u)})];\n      let w${u}_${r}b = w[wb${r} + 2u * (${off(u)}) + 1u];`,
      )
      .join('\n      ');
  const useW = (u: number) => {
    const xl = ms.map((m) => `let x${u}_${m}a = x[xb${m} + 2u * (${off(u)})];\n      let x${u}_${m}b = x[xb${m} + 2u * (${off(u)}) + 1u];`);
    const unpack = f16
      ? rs.map(
          (r) =>
            `let w${u}_${r}a = vec4<f32>(unpack2x16float(w${u}_${r}.x), unpack2x16float(w${u}_${r}.y));\n      let w${u}_${r}b = vec4<f32>(unpack2x16float(w${u}_${r}.z), unpack2x16float(w${u}_${r}.w));`,
        )
      : [];
    const fma = ms.flatMap((m) => rs.map((r) => `a${m}_${r} += dot(w${u}_${r}a, x${u}_${m}a) + dot(w${u}_${r}b, x${u}_${m}b);`));
    return [...xl, ...unpack, ...fma].join('\n      ');
  };
  const tailW = (r: number) => (f16 ? `unpack2x16float(w[wb${r} + ${k8}u][(k % 8u) / 2u])[k % 2u]` : `w[wb${r} + ${2 * k8}u + (k % 8u) / 4u][k % 4u]`);
  const accs = ms.flatMap((m) => rs.map((r) => `a${m}_${r}`));
  const slots = Math.max(1, tpr / Math.max(p.sgMin, 1));
  let reduce: string;
  let redDecl = '';
  let storeGuard = 'lane == 0u';
  const sum = (m: number, r: number) => `t${m}_${r}`;
  if (p.reduce === 'none') {
    reduce = accs.map((a) => `let t${a.slice(1)} = ${a};`).join('\n    ');
  } else if (p.reduce === 'shuffle') {
    // Whole row groups lie inside one subgroup (tpr ≤ the smallest subgroup size): butterfly over tpr lanes.
    const steps: string[] = [];
    for (let o = tpr / 2; o >= 1; o /= 2) steps.push(...accs.map((a) => `${a} += subgroupShuffleXor(${a}, ${o}u);`));
    reduce = steps.join('\n    ') + '\n    ' + accs.map((a) => `let t${a.slice(1)} = ${a};`).join('\n    ');
  } else if (p.reduce === 'subgroup') {
    const n = mr * R;
    redDecl = `var<workgroup> red: array<f32, ${rpw * n * slots}>;`;
    reduce = `let sgIndex = lane / sgSize;
    ${accs.map((a, i) => `let s${i} = subgroupAdd(${a});`).join('\n    ')}
    if (sgLane == 0u) {
      ${accs.map((_, i) => `red[(slot * ${n}u + ${i}u) * ${slots}u + sgIndex] = s${i};`).join('\n      ')}
    }
    workgroupBarrier();
    let nSub = ${tpr}u / sgSize;
    ${accs.map((a) => `var t${a.slice(1)} = 0.0;`).join('\n    ')}
    for (var i = 0u; i < nSub; i++) {
      ${accs.map((a, i) => `t${a.slice(1)} += red[(slot * ${n}u + ${i}u) * ${slots}u + i];`).join('\n      ')}
    }`;
  } else {
    const n = mr * R;
    redDecl = `var<workgroup> red: array<f32, ${wg * n}>;`;
    reduce = `${accs.map((a, i) => `red[${i}u * ${wg}u + lid] = ${a};`).join('\n    ')}
    workgroupBarrier();
    for (var s = ${tpr / 2}u; s > 0u; s >>= 1u) {
      if (lane < s) {
        ${accs.map((_, i) => `red[${i}u * ${wg}u + lid] += red[${i}u * ${wg}u + lid + s];`).join('\n        ')}
      }
      workgroupBarrier();
    }
    ${accs.map((a, i) => `let t${a.slice(1)} = red[${i}u * ${wg}u + lid];`).join('\n    ')}`;
  }
  if (p.reduce === 'none') storeGuard = 'true';
  const usesBarrier = p.reduce === 'subgroup' || p.reduce === 'tree';
  const store = (m: number, r: number) => {
    const v = p.bias ? `${sum(m, r)} + bias[${p.biasOffset}u + n${r}]` : sum(m, r);
    const idx = `${m}u * ${p.yStride}u + ${p.colOffset}u + n${r}`;
    return `if (${m}u < M && n${r} < ${p.N}u) { ${p.accumulate ? `y[${idx}] += ${v};` : `y[${idx}] = ${v};`} }`;
  };
  const bindings = [
    '@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;',
    '@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;',
    `@group(0) @binding(2) var<storage, read> w: ${wDecl};`,
    '@group(0) @binding(3) var<storage, read_write> y: array<f32>;',
  ];
  if (p.bias) bindings.push('@group(0) @binding(4) var<storage, read> bias: array<f32>;');
  const sgBuiltins = p.reduce === 'subgroup' ? ', @builtin(subgroup_size) sgSize: u32, @builtin(subgroup_invocation_id) sgLane: u32' : '';
  const loopHead = p.gridStride
    ? `for (var blk = wid.x + wid.y * nwg.x; blk < ${blocks}u; blk += nwg.x * nwg.y) {`
    : `{\n    let blk = wid.x + wid.y * nwg.x;`;
  return /* wgsl */ `${p.reduce === 'shuffle' || p.reduce === 'subgroup' ? 'enable subgroups;\n' : ''}
${bindings.join('\n')}
${redDecl}

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>${sgBuiltins}) {
  let M = stepMeta[${p.rowsSlot}];
  let mLast = max(M, 1u) - 1u;
  let slot = lid / ${tpr}u;
  let lane = lid % ${tpr}u;
  ${ms.map((m) => `let xb${m} = min(${m}u, mLast) * ${xs4}u;`).join('\n  ')}
  ${loopHead}
    let nBase = (blk * ${rpw}u + slot) * ${R}u;
    ${rs.map((r) => `let n${r} = nBase + ${r}u;\n    let wb${r} = min(n${r}, ${p.N - 1}u) * ${wRowWords}u;`).join('\n    ')}
    ${accs.map((a) => `var ${a} = 0.0;`).join('\n    ')}
    var c = lane;
    for (; c + ${(U - 1) * tpr}u < ${k8}u; c += ${U * tpr}u) {
      ${us.map(loadW).join('\n      ')}
      ${us.map(useW).join('\n      ')}
    }
    ${
      U > 1
        ? `for (; c < ${k8}u; c += ${tpr}u) {
      ${loadW(0)}
      ${useW(0)}
    }`
        : ''
    }
    ${
      p.K > k8 * 8
        ? `for (var k = ${k8 * 8}u + lane; k < ${p.K}u; k += ${tpr}u) {
      ${rs.map((r) => `let wf${r} = ${tailW(r)};`).join('\n      ')}
      ${ms.flatMap((m) => rs.map((r) => `a${m}_${r} += wf${r} * x[xb${m} + k / 4u][k % 4u];`)).join('\n      ')}
    }`
        : ''
    }
    ${reduce}
    if (${storeGuard}) {
      ${ms.flatMap((m) => rs.map((r) => store(m, r))).join('\n      ')}
    }
    ${usesBarrier && p.gridStride ? 'workgroupBarrier();' : ''}
  }
}
`;
}

export interface GemmParams {
  dtype: WeightDtype;
  K: number;
  N: number;
  colOffset: number;
  biasOffset: number;
  stride: number;
  xStride: number;
  yStride: number;
  bm: number;
  bn: number;
  bk: number;
  tm: number;
  tn: number;
  /** K slices (workgroup z); > 1 writes partial sums [split, bm, N] to `part` instead of y. */
  split: number;
  rowsSlot: number;
  bias: boolean;
  accumulate: boolean;
}

export function gemmThreads(p: Pick<GemmParams, 'bm' | 'bn' | 'tm' | 'tn'>): number {
  return (p.bm / p.tm) * (p.bn / p.tn);
}

/**
 * Register-tiled GEMM: a workgroup computes a BM × BN tile; each thread TM × TN outputs from BK-deep tiles
 * of x and W (f16 unpacked once per tile load) in workgroup memory; the next tile's global loads are issued
 * into registers before the current tile is used.
 */
export function gemmWgsl(p: GemmParams): string {
  const { bm: BM, bn: BN, bk: BK, tm: TM, tn: TN } = p;
  const threads = gemmThreads(p);
  const f16 = p.dtype === 'f16';
  const tx = BN / TN;
  const xVec = (BM * BK) / 4;
  const xLoads = Math.ceil(xVec / threads);
  const wPer = f16 ? 8 : 4; // values per weight load
  const wVec = (BN * BK) / wPer;
  const wLoads = Math.ceil(wVec / threads);
  const kTiles = Math.ceil(p.K / BK);
  const split = p.split;
  const sRowWords = p.stride / wPer;
  const is = range(TM / 4);
  const js = range(TN / 4);
  const es = (n: number) => range(n);
  const loadX = (e: number) => {
    const guardIdx = e * threads + threads > xVec ? ` && lid + ${e * threads}u < ${xVec}u` : '';
    return `{
      let idx = lid + ${e * threads}u;
      let gm = tileM + idx % ${BM}u;
      let gk = k0 + 4u * (idx / ${BM}u);
      xr${e} = vec4<f32>(0.0);
      if (gm < M && gk < ${p.K}u${guardIdx}) {
        xr${e} = select(vec4<f32>(0.0), x[gm * ${p.xStride / 4}u + gk / 4u], vec4<u32>(gk) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(${p.K}u));
      }
    }`;
  };
  const storeX = (e: number) => {
    const guard = e * threads + threads > xVec ? `if (lid + ${e * threads}u < ${xVec}u) ` : '';
    return `${guard}{
      let idx = lid + ${e * threads}u;
      let mm = idx % ${BM}u;
      let kq = 4u * (idx / ${BM}u);
      ${range(4)
        .map((i) => `xs[(kq + ${i}u) * ${BM / 4}u + mm / 4u][mm % 4u] = xr${e}[${i}];`)
        .join('\n      ')}
    }`;
  };
  const loadW = (e: number) => {
    const guardIdx = e * threads + threads > wVec ? ` && lid + ${e * threads}u < ${wVec}u` : '';
    return `{
      let idx = lid + ${e * threads}u;
      let gn = tileN + idx / ${BK / wPer}u;
      let kw = idx % ${BK / wPer}u;
      wr${e} = ${f16 ? 'vec4<u32>(0u)' : 'vec4<f32>(0.0)'};
      if (gn < ${p.N}u && k0 + ${wPer}u * kw < ${p.stride}u${guardIdx}) { wr${e} = w[gn * ${sRowWords}u + k0 / ${wPer}u + kw]; }
    }`;
  };
  const storeW = (e: number) => {
    const guard = e * threads + threads > wVec ? `if (lid + ${e * threads}u < ${wVec}u) ` : '';
    const vals = f16
      ? range(4).flatMap((q) => [`let v${2 * q} = unpack2x16float(wr${e}[${q}]);`])
      : [];
    const put = f16
      ? range(8).map((i) => `ws[(kb + ${i}u) * ${BN / 4}u + nn / 4u][nn % 4u] = v${2 * Math.floor(i / 2)}[${i % 2}];`)
      : range(4).map((i) => `ws[(kb + ${i}u) * ${BN / 4}u + nn / 4u][nn % 4u] = wr${e}[${i}];`);
    return `${guard}{
      let idx = lid + ${e * threads}u;
      let nn = idx / ${BK / wPer}u;
      let kb = ${wPer}u * (idx % ${BK / wPer}u);
      ${[...vals, ...put].join('\n      ')}
    }`;
  };
  const bindings = [
    '@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;',
    '@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;',
    `@group(0) @binding(2) var<storage, read> w: array<vec4<${f16 ? 'u32' : 'f32'}>>;`,
    split > 1 ? '@group(0) @binding(3) var<storage, read_write> part: array<f32>;' : '@group(0) @binding(3) var<storage, read_write> y: array<f32>;',
  ];
  if (p.bias && split === 1) bindings.push('@group(0) @binding(4) var<storage, read> bias: array<f32>;');
  const kRange =
    split > 1
      ? `let kBegin = (wid.z * ${kTiles}u) / ${split}u;\n  let kEnd = ((wid.z + 1u) * ${kTiles}u) / ${split}u;`
      : `let kBegin = 0u;\n  let kEnd = ${kTiles}u;`;
  const out = (i: number, j: number) => {
    // Rows ty*TM + 4i + a, columns (j*tx + txi)*4 + c.
    return range(4)
      .map((a) => {
        const m = `tileM + ty * ${TM}u + ${4 * i + a}u`;
        const body =
          split > 1
            ? `for (var c = 0u; c < 4u; c++) { let n = n${j} + c; if (n < ${p.N}u) { part[(wid.z * ${BM}u + m - tileM) * ${p.N}u + n] = acc${i}_${j}_${a}[c]; } }`
            : `for (var c = 0u; c < 4u; c++) {
          let n = n${j} + c;
          if (n < ${p.N}u) {
            let v = acc${i}_${j}_${a}[c]${p.bias ? ` + bias[${p.biasOffset}u + n]` : ''};
            let o = m * ${p.yStride}u + ${p.colOffset}u + n;
            ${p.accumulate ? 'y[o] += v;' : 'y[o] = v;'}
          }
        }`;
        return `{
      let m = ${m};
      if (m < M) {
        ${body}
      }
    }`;
      })
      .join('\n    ');
  };
  return /* wgsl */ `
${bindings.join('\n')}
var<workgroup> xs: array<vec4<f32>, ${(BK * BM) / 4}>;
var<workgroup> ws: array<vec4<f32>, ${(BK * BN) / 4}>;

@compute @workgroup_size(${threads})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${p.rowsSlot}];
  let tileN = wid.x * ${BN}u;
  let tileM = wid.y * ${BM}u;
  let tx = lid % ${tx}u;
  let ty = lid / ${tx}u;
  ${kRange}
  ${is.flatMap((i) => js.flatMap((j) => range(4).map((a) => `var acc${i}_${j}_${a} = vec4<f32>(0.0);`))).join('\n  ')}
  ${es(xLoads).map((e) => `var xr${e}: vec4<f32>;`).join('\n  ')}
  ${es(wLoads).map((e) => `var wr${e}: vec4<${f16 ? 'u32' : 'f32'}>;`).join('\n  ')}
  var k0 = kBegin * ${BK}u;
  ${es(xLoads).map(loadX).join('\n  ')}
  ${es(wLoads).map(loadW).join('\n  ')}
  for (var t = kBegin; t < kEnd; t++) {
    workgroupBarrier();
    ${es(xLoads).map(storeX).join('\n    ')}
    ${es(wLoads).map(storeW).join('\n    ')}
    workgroupBarrier();
    if (t + 1u < kEnd) {
      k0 = (t + 1u) * ${BK}u;
      ${es(xLoads).map(loadX).join('\n      ')}
      ${es(wLoads).map(loadW).join('\n      ')}
    }
    for (var kk = 0u; kk < ${BK}u; kk++) {
      ${is.map((i) => `let a${i} = xs[kk * ${BM / 4}u + ty * ${TM / 4}u + ${i}u];`).join('\n      ')}
      ${js.map((j) => `let b${j} = ws[kk * ${BN / 4}u + ${j * tx}u + tx];`).join('\n      ')}
      ${is.flatMap((i) => js.flatMap((j) => range(4).map((a) => `acc${i}_${j}_${a} += a${i}[${a}] * b${j};`))).join('\n      ')}
    }
  }
  ${js.map((j) => `let n${j} = tileN + (${j * tx}u + tx) * 4u;`).join('\n  ')}
  ${is.flatMap((i) => js.map((j) => out(i, j))).join('\n  ')}
}
`;
}

/** Sums split-K partials [split, rows, N] into y (+ bias, or += for the fused residual). */
export function splitReduceWgsl(p: { N: number; split: number; bm: number; colOffset: number; biasOffset: number; yStride: number; rowsSlot: number; bias: boolean; accumulate: boolean }): string {
  return /* wgsl */ `
@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
${p.bias ? '@group(0) @binding(3) var<storage, read> bias: array<f32>;' : ''}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let M = stepMeta[${p.rowsSlot}];
  let n = gid.x;
  let m = gid.y;
  if (n >= ${p.N}u || m >= M) { return; }
  var v = 0.0;
  for (var s = 0u; s < ${p.split}u; s++) { v += part[(s * ${p.bm}u + m) * ${p.N}u + n]; }
  ${p.bias ? `v += bias[${p.biasOffset}u + n];` : ''}
  let o = m * ${p.yStride}u + ${p.colOffset}u + n;
  ${p.accumulate ? 'y[o] += v;' : 'y[o] = v;'}
}
`;
}

/** Where a matmul reads and writes: buffers bound once, rows chosen per dispatch. */
export interface MatmulBindings {
  /** Step metadata (kernels/step-meta.ts); the row count M is stepMeta[rowsSlot]. */
  meta: GPUBuffer;
  rowsSlot: number;
  /** Input rows [M, xStride] f32; xStride a multiple of 4. */
  x: GPUBuffer;
  xStride: number;
  /** Output rows [M, yStride] f32; this matmul writes columns [yOffset, yOffset + N). */
  y: GPUBuffer;
  yStride: number;
  yOffset?: number;
  /** Bias [N] f32. */
  bias?: GPUBuffer;
  /** y += result (fused residual add) instead of y = result. */
  accumulate?: boolean;
  /**
   * int8 weights only: x already quantized per row in the W8A8 layout (kernels/matmul-int8.ts, written by RmsNorm's
   * quantized output), sized for every row count this op is encoded for. The W8A8 paths then record no quantize
   * dispatch; the GEMV path (few rows) still reads x.
   */
  xQuantized?: { xq: GPUBuffer; xScale: GPUBuffer };
}

interface Dispatch {
  pipeline: GPUComputePipeline;
  bindGroup: GPUBindGroup;
  grid: [number, number, number];
}

interface Variant {
  key: string;
  gemv: boolean;
  /** GEMV: rows compiled in; GEMM: tile height. */
  size: number;
  /** GEMM: row tiles (grid y) and K slices. */
  rowTiles: number;
  split: number;
}

/** One matmul site (a weight and its bindings): caches its pipelines and bind groups, encodes the dispatches per weight piece. */
export class MatmulOp {
  /** Tuning for one input row (GEMV) and for the GEMM. */
  readonly tuning: MatmulTuning;
  /** Tuning of the GEMV for 2..gemvMaxRows input rows (the same overrides over the several-row defaults). */
  readonly multiRowTuning: MatmulTuning;
  private groups = new Map<string, Dispatch[]>();
  private scratch: GPUBuffer | undefined;

  constructor(
    private gpu: GpuContext,
    readonly weight: GpuMatrix,
    private b: MatmulBindings,
    tuning: Partial<MatmulTuning> = {},
  ) {
    this.tuning = { ...defaultMatmulTuning(gpu, weight.cols, weight.rows, 1), ...tuning };
    this.multiRowTuning = { ...defaultMatmulTuning(gpu, weight.cols, weight.rows, 8), ...tuning };
    if (b.xStride % 4 !== 0 || b.xStride < weight.cols) {
      throw new Error(`${weight.label}: input row stride ${b.xStride} must be a multiple of 4 and ≥ ${weight.cols} columns`);
    }
    for (const t of [this.tuning, this.multiRowTuning]) this.check(t);
  }

  private check(t: MatmulTuning): void {
    const { gpu, weight } = this;
    const pow2 = (v: number) => v >= 1 && (v & (v - 1)) === 0;
    if (!pow2(t.gemvThreadsPerRow)) throw new Error(`${weight.label}: gemvThreadsPerRow ${t.gemvThreadsPerRow} must be a power of two`);
    if (t.gemvThreadsPerRow * t.gemvRowsPerWorkgroup > gpu.limits.maxComputeInvocationsPerWorkgroup) {
      throw new Error(`${weight.label}: GEMV workgroup of ${t.gemvThreadsPerRow}×${t.gemvRowsPerWorkgroup} exceeds the device limit`);
    }
    if (t.gemmTileK % 8 !== 0 || t.gemmThreadM % 4 !== 0 || (t.gemmThreadN !== 4 && t.gemmThreadN !== 8) || t.gemmTileN % (4 * t.gemmThreadN) !== 0) {
      throw new Error(
        `${weight.label}: GEMM tiling ${t.gemmTileM}×${t.gemmTileN}×${t.gemmTileK} with ${t.gemmThreadM}×${t.gemmThreadN} per thread is not supported ` +
          '(tile K a multiple of 8, thread M a multiple of 4, thread N 4 or 8, tile N a multiple of 4·thread N)',
      );
    }
  }

  private variant(rows: number): Variant {
    const t = this.tuning;
    if (rows <= t.gemvMaxRows) {
      let mr = 1;
      while (mr < rows) mr *= 2;
      return { key: `gemv${mr}`, gemv: true, size: mr, rowTiles: 1, split: 1 };
    }
    let bm = Math.max(16, t.gemmThreadM);
    while (bm < rows && bm < t.gemmTileM) bm *= 2;
    const rowTiles = Math.ceil(rows / bm);
    let split = t.gemmSplitK;
    const tiles = Math.ceil(this.weight.rows / t.gemmTileN) * rowTiles;
    const kTiles = Math.ceil(this.weight.cols / t.gemmTileK);
    if (rowTiles > 1) split = 1; // only a single row tile is split (bounded scratch)
    else if (split === 0) split = Math.max(1, Math.min(Math.floor(kTiles / 4), Math.ceil(t.gemmTargetWorkgroups / tiles)));
    split = Math.max(1, Math.min(split, kTiles));
    return { key: `gemm${bm}x${rowTiles}s${split}`, gemv: false, size: bm, rowTiles, split };
  }

  private build(v: Variant): Dispatch[] {
    const { gpu, weight: w, b } = this;
    const t = v.gemv && v.size > 1 ? this.multiRowTuning : this.tuning;
    const sgMin = Math.max(1, gpu.subgroupSize);
    const hasSg = t.useSubgroups && gpu.features.has('subgroups');
    const tpr = t.gemvThreadsPerRow;
    const reduce: GemvReduce = tpr === 1 ? 'none' : hasSg && tpr <= sgMin ? 'shuffle' : hasSg && tpr % sgMin === 0 ? 'subgroup' : 'tree';
    const out: Dispatch[] = [];
    for (const piece of w.pieces) {
      const common = {
        dtype: w.dtype,
        K: w.cols,
        N: piece.rows,
        colOffset: (b.yOffset ?? 0) + piece.rowStart,
        biasOffset: piece.rowStart,
        stride: w.stride,
        xStride: b.xStride,
        yStride: b.yStride,
        rowsSlot: b.rowsSlot,
        bias: !!b.bias,
        accumulate: !!b.accumulate,
      };
      if (v.gemv) {
        const rpt = t.gemvRowsPerThread;
        const blocks = Math.ceil(piece.rows / (rpt * t.gemvRowsPerWorkgroup));
        const gridStride = t.gemvWorkgroups > 0 && t.gemvWorkgroups < blocks;
        const code = gemvWgsl({ ...common, mr: v.size, tpr, rpt, rpw: t.gemvRowsPerWorkgroup, unroll: t.gemvUnroll, gridStride, reduce, sgMin });
        const pipeline = gpu.pipeline(`matmul ${v.key} ${w.dtype} ${w.rows}x${w.cols}`, code);
        const bufs = [b.meta, b.x, piece.buffer, b.y];
        if (b.bias) bufs.push(b.bias);
        const [gx, gy] = gridFor(gpu, gridStride ? t.gemvWorkgroups : blocks);
        out.push({ pipeline, bindGroup: bindBuffers(gpu, pipeline, `${w.label} ${v.key}`, bufs), grid: [gx, gy, 1] });
        continue;
      }
      const tm = Math.min(t.gemmThreadM, v.size);
      const p = { ...common, bm: v.size, bn: t.gemmTileN, bk: t.gemmTileK, tm, tn: t.gemmThreadN, split: v.split };
      const pipeline = gpu.pipeline(`matmul ${v.key} ${w.dtype} ${w.rows}x${w.cols}`, gemmWgsl(p));
      const grid: [number, number, number] = [Math.ceil(piece.rows / p.bn), v.rowTiles, v.split];
      if (v.split === 1) {
        const bufs = [b.meta, b.x, piece.buffer, b.y];
        if (b.bias) bufs.push(b.bias);
        out.push({ pipeline, bindGroup: bindBuffers(gpu, pipeline, `${w.label} ${v.key}`, bufs), grid });
        continue;
      }
      const part = this.scratchBuffer(v.split * v.size * Math.max(...w.pieces.map((q) => q.rows)) * 4);
      out.push({ pipeline, bindGroup: bindBuffers(gpu, pipeline, `${w.label} ${v.key}`, [b.meta, b.x, piece.buffer, part]), grid });
      const rp = gpu.pipeline(`matmul split-K reduce ${w.rows}x${w.cols}`, splitReduceWgsl({ ...common, split: v.split, bm: v.size }));
      const rbufs = [b.meta, part, b.y];
      if (b.bias) rbufs.push(b.bias);
      out.push({ pipeline: rp, bindGroup: bindBuffers(gpu, rp, `${w.label} ${v.key} reduce`, rbufs), grid: [Math.ceil(piece.rows / 256), v.size, 1] });
    }
    return out;
  }

  /** Split-K partial sums, shared by every piece and variant of this op (dispatches run in order). */
  private scratchBuffer(bytes: number): GPUBuffer {
    if (!this.scratch || this.scratch.size < bytes) {
      // An older, smaller scratch stays alive: bind groups built earlier still point at it.
      this.scratch = this.gpu.device.createBuffer({ label: `${this.weight.label} split-K partials`, size: Math.max(16, bytes), usage: GPUBufferUsage.STORAGE });
    }
    return this.scratch;
  }

  /** Records the dispatches for `rows` input rows (the value the kernel reads at stepMeta[rowsSlot]). */
  encode(pass: GPUComputePassEncoder, rows: number): void {
    if (rows <= 0) return;
    const v = this.variant(rows);
    let list = this.groups.get(v.key);
    if (!list) {
      list = this.build(v);
      this.groups.set(v.key, list);
    }
    for (const g of list) {
      pass.setPipeline(g.pipeline);
      pass.setBindGroup(0, g.bindGroup);
      pass.dispatchWorkgroups(g.grid[0], g.grid[1], g.grid[2]);
    }
  }
}

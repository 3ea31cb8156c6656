// Matmul with int8 weights (per-output-channel scales, 512-byte tiles): an f32-activation GEMV for few rows, W8A8 (tensor cores, or dot4I8Packed: the same i32 sums) for many.
import type { GpuContext } from './device.ts';
import type { GpuInt8Matrix } from './int8.ts';
import type { MatmulBindings } from './matmul.ts';
import { bindBuffers, gridFor, storageBuffer } from './tensors.ts';

export interface Int8MatmulTuning {
  /** Rows up to this go through the weights-only GEMV (f32 activations); above it, W8A8. */
  gemvMaxRows: number;
  /**
   * W8A8 on subgroup matrices (tensor cores) where the adapter offers i8×i8→i32 16×16×32: 'auto' uses them when
   * present, 'off' keeps the dot4I8Packed kernel. Both compute the same exact i32 sums.
   */
  subgroupMatrix: 'auto' | 'off';
  /** Subgroup-matrix GEMM: subgroups per workgroup. */
  smSubgroups: number;
  /** Subgroup-matrix GEMM: subgroups splitting one column group's K ('auto': enough subgroups for the GPU, autoKSplit). */
  smKSplit: number | 'auto';
  /** Subgroup-matrix GEMM: adjacent 16-column tiles per subgroup (1 or 2: each activation tile load feeds that many). */
  smColTiles: number;
  /** Subgroup-matrix GEMM: K steps of activations staged in workgroup memory per chunk (0: read from storage). */
  smStageSteps: number;
  /** Subgroup-matrix GEMM: K steps loaded per loop iteration (loads in flight). */
  smUnroll: number;
  /** Subgroup-matrix GEMM: from this many rows, two column tiles a subgroup where K ≤ 2·N (smColTilesFor; Infinity: never). */
  smWideFromRows: number;
  /**
   * Subgroup-matrix GEMM: row tiles (16 rows) a workgroup covers, 1 … SM_MAX_ROW_TILES (default SM_ROW_TILES_PER_GROUP):
   * each weight tile it loads feeds that many products, so long prompt chunks read the weights fewer times.
   */
  smRowTiles?: number;
  /** GEMV: groups of 32 threads per workgroup splitting K (each group streams one 16-column tile's K steps). */
  gemvGroups: number;
  /** GEMV: K steps per loop iteration (loads in flight). */
  gemvUnroll: number;
}

/**
 * Defaults picked on the H200 (`npm run bench:int8`, BENCHMARKS.md): GEMV 8 groups × 2 steps; tensor cores 8 subgroups,
 * K split per shape, activations read from storage. With tensor cores, W8A8 takes over from 3 rows (at 8 rows it ran
 * 1.8–3.4× faster than the weights-only GEMV, whose activation loads grow with the rows); without, the GEMV keeps up
 * to 8 rows (the dot4 kernel is no faster there).
 */
export function defaultInt8MatmulTuning(tensorCores = false): Int8MatmulTuning {
  return { gemvMaxRows: tensorCores ? 2 : 8, gemvGroups: 8, gemvUnroll: 2, subgroupMatrix: 'auto', smSubgroups: 8, smKSplit: 'auto', smColTiles: 1, smStageSteps: 0, smUnroll: 2, smWideFromRows: 256 };
}

const range = (n: number) => [...Array(n).keys()];

export type Int8MatmulPath = 'gemv' | 'w8a8' | 'w8a8-sm';

interface Common {
  K: number;
  N: number;
  /** Weight row stride in values (a multiple of 16). */
  stride: number;
  xStride: number;
  yStride: number;
  colOffset: number;
  rowsSlot: number;
  bias: boolean;
  accumulate: boolean;
}

function storeExpr(p: Common, idx: string, v: string): string {
  return p.accumulate ? `y[${idx}] += ${v};` : `y[${idx}] = ${v};`;
}

/**
 * Weights-only int8 GEMV over the tiled layout: a group of 32 threads owns one 16-column tile, thread l holding half
 * l % 2 (16 values, one vec4<u32>) of row l / 2 of each K step, so one load of the group reads the tile's 512
 * contiguous bytes; `groups` such groups split K (group g takes steps g, g + groups, …), `unroll` steps per iteration.
 * f32 sums unpacked with unpack4xI8, reduced over the halves and groups in workgroup memory, times the feature's
 * scale (Σ x·q·s = s·Σ x·q). Activations past K read as zero (the weights there are zero, x may be anything).
 */
export function gemvInt8Wgsl(p: Common & { mr: number; groups: number; unroll: number }): string {
  const { mr, groups: G, unroll: U } = p;
  const wg = 32 * G;
  const steps = p.stride / 32;
  const colTiles = Math.ceil(p.N / 16);
  const iters = Math.ceil(steps / (G * U));
  const xs4 = p.xStride / 4;
  const ms = range(mr);
  const us = range(U);
  const fullSteps = Math.floor(p.K / 32); // steps whose 32 activations all lie below K
  const xLoad = (m: number, u: number, i: number) => {
    const idx = `xb${m} + s${u} * 8u + half * 4u + ${i}u`;
    return fullSteps === steps
      ? `x[${idx}]`
      : `select(vec4<f32>(0.0), x[min(${idx}, xLast)], vec4<u32>(s${u} * 32u + half * 16u + ${4 * i}u) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(${p.K}u))`;
  };
  const body = us.flatMap((u) => [
    `let s${u} = it * ${G * U}u + ${u * G}u + grp;`,
    `if (s${u} < ${steps}u) {`,
    `  let wq = w[s${u} * ${colTiles * 32}u + wTile + lane];`,
    ...range(4).map((i) => `  let w${i} = vec4<f32>(unpack4xI8(wq[${i}]));`),
    ...ms.map((m) => `  a${m} += ${range(4).map((i) => `dot(w${i}, ${xLoad(m, u, i)})`).join(' + ')};`),
    `}`,
  ]);
  const bindings = [
    '@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;',
    '@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;',
    '@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;',
    '@group(0) @binding(3) var<storage, read> wScale: array<f32>;',
    '@group(0) @binding(4) var<storage, read_write> y: array<f32>;',
  ];
  if (p.bias) bindings.push('@group(0) @binding(5) var<storage, read> bias: array<f32>;');
  const v = `sum * wScale[n]${p.bias ? ' + bias[n]' : ''}`;
  return /* wgsl */ `
${bindings.join('\n')}
var<workgroup> red: array<f32, ${wg * mr}>;

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let M = stepMeta[${p.rowsSlot}];
  let mLast = max(M, 1u) - 1u;
  let tile = wid.x + wid.y * nwg.x;
  let grp = lid / 32u;
  let lane = lid % 32u;
  let half = lane % 2u;
  let wTile = min(tile, ${colTiles - 1}u) * 32u;
  let xLast = arrayLength(&x) - 1u;
  ${ms.map((m) => `let xb${m} = min(${m}u, mLast) * ${xs4}u;\n  var a${m} = 0.0;`).join('\n  ')}
  for (var it = 0u; it < ${iters}u; it++) {
    ${body.join('\n    ')}
  }
  ${ms.map((m) => `red[${m * wg}u + lid] = a${m};`).join('\n  ')}
  workgroupBarrier();
  // Thread e < 16·mr sums row m = e / 16, feature f = e % 16 over the groups and both halves.
  for (var e = lid; e < ${16 * mr}u; e += ${wg}u) {
    let m = e / 16u;
    let f = e % 16u;
    let n = tile * 16u + f;
    var sum = 0.0;
    for (var g = 0u; g < ${G}u; g++) { sum += red[m * ${wg}u + g * 32u + 2u * f] + red[m * ${wg}u + g * 32u + 2u * f + 1u]; }
    if (m < M && n < ${p.N}u) { ${storeExpr(p, `m * ${p.yStride}u + ${p.colOffset}u + n`, v)} }
  }
}
`;
}

/**
 * Per-row activation quantization for W8A8: one 256-thread workgroup per row reads the row as vec4 (rows start at
 * multiples of 4 values), finds absmax, scale t = absmax / 127, and writes p = round(x / t) four per u32 in the tiled
 * layout (zero past K, up to `words` words) and t.
 */
export function quantizeRowsWgsl(p: { K: number; xStride: number; words: number; rowsSlot: number }): string {
  const steps = p.words / 8;
  const k4 = Math.ceil(p.K / 4);
  const per = Math.ceil(p.words / 256);
  // Lanes of the last vec4 past K read as zero.
  const masked = (j: string) => (p.K % 4 === 0 ? `x[xb + ${j}]` : `select(vec4<f32>(0.0), x[xb + ${j}], vec4<u32>(4u * ${j}) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(${p.K}u))`);
  return /* wgsl */ `
@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> xq: array<u32>;
@group(0) @binding(3) var<storage, read_write> xScale: array<f32>;
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${p.rowsSlot}];
  let m = wid.x;
  let live = m < M;
  let xb = min(m, max(M, 1u) - 1u) * ${p.xStride / 4}u;
  // The row's share of each thread stays in registers between the absmax and the write (one read of x).
  var v: array<vec4<f32>, ${per}>;
  for (var i = 0u; i < ${per}u; i++) {
    let j = lid + i * 256u;
    if (j < ${k4}u) { v[i] = ${masked('j')}; }
  }
  ${quantizeRowTailWgsl({ per, words: p.words, wg: 256, row: 'm', live: 'live' })}
}
`;
}

/**
 * The end of a one-row-a-workgroup kernel that writes its row quantized for W8A8 consumers (the layout above): `v`,
 * an array<vec4<f32>, per>, holds the thread's vec4s of the row (vec4 j = lid + i·wg, zero past the row); `red` is a
 * workgroup array<f32, wg> free to reuse; `xq` and `xScale` are the outputs. Writes row `row`'s words and scale when
 * `live`. The quantizer, the RMSNorm and the SiLU·mul kernels all end with it, so their bytes agree to the bit.
 */
export function quantizeRowTailWgsl(o: { per: number; words: number; wg: number; row: string; live: string }): string {
  return /* wgsl */ `var qa = vec4<f32>(0.0);
  for (var i = 0u; i < ${o.per}u; i++) { qa = max(qa, abs(v[i])); }
  workgroupBarrier();
  red[lid] = max(max(qa.x, qa.y), max(qa.z, qa.w));
  workgroupBarrier();
  for (var s = ${o.wg / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
    workgroupBarrier();
  }
  let qAbsMax = red[0];
  let qInv = select(0.0, 127.0 / qAbsMax, qAbsMax > 0.0);
  if (${o.live}) {
    for (var i = 0u; i < ${o.per}u; i++) {
      let j = lid + i * ${o.wg}u;
      if (j < ${o.words}u) {
        xq[${XQ_BASE_WORDS}u + ${tiledWordWgsl(o.row, 'j', o.words / 8)}] = pack4xI8(vec4<i32>(clamp(round(v[i] * qInv), vec4<f32>(-127.0), vec4<f32>(127.0))));
      }
    }
    if (lid == 0u) { xScale[${o.row}] = qAbsMax / 127.0; }
  }`;
}

/**
 * Quantized activations start after one all-zero tile (never written): the subgroup-matrix kernel multiplies it in for
 * K steps past the end, so its matrix calls need no branch.
 */
export const XQ_BASE_WORDS = 128;

/**
 * Bytes of a quantized-activation buffer for `rows` rows of `words` i32 words (K padded to 32 values): the zero tile,
 * then whole groups of row tiles (the tensor-core kernel's last z group loads all of its tiles).
 */
export function quantizedActivationBytes(rows: number, words: number): number {
  const rowTiles = Math.ceil(Math.max(1, rows) / W8A8_TILE_M);
  return (XQ_BASE_WORDS + Math.ceil(rowTiles / SM_MAX_ROW_TILES) * SM_MAX_ROW_TILES * W8A8_TILE_M * words) * 4;
}

/** Buffers for `rows` rows quantized by a kernel ahead of their W8A8 consumers (MatmulBindings.xQuantized). */
export interface QuantizedRows {
  xq: GPUBuffer;
  xScale: GPUBuffer;
  /** i32 words a row (K padded to whole 32-value steps). */
  words: number;
}

export function createQuantizedRows(gpu: GpuContext, label: string, rows: number, words: number): QuantizedRows {
  return {
    xq: storageBuffer(gpu, `${label}, int8`, quantizedActivationBytes(rows, words)),
    // One scale a row of whole 16-row tiles (what a W8A8 op over that many rows checks for).
    xScale: storageBuffer(gpu, `${label}, int8 scales`, Math.max(16, Math.ceil(rows / W8A8_TILE_M) * W8A8_TILE_M * 4)),
    words,
  };
}

/**
 * WGSL for the word index of (row, word) of the quantized activations: 16-row × 32-value tiles like the weights', but
 * row-tile-major (a row tile's K steps in order), `steps` K steps of 32 values per row.
 */
export function tiledWordWgsl(row: string, word: string, steps: number): string {
  return `((${row} / 16u) * ${steps}u + ${word} / 8u) * 128u + (${row} % 16u) * 8u + ${word} % 8u`;
}

/** W8A8 tile: 16 rows per workgroup, one output feature per thread (64), K staged 16 words (64 values) at a time. */
export const W8A8_TILE_M = 16;
const W8A8_TILE_N = 64;
const W8A8_TILE_KW = 16;

/**
 * W8A8 GEMM: i32 sums of dot4I8Packed(activation word, weight word) per (row, feature), then
 * y = f32(sum) · (row scale · feature scale) (+ bias). The activation tile sits in workgroup memory.
 */
export function gemmW8A8Wgsl(p: Common): string {
  const words = p.stride / 4;
  const steps = p.stride / 32;
  const BM = W8A8_TILE_M;
  const BKW = W8A8_TILE_KW;
  const ms = range(BM);
  const bindings = [
    '@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;',
    '@group(0) @binding(1) var<storage, read> xq: array<u32>;',
    '@group(0) @binding(2) var<storage, read> xScale: array<f32>;',
    '@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;',
    '@group(0) @binding(4) var<storage, read> wScale: array<f32>;',
    '@group(0) @binding(5) var<storage, read_write> y: array<f32>;',
  ];
  if (p.bias) bindings.push('@group(0) @binding(6) var<storage, read> bias: array<f32>;');
  const loads = (BM * BKW) / W8A8_TILE_N;
  return /* wgsl */ `
${bindings.join('\n')}
var<workgroup> xs: array<u32, ${BM * BKW}>;

@compute @workgroup_size(${W8A8_TILE_N})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${p.rowsSlot}];
  let mLast = max(M, 1u) - 1u;
  let tileN = wid.x * ${W8A8_TILE_N}u;
  let tileM = wid.y * ${BM}u;
  let n = tileN + lid;
  let nc = min(n, ${p.N - 1}u);
  // Tiled layout: vec4 c of row n at (c / 2) · kStepVec + (n / 16) · 32 + (n % 16) · 2 + c % 2.
  let wb = (nc / 16u) * 32u + (nc % 16u) * 2u;
  ${ms.map((m) => `var acc${m} = 0i;`).join('\n  ')}
  for (var kw0 = 0u; kw0 < ${words}u; kw0 += ${BKW}u) {
    workgroupBarrier();
    ${range(loads)
      .map(
        (e) => `{
      let idx = lid + ${e * W8A8_TILE_N}u;
      let gm = tileM + idx / ${BKW}u;
      let kw = kw0 + idx % ${BKW}u;
      var v = 0u;
      if (gm < M && kw < ${words}u) {
        let row = min(gm, mLast);
        v = xq[${XQ_BASE_WORDS}u + ${tiledWordWgsl('row', 'kw', steps)}];
      }
      xs[idx] = v;
    }`,
      )
      .join('\n    ')}
    workgroupBarrier();
    for (var v = 0u; v < ${BKW / 4}u; v++) {
      if (kw0 + 4u * v < ${words}u) {
        let c = kw0 / 4u + v;
        let wq = w[wb + (c / 2u) * ${Math.ceil(p.N / 16) * 32}u + c % 2u];
        for (var i = 0u; i < 4u; i++) {
          let ww = wq[i];
          let j = 4u * v + i;
          ${ms.map((m) => `acc${m} += dot4I8Packed(xs[${m * BKW}u + j], ww);`).join('\n          ')}
        }
      }
    }
  }
  if (n < ${p.N}u) {
    let s = wScale[n];
    ${ms
      .map((m) => {
        const v = `f32(acc${m}) * (xScale[gm] * s)${p.bias ? ' + bias[n]' : ''}`;
        return `{
      let gm = tileM + ${m}u;
      if (gm < M) { ${storeExpr(p, `gm * ${p.yStride}u + ${p.colOffset}u + n`, v)} }
    }`;
      })
      .join('\n    ')}
  }
}
`;
}

/** True when the adapter offers the i8×i8→i32 M16 N16 K32 subgroup-matrix shape the tensor-core W8A8 kernel uses. */
export function hasInt8SubgroupMatrix(gpu: GpuContext): boolean {
  return gpu.subgroupMatrixConfigs.some((c) => c.componentType === 'i8' && c.resultComponentType === 'i32' && c.M === 16 && c.N === 16 && c.K === 32);
}

/** Bindings of the subgroup-matrix W8A8 kernels: activations and weights as `elem` (i32 for matrix loads, vec4 to stage). */
function smBindings(p: Common, xElem: 'i32' | 'vec4<i32>'): string[] {
  const b = [
    '@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;',
    `@group(0) @binding(1) var<storage, read> xq: array<${xElem}>;`,
    '@group(0) @binding(2) var<storage, read> xScale: array<f32>;',
    '@group(0) @binding(3) var<storage, read> w: array<i32>;',
    '@group(0) @binding(4) var<storage, read> wScale: array<f32>;',
    '@group(0) @binding(5) var<storage, read_write> y: array<f32>;',
  ];
  if (p.bias) b.push('@group(0) @binding(6) var<storage, read> bias: array<f32>;');
  return b;
}

/** Row tiles (16 rows each) one subgroup-matrix workgroup covers by default (smRowTiles); more rows are more workgroups along z. */
export const SM_ROW_TILES_PER_GROUP = 4;
/** The most row tiles a workgroup may cover (smRowTiles); quantized activations are padded to whole groups of it. */
export const SM_MAX_ROW_TILES = 8;

export interface SmGemmShape {
  /** Row tiles per workgroup (≤ SM_MAX_ROW_TILES). */
  rowTiles: number;
  /** Subgroups per workgroup. */
  subgroups: number;
  /** Subgroups sharing one column group along K (divides `subgroups`). */
  kSplit: number;
  /** Adjacent 16-column tiles one subgroup multiplies (each left tile feeds that many products). */
  colTilesPerSubgroup: number;
  /** K steps per loop iteration (loads in flight). */
  unroll: number;
  /**
   * K steps of activation tiles a workgroup copies into workgroup memory at a time (0: every subgroup loads its
   * activation tiles from storage). Staged, the workgroup's column tiles share one read of the activations.
   */
  stageSteps: number;
  subgroupSize: number;
}

/** Workgroup bytes of the subgroup-matrix GEMM: partial tiles, and the staged activation chunk. */
export function smGemmWorkgroupBytes(s: Pick<SmGemmShape, 'rowTiles' | 'subgroups' | 'stageSteps'>): number {
  return s.subgroups * 1024 + s.rowTiles * s.stageSteps * 512;
}

/**
 * W8A8 GEMM on subgroup matrices (tensor cores): the same exact i32 sums as gemmW8A8Wgsl, so the same y.
 * Weights (K-major tiles, tileInt8Rows) and quantized activations (row-tile-major tiles) are both tiled, so every
 * matrix load reads 512 contiguous bytes. A workgroup holds subgroups / kSplit column groups of colTilesPerSubgroup 16-column tiles each and
 * up to 4 row tiles; the kSplit subgroups of a column group split K, subgroup k taking K steps k, k + kSplit, … (so
 * together they stream the tiles in order), `unroll` steps per iteration. Left = activations [16 rows × 32]
 * row-major, right = Wᵀ [32 × 16], i.e. a weight tile read column-major. At the end the partial tiles of a column
 * group meet in workgroup memory and each element gets y = f32(Σ) · (row scale · feature scale) (+ bias).
 * Loads use the (deprecated, Dawn warns at compile) form with a col_major bool: on the H200's Dawn it counts offset and
 * stride in i8 values, measured; the newer `<T, col_major>` form read different addresses there.
 */
export function gemmW8A8SubgroupMatrixWgsl(p: Common & SmGemmShape): string {
  const { rowTiles: MT, subgroups: S, kSplit: KS, colTilesPerSubgroup: CS, unroll: U } = p;
  if (S % KS !== 0) throw new Error(`int8 GEMM: kSplit ${KS} must divide the ${S} subgroups of a workgroup`);
  const steps = p.stride / 32;
  const colTiles = Math.ceil(p.N / 16);
  const groupsPerWg = S / KS;
  const wg = S * p.subgroupSize;
  const mts = range(MT);
  const css = range(CS);
  const us = range(U);
  const left = 'subgroup_matrix_left<i8, 32, 16>';
  const right = 'subgroup_matrix_right<i8, 16, 32>';
  const result = 'subgroup_matrix_result<i32, 16, 16>';
  const KC = p.stageSteps;
  if (KC > 0 && KC % (KS * U) !== 0) throw new Error(`int8 GEMM: stageSteps ${KC} must be a multiple of kSplit·unroll = ${KS * U}`);
  // Every subgroup runs the same number of iterations; steps past K multiply a zero activation tile (the one at the
  // start of xq, or zeros staged).
  const iters = KC > 0 ? KC / (KS * U) : Math.ceil(steps / (KS * U));
  const chunks = KC > 0 ? Math.ceil(steps / KC) : 1;
  const step = (u: number) => [
    KC > 0 ? `let j${u} = it * ${KS * U}u + ${u * KS}u + kq;\n    let s${u} = c0 * ${KC}u + j${u};` : `let s${u} = it * ${KS * U}u + ${u * KS}u + kq;`,
    `let ws${u} = min(s${u}, ${steps - 1}u) * ${colTiles * 512}u;`,
    ...css.map((c) => `let r${u}_${c} = subgroupMatrixLoad<${right}>(&w, wTile${c} + ws${u}, true, 32u);`),
    ...mts.map((m) =>
      KC > 0
        ? `let l${u}_${m} = subgroupMatrixLoad<${left}>(&xs, (${m * KC}u + j${u}) * 512u, false, 32u);`
        : `let l${u}_${m} = subgroupMatrixLoad<${left}>(&xq, select(0u, ${XQ_BASE_WORDS * 4}u + (mTile0 + ${m}u) * ${steps * 512}u + s${u} * 512u, s${u} < ${steps}u), false, 32u);`,
    ),
  ];
  // Staging: MT × KC tiles of 32 vec4 each, zeros for steps past K.
  const stage = `for (var e = lid; e < ${MT * KC * 32}u; e += ${wg}u) {
      let m = e / ${KC * 32}u;
      let j = (e / 32u) % ${KC}u;
      let s = c0 * ${KC}u + j;
      var v = vec4<i32>(0);
      if (s < ${steps}u) { v = xq[${XQ_BASE_WORDS / 4}u + ((mTile0 + m) * ${steps}u + s) * 32u + e % 32u]; }
      let o = (m * ${KC}u + j) * 128u + (e % 32u) * 4u;
      xs[o] = v.x; xs[o + 1u] = v.y; xs[o + 2u] = v.z; xs[o + 3u] = v.w;
    }
    workgroupBarrier();`;
  const mma = (u: number) => mts.flatMap((m) => css.map((c) => `acc${m}_${c} = subgroupMatrixMultiplyAccumulate(l${u}_${m}, r${u}_${c}, acc${m}_${c});`));
  const v = `f32(sum) * (xScale[gm] * wScale[gn])${p.bias ? ' + bias[gn]' : ''}`;
  const epilogue = mts.flatMap((m) =>
    css.map(
      (c) => `subgroupMatrixStore(&part, sg * 256u, acc${m}_${c}, false, 16u);
  workgroupBarrier();
  for (var e = lid; e < ${groupsPerWg * 256}u; e += ${wg}u) {
    let grp = e / 256u;
    let gm = (mTile0 + ${m}u) * 16u + (e % 256u) / 16u;
    let gn = ((wgIndex * ${groupsPerWg}u + grp) * ${CS}u + ${c}u) * 16u + e % 16u;
    var sum = 0i;
    for (var k = 0u; k < ${KS}u; k++) { sum += part[(grp * ${KS}u + k) * 256u + e % 256u]; }
    if (gm < M && gn < ${p.N}u) { ${storeExpr(p, `gm * ${p.yStride}u + ${p.colOffset}u + gn`, v)} }
  }
  workgroupBarrier();`,
    ),
  );
  // Subgroup matrix calls need subgroup-uniform operands; K offsets depend on the subgroup index (uniform within a
  // subgroup, not across the workgroup), which WGSL's workgroup-scope analysis cannot see.
  return /* wgsl */ `enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);
${smBindings(p, KC > 0 ? 'vec4<i32>' : 'i32').join('\n')}
var<workgroup> part: array<i32, ${S * 256}>;
${KC > 0 ? `var<workgroup> xs: array<i32, ${MT * KC * 128}>;` : ''}

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let M = stepMeta[${p.rowsSlot}];
  let wgIndex = wid.x + wid.y * nwg.x;
  let kq = sg % ${KS}u;
  let colTile0 = (wgIndex * ${groupsPerWg}u + sg / ${KS}u) * ${CS}u;
  let mTile0 = wid.z * ${MT}u;
  // Column tiles past the last re-read it (their sums are never stored).
  ${css.map((c) => `let wTile${c} = min(colTile0 + ${c}u, ${colTiles - 1}u) * 512u;`).join('\n  ')}
  ${mts.flatMap((m) => css.map((c) => `var acc${m}_${c} = ${result}();`)).join('\n  ')}
  for (var c0 = 0u; c0 < ${chunks}u; c0++) {
    ${KC > 0 ? stage : ''}
    for (var it = 0u; it < ${iters}u; it++) {
      ${us.flatMap(step).join('\n      ')}
      ${us.flatMap(mma).join('\n      ')}
    }
    ${KC > 0 ? 'workgroupBarrier();' : ''}
  }
  ${epilogue.join('\n  ')}
}
`;
}

/** Workgroups of the subgroup-matrix GEMM along the columns. */
export function smGemmWorkgroups(N: number, s: Pick<SmGemmShape, 'subgroups' | 'kSplit' | 'colTilesPerSubgroup'>): number {
  return Math.ceil(Math.ceil(N / 16) / ((s.subgroups / s.kSplit) * s.colTilesPerSubgroup));
}

/**
 * kSplit for a shape when the tuning says 'auto': the fewest subgroups per column group that still give the GPU about
 * `targetSubgroups` subgroups (column tiles alone are too few for the short-N shapes: 224 for down_proj).
 */
export function autoKSplit(N: number, subgroups: number, colTilesPerSubgroup: number, targetSubgroups: number): number {
  const groups = Math.ceil(N / 16 / colTilesPerSubgroup);
  let ks = 1;
  while (ks < subgroups && groups * ks < targetSubgroups) ks *= 2;
  return ks;
}

interface Dispatch {
  pipeline: GPUComputePipeline;
  bindGroup: GPUBindGroup;
  grid: [number, number, number];
}

/** One matmul site with an int8 weight: the same bindings and encode() contract as MatmulOp. */
export class Int8MatmulOp {
  readonly tuning: Int8MatmulTuning;
  private groups = new Map<string, Dispatch[]>();
  private xq: GPUBuffer | undefined;
  private xScale: GPUBuffer | undefined;

  constructor(
    private gpu: GpuContext,
    readonly weight: GpuInt8Matrix,
    private b: MatmulBindings,
    tuning: Partial<Int8MatmulTuning> = {},
  ) {
    const tensorCores = tuning.subgroupMatrix !== 'off' && hasInt8SubgroupMatrix(gpu);
    this.tuning = { ...defaultInt8MatmulTuning(tensorCores), ...tuning };
    const t = this.tuning;
    const label = weight.label;
    if (b.xStride % 4 !== 0 || b.xStride < weight.cols) {
      throw new Error(`${label}: input row stride ${b.xStride} must be a multiple of 4 and ≥ ${weight.cols} columns`);
    }
    if (!(t.gemvGroups >= 1) || 32 * t.gemvGroups > gpu.limits.maxComputeInvocationsPerWorkgroup) {
      throw new Error(`${label}: int8 GEMV workgroup of ${t.gemvGroups}×32 threads exceeds the device limit`);
    }
    if (t.gemvMaxRows < 0 || t.gemvMaxRows > 8) throw new Error(`${label}: int8 gemvMaxRows ${t.gemvMaxRows} must be 0..8`);
    if (![1, 2, 4].includes(t.smColTiles)) throw new Error(`${label}: int8 smColTiles ${t.smColTiles} must be 1, 2 or 4`);
    if (t.smRowTiles !== undefined && !(Number.isInteger(t.smRowTiles) && t.smRowTiles >= 1 && t.smRowTiles <= SM_MAX_ROW_TILES)) {
      throw new Error(`${label}: int8 smRowTiles ${t.smRowTiles} must be an integer from 1 to ${SM_MAX_ROW_TILES}`);
    }
    if (t.smKSplit !== 'auto' && t.smSubgroups % t.smKSplit !== 0) throw new Error(`${label}: int8 smKSplit ${t.smKSplit} must divide smSubgroups ${t.smSubgroups}`);
  }

  /** Which kernels serve `rows` input rows: 'gemv' (weights-only int8), 'w8a8' (dot4I8Packed) or 'w8a8-sm' (tensor cores). */
  path(rows: number): Int8MatmulPath {
    if (rows <= this.tuning.gemvMaxRows) return 'gemv';
    return this.tuning.subgroupMatrix === 'auto' && hasInt8SubgroupMatrix(this.gpu) ? 'w8a8-sm' : 'w8a8';
  }

  private common() {
    const { weight: w, b } = this;
    return {
      K: w.cols,
      N: w.rows,
      stride: w.stride,
      xStride: b.xStride,
      yStride: b.yStride,
      colOffset: b.yOffset ?? 0,
      rowsSlot: b.rowsSlot,
      bias: !!b.bias,
      accumulate: !!b.accumulate,
    };
  }

  private buildGemv(mr: number): Dispatch[] {
    const { gpu, weight: w, b, tuning: t } = this;
    const code = gemvInt8Wgsl({ ...this.common(), mr, groups: t.gemvGroups, unroll: t.gemvUnroll });
    const pipeline = gpu.pipeline(`matmul int8 gemv${mr} ${w.rows}x${w.cols}`, code);
    const bufs = [b.meta, b.x, w.buffer, w.scales, b.y];
    if (b.bias) bufs.push(b.bias);
    const [gx, gy] = gridFor(gpu, Math.ceil(w.rows / 16));
    return [{ pipeline, bindGroup: bindBuffers(gpu, pipeline, `${w.label} int8 gemv${mr}`, bufs), grid: [gx, gy, 1] }];
  }

  private buildW8A8(rowTiles: number, sm: boolean): Dispatch[] {
    const { gpu, weight: w, b, tuning: t } = this;
    const cap = rowTiles * W8A8_TILE_M;
    const words = w.stride / 4;
    // Whole groups of SM_MAX_ROW_TILES tiles: the last z group of the tensor-core kernel loads all of its tiles.
    const xqBytes = quantizedActivationBytes(cap, words);
    const pre = b.xQuantized;
    if (pre && (pre.xq.size < xqBytes || pre.xScale.size < cap * 4)) {
      throw new Error(`${w.label}: the pre-quantized input holds fewer than ${cap} rows (${pre.xq.size} B, ${xqBytes} B needed)`);
    }
    if (!pre && (!this.xq || this.xq.size < xqBytes)) {
      // Older, smaller scratch buffers stay alive: bind groups built earlier still point at them.
      const usage = GPUBufferUsage.STORAGE;
      this.xq = gpu.device.createBuffer({ label: `${w.label} quantized activations`, size: xqBytes, usage });
      this.xScale = gpu.device.createBuffer({ label: `${w.label} activation scales`, size: Math.max(16, cap * 4), usage });
    }
    const xq = pre ? pre.xq : this.xq!;
    const xScale = pre ? pre.xScale : this.xScale!;
    const gbufs = [b.meta, xq, xScale, w.buffer, w.scales, b.y];
    if (b.bias) gbufs.push(b.bias);
    // With a pre-quantized input the list holds the products alone.
    const quantize: Dispatch[] = [];
    if (!pre) {
      const qp = gpu.pipeline(`quantize rows int8 K${w.cols}`, quantizeRowsWgsl({ K: w.cols, xStride: b.xStride, words, rowsSlot: b.rowsSlot }));
      quantize.push({ pipeline: qp, bindGroup: bindBuffers(gpu, qp, `${w.label} quantize rows`, [b.meta, b.x, xq, xScale]), grid: [cap, 1, 1] });
    }
    if (sm) {
      const tilesPerGroup = Math.min(rowTiles, t.smRowTiles ?? SM_ROW_TILES_PER_GROUP);
      const shape = this.smShape(tilesPerGroup, this.smColTilesFor(cap));
      const code = gemmW8A8SubgroupMatrixWgsl({ ...this.common(), ...shape });
      const label = `matmul int8 w8a8 sm ${w.rows}x${w.cols} m${tilesPerGroup} s${shape.subgroups} k${shape.kSplit} c${shape.colTilesPerSubgroup} u${shape.unroll} x${shape.stageSteps}`;
      const gp = gpu.pipeline(label, code);
      const [gx, gy] = gridFor(gpu, smGemmWorkgroups(w.rows, shape));
      return [...quantize, { pipeline: gp, bindGroup: bindBuffers(gpu, gp, `${w.label} w8a8 sm`, gbufs), grid: [gx, gy, Math.ceil(rowTiles / tilesPerGroup)] }];
    }
    const gp = gpu.pipeline(`matmul int8 w8a8 ${w.rows}x${w.cols}`, gemmW8A8Wgsl(this.common()));
    return [...quantize, { pipeline: gp, bindGroup: bindBuffers(gpu, gp, `${w.label} w8a8`, gbufs), grid: [Math.ceil(w.rows / W8A8_TILE_N), rowTiles, 1] }];
  }

  /**
   * Column tiles a subgroup multiplies at `rows` rows: from smWideFromRows rows, 2 (each activation tile load feeds two
   * products) where K ≤ 2·N, else smColTiles. H100, bench:int8 --rows 256,512 (2026-12-06): at 512 rows gate_up 738
   * against 1050 µs, qkv 91 against 132, o 72 against 103; down (K 18944 → N 3584) 588 against 509, so it keeps one.
   */
  smColTilesFor(rows: number): number {
    const t = this.tuning;
    return rows >= t.smWideFromRows && this.weight.cols <= 2 * this.weight.rows ? Math.max(2, t.smColTiles) : t.smColTiles;
  }

  /** The tensor-core kernel's shape for this weight (kSplit resolved). */
  smShape(rowTiles = SM_ROW_TILES_PER_GROUP, colTiles = this.tuning.smColTiles): SmGemmShape {
    const t = { ...this.tuning, smColTiles: colTiles };
    // About 128 subgroups per SM of an H200-sized GPU (132 SMs) before K stops splitting: enough loads in flight to
    // stream the weights. gate_up (2368 column tiles) at 32 rows: K split 8 84 µs, 2 (the old 4224 target) 96 µs
    // (H200, bench:int8 --all --rows 32 --shapes gate_up,down --spin-ms 500, 2026-12-04).
    const kSplit = t.smKSplit === 'auto' ? autoKSplit(this.weight.rows, t.smSubgroups, t.smColTiles, 16896) : t.smKSplit;
    // The staged chunk: a multiple of kSplit·unroll steps, halved for 4 row tiles (workgroup memory), 0 to turn it off.
    let stageSteps = 0;
    if (t.smStageSteps > 0) {
      const q = kSplit * t.smUnroll;
      stageSteps = Math.ceil(t.smStageSteps / q) * q;
      const budget = this.gpu.limits.maxComputeWorkgroupStorageSize;
      while (stageSteps > q && smGemmWorkgroupBytes({ rowTiles, subgroups: t.smSubgroups, stageSteps }) > budget) stageSteps -= q;
      if (smGemmWorkgroupBytes({ rowTiles, subgroups: t.smSubgroups, stageSteps }) > budget) stageSteps = 0;
    }
    return { rowTiles, subgroups: t.smSubgroups, kSplit, colTilesPerSubgroup: t.smColTiles, unroll: t.smUnroll, stageSteps, subgroupSize: this.gpu.subgroupSize };
  }

  /**
   * Records the dispatches for `rows` input rows (the value the kernels read at stepMeta[rowsSlot]); `stage` records
   * only the activation quantization or only the products of a W8A8 path (benchmarks time them apart).
   */
  encode(pass: GPUComputePassEncoder, rows: number, stage: 'all' | 'quantize' | 'products' = 'all'): void {
    if (rows <= 0) return;
    let key: string;
    let make: () => Dispatch[];
    if (this.path(rows) === 'gemv') {
      let mr = 1;
      while (mr < rows) mr *= 2;
      key = `gemv${mr}`;
      make = () => this.buildGemv(mr);
    } else {
      const rowTiles = Math.ceil(rows / W8A8_TILE_M);
      const sm = this.path(rows) === 'w8a8-sm';
      key = `w8a8${sm ? '-sm' : ''}x${rowTiles}`;
      make = () => this.buildW8A8(rowTiles, sm);
    }
    let list = this.groups.get(key);
    if (!list) {
      list = make();
      this.groups.set(key, list);
    }
    // The GEMV is one dispatch; a W8A8 path is [quantize, products], or [products] with a pre-quantized input.
    const w8a8 = key.startsWith('w8a8');
    const nq = w8a8 ? list.length - 1 : 0;
    const picked = stage === 'all' || !w8a8 ? list : stage === 'quantize' ? list.slice(0, nq) : list.slice(nq);
    for (const g of picked) {
      pass.setPipeline(g.pipeline);
      pass.setBindGroup(0, g.bindGroup);
      pass.dispatchWorkgroups(g.grid[0], g.grid[1], g.grid[2]);
    }
  }
}

// Per-head batched matmul of MLA: y[row, h, n] = scale · Σ_k W_h[k, n] · x[row, h, k] — the absorption q̃ = W_UKᵀ q_nope and ô → W_UV.
//
// The per-head weights are stored k-major (W_h[k][n], a GpuMatrix [nHeads·K, N]). Decode steps take a kernel that
// streams them (each thread 8 outputs × its k slice, many 16-byte loads in flight, up to 8 rows at once); prefill
// chunks a tiled one (x and W tiles staged in workgroup memory). Optional pass-through columns copy x's values after
// the K inputs of each head into y after the N outputs (scaled): the absorption uses them to place scale · q_pe next
// to scale · q̃.
import type { GpuContext } from './device.ts';
import { META_ROWS, metaWgsl } from './step-meta.ts';
import { bindBuffers, uploadMatrix, wgslF32, type GpuMatrix, type WeightDtype } from './tensors.ts';
import { hasInt8SubgroupMatrix } from './matmul-int8.ts';
import { HeadW8a8 } from './mla-head-w8a8.ts';

const MAX_ROWS_PER_THREAD = 8;
/**
 * From this many rows on (prefill chunks), a step takes the tiled kernel by default: 64 (or 32, 16) rows × 64 outputs
 * of a head per workgroup, the x and W tiles staged in workgroup memory 16 k at a time, 4 × 4 outputs a thread. Below
 * it the streaming kernel reads W once per 8 rows. On the H200 (2026-12-05) the tiled kernel from 16 rows made MLA
 * decode slower (18.9 against 14.7 ms a 32-row step); HeadMatmulOptions.tiledMinRows (bench:decode
 * --mla-head-tiled-from) moves the threshold.
 */
export const HEAD_MATMUL_TILED_MIN_ROWS = 128;
const TILE = 64;
const TILE_K = 16;

/** Rows of the tiled kernel's tile for a step: 64 from 64 rows on, else the fewest of 16 and 32 that hold them. */
export function headTileRows(rows: number): 16 | 32 | 64 {
  return rows >= 48 ? 64 : rows > 16 ? 32 : 16;
}

export interface HeadMatmulOptions {
  /** Steps of at least this many rows take the tiled kernel (default HEAD_MATMUL_TILED_MIN_ROWS). */
  tiledMinRows?: number;
  /**
   * K slices of the decode kernel's workgroup (8, 16 or 32; default 16): threads = slices × 8 column groups. Fewer
   * slices give each thread more k values in flight and the slices' reduction fewer terms.
   */
  kSlices?: 8 | 16 | 32;
  /**
   * The kernel of steps below tiledMinRows: 'staged' (default) one workgroup per (head, 16 or 64 outputs, up to 32
   * rows) that loads each k chunk of x and W with all its loads in flight, stages it in workgroup memory and multiplies
   * it while the next chunk loads (headMatmulStagedWgsl); 'sliced' the streaming kernel above. On an H100
   * (bench:decode --profile, 2026-12-05) a step's two products took 1353 µs staged against 1628 sliced at 32 rows, 779
   * against 1300 at 8. (A 'kgroups' kernel, K split four ways with a loop of dependent loads, took 2518 µs at 32 rows
   * and was removed.) 'w8a8': the weights quantized to int8 once per output column and the inputs per (row, head)
   * each step, products on tensor cores where the adapter has i8 subgroup matrices (else dot4I8Packed, the same
   * integers): kernels/mla-head-w8a8.ts, for steps of up to W8A8_HEAD_MAX_ROWS rows (larger ones take the staged
   * kernel). Untimed.
   */
  decodeKernel?: HeadDecodeKernel;
  /**
   * The kernel of steps of tiledMinRows rows or more (prompt chunks): 'tiled' (default, f32 products from f16/f32
   * weights; on an H100 a 512-row step's two products took 4.6 + 4.2 ms over 28 layers, 2026-12-05) or 'w8a8' (as
   * decodeKernel 'w8a8', its input scratch sized for the largest step the site's x buffer holds). Untimed.
   */
  prefillKernel?: HeadPrefillKernel;
}

export const HEAD_PREFILL_KERNELS = ['tiled', 'w8a8'] as const;
export type HeadPrefillKernel = (typeof HEAD_PREFILL_KERNELS)[number];

export const HEAD_DECODE_KERNELS = ['sliced', 'staged', 'w8a8'] as const;
export type HeadDecodeKernel = (typeof HEAD_DECODE_KERNELS)[number];

/** The most rows a step runs through the W8A8 head products (their input scratch is sized for it). */
export const W8A8_HEAD_MAX_ROWS = 128;

export interface HeadMatmulSpec {
  nHeads: number;
  /** Inputs per head. */
  K: number;
  /** Outputs per head. */
  N: number;
  /** Input row stride, offset of head 0's inputs, distance between heads' inputs (values). */
  xStride: number;
  xOffset: number;
  xHeadStride: number;
  /** Output row stride, offset of head 0's outputs, distance between heads' outputs (values). */
  yStride: number;
  yOffset: number;
  yHeadStride: number;
  /** Multiplies every output (and the pass-through copies). */
  scale: number;
  /** y[row, h, N + i] = scale · x[row, h, K + i] for i < passCols. */
  passCols?: number;
}

/**
 * Uploads per-head matrices W_h[k][n] (k < K, n < N) as one k-major GpuMatrix [nHeads·K, N].
 * `value(h, k, n)` reads the checkpoint's element.
 */
export function uploadHeadMatrices(
  gpu: GpuContext,
  label: string,
  nHeads: number,
  K: number,
  N: number,
  dtype: WeightDtype,
  value: (h: number, k: number, n: number) => number,
): GpuMatrix {
  const data = new Float32Array(nHeads * K * N);
  for (let h = 0; h < nHeads; h++) {
    for (let k = 0; k < K; k++) {
      const base = (h * K + k) * N;
      for (let n = 0; n < N; n++) data[base + n] = value(h, k, n);
    }
  }
  const m = uploadMatrix(gpu, label, data, nHeads * K, N, dtype);
  if (m.pieces.length !== 1) {
    throw new Error(`${label}: per-head matrices of ${m.bytes} B exceed one storage binding (${gpu.limits.maxStorageBufferBindingSize} B)`);
  }
  return m;
}

/**
 * The kernels' pass-through columns: y[row, h, N + i] = scale · x[row, h, K + i] for the workgroup's `rows` rows from
 * `first`; `xAt(i)` reads x's value i (the k-groups kernel binds x as vec4).
 */
function passThroughWgsl(s: HeadMatmulSpec, first: string, rows: number, threads: number, xAt = (i: string) => `x[${i}]`): string {
  const pass = s.passCols ?? 0;
  if (pass === 0) return '';
  return `
  // The pass-through columns of the workgroup's rows, by the first column tile.
  if (wid.x == 0u) {
    for (var e = lid; e < ${rows * pass}u; e += ${threads}u) {
      let row = ${first} + e / ${pass}u;
      let i = e % ${pass}u;
      if (row < M) {
        y[row * ${s.yStride}u + ${s.yOffset}u + h * ${s.yHeadStride}u + ${s.N}u + i] = ${xAt(`row * ${s.xStride}u + ${s.xOffset}u + h * ${s.xHeadStride}u + ${s.K}u + i`)} * ${wgslF32(s.scale)};
      }
    }
  }`;
}

/**
 * Threads of the sliced decode kernel's workgroup: k slices × 8 column groups of 8 outputs. 16 slices by default: on an H100
 * (bench:decode --profile, 2026-12-05) a 32-row MLA step's two head products took 1637 µs with 16, 1848 with 8 and
 * 2152 with 32 (the k-groups kernel: 2518).
 */
const WIDE_SLICES = 16;
const WIDE_GROUPS = 8;
/** Workgroup memory of the decode kernel's reduction (f32 values): as many rows at once as fit. */
const REDUCE_FLOATS = 4096;
/** Most k steps a thread loads before it multiplies (its loads in flight at once). */
const WIDE_UNROLL = 16;

/**
 * The decode kernel: grid (⌈N / 64⌉, nHeads, ⌈rows / mr⌉), slices × 8 column groups of threads. A thread loads 8
 * consecutive outputs' weights (one 16-byte word of f16, two of f32) for each of its k values — up to 16 of them before
 * multiplying, so the whole matrix is in flight at once (a decode step's W_UK / W_UV are ~3.7 MB a layer, read once:
 * the older one-pair-a-thread kernel had too few loads in flight and ran at ~100 GB/s) — times its mr rows' x values;
 * the slices' partial sums meet in workgroup memory, as many rows at a time as REDUCE_FLOATS holds (32 slices: 2).
 */
function headMatmulWgsl(s: HeadMatmulSpec, w: GpuMatrix, mr: number, slices: number): string {
  const f16 = w.dtype === 'f16';
  const groups = Math.ceil(s.N / 8);
  const KL = Math.ceil(s.K / slices);
  const U = Math.min(KL, WIDE_UNROLL);
  const chunks = Math.ceil(KL / U);
  const ms = [...Array(mr).keys()];
  const us = [...Array(U).keys()];
  const WGS = slices * WIDE_GROUPS;
  // Rows reduced per round (one barrier pair each), and the rounds.
  const perRound = Math.max(1, Math.min(mr, Math.floor(REDUCE_FLOATS / (WGS * 8))));
  const rounds = [...Array(Math.ceil(mr / perRound)).keys()];
  const sc = wgslF32(s.scale);
  // Weights of (head h, k) for column group gc: vec4<u32> of 8 f16 (w.stride / 8 per k), or two vec4<f32>.
  const load = (u: number) =>
    f16
      ? `let wq${u} = w[(h * ${s.K}u + kc${u}) * ${w.stride / 8}u + gc];
      let lo${u} = vec4<f32>(unpack2x16float(wq${u}.x), unpack2x16float(wq${u}.y));
      let hi${u} = vec4<f32>(unpack2x16float(wq${u}.z), unpack2x16float(wq${u}.w));`
      : `let lo${u} = w[((h * ${s.K}u + kc${u}) * ${w.stride / 8}u + gc) * 2u];
      let hi${u} = w[((h * ${s.K}u + kc${u}) * ${w.stride / 8}u + gc) * 2u + 1u];`;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<${f16 ? 'vec4<u32>' : 'vec4<f32>'}>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
var<workgroup> red: array<f32, ${WGS * 8 * perRound}>;

@compute @workgroup_size(${WGS})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${META_ROWS}];
  let cg = lid % ${WIDE_GROUPS}u;
  let sl = lid / ${WIDE_GROUPS}u;
  let g = wid.x * ${WIDE_GROUPS}u + cg;
  let gc = min(g, ${groups - 1}u);
  let h = wid.y;
  let row0 = wid.z * ${mr}u;
  let mLast = max(M, 1u) - 1u;
  ${ms.map((m) => `let xb${m} = min(row0 + ${m}u, mLast) * ${s.xStride}u + ${s.xOffset}u + h * ${s.xHeadStride}u;`).join('\n  ')}
  ${ms.map((m) => `var lo${m}acc = vec4<f32>(0.0);\n  var hi${m}acc = vec4<f32>(0.0);`).join('\n  ')}
  for (var c = 0u; c < ${chunks}u; c++) {
    ${us.map((u) => `let k${u} = (c * ${U}u + ${u}u) * ${slices}u + sl;\n    let kc${u} = min(k${u}, ${s.K - 1}u);`).join('\n    ')}
    ${us.map(load).join('\n    ')}
    ${us
      .map((u) =>
        ms
          .map((m) => `{ let xv = select(0.0, x[xb${m} + kc${u}], k${u} < ${s.K}u); lo${m}acc += xv * lo${u}; hi${m}acc += xv * hi${u}; }`)
          .join('\n    '),
      )
      .join('\n    ')}
  }
  // The slices' sums of each output, ${perRound} row(s) a round: entry e = (row in round) · 64 + output adds up that
  // output over the slices.
  ${rounds
    .map((q) => {
      const rs = ms.slice(q * perRound, (q + 1) * perRound);
      return `${rs
        .map(
          (m, i) => `for (var j = 0u; j < 4u; j++) {
    red[${i * WGS * 8}u + lid * 8u + j] = lo${m}acc[j];
    red[${i * WGS * 8}u + lid * 8u + 4u + j] = hi${m}acc[j];
  }`,
        )
        .join('\n  ')}
  workgroupBarrier();
  for (var e = lid; e < ${rs.length * WIDE_GROUPS * 8}u; e += ${WGS}u) {
    let i = e / ${WIDE_GROUPS * 8}u;
    let o = e % ${WIDE_GROUPS * 8}u;
    let row = row0 + ${q * perRound}u + i;
    let n = wid.x * ${WIDE_GROUPS * 8}u + o;
    var sum = 0.0;
    for (var sq = 0u; sq < ${slices}u; sq++) { sum += red[i * ${WGS * 8}u + (sq * ${WIDE_GROUPS}u + o / 8u) * 8u + o % 8u]; }
    if (row < M && n < ${s.N}u) { y[row * ${s.yStride}u + ${s.yOffset}u + h * ${s.yHeadStride}u + n] = sum * ${sc}; }
  }
  workgroupBarrier();`;
    })
    .join('\n  ')}${passThroughWgsl(s, 'row0', mr, WGS)}
}`;
}

/** Threads of the 'staged' kernel, the most rows a workgroup takes, and its k chunk (f16 weights; f32: half). */
const ST_THREADS = 256;
const ST_MAX_ROWS = 32;
const ST_CHUNK_F16 = 128;

/** Outputs per workgroup of the 'staged' kernel: 64 where N has many (absorption, 512), 16 where few (W_UV, 128). */
function stagedTileN(N: number): 16 | 64 {
  return N >= 256 ? 64 : 16;
}

/** Rows a 'staged' workgroup takes for a step: the fewest of 8, 16 and 32 that hold it. */
function stagedTileRows(rows: number): 8 | 16 | 32 {
  return rows <= 8 ? 8 : rows <= 16 ? 16 : ST_MAX_ROWS;
}

/**
 * The 'staged' decode kernel: grid (⌈N / NT⌉, nHeads, ⌈rows / tm⌉), 256 threads. K goes in chunks of KC: each thread
 * loads its share of the chunk's x rows (tm × KC f32) and W tile (KC × NT) into registers with every load in flight at
 * once (16-byte loads), stores them to workgroup memory, and loads the next chunk while this one is multiplied, so a
 * step pays about one memory latency, not one a k. Thread = (k group, row group, output quad): 4 outputs × RPT rows over
 * KC / KGS k of each chunk; the k groups' sums meet once at the end.
 */
function headMatmulStagedWgsl(s: HeadMatmulSpec, w: GpuMatrix, tm: number, storageLimit: number): string {
  const f16 = w.dtype === 'f16';
  const NT = stagedTileN(s.N);
  const CQ = NT / 4;
  const RG = Math.min(tm, 16);
  const RPT = tm / RG;
  const KGS = ST_THREADS / (CQ * RG);
  const redBytes = KGS > 1 ? 16 * (KGS - 1) * CQ * RG * RPT : 0;
  // The chunk: KC k of x (16 B a row per 4 k) and W (2 or 4 B an output), halved until the device's memory holds it.
  let KC = Math.min(f16 ? ST_CHUNK_F16 : ST_CHUNK_F16 / 2, Math.ceil(s.K / (4 * KGS)) * 4 * KGS);
  while (KC > 4 * KGS && tm * KC * 4 + KC * NT * (f16 ? 2 : 4) + redBytes > storageLimit) KC /= 2;
  const KPG = KC / KGS;
  const chunks = Math.ceil(s.K / KC);
  const X4 = KC / 4; // x vec4 a row of a chunk
  // W words a k row of the tile: vec4<u32> of 8 f16, or vec4<f32> of 4 f32.
  const WPR = f16 ? NT / 8 : NT / 4;
  const xSlots = [...Array(Math.ceil((tm * X4) / ST_THREADS)).keys()];
  const wSlots = [...Array(Math.ceil((KC * WPR) / ST_THREADS)).keys()];
  const rs = [...Array(RPT).keys()];
  const sc = wgslF32(s.scale);
  const vecX = s.xStride % 4 === 0 && s.xOffset % 4 === 0 && s.xHeadStride % 4 === 0 && s.K % 4 === 0;
  const xVec = (k: string, base: string) =>
    vecX
      ? `x4[(${base} + ${k}) / 4u]`
      : `vec4<f32>(${[0, 1, 2, 3].map((j) => `select(0.0, x[${base} + min(${k} + ${j}u, ${s.K - 1}u)], ${k} + ${j}u < ${s.K}u)`).join(', ')})`;
  const wWord = f16 ? 'vec4<u32>' : 'vec4<f32>';
  // Register loads of chunk `c` (x rows past M repeat the last row; k and n past the matrix are zero).
  const load = (c: string) => `{
    let kc0 = (${c}) * ${KC}u;
    ${xSlots
      .map(
        (i) => `{
      let e = lid + ${i * ST_THREADS}u;
      let k = kc0 + 4u * (e % ${X4}u);
      let row = min(row0 + min(e / ${X4}u, ${tm - 1}u), mLast);
      let base = row * ${s.xStride}u + ${s.xOffset}u + h * ${s.xHeadStride}u;
      rx${i} = select(vec4<f32>(0.0), ${xVec('k', 'base')}, k < ${s.K}u);
    }`,
      )
      .join('\n    ')}
    ${wSlots
      .map(
        (i) => `{
      let e = lid + ${i * ST_THREADS}u;
      let k = kc0 + e / ${WPR}u;
      let n = n0 + ${f16 ? 8 : 4}u * (e % ${WPR}u);
      rw${i} = ${wWord}(0);
      if (k < ${s.K}u && n < ${s.N}u) { rw${i} = w[(h * ${s.K}u + k) * ${w.stride / (f16 ? 8 : 4)}u + n / ${f16 ? 8 : 4}u]; }
    }`,
      )
      .join('\n    ')}
  }`;
  // Stores the registers to workgroup memory (slots past the chunk's words skip).
  const store = () => `${xSlots
    .map((i) => `${(i + 1) * ST_THREADS > tm * X4 ? `if (lid + ${i * ST_THREADS}u < ${tm * X4}u) ` : ''}{ xs[lid + ${i * ST_THREADS}u] = rx${i}; }`)
    .join('\n    ')}
    ${wSlots
      .map((i) => {
        const guard = (i + 1) * ST_THREADS > KC * WPR ? `if (lid + ${i * ST_THREADS}u < ${KC * WPR}u) ` : '';
        return f16
          ? `${guard}{ ws[2u * (lid + ${i * ST_THREADS}u)] = rw${i}.xy; ws[2u * (lid + ${i * ST_THREADS}u) + 1u] = rw${i}.zw; }`
          : `${guard}{ ws[lid + ${i * ST_THREADS}u] = rw${i}; }`;
      })
      .join('\n    ')}`;
  // 4 outputs (quad cq) of k row kk of the tile: two f16 pairs, or a vec4 of f32.
  const wAt = (kk: string) => (f16 ? `vec4<f32>(unpack2x16float(ws[${kk} * ${CQ}u + cq].x), unpack2x16float(ws[${kk} * ${CQ}u + cq].y))` : `ws[${kk} * ${CQ}u + cq]`);
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> ${vecX ? 'x4: array<vec4<f32>>' : 'x: array<f32>'};
@group(0) @binding(2) var<storage, read> w: array<${wWord}>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
var<workgroup> xs: array<vec4<f32>, ${tm * X4}>;
var<workgroup> ws: array<${f16 ? 'vec2<u32>' : 'vec4<f32>'}, ${KC * CQ}>;
${KGS > 1 ? `var<workgroup> red: array<vec4<f32>, ${(KGS - 1) * CQ * RG * RPT}>;` : ''}

@compute @workgroup_size(${ST_THREADS})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${META_ROWS}];
  let h = wid.y;
  let n0 = wid.x * ${NT}u;
  let row0 = wid.z * ${tm}u;
  let mLast = max(M, 1u) - 1u;
  // Thread = (k group kg, row group rg, output quad cq): quads fastest, so a warp reads one x row and consecutive W.
  let cq = lid % ${CQ}u;
  let rg = (lid / ${CQ}u) % ${RG}u;
  let kg = lid / ${CQ * RG}u;
  ${xSlots.map((i) => `var rx${i}: vec4<f32>;`).join(' ')}
  ${wSlots.map((i) => `var rw${i}: ${wWord};`).join(' ')}
  ${rs.map((r) => `var acc${r} = vec4<f32>(0.0);`).join(' ')}
  ${load('0u')}
  for (var c = 0u; c < ${chunks}u; c++) {
    ${store()}
    workgroupBarrier();
    if (c + 1u < ${chunks}u) ${load('c + 1u')}
    for (var kk = kg * ${KPG}u; kk < kg * ${KPG}u + ${KPG}u; kk += 4u) {
      ${rs.map((r) => `let xv${r} = xs[(rg * ${RPT}u + ${r}u) * ${X4}u + kk / 4u];`).join('\n      ')}
      ${[0, 1, 2, 3]
        .map(
          (j) => `{
        let wv = ${wAt(`(kk + ${j}u)`)};
        ${rs.map((r) => `acc${r} += xv${r}[${j}] * wv;`).join(' ')}
      }`,
        )
        .join('\n      ')}
    }
    workgroupBarrier();
  }
  ${
    KGS > 1
      ? `// K groups 1 … ${KGS - 1} leave their sums; group 0 adds them.
  if (kg > 0u) {
    ${rs.map((r) => `red[((kg - 1u) * ${CQ * RG}u + rg * ${CQ}u + cq) * ${RPT}u + ${r}u] = acc${r};`).join('\n    ')}
  }
  workgroupBarrier();`
      : ''
  }
  if (kg == 0u) {
    ${rs
      .map(
        (r) => `{
      var v = acc${r};
      ${KGS > 1 ? `for (var g = 0u; g < ${KGS - 1}u; g++) { v += red[(g * ${CQ * RG}u + rg * ${CQ}u + cq) * ${RPT}u + ${r}u]; }` : ''}
      let row = row0 + rg * ${RPT}u + ${r}u;
      if (row < M) {
        let yb = row * ${s.yStride}u + ${s.yOffset}u + h * ${s.yHeadStride}u;
        for (var j = 0u; j < 4u; j++) {
          let n = n0 + cq * 4u + j;
          if (n < ${s.N}u) { y[yb + n] = v[j] * ${sc}; }
        }
      }
    }`,
      )
      .join('\n    ')}
  }${passThroughWgsl(s, 'row0', tm, ST_THREADS, vecX ? (i) => `x4[(${i}) / 4u][(${i}) % 4u]` : undefined)}
}`;
}

/** The tiled kernel: grid (⌈N / 64⌉, nHeads, ⌈rows / tm⌉), tm / 4 × 16 threads, each 4 rows × 4 outputs. */
function headMatmulTiledWgsl(s: HeadMatmulSpec, w: GpuMatrix, tm: number): string {
  const T = (tm / 4) * 16;
  const f16 = w.dtype === 'f16';
  const sc = wgslF32(s.scale);
  // W element (k, n) of head h: f16 pairs packed in u32 words, or f32; zero past K and N.
  const wAt = f16
    ? `unpack2x16float(w[(h * ${s.K}u + k) * ${w.stride / 2}u + n / 2u])[n % 2u]`
    : `w[(h * ${s.K}u + k) * ${w.stride}u + n]`;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<${f16 ? 'u32' : 'f32'}>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
var<workgroup> xs: array<f32, ${tm * TILE_K}>;
var<workgroup> ws: array<f32, ${TILE_K * TILE}>;

@compute @workgroup_size(${T})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = stepMeta[${META_ROWS}];
  let n0 = wid.x * ${TILE}u;
  let h = wid.y;
  let m0 = wid.z * ${tm}u;
  let tx = lid % 16u;
  let ty = lid / 16u;
  let mLast = max(M, 1u) - 1u;
  var acc: array<vec4<f32>, 4>;
  for (var k0 = 0u; k0 < ${s.K}u; k0 += ${TILE_K}u) {
    // ${tm} × 16 of x (four values a thread) and 16 × 64 of W.
    for (var e = lid; e < ${tm * TILE_K}u; e += ${T}u) {
      let xr = e / ${TILE_K}u;
      let xk = k0 + e % ${TILE_K}u;
      let row = min(m0 + xr, mLast);
      xs[e] = select(0.0, x[row * ${s.xStride}u + ${s.xOffset}u + h * ${s.xHeadStride}u + xk], xk < ${s.K}u);
    }
    for (var e = lid; e < ${TILE_K * TILE}u; e += ${T}u) {
      let k = k0 + e / ${TILE}u;
      let n = n0 + e % ${TILE}u;
      ws[e] = select(0.0, ${wAt}, k < ${s.K}u && n < ${s.N}u);
    }
    workgroupBarrier();
    for (var kk = 0u; kk < ${TILE_K}u; kk++) {
      let wv = vec4<f32>(ws[kk * ${TILE}u + tx * 4u], ws[kk * ${TILE}u + tx * 4u + 1u], ws[kk * ${TILE}u + tx * 4u + 2u], ws[kk * ${TILE}u + tx * 4u + 3u]);
      for (var i = 0u; i < 4u; i++) { acc[i] += xs[(ty * 4u + i) * ${TILE_K}u + kk] * wv; }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    let row = m0 + ty * 4u + i;
    if (row < M) {
      let yb = row * ${s.yStride}u + ${s.yOffset}u + h * ${s.yHeadStride}u;
      for (var j = 0u; j < 4u; j++) {
        let n = n0 + tx * 4u + j;
        if (n < ${s.N}u) { y[yb + n] = acc[i][j] * ${sc}; }
      }
    }
  }${passThroughWgsl(s, 'm0', tm, T)}
}`;
}

/** Whether the W8A8 head products run on tensor cores here: i8 subgroup matrices with 32-wide subgroups (else dot4). */
export function headW8a8TensorCores(gpu: GpuContext): boolean {
  return hasInt8SubgroupMatrix(gpu) && gpu.subgroupSize === 32;
}

/**
 * What multiplies the head products of decode-sized steps with this kernel on this adapter (RunnerDescription
 * headProducts): the weights' float dtype for the staged and sliced kernels, 'w8a8-sm' on i8 subgroup matrices or
 * 'w8a8-dot4' on dot4I8Packed.
 */
export function headDecodeProducts(gpu: GpuContext, kernel: HeadDecodeKernel, weightDtype: string): string {
  if (kernel !== 'w8a8') return weightDtype;
  return headW8a8TensorCores(gpu) ? 'w8a8-sm' : 'w8a8-dot4';
}

/** One per-head matmul site: weights and bindings fixed, rows chosen per dispatch (read from stepMeta's row count). */
export class HeadMatmul {
  private variants = new Map<number, { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup }>();
  private tiled = new Map<number, { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup }>();
  private staged = new Map<number, { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup }>();
  private w8a8?: HeadW8a8;
  private readonly tiledMinRows: number;
  private readonly kSlices: number;
  private readonly decodeKernel: HeadDecodeKernel;
  private readonly prefillKernel: HeadPrefillKernel;

  constructor(
    private gpu: GpuContext,
    readonly spec: HeadMatmulSpec,
    readonly weight: GpuMatrix,
    private b: { meta: GPUBuffer; x: GPUBuffer; y: GPUBuffer },
    opts: HeadMatmulOptions = {},
  ) {
    this.tiledMinRows = opts.tiledMinRows ?? HEAD_MATMUL_TILED_MIN_ROWS;
    this.kSlices = opts.kSlices ?? WIDE_SLICES;
    this.decodeKernel = opts.decodeKernel ?? 'staged';
    if (!HEAD_DECODE_KERNELS.includes(this.decodeKernel)) throw new Error(`head matmul: decode kernel ${this.decodeKernel}; one of ${HEAD_DECODE_KERNELS.join(', ')}`);
    this.prefillKernel = opts.prefillKernel ?? 'tiled';
    if (!HEAD_PREFILL_KERNELS.includes(this.prefillKernel)) throw new Error(`head matmul: prefill kernel ${this.prefillKernel}; one of ${HEAD_PREFILL_KERNELS.join(', ')}`);
    if (![8, 16, 32].includes(this.kSlices)) throw new Error(`head matmul: kSlices ${this.kSlices}; 8, 16 or 32`);
    if (weight.rows !== spec.nHeads * spec.K || weight.cols !== spec.N) {
      throw new Error(`${weight.label}: per-head weights are [${weight.rows}, ${weight.cols}], expected [${spec.nHeads}·${spec.K}, ${spec.N}]`);
    }
  }

  /** A pipeline (labelled by shape, not by layer: every layer's site shares it) bound to this site's buffers. */
  private bind(label: string, code: string): { pipeline: GPUComputePipeline; bindGroup: GPUBindGroup } {
    const pipeline = this.gpu.pipeline(label, code);
    return { pipeline, bindGroup: bindBuffers(this.gpu, pipeline, this.weight.label, [this.b.meta, this.b.x, this.weight.pieces[0].buffer, this.b.y]) };
  }

  /**
   * The site's W8A8 products, built on first use: input scratch for W8A8_HEAD_MAX_ROWS rows, or with the W8A8 prefill
   * kernel for every row the x buffer holds (one instance serves both).
   */
  private w8a8Products(): HeadW8a8 {
    // Rows whose inputs (up to the last head's K values and pass-through columns) lie inside the x buffer.
    const { xOffset, xStride, xHeadStride, nHeads, K, passCols } = this.spec;
    const rowExtent = xOffset + (nHeads - 1) * xHeadStride + K + (passCols ?? 0);
    const capacity = Math.floor((this.b.x.size / 4 - rowExtent) / xStride) + 1;
    const maxRows = this.prefillKernel === 'w8a8' ? Math.max(W8A8_HEAD_MAX_ROWS, capacity) : W8A8_HEAD_MAX_ROWS;
    return (this.w8a8 ??= new HeadW8a8(this.gpu, this.spec, this.weight, this.b, maxRows, headW8a8TensorCores(this.gpu)));
  }

  encode(pass: GPUComputePassEncoder, rows: number): void {
    if (rows <= 0) return;
    if (rows >= this.tiledMinRows && this.prefillKernel === 'w8a8') {
      this.w8a8Products().encode(pass, rows);
      return;
    }
    if (rows >= this.tiledMinRows) {
      const tm = headTileRows(rows);
      let t = this.tiled.get(tm);
      if (!t) {
        t = this.bind(`mla head-matmul ${this.spec.nHeads}×[${this.spec.K}→${this.spec.N}] ${this.weight.dtype} tiled ${tm}`, headMatmulTiledWgsl(this.spec, this.weight, tm));
        this.tiled.set(tm, t);
      }
      pass.setPipeline(t.pipeline);
      pass.setBindGroup(0, t.bindGroup);
      pass.dispatchWorkgroups(Math.ceil(this.spec.N / TILE), this.spec.nHeads, Math.ceil(rows / tm));
      return;
    }
    if (this.decodeKernel === 'w8a8' && rows <= W8A8_HEAD_MAX_ROWS) {
      this.w8a8Products().encode(pass, rows);
      return;
    }
    if (this.decodeKernel === 'staged' || this.decodeKernel === 'w8a8') {
      const tm = stagedTileRows(rows);
      let k = this.staged.get(tm);
      if (!k) {
        const { nHeads, K, N } = this.spec;
        k = this.bind(`mla head-matmul ${nHeads}×[${K}→${N}] ${this.weight.dtype} staged r${tm}`, headMatmulStagedWgsl(this.spec, this.weight, tm, this.gpu.limits.maxComputeWorkgroupStorageSize));
        this.staged.set(tm, k);
      }
      pass.setPipeline(k.pipeline);
      pass.setBindGroup(0, k.bindGroup);
      pass.dispatchWorkgroups(Math.ceil(this.spec.N / stagedTileN(this.spec.N)), this.spec.nHeads, Math.ceil(rows / tm));
      return;
    }
    let mr = 1;
    while (mr < rows && mr < MAX_ROWS_PER_THREAD) mr *= 2;
    let v = this.variants.get(mr);
    if (!v) {
      const { nHeads, K, N } = this.spec;
      v = this.bind(`mla head-matmul ${nHeads}×[${K}→${N}] ${this.weight.dtype} mr${mr} s${this.kSlices}`, headMatmulWgsl(this.spec, this.weight, mr, this.kSlices));
      this.variants.set(mr, v);
    }
    pass.setPipeline(v.pipeline);
    pass.setBindGroup(0, v.bindGroup);
    pass.dispatchWorkgroups(Math.ceil(this.spec.N / (8 * WIDE_GROUPS)), this.spec.nHeads, Math.ceil(rows / mr));
  }
}

// Absorbed MLA decode attention over the int8 latent cache with int8 score and value products on subgroup matrices
// (tensor cores), or the same integer arithmetic with dot4I8Packed where the adapter has none (tests, SwiftShader).
import type { GpuContext } from './device.ts';
import { hasInt8SubgroupMatrix } from './matmul-int8.ts';
import type { MlaInt8RowFormat } from './mla-kv-int8.ts';
import { cacheRowWgsl, metaWgsl, META_MAX_CHUNKS, CHUNK_START_WGSL } from './step-meta.ts';

/**
 * The arithmetic, per split of a row's context, in windows of `window` tokens:
 *  1. q̃ (latent part) and q_pe of each head are quantized to int8 with one scale each (absmax / 127).
 *  2. score(h, t) = Σ q̃q·cq · sq̃ · sc_t + Σ q_peq·k_peq · sq_pe · spe_t  (exact i32 sums, then f32).
 *  3. Online softmax over the window in f32: m, l, α as the f32 kernel keeps them; p_t = exp(s − m).
 *  4. p′_t = p_t · sc_t (c's per-token scale folded into the weight) is quantized per head per window to int8 with
 *     scale ps = max p′ / 127, and O_window = Σ_t p′q_t · cq_t is an exact i32 product.
 *  5. o = o · α + f32(O_window) · ps in f32; the split's (m, l, o) go to the same partials the f32 kernel writes.
 * The tensor-core and the dot4 form compute identical integers, so they differ only where f32 sums are reordered.
 */
export interface MlaTcPlan {
  /** Heads padded to whole 16-row tiles, and the tile count. */
  headsPadded: number;
  headTiles: number;
  /** Latent and rope parts padded to whole 32-value K steps; bytes of one staged token row. */
  latentPad: number;
  ropePad: number;
  rowPad: number;
  /** 16-column tiles of the latent output per head tile. */
  latentTiles: number;
  /** Subgroups (groups of 32 threads) per workgroup, and output tiles each owns. */
  groups: number;
  tilesPerGroup: number;
  /** Tokens per softmax window (a multiple of 32). */
  window: number;
  workgroupBytes: number;
}

const pad = (n: number, m: number) => Math.ceil(n / m) * m;

/** The plan for a shape, or why the int8-product kernel does not take it. */
export function planMlaTc(nHeads: number, f: MlaInt8RowFormat, window = 64): MlaTcPlan | string {
  if (!(window >= 32) || window % 32 !== 0) return `window ${window}: a multiple of 32 tokens`;
  if (nHeads > 32) return `${nHeads} heads: the int8-product kernel holds at most 32 heads per workgroup`;
  const headTiles = Math.ceil(nHeads / 16);
  const latentPad = pad(f.kvLoraRank, 32);
  const ropePad = pad(f.qkRopeHeadDim, 32);
  const rowPad = latentPad + ropePad;
  const latentTiles = latentPad / 16;
  const tiles = headTiles * latentTiles;
  let groups = 8;
  while (tiles % groups !== 0) groups /= 2;
  const tilesPerGroup = tiles / groups;
  if (tilesPerGroup > 16) return `${tiles} output tiles over ${groups} subgroups: more than 16 accumulators each`;
  const HP = headTiles * 16;
  const stg = Math.max(groups * Math.ceil((headTiles * 2) / groups) * 512, groups * 256);
  const workgroupBytes = 32 * rowPad + 4 * stg + 4 * HP * window + HP * window + 8 * window + 4 * window + 16 * HP + 16;
  return { headsPadded: HP, headTiles, latentPad, ropePad, rowPad, latentTiles, groups, tilesPerGroup, window, workgroupBytes };
}

/** Whether this adapter runs the products on tensor cores (i8 16×16×32 and 32-wide subgroups). */
export function mlaTcOnTensorCores(gpu: GpuContext): boolean {
  return hasInt8SubgroupMatrix(gpu) && gpu.subgroupSize === 32;
}

/**
 * Where word w (bytes 4w … 4w + 3 of [q̃ | pad | q_pe | pad]) of row r's head h lies in qq: in tiles of 512 bytes, one
 * per (row, 16-head tile, 32-byte K step), each 16 heads × 32 bytes (a head's 32 K values contiguous). A tile is then
 * the right operand [32 K × 16 heads] column-major with stride 32, the very load the tensor-core GEMMs make of their
 * K-major weight tiles (verified on the H200), rather than a strided read across whole 576-byte query rows.
 */
export function qqWordWgsl(p: MlaTcPlan): string {
  return `fn qqWord(r: u32, h: u32, w: u32) -> u32 {
  return ((r * ${p.headTiles}u + h / 16u) * ${p.rowPad / 32}u + w / 8u) * 128u + (h % 16u) * 8u + w % 8u;
}`;
}

/**
 * Query quantization: one workgroup per (head slot, row). qLatent[r, h, 0..R+r) f32 → row r's head h in qq as rowPad
 * int8 bytes ([q̃ | pad | q_pe | pad], four per i32, tiled: qqWordWgsl) and qs[r, hp] = (scale of q̃, scale of q_pe);
 * padded heads are zero.
 */
export function mlaTcQueryWgsl(nHeads: number, f: MlaInt8RowFormat, p: MlaTcPlan): string {
  const R = f.kvLoraRank;
  const r = f.qkRopeHeadDim;
  const RV = R + r;
  const words = p.rowPad / 4;
  return /* wgsl */ `
@group(0) @binding(0) var<storage, read> qLatent: array<f32>;
@group(0) @binding(1) var<storage, read_write> qq: array<i32>;
@group(0) @binding(2) var<storage, read_write> qs: array<f32>;
var<workgroup> red: array<vec2<u32>, 64>;
${qqWordWgsl(p)}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let h = wid.x;
  let row = wid.y;
  let live = h < ${nHeads}u;
  let qb = (row * ${nHeads}u + min(h, ${nHeads - 1}u)) * ${RV}u;
  // |x| as bits: non-negative floats order like their u32 patterns, and NaN / Inf sort above every finite value, so a
  // non-finite query value gives its part a NaN or Inf scale (scores NaN, as with f32 products) instead of being dropped
  // by a float max.
  var a = vec2<u32>(0u);
  for (var k = lid; k < ${RV}u; k += 64u) {
    let v = bitcast<u32>(qLatent[qb + k]) & 0x7fffffffu;
    if (k < ${R}u) { a.x = max(a.x, v); } else { a.y = max(a.y, v); }
  }
  red[lid] = a;
  workgroupBarrier();
  for (var s = 32u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
    workgroupBarrier();
  }
  let absMax = select(vec2<f32>(0.0), bitcast<vec2<f32>>(red[0]), live);
  let inv = select(vec2<f32>(0.0), 127.0 / absMax, absMax > vec2<f32>(0.0));
  for (var w = lid; w < ${words}u; w += 64u) {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
      let b = 4u * w + i;
      if (live && b < ${R}u) { v[i] = qLatent[qb + b] * inv.x; }
      if (live && b >= ${p.latentPad}u && b - ${p.latentPad}u < ${r}u) { v[i] = qLatent[qb + ${R}u + b - ${p.latentPad}u] * inv.y; }
    }
    qq[qqWord(row, h, w)] = bitcast<i32>(pack4xI8(vec4<i32>(clamp(round(v), vec4<f32>(-127.0), vec4<f32>(127.0)))));
  }
  if (lid == 0u) {
    qs[2u * (row * ${p.headsPadded}u + h)] = absMax.x / 127.0;
    qs[2u * (row * ${p.headsPadded}u + h) + 1u] = absMax.y / 127.0;
  }
}
`;
}

const NEG_BIG = '-3.0e38';

/** Which products of the int8-product kernel run on subgroup matrices (the rest in the dot4I8Packed form). */
export interface MlaTcProducts {
  /** q̃q·cq and q_peq·k_peq (phase A). */
  scores: boolean;
  /** p′q·cq and the fold into f32 (phase B). */
  values: boolean;
  /**
   * Diagnosis only: no value products and no fold (the outputs stay zero), so the split partials' m and l — which
   * depend on the scores alone — show whether the score phase is right without phase B's registers around it.
   */
  skipValues?: boolean;
  /**
   * Diagnosis only: workgroup (chunk 0, row 0) also writes, to binding 5, what its first window's score phase saw and
   * made (mlaTcDumpLayout): the staged cache rows of sub-tile 0, row 0's quantized query, the score tiles (tensor-core
   * scores), and the window's f32 scores — so a host can tell a wrong input from a wrong product.
   */
  debug?: boolean;
}

/** Word offsets of the debug dump (MlaTcProducts.debug) and its size. */
export function mlaTcDumpLayout(p: MlaTcPlan): { ct: number; qq: number; tiles: number; sc: number; words: number } {
  const rowWords = p.rowPad / 4;
  const ct = 0;
  const qq = ct + 32 * rowWords;
  const tiles = qq + p.headsPadded * rowWords;
  const sc = tiles + p.headTiles * 2 * 512;
  return { ct, qq, tiles, sc, words: sc + p.headsPadded * p.window };
}

/**
 * The split kernel: grid (splits, 1, rows), `groups` × 32 threads. `products` picks, for the scores and for the values,
 * subgroup-matrix products (needs hardware subgroups of 32) or the dot4I8Packed form of the same integers: tensor
 * cores for one phase only tells which phase goes wrong where the two forms disagree.
 */
export function mlaTcPartialWgsl(nHeads: number, f: MlaInt8RowFormat, blockSize: number, p: MlaTcPlan, products: MlaTcProducts): string {
  const tensorCores = products.scores || products.values;
  const skipB = products.skipValues === true;
  const dump = products.debug ? mlaTcDumpLayout(p) : undefined;
  const R = f.kvLoraRank;
  const HP = p.headsPadded;
  const W = p.window;
  const G = p.groups;
  const WG = G * 32;
  const ROWW = p.rowPad / 4;
  const LW = p.latentPad / 4;
  const KPG = p.tilesPerGroup;
  const NT = p.latentTiles;
  const aTiles = p.headTiles * 2;
  const aPerGroup = Math.ceil(aTiles / G);
  const stg = Math.max(G * aPerGroup * 512, G * 256);
  const ks = [...Array(KPG).keys()];
  const left = 'subgroup_matrix_left<i8, 32, 16>';
  const right = 'subgroup_matrix_right<i8, 16, 32>';
  const result = 'subgroup_matrix_result<i32, 16, 16>';
  // Softmax threads: TPH a head, TPT tokens each (whole i32 words of p′).
  const TPH = WG / HP;
  const TPT = W / TPH;
  if (!Number.isInteger(TPH) || TPT % 4 !== 0) throw new Error(`MLA int8-product softmax: ${WG} threads over ${HP} heads × ${W} tokens do not split into whole words`);
  const byte = (arr: string, i: string) => `unpack4xI8(u32(${arr}[(${i}) / 4u]))[(${i}) % 4u]`;

  // Phase A: the score tiles (head tile, 16-token half) of a 32-token sub-tile, transposed (token rows, head columns), as
  // i32 in stg[a·512 ..] (latent) and stg[a·512 + 256 ..] (rope), row-major 16 × 16. The token rows are the left operand
  // (row-major from workgroup memory, as phase B's p′) and the query heads the right one: 512-byte tiles read
  // column-major with stride 32 from storage, exactly the GEMMs' weight loads (qqWordWgsl). The untransposed form read
  // the cache tile as a column-major right operand from workgroup memory and came out wrong on the H200 (bench:attention,
  // tc-scores vs dot4: 1.2); so did this one while it read the query column-major with stride 576 across whole query
  // rows, although that load alone, in a probe kernel with less workgroup memory, was right (bench/probe-device.ts).
  // Every subgroup runs the same number of tile products (a subgroup whose index passes the tile count recomputes one
  // into a spare region): no subgroup-matrix call sits in a branch that splits the workgroup — the kernels verified on
  // the H200 only ever call them in workgroup-uniform control flow. Tile a's result lands in region a either way.
  // The products are unrolled here (no runtime loop around subgroup-matrix calls, accumulators declared once at function
  // scope), the shape of phase B, which agrees with the dot4 form on the H200; the looped form of phase A did not.
  const phaseA = products.scores
    ? [...Array(aPerGroup).keys()]
        .map((k) => {
          const region = `(g + ${k * G}u)`;
          const prologue = `{
        let a = ${region} % ${aTiles}u;
        let lBase = (a % 2u) * ${16 * p.rowPad}u;
        let qBase = qByte + (a / 2u) * ${(p.rowPad / 32) * 512}u;
        accL = ${result}();
        accP = ${result}();`;
          const step = (acc: string, off: number) =>
            `        ${acc} = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<${left}>(&ct, lBase + ${off}u, false, ${p.rowPad}u), subgroupMatrixLoad<${right}>(&qq, qBase + ${(off / 32) * 512}u, true, 32u), ${acc});`;
          const lat = [...Array(p.latentPad / 32).keys()].map((kk) => step('accL', kk * 32));
          const rope = [...Array(p.ropePad / 32).keys()].map((kk) => step('accP', p.latentPad + kk * 32));
          return [prologue, ...lat, ...rope, `        subgroupMatrixStore(&stg, ${region} * 512u, accL, false, 16u);`, `        subgroupMatrixStore(&stg, ${region} * 512u + 256u, accP, false, 16u);`, '      }'].join('\n');
        })
        .join('\n      ')
    : '';
  const scoreInts = products.scores
    ? `let a = (h / 16u) * 2u + t / 16u;
        let e = (t % 16u) * 16u + h % 16u;
        let sL = stg[a * 512u + e];
        let sP = stg[a * 512u + 256u + e];`
    : `var sL = 0i;
        var sP = 0i;
        for (var w = 0u; w < ${LW}u; w++) { sL += dot4I8Packed(u32(qq[qqWord(r, h, w)]), u32(ct[t * ${ROWW}u + w])); }
        for (var w = ${LW}u; w < ${ROWW}u; w++) { sP += dot4I8Packed(u32(qq[qqWord(r, h, w)]), u32(ct[t * ${ROWW}u + w])); }`;

  // Phase B: each group's output tiles T = g + k·G (head tile T / NT, latent tile T % NT) accumulate Σ_t p′q · cq.
  const phaseB = products.values
    ? ks
        .map(
          (k) => `{
        let T = g + ${k * G}u;
        let l = subgroupMatrixLoad<${left}>(&pq, (T / ${NT}u) * ${16 * W}u + s * 32u, false, ${W}u);
        let rt = subgroupMatrixLoad<${right}>(&ct, (T % ${NT}u) * 16u, false, ${p.rowPad}u);
        acc${k} = subgroupMatrixMultiplyAccumulate(l, rt, acc${k});
      }`,
        )
        .join('\n      ')
    : `for (var k = 0u; k < ${KPG}u; k++) {
        let T = g + k * ${G}u;
        for (var i = 0u; i < 8u; i++) {
          let e = lane * 8u + i;
          let h = (T / ${NT}u) * 16u + e / 16u;
          let j = (T % ${NT}u) * 16u + e % 16u;
          var sum = 0i;
          for (var t = 0u; t < 32u; t++) { sum += ${byte('pq', `h * ${W}u + s * 32u + t`)} * ${byte('ct', `t * ${p.rowPad}u + j`)}; }
          oi[k * 8u + i] += sum;
        }
      }`;
  // Fold the window's integers into the f32 outputs: o = o · α + f32(O) · ps (element e = lane·8 + i of each tile).
  const fold = products.values
    ? ks
        .map(
          (k) => `subgroupMatrixStore(&stg, g * 256u, acc${k}, false, 16u);
    workgroupBarrier();
    for (var i = 0u; i < 8u; i++) {
      let e = lane * 8u + i;
      let h = ((g + ${k * G}u) / ${NT}u) * 16u + e / 16u;
      o[${k * 8}u + i] = o[${k * 8}u + i] * alpha[h] + f32(stg[g * 256u + e]) * pscale[h];
    }
    workgroupBarrier();`,
        )
        .join('\n    ')
    : `for (var k = 0u; k < ${KPG}u; k++) {
      for (var i = 0u; i < 8u; i++) {
        let e = lane * 8u + i;
        let h = ((g + k * ${G}u) / ${NT}u) * 16u + e / 16u;
        o[k * 8u + i] = o[k * 8u + i] * alpha[h] + f32(oi[k * 8u + i]) * pscale[h];
      }
    }`;

  const phaseBWgsl = `// Phase B: O = Σ_t p′q_t · cq_t over the window's sub-tiles.
    ${products.values ? ks.map((k) => `var acc${k} = ${result}();`).join('\n    ') : `for (var k = 0u; k < ${KPG * 8}u; k++) { oi[k] = 0i; }`}
    for (var s = 0u; s < subs; s++) {
      ${stageWgsl(f, p, WG)}
      workgroupBarrier();
      ${phaseB}
      workgroupBarrier();
    }
    ${fold}`;

  return /* wgsl */ `${tensorCores ? 'enable chromium_experimental_subgroup_matrix;\ndiagnostic(off, chromium_experimental.subgroup_matrix_uniformity);' : ''}
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> qq: array<i32>;
@group(0) @binding(2) var<storage, read> qs: array<f32>;
@group(0) @binding(3) var<storage, read> cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
${dump ? '@group(0) @binding(5) var<storage, read_write> dbg: array<i32>;' : ''}
${cacheRowWgsl(blockSize)}
${qqWordWgsl(p)}
${stagedRowFnsWgsl(f, p)}
var<workgroup> ct: array<i32, ${32 * ROWW}>;
var<workgroup> stg: array<i32, ${stg}>;
${windowStateWgsl(W, HP, 'i32')}

fn putRed(i: u32, v: vec2<f32>) {
  stg[2u * i] = bitcast<i32>(v.x);
  stg[2u * i + 1u] = bitcast<i32>(v.y);
}
fn getRed(i: u32) -> vec2<f32> {
  return vec2<f32>(bitcast<f32>(stg[2u * i]), bitcast<f32>(stg[2u * i + 1u]));
}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, ${tensorCores ? '@builtin(subgroup_id) sgId: u32, ' : ''}@builtin(workgroup_id) wid: vec3<u32>) {
  let c = wid.x;
  let r = wid.z;
  ${CHUNK_START_WGSL}
  let g = ${tensorCores ? 'sgId' : 'lid / 32u'};
  let lane = lid % 32u;
  let qByte = r * ${HP * p.rowPad}u;
  if (lid < ${HP}u) {
    mRun[lid] = ${NEG_BIG};
    lRun[lid] = 0.0;
  }
  var o: array<f32, ${KPG * 8}>;
  ${products.scores ? `var accL: ${result};\n  var accP: ${result};` : ''}
  ${products.values || skipB ? '' : `var oi: array<i32, ${KPG * 8}>;`}

  for (var w0 = bnd.x; w0 < bnd.y; w0 += ${W}u) {
    let n = min(${W}u, bnd.y - w0);
    let subs = (n + 31u) / 32u;
    for (var j = lid; j < ${W}u; j += ${WG}u) {
      let row = cacheRow(bt, w0 + min(j, n - 1u));
      tokRow[j] = row;
      tokScale[j] = select(vec2<f32>(0.0), tokenScales(row * ${f.rowWords}u), j < n);
    }
    workgroupBarrier();

    // Phase A: scores of the window, 32 tokens at a time.
    for (var s = 0u; s < subs; s++) {
      ${stageWgsl(f, p, WG)}
      workgroupBarrier();
      ${phaseA}
      workgroupBarrier();
      ${
        dump
          ? `if (c == 0u && r == 0u && w0 == bnd.x && s == 0u) {
        for (var i = lid; i < ${32 * ROWW}u; i += ${WG}u) { dbg[${dump.ct}u + i] = ct[i]; }
        for (var i = lid; i < ${HP * ROWW}u; i += ${WG}u) { dbg[${dump.qq}u + i] = qq[qqWord(0u, i / ${ROWW}u, i % ${ROWW}u)]; }
        for (var i = lid; i < ${aTiles * 512}u; i += ${WG}u) { dbg[${dump.tiles}u + i] = stg[i]; }
      }`
          : ''
      }
      for (var idx = lid; idx < ${HP * 32}u; idx += ${WG}u) {
        let h = idx / 32u;
        let t = idx % 32u;
        ${scoreInts}
        let tw = s * 32u + t;
        let sq = vec2<f32>(qs[2u * (r * ${HP}u + h)], qs[2u * (r * ${HP}u + h) + 1u]);
        let ts = tokScale[tw];
        sc[h * ${W}u + tw] = select(${NEG_BIG}, f32(sL) * sq.x * ts.x + f32(sP) * sq.y * ts.y, tw < n);
      }
      workgroupBarrier();
    }
    ${dump ? `if (c == 0u && r == 0u && w0 == bnd.x) { for (var i = lid; i < ${HP * W}u; i += ${WG}u) { dbg[${dump.sc}u + i] = bitcast<i32>(sc[i]); } }` : ''}

    // Softmax over the window per head, ${TPH} threads a head and ${TPT} tokens each (tree reductions in stg, free between
    // the phases: f32 pairs as bits); p′ = p · sc_t quantized per head.
    ${windowSoftmaxWgsl({
      W,
      TPH,
      TPT,
      h: `lid / ${TPH}u`,
      live: 'true',
      put: (i, v) => `putRed(${i}, ${v});`,
      get: (i) => `getRed(${i})`,
      pqWord: (v) => `bitcast<i32>(${v})`,
    })}
    workgroupBarrier();

    ${skipB ? '// Phase B skipped (diagnosis: m and l only).' : phaseBWgsl}
  }

  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  for (var k = 0u; k < ${KPG}u; k++) {
    for (var i = 0u; i < 8u; i++) {
      let T = g + k * ${G}u;
      let e = lane * 8u + i;
      let h = (T / ${NT}u) * 16u + e / 16u;
      let j = (T % ${NT}u) * 16u + e % 16u;
      if (h < ${nHeads}u && j < ${R}u) {
        partials[((r * ${nHeads}u + h) * maxChunks + c) * ${R + 2}u + 2u + j] = o[k * 8u + i];
      }
    }
  }
  if (lid < ${nHeads}u) {
    let base = ((r * ${nHeads}u + lid) * maxChunks + c) * ${R + 2}u;
    partials[base] = mRun[lid];
    partials[base + 1u] = lRun[lid];
  }
}
`;
}

/**
 * WGSL `fn stagedWord(rb: u32, w: u32) -> u32` and `fn tokenScales(rb: u32) -> vec2<f32>` of the int8-product kernels:
 * word w of a staged row [c | 0 | k_pe | 0] (rowPad bytes) of the cache row at word rb, and that row's two scales (c's,
 * k_pe's). Needs `cache: array<u32>`.
 */
export function stagedRowFnsWgsl(f: MlaInt8RowFormat, p: MlaTcPlan): string {
  const LW = p.latentPad / 4;
  return `fn stagedWord(rb: u32, w: u32) -> u32 {
  if (w < ${LW}u) {
    if (w < ${f.latentWords}u) { return cache[rb + w]; }
    return 0u;
  }
  if (w - ${LW}u < ${f.ropeWords}u) { return cache[rb + ${f.ropeWord}u + w - ${LW}u]; }
  return 0u;
}
fn tokenScales(rb: u32) -> vec2<f32> {
  return vec2<f32>(bitcast<f32>(cache[rb + ${f.scaleWord}u]), bitcast<f32>(cache[rb + ${f.scaleWord + 1}u]));
}`;
}

/**
 * Stages `tokens` rows (window tokens first … first + tokens − 1, their cache rows in tokRow) as [c | 0 | k_pe | 0] rows of
 * rowPad bytes (stagedWord); rows past n are zero. `store(v)` writes word v of staged row t, word w.
 */
export function stageRowsWgsl(f: MlaInt8RowFormat, p: MlaTcPlan, WG: number, tokens: number, first: string, store: (v: string) => string): string {
  const ROWW = p.rowPad / 4;
  return `for (var idx = lid; idx < ${tokens * ROWW}u; idx += ${WG}u) {
        let t = idx / ${ROWW}u;
        let w = idx % ${ROWW}u;
        let tw = ${first} + t;
        var v = 0u;
        if (tw < n) { v = stagedWord(tokRow[tw] * ${f.rowWords}u, w); }
        ${store('v')}
      }`;
}

/**
 * The workgroup state windowSoftmaxWgsl works on, for `heads` heads and windows of W tokens: scores sc (unless
 * `scores` is false: a kernel that keeps them in registers), packed p′ (pq,
 * of `pqType` words), the window's cache rows and scales, the running m, l, α and p′ scale per head, and the split's
 * bounds.
 */
export function windowStateWgsl(W: number, heads: number, pqType: 'i32' | 'u32', scores = true): string {
  return `${scores ? `var<workgroup> sc: array<f32, ${heads * W}>;` : ''}
var<workgroup> pq: array<${pqType}, ${(heads * W) / 4}>;
var<workgroup> tokScale: array<vec2<f32>, ${W}>;
var<workgroup> tokRow: array<u32, ${W}>;
var<workgroup> mRun: array<f32, ${heads}>;
var<workgroup> lRun: array<f32, ${heads}>;
var<workgroup> alpha: array<f32, ${heads}>;
var<workgroup> pscale: array<f32, ${heads}>;
var<workgroup> bounds: vec2<u32>;`;
}

/**
 * The online softmax of one window, shared by the int8-product kernels: TPH threads a head (head h, `live` whether it
 * is one of the workgroup's), TPT tokens each, scores in sc[h · W + t]; tree reductions through put / get (vec2<f32>
 * slots, one a thread); writes alpha, pscale, mRun, lRun and the head's p′ bytes to pq (pqWord wraps the packed u32).
 * A non-finite score (a NaN or Inf cache or query scale) poisons the head: float max and exp need not carry NaN
 * (SwiftShader's max drops it and its exp(NaN) is +Inf), so it is found from the bits and l set to NaN.
 */
export function windowSoftmaxWgsl(o: {
  W: number;
  TPH: number;
  TPT: number;
  h: string;
  live: string;
  put: (i: string, v: string) => string;
  get: (i: string) => string;
  pqWord: (v: string) => string;
}): string {
  const { W, TPH, TPT } = o;
  return `{
      let h = ${o.h};
      let live = ${o.live};
      let sub = lid % ${TPH}u;
      let first = lid - sub;
      let t0 = sub * ${TPT}u;
      var mx = ${NEG_BIG};
      var bad = 0.0;
      for (var i = 0u; i < ${TPT}u; i++) {
        if (t0 + i < n) {
          let s = sc[h * ${W}u + t0 + i];
          mx = max(mx, s);
          bad = select(bad, 1.0, (bitcast<u32>(s) & 0x7f800000u) == 0x7f800000u);
        }
      }
      ${o.put('lid', 'vec2<f32>(mx, bad)')}
      workgroupBarrier();
      for (var st = ${TPH / 2}u; st > 0u; st >>= 1u) {
        if (sub < st) { ${o.put('lid', `max(${o.get('lid')}, ${o.get('lid + st')})`)} }
        workgroupBarrier();
      }
      let mOld = mRun[h];
      let mNew = max(mOld, ${o.get('first')}.x);
      let poisoned = ${o.get('first')}.y > 0.0;
      var pp: array<f32, ${TPT}>;
      var l = 0.0;
      var pmax = 0.0;
      for (var i = 0u; i < ${TPT}u; i++) {
        pp[i] = 0.0;
        let t = t0 + i;
        if (t < n) {
          let pt = exp(sc[h * ${W}u + t] - mNew);
          l += pt;
          pp[i] = pt * tokScale[t].x;
          pmax = max(pmax, pp[i]);
        }
      }
      workgroupBarrier();
      ${o.put('lid', 'vec2<f32>(l, pmax)')}
      workgroupBarrier();
      for (var st = ${TPH / 2}u; st > 0u; st >>= 1u) {
        if (sub < st) {
          let u = ${o.get('lid')};
          let w = ${o.get('lid + st')};
          ${o.put('lid', 'vec2<f32>(u.x + w.x, max(u.y, w.y))')}
        }
        workgroupBarrier();
      }
      let tot = ${o.get('first')};
      if (live && sub == 0u) {
        let al = exp(mOld - mNew);
        alpha[h] = al;
        let lNew = lRun[h] * al + tot.x;
        lRun[h] = select(lNew, bitcast<f32>(bitcast<u32>(lNew) | 0x7fc00000u), poisoned);
        mRun[h] = mNew;
        pscale[h] = tot.y / 127.0;
      }
      let inv = select(0.0, 127.0 / tot.y, tot.y > 0.0);
      if (live) {
        for (var q = 0u; q < ${TPT / 4}u; q++) {
          let v = vec4<f32>(pp[4u * q], pp[4u * q + 1u], pp[4u * q + 2u], pp[4u * q + 3u]) * inv;
          pq[h * ${W / 4}u + t0 / 4u + q] = ${o.pqWord('pack4xI8(vec4<i32>(clamp(round(v), vec4<f32>(-127.0), vec4<f32>(127.0))))')};
        }
      }
    }`;
}

/** Stages sub-tile s (32 tokens) into ct, row after row. */
function stageWgsl(f: MlaInt8RowFormat, p: MlaTcPlan, WG: number): string {
  return stageRowsWgsl(f, p, WG, 32, 's * 32u', (v) => `ct[idx] = bitcast<i32>(${v});`);
}

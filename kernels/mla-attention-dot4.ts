// Absorbed MLA decode attention over the int8 latent cache with both products as int8 dot products (dot4I8Packed),
// laid out for speed: the arithmetic of kernels/mla-attention-tc.ts (same integers, same windows), without its tiles.
import type { MlaInt8RowFormat } from './mla-kv-int8.ts';
import { NEG_BIG } from './split-merge.ts';
import { qqWordWgsl, stagedRowFnsWgsl, stageRowsWgsl, windowSoftmaxWgsl, windowStateWgsl, type MlaTcPlan } from './mla-attention-tc.ts';
import { cacheRowWgsl, metaWgsl, META_MAX_CHUNKS, CHUNK_START_WGSL } from './step-meta.ts';

/**
 * Why int8 dot products: the f32 kernel over the int8 cache is bound by f32 arithmetic (~13 TFLOP/s of the H200's 67
 * at 32 × 4K), and each dot4I8Packed is 4 multiply-adds (120 TOPS measured in registers, bench/probe-rates.ts), on
 * values the cache already stores as packed int8 — the f32 kernel unpacks and scales every one of them first.
 *
 * One workgroup of 256 threads per (row, chunk), all heads; the chunk in windows of W tokens (a multiple of 32):
 *  stage:   the window's rows [c | k_pe] into workgroup memory, a row every S4 vec4 (S4 odd: the score phase's 16-byte
 *           loads of 32 tokens at one offset fall in distinct banks); with `prefetch`, from registers loaded while the
 *           previous window was computed (the next window's loads go out right after), so the cache's latency hides
 *           behind the products instead of sitting between two barriers;
 *  scores:  thread = (head quad, token): 4 heads × W/32 tokens of i32 sums, latent and rope apart (their scales
 *           differ); a warp is one head quad, so its query loads are uniform (workgroup memory or L1);
 *  softmax: 8 threads a head, online over the window as in the tc kernel; p′ = p · sc_t quantized per head;
 *  values:  thread = (latent word, head part): the 4 values of one cache word for HPT heads; four tokens' words are
 *           transposed in registers into one word per value (4 tokens each), so Σ_t p′_t · c_t is a dot4 of p′'s word
 *           (4 tokens) with it; i32 sums over the window, then o = o · α + f32(O) · ps.
 */
export interface MlaDot4Plan {
  window: number;
  /** Workgroups per (row, chunk) along heads, and heads in each (the last may hold fewer). */
  headSplits: number;
  headsPerWorkgroup: number;
  /** Head quads of the score phase (one warp each) and tokens per score thread. */
  headQuads: number;
  tokensPerScoreThread: number;
  /** Words of a staged row (latent part padded, then rope padded) and of its latent part. */
  rowWords: number;
  latentWords: number;
  /** vec4 slots per staged row in workgroup memory. */
  rowStride4: number;
  /** Value phase: threads per head part (one per latent word), parts, heads per thread. */
  valueWords: number;
  valueParts: number;
  headsPerValueThread: number;
  /** Whether the quantized query is staged in workgroup memory (else read from storage, L1-cached). */
  queryStaged: boolean;
  /**
   * Whether the next window's cache rows and scales are loaded into registers while this window is computed (each
   * thread holds prefetchWords words), instead of staged by a loop of dependent loads between two barriers.
   */
  prefetch: boolean;
  prefetchWords: number;
  /**
   * The window's softmax: 'workgroup' (scores through workgroup memory, 8 threads a head, tree reductions: 11
   * barriers a window), 'subgroup' (inside the score warps: warp reductions on 32-wide subgroups, one barrier; no score
   * array, so 64-token windows fit with the query read from storage) or 'emulated' (the subgroup form's arithmetic
   * with its reductions through workgroup memory: how devices without 32-wide subgroups, SwiftShader in CI, test it).
   */
  softmax: Dot4Softmax;
  /**
   * Rounds of the value phase: a thread's heads in that many groups, each a pass over the window's cache words with
   * only its own i32 sums live (1: all heads in one pass, the most registers).
   */
  valueRounds: number;
  workgroupBytes: number;
}

/**
 * WGSL `fn transpose4`: four tokens' words of one latent word (w_i: values 4d … 4d + 3 of token i) → one word per value
 * (bytes: tokens 0 … 3), so Σ_t p′_t · c_t over four tokens is one dot4 of p′'s word with it.
 */
export const TRANSPOSE4_WGSL = `fn transpose4(w0: u32, w1: u32, w2: u32, w3: u32) -> vec4<u32> {
  let a0 = (w0 & 0x00ff00ffu) | ((w1 & 0x00ff00ffu) << 8u);
  let a1 = ((w0 >> 8u) & 0x00ff00ffu) | (w1 & 0xff00ff00u);
  let b0 = (w2 & 0x00ff00ffu) | ((w3 & 0x00ff00ffu) << 8u);
  let b1 = ((w2 >> 8u) & 0x00ff00ffu) | (w3 & 0xff00ff00u);
  return vec4<u32>((a0 & 0xffffu) | (b0 << 16u), (a1 & 0xffffu) | (b1 << 16u), (a0 >> 16u) | (b0 & 0xffff0000u), (a1 >> 16u) | (b1 & 0xffff0000u));
}`;

const WG = 256;

/**
 * Defaults of the plan (MlaAttentionTuning.int8Prefetch / int8ValueRounds), from an H100 run of bench:attention
 * (2026-12-05): the value phase in 2 rounds took 271.3 against 278.7 µs at 32 × 4K, 57.8 against 63.4 at 32 × 512 and
 * 94.1 against 102.0 at 8 × 4K; the prefetch alone moved nothing (278.5, 64.1, 101.8) and is kept because the
 * 2-round figures were measured with it.
 */
export const DOT4_PREFETCH = true;
export type Dot4Softmax = 'workgroup' | 'subgroup' | 'emulated';
export const DOT4_VALUE_ROUNDS = 2;

/**
 * The plan for a shape, or why this kernel does not take it. `storageLimit` is the device's workgroup memory: the
 * query is staged there when it fits (`queryStaged` forces either way). `headSplits` > 1 gives each (row, chunk)
 * that many workgroups, each with a share of the heads (more workgroups for small batches; each reads the rows).
 */
export function planMlaDot4(
  nHeads: number,
  tc: MlaTcPlan,
  storageLimit: number,
  queryStaged?: boolean,
  headSplits = 1,
  prefetch = DOT4_PREFETCH,
  valueRounds = DOT4_VALUE_ROUNDS,
  softmax: Dot4Softmax = 'workgroup',
): MlaDot4Plan | string {
  const W = tc.window;
  if (W > 128) return `window ${W}: at most 128 tokens (a softmax thread holds W / 8 probabilities)`;
  if (!Number.isInteger(headSplits) || headSplits < 1) return `head splits ${headSplits}: a positive integer`;
  if (!Number.isInteger(valueRounds) || valueRounds < 1) return `value rounds ${valueRounds}: a positive integer`;
  const HW = Math.ceil(nHeads / headSplits);
  const splits = Math.ceil(nHeads / HW);
  const headQuads = Math.ceil(HW / 4);
  const rowWords = tc.rowPad / 4;
  const latentWords = tc.latentPad / 4;
  const rowStride4 = rowWords / 4 + ((rowWords / 4) % 2 === 0 ? 1 : 0);
  if (latentWords > WG) return `kv_lora_rank ${tc.latentPad}: the value phase takes at most ${4 * WG} latent values`;
  const valueParts = Math.min(HW, Math.floor(WG / latentWords));
  const headsPerValueThread = Math.ceil(HW / valueParts);
  if (headsPerValueThread > 16) return `${HW} heads over ${valueParts} value parts: more than 16 heads a thread`;
  // Staged rows, scores (workgroup softmax only), p′, reduction slots (workgroup: vec2 a thread; emulated: vec2 and u32),
  // token scales and rows, per-head state, bounds.
  const reduceBytes = softmax === 'workgroup' ? 8 * WG : softmax === 'emulated' ? 12 * WG : 0;
  const base = 16 * W * rowStride4 + (softmax === 'workgroup' ? 4 * HW * W : 0) + HW * W + reduceBytes + 12 * W + 16 * HW + 8;
  const queryBytes = 4 * HW * rowWords;
  const staged = queryStaged ?? base + queryBytes <= storageLimit;
  const workgroupBytes = base + (staged ? queryBytes : 0);
  if (workgroupBytes > storageLimit) return `${workgroupBytes} B of workgroup memory at window ${W}, the device allows ${storageLimit}`;
  return {
    window: W,
    headSplits: splits,
    headsPerWorkgroup: HW,
    headQuads,
    tokensPerScoreThread: W / 32,
    rowWords,
    latentWords,
    rowStride4,
    valueWords: latentWords,
    valueParts,
    headsPerValueThread,
    queryStaged: staged,
    prefetch,
    prefetchWords: prefetch ? Math.ceil((W * rowWords) / WG) : 0,
    valueRounds: Math.min(valueRounds, headsPerValueThread),
    softmax,
    workgroupBytes,
  };
}

/**
 * The split kernel: grid (chunks, head splits, rows), 256 threads; writes the f32 kernel's partials (m, l, o per head).
 * Heads are local to the workgroup (0 … HW − 1, head hBase + local of the model) except in the query and the partials.
 */
export function mlaDot4PartialWgsl(nHeads: number, f: MlaInt8RowFormat, blockSize: number, tc: MlaTcPlan, p: MlaDot4Plan): string {
  const H = nHeads;
  const HW = p.headsPerWorkgroup;
  const R = f.kvLoraRank;
  const W = p.window;
  const S4 = p.rowStride4;
  const RW4 = p.rowWords / 4;
  const LW4 = p.latentWords / 4;
  const HPT = p.headsPerValueThread;
  const TPT = W / 8;
  const ks = [0, 1, 2, 3];
  const bs = [...Array(p.tokensPerScoreThread).keys()];
  const vs = [...Array(HPT).keys()];
  // The value heads in rounds: each round's i32 sums alone are live (fewer registers, the cache words re-read).
  const perRound = Math.ceil(HPT / p.valueRounds);
  const valueRounds = [...Array(Math.ceil(HPT / perRound)).keys()].map((q) => vs.slice(q * perRound, (q + 1) * perRound));
  const qLoad = (k: number) => (p.queryStaged ? `qsm[ql${k} * ${RW4}u + w4]` : `qq[qb${k} + (w4 >> 1u) * 32u + (w4 & 1u)]`);
  const RW = p.rowWords;
  const pfs = [...Array(p.prefetchWords).keys()];
  // Loads window [start, start + W) into the prefetch registers: word e = lid + i·256 of the W × RW staged words (row
  // e / RW, word e % RW: [c | 0 | k_pe | 0]) in pf_i, zero past the chunk; the scales of token lid in pfScale.
  const fetchWgsl = (start: string) => `{
      let nn = min(${W}u, bnd.y - (${start}));
      ${pfs
        .map(
          (i) => `{
        let e = lid + ${i * WG}u;
        let t = e / ${RW}u;
        let w = e % ${RW}u;
        pf${i} = 0u;
        if (${i * WG + WG > W * RW ? `e < ${W * RW}u && ` : ''}t < nn) { pf${i} = stagedWord(cacheRow(bt, ${start} + t) * ${f.rowWords}u, w); }
      }`,
        )
        .join('\n      ')}
      if (lid < ${W}u) {
        pfScale = vec2<f32>(0.0);
        if (lid < nn) { pfScale = tokenScales(cacheRow(bt, ${start} + lid) * ${f.rowWords}u); }
      }
    }`;
  // One part (latent or rope) of the score sums: every 16 bytes of the row against each head's 16 query bytes.
  const scoreLoop = (from: number, to: number, acc: string) => `for (var w4 = ${from}u; w4 < ${to}u; w4++) {
        ${bs.map((b) => `let c${b} = ct[(tl + ${32 * b}u) * ${S4}u + w4];`).join('\n        ')}
        ${ks
          .map(
            (k) => `{
          let qv = ${qLoad(k)};
          ${bs.map((b) => `${acc}${b}[${k}] += dot4I8Packed(qv.x, c${b}.x) + dot4I8Packed(qv.y, c${b}.y) + dot4I8Packed(qv.z, c${b}.z) + dot4I8Packed(qv.w, c${b}.w);`).join('\n          ')}
        }`,
          )
          .join('\n        ')}
      }`;

  // Warp reductions of the warp softmax: subgroup operations, or (softmax 'emulated', for devices without 32-wide
  // subgroups, i.e. SwiftShader in CI) the same results through workgroup memory: `lanes` consecutive threads'
  // values combined in lane order.
  const emulatedReduce = (name: string, type: string, slots: string, lanes: number, combine: (r: string, u: string) => string) => `fn ${name}(lid: u32, v: ${type}) -> ${type} {
  ${slots}[lid] = v;
  workgroupBarrier();
  let b = lid & ~${lanes - 1}u;
  var r = ${slots}[b];
  for (var i = 1u; i < ${lanes}u; i++) { r = ${combine('r', `${slots}[b + i]`)}; }
  workgroupBarrier();
  return r;
}`;
  const warp = (kind: 'max' | 'sum-max' | 'quad-or', v: string) => `${kind === 'max' ? 'wMax' : kind === 'sum-max' ? 'wSumMax' : 'wQuadOr'}(lid, ${v})`;
  const warpFns =
    p.softmax === 'subgroup'
      ? `fn wMax(lid: u32, v: vec2<f32>) -> vec2<f32> { return subgroupMax(v); }
fn wSumMax(lid: u32, v: vec2<f32>) -> vec2<f32> { return vec2<f32>(subgroupAdd(v.x), subgroupMax(v.y)); }
fn wQuadOr(lid: u32, v: u32) -> u32 {
  let a = v | subgroupShuffleXor(v, 1u);
  return a | subgroupShuffleXor(a, 2u);
}`
      : p.softmax === 'emulated'
        ? `var<workgroup> wred: array<vec2<f32>, ${WG}>;
var<workgroup> wredU: array<u32, ${WG}>;
${emulatedReduce('wMax', 'vec2<f32>', 'wred', 32, (r, u) => `max(${r}, ${u})`)}
${emulatedReduce('wSumMax', 'vec2<f32>', 'wred', 32, (r, u) => `vec2<f32>(${r}.x + ${u}.x, max(${r}.y, ${u}.y))`)}
${emulatedReduce('wQuadOr', 'u32', 'wredU', 4, (r, u) => `${r} | ${u}`)}`
        : '';
  const scoreAccs = (guard = '') => `${bs.map((b) => `var aL${b} = vec4<i32>(0);\n      var aP${b} = vec4<i32>(0);`).join('\n      ')}
      ${guard ? `if (${guard}) {` : '{'}
      ${scoreLoop(0, LW4, 'aL')}
      ${scoreLoop(LW4, RW4, 'aP')}
      }`;
  const scoreValue = (b: number, k: number) => `f32(aL${b}[${k}]) * sq${k}.x * ts${b}.x + f32(aP${b}[${k}]) * sq${k}.y * ts${b}.y`;
  // Scores to workgroup memory, then the window's softmax by 8 threads a head with tree reductions (11 barriers).
  const workgroupScoresWgsl = () => `if (scoreThread) {
      ${scoreAccs()}
      ${bs
        .map((b) =>
          ks
            .map(
              (k) => `if (hq * 4u + ${k}u < hCount) {
        let t = tl + ${32 * b}u;
        let ts${b} = tokScale[t];
        sc[ql${k} * ${W}u + t] = select(${NEG_BIG}, ${scoreValue(b, k)}, t < n);
      }`,
            )
            .join('\n      '),
        )
        .join('\n      ')}
    }
    workgroupBarrier();

    // Softmax over the window, 8 threads a head (32 slots; those past the heads idle but keep the barriers), ${TPT} tokens each.
    ${windowSoftmaxWgsl({
      W,
      TPH: 8,
      TPT,
      h: `min(lid / 8u, ${HW - 1}u)`,
      live: 'lid / 8u < hCount',
      put: (i, v) => `red[${i}] = ${v};`,
      get: (i) => `red[${i}]`,
      pqWord: (v) => v,
    })}
    workgroupBarrier();`;
  // The softmax inside the score warps: a warp holds its 4 heads' scores of all W tokens (lane = token, + 32 b), so a
  // head's max, sum and p′ scale are warp reductions and its packed p′ words a 4-lane OR — no workgroup memory, one
  // barrier. Every thread runs it (the reductions need whole warps); warps past the heads reduce clamped copies and
  // store nothing (and skip the products: their sums stay zero). Same arithmetic as windowSoftmaxWgsl (sums in another
  // order).
  const warpScoresWgsl = () => `{
      ${scoreAccs('scoreThread')}
      ${bs.map((b) => `let ts${b} = tokScale[tl + ${32 * b}u];`).join('\n      ')}
      ${ks
        .map(
          (k) => `{
        let live = hq * 4u + ${k}u < hCount;
        ${bs.map((b) => `let s${b} = select(${NEG_BIG}, ${scoreValue(b, k)}, tl + ${32 * b}u < n);`).join('\n        ')}
        var mx = ${NEG_BIG};
        var bad = 0.0;
        ${bs
          .map(
            (b) => `if (tl + ${32 * b}u < n) {
          mx = max(mx, s${b});
          bad = select(bad, 1.0, (bitcast<u32>(s${b}) & 0x7f800000u) == 0x7f800000u);
        }`,
          )
          .join('\n        ')}
        let wm = ${warp('max', 'vec2<f32>(mx, bad)')};
        let mOld = mRun[ql${k}];
        let mNew = max(mOld, wm.x);
        var l = 0.0;
        var pmax = 0.0;
        ${bs
          .map(
            (b) => `var pp${b} = 0.0;
        if (tl + ${32 * b}u < n) {
          let pt = exp(s${b} - mNew);
          l += pt;
          pp${b} = pt * ts${b}.x;
          pmax = max(pmax, pp${b});
        }`,
          )
          .join('\n        ')}
        let tot = ${warp('sum-max', 'vec2<f32>(l, pmax)')};
        if (live && tl == 0u) {
          let al = exp(mOld - mNew);
          alpha[ql${k}] = al;
          let lNew = lRun[ql${k}] * al + tot.x;
          lRun[ql${k}] = select(lNew, bitcast<f32>(bitcast<u32>(lNew) | 0x7fc00000u), wm.y > 0.0);
          mRun[ql${k}] = mNew;
          pscale[ql${k}] = tot.y / 127.0;
        }
        let inv = select(0.0, 127.0 / tot.y, tot.y > 0.0);
        ${bs
          .map(
            (b) => `{
          let q = (u32(i32(clamp(round(pp${b} * inv), -127.0, 127.0))) & 0xffu) << (8u * (tl % 4u));
          let word = ${warp('quad-or', 'q')};
          if (live && tl % 4u == 0u) { pq[ql${k} * ${W / 4}u + (tl + ${32 * b}u) / 4u] = word; }
        }`,
          )
          .join('\n        ')}
      }`,
        )
        .join('\n      ')}
    }
    workgroupBarrier();`;
  return /* wgsl */ `${p.softmax === 'subgroup' ? 'enable subgroups;\n' : ''}
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> qq: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> qs: array<f32>;
@group(0) @binding(3) var<storage, read> cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
${cacheRowWgsl(blockSize)}
${qqWordWgsl(tc)}
${stagedRowFnsWgsl(f, tc)}
var<workgroup> ct: array<vec4<u32>, ${W * S4}>;
${p.queryStaged ? `var<workgroup> qsm: array<vec4<u32>, ${HW * RW4}>;` : ''}
${p.softmax === 'workgroup' ? `var<workgroup> red: array<vec2<f32>, ${WG}>;` : ''}
${windowStateWgsl(W, HW, 'u32', p.softmax === 'workgroup')}
${warpFns}

/** vec4 index of head h's query words 4·w4 … 4·w4 + 3 in row r's tiled query (qqWord at w4 = 0 is 8-word aligned). */
fn qBase(r: u32, h: u32) -> u32 {
  return qqWord(r, h, 0u) / 4u;
}

${TRANSPOSE4_WGSL}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let c = wid.x;
  let r = wid.z;
  ${CHUNK_START_WGSL}
  // This workgroup's heads: hBase … hBase + hCount − 1 of the model.
  let hBase = wid.y * ${HW}u;
  let hCount = min(${HW}u, ${H}u - hBase);
  if (lid < hCount) {
    mRun[lid] = ${NEG_BIG};
    lRun[lid] = 0.0;
  }
  // Score threads: head quad hq (a warp), token tl (+ 32 b).
  let hq = lid / 32u;
  let tl = lid % 32u;
  let scoreThread = hq < ${p.headQuads}u;
  ${ks
    .map(
      (k) => `let ql${k} = min(hq * 4u + ${k}u, ${HW - 1}u);
  let qh${k} = min(hBase + ql${k}, ${H - 1}u);
  let qb${k} = qBase(r, qh${k});
  let sq${k} = vec2<f32>(qs[2u * (r * ${tc.headsPadded}u + qh${k})], qs[2u * (r * ${tc.headsPadded}u + qh${k}) + 1u]);`,
    )
    .join('\n  ')}
  ${
    p.queryStaged
      ? `for (var i = lid; i < ${HW * RW4}u; i += ${WG}u) {
    let w4 = i % ${RW4}u;
    qsm[i] = qq[qBase(r, min(hBase + i / ${RW4}u, ${H - 1}u)) + (w4 >> 1u) * 32u + (w4 & 1u)];
  }`
      : ''
  }
  // Value threads: latent word dq, head part hp (heads hp·${HPT} …).
  let dq = lid % ${p.valueWords}u;
  let hp = lid / ${p.valueWords}u;
  let valueThread = hp < ${p.valueParts}u;
  ${vs.map((k) => `let vh${k} = min(hp * ${HPT}u + ${k}u, ${HW - 1}u);\n  var o${k} = vec4<f32>(0.0);`).join('\n  ')}

  ${p.prefetch ? `${pfs.map((i) => `var pf${i} = 0u;`).join(' ')}
  var pfScale = vec2<f32>(0.0);
  ${fetchWgsl('bnd.x')}` : ''}
  for (var w0 = bnd.x; w0 < bnd.y; w0 += ${W}u) {
    let n = min(${W}u, bnd.y - w0);
    ${
      p.prefetch
        ? `// This window's rows, loaded while the last one was computed; then the next window's loads go out.
    ${pfs.map((i) => `${i * WG + WG > W * RW ? `if (lid + ${i * WG}u < ${W * RW}u) ` : ''}{ let e = lid + ${i * WG}u; ct[(e / ${RW}u) * ${S4}u + (e % ${RW}u) / 4u][e % 4u] = pf${i}; }`).join('\n    ')}
    if (lid < ${W}u) { tokScale[lid] = pfScale; }
    workgroupBarrier();
    if (w0 + ${W}u < bnd.y) {
      ${fetchWgsl(`w0 + ${W}u`)}
    }`
        : `for (var j = lid; j < ${W}u; j += ${WG}u) {
      let row = cacheRow(bt, w0 + min(j, n - 1u));
      tokRow[j] = row;
      tokScale[j] = select(vec2<f32>(0.0), tokenScales(row * ${f.rowWords}u), j < n);
    }
    workgroupBarrier();
    ${stageRowsWgsl(f, tc, WG, W, '0u', (v) => `ct[t * ${S4}u + w / 4u][w % 4u] = ${v};`)}
    workgroupBarrier();`
    }

    ${p.softmax === 'workgroup' ? workgroupScoresWgsl() : warpScoresWgsl()}

    if (valueThread) {
      ${valueRounds
        .map(
          (hs) => `{
      ${hs.map((k) => `var acc${k} = vec4<i32>(0);`).join('\n      ')}
      for (var tq = 0u; tq < ${W / 4}u; tq++) {
        let at = 4u * tq * ${S4}u + dq / 4u;
        let e = dq % 4u;
        let cv = transpose4(ct[at][e], ct[at + ${S4}u][e], ct[at + ${2 * S4}u][e], ct[at + ${3 * S4}u][e]);
        ${hs
          .map(
            (k) => `{
          let pw = pq[vh${k} * ${W / 4}u + tq];
          acc${k} += vec4<i32>(dot4I8Packed(pw, cv.x), dot4I8Packed(pw, cv.y), dot4I8Packed(pw, cv.z), dot4I8Packed(pw, cv.w));
        }`,
          )
          .join('\n        ')}
      }
      ${hs.map((k) => `o${k} = o${k} * alpha[vh${k}] + vec4<f32>(acc${k}) * pscale[vh${k}];`).join('\n      ')}
      }`,
        )
        .join('\n      ')}
    }
    workgroupBarrier();
  }

  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  if (valueThread) {
    ${vs
      .map(
        (k) => `if (hp * ${HPT}u + ${k}u < hCount) {
      let base = ((r * ${H}u + hBase + vh${k}) * maxChunks + c) * ${R + 2}u + 2u + 4u * dq;
      for (var d = 0u; d < 4u; d++) {
        if (4u * dq + d < ${R}u) { partials[base + d] = o${k}[d]; }
      }
    }`,
      )
      .join('\n    ')}
  }
  if (lid < hCount) {
    let base = ((r * ${H}u + hBase + lid) * maxChunks + c) * ${R + 2}u;
    partials[base] = mRun[lid];
    partials[base + 1u] = lRun[lid];
  }
}
`;
}

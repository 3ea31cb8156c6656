// Token picks on the GPU: greedy (the first index of a row's largest logit) or a seeded draw with temperature, min-p,
// top-k and top-p, after the row's logit bias and penalties, so a request without logprobs reads back one token id
// instead of a vocabulary-wide row (152K floats for Qwen2.5) and costs no host sampling (1.6–7 ms a row in JS).
import type { GpuContext } from './device.ts';
import type { PendingPenalty } from '../engine/sampler.ts';
import { META_FULL_LOGIT_ROWS, META_LOGIT_ROWS, metaWgsl } from './step-meta.ts';
import { bindBuffers, gridFor } from './tensors.ts';

const WG = 256;

/** Words of one pick row's settings in the params buffer. */
export const PICK_PARAM_WORDS = 16;
/** Most top logprobs a pick row returns (OpenAI's limit; engine/sampler.ts MAX_PICK_LOGPROBS, which the runners check). */
export const MAX_TOP_LOGPROBS = 20;
/**
 * Words of one pick row's logprobs in the info buffer: [log-sum-exp of the raw row, the chosen token's raw logit,
 * n, 0, n top ids, (padding to 20), n top raw logits] (f32 as bits).
 */
export const PICK_INFO_WORDS = 4 + 2 * MAX_TOP_LOGPROBS;
/**
 * Words of one logit adjustment: token id (bit 31 set: the token is an output token already counted, so a pending
 * token adds no presence penalty to it), bias, repetition factor, subtrahend (f32 as bits).
 */
export const PICK_ADJUST_WORDS = 4;
const OUTPUT_BIT = 0x80000000;

/** How one pick row chooses its token: greedy, or a draw (engine/sampler.ts pickOnHost has the same semantics). */
export type PickSpec = { kind: 'argmax' } | { kind: 'sample'; temperature: number; topK: number; topP: number; minP: number; u: number };

/**
 * Where a pick row's adjustments lie in the adjustments buffer, how many top logprobs it wants (null: none), and the
 * penalties of a pending output token (LogitAdjustments.pending): step row `row`'s input token, read on the device.
 */
export interface PickExtras {
  first: number;
  count: number;
  logprobs: number | null;
  pending?: { row: number; penalty: PendingPenalty } | null;
}

/**
 * Writes pick row k's settings: [mode, 1/temperature, top-k (0 = off), top-p, min-p, u, first adjustment, adjustments,
 * logprobs + 1 (0: none), pending token's step row + 1 (0: none), its repetition, frequency and presence penalties]
 * (f32 as bits); its adjustments are entries [first, first + count) of the adjustments buffer.
 */
export function writePickParams(out: Uint32Array, k: number, spec: PickSpec, extras: PickExtras = { first: 0, count: 0, logprobs: null }): void {
  const o = k * PICK_PARAM_WORDS;
  const f = new Float32Array(out.buffer, out.byteOffset + o * 4, PICK_PARAM_WORDS);
  out.fill(0, o, o + PICK_PARAM_WORDS);
  out[o + 6] = extras.first;
  out[o + 7] = extras.count;
  out[o + 8] = extras.logprobs === null ? 0 : extras.logprobs + 1;
  if (extras.pending) {
    out[o + 9] = extras.pending.row + 1;
    f[10] = extras.pending.penalty.repetition;
    f[11] = extras.pending.penalty.frequency;
    f[12] = extras.pending.penalty.presence;
  }
  if (spec.kind === 'argmax') return;
  out[o] = 1;
  f[1] = 1 / spec.temperature;
  out[o + 2] = spec.topK;
  f[3] = spec.topP;
  f[4] = spec.minP;
  f[5] = spec.u;
}

/** Packs a row's adjustments (engine/sampler.ts LogitAdjustments) at entry `first` of an adjustments array. */
export function writePickAdjustments(out: Uint32Array, first: number, a: { ids: number[]; bias: number[]; repetition: number[]; subtract: number[]; output?: boolean[] }): void {
  const f = new Float32Array(out.buffer, out.byteOffset, out.length);
  a.ids.forEach((id, k) => {
    const w = (first + k) * PICK_ADJUST_WORDS;
    out[w] = (id | (a.output?.[k] ? OUTPUT_BIT : 0)) >>> 0;
    f[w + 1] = a.bias[k];
    f[w + 2] = a.repetition[k];
    f[w + 3] = a.subtract[k];
  });
}

/**
 * One workgroup per pick row (logits rows META_FULL_LOGIT_ROWS … META_LOGIT_ROWS − 1), its settings at params[16k]:
 *  0. With logprobs: on the raw row, its log-sum-exp and its n most likely tokens (a radix select of the n-th largest
 *     key, then those above it and the first tied ones in index order), into info[44k …] (PICK_INFO_WORDS).
 *  1. The row's adjustments change its logits in place (v' = rep(v + bias) − subtract; pick rows are never read back);
 *     a pending output token (a pipelined step's input token, which the host does not know yet) takes its penalties
 *     on top: its entry's repetition becomes the penalty, its subtrahend grows by the frequency penalty and, unless
 *     the entry was an output token already, the presence penalty; a token without an entry gets one.
 *  2. The pick. Greedy: each thread keeps the largest value it sees and its first index, then a tree keeps the larger
 *     value, the lower index on ties; NaN never wins; a row with no comparable value gives 0. A draw, in the host
 *     sampler's order, on y = logit / temperature (f32), with an order-preserving u32 key per value (NaN lowest, never
 *     kept):
 *     a. m = max y; min-p keeps y ≥ m + ln(min_p).
 *     b. top-k: the k-th largest key, exactly, by a radix select (4 passes of 8 bits, a 256-bin count histogram each);
 *        keys below it go.
 *     c. top-p over the rest, e = exp(y − m): the boundary key c by the same radix select on probability mass (fixed
 *        point, 2³¹ = the kept mass, so the integer sums are exact and the result does not depend on thread timing):
 *        every key above c stays, and of the tokens equal to c the first few in index order, as many as the mass
 *        needs to reach top_p (the host's sorted rule).
 *     d. The inverse-CDF draw in index order: each thread sums e over a contiguous slice of the row, the slices' sums
 *        are scanned in order, and the thread whose slice holds u · total walks it to the token.
 *  3. With logprobs: the chosen token's raw logit (its adjustment undone where it had one) into the info.
 * f32 against the host's float64 moves a choice only where u or a cut lies within rounding of a boundary.
 */
export function pickWgsl(vocab: number): string {
  const slice = Math.ceil(vocab / WG);
  const NONE = '0xffffffffu';
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;
@group(0) @binding(3) var<storage, read_write> picks: array<u32>;
@group(0) @binding(4) var<storage, read> adjust: array<u32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;
var<workgroup> redF: array<f32, ${WG}>;
var<workgroup> redU: array<u32, ${WG}>;
var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> bc: vec4<u32>;
var<workgroup> chosenW: u32;
var<workgroup> pendingListed: u32;
var<workgroup> candCount: atomic<u32>;
var<workgroup> candId: array<u32, ${MAX_TOP_LOGPROBS}>;
var<workgroup> candVal: array<f32, ${MAX_TOP_LOGPROBS}>;

fn better(v: f32, i: u32, w: f32, j: u32) -> bool {
  return v > w || (v == w && i < j);
}

fn isNan(v: f32) -> bool {
  return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Order-preserving key: a < b as floats ⇔ key(a) < key(b); NaN → 0, below every number.
fn orderKey(v: f32) -> u32 {
  let b = bitcast<u32>(v);
  if (isNan(v)) { return 0u; }
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn fromKey(k: u32) -> f32 {
  return bitcast<f32>(select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u));
}

fn maxAll(lid: u32, v: f32) -> f32 {
  redF[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { redF[lid] = max(redF[lid], redF[lid + s]); }
    workgroupBarrier();
  }
  let r = redF[0];
  workgroupBarrier();
  return r;
}

fn sumAll(lid: u32, v: f32) -> f32 {
  redF[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { redF[lid] = redF[lid] + redF[lid + s]; }
    workgroupBarrier();
  }
  let r = redF[0];
  workgroupBarrier();
  return r;
}

// Exclusive prefix of each thread's count, in thread order (redU; read it after the call).
fn scanCounts(lid: u32, n: u32) {
  redU[lid] = n;
  workgroupBarrier();
  if (lid == 0u) {
    var acc = 0u;
    for (var t = 0u; t < ${WG}u; t++) {
      let c = redU[t];
      redU[t] = acc;
      acc += c;
    }
  }
  workgroupBarrier();
}

// Whether a token with this key survives the cuts: above c, or equal to c and among the first eqKeep such in index
// order (rank counts them, in order), and not below min-p's and top-k's cut.
fn kept(key: u32, cKey: u32, eqKeep: u32, cutKey: u32, rank: ptr<function, u32>) -> bool {
  var keep = key > cKey;
  if (key == cKey) {
    keep = *rank < eqKeep;
    *rank += 1u;
  }
  return keep && key >= cutKey;
}

// Fixed-point probability mass of e: scale = 2³¹ / the kept mass, so the masses of a row sum to 2³¹ (+ rounding).
fn massOf(e: f32, scale: f32) -> u32 {
  return u32(min(e * scale + 0.5, 4294967040.0));
}

// The histogram bin where a running sum from the top bin down, starting at start, reaches want (bin 0 if it never
// does), and the sum of the bins above it plus start.
fn topBin(start: u32, want: u32) -> vec2<u32> {
  var above = start;
  var b = 255u;
  loop {
    let c = atomicLoad(&hist[b]);
    if (above + c >= want || b == 0u) { break; }
    above += c;
    b -= 1u;
  }
  return vec2<u32>(b, above);
}

// The k-th largest key of the row's values × mul (1 ≤ k ≤ vocab), exactly: radix select, 8 bits a pass from the top.
fn kthKey(lid: u32, base: u32, k: u32, mul: f32) -> u32 {
  var prefix = 0u;
  var pmask = 0u;
  var remaining = k;
  for (var d = 0u; d < 4u; d++) {
    let shift = 24u - 8u * d;
    atomicStore(&hist[lid], 0u);
    workgroupBarrier();
    for (var i = lid; i < ${vocab}u; i += ${WG}u) {
      let key = orderKey(logits[base + i] * mul);
      if ((key & pmask) == prefix) { atomicAdd(&hist[(key >> shift) & 255u], 1u); }
    }
    workgroupBarrier();
    if (lid == 0u) {
      let t = topBin(0u, remaining);
      bc = vec4<u32>(prefix | (t.x << shift), remaining - t.y, 0u, 0u);
    }
    let r = workgroupUniformLoad(&bc);
    prefix = r.x;
    remaining = r.y;
    pmask |= 255u << shift;
  }
  return prefix;
}

// Step 0: the raw row's log-sum-exp and its n most likely tokens (value desc, index asc), into info at iw.
fn rawLogprobs(lid: u32, base: u32, n: u32, iw: u32) {
  var mx = bitcast<f32>(0xff7fffffu);
  for (var i = lid; i < ${vocab}u; i += ${WG}u) {
    let v = logits[base + i];
    if (!isNan(v)) { mx = max(mx, v); }
  }
  let m = maxAll(lid, mx);
  var se = 0.0;
  for (var i = lid; i < ${vocab}u; i += ${WG}u) {
    let v = logits[base + i];
    if (!isNan(v)) { se += exp(v - m); }
  }
  let s = sumAll(lid, se);
  if (n > 0u) {
    let kk = kthKey(lid, base, n, 1.0);
    if (lid == 0u) { atomicStore(&candCount, 0u); }
    workgroupBarrier();
    for (var i = lid; i < ${vocab}u; i += ${WG}u) {
      let v = logits[base + i];
      if (orderKey(v) > kk) {
        let slot = atomicAdd(&candCount, 1u);
        candId[slot] = i;
        candVal[slot] = v;
      }
    }
    workgroupBarrier();
    let above = atomicLoad(&candCount);
    // The rest of the n: the first tokens equal to the n-th largest, in index order (contiguous slices, ranked).
    let s0 = lid * ${slice}u;
    let s1 = min(s0 + ${slice}u, ${vocab}u);
    var eq = 0u;
    for (var i = s0; i < s1; i++) {
      if (orderKey(logits[base + i]) == kk) { eq++; }
    }
    scanCounts(lid, eq);
    var rank = redU[lid];
    for (var i = s0; i < s1; i++) {
      let v = logits[base + i];
      if (orderKey(v) == kk) {
        if (above + rank < n) {
          candId[above + rank] = i;
          candVal[above + rank] = v;
        }
        rank++;
      }
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    // Insertion sort of the n candidates: value desc, index asc.
    for (var a = 1u; a < n; a++) {
      let id = candId[a];
      let v = candVal[a];
      var j = a;
      loop {
        if (j == 0u) { break; }
        let pv = candVal[j - 1u];
        let pid = candId[j - 1u];
        if (!(v > pv || (v == pv && id < pid))) { break; }
        candId[j] = pid;
        candVal[j] = pv;
        j -= 1u;
      }
      candId[j] = id;
      candVal[j] = v;
    }
    info[iw] = bitcast<u32>(m + log(s));
    info[iw + 2u] = n;
    for (var a = 0u; a < n; a++) {
      info[iw + 4u + a] = candId[a];
      info[iw + ${4 + MAX_TOP_LOGPROBS}u + a] = bitcast<u32>(candVal[a]);
    }
  }
  workgroupBarrier();
}

fn greedyPick(lid: u32, base: u32) -> u32 {
  var bv = bitcast<f32>(0xff7fffffu); // -FLT_MAX: every finite value ties or beats it
  var bi = ${NONE};
  for (var i = lid; i < ${vocab}u; i += ${WG}u) {
    let v = logits[base + i];
    if (better(v, i, bv, bi)) { bv = v; bi = i; }
  }
  redF[lid] = bv;
  redU[lid] = bi;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s && better(redF[lid + s], redU[lid + s], redF[lid], redU[lid])) {
      redF[lid] = redF[lid + s];
      redU[lid] = redU[lid + s];
    }
    workgroupBarrier();
  }
  if (lid == 0u) { chosenW = select(redU[0], 0u, redU[0] == ${NONE}); }
  return workgroupUniformLoad(&chosenW);
}

fn drawPick(lid: u32, base: u32, pw: u32) -> u32 {
  let invT = bitcast<f32>(params[pw + 1u]);
  let topK = params[pw + 2u];
  let topP = bitcast<f32>(params[pw + 3u]);
  let minP = bitcast<f32>(params[pw + 4u]);
  let u = bitcast<f32>(params[pw + 5u]);

  // a. The maximum, and min-p's cut.
  var mx = bitcast<f32>(0xff7fffffu);
  for (var i = lid; i < ${vocab}u; i += ${WG}u) {
    let y = logits[base + i] * invT;
    if (!isNan(y)) { mx = max(mx, y); }
  }
  let m = maxAll(lid, mx);
  var cutKey = 1u;
  if (minP > 0.0) { cutKey = max(cutKey, orderKey(m + log(minP))); }

  // b. top-k: keys below the k-th largest go.
  if (topK > 0u && topK < ${vocab}u) { cutKey = max(cutKey, kthKey(lid, base, topK, invT)); }

  // The kept mass so far (the maximum is always kept: its key tops both cuts).
  var zs = 0.0;
  for (var i = lid; i < ${vocab}u; i += ${WG}u) {
    let y = logits[base + i] * invT;
    if (orderKey(y) >= cutKey) { zs += exp(y - m); }
  }
  let z = sumAll(lid, zs);

  // c. top-p: the boundary key c (keys above it are kept; of those equal to it, the first eqKeep in index order).
  var cKey = cutKey;
  var eqKeep = ${NONE};
  if (topP < 1.0) {
    let scale = 2147483648.0 / z;
    let want = u32(topP * 2147483648.0);
    var prefix = 0u;
    var pmask = 0u;
    var massAbove = 0u;
    for (var d = 0u; d < 4u; d++) {
      let shift = 24u - 8u * d;
      atomicStore(&hist[lid], 0u);
      workgroupBarrier();
      for (var i = lid; i < ${vocab}u; i += ${WG}u) {
        let y = logits[base + i] * invT;
        let key = orderKey(y);
        if (key >= cutKey && (key & pmask) == prefix) { atomicAdd(&hist[(key >> shift) & 255u], massOf(exp(y - m), scale)); }
      }
      workgroupBarrier();
      if (lid == 0u) {
        let t = topBin(massAbove, want);
        bc = vec4<u32>(prefix | (t.x << shift), t.y, 0u, 0u);
      }
      let r = workgroupUniformLoad(&bc);
      prefix = r.x;
      massAbove = r.y;
      pmask |= 255u << shift;
    }
    let qc = massOf(exp(fromKey(prefix) - m), scale);
    if (prefix >= cutKey && qc > 0u && massAbove < want) {
      cKey = prefix;
      eqKeep = max(1u, (want - massAbove + qc - 1u) / qc);
    }
  }

  // d. The draw. Thread t's slice is [t·${slice}, (t + 1)·${slice}); first the ranks of its tokens equal to c.
  let s0 = lid * ${slice}u;
  let s1 = min(s0 + ${slice}u, ${vocab}u);
  var eq = 0u;
  for (var i = s0; i < s1; i++) {
    if (orderKey(logits[base + i] * invT) == cKey) { eq++; }
  }
  scanCounts(lid, eq);
  var rank = redU[lid];
  var part = 0.0;
  for (var i = s0; i < s1; i++) {
    let y = logits[base + i] * invT;
    if (kept(orderKey(y), cKey, eqKeep, cutKey, &rank)) { part += exp(y - m); }
  }
  redF[lid] = part;
  workgroupBarrier();
  if (lid == 0u) {
    var total = 0.0;
    var last = 0u;
    for (var t = 0u; t < ${WG}u; t++) {
      total += redF[t];
      if (redF[t] > 0.0) { last = t; }
    }
    let goal = u * total;
    var acc = 0.0;
    var w = ${NONE};
    for (var t = 0u; t < ${WG}u; t++) {
      let p = redF[t];
      if (p > 0.0 && acc + p > goal) {
        w = t;
        break;
      }
      acc += p;
    }
    if (w == ${NONE}) {
      w = last;
      acc = total - redF[last];
    }
    bc = vec4<u32>(w, bitcast<u32>(acc), bitcast<u32>(goal), 0u);
  }
  let r = workgroupUniformLoad(&bc);
  if (lid == r.x) {
    var cum = bitcast<f32>(r.y);
    let goal = bitcast<f32>(r.z);
    var rk = redU[lid];
    var chosen = ${NONE};
    var lastKept = ${NONE};
    for (var i = s0; i < s1; i++) {
      let y = logits[base + i] * invT;
      let e = exp(y - m);
      if (kept(orderKey(y), cKey, eqKeep, cutKey, &rk) && e > 0.0) {
        lastKept = i;
        cum += e;
        if (cum > goal) {
          chosen = i;
          break;
        }
      }
    }
    if (chosen == ${NONE}) { chosen = lastKept; }
    chosenW = select(chosen, 0u, chosen == ${NONE});
  }
  return workgroupUniformLoad(&chosenW);
}

// One token's change: v' = rep(v + bias) − sub, rep(x) = x > 0 ? x / r : x · r.
struct Adj { bias: f32, rep: f32, sub: f32 }

fn adjusted(v: f32, a: Adj) -> f32 {
  var x = v + a.bias;
  if (a.rep != 1.0) { x = select(x * a.rep, x / a.rep, x > 0.0); }
  return x - a.sub;
}

fn unadjusted(v: f32, a: Adj) -> f32 {
  var x = v + a.sub;
  if (a.rep != 1.0) { x = select(x / a.rep, x * a.rep, x > 0.0); }
  return x - a.bias;
}

// Entry w's token (bit 31 marks a counted output token).
fn adjustId(w: u32) -> u32 { return adjust[w] & 0x7fffffffu; }

// Entry w's change, with the pending output token's penalties on top where it is that token.
fn entryAdj(w: u32, pending: u32, pw: u32) -> Adj {
  var a = Adj(bitcast<f32>(adjust[w + 1u]), bitcast<f32>(adjust[w + 2u]), bitcast<f32>(adjust[w + 3u]));
  if (adjustId(w) == pending) {
    a.rep = bitcast<f32>(params[pw + 10u]);
    let counted = (adjust[w] & 0x80000000u) != 0u;
    a.sub += bitcast<f32>(params[pw + 11u]) + select(bitcast<f32>(params[pw + 12u]), 0.0, counted);
  }
  return a;
}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let k = wid.x + wid.y * nwg.x;
  let row = stepMeta[${META_FULL_LOGIT_ROWS}] + k;
  if (row >= stepMeta[${META_LOGIT_ROWS}]) { return; }
  let base = row * ${vocab}u;
  let pw = k * ${PICK_PARAM_WORDS}u;
  let iw = k * ${PICK_INFO_WORDS}u;

  let logprobs = params[pw + 8u];
  if (logprobs > 0u) { rawLogprobs(lid, base, logprobs - 1u, iw); }

  let nAdjust = params[pw + 7u];
  let first = params[pw + 6u];
  let pendingRow = params[pw + 9u];
  var pending = ${NONE};
  if (pendingRow > 0u) { pending = rowToken(pendingRow - 1u); }
  let pend = Adj(0.0, bitcast<f32>(params[pw + 10u]), bitcast<f32>(params[pw + 11u]) + bitcast<f32>(params[pw + 12u]));
  if (nAdjust > 0u || pendingRow > 0u) {
    if (lid == 0u) { pendingListed = 0u; }
    workgroupBarrier();
    for (var e = lid; e < nAdjust; e += ${WG}u) {
      let w = (first + e) * ${PICK_ADJUST_WORDS}u;
      let id = adjustId(w);
      if (id == pending) { pendingListed = 1u; }
      let at = base + id;
      logits[at] = adjusted(logits[at], entryAdj(w, pending, pw));
    }
    workgroupBarrier();
    if (lid == 0u && pending < ${vocab}u && pendingListed == 0u) { logits[base + pending] = adjusted(logits[base + pending], pend); }
    storageBarrier();
  }

  var chosen = 0u;
  if (params[pw] == 0u) {
    chosen = greedyPick(lid, base);
  } else {
    chosen = drawPick(lid, base, pw);
  }
  if (lid == 0u) {
    picks[k] = chosen;
    if (logprobs > 0u) {
      // The chosen token's raw logit: its adjustment undone where it had one (v = rep⁻¹(v' + subtract) − bias).
      var v = logits[base + chosen];
      var listed = false;
      for (var e = 0u; e < nAdjust; e++) {
        let w = (first + e) * ${PICK_ADJUST_WORDS}u;
        if (adjustId(w) == chosen) {
          v = unadjusted(v, entryAdj(w, pending, pw));
          listed = true;
          break;
        }
      }
      if (!listed && chosen == pending) { v = unadjusted(v, pend); }
      info[iw + 1u] = bitcast<u32>(v);
    }
  }
}
`;
}

/** The pick of every 'argmax' and 'sample' row of a step, into `picks[k]` for the k-th such row. */
export class RowPick {
  private pipeline: GPUComputePipeline;
  private bindGroup: GPUBindGroup;

  constructor(
    private gpu: GpuContext,
    b: { meta: GPUBuffer; logits: GPUBuffer; params: GPUBuffer; picks: GPUBuffer; adjust: GPUBuffer; info: GPUBuffer },
    vocab: number,
  ) {
    this.pipeline = gpu.pipeline(`pick rows v${vocab}`, pickWgsl(vocab));
    this.bindGroup = bindBuffers(gpu, this.pipeline, 'pick rows', [b.meta, b.logits, b.params, b.picks, b.adjust, b.info]);
  }

  encode(pass: GPUComputePassEncoder, rows: number): void {
    if (rows <= 0) return;
    const [x, y] = gridFor(this.gpu, rows);
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, this.bindGroup);
    pass.dispatchWorkgroups(x, y);
  }
}

/** A pick row's logprobs from its info words: the chosen token's raw logprob and the top n (raw logit − log-sum-exp). */
export function readPickLogprobs(info: Uint32Array, k: number): { logprob: number; top: Array<{ tokenId: number; logprob: number }> } {
  const o = k * PICK_INFO_WORDS;
  const f = new Float32Array(info.buffer, info.byteOffset, info.length);
  const lse = f[o];
  const n = info[o + 2];
  const top = Array.from({ length: n }, (_, a) => ({ tokenId: info[o + 4 + a], logprob: f[o + 4 + MAX_TOP_LOGPROBS + a] - lse }));
  return { logprob: f[o + 1] - lse, top };
}

// The MLA decode front: what the MLA block does between its q / latent GEMM and the int8 attention kernel, in one
// dispatch for decode-sized steps. Per layer the staged form runs four dependent dispatches — RoPE on q_pe and k_pe,
// the int8 latent write, the W_UK absorption (staged head kernel) and the int8 query quantizer — each of which moves
// a few hundred KB; on an H100 an 8-row step spent 263 + 337 + 386 + 337 µs a step on them (28 layers, each timed
// alone, 2026-12-06), nearly all of it the dispatches' own latency. Here one workgroup per (head slot, group of rows)
// reads its rows' q_nope and q_pe, rotates q_pe, multiplies W_UK once for all its rows (each weight load shared by the
// group: what the first, per-(head, row) fused quantizer lacked, kernels/mla-head-fused.ts) and quantizes [q̃ | q_pe] into
// the attention's tiled int8 queries; one more workgroup per group of rows rotates k_pe and writes the int8 latent
// rows. The arithmetic is the staged form's, step for step (the same rotation, the same f32 product order within a
// k slice, the same absmax and rounding), so both give the same integers up to f32 summation order.
// Timed alone the front took 551 µs of an 8-row step against the four's 1318; in the pipelined step it took the
// GPU span from 7.90 to 7.66 ms at 8 rows and from 11.46 to 11.11 at 32 (BENCHMARKS.md, tenth pass): the default
// for steps of up to FRONT_MAX_ROWS rows.
import type { RopeLayout } from '../model/config.ts';
import { qqWordWgsl, type MlaTcPlan } from './mla-attention-tc.ts';
import { groupProductDeclWgsl, groupProductWgsl, planGroupProduct, type FusedHeadWeights } from './mla-head-fused.ts';
import type { MlaInt8RowFormat } from './mla-kv-int8.ts';
import { cacheRowWgsl, metaWgsl } from './step-meta.ts';
import { wgslF32 } from './tensors.ts';

/** Threads of a front workgroup. */
export const FRONT_THREADS = 256;
/** Rows a workgroup may take (powers of two dividing FRONT_THREADS). */
export const FRONT_ROWS_PER_WORKGROUP = [1, 2, 4, 8] as const;
export type FrontRowsPerWorkgroup = (typeof FRONT_ROWS_PER_WORKGROUP)[number];
/** Head workgroups a step aims for: rows are grouped until nHeads × groups fits (an H100 has 132 SMs). */
export const FRONT_TARGET_WORKGROUPS = 128;
/** The most rows of a step the serving path sends through the front (--mla-head-kernel front). */
export const FRONT_MAX_ROWS = 32;

export interface MlaFrontSpec {
  nHeads: number;
  /** Head h of a row: [q_nope (dn) | q_pe (r)] at q[row · stride + offset + h · headStride] (before RoPE). */
  q: { stride: number; offset: number; headStride: number };
  /** A row's [c (R) | k_pe (r)] at latent[row · stride + offset] (before RoPE). */
  latent: { stride: number; offset: number };
  dn: number;
  /** Softmax scale folded into both query parts (as the block's absorption does). */
  scale: number;
  ropeLayout: RopeLayout;
  /** W_UK per head, k-major [nHeads · dn, R]. */
  w: FusedHeadWeights;
  format: MlaInt8RowFormat;
  /** The int8 attention's query layout (qqWordWgsl) and head padding. */
  plan: MlaTcPlan;
  blockSize: number;
  rowsPerWorkgroup: FrontRowsPerWorkgroup;
}

/** Rows a workgroup takes for a step of `rows` rows: the fewest that keep nHeads × groups within the target. */
export function frontRowsPerWorkgroup(nHeads: number, rows: number): FrontRowsPerWorkgroup {
  for (const g of FRONT_ROWS_PER_WORKGROUP) if (nHeads * Math.ceil(rows / g) <= FRONT_TARGET_WORKGROUPS) return g;
  return 8;
}

/** The dispatch grid of a step: x = head slots (padded) + the latent-write slot, y = groups of rows. */
export function frontGrid(s: Pick<MlaFrontSpec, 'plan' | 'rowsPerWorkgroup'>, rows: number): [number, number] {
  return [s.plan.headsPadded + 1, Math.ceil(rows / s.rowsPerWorkgroup)];
}

/**
 * Bindings: 0 step meta, 1 q rows, 2 latent rows (may be the same buffer as 1), 3 RoPE table (ropeTable(r)), 4 the
 * layer's W_UK, 5 the layer's int8 latent cache, 6 the int8 queries (qq), 7 their scales (qs).
 */
export function mlaFrontWgsl(s: MlaFrontSpec): string {
  const { nHeads: H, dn, format: f, plan: p } = s;
  const R = f.kvLoraRank;
  const r = f.qkRopeHeadDim;
  const RV = R + r;
  const G = s.rowsPerWorkgroup;
  if (!FRONT_ROWS_PER_WORKGROUP.includes(G)) throw new Error(`MLA front: ${G} rows a workgroup; one of ${FRONT_ROWS_PER_WORKGROUP.join(', ')}`);
  if (r % 2 !== 0) throw new Error(`MLA front: RoPE rotates pairs; qk_rope_head_dim ${r} is odd`);
  if (s.w.K !== dn || s.w.N !== R) throw new Error(`MLA front: W_UK is ${s.w.K} × ${s.w.N}, want ${dn} × ${R}`);
  if (p.latentPad < R || p.ropePad < r) throw new Error(`MLA front: the query plan pads ${p.latentPad} + ${p.ropePad}, the rows hold ${R} + ${r}`);
  const gp = planGroupProduct(s.w, FRONT_THREADS, 8);
  if (typeof gp === 'string') throw new Error(`MLA front: ${gp}`);
  const KP = gp.kp;
  const TPR = FRONT_THREADS / G; // threads a row in the reductions and the packing
  const half = r / 2;
  const sc = wgslF32(s.scale);
  const words = p.rowPad / 4;
  // Value t < r of a pair-rotated part starting at buf[base], at position pos (the Rope kernel's arithmetic).
  const roped = (buf: string, base: string, t: string, pos: string) =>
    s.ropeLayout === 'interleaved'
      ? `rot(${buf}[${base} + (${t} & 0xfffffffeu)], ${buf}[${base} + (${t} | 1u)], table[${pos} * ${half}u + ${t} / 2u], (${t} & 1u) == 1u)`
      : `rot(${buf}[${base} + ${t} % ${half}u], ${buf}[${base} + ${t} % ${half}u + ${half}u], table[${pos} * ${half}u + ${t} % ${half}u], ${t} >= ${half}u)`;
  // The product's sums wait in vt (each row's [q̃ | q_pe] slot); the last slice scales them.
  const product = groupProductWgsl(s.w, gp, G, 'wk', 'qn', (j, n) => `vt[${j * RV}u + ${n}]`, (j, n, v) => `vt[${j * RV}u + ${n}] = ${v} * ${sc};`);
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> lat: array<f32>;
@group(0) @binding(3) var<storage, read> table: array<vec2<f32>>;
${groupProductDeclWgsl(s.w, gp, 4, 'wk')}
@group(0) @binding(5) var<storage, read_write> cache: array<u32>;
@group(0) @binding(6) var<storage, read_write> qq: array<i32>;
@group(0) @binding(7) var<storage, read_write> qs: array<f32>;
${cacheRowWgsl(s.blockSize)}
${qqWordWgsl(p)}
var<workgroup> qn: array<f32, ${G * KP}>;
var<workgroup> vt: array<f32, ${G * RV}>;
var<workgroup> red: array<vec2<u32>, ${FRONT_THREADS}>;

fn rot(x0: f32, x1: f32, cs: vec2<f32>, second: bool) -> f32 {
  if (second) { return x0 * cs.y + x1 * cs.x; }
  return x0 * cs.x - x1 * cs.y;
}

/**
 * Row jr's absmax of its two parts in vt ([0, R) and [R, R + r)) as |x| bits, over the row's TPR threads (non-negative
 * floats order like their u32 bits, and NaN / Inf sort above every finite value: kernels/mla-attention-tc.ts).
 * Every thread of the workgroup calls it (it holds barriers).
 */
fn rowAbsMaxBits(lid: u32, jr: u32, tr: u32) -> vec2<u32> {
  var a = vec2<u32>(0u);
  for (var i = tr; i < ${RV}u; i += ${TPR}u) {
    let v = bitcast<u32>(vt[jr * ${RV}u + i]) & 0x7fffffffu;
    if (i < ${R}u) { a.x = max(a.x, v); } else { a.y = max(a.y, v); }
  }
  red[lid] = a;
  workgroupBarrier();
  for (var t = ${TPR / 2}u; t > 0u; t >>= 1u) {
    if (tr < t) { red[lid] = max(red[lid], red[lid + t]); }
    workgroupBarrier();
  }
  return red[jr * ${TPR}u];
}

/** The cache's scale of a part from its absmax bits: NaN for a non-finite part. */
fn scaleOf(bits: u32) -> f32 {
  return select(bitcast<f32>(bits | 0x7fc00000u), bitcast<f32>(bits) / 127.0, bits < 0x7f800000u);
}

@compute @workgroup_size(${FRONT_THREADS})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = metaRows();
  let row0 = wid.y * ${G}u;
  // The thread's row in the reductions and the packing (TPR threads a row).
  let jr = lid / ${TPR}u;
  let tr = lid % ${TPR}u;
  let rowR = row0 + jr;
  let rowC = min(rowR, max(M, 1u) - 1u);
  if (wid.x == ${p.headsPadded}u) {
    // The latent write: [c | RoPE(k_pe)] of each row, each part quantized with its own scale (kernels/mla-kv-int8.ts).
    for (var e = lid; e < ${G * RV}u; e += ${FRONT_THREADS}u) {
      let row = min(row0 + e / ${RV}u, max(M, 1u) - 1u);
      let i = e % ${RV}u;
      let base = row * ${s.latent.stride}u + ${s.latent.offset}u;
      if (i < ${R}u) {
        vt[e] = lat[base + i];
      } else {
        vt[e] = ${roped('lat', `base + ${R}u`, `(i - ${R}u)`, 'rowPos(row)')};
      }
    }
    workgroupBarrier();
    let bits = rowAbsMaxBits(lid, jr, tr);
    let scale = vec2<f32>(scaleOf(bits.x), scaleOf(bits.y));
    if (rowR < M) {
      let crow = cacheRow(seqBlockTable(rowSeq(rowR)), rowPos(rowR)) * ${f.rowWords}u;
      for (var w = tr; w < ${f.latentWords + f.ropeWords}u; w += ${TPR}u) {
        let rope = w >= ${f.latentWords}u;
        let b = select(bits.x, bits.y, rope);
        let n = select(${R}u, ${r}u, rope);
        let first = select(4u * w, 4u * (w - ${f.latentWords}u), rope);
        let at = jr * ${RV}u + select(0u, ${R}u, rope) + first;
        var word = 0u;
        if (b < 0x7f800000u && b != 0u) {
          var x = vec4<f32>(0.0);
          for (var k = 0u; k < 4u; k++) {
            if (first + k < n) { x[k] = vt[at + k]; }
          }
          word = pack4xI8(vec4<i32>(clamp(round(x / select(scale.x, scale.y, rope)), vec4<f32>(-127.0), vec4<f32>(127.0))));
        }
        cache[crow + w] = word;
      }
      if (tr == 0u) {
        cache[crow + ${f.scaleWord}u] = bitcast<u32>(scale.x);
        cache[crow + ${f.scaleWord + 1}u] = bitcast<u32>(scale.y);
      }
    }
    return;
  }
  // Head slot wid.x: padded slots (past the model's heads) write zeros.
  let hs = wid.x;
  let live = hs < ${H}u;
  let h = min(hs, ${H - 1}u);
  for (var e = lid; e < ${G * KP}u; e += ${FRONT_THREADS}u) {
    let row = min(row0 + e / ${KP}u, max(M, 1u) - 1u);
    let k = e % ${KP}u;
    qn[e] = select(0.0, q[row * ${s.q.stride}u + ${s.q.offset}u + h * ${s.q.headStride}u + min(k, ${dn - 1}u)], k < ${dn}u);
  }
  for (var e = lid; e < ${G * r}u; e += ${FRONT_THREADS}u) {
    let row = min(row0 + e / ${r}u, max(M, 1u) - 1u);
    let t = e % ${r}u;
    let base = row * ${s.q.stride}u + ${s.q.offset}u + h * ${s.q.headStride}u + ${dn}u;
    vt[(e / ${r}u) * ${RV}u + ${R}u + t] = ${roped('q', 'base', 't', 'rowPos(row)')} * ${sc};
  }
  workgroupBarrier();
  // Each weight load serves every row of the group.
  ${product}
  let absMax = select(vec2<f32>(0.0), bitcast<vec2<f32>>(rowAbsMaxBits(lid, jr, tr)), live);
  let inv = select(vec2<f32>(0.0), 127.0 / absMax, absMax > vec2<f32>(0.0));
  if (rowR < M) {
    for (var w = tr; w < ${words}u; w += ${TPR}u) {
      var v = vec4<f32>(0.0);
      for (var i = 0u; i < 4u; i++) {
        let b = 4u * w + i;
        if (live && b < ${R}u) { v[i] = vt[jr * ${RV}u + b] * inv.x; }
        if (live && b >= ${p.latentPad}u && b - ${p.latentPad}u < ${r}u) { v[i] = vt[jr * ${RV}u + ${R}u + b - ${p.latentPad}u] * inv.y; }
      }
      qq[qqWord(rowR, hs, w)] = bitcast<i32>(pack4xI8(vec4<i32>(clamp(round(v), vec4<f32>(-127.0), vec4<f32>(127.0)))));
    }
    if (tr == 0u) {
      qs[2u * (rowR * ${p.headsPadded}u + hs)] = absMax.x / 127.0;
      qs[2u * (rowR * ${p.headsPadded}u + hs) + 1u] = absMax.y / 127.0;
    }
  }
}
`;
}

// The MLA decode back: the split-K merge of the attention's partials and the W_UV product in one dispatch for
// decode-sized steps, the counterpart of kernels/mla-front.ts. The staged form runs the merge (one workgroup per
// (head, row), ô to memory) and then the staged W_UV kernel; on an H100 an 8-row step spent 371 + 384 µs a step on
// the two (28 layers, each timed alone, 2026-12-06). The first fused form (removed: kernels/mla-head-fused.ts) streamed
// each head's 128 KB W_UV once per row; here one workgroup per (head, group of rows) merges its rows' partials — a
// row's threads reduce its chunks' m and l, then each sums its share of ô over the chunks — and multiplies W_UV once
// for all its rows. Same arithmetic as the merge kernel (kernels/split-merge.ts) and a staged product, in another
// order of f32 sums. Timed alone it took 615 µs of an 8-row step against the pair's 754, but the pipelined step did
// not move (7.99 against 7.96 ms at 8 rows, 11.50 against 11.50 at 32; BENCHMARKS.md, tenth pass): off by default.
import { groupProductDeclWgsl, groupProductWgsl, planGroupProduct, type FusedHeadWeights } from './mla-head-fused.ts';
import { FRONT_ROWS_PER_WORKGROUP, FRONT_THREADS, type FrontRowsPerWorkgroup } from './mla-front.ts';
import { NEG_BIG } from './split-merge.ts';
import { metaWgsl, META_CHUNK, META_MAX_CHUNKS } from './step-meta.ts';

export interface MlaBackSpec {
  nHeads: number;
  /** The merged width (kv_lora_rank): partials hold [m, l, o[width]] per (row, head, chunk). */
  width: number;
  /** W_UV per head, k-major [nHeads · width, N]. */
  w: FusedHeadWeights;
  /** Output n of head h of row r at out[r · outStride + h · outHeadStride + n]. */
  outStride: number;
  outHeadStride: number;
  rowsPerWorkgroup: FrontRowsPerWorkgroup;
}

/** The dispatch grid of a step: x = heads, y = groups of rows. */
export function backGrid(s: Pick<MlaBackSpec, 'nHeads' | 'rowsPerWorkgroup'>, rows: number): [number, number] {
  return [s.nHeads, Math.ceil(rows / s.rowsPerWorkgroup)];
}

/** Bindings: 0 step meta, 1 the attention's partials, 2 the layer's W_UV, 3 out. */
export function mlaBackWgsl(s: MlaBackSpec): string {
  const G = s.rowsPerWorkgroup;
  if (!FRONT_ROWS_PER_WORKGROUP.includes(G)) throw new Error(`MLA back: ${G} rows a workgroup; one of ${FRONT_ROWS_PER_WORKGROUP.join(', ')}`);
  if (s.w.K !== s.width) throw new Error(`MLA back: W_UV's K ${s.w.K} is not the merged width ${s.width}`);
  // 4 outputs a thread: W_UV's 128 outputs are 32 units, so 8 k slices meet (8 f16 a thread: 16 slices, 16 rounds).
  const gp = planGroupProduct(s.w, FRONT_THREADS, 4);
  if (typeof gp === 'string') throw new Error(`MLA back: ${gp}`);
  const W = s.width;
  const P = W + 2;
  const KP = gp.kp;
  const N = s.w.N;
  const TPR = FRONT_THREADS / G;
  const D = Math.ceil(KP / TPR); // ô values a thread merges (k = tr + i · TPR)
  const ds = [...Array(D).keys()];
  const product = groupProductWgsl(
    s.w,
    gp,
    G,
    'wv',
    'oh',
    (j, n) => `ot[${j * N}u + ${n}]`,
    (j, n, v) => `if (row0 + ${j}u < M) { out[(row0 + ${j}u) * ${s.outStride}u + h * ${s.outHeadStride}u + ${n}] = ${v}; }`,
  );
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> partials: array<f32>;
${groupProductDeclWgsl(s.w, gp, 2, 'wv')}
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
var<workgroup> red: array<f32, ${FRONT_THREADS}>;
var<workgroup> oh: array<f32, ${G * KP}>;
var<workgroup> ot: array<f32, ${G * N}>;

@compute @workgroup_size(${FRONT_THREADS})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let M = metaRows();
  let h = wid.x;
  let row0 = wid.y * ${G}u;
  // The thread's row (TPR threads a row) and its place among them; rows past the step repeat the last.
  let jr = lid / ${TPR}u;
  let tr = lid % ${TPR}u;
  let row = min(row0 + jr, max(M, 1u) - 1u);
  let chunk = stepMeta[${META_CHUNK}];
  let nc = (rowPos(row) + chunk) / chunk;
  let base0 = (row * ${s.nHeads}u + h) * stepMeta[${META_MAX_CHUNKS}] * ${P}u;
  var m = ${NEG_BIG};
  for (var c = tr; c < nc; c += ${TPR}u) { m = max(m, partials[base0 + c * ${P}u]); }
  red[lid] = m;
  workgroupBarrier();
  for (var t = ${TPR / 2}u; t > 0u; t >>= 1u) {
    if (tr < t) { red[lid] = max(red[lid], red[lid + t]); }
    workgroupBarrier();
  }
  let mAll = red[jr * ${TPR}u];
  workgroupBarrier();
  var l = 0.0;
  for (var c = tr; c < nc; c += ${TPR}u) {
    let b = base0 + c * ${P}u;
    l += exp(partials[b] - mAll) * partials[b + 1u];
  }
  red[lid] = l;
  workgroupBarrier();
  for (var t = ${TPR / 2}u; t > 0u; t >>= 1u) {
    if (tr < t) { red[lid] += red[lid + t]; }
    workgroupBarrier();
  }
  let inv = 1.0 / red[jr * ${TPR}u];
  ${ds.map((i) => `var o${i} = 0.0;`).join('\n  ')}
  for (var c = 0u; c < nc; c++) {
    let b = base0 + c * ${P}u;
    let wc = exp(partials[b] - mAll);
    ${ds.map((i) => ((i + 1) * TPR <= W ? `o${i} += wc * partials[b + 2u + tr + ${i * TPR}u];` : `if (tr + ${i * TPR}u < ${W}u) { o${i} += wc * partials[b + 2u + tr + ${i * TPR}u]; }`)).join('\n    ')}
  }
  // ô past the width (the product's zero padding) is zero even where inv is not finite.
  ${ds.map((i) => `if (tr + ${i * TPR}u < ${KP}u) { oh[jr * ${KP}u + tr + ${i * TPR}u] = select(0.0, o${i} * inv, tr + ${i * TPR}u < ${W}u); }`).join('\n  ')}
  workgroupBarrier();
  ${product}
}
`;
}

// The merge pass of split-K (flash-decoding) attention, shared by the GQA and MLA kernels.
import { metaWgsl, META_CHUNK, META_MAX_CHUNKS } from './step-meta.ts';

/** A running max that any real score exceeds (WGSL literal). */
export const NEG_BIG = '-3.0e38';
const MERGE_WG = 128;
/** Chunk weights staged in workgroup memory at a time. */
const WEIGHT_TILE = 256;

/**
 * Merges per-chunk partials into each (row, head)'s output. Partials hold, per (row, head, chunk),
 * [running max m, sum of exp l, unnormalized output o[width]]; the chunk count of a row follows from its
 * position and the step's chunk size. Dispatch (nHeads, rows); binding 1 = partials, 2 = out.
 *
 * Every loop that waits on memory runs across threads or keeps several loads in flight: the chunks' m and l are
 * reduced by all threads, each chunk's weight exp(m − M) is computed once into workgroup memory, and each thread
 * sums ⌈width / ${MERGE_WG}⌉ output values (consecutive threads on consecutive values) with one independent load per value per
 * chunk. The first form had one thread walk every chunk for m, then l, then each of its values with a load and an exp
 * per step: on the H200 an 8-row MLA step spent 28 µs a layer merging 8 chunks (3.7 MB, ~130 GB/s).
 */
export function splitKMergeWgsl(nHeads: number, width: number, outStride: number): string {
  const P = width + 2;
  const D = Math.ceil(width / MERGE_WG);
  const ds = [...Array(D).keys()];
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
var<workgroup> red: array<f32, ${MERGE_WG}>;
var<workgroup> weight: array<f32, ${WEIGHT_TILE}>;
var<workgroup> chunks: u32;

@compute @workgroup_size(${MERGE_WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let h = wid.x;
  let r = wid.y;
  if (lid == 0u) {
    let chunk = stepMeta[${META_CHUNK}];
    chunks = (rowPos(r) + chunk) / chunk;
  }
  let nc = workgroupUniformLoad(&chunks);
  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  let base0 = (r * ${nHeads}u + h) * maxChunks * ${P}u;
  var m = ${NEG_BIG};
  for (var c = lid; c < nc; c += ${MERGE_WG}u) { m = max(m, partials[base0 + c * ${P}u]); }
  red[lid] = m;
  workgroupBarrier();
  for (var s = ${MERGE_WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
    workgroupBarrier();
  }
  let mAll = red[0];
  workgroupBarrier();
  var l = 0.0;
  for (var c = lid; c < nc; c += ${MERGE_WG}u) {
    let b = base0 + c * ${P}u;
    l += exp(partials[b] - mAll) * partials[b + 1u];
  }
  red[lid] = l;
  workgroupBarrier();
  for (var s = ${MERGE_WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  let inv = 1.0 / red[0];
  ${ds.map((j) => `var o${j} = 0.0;`).join('\n  ')}
  for (var c0 = 0u; c0 < nc; c0 += ${WEIGHT_TILE}u) {
    let n = min(${WEIGHT_TILE}u, nc - c0);
    for (var i = lid; i < n; i += ${MERGE_WG}u) { weight[i] = exp(partials[base0 + (c0 + i) * ${P}u] - mAll); }
    workgroupBarrier();
    for (var i = 0u; i < n; i++) {
      let wc = weight[i];
      let b = base0 + (c0 + i) * ${P}u + 2u + lid;
      ${ds.map((j) => ((j + 1) * MERGE_WG <= width ? `o${j} += wc * partials[b + ${j * MERGE_WG}u];` : `if (lid + ${j * MERGE_WG}u < ${width}u) { o${j} += wc * partials[b + ${j * MERGE_WG}u]; }`)).join('\n      ')}
    }
    workgroupBarrier();
  }
  ${ds.map((j) => `if (lid + ${j * MERGE_WG}u < ${width}u) { out[r * ${outStride}u + h * ${width}u + lid + ${j * MERGE_WG}u] = o${j} * inv; }`).join('\n  ')}
}`;
}

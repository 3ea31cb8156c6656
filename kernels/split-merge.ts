// The merge pass of split-K (flash-decoding) attention, shared by the GQA and MLA kernels.
import { metaWgsl, META_CHUNK, META_MAX_CHUNKS } from './step-meta.ts';

/** A running max that any real score exceeds (WGSL literal). */
export const NEG_BIG = '-3.0e38';
const MERGE_WG = 64;

/**
 * Merges per-chunk partials into each (row, head)'s output. Partials hold, per (row, head, chunk),
 * [running max m, sum of exp l, unnormalized output o[width]]; the chunk count of a row follows from its
 * position and the step's chunk size. Dispatch (nHeads, rows); binding 1 = partials, 2 = out.
 */
export function splitKMergeWgsl(nHeads: number, width: number, outStride: number): string {
  const P = width + 2;
  return /* wgsl */ `
${metaWgsl(0)}
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(${MERGE_WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let h = wid.x;
  let r = wid.y;
  let chunk = stepMeta[${META_CHUNK}];
  let maxChunks = stepMeta[${META_MAX_CHUNKS}];
  let nc = (rowPos(r) + chunk) / chunk;
  let base0 = (r * ${nHeads}u + h) * maxChunks * ${P}u;
  var m = ${NEG_BIG};
  for (var c = 0u; c < nc; c++) { m = max(m, partials[base0 + c * ${P}u]); }
  var l = 0.0;
  for (var c = 0u; c < nc; c++) {
    let b = base0 + c * ${P}u;
    l += exp(partials[b] - m) * partials[b + 1u];
  }
  let inv = 1.0 / l;
  for (var d = lid; d < ${width}u; d += ${MERGE_WG}u) {
    var o = 0.0;
    for (var c = 0u; c < nc; c++) {
      let b = base0 + c * ${P}u;
      o += exp(partials[b] - m) * partials[b + 2u + d];
    }
    out[r * ${outStride}u + h * ${width}u + d] = o * inv;
  }
}`;
}

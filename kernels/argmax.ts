// Greedy picks on the GPU: the first index of each logits row's largest value, so a greedy sequence reads back one
// token id instead of a vocabulary-wide row (152K floats for Qwen2.5).
import type { GpuContext } from './device.ts';
import { META_FULL_LOGIT_ROWS, META_LOGIT_ROWS } from './step-meta.ts';
import { bindBuffers, gridFor } from './tensors.ts';

const WG = 256;

/**
 * One workgroup per 'argmax' row (logits rows META_FULL_LOGIT_ROWS … META_LOGIT_ROWS − 1): each thread keeps the
 * largest value it sees and its first index, then a tree over the workgroup keeps the larger value, the lower index on
 * ties. NaN never wins (as `v > best` on the host); a row with no comparable value gives 0.
 */
export function argmaxWgsl(vocab: number): string {
  return /* wgsl */ `
@group(0) @binding(0) var<storage, read> stepMeta: array<u32>;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> picks: array<u32>;
var<workgroup> bestValue: array<f32, ${WG}>;
var<workgroup> bestIndex: array<u32, ${WG}>;

fn better(v: f32, i: u32, w: f32, j: u32) -> bool {
  return v > w || (v == w && i < j);
}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let k = wid.x + wid.y * nwg.x;
  let first = stepMeta[${META_FULL_LOGIT_ROWS}];
  let row = first + k;
  if (row >= stepMeta[${META_LOGIT_ROWS}]) { return; }
  let base = row * ${vocab}u;
  var bv = bitcast<f32>(0xff7fffffu); // -FLT_MAX: every finite value ties or beats it
  var bi = 0xffffffffu;
  for (var i = lid; i < ${vocab}u; i += ${WG}u) {
    let v = logits[base + i];
    if (better(v, i, bv, bi)) { bv = v; bi = i; }
  }
  bestValue[lid] = bv;
  bestIndex[lid] = bi;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s && better(bestValue[lid + s], bestIndex[lid + s], bestValue[lid], bestIndex[lid])) {
      bestValue[lid] = bestValue[lid + s];
      bestIndex[lid] = bestIndex[lid + s];
    }
    workgroupBarrier();
  }
  if (lid == 0u) { picks[k] = select(bestIndex[0], 0u, bestIndex[0] == 0xffffffffu); }
}
`;
}

/** The greedy pick of every 'argmax' row of a step, into `picks[k]` for the k-th such row. */
export class RowArgmax {
  private pipeline: GPUComputePipeline;
  private bindGroup: GPUBindGroup;

  constructor(
    private gpu: GpuContext,
    b: { meta: GPUBuffer; logits: GPUBuffer; picks: GPUBuffer },
    vocab: number,
  ) {
    this.pipeline = gpu.pipeline(`argmax rows v${vocab}`, argmaxWgsl(vocab));
    this.bindGroup = bindBuffers(gpu, this.pipeline, 'argmax rows', [b.meta, b.logits, b.picks]);
  }

  encode(pass: GPUComputePassEncoder, rows: number): void {
    if (rows <= 0) return;
    const [x, y] = gridFor(this.gpu, rows);
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, this.bindGroup);
    pass.dispatchWorkgroups(x, y);
  }
}

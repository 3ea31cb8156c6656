// Per-dispatch GPU times of one runner step: every dispatch recorded in a compute pass of its own with timestamps at
// its beginning and end. The kernels run as in a plain step; the pass boundaries add a little GPU time of their own,
// so the sum of the dispatch times is set against a plain step's span to see what the gaps between dispatches cost.

/** One dispatch of a profiled step: the pipeline's label and its GPU time. */
export interface DispatchTime {
  label: string;
  ms: number;
}

/** Timestamp slots for up to `maxDispatches` dispatches, reused by every profiled step of a runner. */
export class StepProfiler {
  readonly maxDispatches: number;
  private readonly queries: GPUQuerySet;
  private readonly resolve: GPUBuffer;
  private readonly read: GPUBuffer;

  constructor(private device: GPUDevice) {
    // 4096 is WebGPU's largest query set.
    this.maxDispatches = 2048;
    const bytes = 2 * this.maxDispatches * 8;
    this.queries = device.createQuerySet({ label: 'step profile timestamps', type: 'timestamp', count: 2 * this.maxDispatches });
    this.resolve = device.createBuffer({ label: 'step profile resolve', size: bytes, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
    this.read = device.createBuffer({ label: 'step profile read', size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  }

  /**
   * A stand-in for a compute pass of `enc` that the ops record into as usual: each dispatch goes into its own
   * timestamped pass. `finish` records the resolve; `times` reads the result after the step's submit.
   */
  begin(enc: GPUCommandEncoder): ProfilingPass {
    return new ProfilingPass(enc, this.queries, this.maxDispatches);
  }

  finish(enc: GPUCommandEncoder, pass: ProfilingPass): void {
    const n = 2 * pass.labels.length;
    if (n === 0) return;
    enc.resolveQuerySet(this.queries, 0, n, this.resolve, 0);
    enc.copyBufferToBuffer(this.resolve, 0, this.read, 0, n * 8);
  }

  async times(pass: ProfilingPass): Promise<DispatchTime[]> {
    const n = 2 * pass.labels.length;
    if (n === 0) return [];
    await this.read.mapAsync(GPUMapMode.READ, 0, n * 8);
    const t = new BigUint64Array(this.read.getMappedRange(0, n * 8).slice(0));
    this.read.unmap();
    return pass.labels.map((label, i) => ({ label, ms: t[2 * i + 1] > t[2 * i] ? Number(t[2 * i + 1] - t[2 * i]) / 1e6 : 0 }));
  }

  destroy(): void {
    this.queries.destroy();
    this.resolve.destroy();
    this.read.destroy();
  }
}

/** Records setPipeline / setBindGroup and replays them into a fresh timestamped pass at every dispatch. */
export class ProfilingPass {
  readonly labels: string[] = [];
  private pipeline: GPUComputePipeline | undefined;
  private bindGroups = new Map<number, GPUBindGroup>();

  constructor(
    private enc: GPUCommandEncoder,
    private queries: GPUQuerySet,
    private maxDispatches: number,
  ) {}

  setPipeline(p: GPUComputePipeline): void {
    this.pipeline = p;
  }

  setBindGroup(index: number, group: GPUBindGroup | null): void {
    if (group) this.bindGroups.set(index, group);
    else this.bindGroups.delete(index);
  }

  dispatchWorkgroups(x: number, y = 1, z = 1): void {
    const k = this.labels.length;
    if (k >= this.maxDispatches) throw new Error(`step profile: more than ${this.maxDispatches} dispatches in one step`);
    if (!this.pipeline) throw new Error('step profile: dispatch without a pipeline');
    const pass = this.enc.beginComputePass({
      label: `profile ${k}`,
      timestampWrites: { querySet: this.queries, beginningOfPassWriteIndex: 2 * k, endOfPassWriteIndex: 2 * k + 1 },
    });
    pass.setPipeline(this.pipeline);
    for (const [i, g] of this.bindGroups) pass.setBindGroup(i, g);
    pass.dispatchWorkgroups(x, y, z);
    pass.end();
    this.labels.push(this.pipeline.label || '(unlabelled)');
  }

  /** The real passes end at each dispatch. */
  end(): void {}
}

/** Dispatch times summed per label, largest first, with the number of dispatches per step. */
export function summarizeProfile(times: DispatchTime[]): Array<{ label: string; count: number; ms: number }> {
  const by = new Map<string, { label: string; count: number; ms: number }>();
  for (const t of times) {
    const e = by.get(t.label) ?? { label: t.label, count: 0, ms: 0 };
    e.count++;
    e.ms += t.ms;
    by.set(t.label, e);
  }
  return [...by.values()].sort((a, b) => b.ms - a.ms);
}

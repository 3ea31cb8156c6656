// Kernel micro-benchmark: the packed-f16 matmul at Qwen2.5-7B decode shapes, achieved GB/s against the HBM read ceiling.
//
//   npm run bench:kernels                       # full shapes (needs a real GPU; ~1.4 GB of random weights)
//   npm run bench:kernels -- --quick            # small shapes, checks that it runs (SwiftShader)
//   npm run bench:kernels -- --json out.json    # also write every measurement as JSON
//   options: --ceiling-gbs 4300  --target-bytes 8e9  --rows 1,8,32,64  --all (print every variant, not just the best)
//            --only default,t32 (variant names containing these)  --dawn-flag enable-dawn-features=… (repeatable)
import { writeFileSync } from 'node:fs';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { MatmulOp, defaultMatmulTuning, type MatmulTuning } from '../kernels/matmul.ts';
import { readBack, spinUpGpu, timeGpuPass } from './gpu-timing.ts';
import { bindBuffers, f16BitsToF32, gridFor, pad8, storageBuffer, uploadArray, type GpuMatrix } from '../kernels/tensors.ts';

interface Args {
  quick: boolean;
  json?: string;
  ceilingGBs: number;
  targetBytes: number;
  rows: number[];
  all: boolean;
  /** Only variants whose name contains one of these (the stream controls always run). */
  only: string[];
  /** Dawn toggles for create(), e.g. enable-dawn-features=allow_unsafe_apis,disable_robustness (an A/B of Dawn's checks). */
  dawnFlags: string[];
}

function parseArgs(argv: string[]): Args {
  const a: Args = { quick: false, ceilingGBs: 4300, targetBytes: 8e9, rows: [1, 8, 32, 64], all: false, only: [], dawnFlags: [] };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const val = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${k} needs a value`);
      return v;
    };
    if (k === '--quick') a.quick = true;
    else if (k === '--json') a.json = val();
    else if (k === '--ceiling-gbs') a.ceilingGBs = Number(val());
    else if (k === '--target-bytes') a.targetBytes = Number(val());
    else if (k === '--rows') a.rows = val().split(',').map(Number);
    else if (k === '--all') a.all = true;
    else if (k === '--only') a.only = val().split(',');
    else if (k === '--dawn-flag') a.dawnFlags.push(val());
    else throw new Error(`unknown option ${k}; see the top of bench/kernels.ts`);
  }
  if (a.quick) {
    a.targetBytes = Math.min(a.targetBytes, 2e6);
    if (!argv.includes('--rows')) a.rows = [1, 8, 32];
  }
  return a;
}

/** Random f16 weights packed two per u32 (|w| in [1/16, 1)), generated directly as bits: no f32 round trip. */
function randomPackedF16(words: number, seed: number): Uint32Array {
  const out = new Uint32Array(words);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < words; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    const r = s >>> 0;
    const half = (r: number) => ((r & 1) << 15) | ((11 + ((r >>> 1) & 3)) << 10) | ((r >>> 3) & 0x3ff);
    out[i] = (half(r & 0xffff) | (half(r >>> 16) << 16)) >>> 0;
  }
  return out;
}

interface RandomMatrix {
  gpu: GpuMatrix;
  data: Uint32Array;
}

function uploadRandomF16(gpu: GpuContext, label: string, rows: number, cols: number, seed: number): RandomMatrix {
  const stride = pad8(cols);
  const wordsPerRow = stride / 2;
  const data = randomPackedF16(rows * wordsPerRow, seed);
  // Zero the padding so the layout matches uploadMatrix's.
  if (stride !== cols) for (let r = 0; r < rows; r++) for (let c = cols; c < stride; c += 2) data[r * wordsPerRow + c / 2] = 0;
  const maxBinding = gpu.limits.maxStorageBufferBindingSize;
  const perPiece = Math.floor(maxBinding / (stride * 2));
  const pieces: GpuMatrix['pieces'] = [];
  for (let r0 = 0; r0 < rows; r0 += perPiece) {
    const n = Math.min(perPiece, rows - r0);
    const buffer = gpu.device.createBuffer({ label: `${label}[${r0}..)`, size: n * stride * 2, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST });
    const chunkWords = 1 << 24; // write in 64 MiB slices
    for (let w = 0; w < n * wordsPerRow; w += chunkWords) {
      const len = Math.min(chunkWords, n * wordsPerRow - w);
      gpu.device.queue.writeBuffer(buffer, w * 4, data.buffer, data.byteOffset + (r0 * wordsPerRow + w) * 4, len * 4);
    }
    pieces.push({ buffer, rowStart: r0, rows: n });
  }
  return { gpu: { label, rows, cols, dtype: 'f16', stride, pieces, bytes: rows * stride * 2 }, data };
}

interface Variant {
  name: string;
  tuning: Partial<MatmulTuning>;
}

/** A GEMV layout: threads per row group, rows per thread, row groups per workgroup, unroll, grid-stride workgroups (0 = none). */
type GemvLayout = [tpr: number, rpt: number, rpw: number, unroll: number, workgroups: number];
/** A GEMM tiling: tile M, tile N, tile K, rows per thread, features per thread, split-K (0 = automatic). */
type GemmLayout = [bm: number, bn: number, bk: number, tm: number, tn: number, split: number];

const GEMV_SWEEP: GemvLayout[] = [
  [32, 1, 8, 2, 0], // the first version's default layout (one subgroup per row, 8 rows per workgroup)
  [32, 4, 4, 1, 0],
  [32, 4, 4, 2, 0],
  [32, 4, 2, 2, 0],
  [32, 4, 4, 1, 1056],
  [32, 4, 4, 2, 1056],
  [32, 4, 8, 1, 1056],
  [32, 2, 8, 2, 1056],
  [64, 4, 4, 1, 0],
  [64, 4, 4, 2, 0],
  [64, 4, 2, 2, 0],
  [128, 4, 2, 1, 0],
  [128, 4, 2, 2, 0],
  [128, 2, 2, 2, 0],
  [128, 4, 1, 1, 0],
  [256, 4, 1, 1, 0],
];

const GEMM_SWEEP: GemmLayout[] = [
  [64, 256, 16, 8, 8, 0],
  [64, 256, 16, 8, 8, 1],
  [64, 256, 16, 8, 8, 4],
  [64, 256, 16, 8, 8, 16],
  [64, 256, 8, 8, 8, 0],
  [64, 128, 16, 8, 8, 0],
  [64, 128, 16, 4, 8, 0],
  [64, 128, 32, 4, 8, 0],
  [32, 64, 32, 4, 4, 0],
];

const gemvName = ([tpr, rpt, rpw, u, g]: GemvLayout) => `gemv t${tpr} r${rpt}×${rpw} u${u}${g ? ` g${g}` : ''}`;
const gemmName = ([bm, bn, bk, tm, tn, s]: GemmLayout) => `gemm ${bm}×${bn}×${bk} ${tm}×${tn}${s === 1 ? ' nosplit' : s > 1 ? ` split${s}` : ''}`;

function variantsFor(gpu: GpuContext, args: Args, rows: number, cols: number, outFeatures: number): Variant[] {
  const quick = args.quick;
  const def = defaultMatmulTuning(gpu, cols, outFeatures, rows);
  const list: Variant[] = [{ name: 'default', tuning: {} }];
  const maxWg = gpu.limits.maxComputeInvocationsPerWorkgroup;
  if (rows <= def.gemvMaxRows) {
    for (const l of quick ? ([[32, 1, 8, 2, 0], [4, 2, 8, 2, 0], [32, 1, 8, 4, 1056], [64, 2, 4, 2, 0]] as GemvLayout[]) : GEMV_SWEEP) {
      const [tpr, rpt, rpw, unroll, wgs] = l;
      if (tpr * rpw > maxWg) continue;
      const same = tpr === def.gemvThreadsPerRow && rpt === def.gemvRowsPerThread && rpw === def.gemvRowsPerWorkgroup && unroll === def.gemvUnroll && wgs === def.gemvWorkgroups;
      if (same) continue;
      list.push({
        name: gemvName(l),
        tuning: { gemvThreadsPerRow: tpr, gemvRowsPerThread: rpt, gemvRowsPerWorkgroup: rpw, gemvUnroll: unroll, gemvWorkgroups: wgs },
      });
    }
    if (rows > 1) list.push({ name: 'gemm (tiled, default tiles)', tuning: { gemvMaxRows: 0 } });
  } else {
    for (const l of quick ? [GEMM_SWEEP[2], GEMM_SWEEP[8]] : GEMM_SWEEP) {
      const [bm, bn, bk, tm, tn, split] = l;
      if (bm === def.gemmTileM && bn === def.gemmTileN && bk === def.gemmTileK && tm === def.gemmThreadM && tn === def.gemmThreadN && split === def.gemmSplitK) continue;
      list.push({ name: gemmName(l), tuning: { gemmTileM: bm, gemmTileN: bn, gemmTileK: bk, gemmThreadM: tm, gemmThreadN: tn, gemmSplitK: split } });
    }
  }
  return args.only.length ? list.filter((v) => args.only.some((o) => v.name.includes(o))) : list;
}

/**
 * Control: a pure streaming read of the same weight buffer (each thread XORs vec4<u32> words, `unroll` in flight),
 * the ceiling this machine reaches through Dawn for these bytes.
 */
function streamWgsl(words: number, unroll: number, gridStride: boolean): string {
  const us = [...Array(unroll).keys()];
  return /* wgsl */ `
@group(0) @binding(0) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let threads = nwg.x * nwg.y * 256u;
  let t = (wid.x + wid.y * nwg.x) * 256u + lid;
  var acc = vec4<u32>(0u);
  ${
    gridStride
      ? `for (var i = t; i + ${unroll - 1}u * threads < ${words}u; i += ${unroll}u * threads) {
    ${us.map((u) => `let v${u} = w[i + ${u}u * threads];`).join('\n    ')}
    acc ^= ${us.map((u) => `v${u}`).join(' ^ ')};
  }`
      : `let base = (t / 256u) * ${256 * unroll}u + t % 256u;
  ${us.map((u) => `let v${u} = w[min(base + ${u * 256}u, ${words - 1}u)];`).join('\n  ')}
  acc ^= ${us.map((u) => `v${u}`).join(' ^ ')};`
  }
  let r = acc.x ^ acc.y ^ acc.z ^ acc.w;
  if (r == 0x9e3779b9u) { sink[0] = r; }
}
`;
}

async function benchStream(gpu: GpuContext, args: Args, w: GpuMatrix, shape: string): Promise<Measurement[]> {
  const sink = storageBuffer(gpu, 'stream sink', 16);
  const out: Measurement[] = [];
  for (const [unroll, gridStride] of [
    [4, false],
    [8, false],
    [4, true],
  ] as const) {
    const setups = w.pieces.map((p) => {
      const words = (p.rows * w.stride) / 8;
      const pipeline = gpu.pipeline(`stream ${words} u${unroll} ${gridStride}`, streamWgsl(words, unroll, gridStride));
      const groups = gridStride ? Math.min(132 * 8, Math.ceil(words / 256)) : Math.ceil(words / (256 * unroll));
      return { pipeline, bind: bindBuffers(gpu, pipeline, 'stream', [p.buffer, sink]), grid: gridFor(gpu, groups) };
    });
    const encode = (pass: GPUComputePassEncoder) => {
      for (const s of setups) {
        pass.setPipeline(s.pipeline);
        pass.setBindGroup(0, s.bind);
        pass.dispatchWorkgroups(s.grid[0], s.grid[1]);
      }
    };
    const iterations = Math.max(args.quick ? 2 : 3, Math.min(2000, Math.ceil(args.targetBytes / w.bytes)));
    await timeGpuPass(gpu, encode);
    if (!args.quick) await spinUpGpu(gpu, (p) => { for (let i = 0; i < iterations; i++) encode(p); });
    const t = await timeGpuPass(gpu, (p) => { for (let i = 0; i < iterations; i++) encode(p); });
    const sec = t.ns / 1e9 / iterations;
    const gbPerS = w.bytes / sec / 1e9;
    out.push({
      shape, n: w.rows, k: w.cols, rows: 0, variant: `control: stream read u${unroll}${gridStride ? ' grid-stride' : ''}`, iterations,
      usPerIter: sec * 1e6, wallUsPerIter: t.wallNs / 1e3 / iterations, timing: t.timestamps ? 'timestamp' : 'wall',
      bytesPerIter: w.bytes, gbPerS, ceilingRatio: gbPerS / args.ceilingGBs, gflops: 0, maxRelError: 0,
    });
    process.stderr.write(`    control stream u${unroll}${gridStride ? ' grid-stride' : ''}: ${(sec * 1e6).toFixed(1)} µs, ${gbPerS.toFixed(0)} GB/s\n`);
  }
  sink.destroy();
  return out;
}

interface Measurement {
  shape: string;
  n: number;
  k: number;
  rows: number;
  variant: string;
  iterations: number;
  usPerIter: number;
  /** Wall clock over the same submit (includes the ~45 µs submit round trip, spread over the iterations). */
  wallUsPerIter: number;
  timing: 'timestamp' | 'wall';
  bytesPerIter: number;
  gbPerS: number;
  ceilingRatio: number;
  gflops: number;
  maxRelError: number;
}


async function benchShape(gpu: GpuContext, args: Args, n: number, k: number, seed: number): Promise<Measurement[]> {
  const shape = `${k}→${n}`;
  process.stderr.write(`  ${shape}: generating ${((n * pad8(k) * 2) / 1e9).toFixed(2)} GB of random f16 weights…\n`);
  const w = uploadRandomF16(gpu, `W ${shape}`, n, k, seed);
  const maxRows = Math.max(...args.rows);
  const x = new Float32Array(maxRows * pad8(k));
  for (let i = 0; i < x.length; i++) x[i] = Math.sin(i * 0.618 + seed) * 0.5;
  const xBuf = uploadArray(gpu, 'x', x);
  const yBuf = storageBuffer(gpu, 'y', maxRows * n * 4, 0);
  const meta = storageBuffer(gpu, 'meta', 64);
  const out: Measurement[] = await benchStream(gpu, args, w.gpu, shape);
  for (const rows of args.rows) {
    gpu.device.queue.writeBuffer(meta, 0, new Uint32Array(16).fill(rows, 0, 1));
    for (const v of variantsFor(gpu, args, rows, k, n)) {
      const op = new MatmulOp(gpu, w.gpu, { meta, rowsSlot: 0, x: xBuf, xStride: pad8(k), y: yBuf, yStride: n }, v.tuning);
      // Poison y so that an output a variant fails to write shows up (the previous variant's results would pass).
      gpu.device.queue.writeBuffer(yBuf, 0, new Float32Array(maxRows * n).fill(NaN));
      const bytesPerIter = w.gpu.bytes + rows * k * 4 + rows * n * 4;
      const iterations = Math.max(args.quick ? 2 : 3, Math.min(2000, Math.ceil(args.targetBytes / bytesPerIter)));
      await timeGpuPass(gpu, (p) => op.encode(p, rows)); // compile + warm
      if (!args.quick) await spinUpGpu(gpu, (p) => { for (let i = 0; i < iterations; i++) op.encode(p, rows); });
      const t = await timeGpuPass(gpu, (p) => { for (let i = 0; i < iterations; i++) op.encode(p, rows); });
      const ns = t.ns;
      const sec = ns / 1e9 / iterations;
      // Check a few outputs against the CPU (the same f16 bits, f64 sums).
      const y = new Float32Array(await readBack(gpu, yBuf, rows * n * 4));
      let maxErr = 0;
      let maxRef = 0;
      for (let c = 0; c < 40; c++) {
        // Spread over rows and features, plus the last feature and the last input row (block and tail edges).
        const m = c === 0 ? rows - 1 : (c * 7) % rows;
        const row = c === 1 ? n - 1 : (c * 104729 + 13) % n;
        let acc = 0;
        const base = (row * pad8(k)) / 2;
        for (let kk = 0; kk < k; kk += 2) {
          const word = w.data[base + kk / 2];
          acc += f16BitsToF32(word & 0xffff) * x[m * pad8(k) + kk];
          if (kk + 1 < k) acc += f16BitsToF32(word >>> 16) * x[m * pad8(k) + kk + 1];
        }
        const got = y[m * n + row];
        maxErr = Number.isFinite(got) ? Math.max(maxErr, Math.abs(got - acc)) : Infinity;
        maxRef = Math.max(maxRef, Math.abs(acc));
      }
      const gbPerS = bytesPerIter / sec / 1e9;
      out.push({
        shape,
        n,
        k,
        rows,
        variant: v.name,
        iterations,
        usPerIter: sec * 1e6,
        wallUsPerIter: t.wallNs / 1e3 / iterations,
        timing: t.timestamps ? 'timestamp' : 'wall',
        bytesPerIter,
        gbPerS,
        ceilingRatio: gbPerS / args.ceilingGBs,
        gflops: (2 * rows * n * k) / sec / 1e9,
        maxRelError: maxErr / Math.max(maxRef, 1e-30),
      });
      process.stderr.write(`    rows ${rows} ${v.name}: ${(sec * 1e6).toFixed(1)} µs, ${gbPerS.toFixed(0)} GB/s\n`);
    }
  }
  for (const p of w.gpu.pieces) p.buffer.destroy();
  xBuf.destroy();
  yBuf.destroy();
  meta.destroy();
  return out;
}


/** Every variant's time relative to the best per (shape, rows), averaged: which layout is best across shapes. */
function rankTable(all: Measurement[]): string {
  const byKey = new Map<string, Measurement[]>();
  for (const m of all) if (m.rows > 0) byKey.set(`${m.shape}|${m.rows}`, [...(byKey.get(`${m.shape}|${m.rows}`) ?? []), m]);
  const score = new Map<string, { sum: number; n: number; worst: number; rows: Set<number> }>();
  for (const ms of byKey.values()) {
    const best = Math.min(...ms.map((m) => m.usPerIter));
    for (const m of ms) {
      const s = score.get(m.variant) ?? { sum: 0, n: 0, worst: 0, rows: new Set<number>() };
      const r = m.usPerIter / best;
      s.sum += r;
      s.n++;
      s.worst = Math.max(s.worst, r);
      s.rows.add(m.rows);
      score.set(m.variant, s);
    }
  }
  const lines = [['variant', 'rows', 'mean time / best', 'worst']];
  for (const [v, s] of [...score.entries()].sort((a, b) => a[1].sum / a[1].n - b[1].sum / b[1].n)) {
    lines.push([v, [...s.rows].join(','), (s.sum / s.n).toFixed(2), s.worst.toFixed(2)]);
  }
  return '\nvariants ranked (time over the best variant for the same shape and rows):\n' + table(lines) + '\n';
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i < 3 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ')).join('\n');
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const gpu = await openGpu({ dawnFlags: args.dawnFlags });
  try {
    const shapes: Array<[n: number, k: number]> = args.quick
      ? [
          [600, 256],
          [256, 520],
        ]
      : [
          [18944, 3584],
          [3584, 18944],
          [152064, 3584],
          [4608, 3584],
        ];
    process.stderr.write(`bench:kernels on ${gpu.adapterName}${gpu.isSoftware ? ' (software: figures say nothing about a GPU)' : ''}\n`);
    const all: Measurement[] = [];
    for (const [i, [n, k]] of shapes.entries()) all.push(...(await benchShape(gpu, args, n, k, 1234 + i)));
    const bad = all.filter((m) => !(m.maxRelError <= 1e-3));
    if (args.json) {
      writeFileSync(
        args.json,
        JSON.stringify({ adapter: gpu.adapterName, software: gpu.isSoftware, ceilingGBs: args.ceilingGBs, quick: args.quick, measurements: all }, null, 2),
      );
    }
    // Best variant per (shape, rows), plus the default, in a short table printed last.
    const header = ['shape (K→N)', 'rows', 'variant', 'µs', 'wall µs', 'GB/s', `% of ${args.ceilingGBs} GB/s`, 'GFLOP/s', 'rel err'];
    const lines: string[][] = [header];
    const keys = [...new Set(all.map((m) => `${m.shape}|${m.rows}`))];
    for (const key of keys) {
      const ms = all.filter((m) => `${m.shape}|${m.rows}` === key);
      const best = ms.reduce((a, b) => (b.usPerIter < a.usPerIter ? b : a));
      const def = ms.find((m) => m.variant === 'default') ?? best;
      const shown = args.all ? ms : best === def ? [best] : [best, def];
      for (const m of shown) {
        lines.push([
          m.shape,
          m.rows === 0 ? '-' : String(m.rows),
          m.variant + (m === best && shown.length > 1 ? ' (best)' : ''),
          m.usPerIter.toFixed(1),
          m.wallUsPerIter.toFixed(1),
          m.gbPerS.toFixed(0),
          (100 * m.ceilingRatio).toFixed(1) + '%',
          m.gflops.toFixed(0),
          m.maxRelError.toExponential(1),
        ]);
      }
    }
    const oneRowLarge = all.filter((m) => m.rows === 1 && !args.quick);
    const ranked = args.all ? '' : rankTable(all);
    const summary = oneRowLarge.length
      ? `one-row best vs the 70 % target: ${[...new Set(oneRowLarge.map((m) => m.shape))]
          .map((s) => {
            const best = oneRowLarge.filter((m) => m.shape === s).reduce((a, b) => (b.usPerIter < a.usPerIter ? b : a));
            return `${s} ${(100 * best.ceilingRatio).toFixed(1)}%`;
          })
          .join(', ')}`
      : '';
    process.stdout.write(
      ranked +
        `\nf16 matmul (weights packed in u32), ${gpu.adapterName}${args.dawnFlags.length ? ` [${args.dawnFlags.join(' ')}]` : ''}, timing: ${all[0]?.timing}; ceiling ${args.ceilingGBs} GB/s (HBM read)\n` +
        table(lines) +
        '\n' +
        (summary ? summary + '\n' : '') +
        (bad.length ? `WRONG RESULTS in ${bad.length} measurements (rel err > 1e-3): ${bad.map((m) => `${m.shape}/${m.rows}/${m.variant}`).join(', ')}\n` : ''),
    );
    if (bad.length) process.exitCode = 1;
  } finally {
    gpu.destroy();
    releaseGpu();
  }
}

await main();

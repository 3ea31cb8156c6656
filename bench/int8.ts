// Int8 matmul micro-benchmark: weights-only GEMV, dot4I8Packed W8A8 and subgroup-matrix (tensor-core) W8A8 at Qwen2.5-7B shapes.
//
//   npm run bench:int8                          # full shapes, rows 1…128 (needs a real GPU; ~1.3 GB of random int8 weights)
//   npm run bench:int8 -- --quick               # small shapes, checks that it runs (SwiftShader: no subgroup matrices)
//   options: --rows 1,8,16,32,64,128  --shapes qkv,o,gate_up,down,lm_head  --json out.json  --ceiling-gbs 4300  --ceiling-tops 1979  --all
//            --sweep (tensor-core grid: kSplit auto/2/4/8 × 1/2/4 column tiles a subgroup × unroll 2/4/8 (≤ 16 weight
//            tiles in flight a subgroup), every variant listed)
//            --spin-ms 300 (GPU warm-up before each timing)  --defaults (only each family's default tuning)
//
// Every variant's output is compared with the dot4 W8A8 kernel's (the same i32 sums: expected identical) and with
// float64 sums over the f32 activations and the dequantized weights (activation quantization error, ~1 %).
import { writeFileSync } from 'node:fs';
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { pad16, pad32, uploadQuantizedInt8, type GpuInt8Matrix } from '../kernels/int8.ts';
import { defaultInt8MatmulTuning, hasInt8SubgroupMatrix, Int8MatmulOp, type Int8MatmulTuning } from '../kernels/matmul-int8.ts';
import { storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { timeGpuPass, readBackF32, spinUpGpu } from './gpu-timing.ts';

interface Args {
  quick: boolean;
  all: boolean;
  json?: string;
  rows: number[];
  ceilingGBs: number;
  ceilingTops: number;
  targetBytes: number;
  /** Only the default tuning of each kernel family (and the dot4 reference). */
  defaultsOnly: boolean;
  /** GPU warm-up before each timing (ms): the H200 idles at 345 MHz and takes a while to clock up. */
  spinMs: number;
  /** Shape names to run (qkv, o, gate_up, down, lm_head); empty = all. */
  shapes: string[];
  /** Tensor-core variants: the grid kSplit × column tiles × unroll instead of the short list. */
  sweep: boolean;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { quick: false, all: false, rows: [1, 8, 16, 32, 64, 128], ceilingGBs: 4300, ceilingTops: 1979, targetBytes: 1.5e9, spinMs: 300, defaultsOnly: false, shapes: [], sweep: false };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const val = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${k} needs a value`);
      return v;
    };
    if (k === '--quick') a.quick = true;
    else if (k === '--all') a.all = true;
    else if (k === '--json') a.json = val();
    else if (k === '--rows') a.rows = val().split(',').map(Number);
    else if (k === '--shapes') a.shapes = val().split(',');
    else if (k === '--ceiling-gbs') a.ceilingGBs = Number(val());
    else if (k === '--ceiling-tops') a.ceilingTops = Number(val());
    else if (k === '--spin-ms') a.spinMs = Number(val());
    else if (k === '--defaults') a.defaultsOnly = true;
    else if (k === '--sweep') {
      a.sweep = true;
      a.all = true;
    }
    else throw new Error(`unknown option ${k}; see the top of bench/int8.ts`);
  }
  if (a.quick) {
    a.targetBytes = 1e6;
    if (!argv.includes('--rows')) a.rows = [1, 16, 32];
  }
  return a;
}

/** Random int8 weights (values in [-127, 127]) packed four per u32, zero padding past `cols` and past `rows`. */
function randomInt8Matrix(gpu: GpuContext, label: string, rows: number, cols: number, seed: number): { m: GpuInt8Matrix; packed: Uint32Array; scales: Float32Array } {
  const stride = pad32(cols);
  const words = stride / 4;
  const packed = new Uint32Array(pad16(rows) * words);
  let s = seed >>> 0 || 1;
  const next = () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return s >>> 0;
  };
  for (let r = 0; r < rows; r++) {
    for (let w = 0; w < words; w++) {
      let v = next();
      // Clear bytes past cols; map byte 0x80 (-128) to 0x81 (-127): the quantizer never writes -128.
      for (let b = 0; b < 4; b++) {
        if (4 * w + b >= cols) v &= ~(0xff << (8 * b));
        else if (((v >>> (8 * b)) & 0xff) === 0x80) v |= 1 << (8 * b);
      }
      packed[r * words + w] = v >>> 0;
    }
  }
  const scales = new Float32Array(rows);
  for (let r = 0; r < rows; r++) scales[r] = (0.5 + (next() % 1000) / 1000) / 127 / Math.sqrt(cols);
  return { m: uploadQuantizedInt8(gpu, label, { rows, cols, stride, packed, scales }), packed, scales };
}

interface Variant {
  name: string;
  tuning: Partial<Int8MatmulTuning>;
}

function variantsFor(gpu: GpuContext, rows: number, quick: boolean, sweep = false): Variant[] {
  // quick: one variant per family (the default tuning)
  const list: Variant[] = [];
  if (rows <= 8) {
    // [groups, unroll]; the first is the default tuning.
    for (const [g, u] of quick ? [[8, 2]] : [[8, 2], [4, 2], [16, 1], [8, 4]]) {
      list.push({ name: `gemv (weights-only) g${g} u${u}`, tuning: { gemvMaxRows: 8, gemvGroups: g, gemvUnroll: u } });
    }
  }
  list.push({ name: 'w8a8 dot4', tuning: { gemvMaxRows: 0, subgroupMatrix: 'off' } });
  if (hasInt8SubgroupMatrix(gpu)) {
    // [subgroups, kSplit, column tiles per subgroup, unroll, staged K steps]; the first is the default tuning.
    const sm: [number, number | 'auto', number, number, number][] = quick
      ? [[8, 'auto', 1, 2, 0]]
      : sweep
        ? (['auto', 2, 4, 8] as const).flatMap((ks) =>
            [1, 2, 4].flatMap((c) => [2, 4, 8].filter((u) => c * u <= 16).map((u): [number, number | 'auto', number, number, number] => [8, ks, c, u, 0])),
          )
        : [[8, 'auto', 1, 2, 0], [8, 'auto', 1, 2, 16], [8, 2, 1, 4, 0], [8, 'auto', 2, 2, 0], [8, 8, 1, 2, 0]];
    // The first is the default tuning, whose prompt-size rows take two column tiles where K ≤ 2·N (smWideFromRows);
    // the others keep the column tiles their name says.
    sm.forEach(([sg, ks, c, u, x], i) => {
      const wide = i === 0 && rows >= defaultInt8MatmulTuning(true).smWideFromRows;
      list.push({
        name: `w8a8 sm s${sg} k${ks} c${c} u${u} x${x}${wide ? ' (default: c2 where K ≤ 2N)' : ''}`,
        tuning: { gemvMaxRows: 0, subgroupMatrix: 'auto', smSubgroups: sg, smKSplit: ks, smColTiles: c, smUnroll: u, smStageSteps: x, ...(i === 0 ? {} : { smWideFromRows: Infinity }) },
      });
    });
    // Prompt chunks (≥ 128 rows): more row tiles a workgroup (each weight tile feeds more products), fewer K splits.
    if (!quick && rows >= 128) {
      for (const [ks, c, m] of [['auto', 1, 8], ['auto', 2, 8], [1, 1, 8], [2, 1, 8], [1, 2, 8], ['auto', 1, 2], [1, 1, 4]] as const) {
        list.push({ name: `w8a8 sm s8 k${ks} c${c} u2 x0 m${m}`, tuning: { gemvMaxRows: 0, subgroupMatrix: 'auto', smSubgroups: 8, smKSplit: ks, smColTiles: c, smUnroll: 2, smStageSteps: 0, smRowTiles: m, smWideFromRows: Infinity } });
      }
    }
  }
  return list;
}

interface Measurement {
  shape: string;
  n: number;
  k: number;
  rows: number;
  variant: string;
  us: number;
  gbPerS: number;
  tops: number;
  /** Max |y − y(dot4 W8A8)| / max |y|: 0 when the i32 sums agree. */
  vsDot4: number;
  /** Max |y − float64(x · dequantized W)| / max |y| over sampled outputs. */
  vsF64: number;
}

async function benchShape(gpu: GpuContext, args: Args, n: number, k: number, seed: number): Promise<Measurement[]> {
  const shape = `${k}→${n}`;
  process.stderr.write(`  ${shape}: ${((pad16(n) * pad32(k)) / 1e9).toFixed(2)} GB of random int8 weights\n`);
  const { m: w, packed, scales } = randomInt8Matrix(gpu, `W ${shape}`, n, k, seed);
  const maxRows = Math.max(...args.rows);
  const xStride = Math.ceil(k / 4) * 4;
  const x = new Float32Array(maxRows * xStride);
  for (let i = 0; i < x.length; i++) x[i] = Math.sin(i * 0.618 + seed) * (1 + (i % 7));
  const xBuf = uploadArray(gpu, 'x', x);
  const yBuf = storageBuffer(gpu, 'y', maxRows * n * 4, 0);
  const meta = storageBuffer(gpu, 'meta', 64);
  const out: Measurement[] = [];
  const words = w.stride / 4;
  const int8At = (r: number, c: number) => {
    const b = (packed[r * words + (c >> 2)] >>> (8 * (c & 3))) & 0xff;
    return b >= 128 ? b - 256 : b;
  };
  for (const rows of args.rows) {
    gpu.device.queue.writeBuffer(meta, 0, new Uint32Array(16).fill(rows, 0, 1));
    let dot4: Float32Array | undefined;
    for (const v of variantsFor(gpu, rows, args.quick || args.defaultsOnly, args.sweep)) {
      const op = new Int8MatmulOp(gpu, w, { meta, rowsSlot: 0, x: xBuf, xStride, y: yBuf, yStride: n }, v.tuning);
      gpu.device.queue.writeBuffer(yBuf, 0, new Float32Array(maxRows * n).fill(NaN));
      const bytesPerIter = w.bytes + rows * k * 4 + rows * n * 4;
      const iterations = Math.max(3, Math.min(2000, Math.ceil(args.targetBytes / bytesPerIter)));
      const timed = async (stage: 'all' | 'quantize') => {
        const encode = (p: GPUComputePassEncoder) => { for (let i = 0; i < iterations; i++) op.encode(p, rows, stage); };
        await timeGpuPass(gpu, (p) => op.encode(p, rows, stage));
        if (!args.quick) await spinUpGpu(gpu, encode, args.spinMs);
        return (await timeGpuPass(gpu, encode)).ns / 1e9 / iterations;
      };
      // The activation quantization alone, once per row count (the same kernel for every W8A8 variant).
      if (v.name === 'w8a8 dot4') {
        const q = await timed('quantize');
        out.push({ shape, n, k, rows, variant: 'quantize only', us: q * 1e6, gbPerS: (rows * k * 5) / q / 1e9, tops: 0, vsDot4: NaN, vsF64: NaN });
      }
      const sec = await timed('all');
      gpu.checkErrors();
      const y = await readBackF32(gpu, yBuf, rows * n);
      let maxY = 0;
      for (let i = 0; i < rows * n; i++) maxY = Math.max(maxY, Number.isFinite(y[i]) ? Math.abs(y[i]) : Infinity);
      let vsDot4 = 0;
      if (v.name === 'w8a8 dot4') dot4 = y;
      else if (dot4 && op.path(rows) !== 'gemv') {
        for (let i = 0; i < rows * n; i++) vsDot4 = Math.max(vsDot4, Number.isFinite(y[i]) ? Math.abs(y[i] - dot4[i]) : Infinity);
        vsDot4 /= maxY;
      } else vsDot4 = NaN;
      let maxErr = 0;
      for (let c = 0; c < 48; c++) {
        const m = c === 0 ? rows - 1 : (c * 7) % rows;
        const col = c === 1 ? n - 1 : (c * 104729 + 13) % n;
        let acc = 0;
        for (let kk = 0; kk < k; kk++) acc += x[m * xStride + kk] * int8At(col, kk);
        acc *= scales[col];
        const got = y[m * n + col];
        maxErr = Math.max(maxErr, Number.isFinite(got) ? Math.abs(got - acc) : Infinity);
      }
      const meas: Measurement = {
        shape, n, k, rows, variant: v.name, us: sec * 1e6,
        gbPerS: bytesPerIter / sec / 1e9,
        tops: (2 * rows * n * k) / sec / 1e12,
        vsDot4,
        vsF64: maxErr / maxY,
      };
      out.push(meas);
      process.stderr.write(`    rows ${rows} ${v.name}: ${meas.us.toFixed(1)} µs, ${meas.gbPerS.toFixed(0)} GB/s, ${meas.tops.toFixed(1)} TOPS, vs dot4 ${vsDot4.toExponential(1)}, vs f64 ${meas.vsF64.toExponential(1)}\n`);
    }
  }
  w.buffer.destroy();
  w.scales.destroy();
  xBuf.destroy();
  yBuf.destroy();
  meta.destroy();
  return out;
}

const args = parseArgs(process.argv.slice(2));
const gpu = await openGpu();
process.stderr.write(`adapter: ${gpu.adapterName}; int8 subgroup matrix: ${hasInt8SubgroupMatrix(gpu) ? 'yes' : 'no'}\n`);
const shapes: [string, number, number][] = args.quick
  ? [['small', 200, 96], ['odd', 77, 45]]
  : [['qkv', 4608, 3584], ['o', 3584, 3584], ['gate_up', 37888, 3584], ['down', 3584, 18944], ['lm_head', 152064, 3584]];
const all: Measurement[] = [];
let seed = 7;
for (const [name, n, k] of shapes) if (!args.shapes.length || args.shapes.includes(name)) all.push(...(await benchShape(gpu, args, n, k, seed++)));
gpu.destroy();
releaseGpu();
if (args.json) writeFileSync(args.json, JSON.stringify({ adapter: gpu.adapterName, ceilingGBs: args.ceilingGBs, ceilingTops: args.ceilingTops, measurements: all }, null, 2));

// Table: per (shape, rows) the best variant of each family, with % of HBM bandwidth and TOPS.
const family = (v: string) => (v === 'quantize only' ? 'quantize' : v.startsWith('w8a8 sm') ? 'sm' : v.startsWith('w8a8') ? 'dot4' : 'gemv');
const exp1 = (v: number) => (Number.isNaN(v) ? '—' : v.toExponential(1));
const lines = ['| shape (K→N) | rows | variant | µs | GB/s | % of HBM | TOPS | vs dot4 | vs f64 |', '|---|---|---|---|---|---|---|---|---|'];
const keys = [...new Set(all.map((m) => `${m.shape}|${m.rows}`))];
for (const key of keys) {
  const ms = all.filter((m) => `${m.shape}|${m.rows}` === key);
  const pick = args.all ? ms : [...new Set(ms.map((m) => family(m.variant)))].map((f) => ms.filter((m) => family(m.variant) === f).sort((a, b) => a.us - b.us)[0]);
  for (const m of pick) {
    lines.push(
      `| ${m.shape} | ${m.rows} | ${m.variant} | ${m.us.toFixed(1)} | ${m.gbPerS.toFixed(0)} | ${((100 * m.gbPerS) / args.ceilingGBs).toFixed(1)} % | ${m.tops.toFixed(1)} | ${exp1(m.vsDot4)} | ${exp1(m.vsF64)} |`,
    );
  }
}
process.stdout.write(lines.join('\n') + '\n');

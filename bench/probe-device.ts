// Device probe: subgroup-matrix availability and i8 load/store semantics, streaming-read variants (questions for the H200).
//
//   node --import tsx bench/probe-device.ts            # adapter, subgroup-matrix configs, which units offsets/strides count
//   node --import tsx bench/probe-device.ts --stream   # 1 GiB streaming read: one vec4 per thread vs grid-stride loops
//   node --import tsx bench/probe-device.ts --gemm     # int8 W8A8: subgroup-matrix kernels vs the dot4 kernel, small shapes
//   node --import tsx bench/probe-device.ts --value-loads  # the one-pass MLA kernel's value product alone, each operand form
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { readBack } from './gpu-timing.ts';

const log = (s: string) => process.stdout.write(s + '\n');

async function readI32(gpu: GpuContext, src: GPUBuffer, n: number): Promise<Int32Array> {
  return new Int32Array(await readBack(gpu, src, n * 4));
}

function buf(gpu: GpuContext, data: Int32Array | Uint32Array): GPUBuffer {
  const b = gpu.device.createBuffer({ size: data.byteLength, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC });
  gpu.device.queue.writeBuffer(b, 0, data);
  return b;
}

/**
 * Compiles `code`, runs one workgroup over `buffers` (bindings 0, 1, …) and reads `n` i32 back from `out`; a
 * validation error of the pipeline or the dispatch is thrown with its message.
 */
async function runOneWorkgroup(gpu: GpuContext, label: string, code: string, buffers: GPUBuffer[], out: GPUBuffer, n: number): Promise<Int32Array> {
  gpu.device.pushErrorScope('validation');
  const p = gpu.pipeline(label, code);
  const bg = gpu.device.createBindGroup({ layout: p.getBindGroupLayout(0), entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } })) });
  const enc = gpu.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(p);
  pass.setBindGroup(0, bg);
  pass.dispatchWorkgroups(1);
  pass.end();
  gpu.device.queue.submit([enc.finish()]);
  const err = await gpu.device.popErrorScope();
  if (err) throw new Error(`validation: ${err.message}`);
  const got = await readI32(gpu, out, n);
  gpu.checkErrors();
  return got;
}

async function probeSubgroupMatrix(gpu: GpuContext): Promise<void> {
  // A: 64 rows × 128 i8 per row (row-major), B stored as [n][k] (so B as right matrix is column-major), i8 values.
  const rowsA = 64, colsA = 128;
  const aBytes = new Int8Array(rowsA * colsA);
  for (let i = 0; i < aBytes.length; i++) aBytes[i] = ((i * 37 + 11) % 23) - 11;
  const bBytes = new Int8Array(rowsA * colsA);
  for (let i = 0; i < bBytes.length; i++) bBytes[i] = ((i * 53 + 5) % 19) - 9;
  const a = buf(gpu, new Int32Array(aBytes.buffer));
  const b = buf(gpu, new Int32Array(bBytes.buffer));
  const c = buf(gpu, new Int32Array(16 * 16));
  // offset literal 128 and stride literal 128: in i8 units this is row 1 of A; in i32 units it is row 4.
  for (const [offA, strideA, modern] of [[128, 128, 0], [128, 128, 1], [32, 128, 1], [128, 32, 1]]) {
    const code = `
enable chromium_experimental_subgroup_matrix;
@group(0) @binding(0) var<storage, read> a: array<i32>;
@group(0) @binding(1) var<storage, read> b: array<i32>;
@group(0) @binding(2) var<storage, read_write> c: array<i32>;
@compute @workgroup_size(32)
fn main() {
  ${modern ? `let l = subgroupMatrixLoad<subgroup_matrix_left<i8, 32, 16>, row_major>(&a, ${offA}u, ${strideA}u);
  let r = subgroupMatrixLoad<subgroup_matrix_right<i8, 16, 32>, col_major>(&b, 0u, 128u);
  var acc = subgroup_matrix_result<i32, 16, 16>();
  acc = subgroupMatrixMultiplyAccumulate(l, r, acc);
  subgroupMatrixStore<row_major>(&c, 0u, acc, 16u);` : `let l = subgroupMatrixLoad<subgroup_matrix_left<i8, 32, 16>>(&a, ${offA}u, false, ${strideA}u);
  let r = subgroupMatrixLoad<subgroup_matrix_right<i8, 16, 32>>(&b, 0u, true, 128u);
  let acc = subgroupMatrixMultiply<i32>(l, r);
  subgroupMatrixStore(&c, 0u, acc, false, 16u);`}
}`;
    try {
      const got = await runOneWorkgroup(gpu, `sm probe ${offA} ${strideA}`, code, [a, b, c], c, 256);
      // Hypotheses: offset counted in i8 (h8) or in i32 words (h32); stride counted in i8 (s8) or i32 (s32).
      const hyp: string[] = [];
      for (const [oName, oBytes] of [['off i8', offA], ['off i32', offA * 4]] as const) {
        for (const [sName, sBytes] of [['stride i8', strideA], ['stride i32', strideA * 4]] as const) {
          let ok = true;
          for (let m = 0; m < 16 && ok; m++) for (let n = 0; n < 16 && ok; n++) {
            let s = 0;
            for (let k = 0; k < 32; k++) {
              const ai = oBytes + m * sBytes + k;
              s += (ai < aBytes.length ? aBytes[ai] : 0) * bBytes[n * 128 + k];
            }
            if (s !== got[m * 16 + n]) ok = false;
          }
          if (ok) hyp.push(`${oName}, ${sName}`);
        }
      }
      log(`sm ${modern ? 'modern' : 'old'} offset ${offA} stride ${strideA}: matches [${hyp.join(' | ') || 'none'}]; c[0..4] = ${[...got.slice(0, 4)]}`);
    } catch (e) {
      log(`sm ${offA}/${strideA}: ${(e as Error).message.slice(0, 300)}`);
    }
  }
}

/**
 * Right matrix loaded row-major (element (k, n) at k·stride + n) or column-major (at n·stride + k), from storage or
 * from workgroup memory: which units do offset and stride count, and does the load read what the layout says?
 */
async function probeRightLoads(gpu: GpuContext): Promise<void> {
  const aBytes = new Int8Array(16 * 32);
  for (let i = 0; i < aBytes.length; i++) aBytes[i] = ((i * 37 + 11) % 23) - 11;
  const bBytes = new Int8Array(64 * 128);
  for (let i = 0; i < bBytes.length; i++) bBytes[i] = ((i * 53 + 5) % 19) - 9;
  const a = buf(gpu, new Int32Array(aBytes.buffer));
  const b = buf(gpu, new Int32Array(bBytes.buffer));
  const c = buf(gpu, new Int32Array(256));
  const cases = [
    ['storage', 32, 64, false],
    ['workgroup', 32, 64, false],
    ['storage', 0, 16, false],
    ['storage', 32, 64, true],
    ['workgroup', 32, 64, true],
  ] as const;
  for (const [where, offB, strideB, colMajor] of cases) {
    const wg = where === 'workgroup';
    const code = `
enable chromium_experimental_subgroup_matrix;
@group(0) @binding(0) var<storage, read> a: array<i32>;
@group(0) @binding(1) var<storage, read> b: array<i32>;
@group(0) @binding(2) var<storage, read_write> c: array<i32>;
var<workgroup> bw: array<i32, 2048>;
@compute @workgroup_size(32)
fn main(@builtin(local_invocation_index) lid: u32) {
  for (var i = lid; i < 2048u; i += 32u) { bw[i] = b[i]; }
  workgroupBarrier();
  let l = subgroupMatrixLoad<subgroup_matrix_left<i8, 32, 16>>(&a, 0u, false, 32u);
  let r = subgroupMatrixLoad<subgroup_matrix_right<i8, 16, 32>>(&${wg ? 'bw' : 'b'}, ${offB}u, ${colMajor}, ${strideB}u);
  let acc = subgroupMatrixMultiply<i32>(l, r);
  subgroupMatrixStore(&c, 0u, acc, false, 16u);
}`;
    const layout = colMajor ? 'column-major' : 'row-major';
    const got = await runOneWorkgroup(gpu, `sm right ${layout} ${where} ${offB} ${strideB}`, code, [a, b, c], c, 256);
    const hyp: string[] = [];
    for (const [oName, oMul] of [['off i8', 1], ['off i32', 4]] as const) {
      for (const [sName, sMul] of [['stride i8', 1], ['stride i32', 4]] as const) {
        let ok = true;
        for (let m = 0; m < 16 && ok; m++) for (let n = 0; n < 16 && ok; n++) {
          let s = 0;
          for (let k = 0; k < 32; k++) s += aBytes[m * 32 + k] * bBytes[offB * oMul + (colMajor ? n * strideB * sMul + k : k * strideB * sMul + n)];
          if (s !== got[m * 16 + n]) ok = false;
        }
        if (ok) hyp.push(`${oName}, ${sName}`);
      }
    }
    log(`sm right ${layout} from ${where}, offset ${offB} stride ${strideB}: matches [${hyp.join(' | ') || 'none'}]`);
  }
}

/**
 * The MLA int8-product kernel's score phase in isolation (kernels/mla-attention-tc.ts: 32 staged cache rows of 576 i8
 * × 32 query heads, 4 result tiles, latent K 512 and rope K 64 accumulated apart, 8 subgroups): which forms agree with
 * integer sums on the host. On the H200 the kernel's score phase disagreed with its dot4 form in two layouts.
 */
async function probeScoreTiles(gpu: GpuContext): Promise<void> {
  const RP = 576;
  const ctBytes = new Int8Array(32 * RP);
  for (let i = 0; i < ctBytes.length; i++) ctBytes[i] = ((i * 29 + 7) % 31) - 15;
  const qBytes = new Int8Array(2 * 32 * RP);
  for (let i = 0; i < qBytes.length; i++) qBytes[i] = ((i * 41 + 3) % 27) - 13;
  const ctIn = buf(gpu, new Int32Array(ctBytes.buffer));
  const qq = buf(gpu, new Int32Array(qBytes.buffer));
  const out = buf(gpu, new Int32Array(4097));
  const qRow = 1;
  const dot = (t: number, h: number, k0: number, k1: number) => {
    let v = 0;
    for (let k = k0; k < k1; k++) v += ctBytes[t * RP + k] * qBytes[(qRow * 32 + h) * RP + k];
    return v;
  };
  const L = 'subgroup_matrix_left<i8, 32, 16>';
  const Rt = 'subgroup_matrix_right<i8, 16, 32>';
  const Res = 'subgroup_matrix_result<i32, 16, 16>';
  const transposedLooped = `
  let a = g % 4u;
  var accL = ${Res}();
  var accP = ${Res}();
  for (var kk = 0u; kk < 16u; kk++) {
    accL = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<${L}>(&ct, (a % 2u) * ${16 * RP}u + kk * 32u, false, ${RP}u), subgroupMatrixLoad<${Rt}>(&qq, qByte + (a / 2u) * ${16 * RP}u + kk * 32u, true, ${RP}u), accL);
  }
  for (var kk = 0u; kk < 2u; kk++) {
    accP = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<${L}>(&ct, (a % 2u) * ${16 * RP}u + 512u + kk * 32u, false, ${RP}u), subgroupMatrixLoad<${Rt}>(&qq, qByte + (a / 2u) * ${16 * RP}u + 512u + kk * 32u, true, ${RP}u), accP);
  }
  subgroupMatrixStore(&stg, g * 512u, accL, false, 16u);
  subgroupMatrixStore(&stg, g * 512u + 256u, accP, false, 16u);`;
  const unrolled = (loadsFrom: 'transposed' | 'original') => {
    const lines = [`let a = g % 4u;`, `var accL = ${Res}();`, `var accP = ${Res}();`];
    for (let kk = 0; kk < 18; kk++) {
      const acc = kk < 16 ? 'accL' : 'accP';
      const off = kk * 32;
      lines.push(
        loadsFrom === 'transposed'
          ? `${acc} = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<${L}>(&ct, (a % 2u) * ${16 * RP}u + ${off}u, false, ${RP}u), subgroupMatrixLoad<${Rt}>(&qq, qByte + (a / 2u) * ${16 * RP}u + ${off}u, true, ${RP}u), ${acc});`
          : `${acc} = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<${L}>(&qq, qByte + (a / 2u) * ${16 * RP}u + ${off}u, false, ${RP}u), subgroupMatrixLoad<${Rt}>(&ct, (a % 2u) * ${16 * RP}u + ${off}u, true, ${RP}u), ${acc});`,
      );
    }
    lines.push('subgroupMatrixStore(&stg, g * 512u, accL, false, 16u);', 'subgroupMatrixStore(&stg, g * 512u + 256u, accP, false, 16u);');
    return lines.join('\n  ');
  };
  // The rope part alone in a fresh accumulator, latent alone: is one of the two sums the wrong one? The last variant
  // adds 12 KB of workgroup memory (46.4 KB in all, as the whole MLA kernel at 28 heads holds): does a strided
  // column-major load from storage go wrong only when workgroup memory is that full?
  const variants: Array<[string, string, boolean, number]> = [
    ['transposed, runtime loops', transposedLooped, true, 0],
    ['transposed, unrolled', unrolled('transposed'), true, 0],
    ['original (q left from storage, cache right column-major from workgroup), unrolled', unrolled('original'), false, 0],
    ['transposed, unrolled, 46.4 KB of workgroup memory', unrolled('transposed'), true, 3000],
  ];
  for (const [name, body, transposed, padWords] of variants) {
    const code = `
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);
@group(0) @binding(0) var<storage, read> ctIn: array<i32>;
@group(0) @binding(1) var<storage, read> qq: array<i32>;
@group(0) @binding(2) var<storage, read_write> outv: array<i32>;
var<workgroup> ct: array<i32, ${(32 * RP) / 4}>;
var<workgroup> stg: array<i32, 4096>;
${padWords ? `var<workgroup> padw: array<i32, ${padWords}>;` : ''}
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sgId: u32) {
  for (var i = lid; i < ${(32 * RP) / 4}u; i += 256u) { ct[i] = ctIn[i]; }
  ${padWords ? `for (var i = lid; i < ${padWords}u; i += 256u) { padw[i] = i32(i); }` : ''}
  workgroupBarrier();
  let g = sgId;
  let qByte = ${qRow * 32 * RP}u;
  ${body}
  workgroupBarrier();
  for (var i = lid; i < 4096u; i += 256u) { outv[i] = stg[i]; }
  ${padWords ? `if (lid == 0u) { outv[4096] = padw[${padWords - 1}u]; }` : ''}
}`;
    const got = await runOneWorkgroup(gpu, `score tiles ${name}`, code, [ctIn, qq, out], out, 4096);
    let bad = 0;
    let first = '';
    for (let g = 0; g < 8; g++) {
      const a = g % 4;
      for (let i = 0; i < 16; i++) {
        for (let j = 0; j < 16; j++) {
          // transposed: rows are tokens, columns heads; original: rows heads, columns tokens.
          const t = (a % 2) * 16 + (transposed ? i : j);
          const h = Math.floor(a / 2) * 16 + (transposed ? j : i);
          for (const [part, k0, k1] of [[0, 0, 512], [256, 512, 576]] as const) {
            const want = dot(t, h, k0, k1);
            const v = got[g * 512 + part + i * 16 + j];
            if (v !== want) {
              bad++;
              if (!first) first = `subgroup ${g} tile ${a} ${part ? 'rope' : 'latent'} (${i}, ${j}): got ${v}, want ${want}`;
            }
          }
        }
      }
    }
    log(`score tiles, ${name}: ${bad} of ${8 * 512} values wrong${first ? `; first: ${first}` : ''}`);
  }
}

async function timePass(gpu: GpuContext, encode: (p: GPUComputePassEncoder) => void): Promise<{ ts: number; wall: number }> {
  const dev = gpu.device;
  const qs = dev.createQuerySet({ type: 'timestamp', count: 2 });
  const res = dev.createBuffer({ size: 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
  const rd = dev.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const enc = dev.createCommandEncoder();
  const pass = enc.beginComputePass({ timestampWrites: { querySet: qs, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 } });
  encode(pass);
  pass.end();
  enc.resolveQuerySet(qs, 0, 2, res, 0);
  enc.copyBufferToBuffer(res, 0, rd, 0, 16);
  const t0 = performance.now();
  dev.queue.submit([enc.finish()]);
  await rd.mapAsync(GPUMapMode.READ);
  const wall = (performance.now() - t0) * 1e6;
  const t = new BigUint64Array(rd.getMappedRange().slice(0));
  rd.unmap();
  qs.destroy(); res.destroy(); rd.destroy();
  return { ts: Number(t[1] - t[0]), wall };
}

async function probeStream(gpu: GpuContext): Promise<void> {
  const bytes = 1 << 30;
  const words = bytes / 16;
  const big = gpu.device.createBuffer({ size: bytes, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST });
  const chunk = new Uint32Array(1 << 24);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 2654435761) >>> 0;
  for (let off = 0; off < bytes; off += chunk.byteLength) gpu.device.queue.writeBuffer(big, off, chunk);
  const sink = gpu.device.createBuffer({ size: 16, usage: GPUBufferUsage.STORAGE });
  const variants: { name: string; code: string; groups: number; wg: number }[] = [];
  for (const wg of [256, 1024]) {
    variants.push({
      name: `one vec4/thread wg${wg}`,
      wg,
      groups: words / wg,
      code: `@group(0) @binding(0) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<u32>;
@compute @workgroup_size(${wg})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let i = (wid.x + wid.y * nwg.x) * ${wg}u + lid;
  let v = w[i];
  if ((v.x ^ v.y ^ v.z ^ v.w) == 0x9e3779b9u) { sink[0] = 1u; }
}`,
    });
  }
  for (const [u, blocks] of [[4, 132 * 16], [8, 132 * 8], [4, 132 * 64]]) {
    variants.push({
      name: `grid-stride u${u} ${blocks} wgs`,
      wg: 256,
      groups: blocks,
      code: `@group(0) @binding(0) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let threads = nwg.x * 256u;
  var acc = vec4<u32>(0u);
  for (var i = wid.x * 256u + lid; i < ${words}u; i += ${u}u * threads) {
    ${[...Array(u).keys()].map((k) => `acc ^= w[min(i + ${k}u * threads, ${words - 1}u)];`).join('\n    ')}
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) { sink[0] = 1u; }
}`,
    });
  }
  for (const v of variants) {
    const p = gpu.pipeline(`stream ${v.name}`, v.code);
    const bg = gpu.device.createBindGroup({ layout: p.getBindGroupLayout(0), entries: [big, sink].map((buffer, binding) => ({ binding, resource: { buffer } })) });
    const gx = Math.min(v.groups, 65535);
    const gy = Math.ceil(v.groups / gx);
    const enc = (reps: number) => (pass: GPUComputePassEncoder) => {
      for (let r = 0; r < reps; r++) {
        pass.setPipeline(p);
        pass.setBindGroup(0, bg);
        pass.dispatchWorkgroups(gx, gy);
      }
    };
    const t0 = performance.now();
    while (performance.now() - t0 < 400) await timePass(gpu, enc(10));
    const one = await timePass(gpu, enc(1));
    const ten = await timePass(gpu, enc(20));
    const gb = (ns: number, n: number) => ((bytes * n) / ns).toFixed(0);
    log(`stream ${v.name.padEnd(26)} 1×: ${gb(one.ts, 1)} GB/s (ts) ${gb(one.wall, 1)} (wall) | 20×: ${gb(ten.ts, 20)} GB/s (ts) ${gb(ten.wall, 20)} (wall)`);
  }
  gpu.checkErrors();
  big.destroy();
  sink.destroy();
}

async function checkGemm(gpu: GpuContext): Promise<void> {
  const { Int8MatmulOp } = await import('../kernels/matmul-int8.ts');
  const { uploadInt8Matrix } = await import('../kernels/int8.ts');
  const { uploadArray, storageBuffer } = await import('../kernels/tensors.ts');
  const { readBackF32 } = await import('./gpu-timing.ts');
  for (const [M, N, K] of [[16, 16, 32], [16, 48, 256], [32, 80, 512], [200, 40, 96]]) {
    const wData = Array.from({ length: N * K }, (_, i) => Math.sin(i * 1.3) * 2);
    const w = uploadInt8Matrix(gpu, 'w', wData, N, K);
    const x = uploadArray(gpu, 'x', Float32Array.from({ length: M * K }, (_, i) => Math.cos(i * 0.7)));
    const y = storageBuffer(gpu, 'y', M * N * 4, 0);
    const meta = storageBuffer(gpu, 'meta', 64);
    gpu.device.queue.writeBuffer(meta, 0, new Uint32Array(16).fill(M, 0, 1));
    const outs: Float32Array[] = [];
    for (const t of [{ subgroupMatrix: 'off' as const }, { smSubgroups: 2, smUnroll: 1 }, { smSubgroups: 1, smUnroll: 1 }, { smSubgroups: 4, smUnroll: 2 }, { smSubgroups: 8, smUnroll: 4 }]) {
      const op = new Int8MatmulOp(gpu, w, { meta, rowsSlot: 0, x, xStride: K, y, yStride: N }, { gemvMaxRows: 0, ...t });
      const enc = gpu.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      op.encode(pass, M);
      pass.end();
      gpu.device.queue.submit([enc.finish()]);
      outs.push(await readBackF32(gpu, y, M * N));
      gpu.checkErrors();
      let d = 0;
      let firstBad = -1;
      for (let i = 0; i < M * N; i++) {
        const e = Math.abs(outs[outs.length - 1][i] - outs[0][i]);
        if (e > d) d = e;
        if (e > 1e-6 && firstBad < 0) firstBad = i;
      }
      log(`gemm M${M} N${N} K${K} ${JSON.stringify(t)} path ${op.path(M)}: max |Δ| vs dot4 ${d.toExponential(2)} first bad ${firstBad} got ${outs[outs.length - 1][Math.max(firstBad, 0)]} want ${outs[0][Math.max(firstBad, 0)]}`);
    }
  }
}

/**
 * The value product of the one-pass MLA kernel (kernels/mla-attention-flash.ts) in isolation: O = P · X with P 16 × 32
 * i8 (row-major, stride 32, from storage or workgroup memory) and X 32 cache rows × 16 bytes at byte `col` of rows
 * `stride` bytes apart (row-major right operand from storage), and its transpose Oᵀ = Xᵀ · Pᵀ (X column-major as the
 * left operand, P column-major as the right one), each against host integers.
 */
async function probeValueLoads(gpu: GpuContext): Promise<void> {
  for (const stride of [16, 32, 512, 584, 608]) {
    for (const col of stride === 16 ? [0] : [0, 16, 32, 48]) {
      const rows = 40;
      const xb = new Int8Array(rows * stride);
      for (let i = 0; i < xb.length; i++) xb[i] = ((i * 29 + 7) % 31) - 15;
      const pb = new Int8Array(16 * 32);
      for (let i = 0; i < pb.length; i++) pb[i] = ((i * 13 + 3) % 17) - 8;
      const want = new Int32Array(256);
      for (let m = 0; m < 16; m++) for (let n = 0; n < 16; n++) {
        let acc = 0;
        for (let k = 0; k < 32; k++) acc += pb[m * 32 + k] * xb[k * stride + col + n];
        want[m * 16 + n] = acc;
      }
      const x = buf(gpu, new Int32Array(xb.buffer));
      const pp = buf(gpu, new Int32Array(pb.buffer));
      // The score form of the same buffer (x column-major as the right operand: 16 rows' first 32 bytes) for 'with scores'.
      const wantS = new Int32Array(256);
      for (let m = 0; m < 16; m++) for (let n = 0; n < 16; n++) {
        let acc = 0;
        for (let k = 0; k < 32; k++) acc += pb[m * 32 + k] * xb[n * stride + k];
        wantS[m * 16 + n] = acc;
      }
      const out = buf(gpu, new Int32Array(512));
      for (const form of ['rows storage', 'rows workgroup', 'transposed storage', 'transposed workgroup', 'rows storage with scores', 'transposed storage with scores']) {
        const wg = form.includes('workgroup');
        const tr = form.startsWith('transposed');
        const withScores = form.endsWith('with scores') && stride >= 32;
        if (form.endsWith('with scores') && !withScores) continue;
        const code = `enable chromium_experimental_subgroup_matrix;
@group(0) @binding(0) var<storage, read> x: array<i32>;
@group(0) @binding(1) var<storage, read> p: array<i32>;
@group(0) @binding(2) var<storage, read_write> c: array<i32>;
var<workgroup> ps: array<i32, 128>;
@compute @workgroup_size(32)
fn main(@builtin(local_invocation_index) lid: u32) {
  for (var i = lid; i < 128u; i += 32u) { ps[i] = p[i]; }
  workgroupBarrier();
  ${tr
    ? `let l = subgroupMatrixLoad<subgroup_matrix_left<i8, 32, 16>>(&x, ${col}u, true, ${stride}u);
  let r = subgroupMatrixLoad<subgroup_matrix_right<i8, 16, 32>>(&${wg ? 'ps' : 'p'}, 0u, true, 32u);
  var acc = subgroup_matrix_result<i32, 16, 16>();
  acc = subgroupMatrixMultiplyAccumulate(l, r, acc);
  subgroupMatrixStore(&c, 0u, acc, true, 16u);`
    : `let l = subgroupMatrixLoad<subgroup_matrix_left<i8, 32, 16>>(&${wg ? 'ps' : 'p'}, 0u, false, 32u);
  let r = subgroupMatrixLoad<subgroup_matrix_right<i8, 16, 32>>(&x, ${col}u, false, ${stride}u);
  var acc = subgroup_matrix_result<i32, 16, 16>();
  acc = subgroupMatrixMultiplyAccumulate(l, r, acc);
  subgroupMatrixStore(&c, 0u, acc, false, 16u);`}
  ${withScores ? `var accS = subgroup_matrix_result<i32, 16, 16>();
  accS = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<subgroup_matrix_left<i8, 32, 16>>(&p, 0u, false, 32u), subgroupMatrixLoad<subgroup_matrix_right<i8, 16, 32>>(&x, 0u, true, ${stride}u), accS);
  subgroupMatrixStore(&c, 256u, accS, false, 16u);` : ''}
}`;
        try {
          const got = await runOneWorkgroup(gpu, `value loads ${form} ${stride} ${col}`, code, [x, pp, out], out, 512);
          let bad = 0;
          let badS = 0;
          for (let i = 0; i < 256; i++) {
            if (got[i] !== want[i]) bad++;
            if (withScores && got[256 + i] !== wantS[i]) badS++;
          }
          log(`value product, ${form}, stride ${stride}, column ${col}: ${bad} of 256 wrong${bad ? ` (got[0] ${got[0]}, want ${want[0]})` : ''}${withScores ? `; score product ${badS} of 256 wrong` : ''}`);
        } catch (e) {
          log(`value product, ${form}, stride ${stride}, column ${col}: ${(e as Error).message.split('\n')[0]}`);
        }
      }
      for (const b of [x, pp, out]) b.destroy();
    }
  }
}

const gpu = await openGpu({ dawnFlags: ['enable-dawn-features=allow_unsafe_apis'] });
log(`adapter: ${gpu.adapterName}; software ${gpu.isSoftware}; features: ${[...gpu.features].sort().join(', ')}`);
log(`subgroup matrix configs: ${JSON.stringify(gpu.subgroupMatrixConfigs)}; subgroup size ${gpu.subgroupSize}`);
if (gpu.features.has('chromium-experimental-subgroup-matrix')) await probeSubgroupMatrix(gpu);
else log('no subgroup matrix feature');
if (!gpu.isSoftware && process.argv.includes('--stream')) await probeStream(gpu);
if (process.argv.includes('--gemm')) await checkGemm(gpu);
if (process.argv.includes('--value-loads')) {
  if (gpu.features.has('chromium-experimental-subgroup-matrix')) await probeValueLoads(gpu);
  else log('no subgroup matrix feature: --value-loads skipped');
  gpu.destroy();
  releaseGpu();
  process.exit(0);
}
if (gpu.features.has('chromium-experimental-subgroup-matrix')) {
  await probeRightLoads(gpu);
  await probeScoreTiles(gpu);
}
gpu.destroy();
releaseGpu();

// Device probe: raw rates of the int8 building blocks (tensor-core MMA, dot4I8Packed, matrix loads from workgroup and
// storage memory, staging), to find which one holds the int8 GEMMs and MLA kernels far below their ceilings.
//
//   node --import tsx bench/probe-rates.ts                  # needs a GPU with i8 subgroup matrices (the H200)
//   node --import tsx bench/probe-rates.ts --gemm-shapes    # only the int8 GEMM's structure taken apart
//   node --import tsx bench/probe-rates.ts --mla-rows       # only the MLA cache's row-strided tile loads
import { openGpu, releaseGpu, type GpuContext } from '../kernels/device.ts';
import { timeGpuPass, spinUpGpu } from './gpu-timing.ts';

const log = (s: string) => process.stdout.write(s + '\n');
const range = (n: number) => [...Array(n).keys()];

interface Probe {
  name: string;
  code: string;
  groups: number;
  /** What one dispatch does: operations (2 per multiply-add) or bytes read. */
  work: number;
  unit: 'TOPS' | 'GB/s';
  big?: boolean;
}

const HEAD = `enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);
@group(0) @binding(0) var<storage, read> big: array<i32>;
@group(0) @binding(1) var<storage, read_write> sink: array<i32>;
`;
const L = 'subgroup_matrix_left<i8, 32, 16>';
const R = 'subgroup_matrix_right<i8, 16, 32>';
const Acc = 'subgroup_matrix_result<i32, 16, 16>';

function probes(sms: number, bigBytes: number): Probe[] {
  const list: Probe[] = [];
  const wgs = sms * 8;
  const iters = 4096;
  const chains = 4;
  const cs = range(chains);
  const store = cs.map((c) => `subgroupMatrixStore(&sink, ((wid.x * 8u + sg) * ${chains}u + ${c}u) * 256u, acc${c}, false, 16u);`).join('\n  ');
  const accs = cs.map((c) => `var acc${c} = ${Acc}();`).join('\n  ');
  const fill = `for (var i = lid; i < 4096u; i += 256u) { ws[i] = i32(i * 2654435761u); }\n  workgroupBarrier();`;
  // A streaming probe: a fixed left tile, `chains` accumulators, `body` streams right tiles from storage into them.
  const streamProbe = (body: string) => `${HEAD}var<workgroup> ws: array<i32, 4096>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  ${fill}
  let l = subgroupMatrixLoad<${L}>(&ws, 0u, false, 32u);
  ${accs}
${body}
  ${store}
}`;
  // 1. MMA alone: operands in registers, four independent accumulators per subgroup.
  list.push({
    name: 'mma, operands in registers',
    groups: wgs,
    work: wgs * 8 * iters * chains * 16 * 16 * 32 * 2,
    unit: 'TOPS',
    code: `${HEAD}var<workgroup> ws: array<i32, 4096>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  ${fill}
  let l = subgroupMatrixLoad<${L}>(&ws, 0u, false, 32u);
  let r = subgroupMatrixLoad<${R}>(&ws, 512u, true, 32u);
  ${accs}
  for (var it = 0u; it < ${iters}u; it++) {
    ${cs.map((c) => `acc${c} = subgroupMatrixMultiplyAccumulate(l, r, acc${c});`).join('\n    ')}
  }
  ${store}
}`,
  });
  // 2. MMA with the right operand loaded from workgroup memory every time (col-major, stride 32 and stride 128).
  for (const stride of [32, 128]) {
    list.push({
      name: `mma + right from workgroup, stride ${stride}`,
      groups: wgs,
      work: wgs * 8 * (iters / 4) * chains * 16 * 16 * 32 * 2,
      unit: 'TOPS',
      code: `${HEAD}var<workgroup> ws: array<i32, 4096>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  ${fill}
  let l = subgroupMatrixLoad<${L}>(&ws, 0u, false, 32u);
  ${accs}
  for (var it = 0u; it < ${iters / 4}u; it++) {
    ${cs.map((c) => `acc${c} = subgroupMatrixMultiplyAccumulate(l, subgroupMatrixLoad<${R}>(&ws, ((it + ${c}u) % 8u) * ${stride === 32 ? 512 : 32}u, true, ${stride}u), acc${c});`).join('\n    ')}
  }
  ${store}
}`,
    });
  }
  // 3. dot4I8Packed alone: 8 dependent chains per thread.
  list.push({
    name: 'dot4I8Packed, registers',
    groups: wgs,
    work: wgs * 256 * iters * 8 * 4 * 2,
    unit: 'TOPS',
    code: `@group(0) @binding(0) var<storage, read> big: array<i32>;
@group(0) @binding(1) var<storage, read_write> sink: array<i32>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let v = u32(big[lid]);
  ${range(8).map((j) => `var a${j} = i32(lid + ${j}u);`).join('\n  ')}
  for (var it = 0u; it < ${iters}u; it++) {
    ${range(8).map((j) => `a${j} += dot4I8Packed(u32(a${j}), v);`).join('\n    ')}
  }
  sink[wid.x * 256u + lid] = ${range(8).map((j) => `a${j}`).join(' ^ ')};
}`,
  });
  // 4. Streaming the big buffer as 512-byte right tiles straight from storage (tile-contiguous, stride 32), U in flight.
  const tiles = bigBytes / 512;
  for (const [u, groups] of [[1, wgs], [4, wgs], [4, wgs * 4]]) {
    list.push({
      name: `storage tiles → mma, u${u}, ${groups} wgs`,
      groups,
      work: bigBytes,
      unit: 'GB/s',
      big: true,
      code: streamProbe(`  let total = nwg.x * 8u;
  for (var t = wid.x * 8u + sg; t < ${tiles}u; t += ${u}u * total) {
    ${range(u).map((k) => `let r${k} = subgroupMatrixLoad<${R}>(&big, min(t + ${k}u * total, ${tiles - 1}u) * 512u, true, 32u);`).join('\n    ')}
    ${range(u).map((k) => `acc${k % chains} = subgroupMatrixMultiplyAccumulate(l, r${k}, acc${k % chains});`).join('\n    ')}
  }`),
    });
  }
  // 4b. The same tiles, but each subgroup streams its own run of 112 consecutive tiles (57 KB: one column tile of a
  //     K = 3584 matrix in a row-tile-major layout): the GPU's concurrent reads spread over the whole buffer.
  for (const u of [2, 4]) {
    const run = 112;
    list.push({
      name: `storage tiles, 57 KB run per subgroup, u${u}`,
      groups: tiles / run / 8,
      work: bigBytes,
      unit: 'GB/s',
      big: true,
      code: streamProbe(`  let base = (wid.x * 8u + sg) * ${run}u;
  for (var i = 0u; i < ${run}u; i += ${u}u) {
    ${range(u).map((k) => `let r${k} = subgroupMatrixLoad<${R}>(&big, min(base + i + ${k}u, ${tiles - 1}u) * 512u, true, 32u);`).join('\n    ')}
    ${range(u).map((k) => `acc${k % chains} = subgroupMatrixMultiplyAccumulate(l, r${k}, acc${k % chains});`).join('\n    ')}
  }`),
    });
  }
  // 5. The GEMM layout: weight rows of K = 4096 bytes, a right tile = 16 rows × 32 bytes (stride 4096); neighbouring
  //    subgroups take neighbouring 32-byte pieces of the same rows.
  const K = 4096;
  const rowTiles = bigBytes / (16 * K);
  const kSteps = K / 32;
  for (const u of [1, 4]) {
    list.push({
      name: `storage rows (K ${K}) → mma, u${u}`,
      groups: wgs,
      work: bigBytes,
      unit: 'GB/s',
      big: true,
      code: streamProbe(`  let total = nwg.x * 8u;
  for (var t = wid.x * 8u + sg; t < ${rowTiles * kSteps}u; t += ${u}u * total) {
    ${range(u).map((k) => `let t${k} = min(t + ${k}u * total, ${rowTiles * kSteps - 1}u);\n    let r${k} = subgroupMatrixLoad<${R}>(&big, (t${k} / ${kSteps}u) * ${16 * K}u + (t${k} % ${kSteps}u) * 32u, true, ${K}u);`).join('\n    ')}
    ${range(u).map((k) => `acc${k % chains} = subgroupMatrixMultiplyAccumulate(l, r${k}, acc${k % chains});`).join('\n    ')}
  }`),
    });
  }
  // 6. The same rows staged: each subgroup copies its 16 × 32·u bytes with vec4 loads into its own workgroup region, then
  //    loads the matrices from there (a subgroup-private region: no workgroup barrier, storageBarrier-free).
  for (const u of [2, 4]) {
    const perSg = 16 * 8 * u; // i32 per subgroup region
    const v4 = 16 * 2 * u; // vec4 per tile group
    list.push({
      name: `storage rows → vec4 → workgroup → mma, u${u}`,
      groups: wgs,
      work: bigBytes,
      unit: 'GB/s',
      big: true,
      code: `${HEAD.replace('array<i32>;\n@group(0) @binding(1)', 'array<i32>;\n@group(0) @binding(2) var<storage, read> bigv: array<vec4<i32>>;\n@group(0) @binding(1)')}var<workgroup> ws: array<i32, ${Math.max(4096, 8 * perSg)}>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  ${fill}
  let l = subgroupMatrixLoad<${L}>(&ws, 0u, false, 32u);
  workgroupBarrier();
  ${accs}
  let lane = lid % 32u;
  let total = nwg.x * 8u;
  let chunks = ${rowTiles * (kSteps / u)}u;
  let iters = (chunks + total - 1u) / total;
  for (var i = 0u; i < iters; i++) {
    let t = min(i * total + wid.x * 8u + sg, chunks - 1u);
    let row0 = (t / ${kSteps / u}u) * 16u;
    let k4 = (t % ${kSteps / u}u) * ${2 * u}u;
    ${range(v4 / 32)
      .map((j) => `{
      let e = lane + ${j * 32}u;
      let v = bigv[(row0 + e / ${2 * u}u) * ${K / 16}u + k4 + e % ${2 * u}u];
      let o = sg * ${perSg}u + (e / ${2 * u}u) * ${8 * u}u + (e % ${2 * u}u) * 4u;
      ws[o] = v.x; ws[o + 1u] = v.y; ws[o + 2u] = v.z; ws[o + 3u] = v.w;
    }`)
      .join('\n    ')}
    workgroupBarrier();
    ${range(u).map((k) => `acc${k % chains} = subgroupMatrixMultiplyAccumulate(l, subgroupMatrixLoad<${R}>(&ws, sg * ${perSg * 4}u + ${k * 32}u, true, ${32 * u}u), acc${k % chains});`).join('\n    ')}
    workgroupBarrier();
  }
  ${store}
}`,
    });
  }
  // 7. Control: the same vec4 reads, xor-reduced, no matrices.
  list.push({
    name: 'storage rows → vec4, xor (control)',
    groups: wgs,
    work: bigBytes,
    unit: 'GB/s',
    big: true,
    code: `@group(0) @binding(0) var<storage, read> big: array<i32>;
@group(0) @binding(1) var<storage, read_write> sink: array<i32>;
@group(0) @binding(2) var<storage, read> bigv: array<vec4<i32>>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  var acc = vec4<i32>(0);
  let n = ${bigBytes / 16}u;
  let threads = nwg.x * 256u;
  for (var i = wid.x * 256u + lid; i < n; i += 4u * threads) {
    acc ^= bigv[i]; acc ^= bigv[min(i + threads, n - 1u)]; acc ^= bigv[min(i + 2u * threads, n - 1u)]; acc ^= bigv[min(i + 3u * threads, n - 1u)];
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x1234567) { sink[0] = 1; }
}`,
  });
  return list;
}

/**
 * The int8 GEMM's structure taken apart on a gate_up-sized stream (136 MB of 512-byte tiles): runs of `run` tiles
 * per subgroup, `wgs` workgroups of 8 subgroups, `u` loads per iteration, with or without a rotating set of four
 * accumulators, a left tile loaded per step from a small storage buffer, and the GEMM's partial-tile epilogue.
 */
function gemmShapes(): Probe[] {
  const bytes = 136 * 1024 * 1024;
  const tiles = bytes / 512;
  const list: Probe[] = [];
  const variants: { name: string; run: number; u: number; chains: number; leftLoad: boolean; epilogue: boolean }[] = [
    { name: 'runs 112, 4 chains', run: 112, u: 4, chains: 4, leftLoad: false, epilogue: false },
    { name: 'runs 112, 1 chain', run: 112, u: 4, chains: 1, leftLoad: false, epilogue: false },
    { name: 'runs 112, 4 chains, left from storage', run: 112, u: 4, chains: 4, leftLoad: true, epilogue: false },
    { name: 'runs 112, 1 chain, left from storage, epilogue', run: 112, u: 4, chains: 1, leftLoad: true, epilogue: true },
    { name: 'runs 28, 4 chains', run: 28, u: 4, chains: 4, leftLoad: false, epilogue: false },
    { name: 'runs 28, 1 chain, left, epilogue', run: 28, u: 4, chains: 1, leftLoad: true, epilogue: true },
    { name: 'runs 448, 4 chains', run: 448, u: 4, chains: 4, leftLoad: false, epilogue: false },
    { name: 'runs 112, 4 chains, u8', run: 112, u: 8, chains: 4, leftLoad: false, epilogue: false },
  ];
  for (const v of variants) {
    const wgs = Math.ceil(tiles / v.run / 8);
    const cs = range(v.chains);
    list.push({
      name: `gemm shape: ${v.name} (${wgs} wgs)`,
      groups: wgs,
      work: bytes,
      unit: 'GB/s',
      big: true,
      code: `${HEAD}var<workgroup> ws: array<i32, 4096>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  ${'for (var i = lid; i < 4096u; i += 256u) { ws[i] = i32(i * 2654435761u); }\n  workgroupBarrier();'}
  var l = subgroupMatrixLoad<${L}>(&ws, 0u, false, 32u);
  ${cs.map((c) => `var acc${c} = ${Acc}();`).join('\n  ')}
  let base = (wid.x * 8u + sg) * ${v.run}u;
  for (var i = 0u; i < ${v.run}u; i += ${v.u}u) {
    ${range(v.u).map((k) => `let r${k} = subgroupMatrixLoad<${R}>(&big, min(base + i + ${k}u, ${tiles - 1}u) * 512u, true, 32u);`).join('\n    ')}
    ${range(v.u).map((k) => (v.leftLoad ? `let l${k} = subgroupMatrixLoad<${L}>(&big, ((i + ${k}u) % 64u) * 512u, false, 32u);` : `let l${k} = l;`)).join('\n    ')}
    ${range(v.u).map((k) => `acc${k % v.chains} = subgroupMatrixMultiplyAccumulate(l${k}, r${k}, acc${k % v.chains});`).join('\n    ')}
  }
  ${
    v.epilogue
      ? `subgroupMatrixStore(&ws, sg * 256u, acc0, false, 16u);
  workgroupBarrier();
  var sum = 0i;
  for (var g = 0u; g < 8u; g++) { sum += ws[g * 256u + lid]; }
  sink[wid.x * 256u + lid] = sum;`
      : cs.map((c) => `subgroupMatrixStore(&sink, ((wid.x * 8u + sg) * 4u + ${c}u) * 256u, acc${c}, false, 16u);`).join('\n  ')
  }
}`,
    });
  }
  return list;
}

/**
 * The int8 MLA cache's loads (kernels/mla-attention-flash.ts): rows of `stride` bytes (584 = 512 latent + 64 rope + 8
 * of scales; 592 / 608 / 640 padded to 16 / 32 / 128 bytes), each subgroup taking 16 rows ('scores': 18 right tiles of
 * 16 rows × 32 bytes, column-major, `u` in flight) or 32 rows ('values': 32 right tiles of 32 rows × 16 bytes,
 * row-major); against the same bytes laid out tile by tile ('tiled': [32 rows][32 bytes] pieces of 1 KB, the score
 * tile one 512-byte half, the value tile 32 rows × 16 bytes of a piece at stride 32).
 */
function mlaRowShapes(sms: number): Probe[] {
  const list: Probe[] = [];
  const bytes = 256 * 1024 * 1024;
  const u = 6;
  // One unit a subgroup over as many workgroups as units; or, `persistent`, one workgroup an SM whose subgroups loop
  // over the units (the flash kernel's occupancy: what one SM's load path gives a few subgroups).
  const body = (groups: number, loads: string, count: number, persistent = false) => `${HEAD}var<workgroup> ws: array<i32, 4096>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  for (var i = lid; i < 4096u; i += 256u) { ws[i] = i32(i * 2654435761u); }
  workgroupBarrier();
  let l = subgroupMatrixLoad<${L}>(&ws, 0u, false, 32u);
  var acc0 = ${Acc}();
  var acc1 = ${Acc}();
  ${persistent ? `for (var unit = wid.x * 8u + sg; unit < ${groups}u; unit += ${sms * 8}u) {` : `{\n  let unit = min(wid.x * 8u + sg, ${groups - 1}u);`}
  for (var i = 0u; i < ${count}u; i += ${u}u) {
    ${range(u).map((k) => `let r${k} = ${loads.replaceAll('$K', `min(i + ${k}u, ${count - 1}u)`)};`).join('\n    ')}
    ${range(u).map((k) => `acc${k % 2} = subgroupMatrixMultiplyAccumulate(l, r${k}, acc${k % 2});`).join('\n    ')}
  }
  }
  subgroupMatrixStore(&sink, (wid.x * 8u + sg) * 512u, acc0, false, 16u);
  subgroupMatrixStore(&sink, (wid.x * 8u + sg) * 512u + 256u, acc1, false, 16u);
}`;
  // `units` 16- or 32-row units of `count` tiles each, `work` bytes read; one workgroup an SM when `persistent`.
  const rate = (name: string, units: number, work: number, loads: string, count: number, persistent = false) =>
    list.push({ name, groups: persistent ? sms : Math.ceil(units / 8), work, unit: 'GB/s', big: true, code: body(units, loads, count, persistent) });
  const scoreLoads = (stride: number) => `subgroupMatrixLoad<${R}>(&big, unit * ${16 * stride}u + $K * 32u, true, ${stride}u)`;
  for (const stride of [584, 592, 608, 640]) {
    const rows = Math.floor(bytes / stride);
    rate(`mla rows ${stride} B, score tiles`, Math.floor(rows / 16), Math.floor(rows / 16) * 16 * 576, scoreLoads(stride), 18);
    rate(`mla rows ${stride} B, value tiles`, Math.floor(rows / 32), Math.floor(rows / 32) * 32 * 512, `subgroupMatrixLoad<${R}>(&big, unit * ${32 * stride}u + $K * 16u, false, ${stride}u)`, 32);
  }
  const sGroups = Math.floor(Math.floor(bytes / 584) / 16);
  rate(`mla rows 584 B, score tiles, ${sms} wgs`, sGroups, sGroups * 16 * 576, scoreLoads(584), 18, true);
  const runs = Math.floor(bytes / 512 / 18);
  rate(`contiguous 512-byte tiles, ${sms} wgs`, runs, runs * 18 * 512, `subgroupMatrixLoad<${R}>(&big, (unit * 18u + $K) * 512u, true, 32u)`, 18, true);
  // Tiled: a 32-row block of 576 bytes a row as 18 pieces of [32 rows][32 bytes].
  const blocks = Math.floor(bytes / (32 * 576));
  rate('mla tiled, score tiles', blocks * 2, blocks * 32 * 576, `subgroupMatrixLoad<${R}>(&big, (unit / 2u) * ${32 * 576}u + $K * 1024u + (unit % 2u) * 512u, true, 32u)`, 18);
  rate('mla tiled, value tiles', blocks, blocks * 32 * 512, `subgroupMatrixLoad<${R}>(&big, unit * ${32 * 576}u + ($K / 2u) * 1024u + ($K % 2u) * 16u, false, 32u)`, 32);
  return list;
}

const gpu = await openGpu();
log(`adapter: ${gpu.adapterName}; subgroup size ${gpu.subgroupSize}; configs ${JSON.stringify(gpu.subgroupMatrixConfigs)}`);
const sms = Number(process.env.PROBE_SMS ?? 132);
const bigBytes = 512 * 1024 * 1024;
const big = gpu.device.createBuffer({ size: bigBytes, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST });
const chunk = new Int32Array(1 << 22);
for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 2654435761) | 0;
for (let off = 0; off < bigBytes; off += chunk.byteLength) gpu.device.queue.writeBuffer(big, off, chunk);
const sink = gpu.device.createBuffer({ size: sms * 8 * 4 * 8 * 4 * 256 * 4, usage: GPUBufferUsage.STORAGE });
const only = process.argv.includes('--gemm-shapes') ? gemmShapes() : process.argv.includes('--mla-rows') ? mlaRowShapes(sms) : undefined;
for (const p of only ?? [...probes(sms, bigBytes), ...gemmShapes(), ...mlaRowShapes(sms)]) {
  try {
    const pipeline = gpu.pipeline(`rate ${p.name}`, p.code);
    const layout = pipeline.getBindGroupLayout(0);
    // Only the bindings the shader uses are in its layout.
    const entries: GPUBindGroupEntry[] = [{ binding: 1, resource: { buffer: sink } }];
    if (/[&(]big[,)]|big\[/.test(p.code)) entries.push({ binding: 0, resource: { buffer: big } });
    if (p.code.includes('bigv[')) entries.push({ binding: 2, resource: { buffer: big } });
    const bg = gpu.device.createBindGroup({ layout, entries });
    const enc = (reps: number) => (pass: GPUComputePassEncoder) => {
      for (let r = 0; r < reps; r++) {
        pass.setPipeline(pipeline);
        pass.setBindGroup(0, bg);
        pass.dispatchWorkgroups(p.groups);
      }
    };
    await spinUpGpu(gpu, enc(2), 150);
    const t = await timeGpuPass(gpu, enc(5));
    const rate = (p.work * 5) / t.ns; // per ns: ops/ns = G ops/s; bytes/ns = GB/s
    log(`${p.name.padEnd(48)} ${(t.ns / 5 / 1000).toFixed(1).padStart(9)} µs  ${p.unit === 'TOPS' ? (rate / 1000).toFixed(1) : rate.toFixed(0)} ${p.unit}`);
  } catch (e) {
    log(`${p.name.padEnd(48)} failed: ${String(e).split('\n')[0].slice(0, 200)}`);
  }
}
gpu.checkErrors();
big.destroy();
sink.destroy();
gpu.destroy();
releaseGpu();

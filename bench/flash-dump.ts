// Where the one-pass tensor-core MLA kernel's value products went wrong (kernels/mla-attention-flash.ts: p′ loaded from
// workgroup memory, which its workgroup-memory form still shows; through storage, the default, they are exact): one decode row
// of the Qwen2.5-7B MLA shape over 64 cached tokens in two shuffled 32-token blocks, run with both products on tensor
// cores, with the value products alone on them, and in the dot4 form; each run dumps (int8FlashDebug) its first
// window's value tiles of round 0, p′ and K-step rows, and the host recomputes every tile from that run's own p′ and
// the cache it wrote — so a wrong tile is the product's fault, not its inputs'. For a wrong tile it also tries a few
// simple faults (one K step only, the other head tile, a neighbouring latent tile, the tile transposed, K rows 16
// tokens off) and names any that reproduce the tile.
//
//   node --import tsx bench/flash-dump.ts
import { openGpu, releaseGpu } from '../kernels/device.ts';
import { MlaAttention, type MlaAttentionTuning } from '../kernels/mla-attention.ts';
import { mlaFlashDumpLayout } from '../kernels/mla-attention-flash.ts';
import { mlaInt8RowFormat } from '../kernels/mla-kv-int8.ts';
import { buildStepMeta } from '../kernels/step-meta.ts';
import { readF32, storageBuffer, uploadArray } from '../kernels/tensors.ts';
import { mlaTcOnTensorCores } from '../kernels/mla-attention-tc.ts';

const log = (s: string) => process.stdout.write(s + '\n');
const H = 28;
const R = 512;
const ROPE = 64;
const BLOCK = 32;
const CTX = 64;
const f = mlaInt8RowFormat(R, ROPE);

// A fixed-seed generator: the run is the same every time.
let state = 0x9e3779b9;
const next = () => {
  state ^= state << 13;
  state ^= state >>> 17;
  state ^= state << 5;
  return state >>> 0;
};

const gpu = await openGpu();
log(`adapter: ${gpu.adapterName}; tensor cores for the MLA kernels: ${mlaTcOnTensorCores(gpu)}`);
const poolBlocks = 4;
const table = [3, 1];
const words = new Uint32Array(poolBlocks * BLOCK * f.rowWords);
for (let row = 0; row < poolBlocks * BLOCK; row++) {
  for (let w = 0; w < f.rowWords; w++) words[row * f.rowWords + w] = next();
  // Scales in [2^-7, 2^-6).
  words[row * f.rowWords + f.scaleWord] = (0x3c000000 | (next() & 0x7fffff)) >>> 0;
  words[row * f.rowWords + f.scaleWord + 1] = (0x3c000000 | (next() & 0x7fffff)) >>> 0;
}
const cacheByte = (row: number, byte: number) => {
  const b = (words[row * f.rowWords + (byte >> 2)] >>> (8 * (byte & 3))) & 0xff;
  return b >= 128 ? b - 256 : b;
};
const cache = uploadArray(gpu, 'cache', words);
const q = Float32Array.from({ length: H * (R + ROPE) }, () => ((next() / 2 ** 32) * 2 - 1) * (2 / Math.sqrt(R + ROPE)));
const qLatent = uploadArray(gpu, 'qLatent', q);
const out = storageBuffer(gpu, 'out', H * R * 4);
const m = buildStepMeta([{ tokens: [0], startPos: CTX - 1, blockTable: table, logits: 'none' }], { blockSize: BLOCK, numBlocks: poolBlocks, nKvHeads: 1, maxChunkSize: 512, chunkSize: 64 });
const meta = uploadArray(gpu, 'meta', m.data);

const forms: Array<[string, Partial<MlaAttentionTuning>]> = [
  ['dot4 form', { int8Products: 'flash-dot4' }],
  ['dot4 form, p′ in workgroup memory', { int8Products: 'flash-dot4', int8FlashPqStorage: false }],
  ...(mlaTcOnTensorCores(gpu)
    ? ([
        ['values on tensor cores', { int8Products: 'flash', int8FlashTensorCores: 'values' }],
        ['both on tensor cores', { int8Products: 'flash' }],
        ['both, values Cᵀ·p′ᵀ', { int8Products: 'flash', int8FlashValueForm: 'transposed' }],
        ['both, p′ in workgroup memory', { int8Products: 'flash', int8FlashPqStorage: false }],
      ] as Array<[string, Partial<MlaAttentionTuning>]>)
    : []),
];
for (const [name, tuning] of forms) {
  const att = new MlaAttention(gpu, { nHeads: H, kvLoraRank: R, qkRopeHeadDim: ROPE }, { rowValues: R + ROPE, blockSize: BLOCK, dtype: 'int8' }, { meta, qLatent, out, outStride: H * R, layerCaches: [cache] }, { ...tuning, int8FlashDebug: true });
  const p = att.flashPlan!;
  const lay = mlaFlashDumpLayout(p);
  att.prepare(m.nRows, m.maxChunks, m.chunkSize);
  const enc = gpu.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  att.encode(pass, 0, m.nRows, m.maxChunks, m.chunkSize);
  pass.end();
  gpu.device.queue.submit([enc.finish()]);
  const raw = await readF32(gpu, att.int8DebugDump!.buffer, lay.words);
  gpu.checkErrors();
  const d = new Int32Array(raw.buffer, raw.byteOffset, lay.words);
  const W = p.window;
  const KS = W / 32;
  const HT = p.headTiles;
  const FL = p.foldLatentTiles;
  const LPS = p.latentTilesPerSubgroup;
  const pqByte = (h: number, t: number) => {
    const i = h * W + t;
    const b = (d[lay.pq + (i >> 2)] >>> (8 * (i & 3))) & 0xff;
    return b >= 128 ? b - 256 : b;
  };
  const rows = Array.from({ length: KS }, (_, ks) => d[lay.rows + ks]);
  const n = d[lay.rows + KS];
  // A tile (head tile ht, latent tile lt) from p′ and the cache, with the K steps and row offset given.
  const tile = (ht: number, lt: number, steps: number[], rowShift = 0) => {
    const t = new Int32Array(256);
    for (let mm = 0; mm < 16; mm++) {
      for (let nn = 0; nn < 16; nn++) {
        let acc = 0;
        for (const ks of steps) for (let k = 0; k < 32; k++) acc += pqByte(ht * 16 + mm, ks * 32 + k) * cacheByte(rows[ks] + k + rowShift, lt * 16 + nn);
        t[mm * 16 + nn] = acc;
      }
    }
    return t;
  };
  const diff = (a: Int32Array, b: Int32Array) => a.reduce((s, v, i) => s + (v !== b[i] ? 1 : 0), 0);
  let wrongTiles = 0;
  let first = '';
  for (let sg = 0; sg < p.subgroups; sg++) {
    for (let j = 0; j < FL; j++) {
      for (let ht = 0; ht < HT; ht++) {
        const lt = sg * LPS + j;
        const at = lay.tiles + (sg * FL * HT + j * HT + ht) * 256;
        const got = d.subarray(at, at + 256);
        const want = tile(ht, lt, [...Array(KS).keys()]);
        const bad = diff(got, want);
        if (!bad) continue;
        wrongTiles++;
        if (first) continue;
        const tries: Array<[string, Int32Array]> = [
          ...[...Array(KS).keys()].map((ks): [string, Int32Array] => [`K step ${ks} only`, tile(ht, lt, [ks])]),
          [`head tile ${1 - ht}`, tile(1 - ht, lt, [...Array(KS).keys()])],
          [`latent tile ${lt + 1}`, tile(ht, lt + 1, [...Array(KS).keys()])],
          [`latent tile ${Math.max(0, lt - 1)}`, tile(ht, Math.max(0, lt - 1), [...Array(KS).keys()])],
          ['transposed', Int32Array.from({ length: 256 }, (_, i) => want[(i % 16) * 16 + Math.floor(i / 16)])],
          ['K rows 16 tokens on', tile(ht, lt, [...Array(KS).keys()], 16)],
          ['zero', new Int32Array(256)],
        ];
        const matches = tries.map(([label, t]) => `${label}: ${diff(got, t)} off`).join('; ');
        first =
          `first wrong tile: subgroup ${sg}, latent tile ${lt}, head tile ${ht}: ${bad} of 256 wrong; ` +
          `row 0 got [${[...got.subarray(0, 6)].join(', ')}] want [${[...want.subarray(0, 6)].join(', ')}]; against simple faults: ${matches}`;
      }
    }
  }
  // The operands as the tensor cores loaded them ('rows' form on tensor cores: p′ 16 × 32 and cache 32 × 16, row-major).
  if (tuning.int8Products === 'flash' && tuning.int8FlashTensorCores !== 'scores' && tuning.int8FlashValueForm !== 'transposed') {
    const byteOf = (word: number, i: number) => {
      const b = (d[word + (i >> 2)] >>> (8 * (i & 3))) & 0xff;
      return b >= 128 ? b - 256 : b;
    };
    for (const sg of [0, 1, p.subgroups - 1]) {
      const base = lay.operands + sg * 256;
      let badL = 0;
      let badR = 0;
      const lt = sg * LPS;
      for (let mm = 0; mm < 16; mm++) for (let k = 0; k < 32; k++) if (byteOf(base, mm * 32 + k) !== pqByte(mm, k)) badL++;
      for (let k = 0; k < 32; k++) for (let nn = 0; nn < 16; nn++) if (byteOf(base + 128, k * 16 + nn) !== cacheByte(rows[0] + k, lt * 16 + nn)) badR++;
      const sample = (off: number, count: number) => [...Array(count).keys()].map((i) => byteOf(base + off, i)).join(' ');
      log(
        `  subgroup ${sg} operands as loaded: p′ ${badL} of 512 bytes wrong, cache ${badR} of 512 wrong; p′ row 0 [${sample(0, 8)}] want [${[...Array(8).keys()].map((k) => pqByte(0, k)).join(' ')}]; ` +
          `cache row 0 [${sample(128, 8)}] want [${[...Array(8).keys()].map((nn) => cacheByte(rows[0], lt * 16 + nn)).join(' ')}], row 1 [${[...Array(8).keys()].map((i) => byteOf(base + 128, 16 + i)).join(' ')}] want [${[...Array(8).keys()].map((nn) => cacheByte(rows[0] + 1, lt * 16 + nn)).join(' ')}]`,
      );
    }
  }
  const pqNonZero = [...Array(p.headsPadded * W).keys()].filter((i) => pqByte(Math.floor(i / W), i % W) !== 0).length;
  log(`${name}: window n ${n}, K-step rows [${rows.join(', ')}], p′ non-zero ${pqNonZero} of ${p.headsPadded * W}; round 0: ${wrongTiles} of ${p.subgroups * FL * HT} value tiles wrong`);
  if (first) log(`  ${first}`);
  att.destroy();
}
for (const b of [cache, qLatent, out, meta]) b.destroy();
gpu.destroy();
releaseGpu();

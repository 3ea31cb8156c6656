// Host check of the int8-product MLA kernel's debug dump (MlaAttentionTuning.int8Debug): what workgroup (chunk 0,
// row 0) staged and computed in its first score window, against host integer arithmetic on the same inputs. It splits
// "the score phase is wrong" into: wrong staged cache rows, a wrong quantized query, wrong score tiles given the staged
// rows and query (the tensor-core products), or wrong f32 scores given right tiles (the scaling).
import { mlaTcDumpLayout, type MlaTcPlan } from '../kernels/mla-attention-tc.ts';
import type { MlaInt8RowFormat } from '../kernels/mla-kv-int8.ts';

export interface MlaTcDumpInputs {
  nHeads: number;
  format: MlaInt8RowFormat;
  plan: MlaTcPlan;
  /** Row 0's absorbed query, nHeads × (R + r) f32. */
  q: Float32Array;
  /** Stored words of row 0's cached tokens 0, 1, … (at least the first window's). */
  rowWords: (t: number) => Uint32Array;
  /** Tokens of row 0's first window of chunk 0: min(window, chunk, context). */
  windowTokens: number;
  /** The dump holds score tiles (the scores ran on tensor cores). */
  tiles: boolean;
}

export interface MlaTcDumpCheck {
  /** Staged words of sub-tile 0 that differ from the cache rows (32 rows × rowPad / 4 words). */
  ctWrong: number;
  /** Query bytes more than one step away from the host's quantization (f32 division may differ in the last ulp). */
  qqWrong: number;
  /** Score tile integers that differ from Σ qq · ct of the dumped query and rows (−1: no tiles). */
  tilesWrong: number;
  /** f32 scores of the window beyond 1e-5 of the largest, against the dumped integers and host scales. */
  scWrong: number;
  /** The first few differences, readable. */
  first: string[];
}

const i8 = (word: number, byte: number) => ((word >>> (8 * byte)) << 24) >> 24;
const f32 = (bits: number) => new Float32Array(new Uint32Array([bits]).buffer)[0];
const roundEven = (x: number) => {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
};

export function checkMlaTcDump(dump: Int32Array, o: MlaTcDumpInputs): MlaTcDumpCheck {
  const { plan: p, format: f, nHeads } = o;
  const L = mlaTcDumpLayout(p);
  const R = f.kvLoraRank;
  const r = f.qkRopeHeadDim;
  const rowW = p.rowPad / 4;
  const latW = p.latentPad / 4;
  const first: string[] = [];
  const note = (s: string) => {
    if (first.length < 6) first.push(s);
  };
  const n = o.windowTokens;

  // Staged rows: [c | 0 | k_pe | 0], zero rows past the window's tokens.
  let ctWrong = 0;
  for (let t = 0; t < 32; t++) {
    const words = t < n ? o.rowWords(t) : undefined;
    for (let w = 0; w < rowW; w++) {
      let want = 0;
      if (words) {
        if (w < latW) want = w < f.latentWords ? words[w] : 0;
        else if (w - latW < f.ropeWords) want = words[f.ropeWord + w - latW];
      }
      const got = dump[L.ct + t * rowW + w] >>> 0;
      if (got !== want >>> 0) {
        ctWrong++;
        note(`ct token ${t} word ${w}: 0x${got.toString(16)}, want 0x${(want >>> 0).toString(16)}`);
      }
    }
  }

  // Query: per head, q̃ and q_pe each quantized with absmax / 127 (as mlaTcQueryWgsl).
  let qqWrong = 0;
  const absMax: Array<[number, number]> = [];
  for (let h = 0; h < p.headsPadded; h++) {
    const live = h < nHeads;
    const qh = live ? o.q.subarray(h * (R + r), (h + 1) * (R + r)) : new Float32Array(R + r);
    let mL = 0;
    let mP = 0;
    for (let k = 0; k < R + r; k++) {
      if (k < R) mL = Math.max(mL, Math.abs(qh[k]));
      else mP = Math.max(mP, Math.abs(qh[k]));
    }
    absMax.push([mL, mP]);
    const invL = mL > 0 ? Math.fround(127 / mL) : 0;
    const invP = mP > 0 ? Math.fround(127 / mP) : 0;
    for (let b = 0; b < p.rowPad; b++) {
      let want = 0;
      if (live && b < R) want = Math.max(-127, Math.min(127, roundEven(Math.fround(qh[b] * invL))));
      else if (live && b >= p.latentPad && b - p.latentPad < r) want = Math.max(-127, Math.min(127, roundEven(Math.fround(qh[R + b - p.latentPad] * invP))));
      const got = i8(dump[L.qq + h * rowW + (b >> 2)], b & 3);
      if (Math.abs(got - want) > 1) {
        qqWrong++;
        note(`qq head ${h} byte ${b}: ${got}, want ${want}`);
      }
    }
  }

  // Integer scores from the dumped rows and query (what the products must give).
  const ints = (t: number, h: number): [number, number] => {
    let sL = 0;
    let sP = 0;
    for (let b = 0; b < p.rowPad; b++) {
      const prod = i8(dump[L.qq + h * rowW + (b >> 2)], b & 3) * i8(dump[L.ct + t * rowW + (b >> 2)], b & 3);
      if (b < p.latentPad) sL += prod;
      else sP += prod;
    }
    return [sL, sP];
  };
  let tilesWrong = -1;
  if (o.tiles) {
    tilesWrong = 0;
    for (let a = 0; a < p.headTiles * 2; a++) {
      for (let e = 0; e < 256; e++) {
        const t = (a % 2) * 16 + Math.floor(e / 16);
        const h = Math.floor(a / 2) * 16 + (e % 16);
        const [sL, sP] = ints(t, h);
        const gL = dump[L.tiles + a * 512 + e];
        const gP = dump[L.tiles + a * 512 + 256 + e];
        if (gL !== sL || gP !== sP) {
          tilesWrong++;
          note(`tile ${a} token ${t} head ${h}: latent ${gL} rope ${gP}, want ${sL} ${sP}`);
        }
      }
    }
  }

  // f32 scores of the window (every sub-tile; tokens past 32 use the cache rows directly).
  let scWrong = 0;
  const want: number[] = [];
  for (let h = 0; h < p.headsPadded; h++) {
    const sq = [Math.fround(absMax[h][0] / 127), Math.fround(absMax[h][1] / 127)];
    for (let t = 0; t < p.window; t++) {
      if (t >= n) {
        want.push(-3e38);
        continue;
      }
      let sL = 0;
      let sP = 0;
      if (t < 32) [sL, sP] = ints(t, h);
      else {
        const words = o.rowWords(t);
        for (let b = 0; b < p.rowPad; b++) {
          const qb = i8(dump[L.qq + h * rowW + (b >> 2)], b & 3);
          if (b < R) sL += qb * i8(words[b >> 2], b & 3);
          else if (b >= p.latentPad && b - p.latentPad < r) {
            const k = b - p.latentPad;
            sP += qb * i8(words[f.ropeWord + (k >> 2)], k & 3);
          }
        }
      }
      const words = o.rowWords(t);
      const ts = [f32(words[f.scaleWord]), f32(words[f.scaleWord + 1])];
      want.push(sL * sq[0] * ts[0] + sP * sq[1] * ts[1]);
    }
  }
  let maxAbs = 0;
  for (const v of want) if (v > -1e38) maxAbs = Math.max(maxAbs, Math.abs(v));
  for (let i = 0; i < want.length; i++) {
    const got = f32(dump[L.sc + i]);
    const bad = want[i] < -1e38 ? got > -1e38 : !(Math.abs(got - want[i]) <= 1e-5 * Math.max(maxAbs, 1e-30));
    if (bad) {
      scWrong++;
      note(`sc head ${Math.floor(i / p.window)} token ${i % p.window}: ${got}, want ${want[i]}`);
    }
  }
  return { ctWrong, qqWrong, tilesWrong, scWrong, first };
}

/** One line per check, for a benchmark's output. */
export function describeMlaTcDump(c: MlaTcDumpCheck, p: MlaTcPlan): string {
  const rowW = p.rowPad / 4;
  return (
    `staged rows ${c.ctWrong}/${32 * rowW} words wrong; query ${c.qqWrong}/${p.headsPadded * p.rowPad} bytes wrong; ` +
    `score tiles ${c.tilesWrong < 0 ? 'n/a (dot4)' : `${c.tilesWrong}/${p.headTiles * 2 * 256} wrong`}; ` +
    `f32 scores ${c.scWrong}/${p.headsPadded * p.window} wrong` +
    (c.first.length ? `\n      first: ${c.first.join('\n             ')}` : '')
  );
}

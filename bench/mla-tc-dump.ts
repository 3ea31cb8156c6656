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
  /**
   * Where tiles are wrong: how many of the wrong latent integers each guess at the fault reproduces exactly (the best
   * four), so one device run says more than "wrong".
   */
  guesses: Array<{ guess: string; matches: number; of: number }>;
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
  return { ctWrong, qqWrong, tilesWrong, scWrong, first, guesses: tilesWrong > 0 ? guessTileFault(dump, o) : [] };
}

/**
 * Guesses at what wrong latent score tiles computed instead of Σ_k q̃q·cq, each scored by how many of the wrong
 * integers it reproduces exactly: a subset of the 32-value K steps (only the first, only the last, the first j, the
 * last j: an accumulator reset or a loop cut short), operands transposed in the tile (tokens for heads), another tile's
 * result (a region mix-up), the query's K steps shifted by ±1 against the rows' (an offset off by a step), the bytes
 * read unsigned (u8 × u8, i8 × u8), and every row read as row 0 or the query as head 0 (a stride read as 0).
 */
export function guessTileFault(dump: Int32Array, o: MlaTcDumpInputs): Array<{ guess: string; matches: number; of: number }> {
  const { plan: p } = o;
  const L = mlaTcDumpLayout(p);
  const rowW = p.rowPad / 4;
  const steps = p.latentPad / 32;
  const u8 = (word: number, byte: number) => (word >>> (8 * byte)) & 0xff;
  const qByte = (h: number, b: number, signed = true) => (signed ? i8 : u8)(dump[L.qq + h * rowW + (b >> 2)], b & 3);
  const cByte = (t: number, b: number, signed = true) => (signed ? i8 : u8)(dump[L.ct + t * rowW + (b >> 2)], b & 3);
  // Per K step partial sums of token t against head h, with the query's step shifted by `shift`.
  const stepSum = (t: number, h: number, k: number, shift = 0, qs = true, cs = true) => {
    const kq = k + shift;
    if (kq < 0 || kq >= steps) return 0;
    let s = 0;
    for (let i = 0; i < 32; i++) s += qByte(h, 32 * kq + i, qs) * cByte(t, 32 * k + i, cs);
    return s;
  };
  const range = (t: number, h: number, from: number, to: number, shift = 0, qs = true, cs = true) => {
    let s = 0;
    for (let k = from; k < to; k++) s += stepSum(t, h, k, shift, qs, cs);
    return s;
  };
  const tokenOf = (a: number, e: number) => (a % 2) * 16 + Math.floor(e / 16);
  const headOf = (a: number, e: number) => Math.floor(a / 2) * 16 + (e % 16);
  const guesses: Array<{ guess: string; value: (a: number, e: number) => number }> = [
    { guess: 'first K step only', value: (a, e) => stepSum(tokenOf(a, e), headOf(a, e), 0) },
    { guess: 'last K step only', value: (a, e) => stepSum(tokenOf(a, e), headOf(a, e), steps - 1) },
    { guess: 'tokens and heads transposed in the tile', value: (a, e) => range(Math.floor(a / 2) * 16 + (e % 16), (a % 2) * 16 + Math.floor(e / 16), 0, steps) },
    { guess: 'query K step + 1 against the rows', value: (a, e) => range(tokenOf(a, e), headOf(a, e), 0, steps, 1) },
    { guess: 'query K step − 1 against the rows', value: (a, e) => range(tokenOf(a, e), headOf(a, e), 0, steps, -1) },
    { guess: 'u8 × u8', value: (a, e) => range(tokenOf(a, e), headOf(a, e), 0, steps, 0, false, false) },
    { guess: 'query i8 × rows u8', value: (a, e) => range(tokenOf(a, e), headOf(a, e), 0, steps, 0, true, false) },
    { guess: 'query u8 × rows i8', value: (a, e) => range(tokenOf(a, e), headOf(a, e), 0, steps, 0, false, true) },
    { guess: 'every row read as the tile\'s first', value: (a, e) => range((a % 2) * 16, headOf(a, e), 0, steps) },
    { guess: 'every head read as the tile\'s first', value: (a, e) => range(tokenOf(a, e), Math.floor(a / 2) * 16, 0, steps) },
  ];
  for (let j = 2; j < steps; j++) {
    guesses.push({ guess: `first ${j} K steps`, value: (a, e) => range(tokenOf(a, e), headOf(a, e), 0, j) });
    guesses.push({ guess: `last ${j} K steps`, value: (a, e) => range(tokenOf(a, e), headOf(a, e), steps - j, steps) });
  }
  for (let a2 = 0; a2 < p.headTiles * 2; a2++) {
    guesses.push({ guess: `tile ${a2}'s result`, value: (_a, e) => range(tokenOf(a2, e), headOf(a2, e), 0, steps) });
  }
  // Only the wrong integers count (a zero padding head is "right" under most guesses).
  const wrong: Array<[a: number, e: number]> = [];
  for (let a = 0; a < p.headTiles * 2; a++) {
    for (let e = 0; e < 256; e++) if (dump[L.tiles + a * 512 + e] !== range(tokenOf(a, e), headOf(a, e), 0, steps)) wrong.push([a, e]);
  }
  const of = wrong.length;
  return guesses
    .map(({ guess, value }) => {
      let matches = 0;
      for (const [a, e] of wrong) if (dump[L.tiles + a * 512 + e] === value(a, e)) matches++;
      return { guess, matches, of };
    })
    .filter((g) => g.matches > 0)
    .sort((x, y) => y.matches - x.matches)
    .slice(0, 4);
}

/** One line per check, for a benchmark's output. */
export function describeMlaTcDump(c: MlaTcDumpCheck, p: MlaTcPlan): string {
  const rowW = p.rowPad / 4;
  return (
    `staged rows ${c.ctWrong}/${32 * rowW} words wrong; query ${c.qqWrong}/${p.headsPadded * p.rowPad} bytes wrong; ` +
    `score tiles ${c.tilesWrong < 0 ? 'n/a (dot4)' : `${c.tilesWrong}/${p.headTiles * 2 * 256} wrong`}; ` +
    `f32 scores ${c.scWrong}/${p.headsPadded * p.window} wrong` +
    (c.guesses.length ? `\n      the wrong latent integers match: ${c.guesses.map((g) => `${g.guess} ${g.matches}/${g.of}`).join('; ')}` : '') +
    (c.first.length ? `\n      first: ${c.first.join('\n             ')}` : '')
  );
}

// Seeded random numbers for the load test: the same seed gives the same prompts and the same arrival schedule.

/** A deterministic uniform generator (xoshiro128**, seeded through splitmix32). */
export interface Rng {
  /** Uniform in [0, 1). */
  next(): number;
  /** Uniform integer in [0, n). */
  int(n: number): number;
}

function splitmix32(state: number): () => number {
  let s = state >>> 0;
  return () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
}

/**
 * `stream` separates independent uses of one seed (prompts vs arrival times), so changing how many
 * random numbers one use draws does not shift the other.
 */
export function createRng(seed: number, stream = 0): Rng {
  const seedWords = splitmix32((Math.trunc(seed) ^ Math.imul(stream + 1, 0x27d4eb2d)) >>> 0);
  let a = seedWords();
  let b = seedWords();
  let c = seedWords();
  let d = seedWords();
  if ((a | b | c | d) === 0) a = 1; // the all-zero state is a fixed point
  const nextU32 = (): number => {
    const result = Math.imul(rotl(Math.imul(b, 5) >>> 0, 7), 9) >>> 0;
    const t = (b << 9) >>> 0;
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = rotl(d >>> 0, 11);
    a >>>= 0;
    b >>>= 0;
    c >>>= 0;
    return result;
  };
  return {
    next: () => nextU32() / 4294967296,
    int: (n: number) => {
      if (!(n >= 1) || !Number.isInteger(n)) throw new RangeError(`rng.int(n) needs a positive integer n, got ${n}`);
      return Math.floor((nextU32() / 4294967296) * n);
    },
  };
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

export const PROMPT_STREAM = 1;
export const ARRIVAL_STREAM = 2;

/**
 * Send times in seconds after the start for `count` requests of a Poisson process of `ratePerSecond`:
 * exponential gaps with mean 1/rate, the first request at t = 0 as in `vllm bench serve`.
 * Infinity sends every request at t = 0.
 */
export function poissonSchedule(count: number, ratePerSecond: number, seed: number): number[] {
  if (!(ratePerSecond > 0)) throw new RangeError(`request rate must be > 0 or inf, got ${ratePerSecond}`);
  const times = new Array<number>(count).fill(0);
  if (ratePerSecond === Infinity) return times;
  const rng = createRng(seed, ARRIVAL_STREAM);
  let t = 0;
  for (let i = 1; i < count; i++) {
    // 1 - u is in (0, 1], so the log is finite.
    t += -Math.log(1 - rng.next()) / ratePerSecond;
    times[i] = t;
  }
  return times;
}

// Drives one model through one workload: Poisson (or all-at-once) arrivals, a concurrency cap, /metrics polled alongside.
import type { Dispatcher } from 'undici';
import { performance } from 'node:perf_hooks';
import { sendCompletion, type RequestOutcome } from './client.ts';
import { poissonSchedule } from './prng.ts';
import { MetricsScraper, type KvSummary, type MetricsPoint } from './scraper.ts';

export interface LoadConfig {
  baseUrl: string;
  model: string;
  prompts: Array<number[] | string>;
  outputLen: number;
  ignoreEos: boolean;
  timeoutMs: number;
  /** Requests per second of the Poisson process; Infinity sends all at once. */
  requestRate: number;
  /** Most requests in flight at once; undefined = no cap. */
  maxConcurrency?: number;
  seed: number;
  scrapeIntervalMs: number;
  dispatcher: Dispatcher;
  /** Called after each request ends. */
  onRequestDone?: (outcome: RequestOutcome) => void;
}

export interface LoadResult {
  model: string;
  baseUrl: string;
  requestRate: number;
  maxConcurrency?: number;
  /** First send → last request done, seconds. */
  durationS: number;
  /** In workload order. */
  outcomes: RequestOutcome[];
  /** Most requests in flight at one moment (what the server actually saw). */
  peakConcurrency: number;
  metrics: MetricsPoint[];
  kv: KvSummary;
}

/** Counting semaphore: at most `permits` holders; waiters are served first come, first served. */
export class Semaphore {
  private waiters: Array<() => void> = [];
  constructor(private permits: number) {}
  async acquire(): Promise<void> {
    if (this.permits > 0) {
      this.permits--;
      return;
    }
    await new Promise<void>((resolve) => this.waiters.push(resolve));
  }
  release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.permits++;
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export async function runLoad(config: LoadConfig): Promise<LoadResult> {
  const count = config.prompts.length;
  const schedule = poissonSchedule(count, config.requestRate, config.seed);
  const cap = config.maxConcurrency ?? count;
  const semaphore = new Semaphore(Math.max(1, cap));
  const outcomes = new Array<RequestOutcome>(count);
  let inFlight = 0;
  let peakConcurrency = 0;

  const scraper = new MetricsScraper(config.baseUrl, config.model, config.dispatcher, config.scrapeIntervalMs);
  await scraper.takeBaseline();
  const epochMs = performance.now();
  scraper.startPolling(epochMs);

  const one = async (i: number): Promise<void> => {
    // Arrivals keep their schedule; a request that finds the cap full waits here, as in vLLM.
    await semaphore.acquire();
    inFlight++;
    peakConcurrency = Math.max(peakConcurrency, inFlight);
    try {
      outcomes[i] = await sendCompletion(
        {
          baseUrl: config.baseUrl,
          model: config.model,
          prompt: config.prompts[i],
          maxTokens: config.outputLen,
          ignoreEos: config.ignoreEos,
          timeoutMs: config.timeoutMs,
          dispatcher: config.dispatcher,
        },
        epochMs,
      );
    } finally {
      inFlight--;
      semaphore.release();
    }
    config.onRequestDone?.(outcomes[i]);
  };

  const running: Array<Promise<void>> = [];
  for (let i = 0; i < count; i++) {
    const waitMs = epochMs + schedule[i] * 1000 - performance.now();
    if (waitMs > 0) await sleep(waitMs);
    running.push(one(i));
  }
  await Promise.all(running);
  const durationS = (performance.now() - epochMs) / 1000;
  await scraper.stop();

  return {
    model: config.model,
    baseUrl: config.baseUrl,
    requestRate: config.requestRate,
    maxConcurrency: config.maxConcurrency,
    durationS,
    outcomes,
    peakConcurrency,
    metrics: scraper.points,
    kv: scraper.summary(),
  };
}

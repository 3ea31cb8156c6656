// Polls a server's /metrics during a run and keeps one model's KV-cache figures over time.
import { request, type Dispatcher } from 'undici';
import { performance } from 'node:perf_hooks';
import { parsePromText, modelValue, modelLabels, type PromSample } from './prom-text.ts';

export const METRIC = {
  kvUsage: 'vllm:kv_cache_usage_perc',
  running: 'vllm:num_requests_running',
  waiting: 'vllm:num_requests_waiting',
  cacheConfig: 'vllm:cache_config_info',
  bytesPerToken: 'mla_serve_kv_cache_bytes_per_token',
  capacityBytes: 'mla_serve_kv_cache_capacity_bytes',
  preemptions: 'mla_serve_preemptions_total',
} as const;

/** One scrape, reduced to the figures the report plots. */
export interface MetricsPoint {
  /** Seconds after the run's start. */
  tS: number;
  kvUsage?: number;
  running?: number;
  waiting?: number;
}

/** What the scrapes say about one model over one run; undefined where the server does not export the metric. */
export interface KvSummary {
  bytesPerToken?: number;
  capacityBytes?: number;
  capacityTokens?: number;
  peakKvUsage?: number;
  /** mla_serve_preemptions_total at the end minus at the start. */
  preemptions?: number;
  /** `attention` label of vllm:cache_config_info (mla | gqa). */
  attention?: string;
  blockSize?: number;
  numGpuBlocks?: number;
  scrapes: number;
  scrapeErrors: number;
  lastScrapeError?: string;
}

export class MetricsScraper {
  readonly points: MetricsPoint[] = [];
  private baseline?: PromSample[];
  private latest?: PromSample[];
  private scrapes = 0;
  private errors = 0;
  private lastError?: string;
  private stopped = false;
  private loopDone?: Promise<void>;
  private wake?: () => void;
  private lastScrapeAt = 0;
  private epochMs = 0;

  constructor(
    private readonly baseUrl: string,
    private readonly model: string,
    private readonly dispatcher: Dispatcher,
    private readonly intervalMs: number,
  ) {}

  /** The scrape before the run: counter deltas are taken against it. */
  async takeBaseline(): Promise<void> {
    this.baseline = await this.scrapeOnce();
  }

  /** Scrapes every intervalMs until stop(); times are seconds after `epochMs` (the baseline counts as t = 0). */
  startPolling(epochMs: number): void {
    this.epochMs = epochMs;
    for (const p of this.points) p.tS = 0;
    this.loopDone = this.loop();
  }

  /** Ends the polling and takes one last scrape so the end-of-run counters are current. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.wake?.();
    await this.loopDone;
    await this.scrapeOnce();
  }

  private async loop(): Promise<void> {
    // Bounded: each pass awaits one scrape (itself bounded by a timeout) and one sleep; stop() ends it.
    while (!this.stopped) {
      await this.sleep(this.intervalMs - (performance.now() - this.lastScrapeAt));
      if (this.stopped) break;
      await this.scrapeOnce();
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, Math.max(0, ms));
      function done(): void {
        clearTimeout(timer);
        resolve();
      }
      this.wake = done;
    });
  }

  private async scrapeOnce(): Promise<PromSample[] | undefined> {
    const at = performance.now();
    this.lastScrapeAt = at;
    try {
      const res = await request(`${this.baseUrl}/metrics`, {
        dispatcher: this.dispatcher,
        signal: AbortSignal.timeout(Math.max(2000, this.intervalMs * 4)),
      });
      const text = await res.body.text();
      if (res.statusCode !== 200) throw new Error(`HTTP ${res.statusCode}`);
      const samples = parsePromText(text);
      this.scrapes++;
      this.latest = samples;
      this.points.push({
        tS: (at - this.epochMs) / 1000,
        kvUsage: modelValue(samples, METRIC.kvUsage, this.model),
        running: modelValue(samples, METRIC.running, this.model),
        waiting: modelValue(samples, METRIC.waiting, this.model),
      });
      return samples;
    } catch (err) {
      this.errors++;
      this.lastError = `GET ${this.baseUrl}/metrics: ${(err as Error).message}`;
      return undefined;
    }
  }

  summary(): KvSummary {
    const end = this.latest;
    const out: KvSummary = { scrapes: this.scrapes, scrapeErrors: this.errors, lastScrapeError: this.lastError };
    if (!end) return out;
    out.bytesPerToken = modelValue(end, METRIC.bytesPerToken, this.model);
    out.capacityBytes = modelValue(end, METRIC.capacityBytes, this.model);
    if (out.bytesPerToken !== undefined && out.capacityBytes !== undefined && out.bytesPerToken > 0) {
      out.capacityTokens = Math.floor(out.capacityBytes / out.bytesPerToken);
    }
    const usages = this.points.map((p) => p.kvUsage).filter((v): v is number => v !== undefined);
    if (usages.length > 0) out.peakKvUsage = Math.max(...usages);
    const before = this.baseline ? modelValue(this.baseline, METRIC.preemptions, this.model) : undefined;
    const after = modelValue(end, METRIC.preemptions, this.model);
    if (before !== undefined && after !== undefined) out.preemptions = after - before;
    const info = modelLabels(end, METRIC.cacheConfig, this.model);
    if (info) {
      out.attention = info.attention;
      if (info.block_size !== undefined) out.blockSize = Number(info.block_size);
      if (info.num_gpu_blocks !== undefined) out.numGpuBlocks = Number(info.num_gpu_blocks);
    }
    return out;
  }
}

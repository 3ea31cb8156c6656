// Prometheus metrics of one app (its own prom-client registry): gateway-compatible vllm: gauges and mla_serve_ series.
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { EngineStats, FinishReason, ServingEngine } from '../engine/types.ts';

// vLLM's buckets (api-and-metrics.md): prom-client's defaults stop at 10 s and start at 5 ms.
export const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560];
export const ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];
export const E2E_BUCKETS = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680];
// A GPU step takes ~1.5 ms of fixed overhead on the H200 up to seconds on SwiftShader.
export const STEP_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10];
export const BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/** Label value for errors that happen before a model is resolved (malformed JSON, unknown model). */
export const NO_MODEL = 'unknown';

/** Every metric name this module exports, for tests and dashboards. */
export const METRIC_NAMES = [
  'vllm:num_requests_running',
  'vllm:num_requests_waiting',
  'vllm:kv_cache_usage_perc',
  'vllm:cache_config_info',
  'mla_serve_model_info',
  'mla_serve_kv_cache_capacity_bytes',
  'mla_serve_kv_cache_used_bytes',
  'mla_serve_kv_cache_bytes_per_token',
  'mla_serve_kv_cache_blocks',
  'mla_serve_prefix_cache_queries_total',
  'mla_serve_prefix_cache_hits_total',
  'mla_serve_preemptions_total',
  'mla_serve_prompt_tokens_total',
  'mla_serve_generation_tokens_total',
  'mla_serve_request_success_total',
  'mla_serve_request_errors_total',
  'mla_serve_time_to_first_token_seconds',
  'mla_serve_inter_token_latency_seconds',
  'mla_serve_e2e_request_latency_seconds',
  'mla_serve_request_queue_time_seconds',
  'mla_serve_gpu_step_seconds',
  'mla_serve_batch_size',
] as const;

/** vllm:kv_cache_usage_perc: blocks held by running sequences over all blocks; cached-but-unused blocks count as free. */
export function kvUsageFraction(s: EngineStats): number {
  return s.kv.numBlocks > 0 ? s.kv.usedBlocks / s.kv.numBlocks : 0;
}

/** Blocks by state; `free` excludes free blocks that still hold a cached prefix, so the three add up to numBlocks. */
export function kvBlockStates(s: EngineStats): { free: number; used: number; cached: number } {
  const used = s.kv.usedBlocks;
  const cached = s.kv.cachedBlocks;
  return { free: Math.max(0, s.kv.numBlocks - used - cached), used, cached };
}

export class ServerMetrics {
  readonly registry = new Registry();
  private readonly ttft: Histogram<'model_name'>;
  private readonly itl: Histogram<'model_name'>;
  private readonly e2e: Histogram<'model_name'>;
  private readonly queue: Histogram<'model_name'>;
  private readonly success: Counter<'model_name' | 'finish_reason'>;
  private readonly errors: Counter<'model_name' | 'code'>;
  // engine.stats() once per scrape, not once per gauge: every collect() in one scrape runs in the same tick.
  private snapshot: Array<[string, EngineStats]> | null = null;

  constructor(private readonly engines: readonly ServingEngine[]) {
    const registers = [this.registry];
    const stats = (): Array<[string, EngineStats]> => {
      if (!this.snapshot) {
        this.snapshot = this.engines.map((e) => [e.info.name, e.stats()]);
        queueMicrotask(() => (this.snapshot = null));
      }
      return this.snapshot;
    };
    const gaugeFrom = (name: string, help: string, value: (s: EngineStats) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['model_name'],
        registers,
        collect() {
          for (const [model, s] of stats()) this.set({ model_name: model }, value(s));
        },
      });
    // Counters that mirror an engine's running totals: the engine counts, the scrape copies.
    const counterFrom = (name: string, help: string, value: (s: EngineStats) => number) =>
      new Counter({
        name,
        help,
        labelNames: ['model_name'],
        registers,
        collect() {
          this.reset();
          for (const [model, s] of stats()) this.inc({ model_name: model }, value(s));
        },
      });

    gaugeFrom('vllm:num_requests_running', 'Requests in the running batch.', (s) => s.running);
    gaugeFrom('vllm:num_requests_waiting', 'Requests waiting to be admitted.', (s) => s.waiting);
    gaugeFrom('vllm:kv_cache_usage_perc', 'KV-cache usage as a fraction 0-1 (cached prefix blocks no sequence uses count as free).', kvUsageFraction);
    new Gauge({
      name: 'vllm:cache_config_info',
      help: 'KV-cache configuration (value 1).',
      labelNames: ['model_name', 'block_size', 'num_gpu_blocks', 'cache_dtype', 'attention'],
      registers,
      collect() {
        this.reset();
        for (const [model, s] of stats()) {
          const engine = engines.find((e) => e.info.name === model)!;
          this.set({ model_name: model, block_size: String(s.kv.blockSize), num_gpu_blocks: String(s.kv.numBlocks), cache_dtype: s.kv.cacheDtype, attention: engine.info.config.attention }, 1);
        }
      },
    });
    new Gauge({
      name: 'mla_serve_model_info',
      help:
        'How a model runs (value 1): weight dtype, KV cache dtype, int8 matmul kernels (few-row+batched, none without int8 weights), ' +
        'attention products (f32, or int8-dot4 / int8-tensor-cores for MLA over an int8 cache), ' +
        'MLA head products (W_UK / W_UV in decode steps: f16, w8a8-sm or w8a8-dot4; none for GQA), adapter.',
      labelNames: ['model_name', 'attention', 'weight_dtype', 'cache_dtype', 'int8_matmul', 'attention_products', 'head_products', 'adapter'],
      registers,
      collect() {
        this.reset();
        for (const [model, s] of stats()) {
          const e = engines.find((x) => x.info.name === model)!;
          const rt = e.info.runtime;
          this.set(
            {
              model_name: model,
              attention: e.info.config.attention,
              weight_dtype: rt?.weightDtype ?? 'unknown',
              cache_dtype: s.kv.cacheDtype,
              int8_matmul: rt?.int8Matmul ?? 'unknown',
              attention_products: rt?.attentionProducts ?? 'unknown',
              head_products: rt?.headProducts ?? 'unknown',
              adapter: rt?.adapter ?? 'unknown',
            },
            1,
          );
        }
      },
    });
    gaugeFrom('mla_serve_kv_cache_capacity_bytes', 'KV-cache pool size in bytes.', (s) => s.kv.capacityBytes);
    gaugeFrom('mla_serve_kv_cache_used_bytes', 'KV-cache bytes held by running sequences.', (s) => s.kv.usedBytes);
    gaugeFrom('mla_serve_kv_cache_bytes_per_token', 'KV-cache bytes one token takes across all layers.', (s) => s.kv.bytesPerToken);
    new Gauge({
      name: 'mla_serve_kv_cache_blocks',
      help: 'KV-cache blocks by state: free, used (by running sequences), cached (free but holding a reusable prefix).',
      labelNames: ['model_name', 'state'],
      registers,
      collect() {
        for (const [model, s] of stats()) {
          const b = kvBlockStates(s);
          for (const state of ['free', 'used', 'cached'] as const) this.set({ model_name: model, state }, b[state]);
        }
      },
    });
    counterFrom('mla_serve_prefix_cache_queries_total', 'Prompt tokens looked up in the prefix cache.', (s) => s.prefixCacheQueries);
    counterFrom('mla_serve_prefix_cache_hits_total', 'Prompt tokens found in the prefix cache.', (s) => s.prefixCacheHits);
    counterFrom('mla_serve_preemptions_total', 'Sequences preempted (blocks freed, recomputed later).', (s) => s.preemptions);
    counterFrom('mla_serve_prompt_tokens_total', 'Prompt tokens processed.', (s) => s.promptTokens);
    counterFrom('mla_serve_generation_tokens_total', 'Tokens generated.', (s) => s.generationTokens);

    this.success = new Counter({ name: 'mla_serve_request_success_total', help: 'Finished requests (choices) by finish reason.', labelNames: ['model_name', 'finish_reason'], registers });
    this.errors = new Counter({ name: 'mla_serve_request_errors_total', help: 'Requests answered with an error, by HTTP status.', labelNames: ['model_name', 'code'], registers });
    const histogram = (name: string, help: string, buckets: number[]) => new Histogram({ name, help, labelNames: ['model_name'], buckets, registers });
    this.ttft = histogram('mla_serve_time_to_first_token_seconds', 'Request arrival to first generated token.', TTFT_BUCKETS);
    this.itl = histogram('mla_serve_inter_token_latency_seconds', 'Gap between successive token events of one request.', ITL_BUCKETS);
    this.e2e = histogram('mla_serve_e2e_request_latency_seconds', 'Request arrival to its last token.', E2E_BUCKETS);
    this.queue = histogram('mla_serve_request_queue_time_seconds', 'Time a request waited before its first step.', E2E_BUCKETS);
    const stepSeconds = histogram('mla_serve_gpu_step_seconds', 'Engine step time (one batched forward on the GPU).', STEP_BUCKETS);
    const batchSize = histogram('mla_serve_batch_size', 'Sequences per engine step.', BATCH_BUCKETS);

    for (const engine of engines) {
      const model_name = engine.info.name;
      // Zero series up front so every name shows up with its model label before the first request.
      for (const h of [this.ttft, this.itl, this.e2e, this.queue, stepSeconds, batchSize]) h.zero({ model_name });
      for (const finish_reason of ['stop', 'length', 'abort']) this.success.inc({ model_name, finish_reason }, 0);
      for (const code of ['400', '429', '500']) this.errors.inc({ model_name, code }, 0);
      engine.onStep((o) => {
        stepSeconds.observe({ model_name }, o.seconds);
        batchSize.observe({ model_name }, o.batchSize);
      });
    }
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  render(): Promise<string> {
    return this.registry.metrics();
  }

  observeTtft(model: string, seconds: number): void {
    this.ttft.observe({ model_name: model }, seconds);
  }
  observeInterToken(model: string, seconds: number): void {
    this.itl.observe({ model_name: model }, seconds);
  }
  observeE2e(model: string, seconds: number): void {
    this.e2e.observe({ model_name: model }, seconds);
  }
  observeQueue(model: string, seconds: number): void {
    this.queue.observe({ model_name: model }, seconds);
  }
  finished(model: string, reason: FinishReason): void {
    this.success.inc({ model_name: model, finish_reason: reason });
  }
  failed(model: string | null, status: number): void {
    this.errors.inc({ model_name: model ?? NO_MODEL, code: String(status) });
  }
}

// A real loopback HTTP server that streams OpenAI completion chunks on a known timetable, for the bench tests.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';

/** What the fake does with the n-th completion request it receives (0-based, warm-ups included). */
export type Behavior = 'ok' | 'http500' | 'drop' | 'malformed' | 'no-usage' | 'no-done' | 'hang';

export interface FakeOptions {
  /** Delay before the first chunk (ms). */
  firstChunkMs: number;
  /** Delay between successive chunks (ms). */
  chunkGapMs: number;
  /** Models served, with the KV figures /metrics reports for them. */
  models: Array<{ name: string; bytesPerToken: number; capacityBytes: number; attention: 'gqa' | 'mla' }>;
  behavior?: (index: number) => Behavior;
  /** Tokens generated per request; default max_tokens. */
  outputTokens?: (maxTokens: number) => number;
  /** Preemption counter increase per completed request. */
  preemptionsPerRequest?: number;
  /** Token ids 0..vocabSize-1 are valid (default 512); others get a 400 as from the real server. */
  vocabSize?: number;
  /** Whether GET /v1/models lists vocab_size (default true); false makes the bench probe /detokenize. */
  reportVocabSize?: boolean;
  /** finish_reason on the last token's chunk (vLLM) or on an extra empty-text chunk after it (mla-serve). */
  finishChunk?: 'with-last-token' | 'separate';
  /** Whether POST /tokenize exists (default true). */
  serveTokenize?: boolean;
}

export interface ReceivedRequest {
  model: string;
  prompt: unknown;
  maxTokens: number;
  ignoreEos: boolean;
  includeUsage: boolean;
  arrivedMs: number;
}

export interface FakeUpstream {
  url: string;
  requests: ReceivedRequest[];
  /** Highest number of completion requests in flight at once. */
  maxInFlight(): number;
  /** Every kv_cache_usage value /metrics served, per model. */
  servedKvUsage: Map<string, number[]>;
  preemptions: Map<string, number>;
  metricsScrapes(): number;
  detokenizeCalls(): number;
  close(): Promise<void>;
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    req.on('data', (c: Buffer) => parts.push(c));
    req.on('end', () => resolve(Buffer.concat(parts).toString('utf8')));
    req.on('error', reject);
  });
}

/** A fixed word → id map for /tokenize: BOS (1), then 3 + (hash of the word mod 500). */
export function fakeTokenize(text: string): number[] {
  const ids = [1];
  for (const word of text.split(/\s+/).filter(Boolean)) {
    let h = 0;
    for (const ch of word) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    ids.push(3 + (h % 500));
  }
  return ids;
}

export async function startFakeUpstream(opts: FakeOptions): Promise<FakeUpstream> {
  const requests: ReceivedRequest[] = [];
  const inFlight = new Map<string, number>();
  let maxInFlight = 0;
  let totalInFlight = 0;
  let scrapes = 0;
  const servedKvUsage = new Map<string, number[]>(opts.models.map((m) => [m.name, []]));
  const preemptions = new Map<string, number>(opts.models.map((m) => [m.name, 0]));
  const timers = new Set<NodeJS.Timeout>();
  const epoch = performance.now();
  const vocabSize = opts.vocabSize ?? 512;
  let detokenizeCalls = 0;

  const at = (ms: number, fn: () => void): void => {
    const t = setTimeout(() => {
      timers.delete(t);
      fn();
    }, Math.max(0, ms - performance.now()));
    timers.add(t);
  };

  const metricsText = (): string => {
    const lines = [
      '# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.',
      '# TYPE vllm:kv_cache_usage_perc gauge',
    ];
    for (const m of opts.models) {
      // Usage follows the requests in flight so the peak is something the test can predict.
      const usage = Math.min(1, (inFlight.get(m.name) ?? 0) / 10);
      servedKvUsage.get(m.name)?.push(usage);
      lines.push(`vllm:kv_cache_usage_perc{model_name="${m.name}"} ${usage}`);
    }
    lines.push('# TYPE vllm:num_requests_running gauge');
    for (const m of opts.models) lines.push(`vllm:num_requests_running{model_name="${m.name}"} ${inFlight.get(m.name) ?? 0}`);
    lines.push('# TYPE vllm:num_requests_waiting gauge');
    for (const m of opts.models) lines.push(`vllm:num_requests_waiting{model_name="${m.name}"} 0`);
    lines.push('# TYPE vllm:cache_config_info gauge');
    for (const m of opts.models) {
      lines.push(`vllm:cache_config_info{model_name="${m.name}",block_size="16",num_gpu_blocks="${Math.floor(m.capacityBytes / m.bytesPerToken / 16)}",cache_dtype="f16",attention="${m.attention}"} 1`);
    }
    lines.push('# TYPE mla_serve_kv_cache_bytes_per_token gauge');
    for (const m of opts.models) lines.push(`mla_serve_kv_cache_bytes_per_token{model_name="${m.name}"} ${m.bytesPerToken}`);
    lines.push('# TYPE mla_serve_kv_cache_capacity_bytes gauge');
    for (const m of opts.models) lines.push(`mla_serve_kv_cache_capacity_bytes{model_name="${m.name}"} ${m.capacityBytes}`);
    lines.push('# TYPE mla_serve_preemptions_total counter');
    for (const m of opts.models) lines.push(`mla_serve_preemptions_total{model_name="${m.name}"} ${preemptions.get(m.name)}`);
    lines.push('# TYPE mla_serve_time_to_first_token_seconds histogram');
    for (const m of opts.models) {
      lines.push(`mla_serve_time_to_first_token_seconds_bucket{le="0.25",model_name="${m.name}"} 0`);
      lines.push(`mla_serve_time_to_first_token_seconds_bucket{le="+Inf",model_name="${m.name}"} 0`);
    }
    return `${lines.join('\n')}\n`;
  };

  const complete = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const body = JSON.parse(await readBody(req)) as {
      model: string;
      prompt: unknown;
      max_tokens: number;
      ignore_eos?: boolean;
      stream_options?: { include_usage?: boolean };
    };
    if (Array.isArray(body.prompt)) {
      const bad = (body.prompt as number[]).findIndex((id) => !(id >= 0 && id < vocabSize));
      if (bad >= 0) throw new Error(`prompt[${bad}] = ${(body.prompt as number[])[bad]} is not a token id (vocabulary 0..${vocabSize - 1})`);
    }
    const index = requests.length;
    const arrivedMs = performance.now();
    requests.push({
      model: body.model,
      prompt: body.prompt,
      maxTokens: body.max_tokens,
      ignoreEos: body.ignore_eos === true,
      includeUsage: body.stream_options?.include_usage === true,
      arrivedMs: arrivedMs - epoch,
    });
    const behavior = opts.behavior?.(index) ?? 'ok';
    if (behavior === 'http500') {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: 'injected failure', type: 'server_error', param: null, code: 500 } }));
      return;
    }
    const model = body.model;
    inFlight.set(model, (inFlight.get(model) ?? 0) + 1);
    totalInFlight++;
    maxInFlight = Math.max(maxInFlight, totalInFlight);
    let finished = false;
    const finish = (): void => {
      if (finished) return;
      finished = true;
      inFlight.set(model, (inFlight.get(model) ?? 1) - 1);
      totalInFlight--;
    };
    res.on('close', finish);
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    if (behavior === 'hang') return;

    const n = opts.outputTokens?.(body.max_tokens) ?? body.max_tokens;
    const promptTokens = Array.isArray(body.prompt) ? body.prompt.length : String(body.prompt).split(/\s+/).length;
    const id = `cmpl-fake-${index}`;
    const separateFinish = opts.finishChunk === 'separate';
    const sse = (text: string, finish: string | null): string =>
      `data: ${JSON.stringify({ id, object: 'text_completion', created: 0, model, choices: [{ index: 0, text, logprobs: null, finish_reason: finish }] })}\n\n`;
    const chunk = (k: number): string => sse(` t${k}`, k === n - 1 && !separateFinish ? 'length' : null) + (k === n - 1 && separateFinish ? sse('', 'length') : '');
    for (let k = 0; k < n; k++) {
      at(arrivedMs + opts.firstChunkMs + k * opts.chunkGapMs, () => {
        if (res.destroyed) return;
        if (k === 1 && behavior === 'drop') {
          res.socket?.destroy();
          return;
        }
        if (k === 1 && behavior === 'malformed') {
          res.write('data: {"id": "broken", "choices": [\n\n');
          return;
        }
        if (k > 1 && (behavior === 'drop' || behavior === 'malformed')) return;
        res.write(chunk(k));
        if (k !== n - 1) return;
        if (behavior !== 'no-usage') {
          const usage = { prompt_tokens: promptTokens, completion_tokens: n, total_tokens: promptTokens + n };
          res.write(`data: ${JSON.stringify({ id, object: 'text_completion', created: 0, model, choices: [], usage })}\n\n`);
        }
        if (behavior !== 'no-done') res.write('data: [DONE]\n\n');
        preemptions.set(model, (preemptions.get(model) ?? 0) + (opts.preemptionsPerRequest ?? 0));
        finish();
        res.end();
      });
    }
    if (behavior === 'malformed') at(arrivedMs + opts.firstChunkMs + 2 * opts.chunkGapMs, () => res.end());
  };

  const server = createServer((req, res) => {
    const route = `${req.method} ${req.url}`;
    if (route === 'POST /v1/completions') {
      complete(req, res).catch((err: Error) => {
        res.writeHead(400, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ error: { message: err.message, type: 'invalid_request_error', param: null, code: 400 } }));
      });
    } else if (route === 'GET /metrics') {
      scrapes++;
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
      res.end(metricsText());
    } else if (route === 'GET /v1/models') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(
        JSON.stringify({
          object: 'list',
          data: opts.models.map((m) => ({ id: m.name, object: 'model', owned_by: 'fake', max_model_len: 512, ...(opts.reportVocabSize === false ? {} : { vocab_size: vocabSize }), attention: m.attention })),
        }),
      );
    } else if (route === 'POST /detokenize') {
      detokenizeCalls++;
      readBody(req).then((text) => {
        const { tokens } = JSON.parse(text) as { tokens: number[] };
        const ok = tokens.every((id) => id >= 0 && id < vocabSize);
        res.writeHead(ok ? 200 : 400, { 'content-type': 'application/json' });
        res.end(JSON.stringify(ok ? { prompt: tokens.map((t) => ` t${t}`).join('') } : { error: { message: 'bad token id', type: 'invalid_request_error', param: 'tokens', code: 400 } }));
      }, () => res.destroy());
    } else if (route === 'POST /tokenize' && opts.serveTokenize !== false) {
      readBody(req).then((text) => {
        const { prompt } = JSON.parse(text) as { prompt: string };
        const tokens = fakeTokenize(prompt);
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ count: tokens.length, max_model_len: 512, tokens }));
      }, () => res.destroy());
    } else {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: `no route ${route}`, type: 'not_found', param: null, code: 404 } }));
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    maxInFlight: () => maxInFlight,
    servedKvUsage,
    preemptions,
    metricsScrapes: () => scrapes,
    detokenizeCalls: () => detokenizeCalls,
    close: async () => {
      for (const t of timers) clearTimeout(t);
      timers.clear();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A measured time off its expected value: the one kind of failure a loaded 2-core machine can cause. */
export class TimingMiss extends Error {}

/** Throws TimingMiss unless |actual - expected| ≤ toleranceMs. */
export function near(actual: number, expected: number, what: string, toleranceMs = 25): void {
  if (!(Math.abs(actual - expected) <= toleranceMs)) {
    throw new TimingMiss(`${what}: measured ${actual.toFixed(1)} ms, expected ${expected.toFixed(1)} ms (±${toleranceMs})`);
  }
}

/**
 * Runs a wall-clock scenario up to `attempts` times while it fails only on timing (TimingMiss):
 * CPU starvation from other processes delays timers now and then; a wrong measurement misses every
 * time. Any other failure is thrown at once.
 */
export async function retryOnTimingMiss(attempts: number, scenario: () => Promise<void>, log: (msg: string) => void): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await scenario();
      return;
    } catch (err) {
      if (!(err instanceof TimingMiss) || attempt >= attempts) throw err;
      log(`attempt ${attempt}: ${err.message}; retrying`);
    }
  }
}

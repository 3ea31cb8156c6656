// Turns measured runs into vLLM `bench serve`-named figures, the side-by-side text table, and the ratio of each model to the first.
import { mean, median, percentile, std } from './stats.ts';
import type { LoadResult } from './load.ts';

/** Percentiles kept for the charts; the table shows median and p99 like `vllm bench serve`. */
export const PERCENTILES = [50, 90, 99] as const;
const LATENCIES = ['ttft', 'tpot', 'itl', 'e2el'] as const;
type Latency = (typeof LATENCIES)[number];
type LatencyStat = 'mean' | 'median' | 'std' | `p${(typeof PERCENTILES)[number]}`;
/** mean_ttft_ms, median_tpot_ms, p99_itl_ms, … */
export type LatencyFigures = { [K in `${LatencyStat}_${Latency}_ms`]: number };

/** One model at one concurrency level, with vLLM's key names (times in ms unless the key says otherwise). */
export interface RunReport extends LatencyFigures {
  backend: 'mla-serve';
  model_id: string;
  base_url: string;
  /** "inf" or requests per second. */
  request_rate: number | 'inf';
  burstiness: number;
  /** The configured cap (null = none), as vLLM reports it. */
  max_concurrency: number | null;
  num_prompts: number;
  duration: number;
  completed: number;
  failed: number;
  total_input_tokens: number;
  total_output_tokens: number;
  request_throughput: number;
  /** Requests/s that met every --goodput SLO (null without SLOs), as vLLM's request_goodput. */
  request_goodput: number | null;
  output_throughput: number;
  total_token_throughput: number;
  /** Highest output tokens/s over one-second windows. */
  max_output_tokens_per_s: number;
  /** Observed peak of requests in flight. */
  max_concurrent_requests: number;
  // Ours: KV cache figures scraped from /metrics (null where the server does not export them).
  attention: string | null;
  kv_cache_bytes_per_token: number | null;
  kv_cache_capacity_bytes: number | null;
  kv_cache_capacity_tokens: number | null;
  peak_kv_cache_usage_perc: number | null;
  num_preemptions: number | null;
  metrics_scrapes: number;
  metrics_scrape_errors: number;
  // Per request, in workload order (seconds, as vLLM saves them).
  input_lens: number[];
  output_lens: number[];
  ttfts: number[];
  e2els: number[];
  itls: number[][];
  errors: string[];
  /** Output tokens per second in consecutive windows of `bucket_s` from the run's start. */
  throughput_timeline: { bucket_s: number; output_tokens_per_s: number[] };
  /** Scrapes of /metrics over the run. */
  kv_usage_timeline: Array<{ t: number; kv_cache_usage_perc: number | null; num_requests_running: number | null; num_requests_waiting: number | null }>;
}

/** Service-level objectives in ms for goodput (vLLM's --goodput ttft:… tpot:… e2el:…). */
export type Slos = Partial<Record<'ttft' | 'tpot' | 'e2el', number>>;

export function summarizeRun(run: LoadResult, slos?: Slos): RunReport {
  const ok = run.outcomes.filter((o) => o.ok);
  const duration = run.durationS;
  const totalInput = ok.reduce((s, o) => s + o.promptTokens, 0);
  const totalOutput = ok.reduce((s, o) => s + o.outputTokens, 0);
  const ms = (xs: number[]): number[] => xs.map((x) => x * 1000);
  const samples: Record<Latency, number[]> = {
    ttft: ms(ok.map((o) => o.ttftS)),
    // TPOT is undefined for a single output token (no gap to divide by), as in vLLM.
    tpot: ms(ok.filter((o) => o.outputTokens > 1).map((o) => (o.e2elS - o.ttftS) / (o.outputTokens - 1))),
    itl: ms(ok.flatMap((o) => o.itlS)),
    e2el: ms(ok.map((o) => o.e2elS)),
  };
  const timeline = throughputTimeline(run);
  let goodput: number | null = null;
  if (slos && Object.keys(slos).length > 0) {
    // A single-token request has no TPOT; it counts as 0 against the SLO, as in vLLM.
    const good = ok.filter((o) => {
      const tpotMs = o.outputTokens > 1 ? ((o.e2elS - o.ttftS) / (o.outputTokens - 1)) * 1000 : 0;
      return (slos.ttft === undefined || o.ttftS * 1000 <= slos.ttft) && (slos.tpot === undefined || tpotMs <= slos.tpot) && (slos.e2el === undefined || o.e2elS * 1000 <= slos.e2el);
    }).length;
    goodput = duration > 0 ? good / duration : 0;
  }
  const report = {
    backend: 'mla-serve',
    model_id: run.model,
    base_url: run.baseUrl,
    request_rate: run.requestRate === Infinity ? 'inf' : run.requestRate,
    burstiness: 1.0,
    max_concurrency: run.maxConcurrency ?? null,
    num_prompts: run.outcomes.length,
    duration,
    completed: ok.length,
    failed: run.outcomes.length - ok.length,
    total_input_tokens: totalInput,
    total_output_tokens: totalOutput,
    request_throughput: duration > 0 ? ok.length / duration : 0,
    request_goodput: goodput,
    output_throughput: duration > 0 ? totalOutput / duration : 0,
    total_token_throughput: duration > 0 ? (totalInput + totalOutput) / duration : 0,
    max_output_tokens_per_s: maxPerSecond(run),
    max_concurrent_requests: run.peakConcurrency,
  } as RunReport;
  for (const name of LATENCIES) {
    const xs = samples[name];
    report[`mean_${name}_ms`] = mean(xs);
    report[`median_${name}_ms`] = median(xs);
    report[`std_${name}_ms`] = std(xs);
    for (const p of PERCENTILES) report[`p${p}_${name}_ms`] = percentile(xs, p);
  }
  const kv = run.kv;
  Object.assign(report, {
    attention: kv.attention ?? null,
    kv_cache_bytes_per_token: kv.bytesPerToken ?? null,
    kv_cache_capacity_bytes: kv.capacityBytes ?? null,
    kv_cache_capacity_tokens: kv.capacityTokens ?? null,
    peak_kv_cache_usage_perc: kv.peakKvUsage ?? null,
    num_preemptions: kv.preemptions ?? null,
    metrics_scrapes: kv.scrapes,
    metrics_scrape_errors: kv.scrapeErrors,
    input_lens: run.outcomes.map((o) => o.promptTokens),
    output_lens: run.outcomes.map((o) => o.outputTokens),
    ttfts: run.outcomes.map((o) => o.ttftS),
    e2els: run.outcomes.map((o) => o.e2elS),
    itls: run.outcomes.map((o) => o.itlS),
    errors: run.outcomes.map((o) => o.error ?? ''),
    throughput_timeline: timeline,
    kv_usage_timeline: run.metrics.map((p) => ({
      t: p.tS,
      kv_cache_usage_perc: p.kvUsage ?? null,
      num_requests_running: p.running ?? null,
      num_requests_waiting: p.waiting ?? null,
    })),
  });
  return report;
}

/**
 * Output tokens per chunk arrival: usage.completion_tokens spread evenly over the request's chunks
 * (a server may put several tokens in one chunk).
 */
function tokenArrivals(run: LoadResult): Array<{ t: number; tokens: number }> {
  const out: Array<{ t: number; tokens: number }> = [];
  for (const o of run.outcomes) {
    if (!o.ok || o.contentTimesS.length === 0) continue;
    const per = o.outputTokens / o.contentTimesS.length;
    for (const t of o.contentTimesS) out.push({ t, tokens: per });
  }
  return out;
}

function throughputTimeline(run: LoadResult): { bucket_s: number; output_tokens_per_s: number[] } {
  // About 60 points across the run, never finer than 100 ms.
  const bucket = Math.max(0.1, run.durationS / 60);
  const n = Math.max(1, Math.ceil(run.durationS / bucket));
  const tokens = new Array<number>(n).fill(0);
  for (const a of tokenArrivals(run)) tokens[Math.min(n - 1, Math.max(0, Math.floor(a.t / bucket)))] += a.tokens;
  return { bucket_s: bucket, output_tokens_per_s: tokens.map((t) => t / bucket) };
}

function maxPerSecond(run: LoadResult): number {
  const n = Math.max(1, Math.ceil(run.durationS));
  const perSecond = new Array<number>(n).fill(0);
  for (const a of tokenArrivals(run)) perSecond[Math.min(n - 1, Math.max(0, Math.floor(a.t)))] += a.tokens;
  return Math.max(...perSecond);
}

/** One table row: its label, how to read the figure from a run, and how to print it. */
export interface TableRow {
  label: string;
  value: (r: RunReport) => number | null;
  digits: number;
  /** Left out of the table when no run has a value (goodput without SLOs). */
  onlyWhenSet?: boolean;
}

const latencyRows = (name: Latency, label: string): TableRow[] => [
  { label: `${label} mean (ms)`, value: (r) => r[`mean_${name}_ms`], digits: 2 },
  { label: `${label} median (ms)`, value: (r) => r[`median_${name}_ms`], digits: 2 },
  { label: `${label} p99 (ms)`, value: (r) => r[`p99_${name}_ms`], digits: 2 },
];

export const TABLE_ROWS: TableRow[] = [
  { label: 'requests ok', value: (r) => r.completed, digits: 0 },
  { label: 'requests failed', value: (r) => r.failed, digits: 0 },
  { label: 'duration (s)', value: (r) => r.duration, digits: 2 },
  { label: 'request throughput (req/s)', value: (r) => r.request_throughput, digits: 2 },
  { label: 'request goodput (req/s)', value: (r) => r.request_goodput, digits: 2, onlyWhenSet: true },
  { label: 'output throughput (tok/s)', value: (r) => r.output_throughput, digits: 2 },
  { label: 'total token throughput (tok/s)', value: (r) => r.total_token_throughput, digits: 2 },
  ...latencyRows('ttft', 'TTFT'),
  ...latencyRows('tpot', 'TPOT'),
  ...latencyRows('itl', 'ITL'),
  ...latencyRows('e2el', 'E2EL'),
  { label: 'peak concurrency', value: (r) => r.max_concurrent_requests, digits: 0 },
  { label: 'KV bytes per token', value: (r) => r.kv_cache_bytes_per_token, digits: 0 },
  { label: 'KV capacity (tokens)', value: (r) => r.kv_cache_capacity_tokens, digits: 0 },
  { label: 'peak KV usage (%)', value: (r) => (r.peak_kv_cache_usage_perc === null ? null : r.peak_kv_cache_usage_perc * 100), digits: 1 },
  { label: 'preemptions', value: (r) => r.num_preemptions, digits: 0 },
];

/** later / first; null when either is missing or the first is 0. */
export function ratio(later: number | null, first: number | null): number | null {
  if (later === null || first === null || first === 0 || !Number.isFinite(later) || !Number.isFinite(first)) return null;
  return later / first;
}

function formatValue(v: number | null, digits: number): string {
  if (v === null || !Number.isFinite(v)) return '–';
  return v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** Header for a model column: its name, with the attention kind when /metrics told us. */
export function columnTitle(r: RunReport): string {
  return r.attention ? `${r.model_id} (${r.attention})` : r.model_id;
}

/** Ratio column titles: "ratio" for two models, "<model>/<first>" for more. */
export function ratioTitles(runs: RunReport[]): string[] {
  if (runs.length < 2) return [];
  if (runs.length === 2) return ['ratio 2nd/1st'];
  return runs.slice(1).map((r) => `${r.model_id}/${runs[0].model_id}`);
}

/** The cells of the table: one row per figure, a column per model, then ratios of each later model to the first. */
export function tableCells(runs: RunReport[]): { header: string[]; rows: string[][] } {
  const header = ['', ...runs.map(columnTitle), ...ratioTitles(runs)];
  const rows = TABLE_ROWS.filter((row) => !row.onlyWhenSet || runs.some((r) => row.value(r) !== null)).map((row) => {
    const values = runs.map(row.value);
    const ratios = runs.slice(1).map((_, k) => ratio(values[k + 1], values[0]));
    return [row.label, ...values.map((v) => formatValue(v, row.digits)), ...ratios.map((q) => (q === null ? '–' : `${q.toFixed(3)}x`))];
  });
  return { header, rows };
}

/** Plain-text table, columns aligned (label left, numbers right). */
export function formatTable(runs: RunReport[], title: string): string {
  const { header, rows } = tableCells(runs);
  const all = [header, ...rows];
  const widths = header.map((_, c) => Math.max(...all.map((r) => r[c].length)));
  const line = (cells: string[]): string => cells.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c]))).join('  ');
  const rule = '-'.repeat(widths.reduce((s, w) => s + w, 0) + 2 * (widths.length - 1));
  return [title, rule, line(header), rule, ...rows.map(line), rule].join('\n') + '\n';
}

/** Keys that describe the setup, not a measurement: no ratio for them. */
const SETUP_KEYS = new Set(['attention', 'request_rate', 'burstiness', 'max_concurrency', 'num_prompts', 'metrics_scrapes', 'metrics_scrape_errors']);

/** Ratios later-model / first-model for every measured scalar (null where either side is missing or the first is 0). */
export function ratioRecord(later: RunReport, first: RunReport): Record<string, number | null> {
  const out: Record<string, number | null> = {};
  const base = first as unknown as Record<string, unknown>;
  for (const [key, value] of Object.entries(later)) {
    if (SETUP_KEYS.has(key)) continue;
    const b = base[key];
    const isScalar = (v: unknown): boolean => typeof v === 'number' || v === null;
    if (!isScalar(value) || !isScalar(b)) continue;
    out[key] = ratio(value as number | null, b as number | null);
  }
  return out;
}

/** The settings a whole bench invocation ran with. */
export interface BenchConfig {
  models: string[];
  urls: string[];
  num_prompts: number;
  request_rate: number | 'inf';
  input_len: number;
  output_len: number;
  seed: number;
  ignore_eos: boolean;
  /** File the prompts came from; null for the random token-id dataset. */
  dataset: string | null;
  /** Concurrency caps run in turn (null = no cap). */
  concurrency_levels: Array<number | null>;
  /** --goodput SLOs in ms, null when none were given. */
  goodput_slos_ms: Slos | null;
  timeout_s: number;
}

/** report.json: every run (model × concurrency level) plus each later model's ratio to the first at that level. */
export interface BenchReport {
  date: string;
  backend: 'mla-serve';
  config: BenchConfig;
  runs: RunReport[];
  ratios: Array<{ max_concurrency: number | null; model_id: string; baseline_model_id: string; ratios: Record<string, number | null> }>;
}

/** Runs grouped by concurrency level, in the order they ran. */
export function runsByLevel(runs: RunReport[]): Array<{ level: number | null; runs: RunReport[] }> {
  const groups: Array<{ level: number | null; runs: RunReport[] }> = [];
  for (const r of runs) {
    let g = groups.find((x) => x.level === r.max_concurrency);
    if (!g) groups.push((g = { level: r.max_concurrency, runs: [] }));
    g.runs.push(r);
  }
  return groups;
}

export function buildBenchReport(config: BenchConfig, runs: RunReport[], date = new Date()): BenchReport {
  const ratios: BenchReport['ratios'] = [];
  for (const { level, runs: group } of runsByLevel(runs)) {
    for (const later of group.slice(1)) {
      ratios.push({ max_concurrency: level, model_id: later.model_id, baseline_model_id: group[0].model_id, ratios: ratioRecord(later, group[0]) });
    }
  }
  return { date: date.toISOString(), backend: 'mla-serve', config, runs, ratios };
}

export function levelTitle(level: number | null, config: BenchConfig): string {
  const rate = config.request_rate === 'inf' ? 'all at once' : `${config.request_rate} req/s Poisson`;
  const cap = level === null ? 'no concurrency cap' : `max concurrency ${level}`;
  return `${config.num_prompts} prompts × ${config.input_len} in / ${config.output_len} out tokens, ${rate}, ${cap}`;
}

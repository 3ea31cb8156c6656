// `mla-serve bench`: runs one seeded workload against each model in turn, prints the side-by-side table, writes report.json/.html.
import { parseArgs } from 'node:util';
import { writeFile } from 'node:fs/promises';
import { Agent } from 'undici';
import cliProgress from 'cli-progress';
import { randomTokenPrompts, readDatasetParagraphs, tokenizeParagraphs } from './dataset.ts';
import { runLoad } from './load.ts';
import { sendCompletion } from './client.ts';
import { buildBenchReport, formatTable, levelTitle, runsByLevel, summarizeRun, type BenchConfig, type BenchReport, type RunReport, type Slos } from './report.ts';
import { renderHtmlReport } from './html.ts';
import { describeModel, probeVocabSize } from './server-info.ts';

const USAGE = `usage: mla-serve bench --model NAME [--model NAME2] [options]

Load-tests each --model in turn with the same seeded workload over streamed POST /v1/completions,
scraping /metrics for KV-cache figures, and prints one table with a column per model and the ratio
of each later model to the first.

  --url URL               server base URL (default http://127.0.0.1:8000); give it once per model
                          to put each model on its own server
  --model NAME            model to test (repeat for a side-by-side comparison; first = baseline)
  --num-prompts N         requests per run (default 200)
  --request-rate R        Poisson arrivals at R requests/s, or 'inf' to send all at once (default inf)
  --max-concurrency N     at most N requests in flight (default: no cap)
  --concurrency A,B,C     sweep: run the whole workload once per cap A, B, C (replaces --max-concurrency)
  --input-len N           prompt tokens (default 128); dataset paragraphs are cut to N tokens
  --output-len N          max_tokens per request (default 64)
  --ignore-eos            keep generating past EOS so every request makes --output-len tokens
  --dataset FILE          prompts from a text file: paragraphs split on blank lines, tokenized by the
                          server's POST /tokenize and cut to --input-len tokens (shorter ones stay whole)
  --vocab-size N          token ids of random prompts are drawn from [0, N) (default: vocab_size from
                          GET /v1/models when the server reports it)
  --seed N                seed of prompts and arrival times (default 0)
  --goodput KEY:MS        SLOs for goodput, KEY one of ttft, tpot, e2el; repeat or comma-separate
                          (e.g. --goodput ttft:200,tpot:50): requests/s that met all of them
  --timeout S             per-request limit in seconds (default 300)
  --warmups N             untimed requests per model before its first run (default 1)
  --scrape-interval MS    /metrics polling period (default 250)
  --out PREFIX            write PREFIX.json and PREFIX.html
  --json                  print the JSON report to stdout (the table goes to stderr)
  --no-progress           no progress bar on stderr
`;

/** Everything a bench invocation needs, parsed and checked. */
export interface BenchOptions {
  urls: string[];
  models: string[];
  numPrompts: number;
  requestRate: number;
  concurrencyLevels: Array<number | undefined>;
  inputLen: number;
  outputLen: number;
  ignoreEos: boolean;
  dataset?: string;
  vocabSize?: number;
  seed: number;
  /** Goodput SLOs in ms; empty = no goodput figure. */
  slos: Slos;
  timeoutS: number;
  warmups: number;
  scrapeIntervalMs: number;
  out?: string;
  json: boolean;
  progress: boolean;
}

/** A command-line mistake: printed with the usage, exit code 2. */
export class UsageError extends Error {}

function positiveInt(name: string, raw: string | undefined, fallback: number, allowZero = false): number {
  if (raw === undefined) return fallback;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < (allowZero ? 0 : 1)) {
    throw new UsageError(`--${name} must be a ${allowZero ? 'non-negative' : 'positive'} integer, got '${raw}'`);
  }
  return v;
}

function baseUrlOf(raw: string): string {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new UsageError(`--url '${raw}' is not a URL (expected e.g. http://127.0.0.1:8000)`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new UsageError(`--url '${raw}' must be http:// or https://`);
  // Accept the OpenAI-style base (…/v1) too: the bench adds /v1/completions and /metrics itself.
  return `${u.origin}${u.pathname.replace(/\/+$/, '').replace(/\/v1$/, '')}`;
}

export function parseBenchArgs(argv: string[]): BenchOptions | 'help' {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      url: { type: 'string', multiple: true },
      model: { type: 'string', multiple: true },
      'num-prompts': { type: 'string' },
      'request-rate': { type: 'string' },
      'max-concurrency': { type: 'string' },
      concurrency: { type: 'string' },
      'input-len': { type: 'string' },
      'output-len': { type: 'string' },
      'ignore-eos': { type: 'boolean' },
      dataset: { type: 'string' },
      'vocab-size': { type: 'string' },
      seed: { type: 'string' },
      timeout: { type: 'string' },
      goodput: { type: 'string', multiple: true },
      warmups: { type: 'string' },
      'scrape-interval': { type: 'string' },
      out: { type: 'string' },
      json: { type: 'boolean' },
      'no-progress': { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) return 'help';
  const models = values.model ?? [];
  if (models.length === 0) throw new UsageError('give at least one --model (two to compare, e.g. --model stories260K --model stories260K-mla)');
  const urls = (values.url ?? ['http://127.0.0.1:8000']).map(baseUrlOf);
  if (urls.length !== 1 && urls.length !== models.length) {
    throw new UsageError(`give --url once (all models on one server) or once per --model; got ${urls.length} urls for ${models.length} models`);
  }

  let requestRate = Infinity;
  const rateRaw = values['request-rate'];
  if (rateRaw !== undefined && rateRaw !== 'inf') {
    requestRate = Number(rateRaw);
    if (!(requestRate > 0) || !Number.isFinite(requestRate)) throw new UsageError(`--request-rate must be > 0 or 'inf', got '${rateRaw}'`);
  }

  if (values.concurrency !== undefined && values['max-concurrency'] !== undefined) {
    throw new UsageError('give either --max-concurrency N or a sweep --concurrency A,B,C, not both');
  }
  let concurrencyLevels: Array<number | undefined> = [positiveInt('max-concurrency', values['max-concurrency'], 0) || undefined];
  if (values.concurrency !== undefined) {
    concurrencyLevels = values.concurrency.split(',').map((s) => positiveInt('concurrency', s.trim(), 0));
    if (new Set(concurrencyLevels).size !== concurrencyLevels.length) throw new UsageError(`--concurrency has a level twice: ${values.concurrency}`);
  }

  const seedRaw = values.seed ?? '0';
  const seed = Number(seedRaw);
  if (!Number.isInteger(seed)) throw new UsageError(`--seed must be an integer, got '${seedRaw}'`);
  const timeoutS = values.timeout === undefined ? 300 : Number(values.timeout);
  if (!(timeoutS > 0)) throw new UsageError(`--timeout must be a positive number of seconds, got '${values.timeout}'`);

  const slos: Slos = {};
  for (const item of (values.goodput ?? []).flatMap((g) => g.split(/[,\s]+/)).filter(Boolean)) {
    const m = /^(ttft|tpot|e2el):(\d+(?:\.\d+)?)$/.exec(item);
    if (!m) throw new UsageError(`--goodput '${item}' is not KEY:MS with KEY one of ttft, tpot, e2el (e.g. ttft:200)`);
    slos[m[1] as keyof Slos] = Number(m[2]);
  }

  return {
    urls,
    models,
    slos,
    numPrompts: positiveInt('num-prompts', values['num-prompts'], 200),
    requestRate,
    concurrencyLevels,
    inputLen: positiveInt('input-len', values['input-len'], 128),
    outputLen: positiveInt('output-len', values['output-len'], 64),
    ignoreEos: values['ignore-eos'] ?? false,
    dataset: values.dataset,
    vocabSize: values['vocab-size'] === undefined ? undefined : positiveInt('vocab-size', values['vocab-size'], 0),
    seed,
    timeoutS,
    warmups: positiveInt('warmups', values.warmups, 1, true),
    scrapeIntervalMs: positiveInt('scrape-interval', values['scrape-interval'], 250),
    out: values.out?.replace(/\.(json|html)$/, ''),
    json: values.json ?? false,
    progress: !(values['no-progress'] ?? false),
  };
}

/** Runs the whole bench from parsed options; returns the report (also what --json prints). */
export async function benchmark(opts: BenchOptions, log: (line: string) => void = (l) => process.stderr.write(`${l}\n`)): Promise<BenchReport> {
  const dispatcher = new Agent({ keepAliveTimeout: 10_000 });
  try {
    const urlOf = (i: number): string => opts.urls[opts.urls.length === 1 ? 0 : i];
    const served = await Promise.all(opts.models.map((m, i) => describeModel(urlOf(i), m, dispatcher)));
    served.forEach((s, i) => {
      if (s.maxModelLen !== undefined && opts.inputLen + opts.outputLen > s.maxModelLen) {
        throw new Error(
          `--input-len ${opts.inputLen} + --output-len ${opts.outputLen} = ${opts.inputLen + opts.outputLen} tokens exceeds ` +
            `model '${opts.models[i]}' max_model_len ${s.maxModelLen}; lower one of them`,
        );
      }
    });

    // One workload for every model: same prompts, same arrival times.
    let promptsFor: (i: number) => Promise<Array<number[] | string>>;
    if (opts.dataset) {
      const paragraphs = await readDatasetParagraphs(opts.dataset, opts.numPrompts, opts.seed);
      promptsFor = (i) => tokenizeParagraphs(paragraphs, opts.inputLen, urlOf(i), opts.models[i], dispatcher, log);
    } else {
      let vocabSize = opts.vocabSize;
      if (vocabSize === undefined) {
        // The workload must be valid for every model: the smallest vocabulary bounds the ids.
        const sizes = await Promise.all(served.map((s, i) => s.vocabSize ?? probeVocabSize(urlOf(i), opts.models[i], dispatcher)));
        const missing = opts.models.filter((_, i) => sizes[i] === undefined);
        if (missing.length > 0) {
          throw new Error(
            `random prompts need the vocabulary size, and neither GET /v1/models (vocab_size) nor POST /detokenize tells it for ${missing.join(', ')}; ` +
              'pass --vocab-size N (e.g. 512 for stories260K) or use --dataset FILE',
          );
        }
        vocabSize = Math.min(...(sizes as number[]));
      }
      const prompts = randomTokenPrompts(opts.numPrompts, opts.inputLen, vocabSize, opts.seed);
      promptsFor = async () => prompts;
    }

    const runs: RunReport[] = [];
    const progress = opts.progress && process.stderr.isTTY;
    for (let i = 0; i < opts.models.length; i++) {
      const model = opts.models[i];
      const baseUrl = urlOf(i);
      const prompts = await promptsFor(i);
      for (let w = 0; w < opts.warmups; w++) {
        // Untimed: first requests pay for pipeline compilation and allocation, which is not serving speed.
        const warm = await sendCompletion(
          { baseUrl, model, prompt: prompts[0], maxTokens: opts.outputLen, ignoreEos: opts.ignoreEos, timeoutMs: opts.timeoutS * 1000, dispatcher },
          0,
        );
        if (!warm.ok) throw new Error(`warm-up request to model '${model}' at ${baseUrl} failed: ${warm.error}`);
      }
      for (const level of opts.concurrencyLevels) {
        const bar = progress
          ? new cliProgress.SingleBar(
              { stream: process.stderr, format: `${model} ${level ? `c=${level} ` : ''}|{bar}| {value}/{total} ok {ok} failed {failed} {duration_formatted}`, hideCursor: true },
              cliProgress.Presets.shades_classic,
            )
          : undefined;
        let ok = 0;
        let failed = 0;
        bar?.start(prompts.length, 0, { ok, failed });
        const result = await runLoad({
          baseUrl,
          model,
          prompts,
          outputLen: opts.outputLen,
          ignoreEos: opts.ignoreEos,
          timeoutMs: opts.timeoutS * 1000,
          requestRate: opts.requestRate,
          maxConcurrency: level,
          seed: opts.seed,
          scrapeIntervalMs: opts.scrapeIntervalMs,
          dispatcher,
          onRequestDone: (o) => {
            if (o.ok) ok++;
            else failed++;
            bar?.increment(1, { ok, failed });
          },
        });
        bar?.stop();
        const run = summarizeRun(result, opts.slos);
        runs.push(run);
        if (run.failed > 0) log(failureSummary(run));
        if (result.kv.scrapeErrors > 0) log(`${model}: ${result.kv.scrapeErrors} of ${result.kv.scrapeErrors + result.kv.scrapes} /metrics scrapes failed (last: ${result.kv.lastScrapeError})`);
      }
    }
    const config: BenchConfig = {
      models: opts.models,
      urls: opts.urls,
      num_prompts: opts.numPrompts,
      request_rate: opts.requestRate === Infinity ? 'inf' : opts.requestRate,
      input_len: opts.inputLen,
      output_len: opts.outputLen,
      seed: opts.seed,
      ignore_eos: opts.ignoreEos,
      dataset: opts.dataset ?? null,
      concurrency_levels: opts.concurrencyLevels.map((c) => c ?? null),
      goodput_slos_ms: Object.keys(opts.slos).length > 0 ? opts.slos : null,
      timeout_s: opts.timeoutS,
    };
    return buildBenchReport(config, runs);
  } finally {
    await dispatcher.close();
  }
}

/** Failures of one run grouped by message, most frequent first. */
function failureSummary(run: RunReport): string {
  const counts = new Map<string, number>();
  for (const e of run.errors) if (e) counts.set(e, (counts.get(e) ?? 0) + 1);
  const top = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5);
  return [`${run.model_id}: ${run.failed} of ${run.num_prompts} requests failed:`, ...top.map(([e, n]) => `  ${n}× ${e}`)].join('\n');
}

export function formatReportTables(report: BenchReport): string {
  return runsByLevel(report.runs)
    .map(({ level, runs }) => formatTable(runs, levelTitle(level, report.config)))
    .join('\n');
}

/** Where runBench writes; tests pass their own to read the table and JSON. */
export interface BenchIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
}

const processIo: BenchIo = {
  stdout: (text) => process.stdout.write(text),
  stderr: (text) => process.stderr.write(text),
};

export async function runBench(argv: string[], io: BenchIo = processIo): Promise<number> {
  let opts: BenchOptions | 'help';
  try {
    opts = parseBenchArgs(argv);
  } catch (err) {
    io.stderr(`mla-serve bench: ${(err as Error).message}\n\n${USAGE}`);
    return 2;
  }
  if (opts === 'help') {
    io.stdout(USAGE);
    return 0;
  }
  const report = await benchmark(opts, (line) => io.stderr(`${line}\n`));
  const tables = formatReportTables(report);
  if (opts.json) {
    io.stderr(tables);
    io.stdout(`${JSON.stringify(report, null, 2)}\n`);
  } else {
    io.stdout(tables);
  }
  if (opts.out) {
    await writeFile(`${opts.out}.json`, `${JSON.stringify(report, null, 2)}\n`);
    await writeFile(`${opts.out}.html`, renderHtmlReport(report));
    io.stderr(`wrote ${opts.out}.json and ${opts.out}.html\n`);
  }
  // Failed requests are results, not errors; a run where nothing succeeded means the setup is wrong.
  const dead = report.runs.filter((r) => r.completed === 0);
  if (dead.length > 0) {
    io.stderr(`mla-serve bench: no request succeeded for ${dead.map((r) => r.model_id).join(', ')}\n`);
    return 1;
  }
  return 0;
}

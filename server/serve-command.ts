// `mla-serve serve`: load the models, give each its share of the KV budget on one GPU, start the HTTP app, drain on SIGTERM.
import { createHash } from 'node:crypto';
import { createWriteStream, existsSync, mkdirSync, readFileSync, renameSync, rmSync, type WriteStream } from 'node:fs';
import { homedir } from 'node:os';
import { basename, extname, join, resolve } from 'node:path';
import { createEngine, type Engine } from '../engine/engine.ts';
import { createGpuRunner, type RunnerDescription } from '../engine/gpu-runner.ts';
import type { ModelRuntime, ModelRunner } from '../engine/types.ts';
import { gqaLayoutFor, type CacheDtype, type KvLayout } from '../cache/kv-layout.ts';
import { MlaKvLayout } from '../cache/mla-layout.ts';
import type { ModelConfig } from '../model/config.ts';
import { type GpuContext, openGpu, releaseGpu } from '../kernels/device.ts';
import { resolveModelPath } from '../model/hub.ts';
import { loadModel } from '../model/load.ts';
import { buildApp } from './app.ts';
import { convertCheckpoint, parseConvertArgs } from './convert-command.ts';
import { attentionBlockFor, mlaInt8AttentionProblem } from './local-runner.ts';
import { describeConfig, formatBytes, resolveServeConfig, SERVE_USAGE, type KvCacheDtypeOption, type ServeOptions, UsageError } from './serve-options.ts';
import { checkSyntheticName, loadSyntheticModel, SYNTHETIC_PREFIX, type ServableModel } from './synthetic-models.ts';

/** Where the default model is looked for first: the project's shared fixtures. */
export const SHARED_STORIES = '../shared/models/stories260K/stories260K.bin';
/** Else the Hugging Face cache, else a download (the tokenizer tok512.bin comes along). */
export const HUB_STORIES = 'karpathy/tinyllamas/stories260K/stories260K.bin';

/** Calibration text for the default MLA conversion. */
export const SHARED_CALIB_TEXT = '../shared/data/tinystories_valid_a.txt';

/** A model to serve: where it is and its served name. */
export interface ModelSpec {
  source: string;
  name: string;
}

/** Where converted checkpoints are kept between starts: $MLA_SERVE_CACHE, else $XDG_CACHE_HOME/mla-serve, else ~/.cache/mla-serve. */
export function conversionCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.MLA_SERVE_CACHE) return env.MLA_SERVE_CACHE;
  return join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'mla-serve');
}

/**
 * The MLA conversion of the default GQA checkpoint: from the cache when it was made before, else made now with
 * the converter's defaults (minus its held-out perplexity table, which only reports and would triple the time)
 * and cached. The cache key is the source's content hash, so a changed source is converted again.
 * Returns null, with the reason logged, when no calibration text is at hand.
 */
export async function defaultMlaConversion(gqaPath: string, log: (msg: string) => void, calibText = SHARED_CALIB_TEXT): Promise<string | null> {
  const key = createHash('sha256').update(readFileSync(gqaPath)).digest('hex').slice(0, 12);
  const dir = join(conversionCacheDir(), `${defaultModelName(gqaPath)}-mla-${key}`);
  if (existsSync(join(dir, 'config.json')) && existsSync(join(dir, 'model.safetensors'))) return dir;
  if (!existsSync(calibText)) {
    log(`mla-serve: no calibration text at ${calibText}, so the MLA conversion of ${gqaPath} cannot be made; serving the GQA model only (run 'mla-serve convert' and pass its output with --model)`);
    return null;
  }
  log(`mla-serve: converting ${gqaPath} to MLA (TransMLA, calibrated on ${calibText}); once, cached in ${dir}`);
  const t0 = performance.now();
  // Built in a private folder and renamed into place, so a second server starting at the same time never reads half a checkpoint.
  const tmp = `${dir}.tmp-${process.pid}`;
  mkdirSync(conversionCacheDir(), { recursive: true });
  const opts = parseConvertArgs(['--model', gqaPath, '--out', tmp, '--force', '--calib-text', calibText, '--eval-chunks', '0']);
  if (opts === 'help') throw new Error('unreachable: convert options without --help');
  try {
    const { result } = await convertCheckpoint(opts);
    const r = result.report;
    try {
      renameSync(tmp, dir);
    } catch (err) {
      // Another process finished first: keep its copy.
      if (!existsSync(join(dir, 'config.json'))) throw err;
    }
    log(
      `mla-serve: converted in ${((performance.now() - t0) / 1000).toFixed(1)} s: KV values per token per layer ${r.kvValuesBefore} → ${r.kvValuesAfter} ` +
        `(kv_lora_rank ${r.kvLoraRank} + rope ${r.ropeDim}, freqfold ${r.freqFold})`,
    );
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  return dir;
}

/** Served name of a --model without --name: a file's stem, a directory's name, a repo id as given. */
export function defaultModelName(source: string): string {
  if (existsSync(source)) {
    const base = basename(resolve(source));
    return extname(base) ? base.slice(0, -extname(base).length) : base;
  }
  return source;
}

/** What to serve: the --model list, or the default pair (stories260K and its MLA conversion, made on first start). */
export async function modelSpecs(opts: ServeOptions, log: (msg: string) => void): Promise<ModelSpec[]> {
  const synthetic = (opts.synthetic ?? []).map((n) => ({ source: SYNTHETIC_PREFIX + checkSyntheticName(n), name: n }));
  if (opts.models.length > 0 || synthetic.length > 0) {
    return [...opts.models.map((source, i) => ({ source, name: opts.names[i] ?? defaultModelName(source) })), ...synthetic];
  }
  const gqa = existsSync(SHARED_STORIES) ? SHARED_STORIES : await resolveModelPath(HUB_STORIES);
  const specs = [{ source: gqa, name: opts.names[0] ?? 'stories260K' }];
  const mla = await defaultMlaConversion(gqa, log);
  if (mla) specs.push({ source: mla, name: opts.names[1] ?? 'stories260K-mla' });
  return specs;
}

/** One model up and serving: its engine and the figures the banner prints. */
export interface ServedModel {
  name: string;
  source: string;
  engine: Engine;
}

export interface ServedEngines {
  models: ServedModel[];
  gpu: GpuContext;
  /** Shuts down every engine (frees its KV pool and weights) and releases the GPU. */
  close(): Promise<void>;
}

/**
 * Refuses a KV cache dtype the model's attention cannot store, before anything goes to the GPU: an int8 cache needs a
 * layout with an int8 row format (values plus scales, cache/kv-layout.ts); a layout without one would size and read
 * the rows as another dtype. Returns the dtype as the runner takes it.
 */
export function checkKvCacheDtype(name: string, config: ModelConfig, dtype: KvCacheDtypeOption, blockSize: number): CacheDtype {
  const cacheDtype = dtype as CacheDtype;
  if (dtype !== 'int8') return cacheDtype;
  const layout: KvLayout = config.attention === 'mla' ? new MlaKvLayout(config, blockSize, cacheDtype) : gqaLayoutFor(config, blockSize, cacheDtype);
  // GQA layouts describe their int8 rows in `int8`, the MLA latent layout in `latentInt8`.
  const l = layout as { int8?: unknown; latentInt8?: unknown };
  if (l.int8 === undefined && l.latentInt8 === undefined) {
    throw new UsageError(
      `model '${name}' (${config.attention} attention, ${config.arch}) has no int8 KV cache in this build (--kv-cache-dtype int8); ` +
        `serve it with --kv-cache-dtype f16 or f32`,
    );
  }
  return cacheDtype;
}

/** A runner's description as the banner and /metrics show it. */
export function modelRuntime(d: RunnerDescription): ModelRuntime {
  const int8Matmul = d.int8Matmul ? `${d.int8Matmul.fewRows}+${d.int8Matmul.batched}` : 'none';
  return { adapter: d.adapter, weightDtype: d.weightDtype, cacheDtype: d.cacheDtype, int8Matmul, attentionProducts: d.attentionProducts, headProducts: d.headProducts };
}

/** Loads every model, splits the KV budget evenly in bytes, and starts one engine per model on one GPU. */
export async function openServedEngines(opts: ServeOptions, log: (msg: string) => void): Promise<ServedEngines> {
  const specs = await modelSpecs(opts, log);
  const names = specs.map((s) => s.name);
  const dup = names.find((n, i) => names.indexOf(n) !== i);
  if (dup) throw new UsageError(`two models would be served as '${dup}'; give each --model its own --name`);

  const loaded: ServableModel[] = [];
  for (const spec of specs) {
    if (spec.source.startsWith(SYNTHETIC_PREFIX)) {
      loaded.push(loadSyntheticModel(spec.source.slice(SYNTHETIC_PREFIX.length), opts.maxModelLen === null ? {} : { maxSeqLen: opts.maxModelLen }));
      continue;
    }
    const path = existsSync(spec.source) ? spec.source : await resolveModelPath(spec.source);
    loaded.push(await loadModel(path, opts.maxModelLen === null ? {} : { maxSeqLen: opts.maxModelLen }));
  }
  const weightDtype = opts.weightDtype ?? 'f16';
  const attentionProblem = mlaInt8AttentionProblem(opts.mlaInt8Attention, opts.kvCacheDtype, opts.blockSize);
  if (attentionProblem) throw new UsageError(attentionProblem);
  // Every model checked before the first upload: a refused one fails the start, not a request later.
  const cacheDtypes = loaded.map((m, i) => checkKvCacheDtype(specs[i].name, m.config, opts.kvCacheDtype ?? 'f16', opts.blockSize));

  const gpu = await openGpu({ log });
  const runners: ModelRunner[] = [];
  let trace: WriteStream | undefined;
  try {
    if (opts.stepTrace) {
      const path = opts.stepTrace;
      trace = createWriteStream(path, { flags: 'a' });
      await new Promise<void>((resolve, reject) => {
        trace!.once('open', () => resolve());
        trace!.once('error', (err) => reject(new Error(`--step-trace ${path}: ${err.message}`)));
      });
    }
    const startedAt = performance.now();
    const share = Math.floor(opts.kvCacheMemory / specs.length);
    const models: ServedModel[] = [];
    for (let i = 0; i < specs.length; i++) {
      const m = loaded[i];
      const runner = await createGpuRunner(gpu, m, {
        blockSize: opts.blockSize,
        kvCacheBytes: share,
        cacheDtype: cacheDtypes[i],
        weightDtype,
        gpuTiming: trace !== undefined,
        // MLA over an int8 cache: the products as --mla-int8-attention asks (f32 on unpacked values, or int8 dot4).
        ...attentionBlockFor(m.config, cacheDtypes[i], opts.mlaInt8Attention, opts.mlaHeadKernel),
      });
      runners.push(runner);
      const runtime = modelRuntime(runner.describe());
      if (runtime.cacheDtype !== cacheDtypes[i] || runtime.weightDtype !== weightDtype) {
        throw new Error(`model '${specs[i].name}': asked for ${weightDtype} weights and a ${cacheDtypes[i]} KV cache, the runner holds ${runtime.weightDtype} and ${runtime.cacheDtype}`);
      }
      const engine = createEngine({
        runner,
        info: { name: specs[i].name, config: m.config, tokenizer: m.tokenizer, maxModelLen: m.config.maxSeqLen, chatTemplate: m.chatTemplate, runtime },
        maxNumSeqs: opts.maxNumSeqs,
        maxBatchedTokens: opts.maxNumBatchedTokens,
        maxQueue: opts.maxQueue,
        cacheDtype: runtime.cacheDtype,
        pipelineDecode: opts.asyncScheduling !== 'off',
      });
      const name = specs[i].name;
      if (trace) {
        const out = trace;
        engine.onStep((o) => {
          const line = {
            model: name,
            t: Number(((performance.now() - startedAt) / 1000).toFixed(4)),
            seconds: Number(o.seconds.toFixed(6)),
            gpuSeconds: o.gpuSeconds === undefined ? null : Number(o.gpuSeconds.toFixed(6)),
            seqs: o.batchSize,
            rows: o.tokens,
            promptRows: o.promptTokens,
            pipelined: o.pipelined,
          };
          out.write(`${JSON.stringify(line)}\n`);
        });
      }
      models.push({ name, source: m.path, engine });
    }
    let closed = false;
    return {
      models,
      gpu,
      async close() {
        if (closed) return;
        closed = true;
        // shutdown() also destroys each runner; a second destroy would free buffers twice.
        await Promise.all(models.map((s) => s.engine.shutdown(0)));
        if (trace) await new Promise<void>((resolve) => trace!.end(() => resolve()));
        gpu.destroy();
        releaseGpu();
      },
    };
  } catch (err) {
    trace?.destroy();
    for (const r of runners) r.destroy();
    gpu.destroy();
    releaseGpu();
    throw err;
  }
}

function weightsLine(rt: ModelRuntime | undefined): string {
  if (!rt) return 'weights (not reported)';
  return `weights ${rt.weightDtype}${rt.int8Matmul === 'none' ? '' : ` (int8 matmul ${rt.int8Matmul})`}`;
}

/** The start-up lines: URL, adapter, and per model its KV budget in bytes, blocks and tokens. */
export function banner(url: string, served: ServedEngines): string[] {
  const lines = [`mla-serve listening on ${url}`, `  adapter: ${served.gpu.adapterName}${served.gpu.isSoftware ? ' (software Vulkan: slow)' : ''}`];
  const width = Math.max(...served.models.map((m) => m.name.length));
  for (const m of served.models) {
    const s = m.engine.stats().kv;
    const attention = m.engine.info.config.attention;
    lines.push(
      `  ${m.name.padEnd(width)}  ${attention}  KV ${formatBytes(s.capacityBytes)} (${s.capacityBytes} bytes) = ${s.numBlocks} blocks × ${s.blockSize} tokens = ${s.numBlocks * s.blockSize} tokens` +
        ` at ${s.bytesPerToken} B/token (${s.cacheDtype}); ${weightsLine(m.engine.info.runtime)}; ` +
        `attention products ${m.engine.info.runtime?.attentionProducts ?? '(not reported)'}; ` +
        `head products ${m.engine.info.runtime?.headProducts ?? '(not reported)'}; max_model_len ${m.engine.info.maxModelLen}; from ${m.source}`,
    );
  }
  return lines;
}

export async function runServe(argv: string[]): Promise<number> {
  let opts: ServeOptions;
  const log = (msg: string) => process.stderr.write(`${msg}\n`);
  try {
    // Flags, then MLA_SERVE_* variables, then --config / MLA_SERVE_CONFIG, then defaults.
    const resolved = resolveServeConfig(argv, process.env);
    if (resolved === 'help') {
      process.stdout.write(SERVE_USAGE);
      return 0;
    }
    opts = resolved.options;
    log(describeConfig(resolved).join('\n'));
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`mla-serve serve: ${err.message}\n\n${SERVE_USAGE}`);
      return 2;
    }
    throw err;
  }

  const served = await openServedEngines(opts, log);
  const app = buildApp({
    engines: served.models.map((m) => m.engine),
    logger: { level: opts.logLevel ?? 'info' },
    shutdownDeadlineMs: opts.shutdownTimeout * 1000,
    apiKey: opts.apiKey ?? null,
  });
  let url: string;
  try {
    url = await app.listen({ host: opts.host, port: opts.port });
  } catch (err) {
    await app.close().catch(() => {});
    await served.close();
    throw new Error(`cannot listen on ${opts.host}:${opts.port}: ${(err as Error).message}`);
  }
  const auth = opts.apiKey ? '  auth: Bearer API key on every route but GET /health and GET /metrics' : '  auth: none (no --api-key)';
  process.stdout.write([...banner(url, served), auth].join('\n') + '\n');

  // A GPU device loss makes an engine unhealthy; /health says 503 and the process exits non-zero so a supervisor restarts it.
  const watchdog = setInterval(() => {
    const sick = served.models.filter((m) => !m.engine.healthy());
    if (sick.length) {
      log(`mla-serve: engine of ${sick.map((m) => m.name).join(', ')} failed (GPU device lost or a step error); exiting so a supervisor can restart`);
      void stop(1);
    }
  }, 1000);
  watchdog.unref();

  let exitCode = 0;
  let stopping: Promise<void> | null = null;
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => (resolveDone = r));
  const stop = (code: number): Promise<void> => {
    if (stopping) return stopping;
    exitCode = code;
    stopping = (async () => {
      clearInterval(watchdog);
      log(`mla-serve: shutting down: no new requests; running ones get up to ${opts.shutdownTimeout} s to finish`);
      // app.close() drains through the engines (ownsEngines) before the sockets close.
      await app.close();
      await served.close();
      resolveDone();
    })();
    return stopping;
  };
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) {
      log(`mla-serve: ${signal} again: exiting now`);
      process.exit(130);
    }
    void stop(0);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  await done;
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  return exitCode;
}

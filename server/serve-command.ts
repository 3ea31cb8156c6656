// `mla-serve serve`: load the models, give each its share of the KV budget on one GPU, start the HTTP app, drain on SIGTERM.
import { existsSync } from 'node:fs';
import { basename, extname, resolve } from 'node:path';
import { createEngine, type Engine } from '../engine/engine.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import type { ModelRunner } from '../engine/types.ts';
import { type GpuContext, openGpu, releaseGpu } from '../kernels/device.ts';
import { resolveModelPath } from '../model/hub.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';
import { buildApp } from './app.ts';
import { formatBytes, parseServeArgs, SERVE_USAGE, type ServeOptions, UsageError } from './serve-options.ts';

/** Where the default model is looked for first: the project's shared fixtures. */
export const SHARED_STORIES = '../shared/models/stories260K/stories260K.bin';
/** Else the Hugging Face cache, else a download (the tokenizer tok512.bin comes along). */
export const HUB_STORIES = 'karpathy/tinyllamas/stories260K/stories260K.bin';

/** A model to serve: where it is and its served name. */
export interface ModelSpec {
  source: string;
  name: string;
}

/** Served name of a --model without --name: a file's stem, a directory's name, a repo id as given. */
export function defaultModelName(source: string): string {
  if (existsSync(source)) {
    const base = basename(resolve(source));
    return extname(base) ? base.slice(0, -extname(base).length) : base;
  }
  return source;
}

export function modelSpecs(opts: ServeOptions): ModelSpec[] {
  if (opts.models.length === 0) {
    return [{ source: existsSync(SHARED_STORIES) ? SHARED_STORIES : HUB_STORIES, name: opts.names[0] ?? 'stories260K' }];
  }
  return opts.models.map((source, i) => ({ source, name: opts.names[i] ?? defaultModelName(source) }));
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

/** Loads every model, splits the KV budget evenly in bytes, and starts one engine per model on one GPU. */
export async function openServedEngines(opts: ServeOptions, log: (msg: string) => void): Promise<ServedEngines> {
  const specs = modelSpecs(opts);
  const names = specs.map((s) => s.name);
  const dup = names.find((n, i) => names.indexOf(n) !== i);
  if (dup) throw new UsageError(`two models would be served as '${dup}'; give each --model its own --name`);
  if (opts.models.length === 0) {
    log('mla-serve: the MLA conversion of stories260K is not served yet (the TransMLA converter is not wired into serve); serving the GQA original only');
  }

  const loaded: LoadedModel[] = [];
  for (const spec of specs) {
    const path = existsSync(spec.source) ? spec.source : await resolveModelPath(spec.source);
    loaded.push(await loadModel(path, opts.maxModelLen === null ? {} : { maxSeqLen: opts.maxModelLen }));
  }

  const gpu = await openGpu({ log });
  const runners: ModelRunner[] = [];
  try {
    const share = Math.floor(opts.kvCacheMemory / specs.length);
    const models: ServedModel[] = [];
    for (let i = 0; i < specs.length; i++) {
      const m = loaded[i];
      const runner = await createGpuRunner(gpu, m, { blockSize: opts.blockSize, kvCacheBytes: share, cacheDtype: 'f16' });
      runners.push(runner);
      const engine = createEngine({
        runner,
        info: { name: specs[i].name, config: m.config, tokenizer: m.tokenizer, maxModelLen: m.config.maxSeqLen, chatTemplate: m.chatTemplate },
        maxNumSeqs: opts.maxNumSeqs,
        maxQueue: opts.maxQueue,
        cacheDtype: 'f16',
      });
      models.push({ name: specs[i].name, source: m.path, engine });
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
        gpu.destroy();
        releaseGpu();
      },
    };
  } catch (err) {
    for (const r of runners) r.destroy();
    gpu.destroy();
    releaseGpu();
    throw err;
  }
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
        ` at ${s.bytesPerToken} B/token (${s.cacheDtype}); max_model_len ${m.engine.info.maxModelLen}; from ${m.source}`,
    );
  }
  return lines;
}

export async function runServe(argv: string[]): Promise<number> {
  let opts: ServeOptions;
  try {
    const parsed = parseServeArgs(argv);
    if (parsed === 'help') {
      process.stdout.write(SERVE_USAGE);
      return 0;
    }
    opts = parsed;
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`mla-serve serve: ${err.message}\n\n${SERVE_USAGE}`);
      return 2;
    }
    throw err;
  }

  const log = (msg: string) => process.stderr.write(`${msg}\n`);
  const served = await openServedEngines(opts, log);
  const app = buildApp({
    engines: served.models.map((m) => m.engine),
    logger: { level: process.env.LOG_LEVEL ?? 'info' },
    shutdownDeadlineMs: opts.shutdownTimeout * 1000,
  });
  let url: string;
  try {
    url = await app.listen({ host: opts.host, port: opts.port });
  } catch (err) {
    await app.close().catch(() => {});
    await served.close();
    throw new Error(`cannot listen on ${opts.host}:${opts.port}: ${(err as Error).message}`);
  }
  process.stdout.write(banner(url, served).join('\n') + '\n');

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

// What `generate` and `eval-ppl` share: option parsing helpers, loading a model, and opening its runner (GPU, or the CPU reference).
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { CpuRunner } from '../engine/cpu-runner.ts';
import type { AttentionBlockFactory } from '../engine/gpu-runner.ts';
import { mlaBlockFactory } from '../engine/mla-block.ts';
import type { HeadDecodeKernel } from '../kernels/mla-head-matmul.ts';
import { FRONT_MAX_ROWS } from '../kernels/mla-front.ts';
import type { ModelRunner } from '../engine/types.ts';
import type { ModelConfig } from '../model/config.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';
import { MLA_HEAD_KERNEL, MLA_INT8_ATTENTION, type MlaHeadKernelOption, type MlaInt8AttentionOption as MlaInt8Attention } from './serve-options.ts';

export class UsageError extends Error {}

/** Options every local-model command (generate, eval-ppl) takes: the model, its runtime dtypes, output form, help. */
export const LOCAL_MODEL_OPTIONS = {
  model: { type: 'string' },
  tokenizer: { type: 'string' },
  'weight-dtype': { type: 'string' },
  'kv-cache-dtype': { type: 'string' },
  'cache-dtype': { type: 'string' },
  'mla-int8-attention': { type: 'string' },
  'mla-head-kernel': { type: 'string' },
  cpu: { type: 'boolean' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

type CommandOptions = NonNullable<ParseArgsConfig['options']>;
/** The parsed flags of a local-model command: LOCAL_MODEL_OPTIONS and its own. */
export type LocalCommandValues<O extends CommandOptions> = ReturnType<
  typeof parseArgs<{ args: string[]; allowPositionals: false; options: typeof LOCAL_MODEL_OPTIONS & O }>
>['values'];

/**
 * Parses a local-model command's flags and builds its options with `build` (which throws UsageError for bad values).
 * --help prints the usage (exit code 0); an unknown flag or a UsageError prints the message and the usage to stderr
 * (exit code 2). Returns the flags and options, or the exit code.
 */
export function parseLocalCommand<O extends CommandOptions, T>(
  argv: string[],
  command: string,
  usage: string,
  options: O,
  build: (values: LocalCommandValues<O>) => T,
): { values: LocalCommandValues<O>; opts: T } | number {
  let values: LocalCommandValues<O>;
  try {
    values = parseArgs({ args: argv, allowPositionals: false, options: { ...LOCAL_MODEL_OPTIONS, ...options } }).values as LocalCommandValues<O>;
  } catch (err) {
    process.stderr.write(`mla-serve ${command}: ${(err as Error).message}\n\n${usage}`);
    return 2;
  }
  if ((values as { help?: boolean }).help) {
    process.stdout.write(usage);
    return 0;
  }
  try {
    return { values, opts: build(values) };
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`mla-serve ${command}: ${err.message}\n\n${usage}`);
    return 2;
  }
}

/**
 * The weight and KV cache dtypes of a local-model command's parsed flags (f16 unless given), and the MLA attention
 * products over an int8 cache (auto unless given: mlaInt8Products; dot4 needs the int8 cache).
 */
export function localDtypes(values: {
  'weight-dtype'?: string;
  'kv-cache-dtype'?: string;
  'cache-dtype'?: string;
  'mla-int8-attention'?: string;
  'mla-head-kernel'?: string;
}): {
  weightDtype: WeightDtype;
  cacheDtype: CacheDtype;
  mlaInt8Attention: MlaInt8Attention;
  mlaHeadKernel: MlaHeadKernelOption;
} {
  const cacheDtype = cacheDtypeOption(values, 'f16');
  const mlaInt8Attention = dtypeOption<MlaInt8Attention>(values['mla-int8-attention'], '--mla-int8-attention', 'auto', MLA_INT8_ATTENTION);
  const problem = mlaInt8AttentionProblem(mlaInt8Attention, cacheDtype);
  if (problem) throw new UsageError(problem);
  return {
    weightDtype: dtypeOption<WeightDtype>(values['weight-dtype'], '--weight-dtype', 'f16', ['f32', 'f16', 'int8']),
    cacheDtype,
    mlaInt8Attention,
    mlaHeadKernel: dtypeOption<MlaHeadKernelOption>(values['mla-head-kernel'], '--mla-head-kernel', 'auto', MLA_HEAD_KERNEL),
  };
}

/**
 * Why a --mla-int8-attention choice cannot run with this cache (dot4, three-pass and flash compute on the int8 latent
 * cache; flash reads 32 cache rows at a time), if it cannot. The adapter's part (flash needs i8 subgroup matrices) is
 * the attention kernel's to say when the model loads.
 */
export function mlaInt8AttentionProblem(choice: MlaInt8Attention | undefined, cacheDtype: CacheDtype | undefined, blockSize?: number): string | undefined {
  if (choice !== 'dot4' && choice !== 'three-pass' && choice !== 'flash') return undefined;
  if (cacheDtype !== 'int8') return `--mla-int8-attention ${choice} computes on an int8 latent cache; add --kv-cache-dtype int8 (the cache is ${cacheDtype ?? 'f16'})`;
  if (choice === 'flash' && blockSize !== undefined && blockSize % 32 !== 0) return `--mla-int8-attention flash reads 32 cache rows at a time; use --block-size 32 (or a multiple; it is ${blockSize})`;
  return undefined;
}

/** Tokens per KV block of the local commands (generate, eval-ppl): 16, or 32 for flash, which reads 32 cache rows at a time. */
export function localBlockSize(choice: MlaInt8Attention | undefined): number {
  return choice === 'flash' ? 32 : 16;
}

/**
 * The products an MLA model's attention takes over a cache of this dtype given --mla-int8-attention (undefined: its
 * default, auto): dot4 where asked, and for auto wherever the cache is int8 — on an H100 the dot4 kernel served 8.6 %
 * more tokens than f32 products over the same cache (BENCHMARKS.md, 2026-12-05); f32 otherwise.
 */
export function mlaInt8Products(choice: MlaInt8Attention | undefined, cacheDtype: CacheDtype | undefined): 'f32' | 'dot4' | 'three-pass' | 'flash' {
  if (cacheDtype !== 'int8') return 'f32';
  return choice === 'f32' ? 'f32' : choice === 'three-pass' || choice === 'flash' ? choice : 'dot4';
}

/**
 * The MLA block's head-product options given --mla-head-kernel: none for auto (the block's default: the staged
 * kernel, with W_UK in the decode front for steps up to FRONT_MAX_ROWS rows where the attention's products are int8;
 * on an H100 the front took 0.20–0.35 ms off a decode step, while the W8A8 products took 2.2 against 0.77 ms of an
 * 8-row step, BENCHMARKS.md 2026-12-06); staged or w8a8 without the front; for fused the decode front and back (W_UV
 * with the merge, which timed even with the staged kernel) up to FRONT_MAX_ROWS rows.
 */
export function mlaHeadOptions(choice: MlaHeadKernelOption | undefined): { headDecodeKernel?: HeadDecodeKernel; frontMaxRows?: number; backMaxRows?: number } {
  if (choice === 'w8a8' || choice === 'staged') return { headDecodeKernel: choice, frontMaxRows: 0 };
  return choice === 'fused' ? { frontMaxRows: FRONT_MAX_ROWS, backMaxRows: FRONT_MAX_ROWS } : {};
}

/**
 * The runner's attention block for a model given --mla-int8-attention and --mla-head-kernel: the MLA block with int8
 * products and/or W8A8 head products, or the default.
 */
export function attentionBlockFor(
  config: ModelConfig,
  cacheDtype: CacheDtype,
  choice: MlaInt8Attention | undefined,
  headChoice?: MlaHeadKernelOption,
): { attentionBlock?: AttentionBlockFactory } {
  if (config.attention !== 'mla') return {};
  const products = mlaInt8Products(choice, cacheDtype);
  const heads = mlaHeadOptions(headChoice);
  if (products === 'f32' && Object.keys(heads).length === 0) return {};
  return { attentionBlock: mlaBlockFactory({ ...(products === 'f32' ? {} : { attentionTuning: { int8Products: products } }), ...heads }) };
}

export type WeightDtype = 'f32' | 'f16' | 'int8';
export type CacheDtype = 'f32' | 'f16' | 'int8';
export const CACHE_DTYPES: readonly CacheDtype[] = ['f32', 'f16', 'int8'];

/**
 * The KV cache dtype from `--kv-cache-dtype` (vLLM's name) or its older alias `--cache-dtype`; both given must agree.
 */
export function cacheDtypeOption(values: { 'kv-cache-dtype'?: string; 'cache-dtype'?: string }, fallback: CacheDtype): CacheDtype {
  const kv = values['kv-cache-dtype'];
  const alias = values['cache-dtype'];
  if (kv !== undefined && alias !== undefined && kv !== alias) {
    throw new UsageError(`--kv-cache-dtype ${kv} and --cache-dtype ${alias} disagree; give one of them (--cache-dtype is the old name)`);
  }
  return dtypeOption<CacheDtype>(kv ?? alias, kv !== undefined ? '--kv-cache-dtype' : '--cache-dtype', fallback, CACHE_DTYPES);
}

export function intOption(text: string | undefined, flag: string, fallback: number, min = 1): number {
  if (text === undefined) return fallback;
  const v = Number(text);
  if (!Number.isInteger(v) || v < min) throw new UsageError(`${flag} must be an integer >= ${min}; got ${JSON.stringify(text)}`);
  return v;
}

export function numberOption(text: string | undefined, flag: string, fallback: number, ok: (v: number) => boolean, range: string): number {
  if (text === undefined) return fallback;
  const v = Number(text);
  if (text.trim() === '' || !Number.isFinite(v) || !ok(v)) throw new UsageError(`${flag} must be a number ${range}; got ${JSON.stringify(text)}`);
  return v;
}

export function dtypeOption<T extends string>(text: string | undefined, flag: string, fallback: T, allowed: readonly T[]): T {
  if (text === undefined) return fallback;
  if (!(allowed as readonly string[]).includes(text)) throw new UsageError(`${flag} must be one of ${allowed.join(', ')}; got ${JSON.stringify(text)}`);
  return text as T;
}

export interface LocalRunnerOptions {
  blockSize: number;
  numBlocks: number;
  weightDtype: WeightDtype;
  cacheDtype: CacheDtype;
  /** MLA over an int8 cache: the attention products (default f32). */
  mlaInt8Attention?: MlaInt8Attention;
  /** MLA's W_UK / W_UV kernel of decode-sized steps (default auto: staged). */
  mlaHeadKernel?: MlaHeadKernelOption;
  /** Run on the CPU with the float64 reference ops instead of the GPU (slow; for checks). */
  cpu: boolean;
  log?: (msg: string) => void;
}

export interface LocalRunner {
  runner: ModelRunner;
  /** Destroys the runner and releases the GPU. */
  close(): Promise<void>;
}

export async function loadLocalModel(path: string, opts: { tokenizer?: string; maxSeqLen?: number } = {}): Promise<LoadedModel> {
  return loadModel(path, { tokenizerPath: opts.tokenizer, maxSeqLen: opts.maxSeqLen });
}

/** The engine's shutdown destroys its runner too; whoever comes second must not free the GPU buffers twice. */
function destroyOnce(runner: ModelRunner): ModelRunner {
  const destroy = runner.destroy.bind(runner);
  let destroyed = false;
  runner.destroy = () => {
    if (destroyed) return;
    destroyed = true;
    destroy();
  };
  return runner;
}

export async function openLocalRunner(model: LoadedModel, opts: LocalRunnerOptions): Promise<LocalRunner> {
  if (opts.cpu) {
    const runner = destroyOnce(new CpuRunner(model, { blockSize: opts.blockSize, numBlocks: opts.numBlocks }));
    return { runner, close: async () => runner.destroy() };
  }
  const { openGpu, releaseGpu } = await import('../kernels/device.ts');
  const { createGpuRunner } = await import('../engine/gpu-runner.ts');
  const gpu = await openGpu({ log: opts.log });
  try {
    const runner = destroyOnce(await createGpuRunner(gpu, model, {
      blockSize: opts.blockSize,
      numBlocks: opts.numBlocks,
      weightDtype: opts.weightDtype,
      cacheDtype: opts.cacheDtype,
      ...attentionBlockFor(model.config, opts.cacheDtype, opts.mlaInt8Attention, opts.mlaHeadKernel),
    }));
    return {
      runner,
      close: async () => {
        runner.destroy();
        gpu.destroy();
        releaseGpu();
      },
    };
  } catch (err) {
    gpu.destroy();
    releaseGpu();
    throw err;
  }
}

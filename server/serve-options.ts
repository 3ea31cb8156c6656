// `mla-serve serve` options: flags, MLA_SERVE_* environment variables and an optional JSON/YAML config file
// (precedence flags > env > file > defaults, each value validated with zod), byte sizes, and the resolved-config printout.
import { readFileSync } from 'node:fs';
import { extname } from 'node:path';
import { parseArgs } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';

export interface ServeOptions {
  /** Local paths or Hugging Face repo ids; empty = the default pair (stories260K and stories260K-mla). */
  models: string[];
  /** Served names, paired with `models` in order; missing ones come from the path. */
  names: string[];
  /** Synthetic models (model/synthetic.ts names) served under their own names, after `models`. */
  synthetic?: string[];
  host: string;
  port: number;
  /** Total KV-cache bytes, split evenly between the models. */
  kvCacheMemory: number;
  blockSize: number;
  maxNumSeqs: number;
  /** Most token rows in one step (decode rows + prompt chunks); long prompts are prefilled in chunks of this size. */
  maxNumBatchedTokens?: number;
  /** null: each model's own trained context. */
  maxModelLen: number | null;
  maxQueue: number;
  /** Seconds running requests get to finish on SIGTERM before they are cancelled. */
  shutdownTimeout: number;
  /** Bearer key every request except GET /health and /metrics must carry; null/absent: no authentication. */
  apiKey?: string | null;
  /** pino level of the server log (request lines are `info`). */
  logLevel?: LogLevel;
  /** Projection weights of every served model (default f16; int8 = per output channel, embedding and W_UK/W_UV f16). */
  weightDtype?: WeightDtypeOption;
  /** KV cache values of every served model (default f16). */
  kvCacheDtype?: KvCacheDtypeOption;
  /** MLA over an int8 cache: f32 products on unpacked values (default) or int8 dot products (dot4). */
  mlaInt8Attention?: MlaInt8AttentionOption;
  /** MLA's W_UK / W_UV head products in decode-sized steps: auto (staged), staged or w8a8. */
  mlaHeadKernel?: MlaHeadKernelOption;
  /** Pipelined decode of picked rows (engine option pipelineDecode; default on). */
  asyncScheduling?: OnOff;
  /** JSON-lines file that gets one line per engine step (null/absent: none). */
  stepTrace?: string | null;
}

export const ON_OFF = ['on', 'off'] as const;
export type OnOff = (typeof ON_OFF)[number];

export const WEIGHT_DTYPES = ['f16', 'f32', 'int8'] as const;
export type WeightDtypeOption = (typeof WEIGHT_DTYPES)[number];
export const KV_CACHE_DTYPES = ['f16', 'f32', 'int8'] as const;
export type KvCacheDtypeOption = (typeof KV_CACHE_DTYPES)[number];

/** How MLA over an int8 latent cache takes its attention products: f32 on unpacked values, int8 dot products, or auto (dot4 over an int8 cache). */
export const MLA_INT8_ATTENTION = ['auto', 'f32', 'dot4', 'three-pass', 'flash'] as const;
export type MlaInt8AttentionOption = (typeof MLA_INT8_ATTENTION)[number];

/**
 * The kernel of an MLA model's W_UK / W_UV head products in decode-sized steps: auto, the staged float kernel, W8A8, or
 * fused into the attention's first and last kernels up to 32 rows (kernels/mla-front.ts, mla-back.ts; staged above).
 */
export const MLA_HEAD_KERNEL = ['auto', 'staged', 'w8a8', 'fused'] as const;
export type MlaHeadKernelOption = (typeof MLA_HEAD_KERNEL)[number];

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export const SERVE_USAGE = `usage: mla-serve serve [options]

Serves models over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
/v1/models, /tokenize, /detokenize, /health, /metrics).

Every option can also come from an environment variable (in brackets) or a config file; a flag
beats the environment, which beats the file, which beats the default. The resolved configuration
is printed at start (the API key redacted).

  --config FILE           JSON or YAML file of options, keyed by flag name without the dashes
                          (kv-cache-memory or kv_cache_memory; lists for model/name/synthetic)
                          [MLA_SERVE_CONFIG]
  --model PATH_OR_HF_ID   model to serve; repeat for several (default: stories260K and its
                          MLA conversion stories260K-mla) [MLA_SERVE_MODEL, comma-separated]
  --name NAME             served name of the --model at the same position (default: its directory name)
                          [MLA_SERVE_MODEL_NAME, comma-separated]
  --synthetic NAME        also serve a random-weight model with a real configuration under NAME, with a byte-level
                          tokenizer; repeat for several (qwen2.5-7b, qwen2.5-7b-mla, llama-3-8b, llama-2-7b,
                          deepseek-v2-lite-attn, tiny-qwen2, tiny-qwen2-mla); for load tests at real size
                          [MLA_SERVE_SYNTHETIC, comma-separated]
  --host HOST             address to listen on (default 127.0.0.1; 0.0.0.0 in containers) [MLA_SERVE_HOST]
  --port PORT             (default 8000; 0 = any free port, printed in the banner) [MLA_SERVE_PORT]
  --kv-cache-memory SIZE  KV-cache memory for all models together, e.g. 2GiB, 512MiB (default 2GiB);
                          split evenly between the models [MLA_SERVE_KV_CACHE_MEMORY]
  --block-size N          tokens per KV block (default 16) [MLA_SERVE_BLOCK_SIZE]
  --max-num-seqs N        most sequences in one batched step (default 64) [MLA_SERVE_MAX_NUM_SEQS]
  --max-num-batched-tokens N
                          most token rows in one step, decode rows and prompt chunks together (default 2048);
                          smaller: decodes wait less behind long prompts (lower TPOT), larger: faster prefill
                          (lower TTFT) [MLA_SERVE_MAX_NUM_BATCHED_TOKENS]
  --max-model-len N       context length to serve (default: the model's trained context; 0 = same)
                          [MLA_SERVE_MAX_MODEL_LEN]
  --max-queue N           most waiting requests before 429 (default 256) [MLA_SERVE_MAX_QUEUE]
  --shutdown-timeout S    seconds running requests may finish on SIGTERM before they are cancelled (default 30)
                          [MLA_SERVE_SHUTDOWN_TIMEOUT]
  --api-key KEY           require "Authorization: Bearer KEY" on every request except GET /health and
                          GET /metrics (probes and Prometheus/the router scrape without it); others get
                          401 with an OpenAI error body (default: no key) [MLA_SERVE_API_KEY]
  --weight-dtype DTYPE    projection weights of every model: f16 (default), f32, or int8 (one scale per output
                          channel; the embedding and MLA's W_UK/W_UV stay f16) [MLA_SERVE_WEIGHT_DTYPE]
  --kv-cache-dtype DTYPE  KV cache values of every model: f16 (default), f32, or int8 (a model whose attention
                          has no int8 cache yet refuses to start) [MLA_SERVE_KV_CACHE_DTYPE]
  --mla-int8-attention auto|f32|dot4|three-pass|flash
                          MLA models over an int8 KV cache: f32 multiplies the unpacked cache values in f32; dot4
                          quantizes the query and the softmax weights to int8 as well and takes both products as
                          int8 dot products (4 multiply-adds an instruction, on the cache's own bytes; perplexity
                          within ~1 % of f32 on the tests' text; served 8.6 % more tokens on an H100); three-pass
                          the same arithmetic as scores, softmax and values passes (decode steps; long prompts
                          run dot4); flash the same arithmetic in one pass with both products on tensor cores (i8
                          subgroup matrices: the H100 / H200; --block-size 32; on an H100 10-20 % faster than dot4
                          where a step reads ~128K cached tokens, as 32 × 4K, slower at 8 × 4K and below).
                          auto (default): dot4 with --kv-cache-dtype int8, else f32. dot4, three-pass and flash
                          need the int8 cache
                          [MLA_SERVE_MLA_INT8_ATTENTION]
  --mla-head-kernel auto|staged|w8a8|fused
                          MLA models' absorbed head products (W_UK on the query, W_UV on the attention output) in
                          decode-sized steps: staged multiplies the f16 head weights in f32, each k chunk staged in
                          workgroup memory; w8a8 quantizes the head weights to int8 per output column at load and
                          the inputs per row and head each step, and sums in i32 (tensor cores where the GPU offers
                          int8 subgroup matrices, else int8 dot products), up to 128 rows (~3× slower than
                          staged on an H100); fused, in steps of up to 32 rows: W_UV with the attention's merge in
                          one dispatch a layer and, with an int8 cache, W_UK with RoPE, the latent write and the
                          query quantizer in another, each head's weights loaded once for up to 8 rows (staged
                          above). auto (default): staged, with W_UK, RoPE, the latent write and the query
                          quantizer in one dispatch a layer in steps of up to 32 rows over an int8 cache (on an
                          H100 0.2–0.35 ms faster a decode step) [MLA_SERVE_MLA_HEAD_KERNEL]
  --async-scheduling on|off
                          on (default): while a step of decodes picked on the GPU runs, the next one is planned
                          and submitted with its picks as tokens, so the host's work overlaps the GPU's; a request
                          that stops is one step ahead of the GPU (its extra row is dropped)
                          [MLA_SERVE_ASYNC_SCHEDULING]
  --step-trace FILE       append one JSON line per engine step to FILE: model, time, wall and GPU seconds,
                          sequences, rows, prompt rows, pipelined; to see where served time goes (steps are
                          then GPU-timed where the adapter has timestamps) [MLA_SERVE_STEP_TRACE]
  --log-level LEVEL       fatal, error, warn, info (one line per request), debug, trace, silent
                          (default info) [MLA_SERVE_LOG_LEVEL, else LOG_LEVEL]
`;

export class UsageError extends Error {}

const units: Record<string, number> = { '': 1, b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30 };

/** "2GiB" → 2147483648; "1.5GB" → 1500000000; "4096" → 4096. */
export function parseByteSize(text: string, flag = '--kv-cache-memory'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? units[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new UsageError(`${flag} ${JSON.stringify(text)} is not a size; write e.g. 2GiB, 512MiB or 1000000000`);
  const bytes = Math.floor(Number(m[1]) * unit);
  if (bytes <= 0) throw new UsageError(`${flag} must be more than 0 bytes`);
  return bytes;
}

/** A raw value as a source gives it: flags and env give text, a config file may give numbers and lists. */
type Raw = string | number | string[];

/** Where a resolved value came from, for the printout and error messages: `flag --port`, `env MLA_SERVE_PORT`, `file serve.yaml: port`, `default`. */
export type ValueSource = string;

type OptionKey = Exclude<keyof ServeOptions, never>;

interface Field {
  key: OptionKey;
  flag: string;
  env: string;
  /** Repeatable: a flag given several times, a comma-separated env value, a file list. */
  list?: boolean;
  /** Never printed. */
  secret?: boolean;
  /** Converts the winning raw value; `label` names its source in the error message. */
  parse(raw: Raw, label: string): unknown;
  defaultValue: unknown;
}

const textValue = z.union([z.string(), z.number().transform(String)]);
const listValue = z.union([z.array(textValue), textValue.transform((s) => [s])]);

// zod does the checking; the messages stay ours so they name the flag, variable or file key that was wrong.
function intField(min: number, max = Number.MAX_SAFE_INTEGER) {
  const schema = z.union([z.number(), z.string().trim().regex(/^\d+$/).transform(Number)]).pipe(z.number().int().min(min).max(max));
  return (raw: Raw, label: string): number => {
    const r = schema.safeParse(raw);
    if (r.success) return r.data;
    if (typeof raw !== 'object' && Number.isInteger(Number(raw)) && String(raw).trim() !== '' && Number(raw) > max) throw new UsageError(`${label} must be at most ${max}; got ${JSON.stringify(raw)}`);
    throw new UsageError(`${label} must be an integer >= ${min}; got ${JSON.stringify(raw)}`);
  };
}

function listField(raw: Raw, label: string): string[] {
  // A comma-separated env value, a repeated flag, or a file list; empty entries dropped.
  const r = listValue.safeParse(raw);
  if (!r.success) throw new UsageError(`${label} must be a string or a list of strings; got ${JSON.stringify(raw)}`);
  return r.data.flatMap((s) => s.split(',')).map((s) => s.trim()).filter((s) => s.length > 0);
}

function enumField(values: readonly string[]) {
  const schema = z.enum(values as [string, ...string[]]);
  return (raw: Raw, label: string): string => {
    const r = schema.safeParse(typeof raw === 'string' ? raw.trim().toLowerCase() : raw);
    if (!r.success) throw new UsageError(`${label} must be one of ${values.join(', ')}; got ${JSON.stringify(raw)}`);
    return r.data;
  };
}

function textField(what: string) {
  const schema = textValue.pipe(z.string().trim().min(1));
  return (raw: Raw, label: string): string => {
    const r = schema.safeParse(raw);
    if (!r.success) throw new UsageError(`${label} must be ${what}; got ${JSON.stringify(raw)}`);
    return r.data;
  };
}

const FIELDS: Field[] = [
  { key: 'models', flag: 'model', env: 'MLA_SERVE_MODEL', list: true, parse: listField, defaultValue: [] },
  { key: 'names', flag: 'name', env: 'MLA_SERVE_MODEL_NAME', list: true, parse: listField, defaultValue: [] },
  { key: 'synthetic', flag: 'synthetic', env: 'MLA_SERVE_SYNTHETIC', list: true, parse: listField, defaultValue: [] },
  { key: 'host', flag: 'host', env: 'MLA_SERVE_HOST', parse: textField('a host name or address'), defaultValue: '127.0.0.1' },
  { key: 'port', flag: 'port', env: 'MLA_SERVE_PORT', parse: intField(0, 65535), defaultValue: 8000 },
  {
    key: 'kvCacheMemory',
    flag: 'kv-cache-memory',
    env: 'MLA_SERVE_KV_CACHE_MEMORY',
    parse: (raw, label) => (typeof raw === 'number' ? intField(1)(raw, label) : parseByteSize(String(raw), label)),
    defaultValue: 2 * 2 ** 30,
  },
  { key: 'blockSize', flag: 'block-size', env: 'MLA_SERVE_BLOCK_SIZE', parse: intField(1), defaultValue: 16 },
  { key: 'maxNumSeqs', flag: 'max-num-seqs', env: 'MLA_SERVE_MAX_NUM_SEQS', parse: intField(1), defaultValue: 64 },
  { key: 'maxNumBatchedTokens', flag: 'max-num-batched-tokens', env: 'MLA_SERVE_MAX_NUM_BATCHED_TOKENS', parse: intField(1), defaultValue: 2048 },
  { key: 'maxModelLen', flag: 'max-model-len', env: 'MLA_SERVE_MAX_MODEL_LEN', parse: (raw, label) => intField(0)(raw, label) || null, defaultValue: null },
  { key: 'maxQueue', flag: 'max-queue', env: 'MLA_SERVE_MAX_QUEUE', parse: intField(1), defaultValue: 256 },
  { key: 'shutdownTimeout', flag: 'shutdown-timeout', env: 'MLA_SERVE_SHUTDOWN_TIMEOUT', parse: intField(0), defaultValue: 30 },
  { key: 'apiKey', flag: 'api-key', env: 'MLA_SERVE_API_KEY', secret: true, parse: textField('a non-empty key'), defaultValue: null },
  {
    key: 'logLevel',
    flag: 'log-level',
    env: 'MLA_SERVE_LOG_LEVEL',
    parse: (raw, label) => {
      const r = z.enum(LOG_LEVELS).safeParse(typeof raw === 'string' ? raw.trim().toLowerCase() : raw);
      if (!r.success) throw new UsageError(`${label} must be one of ${LOG_LEVELS.join(', ')}; got ${JSON.stringify(raw)}`);
      return r.data;
    },
    defaultValue: 'info',
  },
  { key: 'weightDtype', flag: 'weight-dtype', env: 'MLA_SERVE_WEIGHT_DTYPE', parse: enumField(WEIGHT_DTYPES), defaultValue: 'f16' },
  { key: 'kvCacheDtype', flag: 'kv-cache-dtype', env: 'MLA_SERVE_KV_CACHE_DTYPE', parse: enumField(KV_CACHE_DTYPES), defaultValue: 'f16' },
  { key: 'mlaInt8Attention', flag: 'mla-int8-attention', env: 'MLA_SERVE_MLA_INT8_ATTENTION', parse: enumField(MLA_INT8_ATTENTION), defaultValue: 'auto' },
  { key: 'mlaHeadKernel', flag: 'mla-head-kernel', env: 'MLA_SERVE_MLA_HEAD_KERNEL', parse: enumField(MLA_HEAD_KERNEL), defaultValue: 'auto' },
  { key: 'asyncScheduling', flag: 'async-scheduling', env: 'MLA_SERVE_ASYNC_SCHEDULING', parse: enumField(ON_OFF), defaultValue: 'on' },
  { key: 'stepTrace', flag: 'step-trace', env: 'MLA_SERVE_STEP_TRACE', parse: textField('a file path'), defaultValue: null },
];

/** The environment variable of each flag (README and tests). */
export const SERVE_ENV_VARS: Readonly<Record<string, string>> = Object.fromEntries([['config', 'MLA_SERVE_CONFIG'], ...FIELDS.map((f) => [f.flag, f.env])]);

/** The options and, per option, where its value came from. */
export interface ResolvedServeConfig {
  options: ServeOptions;
  sources: Record<string, ValueSource>;
  /** The config file read, if any. */
  configFile: string | null;
}

/** Reads a JSON or YAML config file (by extension; otherwise JSON, then YAML) into flag-keyed raw values, checked with zod. */
export function readConfigFile(path: string, readFile: (p: string) => string = (p) => readFileSync(p, 'utf8')): Record<string, Raw> {
  let text: string;
  try {
    text = readFile(path);
  } catch (err) {
    throw new UsageError(`cannot read the config file ${path}: ${(err as Error).message}`);
  }
  const ext = extname(path).toLowerCase();
  let data: unknown;
  try {
    data = ext === '.json' ? JSON.parse(text) : parseYaml(text); // YAML 1.2 is a superset of JSON
  } catch (err) {
    throw new UsageError(`the config file ${path} is not valid ${ext === '.json' ? 'JSON' : 'YAML/JSON'}: ${(err as Error).message}`);
  }
  if (data === null || data === undefined) return {};
  const known = new Map(FIELDS.map((f) => [f.flag, f]));
  const shape = z.record(z.string(), z.union([z.string(), z.number(), z.array(z.union([z.string(), z.number()]))]));
  const top = shape.safeParse(data);
  if (!top.success) throw new UsageError(`the config file ${path} must be a mapping of option names to strings, numbers or lists (e.g. port: 8000); ${z.prettifyError(top.error)}`);
  const out: Record<string, Raw> = {};
  for (const [rawKey, value] of Object.entries(top.data)) {
    // kv_cache_memory, kv-cache-memory and kvCacheMemory all name --kv-cache-memory.
    const key = rawKey.replace(/_/g, '-').replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
    const field = known.get(key);
    if (!field) throw new UsageError(`the config file ${path} has an unknown option '${rawKey}'; known: ${[...known.keys()].join(', ')}`);
    if (Array.isArray(value) && !field.list) throw new UsageError(`${rawKey} in the config file ${path} takes one value, not a list`);
    out[key] = Array.isArray(value) ? value.map(String) : value;
  }
  return out;
}

/**
 * Resolves the serve options from flags, then `env` (MLA_SERVE_*), then the config file (--config or
 * MLA_SERVE_CONFIG), then the defaults. Empty environment variables count as unset. Throws UsageError
 * naming the flag, variable or file key of a bad value.
 */
export function resolveServeConfig(argv: string[], env: NodeJS.ProcessEnv = {}, readFile?: (p: string) => string): ResolvedServeConfig | 'help' {
  let parsed;
  try {
    const options: Record<string, { type: 'string' | 'boolean'; multiple?: boolean; short?: string }> = { config: { type: 'string' }, help: { type: 'boolean', short: 'h' } };
    for (const f of FIELDS) options[f.flag] = f.list ? { type: 'string', multiple: true } : { type: 'string' };
    parsed = parseArgs({ args: argv, allowPositionals: false, options });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const flags = parsed.values as Record<string, string | string[] | boolean | undefined>;
  if (flags.help) return 'help';
  const envValue = (name: string): string | undefined => {
    const v = env[name];
    return v === undefined || v.trim() === '' ? undefined : v;
  };

  const configFile = (flags.config as string | undefined) ?? envValue('MLA_SERVE_CONFIG') ?? null;
  const file = configFile === null ? {} : readConfigFile(configFile, readFile);

  const values: Record<string, unknown> = {};
  const sources: Record<string, ValueSource> = {};
  for (const f of FIELDS) {
    const flagRaw = flags[f.flag] as string | string[] | undefined;
    const envRaw = envValue(f.env) ?? (f.key === 'logLevel' ? envValue('LOG_LEVEL') : undefined);
    if (flagRaw !== undefined) {
      values[f.key] = f.parse(flagRaw, `--${f.flag}`);
      sources[f.flag] = `flag --${f.flag}`;
    } else if (envRaw !== undefined) {
      const name = envValue(f.env) !== undefined ? f.env : 'LOG_LEVEL';
      values[f.key] = f.parse(envRaw, `${name} (environment)`);
      sources[f.flag] = `env ${name}`;
    } else if (file[f.flag] !== undefined) {
      values[f.key] = f.parse(file[f.flag], `${f.flag} in the config file ${configFile}`);
      sources[f.flag] = `file ${configFile}`;
    } else {
      values[f.key] = f.defaultValue;
      sources[f.flag] = 'default';
    }
  }
  const options = values as unknown as ServeOptions;
  if (options.names.length > Math.max(options.models.length, 2)) {
    throw new UsageError(`${options.names.length} --name for ${options.models.length || 'the 2 default'} models; give at most one --name per --model`);
  }
  return { options, sources, configFile };
}

/** Flags only (plus `env` when given): the options, or 'help'. */
export function parseServeArgs(argv: string[], env: NodeJS.ProcessEnv = {}): ServeOptions | 'help' {
  const r = resolveServeConfig(argv, env);
  return r === 'help' ? r : r.options;
}

/** The resolved configuration as printed at start: one line per option with its value and source; the API key redacted. */
export function describeConfig(resolved: ResolvedServeConfig): string[] {
  const o = resolved.options as unknown as Record<string, unknown>;
  const show = (f: Field): string => {
    const v = o[f.key];
    if (f.secret) return v == null ? '(none: no authentication)' : '<redacted>';
    if (f.key === 'kvCacheMemory') return `${formatBytes(v as number)} (${v} bytes)`;
    if (f.key === 'models' && (v as string[]).length === 0 && (o.synthetic as string[]).length === 0) return '(default: stories260K + stories260K-mla)';
    if (f.key === 'maxModelLen' && v === null) return "(each model's trained context)";
    if (Array.isArray(v)) return v.length ? v.join(', ') : '(none)';
    return String(v);
  };
  const width = Math.max(...FIELDS.map((f) => f.flag.length));
  const lines = [`mla-serve: configuration (flags > environment > config file${resolved.configFile ? ` ${resolved.configFile}` : ''} > defaults):`];
  for (const f of FIELDS) lines.push(`  ${f.flag.padEnd(width)}  ${show(f)}  [${resolved.sources[f.flag]}]`);
  return lines;
}

export function formatBytes(n: number): string {
  const steps: Array<[number, string]> = [
    [2 ** 30, 'GiB'],
    [2 ** 20, 'MiB'],
    [2 ** 10, 'KiB'],
  ];
  for (const [size, unit] of steps) if (n >= size) return `${(n / size).toFixed(2)} ${unit}`;
  return `${n} B`;
}

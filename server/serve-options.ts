// `mla-serve serve` options: argument parsing, byte sizes, and the KV budget split between hosted models.
import { parseArgs } from 'node:util';

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
  /** null: each model's own trained context. */
  maxModelLen: number | null;
  maxQueue: number;
  /** Seconds running requests get to finish on SIGTERM before they are cancelled. */
  shutdownTimeout: number;
}

export const SERVE_USAGE = `usage: mla-serve serve [options]

Serves models over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
/v1/models, /tokenize, /detokenize, /health, /metrics).

  --model PATH_OR_HF_ID   model to serve; repeat for several (default: stories260K and its
                          MLA conversion stories260K-mla)
  --name NAME             served name of the --model at the same position (default: its directory name)
  --synthetic NAME        also serve a random-weight model with a real configuration under NAME, with a byte-level
                          tokenizer; repeat for several (qwen2.5-7b, qwen2.5-7b-mla, llama-3-8b, llama-2-7b,
                          deepseek-v2-lite-attn, tiny-qwen2, tiny-qwen2-mla); for load tests at real size
  --host HOST             address to listen on (default 127.0.0.1; 0.0.0.0 in containers)
  --port PORT             (default 8000)
  --kv-cache-memory SIZE  KV-cache memory for all models together, e.g. 2GiB, 512MiB (default 2GiB);
                          split evenly between the models
  --block-size N          tokens per KV block (default 16)
  --max-num-seqs N        most sequences in one batched step (default 64)
  --max-model-len N       context length to serve (default: the model's trained context; 0 = same)
  --max-queue N           most waiting requests before 429 (default 256)
  --shutdown-timeout S    seconds running requests may finish on SIGTERM before they are cancelled (default 30)
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

function positiveInt(text: string | undefined, flag: string, fallback: number, allowZero = false): number {
  if (text === undefined) return fallback;
  const v = Number(text);
  if (!Number.isInteger(v) || v < (allowZero ? 0 : 1)) throw new UsageError(`${flag} must be an integer ${allowZero ? '>= 0' : '>= 1'}; got ${JSON.stringify(text)}`);
  return v;
}

export function parseServeArgs(argv: string[]): ServeOptions | 'help' {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: false,
      options: {
        model: { type: 'string', multiple: true },
        name: { type: 'string', multiple: true },
        synthetic: { type: 'string', multiple: true },
        host: { type: 'string' },
        port: { type: 'string' },
        'kv-cache-memory': { type: 'string' },
        'block-size': { type: 'string' },
        'max-num-seqs': { type: 'string' },
        'max-model-len': { type: 'string' },
        'max-queue': { type: 'string' },
        'shutdown-timeout': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const v = parsed.values;
  if (v.help) return 'help';
  const models = v.model ?? [];
  const names = v.name ?? [];
  if (names.length > Math.max(models.length, 2)) throw new UsageError(`${names.length} --name for ${models.length || 'the 2 default'} models; give at most one --name per --model`);
  const port = positiveInt(v.port, '--port', 8000, true);
  if (port > 65535) throw new UsageError(`--port must be at most 65535; got ${port}`);
  const maxModelLen = positiveInt(v['max-model-len'], '--max-model-len', 0, true);
  return {
    models,
    names,
    synthetic: v.synthetic ?? [],
    host: v.host ?? '127.0.0.1',
    port,
    kvCacheMemory: v['kv-cache-memory'] === undefined ? 2 * 2 ** 30 : parseByteSize(v['kv-cache-memory']),
    blockSize: positiveInt(v['block-size'], '--block-size', 16),
    maxNumSeqs: positiveInt(v['max-num-seqs'], '--max-num-seqs', 64),
    maxModelLen: maxModelLen === 0 ? null : maxModelLen,
    maxQueue: positiveInt(v['max-queue'], '--max-queue', 256),
    shutdownTimeout: positiveInt(v['shutdown-timeout'], '--shutdown-timeout', 30, true),
  };
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

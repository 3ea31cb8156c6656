// GGUF v2/v3 reader: metadata, tensor directory, F32/F16/BF16/Q8_0 tensors dequantized to f32 one at a time; llama arch → config, weights, tokenizer.
import { closeSync, fstatSync, openSync } from 'node:fs';
import type { GqaConfig } from './config.ts';
import { bf16BitsToF32, f16BitsToF32, readExactly } from './safetensors.ts';
import { pieceTypeFromNumber, SentencePieceTokenizer } from './sentencepiece.ts';
import type { GqaLayerWeights, ModelWeights, Tensor } from './weights.ts';

export type GgufValue = number | bigint | boolean | string | GgufValue[];

/** GGML tensor types this reader dequantizes, by their GGUF numbers. */
export const GGML_TYPE = { F32: 0, F16: 1, Q8_0: 8, BF16: 30 } as const;

/** Names of GGML types, to say which one a file holds when it is not supported. */
const GGML_TYPE_NAMES: Record<number, string> = {
  0: 'F32', 1: 'F16', 2: 'Q4_0', 3: 'Q4_1', 6: 'Q5_0', 7: 'Q5_1', 8: 'Q8_0', 9: 'Q8_1', 10: 'Q2_K', 11: 'Q3_K',
  12: 'Q4_K', 13: 'Q5_K', 14: 'Q6_K', 15: 'Q8_K', 16: 'IQ2_XXS', 17: 'IQ2_XS', 18: 'IQ3_XXS', 19: 'IQ1_S',
  20: 'IQ4_NL', 21: 'IQ3_S', 22: 'IQ2_S', 23: 'IQ4_XS', 24: 'I8', 25: 'I16', 26: 'I32', 27: 'I64', 28: 'F64',
  29: 'IQ1_M', 30: 'BF16', 34: 'TQ1_0', 35: 'TQ2_0',
};

/** Q8_0: blocks of 32 weights = one f16 scale + 32 int8. */
const Q8_0_BLOCK = 32;
const Q8_0_BYTES = 34;

export interface GgufTensorInfo {
  name: string;
  /** GGUF order: dims[0] is the contiguous (input) dimension. */
  dims: number[];
  type: number;
  /** Absolute byte offset in the file. */
  offset: number;
  byteSize: number;
}

function ggmlTypeName(t: number): string {
  return GGML_TYPE_NAMES[t] ?? `type ${t}`;
}

function tensorBytes(where: string, name: string, type: number, count: number): number {
  switch (type) {
    case GGML_TYPE.F32:
      return count * 4;
    case GGML_TYPE.F16:
    case GGML_TYPE.BF16:
      return count * 2;
    case GGML_TYPE.Q8_0:
      if (count % Q8_0_BLOCK) throw new Error(`${where}: Q8_0 tensor "${name}" has ${count} values, not a multiple of ${Q8_0_BLOCK}`);
      return (count / Q8_0_BLOCK) * Q8_0_BYTES;
    default:
      throw new Error(
        `${where}: tensor "${name}" is ${ggmlTypeName(type)}, which this loader does not dequantize (it reads F32, F16, BF16, Q8_0); ` +
          `re-export the model as F16 or Q8_0 (llama-quantize --allow-requantize … Q8_0)`,
      );
  }
}

/** Sequential reader over a file through a refilled window: headers of any size without loading tensor data. */
class FileCursor {
  private buf = new Uint8Array(0);
  private dv = new DataView(this.buf.buffer);
  private bufStart = 0;
  pos = 0;
  constructor(
    private readonly fd: number,
    readonly size: number,
    private readonly where: string,
  ) {}

  private ensure(n: number, what: string): void {
    if (this.pos + n > this.size) {
      throw new Error(`${this.where}: header truncated or corrupt: reading ${what} needs bytes up to ${this.pos + n}, the file has ${this.size}`);
    }
    if (this.pos >= this.bufStart && this.pos + n <= this.bufStart + this.buf.length) return;
    const len = Math.min(Math.max(n, 1 << 20), this.size - this.pos);
    this.buf = new Uint8Array(len);
    readExactly(this.fd, this.buf, this.pos, this.where);
    this.dv = new DataView(this.buf.buffer);
    this.bufStart = this.pos;
  }
  /** Makes n bytes available and returns their offset in the window; read this.dv only after calling it (it may refill). */
  private at(n: number, what: string): number {
    this.ensure(n, what);
    const o = this.pos - this.bufStart;
    this.pos += n;
    return o;
  }
  u8(what = 'u8'): number {
    const o = this.at(1, what);
    return this.dv.getUint8(o);
  }
  i8(): number {
    const o = this.at(1, 'i8');
    return this.dv.getInt8(o);
  }
  u16(): number {
    const o = this.at(2, 'u16');
    return this.dv.getUint16(o, true);
  }
  i16(): number {
    const o = this.at(2, 'i16');
    return this.dv.getInt16(o, true);
  }
  u32(what = 'u32'): number {
    const o = this.at(4, what);
    return this.dv.getUint32(o, true);
  }
  i32(): number {
    const o = this.at(4, 'i32');
    return this.dv.getInt32(o, true);
  }
  f32(): number {
    const o = this.at(4, 'f32');
    return this.dv.getFloat32(o, true);
  }
  f64(): number {
    const o = this.at(8, 'f64');
    return this.dv.getFloat64(o, true);
  }
  u64big(): bigint {
    const o = this.at(8, 'u64');
    return this.dv.getBigUint64(o, true);
  }
  i64big(): bigint {
    const o = this.at(8, 'i64');
    return this.dv.getBigInt64(o, true);
  }
  /** A u64 that must fit a JS number (counts, lengths, offsets). */
  count(what: string): number {
    const v = this.u64big();
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`${this.where}: ${what} is ${v}, impossibly large: corrupt header`);
    return Number(v);
  }
  string(what: string): string {
    const n = this.count(`length of ${what}`);
    if (this.pos + n > this.size) {
      throw new Error(`${this.where}: ${what} claims ${n} bytes at offset ${this.pos}, past the end of the ${this.size}-byte file (corrupt or truncated)`);
    }
    if (n > 1 << 26) throw new Error(`${this.where}: ${what} claims ${n} bytes: corrupt header`);
    const o = this.at(n, what);
    return new TextDecoder().decode(this.buf.subarray(o, o + n));
  }
}

/** An open GGUF file: metadata and tensor directory parsed, tensors dequantized to f32 on demand. */
export class GgufFile {
  readonly metadata = new Map<string, GgufValue>();
  readonly tensors = new Map<string, GgufTensorInfo>();
  version = 0;
  alignment = 32;
  dataStart = 0;
  private fd: number | null;

  private constructor(
    readonly path: string,
    fd: number,
  ) {
    this.fd = fd;
  }

  static open(path: string): GgufFile {
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (e) {
      throw new Error(`${path}: cannot open GGUF file (${(e as Error).message})`);
    }
    const f = new GgufFile(path, fd);
    try {
      f.parse();
    } catch (e) {
      f.close();
      throw e;
    }
    return f;
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }

  /** A metadata value, or undefined when the key is absent. */
  get(key: string): GgufValue | undefined {
    return this.metadata.get(key);
  }

  /** A numeric metadata value (any integer or float type), with a default, or an error naming the key. */
  num(key: string, fallback?: number): number {
    const v = this.metadata.get(key);
    if (v === undefined) {
      if (fallback !== undefined) return fallback;
      throw new Error(`${this.path}: metadata key "${key}" is missing`);
    }
    if (typeof v === 'bigint') return Number(v);
    if (typeof v !== 'number') throw new Error(`${this.path}: metadata key "${key}" should be a number, is ${JSON.stringify(v)}`);
    return v;
  }

  str(key: string): string | undefined {
    const v = this.metadata.get(key);
    return typeof v === 'string' ? v : undefined;
  }

  /** Reads and dequantizes one tensor; the result is row-major with dims[0] contiguous ([out, in] for matrices). */
  read(name: string): Float32Array {
    if (this.fd === null) throw new Error(`${this.path}: read("${name}") after close()`);
    const info = this.tensors.get(name);
    if (!info) throw new Error(`${this.path}: no tensor named "${name}" (the file has ${this.tensors.size})`);
    const count = info.dims.reduce((a, b) => a * b, 1);
    const out = new Float32Array(count);
    const what = `${this.path} tensor "${name}"`;
    if (info.type === GGML_TYPE.F32) {
      readExactly(this.fd, new Uint8Array(out.buffer), info.offset, what);
      return out;
    }
    // Half and Q8_0 tensors are read in slices so a big tensor never sits in memory twice at full size.
    const perSlice = 1 << 20; // values; a multiple of the Q8_0 block
    for (let start = 0; start < count; start += perSlice) {
      const n = Math.min(perSlice, count - start);
      if (info.type === GGML_TYPE.Q8_0) {
        const bytes = new Uint8Array((n / Q8_0_BLOCK) * Q8_0_BYTES);
        readExactly(this.fd, bytes, info.offset + (start / Q8_0_BLOCK) * Q8_0_BYTES, what);
        dequantizeQ8_0(bytes, out, start);
      } else {
        const bytes = new Uint8Array(n * 2);
        readExactly(this.fd, bytes, info.offset + start * 2, what);
        const dv = new DataView(bytes.buffer);
        const conv = info.type === GGML_TYPE.F16 ? f16BitsToF32 : bf16BitsToF32;
        for (let i = 0; i < n; i++) out[start + i] = conv(dv.getUint16(2 * i, true));
      }
    }
    return out;
  }

  private parse(): void {
    const fd = this.fd!;
    const size = fstatSync(fd).size;
    const where = this.path;
    if (size < 24) throw new Error(`${where}: ${size} bytes is too short for a GGUF file`);
    const c = new FileCursor(fd, size, where);
    const magic = c.u32('magic');
    if (magic !== 0x46554747) {
      const shown = Buffer.alloc(4);
      shown.writeUInt32LE(magic);
      throw new Error(`${where}: bad magic ${JSON.stringify(shown.toString('latin1'))} (0x${magic.toString(16)}), expected "GGUF": not a GGUF file`);
    }
    this.version = c.u32('version');
    if (this.version !== 2 && this.version !== 3) {
      throw new Error(`${where}: GGUF version ${this.version} is not supported (2 or 3); convert the model again with a current llama.cpp`);
    }
    const nTensors = c.count('tensor count');
    const nKv = c.count('metadata count');
    // Every entry takes at least 8 bytes; more entries than bytes means a corrupt count.
    if (nTensors > size / 8 || nKv > size / 8) throw new Error(`${where}: header claims ${nTensors} tensors and ${nKv} metadata entries in ${size} bytes: corrupt`);
    for (let i = 0; i < nKv; i++) {
      const key = c.string(`metadata key ${i}`);
      const type = c.u32(`type of "${key}"`);
      this.metadata.set(key, this.readValue(c, type, key));
    }
    const align = this.metadata.get('general.alignment');
    if (align !== undefined) {
      const a = Number(align);
      if (!Number.isInteger(a) || a <= 0 || a % 8) throw new Error(`${where}: general.alignment ${String(align)} is not a positive multiple of 8`);
      this.alignment = a;
    }
    const infos: Omit<GgufTensorInfo, 'offset' | 'byteSize'>[] = [];
    const rel: number[] = [];
    for (let i = 0; i < nTensors; i++) {
      const name = c.string(`name of tensor ${i}`);
      const nd = c.u32(`dimension count of "${name}"`);
      if (nd < 1 || nd > 4) throw new Error(`${where}: tensor "${name}" has ${nd} dimensions (GGUF allows 1–4): corrupt header`);
      const dims: number[] = [];
      for (let d = 0; d < nd; d++) dims.push(c.count(`dimension ${d} of "${name}"`));
      const type = c.u32(`type of "${name}"`);
      rel.push(c.count(`offset of "${name}"`));
      infos.push({ name, dims, type });
    }
    this.dataStart = Math.ceil(c.pos / this.alignment) * this.alignment;
    infos.forEach((t, i) => {
      const count = t.dims.reduce((a, b) => a * b, 1);
      const byteSize = tensorBytes(where, t.name, t.type, count);
      const offset = this.dataStart + rel[i];
      if (rel[i] % this.alignment) throw new Error(`${where}: tensor "${t.name}" offset ${rel[i]} is not aligned to ${this.alignment}: corrupt header`);
      if (offset + byteSize > size) {
        throw new Error(
          `${where}: tensor "${t.name}" (${ggmlTypeName(t.type)} [${t.dims}]) needs bytes ${offset}–${offset + byteSize} but the file has ${size}: truncated file`,
        );
      }
      if (this.tensors.has(t.name)) throw new Error(`${where}: tensor "${t.name}" appears twice: corrupt header`);
      this.tensors.set(t.name, { ...t, offset, byteSize });
    });
  }

  private readValue(c: FileCursor, type: number, key: string): GgufValue {
    switch (type) {
      case 0:
        return c.u8();
      case 1:
        return c.i8();
      case 2:
        return c.u16();
      case 3:
        return c.i16();
      case 4:
        return c.u32();
      case 5:
        return c.i32();
      case 6:
        return shortestF32(c.f32());
      case 7:
        return c.u8() !== 0;
      case 8:
        return c.string(`value of "${key}"`);
      case 9: {
        const elemType = c.u32(`array type of "${key}"`);
        const n = c.count(`array length of "${key}"`);
        if (n > c.size) throw new Error(`${this.path}: array "${key}" claims ${n} elements in a ${c.size}-byte file: corrupt header`);
        const out: GgufValue[] = new Array(n);
        for (let i = 0; i < n; i++) out[i] = this.readValue(c, elemType, key);
        return out;
      }
      case 10:
        return c.u64big();
      case 11:
        return c.i64big();
      case 12:
        return c.f64();
      default:
        throw new Error(`${this.path}: metadata "${key}" has unknown value type ${type}: corrupt header or newer GGUF`);
    }
  }
}

/**
 * The shortest decimal that rounds to the same f32: the value the writer meant (1e-5 stored as f32 reads back as
 * 9.99999974e-6; this returns 1e-5), so configs from GGUF and from other formats compare equal.
 */
export function shortestF32(x: number): number {
  if (!Number.isFinite(x) || x === 0) return x;
  for (let p = 1; p <= 9; p++) {
    const y = Number(x.toPrecision(p));
    if (Math.fround(y) === x) return y;
  }
  return x;
}

/** Q8_0 blocks → f32: value = int8 · f16 scale. */
export function dequantizeQ8_0(bytes: Uint8Array, out: Float32Array, offset: number): void {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const blocks = bytes.byteLength / Q8_0_BYTES;
  for (let b = 0; b < blocks; b++) {
    const base = b * Q8_0_BYTES;
    const d = f16BitsToF32(dv.getUint16(base, true));
    const o = offset + b * Q8_0_BLOCK;
    for (let i = 0; i < Q8_0_BLOCK; i++) out[o + i] = dv.getInt8(base + 2 + i) * d;
  }
}

// ---- llama architecture ----

export interface GgufModel {
  config: GqaConfig;
  weights: ModelWeights;
  tokenizer: SentencePieceTokenizer;
  chatTemplate?: string;
  /** The metadata context length, before any caller override. */
  metadataContextLength: number;
}

function sameData(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i] && !(Number.isNaN(a[i]) && Number.isNaN(b[i]))) return false;
  return true;
}

/**
 * Loads a GGUF `llama`-architecture model (Llama/Mistral exports; RoPE interleaved, as llama.cpp's converter
 * permutes q/k). The context length is the metadata's `llama.context_length` unless opts.maxSeqLen overrides it:
 * metadata can be larger than the trained length (stories260K says 2048, trained at 512) and the file holds nothing
 * that tells which, so the caller decides. A separate `output.weight` identical to the embedding counts as tied.
 */
export function loadGgufModel(path: string, opts: { maxSeqLen?: number } = {}): GgufModel {
  const f = GgufFile.open(path);
  try {
    return buildLlama(f, opts);
  } finally {
    f.close();
  }
}

function buildLlama(f: GgufFile, opts: { maxSeqLen?: number }): GgufModel {
  const where = f.path;
  const arch = f.str('general.architecture');
  if (arch !== 'llama') {
    throw new Error(`${where}: general.architecture is "${arch}"; this loader reads GGUF "llama" models only (use the Hugging Face safetensors directory for other architectures)`);
  }
  const dim = f.num('llama.embedding_length');
  const nHeads = f.num('llama.attention.head_count');
  const nKvHeads = f.num('llama.attention.head_count_kv', nHeads);
  const headDim = f.num('llama.attention.key_length', dim / nHeads);
  const valueDim = f.num('llama.attention.value_length', headDim);
  const ropeDims = f.num('llama.rope.dimension_count', headDim);
  const nLayers = f.num('llama.block_count');
  const hiddenDim = f.num('llama.feed_forward_length');
  if (!Number.isInteger(headDim) || headDim % 2) throw new Error(`${where}: head dim ${headDim} (embedding ${dim} / ${nHeads} heads) must be an even integer`);
  if (valueDim !== headDim) throw new Error(`${where}: value_length ${valueDim} differs from key_length ${headDim}; not supported`);
  if (ropeDims !== headDim) throw new Error(`${where}: llama.rope.dimension_count ${ropeDims} < head dim ${headDim} (partial RoPE) is not supported`);
  if (nHeads % nKvHeads) throw new Error(`${where}: ${nHeads} query heads are not a multiple of ${nKvHeads} key/value heads`);
  const scaling = f.str('llama.rope.scaling.type');
  if (scaling && scaling !== 'none') throw new Error(`${where}: llama.rope.scaling.type "${scaling}" is not supported (plain RoPE only)`);
  if (f.tensors.has('rope_freqs.weight')) throw new Error(`${where}: rope_freqs.weight (Llama 3.1-style RoPE scaling) is not supported`);
  if (f.num('llama.expert_count', 0) > 0) throw new Error(`${where}: llama.expert_count ${f.num('llama.expert_count')}: mixture-of-experts models are not supported`);

  const tokenizer = ggufTokenizer(f);
  const metadataContextLength = f.num('llama.context_length');
  const vocabSize = f.num('llama.vocab_size', tokenizer.vocabSize);

  const t = (name: string, shape: number[]): Tensor => {
    const info = f.tensors.get(name);
    if (!info) throw new Error(`${where}: tensor "${name}" is missing`);
    const want = [...shape].reverse();
    if (info.dims.length !== want.length || info.dims.some((d, i) => d !== want[i])) {
      throw new Error(`${where}: tensor "${name}" has GGUF dims [${info.dims}], expected [${want}] for a ${nLayers}-layer dim-${dim} model`);
    }
    return { shape, data: f.read(name) };
  };
  const qDim = nHeads * headDim;
  const kvDim = nKvHeads * headDim;
  const tokenEmbedding = t('token_embd.weight', [vocabSize, dim]);
  let output = tokenEmbedding;
  let tied = true;
  if (f.tensors.has('output.weight')) {
    const out = t('output.weight', [vocabSize, dim]);
    if (!sameData(out.data, tokenEmbedding.data)) {
      output = out;
      tied = false;
    }
  }
  const layers: GqaLayerWeights[] = [];
  for (let i = 0; i < nLayers; i++) {
    const p = `blk.${i}.`;
    const layer: GqaLayerWeights = {
      kind: 'gqa',
      attnNorm: t(p + 'attn_norm.weight', [dim]),
      wq: t(p + 'attn_q.weight', [qDim, dim]),
      wk: t(p + 'attn_k.weight', [kvDim, dim]),
      wv: t(p + 'attn_v.weight', [kvDim, dim]),
      wo: t(p + 'attn_output.weight', [dim, qDim]),
      ffnNorm: t(p + 'ffn_norm.weight', [dim]),
      wGate: t(p + 'ffn_gate.weight', [hiddenDim, dim]),
      wUp: t(p + 'ffn_up.weight', [hiddenDim, dim]),
      wDown: t(p + 'ffn_down.weight', [dim, hiddenDim]),
    };
    if (f.tensors.has(p + 'attn_q.bias')) {
      layer.bq = t(p + 'attn_q.bias', [qDim]);
      layer.bk = t(p + 'attn_k.bias', [kvDim]);
      layer.bv = t(p + 'attn_v.bias', [kvDim]);
    }
    if (f.tensors.has(p + 'attn_output.bias')) throw new Error(`${where}: ${p}attn_output.bias: an output-projection bias is not supported`);
    layers.push(layer);
  }
  const config: GqaConfig = {
    arch: 'llama',
    attention: 'gqa',
    dim,
    hiddenDim,
    nLayers,
    nHeads,
    nKvHeads,
    headDim,
    vocabSize,
    maxSeqLen: opts.maxSeqLen ?? metadataContextLength,
    ropeTheta: f.num('llama.rope.freq_base', 10000),
    rmsEps: f.num('llama.attention.layer_norm_rms_epsilon', 1e-5),
    tiedEmbeddings: tied,
    bosId: tokenizer.bosId ?? -1,
    eosId: tokenizer.eosId ?? -1,
    ropeLayout: 'interleaved',
    attentionBias: layers[0]?.bq !== undefined,
  };
  const chatTemplate = f.str('tokenizer.chat_template');
  return {
    config,
    weights: { tokenEmbedding, layers, finalNorm: t('output_norm.weight', [dim]), output },
    tokenizer,
    chatTemplate,
    metadataContextLength,
  };
}

/** The SentencePiece tokenizer embedded in a GGUF (tokenizer.ggml.model "llama"). */
export function ggufTokenizer(f: GgufFile): SentencePieceTokenizer {
  const where = f.path;
  const model = f.str('tokenizer.ggml.model');
  if (model !== 'llama') {
    throw new Error(
      `${where}: tokenizer.ggml.model is ${JSON.stringify(model ?? null)}; only the SentencePiece "llama" tokenizer is supported in GGUF (use the Hugging Face directory with tokenizer.json for byte-level BPE models)`,
    );
  }
  const tokens = f.get('tokenizer.ggml.tokens');
  if (!Array.isArray(tokens) || !tokens.every((t) => typeof t === 'string')) throw new Error(`${where}: tokenizer.ggml.tokens is missing or not a string array`);
  const n = tokens.length;
  const scoresRaw = f.get('tokenizer.ggml.scores');
  const typesRaw = f.get('tokenizer.ggml.token_type');
  const scores = Array.isArray(scoresRaw) ? scoresRaw.map(Number) : new Array<number>(n).fill(0);
  const types = Array.isArray(typesRaw) ? typesRaw.map((v) => pieceTypeFromNumber(Number(v))) : tokens.map(() => 'normal' as const);
  if (scores.length !== n || types.length !== n) {
    throw new Error(`${where}: tokenizer has ${n} tokens but ${scores.length} scores and ${types.length} token types`);
  }
  const id = (key: string, fallback: number | null): number | null => {
    const v = f.get(key);
    if (v === undefined) return fallback;
    const x = Number(v);
    return x >= 0 && x < n ? x : null; // 0xFFFFFFFF means "none"
  };
  const addPrefix = f.get('tokenizer.ggml.add_space_prefix');
  return new SentencePieceTokenizer({
    pieces: tokens as string[],
    scores,
    types,
    bosId: id('tokenizer.ggml.bos_token_id', 1),
    eosId: id('tokenizer.ggml.eos_token_id', 2),
    unkId: id('tokenizer.ggml.unknown_token_id', 0),
    addDummyPrefix: addPrefix === undefined ? true : addPrefix === true,
  });
}

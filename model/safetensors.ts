// safetensors reader (tensor by tensor from a file handle, any of F32/F16/BF16 out as f32) and deterministic writer.
import { closeSync, fstatSync, openSync, readSync, renameSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';

export type SafetensorsDtype = 'F32' | 'F16' | 'BF16';
export type WriteDtype = 'f32' | 'f16' | 'bf16';

const BYTES: Record<SafetensorsDtype, number> = { F32: 4, F16: 2, BF16: 2 };
/** Dtypes the format knows but this loader does not turn into f32, with their widths, to name them in errors. */
const OTHER_DTYPES = new Set(['F64', 'F8_E4M3', 'F8_E5M2', 'I64', 'I32', 'I16', 'I8', 'U64', 'U32', 'U16', 'U8', 'BOOL']);
/** The safetensors format caps the JSON header at 100 MB; a bigger length means a corrupt or foreign file. */
const MAX_HEADER_BYTES = 100_000_000;
/** Conversion and read chunk: bounded memory for half-precision tensors of any size. */
const CHUNK_BYTES = 1 << 24;

// ---- half-precision conversions (round to nearest, ties to even) ----

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);
let f16Table: Float32Array | null = null;

/** f32 → IEEE binary16 bits, round-to-nearest-even; overflow → ±Inf, NaN stays NaN. */
export function f32ToF16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = u32Scratch[0];
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  const mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 112; // rebias 127 → 15
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Subnormal half: value = S · 2^(exp−150) counted in units of 2^−24 is S >> (14 − e).
    const shift = 14 - e;
    if (shift > 24) return sign;
    const s = mant | 0x800000;
    let q = s >>> shift;
    const rem = s & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && q & 1)) q++;
    return sign | q;
  }
  let q = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && q & 1)) q++; // a carry into the exponent is the right answer
  return sign | q;
}

/** f32 → bfloat16 bits, round-to-nearest-even; NaN stays NaN. */
export function f32ToBf16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = u32Scratch[0];
  if ((b & 0x7f800000) === 0x7f800000 && b & 0x7fffff) return ((b >>> 16) | 0x40) & 0xffff;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

function buildF16Table(): Float32Array {
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >>> 10) & 0x1f;
    const mant = h & 0x3ff;
    if (exp === 0) t[h] = sign * mant * 2 ** -24;
    else if (exp === 0x1f) t[h] = mant ? NaN : sign * Infinity;
    else t[h] = sign * (1 + mant / 1024) * 2 ** (exp - 15);
  }
  return t;
}

/** binary16 bits → number. */
export function f16BitsToF32(h: number): number {
  f16Table ??= buildF16Table();
  return f16Table[h & 0xffff];
}

/** bfloat16 bits → number. */
export function bf16BitsToF32(h: number): number {
  u32Scratch[0] = (h & 0xffff) << 16;
  return f32Scratch[0];
}

/** Decodes little-endian F16 / BF16 / F32 bytes into out[offset …]. */
export function decodeFloats(dtype: SafetensorsDtype, bytes: Uint8Array, out: Float32Array, offset: number): void {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = bytes.byteLength / BYTES[dtype];
  if (dtype === 'F32') {
    for (let i = 0; i < n; i++) out[offset + i] = dv.getFloat32(4 * i, true);
  } else if (dtype === 'F16') {
    f16Table ??= buildF16Table();
    const t = f16Table;
    for (let i = 0; i < n; i++) out[offset + i] = t[dv.getUint16(2 * i, true)];
  } else {
    const u = new Uint32Array(n);
    for (let i = 0; i < n; i++) u[i] = dv.getUint16(2 * i, true) << 16;
    out.set(new Float32Array(u.buffer), offset);
  }
}

/** Reads exactly length bytes at position into target (loops: one readSync call moves at most ~2 GiB). */
export function readExactly(fd: number, target: Uint8Array, position: number, what: string): void {
  let done = 0;
  while (done < target.byteLength) {
    const want = Math.min(target.byteLength - done, 1 << 30);
    const got = readSync(fd, target, done, want, position + done);
    if (got === 0) throw new Error(`${what}: file ends after ${position + done} bytes, needed ${position + target.byteLength} (truncated?)`);
    done += got;
  }
}

// ---- reader ----

export interface SafetensorsEntry {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** Absolute byte range in the file. */
  begin: number;
  end: number;
}

/** An open safetensors file: header parsed and checked, tensors read one at a time on demand. */
export class SafetensorsFile {
  readonly entries = new Map<string, SafetensorsEntry>();
  readonly metadata: Record<string, string> = {};
  private fd: number | null;

  private constructor(
    readonly path: string,
    fd: number,
  ) {
    this.fd = fd;
  }

  static open(path: string): SafetensorsFile {
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (e) {
      throw new Error(`${path}: cannot open safetensors file (${(e as Error).message})`);
    }
    const file = new SafetensorsFile(path, fd);
    try {
      file.parseHeader();
    } catch (e) {
      file.close();
      throw e;
    }
    return file;
  }

  get names(): string[] {
    return [...this.entries.keys()];
  }

  has(name: string): boolean {
    return this.entries.has(name);
  }

  entry(name: string): SafetensorsEntry {
    const e = this.entries.get(name);
    if (!e) throw new Error(`${this.path}: no tensor named "${name}" (the file has ${this.entries.size} tensors)`);
    return e;
  }

  /** Reads one tensor as f32 (F16/BF16 widened exactly), in chunks so no second full-size copy is held. */
  read(name: string): Float32Array {
    if (this.fd === null) throw new Error(`${this.path}: read("${name}") after close()`);
    const e = this.entry(name);
    const count = e.shape.reduce((a, b) => a * b, 1);
    const out = new Float32Array(count);
    if (e.dtype === 'F32') {
      // Little-endian hosts (every Node target in practice) take the bytes as they are: no second copy.
      readExactly(this.fd, new Uint8Array(out.buffer), e.begin, `${this.path} tensor "${name}"`);
      return out;
    }
    const width = BYTES[e.dtype];
    const perChunk = Math.floor(CHUNK_BYTES / width);
    const buf = new Uint8Array(Math.min(count, perChunk) * width);
    for (let i = 0; i < count; i += perChunk) {
      const n = Math.min(perChunk, count - i);
      const view = buf.subarray(0, n * width);
      readExactly(this.fd, view, e.begin + i * width, `${this.path} tensor "${name}"`);
      decodeFloats(e.dtype, view, out, i);
    }
    return out;
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }

  private parseHeader(): void {
    const fd = this.fd!;
    const size = fstatSync(fd).size;
    const where = this.path;
    if (size < 8) throw new Error(`${where}: ${size} bytes is too short for a safetensors file (needs an 8-byte header length)`);
    const lenBytes = new Uint8Array(8);
    readExactly(fd, lenBytes, 0, where);
    const headerLen = Number(new DataView(lenBytes.buffer).getBigUint64(0, true));
    if (headerLen > MAX_HEADER_BYTES) {
      throw new Error(`${where}: header length ${headerLen} exceeds the 100 MB safetensors limit: not a safetensors file, or corrupt`);
    }
    if (8 + headerLen > size) {
      throw new Error(`${where}: header says it is ${headerLen} bytes but the file has only ${size} bytes (truncated or not safetensors)`);
    }
    const headerBytes = new Uint8Array(headerLen);
    readExactly(fd, headerBytes, 8, where);
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder().decode(headerBytes));
    } catch (e) {
      throw new Error(`${where}: header is not valid JSON (${(e as Error).message}); the file is corrupt or not safetensors`);
    }
    if (typeof header !== 'object' || header === null || Array.isArray(header)) {
      throw new Error(`${where}: header is not a JSON object; the file is corrupt or not safetensors`);
    }
    const dataStart = 8 + headerLen;
    const dataSize = size - dataStart;
    for (const [name, raw] of Object.entries(header as Record<string, unknown>)) {
      if (name === '__metadata__') {
        if (raw && typeof raw === 'object') {
          for (const [k, v] of Object.entries(raw as Record<string, unknown>)) if (typeof v === 'string') this.metadata[k] = v;
        }
        continue;
      }
      const info = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
      const dtype = info?.dtype;
      if (typeof dtype !== 'string') throw new Error(`${where}: tensor "${name}" has no dtype in the header`);
      if (!(dtype in BYTES)) {
        const known = OTHER_DTYPES.has(dtype) ? 'which this loader does not read' : 'which is not a safetensors dtype';
        throw new Error(`${where}: tensor "${name}" has dtype ${dtype}, ${known} (supported: F32, F16, BF16)`);
      }
      const shape = info.shape;
      if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
        throw new Error(`${where}: tensor "${name}" has a bad shape ${JSON.stringify(shape)}`);
      }
      const offs = info.data_offsets;
      if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((d) => Number.isInteger(d) && d >= 0) || offs[0] > offs[1]) {
        throw new Error(`${where}: tensor "${name}" has bad data_offsets ${JSON.stringify(offs)}`);
      }
      const width = BYTES[dtype as SafetensorsDtype];
      const count = (shape as number[]).reduce((a, b) => a * b, 1);
      const [b, e] = offs as number[];
      if (e - b !== count * width) {
        throw new Error(
          `${where}: header lies about tensor "${name}": shape [${shape}] ${dtype} needs ${count * width} bytes, data_offsets [${b}, ${e}] give ${e - b}`,
        );
      }
      if (e > dataSize) {
        throw new Error(
          `${where}: tensor "${name}" ends at data byte ${e} but the data section has only ${dataSize} bytes (file truncated, or the header lies)`,
        );
      }
      this.entries.set(name, { name, dtype: dtype as SafetensorsDtype, shape: shape as number[], begin: dataStart + b, end: dataStart + e });
    }
  }
}

/** Opens, reads every tensor as f32, closes. For small files and tests; big loaders read tensor by tensor. */
export function readSafetensors(path: string): { tensors: Map<string, { shape: number[]; data: Float32Array }>; metadata: Record<string, string> } {
  const f = SafetensorsFile.open(path);
  try {
    const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const e of f.entries.values()) tensors.set(e.name, { shape: e.shape, data: f.read(e.name) });
    return { tensors, metadata: { ...f.metadata } };
  } finally {
    f.close();
  }
}

// ---- writer ----

export interface TensorToWrite {
  shape: number[];
  data: Float32Array;
}

const DTYPE_NAME: Record<WriteDtype, SafetensorsDtype> = { f32: 'F32', f16: 'F16', bf16: 'BF16' };

function encodeChunk(dtype: WriteDtype, src: Float32Array): Uint8Array {
  if (dtype === 'f32') {
    const out = new Uint8Array(src.length * 4);
    const dv = new DataView(out.buffer);
    for (let i = 0; i < src.length; i++) dv.setFloat32(4 * i, src[i], true);
    return out;
  }
  const out = new Uint8Array(src.length * 2);
  const dv = new DataView(out.buffer);
  const conv = dtype === 'f16' ? f32ToF16Bits : f32ToBf16Bits;
  for (let i = 0; i < src.length; i++) dv.setUint16(2 * i, conv(src[i]), true);
  return out;
}

/** The exact header bytes (length prefix included) a set of tensors gets: names sorted, padded with spaces to 8 bytes. */
function buildHeader(
  tensors: Record<string, TensorToWrite>,
  dtype: WriteDtype,
  metadata: Record<string, string> | undefined,
): { prefix: Uint8Array; names: string[] } {
  const names = Object.keys(tensors).sort();
  const width = BYTES[DTYPE_NAME[dtype]];
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) {
    const sorted: Record<string, string> = {};
    for (const k of Object.keys(metadata).sort()) sorted[k] = String(metadata[k]);
    header.__metadata__ = sorted;
  }
  let offset = 0;
  for (const name of names) {
    const t = tensors[name];
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length) throw new Error(`writeSafetensors: tensor "${name}" has ${t.data.length} values but shape [${t.shape}] needs ${count}`);
    header[name] = { dtype: DTYPE_NAME[dtype], shape: t.shape, data_offsets: [offset, offset + count * width] };
    offset += count * width;
  }
  let json = JSON.stringify(header);
  // Pad so the data section starts 8-byte aligned, as the reference implementation does.
  const jsonBytes = new TextEncoder().encode(json).byteLength;
  json += ' '.repeat((8 - ((8 + jsonBytes) % 8)) % 8);
  const body = new TextEncoder().encode(json);
  const prefix = new Uint8Array(8 + body.byteLength);
  new DataView(prefix.buffer).setBigUint64(0, BigInt(body.byteLength), true);
  prefix.set(body, 8);
  return { prefix, names };
}

/**
 * Writes tensors to a safetensors file in dtype (round-to-nearest-even for f16/bf16). Deterministic: names sorted,
 * metadata keys sorted, header space-padded to 8 bytes, so writing the same tensors twice gives identical bytes.
 * Synchronous; writes to `path + '.tmp'` and renames, so a crash never leaves a half file under the real name.
 */
export function writeSafetensors(
  path: string,
  tensors: Record<string, TensorToWrite>,
  dtype: WriteDtype,
  metadata?: Record<string, string>,
): void {
  const { prefix, names } = buildHeader(tensors, dtype, metadata);
  const tmp = path + '.tmp';
  const fd = openSync(tmp, 'w');
  try {
    writeAll(fd, prefix);
    const perChunk = CHUNK_BYTES / 4;
    for (const name of names) {
      const data = tensors[name].data;
      for (let i = 0; i < data.length; i += perChunk) writeAll(fd, encodeChunk(dtype, data.subarray(i, i + perChunk)));
    }
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
}

function writeAll(fd: number, bytes: Uint8Array): void {
  let done = 0;
  while (done < bytes.byteLength) done += writeSync(fd, bytes, done, bytes.byteLength - done);
}

/**
 * Writes tensors as Hugging Face shards (`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`) of at most
 * maxShardBytes each (a single larger tensor gets a shard of its own), or one `model.safetensors` when everything fits.
 * Returns the file names written. Deterministic like writeSafetensors.
 */
export function writeSafetensorsShards(
  dir: string,
  tensors: Record<string, TensorToWrite>,
  dtype: WriteDtype,
  opts: { maxShardBytes?: number; metadata?: Record<string, string> } = {},
): string[] {
  const maxShard = opts.maxShardBytes ?? 5 * 1024 ** 3;
  const width = BYTES[DTYPE_NAME[dtype]];
  const names = Object.keys(tensors).sort();
  const shards: string[][] = [];
  let current: string[] = [];
  let currentBytes = 0;
  let total = 0;
  for (const name of names) {
    const bytes = tensors[name].data.length * width;
    total += bytes;
    if (current.length && currentBytes + bytes > maxShard) {
      shards.push(current);
      current = [];
      currentBytes = 0;
    }
    current.push(name);
    currentBytes += bytes;
  }
  if (current.length) shards.push(current);
  if (shards.length <= 1) {
    writeSafetensors(join(dir, 'model.safetensors'), tensors, dtype, opts.metadata);
    return ['model.safetensors'];
  }
  const files: string[] = [];
  const weightMap: Record<string, string> = {};
  shards.forEach((shardNames, i) => {
    const file = `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`;
    const part: Record<string, TensorToWrite> = {};
    for (const n of shardNames) {
      part[n] = tensors[n];
      weightMap[n] = file;
    }
    writeSafetensors(join(dir, file), part, dtype, opts.metadata);
    files.push(file);
  });
  const index = { metadata: { total_size: total }, weight_map: weightMap };
  const indexPath = join(dir, 'model.safetensors.index.json');
  const fd = openSync(indexPath, 'w');
  try {
    writeAll(fd, new TextEncoder().encode(JSON.stringify(index, null, 2) + '\n'));
  } finally {
    closeSync(fd);
  }
  files.push(basename(indexPath));
  return files;
}

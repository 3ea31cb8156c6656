// SentencePiece BPE tokenizer (scores, byte fallback, dummy-prefix rules) from GGUF vocabularies, llama2.c tok*.bin and tokenizer.model.
import { readFileSync } from 'node:fs';
import type { Tokenizer } from './tokenizer.ts';

/** SentencePiece piece types (the protobuf enum and GGUF token_type use the same numbers 1…6). */
export type PieceType = 'normal' | 'unknown' | 'control' | 'user' | 'unused' | 'byte';
const PIECE_TYPES: PieceType[] = ['normal', 'normal', 'unknown', 'control', 'user', 'unused', 'byte'];

export function pieceTypeFromNumber(n: number): PieceType {
  return PIECE_TYPES[n] ?? 'normal';
}

/** The word-boundary marker SentencePiece puts where the text had a space. */
export const SPACE_MARK = '\u2581';

export interface SentencePieceVocab {
  /** Pieces as SentencePiece writes them (spaces as ▁, bytes as <0xAB>). */
  pieces: string[];
  scores: ArrayLike<number>;
  types: PieceType[];
  bosId: number | null;
  eosId: number | null;
  unkId: number | null;
  /** Prepend ▁ to non-empty input (and strip it again when decoding): SentencePiece add_dummy_prefix. */
  addDummyPrefix?: boolean;
  /** Collapse runs of spaces and trim (SentencePiece remove_extra_whitespaces; off for llama-family models). */
  removeExtraWhitespaces?: boolean;
}

const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/;

/** Min-heap entry of the merge agenda: best score first, then leftmost. */
interface Candidate {
  left: number;
  right: number;
  score: number;
  id: number;
  leftLen: number;
  rightLen: number;
}

function better(a: Candidate, b: Candidate): boolean {
  return a.score > b.score || (a.score === b.score && a.left < b.left);
}

class Agenda {
  private items: Candidate[] = [];
  get size(): number {
    return this.items.length;
  }
  push(c: Candidate): void {
    const h = this.items;
    h.push(c);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!better(h[i], h[p])) break;
      [h[i], h[p]] = [h[p], h[i]];
      i = p;
    }
  }
  pop(): Candidate {
    const h = this.items;
    const top = h[0];
    const last = h.pop()!;
    if (h.length) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && better(h[l], h[m])) m = l;
        if (r < h.length && better(h[r], h[m])) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
    return top;
  }
}

/**
 * SentencePiece BPE as llama2.c and llama.cpp run it: the text (spaces → ▁, a leading ▁ added) is split into
 * characters; characters missing from the vocabulary become byte-fallback tokens; then the adjacent pair whose
 * concatenation is a piece with the highest score is merged, leftmost first on ties, until no pair is a piece.
 */
export class SentencePieceTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number | null;
  readonly unkId: number | null;
  readonly addDummyPrefix: boolean;
  readonly removeExtraWhitespaces: boolean;
  private readonly pieces: string[];
  private readonly scores: Float64Array;
  private readonly types: PieceType[];
  /** Mergeable pieces (normal and user-defined) → id. */
  private readonly pieceToId = new Map<string, number>();
  /** byte value → its <0xAB> token id, or -1. */
  private readonly byteToId = new Int32Array(256).fill(-1);
  /** token id → byte value for byte pieces, else -1. */
  private readonly idToByte: Int16Array;
  private readonly encoder = new TextEncoder();

  constructor(vocab: SentencePieceVocab) {
    const n = vocab.pieces.length;
    if (vocab.scores.length !== n || vocab.types.length !== n) {
      throw new Error(`SentencePiece vocabulary: ${n} pieces but ${vocab.scores.length} scores and ${vocab.types.length} types`);
    }
    this.vocabSize = n;
    this.pieces = vocab.pieces;
    this.scores = Float64Array.from(vocab.scores);
    this.types = vocab.types;
    this.bosId = vocab.bosId;
    this.eosId = vocab.eosId;
    this.unkId = vocab.unkId;
    this.addDummyPrefix = vocab.addDummyPrefix ?? true;
    this.removeExtraWhitespaces = vocab.removeExtraWhitespaces ?? false;
    this.idToByte = new Int16Array(n).fill(-1);
    for (let id = 0; id < n; id++) {
      const t = this.types[id];
      const p = this.pieces[id];
      if (t === 'byte') {
        const m = BYTE_PIECE.exec(p);
        if (!m) throw new Error(`SentencePiece vocabulary: byte piece ${id} is "${p}", expected <0xAB>`);
        const b = parseInt(m[1], 16);
        this.byteToId[b] = id;
        this.idToByte[id] = b;
      } else if (t === 'normal' || t === 'user') {
        // First occurrence wins, as in sentencepiece's own piece table.
        if (!this.pieceToId.has(p)) this.pieceToId.set(p, id);
      }
    }
  }

  encode(text: string): number[] {
    if (this.removeExtraWhitespaces) text = text.replace(/ +/g, ' ').replace(/^ | $/g, '');
    if (text.length === 0) return [];
    let normalized = text.replaceAll(' ', SPACE_MARK);
    if (this.addDummyPrefix) normalized = SPACE_MARK + normalized;

    // Symbols: one per code point, or one per UTF-8 byte for code points the vocabulary lacks.
    const sym: string[] = [];
    const ids: number[] = [];
    const mergeable: boolean[] = [];
    for (const ch of normalized) {
      const id = this.pieceToId.get(ch);
      if (id !== undefined) {
        sym.push(ch);
        ids.push(id);
        mergeable.push(true);
        continue;
      }
      const bytes = this.encoder.encode(ch);
      const allBytes = Array.from(bytes, (b) => this.byteToId[b]);
      if (allBytes.every((b) => b >= 0)) {
        for (const b of allBytes) {
          sym.push('');
          ids.push(b);
          mergeable.push(false);
        }
      } else {
        sym.push('');
        ids.push(this.unkId ?? 0);
        mergeable.push(false);
      }
    }

    const count = sym.length;
    const prev = new Int32Array(count);
    const next = new Int32Array(count);
    for (let i = 0; i < count; i++) {
      prev[i] = i - 1;
      next[i] = i + 1 < count ? i + 1 : -1;
    }
    const agenda = new Agenda();
    const consider = (l: number, r: number): void => {
      if (l < 0 || r < 0 || !mergeable[l] || !mergeable[r]) return;
      const id = this.pieceToId.get(sym[l] + sym[r]);
      if (id === undefined) return;
      agenda.push({ left: l, right: r, score: this.scores[id], id, leftLen: sym[l].length, rightLen: sym[r].length });
    };
    for (let i = 0; i + 1 < count; i++) consider(i, i + 1);
    while (agenda.size) {
      const c = agenda.pop();
      // Stale entries: a side was merged away or changed since this pair was queued.
      if (sym[c.left].length !== c.leftLen || sym[c.right].length !== c.rightLen || next[c.left] !== c.right) continue;
      if (sym[c.left] === '' || sym[c.right] === '') continue;
      sym[c.left] = sym[c.left] + sym[c.right];
      ids[c.left] = c.id;
      sym[c.right] = '';
      const after = next[c.right];
      next[c.left] = after;
      if (after >= 0) prev[after] = c.left;
      next[c.right] = -2; // dead
      consider(prev[c.left], c.left);
      consider(c.left, after);
    }
    const out: number[] = [];
    for (let i = count > 0 ? 0 : -1; i >= 0; i = next[i]) out.push(ids[i]);
    return out;
  }

  decode(ids: number[]): string {
    return decodeUtf8DroppingTail(this.decodeBytes(ids));
  }

  /** Like decode, but an unfinished UTF-8 sequence at the end shows as U+FFFD (what streaming needs to see). */
  decodeForStreaming(ids: number[]): string {
    return new TextDecoder('utf-8', { fatal: false, ignoreBOM: true }).decode(this.decodeBytes(ids));
  }

  /** The UTF-8 bytes of ids: control tokens skipped, ▁ → space, the dummy-prefix space of the first piece removed. */
  decodeBytes(ids: number[]): Uint8Array {
    const bytes: number[] = [];
    let first = true;
    for (const id of ids) {
      // Ids past the vocabulary (padded model vocabularies) and control tokens have no text.
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) continue;
      const t = this.types[id];
      if (t === 'control' || t === 'unused') continue;
      if (t === 'byte') {
        bytes.push(this.idToByte[id]);
        first = false;
        continue;
      }
      let piece = t === 'unknown' ? ' \u2047 ' : this.pieces[id];
      if (first && this.addDummyPrefix && piece.startsWith(SPACE_MARK)) piece = piece.slice(1);
      first = false;
      for (const b of this.encoder.encode(piece.replaceAll(SPACE_MARK, ' '))) bytes.push(b);
    }
    return Uint8Array.from(bytes);
  }

  idToToken(id: number): string {
    if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) return '';
    return this.pieces[id];
  }

  /** Piece type of an id (control tokens have no surface text). */
  pieceType(id: number): PieceType {
    return this.types[id];
  }

  /** The vocabulary as loaded (a copy), e.g. for the converter to write it back as tokenizer.model. */
  vocabulary(): SentencePieceVocab {
    return {
      pieces: [...this.pieces],
      scores: Float64Array.from(this.scores),
      types: [...this.types],
      bosId: this.bosId,
      eosId: this.eosId,
      unkId: this.unkId,
      addDummyPrefix: this.addDummyPrefix,
      removeExtraWhitespaces: this.removeExtraWhitespaces,
    };
  }
}

/** Length of the longest prefix of bytes that does not end inside an unfinished UTF-8 sequence. */
export function completeUtf8Length(bytes: Uint8Array): number {
  const n = bytes.length;
  for (let back = 1; back <= Math.min(4, n); back++) {
    const b = bytes[n - back];
    if ((b & 0xc0) === 0x80) continue; // continuation byte: keep looking for its lead
    const need = b >= 0xf0 && b < 0xf8 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
    return back < need ? n - back : n;
  }
  return n;
}

/** UTF-8 → string; an unfinished sequence at the end is dropped (it may be completed by the next token). */
export function decodeUtf8DroppingTail(bytes: Uint8Array): string {
  return new TextDecoder('utf-8', { fatal: false, ignoreBOM: true }).decode(bytes.subarray(0, completeUtf8Length(bytes)));
}

/**
 * llama2.c tokenizer (tokenizer.bin / tok512.bin): int32 max_token_length, then per token f32 score, int32 length,
 * bytes. Ids 0/1/2 are unk/bos/eos; pieces <0xAB> are byte fallback; the exporter wrote ▁ as a space and bos/eos as
 * "\n<s>\n" / "\n</s>\n", which this undoes.
 */
export function loadLlama2cTokenizer(path: string, expectedVocab?: number): SentencePieceTokenizer {
  let buf: Buffer;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new Error(`${path}: cannot read llama2.c tokenizer (${(e as Error).message})`);
  }
  if (buf.length < 4) throw new Error(`${path}: ${buf.length} bytes is too short for a llama2.c tokenizer`);
  const maxLen = buf.readInt32LE(0);
  if (maxLen <= 0 || maxLen > 1 << 16) throw new Error(`${path}: max_token_length ${maxLen} is implausible; not a llama2.c tokenizer file`);
  const pieces: string[] = [];
  const scores: number[] = [];
  let o = 4;
  const utf8 = new TextDecoder('utf-8', { fatal: false });
  while (o < buf.length && (expectedVocab === undefined || pieces.length < expectedVocab)) {
    if (o + 8 > buf.length) throw new Error(`${path}: truncated inside token ${pieces.length} (at byte ${o} of ${buf.length})`);
    const score = buf.readFloatLE(o);
    const len = buf.readInt32LE(o + 4);
    o += 8;
    if (len < 0 || len > maxLen || o + len > buf.length) {
      throw new Error(`${path}: token ${pieces.length} claims ${len} bytes (max_token_length ${maxLen}, ${buf.length - o} bytes left): corrupt file`);
    }
    pieces.push(utf8.decode(buf.subarray(o, o + len)));
    scores.push(score);
    o += len;
  }
  if (expectedVocab !== undefined && pieces.length !== expectedVocab) {
    throw new Error(`${path}: holds ${pieces.length} tokens but the model's vocabulary is ${expectedVocab}; use the tokenizer the model was trained with`);
  }
  const types: PieceType[] = pieces.map((p, id) => {
    if (id === 0) return 'unknown';
    if (id === 1 || id === 2) return 'control';
    return BYTE_PIECE.test(p) ? 'byte' : 'normal';
  });
  const norm = pieces.map((p, id) => (types[id] === 'control' || types[id] === 'unknown' ? p.trim() : p.replaceAll(' ', SPACE_MARK)));
  return new SentencePieceTokenizer({ pieces: norm, scores, types, bosId: 1, eosId: 2, unkId: 0, addDummyPrefix: true });
}

// ---- tokenizer.model (SentencePiece ModelProto, protobuf) ----

class ProtoReader {
  o = 0;
  constructor(
    readonly buf: Uint8Array,
    readonly where: string,
  ) {}
  get done(): boolean {
    return this.o >= this.buf.length;
  }
  varint(): number {
    let result = 0;
    let mul = 1;
    for (let i = 0; i < 10; i++) {
      if (this.o >= this.buf.length) throw new Error(`${this.where}: protobuf varint runs past the end (corrupt tokenizer.model)`);
      const b = this.buf[this.o++];
      result += (b & 0x7f) * mul;
      if (!(b & 0x80)) return result;
      mul *= 128;
    }
    throw new Error(`${this.where}: protobuf varint longer than 10 bytes (corrupt tokenizer.model)`);
  }
  bytes(): Uint8Array {
    const n = this.varint();
    if (this.o + n > this.buf.length) throw new Error(`${this.where}: protobuf field of ${n} bytes runs past the end (truncated tokenizer.model)`);
    const b = this.buf.subarray(this.o, this.o + n);
    this.o += n;
    return b;
  }
  skip(wire: number): void {
    if (wire === 0) this.varint();
    else if (wire === 1) this.o += 8;
    else if (wire === 2) this.bytes();
    else if (wire === 5) this.o += 4;
    else throw new Error(`${this.where}: protobuf wire type ${wire} is not used by SentencePiece (corrupt tokenizer.model)`);
  }
}

/** Reads a SentencePiece `tokenizer.model` (BPE models only: unigram needs a Viterbi search this project does not have). */
export function loadSentencePieceModel(path: string): SentencePieceTokenizer {
  let buf: Buffer;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new Error(`${path}: cannot read SentencePiece model (${(e as Error).message})`);
  }
  const pieces: string[] = [];
  const scores: number[] = [];
  const types: PieceType[] = [];
  let modelType = 1; // proto default: UNIGRAM
  let addDummyPrefix = true;
  let removeExtraWhitespaces = true;
  const ids = { unk: 0, bos: 1, eos: 2 };
  const utf8 = new TextDecoder();
  const top = new ProtoReader(buf, path);
  while (!top.done) {
    const key = top.varint();
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire !== 2) {
      top.skip(wire);
      continue;
    }
    const body = new ProtoReader(top.bytes(), path);
    if (field === 1) {
      let piece = '';
      let score = 0;
      let type = 1;
      while (!body.done) {
        const k = body.varint();
        const f = Math.floor(k / 8);
        const w = k & 7;
        if (f === 1 && w === 2) piece = utf8.decode(body.bytes());
        else if (f === 2 && w === 5) {
          score = new DataView(body.buf.buffer, body.buf.byteOffset + body.o, 4).getFloat32(0, true);
          body.o += 4;
        } else if (f === 3 && w === 0) type = body.varint();
        else body.skip(w);
      }
      pieces.push(piece);
      scores.push(score);
      types.push(pieceTypeFromNumber(type));
    } else if (field === 2) {
      while (!body.done) {
        const k = body.varint();
        const f = Math.floor(k / 8);
        const w = k & 7;
        if (w === 0 && f === 3) modelType = body.varint();
        else if (w === 0 && f === 40) ids.unk = signed32(body.varint());
        else if (w === 0 && f === 41) ids.bos = signed32(body.varint());
        else if (w === 0 && f === 42) ids.eos = signed32(body.varint());
        else body.skip(w);
      }
    } else if (field === 3) {
      while (!body.done) {
        const k = body.varint();
        const f = Math.floor(k / 8);
        const w = k & 7;
        if (w === 0 && f === 3) addDummyPrefix = body.varint() !== 0;
        else if (w === 0 && f === 4) removeExtraWhitespaces = body.varint() !== 0;
        else body.skip(w);
      }
    }
  }
  if (pieces.length === 0) throw new Error(`${path}: no pieces found; not a SentencePiece model`);
  if (modelType !== 2) {
    const name = ['', 'UNIGRAM', 'BPE', 'WORD', 'CHAR'][modelType] ?? String(modelType);
    throw new Error(`${path}: SentencePiece model type ${name} is not supported (only BPE); provide a tokenizer.json instead`);
  }
  const valid = (id: number): number | null => (id >= 0 && id < pieces.length ? id : null);
  return new SentencePieceTokenizer({
    pieces,
    scores,
    types,
    bosId: valid(ids.bos),
    eosId: valid(ids.eos),
    unkId: valid(ids.unk),
    addDummyPrefix,
    removeExtraWhitespaces,
  });
}

/** Protobuf int32: negatives arrive as 64-bit two's complement; SentencePiece only ever uses -1 ("none"). */
function signed32(v: number): number {
  return v > 0x7fffffff ? -1 : v;
}

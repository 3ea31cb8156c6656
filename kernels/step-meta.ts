// The per-step metadata buffer every kernel of a step reads: rows, positions, sequences, block tables, logit rows.
//
// One Uint32Array, uploaded with one writeBuffer per step. Layout (u32 indices):
//   header [0..HEADER_WORDS): see META_* below
//   tokens[nRows]        token id of each row
//   rowPos[nRows]        absolute position of each row in its sequence
//   rowSeq[nRows]        sequence index of each row
//   seqs[nSeqs * 4]      rowStart, nRows, ctxLen (tokens cached after this step), blockTable offset (absolute u32 index)
//   logitRows[nLogit]    row index of each row whose logits are computed: the full rows ('all', 'last') first, in
//                        sequence order, then the pick rows ('argmax', 'sample': only their token comes back)
//   blockTables          all sequences' block ids, concatenated

export const META_ROWS = 0;
export const META_SEQS = 1;
export const META_LOGIT_ROWS = 2;
/** Context tokens per attention split (flash-decoding chunk). */
export const META_CHUNK = 3;
/** Chunks per row in the partials buffer (its stride). */
export const META_MAX_CHUNKS = 4;
export const META_OFF_TOKENS = 5;
export const META_OFF_POS = 6;
export const META_OFF_ROW_SEQ = 7;
export const META_OFF_SEQS = 8;
export const META_OFF_LOGIT_ROWS = 9;
/** Full logits rows (the pick rows follow them in the logits buffer). */
export const META_FULL_LOGIT_ROWS = 10;
export const HEADER_WORDS = 16;

/** What a step needs to know of one sequence (engine/types.ts StepSequence has this shape). */
export interface StepSeqInput {
  tokens: number[];
  startPos: number;
  blockTable: number[];
  logits: 'none' | 'last' | 'all' | 'argmax' | 'sample';
}

export interface StepMeta {
  data: Uint32Array;
  nRows: number;
  nSeqs: number;
  /** Logits rows computed: nFullLogitRows full rows, then one per pick ('argmax', 'sample') sequence. */
  nLogitRows: number;
  nFullLogitRows: number;
  chunkSize: number;
  maxChunks: number;
  /** Largest context length of any row (its position + 1). */
  maxCtx: number;
  /** Sum over rows of their context lengths (attention work). */
  sumCtx: number;
  rowPos: number[];
}

export interface MetaOptions {
  blockSize: number;
  numBlocks: number;
  /** Context tokens per attention split, a power of two ≤ maxChunkSize; chosen from the work when absent. */
  chunkSize?: number;
  /** Largest chunk the attention kernel's workgroup memory holds. */
  maxChunkSize: number;
  /** Workgroups the split should aim for (enough to fill the GPU). */
  targetWorkgroups?: number;
  /** Smallest chunk the split may choose (default 16): a kernel whose partials are large against a chunk's cache reads wants more. */
  minChunkSize?: number;
  nKvHeads: number;
}

/** Chunk size for the split-K attention: small enough to give ~targetWorkgroups workgroups, ≥ minChunk (16) tokens. */
export function chooseChunkSize(sumCtx: number, nKvHeads: number, maxChunk: number, target: number, minChunk = 16): number {
  const want = Math.ceil((sumCtx * nKvHeads) / target);
  let c = minChunk;
  while (c < want && c < maxChunk) c *= 2;
  return Math.min(c, maxChunk);
}

/** Builds the metadata of one step; validates block tables against the pool. */
export function buildStepMeta(seqs: StepSeqInput[], opts: MetaOptions): StepMeta {
  let nRows = 0;
  let nLogit = 0;
  let nPicks = 0;
  let btWords = 0;
  for (const [i, s] of seqs.entries()) {
    if (s.tokens.length === 0) throw new Error(`step: sequence ${i} has no tokens`);
    const ctx = s.startPos + s.tokens.length;
    const need = Math.ceil(ctx / opts.blockSize);
    if (s.blockTable.length < need) {
      throw new Error(
        `step: sequence ${i} reaches position ${ctx - 1} and needs ${need} blocks of ${opts.blockSize}, its block table has ${s.blockTable.length}`,
      );
    }
    for (let b = 0; b < need; b++) {
      const id = s.blockTable[b];
      if (!Number.isInteger(id) || id < 0 || id >= opts.numBlocks) {
        throw new Error(`step: sequence ${i} block table entry ${b} is ${id}, the pool has blocks 0..${opts.numBlocks - 1}`);
      }
    }
    nRows += s.tokens.length;
    nLogit += s.logits === 'all' ? s.tokens.length : s.logits === 'none' ? 0 : 1;
    if (s.logits === 'argmax' || s.logits === 'sample') nPicks++;
    btWords += need;
  }
  const offTokens = HEADER_WORDS;
  const offPos = offTokens + nRows;
  const offRowSeq = offPos + nRows;
  const offSeqs = offRowSeq + nRows;
  const offLogit = offSeqs + seqs.length * 4;
  const offBt = offLogit + nLogit;
  const data = new Uint32Array(offBt + btWords);
  let row = 0;
  let li = 0;
  let ai = 0;
  let bt = offBt;
  let maxCtx = 0;
  let sumCtx = 0;
  const rowPos: number[] = [];
  for (const [i, s] of seqs.entries()) {
    const need = Math.ceil((s.startPos + s.tokens.length) / opts.blockSize);
    data[offSeqs + 4 * i] = row;
    data[offSeqs + 4 * i + 1] = s.tokens.length;
    data[offSeqs + 4 * i + 2] = s.startPos + s.tokens.length;
    data[offSeqs + 4 * i + 3] = bt;
    for (let b = 0; b < need; b++) data[bt++] = s.blockTable[b];
    for (let t = 0; t < s.tokens.length; t++) {
      data[offTokens + row] = s.tokens[t];
      data[offPos + row] = s.startPos + t;
      data[offRowSeq + row] = i;
      rowPos.push(s.startPos + t);
      const ctx = s.startPos + t + 1;
      maxCtx = Math.max(maxCtx, ctx);
      sumCtx += ctx;
      if (s.logits === 'all' || (s.logits === 'last' && t === s.tokens.length - 1)) data[offLogit + li++] = row;
      if ((s.logits === 'argmax' || s.logits === 'sample') && t === s.tokens.length - 1) data[offLogit + nLogit - nPicks + ai++] = row;
      row++;
    }
  }
  const chunkSize =
    opts.chunkSize ?? chooseChunkSize(sumCtx, opts.nKvHeads, opts.maxChunkSize, opts.targetWorkgroups ?? 512, opts.minChunkSize);
  if (chunkSize > opts.maxChunkSize) throw new Error(`attention chunk ${chunkSize} exceeds the kernel's maximum of ${opts.maxChunkSize}`);
  const maxChunks = Math.max(1, Math.ceil(maxCtx / chunkSize));
  data[META_ROWS] = nRows;
  data[META_SEQS] = seqs.length;
  data[META_LOGIT_ROWS] = nLogit;
  data[META_CHUNK] = chunkSize;
  data[META_MAX_CHUNKS] = maxChunks;
  data[META_OFF_TOKENS] = offTokens;
  data[META_OFF_POS] = offPos;
  data[META_OFF_ROW_SEQ] = offRowSeq;
  data[META_OFF_SEQS] = offSeqs;
  data[META_OFF_LOGIT_ROWS] = offLogit;
  data[META_FULL_LOGIT_ROWS] = nLogit - nPicks;
  return { data, nRows, nSeqs: seqs.length, nLogitRows: nLogit, nFullLogitRows: nLogit - nPicks, chunkSize, maxChunks, maxCtx, sumCtx, rowPos };
}

/** WGSL declarations shared by kernels that read the step metadata (binding `binding` of group 0). */
export function metaWgsl(binding: number): string {
  return /* wgsl */ `
@group(0) @binding(${binding}) var<storage, read> stepMeta: array<u32>;
fn metaRows() -> u32 { return stepMeta[${META_ROWS}]; }
fn metaLogitRows() -> u32 { return stepMeta[${META_LOGIT_ROWS}]; }
fn rowToken(r: u32) -> u32 { return stepMeta[stepMeta[${META_OFF_TOKENS}] + r]; }
fn rowPos(r: u32) -> u32 { return stepMeta[stepMeta[${META_OFF_POS}] + r]; }
fn rowSeq(r: u32) -> u32 { return stepMeta[stepMeta[${META_OFF_ROW_SEQ}] + r]; }
fn seqBlockTable(s: u32) -> u32 { return stepMeta[stepMeta[${META_OFF_SEQS}] + 4u * s + 3u]; }
fn logitRow(i: u32) -> u32 { return stepMeta[stepMeta[${META_OFF_LOGIT_ROWS}] + i]; }
/** Context tokens [x, y) of split chunk c of row r (x == y: the row's context ends before it). */
fn chunkSpan(r: u32, c: u32) -> vec2<u32> {
  let chunk = stepMeta[${META_CHUNK}];
  let ctx = rowPos(r) + 1u;
  let start = c * chunk;
  return vec2<u32>(start, select(start, min(start + chunk, ctx), start < ctx));
}
`;
}

/**
 * WGSL opening a split-K attention workgroup of (row r, chunk c): the chunk's token span `bnd` (read through the
 * workgroup variable `bounds: vec2<u32>`, so uniform), a return when the chunk lies past the row's context, and the
 * sequence's block table offset `bt`. Needs `lid`, `r`, `c`, `bounds` and metaWgsl's functions in scope.
 */
export const CHUNK_START_WGSL = `if (lid == 0u) { bounds = chunkSpan(r, c); }
  let bnd = workgroupUniformLoad(&bounds);
  if (bnd.y <= bnd.x) { return; }
  let bt = seqBlockTable(rowSeq(r));`;

/**
 * WGSL `fn cacheRow(blockTableOffset: u32, t: u32) -> u32`: row index of token t of a sequence in a paged layer
 * buffer ([block][token in block][row]), reading block ids from stepMeta at blockTableOffset.
 */
export function cacheRowWgsl(blockSize: number): string {
  return /* wgsl */ `
fn cacheRow(blockTableOffset: u32, t: u32) -> u32 {
  return stepMeta[blockTableOffset + t / ${blockSize}u] * ${blockSize}u + t % ${blockSize}u;
}
`;
}

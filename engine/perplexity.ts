// Perplexity over text, model-agnostic: BOS-prefixed paragraph chunks and nats/token accumulation from any logits source.
import type { Tokenizer } from '../model/tokenizer.ts';
import type { ModelRunner, StepSequence } from './types.ts';

/** Sequences per runner step when scoring (eval-ppl's default too). */
export const MAX_SEQS_PER_STEP = 64;

/** Paragraphs of `text` (split on blank lines, trimmed, empty ones dropped). */
export function paragraphs(text: string): string[] {
  return text
    .split(/\r?\n[ \t]*\r?\n/)
    .map((p) => p.trim())
    .filter((p) => p.length > 0);
}

/**
 * Token chunks to score: each paragraph as [BOS, ...encode(paragraph)], truncated to maxLen tokens.
 * Chunks with nothing to predict (fewer than 2 tokens) are left out.
 */
export function textChunks(text: string, tokenizer: Tokenizer, maxLen: number, bosId: number | null = tokenizer.bosId): number[][] {
  if (!Number.isInteger(maxLen) || maxLen < 2) throw new Error(`max length must be at least 2 tokens, got ${maxLen}`);
  if (bosId === null) throw new Error('the tokenizer has no BOS token; perplexity chunks are BOS-prefixed');
  const out: number[][] = [];
  for (const p of paragraphs(text)) {
    const chunk = [bosId, ...tokenizer.encode(p)].slice(0, maxLen);
    if (chunk.length >= 2) out.push(chunk);
  }
  return out;
}

/** −log p(chunk[i+1] | chunk[..i]) summed over a chunk, from logits rows for positions 0..len−2 (extra rows ignored). */
export function chunkNats(chunk: readonly number[], rows: ReadonlyArray<ArrayLike<number>>): { nats: number; predicted: number } {
  const predicted = chunk.length - 1;
  if (rows.length < predicted) throw new Error(`a chunk of ${chunk.length} tokens needs ${predicted} logits rows, got ${rows.length}`);
  let nats = 0;
  for (let i = 0; i < predicted; i++) {
    const row = rows[i];
    const target = chunk[i + 1];
    let max = -Infinity;
    for (let j = 0; j < row.length; j++) if (row[j] > max) max = row[j];
    let sum = 0;
    for (let j = 0; j < row.length; j++) sum += Math.exp(row[j] - max);
    nats += max + Math.log(sum) - row[target];
  }
  return { nats, predicted };
}

/** Running totals over chunks; the average is over all predicted tokens (not per chunk). */
export class PerplexityAccumulator {
  nats = 0;
  predicted = 0;
  chunks = 0;

  add(chunk: readonly number[], rows: ReadonlyArray<ArrayLike<number>>): void {
    const r = chunkNats(chunk, rows);
    this.nats += r.nats;
    this.predicted += r.predicted;
    this.chunks++;
  }

  get natsPerToken(): number {
    return this.predicted > 0 ? this.nats / this.predicted : NaN;
  }

  get perplexity(): number {
    return Math.exp(this.natsPerToken);
  }
}

/** Scores chunks one at a time with any logits source (the GPU runner, the CPU reference). */
export async function scoreChunks(
  chunks: readonly number[][],
  logitsFor: (chunk: number[]) => Promise<ReadonlyArray<ArrayLike<number>>> | ReadonlyArray<ArrayLike<number>>,
  onChunk?: (done: number, acc: PerplexityAccumulator) => void,
): Promise<PerplexityAccumulator> {
  const acc = new PerplexityAccumulator();
  for (const chunk of chunks) {
    acc.add(chunk, await logitsFor(chunk));
    onChunk?.(acc.chunks, acc);
  }
  return acc;
}

/**
 * Packs chunks into runner steps of at most rowBudget tokens, each chunk a sequence with its own
 * blocks and logits for every row, and accumulates nats. Blocks are reused step after step.
 */
export async function scoreWithRunner(
  runner: ModelRunner,
  chunks: readonly number[][],
  rowBudget: number,
  onProgress?: (acc: PerplexityAccumulator) => void,
  maxSeqsPerStep = MAX_SEQS_PER_STEP,
): Promise<PerplexityAccumulator> {
  const acc = new PerplexityAccumulator();
  const vocab = runner.config.vocabSize;
  const bs = runner.blockSize;
  let next = 0;
  while (next < chunks.length) {
    const batch: number[][] = [];
    let rows = 0;
    let blocks = 0;
    while (next < chunks.length && batch.length < maxSeqsPerStep) {
      const c = chunks[next];
      const need = Math.ceil(c.length / bs);
      if (batch.length > 0 && (rows + c.length > rowBudget || blocks + need > runner.numBlocks)) break;
      if (need > runner.numBlocks) throw new Error(`a chunk of ${c.length} tokens needs ${need} KV blocks; the runner has ${runner.numBlocks}`);
      batch.push(c);
      rows += c.length;
      blocks += need;
      next++;
    }
    let firstBlock = 0;
    const seqs: StepSequence[] = batch.map((c) => {
      const n = Math.ceil(c.length / bs);
      const blockTable = Array.from({ length: n }, (_, i) => firstBlock + i);
      firstBlock += n;
      return { tokens: c, startPos: 0, blockTable, logits: 'all' };
    });
    const logits = await runner.step(seqs);
    if (logits.length !== rows * vocab) throw new Error(`the runner returned ${logits.length / vocab} logits rows for ${rows} tokens`);
    let row = 0;
    for (const c of batch) {
      const view = Array.from({ length: c.length }, (_, i) => logits.subarray((row + i) * vocab, (row + i + 1) * vocab));
      acc.add(c, view);
      row += c.length;
    }
    onProgress?.(acc);
  }
  return acc;
}

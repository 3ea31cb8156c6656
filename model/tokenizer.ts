// The tokenizer interface every model format provides.

export interface Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number | null;
  /** Text → ids, without BOS (callers add it). */
  encode(text: string): number[];
  /** Ids → text; invalid UTF-8 at the end is dropped. */
  decode(ids: number[]): string;
  /** Piece string of one id, for logprobs display. */
  idToToken(id: number): string;
}

// Incremental detokenization for streaming: new text per token batch, never half a UTF-8 character, SentencePiece spacing kept.
import type { Tokenizer } from './tokenizer.ts';

/** Tokenizers that can show an unfinished UTF-8 tail as U+FFFD instead of dropping it (both of this project's do). */
interface StreamingDecoder {
  decodeForStreaming(ids: number[]): string;
}

function hasStreamingDecode(t: Tokenizer): t is Tokenizer & StreamingDecoder {
  return typeof (t as Partial<StreamingDecoder>).decodeForStreaming === 'function';
}

/** Tokens kept before the window start once it has moved this far (bounded memory on long generations). */
const TRIM_AFTER = 256;

/**
 * Emits the text that tokens add, by decoding a short window twice: the tokens already emitted (from prefixOffset to
 * readOffset) and the same plus the new ones; the difference is the new text. Decoding a window rather than single
 * tokens keeps tokenizer-level rules right: SentencePiece drops the dummy-prefix space of a window's first piece in
 * both decodes alike, and byte-fallback / byte-level tokens that form one character are held back while the decode
 * still ends in U+FFFD (an unfinished UTF-8 sequence). The window only advances past complete text.
 *
 * context: token ids already in the sequence (the prompt) — the first generated token then gets the spacing it has
 * in context ("▁Once" after a prompt keeps its space); without context the first space is dropped as decode() does.
 */
export class IncrementalDetokenizer {
  private tokens: number[];
  private prefixOffset = 0;
  private readOffset: number;
  private readonly decodeWindow: (ids: number[]) => string;

  constructor(
    private readonly tokenizer: Tokenizer,
    context: number[] = [],
  ) {
    // A few tokens of context are enough to fix spacing; more would only cost decode time.
    this.tokens = context.slice(-6);
    this.readOffset = this.tokens.length;
    this.decodeWindow = hasStreamingDecode(tokenizer) ? (ids) => tokenizer.decodeForStreaming(ids) : (ids) => tokenizer.decode(ids);
  }

  /** Appends generated ids; returns the text they complete (possibly ''). */
  push(ids: number[]): string {
    for (const id of ids) this.tokens.push(id);
    const prefixText = this.decodeWindow(this.tokens.slice(this.prefixOffset, this.readOffset));
    const fullText = this.decodeWindow(this.tokens.slice(this.prefixOffset));
    if (fullText.length <= prefixText.length || fullText.endsWith('\uFFFD')) return '';
    // The window's old text is a prefix of its new text for every tokenizer here, so the tail is the new text.
    const added = fullText.slice(prefixText.length);
    this.prefixOffset = this.readOffset;
    this.readOffset = this.tokens.length;
    this.trim();
    return added;
  }

  /** Ends the stream: whatever is still held back (an unfinished character decodes as the tokenizer's decode() does). */
  flush(): string {
    const prefixText = this.tokenizer.decode(this.tokens.slice(this.prefixOffset, this.readOffset));
    const fullText = this.tokenizer.decode(this.tokens.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset = this.tokens.length;
    this.trim();
    return fullText.length > prefixText.length ? fullText.slice(prefixText.length) : '';
  }

  private trim(): void {
    if (this.prefixOffset < TRIM_AFTER) return;
    this.tokens = this.tokens.slice(this.prefixOffset);
    this.readOffset -= this.prefixOffset;
    this.prefixOffset = 0;
  }
}

/**
 * The text token `id` would add after `context` (the sequence's last tokens), for showing logprob alternatives the
 * way they would read in the output: SentencePiece spacing as in context (" there", not "▁there"); a byte-fallback
 * byte that leaves a character unfinished shows as U+FFFD. '' for tokens without surface text (control tokens).
 */
export function tokenTextInContext(tokenizer: Tokenizer, context: readonly number[], id: number): string {
  const decode = hasStreamingDecode(tokenizer) ? (ids: number[]) => tokenizer.decodeForStreaming(ids) : (ids: number[]) => tokenizer.decode(ids);
  const window = context.slice(-6);
  const before = decode(window);
  const after = decode([...window, id]);
  // An unfinished character at the end of `before` (U+FFFD) may be completed by id: its text then belongs to id.
  const base = before.endsWith('\uFFFD') ? before.slice(0, -1) : before;
  if (after.startsWith(base)) return after.slice(base.length);
  let common = 0;
  while (common < base.length && common < after.length && base.charCodeAt(common) === after.charCodeAt(common)) common++;
  return after.slice(common);
}

// Tokenizers against real vocabularies: SentencePiece BPE (GGUF, tok512.bin, tokenizer.model), GPT-2 tokenizer.json, incremental detokenization.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GgufFile, ggufTokenizer } from '../model/gguf.ts';
import { HfTokenizer } from '../model/hf-tokenizer.ts';
import { IncrementalDetokenizer } from '../model/detokenize.ts';
import { loadLlama2cTokenizer, loadSentencePieceModel, SentencePieceTokenizer } from '../model/sentencepiece.ts';
import type { Tokenizer } from '../model/tokenizer.ts';

const STORIES = '../shared/models/stories260K';
const LILY = 'Once upon a time, there was a little girl named Lily.';
const LILY_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426];

function ggufVocab(): SentencePieceTokenizer {
  const f = GgufFile.open(`${STORIES}/stories260K.gguf`);
  try {
    return ggufTokenizer(f);
  } finally {
    f.close();
  }
}

const sp: [string, SentencePieceTokenizer][] = [
  ['gguf', ggufVocab()],
  ['tok512.bin', loadLlama2cTokenizer(`${STORIES}/tok512.bin`)],
  ['tok512.model', loadSentencePieceModel(`${STORIES}/tok512.model`)],
];
const gpt2 = HfTokenizer.fromFile('../shared/models/gpt2-tokenizer/tokenizer.json');

test('SentencePiece BPE: the Lily sentence encodes to the known ids with every vocabulary source, and decodes back', () => {
  for (const [name, t] of sp) {
    assert.equal(t.vocabSize, 512, name);
    assert.deepEqual([t.bosId, t.eosId], [1, 2], name);
    assert.deepEqual(t.encode(LILY), LILY_IDS, name);
    assert.equal(t.decode(LILY_IDS), LILY, name);
    // BOS/EOS are control tokens: no text, and the dummy-prefix space still goes from the first real piece.
    assert.equal(t.decode([1, ...LILY_IDS, 2]), LILY, name);
    assert.equal(t.idToToken(403), '\u2581Once', name);
    assert.deepEqual(t.encode(''), [], name);
  }
  // The same vocabulary from three files: identical pieces for every id.
  for (let id = 0; id < 512; id++) {
    assert.equal(sp[1][1].idToToken(id), sp[0][1].idToToken(id), `tok512.bin id ${id}`);
    assert.equal(sp[2][1].idToToken(id), sp[0][1].idToToken(id), `tok512.model id ${id}`);
  }
  // Control-token text in the input is plain text, not a BOS.
  assert.ok(!sp[0][1].encode('<s> hi').includes(1));
});

test('SentencePiece byte fallback round-trips arbitrary UTF-8 (emoji, CJK, accents, controls)', () => {
  const texts = ['héllo wörld 😀 世界', '🤖🧠 — “quotes” ‘single’ …', 'tabs\tand\nnewlines\r\n', 'Ωμέγα Привет مرحبا नमस्ते', 'x\u0000y', '👩‍👩‍👧 family ZWJ'];
  for (const [name, t] of sp.slice(0, 2)) {
    for (const text of texts) {
      const ids = t.encode(text);
      assert.equal(t.decode(ids), text, `${name}: ${JSON.stringify(text)} → ${ids}`);
    }
    // 😀 is not a piece: it must come out as its four UTF-8 bytes, F0 9F 98 80 = ids 3 + byte.
    const ids = t.encode('😀');
    assert.deepEqual(ids.slice(-4), [0xf0 + 3, 0x9f + 3, 0x98 + 3, 0x80 + 3], name);
    // An unfinished character at the end is dropped, not shown as garbage.
    assert.equal(t.decode(ids.slice(0, -1)), '', name);
    assert.equal(t.decode(t.encode('ab😀').slice(0, -2)), 'ab', name);
  }
  // tok512.model says remove_extra_whitespaces (a SentencePiece normalizer flag); the llama2.c export does not.
  assert.equal(sp[2][1].decode(sp[2][1].encode('  a  b  ')), 'a b');
  assert.equal(sp[1][1].decode(sp[1][1].encode('  a  b  ')), '  a  b  ');
});

test('merges follow piece scores, leftmost first on ties (llama2.c / SentencePiece order)', () => {
  // A toy vocabulary where greedy-by-score and left-to-right disagree: "abc" with pieces ab (score 1) and bc (score 5).
  const pieces = ['<unk>', '<s>', '</s>', 'a', 'b', 'c', 'ab', 'bc', '\u2581', '\u2581a'];
  const scores = [0, 0, 0, -1, -1, -1, 1, 5, -1, 0];
  const types = ['unknown', 'control', 'control', 'normal', 'normal', 'normal', 'normal', 'normal', 'normal', 'normal'] as const;
  const t = new SentencePieceTokenizer({ pieces, scores, types: [...types], bosId: 1, eosId: 2, unkId: 0, addDummyPrefix: false });
  assert.deepEqual(t.encode('abc').map((i) => t.idToToken(i)), ['a', 'bc']);
  assert.deepEqual(t.encode('abab').map((i) => t.idToToken(i)), ['ab', 'ab']);
  // No byte pieces: unknown characters become <unk> (and decode as SentencePiece's ⁇).
  assert.deepEqual(t.encode('aé'), [3, 0]);
  assert.equal(t.decode([3, 0]), 'a \u2047 ');
  const withPrefix = new SentencePieceTokenizer({ pieces, scores, types: [...types], bosId: 1, eosId: 2, unkId: 0, addDummyPrefix: true });
  assert.deepEqual(withPrefix.encode('a b').map((i) => withPrefix.idToToken(i)), ['\u2581a', '\u2581', 'b']);
  assert.equal(withPrefix.decode(withPrefix.encode('a b')), 'a b');
});

test('GPT-2 tokenizer.json: known ids, round trip, vocabulary facts', () => {
  assert.equal(gpt2.vocabSize, 50257);
  assert.deepEqual(gpt2.encode('Hello world'), [15496, 995]);
  assert.equal(gpt2.idToToken(995), '\u0120world');
  const texts = ['Hello world', ' leading space and  double  spaces', 'Unicode: 😀 世界 — naïve café', 'code: x = [1, 2]; // ok\n\tindent', "It's don't we'll"];
  for (const text of texts) assert.equal(gpt2.decode(gpt2.encode(text)), text, JSON.stringify(text));
  // <|endoftext|> is special: skipped when decoding.
  assert.equal(gpt2.decode([15496, 50256, 995]), 'Hello world');
  assert.deepEqual(gpt2.decode([]), '');
});

/** Feeds ids one at a time; returns the pieces pushed out, then the flush. */
function stream(t: Tokenizer, ids: number[], context: number[] = []): string[] {
  const d = new IncrementalDetokenizer(t, context);
  const out = ids.map((id) => d.push([id]));
  out.push(d.flush());
  return out;
}

function assertWholeCharacters(pieces: string[], what: string): void {
  for (const p of pieces) {
    assert.ok(!p.includes('\uFFFD'), `${what}: emitted a replacement character in ${JSON.stringify(p)}`);
    assert.ok(!/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(p), `${what}: emitted a lone surrogate in ${JSON.stringify(p)}`);
  }
}

test('incremental detokenization: an emoji split over byte tokens is emitted whole, text ends complete', () => {
  for (const [name, t] of sp.slice(0, 2)) {
    const text = 'Lily saw a 😀 and 世界!';
    const ids = t.encode(text);
    const emojiStart = ids.indexOf(0xf0 + 3);
    assert.ok(emojiStart > 0, `${name}: emoji should be byte tokens`);
    const pieces = stream(t, ids);
    assertWholeCharacters(pieces, name);
    assert.equal(pieces.join(''), text, name);
    // Nothing comes out for the first three bytes of the emoji; the fourth releases it whole.
    assert.deepEqual(pieces.slice(emojiStart, emojiStart + 3), ['', '', ''], name);
    assert.ok(pieces[emojiStart + 3].startsWith('😀'), `${name}: got ${JSON.stringify(pieces[emojiStart + 3])}`);
    // Word pieces carry their space except at the very start.
    assert.deepEqual(stream(t, LILY_IDS.slice(0, 4)), ['Once', ' upon', ' a', ' time', '']);
  }
  const t = sp[0][1];
  // With the prompt as context the first generated piece keeps its leading space.
  assert.deepEqual(stream(t, [378], [1, 403, 407, 261]), [' time', '']);
  // Pushing many ids at once gives the same text.
  const d = new IncrementalDetokenizer(t);
  assert.equal(d.push(LILY_IDS) + d.flush(), LILY);
  // A stream cut inside a character drops the unfinished bytes at flush instead of emitting garbage.
  const cut = stream(t, t.encode('ok 😀').slice(0, -2));
  assertWholeCharacters(cut, 'cut');
  assert.equal(cut.join(''), 'ok ');

  // Byte-level BPE (GPT-2): 😀 and 世 are split over several tokens.
  const text = 'Hello 😀 world 世界 end';
  const ids = gpt2.encode(text);
  assert.ok(ids.length > text.split(' ').length, 'GPT-2 splits the emoji/CJK into byte tokens');
  const pieces = stream(gpt2, ids);
  assertWholeCharacters(pieces, 'gpt2');
  assert.equal(pieces.join(''), text);
  assert.ok(pieces.some((p) => p === ''), 'some tokens are held back');
  // Long streams: the window trims old tokens and stays correct.
  const long = ('Once upon a time, 😀 there was a girl. ').repeat(60);
  const longIds = t.encode(long);
  assert.equal(stream(t, longIds).join(''), long);
});

/**
 * A Llama-style tokenizer.json (Prepend/Replace normalizer, BPE with byte_fallback, ByteFallback/Fuse/Strip decoder)
 * from a SentencePiece vocabulary, the way Hugging Face's converter derives it: every split of a piece into two pieces
 * is a merge, ranked by the merged piece's score order (ids here), then by the left piece.
 */
function llamaTokenizerJson(sp: SentencePieceTokenizer): object {
  const vocab: Record<string, number> = {};
  for (let i = 0; i < sp.vocabSize; i++) vocab[sp.idToToken(i)] = i;
  const merges: [number, string, string][] = [];
  for (let i = 0; i < sp.vocabSize; i++) {
    if (sp.pieceType(i) !== 'normal') continue;
    const chars = [...sp.idToToken(i)];
    for (let k = 1; k < chars.length; k++) {
      const l = chars.slice(0, k).join('');
      const r = chars.slice(k).join('');
      if (l in vocab && r in vocab) merges.push([i, l, r]);
    }
  }
  merges.sort((a, b) => a[0] - b[0] || vocab[a[1]] - vocab[b[1]]);
  return {
    version: '1.0',
    added_tokens: [0, 1, 2].map((id) => ({ id, content: sp.idToToken(id), single_word: false, lstrip: false, rstrip: false, normalized: false, special: true })),
    normalizer: { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '\u2581' }, { type: 'Replace', pattern: { String: ' ' }, content: '\u2581' }] },
    pre_tokenizer: null,
    post_processor: null,
    decoder: {
      type: 'Sequence',
      decoders: [{ type: 'Replace', pattern: { String: '\u2581' }, content: ' ' }, { type: 'ByteFallback' }, { type: 'Fuse' }, { type: 'Strip', content: ' ', start: 1, stop: 0 }],
    },
    model: { type: 'BPE', dropout: null, unk_token: '<unk>', fuse_unk: true, byte_fallback: true, vocab, merges: merges.map(([, l, r]) => `${l} ${r}`) },
  };
}

test('a Llama-style tokenizer.json through @huggingface/tokenizers matches the SentencePiece encoder on real text', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mla-tok-'));
  try {
    const spm = sp[1][1];
    writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(llamaTokenizerJson(spm)));
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<s>', eos_token: '</s>', chat_template: '{{ messages }}' }));
    const hf = HfTokenizer.fromFile(join(dir, 'tokenizer.json'));
    assert.deepEqual([hf.vocabSize, hf.bosId, hf.eosId, hf.chatTemplate], [512, 1, 2, '{{ messages }}']);
    assert.deepEqual(hf.encode(LILY), LILY_IDS);
    const paragraphs = readFileSync('../shared/data/tinystories_valid_a.txt', 'utf8').split('\n\n').slice(0, 150);
    paragraphs.push('héllo 😀 世界', ' two  spaces ', 'tabs\tnew\nlines');
    let tokens = 0;
    for (const text of paragraphs) {
      const ids = spm.encode(text);
      assert.deepEqual(hf.encode(text), ids, JSON.stringify(text.slice(0, 80)));
      assert.equal(hf.decode(ids), text);
      tokens += ids.length;
    }
    assert.ok(tokens > 10000, `compared ${tokens} tokens`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

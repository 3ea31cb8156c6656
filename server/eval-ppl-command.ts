// `mla-serve eval-ppl`: nats/token and perplexity of a model over a text file (BOS-prefixed paragraph chunks), batched runner steps.
import { readFileSync } from 'node:fs';
import cliProgress from 'cli-progress';
import { MAX_SEQS_PER_STEP, scoreWithRunner, textChunks } from '../engine/perplexity.ts';
import { localBlockSize, localDtypes, intOption, loadLocalModel, openLocalRunner, parseLocalCommand, UsageError } from './local-runner.ts';

export const EVAL_PPL_USAGE = `usage: mla-serve eval-ppl --model PATH --text FILE [options]

Scores a text file: each paragraph (split on blank lines) becomes a chunk [BOS, tokens...] truncated
to --max-len tokens; prints nats per predicted token, averaged over all of them, and perplexity = exp(that).

  --model PATH            .gguf, llama2.c .bin, Hugging Face directory or repo id
  --tokenizer PATH        tokenizer for a llama2.c .bin (default: tok<vocab>.bin beside it)
  --text FILE             UTF-8 text
  --max-len N             tokens per chunk at most, BOS included (default: 512, or the model's context if smaller)
  --limit N               score only the first N chunks
  --batch-tokens N        token rows per runner step (default 2048)
  --weight-dtype f32|f16|int8  GPU weight format (default f16; int8: projections per output channel)
  --kv-cache-dtype f32|f16|int8  KV cache format (default f16; int8: one scale per token, head and K/V,
                          GQA; MLA: the latent and RoPE key, one scale each per token;
                          --cache-dtype is accepted as an alias)
  --mla-int8-attention auto|f32|dot4|three-pass  MLA over an int8 cache: f32 products on the unpacked
                          values, or dot4: the query and softmax weights quantized to int8 too, both products
                          int8 dot products; three-pass: the same integers as scores, softmax and values
                          passes (dot4 and three-pass need --kv-cache-dtype int8); auto (default): dot4 with
                          an int8 cache, else f32
  --mla-head-kernel auto|staged|w8a8|fused  MLA's W_UK / W_UV head products: staged (f16 weights, f32
                          sums), w8a8 (int8 weights per output column, inputs per row and head, i32 sums;
                          slower on an H100), or fused into the attention's first and last kernels up to 32
                          rows (W_UK there with an int8 cache); auto (default): staged, with W_UK in the
                          attention's first kernel up to 32 rows over an int8 cache
  --cpu                   run on the CPU with the float64 reference ops instead of the GPU
  --json                  print the figures as one JSON object
`;

export interface PerplexityFigures {
  model: string;
  text: string;
  natsPerToken: number;
  perplexity: number;
  predictedTokens: number;
  chunks: number;
  maxLen: number;
  seconds: number;
  tokensPerSecond: number;
  adapter: string;
  attention: string;
  weightDtype: string;
  cacheDtype: string;
}

export async function runEvalPpl(argv: string[]): Promise<number> {
  const parsed = parseLocalCommand(
    argv,
    'eval-ppl',
    EVAL_PPL_USAGE,
    { text: { type: 'string' }, 'max-len': { type: 'string' }, limit: { type: 'string' }, 'batch-tokens': { type: 'string' } },
    (v) => {
      if (!v.model) throw new UsageError('--model is required');
      if (!v.text) throw new UsageError('--text is required');
      return {
        model: v.model,
        text: v.text,
        maxLen: v['max-len'] === undefined ? undefined : intOption(v['max-len'], '--max-len', 512, 2),
        limit: v.limit === undefined ? Infinity : intOption(v.limit, '--limit', 1),
        batchTokens: intOption(v['batch-tokens'], '--batch-tokens', 2048),
        ...localDtypes(v),
      };
    },
  );
  if (typeof parsed === 'number') return parsed;
  const { values: v, opts } = parsed;

  let text: string;
  try {
    text = readFileSync(opts.text, 'utf8');
  } catch (err) {
    throw new Error(`cannot read the text file ${opts.text}: ${(err as Error).message}`);
  }
  const model = await loadLocalModel(opts.model, { tokenizer: v.tokenizer });
  const maxLen = opts.maxLen ?? Math.min(512, model.config.maxSeqLen);
  if (maxLen > model.config.maxSeqLen) throw new Error(`--max-len ${maxLen} is longer than the model's context of ${model.config.maxSeqLen} tokens`);
  const chunks = textChunks(text, model.tokenizer, maxLen, model.tokenizer.bosId ?? model.config.bosId).slice(0, opts.limit);
  if (chunks.length === 0) throw new Error(`${opts.text} has no paragraph with a token to predict`);

  // Logits of every row come back: keep a step's readback near 256 MiB whatever the vocabulary.
  const rowBudget = Math.max(maxLen, Math.min(opts.batchTokens, Math.floor(2 ** 28 / (4 * model.config.vocabSize))));
  const blockSize = localBlockSize(opts.mlaInt8Attention);
  const local = await openLocalRunner(model, {
    blockSize,
    numBlocks: Math.ceil(rowBudget / blockSize) + MAX_SEQS_PER_STEP,
    weightDtype: opts.weightDtype,
    cacheDtype: opts.cacheDtype,
    mlaInt8Attention: opts.mlaInt8Attention,
    mlaHeadKernel: opts.mlaHeadKernel,
    cpu: v.cpu ?? false,
    log: v.json ? () => {} : undefined,
  });
  const bar = new cliProgress.SingleBar(
    { format: 'eval-ppl [{bar}] {value}/{total} chunks | {nats} nats/token | {eta_formatted} left', stream: process.stderr, hideCursor: true },
    cliProgress.Presets.shades_classic,
  );
  try {
    const t0 = performance.now();
    bar.start(chunks.length, 0, { nats: '-' });
    const acc = await scoreWithRunner(local.runner, chunks, rowBudget, (a) => bar.update(a.chunks, { nats: a.natsPerToken.toFixed(4) }));
    bar.stop();
    const seconds = (performance.now() - t0) / 1000;
    const figures: PerplexityFigures = {
      model: opts.model,
      text: opts.text,
      natsPerToken: acc.natsPerToken,
      perplexity: acc.perplexity,
      predictedTokens: acc.predicted,
      chunks: acc.chunks,
      maxLen,
      seconds,
      tokensPerSecond: chunks.reduce((n, c) => n + c.length, 0) / seconds,
      adapter: local.runner.adapterName,
      attention: model.config.attention,
      weightDtype: v.cpu ? 'f64' : opts.weightDtype,
      cacheDtype: v.cpu ? 'f64' : opts.cacheDtype,
    };
    if (v.json) process.stdout.write(JSON.stringify(figures) + '\n');
    else {
      const f = figures;
      process.stdout.write(
        `${f.natsPerToken.toFixed(4)} nats/token, perplexity ${f.perplexity.toFixed(3)} over ${f.predictedTokens} predicted tokens in ${f.chunks} chunks ` +
          `(max ${f.maxLen} tokens each); ${f.seconds.toFixed(1)} s, ${f.tokensPerSecond.toFixed(0)} tok/s; adapter ${f.adapter}, ${f.attention}, weights ${f.weightDtype}, KV ${f.cacheDtype}\n`,
      );
    }
    return 0;
  } finally {
    bar.stop();
    await local.close();
  }
}

// scoreWithRunner moved to engine/perplexity.ts (the converter's GPU calibration scores with it too).
export { scoreWithRunner } from '../engine/perplexity.ts';

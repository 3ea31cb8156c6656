// `mla-serve generate`: one prompt through the serving engine, the story streamed to stdout, then a line of figures (or --json).
import { createEngine } from '../engine/engine.ts';
import { samplingParams } from '../engine/sampler.ts';
import { localBlockSize, localDtypes, intOption, loadLocalModel, numberOption, openLocalRunner, parseLocalCommand, UsageError } from './local-runner.ts';

export const GENERATE_USAGE = `usage: mla-serve generate --model PATH [options]

Generates text from a prompt and streams it to stdout, then prints a line of figures.

  --model PATH            .gguf, llama2.c .bin, Hugging Face directory or repo id
  --tokenizer PATH        tokenizer for a llama2.c .bin (default: tok<vocab>.bin beside it)
  --prompt TEXT           text to continue (default: empty, the story starts from BOS)
  --max-tokens N          tokens to generate at most (default 256)
  --temperature T         0 = greedy (default 1)
  --top-k K               keep the K most likely tokens (default off)
  --top-p P               nucleus sampling, 0 < P <= 1 (default 1)
  --min-p P               drop tokens below P x the top probability (default 0)
  --seed N                seed of the sampler (same seed, same text)
  --ignore-eos            keep going past the end-of-sequence token
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
  --max-model-len N       context length (default: the model's)
  --cpu                   run on the CPU with the float64 reference ops instead of the GPU
  --json                  print the text and figures as one JSON object instead
`;

export interface GenerateFigures {
  model: string;
  prompt: string;
  text: string;
  promptTokens: number;
  generatedTokens: number;
  finishReason: string;
  /** Prompt tokens / time to the first generated token (includes sampling that token). */
  prefillTokensPerSecond: number;
  /** Generated tokens after the first / time from the first to the last. */
  decodeTokensPerSecond: number;
  seconds: number;
  engineSteps: number;
  adapter: string;
  attention: string;
  kvBytesPerToken: number;
  weightDtype: string;
  cacheDtype: string;
}

export async function runGenerate(argv: string[]): Promise<number> {
  const parsed = parseLocalCommand(
    argv,
    'generate',
    GENERATE_USAGE,
    {
      prompt: { type: 'string' },
      'max-tokens': { type: 'string' },
      temperature: { type: 'string' },
      'top-k': { type: 'string' },
      'top-p': { type: 'string' },
      'min-p': { type: 'string' },
      seed: { type: 'string' },
      'ignore-eos': { type: 'boolean' },
      'max-model-len': { type: 'string' },
    },
    (v) => {
      if (!v.model) throw new UsageError('--model is required');
      return {
        model: v.model,
        prompt: v.prompt ?? '',
        maxTokens: intOption(v['max-tokens'], '--max-tokens', 256),
        temperature: numberOption(v.temperature, '--temperature', 1, (x) => x >= 0, '>= 0'),
        topK: intOption(v['top-k'], '--top-k', -1, -1),
        topP: numberOption(v['top-p'], '--top-p', 1, (x) => x > 0 && x <= 1, 'in (0, 1]'),
        minP: numberOption(v['min-p'], '--min-p', 0, (x) => x >= 0 && x <= 1, 'in [0, 1]'),
        seed: v.seed === undefined ? undefined : intOption(v.seed, '--seed', 0, Number.MIN_SAFE_INTEGER),
        ...localDtypes(v),
        maxModelLen: v['max-model-len'] === undefined ? undefined : intOption(v['max-model-len'], '--max-model-len', 0),
      };
    },
  );
  if (typeof parsed === 'number') return parsed;
  const { values: v, opts } = parsed;

  const model = await loadLocalModel(opts.model, { tokenizer: v.tokenizer, maxSeqLen: opts.maxModelLen });
  const tok = model.tokenizer;
  const bos = tok.bosId ?? model.config.bosId;
  const promptTokens = [bos, ...tok.encode(opts.prompt)];
  const maxModelLen = model.config.maxSeqLen;
  const maxTokens = Math.min(opts.maxTokens, maxModelLen - promptTokens.length);
  if (maxTokens < 1) throw new Error(`the prompt has ${promptTokens.length} tokens; the model's context of ${maxModelLen} leaves no room to generate`);
  const blockSize = localBlockSize(opts.mlaInt8Attention);
  const local = await openLocalRunner(model, {
    blockSize,
    numBlocks: Math.ceil((promptTokens.length + maxTokens) / blockSize) + 1,
    weightDtype: opts.weightDtype,
    cacheDtype: opts.cacheDtype,
    mlaInt8Attention: opts.mlaInt8Attention,
    mlaHeadKernel: opts.mlaHeadKernel,
    cpu: v.cpu ?? false,
    log: v.json ? () => {} : undefined,
  });
  const runner = local.runner;
  const engine = createEngine({ runner, info: { name: opts.model, config: model.config, tokenizer: tok, maxModelLen }, cacheDtype: v.cpu ? 'f64' : opts.cacheDtype });
  const params = samplingParams({
    maxTokens,
    temperature: opts.temperature,
    topP: opts.topP,
    topK: opts.topK,
    minP: opts.minP,
    seed: opts.seed,
    ignoreEos: v['ignore-eos'] ?? false,
  });

  try {
    if (!v.json) process.stdout.write(opts.prompt);
    const t0 = performance.now();
    let tFirst = 0;
    let text = '';
    let generated = 0;
    let finishReason = 'length';
    for await (const ev of engine.generate({ requestId: 'generate', promptTokens, params })) {
      if (ev.type === 'token') {
        if (generated === 0) tFirst = performance.now();
        generated += ev.tokenIds.length;
        text += ev.text;
        if (!v.json && ev.text) process.stdout.write(ev.text);
      } else finishReason = ev.finishReason;
    }
    const tEnd = performance.now();
    const figures: GenerateFigures = {
      model: opts.model,
      prompt: opts.prompt,
      text,
      promptTokens: promptTokens.length,
      generatedTokens: generated,
      finishReason,
      prefillTokensPerSecond: promptTokens.length / ((tFirst - t0) / 1000),
      decodeTokensPerSecond: generated > 1 ? (generated - 1) / ((tEnd - tFirst) / 1000) : NaN,
      seconds: (tEnd - t0) / 1000,
      engineSteps: engine.stats().steps,
      adapter: runner.adapterName,
      attention: model.config.attention,
      kvBytesPerToken: runner.kvBytesPerToken,
      weightDtype: v.cpu ? 'f64' : opts.weightDtype,
      cacheDtype: v.cpu ? 'f64' : opts.cacheDtype,
    };
    if (v.json) process.stdout.write(JSON.stringify(figures) + '\n');
    else {
      const f = figures;
      process.stdout.write(
        `\n\n${f.promptTokens} prompt tokens, ${f.generatedTokens} generated (${f.finishReason}); ` +
          `prefill ${f.prefillTokensPerSecond.toFixed(1)} tok/s, decode ${f.decodeTokensPerSecond.toFixed(1)} tok/s; ` +
          `adapter ${f.adapter}; ${f.attention} attention, KV ${f.kvBytesPerToken} bytes/token (${f.cacheDtype}), weights ${f.weightDtype}\n`,
      );
    }
    return 0;
  } finally {
    await engine.shutdown(0).catch(() => {});
    await local.close();
  }
}

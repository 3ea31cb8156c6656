// Contracts between the HTTP face, the serving engine and the GPU step runner.
import type { ModelConfig } from '../model/config.ts';
import type { Tokenizer } from '../model/tokenizer.ts';
import type { LogitAdjustments, PickSampling, SampledLogprobs } from './sampler.ts';

/** One sequence's share of a forward step: a prompt chunk or one decode token. */
export interface StepSequence {
  /** New token ids this step. */
  tokens: number[];
  /** Position of tokens[0] = tokens already in this sequence's KV cache. */
  startPos: number;
  /** Physical block ids covering positions [0, startPos + tokens.length), in order. */
  blockTable: number[];
  /**
   * Which rows' logits come back: none, the chunk's last token, or every token (perplexity). 'argmax' and 'sample' are
   * picks: the last token's greedy choice, or a draw with `sample`'s settings (engine/sampler.ts pickOnHost), made where
   * the logits are; one id comes back, not a vocab row.
   */
  logits: 'none' | 'last' | 'all' | 'argmax' | 'sample';
  /** The draw of a 'sample' sequence. */
  sample?: PickSampling;
  /** Logit bias and penalties a pick sequence applies to its row before the pick. */
  adjust?: LogitAdjustments;
  /** A pick sequence also returns its token's raw logprob and this many most likely tokens' (0 … 20). */
  logprobs?: number;
  /**
   * The token is the previous step's pick number k (its k-th 'argmax' or 'sample' sequence), taken where the pick already
   * is: on the GPU, so this step can be submitted before the previous one has finished or been read back (tokens is
   * then [any id]: one token, its value unused). The previous step is the last one submitted to this runner.
   */
  previousPick?: number;
}

/** What a step returns: the logits rows of its 'last'/'all' sequences, and the token of each pick sequence. */
export interface StepOutput {
  /** [rows, vocab] in sequence order, pick sequences skipped. */
  logits: Float32Array;
  /** One token per 'argmax' or 'sample' sequence, in sequence order ('argmax': the first index of the largest logit). */
  picks: Uint32Array;
  /** Per pick, its logprobs (raw: before bias, penalties, temperature) where the sequence asked for them, else null. */
  pickLogprobs?: Array<SampledLogprobs | null>;
  /** The step's GPU span (ms) where the runner times steps. */
  gpuMs?: number;
}

/** Runs forward steps of one model on the GPU over its paged KV pool. */
export interface ModelRunner {
  readonly config: ModelConfig;
  readonly blockSize: number;
  readonly numBlocks: number;
  /** KV cache bytes one token takes across all layers. */
  readonly kvBytesPerToken: number;
  readonly adapterName: string;
  /** One batched forward step; logits rows [rows requested, vocab] in sequence order (no pick sequences). */
  step(seqs: StepSequence[]): Promise<Float32Array>;
  /**
   * One batched forward step that may hold pick sequences. A step whose sequences all have previousPick may be
   * submitted while the step before it is still in flight (at most two in flight; steps complete in order).
   */
  stepOutput(seqs: StepSequence[]): Promise<StepOutput>;
  /** Copies whole blocks' KV contents (copy-on-write of shared partial blocks). */
  copyBlocks(pairs: Array<[src: number, dst: number]>): void;
  destroy(): void;
}

export interface SamplingParams {
  maxTokens: number;
  temperature: number; // 0 = greedy
  topP: number; // (0, 1]
  topK: number; // -1 or 0 = off
  minP: number; // 0 = off
  presencePenalty: number;
  frequencyPenalty: number;
  repetitionPenalty: number; // 1 = off
  logitBias: Map<number, number>;
  seed?: number;
  stop: string[];
  stopTokenIds: number[];
  ignoreEos: boolean;
  /** Top-N logprobs per generated token; null = none. */
  logprobs: number | null;
}

export interface GenerationRequest {
  requestId: string;
  promptTokens: number[];
  params: SamplingParams;
  signal?: AbortSignal;
  /**
   * Top-N logprobs of every prompt token (echo with logprobs); null/absent = none, and the request costs nothing extra.
   * Such a request computes its whole prompt (no prefix-cache reuse) so that every row's logits exist.
   */
  promptLogprobs?: number | null;
}

export type FinishReason = 'stop' | 'length' | 'abort';

export interface TokenLogprob {
  token: string;
  tokenId: number;
  logprob: number;
  top: Array<{ token: string; tokenId: number; logprob: number }>;
}

/** One prompt token's logprob: null (and top null) for the first prompt token, which nothing predicts. */
export interface PromptTokenLogprob {
  token: string;
  tokenId: number;
  logprob: number | null;
  top: Array<{ token: string; tokenId: number; logprob: number }> | null;
}

/**
 * Streamed from the engine for one request. `text` is the detokenized delta (never half a UTF-8 char).
 * Logprob `token` strings are the text each token adds (their concatenation is the text; '' for control tokens and
 * for the leading bytes of a character split over byte-fallback tokens); top alternatives show the text they would add.
 * `promptLogprobs` (requests with promptLogprobs only) comes once, on the first token event, one entry per prompt token.
 */
export type GenerationEvent =
  | { type: 'token'; tokenIds: number[]; text: string; logprobs?: TokenLogprob[]; promptLogprobs?: PromptTokenLogprob[] }
  | {
      type: 'finish';
      finishReason: FinishReason;
      promptTokens: number;
      completionTokens: number;
      cachedPromptTokens: number;
      queueSeconds: number;
    };

export interface ModelInfo {
  name: string;
  config: ModelConfig;
  tokenizer: Tokenizer;
  maxModelLen: number;
  chatTemplate?: string;
  /** How the model runs (GPU runners: RunnerDescription in engine/gpu-runner.ts), for the banner and /metrics. */
  runtime?: ModelRuntime;
}

/**
 * Weight and cache dtypes, the int8 matmul kernels ('none' without int8 weights) and the attention products
 * (RunnerDescription.attentionProducts) a served model runs with.
 */
export interface ModelRuntime {
  adapter: string;
  weightDtype: string;
  cacheDtype: string;
  int8Matmul: string;
  attentionProducts: string;
  /** MLA's W_UK / W_UV head products in decode-sized steps (RunnerDescription.headProducts); 'none' for GQA. */
  headProducts: string;
}

/** KV pool figures for /metrics and the start-up banner. */
export interface KvStats {
  blockSize: number;
  numBlocks: number;
  freeBlocks: number;
  usedBlocks: number;
  /** Free blocks that still hold a reusable cached prefix. */
  cachedBlocks: number;
  bytesPerToken: number;
  capacityBytes: number;
  usedBytes: number;
  cacheDtype: string;
}

export interface EngineStats {
  running: number;
  waiting: number;
  kv: KvStats;
  preemptions: number;
  prefixCacheQueries: number; // tokens looked up
  prefixCacheHits: number; // tokens found
  promptTokens: number;
  generationTokens: number;
  steps: number;
}

export interface StepObservation {
  seconds: number;
  batchSize: number; // sequences in the step
  tokens: number; // rows in the step
  /** Rows that compute prompt tokens (prefill chunks, recomputes after preemption); the rest are decode rows. */
  promptTokens: number;
  /** Submitted behind the step before it, its tokens that step's picks (async scheduling). */
  pipelined: boolean;
  /** The step's GPU span by timestamps, where the runner times steps (RunnerOptions.gpuTiming). */
  gpuSeconds?: number;
}

/** One hosted model's serving engine: continuous batching over its own KV pool. */
export interface ServingEngine {
  readonly info: ModelInfo;
  /** Streams a request's events; throws QueueFullError when the waiting queue is full. */
  generate(req: GenerationRequest): AsyncIterable<GenerationEvent>;
  stats(): EngineStats;
  onStep(listener: (o: StepObservation) => void): void;
  /** False after a GPU device loss or a fatal step error. */
  healthy(): boolean;
  /** Stop admitting; finish (or, past the deadline, abort) running requests; free the GPU. */
  shutdown(deadlineMs?: number): Promise<void>;
}

export class QueueFullError extends Error {
  constructor(
    readonly waiting: number,
    readonly limit: number,
  ) {
    super(`the waiting queue is full (${waiting} of ${limit} requests); retry later`);
  }
}

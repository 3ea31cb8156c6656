// Shared by the engine tests: stories260K, request building, and draining a request's event stream.
import { samplingParams as neutralParams } from '../engine/sampler.ts';
import type { GenerationEvent, GenerationRequest, SamplingParams, ServingEngine } from '../engine/types.ts';

export const STORIES_GGUF = '../shared/models/stories260K/stories260K.gguf';

/** Greedy, 32 tokens, nothing else set (engine/sampler.ts samplingParams), with overrides. */
export function samplingParams(p: Partial<SamplingParams> = {}): SamplingParams {
  return neutralParams({ maxTokens: 32, ...p });
}

export type FinishEvent = Extract<GenerationEvent, { type: 'finish' }>;

export interface Outcome {
  text: string;
  tokenIds: number[];
  finish: FinishEvent;
  events: GenerationEvent[];
}

/** Drains one request; `onToken` may act mid-stream (e.g. abort after n tokens). */
export async function collect(engine: ServingEngine, req: GenerationRequest, onToken?: (n: number) => void): Promise<Outcome> {
  let text = '';
  const tokenIds: number[] = [];
  const events: GenerationEvent[] = [];
  let finish: FinishEvent | undefined;
  for await (const ev of engine.generate(req)) {
    events.push(ev);
    if (ev.type === 'token') {
      text += ev.text;
      tokenIds.push(...ev.tokenIds);
      onToken?.(tokenIds.length);
    } else finish = ev;
  }
  if (!finish) throw new Error(`request ${req.requestId} ended without a finish event`);
  return { text, tokenIds, finish, events };
}

/** Beginnings of stories, different enough that greedy continuations differ. */
export const STORY_STARTS = [
  'Once upon a time',
  'One day, a little girl named Lily',
  'Tom had a big red ball',
  'The sun was shining and',
  'There was a small dog',
  'Sara and Ben went to the park',
  'A little bird sat on a tree',
  'Mom said, "Let\'s bake a cake',
  'The cat was very hungry',
  'In a big forest, there lived',
  'Timmy wanted to play with his',
  'It was a rainy day',
  'Anna found a shiny stone',
  'The boy looked at the sky',
  'Once there was a happy frog',
  'Max liked to run fast',
];

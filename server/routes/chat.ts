// POST /v1/chat/completions: messages through the model's chat template, one JSON body or an SSE stream of deltas.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { ApiError } from '../errors.ts';
import { type ChatBody, chatSchema, parseBody, type RequestLimits } from '../schemas.ts';
import { SSE_HEADERS, sseStream } from '../sse.ts';
import {
  abortedError,
  type ChatLogprob,
  chatLogprobs,
  ChoiceRun,
  type ChoiceSpec,
  type FinishEvent,
  openAiFinishReason,
  resolveMaxTokens,
  resolveModel,
  samplingParams,
  type ServerContext,
  streamErrorChunk,
  unixSeconds,
  usageOf,
} from './generate.ts';

export function registerChat(app: FastifyInstance, ctx: ServerContext, limits: RequestLimits, onModel: (req: FastifyRequest, name: string) => void): void {
  const schema = chatSchema(limits);

  app.post('/v1/chat/completions', async (request: FastifyRequest, reply: FastifyReply) => {
    const body: ChatBody = parseBody(schema, request.body);
    const model = resolveModel(ctx, body.model);
    onModel(request, model.name);

    const promptTokens = model.chat.tokens(body.messages, body.add_generation_prompt ?? true);
    if (promptTokens.length === 0) throw new ApiError(400, 'the messages render to an empty prompt; send at least one message with content', 'messages');
    // Newer OpenAI clients send max_completion_tokens; older ones max_tokens. Left out: all the context left.
    const requested = body.max_completion_tokens ?? body.max_tokens;
    const maxTokens = resolveMaxTokens(model, promptTokens.length, requested, null, body.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens');
    const topN = body.logprobs ? (body.top_logprobs ?? 0) : null;
    const n = body.n ?? 1;
    const choices: ChoiceSpec[] = Array.from({ length: n }, (_, j) => ({ index: j, promptTokens, params: samplingParams(model, body, maxTokens, topN, j) }));

    const id = `chatcmpl-${request.id}`;
    const created = unixSeconds();
    const run = new ChoiceRun(ctx, model, request.id, choices, ctx.tally?.(request) ?? null);
    reply.raw.on('close', () => {
      if (!reply.raw.writableFinished) run.cancel();
    });
    await run.start();

    if (body.stream) {
      const includeUsage = body.stream_options?.include_usage ?? false;
      const base = { id, object: 'chat.completion.chunk', created, model: model.name };
      const extra = includeUsage ? { usage: null } : {};
      async function* chunks(): AsyncGenerator<unknown> {
        // The role comes first, alone, as OpenAI streams it.
        for (const c of choices) yield { ...base, choices: [{ index: c.index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }], ...extra };
        const finishes: FinishEvent[] = [];
        for await (const { index, event } of run.events()) {
          if (event.type === 'token') {
            const lps = topN !== null && event.logprobs?.length ? { content: chatLogprobs(event.logprobs) } : null;
            if (!event.text && !lps) continue;
            yield { ...base, choices: [{ index, delta: { content: event.text }, logprobs: lps, finish_reason: null }], ...extra };
          } else {
            if (event.finishReason === 'abort') {
              if (run.signal.aborted) return;
              throw abortedError(ctx, run);
            }
            finishes.push(event);
            yield { ...base, choices: [{ index, delta: {}, logprobs: null, finish_reason: openAiFinishReason(event.finishReason) }], ...extra };
          }
        }
        if (includeUsage) yield { ...base, choices: [], usage: usageOf([promptTokens.length], finishes, finishes[0]?.cachedPromptTokens ?? 0) };
      }
      reply.headers(SSE_HEADERS);
      return reply.send(sseStream(chunks(), (err) => streamErrorChunk(err, request, ctx, model.name)));
    }

    const texts = choices.map(() => '');
    const logprobs: Array<ChatLogprob[] | null> = choices.map(() => (topN !== null ? [] : null));
    const finishes: Array<FinishEvent | null> = choices.map(() => null);
    for await (const { index, event } of run.events()) {
      if (event.type === 'token') {
        texts[index] += event.text;
        if (event.logprobs) logprobs[index]?.push(...chatLogprobs(event.logprobs));
      } else {
        if (event.finishReason === 'abort') throw abortedError(ctx, run);
        finishes[index] = event;
      }
    }
    const done = finishes.filter((f): f is FinishEvent => f !== null);
    if (done.length !== choices.length) throw abortedError(ctx, run);
    return {
      id,
      object: 'chat.completion',
      created,
      model: model.name,
      choices: choices.map((c, i) => ({
        index: c.index,
        message: { role: 'assistant', content: texts[i] },
        logprobs: logprobs[i] ? { content: logprobs[i] } : null,
        finish_reason: openAiFinishReason(done[i].finishReason),
      })),
      usage: usageOf([promptTokens.length], done, done[0].cachedPromptTokens),
    };
  });
}

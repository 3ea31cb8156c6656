// POST /v1/completions: legacy text completions, one JSON body or an SSE stream.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { parseBody, type CompletionBody, type RequestLimits, completionSchema } from '../schemas.ts';
import { SSE_HEADERS, sseStream } from '../sse.ts';
import {
  abortedError,
  appendLegacyLogprobs,
  checkTokenIds,
  ChoiceRun,
  type ChoiceSpec,
  encodePrompt,
  type FinishEvent,
  type LegacyLogprobs,
  openAiFinishReason,
  resolveMaxTokens,
  resolveModel,
  samplingParams,
  type ServerContext,
  streamErrorChunk,
  unixSeconds,
  usageOf,
} from './generate.ts';

// OpenAI's default for /v1/completions when max_tokens is left out.
const DEFAULT_COMPLETION_TOKENS = 16;

export function registerCompletions(app: FastifyInstance, ctx: ServerContext, limits: RequestLimits, onModel: (req: FastifyRequest, name: string) => void): void {
  const schema = completionSchema(limits);

  app.post('/v1/completions', async (request: FastifyRequest, reply: FastifyReply) => {
    const body: CompletionBody = parseBody(schema, request.body);
    const model = resolveModel(ctx, body.model);
    onModel(request, model.name);
    const tokenizer = model.engine.info.tokenizer;

    const prompt = body.prompt;
    const prompts: Array<{ tokens: number[]; text: string }> =
      prompt.kind === 'text'
        ? prompt.texts.map((text) => ({ tokens: encodePrompt(model, text), text }))
        : prompt.ids.map((ids, i) => {
            checkTokenIds(model, ids, prompt.ids.length > 1 ? `prompt[${i}]` : 'prompt');
            return { tokens: ids, text: tokenizer.decode(ids) };
          });
    const n = body.n ?? 1;
    const choices: ChoiceSpec[] = [];
    prompts.forEach((p, pi) => {
      const maxTokens = resolveMaxTokens(model, p.tokens.length, body.max_tokens, DEFAULT_COMPLETION_TOKENS);
      for (let j = 0; j < n; j++) {
        choices.push({
          index: pi * n + j,
          promptTokens: p.tokens,
          params: samplingParams(model, body, maxTokens, body.logprobs ?? null, j),
          // Like vLLM: echo with logprobs scores the prompt tokens too.
          promptLogprobs: body.echo && body.logprobs != null ? body.logprobs : null,
        });
      }
    });

    const id = `cmpl-${request.id}`;
    const created = unixSeconds();
    const run = new ChoiceRun(ctx, model, request.id, choices, ctx.tally?.(request) ?? null);
    reply.raw.on('close', () => {
      if (!reply.raw.writableFinished) run.cancel();
    });
    await run.start();

    const promptOf = (index: number) => prompts[Math.floor(index / n)];
    const echo = body.echo ?? false;
    const wantLogprobs = body.logprobs != null;

    if (body.stream) {
      const includeUsage = body.stream_options?.include_usage ?? false;
      const base = { id, object: 'text_completion', created, model: model.name };
      const extra = includeUsage ? { usage: null } : {};
      const offsets = new Map<number, number>();
      async function* chunks(): AsyncGenerator<unknown> {
        const finishes: FinishEvent[] = [];
        let cached = 0;
        // With logprobs the echo waits for the prompt logprobs, which come with a choice's first token.
        if (echo && !wantLogprobs) {
          for (const c of choices) {
            const text = promptOf(c.index).text;
            offsets.set(c.index, text.length);
            yield { ...base, choices: [{ index: c.index, text, logprobs: null, finish_reason: null }], ...extra };
          }
        }
        for await (const { index, event } of run.events()) {
          if (event.type === 'token') {
            if (echo && wantLogprobs && event.promptLogprobs) {
              const text = promptOf(index).text;
              const logprobs: LegacyLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
              appendLegacyLogprobs(logprobs, event.promptLogprobs, 0);
              // Generated offsets continue after the echoed text as sent.
              offsets.set(index, text.length);
              yield { ...base, choices: [{ index, text, logprobs, finish_reason: null }], ...extra };
            }
            if (!event.text && !(wantLogprobs && event.logprobs?.length)) continue;
            let logprobs: LegacyLogprobs | null = null;
            if (wantLogprobs) {
              logprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
              offsets.set(index, appendLegacyLogprobs(logprobs, event.logprobs ?? [], offsets.get(index) ?? 0));
            }
            yield { ...base, choices: [{ index, text: event.text, logprobs, finish_reason: null }], ...extra };
          } else {
            if (event.finishReason === 'abort') {
              if (run.signal.aborted) return; // the client left: nobody to tell
              throw abortedError(ctx, run);
            }
            finishes.push(event);
            if (index % n === 0) cached += event.cachedPromptTokens;
            yield { ...base, choices: [{ index, text: '', logprobs: null, finish_reason: openAiFinishReason(event.finishReason) }], ...extra };
          }
        }
        if (includeUsage) yield { ...base, choices: [], usage: usageOf(prompts.map((p) => p.tokens.length), finishes, cached) };
      }
      reply.headers(SSE_HEADERS);
      return reply.send(sseStream(chunks(), (err) => streamErrorChunk(err, request, ctx, model.name)));
    }

    const texts = choices.map((c) => (echo ? promptOf(c.index).text : ''));
    const logprobs: Array<LegacyLogprobs | null> = choices.map(() => (wantLogprobs ? { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] } : null));
    const offsets = texts.map((t) => t.length);
    const finishes: Array<FinishEvent | null> = choices.map(() => null);
    for await (const { index, event } of run.events()) {
      if (event.type === 'token') {
        texts[index] += event.text;
        const lp = logprobs[index];
        if (lp && event.promptLogprobs) {
          appendLegacyLogprobs(lp, event.promptLogprobs, 0);
          offsets[index] = promptOf(index).text.length;
        }
        if (lp) offsets[index] = appendLegacyLogprobs(lp, event.logprobs ?? [], offsets[index]);
      } else {
        if (event.finishReason === 'abort') throw abortedError(ctx, run);
        finishes[index] = event;
      }
    }
    const done = finishes.filter((f): f is FinishEvent => f !== null);
    if (done.length !== choices.length) throw abortedError(ctx, run);
    const cached = done.filter((_, i) => i % n === 0).reduce((a, f) => a + f.cachedPromptTokens, 0);
    return {
      id,
      object: 'text_completion',
      created,
      model: model.name,
      choices: choices.map((c, i) => ({ index: c.index, text: texts[i], logprobs: logprobs[i], finish_reason: openAiFinishReason(done[i].finishReason) })),
      usage: usageOf(
        prompts.map((p) => p.tokens.length),
        done,
        cached,
      ),
    };
  });
}

// GET /v1/models, POST /tokenize, POST /detokenize: what is hosted and how it tokenizes.
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { ApiError } from '../errors.ts';
import { detokenizeSchema, parseBody, tokenizeChatSchema, tokenizePromptSchema } from '../schemas.ts';
import { checkTokenIds, encodePrompt, type HostedModel, resolveModel, type ServerContext } from './generate.ts';

export function registerModels(app: FastifyInstance, ctx: ServerContext, onModel: (req: FastifyRequest, name: string) => void): void {
  // Models are fixed for the app's life: `created` is when it started.
  const created = Math.floor(Date.now() / 1000);
  const card = (m: HostedModel) => ({
    id: m.name,
    object: 'model',
    created,
    owned_by: 'mla-serve',
    root: m.name,
    parent: null,
    max_model_len: m.engine.info.maxModelLen,
    attention: m.engine.info.config.attention,
  });

  app.get('/v1/models', async () => ({ object: 'list', data: ctx.models.map(card) }));

  app.get('/v1/models/:model', async (request) => {
    const { model } = request.params as { model: string };
    return card(resolveModel(ctx, model));
  });

  app.post('/tokenize', async (request) => {
    const raw = request.body as Record<string, unknown> | null;
    const withMessages = raw !== null && typeof raw === 'object' && 'messages' in raw;
    let model: HostedModel;
    let tokens: number[];
    if (withMessages) {
      const body = parseBody(tokenizeChatSchema, raw);
      model = resolveModel(ctx, body.model);
      tokens = model.chat.tokens(body.messages, body.add_generation_prompt ?? true);
    } else {
      const body = parseBody(tokenizePromptSchema, raw);
      model = resolveModel(ctx, body.model);
      // Same tokens /v1/completions would run (BOS included) unless add_special_tokens is false.
      tokens = body.add_special_tokens === false ? model.engine.info.tokenizer.encode(body.prompt) : encodePrompt(model, body.prompt);
    }
    onModel(request, model.name);
    return { count: tokens.length, max_model_len: model.engine.info.maxModelLen, tokens };
  });

  app.post('/detokenize', async (request) => {
    const body = parseBody(detokenizeSchema, request.body);
    const model = resolveModel(ctx, body.model);
    onModel(request, model.name);
    checkTokenIds(model, body.tokens, 'tokens');
    return { prompt: model.engine.info.tokenizer.decode(body.tokens) };
  });
}

export function registerOps(app: FastifyInstance, ctx: ServerContext): void {
  app.get('/health', async (_request, reply) => {
    if (ctx.draining()) throw new ApiError(503, 'the server is shutting down', null, 1);
    const sick = ctx.models.filter((m) => !m.engine.healthy()).map((m) => m.name);
    if (sick.length) throw new ApiError(503, `the engine of ${sick.join(', ')} is not healthy (GPU device lost or a step failed); see the server log`);
    reply.header('cache-control', 'no-store');
    return { status: 'ok', models: ctx.models.map((m) => m.name) };
  });

  app.get('/metrics', async (_request, reply) => {
    reply.header('content-type', ctx.metrics.contentType);
    return ctx.metrics.render();
  });
}

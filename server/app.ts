// buildApp(opts): the Fastify app of the OpenAI-compatible server over a list of serving engines (one per hosted model).
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import Fastify, { type FastifyInstance, LogController, type FastifyRequest, type FastifyServerOptions } from 'fastify';
import type { ServingEngine } from '../engine/types.ts';
import { ChatFormatter } from './chat.ts';
import { ApiError, errorBody, mapError } from './errors.ts';
import { ServerMetrics } from './metrics.ts';
import { registerChat } from './routes/chat.ts';
import { registerCompletions } from './routes/completions.ts';
import type { HostedModel, RequestTally, ServerContext } from './routes/generate.ts';
import { registerModels, registerOps } from './routes/models.ts';
import { defaultLimits, type RequestLimits } from './schemas.ts';

export interface AppOptions {
  /** One engine per hosted model; a request's `model` picks by `engine.info.name`; the first is the default. */
  engines: ServingEngine[];
  /** Fastify/pino logger options; false (the default) logs nothing, as tests want. */
  logger?: FastifyServerOptions['logger'];
  /** Largest request body in bytes; past it: 413. */
  bodyLimit?: number;
  limits?: Partial<RequestLimits>;
  /** app.close() lets running requests finish this long before the engines abort them. */
  shutdownDeadlineMs?: number;
  /** app.close() shuts the engines down (and frees their GPU memory); false when the caller reuses them. */
  ownsEngines?: boolean;
  /** When set, every request except GET /health and GET /metrics needs `Authorization: Bearer <apiKey>`, else 401. */
  apiKey?: string | null;
}

/** Paths that answer without the API key: probes (kubelet) and scrapers (Prometheus, the gateway's endpoint picker) carry no key. */
export const AUTH_EXEMPT_PATHS: readonly string[] = ['/health', '/metrics'];

/**
 * A checker of `Authorization: Bearer <key>` headers in constant time: both sides are hashed to 32 bytes
 * first, so neither the key's length nor a matching prefix shows in the comparison time.
 */
export function bearerChecker(apiKey: string): (authorization: string | undefined) => boolean {
  const want = createHash('sha256').update(apiKey, 'utf8').digest();
  return (authorization) => {
    const m = /^Bearer[ ]+(.+)$/i.exec(authorization ?? '');
    const got = createHash('sha256').update(m ? m[1].trim() : '', 'utf8').digest();
    return timingSafeEqual(got, want) && m !== null;
  };
}

declare module 'fastify' {
  interface FastifyInstance {
    /** The app's metrics (its own registry): what GET /metrics renders; tests time its collection in-process. */
    serverMetrics: ServerMetrics;
  }
}

/** 4 MiB: a full 128k-token prompt as token ids is under 1 MiB. */
export const DEFAULT_BODY_LIMIT = 4 * 1024 * 1024;

const ROUTES = 'POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /metrics';

export function buildApp(opts: AppOptions): FastifyInstance {
  if (opts.engines.length === 0) throw new Error('buildApp needs at least one engine');
  const names = opts.engines.map((e) => e.info.name);
  const dup = names.find((n, i) => names.indexOf(n) !== i);
  if (dup) throw new Error(`two models are named '${dup}'; give each a distinct name (--name)`);

  const bodyLimit = opts.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const limits: RequestLimits = { ...defaultLimits, ...opts.limits };
  const app = Fastify({
    logger: opts.logger ?? false,
    bodyLimit,
    // Our own id scheme: honour a sane client/gateway x-request-id, else a fresh random one.
    genReqId: (req) => {
      const given = req.headers['x-request-id'];
      return typeof given === 'string' && /^[\w.:-]{1,128}$/.test(given) ? given : randomBytes(12).toString('hex');
    },
    // Request logs are written in onResponse below, minus the 50 ms /metrics scrapes.
    logController: new LogController({ requestIdLogLabel: 'requestId', disableRequestLogging: true }),
    // Our onRequest hook answers during the drain, with an OpenAI error body and Retry-After.
    return503OnClosing: false,
  });

  const models: HostedModel[] = opts.engines.map((engine) => ({ name: engine.info.name, engine, chat: new ChatFormatter(engine.info.tokenizer, engine.info.chatTemplate) }));
  const metrics = new ServerMetrics(opts.engines);
  app.decorate('serverMetrics', metrics);
  let draining = false;
  const ctx: ServerContext = { models, metrics, draining: () => draining };
  const modelOf = new WeakMap<FastifyRequest, string>();
  const onModel = (req: FastifyRequest, name: string) => modelOf.set(req, name);
  // Tokens and finish reasons of a generation request, filled by its ChoiceRun, for the one log line at its end.
  const tallies = new WeakMap<FastifyRequest, RequestTally>();
  ctx.tally = (req) => {
    let t = tallies.get(req);
    if (!t) tallies.set(req, (t = { promptTokens: 0, completionTokens: 0, finishReasons: [] }));
    return t;
  };
  const keyMatches = opts.apiKey ? bearerChecker(opts.apiKey) : null;

  // JSON bodies: strict UTF-8 (Node would silently turn bad bytes into U+FFFD), then Fastify's
  // prototype-poisoning-safe parser. Any content type is read as JSON, as OpenAI's API does, so
  // `curl -d` without a content-type header works.
  const jsonParse = app.getDefaultJsonParser('error', 'error');
  const utf8 = new TextDecoder('utf-8', { fatal: true });
  const parseJson = (req: FastifyRequest, raw: Buffer, done: (err: Error | null, body?: unknown) => void) => {
    if (raw.length === 0) return done(new ApiError(400, 'the request body is empty; send a JSON object'));
    let text: string;
    try {
      text = utf8.decode(raw);
    } catch {
      return done(new ApiError(400, 'the request body is not valid UTF-8; encode the JSON as UTF-8'));
    }
    jsonParse(req, text, (err, body) => (err ? done(new ApiError(400, `the request body is not valid JSON: ${err.message}`)) : done(null, body)));
  };
  app.removeAllContentTypeParsers();
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, parseJson);
  app.addContentTypeParser('*', { parseAs: 'buffer' }, parseJson);

  app.addHook('onRequest', async (request, reply) => {
    reply.header('x-request-id', request.id);
    if (keyMatches) {
      const path = request.url.split('?', 1)[0];
      const exempt = (request.method === 'GET' || request.method === 'HEAD') && AUTH_EXEMPT_PATHS.includes(path);
      if (!exempt && !keyMatches(request.headers.authorization)) {
        // RFC 6750: a 401 names the scheme it wants.
        reply.header('www-authenticate', 'Bearer');
        const given = request.headers.authorization !== undefined;
        throw new ApiError(
          401,
          given
            ? 'Incorrect API key provided in the Authorization header; send the key this server was started with (--api-key / MLA_SERVE_API_KEY) as "Authorization: Bearer <key>".'
            : "You didn't provide an API key. Send it in an Authorization header using Bearer auth (\"Authorization: Bearer <key>\"), the key this server was started with (--api-key / MLA_SERVE_API_KEY).",
        );
      }
    }
    if (draining && request.method === 'POST') throw new ApiError(503, 'the server is shutting down and takes no new requests; retry on another replica', null, 1);
  });
  // One line per finished request (for a stream: when its last byte went out), with its tokens and
  // finish reasons when it generated; the request id is in `requestId` (pino's child binding).
  app.addHook('onResponse', async (request, reply) => {
    if (request.url === '/metrics' || request.url === '/health') return;
    const t = tallies.get(request);
    const usage = t
      ? { promptTokens: t.promptTokens, completionTokens: t.completionTokens, finishReason: t.finishReasons.length === 1 ? t.finishReasons[0] : t.finishReasons.join(',') || null }
      : {};
    request.log.info({ method: request.method, url: request.url, model: modelOf.get(request), statusCode: reply.statusCode, ...usage, ms: Math.round(reply.elapsedTime) }, 'request done');
  });

  // Attribute a request to its model as soon as the body names a served one, so even its schema errors count per model.
  app.addHook('preValidation', async (request) => {
    const named = (request.body as { model?: unknown } | null | undefined)?.model;
    if (typeof named === 'string' && models.some((m) => m.name === named)) modelOf.set(request, named);
  });

  app.setErrorHandler((err, request, reply) => {
    const mapped = mapError(err, bodyLimit);
    if (mapped.serverFault) request.log.error({ err }, 'request failed');
    else request.log.info({ status: mapped.status, message: mapped.body.error.message }, 'request rejected');
    metrics.failed(modelOf.get(request) ?? null, mapped.status);
    if (mapped.retryAfterSeconds !== null) reply.header('retry-after', String(mapped.retryAfterSeconds));
    reply.code(mapped.status).send(mapped.body);
  });
  app.setNotFoundHandler((request, reply) => {
    metrics.failed(null, 404);
    reply.code(404).send(errorBody(404, `no route for ${request.method} ${request.url}; this server answers ${ROUTES}`));
  });

  registerCompletions(app, ctx, limits, onModel);
  registerChat(app, ctx, limits, onModel);
  registerModels(app, ctx, onModel);
  registerOps(app, ctx);

  // Graceful shutdown: refuse new work, let the engines finish running requests (or abort them past
  // the deadline, which ends their streams), then Fastify closes the sockets.
  app.addHook('preClose', async () => {
    draining = true;
    if (opts.ownsEngines ?? true) {
      const deadline = opts.shutdownDeadlineMs ?? 30_000;
      await Promise.all(opts.engines.map((e) => e.shutdown(deadline)));
    }
  });

  return app;
}

// OpenAI-style error objects: one ApiError class and the mapping from any thrown value to {status, body}.
import { InvalidRequestError } from '../engine/engine.ts';
import { QueueFullError } from '../engine/types.ts';

/** The body OpenAI clients expect; `code` is the HTTP status as an integer (vLLM's convention). */
export interface OpenAiErrorBody {
  error: { message: string; type: string; param: string | null; code: number };
}

const typeByStatus: Record<number, string> = {
  400: 'invalid_request_error',
  404: 'not_found_error',
  405: 'invalid_request_error',
  413: 'invalid_request_error',
  415: 'invalid_request_error',
  429: 'rate_limit_error',
  499: 'client_closed_request',
  500: 'internal_error',
  503: 'service_unavailable_error',
};

/** An error meant for the client: status, readable message, and the offending request field if any. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    /** Seconds the client should wait before retrying (429/503). */
    readonly retryAfterSeconds: number | null = null,
  ) {
    super(message);
  }
}

export function errorBody(status: number, message: string, param: string | null = null): OpenAiErrorBody {
  return { error: { message, type: typeByStatus[status] ?? (status >= 500 ? 'internal_error' : 'invalid_request_error'), param, code: status } };
}

export interface MappedError {
  status: number;
  body: OpenAiErrorBody;
  retryAfterSeconds: number | null;
  /** True when the server, not the client, is at fault: log it. */
  serverFault: boolean;
}

// Fastify's own client errors, reworded so a user knows what to change.
function fastifyMessage(code: string, err: Error & { statusCode?: number }, bodyLimit: number): string | null {
  switch (code) {
    case 'FST_ERR_CTP_INVALID_JSON':
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return `the request body is not valid JSON: ${err.message}`;
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return 'the request body is empty; send a JSON object';
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return `the request body is larger than the limit of ${bodyLimit} bytes; send a shorter prompt`;
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return `unsupported content-type; send the body as application/json`;
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return 'the content-length header does not match the body';
    default:
      return null;
  }
}

/** Turns anything a route or Fastify threw into the status and OpenAI error body to send. */
export function mapError(err: unknown, bodyLimit: number): MappedError {
  if (err instanceof ApiError) {
    return { status: err.status, body: errorBody(err.status, err.message, err.param), retryAfterSeconds: err.retryAfterSeconds, serverFault: err.status >= 500 };
  }
  // The engine's own admission checks (token ids, context, a request larger than the whole KV pool).
  if (err instanceof InvalidRequestError) {
    return { status: 400, body: errorBody(400, err.message, err.param), retryAfterSeconds: null, serverFault: false };
  }
  if (err instanceof QueueFullError) {
    return { status: 429, body: errorBody(429, err.message), retryAfterSeconds: 1, serverFault: false };
  }
  const e = err as Error & { statusCode?: number; code?: string };
  const status = typeof e?.statusCode === 'number' ? e.statusCode : 500;
  if (status >= 400 && status < 500) {
    const message = fastifyMessage(e.code ?? '', e, bodyLimit) ?? e.message ?? 'bad request';
    return { status, body: errorBody(status, message), retryAfterSeconds: null, serverFault: false };
  }
  // Server faults: the message only, never the stack.
  const message = `internal server error: ${e?.message ?? String(err)}`;
  return { status: status >= 500 ? status : 500, body: errorBody(status >= 500 ? status : 500, message), retryAfterSeconds: null, serverFault: true };
}

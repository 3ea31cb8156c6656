// Server-sent events framing for OpenAI streams: one `data:` line per JSON chunk, then `data: [DONE]`.
import { Readable } from 'node:stream';

export const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  // Proxies (nginx) buffer responses unless told not to; a buffered stream has no TTFT.
  'x-accel-buffering': 'no',
} as const;

/** One event. JSON.stringify never emits a raw newline, so one `data:` line always suffices. */
export function sseEvent(chunk: unknown): string {
  return `data: ${JSON.stringify(chunk)}\n\n`;
}

export const SSE_DONE = 'data: [DONE]\n\n';

/** Parses an SSE body back into its data payloads (JSON objects, or the string '[DONE]'); for tests and the bench client. */
export function parseSseBody(body: string): unknown[] {
  const out: unknown[] = [];
  for (const block of body.split('\n\n')) {
    const data = block
      .split('\n')
      .filter((l) => l.startsWith('data:'))
      .map((l) => l.slice(5).trimStart())
      .join('\n');
    if (!data) continue;
    out.push(data === '[DONE]' ? data : JSON.parse(data));
  }
  return out;
}

/**
 * A byte stream of SSE events from an async generator of chunks; Fastify pipes it to the socket.
 * The status line is long gone when something fails mid-stream, so the failure becomes one last
 * event (`errorChunk(err)`, an OpenAI error object) before `[DONE]`, as vLLM does.
 */
export function sseStream(chunks: AsyncGenerator<unknown>, errorChunk: (err: unknown) => unknown): Readable {
  async function* frames(): AsyncGenerator<string> {
    try {
      for await (const c of chunks) yield sseEvent(c);
    } catch (err) {
      yield sseEvent(errorChunk(err));
    }
    yield SSE_DONE;
  }
  return Readable.from(frames(), { objectMode: false });
}

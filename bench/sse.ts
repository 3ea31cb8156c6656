// Incremental server-sent-events splitter: network chunks in, complete `data` payloads out (WHATWG event-stream rules).

export class SseParser {
  private buffer = '';
  private dataLines: string[] = [];

  /** Feeds decoded text; returns the data of every event completed by it, in order. */
  push(text: string): string[] {
    this.buffer += text;
    const events: string[] = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buffer);
      if (!m) break;
      // A lone '\r' at the end may be the first half of '\r\n' split across two network reads.
      if (m[0] === '\r' && m.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      this.acceptLine(line, events);
    }
    return events;
  }

  /** True when the stream stopped inside an event (an unterminated line or data without the blank line). */
  get hasPartialEvent(): boolean {
    return this.buffer.length > 0 || this.dataLines.length > 0;
  }

  private acceptLine(line: string, events: string[]): void {
    if (line === '') {
      if (this.dataLines.length > 0) events.push(this.dataLines.join('\n'));
      this.dataLines = [];
      return;
    }
    if (line.startsWith(':')) return; // comment / keep-alive
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') this.dataLines.push(value);
    // `event`, `id` and `retry` carry nothing the OpenAI completion stream uses.
  }
}

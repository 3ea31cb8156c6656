// Stop conditions: stop strings matched across token boundaries (never emitted; text that may start one is held back), stop ids, EOS.
import type { SamplingParams } from './types.ts';

export interface StopMatch {
  /** Text safe to emit now. */
  text: string;
  /** A stop string was found; `text` ends right before it and the sequence is over. */
  stopped: boolean;
}

/**
 * Watches a stream of text deltas for stop strings. Text that could be the beginning of a stop string
 * is held back until the next delta decides it, so a stop string is never emitted, even when it
 * straddles several tokens.
 */
export class StopStringMatcher {
  private held = '';
  private readonly stops: string[];

  constructor(stops: readonly string[]) {
    this.stops = stops.filter((s) => s.length > 0);
  }

  push(delta: string): StopMatch {
    if (this.stops.length === 0) return { text: delta, stopped: false };
    const text = this.held + delta;
    // The earliest occurrence of any stop string wins (held text never contains a whole one).
    let cut = -1;
    for (const s of this.stops) {
      const at = text.indexOf(s);
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      this.held = '';
      return { text: text.slice(0, cut), stopped: true };
    }
    const keep = this.longestStopPrefixSuffix(text);
    this.held = text.slice(text.length - keep);
    return { text: text.slice(0, text.length - keep), stopped: false };
  }

  /** The end of the stream: held text did not become a stop string after all. */
  flush(): string {
    const t = this.held;
    this.held = '';
    return t;
  }

  /** Length of the longest suffix of `text` that is a proper prefix of some stop string. */
  private longestStopPrefixSuffix(text: string): number {
    let best = 0;
    for (const s of this.stops) {
      for (let n = Math.min(s.length - 1, text.length); n > best; n--) {
        if (text.endsWith(s.slice(0, n))) {
          best = n;
          break;
        }
      }
    }
    return best;
  }
}

/** Whether a freshly sampled token id ends the sequence by itself (EOS unless ignored, or a stop id). */
export function isStopToken(tokenId: number, params: Pick<SamplingParams, 'ignoreEos' | 'stopTokenIds'>, eosId: number | null): boolean {
  if (!params.ignoreEos && eosId !== null && tokenId === eosId) return true;
  return params.stopTokenIds.includes(tokenId);
}

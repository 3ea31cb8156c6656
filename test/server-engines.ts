// The HTTP tests' engines: the same path as `mla-serve serve` (openServedEngines), real GPU runner, stories260K from ../shared.
import type { ServingEngine } from '../engine/types.ts';
import { openServedEngines, SHARED_STORIES } from '../server/serve-command.ts';
import type { ServeOptions } from '../server/serve-options.ts';

export interface TestEngines {
  engines: ServingEngine[];
  /** Each engine's checkpoint path (for the generate CLI). */
  sources: string[];
  maxQueue: number;
  close(): Promise<void>;
}

/** The default pair (stories260K and stories260K-mla, converted once and cached like `serve` does), or with gqaOnly just the first. */
export async function testEngines(opts: { maxQueue?: number; maxNumSeqs?: number; gqaOnly?: boolean } = {}): Promise<TestEngines> {
  const serve: ServeOptions = {
    models: opts.gqaOnly ? [SHARED_STORIES] : [],
    names: [],
    host: '127.0.0.1',
    port: 0,
    // 1 MiB: 100 blocks of 16 tokens for the GQA model (640 B/token); small, so leaks show.
    kvCacheMemory: 1024 * 1024,
    blockSize: 16,
    maxNumSeqs: opts.maxNumSeqs ?? 16,
    maxModelLen: 256,
    maxQueue: opts.maxQueue ?? 64,
    shutdownTimeout: 30,
  };
  const served = await openServedEngines(serve, () => {});
  return { engines: served.models.map((m) => m.engine), sources: served.models.map((m) => m.source), maxQueue: serve.maxQueue, close: () => served.close() };
}

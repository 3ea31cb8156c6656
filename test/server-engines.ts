// The HTTP tests' engines: the same path as `mla-serve serve` (openServedEngines), real GPU runner, stories260K from ../shared.
import type { ServingEngine } from '../engine/types.ts';
import { openServedEngines } from '../server/serve-command.ts';
import type { ServeOptions } from '../server/serve-options.ts';

export interface TestEngines {
  engines: ServingEngine[];
  maxQueue: number;
  close(): Promise<void>;
}

export async function testEngines(opts: { maxQueue?: number; maxNumSeqs?: number } = {}): Promise<TestEngines> {
  const serve: ServeOptions = {
    models: [],
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
  return { engines: served.models.map((m) => m.engine), maxQueue: serve.maxQueue, close: () => served.close() };
}

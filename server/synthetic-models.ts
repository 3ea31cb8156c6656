// `serve --synthetic NAME`: a random-weight model with a real configuration (model/synthetic.ts) and a byte-level
// tokenizer, served under NAME, so that load tests at real sizes (Qwen2.5-7B vs its MLA shape) need no weight files.
import { ByteTokenizer } from '../model/byte-tokenizer.ts';
import { SYNTHETIC_MODELS, syntheticF16Model, type SyntheticModelName } from '../model/synthetic.ts';
import type { LoadedModel } from '../model/load.ts';
import { UsageError } from './serve-options.ts';

/** What serve needs of a model: a LoadedModel without a file format. */
export type ServableModel = Pick<LoadedModel, 'config' | 'weights' | 'tokenizer' | 'path' | 'chatTemplate'>;

/** The source string a synthetic model is listed under (banner "from ..."), e.g. "synthetic:qwen2.5-7b". */
export const SYNTHETIC_PREFIX = 'synthetic:';

export function checkSyntheticName(name: string): SyntheticModelName {
  if (!(SYNTHETIC_MODELS as readonly string[]).includes(name)) {
    throw new UsageError(`--synthetic ${JSON.stringify(name)} is not a synthetic model; known: ${SYNTHETIC_MODELS.join(', ')}`);
  }
  return name as SyntheticModelName;
}

/**
 * Random f16 weights with the named configuration (one layer's values shared on the host, every layer its own GPU
 * buffers: see syntheticF16Model), seed 0, and a ByteTokenizer over its vocabulary. Qwen2.5-7B takes a few seconds
 * to generate and ~15 GB of GPU memory once uploaded.
 */
export function loadSyntheticModel(name: string, opts: { maxSeqLen?: number; seed?: number } = {}): ServableModel {
  const { config, weights } = syntheticF16Model(checkSyntheticName(name), { seed: opts.seed ?? 0 });
  if (opts.maxSeqLen !== undefined) config.maxSeqLen = opts.maxSeqLen;
  return {
    config,
    weights,
    tokenizer: new ByteTokenizer(config.vocabSize, config.bosId, config.eosId),
    path: `${SYNTHETIC_PREFIX}${name}`,
  };
}

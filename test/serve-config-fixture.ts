// resolveServeConfig over an in-memory set of config files, for the serve option tests.
import assert from 'node:assert/strict';
import { resolveServeConfig, type ResolvedServeConfig } from '../server/serve-options.ts';

/** A resolver that reads `--config` files from `files` (ENOENT for others) and fails on `--help`. */
export function configResolver(files: Record<string, string>): (argv: string[], env?: NodeJS.ProcessEnv) => ResolvedServeConfig {
  const readFile = (p: string) => {
    if (!(p in files)) throw new Error(`ENOENT: no such file, open '${p}'`);
    return files[p];
  };
  return (argv, env = {}) => {
    const r = resolveServeConfig(argv, env, readFile);
    assert.notEqual(r, 'help');
    return r as ResolvedServeConfig;
  };
}

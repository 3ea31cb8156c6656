// serve configuration without a GPU: precedence flags > env > file > defaults, zod-checked values with errors that name
// their source, JSON and YAML files, the redacted printout, and the constant-time Bearer check.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { bearerChecker } from '../server/app.ts';
import { describeConfig, resolveServeConfig, SERVE_ENV_VARS, SERVE_USAGE } from '../server/serve-options.ts';
import { configResolver } from './serve-config-fixture.ts';

const files: Record<string, string> = {
  'serve.yaml': 'port: 9100\nkv_cache_memory: 64MiB\nmodel: [a, b]\nname:\n  - A\n  - B\nmaxQueue: 7\napi-key: from-file\n',
  'serve.json': '{"port": 9200, "block-size": 32, "model": "x"}',
  'bad-key.yaml': 'prot: 8000\n',
  'bad-value.json': '{"max-num-seqs": 0}',
  'list-for-scalar.yaml': 'port: [1, 2]\n',
  'not-a-map.yaml': '- port\n',
};
const resolve = configResolver(files);

test('defaults with nothing given', () => {
  const { options, sources } = resolve([]);
  assert.deepEqual(options, {
    models: [],
    names: [],
    synthetic: [],
    host: '127.0.0.1',
    port: 8000,
    kvCacheMemory: 2 * 2 ** 30,
    blockSize: 16,
    maxNumSeqs: 64,
    maxNumBatchedTokens: 2048,
    maxModelLen: null,
    maxQueue: 256,
    shutdownTimeout: 30,
    apiKey: null,
    logLevel: 'info',
    weightDtype: 'f16',
    kvCacheDtype: 'f16',
    mlaInt8Attention: 'auto',
    mlaHeadKernel: 'auto',
    asyncScheduling: 'on',
    stepTrace: null,
  });
  assert.ok(Object.values(sources).every((s) => s === 'default'));
});

test('precedence: flag > env > file > default, per option', () => {
  const env = { MLA_SERVE_PORT: '9001', MLA_SERVE_MAX_QUEUE: '', MLA_SERVE_BLOCK_SIZE: '8', MLA_SERVE_MODEL: 'e1, e2', MLA_SERVE_SHUTDOWN_TIMEOUT: '5' };
  const { options, sources } = resolve(['--config', 'serve.yaml', '--port', '9002', '--shutdown-timeout', '0'], env);
  assert.equal(options.port, 9002);
  assert.equal(sources.port, 'flag --port');
  assert.equal(options.shutdownTimeout, 0);
  assert.equal(options.blockSize, 8);
  assert.equal(sources['block-size'], 'env MLA_SERVE_BLOCK_SIZE');
  // env beats the file for a list, comma-separated
  assert.deepEqual(options.models, ['e1', 'e2']);
  assert.deepEqual(options.names, ['A', 'B']);
  // an empty env value is unset: the file's (camelCase key) stands
  assert.equal(options.maxQueue, 7);
  assert.equal(sources['max-queue'], 'file serve.yaml');
  assert.equal(options.kvCacheMemory, 64 * 2 ** 20);
  assert.equal(options.apiKey, 'from-file');
  assert.equal(options.maxNumSeqs, 64);
  assert.equal(sources['max-num-seqs'], 'default');
  // the config file may itself come from the environment; JSON by extension
  const j = resolve([], { MLA_SERVE_CONFIG: 'serve.json' });
  assert.deepEqual([j.options.port, j.options.blockSize, j.options.models, j.configFile], [9200, 32, ['x'], 'serve.json']);
  // LOG_LEVEL is the fallback of MLA_SERVE_LOG_LEVEL
  assert.equal(resolve([], { LOG_LEVEL: 'warn' }).options.logLevel, 'warn');
  assert.equal(resolve([], { LOG_LEVEL: 'warn', MLA_SERVE_LOG_LEVEL: 'debug' }).options.logLevel, 'debug');
});

test('bad values: the error names the flag, variable or file key and the value', () => {
  assert.throws(() => resolve(['--block-size', '0']), /--block-size must be an integer >= 1; got "0"/);
  assert.throws(() => resolve(['--port', '70000']), /--port must be at most 65535; got "70000"/);
  assert.throws(() => resolve([], { MLA_SERVE_MAX_NUM_SEQS: '1.5' }), /MLA_SERVE_MAX_NUM_SEQS \(environment\) must be an integer >= 1; got "1.5"/);
  assert.throws(() => resolve([], { MLA_SERVE_KV_CACHE_MEMORY: 'lots' }), /MLA_SERVE_KV_CACHE_MEMORY \(environment\) "lots" is not a size/);
  assert.throws(() => resolve([], { MLA_SERVE_LOG_LEVEL: 'loud' }), /must be one of fatal, error, warn, info, debug, trace, silent; got "loud"/);
  assert.throws(() => resolve(['--config', 'bad-value.json']), /max-num-seqs in the config file bad-value.json must be an integer >= 1; got 0/);
  assert.throws(() => resolve(['--config', 'bad-key.yaml']), /unknown option 'prot'; known: model, name/);
  assert.throws(() => resolve(['--config', 'list-for-scalar.yaml']), /port in the config file list-for-scalar.yaml takes one value, not a list/);
  assert.throws(() => resolve(['--config', 'not-a-map.yaml']), /must be a mapping of option names/);
  assert.throws(() => resolve(['--config', 'missing.yaml']), /cannot read the config file missing.yaml: ENOENT/);
  assert.throws(() => resolve(['--api-key', '  ']), /--api-key must be a non-empty key/);
  assert.throws(() => resolve(['--name', 'a', '--name', 'b', '--name', 'c']), /3 --name for the 2 default models/);
  assert.throws(() => resolve(['--bogus']), /Unknown option '--bogus'/);
  assert.throws(() => resolve(['--async-scheduling', 'yes']), /--async-scheduling must be one of on, off; got "yes"/);
  assert.equal(resolve([], { MLA_SERVE_ASYNC_SCHEDULING: 'off' }).options.asyncScheduling, 'off');
  assert.equal(resolveServeConfig(['--help']), 'help');
});

test('the printout: one line per option with its source; the API key redacted; every env var in --help', () => {
  const r = resolve(['--api-key', 'sk-very-secret', '--kv-cache-memory', '1GiB'], { MLA_SERVE_PORT: '9005' });
  const text = describeConfig(r).join('\n');
  assert.ok(!text.includes('sk-very-secret'));
  assert.match(text, /api-key +<redacted> +\[flag --api-key\]/);
  assert.match(text, /port +9005 +\[env MLA_SERVE_PORT\]/);
  assert.match(text, /kv-cache-memory +1\.00 GiB \(1073741824 bytes\) +\[flag --kv-cache-memory\]/);
  assert.match(describeConfig(resolve([])).join('\n'), /api-key +\(none: no authentication\) +\[default\]/);
  for (const [flag, env] of Object.entries(SERVE_ENV_VARS)) {
    assert.ok(SERVE_USAGE.includes(`--${flag}`) && SERVE_USAGE.includes(env), `--help lacks --${flag} / ${env}`);
  }
  assert.match(SERVE_USAGE, /every request except GET \/health and\s+GET \/metrics/);
});

test('Bearer check: only the exact key after "Bearer " passes', () => {
  const ok = bearerChecker('k3y');
  assert.equal(ok('Bearer k3y'), true);
  assert.equal(ok('bearer k3y'), true); // the scheme is case-insensitive (RFC 7235)
  for (const bad of [undefined, '', 'k3y', 'Bearer', 'Bearer ', 'Bearer k3', 'Bearer k3yy', 'Bearer K3Y', 'Basic k3y', 'Bearerk3y']) {
    assert.equal(ok(bad), false, JSON.stringify(bad));
  }
});

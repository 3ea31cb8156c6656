// serve --weight-dtype / --kv-cache-dtype: precedence flags > env > file > defaults with errors naming their source,
// the startup printout, and on the real server (GPU runners, /metrics over HTTP parsed with bench/prom-text.ts) the
// dtypes each model runs with; an int8 KV cache a model's attention cannot store is refused at start.
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { modelLabels, modelValue, parsePromText, parsePromTypes } from '../bench/prom-text.ts';
import { gqaLayoutFor } from '../cache/kv-layout.ts';
import { MlaKvLayout } from '../cache/mla-layout.ts';
import { openGpu, releaseGpu } from '../kernels/device.ts';
import { hasInt8SubgroupMatrix } from '../kernels/matmul-int8.ts';
import { mlaTcOnTensorCores } from '../kernels/mla-attention-tc.ts';
import { kvValuesPerToken, type ModelConfig } from '../model/config.ts';
import { syntheticConfig } from '../model/synthetic.ts';
import { buildApp } from '../server/app.ts';
import { banner, checkKvCacheDtype, openServedEngines, SHARED_STORIES, type ServedEngines } from '../server/serve-command.ts';
import { attentionBlockFor, localBlockSize, mlaHeadOptions, mlaInt8AttentionProblem, mlaInt8Products, type CacheDtype } from '../server/local-runner.ts';
import { describeConfig, SERVE_USAGE, UsageError, type MlaInt8AttentionOption, type ServeOptions } from '../server/serve-options.ts';
import { configResolver } from './serve-config-fixture.ts';

const files: Record<string, string> = {
  'serve.yaml': 'weight_dtype: f32\nkv-cache-dtype: f32\n',
  'bad.json': '{"kvCacheDtype": "bf16"}',
};
const resolve = configResolver(files);

test('weight and KV cache dtypes: f16 by default', () => {
  const { options, sources } = resolve([]);
  assert.equal(options.weightDtype, 'f16');
  assert.equal(options.kvCacheDtype, 'f16');
  assert.equal(sources['weight-dtype'], 'default');
  assert.equal(sources['kv-cache-dtype'], 'default');
});

test('weight and KV cache dtypes: flag > MLA_SERVE_* env > config file > default', () => {
  // File alone.
  let r = resolve(['--config', 'serve.yaml']);
  assert.deepEqual([r.options.weightDtype, r.options.kvCacheDtype], ['f32', 'f32']);
  assert.equal(r.sources['weight-dtype'], 'file serve.yaml');
  // Env beats the file; an empty env value is unset.
  r = resolve(['--config', 'serve.yaml'], { MLA_SERVE_WEIGHT_DTYPE: 'int8', MLA_SERVE_KV_CACHE_DTYPE: ' ' });
  assert.deepEqual([r.options.weightDtype, r.options.kvCacheDtype], ['int8', 'f32']);
  assert.equal(r.sources['weight-dtype'], 'env MLA_SERVE_WEIGHT_DTYPE');
  assert.equal(r.sources['kv-cache-dtype'], 'file serve.yaml');
  // Flags beat both (case-insensitive like --log-level).
  r = resolve(['--config', 'serve.yaml', '--weight-dtype', 'F16', '--kv-cache-dtype', 'int8'], { MLA_SERVE_WEIGHT_DTYPE: 'int8', MLA_SERVE_KV_CACHE_DTYPE: 'f16' });
  assert.deepEqual([r.options.weightDtype, r.options.kvCacheDtype], ['f16', 'int8']);
  assert.equal(r.sources['weight-dtype'], 'flag --weight-dtype');
  assert.equal(r.sources['kv-cache-dtype'], 'flag --kv-cache-dtype');
});

test('weight and KV cache dtypes: a bad value names its flag, variable or file key and the choices', () => {
  assert.throws(() => resolve(['--weight-dtype', 'q4_0']), (e: Error) => e instanceof UsageError && /--weight-dtype must be one of f16, f32, int8; got "q4_0"/.test(e.message));
  assert.throws(
    () => resolve([], { MLA_SERVE_KV_CACHE_DTYPE: 'fp8' }),
    (e: Error) => e instanceof UsageError && /MLA_SERVE_KV_CACHE_DTYPE \(environment\) must be one of f16, f32, int8; got "fp8"/.test(e.message),
  );
  assert.throws(() => resolve(['--config', 'bad.json']), (e: Error) => e instanceof UsageError && /kv-cache-dtype in the config file bad\.json must be one of f16, f32, int8; got "bf16"/.test(e.message));
});

test('weight and KV cache dtypes: printed at start with their source, listed in the usage', () => {
  const lines = describeConfig(resolve(['--kv-cache-dtype', 'f32'], { MLA_SERVE_WEIGHT_DTYPE: 'int8' }));
  assert.ok(lines.some((l) => /^\s+weight-dtype\s+int8\s+\[env MLA_SERVE_WEIGHT_DTYPE\]$/.test(l)), lines.join('\n'));
  assert.ok(lines.some((l) => /^\s+kv-cache-dtype\s+f32\s+\[flag --kv-cache-dtype\]$/.test(l)), lines.join('\n'));
  assert.match(SERVE_USAGE, /--weight-dtype DTYPE[\s\S]*\[MLA_SERVE_WEIGHT_DTYPE\]/);
  assert.match(SERVE_USAGE, /--kv-cache-dtype DTYPE[\s\S]*\[MLA_SERVE_KV_CACHE_DTYPE\]/);
});

/** Whether the cache layout of `config` has an int8 row format (what an int8 cache needs). */
function hasInt8Rows(config: ModelConfig): boolean {
  const layout = config.attention === 'mla' ? new MlaKvLayout(config, 16, 'int8' as never) : gqaLayoutFor(config, 16, 'int8' as never);
  const l = layout as { int8?: unknown; latentInt8?: unknown };
  return l.int8 !== undefined || l.latentInt8 !== undefined;
}

test('--kv-cache-dtype int8: refused before upload, with the model named, where the attention has no int8 cache', () => {
  for (const name of ['tiny-qwen2', 'tiny-qwen2-mla'] as const) {
    const config = syntheticConfig(name);
    if (hasInt8Rows(config)) {
      assert.equal(checkKvCacheDtype(name, config, 'int8', 16), 'int8');
    } else {
      assert.throws(
        () => checkKvCacheDtype(name, config, 'int8', 16),
        (e: Error) => e instanceof UsageError && e.message.includes(`model '${name}' (${config.attention} attention`) && /--kv-cache-dtype f16 or f32/.test(e.message),
      );
    }
    for (const dtype of ['f16', 'f32'] as const) assert.equal(checkKvCacheDtype(name, config, dtype, 16), dtype);
  }
});

const serveOptions = (over: Partial<ServeOptions>): ServeOptions => ({
  models: [SHARED_STORIES],
  names: ['stories260K'],
  synthetic: ['tiny-qwen2-mla'],
  host: '127.0.0.1',
  port: 0,
  kvCacheMemory: 2 * 2 ** 20,
  blockSize: 16,
  maxNumSeqs: 4,
  maxModelLen: 256,
  maxQueue: 8,
  shutdownTimeout: 5,
  ...over,
});

let open: ServedEngines | undefined;
after(async () => {
  await open?.close();
  releaseGpu();
});

/** The server's /metrics, parsed; and a completion of 8 greedy tokens per model, so each runner has stepped. */
async function scrapeServed(served: ServedEngines) {
  const app = buildApp({ engines: served.models.map((m) => m.engine), ownsEngines: false });
  try {
    for (const m of served.models) {
      const res = await app.inject({ method: 'POST', url: '/v1/completions', payload: { model: m.name, prompt: 'Once upon a time', max_tokens: 8, temperature: 0, ignore_eos: true } });
      assert.equal(res.statusCode, 200, res.body);
      assert.equal(res.json().usage.completion_tokens, 8, res.body);
    }
    const res = await app.inject({ method: 'GET', url: '/metrics' });
    assert.equal(res.statusCode, 200);
    return { samples: parsePromText(res.body), types: parsePromTypes(res.body) };
  } finally {
    await app.close();
  }
}

test('serve with --weight-dtype int8 --kv-cache-dtype f32: /metrics reports the dtypes and int8 kernels per model', async () => {
  const served = (open = await openServedEngines(serveOptions({ weightDtype: 'int8', kvCacheDtype: 'f32' }), () => {}));
  const { samples, types } = await scrapeServed(served);
  assert.equal(types.get('mla_serve_model_info'), 'gauge');
  // The batched int8 GEMM runs on subgroup matrices exactly where the adapter offers i8×i8→i32 16×16×32.
  const configs = (served.gpu as { subgroupMatrixConfigs?: Array<{ componentType: string; resultComponentType: string; M: number; N: number; K: number }> }).subgroupMatrixConfigs ?? [];
  const tensorCores = configs.some((c) => c.componentType === 'i8' && c.resultComponentType === 'i32' && c.M === 16 && c.N === 16 && c.K === 32);
  for (const m of served.models) {
    const config = m.engine.info.config;
    assert.deepEqual(modelLabels(samples, 'vllm:cache_config_info', m.name), {
      model_name: m.name,
      block_size: '16',
      num_gpu_blocks: String(m.engine.stats().kv.numBlocks),
      cache_dtype: 'f32',
      attention: config.attention,
    });
    assert.deepEqual(modelLabels(samples, 'mla_serve_model_info', m.name), {
      model_name: m.name,
      attention: config.attention,
      weight_dtype: 'int8',
      cache_dtype: 'f32',
      int8_matmul: tensorCores ? 'gemv+w8a8-sm' : 'gemv+w8a8',
      attention_products: 'f32',
      head_products: config.attention === 'mla' ? 'f16' : 'none',
      adapter: served.gpu.adapterName,
    });
    assert.equal(modelValue(samples, 'mla_serve_model_info', m.name), 1);
    // The cache really is f32: 4 bytes per cached value.
    assert.equal(modelValue(samples, 'mla_serve_kv_cache_bytes_per_token', m.name), config.nLayers * kvValuesPerToken(config) * 4);
  }
  const lines = banner('http://127.0.0.1:0', served);
  for (const m of served.models) {
    const line = lines.find((l) => l.trimStart().startsWith(`${m.name} `))!;
    assert.match(line, /\(f32\); weights int8 \(int8 matmul gemv\+w8a8(-sm)?\); attention products f32; head products (f16|none);/);
  }
  await served.close();
  open = undefined;
});

test('serve with the defaults: f16 weights and cache, no int8 kernels, on /metrics', async () => {
  const served = (open = await openServedEngines(serveOptions({}), () => {}));
  const { samples } = await scrapeServed(served);
  for (const m of served.models) {
    const config = m.engine.info.config;
    assert.equal(modelLabels(samples, 'vllm:cache_config_info', m.name)?.cache_dtype, 'f16');
    const info = modelLabels(samples, 'mla_serve_model_info', m.name);
    assert.deepEqual([info?.weight_dtype, info?.cache_dtype, info?.int8_matmul], ['f16', 'f16', 'none']);
    assert.equal(modelValue(samples, 'mla_serve_kv_cache_bytes_per_token', m.name), config.nLayers * kvValuesPerToken(config) * 2);
  }
  await served.close();
  open = undefined;
});

test('serve --kv-cache-dtype int8 (--mla-int8-attention auto, the default, and three-pass): the MLA model computes its attention in int8 dot products, in one pass or three (on /metrics and in the banner; 8 greedy tokens served), the GQA model in f32', async () => {
  for (const [choice, mlaWant] of [[undefined, 'int8-dot4'], ['three-pass', 'int8-three-pass']] as const) {
    const served = (open = await openServedEngines(serveOptions({ kvCacheDtype: 'int8', ...(choice ? { mlaInt8Attention: choice } : {}) }), () => {}));
    const { samples } = await scrapeServed(served);
    const lines = banner('http://127.0.0.1:0', served);
    for (const m of served.models) {
      const want = m.engine.info.config.attention === 'mla' ? mlaWant : 'f32';
      const info = modelLabels(samples, 'mla_serve_model_info', m.name);
      assert.deepEqual([info?.cache_dtype, info?.attention_products], ['int8', want], `${m.name} with ${choice ?? 'auto'}`);
      assert.match(lines.find((l) => l.trimStart().startsWith(`${m.name} `))!, new RegExp(`; attention products ${want};`));
    }
    await served.close();
    open = undefined;
  }
});

test('--mla-int8-attention: auto by default (dot4 over an int8 cache, else f32), f32, dot4 or three-pass by flag or MLA_SERVE_MLA_INT8_ATTENTION; dot4 and three-pass without an int8 cache refused at start', async () => {
  assert.equal(resolve([]).options.mlaInt8Attention, 'auto');
  assert.equal(resolve(['--mla-int8-attention', 'f32']).options.mlaInt8Attention, 'f32');
  assert.equal(resolve([], { MLA_SERVE_MLA_INT8_ATTENTION: 'dot4' }).options.mlaInt8Attention, 'dot4');
  assert.equal(resolve(['--mla-int8-attention', 'three-pass']).options.mlaInt8Attention, 'three-pass');
  assert.throws(() => resolve(['--mla-int8-attention', 'fp8']), (e: Error) => e instanceof UsageError && /--mla-int8-attention must be one of auto, f32, dot4, three-pass, flash; got "fp8"/.test(e.message));
  // What each choice runs: [choice, cache dtype] → products.
  const cases: Array<[MlaInt8AttentionOption | undefined, CacheDtype, 'f32' | 'dot4' | 'three-pass']> = [
    ['three-pass', 'int8', 'three-pass'],
    ['auto', 'int8', 'dot4'],
    [undefined, 'int8', 'dot4'],
    ['f32', 'int8', 'f32'],
    ['dot4', 'int8', 'dot4'],
    ['auto', 'f16', 'f32'],
    ['auto', 'f32', 'f32'],
    [undefined, 'f16', 'f32'],
  ];
  for (const [choice, cache, want] of cases) assert.equal(mlaInt8Products(choice, cache), want, `${choice} over ${cache}`);
  const mla = syntheticConfig('tiny-qwen2-mla');
  assert.ok(attentionBlockFor(mla, 'int8', 'auto').attentionBlock, 'auto over an int8 cache builds the dot4 MLA block');
  assert.equal(attentionBlockFor(mla, 'int8', 'f32').attentionBlock, undefined);
  assert.equal(attentionBlockFor(syntheticConfig('tiny-qwen2'), 'int8', 'dot4').attentionBlock, undefined, 'GQA has no MLA block');
  await assert.rejects(
    openServedEngines(serveOptions({ mlaInt8Attention: 'dot4' }), () => {}),
    (e: Error) => e instanceof UsageError && /--mla-int8-attention dot4 computes on an int8 latent cache; add --kv-cache-dtype int8 \(the cache is f16\)/.test(e.message),
  );
});

test('--mla-int8-attention flash: the one-pass tensor-core kernel over an int8 cache of 32-token blocks; refused at start without the int8 cache, with 16-token blocks, and on an adapter without i8 subgroup matrices (SwiftShader), each saying why', async () => {
  assert.equal(resolve(['--mla-int8-attention', 'flash']).options.mlaInt8Attention, 'flash');
  assert.equal(mlaInt8Products('flash', 'int8'), 'flash');
  assert.equal(mlaInt8Products('flash', 'f16'), 'f32');
  assert.equal(mlaInt8AttentionProblem('flash', 'int8', 32), undefined);
  assert.equal(mlaInt8AttentionProblem('flash', 'int8', 64), undefined);
  assert.match(mlaInt8AttentionProblem('flash', 'int8', 16)!, /flash reads 32 cache rows at a time; use --block-size 32 \(or a multiple; it is 16\)/);
  // generate and eval-ppl pick their block size: 32 for flash.
  assert.deepEqual([localBlockSize('flash'), localBlockSize('dot4'), localBlockSize(undefined)], [32, 16, 16]);
  await assert.rejects(
    openServedEngines(serveOptions({ mlaInt8Attention: 'flash', blockSize: 32 }), () => {}),
    (e: Error) => e instanceof UsageError && /--mla-int8-attention flash computes on an int8 latent cache; add --kv-cache-dtype int8/.test(e.message),
  );
  await assert.rejects(
    openServedEngines(serveOptions({ mlaInt8Attention: 'flash', kvCacheDtype: 'int8' }), () => {}),
    (e: Error) => e instanceof UsageError && /use --block-size 32 \(or a multiple; it is 16\)/.test(e.message),
  );
  const g = await openGpu();
  const onTc = mlaTcOnTensorCores(g);
  if (!onTc) {
    await assert.rejects(
      openServedEngines(serveOptions({ mlaInt8Attention: 'flash', kvCacheDtype: 'int8', blockSize: 32 }), () => {}),
      /int8Products 'flash' needs i8 subgroup matrices and 32-wide subgroups; this adapter has none/,
    );
    return;
  }
  // Where the adapter has them (the H100 / H200): the MLA model serves with it and says so.
  const served = (open = await openServedEngines(serveOptions({ mlaInt8Attention: 'flash', kvCacheDtype: 'int8', blockSize: 32 }), () => {}));
  const { samples } = await scrapeServed(served);
  for (const m of served.models) {
    const info = modelLabels(samples, 'mla_serve_model_info', m.name);
    assert.equal(info?.attention_products, m.engine.info.config.attention === 'mla' ? 'int8-flash' : 'f32', m.name);
  }
  await served.close();
  open = undefined;
});

test('--mla-head-kernel: auto by default, staged, w8a8 or fused by flag or MLA_SERVE_MLA_HEAD_KERNEL; served with each but staged over an int8 cache, the MLA model reports its head products on /metrics and in the banner and serves 8 greedy tokens', async () => {
  assert.equal(resolve([]).options.mlaHeadKernel, 'auto');
  assert.equal(resolve(['--mla-head-kernel', 'w8a8']).options.mlaHeadKernel, 'w8a8');
  assert.equal(resolve([], { MLA_SERVE_MLA_HEAD_KERNEL: 'staged' }).options.mlaHeadKernel, 'staged');
  assert.equal(resolve(['--mla-head-kernel', 'fused']).options.mlaHeadKernel, 'fused');
  assert.throws(() => resolve(['--mla-head-kernel', 'int4']), (e: Error) => e instanceof UsageError && /--mla-head-kernel must be one of auto, staged, w8a8, fused; got "int4"/.test(e.message));
  const mla = syntheticConfig('tiny-qwen2-mla');
  assert.equal(attentionBlockFor(mla, 'f16', 'auto', 'auto').attentionBlock, undefined, 'f32 products and auto heads: the default block');
  assert.ok(attentionBlockFor(mla, 'f16', 'auto', 'w8a8').attentionBlock, 'w8a8 heads build the MLA block even with f32 products');
  assert.deepEqual(mlaHeadOptions('fused'), { frontMaxRows: 32, backMaxRows: 32 });
  assert.deepEqual(mlaHeadOptions('auto'), {});
  assert.equal(attentionBlockFor(syntheticConfig('tiny-qwen2'), 'f16', 'auto', 'w8a8').attentionBlock, undefined, 'GQA has no head products');
  for (const kernel of ['auto', 'w8a8', 'fused'] as const) {
    const served = (open = await openServedEngines(serveOptions({ weightDtype: 'int8', kvCacheDtype: 'int8', mlaHeadKernel: kernel }), () => {}));
    const { samples } = await scrapeServed(served);
    // auto: W_UK of steps up to 32 rows in the decode front; fused: W_UV in the decode back too; the staged f16
    // kernel above.
    const want = kernel === 'auto' ? 'front<=32+f16' : kernel === 'fused' ? 'fused<=32+f16' : hasInt8SubgroupMatrix(served.gpu) && served.gpu.subgroupSize === 32 ? 'w8a8-sm' : 'w8a8-dot4';
    const lines = banner('http://127.0.0.1:0', served);
    for (const m of served.models) {
      const heads = m.engine.info.config.attention === 'mla' ? want : 'none';
      assert.equal(modelLabels(samples, 'mla_serve_model_info', m.name)?.head_products, heads, `${kernel}: ${m.name}`);
      assert.match(lines.find((l) => l.trimStart().startsWith(`${m.name} `))!, new RegExp(`; head products ${heads.replace(/[+]/g, '\\+')};`));
    }
    await served.close();
    open = undefined;
  }
});

test('serve --kv-cache-dtype int8 with a model whose attention has no int8 cache: start fails naming it', async (t) => {
  const config = syntheticConfig('tiny-qwen2-mla');
  if (hasInt8Rows(config)) {
    t.skip('the MLA latent cache has an int8 row format in this build; nothing to refuse');
    return;
  }
  await assert.rejects(
    openServedEngines(serveOptions({ models: [], names: [], synthetic: ['tiny-qwen2', 'tiny-qwen2-mla'], kvCacheDtype: 'int8' }), () => {}),
    (e: Error) => e instanceof UsageError && /model 'tiny-qwen2-mla' \(mla attention, .*\) has no int8 KV cache in this build/.test(e.message),
  );
});

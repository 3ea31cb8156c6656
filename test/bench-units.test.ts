// Bench building blocks against hand-worked references: Prometheus text parsing, numpy-style percentiles, SSE splitting, chart ticks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parsePromText, modelValue, modelLabels, selectSamples, PromTextError } from '../bench/prom-text.ts';
import { mean, median, percentile, std } from '../bench/stats.ts';
import { SseParser } from '../bench/sse.ts';
import { niceTicks, escapeXml, lineChart, barChart } from '../bench/svg.ts';

const METRICS = `# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="stories260K"} 0.25
vllm:kv_cache_usage_perc{model_name="stories260K-mla"} 0.125
# TYPE mla_serve_preemptions_total counter
mla_serve_preemptions_total{model_name="stories260K",reason="blocks"} 3
mla_serve_preemptions_total{model_name="stories260K",reason="other"} 4
mla_serve_kv_cache_bytes_per_token{model_name="stories260K"} 1.28e3 1712345678000
vllm:cache_config_info{attention="mla",block_size="16",model_name="stories260K-mla", cache_dtype="f16"} 1
weird{path="a\\\\b",quote="say \\"hi\\"",nl="x\\ny"} -Inf
h_bucket{le="+Inf"} +Inf
nanny NaN
mla_serve_kv_cache_capacity_bytes 67108864
`;

test('Prometheus text: names with colons, labels with escapes, exponents, timestamps, Inf/NaN', () => {
  const samples = parsePromText(METRICS.replace(/\n/g, '\r\n'));
  assert.equal(samples.length, 10);
  assert.deepEqual(samples[0], { name: 'vllm:kv_cache_usage_perc', labels: { model_name: 'stories260K' }, value: 0.25 });
  assert.equal(modelValue(samples, 'vllm:kv_cache_usage_perc', 'stories260K-mla'), 0.125);
  // Counter with an extra label: the model's value is the sum of its series.
  assert.equal(modelValue(samples, 'mla_serve_preemptions_total', 'stories260K'), 7);
  assert.equal(modelValue(samples, 'mla_serve_kv_cache_bytes_per_token', 'stories260K'), 1280);
  assert.equal(modelValue(samples, 'mla_serve_kv_cache_bytes_per_token', 'stories260K-mla'), undefined);
  // An unlabelled single series stands for whichever model is asked (single-model server).
  assert.equal(modelValue(samples, 'mla_serve_kv_cache_capacity_bytes', 'anything'), 67108864);
  assert.deepEqual(modelLabels(samples, 'vllm:cache_config_info', 'stories260K-mla'), {
    attention: 'mla',
    block_size: '16',
    model_name: 'stories260K-mla',
    cache_dtype: 'f16',
  });
  const weird = selectSamples(samples, 'weird')[0];
  assert.deepEqual(weird.labels, { path: 'a\\b', quote: 'say "hi"', nl: 'x\ny' });
  assert.equal(weird.value, -Infinity);
  assert.equal(selectSamples(samples, 'h_bucket', { le: '+Inf' })[0].value, Infinity);
  assert.ok(Number.isNaN(selectSamples(samples, 'nanny')[0].value));
});

test('Prometheus text: a broken line is an error naming its line number', () => {
  assert.throws(() => parsePromText('ok 1\nbad{model_name="x} 1\n'), (e: Error) => e instanceof PromTextError && /line 2/.test(e.message));
  assert.throws(() => parsePromText('x{a="1"} 0x10\n'), /bad value 0x10/);
  assert.throws(() => parsePromText('x 1 2 3\n'), /value and an optional timestamp/);
  assert.throws(() => parsePromText('x{a="1" b="2"} 1\n'), /expected ',' or '}'/);
  assert.throws(() => parsePromText('x\n'), /expected a value/);
});

test('percentiles interpolate linearly between ranks like numpy.percentile', () => {
  const ten = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5];
  // numpy: percentile(range(1, 11), 99) = 9.91, 90 -> 9.1, 50 -> 5.5
  assert.ok(Math.abs(percentile(ten, 99) - 9.91) < 1e-12);
  assert.ok(Math.abs(percentile(ten, 90) - 9.1) < 1e-12);
  assert.equal(median(ten), 5.5);
  assert.equal(median([3, 1, 2]), 2);
  assert.equal(percentile([42], 99), 42);
  assert.equal(percentile([], 99), 0);
  assert.equal(mean([1, 2, 3, 6]), 3);
  // numpy.std([1, 2, 3, 6]) = sqrt(3.5)
  assert.ok(Math.abs(std([1, 2, 3, 6]) - Math.sqrt(3.5)) < 1e-12);
});

test('SSE: events split at any byte boundary, CRLF, comments and multi-line data', () => {
  const stream =
    ': keep-alive\r\n\r\ndata: {"a":1}\r\n\r\ndata: {"b":\ndata: 2}\n\nevent: x\nid: 7\ndata:[DONE]\n\n';
  const expected = ['{"a":1}', '{"b":\n2}', '[DONE]'];
  for (let cut = 0; cut <= stream.length; cut++) {
    for (const step of [1, 3, 7]) {
      const parser = new SseParser();
      const got: string[] = [...parser.push(stream.slice(0, cut))];
      for (let i = cut; i < stream.length; i += step) got.push(...parser.push(stream.slice(i, i + step)));
      assert.deepEqual(got, expected, `cut at ${cut}, step ${step}`);
      assert.equal(parser.hasPartialEvent, false);
    }
  }
  const partial = new SseParser();
  assert.deepEqual(partial.push('data: {"a":1}\n'), []);
  assert.equal(partial.hasPartialEvent, true);
  // A lone CR ends a line too (held back one read in case LF follows).
  const cr = new SseParser();
  assert.deepEqual(cr.push('data: x\r\r'), []);
  assert.deepEqual(cr.push('data: y\r\r'), ['x']);
});

test('chart ticks are round numbers covering the range; text is escaped', () => {
  assert.deepEqual(niceTicks(0, 0.8), [0, 0.2, 0.4, 0.6, 0.8]);
  assert.deepEqual(niceTicks(0, 437), [0, 100, 200, 300, 400, 500]);
  assert.deepEqual(niceTicks(0, 100), [0, 20, 40, 60, 80, 100]);
  assert.deepEqual(niceTicks(0, 0), [0, 0.2, 0.4, 0.6, 0.8, 1]);
  assert.equal(escapeXml('a<b & "c"'), 'a&lt;b &amp; &quot;c&quot;');
  const svg = lineChart({
    title: 'T <1>',
    xLabel: 's',
    yLabel: 'y',
    series: [{ name: 'gqa', color: '#000', points: [[0, 0], [1, 50], [2, 100]] }],
  });
  assert.match(svg, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
  assert.match(svg, /<title>T &lt;1&gt;<\/title>/);
  // y axis 0..100 over plot height 300 - 46 - 44 = 210: y(100) = 46, y(0) = 256; x spans 64..624.
  assert.match(svg, /points="64\.0,256\.0 344\.0,151\.0 624\.0,46\.0"/);
  const bars = barChart({ title: 'B', yLabel: 'ms', categories: ['p50', 'p99'], series: [{ name: 'm', color: '#111', values: [1, 2] }] });
  assert.equal((bars.match(/<rect class="bar"/g) ?? []).length, 2);
});

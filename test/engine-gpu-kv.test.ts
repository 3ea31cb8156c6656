// The engine over the GPU runner (SwiftShader here, f32), KV memory: preemption under a tight pool, prefix-cache hits.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { collect, samplingParams, STORY_STARTS } from './engine-helpers.ts';
import { useGpuEngineFixture } from './engine-gpu-fixture.ts';

// SwiftShader runs these kernels in software: requests are kept short so the file stays near a minute.
const { engineWith, prompt, encode, referenceGreedy, stepLog } = useGpuEngineFixture();

test('GPU: a KV pool too small forces preemptions; every request completes with the unconstrained text', async () => {
  // Three sequences of ~27 tokens need 2 blocks of 16 each at the end; the pool has 4.
  const reqs = STORY_STARTS.slice(0, 3).map((s, i) => ({ requestId: `p${i}`, promptTokens: prompt(s), params: samplingParams({ maxTokens: 20, ignoreEos: true }) }));
  const engine = await engineWith(4);
  const got = await Promise.all(reqs.map((r) => collect(engine, r)));
  for (const [i, r] of reqs.entries()) assert.deepEqual(got[i].tokenIds, referenceGreedy(r.promptTokens, 20, false), `request ${i}`);
  assert.ok(engine.stats().preemptions > 0, 'preemptions happened');
  assert.equal(engine.stats().kv.usedBlocks, 0);
  await engine.shutdown(0);
});

test('GPU: the second request with the same ~200-token prefix hits the prefix cache and prefills fewer rows', async () => {
  const engine = await engineWith(64);
  const seen = stepLog(engine);
  const story =
    'Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. One day, she saw a big tree with a swing. She ran to the swing and started to swing very high. Her friend Tom came to play too. They laughed and played all day. When the sun went down, Lily went home to her mom. Her mom gave her a big hug and a warm cup of milk. Lily was very happy. ' +
    'The next day, Tom had a red ball. He threw the ball to Lily and she caught it. They played catch until it was time for lunch. Mom made them sandwiches and they ate them under the tree.';
  const prefix = prompt(story);
  assert.ok(prefix.length >= 180, `prefix has ${prefix.length} tokens`);
  const a = await collect(engine, { requestId: 'a', promptTokens: [...prefix, ...encode(' The end.')], params: samplingParams({ maxTokens: 2 }) });
  const prefillA = seen[0].tokens;
  seen.length = 0;
  const bPrompt = [...prefix, ...encode(' Then they slept.')];
  const b = await collect(engine, { requestId: 'b', promptTokens: bPrompt, params: samplingParams({ maxTokens: 3 }) });
  const full = Math.floor(prefix.length / 16) * 16;
  assert.equal(a.finish.cachedPromptTokens, 0);
  assert.equal(b.finish.cachedPromptTokens, full);
  assert.equal(seen[0].tokens, bPrompt.length - full);
  assert.ok(seen[0].tokens < prefillA / 4, `${seen[0].tokens} prefill rows vs ${prefillA}`);
  assert.ok(engine.stats().prefixCacheHits >= full);
  assert.deepEqual(b.tokenIds, referenceGreedy(bPrompt, 3), 'cached prefix blocks give the reference continuation');
  await engine.shutdown(0);
});

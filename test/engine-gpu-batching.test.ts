// The engine over the GPU runner (SwiftShader here, f32), batching: 16 concurrent = one by one = float64 reference; 64 with
// aborts; sampled requests drawn on the GPU = drawn on the host.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { collect, samplingParams, STORY_STARTS } from './engine-helpers.ts';
import { useGpuEngineFixture } from './engine-gpu-fixture.ts';

// SwiftShader runs these kernels in software: requests are kept short so the file stays near a minute.
const { engineWith, prompt, referenceGreedy, stepLog } = useGpuEngineFixture();

test('GPU: 16 concurrent greedy requests give the one-by-one texts, in fewer steps', async () => {
  const reqs = STORY_STARTS.map((s, i) => ({ requestId: `r${i}`, promptTokens: prompt(s), params: samplingParams({ maxTokens: 6, ignoreEos: true }) }));
  const engine = await engineWith(64);
  const seen = stepLog(engine);
  // A few of them one by one on the GPU: each takes one step per generated token.
  const alone = [];
  for (const r of reqs.slice(0, 3)) alone.push(await collect(engine, { ...r, requestId: `solo-${r.requestId}` }));
  const soloSteps = seen.length;
  assert.equal(soloSteps, 3 * 6);
  seen.length = 0;
  const together = await Promise.all(reqs.map((r) => collect(engine, r)));
  assert.deepEqual(together.slice(0, 3).map((o) => o.text), alone.map((o) => o.text));
  for (const [i, r] of reqs.entries()) assert.deepEqual(together[i].tokenIds, referenceGreedy(r.promptTokens, 6, false), `request ${i}`);
  assert.equal(seen.length, 6, `16 requests batched ran ${seen.length} steps; one by one they take 16 × 6 = 96`);
  assert.equal(Math.max(...seen.map((s) => s.batchSize)), 16);
  assert.equal(engine.stats().kv.usedBlocks, 0);
  await engine.shutdown(0);
});

test('GPU: 64 concurrent requests with a third aborted mid-way; all others finish; used blocks return to zero', async () => {
  const engine = await engineWith(128, { maxNumSeqs: 64 });
  const acs = Array.from({ length: 64 }, () => new AbortController());
  const outs = await Promise.all(
    acs.map((ac, i) =>
      collect(
        engine,
        { requestId: `q${i}`, promptTokens: prompt(STORY_STARTS[i % 16]), params: samplingParams({ maxTokens: 4, ignoreEos: true }), signal: ac.signal },
        (n) => {
          if (i % 3 === 0 && n === 2) ac.abort();
        },
      ),
    ),
  );
  for (const [i, o] of outs.entries()) {
    if (i % 3 === 0) assert.deepEqual([o.finish.finishReason, o.tokenIds.length], ['abort', 2], `q${i}`);
    else assert.deepEqual([o.finish.finishReason, o.tokenIds.length], ['length', 4], `q${i}`);
  }
  assert.deepEqual(outs[1].tokenIds, referenceGreedy(prompt(STORY_STARTS[1]), 4, false));
  assert.deepEqual(outs[1].tokenIds, outs[17].tokenIds);
  const s = engine.stats();
  assert.equal(s.kv.usedBlocks, 0);
  assert.equal(s.running + s.waiting, 0);
  assert.equal(engine.healthy(), true);
  await engine.shutdown(0);
});

test('GPU: seeded sampled and penalized requests picked on the GPU give the tokens the host sampler picks from the read-back rows', async () => {
  const settings = [
    { temperature: 0.8, topP: 0.9 },
    { temperature: 1, topK: 20, presencePenalty: 0.8 },
    { temperature: 1.1, minP: 0.05, repetitionPenalty: 1.3 },
    { temperature: 0.7, topK: 40, topP: 0.95, minP: 0.01 },
  ];
  const reqs = STORY_STARTS.slice(0, 10).map((s, i) => ({
    requestId: `s${i}`,
    promptTokens: prompt(s),
    // Two greedy requests (one with a frequency penalty) among eight sampled ones, each with its own seed; two want
    // their logprobs (top 4).
    params: samplingParams({
      maxTokens: 8,
      ignoreEos: true,
      ...(i < 8 ? { ...settings[i % 4], seed: 100 + i } : i === 9 ? { frequencyPenalty: 1 } : {}),
      ...(i === 2 || i === 8 ? { logprobs: 4 } : {}),
    }),
  }));
  const run = async (samplePicks: boolean) => {
    const engine = await engineWith(64, { samplePicks });
    const outs = await Promise.all(reqs.map((r) => collect(engine, r)));
    assert.equal(engine.stats().kv.usedBlocks, 0);
    await engine.shutdown(0);
    return outs;
  };
  const onGpu = await run(true);
  const onHost = await run(false);
  assert.deepEqual(
    onGpu.map((o) => o.tokenIds),
    onHost.map((o) => o.tokenIds),
  );
  assert.ok(new Set(onGpu.map((o) => o.tokenIds.join())).size >= 8, 'the seeded requests should not all draw alike');
  // Logprobs computed on the GPU (f32) against the host's float64 log-softmax of the read-back rows.
  const lps = (o: (typeof onGpu)[number]) => o.events.flatMap((e) => (e.type === 'token' ? (e.logprobs ?? []) : []));
  for (const i of [2, 8]) {
    const [g, h] = [lps(onGpu[i]), lps(onHost[i])];
    assert.equal(g.length, 8);
    g.forEach((e, t) => {
      assert.equal(e.tokenId, h[t].tokenId);
      assert.ok(Math.abs(e.logprob - h[t].logprob) < 1e-4, `request ${i} token ${t}: ${e.logprob} vs ${h[t].logprob}`);
      assert.deepEqual(e.top.map((x) => x.tokenId), h[t].top.map((x) => x.tokenId), `request ${i} token ${t}`);
      e.top.forEach((x, a) => assert.ok(Math.abs(x.logprob - h[t].top[a].logprob) < 1e-4));
    });
  }
});

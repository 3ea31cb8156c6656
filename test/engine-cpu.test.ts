// The engine over the paged CPU runner (float64 reference ops): batching, preemption, prefix cache, aborts, seeds, stops, failures.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { CpuRunner } from '../engine/cpu-runner.ts';
import { createEngine, InvalidRequestError, type Engine } from '../engine/engine.ts';
import { QueueFullError, type ModelInfo, type StepObservation } from '../engine/types.ts';
import { loadModel, type LoadedModel } from '../model/load.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import type { GqaConfig } from '../model/config.ts';
import { argmax } from '../engine/sampler.ts';
import { collect, samplingParams, STORIES_GGUF, STORY_STARTS, type Outcome } from './engine-helpers.ts';

let model: LoadedModel;
let info: ModelInfo;

before(async () => {
  model = await loadModel(STORIES_GGUF, { maxSeqLen: 512 });
  info = { name: 'stories260K', config: model.config, tokenizer: model.tokenizer, maxModelLen: 512 };
});

function engineWith(numBlocks: number, opts: { maxBatchedTokens?: number; maxQueue?: number; maxNumSeqs?: number } = {}): Engine {
  const runner = new CpuRunner(model, { blockSize: 16, numBlocks });
  return createEngine({ runner, info, ...opts });
}

const prompt = (text: string) => [model.tokenizer.bosId!, ...model.tokenizer.encode(text)];

function stepCounter(engine: Engine): StepObservation[] {
  const seen: StepObservation[] = [];
  engine.onStep((o) => seen.push(o));
  return seen;
}

test('greedy through the engine equals the float64 reference, token for token', async () => {
  const engine = engineWith(64);
  const ids = prompt(STORY_STARTS[0]);
  const out = await collect(engine, { requestId: 'r', promptTokens: ids, params: samplingParams({ maxTokens: 40, ignoreEos: true }) });
  const ref = new ReferenceGqa(model.config as GqaConfig, model.weights);
  let logits = ref.forward(ids, { logits: 'last' })[0];
  const want: number[] = [];
  for (let i = 0; i < 40; i++) {
    want.push(argmax(logits));
    logits = ref.forward([want[i]])[0];
  }
  assert.deepEqual(out.tokenIds, want);
  assert.equal(out.text, model.tokenizer.decode([...ids, ...want]).slice(model.tokenizer.decode(ids).length));
  assert.equal(out.finish.finishReason, 'length');
  assert.equal(out.finish.completionTokens, 40);
  assert.equal(engine.heldBlocks(), 0);
  await engine.shutdown();
});

test('16 concurrent greedy requests: same texts as one by one, in fewer steps', async () => {
  const reqs = STORY_STARTS.map((s, i) => ({ requestId: `r${i}`, promptTokens: prompt(s), params: samplingParams({ maxTokens: 24 }) }));
  const solo = engineWith(64);
  const soloSteps = stepCounter(solo);
  const alone: Outcome[] = [];
  for (const r of reqs) alone.push(await collect(solo, r));
  await solo.shutdown();

  const batched = engineWith(64);
  const steps = stepCounter(batched);
  const together = await Promise.all(reqs.map((r) => collect(batched, r)));
  assert.deepEqual(together.map((o) => o.text), alone.map((o) => o.text));
  assert.deepEqual(together.map((o) => o.tokenIds), alone.map((o) => o.tokenIds));
  assert.ok(steps.length < soloSteps.length / 4, `${steps.length} batched steps vs ${soloSteps.length} one by one`);
  assert.equal(Math.max(...steps.map((s) => s.batchSize)), 16);
  assert.equal(batched.stats().steps, steps.length);
  assert.equal(batched.heldBlocks(), 0);
  await batched.shutdown();
});

test('a KV pool too small for all requests preempts, and every request still completes with the same text', async () => {
  const reqs = STORY_STARTS.slice(0, 8).map((s, i) => ({ requestId: `p${i}`, promptTokens: prompt(s), params: samplingParams({ maxTokens: 40, ignoreEos: true }) }));
  const roomy = engineWith(64);
  const want = await Promise.all(reqs.map((r) => collect(roomy, r)));
  await roomy.shutdown();
  // 8 sequences of ~50 tokens want ~32 blocks of 16; give them 12.
  const tight = engineWith(12);
  const got = await Promise.all(reqs.map((r) => collect(tight, r)));
  assert.deepEqual(got.map((o) => o.tokenIds), want.map((o) => o.tokenIds));
  assert.deepEqual(got.map((o) => o.text), want.map((o) => o.text));
  assert.ok(tight.stats().preemptions > 0, 'preemptions happened');
  assert.equal(tight.heldBlocks(), 0);
  await tight.shutdown();
});

test('prefix caching: a second request with the same ~200-token prefix hits the cache and runs fewer prefill rows', async () => {
  const engine = engineWith(64);
  const steps = stepCounter(engine);
  const story =
    'Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. One day, she saw a big tree with a swing. She ran to the swing and started to swing very high. Her friend Tom came to play too. They laughed and played all day. When the sun went down, Lily went home to her mom. Her mom gave her a big hug and a warm cup of milk. Lily was very happy.';
  const prefix = prompt(story);
  assert.ok(prefix.length >= 90, `prefix has ${prefix.length} tokens`);
  const a = await collect(engine, { requestId: 'a', promptTokens: [...prefix, ...model.tokenizer.encode(' The end.')], params: samplingParams({ maxTokens: 4 }) });
  const rowsA = steps.reduce((n, s) => n + s.tokens, 0);
  const firstStepA = steps[0].tokens;
  steps.length = 0;
  const bPrompt = [...prefix, ...model.tokenizer.encode(' Then she slept.')];
  const b = await collect(engine, { requestId: 'b', promptTokens: bPrompt, params: samplingParams({ maxTokens: 4 }) });
  const firstStepB = steps[0].tokens;
  const full = Math.floor(prefix.length / 16) * 16;
  assert.equal(a.finish.cachedPromptTokens, 0);
  assert.equal(b.finish.cachedPromptTokens, full, 'every full block of the shared prefix hit');
  assert.equal(firstStepB, bPrompt.length - full);
  assert.ok(firstStepB < firstStepA, `${firstStepB} prefill rows vs ${firstStepA}`);
  assert.ok(engine.stats().prefixCacheHits >= full);
  // The cached prefix must give the same continuation as computing it from scratch.
  const fresh = engineWith(64);
  const c = await collect(fresh, { requestId: 'c', promptTokens: bPrompt, params: samplingParams({ maxTokens: 4 }) });
  assert.deepEqual(b.tokenIds, c.tokenIds);
  assert.ok(rowsA > 0);
  await engine.shutdown();
  await fresh.shutdown();
});

test('64 concurrent requests with a third aborted mid-way: the rest finish and every block comes back', async () => {
  const engine = engineWith(256, { maxNumSeqs: 64 });
  const controllers = Array.from({ length: 64 }, () => new AbortController());
  const runs = controllers.map((ac, i) =>
    collect(
      engine,
      { requestId: `q${i}`, promptTokens: prompt(STORY_STARTS[i % 16]), params: samplingParams({ maxTokens: 12, ignoreEos: true }), signal: ac.signal },
      (n) => {
        if (i % 3 === 0 && n === 4) ac.abort();
      },
    ),
  );
  const outs = await Promise.all(runs);
  for (const [i, o] of outs.entries()) {
    if (i % 3 === 0) {
      assert.equal(o.finish.finishReason, 'abort', `q${i}`);
      assert.ok(o.tokenIds.length >= 4 && o.tokenIds.length < 12, `q${i} stopped early with ${o.tokenIds.length} tokens`);
    } else {
      assert.equal(o.finish.finishReason, 'length', `q${i}`);
      assert.equal(o.tokenIds.length, 12);
    }
  }
  // Requests with the same prompt give the same text whether neighbours were aborted or not.
  assert.deepEqual(outs[1].tokenIds, outs[17].tokenIds);
  const s = engine.stats();
  assert.equal(s.kv.usedBlocks, 0);
  assert.equal(s.running + s.waiting, 0);
  await engine.shutdown();
});

test('pipelined decode with picks on the runner: the texts of one step at a time with host sampling; early ends, an abort, sampled and penalized requests leave no blocks', async () => {
  type Watch = { pipelined: number; sampledPipelined: number; biasedPipelined: number; penalizedPipelined: number; inFlight: number; maxInFlight: number };
  const run = async (pipelineDecode: boolean, samplePicks: boolean) => {
    const runner = new CpuRunner(model, { blockSize: 16, numBlocks: 96 });
    const engine = createEngine({ runner, info, maxNumSeqs: 16, pipelineDecode, samplePicks });
    const watch: Watch = { pipelined: 0, sampledPipelined: 0, biasedPipelined: 0, penalizedPipelined: 0, inFlight: 0, maxInFlight: 0 };
    const realStep = runner.stepOutput.bind(runner);
    runner.stepOutput = (seqs) => {
      if (seqs.some((s) => s.previousPick !== undefined)) watch.pipelined++;
      if (seqs.some((s) => s.previousPick !== undefined && s.logits === 'sample')) watch.sampledPipelined++;
      if (seqs.some((s) => s.previousPick !== undefined && s.adjust && !s.adjust.pending)) watch.biasedPipelined++;
      if (seqs.some((s) => s.previousPick !== undefined && s.adjust?.pending)) watch.penalizedPipelined++;
      watch.maxInFlight = Math.max(watch.maxInFlight, ++watch.inFlight);
      const out = realStep(seqs);
      // Settles on a later turn, as a device step does, so that the engine can submit behind it.
      return new Promise((resolve, reject) => setTimeout(() => out.then(resolve, reject).finally(() => watch.inFlight--), 1));
    };
    const ac = new AbortController();
    const runs = Array.from({ length: 14 }, (_, i) => {
      // Lengths from 2 to 28 tokens, two with stop strings, one that may end on EOS, two sampled (top-p; top-k with min-p).
      const params = samplingParams({
        maxTokens: 2 + ((i * 5) % 27),
        ignoreEos: i !== 3,
        ...(i === 4 || i === 9 ? { stop: [' the'] } : {}),
        ...(i === 12 ? { temperature: 0.8, topP: 0.9, seed: 5, maxTokens: 10 } : {}),
        ...(i === 13 ? { temperature: 1.2, topK: 20, minP: 0.02, seed: 11, maxTokens: 24 } : {}),
        // Penalties follow the output: a pipelined row's input token (the pick in flight) is added on the runner.
        ...(i === 11 ? { presencePenalty: 0.7, frequencyPenalty: 0.5, repetitionPenalty: 1.2, maxTokens: 18 } : {}),
        ...(i === 10 ? { logitBias: new Map([[prompt(STORY_STARTS[10])[2], 2.5]]), maxTokens: 20 } : {}),
      });
      return collect(engine, { requestId: `p${i}`, promptTokens: prompt(STORY_STARTS[i % 16]), params, ...(i === 7 ? { signal: ac.signal } : {}) }, (n) => {
        if (i === 7 && n === 5) ac.abort();
      });
    });
    const outs = await Promise.all(runs);
    assert.equal(engine.heldBlocks(), 0, 'every block back');
    const s = engine.stats();
    assert.equal(s.running + s.waiting, 0);
    await engine.shutdown();
    return { outs, watch };
  };
  // One step at a time with every sampled row drawn on the host, against pipelined steps with draws on the runner:
  // the CPU runner draws in float64 with the request's next uniform, so even the sampled texts must agree.
  const plain = await run(false, false);
  const piped = await run(true, true);
  assert.equal(plain.watch.pipelined, 0);
  assert.equal(plain.watch.maxInFlight, 1);
  assert.ok(piped.watch.pipelined > 10, `only ${piped.watch.pipelined} pipelined steps`);
  assert.ok(piped.watch.sampledPipelined > 5, `only ${piped.watch.sampledPipelined} pipelined steps held a sampled row`);
  assert.ok(piped.watch.biasedPipelined > 3, `only ${piped.watch.biasedPipelined} pipelined steps held the biased row`);
  assert.ok(piped.watch.penalizedPipelined > 5, `only ${piped.watch.penalizedPipelined} pipelined steps held the penalized row`);
  assert.equal(piped.watch.maxInFlight, 2);
  for (const [i, o] of piped.outs.entries()) {
    const p = plain.outs[i];
    if (i === 7) {
      assert.equal(o.finish.finishReason, 'abort');
      assert.deepEqual(o.tokenIds, p.tokenIds.slice(0, o.tokenIds.length), 'the aborted request streamed the same tokens up to its end');
      continue;
    }
    assert.deepEqual([o.text, o.tokenIds, o.finish.finishReason, o.finish.completionTokens], [p.text, p.tokenIds, p.finish.finishReason, p.finish.completionTokens], `p${i}`);
  }
  assert.ok(piped.outs.some((o) => o.finish.finishReason === 'stop'), 'a stop string or EOS ended a request');
});

test('seeded sampling: the same seed gives the same text alone and in a batch; another seed differs', async () => {
  const params = (seed: number) => samplingParams({ temperature: 1, topP: 0.9, maxTokens: 24, seed, ignoreEos: true });
  const engine = engineWith(64);
  const ids = prompt(STORY_STARTS[3]);
  const alone = await collect(engine, { requestId: 's0', promptTokens: ids, params: params(7) });
  const crowd = await Promise.all([
    collect(engine, { requestId: 's1', promptTokens: prompt(STORY_STARTS[5]), params: params(1) }),
    collect(engine, { requestId: 's2', promptTokens: ids, params: params(7) }),
    collect(engine, { requestId: 's3', promptTokens: ids, params: params(8) }),
  ]);
  assert.equal(crowd[1].text, alone.text);
  assert.notDeepEqual(crowd[2].tokenIds, alone.tokenIds);
  await engine.shutdown();
});

test('stop strings end the request and are not emitted; logprobs come with each token', async () => {
  const engine = engineWith(64);
  const ids = prompt(STORY_STARTS[0]);
  const free = await collect(engine, { requestId: 'f', promptTokens: ids, params: samplingParams({ maxTokens: 40, ignoreEos: true }) });
  // A stop string that straddles tokens: the 3 characters around the 10th generated character.
  const stop = free.text.slice(9, 12);
  const cut = free.text.indexOf(stop);
  const stopped = await collect(engine, { requestId: 's', promptTokens: ids, params: samplingParams({ maxTokens: 40, ignoreEos: true, stop: [stop], logprobs: 3 }) });
  assert.equal(stopped.finish.finishReason, 'stop');
  assert.equal(stopped.text, free.text.slice(0, cut));
  const tokens = stopped.events.filter((e) => e.type === 'token');
  for (const e of tokens) {
    assert.ok(e.type === 'token' && e.logprobs && e.logprobs.length === 1);
    const lp = e.logprobs[0];
    assert.equal(lp.top.length, 3);
    assert.equal(lp.top[0].tokenId, lp.tokenId, 'greedy picks the most likely raw token');
    assert.ok(Math.abs(lp.top[0].logprob - lp.logprob) < 1e-12);
  }
  // Stop token ids: stop at the first generated id, which counts as a completion token but shows no text.
  const first = free.tokenIds[0];
  const byId = await collect(engine, { requestId: 'i', promptTokens: ids, params: samplingParams({ maxTokens: 40, stopTokenIds: [first] }) });
  assert.deepEqual(byId.tokenIds, [first]);
  assert.equal(byId.text, '');
  assert.equal(byId.finish.finishReason, 'stop');
  await engine.shutdown();
});

test('refusals: queue full, too long for the pool or context, bad ids', async () => {
  const engine = engineWith(4, { maxQueue: 2 });
  const p = samplingParams({ maxTokens: 8 });
  assert.throws(() => engine.generate({ requestId: 'big', promptTokens: prompt('Once'), params: samplingParams({ maxTokens: 70 }) }), (e: unknown) => e instanceof InvalidRequestError && /4 blocks × 16 = 64 tokens/.test(e.message));
  assert.throws(() => engine.generate({ requestId: 'ctx', promptTokens: prompt('Once'), params: samplingParams({ maxTokens: 600 }) }), /context of 512/);
  assert.throws(() => engine.generate({ requestId: 'id', promptTokens: [1, 9999], params: p }), /outside the vocabulary/);
  // Fill the waiting queue synchronously (the loop has not run yet).
  const a = collect(engine, { requestId: 'a', promptTokens: prompt('Once'), params: p });
  const b = collect(engine, { requestId: 'b', promptTokens: prompt('Once'), params: p });
  assert.throws(() => engine.generate({ requestId: 'c', promptTokens: prompt('Once'), params: p }), QueueFullError);
  await Promise.all([a, b]);
  await engine.shutdown();
});

test("greedy requests ask the runner for 'argmax' picks, sampled ones for 'sample' draws, with their bias, penalties and logprobs; the same tokens and logprobs as host sampling", async () => {
  const runner = new CpuRunner(model, { blockSize: 16, numBlocks: 64 });
  const engine = createEngine({ runner, info, pipelineDecode: false });
  const modes: string[] = [];
  const realStep = runner.stepOutput.bind(runner);
  runner.stepOutput = async (seqs) => {
    for (const s of seqs) if (s.logits !== 'none') modes.push(`${s.logits}${s.adjust ? '+adjust' : ''}${s.logprobs !== undefined ? `+logprobs ${s.logprobs}` : ''}`);
    return realStep(seqs);
  };
  const ids = prompt(STORY_STARTS[1]);
  const plain = await collect(engine, { requestId: 'g', promptTokens: ids, params: samplingParams({ maxTokens: 6, ignoreEos: true }) });
  assert.deepEqual(modes, Array(6).fill('argmax'));
  modes.length = 0;
  const withLogprobs = await collect(engine, { requestId: 'l', promptTokens: ids, params: samplingParams({ maxTokens: 6, ignoreEos: true, logprobs: 2 }) });
  assert.deepEqual(modes, Array(6).fill('argmax+logprobs 2'));
  // The GPU-side pick and the host's greedy sampler choose the same tokens.
  assert.deepEqual(withLogprobs.tokenIds, plain.tokenIds);
  // Sampled, penalized (greedy and sampled), biased: picks with their changes; the same tokens as host sampling.
  const cases = [
    { temperature: 0.9, topP: 0.95, seed: 3 },
    { presencePenalty: 1.5, frequencyPenalty: 0.5 },
    { temperature: 1.1, topK: 30, repetitionPenalty: 1.4, seed: 4 },
    { temperature: 0.8, logitBias: new Map([[ids[2], 3], [ids[3], -100]]), seed: 9 },
    { temperature: 0.7, logprobs: 3, presencePenalty: 0.3, seed: 5 },
  ];
  // Presence and frequency penalties have nothing to change before the first token.
  const wantModes = [
    Array(8).fill('sample'),
    ['argmax', ...Array(7).fill('argmax+adjust')],
    Array(8).fill('sample+adjust'),
    Array(8).fill('sample+adjust'),
    ['sample+logprobs 3', ...Array(7).fill('sample+adjust+logprobs 3')],
  ];
  const hostRunner = new CpuRunner(model, { blockSize: 16, numBlocks: 64 });
  const hostEngine = createEngine({ runner: hostRunner, info, samplePicks: false });
  const hostModes: string[] = [];
  const hostStep = hostRunner.stepOutput.bind(hostRunner);
  hostRunner.stepOutput = async (seqs) => {
    for (const s of seqs) if (s.logits !== 'none') hostModes.push(s.logits);
    return hostStep(seqs);
  };
  for (const [k, extra] of cases.entries()) {
    modes.length = 0;
    hostModes.length = 0;
    const p = samplingParams({ maxTokens: 8, ignoreEos: true, ...extra });
    const onRunner = await collect(engine, { requestId: `s${k}`, promptTokens: ids, params: p });
    const onHost = await collect(hostEngine, { requestId: `s${k}`, promptTokens: ids, params: p });
    assert.deepEqual(modes, wantModes[k], `case ${k}`);
    assert.deepEqual(hostModes, Array(8).fill('last'), `case ${k}`);
    assert.deepEqual(onRunner.tokenIds, onHost.tokenIds, `case ${k}`);
    // Logprobs (raw, top 3): the runner's equal the host's, entry for entry.
    const lps = (o: typeof onRunner) => o.events.flatMap((e) => (e.type === 'token' ? (e.logprobs ?? []) : []));
    assert.deepEqual(lps(onRunner), lps(onHost), `case ${k}`);
    if (k === 4) assert.equal(lps(onRunner).length, 8);
    if (k === 1) assert.ok(new Set(onRunner.tokenIds).size >= 6, `presence and frequency penalties should spread the greedy picks: ${onRunner.tokenIds}`);
  }
  await engine.shutdown();
  await hostEngine.shutdown();
});

test('a failing step makes the engine unhealthy and fails every request in flight', async () => {
  const runner = new CpuRunner(model, { blockSize: 16, numBlocks: 32 });
  const engine = createEngine({ runner, info });
  let calls = 0;
  const realStep = runner.stepOutput.bind(runner);
  runner.stepOutput = async (seqs) => {
    if (++calls === 3) throw new Error('device lost (test)');
    return realStep(seqs);
  };
  const runs = [0, 1].map((i) => collect(engine, { requestId: `x${i}`, promptTokens: prompt(STORY_STARTS[i]), params: samplingParams({ maxTokens: 20 }) }));
  const results = await Promise.allSettled(runs);
  for (const r of results) {
    assert.equal(r.status, 'rejected');
    assert.match(String((r as PromiseRejectedResult).reason), /device lost \(test\)/);
  }
  assert.equal(engine.healthy(), false);
  assert.throws(() => engine.generate({ requestId: 'y', promptTokens: [1], params: samplingParams() }), /unavailable after an engine failure/);
  await engine.shutdown(0);
});

test('n > 1 as n identical requests: the first computes the prompt, the others share its full blocks', async () => {
  const engine = engineWith(64);
  const ids = prompt('Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.');
  assert.ok(ids.length > 32, `${ids.length} prompt tokens`);
  const outs = await Promise.all([0, 1, 2, 3].map((i) => collect(engine, { requestId: `n${i}`, promptTokens: ids, params: samplingParams({ maxTokens: 8 }) })));
  const full = Math.floor((ids.length - 1) / 16) * 16;
  assert.deepEqual(outs.map((o) => o.finish.cachedPromptTokens), [0, full, full, full]);
  for (const o of outs) assert.deepEqual(o.tokenIds, outs[0].tokenIds);
  assert.equal(engine.heldBlocks(), 0);
  await engine.shutdown();
});

test('shutdown: stops admitting, lets short requests finish, aborts what outlives the deadline', async () => {
  const engine = engineWith(64);
  const short = collect(engine, { requestId: 'short', promptTokens: prompt('Once'), params: samplingParams({ maxTokens: 2, ignoreEos: true }) });
  const long = collect(engine, { requestId: 'long', promptTokens: prompt('Once'), params: samplingParams({ maxTokens: 500, ignoreEos: true }) });
  const done = engine.shutdown(50);
  assert.throws(() => engine.generate({ requestId: 'late', promptTokens: [1], params: samplingParams() }), /shutting down/);
  await done;
  const [s, l] = await Promise.all([short, long]);
  assert.equal(s.finish.finishReason, 'length');
  assert.equal(l.finish.finishReason, 'abort');
  assert.ok(l.tokenIds.length > 0 && l.tokenIds.length < 500);
  assert.equal(engine.heldBlocks(), 0);
});

// TransMLA calibration on the GPU runner (engine/calibration.ts) against the CPU float64 reference, on stories260K and
// real text: captured attention inputs, the Stage-1 and Stage-2 Gram matrices, and the converted model's perplexities.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openGpu, releaseGpu } from '../kernels/device.ts';
import { createGpuRunner } from '../engine/gpu-runner.ts';
import { gpuCalibration } from '../engine/calibration.ts';
import type { GqaConfig } from '../model/config.ts';
import { loadModel } from '../model/load.ts';
import { ReferenceGqa } from '../model/reference/gqa.ts';
import { ReferenceMla } from '../model/reference/mla.ts';
import { matvec } from '../model/reference/ops.ts';
import { referenceCalibration, type CalibrationDevice } from '../model/transmla/convert.ts';
import { GramAccumulator } from '../model/transmla/eigen.ts';
import { stage1 } from '../model/transmla/rorope.ts';
import { calibrationSplit, convertCheckpoint, parseConvertArgs, referenceScorer } from '../server/convert-command.ts';
import { relError } from './kernels-helpers.ts';

const STORIES = '../shared/models/stories260K/stories260K.gguf';
const TEXT = '../shared/data/tinystories_valid_a.txt';
const source = await loadModel(STORIES, { maxSeqLen: 512 });
if (source.config.attention !== 'gqa') throw new Error('stories260K should load as GQA');
const config: GqaConfig = source.config;
const text = readFileSync(TEXT, 'utf8');
const split = calibrationSplit(text, source.tokenizer, config.bosId, { maxLen: 512, calibSamples: 8, calibSeqLen: 96, evalChunks: 8, seed: 42 });
const gpu = await openGpu({ log: () => {} });
after(() => {
  gpu.destroy();
  releaseGpu();
});
const L = config.nKvHeads * config.headDim;
const cpu = referenceCalibration(referenceScorer);
const dev = gpuCalibration(gpu, { maxChunkLen: 512 });

/** Relative Frobenius distance. */
function relFro(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < want.length; i++) {
    num += (got[i] - want[i]) ** 2;
    den += want[i] ** 2;
  }
  return Math.sqrt(num / den);
}

async function keyGrams(device: CalibrationDevice): Promise<Float64Array[]> {
  const grams = Array.from({ length: config.nLayers }, () => new GramAccumulator(L));
  const m = await device.original(config, source.weights);
  await m.attnInputs(split.calib, (layer, xn, rows) => {
    const lw = source.weights.layers[layer];
    if (lw.kind !== 'gqa') throw new Error('gqa');
    for (let r = 0; r < rows; r++) grams[layer].add(matvec(lw.wk, xn.subarray(r * config.dim, (r + 1) * config.dim), lw.bk));
  });
  m.dispose();
  return grams.map((g) => g.matrix());
}

test('stepCapture: every layer\'s xn equals ReferenceGqa\'s, NaN-free, and the logits equal a plain step\'s', async () => {
  const runner = await createGpuRunner(gpu, source, { weightDtype: 'f32', cacheDtype: 'f32', blockSize: 16, numBlocks: 32 });
  const [a, b] = [split.calib[0].slice(0, 40), split.calib[1].slice(0, 23)];
  const seqs = [
    { tokens: a, startPos: 0, blockTable: [0, 1, 2], logits: 'all' as const },
    { tokens: b, startPos: 0, blockTable: [3, 4], logits: 'last' as const },
  ];
  const cap = await runner.stepCapture(seqs);
  const plain = await runner.step(seqs);
  assert.equal(cap.attnInputs.length, config.nLayers);
  assert.deepEqual(cap.logits, plain, 'capturing changed the logits');
  let worst = 0;
  let row = 0;
  for (const chunk of [a, b]) {
    const want: Float64Array[][] = Array.from({ length: config.nLayers }, () => []);
    new ReferenceGqa(config, source.weights).forward(chunk, { logits: 'last', observe: (o) => want[o.layer].push(o.xn) });
    for (let l = 0; l < config.nLayers; l++) {
      const got = cap.attnInputs[l];
      assert.equal(got.length, (a.length + b.length) * config.dim);
      for (const x of got) assert.ok(Number.isFinite(x), `layer ${l}: a captured value is ${x}`);
      for (let t = 0; t < chunk.length; t++) {
        const e = relError(got.subarray((row + t) * config.dim, (row + t + 1) * config.dim), want[l][t]);
        worst = Math.max(worst, e);
      }
    }
    row += chunk.length;
  }
  console.log(`xn max relative error ${worst.toExponential(2)}`);
  assert.ok(worst <= 1e-4, `captured xn differs from the reference by ${worst}`);
  runner.destroy();
});

test('GPU key Grams (Stage 1) and K/V Grams (Stage 2, Stage-1 model as full-rank MLA) equal the CPU reference\'s within 1e-4', async () => {
  const [g, c] = [await keyGrams(dev), await keyGrams(cpu)];
  const errs = g.map((x, l) => relFro(x, c[l]));
  console.log(`key Gram relative errors ${errs.map((e) => e.toExponential(2)).join(' ')}`);
  for (const e of errs) assert.ok(e <= 1e-4, `key Gram differs by ${e}`);

  const s1 = stage1(config, source.weights, c, 4, 2);
  const kv = async (device: CalibrationDevice) => {
    const grams = Array.from({ length: config.nLayers }, () => new GramAccumulator(2 * L));
    const m = await device.stage1(config, s1, 4);
    const z = new Float64Array(2 * L);
    await m.attnInputs(split.calib, (layer, xn, rows) => {
      const lw = s1.layers[layer];
      for (let r = 0; r < rows; r++) {
        const x = xn.subarray(r * config.dim, (r + 1) * config.dim);
        z.set(matvec(lw.wk, x, lw.bk), 0);
        z.set(matvec(lw.wv, x, lw.bv), L);
        grams[layer].add(z);
      }
    });
    m.dispose();
    return grams.map((x) => x.matrix());
  };
  const [gk, ck] = [await kv(dev), await kv(cpu)];
  const kvErrs = gk.map((x, l) => relFro(x, ck[l]));
  console.log(`K/V Gram relative errors ${kvErrs.map((e) => e.toExponential(2)).join(' ')}`);
  for (const e of kvErrs) assert.ok(e <= 1e-4, `K/V Gram differs by ${e}`);
});

test('convert --device gpu writes the checkpoint of --device cpu (tensors ≤ 1e-4, perplexities ≤ 1e-5, logits ≤ 1e-5 relative)', async () => {
  const tmp = mkdtempSync(join(tmpdir(), 'gpu-calib-'));
  try {
    const args = (out: string, device: string) => {
      const o = parseConvertArgs([
        '--model', STORIES, '--max-seq-len', '512', '--out', out, '--calib-text', TEXT, '--rope-dim', '4', '--kv-lora-rank', '16',
        '--freqfold', 'auto', '--fold-search-chunks', '4', '--calib-samples', '8', '--calib-seq-len', '96', '--eval-chunks', '6', '--dtype', 'f32', '--device', device,
      ]);
      if (o === 'help') throw new Error('help');
      return o;
    };
    const t0 = performance.now();
    const onGpu = await convertCheckpoint(args(join(tmp, 'gpu'), 'gpu'), undefined, gpu);
    const t1 = performance.now();
    const onCpu = await convertCheckpoint(args(join(tmp, 'cpu'), 'cpu'));
    console.log(`convert: gpu device ${((t1 - t0) / 1000).toFixed(1)} s, cpu ${((performance.now() - t1) / 1000).toFixed(1)} s`);
    assert.equal(onGpu.device, 'gpu');
    assert.equal(onCpu.device, 'cpu');
    const [rg, rc] = [onGpu.result.report, onCpu.result.report];
    assert.equal(rg.freqFold, rc.freqFold);
    rg.foldSearch.forEach((x, i) => assert.ok(Math.abs(x.perplexity - rc.foldSearch[i].perplexity) <= 1e-5 * rc.foldSearch[i].perplexity, `f=${x.fold} search`));
    const pg = rg.perplexity!;
    const pc = rc.perplexity!;
    for (const k of ['original', 'stage1', 'mla'] as const) {
      const e = Math.abs(pg[k] - pc[k]) / pc[k];
      console.log(`perplexity ${k}: gpu ${pg[k].toFixed(6)} cpu ${pc[k].toFixed(6)} (relative ${e.toExponential(2)})`);
      assert.ok(e <= 1e-5, `${k} perplexity: gpu ${pg[k]}, cpu ${pc[k]}`);
    }
    const [mg, mc] = [await loadModel(join(tmp, 'gpu')), await loadModel(join(tmp, 'cpu'))];
    assert.deepEqual(mg.config, mc.config);
    if (mg.config.attention !== 'mla' || mc.config.attention !== 'mla') throw new Error('the converted checkpoints should load as MLA');
    let worstTensor = 0;
    mg.weights.layers.forEach((l, i) => {
      const c = mc.weights.layers[i];
      if (l.kind !== 'mla' || c.kind !== 'mla') throw new Error('the converted layers should be MLA');
      for (const name of ['qProj', 'kvAProj', 'kvBProj', 'wo'] as const) {
        const e = relFro(l[name]!.data, c[name]!.data);
        worstTensor = Math.max(worstTensor, e);
        assert.ok(e <= 1e-4, `layer ${i} ${name} differs by ${e}`);
      }
    });
    const toks = [1, ...mg.tokenizer.encode('One day, Tom went to the park with his dog. They played all day.')];
    const lg = new ReferenceMla(mg.config, mg.weights).forward(toks);
    const lc = new ReferenceMla(mc.config, mc.weights).forward(toks);
    let worstLogit = 0;
    for (let t = 0; t < toks.length; t++) worstLogit = Math.max(worstLogit, relError(lg[t], lc[t]));
    console.log(`written tensors: worst relative Frobenius ${worstTensor.toExponential(2)}; logits of the two checkpoints: ${worstLogit.toExponential(2)}`);
    assert.ok(worstLogit <= 1e-5, `logits differ by ${worstLogit}`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

// Stop strings across token boundaries are never emitted; text that might start one is held back until decided.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isStopToken, StopStringMatcher } from '../engine/stop.ts';

function run(stops: string[], deltas: string[]): { out: string[]; stoppedAt: number } {
  const m = new StopStringMatcher(stops);
  const out: string[] = [];
  for (let i = 0; i < deltas.length; i++) {
    const r = m.push(deltas[i]);
    out.push(r.text);
    if (r.stopped) return { out, stoppedAt: i };
  }
  out.push(m.flush());
  return { out, stoppedAt: -1 };
}

test('a stop string split over three tokens is cut, text before it kept', () => {
  assert.deepEqual(run(['The End'], ['Once.', ' The', ' E', 'nd', ' more']), { out: ['Once.', ' ', '', ''], stoppedAt: 3 });
});

test('held text is released when it does not become a stop string', () => {
  assert.deepEqual(run(['END'], ['a E', 'N', 'x', 'y']), { out: ['a ', '', 'ENx', 'y', ''], stoppedAt: -1 });
  // At the end of the stream the held prefix comes out.
  assert.deepEqual(run(['END'], ['a', 'EN']), { out: ['a', '', 'EN'], stoppedAt: -1 });
});

test('the earliest of several stop strings wins, even inside one delta', () => {
  assert.deepEqual(run(['cat', 'at the'], ['look at the cat']), { out: ['look '], stoppedAt: 0 });
  assert.deepEqual(run(['\n\n', '.'], ['Hi', '!\n', '\nBye.']), { out: ['Hi', '!', ''], stoppedAt: 2 });
});

test('no stop strings: deltas pass through untouched', () => {
  assert.deepEqual(run([], ['a', 'b']), { out: ['a', 'b', ''], stoppedAt: -1 });
});

test('stop ids and EOS', () => {
  const p = { ignoreEos: false, stopTokenIds: [7] };
  assert.equal(isStopToken(2, p, 2), true);
  assert.equal(isStopToken(2, { ...p, ignoreEos: true }, 2), false);
  assert.equal(isStopToken(7, { ...p, ignoreEos: true }, 2), true);
  assert.equal(isStopToken(5, p, 2), false);
});

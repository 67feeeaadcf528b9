import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Backoff, BACKOFF_DEFAULTS, backoffDelay } from '../src/index.js';

test('the delay is full jitter under a ceiling that doubles per attempt up to the maximum', () => {
  const top = () => 1 - Number.EPSILON;
  assert.equal(backoffDelay(0, { random: () => 0 }), 0);
  assert.ok(Math.abs(backoffDelay(0, { random: top }) - 500) < 1e-6);
  assert.ok(Math.abs(backoffDelay(3, { random: top }) - 4000) < 1e-6);
  assert.ok(Math.abs(backoffDelay(6, { random: top }) - 30_000) < 1e-6);   // 32 s capped at 30 s
  assert.equal(backoffDelay(2, { random: () => 0.5, baseMs: 100, maxMs: 1000 }), 200);
  assert.equal(backoffDelay(5000, { random: () => 0.5 }), 15_000);   // no Infinity, no NaN
});

test('the defaults are those of the spec', () => {
  assert.deepEqual({ ...BACKOFF_DEFAULTS }, {
    baseMs: 500, maxMs: 30_000, resetAfterMs: 5_000, tryAgainLaterMs: 5_000, resumeJitterMs: 250,
  });
});

test('each retry counts an attempt; reset starts over', () => {
  const b = new Backoff({}, () => 0.5);
  assert.deepEqual([b.next(), b.next(), b.next(), b.next()], [250, 500, 1000, 2000]);
  b.reset();
  assert.equal(b.next(), 250);
});

test('try-again-later waits the minimum plus the jittered delay; a resume only its small jitter', () => {
  const b = new Backoff({}, () => 0.5);
  assert.equal(b.next('later'), 5000 + 250);
  assert.equal(b.next('later'), 5000 + 500);
  const attempts = b.attempt;
  assert.equal(b.next('resume'), 125);
  assert.equal(b.attempt, attempts, 'a resume does not count as a failed attempt');
});

test('bad backoff options are refused by name', () => {
  assert.throws(() => new Backoff({ base: 1 }), /unknown backoff option "base" \(known: baseMs, maxMs/);
  assert.throws(() => new Backoff({ maxMs: -1 }), /backoff.maxMs must be a number >= 0, got -1/);
  assert.throws(() => new Backoff({ baseMs: '5' }), /backoff.baseMs must be a number/);
});

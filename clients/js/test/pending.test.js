import assert from 'node:assert/strict';
import { test } from 'node:test';

import { ClosedError, PendingRequests, QueueFullError, RequestTimeoutError } from '../src/index.js';
import { ManualTimers } from './_support.js';

test('a reply settles the request with the same id; others are not replies', async () => {
  const timers = new ManualTimers();
  const p = new PendingRequests({ timers });
  const [id, sent, reply] = p.add({ op: 'get' }, 1000);
  assert.equal(sent.id, id);
  assert.equal(sent.op, 'get');
  const [id2] = p.add({ op: 'get' }, 1000);
  assert.notEqual(id, id2);
  assert.equal(p.settle({ id: 'nope' }), false);
  assert.equal(p.settle('text'), false);
  assert.equal(p.settle({ id, ok: true }), true);
  assert.deepEqual(await reply, { id, ok: true });
  assert.equal(p.size, 1);
  assert.equal(timers.pending.size, 1, 'the settled request timer is cleared');
});

test('the caller may choose the id and the field', async () => {
  const p = new PendingRequests({ idField: 'corr', timers: new ManualTimers() });
  const [id, sent, reply] = p.add({ corr: 7, op: 'x' }, 1000);
  assert.equal(id, 7);
  assert.deepEqual(sent, { corr: 7, op: 'x' });
  assert.throws(() => p.add({ corr: 7 }, 1000), /a request with corr 7 is waiting already/);
  assert.throws(() => p.add({ corr: {} }, 1000), /corr field must be a string or number/);
  p.settle({ corr: 7 });
  await reply;
});

test('no reply within the timeout rejects, and the request is forgotten', async () => {
  const timers = new ManualTimers();
  const p = new PendingRequests({ timers });
  const [id, , reply] = p.add({}, 250);
  assert.equal(timers.fire(250), 1);
  await assert.rejects(reply, (e) => e instanceof RequestTimeoutError && e.message.includes('within 250 ms'));
  assert.equal(p.size, 0);
  assert.equal(p.settle({ id }), false, 'a late reply answers nothing');
});

test('the number waiting is bounded', () => {
  const p = new PendingRequests({ maxPending: 2, timers: new ManualTimers() });
  p.add({}, 1000);
  p.add({}, 1000);
  assert.throws(() => p.add({}, 1000), (e) => e instanceof QueueFullError && /max 2/.test(e.message));
});

test('closing rejects everything waiting', async () => {
  const timers = new ManualTimers();
  const p = new PendingRequests({ timers });
  const [, , a] = p.add({}, 1000);
  const [, , b] = p.add({}, 1000);
  p.rejectAll('the client is closed');
  await assert.rejects(a, ClosedError);
  await assert.rejects(b, /the client is closed/);
  assert.equal(timers.pending.size, 0);
});

test('only plain objects are requests', () => {
  const p = new PendingRequests({ timers: new ManualTimers() });
  assert.throws(() => p.add('x', 1000), /request\(\) takes a plain object/);
  assert.throws(() => p.add([], 1000), /plain object/);
  assert.throws(() => p.add({}, 0), /timeout must be a number of ms > 0/);
});

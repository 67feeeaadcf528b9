import assert from 'node:assert/strict';
import { test } from 'node:test';

import { byteSize, OutboundQueue, QueueFullError } from '../src/index.js';

test('messages come out in order, counted in messages and UTF-8 bytes', () => {
  const q = new OutboundQueue({ maxMessages: 10, maxBytes: 100 });
  q.push('a');
  q.push('é');
  q.push(new Uint8Array([1, 2, 3]));
  assert.equal(q.length, 3);
  assert.equal(q.bytes, 1 + 2 + 3);
  assert.equal(q.shift(), 'a');
  assert.equal(q.shift(), 'é');
  assert.deepEqual([...q.shift()], [1, 2, 3]);
  assert.equal(q.shift(), undefined);
  assert.equal(q.bytes, 0);
});

test("overflow 'throw' refuses the new message and keeps the queue", () => {
  const q = new OutboundQueue({ maxMessages: 2, maxBytes: 100 });
  q.push('1');
  q.push('2');
  assert.throws(() => q.push('3'), (e) => e instanceof QueueFullError && /max 2 messages, 100 bytes/.test(e.message));
  const b = new OutboundQueue({ maxMessages: 100, maxBytes: 4 });
  b.push('abc');
  assert.throws(() => b.push('de'), QueueFullError);
  assert.equal(b.shift(), 'abc');
});

test("overflow 'dropOldest' pushes out the oldest, each reported", () => {
  const dropped = [];
  const q = new OutboundQueue({ maxMessages: 3, maxBytes: 5, overflow: 'dropOldest', onDrop: (d) => dropped.push(d) });
  for (const m of ['a', 'b', 'c', 'd']) {
    q.push(m);
  }
  assert.deepEqual(dropped, ['a']);
  q.push('xyz');   // 3 messages max: b goes (c, d, xyz: 5 bytes, fits)
  assert.deepEqual(dropped, ['a', 'b']);
  q.push('uvw');   // 5 bytes max: c, d and xyz go
  assert.deepEqual(dropped, ['a', 'b', 'c', 'd', 'xyz']);
  assert.deepEqual([q.shift(), q.shift()], ['uvw', undefined]);
});

test('a message larger than the whole queue is refused under either policy', () => {
  for (const overflow of ['throw', 'dropOldest']) {
    const q = new OutboundQueue({ maxMessages: 5, maxBytes: 3, overflow });
    q.push('ab');
    assert.throws(() => q.push('abcd'), /message of 4 bytes does not fit/);
    assert.equal(q.length, 1);
  }
});

test('a long queue stays correct across many pushes and shifts (bounded memory)', () => {
  const q = new OutboundQueue({ maxMessages: 4000, maxBytes: 1 << 20 });
  let out = 0;
  for (let i = 0; i < 10_000; i++) {
    q.push(String(i));
    if (i % 3 !== 0) {
      assert.equal(q.shift(), String(out++));
    }
  }
  while (q.length > 0) {
    assert.equal(q.shift(), String(out++));
  }
  assert.equal(out, 10_000);
  assert.ok(q.items.length === 0);
});

test('bad options and bad messages are refused clearly', () => {
  assert.throws(() => new OutboundQueue({ overflow: 'block' }), /overflow must be 'throw' or 'dropOldest'/);
  assert.throws(() => new OutboundQueue({ maxMessages: 1.5 }), /maxQueue must be an integer >= 0/);
  assert.throws(() => byteSize(42), /a message is a string, ArrayBuffer, typed array or Blob, got \[object Number\]/);
  assert.equal(byteSize(new ArrayBuffer(7)), 7);
});

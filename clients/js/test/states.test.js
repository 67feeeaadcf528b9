import assert from 'node:assert/strict';
import { test } from 'node:test';

import { advance, STATES } from '../src/index.js';

test('the four states and their moves', () => {
  assert.deepEqual([...STATES], ['connecting', 'open', 'reconnecting', 'closed']);
  assert.equal(advance('connecting', 'open'), 'open');
  assert.equal(advance('open', 'reconnecting'), 'reconnecting');
  assert.equal(advance('reconnecting', 'open'), 'open');
  for (const from of STATES) {
    if (from !== 'closed') {
      assert.equal(advance(from, 'closed'), 'closed');
    }
  }
  assert.equal(advance('closed', 'connecting'), 'connecting', 'connect() starts again');
});

test('a move not in the table throws', () => {
  assert.throws(() => advance('closed', 'open'), /invalid state transition closed -> open/);
  assert.throws(() => advance('connecting', 'reconnecting'), /invalid state transition/);
  assert.throws(() => advance('open', 'connecting'), /invalid state transition/);
  assert.throws(() => advance('open', 'open'), /invalid state transition/);
});

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { decide, handshakeStatus, resumeToken } from '../src/index.js';

const open = (code, reason = '') => decide({ code, reason, opened: true });
const refused = (status, extra = {}) => decide({ code: 1006, reason: '', opened: false, status, failures: 1, ...extra });

test('a drain close with a resume token resumes with it (1012, or 1001 when so configured)', () => {
  assert.deepEqual(open(1012, 'resume=abc.DEF-_'), { action: 'resume', token: 'abc.DEF-_' });
  assert.deepEqual(open(1001, 'resume=t'), { action: 'resume', token: 't' });
  assert.deepEqual(open(1012, 'service restart'), { action: 'retry', kind: 'retry' });
  assert.deepEqual(open(1012, 'resume='), { action: 'retry', kind: 'retry' });
});

test('close codes after an open: 1000 ends, 1008 needs a new token, 1013 waits longer, the rest back off', () => {
  assert.equal(open(1000).action, 'stop');
  assert.deepEqual(open(1008, 'token expired'), { action: 'refresh', why: 'policy violation (1008: token expired)' });
  assert.deepEqual(open(1013), { action: 'retry', kind: 'later' });
  for (const code of [1001, 1006, 1011, 1012, 4000]) {
    assert.deepEqual(open(code), { action: 'retry', kind: 'retry' }, `code ${code}`);
  }
});

test('a close the application asked for is final whatever the code', () => {
  assert.equal(decide({ code: 1012, reason: 'resume=x', opened: true, byUser: true }).action, 'stop');
});

test('handshake refusals with a known status', () => {
  assert.equal(refused(401).action, 'refresh');
  assert.equal(refused(403).action, 'refresh');
  assert.equal(refused(404).action, 'stop');
  assert.deepEqual(refused(503), { action: 'retry', kind: 'later' });
  assert.deepEqual(refused(429), { action: 'retry', kind: 'later' });
  assert.deepEqual(refused(502), { action: 'retry', kind: 'retry' });
});

test('without a status (browsers), failures in a row count as a refusal from refusalAfter on', () => {
  assert.equal(refused(null, { failures: 4, refusalAfter: 5 }).action, 'retry');
  const d = refused(null, { failures: 5, refusalAfter: 5 });
  assert.equal(d.action, 'refresh');
  assert.match(d.why, /5 handshakes in a row failed/);
  assert.equal(refused(null, { failures: 1000, refusalAfter: Infinity }).action, 'retry');
});

test('a refused resume falls back to a new session; a failing one after resumeAttempts', () => {
  assert.deepEqual(refused(410, { resuming: true }), { action: 'fresh', why: 'resume refused (HTTP 410)' });
  assert.equal(refused(401, { resuming: true }).action, 'fresh');
  assert.equal(refused(503, { resuming: true }).action, 'retry', 'a lease elsewhere or a replay being written: retry');
  assert.equal(refused(null, { resuming: true, failures: 2, resumeAttempts: 3 }).action, 'retry');
  assert.equal(refused(null, { resuming: true, failures: 3, resumeAttempts: 3 }).action, 'fresh');
});

test('the resume token and the handshake status are read from what the socket gives', () => {
  assert.equal(resumeToken('resume=a.b'), 'a.b');
  assert.equal(resumeToken('bye'), null);
  assert.equal(resumeToken(undefined), null);
  assert.equal(handshakeStatus('Unexpected server response: 401'), 401);
  assert.equal(handshakeStatus('connect ECONNREFUSED 127.0.0.1:1'), null);
  assert.equal(handshakeStatus(undefined), null);
});

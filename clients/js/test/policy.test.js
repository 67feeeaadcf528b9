import assert from 'node:assert/strict';
import { test } from 'node:test';

import { decide, handshakeStatus, RESUME_RETRY_REASON, resumeToken } from '../src/index.js';

const open = (code, reason = '') => decide({ code, reason, opened: true });
const refused = (status, extra = {}) => decide({ code: 1006, reason: '', opened: false, status, failures: 1, ...extra });

test('a drain close with a resume token resumes with it (1012, or 1001 when so configured)', () => {
  assert.deepEqual(open(1012, 'resume=abc.DEF-_'), { action: 'resume', token: 'abc.DEF-_' });
  assert.deepEqual(open(1001, 'resume=t'), { action: 'resume', token: 't' });
  assert.deepEqual(open(1012, 'service restart'), { action: 'retry', kind: 'retry', token: null });
  assert.deepEqual(open(1012, 'resume='), { action: 'retry', kind: 'retry', token: null });
});

test('close codes after an open: 1000 ends, 1008 needs a new token, 1013 waits longer, the rest back off', () => {
  assert.equal(open(1000).action, 'stop');
  assert.deepEqual(open(1008, 'token expired'), { action: 'refresh', why: 'policy violation (1008: token expired)' });
  assert.deepEqual(open(1013), { action: 'retry', kind: 'later', token: null });
  for (const code of [1001, 1006, 1011, 1012, 4000]) {
    assert.deepEqual(open(code), { action: 'retry', kind: 'retry', token: null }, `code ${code}`);
  }
});

test('a close the application asked for is final whatever the code', () => {
  assert.equal(decide({ code: 1012, reason: 'resume=x', opened: true, byUser: true }).action, 'stop');
});

test('handshake refusals with a known status', () => {
  assert.equal(refused(401).action, 'refresh');
  assert.equal(refused(403).action, 'refresh');
  assert.equal(refused(404).action, 'stop');
  assert.deepEqual(refused(503), { action: 'retry', kind: 'later', token: null });
  assert.deepEqual(refused(429), { action: 'retry', kind: 'later', token: null });
  assert.deepEqual(refused(502), { action: 'retry', kind: 'retry', token: null });
  assert.equal(refused(400).action, 'stop');
  assert.equal(refused(409).action, 'stop', "a backend's own refusal");
});

test('without a status (browsers), failures in a row count as a refusal from refusalAfter on', () => {
  assert.equal(refused(null, { failures: 4, refusalAfter: 5 }).action, 'retry');
  const d = refused(null, { failures: 5, refusalAfter: 5 });
  assert.equal(d.action, 'refresh');
  assert.match(d.why, /5 handshakes in a row failed/);
  assert.equal(refused(null, { failures: 1000, refusalAfter: Infinity }).action, 'retry');
});

test('a refused resume falls back to a new session; a failing one after resumeAttempts', () => {
  const held = { resumeToken: 'tok' };
  assert.deepEqual(refused(410, held), { action: 'fresh', why: 'resume refused (HTTP 410)' });
  assert.equal(refused(401, held).action, 'fresh');
  assert.deepEqual(refused(503, held), { action: 'retry', kind: 'retry', token: 'tok' },
    'a lease elsewhere or a replay being written: retry the resume');
  assert.deepEqual(refused(null, { ...held, failures: 2, resumeAttempts: 3 }), { action: 'retry', kind: 'retry', token: 'tok' });
  assert.equal(refused(null, { ...held, failures: 3, resumeAttempts: 3 }).action, 'fresh');
});

test("the gateway's 1013 after a resume that could not finish keeps the token; another 1013 does not", () => {
  const after = (reason) => decide({ code: 1013, reason, opened: true, resumeToken: 'tok' });
  assert.deepEqual(after(RESUME_RETRY_REASON), { action: 'retry', kind: 'later', token: 'tok' });
  assert.deepEqual(after('slow consumer'), { action: 'retry', kind: 'later', token: null });
});

test('the resume token and the handshake status are read from what the socket gives', () => {
  assert.equal(resumeToken('resume=a.b'), 'a.b');
  assert.equal(resumeToken('bye'), null);
  assert.equal(resumeToken(undefined), null);
  assert.equal(handshakeStatus('Unexpected server response: 401'), 401);
  assert.equal(handshakeStatus('connect ECONNREFUSED 127.0.0.1:1'), null);
  assert.equal(handshakeStatus(undefined), null);
});

// The client against a real WebSocket server (ws on 127.0.0.1), with the
// timers in the test's hands: every retry delay is read, then fired. The
// client's socket is the ws package's, passed in as the WebSocket option
// (react.test.js covers the import of ws when there is no global WebSocket,
// global-websocket.test.js the runtime's own).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { WebSocket } from 'ws';

import { ClosedError, GatewayClient, QueueFullError, RequestTimeoutError } from '../src/index.js';
import { deadUrl, echo, ManualTimers, next, startServer, until } from './_support.js';

const CONNECT_TIMEOUT = 99_999;   // distinct delays, so the test can tell the timers apart
const STABLE = 77_777;

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server.close();
});

function client(url, options = {}) {
  const timers = new ManualTimers();
  const c = new GatewayClient(url, {
    WebSocket, random: () => 0.5, timers, connectTimeoutMs: CONNECT_TIMEOUT,
    ...options, backoff: { resetAfterMs: STABLE, ...options.backoff },
  });
  return { c, timers };
}

/** A fresh server per test where the behaviour differs; echo otherwise. */
async function serverWith(onConnection) {
  const s = await startServer({ onConnection });
  after(() => s.close());
  return s;
}

/** Wait until the client has scheduled a retry of `ms`, then fire it. */
async function fireRetry(timers, ms) {
  await until(() => timers.has(ms), `a retry in ${ms} ms (scheduled: ${timers.delays.join(', ')})`);
  timers.fire(ms);
}

test('connects, echoes text and binary, and closes', async () => {
  const { c } = client(server.url);
  const states = [];
  c.on('state', ({ from, to }) => states.push(`${from}>${to}`));
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  c.send('hello');
  assert.equal(await next(c, 'message'), 'hello');
  c.send(new Uint8Array([1, 2, 250]));
  const bin = await next(c, 'message');
  assert.ok(bin instanceof ArrayBuffer);
  assert.deepEqual([...new Uint8Array(bin)], [1, 2, 250]);
  await c.close();
  assert.deepEqual(states, ['connecting>open', 'open>closed']);
  assert.throws(() => c.send('late'), ClosedError);
  await assert.rejects(c.request({}), ClosedError);
});

test('what is sent before the open is queued and goes out first, in order', async () => {
  const { c } = client(server.url, { maxQueue: 3 });
  c.send('q1');
  c.send('q2');
  c.send('q3');
  assert.throws(() => c.send('q4'), QueueFullError);
  assert.equal(c.queued, 3);
  const got = [];
  c.on('message', (m) => got.push(m));
  c.on('open', () => c.send('live'));
  await until(() => got.length === 4, 'four echoes');
  assert.deepEqual(got, ['q1', 'q2', 'q3', 'live']);
  assert.equal(c.queued, 0);
  await c.close();
});

test("overflow 'dropOldest' drops the oldest queued message and says so", async () => {
  const { c } = client(await deadUrl(), { maxQueue: 2, overflow: 'dropOldest', autoConnect: false });
  const dropped = [];
  c.on('dropped', ({ data }) => dropped.push(data));
  for (const m of ['a', 'b', 'c', 'd']) {
    c.send(m);
  }
  assert.deepEqual(dropped, ['a', 'b']);
  assert.equal(c.queued, 2);
  await c.close();
});

test('request() resolves with the reply carrying its id; other messages stay messages', async () => {
  const s = await serverWith(({ socket }) => {
    socket.on('message', (raw) => {
      const m = JSON.parse(raw.toString());
      socket.send(JSON.stringify({ note: 'unrelated' }));
      if (m.op !== 'ignore') {
        socket.send(JSON.stringify({ corr: m.corr, sum: m.a + m.b }));
      }
    });
  });
  const { c, timers } = client(s.url, { idField: 'corr' });
  const messages = [];
  c.on('message', (m) => messages.push(m));
  const [r1, r2] = await Promise.all([c.request({ a: 1, b: 2 }), c.request({ a: 10, b: 20, corr: 'mine' })]);
  assert.equal(r1.sum, 3);
  assert.deepEqual(r2, { corr: 'mine', sum: 30 });
  await until(() => messages.length === 2, 'the unrelated messages');
  assert.deepEqual(messages, ['{"note":"unrelated"}', '{"note":"unrelated"}']);
  const unanswered = c.request({ op: 'ignore' }, { timeoutMs: 1234 });
  await until(() => messages.length === 3, 'the request reached the server');
  timers.fire(1234);
  await assert.rejects(unanswered, RequestTimeoutError);
  const pending = assert.rejects(c.request({ op: 'ignore' }), ClosedError);
  await c.close();
  await pending;
});

test('a drain close (1012 resume=<token>) comes back at once with the token and the same credentials', async () => {
  const s = await serverWith((conn) => {
    echo(conn);
    if (s.connections.length === 1) {
      conn.socket.send('before');
      conn.socket.close(1012, 'resume=sess.tok-123');
    } else {
      conn.socket.send('after');
    }
  });
  const { c, timers } = client(s.url, { token: 'jwt-1' });
  const got = [];
  c.on('message', (m) => got.push(m));
  await next(c, 'open');
  const close = await next(c, 'close');
  assert.deepEqual(close, { code: 1012, reason: 'resume=sess.tok-123', willRetry: true });
  assert.equal(c.state, 'reconnecting');
  c.send('queued while away');
  await fireRetry(timers, 125);   // random 0.5 of the 250 ms resume jitter
  assert.deepEqual(await next(c, 'open'), { resumed: true });
  const url = s.connections[1].url;
  assert.equal(url.searchParams.get('resume'), 'sess.tok-123');
  assert.equal(url.searchParams.get('access_token'), 'jwt-1');
  assert.equal(s.connections[0].url.searchParams.get('resume'), null);
  await until(() => got.length === 3, 'three messages');
  assert.deepEqual(got, ['before', 'after', 'queued while away']);
  await c.close();
});

test('1013 backs off longer; 1006 with the normal backoff; each time a new session', async () => {
  const s = await serverWith((conn) => {
    const n = s.connections.length;
    if (n === 1) {
      conn.socket.close(1013, 'slow consumer');
    } else if (n === 2) {
      conn.socket.terminate();   // no close frame: 1006 at the client
    }
  });
  const { c, timers } = client(s.url);
  await next(c, 'open');
  assert.equal((await next(c, 'close')).code, 1013);
  await fireRetry(timers, 5000 + 250);
  await next(c, 'open');
  assert.deepEqual(await next(c, 'close'), { code: 1006, reason: '', willRetry: true });
  await fireRetry(timers, 500);   // second attempt: 0.5 of 1000
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  await c.close();
});

test('a connection that stays open resets the backoff; a short one does not', async () => {
  const s = await serverWith((conn) => {
    if (s.connections.length <= 2) {
      conn.socket.terminate();
    }
  });
  const { c, timers } = client(s.url);
  await next(c, 'close');
  await fireRetry(timers, 250);
  await next(c, 'close');
  await fireRetry(timers, 500);
  await next(c, 'open');
  assert.equal(timers.fire(STABLE), 1);
  s.connections[2].socket.terminate();
  await next(c, 'close');
  await fireRetry(timers, 250);
  await next(c, 'open');
  await c.close();
});

test('1000 from the server closes the client for good', async () => {
  const s = await serverWith(({ socket }) => socket.close(1000, 'done'));
  const { c } = client(s.url);
  assert.deepEqual(await next(c, 'close'), { code: 1000, reason: 'done', willRetry: false });
  assert.equal(c.state, 'closed');
  assert.match(c.closeReason, /1000/);
  assert.equal(s.connections.length, 1);
});

test('1008 does not retry without a new token', async () => {
  const s = await serverWith(({ socket }) => socket.close(1008, 'token expired'));
  const { c } = client(s.url, { token: 't1' });
  assert.deepEqual(await next(c, 'close'), { code: 1008, reason: 'token expired', willRetry: false });
  assert.equal(c.state, 'closed');
  assert.match(c.closeReason, /no getToken/);
  const same = client(s.url, { token: 't1', getToken: async () => 't1' }).c;
  assert.equal((await next(same, 'close')).willRetry, false);
  assert.match(same.closeReason, /getToken gave no new token/);
  assert.equal(s.connections.length, 2);
});

test('1008 with a getToken that yields a new token reconnects with it', async () => {
  const s = await serverWith((conn) => {
    if (conn.url.searchParams.get('access_token') === 'old') {
      conn.socket.close(1008, 'token expired');
    }
  });
  const tokens = ['old', 'new'];
  const { c, timers } = client(s.url, { getToken: () => Promise.resolve(tokens.shift()) });
  await next(c, 'open');
  assert.equal((await next(c, 'close')).willRetry, true);
  await fireRetry(timers, 250);
  await next(c, 'open');
  assert.deepEqual(s.connections.map((x) => x.url.searchParams.get('access_token')), ['old', 'new']);
  await c.close();
});

test('a refused handshake (401, status known from ws) does not retry without a new token', async () => {
  const s = await serverWith(echo);
  s.refuse = 401;
  const { c } = client(s.url, { token: 'bad' });
  const errors = [];
  c.on('error', (e) => errors.push(e.message));
  assert.deepEqual(await next(c, 'close'), { code: 1006, reason: '', willRetry: false });
  assert.equal(c.state, 'closed');
  assert.match(c.closeReason, /handshake refused \(HTTP 401\)/);
  assert.deepEqual(errors, ['Unexpected server response: 401']);
  assert.equal(s.handshakes.length, 1);
});

test('without a status, refusalAfter failures in a row count as a refusal', async () => {
  const { c, timers } = client(await deadUrl(), { refusalAfter: 3 });
  await next(c, 'close');
  await fireRetry(timers, 250);
  await next(c, 'close');
  await fireRetry(timers, 500);
  const last = await next(c, 'close');
  assert.equal(last.willRetry, false);
  assert.match(c.closeReason, /3 handshakes in a row failed/);
});

test('a refused resume (410) falls back to a new session and tells the application', async () => {
  const s = await serverWith((conn) => {
    if (s.connections.length === 1) {
      conn.socket.close(1012, 'resume=used');
      s.refuse = 410;
    }
  });
  const { c, timers } = client(s.url);
  await next(c, 'open');
  await next(c, 'close');
  await fireRetry(timers, 125);
  const failed = next(c, 'resumeFailed');
  await until(() => s.handshakes.length === 2, 'the resume attempt');
  s.refuse = null;
  assert.deepEqual(await failed, { reason: 'resume refused (HTTP 410)' });
  await fireRetry(timers, 125);
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  assert.deepEqual(s.handshakes.map((u) => new URL(u, 'ws://x').searchParams.get('resume')), [null, 'used', null]);
  await c.close();
});

test('the token can travel as a bearer subprotocol; a url function is asked each attempt', async () => {
  const urls = [server.url];
  const { c } = client(() => urls[0], { token: 'abc.def', tokenIn: 'subprotocol', protocols: ['chat.v1'] });
  await next(c, 'open');
  const conn = server.connections.at(-1);
  assert.deepEqual(conn.protocols.split(/,\s*/), ['chat.v1', 'bearer.abc.def']);
  assert.equal(conn.url.searchParams.get('access_token'), null);
  await c.close();
});

test('for await reads the messages and ends when the client closes', async () => {
  const { c } = client(server.url);
  c.send('1');
  c.send('2');
  const seen = [];
  for await (const m of c) {
    seen.push(m);
    if (seen.length === 2) {
      c.close();
    }
  }
  assert.deepEqual(seen, ['1', '2']);
});

test('a loop that falls behind its bound fails instead of growing', async () => {
  const { c } = client(server.url);
  const stream = c.messages({ maxBuffered: 2 });
  for (const m of ['1', '2', '3']) {
    c.send(m);
  }
  await until(() => stream.done, 'the overflow');
  assert.equal((await stream.next()).value, '1');
  assert.equal((await stream.next()).value, '2');
  await assert.rejects(stream.next(), /more than 2 messages unread/);
  await c.close();
});

test('bad options and event names are refused by name', () => {
  assert.throws(() => new GatewayClient('ws://x', { tokn: 'a' }), /unknown option "tokn" \(known: token, getToken/);
  assert.throws(() => new GatewayClient('ws://x', { tokenIn: 'header' }), /tokenIn must be 'query' or 'subprotocol'/);
  assert.throws(() => new GatewayClient(42), /url must be a string, a URL or a function/);
  const c = new GatewayClient('ws://127.0.0.1:1/', { autoConnect: false });
  assert.throws(() => c.on('opened', () => {}), /unknown event "opened" \(known: state, open, message/);
  assert.throws(() => c.send(42), TypeError);
  c.close();
});

test('what no retry can mend closes the client with the error: a malformed URL, a refused subprotocol', async () => {
  const errors = [];
  const bad = new GatewayClient('not a url', { WebSocket });
  bad.on('error', (e) => errors.push(e.message));
  await until(() => bad.state === 'closed', 'closed');
  assert.match(bad.closeReason, /Invalid URL/);
  const none = new GatewayClient(server.url, { WebSocket, protocols: ['x y'] });
  await until(() => none.state === 'closed', 'closed');
  assert.match(none.closeReason, /invalid or duplicated subprotocol/);
  assert.equal(errors.length, 1);
});

test('a getToken that fails is an attempt that failed, retried with backoff', async () => {
  let calls = 0;
  const { c, timers } = client(server.url, {
    getToken: async () => {
      calls += 1;
      if (calls === 1) {
        throw new Error('token service unreachable');
      }
      return 'good';
    },
  });
  const error = await next(c, 'error');
  assert.equal(error.message, 'token service unreachable');
  await fireRetry(timers, 250);
  await next(c, 'open');
  assert.equal(server.connections.at(-1).url.searchParams.get('access_token'), 'good');
  await c.close();
});

test('until a first open the client stays connecting; once closed, connect() starts again', async () => {
  const dead = await deadUrl();
  let target = dead;
  const { c, timers } = client(() => target, { refusalAfter: 2 });
  const states = [];
  c.on('state', ({ from, to }) => states.push(`${from}>${to}`));
  await next(c, 'close');
  assert.equal(c.state, 'connecting');
  await fireRetry(timers, 250);
  await until(() => c.state === 'closed', 'closed after two failures');
  target = server.url;
  c.connect();
  await next(c, 'open');
  assert.deepEqual(states, ['connecting>closed', 'closed>connecting', 'connecting>open']);
  await c.close();
});

test("the gateway's 1013 'resume failed; retry' after a resume: the token is presented again", async () => {
  const s = await serverWith((conn) => {
    const n = s.connections.length;
    if (n === 1) {
      conn.socket.close(1012, 'resume=tok');
    } else if (n === 2) {
      conn.socket.close(1013, 'resume failed; retry');
    }
  });
  const { c, timers } = client(s.url);
  await next(c, 'open');
  await next(c, 'close');
  await fireRetry(timers, 125);
  assert.deepEqual(await next(c, 'close'), { code: 1013, reason: 'resume failed; retry', willRetry: true });
  await fireRetry(timers, 5000 + 250);
  assert.deepEqual(await next(c, 'open'), { resumed: true });
  assert.deepEqual(s.connections.map((x) => x.url.searchParams.get('resume')), [null, 'tok', 'tok']);
  await c.close();
});

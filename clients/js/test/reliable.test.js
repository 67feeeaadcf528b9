// Reliable mode (docs/reliable.md): its frames and counts as units, then the
// client against a real ws server on 127.0.0.1 that speaks the wire format by
// hand (the hello, kind bytes, acks, a resume's `last=`), with the client's
// timers in the test's hands.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { WebSocket } from 'ws';

import { decide, GatewayClient, GatewayError, QueueFullError } from '../src/index.js';
import { decodeFrame, encodeData, parseAck, parseHello, ReliableSession } from '../src/reliable.js';
import { ACK_MS, ManualTimers, next, reliableServer, until } from './_support.js';

const CONNECT_TIMEOUT = 99_999;
const STABLE = 77_777;
const RESUME_DELAY = 125; // random 0.5 x resumeJitterMs 250
const RETRY_DELAY = 250;  // random 0.5 x baseMs 500

test('frames: the kind byte on text and binary, acks and hellos read strictly', async () => {
  assert.equal(encodeData('hi'), 'dhi');
  assert.deepEqual([...encodeData(new Uint8Array([1, 2]))], [0x64, 1, 2]);
  assert.deepEqual([...encodeData(new Uint16Array([0x0201]).subarray(0, 1))], [0x64, 1, 2]);
  assert.deepEqual([...encodeData(new Uint8Array([9, 1, 2, 7]).subarray(1, 3))], [0x64, 1, 2]);
  assert.deepEqual([...encodeData(new ArrayBuffer(2))], [0x64, 0, 0]);
  const blob = encodeData(new Blob([new Uint8Array([5])]));
  assert.deepEqual([...new Uint8Array(await blob.arrayBuffer())], [0x64, 5]);
  assert.deepEqual(decodeFrame('dx'), { kind: 'd', payload: 'x' });
  assert.deepEqual(decodeFrame('a12'), { kind: 'a', payload: '12' });
  assert.equal(decodeFrame('x1'), null);
  assert.equal(decodeFrame(''), null);
  const bin = decodeFrame(new Uint8Array([0x64, 7, 8]).buffer);
  assert.equal(bin.kind, 'd');
  assert.deepEqual([...new Uint8Array(bin.payload)], [7, 8]);
  assert.equal(decodeFrame(new Uint8Array([0x61, 0x31]).buffer), null, 'an ack is text');
  assert.equal(parseAck('41'), 41);
  for (const bad of ['', '-1', '1.5', ' 1', '12345678901234567890']) {
    assert.equal(parseAck(bad), null, bad);
  }
  const h = parseHello('{"v":1,"session":"s","token":"s.x","up":4,"down":2}');
  assert.deepEqual(h, { session: 's', token: 's.x', up: 4, down: 2, ackEvery: 64, ackMs: 200 });
  assert.equal(parseHello('{"v":1,"token":"t","up":0,"down":0,"ack_every":3,"ack_ms":50}').ackEvery, 3);
  for (const bad of ['nope', '{"v":2,"token":"t","up":0,"down":0}', '{"v":1,"up":0,"down":0}',
    '{"v":1,"token":"t","up":-1,"down":0}', '{"v":1,"token":"t","up":0,"down":1.5}',
    '{"v":1,"token":"t","up":0,"down":0,"ack_every":0}']) {
    assert.throws(() => parseHello(bad), GatewayError, bad);
  }
});

test('policy: with a hello token every unplanned close resumes; 1000 and 1008 do not', () => {
  const rel = (code, reason = '') => decide({ code, reason, opened: true, reliableToken: 'h.t' });
  for (const code of [1006, 1001, 1011, 1012, 1002, 4000]) {
    assert.deepEqual(rel(code), { action: 'resume', token: 'h.t' }, `code ${code}`);
  }
  assert.deepEqual(rel(1012, 'resume=drain.t'), { action: 'resume', token: 'drain.t' }, "a drain's token first");
  assert.deepEqual(rel(1013), { action: 'retry', kind: 'later', token: 'h.t' });
  assert.equal(rel(1000).action, 'stop');
  assert.equal(rel(1008, 'token expired').action, 'refresh');
  const refused = (status) => decide({ code: 1006, reason: '', opened: false, status, resumeToken: 'h.t', failures: 1 });
  assert.deepEqual(refused(400), { action: 'fresh', why: 'resume refused (HTTP 400)' }, 'last out of range');
  assert.deepEqual(refused(410), { action: 'fresh', why: 'resume refused (HTTP 410)' }, 'window, overflowed');
  assert.deepEqual(refused(503), { action: 'retry', kind: 'retry', token: 'h.t' }, 'a half-open take-over still running');
});

function session(options = {}) {
  const dropped = [];
  const timers = new ManualTimers();
  const rel = new ReliableSession({
    queue: { maxMessages: 1000, maxBytes: 1 << 20, overflow: 'throw', onDrop: (d) => dropped.push(d), ...options },
    timers,
  });
  return { rel, dropped, timers };
}

const hello = (up, down, extra = {}) => ({ session: 's', token: `t${up}.${down}`, up, down, ackEvery: 64, ackMs: 200,
  ...extra });

test('session: kept until acked, the rest sent again after a hello, counts checked', () => {
  const { rel } = session();
  const wire = [];
  rel.send('m1');   // not live: kept, not written
  assert.equal(rel.unsent, 1);
  assert.equal(rel.check(hello(0, 0), false), null);
  rel.start(hello(0, 0), (w) => wire.push(w));
  rel.send('m2');
  rel.send('m3');
  assert.deepEqual(wire, ['dm1', 'dm2', 'dm3']);
  assert.equal(rel.receive('ds1'), 's1');
  assert.equal(rel.receive('a1'), undefined);
  assert.equal(rel.window.length, 2);
  assert.throws(() => rel.receive('a4'), /bad ack "4" \(this client sent 3\)/);
  assert.throws(() => rel.receive('h{}'), /second hello/);
  assert.throws(() => rel.receive('q'), /unknown kind byte/);
  rel.closed();
  rel.send('m4');
  assert.equal(wire.length, 3, 'nothing written between connections');
  // The gateway took m1, m2: m3 and m4 go again, in order.
  assert.match(rel.check(hello(2, 0), true), /resumed after message 0, this client has received 1/);
  assert.match(rel.check(hello(5, 1), true), /took 5 messages, this client sent 4/);
  assert.equal(rel.check(hello(2, 1), true), null);
  wire.length = 0;
  rel.start(hello(2, 1), (w) => wire.push(w));
  assert.deepEqual(wire, ['dm3', 'dm4']);
  assert.equal(rel.token, 't2.1');
  assert.equal(rel.window.length, 2);
  assert.match(rel.check(hello(1, 0), false), /new session's hello counts up 1, down 0/);
});

test("session: 'dropOldest' in the window renumbers what the gateway never took", () => {
  const { rel, dropped } = session({ maxMessages: 2, overflow: 'dropOldest' });
  rel.start(hello(0, 0), () => {});
  rel.closed();
  for (const m of ['a', 'b', 'c']) {
    rel.send(m);
  }
  assert.deepEqual(dropped, ['a']);
  // The gateway never got 'a': b and c are its messages 1 and 2.
  const wire = [];
  assert.equal(rel.check(hello(0, 0), true), null);
  rel.start(hello(0, 0), (w) => wire.push(w));
  assert.deepEqual(wire, ['db', 'dc']);
  rel.receive('a2');
  assert.equal(rel.window.length, 0);
});

// ---- the client against a hand-written gateway

function client(url, options = {}) {
  const timers = new ManualTimers();
  const c = new GatewayClient(url, {
    WebSocket, random: () => 0.5, timers, connectTimeoutMs: CONNECT_TIMEOUT, reliable: 'require',
    ...options, backoff: { resetAfterMs: STABLE, ...options.backoff },
  });
  const log = { messages: [], opens: [], closes: [], failed: [], errors: [] };
  c.on('message', (m) => log.messages.push(m));
  c.on('open', (e) => log.opens.push(e));
  c.on('close', (e) => log.closes.push(e));
  c.on('resumeFailed', (e) => log.failed.push(e.reason));
  c.on('error', (e) => log.errors.push(e.message));
  return { c, timers, log };
}

async function fire(timers, ms) {
  await until(() => timers.has(ms), `a timer of ${ms} ms (scheduled: ${timers.delays.join(', ')})`);
  timers.fire(ms);
}

test('offers gateway.reliable.v1; the app sees plain messages, the wire has the kind byte', async (t) => {
  const peer = await reliableServer();
  t.after(() => peer.close());
  const { c, log } = client(peer.url);
  c.send('early');   // before the hello: kept, sent after it
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  const conn = peer.connections[0];
  assert.equal(conn.protocols, 'gateway.reliable.v1');
  c.send('x');
  c.send(new Uint8Array([1, 2]));
  await until(() => conn.got.length === 3, 'three messages at the server');
  assert.deepEqual(conn.got, ['dearly', 'dx', [0x64, 1, 2]]);
  conn.socket.send('dhello');
  conn.socket.send(Buffer.from([0x64, 9]));
  conn.socket.send('zbad');   // an unknown kind byte: an error, not a message
  conn.socket.send('dafter');
  await until(() => log.messages.length === 3, 'three messages in the app');
  assert.equal(log.messages[0], 'hello');
  assert.deepEqual([...new Uint8Array(log.messages[1])], [9]);
  assert.equal(log.messages[2], 'after');
  assert.deepEqual(log.errors, ['reliable: a message from the gateway with an unknown kind byte']);
  assert.equal(c.unacked, 3);
  conn.socket.send('a2');
  await until(() => c.unacked === 1, 'the ack trims the window');
  await c.close();
});

test('acks: after ack_every messages at once, else ack_ms after the first unacked', async (t) => {
  const peer = await reliableServer({ ackEvery: 3 });
  t.after(() => peer.close());
  const { c, timers, log } = client(peer.url);
  await next(c, 'open');
  const conn = peer.connections[0];
  conn.socket.send('d1');
  conn.socket.send('d2');
  await until(() => log.messages.length === 2, 'two messages');
  assert.deepEqual(conn.got, []);
  await fire(timers, ACK_MS);
  await until(() => conn.got.length === 1, 'the timed ack');
  assert.deepEqual(conn.got, ['a2']);
  for (const m of ['d3', 'd4', 'd5']) {
    conn.socket.send(m);
  }
  await until(() => conn.got.length === 2, 'the counted ack');
  assert.deepEqual(conn.got, ['a2', 'a5']);
  assert.equal(timers.has(ACK_MS), false, 'no timer left once all is acked');
  await c.close();
});

test('the window is bounded by the queue options: full, send() throws until an ack makes room', async (t) => {
  const peer = await reliableServer();
  t.after(() => peer.close());
  const { c, log } = client(peer.url, { maxQueue: 2 });
  await next(c, 'open');
  c.send('m1');
  c.send('m2');
  assert.throws(() => c.send('m3'), QueueFullError);
  const conn = peer.connections[0];
  conn.socket.send('a1');
  await until(() => c.unacked === 1, 'the ack');
  c.send('m3');
  conn.socket.send('a9');
  await until(() => log.errors.length === 1, 'the bad ack reported');
  assert.match(log.errors[0], /bad ack "9" \(this client sent 3\)/);
  await until(() => conn.got.length === 3, 'm1, m2, m3');
  assert.deepEqual(conn.got, ['dm1', 'dm2', 'dm3']);
  await c.close();
});

test('a connection cut without a close: resumes with last=, resends what the gateway did not take, in order',
  async (t) => {
    const peer = await reliableServer();
    t.after(() => peer.close());
    const { c, timers, log } = client(peer.url);
    await next(c, 'open');
    const first = peer.connections[0];
    for (const m of ['m1', 'm2', 'm3']) {
      c.send(m);
    }
    first.socket.send('ds1');
    first.socket.send('ds2');
    await until(() => log.messages.length === 2 && first.got.length === 3, 'traffic both ways');
    first.socket.terminate();   // no close frame: the client sees 1006
    await until(() => log.closes.length === 1, 'the close');
    assert.deepEqual(log.closes, [{ code: 1006, reason: '', willRetry: true }]);
    assert.equal(c.state, 'reconnecting');
    c.send('m4');   // while reconnecting: after the resent ones
    peer.up = 2;    // the gateway took m1 and m2 only (m3 was lost with the connection)
    await fire(timers, RESUME_DELAY);
    assert.deepEqual(await next(c, 'open'), { resumed: true });
    const second = peer.connections[1];
    assert.equal(second.url.searchParams.get('resume'), 't1');
    assert.equal(second.url.searchParams.get('last'), '2');
    await until(() => second.got.length === 2, 'the resent messages');
    c.send('m5');
    second.socket.send('ds3');
    await until(() => second.got.length === 3 && log.messages.length === 3, 'the session goes on');
    assert.deepEqual(second.got, ['dm3', 'dm4', 'dm5']);
    assert.deepEqual(log.messages, ['s1', 's2', 's3']);
    assert.deepEqual(log.failed, []);
    // The next drop resumes with the second hello's token and the count so far.
    second.socket.terminate();
    await until(() => log.closes.length === 2, 'the second close');
    peer.up = 5;
    await fire(timers, RESUME_DELAY);
    await next(c, 'open');
    assert.equal(peer.connections[2].url.searchParams.get('resume'), 't2');
    assert.equal(peer.connections[2].url.searchParams.get('last'), '3');
    await c.close();
  });

test('a drain (1012 resume=) in reliable mode resumes with its token and last=', async (t) => {
  const peer = await reliableServer();
  t.after(() => peer.close());
  const { c, timers, log } = client(peer.url);
  await next(c, 'open');
  peer.connections[0].socket.send('ds1');
  await until(() => log.messages.length === 1, 'a message');
  peer.connections[0].socket.close(1012, 'resume=drain.tok');
  await fire(timers, RESUME_DELAY);
  assert.deepEqual(await next(c, 'open'), { resumed: true });
  assert.equal(peer.connections[1].url.searchParams.get('resume'), 'drain.tok');
  assert.equal(peer.connections[1].url.searchParams.get('last'), '1');
  await c.close();
});

test('a refused resume (410): resumeFailed with the reason, then a fresh session that sends the window again',
  async (t) => {
    const peer = await reliableServer();
    t.after(() => peer.close());
    const { c, timers, log } = client(peer.url);
    await next(c, 'open');
    c.send('m1');
    peer.connections[0].socket.send('ds1');
    await until(() => log.messages.length === 1 && peer.connections[0].got.length === 1, 'traffic');
    peer.connections[0].socket.terminate();
    peer.refuse = 410;
    await fire(timers, RESUME_DELAY);
    await until(() => log.failed.length === 1, 'resumeFailed');
    assert.deepEqual(log.failed, ['resume refused (HTTP 410)']);
    peer.refuse = null;
    await fire(timers, RESUME_DELAY);
    assert.deepEqual(await next(c, 'open'), { resumed: false });
    const fresh = peer.connections[1];
    assert.equal(fresh.url.searchParams.get('resume'), null);
    assert.equal(fresh.url.searchParams.get('last'), null);
    await until(() => fresh.got.length === 1, 'the unacked message again');
    assert.deepEqual(fresh.got, ['dm1']);
    assert.deepEqual(peer.handshakes.map((u) => new URL(u, 'ws://x').searchParams.get('last')), [null, '1', null]);
    await c.close();
  });

test("a hello whose down is not the client's count: the client closes it and starts a fresh session", async (t) => {
  const peer = await reliableServer();
  t.after(() => peer.close());
  const { c, timers, log } = client(peer.url);
  await next(c, 'open');
  peer.connections[0].socket.send('ds1');
  peer.connections[0].socket.send('ds2');
  await until(() => log.messages.length === 2, 'two messages');
  peer.connections[0].socket.terminate();
  peer.downSkew = -1;   // the gateway says it resumes after message 1
  await fire(timers, RESUME_DELAY);
  await until(() => log.failed.length === 1, 'resumeFailed');
  assert.deepEqual(log.failed, ['the gateway resumed after message 1, this client has received 2']);
  await until(() => peer.connections[1].closeCode === 1000, 'the client closed the inconsistent connection');
  peer.downSkew = 0;
  await fire(timers, RESUME_DELAY);
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  assert.equal(peer.connections[2].url.searchParams.get('resume'), null);
  assert.deepEqual(log.opens, [{ resumed: false }, { resumed: false }]);
  await c.close();
});

test("reliable 'prefer' on a route without it: plain messages, and a drop is a new session", async (t) => {
  const peer = await reliableServer({ select: () => false });
  t.after(() => peer.close());
  const { c, timers, log } = client(peer.url, { reliable: 'prefer' });
  c.send('early');
  await fire(timers, RESUME_DELAY);
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  const conn = peer.connections[1];
  c.send('x');
  conn.socket.send('plain');
  await until(() => conn.got.length === 2 && log.messages.length === 1, 'traffic both ways');
  assert.deepEqual(conn.got, ['early', 'x']);
  assert.deepEqual(log.messages, ['plain']);
  assert.equal(c.unacked, 0);
  assert.deepEqual(log.closes, [{ code: 1006, reason: '', willRetry: true }], 'the ws package fails the first 101');
  assert.equal(peer.connections[0].protocols, 'gateway.reliable.v1');
  assert.equal(conn.protocols, null, 'the second attempt offers none');
  conn.socket.terminate();
  await fire(timers, RETRY_DELAY);
  await next(c, 'open');
  assert.equal(peer.connections[2].url.searchParams.get('resume'), null);
  await c.close();
});

test("reliable 'require' on a route without it: closed with a clear error, no retry", async (t) => {
  const peer = await reliableServer({ select: () => false });
  t.after(() => peer.close());
  const { c, log } = client(peer.url);
  await until(() => c.state === 'closed', 'closed');
  assert.match(c.closeReason, /did not select gateway\.reliable\.v1 .*reliable: 'require'/);
  assert.deepEqual(log.errors, ['Server sent no subprotocol', c.closeReason]);
  assert.deepEqual(log.closes, [{ code: 1006, reason: '', willRetry: false }]);
  assert.deepEqual(log.opens, []);
  assert.equal(peer.connections.length, 1);
});

test('a gateway that never sends the hello fails the attempt at connectTimeoutMs', async (t) => {
  const peer = await reliableServer();
  peer.hello = false;
  t.after(() => peer.close());
  const { c, timers, log } = client(peer.url);
  await until(() => peer.connections.length === 1, 'the 101');
  await fire(timers, CONNECT_TIMEOUT);
  await until(() => log.closes.length === 1, 'the attempt failed');
  assert.equal(log.closes[0].willRetry, true);
  assert.deepEqual(log.opens, []);
  await c.close();
});

test('reliable options are checked by name', () => {
  assert.throws(() => new GatewayClient('ws://x', { reliable: 'yes' }), /reliable must be null, 'prefer' or 'require'/);
  assert.throws(() => new GatewayClient('ws://x', { reliable: 'prefer', framing: { create() {} } }),
    /does not take a framing option/);
});

/** A ws socket that, as a browser's, says nothing in its error events (not even a refused handshake's status). */
class Silent {
  constructor(url, protocols) {
    this.ws = new WebSocket(url, protocols);
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    this.onclose = null;
    this.ws.onopen = (e) => this.onopen?.(e);
    this.ws.onmessage = (e) => this.onmessage?.(e);
    this.ws.onerror = () => this.onerror?.({});
    this.ws.onclose = (e) => this.onclose?.(e);
  }

  get readyState() {
    return this.ws.readyState;
  }

  get protocol() {
    return this.ws.protocol;
  }

  set binaryType(v) {
    this.ws.binaryType = v;
  }

  send(data) {
    this.ws.send(data);
  }

  close(code, reason) {
    this.ws.close(code, reason);
  }
}

test("'prefer' where a failed handshake says nothing (browsers): the next attempt goes without the offer, "
  + 'and the first to open decides', async (t) => {
  const peer = await reliableServer({ select: () => false });
  t.after(() => peer.close());
  const { c, timers, log } = client(peer.url, { reliable: 'prefer', WebSocket: Silent });
  c.send('early');
  await fire(timers, RETRY_DELAY);
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  assert.deepEqual(peer.connections.map((conn) => conn.protocols), ['gateway.reliable.v1', null]);
  await until(() => peer.connections[1].got.length === 1, 'the message, plain');
  assert.deepEqual(peer.connections[1].got, ['early']);
  peer.connections[1].socket.terminate();
  await fire(timers, 2 * RETRY_DELAY);   // the second retry in a row: the ceiling doubled
  await next(c, 'open');
  assert.equal(peer.connections[2].protocols, null, 'plain for the client\'s life');
  await c.close();
  assert.deepEqual(log.failed, []);
  // close() and connect(): offered again.
  c.connect();
  await until(() => peer.connections.length === 4, 'a fourth handshake');
  assert.equal(peer.connections[3].protocols, 'gateway.reliable.v1');
  await c.close();
});

// The client on the runtime's own WebSocket (Node 22+, or Node 20 with
// --experimental-websocket; tests/clients/test_js_client.py runs it so), which
// behaves as a browser's does: a refused handshake shows no status, only a
// close (1006) before the open.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { GatewayClient } from '../src/index.js';
import { ManualTimers, next, reliableServer, startServer, until } from './_support.js';

const skip = typeof globalThis.WebSocket === 'function' ? false
  : 'no global WebSocket (Node 20: run with --experimental-websocket)';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server.close();
});

test('with no WebSocket option the global one is used', { skip }, async () => {
  const c = new GatewayClient(server.url);
  await next(c, 'open');
  assert.ok(c._socket.ws instanceof globalThis.WebSocket);
  c.send('hi');
  assert.equal(await next(c, 'message'), 'hi');
  c.send(new Uint8Array([7, 8]));
  assert.deepEqual([...new Uint8Array(await next(c, 'message'))], [7, 8]);
  await c.close();
});

test('a refusal the socket does not explain counts as one after refusalAfter attempts in a row', { skip }, async () => {
  server.refuse = 401;
  const seen = server.handshakes.length;
  const timers = new ManualTimers();
  const c = new GatewayClient(server.url, { random: () => 0.5, timers, connectTimeoutMs: 99_999, refusalAfter: 3 });
  const closes = [];
  c.on('close', (e) => closes.push(e));
  for (const ms of [250, 500]) {
    await until(() => timers.has(ms), `a retry in ${ms} ms`);
    timers.fire(ms);
  }
  await until(() => c.state === 'closed', 'closed');
  assert.deepEqual(closes.map((e) => [e.code, e.willRetry]), [[1006, true], [1006, true], [1006, false]]);
  assert.match(c.closeReason, /3 handshakes in a row failed .*no getToken/);
  assert.equal(server.handshakes.length - seen, 3);
  server.refuse = null;
});

test('a getToken with a new token after the unexplained refusals tries again with it', { skip }, async () => {
  server.refuse = 401;
  const timers = new ManualTimers();
  const tokens = ['t1', 't2'];
  const c = new GatewayClient(server.url, {
    random: () => 0.5, timers, connectTimeoutMs: 99_999, refusalAfter: 2, getToken: () => tokens.shift() ?? 't2',
  });
  await until(() => timers.has(250), 'the first retry');
  timers.fire(250);
  await until(() => timers.has(500), 'a retry with the new token');
  server.refuse = null;
  timers.fire(500);
  await next(c, 'open');
  assert.equal(server.connections.at(-1).url.searchParams.get('access_token'), 't2');
  await c.close();
});

test("reliable mode: a 101 without the subprotocol fails here; 'prefer' tries again without it", { skip },
  async (t) => {
    const plain = await reliableServer({ select: () => false });
    t.after(() => plain.close());
    const timers = new ManualTimers();
    const p = new GatewayClient(plain.url, { reliable: 'prefer', random: () => 0.5, timers, connectTimeoutMs: 99_999 });
    p.send('early');
    // Offered and not selected: the runtime fails the handshake and says so; the next attempt does not offer it.
    await until(() => timers.has(125), 'a retry at once');
    timers.fire(125);
    assert.deepEqual(await next(p, 'open'), { resumed: false });
    assert.deepEqual(plain.handshakes.length, 2);
    const conn = plain.connections.at(-1);
    assert.equal(conn.protocols, null);
    await until(() => conn.got.length === 1, 'the message, without a kind byte');
    assert.deepEqual(conn.got, ['early']);
    await p.close();
    const r = new GatewayClient(plain.url, { reliable: 'require' });
    r.send('never plain');
    await until(() => r.state === 'closed', 'closed');
    assert.match(r.closeReason, /did not select gateway\.reliable\.v1/);
    assert.deepEqual(plain.connections.slice(2).flatMap((c) => c.got), []);
  });

test('reliable mode: a cut connection (no close) resumes with last=, nothing lost or twice', { skip }, async (t) => {
  const peer = await reliableServer();
  t.after(() => peer.close());
  const timers = new ManualTimers();
  const c = new GatewayClient(peer.url, { reliable: 'require', random: () => 0.5, timers, connectTimeoutMs: 99_999 });
  const got = [];
  c.on('message', (m) => got.push(m));
  c.send('m1');
  c.send('m2');
  await next(c, 'open');
  peer.connections[0].socket.send('ds1');
  await until(() => got.length === 1 && peer.connections[0].got.length === 2, 'traffic both ways');
  peer.connections[0].socket.terminate();
  peer.up = 1;
  await until(() => timers.has(125), 'the resume at once');
  timers.fire(125);
  assert.deepEqual(await next(c, 'open'), { resumed: true });
  const again = peer.connections[1];
  assert.equal(again.url.searchParams.get('last'), '1');
  again.socket.send('ds2');
  await until(() => got.length === 2 && again.got.length === 1, 'the session goes on');
  assert.deepEqual(got, ['s1', 's2']);
  assert.deepEqual([...peer.connections[0].got, ...again.got], ['dm1', 'dm2', 'dm2']);
  await c.close();
});

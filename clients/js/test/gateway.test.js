// The client against real gateway nodes. tests/clients/test_js_client.py
// starts two nodes sharing a Redis (routes /echo: the builtin echo, /num: a
// backend that numbers what it sends per session, /rel: the same backend in
// reliable mode, /ws-echo: an echoing WebSocket backend), and passes
//   JS_GW_A, JS_GW_B          the nodes' ws:// base URLs
//   JS_GW_ADMIN_A             node A's admin URL (the drain test drains it)
//   JS_GW_ADMIN_TOKEN         its admin token
//   JS_GW_JWT_SECRET          the HS256 secret the nodes verify tokens with
//   JS_GW_RESULT              a file for what the backend's side is checked against
// Without them these tests are skipped (plain `npm test`).

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import net from 'node:net';
import { test } from 'node:test';

import { GatewayClient } from '../src/index.js';
import { next, until } from './_support.js';

const NAMES = ['JS_GW_A', 'JS_GW_B', 'JS_GW_ADMIN_A', 'JS_GW_ADMIN_TOKEN', 'JS_GW_JWT_SECRET', 'JS_GW_RESULT',
  'JS_GW_RESULT_CUT'];
const env = Object.fromEntries(NAMES.map((n) => [n, process.env[n]]));
const missing = NAMES.filter((n) => !env[n]);
const skip = missing.length > 0 ? `run by tests/clients/test_js_client.py (missing ${missing.join(', ')})` : false;

function jwt(claims, secret = env.JS_GW_JWT_SECRET) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const signed = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${signed}.${createHmac('sha256', secret).update(signed).digest('base64url')}`;
}

const hour = () => Math.floor(Date.now() / 1000) + 3600;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Assert `seen` is p1, p2, ... with no gap, duplicate or reordering; returns its length. */
function contiguous(prefix, seen) {
  seen.forEach((m, i) => {
    if (m !== `${prefix}${i + 1}`) {
      assert.fail(`stream ${prefix} breaks at position ${i}: got ${m}, expected ${prefix}${i + 1} `
        + `(around: ${seen.slice(Math.max(0, i - 3), i + 4).join(' ')})`);
    }
  });
  return seen.length;
}

/**
 * A TCP proxy on 127.0.0.1 in front of `target` (a ws:// URL); `cut()` kills every
 * connection through it without a close: both sockets reset (RST, no FIN), as a
 * network that drops does. `url` is the proxy's, for the same path.
 */
async function startProxy(target) {
  const to = new URL(target);
  const pairs = new Set();
  const server = net.createServer((down) => {
    const up = net.connect(Number(to.port), to.hostname);
    const pair = [down, up];
    pairs.add(pair);
    down.pipe(up);
    up.pipe(down);
    const gone = () => {
      pairs.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on('error', gone).on('close', gone);
    up.on('error', gone).on('close', gone);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}`,
    cuts: 0,
    get connections() {
      return pairs.size;
    },
    cut() {
      this.cuts += 1;
      for (const pair of [...pairs]) {
        pairs.delete(pair);
        for (const socket of pair) {
          socket.resetAndDestroy();
        }
      }
    },
    close: () => new Promise((resolve) => {
      for (const pair of pairs) {
        pair.forEach((socket) => socket.destroy());
      }
      server.close(resolve);
    }),
  };
}

test('connects through the gateway with a JWT in the query and echoes', { skip }, async () => {
  const c = new GatewayClient(`${env.JS_GW_B}/echo`, { token: jwt({ sub: 'ann', exp: hour() }) });
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  c.send('hello');
  assert.equal(await next(c, 'message'), 'hello');
  c.send(new Uint8Array([0, 1, 255]));
  assert.deepEqual([...new Uint8Array(await next(c, 'message'))], [0, 1, 255]);
  await c.close();
  assert.equal(c.state, 'closed');
});

test('the JWT can travel as a bearer subprotocol (the gateway strips it, answers with it)', { skip }, async () => {
  const c = new GatewayClient(`${env.JS_GW_B}/ws-echo`, { token: jwt({ sub: 'ann', exp: hour() }), tokenIn: 'subprotocol' });
  await next(c, 'open');
  c.send('via subprotocol');
  assert.equal(await next(c, 'message'), 'via subprotocol');
  await c.close();
});

test('request() gets each reply by its id through the gateway', { skip }, async () => {
  const c = new GatewayClient(`${env.JS_GW_B}/echo`, { token: jwt({ sub: 'ann', exp: hour() }) });
  const messages = [];
  c.on('message', (m) => messages.push(m));
  const replies = await Promise.all([1, 2, 3].map((n) => c.request({ op: 'add', n })));   // sent while connecting
  assert.deepEqual(replies.map((r) => r.n), [1, 2, 3]);
  assert.equal(new Set(replies.map((r) => r.id)).size, 3);
  c.send('not a reply');
  await until(() => messages.length === 1, 'the plain message');
  assert.deepEqual(messages, ['not a reply']);
  await c.close();
});

test('a refused handshake (401) is not retried without a new token', { skip }, async () => {
  const c = new GatewayClient(`${env.JS_GW_B}/echo`, { token: jwt({ sub: 'ann', exp: hour() }, 'not-the-secret') });
  const states = [];
  c.on('state', ({ from, to }) => states.push(`${from}>${to}`));
  assert.deepEqual(await next(c, 'close'), { code: 1006, reason: '', willRetry: false });
  assert.match(c.closeReason, /handshake refused \(HTTP 401\)/);
  assert.deepEqual(states, ['connecting>closed']);
});

test('1008 (token expired) does not retry without a new token; a getToken with one comes back', { skip }, async () => {
  const soon = () => jwt({ sub: 'bob', exp: Math.floor(Date.now() / 1000) + 2 });
  const alone = new GatewayClient(`${env.JS_GW_B}/echo`, { token: soon() });
  const opens = [];
  alone.on('open', (e) => opens.push(e));
  const closed = await next(alone, 'close', () => true, 10_000);
  assert.deepEqual(closed, { code: 1008, reason: 'token expired', willRetry: false });
  assert.equal(alone.state, 'closed');
  assert.equal(opens.length, 1);

  const renewed = new GatewayClient(`${env.JS_GW_B}/echo`, { token: soon(), getToken: () => jwt({ sub: 'bob', exp: hour() }) });
  await next(renewed, 'open');
  assert.equal((await next(renewed, 'close', () => true, 10_000)).willRetry, true);
  assert.deepEqual(await next(renewed, 'open'), { resumed: false });
  renewed.send('still here');
  assert.equal(await next(renewed, 'message'), 'still here');
  await renewed.close();
});

test('a drained node: the session resumes on the other node, numbered both ways, nothing lost or twice',
  { skip }, async () => {
    let drained = false;
    // What a load balancer does: once A drains, new connections reach B.
    const c = new GatewayClient(() => `${drained ? env.JS_GW_B : env.JS_GW_A}/num`,
      { token: jwt({ sub: 'carol', exp: hour() }), maxQueue: 100_000 });
    const got = [];
    const opens = [];
    const closes = [];
    const failed = [];
    c.on('message', (m) => got.push(m));
    c.on('open', (e) => opens.push(e));
    c.on('close', (e) => closes.push(e));
    c.on('resumeFailed', (e) => failed.push(e));
    let sent = 0;
    let sending = true;
    const pump = (async () => {
      while (sending) {
        sent += 1;
        c.send(`c${sent}`);   // queued while reconnecting, sent in order on the next open
        await sleep(5);
      }
    })();
    await until(() => got.length >= 20, 'traffic through node A', 10_000);
    drained = true;
    const r = await fetch(`${env.JS_GW_ADMIN_A}/v1/drain`,
      { method: 'POST', headers: { Authorization: `Bearer ${env.JS_GW_ADMIN_TOKEN}` } });
    assert.equal(r.status, 202);
    await until(() => opens.length === 2, 'open again, on node B', 15_000);
    const through = got.length;
    await until(() => got.length >= through + 20, 'traffic through node B', 10_000);
    sending = false;
    await pump;
    await c.close();
    assert.deepEqual(opens, [{ resumed: false }, { resumed: true }]);
    assert.deepEqual(failed, []);
    assert.equal(closes[0].code, 1012);
    assert.match(closes[0].reason, /^resume=/);
    assert.equal(closes[0].willRetry, true);
    const received = contiguous('s', got);
    writeFileSync(env.JS_GW_RESULT, JSON.stringify({ sent, received, closes }));
  });

test('reliable mode: numbered both ways through the gateway; the backend sees plain messages', { skip }, async () => {
  const c = new GatewayClient(`${env.JS_GW_B}/rel`, { token: jwt({ sub: 'erin', exp: hour() }), reliable: 'require' });
  const got = [];
  c.on('message', (m) => got.push(m));
  for (let i = 1; i <= 30; i += 1) {
    c.send(`p${i}`);
  }
  assert.deepEqual(await next(c, 'open'), { resumed: false });
  await until(() => got.length >= 30, 'the backend\'s numbered messages', 10_000);
  assert.equal(got[0], 's1', 'the app sees no kind byte');
  contiguous('s', got);
  await until(() => c.unacked === 0, 'the gateway acked all 30', 10_000);
  await c.close();
});

test('reliable mode: the TCP connection cut without a close (twice): resumed, nothing lost or twice, in order',
  { skip }, async () => {
    const proxy = await startProxy(env.JS_GW_B);
    const c = new GatewayClient(`${proxy.url}/rel`, { token: jwt({ sub: 'dave', exp: hour() }), reliable: 'require',
      maxQueue: 100_000 });
    const got = [];
    const opens = [];
    const closes = [];
    const failed = [];
    c.on('message', (m) => got.push(m));
    c.on('open', (e) => opens.push(e));
    c.on('close', (e) => closes.push(e));
    c.on('resumeFailed', (e) => failed.push(e));
    let sent = 0;
    let sending = true;
    const pump = (async () => {
      while (sending) {
        sent += 1;
        c.send(`r${sent}`);   // kept until the gateway acks it: sent again after a cut if it did not take it
        await sleep(5);
      }
    })();
    try {
      for (let cut = 1; cut <= 2; cut += 1) {
        const before = got.length;
        await until(() => got.length >= before + 30, `traffic before cut ${cut}`, 10_000);
        proxy.cut();
        await until(() => opens.length === cut + 1, `open again after cut ${cut}`, 15_000);
      }
      const through = got.length;
      await until(() => got.length >= through + 30, 'traffic after the last cut', 10_000);
    } finally {
      sending = false;
      await pump;
    }
    await until(() => c.unacked === 0, 'the gateway acked every message', 10_000);
    await c.close();
    await proxy.close();
    assert.deepEqual(opens, [{ resumed: false }, { resumed: true }, { resumed: true }]);
    assert.deepEqual(failed, []);
    assert.deepEqual(closes.slice(0, 2).map((e) => [e.code, e.willRetry]), [[1006, true], [1006, true]]);
    const received = contiguous('s', got);
    writeFileSync(env.JS_GW_RESULT_CUT, JSON.stringify({ sent, received, closes }));
  });

test("reliable 'prefer' on a route without reliable: goes plain; 'require' closes, saying why", { skip }, async () => {
  const token = jwt({ sub: 'fay', exp: hour() });
  const p = new GatewayClient(`${env.JS_GW_B}/num`, { token, reliable: 'prefer' });
  const got = [];
  p.on('message', (m) => got.push(m));
  assert.deepEqual(await next(p, 'open'), { resumed: false });
  await until(() => got.length >= 5, 'plain messages from the backend', 10_000);
  contiguous('s', got);
  assert.equal(p.unacked, 0);
  await p.close();
  const r = new GatewayClient(`${env.JS_GW_B}/num`, { token, reliable: 'require' });
  await until(() => r.state === 'closed', 'closed', 10_000);
  assert.match(r.closeReason, /did not select gateway\.reliable\.v1 \(the route has no reliable:\)/);
});

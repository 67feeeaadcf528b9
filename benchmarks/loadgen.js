'use strict';
// WebSocket load generator for the benchmark harness (Node `ws` + `bufferutil`).
//
//   node loadgen.js '<json config>'
//
// Driven by benchmarks/run.py over stdin/stdout (one JSON object per line):
//   -> {"event":"ready", opened, failed, errors}   all connections open
//   <- "run"                                        start the measured phase
//   -> {"event":"result", ...counts, hist}          measured phase finished
//   <- "close"                                      close everything and exit
//   -> {"event":"closed"}
// mode "resume": after "run" (answered with {"event":"armed"}), every connection
// closed with 1012 and reason `resume=<token>` reconnects at once to `resumeUrl`
// with ?resume=<token> and does one echo there; the result has, per connection,
// when its close came and when its resumed echo did (ms since "armed").
// Every loop is bounded by a count and by time; `hardLimit` seconds after start
// the process exits on its own whatever the harness does.
const WebSocket = require('ws');
const readline = require('readline');
const { performance } = require('perf_hooks');

const cfg = Object.assign({
  mode: 'echo',            // echo | idle | connrate | resume
  url: 'ws://127.0.0.1:18001/',
  conns: 1,                // connections held (echo, idle)
  depth: 1,                // closed loop: messages in flight per connection
  rate: 0,                 // open loop: messages/s for this process (0 = closed loop)
  size: 64,                // payload bytes (text frame)
  duration: 1,             // seconds of the measured phase
  count: 0,                // connrate: connections to open and close
  connectConcurrency: 200, // handshakes in flight at once
  timeout: 10,             // seconds: handshake + first echo, and drain
  localAddress: undefined, // source address (127.x.y.z) to spread the ephemeral ports
  hardLimit: 300,          // seconds: absolute lifetime of this process
  resumeUrl: undefined,    // resume: where drained connections come back (another node)
  retries: 5,              // resume: attempts per session when the answer is 503 (Retry-After)
}, JSON.parse(process.argv[2] || '{}'));

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
setTimeout(() => { emit({ event: 'error', error: 'hard time limit reached' }); process.exit(3); },
  cfg.hardLimit * 1000).unref();

const payload = 'x'.repeat(cfg.size);
const LOG_BASE = Math.log(1.01); // latency histogram: 1 % wide log buckets of microseconds
const hist = new Map();
const record = (us) => { const b = us <= 1 ? 0 : Math.floor(Math.log(us) / LOG_BASE); hist.set(b, (hist.get(b) || 0) + 1); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const stats = { sent: 0, received: 0, closedEarly: 0, sendErrors: 0 };
let running = false;   // closed loop: reply triggers the next send while true
let outstanding = 0;
let closing = false;

function send(ws) {
  if (ws.readyState !== WebSocket.OPEN) { stats.sendErrors++; return; }
  ws.q.push(performance.now());
  ws.send(payload);
  stats.sent++; outstanding++;
}

function onMessage() {
  const t = this.q.shift();
  if (t === undefined) return;
  record((performance.now() - t) * 1000);
  stats.received++; outstanding--;
  if (this.waiter) { const w = this.waiter; this.waiter = null; w(); }
  if (running && cfg.rate === 0) send(this);
}

// Open one connection and wait for one echo, so that an upstream connection
// exists behind any proxy (a proxy may connect upstream lazily).
function openOne() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(cfg.url, { perMessageDeflate: false, localAddress: cfg.localAddress,
      handshakeTimeout: cfg.timeout * 1000, maxPayload: 64 * 1024 * 1024 });
    ws.q = [];
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('timeout')); }, cfg.timeout * 1000);
    const fail = (err) => { clearTimeout(timer); reject(err instanceof Error ? err : new Error(String(err))); };
    ws.on('error', fail);
    ws.on('message', onMessage);
    ws.on('close', () => { if (!closing && ws.ready) stats.closedEarly++; fail(new Error('closed during setup')); });
    ws.on('open', () => {
      ws.waiter = () => { clearTimeout(timer); ws.ready = true; resolve(ws); };
      send(ws);
    });
  });
}

async function runPool(n, concurrency, task) {
  let next = 0;
  const worker = async () => { while (next < n) { next++; await task(); } };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, n)) }, worker));
}

async function openAll(n) {
  const conns = []; const errors = {}; let failed = 0;
  await runPool(n, cfg.connectConcurrency, async () => {
    try { conns.push(await openOne()); } catch (e) { failed++; errors[e.message] = (errors[e.message] || 0) + 1; }
  });
  return { conns, failed, errors };
}

async function drain(deadline) {
  while (outstanding > 0 && performance.now() < deadline) await sleep(2);
}

async function runEcho(conns) {
  Object.assign(stats, { sent: 0, received: 0 }); hist.clear(); outstanding = 0;
  const t0 = performance.now(); const end = t0 + cfg.duration * 1000;
  let maxLag = 0;
  if (cfg.rate === 0) {
    running = true;
    for (const ws of conns) for (let i = 0; i < cfg.depth; i++) send(ws);
    await sleep(cfg.duration * 1000);
    running = false;
  } else {
    // Open loop: send on schedule (round robin over connections) whatever the replies do.
    let rr = 0;
    while (performance.now() < end) {
      const due = Math.floor((performance.now() - t0) / 1000 * cfg.rate);
      maxLag = Math.max(maxLag, due - stats.sent);
      for (let k = due - stats.sent; k > 0; k--) send(conns[rr++ % conns.length]);
      await sleep(1);
    }
  }
  const sendEnd = performance.now();
  await drain(performance.now() + cfg.timeout * 1000);
  const t1 = performance.now();
  return { ...stats, lost: outstanding, seconds: (t1 - t0) / 1000, sendSeconds: (sendEnd - t0) / 1000,
    maxLagMsgs: maxLag, hist: Object.fromEntries(hist) };
}

async function runConnrate() {
  let opened = 0; let failed = 0; const errors = {};
  const t0 = performance.now(); const end = t0 + cfg.duration * 1000;
  await runPool(cfg.count, cfg.connectConcurrency, async () => {
    if (performance.now() > end) return;
    try {
      const ws = await openOne(); opened++;
      await new Promise((r) => { ws.once('close', r); ws.close(); setTimeout(r, cfg.timeout * 1000); });
    } catch (e) { failed++; errors[e.message] = (errors[e.message] || 0) + 1; }
  });
  return { opened, failed, errors, seconds: (performance.now() - t0) / 1000 };
}

// Open a connection to `url` and wait for one echo (the resumed session is relaying).
function resumeOne(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false, localAddress: cfg.localAddress,
      handshakeTimeout: cfg.timeout * 1000, maxPayload: 64 * 1024 * 1024 });
    ws.q = [];
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('timeout')); }, cfg.timeout * 1000);
    ws.on('unexpected-response', (req, res) => {
      clearTimeout(timer); ws.terminate();
      const err = new Error(`HTTP ${res.statusCode}`); err.status = res.statusCode; reject(err);
    });
    ws.on('error', (e) => { clearTimeout(timer); reject(e); });
    // Closed after the 101 but before the echo: the resume failed half-way (1013: retry).
    ws.on('close', (code) => {
      clearTimeout(timer); const err = new Error(`closed ${code} before the echo`); err.code = code; reject(err);
    });
    ws.on('message', onMessage);
    ws.on('open', () => {
      ws.waiter = () => { clearTimeout(timer); ws.removeAllListeners('close'); resolve(ws); };
      send(ws);
    });
  });
}

async function runResume(conns) {
  const t0 = performance.now();
  const closeAt = []; const resumedAt = []; const codes = {}; const errors = {};
  const resumed = []; let failed = 0; let retried = 0; const retries = {}; let pending = conns.length;
  let finish; const done = new Promise((r) => { finish = r; });
  const settle = () => { if (--pending === 0) finish(); };
  for (const ws of conns) {
    ws.removeAllListeners('close');
    ws.on('close', async (code, reasonBuf) => {
      const t = performance.now() - t0; closeAt.push(t);
      codes[code] = (codes[code] || 0) + 1;
      const reason = reasonBuf.toString();
      if (code !== 1012 || !reason.startsWith('resume=')) {
        failed++; const k = `close ${code} ${reason.slice(0, 40)}`; errors[k] = (errors[k] || 0) + 1; settle(); return;
      }
      const url = cfg.resumeUrl + (cfg.resumeUrl.includes('?') ? '&' : '?') + 'resume=' + encodeURIComponent(reason.slice(7));
      for (let attempt = 0; ; attempt++) {
        try {
          const w = await resumeOne(url); resumed.push(w); resumedAt.push(performance.now() - t0); break;
        } catch (e) {
          // What a client is told to retry: 503 (+ Retry-After) before the 101, 1013 after it.
          if ((e.status === 503 || e.code === 1013) && attempt < cfg.retries) {
            retried++; const k = e.status ? 'retry after 503' : 'retry after 1013'; retries[k] = (retries[k] || 0) + 1;
            await sleep(200 * (attempt + 1)); continue;
          }
          failed++; errors[e.message] = (errors[e.message] || 0) + 1; break;
        }
      }
      settle();
    });
  }
  emit({ event: 'armed' });
  await Promise.race([done, sleep(cfg.duration * 1000)]);
  return { resumed: resumed.length, failed, retried, retries, lost: pending, codes, errors, closeAt, resumedAt,
    seconds: (performance.now() - t0) / 1000, conns: resumed };
}

async function closeAll(conns) {
  closing = true;
  await Promise.all(conns.map((ws) => new Promise((r) => {
    if (ws.readyState === WebSocket.CLOSED) return r();
    const t = setTimeout(() => { ws.terminate(); r(); }, cfg.timeout * 1000);
    ws.once('close', () => { clearTimeout(t); r(); });
    ws.close();
  })));
}

async function main() {
  const lines = readline.createInterface({ input: process.stdin });
  const commands = lines[Symbol.asyncIterator]();
  const next = async () => { const r = await commands.next(); if (r.done) process.exit(2); return r.value.trim(); };

  const { conns, failed, errors } = cfg.mode === 'connrate' ? { conns: [], failed: 0, errors: {} } : await openAll(cfg.conns);
  emit({ event: 'ready', opened: conns.length, failed, errors });
  if ((await next()) === 'run') {
    if (cfg.mode === 'resume') {
      const res = await runResume(conns);
      const held = res.conns; delete res.conns;
      emit({ event: 'result', ...res });
      await next();
      await closeAll(held);
      emit({ event: 'closed' });
      process.exit(0);
    }
    const res = cfg.mode === 'echo' ? await runEcho(conns)
      : cfg.mode === 'connrate' ? await runConnrate() : { held: conns.filter((w) => w.readyState === WebSocket.OPEN).length, closedEarly: stats.closedEarly };
    emit({ event: 'result', ...res });
    await next();
  }
  await closeAll(conns);
  emit({ event: 'closed' });
  process.exit(0);
}

main().catch((e) => { emit({ event: 'error', error: String(e && e.stack || e) }); process.exit(1); });

// The connection: one WebSocket at a time, replaced when it closes, as the
// close policy (policy.js) says. States and their moves are in states.js,
// retry delays in backoff.js, the outbound queue in queue.js, requests in
// pending.js, the wire format in framing.js, reliable mode's counts and
// window in reliable.js; this file wires them to a socket and to the
// application's listeners.

import { Backoff } from './backoff.js';
import { ClosedError, GatewayError } from './errors.js';
import { plainFraming } from './framing.js';
import { PendingRequests } from './pending.js';
import { decide, handshakeStatus } from './policy.js';
import { byteSize, OutboundQueue } from './queue.js';
import { parseHello, RELIABLE_SUBPROTOCOL, ReliableSession } from './reliable.js';
import { advance } from './states.js';
import { MessageStream } from './stream.js';

const OPEN = 1;   // WebSocket.OPEN, the same in every implementation
// A 101 without any of the offered subprotocols, as the ws package and Node's own WebSocket say it.
const NO_SUBPROTOCOL = /Server sent no subprotocol|Server did not respond with sent protocols/;

export const EVENTS = Object.freeze(['state', 'open', 'message', 'close', 'error', 'resumeFailed', 'dropped']);

const OPTIONS = Object.freeze({
  token: null,              // the JWT, or null
  getToken: null,           // () => token | Promise<token>: first connect, and after a refusal
  tokenIn: 'query',         // 'query' (?access_token=) or 'subprotocol' (bearer.<token>)
  tokenParam: 'access_token',
  protocols: [],            // the application's own subprotocols
  WebSocket: null,          // the constructor; default: globalThis.WebSocket, else the ws package
  backoff: {},              // see backoff.js BACKOFF_DEFAULTS
  refusalAfter: 5,          // handshakes in a row that fail without a status count as a refusal
  resumeAttempts: 3,        // resume attempts that fail without a status before a fresh session
  connectTimeoutMs: 10_000,
  maxQueue: 1000,
  maxQueueBytes: 1 << 20,
  overflow: 'throw',        // or 'dropOldest'
  idField: 'id',
  maxPending: 1000,
  requestTimeoutMs: 10_000,
  framing: plainFraming,
  reliable: null,           // 'prefer' | 'require': numbered messages, resumed after any drop (reliable.js)
  random: null,             // () => [0, 1); default Math.random
  timers: null,             // {setTimeout, clearTimeout}; default the global ones
  autoConnect: true,
});

const defaultTimers = Object.freeze({
  // Wrapped: a browser's setTimeout called with another `this` throws "Illegal invocation".
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle),
});

function checkOptions(options) {
  if (options === null || typeof options !== 'object') {
    throw new TypeError('options must be an object');
  }
  for (const key of Object.keys(options)) {
    if (!(key in OPTIONS)) {
      throw new TypeError(`unknown option ${JSON.stringify(key)} (known: ${Object.keys(OPTIONS).join(', ')})`);
    }
  }
  const o = { ...OPTIONS, ...options };
  if (o.tokenIn !== 'query' && o.tokenIn !== 'subprotocol') {
    throw new TypeError(`tokenIn must be 'query' or 'subprotocol' (a browser cannot set headers), got ${JSON.stringify(o.tokenIn)}`);
  }
  if (o.getToken !== null && typeof o.getToken !== 'function') {
    throw new TypeError('getToken must be a function returning a token or a Promise of one');
  }
  if (!Array.isArray(o.protocols)) {
    throw new TypeError('protocols must be an array of strings');
  }
  for (const name of ['refusalAfter', 'resumeAttempts']) {
    if (!(o[name] >= 1)) {
      throw new TypeError(`${name} must be a number >= 1 (Infinity: never), got ${String(o[name])}`);
    }
  }
  if (o.reliable !== null && o.reliable !== 'prefer' && o.reliable !== 'require') {
    throw new TypeError(`reliable must be null, 'prefer' or 'require', got ${JSON.stringify(o.reliable)}`);
  }
  if (o.reliable !== null && o.framing !== plainFraming) {
    throw new TypeError('reliable mode has its own wire format: it does not take a framing option');
  }
  for (const name of ['connectTimeoutMs', 'requestTimeoutMs']) {
    if (!(o[name] > 0)) {
      throw new TypeError(`${name} must be a number of ms > 0, got ${String(o[name])}`);
    }
  }
  return o;
}

/** A relative URL (browsers) against the page, with http(s) turned into ws(s). */
function absoluteUrl(raw) {
  const base = globalThis.location?.href;
  const url = base === undefined ? new URL(String(raw)) : new URL(String(raw), base);
  if (url.protocol === 'http:' || url.protocol === 'https:') {
    url.protocol = url.protocol === 'http:' ? 'ws:' : 'wss:';
  }
  return url;
}

async function loadWebSocket() {
  const name = 'ws';   // a variable, so that bundlers for browsers leave it alone
  try {
    const mod = await import(/* webpackIgnore: true */ /* @vite-ignore */ name);
    return mod.WebSocket ?? mod.default;
  } catch {
    throw new GatewayError('no WebSocket implementation: this runtime has no global WebSocket (Node 20 has none); '
      + 'install the ws package (npm install ws) or pass {WebSocket} in the options');
  }
}

export class GatewayClient {
  /**
   * url: a ws(s):// URL, or a function returning one (or a Promise of one),
   * asked before every attempt.
   */
  constructor(url, options = {}) {
    if (typeof url !== 'function' && typeof url !== 'string' && !(url instanceof URL)) {
      throw new TypeError('url must be a string, a URL or a function returning one');
    }
    const o = checkOptions(options);
    this._o = o;
    this._url = url;
    this._state = 'connecting';
    this._listeners = new Map(EVENTS.map((name) => [name, new Set()]));
    this._timers = o.timers ?? defaultTimers;
    this._backoff = new Backoff(o.backoff, o.random ?? Math.random);
    const queue = {
      maxMessages: o.maxQueue, maxBytes: o.maxQueueBytes, overflow: o.overflow,
      onDrop: (data) => this._emit('dropped', { data }),
    };
    this._queue = new OutboundQueue(queue);
    // Reliable mode keeps what was sent until acked, in a window with the queue's bounds.
    this._rel = o.reliable === null ? null : new ReliableSession({ queue, timers: this._timers });
    this._pending = new PendingRequests({ idField: o.idField, maxPending: o.maxPending, timers: this._timers });
    this._framing = o.framing.create({ sendRaw: (data) => this._socket.ws.send(data) });
    this._token = o.token;
    this._resume = null;        // the token the next attempt presents
    this._socket = null;        // {ws, opened, resumeToken, status}
    this._failures = 0;         // attempts in a row that closed before opening
    this._timer = null;         // the next attempt, or the running one's connect timeout
    this._stable = null;        // resets the backoff once a connection has stayed open
    this._generation = 0;       // bumped by close(): an attempt in flight then stands down
    this._streams = new Set();
    this._started = false;
    this.closeReason = null;    // why the client closed, once it has
    if (o.autoConnect) {
      // After the caller's next lines, so listeners added right after `new` see everything
      // (and a close() right after `new` stands: no connection then).
      queueMicrotask(() => this._state === 'connecting' && this.connect());
    }
  }

  /** 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() {
    return this._state;
  }

  /** Messages waiting in the outbound queue. */
  get queued() {
    return this._rel === null ? this._queue.length : this._rel.unsent;
  }

  /** Reliable mode: messages sent or queued that the gateway has not acked yet (else 0). */
  get unacked() {
    return this._rel === null ? 0 : this._rel.window.length;
  }

  /** Start connecting: needed with autoConnect false, or to start again once closed. */
  connect() {
    if (this._state === 'closed') {
      this._move('connecting');
      this._started = false;
      this._failures = 0;
      this._resume = null;
      this._backoff.reset();
      this.closeReason = null;
      if (this._rel !== null) {
        this._rel.unavailable = false;
      }
    }
    if (!this._started) {
      this._started = true;
      this._attempt();
    }
  }

  on(name, listener) {
    this._listenersOf(name).add(listener);
    return () => this.off(name, listener);
  }

  off(name, listener) {
    this._listenersOf(name).delete(listener);
  }

  /** Send now when open, else queue (in order, bounded; see the overflow option). */
  send(data) {
    if (this._state === 'closed') {
      throw new ClosedError('the client is closed');
    }
    byteSize(data);   // a TypeError for what a WebSocket cannot send
    if (this._rel !== null) {
      this._rel.send(data);   // written now when a connection is live, else on the next hello
      return;
    }
    const wire = this._framing.encode(data);
    const s = this._socket;
    if (s !== null && s.opened && s.ws.readyState === OPEN && this._queue.length === 0) {
      s.ws.send(wire);
    } else {
      // Not open, or closing: the next connection sends it.
      this._queue.push(wire);
    }
  }

  /**
   * Send `message` as JSON with a correlation id (the idField, added when
   * absent) and resolve with the parsed reply that carries the same id.
   */
  request(message, { timeoutMs } = {}) {
    if (this._state === 'closed') {
      return Promise.reject(new ClosedError('the client is closed'));
    }
    let id, promise;
    try {
      let withId;
      [id, withId, promise] = this._pending.add(message, timeoutMs ?? this._o.requestTimeoutMs);
      this.send(JSON.stringify(withId));
    } catch (error) {
      if (promise === undefined) {
        return Promise.reject(error);
      }
      this._pending.cancel(id, error);
    }
    return promise;
  }

  /**
   * Close (connect() would start again); resolves when the socket has closed,
   * or after connectTimeoutMs when it does not say so.
   */
  close(code = 1000, reason = '') {
    if (this._state === 'closed') {
      return Promise.resolve();
    }
    this._generation += 1;
    this._clearTimers();
    const s = this._socket;
    this._socket = null;
    let done = Promise.resolve();
    if (s !== null) {
      done = new Promise((resolve) => {
        const bound = this._timers.setTimeout(resolve, this._o.connectTimeoutMs);
        s.ws.onclose = () => {
          this._timers.clearTimeout(bound);
          resolve();
        };
        s.ws.onerror = null;
        s.ws.onmessage = null;
      });
      try {
        s.ws.close(code, reason);
      } catch (error) {
        this._emit('error', error);
        s.ws.close();
      }
      this._framing.closed();
      this._rel?.closed();
      this._emit('close', { code, reason, willRetry: false });
    }
    this._shutdown('closed by the application');
    return done;
  }

  /** The messages that arrive from now on; ends when the client closes. */
  messages({ maxBuffered = 1000 } = {}) {
    const stream = new MessageStream(maxBuffered, (s) => this._streams.delete(s));
    if (this._state === 'closed') {
      stream.end();
    } else {
      this._streams.add(stream);
    }
    return stream;
  }

  [Symbol.asyncIterator]() {
    return this.messages();
  }

  // ---- the connection

  async _attempt() {
    const generation = this._generation;
    let WS, raw;
    try {
      WS = this._o.WebSocket ?? globalThis.WebSocket ?? await loadWebSocket();
    } catch (error) {
      this._giveUp(generation, error);
      return;
    }
    try {
      if (this._token === null && this._o.getToken !== null) {
        this._token = (await this._o.getToken()) ?? null;
      }
      raw = typeof this._url === 'function' ? await this._url() : this._url;
    } catch (error) {
      // A token or URL that could not be fetched now (offline?): an attempt that failed.
      if (generation === this._generation) {
        this._emit('error', error);
        this._failures += 1;
        this._retry('retry');
      }
      return;
    }
    if (generation !== this._generation) {
      return;
    }
    let ws, offeredReliable;
    try {
      const url = absoluteUrl(raw);
      const rel = this._rel;
      const own = rel === null ? this._framing.protocols : rel.unavailable ? [] : [RELIABLE_SUBPROTOCOL];
      const protocols = [...own, ...this._o.protocols];
      offeredReliable = own.length > 0;
      if (this._token !== null) {
        if (this._o.tokenIn === 'query') {
          url.searchParams.set(this._o.tokenParam, this._token);
        } else {
          protocols.push(`bearer.${this._token}`);
        }
      }
      if (this._resume !== null) {
        url.searchParams.set('resume', this._resume);
        if (rel !== null && rel.token !== null) {
          url.searchParams.set('last', String(rel.received));   // the gateway replays from last + 1
        }
      } else if (rel !== null) {
        rel.fresh();
      }
      ws = protocols.length > 0 ? new WS(url.href, protocols) : new WS(url.href);
    } catch (error) {
      this._giveUp(generation, error);   // a bad URL or subprotocol: no retry makes it good
      return;
    }
    ws.binaryType = 'arraybuffer';
    const s = { ws, opened: false, resumeToken: this._resume, status: null, hello: false, noReliable: false,
      offeredReliable, told: false };
    this._socket = s;
    this._timer = this._timers.setTimeout(() => {
      this._timer = null;
      ws.close();   // a handshake that hangs: fails the attempt, which closes with 1006
    }, this._o.connectTimeoutMs);
    ws.onopen = () => this._socket === s && (this._rel === null ? this._opened(s) : this._reliableOpen(s));
    ws.onmessage = (event) => this._socket === s && (s.hello ? this._hello(s, event.data) : this._received(event.data));
    ws.onerror = (event) => this._socket === s && this._failed(s, event);
    ws.onclose = (event) => this._socket === s && this._closed(s, event);
  }

  /** Reliable mode's 101: wait for the hello (still within connectTimeoutMs), or go plain, or give up. */
  _reliableOpen(s) {
    if (s.ws.protocol === RELIABLE_SUBPROTOCOL) {
      s.hello = true;
    } else {
      this._noReliable(s);
    }
  }

  /**
   * The gateway does not do reliable mode on this route: 'prefer' goes on
   * without it, 'require' stops. `close`: the handshake failed for it (ws),
   * else the socket is open without the subprotocol (browsers).
   */
  _noReliable(s, close = null) {
    if (this._o.reliable === 'prefer') {
      this._rel.unavailable = true;   // for this client's life: offered again after close() and connect()
      if (close === null) {
        this._opened(s, false, () => this._rel.plainOpened(this._writer(s)));
      } else {
        this._failures -= 1;   // not a failure: the same attempt without the offer
        this._emit('close', { ...close, willRetry: true });
        this._retry('resume');
      }
      return;
    }
    const why = `the gateway did not select ${RELIABLE_SUBPROTOCOL} (the route has no reliable:), `
      + "and this client requires it (reliable: 'require')";
    this._emit('error', new GatewayError(why));
    if (close === null) {
      this._abandon(s, false);
    } else {
      this._emit('close', { ...close, willRetry: false });
    }
    this._shutdown(why);
  }

  /** The first message of a reliable connection: the session goes on, or a fresh one starts. */
  _hello(s, raw) {
    s.hello = false;
    const resuming = s.resumeToken !== null;
    let h, why;
    try {
      if (typeof raw !== 'string' || raw[0] !== 'h') {
        throw new GatewayError('reliable: the first message from the gateway is not its hello');
      }
      h = parseHello(raw.slice(1));
      why = this._rel.check(h, resuming);
    } catch (error) {
      this._emit('error', error);
      why = error.message;
    }
    if (why === null) {
      this._opened(s, resuming, () => this._rel.start(h, this._writer(s)));
      return;
    }
    // The counts do not match (or no hello): this session cannot go on without loss.
    this._abandon(s, true);
    this._resume = null;
    this._failures = 0;
    this._emit('resumeFailed', { reason: why });
    this._retry(resuming ? 'resume' : 'retry');
  }

  _writer(s) {
    return (wire) => s.ws.readyState === OPEN && s.ws.send(wire);
  }

  /** Close a socket the client no longer wants, and forget it (its own close is not waited for). */
  _abandon(s, willRetry) {
    this._socket = null;
    this._clearTimers();
    this._rel?.closed();
    s.ws.onclose = null;
    s.ws.onerror = null;
    s.ws.onmessage = null;
    s.ws.close(1000);
    this._emit('close', { code: 1000, reason: '', willRetry });
  }

  _opened(s, resumed = s.resumeToken !== null, flush = null) {
    this._clearTimers();
    s.opened = true;
    this._resume = null;
    this._failures = 0;
    if (resumed) {
      this._backoff.reset();
    } else {
      this._stable = this._timers.setTimeout(() => {
        this._stable = null;
        this._backoff.reset();
      }, this._backoff.options.resetAfterMs);
    }
    this._framing.opened({ resumed, protocol: s.ws.protocol });
    // The queue first, so that a send() from a listener below goes after it.
    if (flush !== null) {
      flush();
    }
    while (this._queue.length > 0 && s.ws.readyState === OPEN) {
      s.ws.send(this._queue.shift());
    }
    this._move('open');
    this._emit('open', { resumed });
  }

  _received(raw) {
    let data;
    try {
      data = this._rel === null ? this._framing.decode(raw) : this._rel.receive(raw);
    } catch (error) {
      this._emit('error', error);   // the gateway broke the protocol: reported, the message ignored
      return;
    }
    if (data === undefined) {
      return;
    }
    // A reply to a request is the request's answer, not a message (a '{' first: JSON objects only).
    if (this._pending.size > 0 && typeof data === 'string' && data.charCodeAt(0) === 123) {
      let parsed;
      try {
        parsed = JSON.parse(data);
      } catch {
        parsed = undefined;
      }
      if (parsed !== undefined && this._pending.settle(parsed)) {
        return;
      }
    }
    this._emit('message', data);
    for (const stream of this._streams) {
      stream.push(data);
    }
  }

  _failed(s, event) {
    const message = event?.message ?? event?.error?.message;
    const status = handshakeStatus(message);
    if (status !== null) {
      s.status = status;
    }
    s.told = s.told || Boolean(message);
    if (this._rel !== null && !s.opened && NO_SUBPROTOCOL.test(message ?? '')) {
      // ws and Node's WebSocket fail a 101 that selects none of the offered subprotocols
      // and say so (browsers fail it without a word): the route has no reliable:.
      s.noReliable = true;
    }
    const error = event?.error instanceof Error ? event.error
      : new GatewayError(message || (s.opened ? 'WebSocket error' : 'WebSocket connection failed'));
    this._emit('error', error);
    if (!s.opened && this._socket === s) {
      // An error before the open ends the attempt (RFC 6455 4.1: fail the connection).
      // Browsers then fire close 1006; some implementations never do, so do not wait for it.
      this._closed(s, { code: 1006, reason: '' });
    }
  }

  _closed(s, event) {
    this._socket = null;
    this._clearTimers();
    this._framing.closed();
    this._rel?.closed();
    if (!s.opened) {
      this._failures += 1;
    }
    const close = { code: event.code, reason: event.reason ?? '' };
    if (s.noReliable) {
      this._noReliable(s, close);
      return;
    }
    if (this._o.reliable === 'prefer' && !s.opened && !s.told && s.resumeToken === null) {
      // A browser fails a 101 that selects none of the offered subprotocols and does not
      // say why (ws and Node's WebSocket do, as for a refused connection or a status): as
      // far as can be told the route may lack reliable:. The next attempt goes the other
      // way; the first to open decides.
      this._rel.unavailable = s.offeredReliable;
    }
    const decision = decide({
      ...close, opened: s.opened, status: s.status, resumeToken: s.resumeToken,
      reliableToken: this._rel?.token ?? null, failures: this._failures,
      refusalAfter: this._o.refusalAfter, resumeAttempts: this._o.resumeAttempts,
    });
    switch (decision.action) {
      case 'resume':
        this._resume = decision.token;
        this._emit('close', { ...close, willRetry: true });
        this._retry('resume');
        break;
      case 'fresh':
        this._resume = null;
        this._failures = 0;
        this._emit('close', { ...close, willRetry: true });
        this._emit('resumeFailed', { reason: decision.why });
        this._retry('resume');
        break;
      case 'retry':
        this._resume = decision.token;
        this._emit('close', { ...close, willRetry: true });
        this._retry(decision.kind);
        break;
      case 'refresh':
        this._refresh(close, decision.why);
        break;
      default:
        this._emit('close', { ...close, willRetry: false });
        this._shutdown(decision.why);
    }
  }

  /** A refusal of the credentials: go on only with a token different from the last. */
  async _refresh(close, why) {
    const generation = this._generation;
    let token = null;
    let failed = null;
    if (this._o.getToken !== null) {
      try {
        token = (await this._o.getToken()) ?? null;
      } catch (error) {
        failed = error;
      }
    }
    if (generation !== this._generation) {
      return;
    }
    if (failed !== null) {
      // Fetching a token failed (offline?): not a verdict on it; try again later.
      this._emit('close', { ...close, willRetry: true });
      this._emit('error', failed);
      this._retry('later');
    } else if (token !== null && token !== this._token) {
      this._token = token;
      this._failures = 0;
      this._emit('close', { ...close, willRetry: true });
      this._retry('retry');
    } else {
      this._emit('close', { ...close, willRetry: false });
      const hint = this._o.getToken === null ? 'no getToken to ask for another token' : 'getToken gave no new token';
      this._shutdown(`${why}; ${hint}`);
    }
  }

  /** What no retry can mend (no WebSocket, a malformed URL): closed, with the error. */
  _giveUp(generation, error) {
    if (generation !== this._generation) {
      return;
    }
    this._emit('error', error);
    this._shutdown(error.message);
  }

  _retry(kind) {
    if (this._state === 'open') {
      this._move('reconnecting');
    }
    this._timer = this._timers.setTimeout(() => {
      this._timer = null;
      this._attempt();
    }, this._backoff.next(kind));
  }

  _shutdown(why) {
    this._clearTimers();
    this._move('closed');
    this._queue.clear();
    this._rel?.clear();
    this._pending.rejectAll(why);
    for (const stream of this._streams) {
      stream.end();
    }
    this.closeReason = why;
  }

  _clearTimers() {
    if (this._timer !== null) {
      this._timers.clearTimeout(this._timer);
      this._timer = null;
    }
    if (this._stable !== null) {
      this._timers.clearTimeout(this._stable);
      this._stable = null;
    }
  }

  _move(to) {
    const from = this._state;
    this._state = advance(from, to);
    this._emit('state', { from, to });
  }

  _listenersOf(name) {
    const set = this._listeners.get(name);
    if (set === undefined) {
      throw new TypeError(`unknown event ${JSON.stringify(name)} (known: ${EVENTS.join(', ')})`);
    }
    return set;
  }

  _emit(name, arg) {
    for (const listener of [...this._listeners.get(name)]) {
      try {
        listener.call(this, arg);
      } catch (error) {
        // A listener's bug is the application's: report it, as EventTarget does, without breaking the client.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}

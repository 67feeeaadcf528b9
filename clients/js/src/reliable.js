// Reliable mode (docs/reliable.md): the client's half of the numbered
// session. Each side counts the data messages it sends and receives; the
// counts are implicit (a WebSocket loses nothing while it lives) and show up
// only at the seams: in acks, in the gateway's hello, and in a resume's
// `last=`. So a connection that dies without a close (1006: network lost)
// costs nothing: the client comes back with its token and what it received,
// the gateway replays what the client missed, the client sends again what
// the gateway did not take.
//
// Every message carries one kind byte:
//   d<message>  data, text or binary as the application chose (both ways)
//   a<count>    "I have received messages 1..count" (text, both ways)
//   h<json>     the gateway's hello, first message of every connection:
//               {v, session, token, up, down[, ack_every, ack_ms]}
//
// This file holds what that needs and no socket: the frames, the hello's
// checks, and `ReliableSession`, the counts and the window of messages not
// yet acked. client.js gives it a `write` for the open socket and timers.

import { GatewayError } from './errors.js';
import { OutboundQueue } from './queue.js';

export const RELIABLE_SUBPROTOCOL = 'gateway.reliable.v1';
export const ACK_EVERY = 64;    // the doc's defaults, used when the hello does not say
export const ACK_MS = 200;

const D = 0x64;
const A = 0x61;
const H = 0x68;
const KIND_D = new Uint8Array([D]);

/** An application message with its `d` kind byte, in the frame type it came in. */
export function encodeData(data) {
  if (typeof data === 'string') {
    return `d${data}`;
  }
  if (typeof Blob !== 'undefined' && data instanceof Blob) {
    return new Blob([KIND_D, data]);
  }
  const bytes = data instanceof ArrayBuffer ? new Uint8Array(data)
    : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const out = new Uint8Array(bytes.length + 1);
  out[0] = D;
  out.set(bytes, 1);
  return out;
}

/**
 * A socket message split into its kind and payload: {kind: 'd'|'a'|'h', payload}
 * (a string for text, an ArrayBuffer for binary), or null when the kind byte is unknown.
 */
export function decodeFrame(raw) {
  if (typeof raw === 'string') {
    const kind = raw.charCodeAt(0);
    return kind === D || kind === A || kind === H ? { kind: raw[0], payload: raw.slice(1) } : null;
  }
  const bytes = new Uint8Array(raw);
  if (bytes.length === 0 || bytes[0] !== D) {
    return null;   // acks and hellos are text
  }
  return { kind: 'd', payload: raw.slice(1) };
}

const COUNT = /^\d{1,19}$/;

/** An ack's count (decimal digits), or null. */
export function parseAck(payload) {
  return COUNT.test(payload) ? Number(payload) : null;
}

const isCount = (v) => Number.isSafeInteger(v) && v >= 0;

/** The hello's fields, checked; throws a GatewayError naming what is wrong. */
export function parseHello(payload) {
  let h;
  try {
    h = JSON.parse(payload);
  } catch {
    throw new GatewayError(`reliable: the gateway's hello is not JSON: ${payload.slice(0, 80)}`);
  }
  if (h === null || typeof h !== 'object' || h.v !== 1 || typeof h.token !== 'string' || h.token === ''
      || !isCount(h.up) || !isCount(h.down)) {
    throw new GatewayError(`reliable: a hello without v 1, token, up and down: ${payload.slice(0, 200)}`);
  }
  const ackEvery = h.ack_every === undefined ? ACK_EVERY : h.ack_every;
  const ackMs = h.ack_ms === undefined ? ACK_MS : h.ack_ms;
  if (!(Number.isSafeInteger(ackEvery) && ackEvery >= 1) || !(typeof ackMs === 'number' && ackMs > 0)) {
    throw new GatewayError(`reliable: the hello's ack_every/ack_ms are not a count >= 1 and ms > 0: ${payload.slice(0, 200)}`);
  }
  return { session: typeof h.session === 'string' ? h.session : null, token: h.token, up: h.up, down: h.down,
    ackEvery, ackMs };
}

/**
 * One session's counts and window, across its connections.
 *
 *   received   data messages received this session (the resume's `last=`)
 *   base       client messages before the window's first (acked, or dropped by the overflow policy)
 *   window     what the application sent that the gateway has not acked, oldest first;
 *              the first `written` of them went out on the current connection
 *   token      the resume token of the last hello (single use)
 */
export class ReliableSession {
  /**
   * queue: {maxMessages, maxBytes, overflow, onDrop} (the client's queue options);
   * timers: {setTimeout, clearTimeout}; write(wire): the open socket's send.
   */
  constructor({ queue, timers }) {
    this.timers = timers;
    // The overflow policy's drops leave the window at its front: the numbers move on.
    this.unavailable = false;   // the route does not select the subprotocol ('prefer' goes plain)
    this.window = new OutboundQueue({
      ...queue,
      onDrop: (data) => {
        this.base += 1;
        this.written = Math.max(0, this.written - 1);
        queue.onDrop(data);
      },
    });
    this.fresh();
  }

  /** A new session: nothing received, every message in the window still to send. */
  fresh() {
    this.received = 0;
    this.base = 0;
    this.written = 0;
    this.token = null;
    this.session = null;
    this.live = null;        // the connection's write, once its hello was taken; null otherwise
    this.plain = false;      // this connection runs without the subprotocol (reliable 'prefer')
    this.ackEvery = ACK_EVERY;
    this.ackMs = ACK_MS;
    this.acked = 0;          // the count this client last acked
    this._stopAcking();
  }

  /** Messages in the window not yet written on the current connection. */
  get unsent() {
    return this.window.length - this.written;
  }

  /** Keep `data` until acked; write it at once when a connection is live. */
  send(data) {
    this.window.push(data);
    // The push may have dropped the oldest (overflow 'dropOldest'); they count as gone.
    this._flush();
  }

  /**
   * Whether the hello `h` (parseHello) of a new connection goes with this
   * session's counts. `resuming`: the attempt presented a token. Returns null
   * when it does, else why not (the caller starts a fresh session).
   */
  check(h, resuming) {
    if (resuming && h.down !== this.received) {
      return `the gateway resumed after message ${h.down}, this client has received ${this.received}`;
    }
    if (!resuming && (h.up !== 0 || h.down !== 0)) {
      return `a new session's hello counts up ${h.up}, down ${h.down} (expected 0, 0)`;
    }
    if (h.up > this.base + this.window.length) {
      return `the gateway took ${h.up} messages, this client sent ${this.base + this.window.length}`;
    }
    return null;
  }

  /** The session goes on with the (checked) hello `h` on a connection that `write`s. */
  start(h, write) {
    this.written = 0;
    if (h.up >= this.base) {
      this._trim(h.up);
    } else {
      // Messages dropped by the overflow policy before the gateway took them: renumber.
      this.base = h.up;
    }
    this.token = h.token;
    this.session = h.session;
    this.ackEvery = h.ackEvery;
    this.ackMs = h.ackMs;
    this.acked = this.received;
    this.live = write;
    this._flush();
  }

  /** A connection without the subprotocol: the window goes out as plain messages, unacked. */
  plainOpened(write) {
    this.plain = true;
    this.live = write;
    this.written = 0;
    this._flush();
  }

  /**
   * A socket message of the live connection. Returns the application
   * message of a `d`, or undefined for the session's own; throws a
   * GatewayError for what breaks the protocol.
   */
  receive(raw) {
    if (this.plain) {
      return raw;
    }
    const frame = decodeFrame(raw);
    if (frame === null) {
      throw new GatewayError('reliable: a message from the gateway with an unknown kind byte');
    }
    if (frame.kind === 'd') {
      this.received += 1;
      this._scheduleAck();
      return frame.payload;
    }
    if (frame.kind === 'a') {
      const count = parseAck(frame.payload);
      if (count === null || count > this.base + this.written) {
        throw new GatewayError(`reliable: a bad ack ${JSON.stringify(frame.payload.slice(0, 40))} `
          + `(this client sent ${this.base + this.written})`);
      }
      this._trim(count);
      return undefined;
    }
    throw new GatewayError('reliable: a second hello on one connection');
  }

  /** The connection ended: nothing is written until the next hello. */
  closed() {
    this.live = null;
    this.plain = false;
    this.written = 0;
    this._stopAcking();
  }

  /** Everything: the client closed. */
  clear() {
    this.window.clear();
    this.fresh();
  }

  _trim(count) {
    while (this.base < count && this.window.length > 0) {
      this.window.shift();
      this.base += 1;
      this.written = Math.max(0, this.written - 1);
    }
    this.base = Math.max(this.base, count);
  }

  _flush() {
    const write = this.live;
    while (write !== null && this.live === write && this.written < this.window.length) {
      const data = this.window.at(this.written);
      if (this.plain) {
        this.window.shift();   // no ack will come: gone once written
        write(data);
      } else {
        this.written += 1;
        write(encodeData(data));
      }
    }
  }

  _scheduleAck() {
    if (this.received - this.acked >= this.ackEvery) {
      this._ackNow();
    } else if (this.ackTimer === null) {
      this.ackTimer = this.timers.setTimeout(() => {
        this.ackTimer = null;
        this._ackNow();
      }, this.ackMs);
    }
  }

  _ackNow() {
    this._stopAcking();
    if (this.live !== null && this.received > this.acked) {
      this.acked = this.received;
      this.live(`a${this.received}`);
    }
  }

  _stopAcking() {
    if (this.ackTimer) {
      this.timers.clearTimeout(this.ackTimer);
    }
    this.ackTimer = null;
  }
}

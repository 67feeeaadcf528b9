// Test peers: a real WebSocket server (ws, on 127.0.0.1) that can refuse
// handshakes with a status, timers the test fires by hand, and bounded waits.

import http from 'node:http';

import { WebSocketServer } from 'ws';

/**
 * A WebSocket server on a free port. Each connection is recorded as
 * {socket, url, protocols}; `onConnection(conn)` runs for each (default: echo).
 * Set `refuse` to an HTTP status to answer the next handshakes with it.
 * `select(protocols)` picks the subprotocol of the 101 (default: the first offered).
 */
export async function startServer({ onConnection = echo, select = (protocols) => [...protocols][0] ?? false } = {}) {
  const server = http.createServer((req, res) => res.writeHead(404).end());
  const wss = new WebSocketServer({ noServer: true, handleProtocols: select });
  const peer = {
    connections: [],
    handshakes: [],     // the URL of every handshake, refused or not
    refuse: null,
    onConnection,
    url: '',
    async close() {
      for (const c of wss.clients) {
        c.terminate();
      }
      const closed = new Promise((resolve) => server.close(resolve));
      server.closeAllConnections();
      await closed;
    },
  };
  server.on('upgrade', (req, socket, head) => {
    peer.handshakes.push(req.url);
    if (peer.refuse !== null) {
      socket.end(`HTTP/1.1 ${peer.refuse} Refused\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{"error":"refused"}`);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      const conn = { socket: ws, url: new URL(req.url, 'ws://x'), protocols: req.headers['sec-websocket-protocol'] ?? null };
      peer.connections.push(conn);
      peer.onConnection(conn);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  peer.url = `ws://127.0.0.1:${server.address().port}/ws`;
  return peer;
}

export function echo({ socket }) {
  socket.on('message', (data, isBinary) => socket.send(isBinary ? data : data.toString()));
}

/** The ack_ms of reliableServer's hellos: a delay no other timer in the tests has. */
export const ACK_MS = 4_444;

/**
 * A server that speaks reliable mode: a hello on every connection (token
 * t<n>, `up` from peer.up, `down` from the resume's last=), the client's
 * messages kept per connection as they came (text as strings, binary as
 * arrays of bytes).
 */
export async function reliableServer({ ackEvery = 64, select } = {}) {
  const peer = await startServer({
    select,
    onConnection: (conn) => {
      conn.got = [];
      conn.closeCode = null;
      conn.socket.on('message', (data, isBinary) => conn.got.push(isBinary ? [...data] : data.toString()));
      conn.socket.on('close', (code) => {
        conn.closeCode = code;
      });
      if (conn.protocols?.split(',')[0].trim() === 'gateway.reliable.v1' && peer.hello) {
        const last = conn.url.searchParams.get('last');
        conn.socket.send(`h${JSON.stringify({ v: 1, session: 's', token: `t${peer.connections.length}`,
          up: peer.up, down: last === null ? 0 : Number(last) + peer.downSkew, ack_every: ackEvery, ack_ms: ACK_MS })}`);
      }
    },
  });
  Object.assign(peer, { up: 0, downSkew: 0, hello: true });
  return peer;
}

/** Timers that run only when the test fires them; every delay asked for is kept. */
export class ManualTimers {
  constructor() {
    this.pending = new Map();
    this.delays = [];
    this.seq = 0;
    this.setTimeout = (fn, ms) => {
      this.seq += 1;
      this.pending.set(this.seq, { fn, ms });
      this.delays.push(ms);
      return this.seq;
    };
    this.clearTimeout = (id) => {
      this.pending.delete(id);
    };
  }

  /** Run the pending timers of delay `ms` (or those `ms(delay)` picks); returns how many ran. */
  fire(ms) {
    const pick = typeof ms === 'function' ? ms : (d) => d === ms;
    let n = 0;
    for (const [id, t] of [...this.pending]) {
      if (pick(t.ms)) {
        this.pending.delete(id);
        n += 1;
        t.fn();
      }
    }
    return n;
  }

  has(ms) {
    return [...this.pending.values()].some((t) => t.ms === ms);
  }
}

/** Resolve with the next `name` event of `client` that `test` accepts; reject after `timeoutMs`. */
export function next(client, name, test = () => true, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${name} event within ${timeoutMs} ms (state ${client.state})`));
    }, timeoutMs);
    const off = client.on(name, (event) => {
      if (test(event)) {
        clearTimeout(timer);
        off();
        resolve(event);
      }
    });
  });
}

/** Poll `check` until it returns something truthy (bounded); returns that. */
export async function until(check, what = 'condition', timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`${what} not met within ${timeoutMs} ms (last: ${String(value)})`);
    }
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** A URL where nothing listens (bound, then released). */
export async function deadUrl() {
  const server = http.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return `ws://127.0.0.1:${port}/ws`;
}

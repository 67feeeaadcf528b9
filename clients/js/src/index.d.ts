// Types of @gateway/client (src/index.js).

/**
 * The connection's state: `connecting` until a connection has been open, `reconnecting`
 * after one was lost, `closed` when none is planned (connect() starts again).
 */
export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** What a message is: text arrives as a string, binary as an ArrayBuffer. */
export type Message = string | ArrayBuffer;

/** What send() takes. */
export type Outgoing = string | ArrayBuffer | ArrayBufferView | Blob;

export interface GatewayEvents {
  state: { from: State; to: State };
  /** `resumed`: the gateway resumed the session (its replay came first); false: a new session. */
  open: { resumed: boolean };
  message: Message;
  /** Every socket close; `willRetry` false means the client is now closed. */
  close: { code: number; reason: string; willRetry: boolean };
  error: Error;
  /**
   * A resume was refused (or kept failing), or in reliable mode the gateway's counts did not
   * match this client's: the client goes on with a new session.
   */
  resumeFailed: { reason: string };
  /** overflow 'dropOldest': a queued message was pushed out unsent. */
  dropped: { data: Outgoing };
}

export type EventName = keyof GatewayEvents;
export type Listener<K extends EventName> = (this: GatewayClient, event: GatewayEvents[K]) => void;

export interface BackoffOptions {
  /** First ceiling of the delay, ms (default 500); it doubles per attempt. */
  baseMs?: number;
  /** Largest ceiling, ms (default 30000). */
  maxMs?: number;
  /** A connection open this long resets the attempt count, ms (default 5000). */
  resetAfterMs?: number;
  /** 1013, 429 and 503 wait this long plus the jittered delay, ms (default 5000). */
  tryAgainLaterMs?: number;
  /** A drain's 1012 with a resume token comes back within this, ms (default 250). */
  resumeJitterMs?: number;
}

export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: any): void;
}

/** The wire format between application messages and socket messages (see src/framing.js). */
export interface Framing {
  create(io: { sendRaw(data: Outgoing): void }): {
    protocols: readonly string[];
    encode(data: Outgoing): Outgoing;
    decode(data: Message): Message | undefined;
    opened(info: { resumed: boolean; protocol: string }): void;
    closed(): void;
  };
}

/** A WebSocket constructor: the browser's, Node 22's, or the ws package's. */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  binaryType: string;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  send(data: any): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export type UrlSource = string | URL | (() => string | URL | Promise<string | URL>);

export interface GatewayOptions {
  /** The JWT (sent as tokenIn says), or null for routes without auth. */
  token?: string | null;
  /** Asked on the first connect when `token` is unset, and after a refusal (1008, 401/403): only a different token retries. */
  getToken?: (() => string | null | undefined | Promise<string | null | undefined>) | null;
  /** 'query' (default): ?access_token=; 'subprotocol': a `bearer.<token>` subprotocol entry. */
  tokenIn?: 'query' | 'subprotocol';
  /** The query parameter for tokenIn 'query' (default 'access_token'). */
  tokenParam?: string;
  /** The application's own subprotocols. */
  protocols?: string[];
  /** Default: globalThis.WebSocket, else the ws package (Node 20). */
  WebSocket?: WebSocketConstructor | (new (...args: any[]) => any) | null;
  backoff?: BackoffOptions;
  /** Handshakes in a row that fail with no status known (browsers) that count as a refusal (default 5). */
  refusalAfter?: number;
  /** Resume attempts that fail with no status known before a new session (default 3). */
  resumeAttempts?: number;
  connectTimeoutMs?: number;
  /** Outbound queue bound in messages (default 1000). */
  maxQueue?: number;
  /** Outbound queue bound in bytes (default 1 MiB). */
  maxQueueBytes?: number;
  /** 'throw' (default): send() throws QueueFullError; 'dropOldest': the oldest goes, with a `dropped` event. */
  overflow?: 'throw' | 'dropOldest';
  /** The correlation id field of request() (default 'id'). */
  idField?: string;
  /** Requests waiting for replies at most (default 1000). */
  maxPending?: number;
  requestTimeoutMs?: number;
  /** A wire format for the messages (default: as they are). Not with `reliable`. */
  framing?: Framing;
  /**
   * Reliable mode (`gateway.reliable.v1`, docs/reliable.md): messages numbered both ways,
   * kept until acked, and the session resumed after any unplanned close (1006 included).
   * 'prefer': plain messages on a route without it; 'require': close with an error there.
   * Default null: off.
   */
  reliable?: 'prefer' | 'require' | null;
  /** For tests: the source of jitter, [0, 1). */
  random?: (() => number) | null;
  /** For tests: the timers the client uses. */
  timers?: Timers | null;
  /** false: wait for connect(). */
  autoConnect?: boolean;
}

export declare const EVENTS: readonly EventName[];

export declare class GatewayClient implements AsyncIterable<Message> {
  constructor(url: UrlSource, options?: GatewayOptions);
  readonly state: State;
  /** Messages waiting in the outbound queue (reliable mode: not yet written on this connection). */
  readonly queued: number;
  /** Reliable mode: messages sent or queued that the gateway has not acked yet; else 0. */
  readonly unacked: number;
  /** Why the client closed, once it has; else null. */
  readonly closeReason: string | null;
  /** Starts connecting: needed with autoConnect false, or to start again once closed. */
  connect(): void;
  /** Returns a function that removes the listener. */
  on<K extends EventName>(name: K, listener: Listener<K>): () => void;
  off<K extends EventName>(name: K, listener: Listener<K>): void;
  /** Sends now when open, else queues. Throws QueueFullError (overflow 'throw') or ClosedError. */
  send(data: Outgoing): void;
  /** Sends `message` as JSON with a correlation id; resolves with the reply carrying the same id. */
  request<Reply = any>(message: Record<string, unknown>, options?: { timeoutMs?: number }): Promise<Reply>;
  /** Closes (connect() would start again); resolves when the socket has closed, or after connectTimeoutMs. */
  close(code?: number, reason?: string): Promise<void>;
  /** The messages that arrive from now on; ends when the client closes. */
  messages(options?: { maxBuffered?: number }): AsyncIterableIterator<Message>;
  [Symbol.asyncIterator](): AsyncIterableIterator<Message>;
}

export declare class GatewayError extends Error {}
export declare class QueueFullError extends GatewayError {}
export declare class RequestTimeoutError extends GatewayError {}
export declare class ClosedError extends GatewayError {}

export declare const BACKOFF_DEFAULTS: Readonly<Required<BackoffOptions>>;
export declare function backoffDelay(attempt: number, options?: { baseMs?: number; maxMs?: number; random?: () => number }): number;
export declare class Backoff {
  constructor(options?: BackoffOptions, random?: () => number);
  readonly options: Readonly<Required<BackoffOptions>>;
  attempt: number;
  next(kind?: 'retry' | 'later' | 'resume'): number;
  reset(): void;
}

export interface CloseFacts {
  code: number;
  reason: string;
  opened: boolean;
  status?: number | null;
  /** The resume token the attempt presented, else null. */
  resumeToken?: string | null;
  /** Reliable mode: the token of the connection's hello; with one, any close but 1000 and 1008 resumes. */
  reliableToken?: string | null;
  byUser?: boolean;
  failures?: number;
  refusalAfter?: number;
  resumeAttempts?: number;
}
export type Decision =
  | { action: 'stop'; why: string }
  | { action: 'resume'; token: string }
  | { action: 'retry'; kind: 'retry' | 'later'; token: string | null }
  | { action: 'refresh'; why: string }
  | { action: 'fresh'; why: string };
export declare function decide(close: CloseFacts): Decision;
export declare function resumeToken(reason: string): string | null;
/** The reason of the gateway's 1013 after a resume that could not finish: the token is kept. */
export declare const RESUME_RETRY_REASON: string;
export declare function handshakeStatus(message: string | undefined): number | null;

export declare function byteSize(data: Outgoing): number;
export declare class OutboundQueue {
  constructor(options?: { maxMessages?: number; maxBytes?: number; overflow?: 'throw' | 'dropOldest'; onDrop?: (data: Outgoing) => void });
  readonly length: number;
  readonly bytes: number;
  push(data: Outgoing): void;
  shift(): Outgoing | undefined;
  clear(): void;
}
export declare class PendingRequests {
  constructor(options?: { idField?: string; maxPending?: number; timers?: Timers });
  readonly size: number;
  add(message: Record<string, unknown>, timeoutMs: number): [string | number, Record<string, unknown>, Promise<any>];
  settle(reply: unknown): boolean;
  cancel(id: string | number, error: Error): void;
  rejectAll(why: string): void;
}

export declare const plainFraming: Framing;
/** The subprotocol reliable mode offers: 'gateway.reliable.v1'. */
export declare const RELIABLE_SUBPROTOCOL: string;
export declare const STATES: readonly State[];
export declare const TRANSITIONS: Readonly<Record<State, readonly State[]>>;
export declare function advance(from: State, to: State): State;

// Requests waiting for their reply, by correlation id. Bounded, and each one
// ends: by its reply, its timeout, or the client closing.

import { ClosedError, QueueFullError, RequestTimeoutError } from './errors.js';

export class PendingRequests {
  /** idField: the JSON field that carries the id; timers: {setTimeout, clearTimeout}. */
  constructor({ idField = 'id', maxPending = 1000, timers = globalThis } = {}) {
    if (typeof idField !== 'string' || idField === '') {
      throw new TypeError(`idField must be a non-empty string, got ${String(idField)}`);
    }
    if (!Number.isInteger(maxPending) || maxPending < 1) {
      throw new TypeError(`maxPending must be an integer >= 1, got ${String(maxPending)}`);
    }
    this.idField = idField;
    this.maxPending = maxPending;
    this.timers = timers;
    this.waiting = new Map();   // id -> {resolve, reject, timer}
    this.seq = 0;
    // Ids unique across clients of one page and across reloads, for logs that join them.
    this.prefix = Math.random().toString(36).slice(2, 8);
  }

  get size() {
    return this.waiting.size;
  }

  /**
   * Register `message` (a plain object; an id is added when it has none):
   * [id, the message with its id, promise of the reply]. Throws when full
   * or the id is in use.
   */
  add(message, timeoutMs) {
    if (message === null || typeof message !== 'object' || Array.isArray(message)) {
      throw new TypeError('request() takes a plain object (it is sent as JSON with a correlation id)');
    }
    if (!(timeoutMs > 0)) {
      throw new TypeError(`request timeout must be a number of ms > 0, got ${String(timeoutMs)}`);
    }
    if (this.waiting.size >= this.maxPending) {
      throw new QueueFullError(`too many requests waiting for a reply (max ${this.maxPending})`);
    }
    let id = message[this.idField];
    if (id === undefined) {
      this.seq += 1;
      id = `${this.prefix}-${this.seq}`;
    } else if (typeof id !== 'string' && typeof id !== 'number') {
      throw new TypeError(`the ${this.idField} field must be a string or number, got ${typeof id}`);
    } else if (this.waiting.has(id)) {
      throw new TypeError(`a request with ${this.idField} ${JSON.stringify(id)} is waiting already`);
    }
    let entry;
    const promise = new Promise((resolve, reject) => {
      entry = { resolve, reject, timer: null };
    });
    entry.timer = this.timers.setTimeout(() => {
      this.waiting.delete(id);
      entry.reject(new RequestTimeoutError(`no reply to request ${JSON.stringify(id)} within ${timeoutMs} ms`));
    }, timeoutMs);
    this.waiting.set(id, entry);
    return [id, { ...message, [this.idField]: id }, promise];
  }

  /** Settle the request this parsed reply answers; false when it answers none. */
  settle(reply) {
    if (reply === null || typeof reply !== 'object') {
      return false;
    }
    const id = reply[this.idField];
    const entry = this.waiting.get(id);
    if (entry === undefined) {
      return false;
    }
    this.waiting.delete(id);
    this.timers.clearTimeout(entry.timer);
    entry.resolve(reply);
    return true;
  }

  /** Forget a request whose message could not be sent. */
  cancel(id, error) {
    const entry = this.waiting.get(id);
    if (entry !== undefined) {
      this.waiting.delete(id);
      this.timers.clearTimeout(entry.timer);
      entry.reject(error);
    }
  }

  /** Reject every waiting request (the client closed). */
  rejectAll(why) {
    for (const [id, entry] of this.waiting) {
      this.timers.clearTimeout(entry.timer);
      entry.reject(new ClosedError(`request ${JSON.stringify(id)}: ${why}`));
    }
    this.waiting.clear();
  }
}

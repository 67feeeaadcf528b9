// The outbound queue: messages sent while the connection is not open wait
// here, in order, and go out on the next open. Bounded in count and bytes;
// what happens on overflow is the caller's choice.

import { QueueFullError } from './errors.js';

const encoder = new TextEncoder();

/** The size of a message on the wire (UTF-8 for text). */
export function byteSize(data) {
  if (typeof data === 'string') {
    return encoder.encode(data).length;
  }
  if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
    return data.byteLength;
  }
  if (typeof Blob !== 'undefined' && data instanceof Blob) {
    return data.size;
  }
  throw new TypeError(`a message is a string, ArrayBuffer, typed array or Blob, got ${Object.prototype.toString.call(data)}`);
}

export class OutboundQueue {
  /**
   * maxMessages, maxBytes: the bounds. overflow: 'throw' (QueueFullError)
   * or 'dropOldest' (onDrop(data) for each message pushed out).
   */
  constructor({ maxMessages = 1000, maxBytes = 1 << 20, overflow = 'throw', onDrop = () => {} } = {}) {
    if (overflow !== 'throw' && overflow !== 'dropOldest') {
      throw new TypeError(`overflow must be 'throw' or 'dropOldest', got ${JSON.stringify(overflow)}`);
    }
    for (const [name, v] of [['maxQueue', maxMessages], ['maxQueueBytes', maxBytes]]) {
      if (!Number.isInteger(v) || v < 0) {
        throw new TypeError(`${name} must be an integer >= 0, got ${String(v)}`);
      }
    }
    this.maxMessages = maxMessages;
    this.maxBytes = maxBytes;
    this.overflow = overflow;
    this.onDrop = onDrop;
    this.items = [];   // [data, size]
    this.head = 0;     // items before head are gone (shift() is O(n))
    this.bytes = 0;
  }

  get length() {
    return this.items.length - this.head;
  }

  push(data) {
    const size = byteSize(data);
    if (size > this.maxBytes || this.maxMessages === 0) {
      throw new QueueFullError(`message of ${size} bytes does not fit the outbound queue (max ${this.maxMessages} messages, ${this.maxBytes} bytes)`);
    }
    if (this.length + 1 > this.maxMessages || this.bytes + size > this.maxBytes) {
      if (this.overflow === 'throw') {
        throw new QueueFullError(`outbound queue full (max ${this.maxMessages} messages, ${this.maxBytes} bytes): not connected`);
      }
      while (this.length + 1 > this.maxMessages || this.bytes + size > this.maxBytes) {
        this.onDrop(this.shift());
      }
    }
    this.items.push([data, size]);
    this.bytes += size;
  }

  /** The message at `index` from the oldest (0), left in place; undefined past the end. */
  at(index) {
    return index < this.length ? this.items[this.head + index][0] : undefined;
  }

  /** The oldest message, removed; undefined when empty. */
  shift() {
    if (this.length === 0) {
      return undefined;
    }
    const [data, size] = this.items[this.head];
    this.items[this.head] = undefined;
    this.head += 1;
    this.bytes -= size;
    if (this.head === this.items.length) {
      this.items = [];
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return data;
  }

  clear() {
    this.items = [];
    this.head = 0;
    this.bytes = 0;
  }
}

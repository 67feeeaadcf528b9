// `for await (const message of client)`: the messages that arrive after the
// loop starts, buffered (bounded) while the loop body runs.

import { QueueFullError } from './errors.js';

export class MessageStream {
  constructor(maxBuffered, onEnd) {
    if (!Number.isInteger(maxBuffered) || maxBuffered < 1) {
      throw new TypeError(`maxBuffered must be an integer >= 1, got ${String(maxBuffered)}`);
    }
    this.maxBuffered = maxBuffered;
    this.onEnd = onEnd;
    this.buffered = [];
    this.head = 0;
    this.waiter = null;   // {resolve, reject} of a next() waiting for a message
    this.done = false;
    this.error = null;
  }

  push(data) {
    if (this.done) {
      return;
    }
    if (this.waiter !== null) {
      const { resolve } = this.waiter;
      this.waiter = null;
      resolve({ value: data, done: false });
      return;
    }
    if (this.buffered.length - this.head >= this.maxBuffered) {
      this.fail(new QueueFullError(`the message loop fell behind: more than ${this.maxBuffered} messages unread (messages({maxBuffered}) raises the bound)`));
      return;
    }
    this.buffered.push(data);
  }

  /** No more messages (the client closed): the loop ends once the buffer is read. */
  end() {
    this.finish(null);
  }

  fail(error) {
    this.finish(error);
  }

  finish(error) {
    if (this.done) {
      return;
    }
    this.done = true;
    this.error = error;
    this.onEnd(this);
    if (this.waiter !== null) {
      const { resolve, reject } = this.waiter;
      this.waiter = null;
      if (error) {
        reject(error);
      } else {
        resolve({ value: undefined, done: true });
      }
    }
  }

  next() {
    if (this.head < this.buffered.length) {
      const value = this.buffered[this.head];
      this.buffered[this.head] = undefined;
      this.head += 1;
      if (this.head === this.buffered.length) {
        this.buffered = [];
        this.head = 0;
      }
      return Promise.resolve({ value, done: false });
    }
    if (this.done) {
      if (this.error) {
        const error = this.error;
        this.error = null;   // thrown once; then the iterator is just done
        return Promise.reject(error);
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  /** `break` out of the loop: stop buffering. */
  return() {
    this.buffered = [];
    this.head = 0;
    this.finish(null);
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

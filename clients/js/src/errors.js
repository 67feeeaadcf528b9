// The errors the client throws or rejects with; each names its limit.

export class GatewayError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** send() while the outbound queue is full and the overflow policy is 'throw'; request() over maxPending. */
export class QueueFullError extends GatewayError {}

/** request() got no reply within its timeout. */
export class RequestTimeoutError extends GatewayError {}

/** The client is closed: send(), request() and pending requests fail with this. */
export class ClosedError extends GatewayError {}

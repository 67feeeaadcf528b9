// @gateway/client: a WebSocket client for the gateway, for browsers and
// Node 20+. It reconnects with backoff and full jitter, resumes a drained
// session with its token (no message lost or twice), queues what is sent
// while disconnected, and answers requests by correlation id. In reliable
// mode (reliable.js) it also resumes after a connection that died without a
// close, nothing lost or twice. See README.md.

export { GatewayClient, EVENTS } from './client.js';
export { ClosedError, GatewayError, QueueFullError, RequestTimeoutError } from './errors.js';
export { Backoff, BACKOFF_DEFAULTS, backoffDelay } from './backoff.js';
export { decide, handshakeStatus, RESUME_RETRY_REASON, resumeToken } from './policy.js';
export { OutboundQueue, byteSize } from './queue.js';
export { PendingRequests } from './pending.js';
export { plainFraming } from './framing.js';
export { RELIABLE_SUBPROTOCOL } from './reliable.js';
export { STATES, TRANSITIONS, advance } from './states.js';

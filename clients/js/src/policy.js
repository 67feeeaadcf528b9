// What a closed socket means, decided in one pure function (no timers, no
// sockets), so every case is a unit test.
//
// Handshake refusals: the gateway answers 401 (token), 403 (origin, claims),
// 404 (no route), 410 (resume token used or expired), 429 (per-IP limit),
// 503 (draining, full) before the upgrade. A browser hides the status: the
// socket just closes with 1006 before it opened. The `ws` package says it in
// the error ("Unexpected server response: 401"), and the client passes that
// on as `status`. Without a status, a run of `refusalAfter` attempts in a
// row that never opened counts as a refusal of the credentials.

/** The resume token a close carries (reason `resume=<token>`, DESIGN §7), or null. */
export function resumeToken(reason) {
  if (typeof reason !== 'string' || !reason.startsWith('resume=')) {
    return null;
  }
  const token = reason.slice('resume='.length);
  return token.length > 0 ? token : null;
}

/** The HTTP status in a handshake error's message, where the implementation tells it (ws). */
export function handshakeStatus(message) {
  const m = /Unexpected server response: (\d{3})/.exec(typeof message === 'string' ? message : '');
  return m ? Number(m[1]) : null;
}

/**
 * Decide what follows a close.
 *
 * close: {code, reason, opened, status, resumeToken, byUser, failures, refusalAfter, resumeAttempts}
 *   opened       the socket reached open before it closed
 *   status       the HTTP status of a refused handshake, when known, else null
 *   resumeToken  the resume token the attempt presented, else null
 *   failures     attempts in a row, this one included, that closed before opening
 *   reliableToken  reliable mode: the resume token of the connection's hello, else null;
 *                with one, any close but 1000 and 1008 resumes (the gateway parked the
 *                session: docs/reliable.md), not only a drain's
 *
 * Returns one of
 *   {action: 'stop', why}             closed for good
 *   {action: 'resume', token}         come back at once with the token (drain)
 *   {action: 'retry', kind, token}    back off ('retry') or back off longer ('later'),
 *                                     presenting `token` (a resume still to finish) or null
 *   {action: 'refresh', why}          only with a new token from getToken, else stop
 *   {action: 'fresh', why}            the resume was refused: a new session
 */
export function decide(close) {
  const { code, reason, opened, status = null, resumeToken: held = null, reliableToken = null, byUser = false,
    failures = 0, refusalAfter = 5, resumeAttempts = 3 } = close;
  if (byUser) {
    return { action: 'stop', why: 'closed by the application' };
  }
  if (!opened) {
    return beforeOpen(status, held, failures, refusalAfter, resumeAttempts);
  }
  const token = resumeToken(reason);
  if (token !== null) {
    return { action: 'resume', token };
  }
  if (code === 1000) {
    return { action: 'stop', why: 'the server closed the connection (1000)' };
  }
  if (code === 1008) {
    return { action: 'refresh', why: `policy violation (1008${reason ? `: ${reason}` : ''})` };
  }
  if (code === 1013 && reason === RESUME_RETRY_REASON && held !== null) {
    // gateway/resume.py: a resume that went live but could not finish gave its lease
    // back with this reason; the token still resumes the session.
    return { action: 'retry', kind: 'later', token: held };
  }
  if (reliableToken !== null) {
    // 1006 (the network lost), 1001, 1011, ...: the gateway parks a reliable session for a resume.
    return code === 1013 ? { action: 'retry', kind: 'later', token: reliableToken }
      : { action: 'resume', token: reliableToken };
  }
  if (code === 1013) {
    return { action: 'retry', kind: 'later', token: null };
  }
  // 1001 going away, 1006 lost, 1011 upstream failed, 1012 without a token, ...
  return { action: 'retry', kind: 'retry', token: null };
}

/** The reason of the gateway's 1013 after a resume that could not finish (gateway/resume.py). */
export const RESUME_RETRY_REASON = 'resume failed; retry';

function beforeOpen(status, held, failures, refusalAfter, resumeAttempts) {
  if (held !== null) {
    // 400: a reliable resume's `last` out of range; 401/403: the token; 410: used, expired,
    // or what the client asks for is no longer kept (docs/reliable.md).
    if (status === 400 || status === 401 || status === 403 || status === 410) {
      return { action: 'fresh', why: `resume refused (HTTP ${status})` };
    }
    if (status === null && failures >= resumeAttempts) {
      return { action: 'fresh', why: `resume failed ${failures} times without opening` };
    }
    if (status === null || status >= 500) {   // 503: a lease elsewhere, a replay being written
      return { action: 'retry', kind: 'retry', token: held };
    }
  }
  if (status === 401 || status === 403) {
    return { action: 'refresh', why: `handshake refused (HTTP ${status})` };
  }
  if (status === 429 || status === 503) {
    return { action: 'retry', kind: 'later', token: null };
  }
  if (status !== null && status < 500) {
    // 400, 404 (no route), a backend's own 4xx: the same request will not fare better.
    return { action: 'stop', why: `handshake refused (HTTP ${status})` };
  }
  if (status === null && failures >= refusalAfter) {
    return { action: 'refresh', why: `${failures} handshakes in a row failed (a refusal, as far as can be told)` };
  }
  return { action: 'retry', kind: 'retry', token: null };
}

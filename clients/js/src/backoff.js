// Exponential backoff with full jitter (the "Full Jitter" of AWS's
// "Exponential Backoff And Jitter"): the delay is uniform in
// [0, min(max, base * 2**attempt)), so clients dropped together by one
// failure spread out instead of coming back in a storm.

export const BACKOFF_DEFAULTS = Object.freeze({
  baseMs: 500,
  maxMs: 30_000,
  resetAfterMs: 5_000,     // a connection open this long resets the attempt count
  tryAgainLaterMs: 5_000,  // 1013, 429 and 503 wait at least this long
  resumeJitterMs: 250,     // a 1012 with a resume token comes back at once, within this
});

/** The delay in ms before retry number `attempt` (0-based). `random` returns [0, 1). */
export function backoffDelay(attempt, { baseMs = BACKOFF_DEFAULTS.baseMs, maxMs = BACKOFF_DEFAULTS.maxMs,
  random = Math.random } = {}) {
  // 2**attempt overflows to Infinity for large attempts; min() keeps it finite.
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 64));
  return random() * ceiling;
}

/** The retry schedule of one client: counts attempts, picks each delay. */
export class Backoff {
  constructor(options = {}, random = Math.random) {
    for (const key of Object.keys(options)) {
      if (!(key in BACKOFF_DEFAULTS)) {
        throw new TypeError(`unknown backoff option ${JSON.stringify(key)} (known: ${Object.keys(BACKOFF_DEFAULTS).join(', ')})`);
      }
      const v = options[key];
      if (typeof v !== 'number' || !(v >= 0)) {
        throw new TypeError(`backoff.${key} must be a number >= 0, got ${String(v)}`);
      }
    }
    this.options = { ...BACKOFF_DEFAULTS, ...options };
    this.random = random;
    this.attempt = 0;
  }

  /** The delay for `kind` of retry, counting it: 'retry' | 'later' | 'resume'. */
  next(kind = 'retry') {
    const o = this.options;
    if (kind === 'resume') {
      return this.random() * o.resumeJitterMs;
    }
    const delay = backoffDelay(this.attempt, { baseMs: o.baseMs, maxMs: o.maxMs, random: this.random });
    this.attempt += 1;
    return kind === 'later' ? o.tryAgainLaterMs + delay : delay;
  }

  reset() {
    this.attempt = 0;
  }
}

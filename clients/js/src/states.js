// The connection's life, as data: every state change goes through `advance`,
// so a transition missing from this table is a bug that throws, not a
// client that silently ends up somewhere odd.
//
//   connecting ──open──▶ open ──lost──▶ reconnecting ──open──▶ open ...
//        │                 │                  │
//        └──────────────── └──────────────────┴──▶ closed (close(), 1000, refused)
//
// `connecting` is the first attempt only; every later attempt, and the wait
// before it, is `reconnecting`. `closed` is final: make a new client.

export const TRANSITIONS = Object.freeze({
  connecting: Object.freeze(['open', 'reconnecting', 'closed']),
  open: Object.freeze(['reconnecting', 'closed']),
  reconnecting: Object.freeze(['open', 'closed']),
  closed: Object.freeze([]),
});

export const STATES = Object.freeze(Object.keys(TRANSITIONS));

/** The next state, or a thrown Error when the table has no such move. */
export function advance(from, to) {
  const allowed = TRANSITIONS[from];
  if (allowed === undefined || !allowed.includes(to)) {
    throw new Error(`invalid state transition ${from} -> ${to}`);
  }
  return to;
}

// The connection's life, as data: every state change goes through `advance`,
// so a transition missing from this table is a bug that throws, not a
// client that silently ends up somewhere odd.
//
//   connecting ──open──▶ open ──lost──▶ reconnecting ──open──▶ open ...
//        │                 │                  │
//        └─────────────────┴──────────────────┴──▶ closed (close(), 1000, a refusal)
//
// connecting    no connection has been open yet (the first attempts and the waits between them)
// open          a WebSocket is open; sends go out at once
// reconnecting  a connection that was open ended; the next attempts and the waits between them
// closed        none open, none planned; connect() starts again from connecting

export const TRANSITIONS = Object.freeze({
  connecting: Object.freeze(['open', 'closed']),
  open: Object.freeze(['reconnecting', 'closed']),
  reconnecting: Object.freeze(['open', 'closed']),
  closed: Object.freeze(['connecting']),
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

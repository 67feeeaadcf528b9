"""What the management API sends to drained sessions: it goes to their replay
buffers in the store (see store/detached.py), counted as delivered."""

from __future__ import annotations

from . import metrics


class Parked:
    """Delivery's side of detached sessions: find one, buffer for it."""

    def __init__(self, store, node):
        self.store = store
        self.node = node

    async def find(self, any_id: str) -> dict | None:
        """The detached record of a drained session, by session or connection id."""
        det = await self.store.detached.get(any_id)
        if det is None:
            sid = await self.store.session_of_connection(any_id)
            if sid is not None and sid != any_id:
                det = await self.store.detached.get(sid)
        return det

    async def append(self, sids, opcode: int, payload: bytes) -> tuple[int, int, list[str]]:
        """Append to detached sessions' replay buffers: (kept, full: not kept, the sessions
        that are not detached any more: resumed, or ended)."""
        cfg = self.node.config.drain
        kept = full = 0
        gone = []
        for sid in sids:
            added, status = await self.store.detached.append(sid, [(opcode, payload)], cfg.replay_max_messages,
                                                             cfg.replay_max_bytes)
            if added:
                kept += 1
                metrics.replay_buffered.labels("api").inc()
            elif status == "full":
                full += 1
                metrics.replay_overflows.inc()
            else:
                gone.append(sid)
        return kept, full, gone

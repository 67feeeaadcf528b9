"""The debug trace of one session's frames: what it records, its bounds, and
the node's traces. Pure: no I/O (the relay feeds it, see traced.TracedSession;
the management API starts and reads it, see docs/debug-trace.md).

A `Trace` reads the bytes of each direction as they cross the gateway with
its own small parser (`Tap`), independent of the relay's: one record per
frame (time, direction, opcode, FIN, payload size) and the first
redact.HEAD_BYTES of its payload, unmasked and redacted (gateway/redact.py)
before they are kept. Nothing else of a payload is kept or copied.

Bounded every way: a trace ends by itself after `max_frames` frames or
`max_s` seconds (or when its session ends); a node traces at most
MAX_ACTIVE sessions at a time and keeps at most MAX_KEPT finished traces,
each for KEEP_S.
"""

from __future__ import annotations

import math
import time

from . import frames, redact
from .errors import ApiError
from .frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT

__all__ = ["Trace", "Traces", "Tap", "limits", "DEFAULT_FRAMES", "MAX_FRAMES", "DEFAULT_S", "MAX_S"]

DEFAULT_FRAMES, MAX_FRAMES = 200, 10_000
DEFAULT_S, MAX_S = 60.0, 600.0
MAX_ACTIVE = 32       # sessions traced at once on one node
MAX_KEPT = 32         # finished traces kept readable
KEEP_S = 600.0        # ... for this long after they ended

OPCODES = {0x0: "continuation", 0x1: "text", 0x2: "binary", 0x8: "close", 0x9: "ping", 0xA: "pong"}
HEAD = redact.HEAD_BYTES
_HEADER_MAX = 14      # RFC 6455 5.2: 2 + 8 (length) + 4 (mask)


def limits(body: dict) -> tuple[int, float]:
    """(max_frames, max_s) from a POST body; ApiError 400 naming what is wrong."""
    unknown = sorted(set(body) - {"max_frames", "max_s"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, unknown))[:200]} (known: max_frames, max_s)")
    n = body.get("max_frames", DEFAULT_FRAMES)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FRAMES:
        raise ApiError(400, f"max_frames must be a whole number from 1 to {MAX_FRAMES}, not {str(n)[:40]!r}")
    s = body.get("max_s", DEFAULT_S)
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 < s <= MAX_S:
        raise ApiError(400, f"max_s must be a number of seconds above 0 and at most {MAX_S:g}, not {str(s)[:40]!r}")
    return n, float(s)


def render_head(opcode: int, text: bool, head: bytes, cut_start: bool, cut_end: bool) -> str:
    """What a record shows of a payload: text, hex, or a close frame's code and reason; redacted."""
    if opcode == OP_CLOSE and len(head) >= 2:
        reason = redact.text_head(head[2:], cut_end=cut_end)
        code = int.from_bytes(head[:2], "big")
        return f"{code} {reason}" if reason else str(code)
    if text:
        return redact.text_head(head, cut_start, cut_end)
    return redact.hex_head(head, cut_start, cut_end)


class Tap:
    """One stream of frames as the trace reads it: headers parsed, the first
    HEAD bytes of each payload kept (unmasked), the rest skipped.

    Fed the bytes of one direction in any pieces; keeps at most a partial
    header (under 14 bytes) and one head between reads.
    """

    __slots__ = ("trace", "up", "partial", "remaining", "rec", "head", "want", "mask", "seen", "text", "cont")

    def __init__(self, trace: "Trace", up: bool):
        self.trace = trace
        self.up = up
        self.text = False     # the current message is text (continuation frames show as text too)
        self.rec: list | None = None
        self.head = bytearray()
        self.mask = None
        self.seen = 0
        self.cont = False
        self.reset()

    def reset(self) -> None:
        """Start over at a frame boundary (the stream was switched, e.g. to another upstream)."""
        self.finish()
        self.partial = b""
        self.remaining = 0
        self.want = 0

    def feed(self, data) -> None:
        trace = self.trace
        n = len(data)
        pos = 0
        while pos < n:
            if self.remaining:
                take = self.remaining if self.remaining < n - pos else n - pos
                if self.want:
                    k = take if take < self.want else self.want
                    piece = bytes(data[pos:pos + k])
                    if self.mask is not None:
                        piece = frames.unmask(piece, self.mask, self.seen)
                    self.head += piece
                    self.seen += k
                    self.want -= k
                    if not self.want:
                        self.finish()
                self.remaining -= take
                pos += take
                continue
            if trace.ended is not None:
                return
            if self.partial:
                got = len(self.partial)
                hdr = self.partial + bytes(data[pos:pos + _HEADER_MAX])
                h = frames.parse_header(hdr, 0)
                if h is None:   # still short: all that came is in hdr (a header is at most 14 bytes)
                    self.partial = hdr
                    return
                pos += h[2] - got
                self.partial = b""
            else:
                h = frames.parse_header(data, pos)
                if h is None:
                    self.partial = bytes(data[pos:])
                    return
                pos += h[2]
            self._begin(*h)

    def _begin(self, b0: int, length: int, hlen: int, mask) -> None:
        opcode = b0 & 0x0F
        if opcode == OP_TEXT or opcode == OP_BINARY:
            # permessage-deflate (RSV1): compressed bytes are shown in hex
            self.text = opcode == OP_TEXT and not b0 & 0x40
        trace = self.trace
        rec = [trace.t_ms(), "up" if self.up else "down", opcode, bool(b0 & 0x80), length, ""]
        self.rec = rec
        self.head = bytearray()
        self.mask = mask
        self.seen = 0
        self.cont = opcode == OP_CONT
        self.remaining = length
        self.want = length if length < HEAD else HEAD
        trace.add(rec)
        if not length:
            self.finish()

    def finish(self) -> None:
        """The head of the current frame is complete (or the trace ends): render and redact it."""
        rec = self.rec
        if rec is None:
            return
        self.rec = None
        head = bytes(self.head)
        self.head = bytearray()
        opcode = rec[2]
        text = self.text if opcode == OP_CONT or opcode == OP_TEXT else False
        rec[5] = render_head(opcode, text, head, self.cont, rec[4] > len(head))


class Trace:
    """One session's trace: records in order, bounded by max_frames and max_s."""

    __slots__ = ("conn", "session", "max_frames", "max_s", "started", "t0", "frames", "ended", "ended_at",
                 "up", "down", "own_up", "own_down", "timer")

    def __init__(self, conn: str, session: str, max_frames: int, max_s: float):
        self.conn = conn
        self.session = session
        self.max_frames = max_frames
        self.max_s = max_s
        self.started = time.time()
        self.t0 = time.monotonic()
        self.frames: list[list] = []
        self.ended: str | None = None     # max_frames, max_s, closed, stopped
        self.ended_at = 0.0
        # client -> upstream and upstream -> client as read from the sockets, and
        # the frames the gateway itself sends each way (always whole frames)
        self.up = Tap(self, True)
        self.down = Tap(self, False)
        self.own_up = Tap(self, True)
        self.own_down = Tap(self, False)
        self.timer = None                 # the max_s timer (the relay's, opaque here)

    def t_ms(self) -> float:
        return round((time.monotonic() - self.t0) * 1000.0, 3)

    def add(self, rec: list) -> None:
        self.frames.append(rec)
        if len(self.frames) >= self.max_frames:
            self.end("max_frames")

    def end(self, why: str) -> None:
        """No frame is recorded from here on; the first reason given wins. The
        head of the last frame may still be read (the rest of the same read)."""
        if self.ended is None:
            self.ended = why
            self.ended_at = time.monotonic()

    def flush(self) -> None:
        """Nothing more will be fed: heads still being read are rendered with what came."""
        for tap in (self.up, self.down, self.own_up, self.own_down):
            tap.finish()

    def started_json(self) -> dict:
        return {"connection": self.conn, "session": self.session, "tracing": True,
                "max_frames": self.max_frames, "max_s": self.max_s}

    def as_json(self) -> dict:
        return {"connection": self.conn, "session": self.session, "active": self.ended is None,
                "ended": self.ended, "started": self.started, "max_frames": self.max_frames, "max_s": self.max_s,
                "frames": [{"t_ms": t, "dir": d, "opcode": OPCODES.get(op, str(op)), "fin": fin, "size": size,
                            "head": head} for t, d, op, fin, size, head in self.frames]}


class Traces:
    """A node's traces by connection id and session id: the running ones, and
    finished ones kept for a while. One trace per session."""

    def __init__(self, max_active: int = MAX_ACTIVE, max_kept: int = MAX_KEPT, keep_s: float = KEEP_S):
        self.max_active = max_active
        self.max_kept = max_kept
        self.keep_s = keep_s
        self.by_id: dict[str, Trace] = {}

    def _all(self) -> list[Trace]:
        return list({id(t): t for t in self.by_id.values()}.values())

    def _forget(self, t: Trace) -> None:
        for key in (t.conn, t.session):
            if self.by_id.get(key) is t:
                del self.by_id[key]

    def prune(self, now: float | None = None) -> None:
        """Drop finished traces past keep_s, and the oldest past max_kept."""
        now = time.monotonic() if now is None else now
        done = sorted((t for t in self._all() if t.ended is not None), key=lambda t: t.ended_at)
        for i, t in enumerate(done):
            if now - t.ended_at > self.keep_s or len(done) - i > self.max_kept:
                self._forget(t)

    def active(self) -> int:
        return sum(1 for t in self._all() if t.ended is None)

    def find(self, any_id: str) -> Trace | None:
        self.prune()
        return self.by_id.get(any_id)

    def begin(self, conn: str, session: str, max_frames: int, max_s: float) -> Trace:
        """A new trace for this session; 409 while one runs, 429 past max_active.
        A finished trace of the session is replaced."""
        self.prune()
        old = [t for t in (self.by_id.get(conn), self.by_id.get(session)) if t is not None]
        for t in old:
            if t.ended is None:
                raise ApiError(409, "a trace of this session is running; DELETE it first or wait for it to end",
                               connection=conn, session=session)
        if self.active() >= self.max_active:
            raise ApiError(429, f"too many sessions traced on this node (max {self.max_active}); "
                                "stop one or wait for one to end", connection=conn)
        for t in old:
            self._forget(t)
        t = Trace(conn, session, max_frames, max_s)
        self.by_id[conn] = self.by_id[session] = t
        return t

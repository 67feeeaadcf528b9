"""RFC 6455 / RFC 7692 conformance, modelled on the Autobahn|Testsuite sections.

Every case runs twice, against the same kind of backend (an aiohttp echo
server, `WsBackend`): once directly, once through the gateway. Both runs must
give an outcome a conformant server gives (the RFC requirement, which is what
Autobahn checks); where a case has only one such outcome, the two runs are
therefore identical.

The outcome of a run is what the client observes, in order:

- ("text"|"binary", payload) per message the server sent (payloads longer
  than 64 bytes as "<len>B:<sha1 prefix>"), ("pong", payload) per pong;
- SYNC: after a case's frames the client sends one more text message and
  waits for its echo. Servers answer in order, so once SYNC is back every
  answer to the case's frames has arrived, with no wall-clock wait;
- ("close", code): the server's close frame (1005 for an empty one);
- EOF (the server closed the TCP connection) or HUNG (it did not).

If the server has not closed by then, the client closes with 1000. If the
server closes first, the client answers with the same code, as Autobahn does.

Where the gateway answers by design itself (client pings, UTF-8 of text
messages, unmasked frames, close frames it judges invalid), the expected
outcome is still the RFC's: that is what a client of the gateway sees.

Where aiohttp, the reference, is not conformant the case carries an
`aiohttp=` note saying how; its direct run is then not asserted, the gateway
run is. Where Autobahn accepts a weaker answer ("NON-STRICT": e.g. failing
only once the whole message is in, or dropping the echo of a message that
came just before a protocol error), the case lists it in `alt`; a run that
gives it passes and emits a NonStrict warning.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import socket
import struct
import warnings
import zlib
from dataclasses import dataclass

import pytest

from gateway import frames
from gateway.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT

from ..conftest import proxy_config
from ..helpers import RawClient

RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10

WAIT_S = 5.0       # one awaited answer (an echo, a pong, a close, EOF)
RUN_S = 30.0       # one whole run, whatever happens
SYNC_PAYLOAD = b"conformance-sync"

# The gateway's max_message_bytes is a policy limit, not a protocol matter:
# raised so that section 9's messages are judged on the protocol alone.
GATEWAY_LIMITS = {"max_message_bytes": 32 << 20}


class NonStrict(UserWarning):
    """A run gave an outcome Autobahn accepts as NON-STRICT, not the strict one."""


# ----------------------------------------------------------------- outcomes
EOF = "eof"
HUNG = "hung"
SYNC = ("sync",)


def norm(data: bytes):
    if len(data) <= 64:
        return data
    return f"{len(data)}B:{hashlib.sha1(data).hexdigest()[:12]}"


def _b(x) -> bytes:
    return x.encode() if isinstance(x, str) else x


def T(x):
    return ("text", norm(_b(x)))


def B(x):
    return ("binary", norm(_b(x)))


def PONG(x=b""):
    return ("pong", norm(_b(x)))


def CLOSE(code: int):
    return ("close", code)


def rle(events: list) -> tuple:
    """Runs of one event become (event, "xN"): 1000 echoes stay readable."""
    out = []
    for e, run in itertools.groupby(events):
        n = len(list(run))
        out.append(e if n == 1 else (e, f"x{n}"))
    return tuple(out)


def echoed(*events) -> tuple:
    """The server answered `events`, then closed normally when asked."""
    return rle(list(events) + [SYNC, CLOSE(1000)]) + (EOF,)


def failed(code: int, *before) -> tuple:
    """The server sent `before`, then failed the connection (or answered our close) with `code`."""
    return rle(list(before) + [CLOSE(code)]) + (EOF,)


# -------------------------------------------------------------------- steps
@dataclass(frozen=True)
class F:
    """One frame from the client. `chop`: written in pieces of that many bytes, or
    (a tuple) cut at those offsets, each piece flushed before the next."""

    op: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    mask: bool = True
    chop: int | tuple = 0

    def build(self) -> bytes:
        data = frames.frame(self.op, self.payload, fin=self.fin, mask=self.mask)
        if self.rsv:
            data = bytes([data[0] | self.rsv]) + data[1:]
        return data

    async def run(self, conn: Conn) -> None:
        if self.op == OP_CLOSE:
            conn.sent_close = True
        data = self.build()
        if self.chop:
            await conn.write_chopped(data, self.chop)
        else:
            conn.write(data)


@dataclass(frozen=True)
class Raw:
    """Bytes written as they are (a header the frame builder would not make)."""

    data: bytes

    async def run(self, conn: Conn) -> None:
        conn.write(self.data)


@dataclass(frozen=True)
class _RawChopped:
    """Prebuilt frames written in pieces cut at `cuts`."""

    data: bytes
    cuts: tuple

    async def run(self, conn: Conn) -> None:
        await conn.write_chopped(self.data, self.cuts)


@dataclass(frozen=True)
class Pause:
    """Flush what was written so the server reads it apart from what follows."""

    async def run(self, conn: Conn) -> None:
        await conn.flush()


@dataclass(frozen=True)
class Wait:
    """Wait until the server has answered with `n` events in all (or closed)."""

    n: int

    async def run(self, conn: Conn) -> None:
        await conn.flush()
        await conn.wait_for(lambda: len(conn.events) >= self.n or conn.got_close)


@dataclass(frozen=True)
class Hold:
    """Once `n` bytes have come in, stop reading (with a small receive buffer), so
    the server is stuck in the middle of sending a large frame."""

    n: int

    async def run(self, conn: Conn) -> None:
        await conn.flush()
        await conn.wait_for(lambda: conn.rx_bytes >= self.n or conn.got_close)
        sock = conn.c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        conn.released.clear()


@dataclass(frozen=True)
class Release:
    """Read again (after a Hold)."""

    async def run(self, conn: Conn) -> None:
        await conn.flush()
        conn.released.set()


@dataclass(frozen=True)
class Z:
    """One permessage-deflate message; `frag`: split the compressed payload into frames of that size."""

    op: int
    payload: bytes
    frag: int = 0
    rsv_on_cont: bool = False

    async def run(self, conn: Conn) -> None:
        data = conn.compress(self.payload)
        if not self.frag or len(data) <= self.frag:
            conn.write(F(self.op, data, rsv=RSV1).build())
            return
        pieces = [data[i:i + self.frag] for i in range(0, len(data), self.frag)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if i == 0:
                conn.write(F(self.op, piece, fin=False, rsv=RSV1).build())
            else:
                conn.write(F(OP_CONT, piece, fin=last, rsv=RSV1 if self.rsv_on_cont else 0).build())


# --------------------------------------------------------------- the client
def _ext_params(header: str | None) -> dict | None:
    """The first permessage-deflate in a Sec-WebSocket-Extensions response, as {param: value}."""
    if not header:
        return None
    first = header.split(",")[0]
    name, *params = [p.strip() for p in first.split(";")]
    if name.lower() != "permessage-deflate":
        return None
    out = {}
    for p in params:
        k, _, v = p.partition("=")
        out[k.strip().lower()] = v.strip().strip('"') or True
    return out


class Conn:
    """One run's connection: a reader task recording events, writers for the steps."""

    def __init__(self, client: RawClient, offer: str | None):
        self.c = client
        self.events: list = []
        self.changed = asyncio.Event()
        self.sent_close = False
        self.got_close = False
        self.end: str | None = None
        self.rx_bytes = 0          # bytes received after the handshake
        self.in_frame = False
        self.released = asyncio.Event()  # cleared while the client holds off reading
        self.released.set()
        self.ext = _ext_params(client.headers.get("sec-websocket-extensions"))
        self.offer = _ext_params(offer)
        self._tx = None
        self._rx = zlib.decompressobj(-15) if self.ext is not None else None

    # ---- sending
    def write(self, data: bytes) -> None:
        if not self.c.writer.is_closing():
            self.c.writer.write(data)

    async def flush(self) -> None:
        try:
            await self.c.writer.drain()
        except ConnectionError:
            pass
        # Everything runs on one loop: two turns let the peer read what was sent.
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    async def write_chopped(self, data: bytes, chop: int | tuple) -> None:
        cuts = list(chop) if isinstance(chop, tuple) else list(range(chop, len(data), chop))
        bounds = [0] + [c for c in cuts if 0 < c < len(data)] + [len(data)]
        for a, b in itertools.pairwise(bounds):
            if self.got_close:
                return
            self.write(data[a:b])
            await self.flush()

    def compress(self, payload: bytes) -> bytes:
        assert self.ext is not None, "permessage-deflate was not negotiated"
        offer = self.offer or {}
        takeover = "client_no_context_takeover" not in self.ext and "client_no_context_takeover" not in offer
        if self._tx is None or not takeover:
            bits = self.ext.get("client_max_window_bits")
            if bits is None or bits is True:
                hint = offer.get("client_max_window_bits")
                bits = hint if hint not in (None, True) else 15
            self._tx = zlib.compressobj(6, zlib.DEFLATED, -int(bits))
        data = self._tx.compress(payload) + self._tx.flush(zlib.Z_SYNC_FLUSH)
        assert data.endswith(b"\x00\x00\xff\xff")
        return data[:-4] or b"\x00"

    def close_reply(self, code: int) -> None:
        self.sent_close = True
        self.write(F(OP_CLOSE, b"" if code == 1005 else struct.pack("!H", code)).build())

    # ---- receiving
    def add(self, event) -> None:
        self.events.append(event)
        self.changed.set()

    async def wait_for(self, cond, timeout: float = WAIT_S) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not cond() and self.end is None:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return False
        return True

    async def _exactly(self, n: int) -> bytes:
        """n bytes, read in pieces so that `rx_bytes` moves while a large frame
        arrives; stops reading while `hold` is on."""
        chunks = []
        while n:
            await self.released.wait()
            chunk = await self.c.reader.read(min(n, 1 << 16))
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(chunks), n)
            chunks.append(chunk)
            n -= len(chunk)
            self.rx_bytes += len(chunk)
            self.changed.set()
        return b"".join(chunks)

    async def _frame(self) -> tuple[int, bytes, bool]:
        """(first header byte, unmasked payload, masked)."""
        self.in_frame = False
        b0, b1 = await self._exactly(2)
        self.in_frame = True
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self._exactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self._exactly(8))[0]
        mask = await self._exactly(4) if b1 & 0x80 else None
        payload = await self._exactly(n)
        self.in_frame = False
        return b0, frames.unmask(payload, mask) if mask else payload, mask is not None

    async def read(self) -> None:
        op = None
        compressed = False
        parts: list[bytes] = []
        try:
            while True:
                async with asyncio.timeout(RUN_S):
                    b0, payload, masked = await self._frame()
                opcode = b0 & 0x0F
                if masked:  # RFC 6455 5.1: a server MUST NOT mask
                    self.add(("masked-server-frame", opcode))
                if b0 & (RSV2 | RSV3) or b0 & RSV1 and (self.ext is None or opcode >= 8 or opcode == OP_CONT):
                    self.add(("bad-rsv", hex(b0)))
                if self.got_close:
                    self.add(("frame-after-close", opcode))
                if opcode == OP_CLOSE:
                    parsed = frames.parse_close(payload)
                    self.got_close = True
                    if parsed is None:
                        self.add(("bad-close", payload))
                        code = 1002
                    else:
                        code = parsed[0]
                        self.add(CLOSE(code))
                    if not self.sent_close:
                        self.close_reply(code)
                elif opcode == OP_PING:
                    self.add(("ping", norm(payload)))
                    if not self.sent_close:
                        self.write(F(OP_PONG, payload).build())
                elif opcode == OP_PONG:
                    self.add(PONG(payload))
                elif opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                    if opcode == OP_CONT and op is None or opcode != OP_CONT and op is not None:
                        self.add(("bad-fragmentation", opcode))
                        op, parts = None, []
                        continue
                    if opcode != OP_CONT:
                        op, compressed, parts = opcode, bool(b0 & RSV1), []
                    parts.append(payload)
                    if b0 & 0x80:
                        data = b"".join(parts)
                        if compressed and self._rx is not None:
                            data = self._rx.decompress(data + b"\x00\x00\xff\xff")
                        if op == OP_TEXT and data == SYNC_PAYLOAD:
                            self.add(SYNC)
                        else:
                            self.add(("text" if op == OP_TEXT else "binary", norm(data)))
                        op, parts = None, []
                else:
                    self.add(("bad-opcode", opcode))
        except (asyncio.IncompleteReadError, ConnectionError):
            if self.in_frame:
                # The connection ended inside a frame: no close frame, a frame cut short.
                self.add(("torn-frame",))
            self.end = EOF
        except TimeoutError:
            self.end = HUNG
        finally:
            self.changed.set()


async def run_case(url: str, case: Case) -> tuple[tuple, str | None]:
    """Play `case` against `url`; returns (outcome, negotiated extension header)."""
    headers = {"Sec-WebSocket-Extensions": case.offer} if case.offer else None
    async with asyncio.timeout(WAIT_S):
        client = await RawClient.connect(url, headers)
    if client.status != 101:
        client.close()
        return (("status", client.status),), None
    conn = Conn(client, case.offer)
    reader = asyncio.create_task(conn.read())
    try:
        try:
            async with asyncio.timeout(RUN_S):
                for step in case.steps:
                    if conn.got_close or conn.end is not None:
                        break  # the server is done with us: a real client stops sending too
                    await step.run(conn)
                conn.released.set()
                await conn.flush()
                if not conn.sent_close and not conn.got_close and conn.end is None:
                    conn.write(F(OP_TEXT, SYNC_PAYLOAD).build())
                    await conn.wait_for(lambda: SYNC in conn.events or conn.got_close)
                if not conn.sent_close and conn.end is None:
                    conn.close_reply(1000)
                await conn.flush()
        except TimeoutError:
            pass
        try:
            async with asyncio.timeout(WAIT_S):
                await asyncio.shield(reader)
        except TimeoutError:
            conn.end = conn.end or HUNG
    finally:
        reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            pass
        client.writer.transport.abort()
    return rle(conn.events) + (conn.end or HUNG,), client.headers.get("sec-websocket-extensions")


# -------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    steps: tuple
    expect: tuple            # acceptable outcomes, strict ones
    alt: tuple = ()          # outcomes Autobahn accepts as NON-STRICT
    aiohttp: str | None = None   # how the reference deviates from the RFC, if it does
    offer: str | None = None     # Sec-WebSocket-Extensions the client offers
    unordered: bool = False      # answers before SYNC may come in any order (pongs vs. echoes)

    def __repr__(self) -> str:
        return self.id


def case(id: str, steps, expect, *, alt=(), aiohttp=None, offer=None, unordered=False) -> Case:
    """`expect`/`alt`: one outcome (a tuple ending in EOF/HUNG) or a list of them."""
    def many(x):
        x = list(x) if isinstance(x, list) else [x] if x else []
        return tuple(_unorder(o) if unordered else o for o in x)
    return Case(id, tuple(steps), many(expect), many(alt), aiohttp, offer, unordered)


def _unorder(outcome: tuple) -> tuple:
    """The events before SYNC as a sorted multiset: for answers whose relative order is not defined
    (a pong the gateway sends at once vs. the echo of an earlier message from the backend)."""
    events = []
    for e in outcome:
        if isinstance(e, tuple) and len(e) == 2 and isinstance(e[1], str) and e[1].startswith("x") and \
                isinstance(e[0], tuple):
            events += [e[0]] * int(e[1][1:])
        else:
            events.append(e)
    cut = events.index(SYNC) if SYNC in events else 0
    return tuple(sorted(events[:cut], key=repr)) + tuple(events[cut:])


CASES: list[Case] = []
add = CASES.append

# ---- 1 framing: text and binary messages of every length encoding
SIZES = [0, 125, 126, 127, 128, 65535, 65536]
for i, n in enumerate(SIZES, 1):
    add(case(f"1.1.{i}-text-{n}", [F(OP_TEXT, b"*" * n)], echoed(T(b"*" * n))))
add(case("1.1.8-text-65536-chop-997", [F(OP_TEXT, b"*" * 65536, chop=997)], echoed(T(b"*" * 65536))))
for i, n in enumerate(SIZES, 1):
    add(case(f"1.2.{i}-binary-{n}", [F(OP_BINARY, b"\xfe" * n)], echoed(B(b"\xfe" * n))))
add(case("1.2.8-binary-65536-chop-997", [F(OP_BINARY, b"\xfe" * 65536, chop=997)], echoed(B(b"\xfe" * 65536))))
# Headers cut at every field boundary: 7-bit, 16-bit and 64-bit lengths, the mask key.
add(case("1.3.1-header-7bit-cut-everywhere", [F(OP_TEXT, b"*" * 100, chop=(1, 2, 3, 4, 5, 6, 7))],
         echoed(T(b"*" * 100))))
add(case("1.3.2-header-16bit-cut-everywhere", [F(OP_TEXT, b"*" * 300, chop=(1, 2, 3, 4, 5, 6, 7, 8, 9))],
         echoed(T(b"*" * 300))))
add(case("1.3.3-header-64bit-cut-everywhere", [F(OP_BINARY, b"\xfe" * 70000, chop=tuple(range(1, 16)))],
         echoed(B(b"\xfe" * 70000))))
_ping_p = F(OP_PING, b"p").build()  # one frame, one mask key, written in two pieces
add(case("1.3.4-frames-cut-mid-header-back-to-back",
         [Raw(F(OP_TEXT, b"a" * 130).build() + _ping_p[:3]), Pause(), Raw(_ping_p[3:]),
          F(OP_BINARY, b"b" * 200, chop=(3,))],
         echoed(T(b"a" * 130), PONG(b"p"), B(b"b" * 200)), unordered=True))
# RFC 6455 5.2: the most significant bit of a 64-bit length MUST be 0. Either a
# protocol error or "message too big" is a failure of the connection.
add(case("1.3.5-64bit-length-msb-set", [Raw(bytes((0x82, 0xFF)) + struct.pack("!Q", (1 << 63) | 5) + b"\0" * 4 + b"abcde")],
         [failed(1002), failed(1009)]))

# ---- 2 pings and pongs
add(case("2.1-ping-empty", [F(OP_PING)], echoed(PONG())))
add(case("2.2-ping-text-payload", [F(OP_PING, b"Hello, world!")], echoed(PONG(b"Hello, world!"))))
_bin = b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"
add(case("2.3-ping-binary-payload", [F(OP_PING, _bin)], echoed(PONG(_bin))))
add(case("2.4-ping-125", [F(OP_PING, b"\xfe" * 125)], echoed(PONG(b"\xfe" * 125))))
# RFC 6455 5.5: control frames carry at most 125 bytes.
add(case("2.5-ping-126-fails", [F(OP_PING, b"\xfe" * 126)], failed(1002)))
add(case("2.6-ping-125-chop-1", [F(OP_PING, b"\xfe" * 125, chop=1)], echoed(PONG(b"\xfe" * 125))))
# RFC 6455 5.5.3: an unsolicited pong is a heartbeat; no answer is expected.
add(case("2.7-unsolicited-pong-empty", [F(OP_PONG)], echoed()))
add(case("2.8-unsolicited-pong-payload", [F(OP_PONG, b"unsolicited pong payload")], echoed()))
add(case("2.9-unsolicited-pong-then-ping", [F(OP_PONG, b"unsolicited pong payload"), F(OP_PING, b"ping payload")],
         echoed(PONG(b"ping payload"))))
_pings = [f"payload-{i}".encode() for i in range(10)]
add(case("2.10-ten-pings", [F(OP_PING, p) for p in _pings], echoed(*[PONG(p) for p in _pings])))
add(case("2.11-ten-pings-paced", [s for p in _pings for s in (F(OP_PING, p), Pause())],
         echoed(*[PONG(p) for p in _pings])))
add(case("2.12-ping-chop-then-text", [F(OP_PING, b"x" * 100, chop=7), F(OP_TEXT, b"after")],
         echoed(PONG(b"x" * 100), T("after"))))

# ---- 3 reserved bits (no extension negotiated: RFC 6455 5.2 "MUST _Fail_")
_hello = b"Hello, world!"
add(case("3.1-text-rsv3", [F(OP_TEXT, _hello, rsv=RSV3)], failed(1002)))
# 3.2: all frames in one write; a server may fail before echoing the first (NON-STRICT).
add(case("3.2-text-then-text-rsv2-then-ping", [F(OP_TEXT, _hello), F(OP_TEXT, _hello, rsv=RSV2), F(OP_PING, _hello)],
         failed(1002, T(_hello)), alt=failed(1002)))
add(case("3.3-text-echoed-then-text-rsv2|3-then-ping",
         [F(OP_TEXT, _hello), Wait(1), F(OP_TEXT, _hello, rsv=RSV2 | RSV3), F(OP_PING, _hello)],
         failed(1002, T(_hello))))
add(case("3.4-text-echoed-then-text-rsv1-then-ping",
         [F(OP_TEXT, _hello), Wait(1), F(OP_TEXT, _hello, rsv=RSV1), F(OP_PING, _hello)],
         failed(1002, T(_hello))))
add(case("3.5-binary-rsv1|3", [F(OP_BINARY, b"\x00\xff" * 4, rsv=RSV1 | RSV3)], failed(1002)))
add(case("3.6-ping-rsv1|2", [F(OP_PING, _hello, rsv=RSV1 | RSV2)], failed(1002)))
add(case("3.7-close-rsv1|2|3", [F(OP_CLOSE, struct.pack("!H", 1000), rsv=RSV1 | RSV2 | RSV3)], failed(1002)))
add(case("3.8-continuation-rsv2", [F(OP_TEXT, b"frag", fin=False), F(OP_CONT, b"ment", rsv=RSV2)], failed(1002)))

# ---- 4 reserved opcodes
for i, opc in enumerate((3, 4), 1):
    add(case(f"4.1.{i}-opcode-{opc}", [F(opc, b"" if i == 1 else _hello)], failed(1002)))
for i, opc in enumerate((5, 6, 7), 3):
    add(case(f"4.1.{i}-text-then-opcode-{opc}-then-ping",
             [F(OP_TEXT, _hello), Wait(1), F(opc, _hello), F(OP_PING, _hello)], failed(1002, T(_hello))))
for i, opc in enumerate((11, 12), 1):
    add(case(f"4.2.{i}-opcode-{opc}", [F(opc, b"" if i == 1 else _hello)], failed(1002)))
for i, opc in enumerate((13, 14, 15), 3):
    add(case(f"4.2.{i}-text-then-opcode-{opc}-then-ping",
             [F(OP_TEXT, _hello), Wait(1), F(opc, _hello), F(OP_PING, _hello)], failed(1002, T(_hello))))
add(case("4.3-reserved-opcode-inside-fragmented-message",
         [F(OP_TEXT, b"frag", fin=False), F(5, b"x"), F(OP_CONT, b"ment")], failed(1002)))

# ---- 5 fragmentation
add(case("5.1-ping-fragmented", [F(OP_PING, b"fragment1", fin=False), F(OP_CONT, b"fragment2")], failed(1002)))
add(case("5.2-pong-fragmented", [F(OP_PONG, b"fragment1", fin=False), F(OP_CONT, b"fragment2")], failed(1002)))
add(case("5.2b-close-fragmented", [F(OP_CLOSE, struct.pack("!H", 1000), fin=False), F(OP_CONT, b"")],
         failed(1002)))
_frags = [F(OP_TEXT, b"fragment1", fin=False), F(OP_CONT, b"fragment2")]
add(case("5.3-text-2-fragments", _frags, echoed(T("fragment1fragment2"))))
add(case("5.4-text-2-fragments-paced", [_frags[0], Pause(), _frags[1]], echoed(T("fragment1fragment2"))))
add(case("5.5-text-2-fragments-chop-1", [F(f.op, f.payload, fin=f.fin, chop=1) for f in _frags],
         echoed(T("fragment1fragment2"))))
_ping_mid = [F(OP_TEXT, b"fragment1", fin=False), F(OP_PING, b"ping payload"), F(OP_CONT, b"fragment2")]
add(case("5.6-text-fragments-ping-between", _ping_mid, echoed(PONG(b"ping payload"), T("fragment1fragment2"))))
add(case("5.7-text-fragments-ping-between-paced", [_ping_mid[0], Pause(), _ping_mid[1], Pause(), _ping_mid[2]],
         echoed(PONG(b"ping payload"), T("fragment1fragment2"))))
add(case("5.8-text-fragments-ping-between-chop-1", [F(f.op, f.payload, fin=f.fin, chop=1) for f in _ping_mid],
         echoed(PONG(b"ping payload"), T("fragment1fragment2"))))
_orphan_fin = [F(OP_CONT, b"non-continuation payload"), F(OP_TEXT, _hello)]
add(case("5.9-continuation-fin-without-start", _orphan_fin, failed(1002)))
add(case("5.10-continuation-fin-without-start-paced", [_orphan_fin[0], Pause(), _orphan_fin[1]], failed(1002)))
add(case("5.11-continuation-fin-without-start-chop-1", [F(f.op, f.payload, chop=1) for f in _orphan_fin],
         failed(1002)))
_orphan = [F(OP_CONT, b"non-continuation payload", fin=False), F(OP_TEXT, _hello)]
add(case("5.12-continuation-nofin-without-start", _orphan, failed(1002)))
add(case("5.13-continuation-nofin-without-start-paced", [_orphan[0], Pause(), _orphan[1]], failed(1002)))
add(case("5.14-continuation-nofin-without-start-chop-1", [F(f.op, f.payload, fin=f.fin, chop=1) for f in _orphan],
         failed(1002)))
add(case("5.15-message-then-orphan-continuation-then-text",
         [F(OP_TEXT, b"fragment1", fin=False), F(OP_CONT, b"fragment2"), F(OP_CONT, b"fragment3", fin=False),
          F(OP_TEXT, b"fragment4")],
         failed(1002, T("fragment1fragment2")), alt=failed(1002)))
add(case("5.16-orphan-continuation-then-message-twice",
         [F(OP_CONT, b"fragment1", fin=False), F(OP_TEXT, b"fragment2", fin=False), F(OP_CONT, b"fragment3")] * 2,
         failed(1002)))
add(case("5.17-orphan-final-continuation-then-message-twice",
         [F(OP_CONT, b"fragment1"), F(OP_TEXT, b"fragment2", fin=False), F(OP_CONT, b"fragment3")] * 2,
         failed(1002)))
add(case("5.18-text-inside-fragmented-text", [F(OP_TEXT, b"fragment1", fin=False), F(OP_TEXT, b"fragment2")],
         failed(1002)))
_five = [F(OP_TEXT, b"fragment1", fin=False), F(OP_CONT, b"fragment2", fin=False), F(OP_PING, b"pongme 1!"),
         F(OP_CONT, b"fragment3", fin=False), Wait(1), F(OP_CONT, b"fragment4", fin=False),
         F(OP_PING, b"pongme 2!"), F(OP_CONT, b"fragment5")]
_five_out = echoed(PONG(b"pongme 1!"), PONG(b"pongme 2!"), T("fragment1fragment2fragment3fragment4fragment5"))
add(case("5.19-five-fragments-two-pings", _five, _five_out))
add(case("5.20-five-fragments-two-pings-paced", [s for f in _five for s in (f, Pause())], _five_out))
add(case("5.21-binary-fragments-ping-between",
         [F(OP_BINARY, b"\x00\x01", fin=False), F(OP_PING, b"p"), F(OP_CONT, b"\x02", fin=False),
          F(OP_CONT, b"\x03")], echoed(PONG(b"p"), B(b"\x00\x01\x02\x03"))))
add(case("5.22-binary-inside-fragmented-text", [F(OP_TEXT, b"a", fin=False), F(OP_BINARY, b"b")], failed(1002)))
add(case("5.23-empty-fragments", [F(OP_BINARY, b"", fin=False), F(OP_CONT, b"", fin=False), F(OP_CONT, b"")],
         echoed(B(b""))))

# ---- 6 UTF-8
KOSME = "κόσμε".encode()


def _per_byte(payload: bytes) -> list[F]:
    """A text message with one payload byte per frame (one empty frame for an empty payload)."""
    if len(payload) <= 1:
        return [F(OP_TEXT, payload)]
    return [F(OP_TEXT, payload[:1], fin=False)] + [
        F(OP_CONT, payload[i:i + 1], fin=i == len(payload) - 1) for i in range(1, len(payload))]


def utf8_case(id: str, payload: bytes, *, per_byte: bool = True) -> None:
    valid = frames.text_is_valid(payload)
    assert valid == _python_valid(payload)
    expect = echoed(T(payload)) if valid else failed(1007)
    add(case(id, [F(OP_TEXT, payload)], expect))
    if per_byte and len(payload) > 1:
        add(case(id + "-per-byte-fragments", _per_byte(payload), expect))


def _python_valid(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


add(case("6.1.1-empty", [F(OP_TEXT, b"")], echoed(T(b""))))
add(case("6.1.2-empty-fragments", [F(OP_TEXT, b"", fin=False), F(OP_CONT, b"", fin=False), F(OP_CONT, b"")],
         echoed(T(b""))))
add(case("6.1.3-empty-fragments-around-middle",
         [F(OP_TEXT, b"", fin=False), F(OP_CONT, b"middle frame payload", fin=False), F(OP_CONT, b"")],
         echoed(T(b"middle frame payload"))))
_hello_utf8 = "Hello-µ@ßöäüàá-UTF-8!!".encode()
add(case("6.2.1-valid-one-frame", [F(OP_TEXT, _hello_utf8)], echoed(T(_hello_utf8))))
add(case("6.2.2-valid-fragmented-at-code-points",
         [F(OP_TEXT, _hello_utf8[:12], fin=False), F(OP_CONT, _hello_utf8[12:])], echoed(T(_hello_utf8))))
add(case("6.2.3-valid-chop-1", [F(OP_TEXT, _hello_utf8, chop=1)], echoed(T(_hello_utf8))))
add(case("6.2.4-valid-per-byte-fragments", _per_byte(KOSME), echoed(T(KOSME))))
_bad = KOSME + b"\xed\xa0\x80edited"  # a UTF-16 surrogate inside
add(case("6.3.1-invalid-one-frame", [F(OP_TEXT, _bad)], failed(1007)))
add(case("6.3.2-invalid-per-byte-fragments", _per_byte(_bad), failed(1007)))
# 6.4: fail fast. After the fragment that makes the message invalid the client
# pings: a server that validates as fragments arrive fails before the pong
# (strict); one that waits for the whole message pongs first (NON-STRICT).
add(case("6.4.1-fail-fast-invalid-fragment",
         [F(OP_TEXT, KOSME, fin=False), F(OP_CONT, b"\xf4\x90\x80\x80", fin=False), F(OP_PING, b"probe"),
          Wait(1), F(OP_CONT, b"edited")],
         failed(1007), alt=failed(1007, PONG(b"probe")),
         aiohttp="validates UTF-8 only once the message is complete (Autobahn NON-STRICT)"))
add(case("6.4.2-fail-fast-invalid-at-fragment-boundary",
         [F(OP_TEXT, KOSME + b"\xf4", fin=False), F(OP_CONT, b"\x90", fin=False), F(OP_PING, b"probe"),
          Wait(1), F(OP_CONT, b"\x80\x80edited")],
         failed(1007), alt=failed(1007, PONG(b"probe")),
         aiohttp="validates UTF-8 only once the message is complete (Autobahn NON-STRICT)"))
add(case("6.4.3-invalid-in-frame-sent-in-chops",
         [F(OP_TEXT, KOSME + b"\xf4\x90\x80\x80edited", chop=8)], failed(1007)))
add(case("6.4.4-invalid-fragment-chop-1",
         [F(OP_TEXT, KOSME, fin=False), F(OP_CONT, b"\xf4\x90\x80\x80", fin=False, chop=1), F(OP_CONT, b"edited")],
         failed(1007)))
# Invalid or incomplete sequences at fragment boundaries.
_emoji = "😀".encode()  # f0 9f 98 80
add(case("6.x.1-code-point-split-across-three-fragments",
         [F(OP_TEXT, b"a" + _emoji[:2], fin=False), F(OP_CONT, _emoji[2:3], fin=False), F(OP_CONT, _emoji[3:] + b"z")],
         echoed(T(b"a" + _emoji + b"z"))))
add(case("6.x.2-code-point-split-with-empty-fragment-and-ping-between",
         [F(OP_TEXT, _emoji[:1], fin=False), F(OP_CONT, b"", fin=False), F(OP_PING, b"mid"),
          F(OP_CONT, _emoji[1:])], echoed(PONG(b"mid"), T(_emoji))))
add(case("6.x.3-message-ends-inside-a-code-point", [F(OP_TEXT, b"ab\xe2\x82", fin=False), F(OP_CONT, b"")],
         failed(1007)))
add(case("6.x.4-final-fragment-ends-inside-a-code-point", [F(OP_TEXT, b"ab", fin=False), F(OP_CONT, b"\xe2\x82")],
         failed(1007)))
add(case("6.x.5-truncated-sequence-then-ascii-at-boundary", [F(OP_TEXT, b"ab\xe2\x82", fin=False), F(OP_CONT, b"(")],
         failed(1007)))
add(case("6.x.6-surrogate-split-at-boundary", [F(OP_TEXT, b"\xed", fin=False), F(OP_CONT, b"\xa0\x80")],
         failed(1007)))
add(case("6.x.7-overlong-split-at-boundary", [F(OP_TEXT, b"\xe0\x80", fin=False), F(OP_CONT, b"\xaf")],
         failed(1007)))
add(case("6.x.8-valid-message-after-invalid-prefix-never-sent",
         [F(OP_TEXT, b"\xe2\x82", fin=False), F(OP_CONT, b"\xac")], echoed(T("€"))))
add(case("6.x.9-invalid-first-fragment-of-three", [F(OP_TEXT, b"\xff", fin=False), F(OP_CONT, b"a", fin=False),
                                                     F(OP_CONT, b"b")], failed(1007)))
for i in range(1, len(KOSME) + 1):  # 6.6: every prefix of κόσμε, valid only at code point boundaries
    utf8_case(f"6.6.{i}-kosme-prefix-{i}", KOSME[:i], per_byte=False)
_table = {
    "6.5.1-kosme": KOSME,
    "6.5.2-4-byte": b"\xf0\x90\x80\x80",
    "6.5.3-mixed": b"\x7f\xdf\xbf\xef\xbf\xbf\xf4\x8f\xbf\xbf",
    "6.7.1-first-1-byte": b"\x00", "6.7.2-first-2-byte": b"\xc2\x80", "6.7.3-first-3-byte": b"\xe0\xa0\x80",
    "6.7.4-first-4-byte": b"\xf0\x90\x80\x80",
    "6.8.1-first-5-byte": b"\xf8\x88\x80\x80\x80", "6.8.2-first-6-byte": b"\xfc\x84\x80\x80\x80\x80",
    "6.9.1-last-1-byte": b"\x7f", "6.9.2-last-2-byte": b"\xdf\xbf", "6.9.3-last-3-byte": b"\xef\xbf\xbf",
    "6.9.4-last-4-byte": b"\xf4\x8f\xbf\xbf",
    "6.10.1-beyond-U+10FFFF-4-byte": b"\xf7\xbf\xbf\xbf", "6.10.2-last-5-byte": b"\xfb\xbf\xbf\xbf\xbf",
    "6.10.3-last-6-byte": b"\xfd\xbf\xbf\xbf\xbf\xbf",
    "6.11.1-U+D7FF": b"\xed\x9f\xbf", "6.11.2-U+E000": b"\xee\x80\x80", "6.11.3-U+FFFD": b"\xef\xbf\xbd",
    "6.11.4-U+10FFFF": b"\xf4\x8f\xbf\xbf", "6.11.5-U+110000": b"\xf4\x90\x80\x80",
    "6.12.1-lone-continuation-80": b"\x80", "6.12.2-lone-continuation-bf": b"\xbf",
    "6.12.3-two-continuations": b"\x80\xbf", "6.12.4-three-continuations": b"\x80\xbf\x80",
    "6.12.8-all-continuations": bytes(range(0x80, 0xC0)),
    "6.13.1-lonely-2-byte-starts": b"".join(bytes((c, 0x20)) for c in range(0xC0, 0xE0)),
    "6.13.2-lonely-3-byte-starts": b"".join(bytes((c, 0x20)) for c in range(0xE0, 0xF0)),
    "6.13.3-lonely-4-byte-starts": b"".join(bytes((c, 0x20)) for c in range(0xF0, 0xF8)),
    "6.13.4-lonely-5-byte-starts": b"".join(bytes((c, 0x20)) for c in range(0xF8, 0xFC)),
    "6.13.5-lonely-6-byte-starts": b"".join(bytes((c, 0x20)) for c in range(0xFC, 0xFE)),
    "6.14.1-missing-last-c0": b"\xc0", "6.14.2-missing-last-e0-80": b"\xe0\x80",
    "6.14.3-missing-last-f0-80-80": b"\xf0\x80\x80", "6.14.6-missing-last-df": b"\xdf",
    "6.14.7-missing-last-ef-bf": b"\xef\xbf", "6.14.8-missing-last-f7-bf-bf": b"\xf7\xbf\xbf",
    "6.15.1-concatenated-incomplete": b"\xc0\xe0\x80\xf0\x80\x80\xf8\x80\x80\x80\xfc\x80\x80\x80\x80\xdf\xef\xbf"
                                      b"\xf7\xbf\xbf\xfb\xbf\xbf\xbf\xfd\xbf\xbf\xbf\xbf",
    "6.16.1-impossible-fe": b"\xfe", "6.16.2-impossible-ff": b"\xff", "6.16.3-impossible-fe-fe-ff-ff": b"\xfe\xfe\xff\xff",
    "6.17.1-overlong-slash-2": b"\xc0\xaf", "6.17.2-overlong-slash-3": b"\xe0\x80\xaf",
    "6.17.3-overlong-slash-4": b"\xf0\x80\x80\xaf", "6.17.4-overlong-slash-5": b"\xf8\x80\x80\x80\xaf",
    "6.18.1-max-overlong-2": b"\xc1\xbf", "6.18.2-max-overlong-3": b"\xe0\x9f\xbf",
    "6.18.3-max-overlong-4": b"\xf0\x8f\xbf\xbf",
    "6.19.1-overlong-nul-2": b"\xc0\x80", "6.19.2-overlong-nul-3": b"\xe0\x80\x80",
    "6.19.3-overlong-nul-4": b"\xf0\x80\x80\x80",
    "6.20.1-surrogate-D800": b"\xed\xa0\x80", "6.20.2-surrogate-DB7F": b"\xed\xad\xbf",
    "6.20.3-surrogate-DB80": b"\xed\xae\x80", "6.20.4-surrogate-DBFF": b"\xed\xaf\xbf",
    "6.20.5-surrogate-DC00": b"\xed\xb0\x80", "6.20.6-surrogate-DF80": b"\xed\xbe\x80",
    "6.20.7-surrogate-DFFF": b"\xed\xbf\xbf",
    "6.21.1-surrogate-pair-D800-DC00": b"\xed\xa0\x80\xed\xb0\x80",
    "6.21.2-surrogate-pair-D800-DFFF": b"\xed\xa0\x80\xed\xbf\xbf",
    "6.21.8-surrogate-pair-DBFF-DFFF": b"\xed\xaf\xbf\xed\xbf\xbf",
    "6.21.9-surrogate-after-valid-text": b"valid \xed\xa0\x80",
    "6.22.1-noncharacter-U+FFFE": b"\xef\xbf\xbe", "6.22.2-noncharacter-U+FFFF": b"\xef\xbf\xbf",
    "6.22.3-noncharacter-U+1FFFE": b"\xf0\x9f\xbf\xbe", "6.22.4-noncharacter-U+10FFFF": b"\xf4\x8f\xbf\xbf",
    "6.22.5-noncharacter-U+FDD0": b"\xef\xb7\x90",
    "6.23.1-replacement-char": b"\xef\xbf\xbd",
    "6.23.2-replacement-after-ascii": b"abc\xef\xbf\xbd",
}
for _id, _payload in _table.items():
    utf8_case(_id, _payload)

# ---- 7 close handling
_c1000 = struct.pack("!H", 1000)
add(case("7.1.1-text-then-close", [F(OP_TEXT, _hello), F(OP_CLOSE, _c1000)], failed(1000, T(_hello))))
add(case("7.1.2-close-twice", [F(OP_CLOSE, _c1000), F(OP_CLOSE, _c1000)], failed(1000)))
add(case("7.1.3-ping-after-close", [F(OP_CLOSE, _c1000), F(OP_PING, _hello)], failed(1000)))
add(case("7.1.4-text-after-close", [F(OP_CLOSE, _c1000), F(OP_TEXT, _hello)], failed(1000)))
add(case("7.1.5-close-between-fragments", [F(OP_TEXT, b"fragment1", fin=False), F(OP_CLOSE, _c1000),
                                           F(OP_CONT, b"fragment2")], failed(1000)))
add(case("7.1.6-binary-after-close-paced", [F(OP_CLOSE, _c1000), Pause(), F(OP_BINARY, b"\x00" * 1000)],
         failed(1000)))
add(case("7.1.7-invalid-frame-after-close", [F(OP_CLOSE, _c1000), F(9, b"\xfe" * 126), F(3)], failed(1000)))
# RFC 6455 5.5.1: a close answering one "typically echos the status code it
# received". aiohttp always answers 1000, which Autobahn also accepts; the
# gateway forwards the backend's answer, so both are accepted for every code.
add(case("7.3.1-close-empty", [F(OP_CLOSE)], [failed(1005), failed(1000)]))
add(case("7.3.2-close-1-byte-payload", [F(OP_CLOSE, b"\x03")], failed(1002)))
add(case("7.3.3-close-1000", [F(OP_CLOSE, _c1000)], failed(1000)))
add(case("7.3.4-close-1000-reason", [F(OP_CLOSE, _c1000 + b"Hello World!")], failed(1000)))
add(case("7.3.5-close-1000-reason-123", [F(OP_CLOSE, _c1000 + b"*" * 123)], failed(1000)))
add(case("7.3.6-close-1000-reason-124", [F(OP_CLOSE, _c1000 + b"*" * 124)], failed(1002)))
# RFC 6455 8.1 / 7.4.1: invalid UTF-8 in the reason fails the connection;
# Autobahn accepts 1002 or 1007 for it.
add(case("7.5.1-close-reason-invalid-utf8", [F(OP_CLOSE, _c1000 + _bad)], [failed(1007), failed(1002)]))
for i, code in enumerate((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                          3000, 3999, 4000, 4999), 1):
    add(case(f"7.7.{i}-close-code-{code}-answered", [F(OP_CLOSE, struct.pack("!H", code) + b"bye")],
             [failed(code), failed(1000)]))
# RFC 6455 7.4: 0-999 unused, 1004-1006 and 1015 never on the wire, 1016-2999
# reserved for the protocol, nothing above 4999 defined: a close carrying one
# is a protocol error.
_aiohttp_codes = {
    1006: "accepts close code 1006 (reserved, MUST NOT be sent) and answers 1000",
    5000: "checks close codes below 3000 only: accepts 5000 and answers 1000",
    65535: "checks close codes below 3000 only: accepts 65535 and answers 1000",
}
for i, code in enumerate((0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535), 1):
    add(case(f"7.9.{i}-close-code-{code}-invalid", [F(OP_CLOSE, struct.pack("!H", code))], failed(1002),
             aiohttp=_aiohttp_codes.get(code)))

# A client fault while the server is in the middle of sending a large frame:
# RFC 6455 7.1.7, the server "SHOULD send a Close frame with an appropriate
# status code" when failing the connection; it can only do so at a frame
# boundary, so it finishes the frame first (the gateway's own contract too:
# "a close the gateway originates is injected only at a frame boundary, so
# neither peer ever sees a torn frame").
_b16 = random.Random(716).randbytes(16 << 20)
for i, (bad, code) in enumerate(((F(3), 1002), (F(OP_TEXT, b"\xff"), 1007), (F(OP_PING, b"x" * 126), 1002)), 1):
    add(case(f"7.10.{i}-fault-while-large-frame-is-being-sent-{code}",
             [F(OP_BINARY, _b16), Hold(1 << 16), bad, Pause(), Pause(), Release()], failed(code, B(_b16))))

# ---- RFC 6455 5.1: client frames MUST be masked; a server MUST close on one that is not
_unmasked = "accepts unmasked client frames (RFC 6455 5.1: the server MUST close the connection)"
add(case("mask.1-unmasked-text", [F(OP_TEXT, _hello, mask=False)], failed(1002), aiohttp=_unmasked))
add(case("mask.2-unmasked-binary", [F(OP_BINARY, b"\x00\x01", mask=False)], failed(1002), aiohttp=_unmasked))
add(case("mask.3-unmasked-ping", [F(OP_PING, b"p", mask=False)], failed(1002), aiohttp=_unmasked))
add(case("mask.4-unmasked-continuation", [F(OP_TEXT, b"frag", fin=False), F(OP_CONT, b"ment", mask=False)],
         failed(1002), aiohttp=_unmasked))
add(case("mask.5-unmasked-close", [F(OP_CLOSE, _c1000, mask=False)], failed(1002), aiohttp=_unmasked))

# ---- 9 larger messages
_rng = random.Random(9)


def _text(n: int) -> bytes:
    """n bytes of valid UTF-8 with multi-byte characters, so fragment cuts fall inside them."""
    unit = "BAsd7&jh23 κόσμε € 😀 ".encode()
    data = (unit * (n // len(unit) + 1))[:n]
    return data.decode("utf-8", "ignore").encode().ljust(n, b"x")


def _blob(n: int) -> bytes:
    return _rng.randbytes(n)


def _frag_text(op: int, data: bytes, size: int) -> list[F]:
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    return [F(op if i == 0 else OP_CONT, p, fin=i == len(pieces) - 1) for i, p in enumerate(pieces)]


_MiB = 1 << 20
for i, n in enumerate((64 << 10, 256 << 10, _MiB, 4 * _MiB), 1):
    t, b = _text(n), _blob(n)
    add(case(f"9.1.{i}-text-{n}", [F(OP_TEXT, t)], echoed(T(t))))
    add(case(f"9.2.{i}-binary-{n}", [F(OP_BINARY, b)], echoed(B(b))))
_t4, _b4, _t1, _b1 = _text(4 * _MiB), _blob(4 * _MiB), _text(_MiB), _blob(_MiB)
for i, size in enumerate((1 << 10, 64 << 10, _MiB), 1):
    t = _t1 if size < (64 << 10) else _t4
    b = _b1 if size < (64 << 10) else _b4
    add(case(f"9.3.{i}-text-{len(t)}-in-frames-of-{size}", _frag_text(OP_TEXT, t, size), echoed(T(t))))
    add(case(f"9.4.{i}-binary-{len(b)}-in-frames-of-{size}", _frag_text(OP_BINARY, b, size), echoed(B(b))))
add(case("9.5.1-text-1MiB-chop-4096", [F(OP_TEXT, _t1, chop=4096)], echoed(T(_t1))))
add(case("9.6.1-binary-1MiB-chop-4096", [F(OP_BINARY, _b1, chop=4096)], echoed(B(_b1))))
_m256 = _text(256)
add(case("9.7.1-1000-text-messages-256", [F(OP_TEXT, _m256)] * 1000, echoed(*[T(_m256)] * 1000)))
_m1k = _blob(1024)
add(case("9.8.1-1000-binary-messages-1024", [F(OP_BINARY, _m1k)] * 1000, echoed(*[B(_m1k)] * 1000)))

# Pings answered while a large echo is being relayed: the pongs must not tear its frames.
_b4echo = _blob(4 * _MiB)
add(case("9.9.1-pings-while-large-echo-streams",
         [F(OP_BINARY, _b4echo)] + [s for i in range(20) for s in (Pause(), F(OP_PING, b"%d" % i))],
         echoed(B(_b4echo), *[PONG(b"%d" % i) for i in range(20)]), unordered=True))
add(case("9.9.2-close-right-after-large-message", [F(OP_BINARY, _b4echo), F(OP_CLOSE, _c1000)],
         failed(1000, B(_b4echo))))
add(case("9.9.3-large-text-then-ping-then-close", [F(OP_TEXT, _t1, chop=65536), F(OP_PING, b"q"), F(OP_CLOSE, _c1000)],
         [failed(1000, T(_t1), PONG(b"q")), failed(1000, PONG(b"q"), T(_t1))]))



def _mixed_stream(seed: int) -> tuple[bytes, list]:
    """Many frames back to back (messages of all sizes, fragments, pings between
    them), as one byte string, and the answers a conformant server gives."""
    rng = random.Random(seed)
    out, answers = [], []
    for i in range(60):
        kind = rng.choice(("text", "binary", "fragmented", "ping"))
        n = rng.choice((0, 1, 125, 126, 127, 1000, 65535, 65536, 70000))
        if kind == "ping":
            p = rng.randbytes(rng.randrange(126))
            out.append(F(OP_PING, p).build())
            answers.append(PONG(p))
        elif kind == "text":
            t = _text(n)
            out.append(F(OP_TEXT, t).build())
            answers.append(T(t))
        elif kind == "binary":
            b = rng.randbytes(n)
            out.append(F(OP_BINARY, b).build())
            answers.append(B(b))
        else:
            op = rng.choice((OP_TEXT, OP_BINARY))
            data = _text(n) if op == OP_TEXT else rng.randbytes(n)
            cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
            pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            for j, piece in enumerate(pieces):
                out.append(F(op if j == 0 else OP_CONT, piece, fin=j == len(pieces) - 1).build())
                if rng.random() < 0.5:
                    p = b"mid-%d-%d" % (i, j)
                    out.append(F(OP_PING, p).build())
                    answers.append(PONG(p))
            answers.append((T if op == OP_TEXT else B)(data))
    return b"".join(out), answers


# A stream cut at random offsets: frame headers, mask keys, UTF-8 sequences and
# control frames all end up split across reads somewhere.
for seed in (1, 2, 3):
    _stream, _answers = _mixed_stream(seed)
    _cuts = tuple(sorted(random.Random(seed).sample(range(1, len(_stream)), 400)))
    add(case(f"9.10.{seed}-mixed-stream-cut-at-random", [_RawChopped(_stream, _cuts)], echoed(*_answers),
             unordered=True))

# ---- 12/13 permessage-deflate (RFC 7692), through a backend that negotiates it
PMD = "permessage-deflate"


def _compressible_text(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = ["gateway", "relay", "frame", "κόσμε", "deflate", "message", "€", "backend", "client", "😀"]
    out = []
    size = 0
    while size < n:
        w = rng.choice(words) + " "
        out.append(w)
        size += len(w.encode())
    return "".join(out).encode()[:n].decode("utf-8", "ignore").encode()


def _compressible_blob(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.choice(b"\x00\x01\x02\x03abcd") for _ in range(n))


_SIZES_12 = (16, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536, 131072)
for i, n in enumerate(_SIZES_12, 1):
    msgs = [_compressible_text(n, s) for s in range(10)]
    add(case(f"12.1.{i}-deflate-10-text-{n}", [Z(OP_TEXT, m) for m in msgs], echoed(*[T(m) for m in msgs]),
             offer=PMD))
    blobs = [_compressible_blob(n, s) for s in range(10)]
    add(case(f"12.2.{i}-deflate-10-binary-{n}", [Z(OP_BINARY, m) for m in blobs], echoed(*[B(m) for m in blobs]),
             offer=PMD))
_OFFERS_13 = (
    PMD,
    PMD + "; client_no_context_takeover",
    PMD + "; server_no_context_takeover",
    PMD + "; client_max_window_bits=9",
    PMD + "; server_max_window_bits=9",
    PMD + "; client_max_window_bits; server_max_window_bits=15",
    PMD + "; client_no_context_takeover; server_no_context_takeover",
    PMD + "; server_max_window_bits=9, " + PMD,
)
for i, offer in enumerate(_OFFERS_13, 1):
    msgs = [_compressible_text(256, s) for s in range(5)] + [_compressible_blob(16384, s) for s in range(5)]
    steps = [Z(OP_TEXT if j < 5 else OP_BINARY, m) for j, m in enumerate(msgs)]
    expect = echoed(*[T(m) if j < 5 else B(m) for j, m in enumerate(msgs)])
    add(case(f"13.{i}-offer-{offer.replace(' ', '').replace(PMD, 'pmd')}", steps, expect, offer=offer))
_zt = _compressible_text(20000, 77)
add(case("pmd.1-compressed-text-fragmented", [Z(OP_TEXT, _zt, frag=100)], echoed(T(_zt)), offer=PMD))
add(case("pmd.2-compressed-fragments-ping-between",
         [F(OP_PING, b"before"), Z(OP_BINARY, _compressible_blob(5000, 1), frag=300), Wait(2),
          F(OP_PING, b"after")],
         echoed(PONG(b"before"), B(_compressible_blob(5000, 1)), PONG(b"after")), offer=PMD))
# RFC 7692 6.1: RSV1 is set on the first frame of a message only.
add(case("pmd.3-rsv1-on-continuation", [Z(OP_TEXT, _zt, frag=100, rsv_on_cont=True)], failed(1002), offer=PMD))
# RFC 7692 6: the extension does not apply to control frames.
add(case("pmd.4-rsv1-on-ping", [F(OP_PING, b"x", rsv=RSV1)], failed(1002), offer=PMD,
         aiohttp="accepts RSV1 on a control frame when permessage-deflate is on (RFC 7692 6.1: MUST fail)"))
add(case("pmd.5-rsv2-with-deflate", [F(OP_TEXT, _hello, rsv=RSV2)], failed(1002), offer=PMD))
# RFC 6455 8.1 applies to the inflated text.
add(case("pmd.6-compressed-invalid-utf8", [Z(OP_TEXT, _bad)], failed(1007), offer=PMD))
add(case("pmd.7-uncompressed-message-on-deflate-connection", [F(OP_TEXT, _hello_utf8), F(OP_BINARY, b"\x00")],
         echoed(T(_hello_utf8), B(b"\x00")), offer=PMD))
add(case("pmd.8-empty-compressed-message", [Z(OP_TEXT, b""), Z(OP_BINARY, b"")], echoed(T(b""), B(b"")),
         offer=PMD))
add(case("pmd.9-compressed-2MiB", [Z(OP_BINARY, _compressible_blob(1 << 16, 5) * 32)],
         echoed(B(_compressible_blob(1 << 16, 5) * 32)), offer=PMD))
add(case("pmd.10-uncompressed-text-invalid-utf8-on-deflate-connection", [F(OP_TEXT, _bad)], failed(1007),
         offer=PMD))

assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


# --------------------------------------------------------------------- test
def _judge(case: Case, outcome: tuple, where: str) -> str | None:
    """None if `outcome` is acceptable; the failure message otherwise."""
    if outcome in case.expect:
        return None
    if outcome in case.alt:
        warnings.warn(NonStrict(f"{case.id} {where}: {outcome!r} (strict: {case.expect[0]!r})"))
        return None
    return f"{where}: got {outcome!r}, expected {' or '.join(repr(e) for e in case.expect + case.alt)}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_conformance(case: Case, gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits=GATEWAY_LIMITS))
    direct, direct_ext = await run_case(b.url, case)
    through, through_ext = await run_case(gw.url + "/ws", case)
    if case.unordered:
        direct, through = _unorder(direct), _unorder(through)
    problems = []
    if case.offer:
        # The gateway relays the backend's answer to the offer unchanged.
        if not (direct_ext or "").startswith(PMD):
            problems.append(f"direct: permessage-deflate not negotiated ({direct_ext!r})")
        if through_ext != direct_ext:
            problems.append(f"gateway: negotiated {through_ext!r}, backend directly {direct_ext!r}")
    if case.aiohttp is None:
        bad = _judge(case, direct, "direct (aiohttp reference)")
        if bad:
            problems.append(bad)
    bad = _judge(case, through, "through the gateway")
    if bad:
        problems.append(bad + f"\n   (direct gave {direct!r})")
    assert not problems, "\n".join(problems)

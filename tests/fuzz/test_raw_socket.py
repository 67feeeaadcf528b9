"""Malformed frames, written by hand with struct, against a real gateway (in
process, as tests/integration run it) in front of a real aiohttp echo backend.

Each case does a good handshake, then sends one kind of broken frame and
asserts the exact close code the gateway sends (RFC 6455 7.4.1: 1002 protocol
error, 1007 invalid payload, 1009 too big; gateway/relay.py
_check_client_frame and frames.parse_close decide which). Alongside, a
healthy session runs a numbered echo stream that must come back whole and in
order. A bounded Hypothesis variant sends random bytes after the handshake:
the gateway closes (with one of those codes) or keeps reading, and afterwards
still accepts a new connection and the healthy session still echoes.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import logging
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway import frames
from gateway.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT

from ..conftest import proxy_config
from ..helpers import RawClient

SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
MAX = 4096          # limits.max_message_bytes of the gateway under test
HALF = 10           # healthy messages before the bad frame, and again after it


def masked(b0: int, payload: bytes = b"", *, length: int | None = None, mask: bool = True) -> bytes:
    """One client frame from its first byte: the length as given (or the payload's), masked unless told."""
    n = len(payload) if length is None else length
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + frames.unmask(payload, key)


FIN = 0x80
CASES = {
    "reserved bit RSV1 on text (no deflate agreed)": (masked(FIN | 0x40 | OP_TEXT, b"hi"), 1002),
    "reserved bits RSV2+RSV3 on binary": (masked(FIN | 0x30 | OP_BINARY, b"hi"), 1002),
    "reserved opcode 0x3": (masked(FIN | 0x3, b"hi"), 1002),
    "reserved control opcode 0xB": (masked(FIN | 0xB), 1002),
    "unmasked client frame": (masked(FIN | OP_TEXT, b"hi", mask=False), 1002),
    "ping of 126 bytes (control > 125)": (masked(FIN | OP_PING, b"p" * 126), 1002),
    "fragmented ping (FIN clear)": (masked(OP_PING, b"p"), 1002),
    "text frame while a fragmented message is open": (masked(OP_TEXT, b"a") + masked(FIN | OP_TEXT, b"b"), 1002),
    "continuation without a start": (masked(FIN | OP_CONT, b"x"), 1002),
    "64-bit length with the top bit set": (struct.pack("!BBQ", FIN | OP_BINARY, 0xFF, (1 << 63) | 5) + os.urandom(4), 1002),
    "close code 1005": (masked(FIN | OP_CLOSE, struct.pack("!H", 1005)), 1002),
    "close code 1006": (masked(FIN | OP_CLOSE, struct.pack("!H", 1006)), 1002),
    "close code 999": (masked(FIN | OP_CLOSE, struct.pack("!H", 999)), 1002),
    "close code 5000": (masked(FIN | OP_CLOSE, struct.pack("!H", 5000)), 1002),
    "close payload of one byte": (masked(FIN | OP_CLOSE, b"\x03"), 1002),
    "close reason invalid UTF-8": (masked(FIN | OP_CLOSE, struct.pack("!H", 1000) + b"\xff\xfe"), 1002),
    "text frame invalid UTF-8": (masked(FIN | OP_TEXT, b"ok \xc3\x28"), 1007),
    "text invalid UTF-8 split over fragments": (masked(OP_TEXT, b"\xe2\x82") + masked(FIN | OP_CONT, b"\x28"), 1007),
    "binary frame over max_message_bytes": (masked(FIN | OP_BINARY, b"x" * (MAX + 1)), 1009),
    "fragments summing over max_message_bytes": (masked(OP_BINARY, b"x" * MAX) + masked(FIN | OP_CONT, b"y"), 1009),
    "length header over max_message_bytes, no payload yet": (struct.pack("!BBQ", FIN | OP_BINARY, 0xFF, 1 << 40) + os.urandom(4), 1009),
}
CODES = {1002, 1007, 1009}


class Healthy:
    """A session echoing numbered messages through the gateway, checked in order."""

    def __init__(self, client: RawClient):
        self.client = client
        self.sent = 0

    @classmethod
    async def open(cls, url: str) -> "Healthy":
        c = await RawClient.connect(url + "/ws")
        assert c.status == 101
        return cls(c)

    async def echo(self, count: int) -> None:
        first = self.sent
        for i in range(first, first + count):
            self.client.send_frame(OP_TEXT, f"h{i}".encode())
        await self.client.writer.drain()
        got = []
        for _ in range(count):
            op, fin, payload = await self.client.recv_frame()
            got.append((op, fin, payload.decode()))
        assert got == [(OP_TEXT, True, f"h{i}") for i in range(first, first + count)]
        self.sent += count


async def start(gateway, backend, kind: str = "websocket"):
    """The gateway in front of an aiohttp echo backend (the raw relay), or of its builtin
    echo (the message path: relay.from_client_messages)."""
    b = await backend()
    cfg = proxy_config(b.url, limits={"max_message_bytes": MAX})
    if kind == "builtin":
        cfg["backends"]["b"] = {"type": "builtin", "handler": "echo"}
    gw = await gateway(cfg)
    return gw, b


KINDS = ["websocket", "builtin"]


async def bad_session(url: str, data: bytes) -> RawClient:
    c = await RawClient.connect(url + "/ws")
    assert c.status == 101, c.status
    c.send_frame(OP_TEXT, b"warm-up")  # a good message first: the session is relaying
    op, _, payload = await c.recv_frame()
    assert (op, payload) == (OP_TEXT, b"warm-up")
    c.writer.write(data)
    await c.writer.drain()
    return c


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CASES))
async def test_malformed_frame_gets_exact_close_code(name, kind, gateway, backend, record_property):
    data, code = CASES[name]
    record_property("input", f"after a good handshake and echo ({kind} backend): {name}")
    record_property("cases", 1)
    record_property("expected", f"close {code}")
    failures = 1
    gw, b = await start(gateway, backend, kind)
    healthy = await Healthy.open(gw.url)
    try:
        await healthy.echo(HALF)
        bad = await bad_session(gw.url, data)
        got, _reason = await bad.recv_close()
        assert got == code, (name, got, _reason)
        assert await bad.eof(), "the gateway did not close the TCP connection after its close frame"
        bad.close()
        await healthy.echo(HALF)          # the other session: whole and in order
        record_property("other_sessions", "unaffected")
        failures = 0
    finally:
        record_property("failures", failures)
        healthy.client.close()


# --------------------------------------------------------- random bytes

def _unmask(payload: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def expected(data: bytes, limit: int = MAX, kind: str = "websocket") -> tuple[str, int | None]:
    """What RFC 6455 and the route's max size make of `data` sent after a good handshake.

    Parsed here with struct, apart from gateway/frames.py: ("close", code) for the first
    violation; ("client close", code) for a valid close frame (what follows it is ignored);
    ("partial", None) when the bytes end inside a frame; ("open", None) at a frame boundary.
    Like the gateway, a frame it checks whole (control frames, text) is judged once all of
    it is there, a streamed (binary) frame at its header; so the verdict does not depend on
    how TCP cuts the bytes. `kind` "builtin": a backend inside the gateway takes whole
    messages, so every frame up to the limit is judged once whole, and a text message's
    UTF-8 once it is all there (RFC 6455 8.1 allows failing at the end; the raw relay
    fails fast, at the first bad fragment).
    """
    stream = kind == "websocket"
    pos, n = 0, len(data)
    msg = 0            # opcode of the message in progress, 0 between messages
    text = False       # the last message started was text (the gateway's c_msg_text)
    total = 0
    utf8 = None
    whole_text = b""
    while pos < n:
        if n - pos < 2:
            return "partial", None
        b0, b1 = data[pos], data[pos + 1]
        length, hlen = b1 & 0x7F, 2
        if length == 126:
            if n - pos < 4:
                return "partial", None
            length, hlen = struct.unpack_from("!H", data, pos + 2)[0], 4
        elif length == 127:
            if n - pos < 10:
                return "partial", None
            length, hlen = struct.unpack_from("!Q", data, pos + 2)[0], 10
        key = None
        if b1 & 0x80:
            if n - pos < hlen + 4:
                return "partial", None
            key, hlen = data[pos + hlen:pos + hlen + 4], hlen + 4
        op, fin, rsv = b0 & 0x0F, b0 & 0x80, b0 & 0x70
        end = pos + hlen + length
        whole = op >= 8 or (op == OP_TEXT and not rsv & 0x40) or (op == OP_CONT and text) or not stream
        if end > n and length <= limit and whole:
            return "partial", None
        if key is None:
            return "close", 1002                       # 5.1: client frames are masked
        if op >= 8:
            if rsv or not fin or length > 125 or op > 0xA:
                return "close", 1002                   # 5.5: control frames
        elif op == OP_CONT:
            if not msg or rsv:
                return "close", 1002
        elif op in (OP_TEXT, OP_BINARY):
            if msg or rsv:
                return "close", 1002                   # 5.4: no interleaving; 5.2: RSV without extension
            msg, text, total = op, op == OP_TEXT, 0
            utf8 = codecs.getincrementaldecoder("utf-8")() if text else None
        else:
            return "close", 1002                       # reserved opcode
        if op < 8:
            total += length
            if total > limit:
                return "close", 1002 if length >> 63 else 1009   # 5.2: the MSB of a 64-bit length is 0
        if end > n:
            return "partial", None
        payload = _unmask(data[pos + hlen:end], key)
        if op < 8 and msg == OP_TEXT:
            whole_text = (whole_text if op == OP_CONT else b"") + payload
            try:
                if stream:
                    utf8.decode(payload, bool(fin))
                elif fin:
                    whole_text.decode("utf-8")
            except UnicodeDecodeError:
                return "close", 1007                   # 8.1: text is UTF-8
        elif op == OP_CLOSE:
            if not payload:
                return "client close", 1005
            if len(payload) == 1:
                return "close", 1002
            code = struct.unpack_from("!H", payload)[0]
            if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
                return "close", 1002                   # 7.4: codes that may be sent
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return "close", 1002
            return "client close", code
        if op < 8 and fin:
            msg = 0
        pos = end
    return "open", None


def test_reference_model_agrees_with_the_fixed_cases():
    """The model above gives the code each hand-written case expects (so the random test trusts it)."""
    for name, (data, code) in CASES.items():
        for kind in KINDS:
            assert expected(data, kind=kind) == ("close", code), (name, kind)
    split_bad = masked(OP_TEXT, b"\xff") + masked(OP_CONT, b"a")
    assert expected(split_bad) == ("close", 1007) and expected(split_bad, kind="builtin") == ("open", None)
    assert expected(b"\x00\x01") == ("close", 1002) and expected(b"\x00\x01", kind="builtin") == ("partial", None)
    assert expected(masked(FIN | OP_TEXT, b"ok")) == ("open", None)
    assert expected(masked(OP_TEXT, "é".encode()[:1])) == ("open", None)
    assert expected(masked(FIN | OP_TEXT, b"ok")[:5]) == ("partial", None)
    assert expected(masked(FIN | OP_CLOSE, struct.pack("!H", 4000))) == ("client close", 4000)


frame_parts = st.builds(
    lambda b0, payload, mask: masked(b0, payload, mask=mask),
    st.integers(0, 255), st.binary(max_size=40) | st.text(max_size=10).map(str.encode),
    st.sampled_from([True, True, True, False]))   # mostly masked, so more get past the first check
noise = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.lists(st.sampled_from([masked(FIN | OP_TEXT, b"ok"), masked(OP_TEXT, b"a"), masked(FIN | OP_CONT, b"b"),
                              masked(FIN | OP_PING, b"p"), masked(FIN | 0x30 | OP_BINARY), b"\x81", b"\xff\xff",
                              masked(FIN | OP_TEXT, b"\xff"), masked(FIN | OP_CLOSE, struct.pack("!H", 4001))])
             | frame_parts | st.binary(max_size=8), min_size=1, max_size=6).map(b"".join),
    st.binary(max_size=200).map(lambda p: masked(FIN | OP_BINARY, p)),
)


async def random_bytes_round(url: str, data: bytes, kind: str) -> tuple[str, int | None]:
    """Send `data` after a good handshake; check the gateway does what `expected` says.

    A violation: the close frame with exactly that code, then EOF. The client's own close:
    a close back, then EOF. Still open at a frame boundary: our close 1000 is answered with a
    close. Ending inside a frame: we end our side and the gateway ends its (EOF).
    """
    want, code = expected(data, kind=kind)
    c = await bad_session(url, data)
    try:
        if want == "open":
            c.writer.write(masked(FIN | OP_CLOSE, struct.pack("!H", 1000)))
        elif want == "partial":
            c.writer.write_eof()
        await c.writer.drain()
        got = None
        try:
            got, _reason = await c.recv_close()
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        if want == "close":
            assert got == code, (data, want, code, got)
        elif want == "partial":
            assert got is None, (data, got)
        else:
            assert got is not None, (data, want)
        assert await c.eof(), data
        return want, got
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_random_bytes_after_handshake_get_what_rfc6455_says(kind, gateway, backend, record_property, caplog):
    gw, b = await start(gateway, backend, kind)
    healthy = await Healthy.open(gw.url)
    await healthy.echo(HALF)
    loop = asyncio.get_running_loop()
    seen = {"cases": 0, "failures": 0}
    outcomes: dict = {}

    def on_loop(coro, timeout=20):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    @settings(deadline=None, derandomize=True, database=None, max_examples=60 * SCALE,
              suppress_health_check=list(HealthCheck))
    @given(noise)
    def run(data):
        seen["cases"] += 1
        try:
            want, got = on_loop(random_bytes_round(gw.url, data, kind))
            outcomes[(want, got)] = outcomes.get((want, got), 0) + 1
            on_loop(healthy.echo(2))                      # the healthy session goes on, in order
        except BaseException:
            seen["failures"] += 1
            raise

    record_property("input", f"random bytes / frame sequences (random first byte, mask, payload) after a good "
                             f"handshake ({kind} backend)")
    record_property("expected", "the reference model's verdict: close 1002/1007/1009 exactly, a close answered, or EOF")
    try:
        with caplog.at_level(logging.ERROR, logger="gateway"):
            await asyncio.to_thread(run)
        await healthy.echo(HALF)
        c = await RawClient.connect(gw.url + "/ws")     # and a new connection is still accepted
        assert c.status == 101
        c.close()
        record_property("other_sessions", "unaffected")
    finally:
        record_property("cases", seen["cases"])
        record_property("failures", seen["failures"])
        healthy.client.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    kinds = {want for want, _ in outcomes}
    assert {"close", "open", "partial"} <= kinds, outcomes   # the examples reached every verdict


# --------------------------------------------------------- handshakes

def request(*, method="GET", target="/ws", version="HTTP/1.1", key=None, drop=(), extra=(), line=None) -> bytes:
    """A request head, good unless told: `drop` removes headers by name, `extra` adds (name, value) lines."""
    hdrs = [("Host", "127.0.0.1"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key or frames.new_key())]
    lines = [line if line is not None else f"{method} {target} {version}"]
    lines += [f"{k}: {v}" for k, v in hdrs if k not in drop] + [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


HANDSHAKES = {
    "no Sec-WebSocket-Key": (request(drop=("Sec-WebSocket-Key",)), 400),
    "two Sec-WebSocket-Key headers": (request(extra=(("Sec-WebSocket-Key", frames.new_key()),)), 400),
    "Sec-WebSocket-Key not base64": (request(key="not*base64!!"), 400),
    "Sec-WebSocket-Key of 15 bytes": (request(key=base64.b64encode(b"k" * 15).decode()), 400),
    "no Sec-WebSocket-Version": (request(drop=("Sec-WebSocket-Version",)), 426),
    "Sec-WebSocket-Version 8": (request(drop=("Sec-WebSocket-Version",), extra=(("Sec-WebSocket-Version", "8"),)), 426),
    "two Sec-WebSocket-Version headers": (request(extra=(("Sec-WebSocket-Version", "13"),)), 426),
    "Upgrade: h2c": (request(drop=("Upgrade",), extra=(("Upgrade", "h2c"),)), 426),
    "no Upgrade header": (request(drop=("Upgrade",)), 426),
    "no Connection header": (request(drop=("Connection",)), 426),
    "POST upgrade": (request(method="POST"), 405),
    "upgrade with a body (Content-Length: 5)": (request(extra=(("Content-Length", "5"),)), 400),
    "two Host headers": (request(extra=(("Host", "evil.example"),)), 400),
    "HTTP/1.0": (request(version="HTTP/1.0"), 400),
    "garbage request line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "request line of one word": (request(line="GET"), 400),
    "absolute-form target": (request(target="http://127.0.0.1/ws"), 400),
    "NUL in a header value": (request(extra=(("X-A", "a\x00b"),)), 400),
    "bare LF in the head": (request().replace(b"\r\nUpgrade", b"\nUpgrade"), 400),
    "header line without a colon": (request(extra=(("X-No-Colon-Here", ""),)).replace(b"X-No-Colon-Here: ", b"X-No-Colon-Here"), 400),
    "space before the colon": (request(extra=(("X-A ", "b"),)), 400),
    "101 headers": (request(extra=tuple((f"X-{i}", "v") for i in range(96))), 431),
    "one 17 KB header": (request(extra=(("X-Big", "v" * 17000),)), 431),
    "17 KB without an end of head": (b"GET /ws HTTP/1.1\r\nX-Big: " + b"v" * 17000, 431),
    "percent-encoded dot segment": (request(target="/ws/%2e%2e/admin"), 400),
    "percent-encoded NUL in the path": (request(target="/ws/%00"), 400),
}


async def http_status(url: str, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the answer's head (and a refusal's body, to EOF); (status, answer)."""
    host, port = url.split("://", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 "), answer[:80]
            status = int(answer.split(b" ", 2)[1])
            if status != 101:  # a refusal closes the connection after its body
                while chunk := await reader.read(1 << 16):
                    answer += chunk
        return status, answer
    finally:
        writer.close()


@pytest.mark.parametrize("name", list(HANDSHAKES))
async def test_malformed_handshake_gets_exact_status(name, gateway, backend, record_property, caplog):
    data, status = HANDSHAKES[name]
    record_property("input", f"handshake: {name} ({len(data)} bytes)")
    record_property("cases", 1)
    record_property("expected", f"HTTP {status}")
    failures = 1
    gw, b = await start(gateway, backend)
    healthy = await Healthy.open(gw.url)
    try:
        await healthy.echo(HALF)
        with caplog.at_level(logging.ERROR, logger="gateway"):
            got, answer = await http_status(gw.url, data)
        assert got == status, (name, answer[:200])
        assert b.sessions == 1, "a refused handshake reached the backend"
        await healthy.echo(HALF)
        record_property("other_sessions", "unaffected")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        failures = 0
    finally:
        record_property("failures", failures)
        healthy.client.close()


def test_good_request_builder_is_good():
    """The builder's unbroken request is an upgrade the parser accepts (so each case breaks one thing)."""
    from gateway import handshake, http1
    head = http1.parse_request(request()[:-4])
    assert frames.valid_client_key(handshake.check_upgrade(head))


# the good request's lines, mutated: a line dropped, doubled, a value or byte replaced
GOOD_LINES = request().decode().split("\r\n")[:-2]


@st.composite
def mutated_request(draw):
    lines = list(GOOD_LINES)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["drop", "double", "value", "byte", "insert"]))
        if how == "drop" and len(lines) > 1:
            del lines[i]
        elif how == "double":
            lines.insert(i, lines[i])
        elif how == "value":
            name = lines[i].partition(":")[0]
            lines[i] = f"{name}: {draw(st.text(alphabet=st.characters(max_codepoint=255), max_size=12))}"
        elif how == "byte" and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:j] + chr(draw(st.integers(0, 255))) + lines[i][j + 1:]
        else:
            lines.insert(i, draw(st.sampled_from(["", ":", " x: y", "Transfer-Encoding: chunked", "X: \x7f"])))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def test_mutated_handshakes_get_101_or_a_refusal(gateway, backend, record_property, caplog):
    gw, b = await start(gateway, backend)
    healthy = await Healthy.open(gw.url)
    await healthy.echo(HALF)
    loop = asyncio.get_running_loop()
    seen = {"cases": 0, "failures": 0}
    statuses: dict = {}

    @settings(deadline=None, derandomize=True, database=None, max_examples=60 * SCALE,
              suppress_health_check=list(HealthCheck))
    @given(mutated_request())
    def run(data):
        seen["cases"] += 1
        try:
            status, answer = asyncio.run_coroutine_threadsafe(http_status(gw.url, data), loop).result(20)
            assert status in (101, 400, 404, 405, 426, 431), (data, answer[:200])
            statuses[status] = statuses.get(status, 0) + 1
        except BaseException:
            seen["failures"] += 1
            raise

    record_property("input", "the good upgrade request with 1-3 lines dropped, doubled, inserted or a value/byte changed")
    record_property("expected", "101 or HTTP 400/404/405/426/431; never 5xx")
    try:
        with caplog.at_level(logging.ERROR, logger="gateway"):
            await asyncio.to_thread(run)
        await healthy.echo(HALF)
        record_property("other_sessions", "unaffected")
    finally:
        record_property("cases", seen["cases"])
        record_property("failures", seen["failures"])
        healthy.client.close()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(statuses) > 2, statuses

"""RFC 6455 framing: pure functions, no I/O.

The relay does not decode frames into message objects. It reads frame
headers to know where frames start and end, forwards the bytes as they are
(client frames keep their mask: the gateway is a client to the backend, and
RFC 6455 5.3 requires client frames to be masked anyway), and only looks
into payloads where it must: control frames, UTF-8 of text frames.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import os
import struct

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_unpack_short = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from

try:  # aiohttp ships a C implementation of the XOR mask; use it when present.
    from aiohttp._websocket.helpers import websocket_mask as _c_mask
except ImportError:  # pragma: no cover - depends on the aiohttp build
    _c_mask = None


def accept_key(key: str) -> str:
    # RFC 6455 4.2.2: base64(SHA-1(key + GUID))
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def valid_client_key(key: str) -> bool:
    # RFC 6455 4.2.1: a base64-encoded 16-byte value.
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def unmask(payload: bytes, mask: bytes, offset: int = 0) -> bytes:
    """XOR `payload` with `mask`, starting `offset` bytes into the mask cycle."""
    if not payload:
        return b""
    if offset & 3:
        o = offset & 3
        mask = mask[o:] + mask[:o]
    if _c_mask is not None:
        buf = bytearray(payload)
        _c_mask(mask, buf)
        return bytes(buf)
    n = len(payload)
    key = int.from_bytes((mask * ((n >> 2) + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = False, rsv1: bool = False) -> bytes:
    """Build one frame. Server frames are unmasked; client frames get a random mask."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = _pack_short(b0, mbit | 126, n)
    else:
        head = _pack_long(b0, mbit | 127, n)
    if mask:
        key = os.urandom(4)
        return head + key + unmask(payload, key)
    return head + payload


def close_payload(code: int, reason: str = "") -> bytes:
    raw = reason.encode("utf-8")[:123]
    # Cutting may split a UTF-8 sequence; drop the broken tail.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + raw


def valid_close_code(code: int) -> bool:
    # RFC 6455 7.4.1/7.4.2: 1000-1003, 1007-1011 (and the registered 1012-1014)
    # and 3000-4999 may appear on the wire; 1004-1006 and 1015 never.
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int, str] | None:
    """Returns (code, reason); (1005, '') for an empty payload; None if invalid."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        return None
    code = _unpack_short(payload)[0]
    if not valid_close_code(code):
        return None
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_header(buf, pos: int):
    """Parse a frame header at `pos`.

    Returns (b0, length, header_len, mask) or None if the header is incomplete.
    `mask` is None for unmasked frames.
    """
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    length = b1 & 0x7F
    hlen = 2
    if length == 126:
        if avail < 4:
            return None
        length = _unpack_short(buf, pos + 2)[0]
        hlen = 4
    elif length == 127:
        if avail < 10:
            return None
        length = _unpack_long(buf, pos + 2)[0]
        hlen = 10
    if b1 & 0x80:
        if avail < hlen + 4:
            return None
        mask = bytes(buf[pos + hlen:pos + hlen + 4])
        hlen += 4
    else:
        mask = None
    return b0, length, hlen, mask


class Utf8Check:
    """Incremental UTF-8 validation across the frames of one text message."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")

    def feed(self, data: bytes, final: bool) -> bool:
        try:
            self._decoder.decode(data, final)
            return True
        except UnicodeDecodeError:
            return False


def message(frame_bytes: bytes) -> tuple[int, bytes] | None:
    """The opcode and payload of one whole unmasked frame the gateway built (send_raw's
    frames, taken apart again where a message is kept rather than sent)."""
    h = parse_header(frame_bytes, 0)
    if h is None:
        return None
    b0, length, hlen, _ = h
    return b0 & 0x0F, frame_bytes[hlen:hlen + length]


def mask_in_place(mask: bytes, buf: bytearray) -> None:
    """XOR `buf` with `mask` in place (aiohttp's C helper when it is there)."""
    if _c_mask is not None:
        _c_mask(mask, buf)
    else:  # pragma: no cover - depends on the aiohttp build
        buf[:] = unmask(bytes(buf), mask)


def utf8_ok(buf) -> bool:
    try:
        buf.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def text_is_valid(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False

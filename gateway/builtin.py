"""Backends that live inside the gateway, so the default config does something
useful with no other service running."""

from __future__ import annotations


class Echo:
    """Sends every message back as it came: text stays text, binary stays binary."""

    name = "echo"

    def on_message(self, session, opcode: int, payload: bytes) -> None:
        session.send_message(opcode, payload)

    def on_close(self, session) -> None:
        pass


HANDLERS = {"echo": Echo}

"""Backends that live inside the gateway, so the default config does something
useful with no other service running."""

from __future__ import annotations

import orjson

from .channels import ChannelError, check_name
from .frames import OP_TEXT


class Echo:
    """Sends every message back as it came: text stays text, binary stays binary."""

    name = "echo"

    def on_message(self, session, opcode: int, payload: bytes) -> None:
        session.send_message(opcode, payload)

    def on_close(self, session) -> None:
        pass


class Chat:
    """A small chat on the node's channels: rooms are channels.

    Text messages are JSON objects with an `action`:
      {"action": "join",  "room": "lobby"}              -> {"event":"joined","room":"lobby","members":N}
      {"action": "say",   "room": "lobby", "text": "hi"} -> every member gets
                                                            {"event":"message","room":"lobby","from":WHO,"text":"hi"}
      {"action": "leave", "room": "lobby"}              -> {"event":"left","room":"lobby"}
      {"action": "who",   "room": "lobby"}              -> {"event":"presence","room":"lobby","members":[WHO,...]}
    WHO is the JWT subject, or the connection id on routes without auth.
    Anything else gets {"event":"error","error":"..."}. A room is an ordinary
    channel, so `POST /v1/channels/lobby/messages` speaks into it too, and a
    room spans every node of the cluster (`who` lists this node's members). Joins
    and leaves are not announced: with thousands in a room that would be a
    message storm; `who` asks.
    """

    name = "chat"

    def on_message(self, session, opcode: int, payload: bytes) -> None:
        if opcode != OP_TEXT:
            return self._error(session, "chat takes JSON text messages")
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self._error(session, "not JSON")
        if type(msg) is not dict:
            return self._error(session, "expected a JSON object")
        action = msg.get("action")
        room = msg.get("room")
        if action not in ("join", "say", "leave", "who"):
            return self._error(session, f"unknown action {action!r} (chat knows join, say, leave, who)"[:200])
        if not isinstance(room, str):
            return self._error(session, "'room' must be a string")
        try:
            check_name(room)
        except ChannelError as exc:
            return self._error(session, str(exc))
        channels = session.node.channels
        who = session.sub if session.sub is not None else session.id
        mine = session.channels or ()
        if action == "join":
            try:
                channels.subscribe(session, room)
            except ChannelError as exc:
                return self._error(session, str(exc))
            session.send_message(OP_TEXT, _dump({"event": "joined", "room": room,
                                                 "members": channels.count(room)}))
        elif action == "say":
            text = msg.get("text")
            if not isinstance(text, str):
                return self._error(session, "'text' must be a string")
            if room not in mine:
                return self._error(session, f"join {room!r} first")
            message = _dump({"event": "message", "room": room, "from": who, "text": text})
            cluster = session.node.cluster
            if cluster is not None:
                cluster.delivery.publish_later(room, OP_TEXT, message)   # every member on every node, in order
            else:
                channels.publish(room, OP_TEXT, message)
        elif action == "leave":
            channels.unsubscribe(session, room)
            session.send_message(OP_TEXT, _dump({"event": "left", "room": room}))
        else:
            members = channels.presence(room)["sessions"]
            session.send_message(OP_TEXT, _dump({
                "event": "presence", "room": room,
                "members": [m["sub"] if m["sub"] is not None else m["connection"] for m in members]}))

    def on_close(self, session) -> None:
        pass  # the node drops every session from its channels when it ends

    @staticmethod
    def _error(session, message: str) -> None:
        session.send_message(OP_TEXT, _dump({"event": "error", "error": message}))


def _dump(obj) -> bytes:
    return orjson.dumps(obj)


HANDLERS = {"echo": Echo, "chat": Chat}

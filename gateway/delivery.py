"""What crosses between nodes: the management API's answers for the whole
cluster, and the bus requests that carry them.

A message for sessions on other nodes crosses the store's bus once per node
that has a recipient (never once per recipient); each node delivers to its
own sessions from its own indexes and answers with its count, so the
`delivered` figure is the cluster's. A node that does not answer within
redis.request_timeout_s is named in `unconfirmed_nodes`, never counted as 0
silently. Nothing here runs per relayed message.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import itertools
import logging

import orjson

from . import frames, metrics, reattach, traced
from .config import ChannelRule
from .errors import ApiError, ChannelError, HistoryError, StoreUnavailable
from .logs import event
from .parked import Parked
from .session import State
from .store.detached import DETACHED_NODE
from .trace import Traces

log = logging.getLogger("gateway.cluster")

MAX_OUTBOX = 10_000          # channel messages from in-gateway publishers waiting for the store


def channel_rule(rules: tuple[ChannelRule, ...], name: str) -> ChannelRule | None:
    for rule in rules:
        if fnmatch.fnmatchcase(name, rule.match):
            return rule
    return None


def _pack(header: dict, payload: bytes = b"") -> bytes:
    return orjson.dumps(header) + b"\n" + payload


def _parked(index: dict) -> frozenset:
    """Sessions an index names as detached: the publisher appends to their replay
    buffers itself (Delivery._to_parked), so no node sends them the message too,
    not even the one still capturing a session it is draining."""
    return frozenset(sid for sid, node in index.items() if node == DETACHED_NODE)


def _skip(header: dict) -> frozenset | None:
    skip = header.get("skip")
    return frozenset(skip) if isinstance(skip, list) and skip else None


def _unpack(data: bytes) -> tuple[dict, bytes]:
    head, _, payload = data.partition(b"\n")
    return orjson.loads(head), payload


def _pushed(s, sent: bool) -> dict:
    """A push's answer for one live session: a reliable one whose window is full says so."""
    if not sent and s.rel is not None and s.rel.window.full:
        return {"delivered": 0, "buffer_full": 1}
    return {"delivered": 1 if sent else 0}


def _reply_body(reply: dict) -> dict:
    """A bus reply without the bus's own fields: the answering node's answer as it gave it."""
    return {k: v for k, v in reply.items() if k not in ("op", "rid", "node")}


class Delivery:
    """A node's side of the bus, and the cluster-wide answers built on it."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.node = cluster.node
        self.store = cluster.store
        self.settings = cluster.settings
        self.node_id = cluster.node_id
        self.by_session = cluster.by_session         # the same dict: session id -> local session
        self.resuming: dict[str, object] = {}        # session id -> a session here whose replay is not out yet
        self.flush_now = cluster.flush_now
        self._rids = itertools.count(1)
        self._asks: dict[int, tuple[set[str], dict[str, dict], asyncio.Future]] = {}
        # (channel, session) -> [(offset, frame)] while the session catches up on history
        self._held: dict[str, dict[object, list]] = {}
        # Channel messages published inside the gateway (the chat builtin), sent
        # in order by one task: history, this node's members, the other nodes.
        self._outbox: collections.deque = collections.deque()
        self._outbox_wake = asyncio.Event()
        self.outbox_dropped = 0
        self.parked = Parked(self)   # sessions parked, being parked, or to be cut for a take-over
        self.traces = Traces()                           # debug traces of this node's sessions

    # ------------------------------------------------------------ the bus
    async def _ask(self, nodes, header: dict, payload: bytes = b"") -> tuple[dict[str, dict], list[str]]:
        """Send one request to each node; returns (answers by node, nodes that did not answer)."""
        want = set(nodes)
        if not want:
            return {}, []
        rid = next(self._rids)
        got: dict[str, dict] = {}
        done = asyncio.get_running_loop().create_future()
        self._asks[rid] = (want, got, done)
        data = _pack({**header, "rid": rid, "from": self.node_id}, payload)
        try:
            for n in list(want):
                if await self.store.publish(n, data) == 0:
                    want.discard(n)   # nobody listens there: the node is gone
                    got[n] = {"gone": True}
            if want - set(got):
                try:
                    await asyncio.wait_for(asyncio.shield(done), self.settings.request_timeout_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._asks.pop(rid, None)
        answered = {n: a for n, a in got.items() if not a.get("gone")}
        missing = sorted(n for n in nodes if n not in answered)
        op = header.get("op", "?")
        if answered:
            metrics.bus_requests.labels(op, "answered").inc(len(answered))
        if missing:
            metrics.bus_requests.labels(op, "unanswered").inc(len(missing))
        return answered, missing

    async def on_bus(self, data: bytes) -> None:
        try:
            header, payload = _unpack(data)
        except (ValueError, orjson.JSONDecodeError):
            header = None
        if type(header) is not dict:
            event(log, "bus_message_unreadable", logging.WARNING, size=len(data))
            return
        op = header.get("op")
        if op == "reply":
            entry = self._asks.get(header.get("rid"))
            if entry is not None:
                want, got, done = entry
                got[header.get("node")] = header
                if want <= set(got) and not done.done():
                    done.set_result(None)
            return
        if header.get("rid") is None or not isinstance(header.get("from"), str):
            # A message that wants no answer: a chat room's line from another node.
            if op == "chan":
                try:
                    self._fan_out(header["chan"], header["opcode"], payload, header.get("offset"),
                                  _skip(header))
                except (KeyError, TypeError, ValueError):
                    event(log, "bus_message_unreadable", logging.WARNING, size=len(data))
            return
        try:
            answer = await self._execute(op, header, payload)
        except ApiError as exc:
            answer = {"status": exc.status, "error": exc.message, **exc.extra}
        except Exception:
            log.exception("bus request failed", extra={"fields": {"event": "bus_error", "op": op}})
            answer = {"status": 500, "error": "internal error"}
        reply = _pack({"op": "reply", "rid": header.get("rid"), "node": self.node_id, **answer})
        try:
            await self.store.publish(header.get("from"), reply)
        except StoreUnavailable:
            pass

    async def _execute(self, op: str, h: dict, payload: bytes) -> dict:
        """What another node asked this one to do, on this node's own sessions."""
        node = self.node
        if op == "sub":
            return {"n": await self._sub_here(h["sub"], h["opcode"], payload, _skip(h))}
        if op == "chan":
            return {"n": await self._channel_here(h["chan"], h["opcode"], payload, h.get("offset"), _skip(h))}
        if op == "ep_drain":
            return {"n": reattach.endpoint_draining(node, h["backend"], h["endpoint"], h["draining"])}
        if op == "trace":   # before the session lookup: a finished trace outlives its session
            answer = self.trace_here(h["what"], h["id"], h.get("max_frames"), h.get("max_s"))
            if answer is None:
                raise ApiError(404, "unknown connection", connection=h["id"])
            return answer
        if op == "takeover":   # before the lookup: a session being parked is no longer indexed as live
            return {"n": 1 if self.parked.drop_here(self.parked.holding(h["id"]), h["th"], h.get("sub"), h.get("routes")) else 0}
        s = self.local(h["id"])
        if s is None:
            raise ApiError(404, "unknown connection", connection=h["id"])
        if op == "conn":
            pushed = _pushed(s, s.send_message(h["opcode"], payload))
            await self.parked.captured((s,))
            return {"n": pushed["delivered"], **({"buffer_full": 1} if "buffer_full" in pushed else {})}
        if op == "close":
            s.gateway_close(h["code"], h["reason"])
            return {"n": 1, "connection": s.id}
        if op == "join":
            answer = await self._join_local(s, h["chan"], h.get("since"), h.get("epoch"))
            await self.flush_now()
            return answer
        if op == "leave":
            changed = node.channels.unsubscribe(s, h["chan"])
            await self.flush_now()
            return {"changed": changed, "connection": s.id}
        raise ApiError(400, f"unknown bus op {op!r}")

    # ------------------------------------------------------------ local parts
    def local(self, any_id: str):
        """The open session on this node with this connection or session id."""
        s = self.node.sessions.get(any_id)
        if s is None:
            s = self.by_session.get(any_id) or self.resuming.get(any_id)
        return s

    def _fan_out(self, name: str, opcode: int, payload: bytes, offset: int | None, skip=None) -> int:
        held = self._held.get(name)
        return self.node.channels.publish(name, opcode, payload, held=held, offset=offset, skip=skip)

    async def _channel_here(self, name: str, opcode: int, payload: bytes, offset: int | None, skip) -> int:
        """This node's members of channel `name`, for a publisher waiting for its answer:
        sent, and what went to a capture is in the store (Parked.captured)."""
        n = self._fan_out(name, opcode, payload, offset, skip)
        await self.parked.captured(self.node.channels.members.get(name), skip)
        return n

    async def _sub_here(self, sub: str, opcode: int, payload: bytes, skip) -> int:
        """This node's sessions of subject `sub`, as _channel_here."""
        frame = frames.frame(opcode, payload)
        sessions = self.node.by_sub.get(sub)
        n = sum(1 for s in list(sessions or ()) if not (skip and s.session_id in skip) and s.send_raw(frame))
        await self.parked.captured(sessions, skip)
        return n

    async def _join_local(self, s, name: str, since: int | None, epoch: str | None) -> dict:
        channels = self.node.channels
        if since is None:
            try:
                changed = channels.subscribe(s, name)
            except ChannelError as exc:
                raise ApiError(400, str(exc)) from None
            return {"changed": changed, "connection": s.id}
        # Catch up: join first with new messages held, then send what the
        # history has after `since`, then what was held that the history did
        # not already hold. In order, nothing twice, nothing skipped.
        held = self._held.setdefault(name, {})
        held[s] = []
        try:
            try:
                changed = channels.subscribe(s, name)
            except ChannelError as exc:
                raise ApiError(400, str(exc)) from None
            page = await self._history(name, since, epoch)
            last = since
            for entry in page.entries:
                s.send_message(entry.opcode, entry.payload)
                last = entry.offset
            for offset, frame in held.get(s, ()):
                if offset is None or offset > last:
                    s.send_raw(frame)
            return {"changed": changed, "connection": s.id, "replayed": len(page.entries),
                    "offset": max(last, page.offset), "epoch": page.epoch}
        finally:
            held.pop(s, None)
            if not held:
                self._held.pop(name, None)

    async def _history(self, name: str, since: int, epoch: str | None):
        rule = channel_rule(self.node.config.channels, name)
        if rule is None or rule.history is None:
            raise ApiError(400, f"channel {name!r} keeps no history (see 'channels' in the config)")
        try:
            return await self.store.history_since(name, since, epoch, rule.history.size)
        except HistoryError as exc:
            which = "epoch changed" if exc.status == 409 else "offset trimmed"
            raise ApiError(exc.status, f"history cannot be served whole: {which}", epoch=exc.epoch,
                           offset=exc.offset) from None

    # ------------------------------------------------------------ cluster answers
    async def _where(self, any_id: str) -> dict | None:
        rec = await self.store.get_session(any_id)
        if rec is None:
            sid = await self.store.session_of_connection(any_id)
            if sid is not None:
                rec = await self.store.get_session(sid)
        return rec

    async def _other_nodes(self) -> set[str]:
        return {rec["id"] for rec, _age in await self.store.nodes() if rec is not None} - {self.node_id}

    async def _remote(self, any_id: str, header: dict, payload: bytes = b"") -> dict:
        rec = await self._where(any_id)
        if rec is None:
            raise ApiError(404, "unknown connection", connection=any_id)
        answers, missing = await self._ask([rec["node"]], {**header, "id": rec["session"]}, payload)
        if missing:
            raise ApiError(504, "the node holding this connection did not answer", connection=any_id,
                           node=rec["node"])
        answer = answers[rec["node"]]
        if "status" in answer:
            raise ApiError(answer["status"], answer.get("error", "failed"), connection=any_id)
        return answer

    async def send_to_connection(self, any_id: str, opcode: int, payload: bytes) -> dict:
        s = self.local(any_id)
        if s is not None:
            if s.capture is not None:
                # Draining here: it joins the replay buffer; answered once it is written,
                # so the caller's next push cannot overtake it.
                kept = s.send_message(opcode, payload)
                await s.capture.flushed()
                if not kept:
                    raise ApiError(507, "the session is detached and its replay buffer is full; "
                                        "the message was not kept", connection=any_id)
                return {"delivered": 1, "buffered": 1}
            return _pushed(s, s.send_message(opcode, payload))
        for _ in range(3):
            if await self._where(any_id) is not None:
                break
            det = await self.parked.find(any_id)
            if det is None:
                break
            kept, full, _ = await self.parked.append([det["session"]], opcode, payload)
            if not kept and not full:
                continue    # it was resumed just now: look again
            if not kept:
                raise ApiError(507, "the session is detached and its replay buffer is full; "
                                    "the message was not kept", connection=any_id, session=det["session"])
            return {"delivered": 1, "buffered": 1}
        answer = await self._remote(any_id, {"op": "conn", "opcode": opcode}, payload)
        return {"delivered": answer.get("n", 0), **({"buffer_full": 1} if answer.get("buffer_full") else {})}

    async def close_connection(self, any_id: str, code: int, reason: str) -> dict:
        s = self.local(any_id)
        if s is not None:
            s.gateway_close(code, reason)
            return {"closed": True, "connection": s.id, "code": code}
        answer = await self._remote(any_id, {"op": "close", "code": code, "reason": reason})
        return {"closed": True, "connection": answer.get("connection", any_id), "code": code}

    async def join(self, any_id: str, name: str, since: int | None, epoch: str | None) -> dict:
        s = self.local(any_id)
        if s is not None:
            answer = await self._join_local(s, name, since, epoch)
            await self.flush_now()
        else:
            answer = await self._remote(any_id, {"op": "join", "chan": name, "since": since, "epoch": epoch})
        out = {"connection": answer.get("connection", any_id), "channel": name, "subscribed": True,
               "changed": answer.get("changed")}
        for k in ("replayed", "offset", "epoch"):
            if k in answer:
                out[k] = answer[k]
        return out

    async def leave(self, any_id: str, name: str) -> dict:
        s = self.local(any_id)
        if s is not None:
            changed = self.node.channels.unsubscribe(s, name)
            await self.flush_now()
            return {"connection": s.id, "channel": name, "subscribed": False, "changed": changed}
        answer = await self._remote(any_id, {"op": "leave", "chan": name})
        return {"connection": answer.get("connection", any_id), "channel": name, "subscribed": False,
                "changed": answer.get("changed")}

    async def record_of(self, any_id: str) -> dict | None:
        rec = await self._where(any_id)
        if rec is None:
            rec = await self.parked.find(any_id)   # drained, waiting for its resume
        if rec is not None:
            rec = {k: v for k, v in rec.items() if k not in ("v", "kind", "claims", "events")}
        return rec

    async def send_to_user(self, sub: str, opcode: int, payload: bytes) -> dict:
        # This node's own indexes are authoritative for its sessions; the store
        # names the other nodes that hold one.
        index = await self.store.subject_sessions(sub)
        nodes = set(index.values())
        nodes.discard(self.node_id)
        nodes.discard(DETACHED_NODE)
        parked = _parked(index)
        n = await self._sub_here(sub, opcode, payload, parked)
        header = {"op": "sub", "sub": sub, "opcode": opcode}
        if parked:
            header["skip"] = sorted(parked)
        answers, missing = await self._ask(nodes, header, payload)
        n += sum(a.get("n", 0) for a in answers.values())
        out = self._counted(n, missing)
        await self.parked.to_parked(index, out, opcode, payload, lambda: self.store.subject_sessions(sub))
        return out

    async def send_to_channel(self, name: str, opcode: int, payload: bytes, *, confirm: bool = True) -> dict:
        offset = epoch = None
        rule = channel_rule(self.node.config.channels, name)
        if rule is not None and rule.history is not None:
            offset, epoch = await self.store.history_append(name, opcode, payload, rule.history.size,
                                                            rule.history.ttl_s)
        index = await self._channel_index(name)
        nodes = set(index.values())
        nodes.discard(self.node_id)
        nodes.discard(DETACHED_NODE)
        parked = _parked(index)
        if confirm:
            n = await self._channel_here(name, opcode, payload, offset, parked)
        else:
            n = self._fan_out(name, opcode, payload, offset, parked)
        header = {"op": "chan", "chan": name, "opcode": opcode, "offset": offset}
        if parked:
            header["skip"] = sorted(parked)
        if not confirm:
            data = _pack({**header, "from": self.node_id}, payload)   # no rid: no answer wanted
            for other in nodes:
                await self.store.publish(other, data)
            return {"delivered": n}
        answers, missing = await self._ask(nodes, header, payload)
        n += sum(a.get("n", 0) for a in answers.values())
        out = self._counted(n, missing)
        await self.parked.to_parked(index, out, opcode, payload, lambda: self._channel_index(name))
        if offset is not None:
            out["offset"] = offset
            out["epoch"] = epoch
        return out

    async def _channel_index(self, name: str) -> dict[str, str]:
        """Session id -> the node of each member of channel `name`, as the store has it."""
        return {sid: m.get("node") for sid, m in (await self.store.channel_members(name)).items()}

    def publish_later(self, name: str, opcode: int, payload: bytes) -> None:
        """A channel message from inside the gateway (chat): cluster-wide, in
        the order given, without waiting. Bounded: past MAX_OUTBOX waiting
        messages (a store much slower than the room) the newest is delivered to
        this node's members only, and counted."""
        if len(self._outbox) >= MAX_OUTBOX:
            self.outbox_dropped += 1
            self.node.channels.publish(name, opcode, payload)
            if self.outbox_dropped in (1, 100, 10_000):
                event(log, "channel_outbox_full", logging.WARNING, channel=name, dropped=self.outbox_dropped)
            return
        self._outbox.append((name, opcode, payload))
        self._outbox_wake.set()

    async def outbox_loop(self) -> None:
        while True:
            await self._outbox_wake.wait()
            self._outbox_wake.clear()
            while self._outbox:
                name, opcode, payload = self._outbox.popleft()
                try:
                    await self.send_to_channel(name, opcode, payload, confirm=False)
                except StoreUnavailable:
                    # The other nodes cannot be reached now; this node's members still hear it.
                    self.node.channels.publish(name, opcode, payload)
                except Exception:
                    log.exception("channel publish failed", extra={"fields": {"event": "channel_publish_error"}})

    @staticmethod
    def _counted(n: int, missing: list[str]) -> dict:
        out = {"delivered": n}
        if missing:
            out["unconfirmed_nodes"] = missing
        return out

    async def presence(self, name: str) -> dict:
        members = await self.store.channel_members(name)
        # Members on this node come from its own indexes (current to the
        # moment); the store answers for the other nodes.
        sessions = [{"session": s.session_id, "connection": s.id, "sub": s.sub, "node": self.node_id}
                    for s in self.node.channels.members.get(name) or ()]
        sessions += [{"session": sid, "connection": m.get("conn"), "sub": m.get("sub"), "node": m.get("node")}
                     for sid, m in sorted(members.items(), key=lambda kv: (kv[1].get("node") or "", kv[0]))
                     if m.get("node") != self.node_id]
        subjects = sorted({m["sub"] for m in sessions if m["sub"] is not None})
        return {"channel": name, "count": len(sessions), "sessions": sessions, "subjects": subjects}

    async def history(self, name: str, since: int, epoch: str | None) -> dict:
        page = await self._history(name, since, epoch)
        return {"channel": name, "epoch": page.epoch, "offset": page.offset,
                "messages": [{"offset": e.offset, "type": "text" if e.opcode == frames.OP_TEXT else "binary",
                              "data": e.payload.decode("utf-8") if e.opcode == frames.OP_TEXT
                              else e.payload.hex()} for e in page.entries]}

    # ------------------------------------------------------------ debug traces
    def trace_here(self, what: str, any_id: str, max_frames: int | None = None,
                   max_s: float | None = None) -> dict | None:
        """A trace call ("start", "read", "stop") for a session or trace on this
        node; None when neither is here. See docs/debug-trace.md."""
        s = self.local(any_id)
        if what == "start":
            if s is None:
                return None
            if s.state is not State.OPEN:
                raise ApiError(409, f"connection is {s.state.name.lower()}: only an open session can be traced",
                               connection=s.id)
            t = self.traces.begin(s.id, s.session_id, max_frames, max_s)
            traced.start(s, t)
            return t.started_json()
        t = self.traces.find(any_id)
        if t is None:
            if s is None:
                return None
            raise ApiError(404, "no trace of this connection (POST to /trace starts one)", connection=s.id)
        if what == "stop" and t.ended is None:
            s = self.local(t.conn)
            if s is not None and s.trace is t:
                traced.stop(s, "stopped")
            else:
                t.end("stopped")
                t.flush()
        return t.as_json()

    async def trace(self, what: str, any_id: str, max_frames: int | None = None, max_s: float | None = None) -> dict:
        """A trace call for the whole cluster: here, or on the node that holds the
        session (over the bus, 504 if it does not answer); a trace that outlived its
        session on another node is asked of every node."""
        answer = self.trace_here(what, any_id, max_frames, max_s)
        if answer is not None:
            return answer
        header = {"op": "trace", "what": what, "max_frames": max_frames, "max_s": max_s}
        if await self._where(any_id) is not None:
            return _reply_body(await self._remote(any_id, header))
        if what != "start":
            answers, missing = await self._ask(await self._other_nodes(), {**header, "id": any_id})
            for a in answers.values():
                if "status" not in a:
                    return _reply_body(a)
            if missing:
                raise ApiError(404, "no trace found on the nodes that answered", connection=any_id,
                               unconfirmed_nodes=missing)
        raise ApiError(404, "unknown connection", connection=any_id)

    async def drain_endpoint(self, backend: str, url: str, draining: bool, ttl_s: float) -> dict:
        """An endpoint starts (or stops) draining, cluster-wide: into the store first
        (so a node that misses the bus learns it at its next heartbeat), then this
        node and every other one move their sessions off it at once."""
        if draining:
            await self.store.set_endpoint_draining(backend, url, ttl_s)
        else:
            await self.store.clear_endpoint_draining(backend, url)
        n = reattach.endpoint_draining(self.node, backend, url, draining)
        answers, missing = await self._ask(await self._other_nodes(), {
            "op": "ep_drain", "backend": backend, "endpoint": url, "draining": draining})
        out = {"backend": backend, "endpoint": url, "draining": draining,
               "moving": n + sum(a.get("n", 0) for a in answers.values())}
        if missing:
            out["unconfirmed_nodes"] = missing
        return out

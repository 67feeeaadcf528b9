"""What a node keeps outside itself, behind one small interface.

Two implementations: `memory.MemoryStore` (the default, no `redis:` key; one
process, or several in-process nodes sharing one instance in tests) and
`redis.RedisStore` (a fleet of nodes sharing one Redis or Sentinel set).

Everything is batch-shaped, because the node talks to the store on lifecycle
events and timers only, never per relayed message:

- `write(ops)` applies a batch of session changes in one round trip
  (a Redis pipeline); the node's writer coalesces opens, closes, joins and
  leaves for a few milliseconds and sends them together.
- `heartbeat(...)` writes the node record and, when asked, refreshes the TTLs
  of all of the node's session records and index keys in the same pipeline.

Records are dicts encoded by `gateway.records` (versioned JSON). Every
method raises `errors.StoreUnavailable` when the store cannot be reached;
callers decide what that means (the API answers 503, the writer marks the
node for a resync when the store returns).

Key layout of the Redis store (P = redis.key_prefix), documented for
operators in docs/redis.md:

    P node:{id}             string  node record (JSON), EX node_ttl_s
    P nodes                 zset    node id -> unix time of its last heartbeat
    P node:{id}:sessions    set     session ids the node owns
    P session:{sid}         string  session record (JSON), EX session_ttl_s
    P conn:{connection}     string  session id of that connection id, EX session_ttl_s
    P sub:{sub}             hash    session id -> node id
    P chan:{name}           hash    session id -> member JSON {node, conn, sub}
    P hist:{name}           stream  channel history, ids "<offset>-0", MAXLEN size
    P hist:{name}:meta      hash    {epoch, offset}
    P reap:{id}             string  claim on a dead node's cleanup, NX EX (claim("reap:{id}"))
    P bus:{id}              pub/sub messages routed to that node
    P det:{sid}             hash    a drained session waiting for its resume (detached.py)
    P replay:{sid}          stream  its replay buffer
    P detached              zset    session id -> end of its resume window (ms)
    P ep:{backend}          hash    draining endpoint URL -> unix time its drain ends (reattach.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

if TYPE_CHECKING:
    from .detached import DetachedSessions


@dataclass(slots=True)
class Put:
    """Create or replace a session record; index it by node, subject and channels."""
    record: dict          # gateway.records session record: session, connection, node, sub, channels, ...


@dataclass(slots=True)
class Delete:
    """Remove a session record and every index entry it has (node, subject, channels)."""
    session: str
    node: str
    sub: str | None = None
    channels: tuple[str, ...] = ()


@dataclass(slots=True)
class Join:
    session: str
    channel: str
    member: dict          # {node, conn, sub}


@dataclass(slots=True)
class Leave:
    session: str
    channel: str


Op = Put | Delete | Join | Leave


@dataclass(slots=True)
class HistoryEntry:
    offset: int
    opcode: int
    payload: bytes


@dataclass(slots=True)
class HistoryPage:
    epoch: str
    offset: int                       # the channel's latest offset
    entries: list[HistoryEntry] = field(default_factory=list)


# handler(data) for messages published to this node's bus.
BusHandler = Callable[[bytes], Awaitable[None] | None]


class Store(Protocol):
    detached: "DetachedSessions"   # drained sessions waiting for their resume (detached.py)

    # ---- lifecycle
    async def start(self) -> None: ...
    async def close(self) -> None: ...

    @property
    def outlives_process(self) -> bool:
        """True when what is written survives this process (Redis), so a drained
        session can be resumed on another node."""

    @property
    def available(self) -> bool:
        """False while the store is known to be unreachable (Redis down)."""

    # ---- this node
    async def heartbeat(self, node: dict, ttl_s: float, *, refresh: tuple[list[str], float] | None = None) -> None:
        """Write the node record (EX ttl_s) and its heartbeat time. With `refresh`
        = (session ids, session_ttl_s), also re-EXPIRE those session records, the
        node's session set and the connection/subject/channel index keys they
        appear in, all in the same round trip. The ids are all of the node's
        sessions (the Redis store forgets what it knew about any other)."""

    async def write(self, ops: list[Op]) -> None:
        """Apply a batch of session changes in one round trip."""

    async def resync(self, node_id: str, records: list[dict]) -> None:
        """After an outage: make the store hold exactly `records` for this node
        (write them all, delete what the node no longer has)."""

    # ---- reading
    async def get_session(self, session_id: str) -> dict | None: ...
    async def session_of_connection(self, connection_id: str) -> str | None:
        """The session id a connection id belongs to (the API takes either)."""
    async def subject_sessions(self, sub: str) -> dict[str, str]:
        """session id -> node id."""
    async def channel_members(self, channel: str) -> dict[str, dict]:
        """session id -> member {node, conn, sub}."""
    async def nodes(self) -> list[tuple[dict | None, float]]:
        """(node record or None if its key expired, seconds since its last heartbeat) for every known node."""

    # ---- dead nodes
    async def expired_nodes(self, older_than_s: float) -> list[str]:
        """Ids whose last heartbeat is older than `older_than_s` seconds."""
    async def claim(self, name: str, ttl_s: float) -> bool:
        """SET NX on key P{name}: True for exactly one caller until the claim expires."""
    async def node_sessions(self, node_id: str) -> list[str]: ...
    async def node_session_count(self, node_id: str) -> int:
        """How many session ids the store holds for that node (its self-check each heartbeat)."""
    async def take_session(self, session_id: str) -> dict | None:
        """Atomically read and delete a session record (GETDEL): one caller
        gets it, every other gets None. Its index entries are removed too."""
    async def forget_node(self, node_id: str) -> None:
        """Remove the node record, its session set and its heartbeat entry."""

    # ---- cross-node delivery
    async def publish(self, node_id: str, data: bytes) -> int:
        """Send `data` to that node's bus; returns how many listeners took it."""
    async def listen(self, node_id: str, handler: BusHandler) -> None:
        """Deliver this node's bus to `handler` until close(); survives reconnects."""
    async def unlisten(self, node_id: str) -> None:
        """Stop delivering that node's bus (nodes sharing one MemoryStore)."""

    # ---- channel history
    async def history_append(self, channel: str, opcode: int, payload: bytes, size: int,
                             ttl_s: float) -> tuple[int, str]:
        """Append; returns (offset, epoch). Offsets start at 1 and grow by 1;
        the epoch is new whenever the history was lost (flushed, failed over,
        expired)."""
    async def history_since(self, channel: str, since: int, epoch: str | None, limit: int) -> HistoryPage:
        """Entries with offset > since, oldest first, at most `limit`.
        Raises errors.HistoryEpochChanged (409) when `epoch` is not the
        current one, errors.HistoryTrimmed (410) when entries after `since`
        are no longer held. `since=0, epoch=None` reads what is held."""

    # ---- draining endpoints (reattach): every node stops choosing them
    async def set_endpoint_draining(self, backend: str, url: str, ttl_s: float) -> None:
        """Mark `url` of `backend` draining for the next `ttl_s` seconds (again: from now on)."""
    async def clear_endpoint_draining(self, backend: str, url: str) -> None:
        """`url` takes new sessions again."""
    async def draining_endpoints(self, backend: str) -> set[str]:
        """The endpoint URLs of `backend` whose drain has not ended."""

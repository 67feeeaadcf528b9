"""DetachedSessions on Redis (see detached.py for what and why).

Every step is one Lua script, so the checks and the change they guard are
atomic: a take cannot race another take, an append cannot land after a
finish, and a count can never disagree with the stream it counts.

Each detached record keeps the run id of the Redis that took it (INFO
server). Replication is asynchronous: after a failover (or a restart that
replayed an older file) the record and its buffer may both be there, in
step with each other, and still be missing the last appends. A take on a
Redis with another run id therefore answers LOST, never a replay that
looks whole and is not.
"""

from __future__ import annotations

import time

import orjson

from ..records import encode
from . import detached as d
from .detached import DETACHED_NODE, TOMBSTONE_S, Entry, Parked
from .memory import member_of

# KEYS: det, replay, detached zset, session, node set, conn (or ""), sub (or "").
# ARGV: rec, th, sub, until_ms, ttl_ms, sid, member, channel keys...
_PARK = """
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
redis.call('DEL', KEYS[4], KEYS[1], KEYS[2])
redis.call('SREM', KEYS[5], ARGV[6])
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'th', ARGV[2], 'sub', ARGV[3], 'state', 'detached',
           'until', ARGV[4], 'lease', '', 'lease_until', 0, 'n', 0, 'bytes', 0, 'over', 0, 'sealed', 0,
           'run', run)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
if KEYS[6] ~= '' then redis.call('SET', KEYS[6], ARGV[6], 'PX', ARGV[5]) end
if KEYS[7] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[6], '')
  redis.call('PEXPIRE', KEYS[7], ARGV[5], 'GT')
end
for i = 8, #ARGV do
  redis.call('HSET', ARGV[i], ARGV[6], ARGV[7])
  redis.call('PEXPIRE', ARGV[i], ARGV[5], 'GT')
end
return 1
"""

# KEYS: det, replay. ARGV: max_n, max_bytes, seal (1/0), then opcode, payload pairs. The
# stream lives as long as its record.
_APPEND = """
local h = redis.call('HMGET', KEYS[1], 'state', 'n', 'bytes', 'over')
if h[1] ~= 'detached' and h[1] ~= 'resuming' then return {0, 'gone'} end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'sealed', 1) end
if h[4] == '1' then return {0, 'full'} end
local n, bytes = tonumber(h[2]), tonumber(h[3])
local added = 0
for i = 4, #ARGV, 2 do
  local size = string.len(ARGV[i + 1])
  if n + 1 > tonumber(ARGV[1]) or bytes + size > tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'n', n, 'bytes', bytes, 'over', 1)
    return {added, 'full'}
  end
  n = n + 1
  bytes = bytes + size
  redis.call('XADD', KEYS[2], n .. '-1', 'o', ARGV[i], 'p', ARGV[i + 1])
  added = added + 1
end
redis.call('HSET', KEYS[1], 'n', n, 'bytes', bytes)
redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1]))
return {added, 'ok'}
"""

# KEYS: det, replay. ARGV: th, sub, node, lease_ms, now_ms.
_TAKE = """
local h = redis.call('HMGET', KEYS[1], 'th', 'sub', 'state', 'until', 'lease', 'lease_until', 'n', 'over',
                     'rec', 'run', 'sealed')
if not h[1] then return {'unknown'} end
if h[1] ~= ARGV[1] then return {'forged'} end
if h[3] == 'used' then return {'used'} end
local now = tonumber(ARGV[5])
if h[3] == 'expired' or tonumber(h[4]) <= now then return {'expired'} end
if h[2] ~= '*' and h[2] ~= ARGV[2] then return {'subject'} end
if h[3] == 'resuming' and h[5] ~= ARGV[3] and tonumber(h[6]) > now then
  return {'leased', tostring(tonumber(h[6]) - now)}
end
if h[8] == '1' then return {'overflowed'} end
if h[11] ~= '1' then return {'pending'} end
if h[10] ~= string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') then return {'lost'} end
if tonumber(h[7]) ~= redis.call('XLEN', KEYS[2]) then return {'lost'} end
redis.call('HSET', KEYS[1], 'state', 'resuming', 'lease', ARGV[3], 'lease_until', now + tonumber(ARGV[4]))
return {'ok', h[9]}
"""

# KEYS: det, replay, detached zset. ARGV: node, after id ('-' for all), sid, ttl_ms (tombstone), prefix,
# then, when the resuming node gives its live record: the record, ttl_ms (session TTL), its connection
# id (or ''), its subject (or ''), its channel member entry, its channels...
# The old connection's id stops naming the session: the resumed one has its own. With a live record
# the session's indexes name the new node in the same step as the buffer is taken: a publish that
# comes after it finds the session there, never a parked buffer that is gone.
_FINISH = """
local h = redis.call('HMGET', KEYS[1], 'state', 'lease', 'rec')
if h[1] ~= 'resuming' or h[2] ~= ARGV[1] then return false end
local p = ARGV[5]
if h[3] and h[3] ~= '' then
  local rec = cjson.decode(h[3])
  if type(rec['connection']) == 'string' then redis.call('DEL', p .. 'conn:' .. rec['connection']) end
  if ARGV[6] and type(rec['channels']) == 'table' then
    for _, c in ipairs(rec['channels']) do redis.call('HDEL', p .. 'chan:' .. c, ARGV[3]) end
  end
end
if ARGV[6] then
  local sid, px = ARGV[3], ARGV[7]
  redis.call('SET', p .. 'session:' .. sid, ARGV[6], 'PX', px)
  if ARGV[8] ~= '' then redis.call('SET', p .. 'conn:' .. ARGV[8], sid, 'PX', px) end
  local set = p .. 'node:' .. ARGV[1] .. ':sessions'
  redis.call('SADD', set, sid)
  redis.call('PEXPIRE', set, px)
  if ARGV[9] ~= '' then
    redis.call('HSET', p .. 'sub:' .. ARGV[9], sid, ARGV[1])
    redis.call('PEXPIRE', p .. 'sub:' .. ARGV[9], px)
  end
  for i = 11, #ARGV do
    redis.call('HSET', p .. 'chan:' .. ARGV[i], sid, ARGV[10])
    redis.call('PEXPIRE', p .. 'chan:' .. ARGV[i], px)
  end
end
local rest
if ARGV[2] == '-' then
  rest = redis.call('XRANGE', KEYS[2], '-', '+')
else
  rest = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2], '+')
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'used', 'rec', '')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[3])
return rest
"""

# KEYS: det. ARGV: node.
_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'lease')
if h[1] == 'resuming' and h[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'detached', 'lease', '', 'lease_until', 0)
end
return 1
"""

# KEYS: det, replay, detached zset. ARGV: sid, now_ms, prefix.
_EXPIRE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'until', 'lease_until', 'rec')
if not h[1] or h[1] == 'used' or h[1] == 'expired' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return false
end
local now = tonumber(ARGV[2])
if tonumber(h[2]) > now or (h[1] == 'resuming' and tonumber(h[3]) > now) then return false end
local rec = cjson.decode(h[4])
if type(rec['connection']) == 'string' then redis.call('DEL', ARGV[3] .. 'conn:' .. rec['connection']) end
if type(rec['sub']) == 'string' then redis.call('HDEL', ARGV[3] .. 'sub:' .. rec['sub'], ARGV[1]) end
if type(rec['channels']) == 'table' then
  for _, c in ipairs(rec['channels']) do redis.call('HDEL', ARGV[3] .. 'chan:' .. c, ARGV[1]) end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'expired', 'rec', '')
redis.call('ZREM', KEYS[3], ARGV[1])
return h[4]
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _entries(raw) -> list[Entry]:
    out = []
    for eid, fields in raw or ():
        if isinstance(fields, list):   # a script's XRANGE: a flat field list
            fields = {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}
        eid = eid.decode() if isinstance(eid, bytes) else str(eid)
        out.append((eid, int(fields[b"o"]), bytes(fields[b"p"])))
    return out


class RedisDetached:
    def __init__(self, store):
        self.s = store
        self._scripts = {}

    def _script(self, name: str, source: str):
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.s._redis.register_script(source)
        return script

    def _keys(self, sid: str) -> list[str]:
        k = self.s._k
        return [k(f"det:{sid}"), k(f"replay:{sid}"), k("detached")]

    async def park(self, items: list[Parked]) -> None:
        if not items:
            return
        s = self.s
        k = s._k
        script = self._script("park", _PARK)
        p = s._redis.pipeline(transaction=False)
        for item in items:
            rec = item.record
            sid = rec["session"]
            s._where.pop(sid, None)        # no longer this node's to refresh
            s._retired.pop(sid, None)
            ttl_ms = int((item.window_s + TOMBSTONE_S) * 1000)
            conn, sub = rec.get("connection"), rec.get("sub")
            keys = self._keys(sid) + [k(f"session:{sid}"), k(f"node:{rec['node']}:sessions"),
                                      k(f"conn:{conn}") if conn else "", k(f"sub:{sub}") if sub is not None else ""]
            args = [orjson.dumps(rec), item.token_hash, d.subject_field(item), _now_ms() + int(item.window_s * 1000), ttl_ms,
                    sid, orjson.dumps(d.member(rec))] + [k(f"chan:{c}") for c in rec.get("channels") or ()]
            await script(keys=keys, args=args, client=p)
        async with s._guard("park"):
            await p.execute()

    async def append(self, sid, entries, max_messages, max_bytes, seal=False):
        if not entries and not seal:
            return 0, "ok"
        args = [max_messages, max_bytes, 1 if seal else 0]
        for opcode, payload in entries:
            args += [opcode, bytes(payload)]
        async with self.s._guard("replay_append"):
            added, status = await self._script("append", _APPEND)(keys=self._keys(sid)[:2], args=args)
        return int(added), status.decode() if isinstance(status, bytes) else status

    async def take(self, sid, token_hash, sub, node, lease_s):
        async with self.s._guard("resume_take"):
            out = await self._script("take", _TAKE)(
                keys=self._keys(sid)[:2], args=[token_hash, sub or "", node, int(lease_s * 1000), _now_ms()])
        status = out[0].decode()
        if status == d.OK:
            return d.OK, orjson.loads(out[1])
        if status == d.LEASED:
            return d.LEASED, {"retry_after_s": int(out[1]) / 1000}
        return status, None

    async def read(self, sid):
        async with self.s._guard("replay_read"):
            return _entries(await self.s._redis.xrange(self.s._k(f"replay:{sid}"), "-", "+"))

    async def finish(self, sid, node, after, live=None):
        s = self.s
        args = [node, after or "-", sid, int(TOMBSTONE_S * 1000), s._k("")]
        if live is not None:
            channels = sorted(live.get("channels") or ())
            args += [encode("session", live), max(1, int(s.session_ttl_s * 1000)), live.get("connection") or "",
                     live.get("sub") if live.get("sub") is not None else "", orjson.dumps(member_of(live))] + channels
        async with s._guard("resume_finish"):
            rest = await self._script("finish", _FINISH)(keys=self._keys(sid), args=args)
        if rest is None:
            return None
        if live is not None:
            s.remember(live)
        return _entries(rest)

    async def release(self, sid, node):
        async with self.s._guard("resume_release"):
            await self._script("release", _RELEASE)(keys=self._keys(sid)[:1], args=[node])

    async def get(self, sid):
        async with self.s._guard("detached_get"):
            h = await self.s._redis.hmget(self.s._k(f"det:{sid}"), "state", "rec", "n", "over")
        state = h[0].decode() if h[0] is not None else None
        if state not in ("detached", "resuming"):
            return None
        return {**orjson.loads(h[1]), "state": state, "buffered": int(h[2]), "overflowed": h[3] == b"1"}

    async def due(self, limit):
        async with self.s._guard("detached_due"):
            ids = await self.s._redis.zrangebyscore(self.s._k("detached"), "-inf", _now_ms(), start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    async def expire(self, sid):
        async with self.s._guard("detached_expire"):
            raw = await self._script("expire", _EXPIRE)(keys=self._keys(sid), args=[sid, _now_ms(), self.s.key_prefix])
        return orjson.loads(raw) if raw else None


__all__ = ["RedisDetached", "DETACHED_NODE"]

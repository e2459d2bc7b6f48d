"""The Lua scripts of the Redis backends, and :class:`Script`, which sends one.

Every script of a channel touches only that channel's keys (one hash tag, see ``_keys``), so that it runs on
one Redis Cluster slot. The single-Redis scripts are the source; the Cluster's are derived from them
(:func:`cluster_script`), and so are the Sentinel backend's (:func:`node_script`), so that they never drift
apart. Presence has scripts of its own
(``PRESENCE_*``), which it runs through redis-py's ``register_script``.
"""

from __future__ import annotations

import hashlib
from typing import Final

from .._redis_pipe import array_head, bulks, pack, pack_after

__all__ = [
    "CLUSTER_SCRIPTS",
    "NODE_SCRIPTS",
    "PRESENCE_JOIN",
    "PRESENCE_LEAVE",
    "PRESENCE_REFRESH",
    "PRESENCE_SNAPSHOT",
    "SCRIPTS",
    "Script",
    "cluster_script",
    "node_script",
]

# -- streams: publish, position, history ------------------------------------------------------------------
#
# Every script starts by making sure the channel has an epoch. A channel that lost its meta hash (expired,
# evicted, Redis restarted without persistence) starts a new epoch at seq 0, and its old history goes with
# it: a stream must never hold entries of two epochs. Creating the epoch on reads too means a client that
# connects before the first publish keeps its epoch when that publish happens.
#
# Every key lives at least its ttl after the channel's last publish (the meta hash: also after its last
# read), without a refresh each time: a key whose PTTL is at least its ttl is left alone, and a refresh
# gives it an eighth more than its ttl, so a busy channel refreshes once per eighth of its ttl. A refresh
# only ever lengthens a key's life, so a process with a shorter ttl never cuts short the keys of one with a
# longer, and a key that lost its ttl or was recreated without one (a new stream, a new epoch) gets it at
# once.
#
# These scripts run on every publish and read: where Redis takes text, they pass text, because formatting
# a Lua number costs about as much as a redis.call (seq is formatted once, for all its uses).

_ENSURE_EPOCH = """
local function ensure_epoch(meta, stream, candidate)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then
    return epoch
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', candidate, 'seq', '0')
  return candidate
end
-- Make key live at least ttl ms more: leave it if it does, else give it ttl + ttl/8.
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl + math.floor(ttl / 8))
  end
end
-- Keep a channel that is read alive, and return its seq. A channel nobody published to lives only
-- unpublished_ms after its last read, so that reading random channel names costs little for long.
local function touch(meta, meta_ms, unpublished_ms)
  local seq = tonumber(redis.call('HGET', meta, 'seq'))
  if seq == 0 then
    redis.call('PEXPIRE', meta, unpublished_ms)
  elseif meta_ms > 0 then
    keep(meta, meta_ms)
  end
  return seq
end
-- Redis's clock in ms, as text: cut from TIME's text (seconds, microseconds), so that no number is formatted.
local function clock()
  local now = redis.call('TIME')
  return now[1] .. string.sub('00000' .. now[2], -6, -4)
end
"""

# KEYS: meta, stream[, idempotency key]
# ARGV: candidate epoch, payload head (the envelope text up to the seq), PUB/SUB channel,
#       history size (0: no history), history ttl ms (0: none), meta ttl ms (0: none), idempotency ttl ms,
#       headers (encode_headers' JSON; '' for none)
# Returns {seq, epoch, duplicate (0/1), stored data of a duplicate or false}.
# The message PUBLISHed is '<seq> <epoch> <data>', or with headers 'h <seq> <epoch> <headers>\n<data>' (the
# headers' JSON holds no line break); a stream entry has the fields d (data), t (ms) and, with headers, h.
# Without headers, both are exactly what versions before headers wrote and read.
_PUBLISH = (
    _ENSURE_EPOCH
    + """
local meta, stream = KEYS[1], KEYS[2]
local size, history_ms, meta_ms = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local epoch = ensure_epoch(meta, stream, ARGV[1])
if #KEYS == 3 then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, ':', 1, true)
    -- A key recorded in another epoch refers to a stream that no longer exists: publish again.
    if sep and string.sub(seen, 1, sep - 1) == epoch then
      local seq = string.sub(seen, sep + 1)
      local found = redis.call('XRANGE', stream, seq .. '-0', seq .. '-0')
      local data = false
      if found[1] then
        data = found[1][2][2]
      end
      return {tonumber(seq), epoch, 1, data}
    end
  end
end
local seq = redis.call('HINCRBY', meta, 'seq', '1')
local text = string.format('%d', seq)
local data = ARGV[2] .. text .. '}'
local headers = ARGV[8]
if size ~= '0' then
  local id = text .. '-0'
  local ms = clock()
  -- (Written out rather than in a closure, which costs more than the lines save.)
  local added
  if headers == '' then
    added = redis.pcall('XADD', stream, 'MAXLEN', '~', size, id, 'd', data, 't', ms)
  else
    added = redis.pcall('XADD', stream, 'MAXLEN', '~', size, id, 'd', data, 't', ms, 'h', headers)
  end
  if type(added) == 'table' and added.err then
    -- The stream is ahead of the counter (a key was restored or edited by hand): drop the stale history
    -- rather than fail the publish; readers see incomplete history and resync.
    redis.call('DEL', stream)
    if headers == '' then
      redis.call('XADD', stream, 'MAXLEN', '~', size, id, 'd', data, 't', ms)
    else
      redis.call('XADD', stream, 'MAXLEN', '~', size, id, 'd', data, 't', ms, 'h', headers)
    end
  end
  local stream_ms = history_ms
  if stream_ms == 0 then
    stream_ms = meta_ms
  end
  if stream_ms > 0 then
    keep(stream, stream_ms)
  end
end
if meta_ms > 0 then
  keep(meta, meta_ms)
else
  redis.call('PERSIST', meta)  -- a read may have created it with the shorter ttl of unpublished channels
end
if #KEYS == 3 then
  redis.call('SET', KEYS[3], epoch .. ':' .. text, 'PX', ARGV[7])
end
if headers == '' then
  redis.call('PUBLISH', ARGV[3], text .. ' ' .. epoch .. ' ' .. data)
else
  redis.call('PUBLISH', ARGV[3], 'h ' .. text .. ' ' .. epoch .. ' ' .. headers .. '\\n' .. data)
end
return {seq, epoch, 0, false}
"""
)

# KEYS: meta, stream
# ARGV: candidate epoch, meta ttl ms (0: none), unpublished ttl ms
# Returns {epoch, seq}.
_POSITION = (
    _ENSURE_EPOCH
    + """
local epoch = ensure_epoch(KEYS[1], KEYS[2], ARGV[1])
local seq = touch(KEYS[1], tonumber(ARGV[2]), ARGV[3])
return {epoch, seq}
"""
)

# KEYS: meta, stream
# ARGV: candidate epoch, meta ttl ms (0: none), unpublished ttl ms, since, limit, history ttl ms (0: none)
# Returns {epoch, seq, {id, data, headers, id, data, headers, ...}}: the entries after since, at most
# limit, none expired; headers is '' for an entry without.
_HISTORY = (
    _ENSURE_EPOCH
    + """
local meta, stream = KEYS[1], KEYS[2]
local epoch = ensure_epoch(meta, stream, ARGV[1])
local top = touch(meta, tonumber(ARGV[2]), ARGV[3])
local since, limit, history_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
if top > since and limit > 0 then
  if since < 0 then
    since = 0
  end
  local entries = redis.call('XRANGE', stream, (since + 1) .. '-0', '+', 'COUNT', limit)
  local horizon = -1
  if history_ms > 0 then
    horizon = tonumber(clock()) - history_ms
  end
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    local data, stamp, headers = nil, 0, ''
    for i = 1, #fields, 2 do
      if fields[i] == 'd' then
        data = fields[i + 1]
      elseif fields[i] == 't' then
        stamp = tonumber(fields[i + 1])
      elseif fields[i] == 'h' then
        headers = fields[i + 1]
      end
    end
    if data and stamp >= horizon then
      out[#out + 1] = entry[1]
      out[#out + 1] = data
      out[#out + 1] = headers
    end
  end
end
return {epoch, top, out}
"""
)


class Script:
    """A Lua script, ready to be sent: ``EVALSHA`` while Redis has it cached, ``EVAL`` when it has not."""

    __slots__ = ("_evalsha_heads", "body", "eval_head", "evalsha_head", "load")

    def __init__(self, body: str) -> None:
        self.body = body.encode()
        sha = hashlib.sha1(self.body).hexdigest().encode()  # Redis names scripts by SHA-1
        self.evalsha_head = (b"EVALSHA", sha)
        self.eval_head = (b"EVAL", self.body)
        self.load = pack(b"SCRIPT", b"LOAD", self.body)
        # "EVALSHA <sha> <number of keys>" packed once per number of keys (the scripts take up to 3).
        self._evalsha_heads = [bulks(*self.evalsha_head, b"%d" % n) for n in range(4)]

    def evalsha(self, keys: list[bytes], args: list[bytes], *, packed: bytes | None = None) -> bytes:
        """Return ``EVALSHA`` of the script with ``keys`` and ``args``, packed.

        ``packed``, if given, is what :func:`bulks` makes of ``keys`` and ``args`` (the caller built it from
        parts it keeps packed, such as a channel's key names); it is used as it is.
        """
        count = len(keys)
        if count < 4:
            if packed is not None:
                return b"".join((array_head(3 + count + len(args)), self._evalsha_heads[count], packed))
            return pack_after(self._evalsha_heads[count], 3 + count + len(args), keys, args)
        return pack(*self.evalsha_head, b"%d" % count, *keys, *args)

    def eval(self, keys: list[bytes], args: list[bytes]) -> bytes:
        return pack(*self.eval_head, b"%d" % len(keys), *keys, *args)


#: The scripts of the single-Redis backend, by name.
SCRIPTS: Final = {"publish": Script(_PUBLISH), "position": Script(_POSITION), "history": Script(_HISTORY)}


# -- Redis Cluster: the same scripts, with the epoch tied to the primary that wrote it, and SPUBLISH ------


def node_script(body: str) -> str:
    """Return ``body`` with ``ensure_epoch`` checking the writer's node ID (the last ARGV).

    For every backend whose server can change under a channel with the last writes lost: a Cluster's
    failover or slot migration, a Sentinel failover.
    """
    old_check = """  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then
    return epoch
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', candidate, 'seq', '0')
  return candidate"""
    new_check = """  local found = redis.call('HMGET', meta, 'epoch', 'node')
  local epoch = found[1]
  if epoch and found[2] == ARGV[#ARGV] then
    return epoch
  end
  -- A channel last written by another primary (a failover, which may have lost its last writes, or a slot
  -- migration): a new epoch, so that no client takes a seq it saw on the old primary for a new event.
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', candidate, 'seq', '0', 'node', ARGV[#ARGV])
  return candidate"""
    assert body.count(old_check) == 1
    return body.replace(old_check, new_check)


def cluster_script(body: str) -> str:
    """Return ``body`` with ``ensure_epoch`` checking the writer's node ID (the last ARGV) and SPUBLISH."""
    body = node_script(body)
    if "redis.call('PUBLISH'" in body:
        body = body.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
    return body


#: The scripts of the Cluster backend, by name: each takes the node ID of its primary as its last ARGV.
CLUSTER_SCRIPTS: Final = {
    "publish": Script(cluster_script(_PUBLISH)),
    "position": Script(cluster_script(_POSITION)),
    "history": Script(cluster_script(_HISTORY)),
}

#: The scripts of the Sentinel backend, by name: each takes the replication ID of its master as its last ARGV.
NODE_SCRIPTS: Final = {
    "publish": Script(node_script(_PUBLISH)),
    "position": Script(node_script(_POSITION)),
    "history": Script(node_script(_HISTORY)),
}


# -- presence ---------------------------------------------------------------------------------------------
#
# See _presence for what the scripts keep and why; the keys are in _keys.

_PRESENCE_COMMON = """
local function now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
-- Lua numbers are doubles: '%.0f' prints a version (< 2^53) exactly, where '..' would round it.
local function fmt(n)
  return string.format('%.0f', n)
end
local function next_version(version)
  if redis.call('EXISTS', version) == 0 then
    local now = redis.call('TIME')
    redis.call('SET', version, fmt(tonumber(now[1]) * 1000000 + tonumber(now[2])))
  end
  return redis.call('INCR', version)
end
-- Remove the members of every process past its deadline, publishing their leaves.
local function reap(members, order, procs, version, now, pubsub)
  local dead = redis.call('ZRANGEBYSCORE', procs, '-inf', now)
  if #dead == 0 then
    return
  end
  local gone = {}
  for _, proc in ipairs(dead) do
    gone[proc] = true
    redis.call('ZREM', procs, proc)
  end
  local all = redis.call('HGETALL', members)
  for i = 1, #all, 2 do
    local value = all[i + 1]
    local sep = string.find(value, ' ', 1, true)
    if sep and gone[string.sub(value, 1, sep - 1)] then
      redis.call('HDEL', members, all[i])
      redis.call('ZREM', order, all[i])
      local v = next_version(version)
      redis.call('PUBLISH', pubsub, 'p ' .. fmt(v) .. ' l ' .. string.sub(value, sep + 1))
    end
  end
end
-- Make the keys live at least ttl ms more (never shorten what a process with a longer heartbeat set).
local function keep(keys, ttl)
  for _, key in ipairs(keys) do
    if redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
-- The first limit members in join order, as "<process> <member JSON>".
local function first(members, order, limit)
  local out = {}
  if limit <= 0 then
    return out
  end
  local ids = redis.call('ZRANGE', order, 0, limit - 1)
  for _, id in ipairs(ids) do
    local value = redis.call('HGET', members, id)
    if value then
      out[#out + 1] = value
    end
  end
  return out
end
local function current(version)
  local v = redis.call('GET', version)
  if v then
    return tonumber(v)
  end
  return 0
end
"""

# KEYS: members, order, procs, version
# ARGV: process, client, member JSON, deadline ms from now, key ttl ms, limit, pubsub, notify (0/1)
# Returns {count, version, {"<process> <json>", ...}}.
PRESENCE_JOIN = (
    _PRESENCE_COMMON
    + """
local members, order, procs, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = now_ms()
reap(members, order, procs, version, now, ARGV[7])
redis.call('ZADD', procs, now + tonumber(ARGV[4]), ARGV[1])
local v = next_version(version)
redis.call('HSET', members, ARGV[2], ARGV[1] .. ' ' .. ARGV[3])
redis.call('ZADD', order, 'NX', v, ARGV[2])
keep(KEYS, tonumber(ARGV[5]))
if ARGV[8] == '1' then
  redis.call('PUBLISH', ARGV[7], 'p ' .. fmt(v) .. ' j ' .. ARGV[3])
end
return {redis.call('HLEN', members), v, first(members, order, tonumber(ARGV[6]))}
"""
)

# KEYS: members, order, procs, version
# ARGV: process, client, pubsub, notify (0/1), last (1: the process has no other member here)
# Returns 1 if the member left, 0 if it was not there.
PRESENCE_LEAVE = (
    _PRESENCE_COMMON
    + """
local members, order, procs, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if ARGV[5] == '1' then
  -- Nothing left to keep alive: no later reap has to look for this process's members.
  redis.call('ZREM', procs, ARGV[1])
end
local value = redis.call('HGET', members, ARGV[2])
if not value then
  return 0
end
local sep = string.find(value, ' ', 1, true)
if not sep or string.sub(value, 1, sep - 1) ~= ARGV[1] then
  return 0
end
redis.call('HDEL', members, ARGV[2])
redis.call('ZREM', order, ARGV[2])
local v = next_version(version)
if ARGV[4] == '1' then
  redis.call('PUBLISH', ARGV[3], 'p ' .. fmt(v) .. ' l ' .. string.sub(value, sep + 1))
end
return 1
"""
)

# KEYS: members, order, procs, version
# ARGV: limit, pubsub
# Returns {count, version, {"<process> <json>", ...}}.
PRESENCE_SNAPSHOT = (
    _PRESENCE_COMMON
    + """
local members, order, procs, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
reap(members, order, procs, version, now_ms(), ARGV[2])
return {redis.call('HLEN', members), current(version), first(members, order, tonumber(ARGV[1]))}
"""
)

# KEYS: members, order, procs, version
# ARGV: process, deadline ms from now, key ttl ms, pubsub
# Returns 1 if the process was still there (its deadline pushed back), 0 if it must join its members again.
PRESENCE_REFRESH = (
    _PRESENCE_COMMON
    + """
local members, order, procs, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = now_ms()
reap(members, order, procs, version, now, ARGV[4])
local alive = redis.call('ZADD', procs, 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
keep(KEYS, tonumber(ARGV[3]))
if alive == 1 or redis.call('ZSCORE', procs, ARGV[1]) then
  return 1
end
return 0
"""
)

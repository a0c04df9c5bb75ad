"""Session tracing state shared by gateway replicas through Redis (DESIGN §7).

Trace and turn-span ids are hashes, so replicas already agree on *ids*. What
they must share is the state ids cannot carry: which turn is open (so a turn
whose calls land on two replicas is one turn span, ended and exported once),
the turn's sums, and the tool calls waiting for their output (so a replica can
close an ``execute_tool`` span another one opened).

One Lua script per settled call places it atomically: it picks (or starts) the
turn, ends the previous one (returning its facts to exactly this caller, which
exports it), claims answered tool calls (HDEL: only one replica gets each) and
adds the call's sums and new tool calls. Everything expires ``ttl`` after the
session's last call.

This runs in the telemetry task, after the call has finished: no request ever
waits on it. A Redis error or timeout (``timeout_s``) returns None and the
caller falls back to in-memory placement; after a failure Redis is skipped for
``retry_s``, so a dead Redis costs one timeout per ``retry_s``, not one per call.
"""

from __future__ import annotations

import hashlib
import logging
import time
from decimal import Decimal
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .session_state import EndedTurn, Placement, ToolRun, TurnSums

_log = logging.getLogger(__name__)
_NANO: Final = Decimal(1_000_000_000)

# Unix-ns values exceed 2**53, so Lua compares them as equal-length decimal strings.
_SCRIPT: Final = r"""
local h, p = KEYS[1], KEYS[2]
local ttl = tonumber(ARGV[2])
local function later(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local FIELDS = {'num','start','last','org','team','user','tid',
                'calls','cost','unpriced','in','cached','cw','out','reasoning'}
local function end_turn(reason)
  local cur = redis.call('HGET', h, 'cur')
  if not cur then return {} end
  local f = redis.call('HMGET', h, unpack(FIELDS))
  local out = {cur}
  for i = 1, #FIELDS do out[#out + 1] = f[i] or '' end
  out[#out + 1] = tostring(redis.call('HLEN', p))
  out[#out + 1] = reason
  redis.call('DEL', p)
  redis.call('HDEL', h, 'cur', 'outcome', unpack(FIELDS))
  redis.call('HSET', h, 'e:' .. cur, '1')
  return out
end
if ARGV[1] == 'end' then
  local last = redis.call('HGET', h, 'last')
  if ARGV[3] ~= '' and last and not later(ARGV[3], last) then return {} end
  return end_turn(ARGV[4])
end
local tid, rid, start_ns, end_ns = ARGV[3], ARGV[4], ARGV[6], ARGV[7]
local n_out = tonumber(ARGV[19])
local ci = 20 + n_out
local n_calls = tonumber(ARGV[ci])
local cur = redis.call('HGET', h, 'cur')
local key, status = nil, 'new'
if tid ~= '' then
  key = tid
  if cur == key then status = 'cur'
  elseif redis.call('HEXISTS', h, 'e:' .. key) == 1 then status = 'late' end
elseif cur then
  local cont = ARGV[5] == '1' or redis.call('HGET', h, 'outcome') ~= 'ok'
  if not cont then
    for i = 1, n_out do
      if redis.call('HEXISTS', p, ARGV[19 + i]) == 1 then cont = true break end
    end
  end
  if cont then key, status = cur, 'cur' end
end
if not key then key = 'request:' .. rid end
if status == 'late' then
  redis.call('EXPIRE', h, ttl)
  return {key, {}, {}, 0}
end
local ended = {}
if status == 'new' then
  ended = end_turn('next_turn')
  local n = redis.call('HINCRBY', h, 'n', 1)
  redis.call('HSET', h, 'cur', key, 'num', n, 'start', start_ns, 'last', end_ns,
             'org', ARGV[9], 'team', ARGV[10], 'user', ARGV[11], 'tid', tid)
end
local tools = {}
for i = 1, n_out do
  local cid = ARGV[19 + i]
  local v = redis.call('HGET', p, cid)
  if v then
    redis.call('HDEL', p, cid)
    tools[#tools + 1] = cid
    tools[#tools + 1] = v
  end
end
local last = redis.call('HGET', h, 'last')
if (not last) or later(end_ns, last) then redis.call('HSET', h, 'last', end_ns) end
redis.call('HSET', h, 'outcome', ARGV[8])
redis.call('HINCRBY', h, 'calls', 1)
if ARGV[12] == '' then redis.call('HINCRBY', h, 'unpriced', 1)
else redis.call('HINCRBY', h, 'cost', ARGV[12]) end
local sums = {'in', 'cached', 'cw', 'out', 'reasoning'}
for i = 1, 5 do redis.call('HINCRBY', h, sums[i], ARGV[12 + i]) end
local dropped = 0
local maxp = tonumber(ARGV[18])
for i = 1, n_calls do
  if redis.call('HLEN', p) >= maxp then dropped = dropped + 1
  else
    redis.call('HSET', p, ARGV[ci + 2 * i - 1], ARGV[ci + 2 * i] .. '\t' .. end_ns .. '\t' .. key)
  end
end
redis.call('EXPIRE', h, ttl)
redis.call('EXPIRE', p, ttl)
return {key, ended, tools, dropped}
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _i(v: Any) -> int:
    s = _s(v)
    return int(s) if s else 0


class SharedSessions:
    """Turn and tool-call state in Redis; every method returns None when Redis fails."""

    def __init__(self, url: str, prefix: str, *, ttl_s: float = 1800,
                 max_pending: int = 256, timeout_s: float = 0.5, retry_s: float = 5.0) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                              socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(_SCRIPT)
        self._prefix = prefix
        self._ttl = max(1, int(ttl_s))
        self._max_pending = max_pending
        self._retry_s = retry_s
        self._down_until = 0.0
        self.failures = 0
        """Redis calls that failed (the call was placed in memory instead)."""
        self.dropped_tools = 0
        """Tool calls not recorded because their turn already had ``max_pending`` open."""

    def _keys(self, session_id: str) -> list[str]:
        tag = hashlib.sha256(session_id.encode()).hexdigest()[:32]
        base = f"{self._prefix}otel:{{{tag}}}"  # one hash slot for both keys (Cluster)
        return [base, base + ":p"]

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _run(self, session_id: str, args: list[str | int]) -> Any:
        if not self.up:
            return None
        try:
            return await self._script(keys=self._keys(session_id), args=args)
        except (RedisError, OSError) as e:
            self.failures += 1
            self._down_until = time.monotonic() + self._retry_s
            if self.failures & (self.failures - 1) == 0:  # 1st, 2nd, 4th... failure
                _log.warning("session state in Redis unavailable (%s); tracing from memory"
                             " for %.0f s (%d failures so far)", type(e).__name__,
                             self._retry_s, self.failures)
            return None

    async def place(self, *, session_id: str, request_id: str, turn_id: str | None,
                    compact: bool, start_ns: int, end_ns: int, outcome: str, org: str,
                    team: str, user: str, cost_usd: Decimal | None, tokens: tuple[int, ...],
                    tool_output_ids: tuple[str, ...], tool_calls: tuple[tuple[str, str], ...]
                    ) -> Placement | None:
        """Place one settled call (see module doc); ``tokens``: in, cached, cache-write,
        out, reasoning."""
        cost = "" if cost_usd is None else str(int(cost_usd * _NANO))
        args: list[str | int] = [
            "call", self._ttl, turn_id or "", request_id, "1" if compact else "0",
            str(start_ns), str(end_ns), outcome, org, team, user, cost, *tokens,
            self._max_pending, len(tool_output_ids), *tool_output_ids, len(tool_calls)]
        for cid, name in tool_calls:
            args += [cid, name]
        res = await self._run(session_id, args)
        if res is None:
            return None
        key, ended, tools, dropped = res
        self.dropped_tools += int(dropped)
        runs = []
        for i in range(0, len(tools), 2):
            name, start, turn_key = _s(tools[i + 1]).split("\t", 2)
            runs.append(ToolRun(_s(tools[i]), name, int(start), turn_key))
        return Placement(_s(key), self._ended(session_id, ended), runs)

    async def end(self, session_id: str, reason: str,
                  idle_before_ns: int | None = None) -> list[EndedTurn] | None:
        """End the session's open turn (only if idle since ``idle_before_ns``, if given)."""
        res = await self._run(session_id, ["end", self._ttl,
                                           "" if idle_before_ns is None else str(idle_before_ns),
                                           reason])
        return None if res is None else self._ended(session_id, res)

    @staticmethod
    def _ended(session_id: str, f: list[Any]) -> list[EndedTurn]:
        if not f:
            return []
        (key, num, start, last, org, team, user, tid, calls, cost, unpriced, tin, cached, cw,
         out, reasoning, unanswered, reason) = (_s(v) for v in f)
        sums = TurnSums(calls=_i(calls), cost_usd=Decimal(_i(cost)) / _NANO,
                        unpriced_calls=_i(unpriced), input_tokens=_i(tin),
                        cached_input_tokens=_i(cached), cache_write_tokens=_i(cw),
                        output_tokens=_i(out), reasoning_tokens=_i(reasoning),
                        unanswered_tools=_i(unanswered))
        start_ns = _i(start)
        return [EndedTurn(session_id, key, _i(num), start_ns, max(_i(last), start_ns), org,
                          team, user, tid or None, reason, sums)]

    async def close(self) -> None:
        await self._redis.aclose()

"""Scale-out budgets and rate limits: one Lua script, all scopes, one round trip.

Redis holds the live counters; PostgreSQL holds the durable ledger. When the
counters are missing (first start, Redis restarted or flushed) the first admit
that notices rebuilds them from the ledger under a lock, so every replica agrees
again without a coordinator. Connection errors raise `LimiterUnavailable`; the
fail-open/closed choice is `FallbackLimiter`'s, not this class's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..budget_policy import (
    Admission,
    BudgetLine,
    BudgetStatus,
    Plan,
    Refusal,
    Window,
    check_budget,
    check_rate,
)
from .base import Crossing, Limiter, LimiterUnavailable, crossed, status_of

log = logging.getLogger("agent_egress.limiter")

SCRIPT = resources.files("agent_egress.addon.limiter").joinpath("redis_lua.lua").read_text()
_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

Sums = dict[str, tuple[int, int]]
"""Counter id -> (nano-USD, tokens), as the ledger says."""


class RedisLimiter(Limiter):
    name = "redis"

    def __init__(self, client: aioredis.Redis, prefix: str,
                 ledger_sums: Callable[[list[Window]], Sums]) -> None:
        self.client = client
        self.prefix = prefix
        self.ledger_sums = ledger_sums
        """Sync, run in a thread: sums per counter for the windows asked (rebuilds)."""
        self._script = client.register_script(SCRIPT)
        self.rebuilds = 0

    @classmethod
    def from_url(cls, url: str, prefix: str,
                 ledger_sums: Callable[[list[Window]], Sums]) -> RedisLimiter:
        client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0,
                                         health_check_interval=10)
        return cls(client, prefix, ledger_sums)

    async def _run(self, *args: Any) -> Any:
        try:
            return await self._script(args=[str(a) for a in args])
        except _DOWN as e:
            raise LimiterUnavailable(str(e)) from e

    # -- rebuild --------------------------------------------------------------------

    async def rebuild(self, plan: Plan) -> None:
        """Counters from the ledger for the current windows; one replica does it."""
        p = self.prefix
        lock = uuid.uuid4().hex
        try:
            got = await self.client.set(p + "limits-rebuilding", lock, nx=True, ex=60)
            if not got:
                for _ in range(50):  # another replica is rebuilding: wait for it
                    await asyncio.sleep(0.1)
                    if await self.client.exists(p + "limits-ready"):
                        return
                raise LimiterUnavailable("budget counters are being rebuilt")
            sums = await asyncio.to_thread(self.ledger_sums, list(plan.windows))
            pipe = self.client.pipeline(transaction=True)
            for counter, (nano, tok) in sums.items():
                pipe.hset(p + "bc:" + counter, mapping={"sn": nano, "st": tok})
            pipe.set(p + "limits-ready", str(int(time.time())))
            pipe.delete(p + "limits-rebuilding")
            await pipe.execute()
        except _DOWN as e:
            raise LimiterUnavailable(str(e)) from e
        self.rebuilds += 1
        log.warning("budget counters rebuilt in Redis from the ledger (%d counters)", len(sums))

    async def forget(self) -> None:
        """Mark the counters stale (after counting elsewhere), so the next admit rebuilds."""
        try:
            await self.client.delete(self.prefix + "limits-ready")
        except _DOWN as e:
            raise LimiterUnavailable(str(e)) from e

    # -- interface --------------------------------------------------------------------

    def _admit_args(self, plan: Plan) -> list[Any]:
        args: list[Any] = ["admit", self.prefix, int(plan.now.timestamp() * 1000), plan.res_id,
                           plan.lease_seconds * 1000, plan.est_nano, plan.est_tokens,
                           plan.minute, len(plan.rates), len(plan.budgets)]
        for rl in plan.rates:
            s = rl.spec
            args += [rl.scope, -1 if s.rpm is None else s.rpm, -1 if s.tpm is None else s.tpm,
                     -1 if s.concurrent is None else s.concurrent]
        for line in plan.budgets:
            spec = line.spec
            nano = spec.usd_nano
            args += [line.counter, -1 if nano is None else nano,
                     -1 if spec.tokens is None else spec.tokens,
                     1 if spec.mode == "hard" else 0, line.window.ttl_seconds]
        return args

    async def admit(self, plan: Plan) -> Admission | Refusal:
        if not plan.budgets and not plan.rates:
            # nothing to check: no round trip, and no refusal when Redis is down
            return Admission(plan, self.name)
        args = self._admit_args(plan)
        for _ in range(2):
            out = await self._run(*args)
            verdict = out[0].decode() if isinstance(out[0], bytes) else str(out[0])
            if verdict == "ok":
                return Admission(plan, self.name,
                                 headroom_nano=int(out[1]) if len(out) > 1 else None)
            if verdict == "rebuild":
                await self.rebuild(plan)
                continue
            if verdict == "rate":
                line = plan.rates[int(out[1]) - 1]
                refusal = check_rate(line, int(out[2]), int(out[3]), int(out[4]),
                                     plan.est_tokens, plan.now)
            else:
                bline = plan.budgets[int(out[1]) - 1]
                sn, st, rn, rt = (int(x) for x in out[2:6])
                refusal = check_budget(bline, sn, st, rn, rt, plan.est_nano, plan.est_tokens)
            assert refusal is not None, "the Lua script and budget_policy disagree"
            return refusal
        raise LimiterUnavailable("budget counters could not be rebuilt")

    async def settle(self, adm: Admission, cost_nano: int, tokens: int) -> list[Crossing]:
        plan = adm.plan
        counters = plan.counters
        args: list[Any] = ["settle", self.prefix, int(time.time() * 1000), plan.res_id,
                           cost_nano, tokens, len(counters)]
        for counter, win in counters:
            args += [counter, win.ttl_seconds]
        out = await self._run(*args)
        after = {c: (int(out[2 * i]), int(out[2 * i + 1])) for i, (c, _) in enumerate(counters)}
        crossings = []
        for line in plan.budgets:
            a = after.get(line.counter)
            if a is not None and crossed(line, a[0] - cost_nano, a[1] - tokens, *a):
                crossings.append(Crossing(line, *a))
        return crossings

    async def release(self, adm: Admission) -> None:
        await self._run("release", self.prefix, int(time.time() * 1000), adm.plan.res_id)

    async def status(self, lines: list[BudgetLine]) -> list[BudgetStatus]:
        p = self.prefix
        try:
            pipe = self.client.pipeline(transaction=False)
            for line in lines:
                pipe.hmget(p + "bc:" + line.counter, "sn", "st", "rn", "rt")
            rows = await pipe.execute()
        except _DOWN as e:
            raise LimiterUnavailable(str(e)) from e
        out = []
        for line, v in zip(lines, rows, strict=True):
            sn, st, rn, rt = (int(x or 0) for x in v)
            out.append(status_of(line, (sn, st), (max(rn, 0), max(rt, 0))))
        return out

    async def counters(self, ids: list[str]) -> dict[str, tuple[int, int]]:
        pipe = self.client.pipeline(transaction=False)
        for c in ids:
            pipe.hmget(self.prefix + "bc:" + c, "sn", "st")
        rows = await pipe.execute()
        return {c: (int(v[0] or 0), int(v[1] or 0)) for c, v in zip(ids, rows, strict=True)}

    async def close(self) -> None:
        await self.client.aclose()

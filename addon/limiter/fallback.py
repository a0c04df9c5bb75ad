"""Redis with a stated fail policy: closed (refuse, 503) or open (count in-process).

Failing open never means unlimited: the in-process limiter starts from the
ledger's spend, keeps enforcing every budget and rate limit per replica, and the
`agent_egress_limits_degraded` gauge pages someone. When Redis answers again,
its counters are marked stale and rebuilt from the ledger, which by then holds
what was counted in-process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal

from ..budget_policy import Admission, BudgetLine, BudgetStatus, Plan, Refusal, Window
from .base import Crossing, Limiter, LimiterUnavailable, refusal_unavailable
from .memory import MemoryLimiter
from .redis import RedisLimiter, Sums

log = logging.getLogger("agent_egress.limiter")


class FallbackLimiter(Limiter):
    name = "fallback"

    def __init__(self, primary: RedisLimiter, policy: Literal["closed", "open"],
                 ledger_sums: Callable[[list[Window]], Sums],
                 on_change: Callable[[bool], None] = lambda degraded: None,
                 retry_seconds: float = 5.0) -> None:
        self.primary = primary
        self.policy = policy
        self.ledger_sums = ledger_sums
        self.on_change = on_change
        self.retry_seconds = retry_seconds
        self.memory: MemoryLimiter | None = None
        self._down_since: float | None = None
        self._seeding: asyncio.Lock = asyncio.Lock()

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    def _went_down(self, err: Exception) -> None:
        if self._down_since is None:
            log.error("Redis unreachable for budgets and rate limits (%s): failing %s", err,
                      self.policy)
            self.on_change(True)
        self._down_since = time.monotonic()

    async def _memory(self, plan: Plan) -> MemoryLimiter:
        async with self._seeding:
            if self.memory is None:
                mem = MemoryLimiter()
                mem.seed(await asyncio.to_thread(self.ledger_sums, list(plan.windows)))
                self.memory = mem
            return self.memory

    async def admit(self, plan: Plan) -> Admission | Refusal:
        if not plan.budgets and not plan.rates:
            return Admission(plan, self.primary.name)  # no limit applies: Redis not needed
        if self._down_since is None or time.monotonic() - self._down_since > self.retry_seconds:
            try:
                if self._down_since is not None:
                    # Spend settled while Redis was away is only in the ledger.
                    await self.primary.forget()
                result = await self.primary.admit(plan)
            except LimiterUnavailable as e:
                self._went_down(e)
            else:
                if self._down_since is not None:
                    log.warning("Redis is back: budgets and rate limits shared again")
                    self._down_since = None
                    self.memory = None
                    self.on_change(False)
                return result
        if self.policy == "closed":
            return refusal_unavailable(plan.scopes[0])
        return await (await self._memory(plan)).admit(plan)

    async def settle(self, adm: Admission, cost_nano: int, tokens: int) -> list[Crossing]:
        if adm.backend == MemoryLimiter.name:
            return await self.memory.settle(adm, cost_nano, tokens) if self.memory else []
        try:
            return await self.primary.settle(adm, cost_nano, tokens)
        except LimiterUnavailable as e:
            # The ledger row still carries the cost; the rebuild after recovery counts it.
            self._went_down(e)
            return []

    async def release(self, adm: Admission) -> None:
        if adm.backend == MemoryLimiter.name:
            if self.memory is not None:
                await self.memory.release(adm)
            return
        try:
            await self.primary.release(adm)
        except LimiterUnavailable as e:
            self._went_down(e)  # the lease expires by itself

    async def status(self, lines: list[BudgetLine]) -> list[BudgetStatus]:
        if self._down_since is not None and self.memory is not None:
            return await self.memory.status(lines)
        return await self.primary.status(lines)

    async def close(self) -> None:
        await self.primary.close()

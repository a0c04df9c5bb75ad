"""In-process limits: the embedded rate limiter, and the fallback when Redis is down.

Everything runs on the event loop with no awaits between check and update, so
one process needs no lock. Minute windows are fixed (they reset on the minute,
which is what Retry-After tells the client).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from ..budget_policy import (
    Admission,
    BudgetLine,
    BudgetStatus,
    Plan,
    Refusal,
    check_budget,
    check_rate,
    headroom,
)
from .base import Crossing, Limiter, crossed, status_of


@dataclass(slots=True)
class _Lease:
    expires: float
    lines: list[tuple[str, int, int]]
    streams: list[str]
    minute: int
    tpm_scopes: list[str]
    est_tokens: int


class MemoryLimiter(Limiter):
    name = "memory"

    def __init__(self, budgets: bool = True) -> None:
        self.with_budgets = budgets
        self.spent: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.reserved: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.tokens: dict[tuple[str, int], int] = defaultdict(int)
        self.streams: dict[str, set[str]] = defaultdict(set)
        self.leases: dict[str, _Lease] = {}

    def seed(self, counters: dict[str, tuple[int, int]]) -> None:
        """Start from known spend (the ledger's), so failing open is never unlimited."""
        for counter, (nano, tok) in counters.items():
            self.spent[counter] = [nano, tok]

    def _expire(self, now: float) -> None:
        # Leases are appended in time order with near-equal lengths: expired ones lead.
        while self.leases:
            res_id, lease = next(iter(self.leases.items()))
            if lease.expires > now:
                break
            self._drop(res_id, lease)

    def _drop(self, res_id: str, lease: _Lease) -> None:
        del self.leases[res_id]
        for counter, nano, tok in lease.lines:
            r = self.reserved[counter]
            r[0] -= nano
            r[1] -= tok
        for scope in lease.streams:
            self.streams[scope].discard(res_id)

    def _prune_minutes(self, minute: int) -> None:
        if len(self.requests) + len(self.tokens) > 4096:
            for table in (self.requests, self.tokens):
                for k in [k for k in table if k[1] < minute - 1]:
                    del table[k]

    def check(self, plan: Plan) -> Refusal | None:
        self.last_headroom: int | None = None
        now = time.monotonic()
        self._expire(now)
        minute = plan.minute
        self._prune_minutes(minute)
        for rl in plan.rates:
            refusal = check_rate(rl, self.requests.get((rl.scope, minute), 0),
                                 self.tokens.get((rl.scope, minute), 0),
                                 len(self.streams.get(rl.scope, ())), plan.est_tokens, plan.now)
            if refusal is not None:
                return refusal
        if self.with_budgets:
            for line in plan.budgets:
                s = self.spent.get(line.counter, (0, 0))
                r = self.reserved.get(line.counter, (0, 0))
                refusal = check_budget(line, s[0], s[1], r[0], r[1], plan.est_nano,
                                       plan.est_tokens)
                if refusal is not None:
                    return refusal
                self.last_headroom = headroom(line, s[0], r[0], self.last_headroom)
        return None

    def take(self, plan: Plan) -> None:
        minute = plan.minute
        lease = _Lease(time.monotonic() + plan.lease_seconds, [], [], minute, [],
                       plan.est_tokens)
        for rl in plan.rates:
            self.requests[(rl.scope, minute)] += 1
            if rl.spec.tpm is not None:
                self.tokens[(rl.scope, minute)] += plan.est_tokens
                lease.tpm_scopes.append(rl.scope)
            if rl.spec.concurrent is not None:
                self.streams[rl.scope].add(plan.res_id)
                lease.streams.append(rl.scope)
        if self.with_budgets:
            for line in plan.budgets:
                r = self.reserved[line.counter]
                r[0] += plan.est_nano
                r[1] += plan.est_tokens
                lease.lines.append((line.counter, plan.est_nano, plan.est_tokens))
        self.leases[plan.res_id] = lease

    async def admit(self, plan: Plan) -> Admission | Refusal:
        refusal = self.check(plan)
        if refusal is not None:
            return refusal
        self.take(plan)
        return Admission(plan, self.name, headroom_nano=self.last_headroom)

    def settle_now(self, adm: Admission, cost_nano: int, tokens: int) -> list[Crossing]:
        plan = adm.plan
        lease = self.leases.get(plan.res_id)
        if lease is not None:
            self._drop(plan.res_id, lease)
            for scope in lease.tpm_scopes:  # correct the estimate with the real count
                key = (scope, lease.minute)
                if key in self.tokens:
                    self.tokens[key] = max(0, self.tokens[key] + tokens - lease.est_tokens)
        out: list[Crossing] = []
        if self.with_budgets:
            lines = {line.counter: line for line in plan.budgets}
            for counter, _ in plan.counters:
                s = self.spent[counter]
                before = (s[0], s[1])
                s[0] += cost_nano
                s[1] += tokens
                line = lines.get(counter)
                if line is not None and crossed(line, *before, s[0], s[1]):
                    out.append(Crossing(line, s[0], s[1]))
        return out

    async def settle(self, adm: Admission, cost_nano: int, tokens: int) -> list[Crossing]:
        return self.settle_now(adm, cost_nano, tokens)

    def release_now(self, adm: Admission) -> None:
        lease = self.leases.get(adm.plan.res_id)
        if lease is not None:
            self._drop(adm.plan.res_id, lease)
            for scope in lease.tpm_scopes:
                key = (scope, lease.minute)
                if key in self.tokens:
                    self.tokens[key] = max(0, self.tokens[key] - lease.est_tokens)

    async def release(self, adm: Admission) -> None:
        self.release_now(adm)

    async def status(self, lines: list[BudgetLine]) -> list[BudgetStatus]:
        self._expire(time.monotonic())
        return [status_of(line, tuple(self.spent.get(line.counter, (0, 0))),  # type: ignore[arg-type]
                          tuple(self.reserved.get(line.counter, (0, 0))))  # type: ignore[arg-type]
                for line in lines]

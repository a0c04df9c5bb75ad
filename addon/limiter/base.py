"""The limiter interface: one implementation per backend, the same plan for all.

`admit` reserves on every scope of a plan at once or on none; `settle` turns the
reservation into real spend; `release` gives it back (the call never reached a
provider). A reservation carries a lease, so one whose replica died stops
counting by itself.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from ..budget_policy import Admission, BudgetLine, BudgetStatus, Plan, Refusal


class LimiterUnavailable(Exception):
    """The backend cannot be reached (Redis down); the caller applies its fail policy."""


@dataclass(frozen=True, slots=True)
class Crossing:
    """A budget line whose spend passed its limit with this settle (alert once)."""

    line: BudgetLine
    spent_nano: int
    spent_tokens: int


class Limiter(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    async def admit(self, plan: Plan) -> Admission | Refusal: ...

    @abc.abstractmethod
    async def settle(self, adm: Admission, cost_nano: int, tokens: int) -> list[Crossing]: ...

    @abc.abstractmethod
    async def release(self, adm: Admission) -> None: ...

    @abc.abstractmethod
    async def status(self, lines: list[BudgetLine]) -> list[BudgetStatus]: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


def crossed(line: BudgetLine, before_nano: int, before_tokens: int, after_nano: int,
            after_tokens: int) -> bool:
    spec = line.spec
    nano = spec.usd_nano
    return ((nano is not None and before_nano < nano <= after_nano)
            or (spec.tokens is not None and before_tokens < spec.tokens <= after_tokens))


def status_of(line: BudgetLine, spent: tuple[int, int], reserved: tuple[int, int]
              ) -> BudgetStatus:
    spec = line.spec
    return BudgetStatus(
        scope=line.scope, period=spec.period, mode=spec.mode, window=line.window.key,
        resets_at=line.window.resets_at, limit_usd=spec.usd, limit_tokens=spec.tokens,
        spent_nano=spent[0], spent_tokens=spent[1],
        reserved_nano=reserved[0], reserved_tokens=reserved[1])


def refusal_unavailable(scope: str) -> Refusal:
    return Refusal("unavailable", scope, "the budget and rate-limit store (Redis) is unreachable"
                   " and the gateway is configured to fail closed; retry shortly", 5,
                   "limits_unavailable")

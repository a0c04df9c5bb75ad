"""SQL for budgets and rate limits set through the admin API, and ledger sums per
budget counter (what Redis counters are rebuilt from). Mixed into SQLStore."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..budget_policy import NANO_PER_USD, BudgetSpec, RateSpec, Window, counter_id
from .schema import budget_counters, budgets, ledger, rate_limits

_TOKENS = ledger.c.input_tokens + ledger.c.cache_write_tokens + ledger.c.output_tokens
"""Tokens a call counts against token budgets: Usage.total_tokens, in SQL."""


class SQLLimitsMixin:
    engine: Engine

    def _upsert(self, table: Any, keys: list[str], values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            ins: Any = (pg_insert(table) if conn.dialect.name == "postgresql"
                        else sqlite_insert(table))
            stmt = ins.values(**values).on_conflict_do_update(
                index_elements=keys, set_={k: v for k, v in values.items() if k not in keys})
            conn.execute(stmt)

    def rebuild_budget_counters(self, windows: Sequence[Window]) -> int:
        """Reset the embedded limiter's counters for these windows to the ledger's sums.

        For after an outage that left settles unapplied. Takes the write lock, so
        settles wait; a call settled but not yet in the ledger is missed, so run it
        while the gateways are idle.
        """
        sums = self.budget_sums(windows)
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("LOCK TABLE budget_counters IN EXCLUSIVE MODE"))
            for win in windows:
                conn.execute(delete(budget_counters).where(
                    budget_counters.c.counter.like(f"%|{win.key}")))
            if sums:
                conn.execute(budget_counters.insert(), [
                    {"counter": c, "nano": n, "tokens": t} for c, (n, t) in sums.items()])
        return len(sums)

    def budget_sums(self, windows: Sequence[Window]) -> dict[str, tuple[int, int]]:
        scopes: tuple[tuple[str, tuple[Any, ...]], ...] = (
            ("org:{0}", (ledger.c.org,)),
            ("team:{0}/{1}", (ledger.c.org, ledger.c.team)),
            ("user:{0}/{1}", (ledger.c.org, ledger.c.user)),
            ("key:{0}", (ledger.c.key_id,)),
        )
        out: dict[str, tuple[int, int]] = {}
        with self.engine.connect() as conn:
            for win in windows:
                for name, cols in scopes:
                    stmt = select(*cols, func.coalesce(func.sum(ledger.c.cost_nano_usd), 0),
                                  func.coalesce(func.sum(_TOKENS), 0)).group_by(*cols)
                    # a developer's ChatGPT plan paid for subscription rows (issue 9)
                    stmt = stmt.where(ledger.c.billing != "subscription")
                    if win.start is not None:
                        stmt = stmt.where(ledger.c.ts >= win.start)
                    for r in conn.execute(stmt):
                        out[counter_id(name.format(*r), win)] = (int(r[-2]), int(r[-1]))
        return out

    def list_budgets(self) -> list[tuple[str, BudgetSpec]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(budgets).order_by(budgets.c.scope, budgets.c.period))
            return [(r.scope, BudgetSpec(
                period=r.period, mode=r.mode, tokens=r.tokens,
                usd=None if r.usd_nano is None else Decimal(r.usd_nano) / NANO_PER_USD))
                for r in rows]

    def set_budget(self, scope: str, spec: BudgetSpec, by: str) -> None:
        self._upsert(budgets, ["scope", "period"], {
            "scope": scope, "period": spec.period, "usd_nano": spec.usd_nano,
            "tokens": spec.tokens, "mode": spec.mode, "updated_at": datetime.now(UTC),
            "updated_by": by})

    def delete_budget(self, scope: str, period: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(delete(budgets).where(budgets.c.scope == scope,
                                                     budgets.c.period == period))
            return bool(res.rowcount)

    def list_rate_limits(self) -> list[tuple[str, RateSpec]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(rate_limits).order_by(rate_limits.c.scope))
            return [(r.scope, RateSpec(rpm=r.rpm, tpm=r.tpm, concurrent=r.concurrent))
                    for r in rows]

    def set_rate_limit(self, scope: str, spec: RateSpec, by: str) -> None:
        self._upsert(rate_limits, ["scope"], {
            "scope": scope, "rpm": spec.rpm, "tpm": spec.tpm, "concurrent": spec.concurrent,
            "updated_at": datetime.now(UTC), "updated_by": by})

    def delete_rate_limit(self, scope: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(delete(rate_limits).where(rate_limits.c.scope == scope))
            return bool(res.rowcount)

    def limits_fingerprint(self) -> tuple[object, ...]:
        with self.engine.connect() as conn:
            b = conn.execute(select(func.count(), func.max(budgets.c.updated_at))).one()
            r = conn.execute(select(func.count(), func.max(rate_limits.c.updated_at))).one()
        return (b[0], b[1], r[0], r[1])

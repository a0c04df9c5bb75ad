"""Embedded budgets: one SQL transaction reserves on every scope or on none.

SQLite takes its write lock up front (BEGIN IMMEDIATE), so concurrent admits
from threads and processes serialise; PostgreSQL takes a transaction-scoped
advisory lock per counter, in a fixed order. Settle swaps the reservation for
the real spend in one transaction. Rate limits are in-process (MemoryLimiter):
with several replicas, configure Redis. All calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..budget_policy import Admission, BudgetLine, BudgetStatus, Plan, Refusal, check_budget
from ..store.schema import budget_counters as bc
from ..store.schema import budget_reservations as br
from .base import Crossing, Limiter, crossed, status_of
from .memory import MemoryLimiter


class SQLLimiter(Limiter):
    name = "sql"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rates = MemoryLimiter(budgets=False)
        self._last_sweep = 0.0

    # -- transactions (worker thread) ------------------------------------------------

    def _begin(self, conn: Connection, counters: Iterable[str]) -> None:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            for c in sorted(set(counters)):
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:c))"), {"c": c})

    @staticmethod
    def _read(conn: Connection, counters: list[str], now: datetime
              ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        spent = {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(
            select(bc.c.counter, bc.c.nano, bc.c.tokens).where(bc.c.counter.in_(counters)))}
        reserved = {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in conn.execute(
            select(br.c.counter, func.sum(br.c.nano), func.sum(br.c.tokens))
            .where(br.c.counter.in_(counters), br.c.expires_at > now)
            .group_by(br.c.counter))}
        return spent, reserved

    def _reserve(self, plan: Plan) -> Refusal | None:
        counters = [line.counter for line in plan.budgets]
        now = datetime.now(UTC)
        with self.engine.connect() as conn:
            self._begin(conn, counters)
            spent, reserved = self._read(conn, counters, now)
            for line in plan.budgets:
                s = spent.get(line.counter, (0, 0))
                r = reserved.get(line.counter, (0, 0))
                refusal = check_budget(line, s[0], s[1], r[0], r[1], plan.est_nano,
                                       plan.est_tokens)
                if refusal is not None:
                    conn.rollback()
                    return refusal
            expires = now + timedelta(seconds=plan.lease_seconds)
            conn.execute(br.insert(), [
                {"res_id": plan.res_id, "counter": c, "nano": plan.est_nano,
                 "tokens": plan.est_tokens, "expires_at": expires}
                for c in dict.fromkeys(counters)])
            if time.monotonic() - self._last_sweep > 60:
                self._last_sweep = time.monotonic()
                conn.execute(delete(br).where(br.c.expires_at < now))
            conn.commit()
        return None

    def _upsert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        ins: Any = pg_insert(bc) if conn.dialect.name == "postgresql" else sqlite_insert(bc)
        stmt = ins.on_conflict_do_update(
            index_elements=[bc.c.counter],
            set_={"nano": bc.c.nano + ins.excluded.nano,
                  "tokens": bc.c.tokens + ins.excluded.tokens})
        conn.execute(stmt, rows)

    def _settle(self, plan: Plan, cost_nano: int, tokens: int) -> list[Crossing]:
        lines = {line.counter: line for line in plan.budgets}
        with self.engine.begin() as conn:
            before = ({r[0]: (int(r[1]), int(r[2])) for r in conn.execute(
                select(bc.c.counter, bc.c.nano, bc.c.tokens)
                .where(bc.c.counter.in_(list(lines))))} if lines else {})
            conn.execute(delete(br).where(br.c.res_id == plan.res_id))
            self._upsert(conn, [{"counter": c, "nano": cost_nano, "tokens": tokens}
                                for c, _ in plan.counters])
            after = ({r[0]: (int(r[1]), int(r[2])) for r in conn.execute(
                select(bc.c.counter, bc.c.nano, bc.c.tokens)
                .where(bc.c.counter.in_(list(lines))))} if lines else {})
        out = []
        for counter, line in lines.items():
            b, a = before.get(counter, (0, 0)), after.get(counter, (0, 0))
            if crossed(line, b[0], b[1], a[0], a[1]):
                out.append(Crossing(line, a[0], a[1]))
        return out

    def _release(self, res_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(br).where(br.c.res_id == res_id))

    def _status(self, lines: list[BudgetLine]) -> list[BudgetStatus]:
        counters = list({line.counter for line in lines})
        with self.engine.connect() as conn:
            spent, reserved = self._read(conn, counters, datetime.now(UTC))
        return [status_of(line, spent.get(line.counter, (0, 0)),
                          reserved.get(line.counter, (0, 0))) for line in lines]

    def counters(self, ids: list[str]) -> dict[str, tuple[int, int]]:
        with self.engine.connect() as conn:
            return {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(
                select(bc.c.counter, bc.c.nano, bc.c.tokens).where(bc.c.counter.in_(ids)))}

    # -- the interface (event loop) ----------------------------------------------------

    async def admit(self, plan: Plan) -> Admission | Refusal:
        refusal = self.rates.check(plan)
        if refusal is not None:
            return refusal
        self.rates.take(plan)  # hold the rate slot while the budget transaction runs
        if plan.budgets:
            try:
                refusal = await asyncio.to_thread(self._reserve, plan)
            except BaseException:
                self.rates.release_now(Admission(plan, self.name))
                raise
            if refusal is not None:
                self.rates.release_now(Admission(plan, self.name))
                return refusal
        return Admission(plan, self.name)

    async def settle(self, adm: Admission, cost_nano: int, tokens: int) -> list[Crossing]:
        self.rates.settle_now(adm, cost_nano, tokens)
        return await asyncio.to_thread(self._settle, adm.plan, cost_nano, tokens)

    async def release(self, adm: Admission) -> None:
        self.rates.release_now(adm)
        if adm.plan.budgets:
            await asyncio.to_thread(self._release, adm.plan.res_id)

    async def status(self, lines: list[BudgetLine]) -> list[BudgetStatus]:
        return await asyncio.to_thread(self._status, lines)

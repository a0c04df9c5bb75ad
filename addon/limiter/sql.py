"""Embedded budgets: one SQL transaction reserves on every scope or on none.

SQLite takes its write lock up front (BEGIN IMMEDIATE), so concurrent admits
from threads and processes serialise; PostgreSQL takes a transaction-scoped
advisory lock per counter, in a fixed order. Settle swaps the reservation for
the real spend in one transaction. Rate limits are in-process (MemoryLimiter):
with several replicas, configure Redis. All calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..budget_policy import (
    Admission,
    BudgetLine,
    BudgetStatus,
    Plan,
    Refusal,
    check_budget,
    headroom,
)
from ..store.schema import budget_counters as bc
from ..store.schema import budget_reservations as br
from .base import Crossing, Limiter, crossed, status_of
from .memory import MemoryLimiter

log = logging.getLogger("agent_egress.limiter")


class SQLLimiter(Limiter):
    name = "sql"

    def __init__(self, engine: Engine, batch_window: float = 0.05) -> None:
        """``batch_window``: seconds settles gather before one transaction. Every call
        updates 16 counters (4 scopes x 4 windows), mostly the same ones as its neighbours',
        so a longer window means fewer transactions for the same calls. 50 ms (the ledger
        writer's window) only delays when a finished call's real cost replaces its
        estimate."""
        self.engine = engine
        self.rates = MemoryLimiter(budgets=False)
        self._last_sweep = 0.0
        self.batch_window = batch_window
        self._pending: list[tuple[Plan, int, int, asyncio.Future[list[Crossing]]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

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

    def _reserve(self, plan: Plan) -> Refusal | int | None:
        """A refusal, or the headroom left (None: no hard USD budget)."""
        counters = [line.counter for line in plan.budgets]
        now = datetime.now(UTC)
        with self.engine.connect() as conn:
            self._begin(conn, counters)
            spent, reserved = self._read(conn, counters, now)
            room: int | None = None
            for line in plan.budgets:
                s = spent.get(line.counter, (0, 0))
                r = reserved.get(line.counter, (0, 0))
                refusal = check_budget(line, s[0], s[1], r[0], r[1], plan.est_nano,
                                       plan.est_tokens)
                if refusal is not None:
                    conn.rollback()
                    return refusal
                room = headroom(line, s[0], r[0], room)
            expires = now + timedelta(seconds=plan.lease_seconds)
            conn.execute(br.insert(), [
                {"res_id": plan.res_id, "counter": c, "nano": plan.est_nano,
                 "tokens": plan.est_tokens, "expires_at": expires}
                for c in dict.fromkeys(counters)])
            if time.monotonic() - self._last_sweep > 60:
                self._last_sweep = time.monotonic()
                conn.execute(delete(br).where(br.c.expires_at < now))
            conn.commit()
        return room

    def _upsert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        ins: Any = pg_insert(bc) if conn.dialect.name == "postgresql" else sqlite_insert(bc)
        stmt = ins.on_conflict_do_update(
            index_elements=[bc.c.counter],
            set_={"nano": bc.c.nano + ins.excluded.nano,
                  "tokens": bc.c.tokens + ins.excluded.tokens})
        conn.execute(stmt, rows)

    def _settle_batch(self, batch: list[tuple[Plan, int, int]]) -> list[list[Crossing]]:
        """Settle many calls in one transaction (one fsync, one write lock per batch).

        Counters are added per counter id; each call's crossing is judged on the running
        total in batch order, as if they had been settled one by one.
        """
        totals: dict[str, list[int]] = {}
        watched = {line.counter for plan, _, _ in batch for line in plan.budgets}
        with self.engine.begin() as conn:
            current = ({r[0]: [int(r[1]), int(r[2])] for r in conn.execute(
                select(bc.c.counter, bc.c.nano, bc.c.tokens)
                .where(bc.c.counter.in_(list(watched))))} if watched else {})
            conn.execute(delete(br).where(br.c.res_id.in_([p.res_id for p, _, _ in batch])))
            out = []
            for plan, nano, tok in batch:
                for c, _ in plan.counters:
                    t = totals.setdefault(c, [0, 0])
                    t[0] += nano
                    t[1] += tok
                crossings = []
                for line in plan.budgets:
                    cur = current.setdefault(line.counter, [0, 0])
                    before = (cur[0], cur[1])
                    cur[0] += nano
                    cur[1] += tok
                    if crossed(line, *before, cur[0], cur[1]):
                        crossings.append(Crossing(line, cur[0], cur[1]))
                out.append(crossings)
            self._upsert(conn, [{"counter": c, "nano": n, "tokens": t}
                                for c, (n, t) in totals.items()])
        return out

    async def _flush(self) -> None:
        """Background writer: gathers settles for `batch_window` seconds, then one txn."""
        backoff = 0.2
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.batch_window)
            self._wake.clear()
            while self._pending:
                batch = self._pending[:256]
                try:
                    results = await asyncio.to_thread(
                        self._settle_batch, [(p, n, t) for p, n, t, _ in batch])
                except Exception as e:  # database down: keep them, retry; never drop spend
                    log.error("budget settle of %d calls failed (%s); retrying in %.1f s",
                              len(batch), type(e).__name__, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
                del self._pending[:len(batch)]
                for (_, _, _, fut), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)

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
        room = None
        if plan.budgets:
            try:
                result = await asyncio.to_thread(self._reserve, plan)
            except BaseException:
                self.rates.release_now(Admission(plan, self.name))
                raise
            if isinstance(result, Refusal):
                self.rates.release_now(Admission(plan, self.name))
                return result
            room = result
        return Admission(plan, self.name, headroom_nano=room)

    async def settle(self, adm: Admission, cost_nano: int, tokens: int) -> list[Crossing]:
        self.rates.settle_now(adm, cost_nano, tokens)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush())
        fut: asyncio.Future[list[Crossing]] = asyncio.get_running_loop().create_future()
        self._pending.append((adm.plan, cost_nano, tokens, fut))
        self._wake.set()
        return await fut

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for *_, fut in self._pending:
            fut.cancel()
        if self._pending:
            log.error("%d budget settles not applied at shutdown (the ledger has them)",
                      len(self._pending))

    async def release(self, adm: Admission) -> None:
        self.rates.release_now(adm)
        if adm.plan.budgets:
            await asyncio.to_thread(self._release, adm.plan.res_id)

    async def status(self, lines: list[BudgetLine]) -> list[BudgetStatus]:
        return await asyncio.to_thread(self._status, lines)

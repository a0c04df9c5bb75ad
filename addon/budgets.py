"""Budgets and rate limits for the request path: plan, reserve, settle, report.

Holds the limit book (config merged with what the admin API stored, re-read
when the store's fingerprint changes), prices the reservation for a call, and
hands plans to the limiter backend. Settles run as tasks so the `response` hook
stays synchronous and short; `drain` waits for them at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from agent_egress.exporters.audit import AsyncAuditWriter, AuditEvent
from agent_egress.exporters.prometheus import Metrics

from .budget_policy import (
    NANO_PER_USD,
    Admission,
    BudgetLine,
    BudgetStatus,
    LimitBook,
    Plan,
    Refusal,
    estimate,
    make_plan,
    parse_scope,
    scopes_of,
    windows,
)
from .call import Call
from .limiter.base import Crossing, Limiter, LimiterUnavailable, refusal_unavailable
from .limiter.redis import RedisLimiter
from .policy import Provider, Settings
from .pricing import ModelPrice, price_call
from .protocols.openai_responses import estimate_tokens
from .protocols.usage import Usage
from .store.base import LedgerRow, Store, usd_to_nano

log = logging.getLogger("agent_egress.budgets")

_MTOK = 1_000_000


class Budgets:
    def __init__(self, settings: Settings, store: Store, limiter: Limiter, metrics: Metrics,
                 audit: AsyncAuditWriter | None = None) -> None:
        self.cfg = settings.budgets
        self.tz = self.cfg.tz
        self.store = store
        self.limiter = limiter
        self.metrics = metrics
        self.audit = audit
        self.base = LimitBook.from_config(settings.budgets, settings.rate_limits)
        self.book = self.base
        default = settings.provider()
        anthropic = next((p for p in settings.providers if p.kind == "anthropic"), default)
        self._pricing: dict[bool, tuple[Provider, dict[str, ModelPrice]]] = {
            is_anthropic: (p, {m: o.to_model_price() for m, o in p.prices.items()})
            for is_anthropic, p in ((False, default), (True, anthropic))}
        """Reservations price a call with a provider that speaks its API (Claude models are
        not priced by an OpenAI provider's table)."""
        self._rates: dict[tuple[bool, str], tuple[float, float]] = {}
        self._fingerprint: tuple[object, ...] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._gauged: set[tuple[str, str, str, str]] = set()

    # -- the limit book ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read store-set limits when they changed (polled; API changes are seen in ~2 s)."""
        fp = await asyncio.to_thread(self.store.limits_fingerprint)
        if fp == self._fingerprint:
            return
        stored_b = await asyncio.to_thread(self.store.list_budgets)
        stored_r = await asyncio.to_thread(self.store.list_rate_limits)
        self.book = self.base.with_store(stored_b, stored_r)
        self._fingerprint = fp

    def lines(self, now: datetime | None = None) -> list[BudgetLine]:
        """Every budget in the book, in its current window."""
        by_period = {w.period: w for w in windows(now or datetime.now(UTC), self.tz)}
        return [BudgetLine(scope, by_period[spec.period], spec)
                for scope, specs in sorted(self.book.budgets.items()) for spec in specs]

    # -- estimates ----------------------------------------------------------------------

    def _rate(self, model: str, anthropic: bool = False) -> tuple[float, float]:
        """Nano-USD per input and per output token for `model` (0 when unpriced)."""
        rate = self._rates.get((anthropic, model))
        if rate is None:
            provider, prices = self._pricing[anthropic]
            pid = provider.pricing_provider_id
            cin = price_call(Usage(input_tokens=_MTOK), model, pid, prices).usd
            cout = price_call(Usage(output_tokens=_MTOK), model, pid, prices).usd
            rate = (float(cin or 0) * NANO_PER_USD / _MTOK,
                    float(cout or 0) * NANO_PER_USD / _MTOK)
            if len(self._rates) < 1024:  # model names come from clients: bound the cache
                self._rates[(anthropic, model)] = rate
        return rate

    def plan_for(self, call: Call) -> Plan:
        p = call.principal
        assert p is not None
        model = call.requested_model or ""
        res = self.cfg.reservation
        in_rate, out_rate = self._rate(model, call.api == "anthropic.messages")
        est_nano, est_tokens = estimate(
            estimate_tokens(call.request_bytes), res.output_allowance(model), in_rate,
            out_rate, int(res.max_usd * NANO_PER_USD))
        return make_plan(call.request_id, datetime.now(UTC), scopes_of(p.org, p.team, p.user, p.id),
                         self.book, self.tz, est_nano, est_tokens, res.lease_seconds)

    # -- the request path -----------------------------------------------------------------

    async def admit(self, call: Call) -> Refusal | None:
        plan = self.plan_for(call)
        try:
            result = await self.limiter.admit(plan)
        except LimiterUnavailable:
            return refusal_unavailable(plan.scopes[0])
        if isinstance(result, Refusal):
            return result
        in_rate, out_rate = self._rate(call.requested_model or "",
                                       call.api == "anthropic.messages")
        result.input_nano = int(estimate_tokens(call.request_bytes) * in_rate)
        result.out_rate_nano = out_rate
        call.admission = result
        return None

    def finish(self, call: Call, row: LedgerRow | None) -> None:
        """Settle the call's reservation with the row's real cost, or release it (no row)."""
        adm = call.admission
        if adm is None or adm.settled:
            return
        adm.settled = True
        task = asyncio.get_running_loop().create_task(self._finish(call, adm, row))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, call: Call, adm: Admission, row: LedgerRow | None) -> None:
        backoff = 0.2
        while True:  # a database outage delays a settle; it does not drop it
            try:
                if row is None:
                    await self.limiter.release(adm)
                    return
                nano = usd_to_nano(row.cost_usd) or 0
                tokens = row.input_tokens + row.cache_write_tokens + row.output_tokens
                for c in await self.limiter.settle(adm, nano, tokens):
                    self._crossed(call, c)
                return
            except LimiterUnavailable as e:
                log.error("budget settle for %s not applied live (%s); the ledger row has it"
                          " and the counters are rebuilt from the ledger", call.request_id, e)
                return
            except Exception as e:
                log.error("budget settle for %s failed (%s); retrying in %.1f s",
                          call.request_id, type(e).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _crossed(self, call: Call, c: Crossing) -> None:
        kind, _ = parse_scope(c.line.scope)
        spec = c.line.spec
        self.metrics.budget_exceeded.labels(kind, c.line.scope, spec.period, spec.mode).inc()
        log.warning("%s budget %s %s exhausted (%s)", spec.mode, c.line.scope, spec.period,
                    "alert only" if spec.mode == "soft" else "further calls refused")
        if self.audit is not None:
            self.audit.submit(AuditEvent(
                action="budget.exceeded", actor="gateway", outcome="ok",
                target=c.line.scope, request_id=call.request_id,
                detail={"mode": spec.mode, "period": spec.period, "window": c.line.window.key,
                        "limit_usd": None if spec.usd is None else str(spec.usd),
                        "limit_tokens": spec.tokens,
                        "spent_usd": str(c.spent_nano / NANO_PER_USD),
                        "spent_tokens": c.spent_tokens}))

    async def drain(self, wait_seconds: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_seconds)
        for task in list(self._tasks):  # the store is still down: the ledger spool has them
            log.error("shutting down with a budget settle pending; its spend is in the ledger")
            task.cancel()

    # -- reporting ----------------------------------------------------------------------------

    async def rebuild(self) -> str:
        """Re-derive the live counters from the ledger (after an outage)."""
        primary = getattr(self.limiter, "primary", self.limiter)
        if isinstance(primary, RedisLimiter):
            await primary.forget()
            return "redis counters marked stale: the next call rebuilds them from the ledger"
        n = await asyncio.to_thread(self.store.rebuild_budget_counters,
                                    list(windows(datetime.now(UTC), self.tz)))
        return f"{n} counters rebuilt from the ledger"

    async def status(self) -> list[BudgetStatus]:
        return await self.limiter.status(self.lines())

    def gauge(self, rows: list[BudgetStatus]) -> None:
        m = self.metrics
        seen: set[tuple[str, str, str, str]] = set()
        for s in rows:
            kind, _ = parse_scope(s.scope)
            labels = (kind, s.scope, str(s.period), s.mode)
            seen.add(labels)
            if s.limit_usd is not None:
                m.budget_limit_usd.labels(*labels).set(float(s.limit_usd))
                m.budget_spent_usd.labels(*labels).set(s.spent_nano / NANO_PER_USD)
                m.budget_reserved_usd.labels(*labels).set(s.reserved_nano / NANO_PER_USD)
                m.budget_remaining_usd.labels(*labels).set(float(s.remaining_usd or 0))
            if s.limit_tokens is not None:
                m.budget_limit_tokens.labels(*labels).set(s.limit_tokens)
                m.budget_spent_tokens.labels(*labels).set(s.spent_tokens)
                m.budget_remaining_tokens.labels(*labels).set(s.remaining_tokens or 0)
        for labels in self._gauged - seen:  # a budget deleted through the API
            for g in (m.budget_limit_usd, m.budget_spent_usd, m.budget_reserved_usd,
                      m.budget_remaining_usd, m.budget_limit_tokens, m.budget_spent_tokens,
                      m.budget_remaining_tokens):
                with contextlib.suppress(KeyError):
                    g.remove(*labels)
        self._gauged = seen

    async def run(self, every: float = 2.0) -> None:
        """Background loop: pick up API-set limits and refresh the budget gauges."""
        while True:
            try:
                await self.refresh()
                self.gauge(await self.status())
            except LimiterUnavailable:
                pass
            except Exception:
                log.exception("budget refresh failed")
            await asyncio.sleep(every)

    async def close(self, wait_seconds: float = 5.0) -> None:
        await self.drain(wait_seconds)
        await self.limiter.close()


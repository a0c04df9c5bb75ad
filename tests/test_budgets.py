"""Budgets and rate limits below the gateway: the pure rules, and each limiter backend
(in-process, SQLite, PostgreSQL, Redis) on real servers, under real concurrency."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import services
from pydantic import ValidationError
from redis import asyncio as aioredis

from agent_egress.addon.budget_policy import (
    PERIODS,
    Admission,
    Budgets,
    BudgetSpec,
    LimitBook,
    Plan,
    RateLimits,
    Refusal,
    make_plan,
    scopes_of,
    window,
    windows,
)
from agent_egress.addon.limiter.base import Limiter
from agent_egress.addon.limiter.memory import MemoryLimiter
from agent_egress.addon.limiter.redis import RedisLimiter
from agent_egress.addon.limiter.sql import SQLLimiter
from agent_egress.addon.store.sql import SQLStore

UTC_TZ = ZoneInfo("UTC")
NANO = 1_000_000_000
SCOPES = scopes_of("acme", "payments", "alice", "key_1")


def book(team_usd: str | None = "1", mode: str = "hard", **rates: int) -> LimitBook:
    budgets = Budgets.model_validate({"teams": {"acme/payments": [
        {"period": "monthly", "usd": team_usd, "mode": mode}]}} if team_usd else {})
    return LimitBook.from_config(budgets, RateLimits.model_validate(
        {"per_key": rates} if rates else {}))


def plan(b: LimitBook, n: int, est_nano: int = NANO // 10, est_tokens: int = 100,
         lease: int = 60, now: datetime | None = None) -> Plan:
    return make_plan(f"res_{n}", now or datetime.now(UTC), SCOPES, b, UTC_TZ, est_nano,
                     est_tokens, lease)


# -- pure rules ---------------------------------------------------------------------------


def test_windows_are_calendar_periods_in_the_configured_zone() -> None:
    now = datetime(2026, 11, 25, 23, 30, tzinfo=UTC)
    assert window("monthly", now, UTC_TZ).key == "m2026-11"
    assert window("monthly", now, UTC_TZ).resets_at == datetime(2026, 12, 1, tzinfo=UTC)
    weekly = window("weekly", now, UTC_TZ)
    assert weekly.start == datetime(2026, 11, 23, tzinfo=UTC)  # Monday
    assert weekly.resets_at == datetime(2026, 11, 30, tzinfo=UTC)
    tokyo = ZoneInfo("Asia/Tokyo")  # 23:30 UTC is already the 26th in Tokyo
    day = window("daily", now, tokyo)
    assert day.key == "d2026-11-26"
    assert day.start == datetime(2026, 11, 25, 15, tzinfo=UTC)
    assert window("monthly", datetime(2026, 12, 31, 23, 59, tzinfo=UTC), UTC_TZ).resets_at \
        == datetime(2027, 1, 1, tzinfo=UTC)
    assert window("total", now, UTC_TZ).resets_at is None
    # A DST change inside the window: Berlin's October month is 31 days + 1 hour long.
    berlin = window("monthly", datetime(2026, 10, 15, tzinfo=UTC), ZoneInfo("Europe/Berlin"))
    assert berlin.resets_at is not None and berlin.start is not None
    assert berlin.resets_at - berlin.start == timedelta(days=31, hours=1)


def test_remembered_windows_equal_fresh_ones_across_boundaries() -> None:
    """``windows`` reuses its last answer while it holds: walking an hour at a time over
    month ends and Berlin's DST change, forwards and back, it equals ``window`` each time."""
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 10, 24, tzinfo=UTC)
    hours = [start + timedelta(hours=h) for h in range(0, 24 * 10, 1)]
    for now in [*hours, *reversed(hours), start + timedelta(days=40), start]:
        for tz in (berlin, UTC_TZ):
            assert windows(now, tz) == tuple(window(p, now, tz) for p in PERIODS), (now, tz)


@pytest.mark.parametrize("bad", [
    {"period": "monthly", "usd": -1}, {"period": "monthly", "usd": 0},
    {"period": "monthly", "usd": "1e12"}, {"period": "monthly", "tokens": 0},
    {"period": "monthly"}, {"period": "yearly", "usd": 5},
])
def test_bad_budgets_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BudgetSpec.model_validate(bad)


def test_config_shape_errors() -> None:
    with pytest.raises(ValidationError, match="org/team"):
        Budgets.model_validate({"teams": {"payments": [{"period": "daily", "usd": 1}]}})
    with pytest.raises(ValidationError, match="one budget per period"):
        Budgets.model_validate({"orgs": {"acme": [{"period": "daily", "usd": 1},
                                                  {"period": "daily", "tokens": 5}]}})
    with pytest.raises(ValidationError, match="time zone"):
        Budgets.model_validate({"timezone": "Mars/Olympus"})


def test_store_budgets_override_config_per_period() -> None:
    b = book("1").with_store([("team:acme/payments", BudgetSpec(period="monthly", usd=Decimal(9))),
                              ("user:acme/alice", BudgetSpec(period="daily", tokens=10))], [])
    assert [s.usd for s in b.budgets["team:acme/payments"]] == [Decimal(9)]
    p = plan(b, 1)
    assert sorted(line.scope for line in p.budgets) == ["team:acme/payments", "user:acme/alice"]


# -- every backend: the same behaviour ------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Limiter]]:
    """A factory: Redis clients belong to the event loop that makes them."""
    kind = request.param
    store = SQLStore(f"sqlite:///{tmp_path / 'l.db'}")
    store.migrate()
    if kind == "memory":
        yield MemoryLimiter
    elif kind == "sqlite":
        yield lambda: SQLLimiter(store.engine)
    elif kind == "postgres":
        with services.fresh_database() as url:
            pg = SQLStore(url)
            pg.migrate()
            yield lambda: SQLLimiter(pg.engine)
            pg.close()
    else:
        with services.redis_namespace() as prefix:
            yield lambda: RedisLimiter.from_url(services.redis_url(), prefix, store.budget_sums)
    store.close()


def run(make: Callable[[], Limiter], test: Callable[[Limiter], Awaitable[None]]) -> None:
    async def go() -> None:
        limiter = make()
        try:
            await test(limiter)
        finally:
            await limiter.close()
    asyncio.run(go())


def test_reserve_settle_release_and_the_refusal_text(make: Callable[[], Limiter]) -> None:
    async def go(limiter: Limiter) -> None:
        b = book("1")
        admitted = []
        for i in range(12):  # 0.1 USD reserved each: 10 fit under 1 USD
            out = await limiter.admit(plan(b, i))
            if isinstance(out, Refusal):
                break
            admitted.append(out)
        assert len(admitted) == 10
        assert isinstance(out, Refusal) and out.kind == "budget"
        assert "team:acme/payments" in out.message and "$1.0000" in out.message
        assert "reserved by calls in flight" in out.message and "2026" in out.message
        for adm in admitted[:5]:  # released: never reached a provider
            await limiter.release(adm)
        for adm in admitted[5:]:  # settled at half the estimate
            await limiter.settle(adm, NANO // 20, 50)
        status = await limiter.status(plan(b, 99).budgets)
        assert status[0].spent_nano == 5 * NANO // 20
        assert status[0].reserved_nano == 0
        assert status[0].remaining_usd == Decimal("0.75")
        # settle counts on every scope and period, budget or not
        last = plan(b, 100)
        more = await limiter.admit(last)
        assert isinstance(more, Admission)
        crossings = await limiter.settle(more, NANO, 10)  # passes the limit: crossed once
        assert [c.line.scope for c in crossings] == ["team:acme/payments"]
        refused = await limiter.admit(plan(b, 101, est_nano=1))
        assert isinstance(refused, Refusal) and "spent $1.2500 of $1.0000" in refused.message
    run(make, go)


def test_soft_budgets_never_refuse_but_report_the_crossing(make: Callable[[], Limiter]) -> None:
    async def go(limiter: Limiter) -> None:
        b = book("0.5", mode="soft")
        crossings = []
        for i in range(8):
            adm = await limiter.admit(plan(b, i))
            assert isinstance(adm, Admission)
            crossings += await limiter.settle(adm, NANO // 10, 1)
        assert len(crossings) == 1 and crossings[0].spent_nano == 5 * NANO // 10
    run(make, go)


def test_rate_limits_with_retry_after(make: Callable[[], Limiter]) -> None:
    async def go(limiter: Limiter) -> None:
        b = book(None, rpm=3, concurrent=2)
        now = datetime.now(UTC)
        a1 = await limiter.admit(plan(b, 1, now=now))
        a2 = await limiter.admit(plan(b, 2, now=now))
        c = await limiter.admit(plan(b, 3, now=now))  # third stream at once
        assert isinstance(c, Refusal) and c.kind == "rate" and c.retry_after == 2
        assert isinstance(a1, Admission) and isinstance(a2, Admission)
        await limiter.settle(a1, 0, 0)
        a3 = await limiter.admit(plan(b, 4, now=now))
        assert isinstance(a3, Admission)
        r = await limiter.admit(plan(b, 5, now=now))  # fourth request this minute
        assert isinstance(r, Refusal) and "3 requests per minute" in r.message
        assert r.retry_after is not None and 1 <= r.retry_after <= 60
        b2 = book(None, tpm=1000)
        t1 = await limiter.admit(plan(b2, 10, est_tokens=800, now=now))
        assert isinstance(t1, Admission)
        t2 = await limiter.admit(plan(b2, 11, est_tokens=800, now=now))
        assert isinstance(t2, Refusal) and "tokens per minute" in t2.message
        await limiter.settle(t1, 0, 100)  # corrected after: 100 real tokens, not 800
        t3 = await limiter.admit(plan(b2, 12, est_tokens=800, now=now))
        assert isinstance(t3, Admission)
    run(make, go)


def test_a_dead_replicas_reservation_expires(make: Callable[[], Limiter]) -> None:
    async def go(limiter: Limiter) -> None:
        b = book("1")
        held = await limiter.admit(plan(b, 1, est_nano=NANO, lease=1))
        assert isinstance(held, Admission)
        assert isinstance(await limiter.admit(plan(b, 2, est_nano=1)), Refusal)
        await asyncio.sleep(1.3)  # nobody settles: the lease runs out
        assert isinstance(await limiter.admit(plan(b, 3, est_nano=1)), Admission)
    run(make, go)


def test_sqlite_admits_never_pass_the_budget_from_many_threads(tmp_path: Path) -> None:
    """16 threads x 20 admits, each its own event loop: exactly 100 fit under 10 USD."""
    store = SQLStore(f"sqlite:///{tmp_path / 'c.db'}")
    store.migrate()
    b = book("10")
    ok = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        lim = SQLLimiter(store.engine)
        for i in range(20):
            out = asyncio.run(lim.admit(plan(b, w * 100 + i)))
            if isinstance(out, Admission):
                with lock:
                    ok.append(out)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ok) == 100
    store.close()


def test_redis_counters_are_rebuilt_from_the_ledger_after_loss(tmp_path: Path) -> None:
    from agent_egress.addon.store.base import LedgerRow

    store = SQLStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.migrate()
    now = datetime.now(UTC)
    rows = [LedgerRow(ts=now, request_id=f"r{i}", org="acme", team="payments", user="alice",
                      key_id="key_1", session_id=None, turn_id=None, api="openai.responses",
                      requested_model="m", served_model="m", provider="p", status_code=200,
                      input_tokens=10, cached_input_tokens=0, cache_write_tokens=0,
                      output_tokens=5, reasoning_tokens=0, cost_usd=Decimal("0.3"),
                      price_source="override", usage_estimated=False, ttfb_ms=1,
                      duration_ms=2, outcome="ok", error_code=None) for i in range(3)]
    store.insert_ledger(rows)

    async def go(prefix: str) -> None:
        lim = RedisLimiter.from_url(services.redis_url(), prefix, store.budget_sums)
        b = book("1")
        out = await lim.admit(plan(b, 1))  # no counters yet: rebuilt from the ledger first
        assert isinstance(out, Admission) and lim.rebuilds == 1
        st = await lim.status(plan(b, 2).budgets)
        assert (st[0].spent_nano, st[0].spent_tokens) == (9 * NANO // 10, 45)
        refused = await lim.admit(plan(b, 3, est_nano=NANO // 5))  # 0.9 + 0.1 + 0.2 > 1
        assert isinstance(refused, Refusal)
        client = aioredis.Redis.from_url(services.redis_url())
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        await client.delete(*keys)  # Redis lost everything
        await client.aclose()
        out = await lim.admit(plan(b, 4, est_nano=1))
        assert isinstance(out, Admission) and lim.rebuilds == 2
        st = await lim.status(plan(b, 5).budgets)
        assert st[0].spent_nano == 9 * NANO // 10
        await lim.close()

    with services.redis_namespace() as prefix:
        asyncio.run(go(prefix))
    store.close()


def test_sql_settles_in_one_batch_count_every_call_and_cross_once(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path / 'b.db'}")
    store.migrate()

    async def go() -> None:
        lim = SQLLimiter(store.engine, batch_window=0.05)
        b = book("0.5", mode="soft")
        adms = [await lim.admit(plan(b, i)) for i in range(10)]
        results = await asyncio.gather(*(lim.settle(a, NANO // 10, 7) for a in adms
                                         if isinstance(a, Admission)))
        assert sum(len(r) for r in results) == 1  # the 5th settle crossed 0.5 USD
        st = await lim.status(plan(b, 99).budgets)
        assert (st[0].spent_nano, st[0].spent_tokens, st[0].reserved_nano) == (NANO, 70, 0)
        counters = lim.counters([f"key:key_1|{w.key}" for w in plan(b, 0).windows])
        assert all(v == (NANO, 70) for v in counters.values()) and len(counters) == 4
        await lim.close()

    asyncio.run(go())
    store.close()


def test_output_meter_counts_generated_text_across_any_chunking() -> None:
    from agent_egress.addon.protocols.output_meter import OutputMeter

    deltas = ["Hello, ", 'wo\\"rld', " \\u00e9t\\u00e9", "x" * 50]
    events = b"".join(
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"delta":"' + d.encode() + b'","sequence_number":1}\n\n' for d in deltas)
    events += (b'event: response.function_call_arguments.delta\ndata: {"type":'
               b'"response.function_call_arguments.delta","delta":"{\\"cmd\\":1}"}\n\n'
               b'event: response.completed\ndata: {"type":"response.completed",'
               b'"response":{"content":"not generated text"}}\n\n')
    expected = len("Hello, ") + len('wo"rld') + len(" été") + 50 + len('{"cmd":1}')
    for step in (1, 7, 64, len(events)):
        meter = OutputMeter()
        for i in range(0, len(events), step):
            meter.feed(events[i:i + step])
        assert meter.chars == expected, step


def test_redis_down_refuses_only_calls_that_a_limit_applies_to(tmp_path: Path) -> None:
    from agent_egress.addon.limiter.fallback import FallbackLimiter

    store = SQLStore(f"sqlite:///{tmp_path / 'f.db'}")
    store.migrate()

    async def go() -> None:
        dead = f"redis://127.0.0.1:{services.free_port()}/0"
        lim = FallbackLimiter(RedisLimiter.from_url(dead, "t:", store.budget_sums), "closed",
                              store.budget_sums)
        free = await lim.admit(plan(book(None), 1))  # no budget, no rate limit
        assert isinstance(free, Admission)
        assert await lim.settle(free, NANO, 10) == []  # counted later, from the ledger
        limited = await lim.admit(plan(book("1"), 2))
        assert isinstance(limited, Refusal) and limited.code == "limits_unavailable"
        await lim.close()

    asyncio.run(go())
    store.close()


def test_output_meter_reads_anthropic_deltas() -> None:
    from agent_egress.addon.protocols.output_meter import OutputMeter

    stream = (b'event: message_start\ndata: {"type":"message_start","message":{"content":[],'
              b'"usage":{"input_tokens":5}}}\n\n'
              b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"text_delta","text":"Hello there"}}\n\n'
              b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
              b'"delta":{"type":"input_json_delta","partial_json":"{\\"cmd\\": \\"ls\\"}"}}\n\n')
    meter = OutputMeter()
    meter.feed(stream)
    assert meter.chars == len("Hello there") + len('{"cmd": "ls"}')

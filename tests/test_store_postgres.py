"""The store contract, the same tests on SQLite (embedded) and PostgreSQL (scale-out).

PostgreSQL comes from tests/services.py: this machine's server when reachable,
else one started for the session; every test gets its own database.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path

import psycopg
import pytest
import redis
import services
from sqlalchemy import inspect, text

from agent_egress.addon.store.base import LedgerRow, Store
from agent_egress.addon.store.sql import (
    HEAD_REVISION,
    SQLStore,
    make_engine,
    open_store,
    run_migrations,
)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with services.fresh_database() as url:
        yield url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


def _hash() -> str:
    return secrets.token_hex(32)


def _row(i: int, *, cost: Decimal | None, team: str = "payments", user: str = "alice",
         model: str | None = "gpt-5.5", ts: datetime = T0, estimated: bool = False,
         key_id: str = "key_a") -> LedgerRow:
    return LedgerRow(
        ts=ts, request_id=f"req_{i:06d}", org="acme", team=team, user=user, key_id=key_id,
        session_id=f"sess_{i % 3}", turn_id=None, api="openai.responses",
        requested_model=model, served_model=model, provider="openai", status_code=200,
        input_tokens=1200, cached_input_tokens=1000, cache_write_tokens=0, output_tokens=50,
        reasoning_tokens=20, cost_usd=cost, price_source="genai-prices",
        usage_estimated=estimated, ttfb_ms=12, duration_ms=340, outcome="ok", error_code=None)


# engine -------------------------------------------------------------------
def test_make_engine_uses_psycopg3_for_plain_postgresql_urls() -> None:
    for url in ("postgresql://u@127.0.0.1:5432/db", "postgres://u@127.0.0.1/db",
                "postgresql+psycopg://u@127.0.0.1:5432/db"):
        engine = make_engine(url)
        assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
        assert engine.pool._pre_ping  # type: ignore[attr-defined]
        assert engine.pool.size() == 5  # type: ignore[attr-defined]
        engine.dispose()


def test_make_engine_sqlite_keeps_wal(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


# keys ---------------------------------------------------------------------
def test_keys_create_list_lookup_revoke(store: Store) -> None:
    h1, h2 = _hash(), _hash()
    exp = T0 + timedelta(days=30)
    a = store.create_key(key_id="key_a", token_hash=h1, org="acme", team="payments",
                         user="alice", expires_at=exp, description="laptop")
    b = store.create_key(key_id="key_b", token_hash=h2, org="acme", team="search",
                         user="bob", expires_at=None, description=None)
    assert (a.id, a.org, a.team, a.user, a.description) == (
        "key_a", "acme", "payments", "alice", "laptop")
    assert a.expires_at == exp and a.revoked_at is None and b.expires_at is None
    assert a.created_at.tzinfo is not None

    assert [k.id for k in store.list_keys()] == ["key_a", "key_b"]
    found = store.key_by_hash(h1)
    assert found is not None and found.id == "key_a" and found.expires_at == exp
    assert found.expires_at is not None and found.expires_at.utcoffset() == timedelta(0)
    assert store.key_by_hash(_hash()) is None

    at = datetime.now(UTC).replace(microsecond=0)
    revoked = store.revoke_key("key_a", at)
    assert revoked is not None and revoked.revoked_at == at
    assert revoked.state(datetime.now(UTC)) == "revoked"
    again = store.revoke_key("key_a", at + timedelta(hours=1))  # first revocation stands
    assert again is not None and again.revoked_at == at
    assert store.revoke_key("key_nope", at) is None
    by_hash = store.key_by_hash(h1)
    assert by_hash is not None and by_hash.revoked_at == at
    other = store.key_by_hash(h2)
    assert other is not None and other.state(datetime.now(UTC)) == "active"


def test_duplicate_token_hash_is_refused(store: Store) -> None:
    h = _hash()
    store.create_key(key_id="key_a", token_hash=h, org="o", team="t", user="u",
                     expires_at=None, description=None)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.create_key(key_id="key_b", token_hash=h, org="o", team="t", user="u",
                         expires_at=None, description=None)


def test_revocation_fingerprint_changes_only_on_revocation(store: Store) -> None:
    empty = store.revocation_fingerprint()
    assert store.revocation_fingerprint() == empty
    store.create_key(key_id="key_a", token_hash=_hash(), org="o", team="t", user="u",
                     expires_at=None, description=None)
    store.create_key(key_id="key_b", token_hash=_hash(), org="o", team="t", user="u",
                     expires_at=None, description=None)
    before = store.revocation_fingerprint()
    assert store.revocation_fingerprint() == before
    store.insert_ledger([_row(1, cost=Decimal("0.01"))])
    assert store.revocation_fingerprint() == before
    store.revoke_key("key_a", datetime.now(UTC))
    after_a = store.revocation_fingerprint()
    assert after_a != before
    # Same instant for the second revocation: the fingerprint must still move.
    store.revoke_key("key_b", datetime.now(UTC))
    assert store.revocation_fingerprint() not in (before, after_a)


# ledger -------------------------------------------------------------------
def test_ledger_roundtrip(store: Store) -> None:
    rows = [_row(1, cost=Decimal("0.003265")),
            _row(2, cost=None, model=None),
            _row(3, cost=Decimal("0.000000001"), estimated=True)]
    store.insert_ledger(rows)
    store.insert_ledger([])
    got = store.ledger_rows()
    assert [r.request_id for r in got] == ["req_000001", "req_000002", "req_000003"]
    fields = [f.name for f in dataclasses.fields(LedgerRow) if f.name != "tags"]
    for want, have in zip(rows, got, strict=True):
        assert {f: getattr(have, f) for f in fields} == {f: getattr(want, f) for f in fields}
    assert got[0].ts == T0 and got[0].ts.utcoffset() == timedelta(0)
    assert got[2].cost_usd == Decimal("1E-9") and got[2].usage_estimated is True


def test_spend_sums_are_exact_decimals(store: Store) -> None:
    # 0.1 + 0.2 style costs that drift in floating point; 9-decimal nano-USD costs.
    costs = [Decimal("0.1"), Decimal("0.2"), Decimal("0.000000007"), Decimal("1.234567891")]
    rows = []
    for i in range(400):
        rows.append(_row(i, cost=costs[i % 4], team="payments" if i % 2 == 0 else "search",
                         user=f"u{i % 5}", estimated=(i % 10 == 0),
                         ts=T0 + timedelta(minutes=i)))
    rows.append(_row(1000, cost=None, team="search", ts=T0 + timedelta(minutes=200, seconds=30)))
    store.insert_ledger(rows)

    by_team = {r.group: r for r in store.spend("team")}
    want_pay = sum((costs[i % 4] for i in range(0, 400, 2)), Decimal(0))
    want_search = sum((costs[i % 4] for i in range(1, 400, 2)), Decimal(0))
    assert by_team["payments"].cost_usd == want_pay == Decimal("10.000000700")
    assert by_team["search"].cost_usd == want_search == Decimal("143.4567891")
    assert isinstance(by_team["payments"].cost_usd, Decimal)
    assert (by_team["payments"].calls, by_team["search"].calls) == (200, 201)
    assert (by_team["payments"].unpriced_calls, by_team["search"].unpriced_calls) == (0, 1)
    assert by_team["payments"].estimated_calls == 40
    assert by_team["payments"].input_tokens == 200 * 1200
    assert by_team["search"].reasoning_tokens == 201 * 20
    assert [r.group for r in store.spend("team")] == ["search", "payments"]  # by cost desc

    total = sum((r.cost_usd for r in store.spend("user")), Decimal(0))
    assert total == want_pay + want_search
    assert sum(r.calls for r in store.spend("model")) == 401

    # Window: [since, until) on ts.
    window = store.spend("team", since=T0, until=T0 + timedelta(minutes=4))
    assert sum((r.cost_usd for r in window), Decimal(0)) == sum(costs, Decimal(0))
    assert sum(r.calls for r in window) == 4
    assert len(store.ledger_rows(since=T0 + timedelta(minutes=398))) == 2


def test_spend_orders_unpriced_groups_last(store: Store) -> None:
    store.insert_ledger([_row(1, cost=Decimal("1.5"), team="priced"),
                         _row(2, cost=None, team="unpriced")])
    assert [r.group for r in store.spend("team")] == ["priced", "unpriced"]


# migrations ---------------------------------------------------------------
def test_migrations_are_idempotent(db_url: str) -> None:
    first = open_store(db_url)
    first.migrate()
    first.migrate()
    first.close()
    second = open_store(db_url)  # a second process / a restart: nothing to do, no error
    assert isinstance(second, SQLStore)
    with second.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        tables = set(inspect(conn).get_table_names())
    assert len(versions) == 1
    assert {"gateway_keys", "ledger", "alembic_version"} <= tables
    second.create_key(key_id="key_a", token_hash=_hash(), org="o", team="t", user="u",
                      expires_at=None, description=None)
    second.close()
    third = open_store(db_url)  # data survives re-running migrations
    assert [k.id for k in third.list_keys()] == ["key_a"]
    third.close()


def test_head_revision_is_alembics_head() -> None:
    """A store at HEAD_REVISION skips Alembic on open: it must be the real head."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(
        resources.files("agent_egress.addon.store") / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_heads() == [HEAD_REVISION]


def test_replicas_starting_together_migrate_once(db_url: str) -> None:
    """Two gateways starting at once on an empty database: the second must wait, not fail.

    Deterministic: the first migration is held uncommitted while the second starts.
    """
    first = SQLStore(db_url)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            open_store(db_url).close()
        except Exception as e:
            errors.append(e)

    try:
        with first.engine.begin() as conn:
            run_migrations(conn)
            t = threading.Thread(target=second)
            t.start()
            time.sleep(0.3)  # the second replica is now blocked behind the first
        t.join(30)
    finally:
        first.close()
    assert not t.is_alive()
    assert errors == []


def test_databases_are_private_to_each_test(db_url: str) -> None:
    """Two runs (or two tests) never see each other's rows."""
    s = open_store(db_url)
    assert s.list_keys() == [] and s.ledger_rows() == []
    s.close()


# services fallback --------------------------------------------------------
def test_services_start_their_own_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh machine: nothing on the configured ports, so the helpers start servers."""
    closed_pg, closed_redis = services.free_port(), services.free_port()
    monkeypatch.setenv(services.ENV_POSTGRES, f"postgresql://postgres@127.0.0.1:{closed_pg}/x")
    monkeypatch.setenv(services.ENV_REDIS, f"redis://127.0.0.1:{closed_redis}/0")
    before = len(services.started_servers())
    t0 = time.monotonic()
    pg = services.postgres_url()
    t_pg = time.monotonic() - t0
    t0 = time.monotonic()
    rd = services.redis_url()
    t_redis = time.monotonic() - t0
    print(f"\nfallback: started postgres in {t_pg:.2f}s ({pg}), redis in {t_redis:.2f}s ({rd})")
    assert f":{closed_pg}/" not in pg and f":{closed_redis}/" not in rd
    assert len(services.started_servers()) == before + 2
    assert services.postgres_url() == pg  # started once per session, then reused

    with services.fresh_database(pg) as url:
        s = open_store(url)
        s.create_key(key_id="key_a", token_hash=_hash(), org="o", team="t", user="u",
                     expires_at=None, description=None)
        assert [k.id for k in s.list_keys()] == ["key_a"]
        s.close()
    with psycopg.connect(pg) as conn:
        names = conn.execute("SELECT datname FROM pg_database").fetchall()
    assert not any(n[0].startswith("ae_test_") for n in names)  # dropped after use
    client = redis.Redis.from_url(rd)
    assert client.ping()
    client.close()
    if os.geteuid() == 0:  # initdb refuses root: the helper ran it as another user
        owner = services.started_servers()[-2].dir.stat().st_uid
        assert owner != 0

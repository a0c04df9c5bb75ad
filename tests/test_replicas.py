"""Two gateway replicas sharing PostgreSQL and Redis (DESIGN §6: revocation reaches
every replica within a second), plus the revocation bus on its own.

Each test uses its own database and Redis prefix (tests/services.py), so runs
and tests never see each other's keys, rows or revocation messages.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import services
from conftest import AGENT_EGRESS, Gateway, make_replicas
from fakeprovider import FakeProvider

from agent_egress.addon.store.revocations import RevocationBus, publish_sync
from agent_egress.addon.store.sql import SQLStore

BODY: dict[str, Any] = {"model": "gpt-5.5", "input": [{"role": "user", "content": "hi"}],
                        "stream": False, "store": False}


@pytest.fixture
def pg_url() -> Iterator[str]:
    with services.fresh_database() as url:
        yield url


def _call(gw: Gateway, token: str, client: httpx.Client | None = None) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(f"{gw.base_url}/responses", json=BODY,
                headers={"authorization": f"Bearer {token}"}, timeout=10)


def _ready(gw: Gateway) -> dict[str, Any]:
    return dict(httpx.get(f"{gw.admin_url}/readyz", timeout=2).json())


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _start_both(a: Gateway, b: Gateway) -> None:
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda g: g.start(), (a, b)))


class Prober(threading.Thread):
    """Calls one replica back to back until it refuses the token (or is told to stop)."""

    def __init__(self, gw: Gateway, token: str) -> None:
        super().__init__(daemon=True)
        self.gw, self.token = gw, token
        self.ok = 0
        self.refused_at: float | None = None
        self.refusal: dict[str, Any] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client() as client:
            while not self.stop.is_set():
                r = _call(self.gw, self.token, client)
                if r.status_code == 401:
                    self.refused_at = time.time()
                    self.refusal = r.json()["error"]
                    return
                assert r.status_code == 200, r.text
                self.ok += 1
                time.sleep(0.005)


def _revoke_and_measure(a: Gateway, b: Gateway, token: str, key_id: str, db_url: str,
                        label: str) -> float:
    """Revoke with the CLI of replica a; seconds until replica b refused (from the commit)."""
    prober = Prober(b, token)
    prober.start()
    _wait(lambda: prober.ok >= 3, 5, "replica b to serve the token")
    out = a.cli("token", "revoke", key_id)
    cli_done = time.time()
    prober.join(timeout=2.0)  # bounded: far past the 1 s the design promises
    prober.stop.set()
    prober.join(5)
    store = SQLStore(db_url)
    try:
        record = store.get_key(key_id)
    finally:
        store.close()
    assert record is not None and record.revoked_at is not None
    assert prober.refused_at is not None, f"replica b still serves a revoked token ({label})"
    latency = prober.refused_at - record.revoked_at.timestamp()
    print(f"\n[{label}] replica b refused {latency * 1000:.0f} ms after the revocation was"
          f" committed ({(prober.refused_at - cli_done) * 1000:+.0f} ms from the CLI's exit;"
          f" {prober.ok} calls served before)\n  cli: {out.stdout.strip()}")
    assert prober.refusal.get("code") == "token_revoked", prober.refusal
    assert latency < 1.0, f"{label}: {latency:.3f}s"
    return latency


def test_revocation_reaches_the_other_replica_and_ledgers_meet(
        tmp_path: Path, fake: FakeProvider, pg_url: str) -> None:
    fake.tool_calls = 0
    with services.redis_namespace() as prefix:
        a, b = make_replicas(tmp_path, fake.base_url, pg_url, services.redis_url(), prefix)
        token, key_id = a.issue_token()  # also migrates the shared database
        _start_both(a, b)
        try:
            assert _ready(a)["checks"]["redis"]["ok"]
            _wait(lambda: _ready(b)["checks"]["redis"]["connected"], 5, "b subscribed")

            # One call per replica: both rows land in the one PostgreSQL ledger.
            ids = {}
            for name, gw in (("a", a), ("b", b)):
                r = _call(gw, token)
                assert r.status_code == 200, r.text
                ids[name] = r.headers["x-egress-request-id"]
            store = SQLStore(pg_url)
            try:
                _wait(lambda: len(store.ledger_rows()) >= 2, 10, "both ledger rows")
                rows = {r.request_id: r for r in store.ledger_rows()}
            finally:
                store.close()
            assert set(rows) == set(ids.values())
            costs = [rows[i].cost_usd for i in ids.values()]
            assert all(c is not None and c > 0 for c in costs)
            total = sum((c for c in costs if c is not None), Decimal(0))

            # `agent-egress spend` from a third home, told only the database URL.
            cli_home = tmp_path / "reporting"
            cli_home.mkdir()
            env = {**a.env, "AGENT_EGRESS_HOME": str(cli_home),
                   "AGENT_EGRESS_DATABASE_URL": pg_url}
            env.pop("AGENT_EGRESS_MASTER_KEY", None)
            res = subprocess.run([AGENT_EGRESS, "spend", "--by", "key", "--format", "json"],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            report = json.loads(res.stdout)
            assert [(r["key"], r["calls"]) for r in report] == [(key_id, 2)]
            assert Decimal(report[0]["cost_usd"]) == total.quantize(Decimal("0.000001"))

            for gw in (a, b):  # both replicas hold the record in their key cache now
                assert _call(gw, token).status_code == 200

            _revoke_and_measure(a, b, token, key_id, pg_url, "redis up")
            assert _call(a, token).status_code == 401
            _wait(lambda: f"revocation of {key_id} received from redis" in b.logs(), 2,
                  "replica b to log the pushed revocation")
        finally:
            a.stop()
            b.stop()


def test_poll_catches_revocation_while_redis_is_down(
        tmp_path: Path, fake: FakeProvider, pg_url: str) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server to start (and kill) a private Redis")
    fake.tool_calls = 0
    own = services.RedisServer().start()  # the shared Redis must stay up for others
    try:
        a, b = make_replicas(tmp_path, fake.base_url, pg_url, own.url, "ae-test-down:")
        token, key_id = a.issue_token()
        _start_both(a, b)
        try:
            for gw in (a, b):
                _wait(lambda gw=gw: _ready(gw)["checks"]["redis"]["connected"], 5, "subscribed")
                assert _call(gw, token).status_code == 200
            own.kill()
            for gw in (a, b):
                _wait(lambda gw=gw: not _ready(gw)["checks"]["redis"]["connected"], 5,
                      "the replica to notice Redis is gone")
                checks = _ready(gw)["checks"]
                assert checks["redis"]["ok"] and checks["store"]["ok"]  # degraded, still ready
            _revoke_and_measure(a, b, token, key_id, pg_url, "redis down")
            assert "received from redis" not in b.logs()
        finally:
            a.stop()
            b.stop()
    finally:
        own.stop()


# the bus alone ------------------------------------------------------------
async def test_bus_delivers_and_flushes_on_every_reconnect() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = services.RedisServer().start()
    bus = RevocationBus(server.url, "t:", ping_interval=0.5, backoff_initial=0.05,
                        backoff_max=0.2)
    revoked: list[str] = []
    resets: list[float] = []
    task = asyncio.create_task(bus.run(revoked.append, lambda: resets.append(time.monotonic())))

    async def until(cond: Any, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    try:
        await until(lambda: bus.connected)
        assert len(resets) == 1
        assert await bus.publish("key_1") == 1
        t0 = time.monotonic()
        assert await asyncio.to_thread(publish_sync, server.url, "t:", "key_2")
        await until(lambda: revoked == ["key_1", "key_2"])
        print(f"\nbus delivery {1000 * (time.monotonic() - t0):.1f} ms")
        assert await asyncio.to_thread(publish_sync, server.url, "other:", "key_x")

        server.kill()
        await until(lambda: not bus.connected)
        t0 = time.monotonic()
        assert await asyncio.to_thread(publish_sync, server.url, "t:", "key_3") is False
        assert time.monotonic() - t0 < 5  # never hangs the CLI (1 s socket timeouts)
        assert bus.status()["connected"] is False and bus.status().get("last_error")

        server.start()  # same port: the bus comes back by itself and flushes the cache
        await until(lambda: bus.connected and len(resets) == 2)
        assert await bus.publish("key_4") == 1
        await until(lambda: revoked[-1] == "key_4")
        assert "key_3" not in revoked and "key_x" not in revoked
        assert bus.status()["reconnects"] == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await bus.close()
        server.stop()


def test_publish_sync_never_raises() -> None:
    port = services.free_port()
    t0 = time.monotonic()
    assert publish_sync(f"redis://127.0.0.1:{port}/0", "p:", "key_1") is False
    assert publish_sync("not-a-url", "p:", "key_1") is False
    assert time.monotonic() - t0 < 5

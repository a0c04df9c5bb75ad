"""Process and Redis faults with real gateway processes (issue 12).

* SIGKILL of one of two replicas mid-stream: the other keeps serving, the dead
  one's budget reservation holds the budget only until its lease expires, and
  afterwards the PostgreSQL ledger and the Redis counters agree.
* SIGTERM under load: 20 slow streams in flight all finish, exit 0, one ledger
  row each.
* A Redis restart (our own redis-server, data lost): revocation, budget counters
  (rebuilt from the ledger: no unlimited window) and shared breakers recover.

PostgreSQL down/up is tests/test_budgets_e2e.py::test_postgres_down_spools_the_ledger_and_replays_it
and the OTLP collector gone is tests/test_traces_e2e.py; this file does not repeat them.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import services
import yaml
from conftest import Gateway, make_gateway, make_replicas
from fakeprovider import FakeProvider
from test_faults_store import start_gateway
from test_replicas import _revoke_and_measure, _wait

from agent_egress.addon.budget_policy import NANO_PER_USD
from agent_egress.addon.store.sql import SQLStore

PRICES = {"gpt-5.5": {"input_per_mtok": "10", "output_per_mtok": "10"}}
BODY: dict[str, Any] = {"model": "gpt-5.5", "input": [{"role": "user", "content": "hi"}],
                        "store": False}
LEASE_S = 30  # the shortest lease the config accepts (budgets.reservation.lease_seconds)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with services.fresh_database() as url:
        yield url


def _start_both(a: Gateway, b: Gateway) -> None:
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(start_gateway, (a, b)))


def _configure(gw: Gateway, fake: FakeProvider, **extra: Any) -> None:
    cfg = gw.home / "config.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["providers"] = [{"name": "openai", "kind": "openai", "base_url": fake.base_url,
                          "key": "openai", "prices": PRICES}]
    data["guardrails"] = {"enabled": False}  # not under test; Presidio slows startup
    data.update(extra)
    cfg.write_text(yaml.safe_dump(data))


def _post(gw: Gateway, token: str, stream: bool = False) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/responses", json={**BODY, "stream": stream},
                      headers={"authorization": f"Bearer {token}"}, timeout=30)


def _team_counter(url: str, prefix: str, team: str = "acme/payments") -> tuple[int, int]:
    """(spent, reserved) nano-USD in Redis for the team's monthly budget."""
    client = redis.Redis.from_url(url)
    try:
        month = time.strftime("m%Y-%m", time.gmtime())
        sn, rn = client.hmget(f"{prefix}bc:team:{team}|{month}", "sn", "rn")
        return int(sn or 0), int(rn or 0)
    finally:
        client.close()


def _ledger_nano(pg_url: str, team: str = "payments") -> tuple[int, list[Any]]:
    store = SQLStore(pg_url)
    try:
        rows = [r for r in store.ledger_rows() if r.team == team]
    finally:
        store.close()
    return int(sum((r.cost_usd or Decimal(0)) for r in rows) * NANO_PER_USD), rows


def test_sigkill_of_one_replica_mid_stream(tmp_path: Path, fake: FakeProvider,
                                           pg_url: str) -> None:
    """Budget 0.11 USD; each reservation ~0.05, each call costs 0.0125. While the dead
    replica's reservation holds, the survivor can admit only one more call; once the
    lease expires (LEASE_S) the budget is free again, with no manual step.

    The lease runs from the stream's start, so replica b starts while that stream runs
    (it is up before a is killed): its start-up overlaps the lease instead of adding to
    the test's time."""
    fake.tool_calls = 0
    rurl = services.redis_url()
    with services.redis_namespace() as prefix:
        a, b = make_replicas(tmp_path, fake.base_url, pg_url, rurl, prefix)
        for gw in (a, b):
            _configure(gw, fake, budgets={
                "teams": {"acme/payments": [{"period": "monthly", "usd": "0.11"}]},
                "reservation": {"output_tokens": 5000, "max_usd": 1,
                                "lease_seconds": LEASE_S}})
        try:
            token, _ = a.issue_token()
            start_gateway(a)
            # a stream far longer than b's start-up (~3 s; much more on a loaded box):
            # it is still in flight when a is killed
            fake.event_delay, fake.delta_count = 0.25, 480
            got: dict[str, Any] = {}

            def stream() -> None:
                try:
                    with httpx.stream("POST", f"{a.base_url}/responses",
                                      json={**BODY, "stream": True}, timeout=30,
                                      headers={"authorization": f"Bearer {token}"}) as r:
                        for chunk in r.iter_bytes():
                            got["bytes"] = got.get("bytes", 0) + len(chunk)
                except httpx.HTTPError as e:
                    got["error"] = type(e).__name__

            t = threading.Thread(target=stream)
            t.start()
            _wait(lambda: got.get("bytes", 0) > 0, 10, "the stream on replica a to start")
            reserved_at = time.monotonic()  # (just after) the reservation and its lease
            start_gateway(b)
            assert "error" not in got and t.is_alive(), "a's stream ended before the kill"
            assert a.proc is not None
            a.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            a.proc.wait(10)
            t.join(15)
            assert "error" in got, "the client of the killed replica saw its stream end"
            fake.event_delay, fake.delta_count = 0.0, 4
            spent, reserved = _team_counter(rurl, prefix)
            assert spent == 0 and reserved > 0, "the dead replica's reservation is held"

            # The survivor serves: one call fits beside the dead reservation, then the
            # budget is held by it (refused as spent, a 400) until the lease ends.
            assert _post(b, token).status_code == 200
            held = _post(b, token)
            assert held.status_code == 400, held.text
            assert "reserved by calls in flight" in held.json()["error"]["message"]
            served_again = None
            deadline = time.monotonic() + LEASE_S + 20
            while time.monotonic() < deadline:
                if _post(b, token).status_code == 200:
                    served_again = time.monotonic() - killed_at
                    break
                time.sleep(0.25)
            assert served_again is not None, "the dead replica's reservation never expired"
            b.stop()
            ledger_nano, rows = _ledger_nano(pg_url)
            spent, reserved = _team_counter(rurl, prefix)
            print(f"\n[SIGKILL] replica b served 1 call at once, then refused while the dead"
                  f" reservation held; served again {served_again:.1f} s after the kill,"
                  f" {served_again + killed_at - reserved_at:.1f} s after the stream began"
                  f" (lease {LEASE_S} s). Ledger {len(rows)} rows = {ledger_nano} nano-USD;"
                  f" Redis spent {spent}, reserved {reserved}")
            assert len(rows) == 2 and all(r.outcome == "ok" for r in rows)
            # the killed call never settled: neither the ledger nor the counters count it
            assert spent == ledger_nano and reserved == 0
        finally:
            a.stop()
            b.stop()


def test_sigterm_under_load_finishes_20_streams_and_loses_no_row(
        tmp_path: Path, fake: FakeProvider) -> None:
    """tests/test_gateway_http.py drains one stream; this is the same under load."""
    n = 20
    fake.tool_calls = 0
    fake.event_delay, fake.delta_count = 0.1, 20  # ~2.5 s per stream
    gw = make_gateway(tmp_path, fake.base_url, guardrails={"enabled": False})
    start_gateway(gw)
    token, _ = gw.issue_token()
    bodies: list[bytes] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            with httpx.stream("POST", f"{gw.base_url}/responses", timeout=60,
                              json={**BODY, "stream": True},
                              headers={"authorization": f"Bearer {token}"}) as r:
                body = b"".join(r.iter_bytes())
            with lock:
                bodies.append(body)
        except httpx.HTTPError as e:
            with lock:
                errors.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        fake.wait_for_requests(n, timeout=20)
        assert gw.proc is not None
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = gw.proc.wait(60)
        took = time.monotonic() - t0
    finally:
        gw.stop()
    done = sum(b"response.completed" in body for body in bodies)
    rows = gw.ledger()
    print(f"\n[SIGTERM] {n} streams in flight: {done} completed, {len(errors)} errors;"
          f" exit {code} {took:.1f} s after the signal; {len(rows)} ledger rows")
    assert errors == [] and done == n
    assert code == 0
    assert len(rows) == n and all(r["outcome"] == "ok" for r in rows)
    assert "Traceback" not in gw.logs()


def test_redis_restart_revocation_counters_and_breakers_recover(
        tmp_path: Path, fake: FakeProvider, pg_url: str) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server to start (and restart) a private Redis")
    fake.tool_calls = 0
    own = services.RedisServer().start()  # never the machine's shared Redis
    prefix = "ae-test-restart:"
    try:
        a, b = make_replicas(tmp_path, fake.base_url, pg_url, own.url, prefix)
        for gw in (a, b):
            _configure(gw, fake, budgets={
                "teams": {"acme/payments": [{"period": "monthly", "usd": "0.03"}]},
                "reservation": {"max_usd": "0.001"}},
                failover={"breaker": {"failures": 2, "open_seconds": 60,
                                      "sync_seconds": 0.2}})
        token, _ = a.issue_token()  # acme/payments: the budgeted team
        free_token, free_key = a.issue_token(user="bob", team="platform")
        breaker_token, _ = a.issue_token(user="carol", team="platform")
        _start_both(a, b)
        try:
            for gw in (a, b):
                _wait(lambda gw=gw: _ready(gw)["redis"]["connected"], 5, "subscribed")
            # 2 x 0.0125 USD spent before the restart, both rows in the ledger
            assert [_post(gw, token).status_code for gw in (a, b)] == [200, 200]
            _wait(lambda: len(_ledger_nano(pg_url)[1]) == 2, 10, "two ledger rows")
            assert _team_counter(own.url, prefix)[0] == 25_000_000

            own.kill()
            own.start()  # same port, empty: every counter, lease and breaker key is gone
            assert _team_counter(own.url, prefix) == (0, 0)
            for gw in (a, b):
                _wait(lambda gw=gw: _ready(gw)["redis"]["connected"], 10,
                      "the replica to resubscribe")

            # revocation: pushed over the new connection (and polled from the store)
            latency = _revoke_and_measure(a, b, free_token, free_key, pg_url,
                                          "after a Redis restart")
            assert _post(a, free_token).status_code == 401
            _wait(lambda: f"revocation of {free_key} received from redis" in b.logs(), 2,
                  "replica b to log the pushed revocation")

            # counters: rebuilt from the ledger, so the spend before the restart counts
            # A replica that saw Redis fail (a background gauge refresh during the restart
            # is enough) fails closed (503, Retry-After 5) until it probes Redis again,
            # at most 5 s later; a client retries, as Codex does.
            deadline = time.monotonic() + 12
            third = _post(b, token)
            while third.status_code == 503 and time.monotonic() < deadline:
                assert third.json()["error"]["code"] == "limits_unavailable", third.text
                time.sleep(0.5)
                third = _post(b, token)
            assert third.status_code == 200, third.text  # 0.025 + 0.001 <= 0.03
            fourth = _post(a, token)
            while fourth.status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.5)
                fourth = _post(a, token)
            assert fourth.status_code == 400, "the budget was forgotten with Redis' data"
            assert fourth.json()["error"]["code"] == "budget_exceeded"
            _wait(lambda: len(_ledger_nano(pg_url)[1]) == 3, 10, "three ledger rows")
            ledger_nano = _ledger_nano(pg_url)[0]
            spent, reserved = _team_counter(own.url, prefix)
            assert spent == ledger_nano == 37_500_000 and reserved == 0

            # breakers: an open breaker on a is shared with b again
            fake.fail_next = [500, 500]
            assert [_post(a, breaker_token).status_code for _ in range(2)] == [500, 500]
            t0 = time.monotonic()
            for gw in (a, b):
                _wait(lambda gw=gw: _breaker(gw) == "open", 5, "the breaker to open")
            adopted = time.monotonic() - t0
            assert _ready(b)["breakers"]["redis"] is True
            print(f"\n[Redis restart] revocation reached replica b in {latency * 1000:.0f} ms;"
                  f" budget spent before the restart enforced after it (ledger"
                  f" {ledger_nano} nano-USD = Redis counter); breaker opened on a seen on b"
                  f" after {adopted:.2f} s")
            assert "Traceback" not in a.logs() + b.logs()
        finally:
            a.stop()
            b.stop()
    finally:
        own.stop()


def _ready(gw: Gateway) -> dict[str, Any]:
    return dict(httpx.get(f"{gw.admin_url}/readyz", timeout=2).json()["checks"])


def _breaker(gw: Gateway) -> str:
    return str(_ready(gw)["breakers"]["providers"]["openai/openai"]["state"])

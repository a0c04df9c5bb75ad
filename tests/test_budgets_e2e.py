"""Budgets and rate limits through the real gateway: the real Codex reads our refusals,
two replicas share one budget under 200 concurrent calls, and faults (Redis gone,
PostgreSQL gone, bad config) end in clear errors with nothing lost."""

from __future__ import annotations

import csv
import io
import json
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
from conftest import AGENT_EGRESS, Gateway, make_gateway, make_replicas, run_codex
from fakeprovider import FakeProvider
from test_replicas import _start_both

from agent_egress.addon.budget_policy import NANO_PER_USD
from agent_egress.addon.limiter.sql import SQLLimiter
from agent_egress.addon.store.base import usd_to_nano
from agent_egress.addon.store.sql import SQLStore

BODY: dict[str, Any] = {"model": "gpt-5.5", "input": [{"role": "user", "content": "hi"}],
                        "stream": False, "store": False}
# 10 USD per million tokens, any kind: each fake call (1,250 tokens) costs 0.0125 USD.
PRICES = {"gpt-5.5": {"input_per_mtok": "10", "output_per_mtok": "10"}}
CALL_USD = Decimal("0.0125")


def _providers(fake: FakeProvider) -> list[dict[str, Any]]:
    return [{"name": "openai", "kind": "openai", "base_url": fake.base_url, "key": "openai",
             "prices": PRICES}]


def _post(gw: Gateway, token: str, client: httpx.Client | None = None,
          body: dict[str, Any] | None = None) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(f"{gw.base_url}/responses", json=body or BODY,
                headers={"authorization": f"Bearer {token}"}, timeout=30)



def _codex_text(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


def test_codex_shows_the_spent_budget_and_does_not_retry(tmp_path: Path,
                                                          fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url, providers=_providers(fake), budgets={
        "teams": {"acme/payments": [{"period": "monthly", "usd": "0.02"}]},
        "reservation": {"max_usd": "0.001"}})
    gw.start()
    try:
        token, _ = gw.issue_token()
        first = run_codex(tmp_path, gw.base_url, token, "run the tool")
        assert first.returncode == 0, _codex_text(first)  # 2 calls: 0.025 USD, over 0.02
        served = len(fake.requests)
        second = run_codex(tmp_path, gw.base_url, token, "run the tool again")
        out = _codex_text(second)
        assert second.returncode != 0
        assert "monthly budget of team:acme/payments is exhausted" in out, out
        assert "spent $0.0250 of $0.0200" in out and "resets at" in out, out
        assert len(fake.requests) == served, "a refused call reached the provider"
        # Final, not transient: Codex showed it after one request, no retry loop.
        assert gw.metric("agent_egress_refusals_total", rule="budget_exceeded") == 1
        assert {r["agent"] for r in gw.ledger()} == {"codex"}  # finance splits by agent
        by_agent = json.loads(gw.cli("spend", "--by", "agent", "--format", "json").stdout)
        assert [(a["agent"], a["calls"]) for a in by_agent] == [("codex", 2)]
    finally:
        gw.stop()


def test_codex_waits_out_a_429_and_completes(tmp_path: Path, fake: FakeProvider) -> None:
    """One call in flight per key: Codex's call meets a 429 + Retry-After while another
    stream of the same key runs, waits as told, retries and finishes its turn."""
    fake.event_delay = 0.25  # ~3 s per streamed answer
    gw = make_gateway(tmp_path, fake.base_url, rate_limits={"per_key": {"concurrent": 1}})
    gw.start()
    try:
        token, _ = gw.issue_token()
        hog = threading.Thread(target=_post, args=(gw, token),
                               kwargs={"body": {**BODY, "stream": True}})
        hog.start()
        deadline = time.monotonic() + 5
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        res = run_codex(tmp_path, gw.base_url, token, "run the tool", timeout=90)
        hog.join(30)
        assert res.returncode == 0, _codex_text(res)
        assert gw.metric("agent_egress_refusals_total", rule="rate_limited") >= 1
    finally:
        gw.stop()


def test_rate_limit_refusal_is_a_429_with_retry_after(tmp_path: Path,
                                                      fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url, rate_limits={"per_user": {"rpm": 2}})
    gw.start()
    try:
        token, _ = gw.issue_token()
        codes = [_post(gw, token) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        r = codes[2]
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.json()["error"]["code"] == "rate_limited"
        assert "user:acme/alice: 2 requests per minute" in r.json()["error"]["message"]
    finally:
        gw.stop()


def test_budget_cli_and_api_for_users_and_keys(tmp_path: Path, fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url, providers=_providers(fake), budgets={
        "teams": {"acme/payments": [{"period": "daily", "usd": "5", "mode": "soft"}]},
        "reservation": {"output_tokens": 100}})
    gw.start()
    try:
        token, key_id = gw.issue_token()
        gw.cli("budget", "set", "--scope", f"key:{key_id}", "--period", "total",
               "--tokens", "5000")
        listed = json.loads(gw.cli("budget", "list", "--format", "json").stdout)
        assert {(b["scope"], b["source"]) for b in listed} == {
            ("team:acme/payments", "config"), (f"key:{key_id}", "api")}
        bad = gw.cli("budget", "set", "--scope", "team:acme/payments", "--period", "daily",
                     "--usd", "1", check=False)
        assert bad.returncode != 0 and "config file" in bad.stderr
        neg = gw.cli("budget", "set", "--scope", f"key:{key_id}", "--period", "daily",
                     "--usd", "-3", check=False)
        assert neg.returncode != 0 and "usd must be > 0" in neg.stderr
        deadline = time.monotonic() + 10  # replicas pick API changes up by polling (~2 s)
        while _post(gw, token).status_code == 200:
            assert time.monotonic() < deadline, "the key's token budget never applied"
        r = _post(gw, token)
        assert r.status_code == 400 and "total budget of key:" in r.json()["error"]["message"]
        assert "never resets" in r.json()["error"]["message"]
        status = json.loads(gw.cli("budget", "status", "--format", "json").stdout)
        by_scope = {s["scope"]: s for s in status}
        assert by_scope[f"key:{key_id}"]["spent_tokens"] >= 5000 - 200
        assert by_scope[f"key:{key_id}"]["remaining_tokens"] < 200
        team = by_scope["team:acme/payments"]
        assert Decimal(team["spent_usd"]) == CALL_USD * (
            by_scope[f"key:{key_id}"]["spent_tokens"] // 1250)
        assert team["resets_at"].startswith("20") and team["limit_usd"] == "5"
        # the gauges carry the same numbers (refreshed every 2 s)
        spent = by_scope[f"key:{key_id}"]["spent_tokens"]
        deadline = time.monotonic() + 6
        while gw.metric("agent_egress_budget_spent_tokens", scope=f"key:{key_id}") != spent:
            assert time.monotonic() < deadline, "the budget gauge never caught up"
            time.sleep(0.2)
        table = gw.cli("budget", "status", "--scope", "team:acme/payments").stdout
        assert "team:acme/payments" in table and "REMAINING_USD" in table
        gw.cli("budget", "delete", "--scope", f"key:{key_id}", "--period", "total")
        deadline = time.monotonic() + 10
        while _post(gw, token).status_code != 200:
            assert time.monotonic() < deadline, "deleting the budget did not apply"
    finally:
        gw.stop()


def test_spend_by_tag_and_period_reconciles_with_the_ledger(tmp_path: Path,
                                                            fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url, providers=_providers(fake))
    gw.start()
    try:
        token, _ = gw.issue_token()
        for project in ("apollo", "apollo", "gemini"):
            r = httpx.post(f"{gw.base_url}/responses", json=BODY, timeout=10, headers={
                "authorization": f"Bearer {token}", "x-egress-tag-project": project})
            assert r.status_code == 200
        _post(gw, token)  # untagged
        rows = gw.wait_ledger(4)
        month = rows[0]["ts"].strftime("%Y-%m")
        out = gw.cli("spend", "--by", "tag:project", "--period", month, "--format",
                     "csv").stdout
        got = {r["tag:project"]: r for r in csv.DictReader(io.StringIO(out))}
        assert got["apollo"]["calls"] == "2" and got["gemini"]["calls"] == "1"
        assert got["(none)"]["calls"] == "1"
        assert sum(Decimal(r["cost_usd"]) for r in got.values()) == sum(
            r["cost_usd"] for r in rows) == 4 * CALL_USD
        empty = gw.cli("spend", "--period", "1999-01", "--format", "json").stdout
        assert json.loads(empty) == []
        bad = gw.cli("spend", "--by", "tag:", check=False)
        assert bad.returncode != 0
    finally:
        gw.stop()


def test_bad_budget_config_is_a_clear_error(tmp_path: Path, fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url)
    cfg = gw.home / "config.yaml"
    cfg.write_text(cfg.read_text() + "budgets:\n  teams:\n    acme/payments:\n"
                   "      - {period: monthly, usd: -5}\n")
    res = subprocess.run([AGENT_EGRESS, "run"], env=gw.env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert "budgets.teams.acme/payments.0.usd" in res.stderr and "> 0" in res.stderr


# -- replicas: one budget, two gateways, Redis and PostgreSQL -----------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    with services.fresh_database() as url:
        yield url


def test_two_replicas_hold_one_team_budget_under_200_concurrent_calls(
        tmp_path: Path, fake: FakeProvider, pg_url: str) -> None:
    """Measured (printed): overshoot past 1 USD vs the reservations in flight at the end.
    Then ledger sums == Redis counters == spend report, to the nano-dollar."""
    fake.usage = type(fake.usage)(input_tokens=4000, cached_tokens=0, output_tokens=1000,
                                  reasoning_tokens=0)  # 0.05 USD per call at 10 USD/Mtok
    per_call = Decimal("0.05")
    with services.redis_namespace() as prefix:
        a, b = make_replicas(tmp_path, fake.base_url, pg_url, services.redis_url(), prefix)
        for gw in (a, b):
            cfg = gw.home / "config.yaml"
            import yaml
            data = yaml.safe_load(cfg.read_text())
            data["providers"] = _providers(fake)
            data["budgets"] = {"teams": {"acme/payments": [{"period": "monthly", "usd": 1}]},
                               # ~25 input + 5,000 output tokens: 0.0503 USD, just
                               # above each call's real 0.05 USD
                               "reservation": {"output_tokens": 5000, "max_usd": 1}}
            cfg.write_text(yaml.safe_dump(data))
        token, _ = a.issue_token()
        _start_both(a, b)
        try:
            outcomes: list[int] = []

            def one(i: int) -> int:
                gw = a if i % 2 else b
                return _post(gw, token).status_code

            with ThreadPoolExecutor(32) as pool:
                outcomes = list(pool.map(one, range(200)))
            ok = outcomes.count(200)
            assert set(outcomes) <= {200, 400}, outcomes
            assert outcomes.count(400) > 0
            for gw in (a, b):
                gw.stop()
            store = SQLStore(pg_url)
            try:
                rows = store.ledger_rows()
                spend = store.spend("team")
            finally:
                store.close()
            charged = sum((r.cost_usd or Decimal(0)) for r in rows)
            assert len(rows) == ok
            overshoot = charged - 1
            # Every reservation covers its call's real cost, so the reservations in flight
            # when the budget ran out leave no room for an overshoot: none is allowed.
            print(f"\n[budget race] 200 calls, 2 replicas, 32 at a time: {ok} served,"
                  f" {200 - ok} refused; charged {charged} USD against 1 USD"
                  f" (overshoot {overshoot} USD = {overshoot / per_call:.0f} calls)")
            assert charged <= 1
            assert spend[0].group == "payments" and spend[0].cost_usd == charged
            month = rows[0].ts.strftime("m%Y-%m")
            import redis as redis_sync
            client = redis_sync.Redis.from_url(services.redis_url())
            try:
                sn = client.hget(f"{prefix}bc:team:acme/payments|{month}", "sn")
                rn = client.hget(f"{prefix}bc:team:acme/payments|{month}", "rn")
            finally:
                client.close()
            assert sn is not None and Decimal(int(sn)) / NANO_PER_USD == charged
            assert int(rn or 0) == 0, "a settled or refused call left a reservation behind"
        finally:
            for gw in (a, b):
                gw.stop()


def test_redis_down_fails_closed_or_open_as_configured(tmp_path: Path,
                                                      fake: FakeProvider) -> None:
    dead = f"redis://127.0.0.1:{services.free_port()}/0"
    for policy in ("closed", "open"):
        home = tmp_path / policy
        home.mkdir()
        gw = make_gateway(home, fake.base_url, redis_url=dead, providers=_providers(fake),
                          budgets={"on_redis_down": policy, "teams": {"acme/payments": [
                              {"period": "monthly", "usd": "0.03"}]},
                              "reservation": {"max_usd": "0.001"}})
        gw.start(wait_ready=False)
        try:
            token, _ = gw.issue_token()
            r = _post(gw, token)
            if policy == "closed":
                assert r.status_code == 503 and r.headers["retry-after"] == "5"
                assert "Redis" in r.json()["error"]["message"]
                assert r.json()["error"]["code"] == "limits_unavailable"
            else:
                # counted in-process: the budget still holds (3 calls of 0.0125 > 0.03)
                codes = [r.status_code] + [_post(gw, token).status_code for _ in range(3)]
                assert codes == [200, 200, 200, 400], codes
                assert gw.metric("agent_egress_limits_degraded") == 1
        finally:
            assert gw.stop() == 0
        assert "Traceback" not in gw.logs()


def test_postgres_down_spools_the_ledger_and_replays_it(tmp_path: Path,
                                                        fake: FakeProvider) -> None:
    pg = services.PostgresServer(services.postgres_bindir() or Path("/nonexistent")).start()
    try:
        gw = make_gateway(tmp_path, fake.base_url, database_url=pg.url,
                          shutdown={"drain_seconds": 2, "flush_seconds": 2})
        # issued before the start: the key cache, cleared when the store's keys change
        # (seen by a 0.25 s poll), then keeps the key the first call caches
        token, key_id = gw.issue_token()
        gw.start()
        assert _post(gw, token).status_code == 200
        pg.halt()  # the database goes away with the gateway serving
        served = sum(_post(gw, token).status_code == 200 for _ in range(5))
        assert served == 5  # keys are cached; the ledger waits
        assert gw.stop() == 0
        assert (gw.home / "ledger-spool.jsonl").exists()
        pg.resume()
        gw.start()
        store = SQLStore(pg.url)
        try:
            deadline = time.monotonic() + 10
            while len(store.ledger_rows()) < 6 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(store.ledger_rows()) == 6
            # settles pending at shutdown are in the ledger, not the live counters:
            # `budget rebuild` re-derives the counters from it
            rebuilt = json.loads(gw.cli("budget", "rebuild", "--format", "json").stdout)
            assert "rebuilt from the ledger" in rebuilt["rebuilt"]
            sl = SQLLimiter(store.engine)
            total = sl.counters([f"key:{key_id}|total"])[f"key:{key_id}|total"]
            assert total == (sum(usd_to_nano(r.cost_usd) or 0 for r in store.ledger_rows()),
                             6 * fake.usage.total_tokens)
        finally:
            store.close()
        assert not (gw.home / "ledger-spool.jsonl").exists()
        gw.stop()
    finally:
        pg.stop()


def test_mid_stream_cut_off_ends_the_stream_codex_shows_why(tmp_path: Path,
                                                           fake: FakeProvider) -> None:
    """With cut_off_streams on, a stream that would pass the budget's headroom is ended at
    an event boundary with a final response.failed and the upstream is closed."""
    fake.tool_calls = 0  # a plain text answer, streamed in 60 deltas
    fake.answer_text = "All work and no play makes Jack a dull boy. " * 60
    fake.delta_count = 60
    fake.event_delay = 0.01
    gw = make_gateway(tmp_path, fake.base_url, providers=_providers(fake), budgets={
        "cut_off_streams": True, "reservation": {"max_usd": "0.0001"},
        "teams": {"acme/payments": [{"period": "monthly", "usd": "0.001"}],
                  "acme/platform": [{"period": "monthly", "usd": "0.001"}]}})
    gw.start()
    try:
        token, _ = gw.issue_token()
        events: list[dict[str, Any]] = []
        with httpx.stream("POST", f"{gw.base_url}/responses", json={**BODY, "stream": True},
                          headers={"authorization": f"Bearer {token}"}, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "response.failed" and "response.completed" not in kinds
        text = "".join(e.get("delta", "") for e in events
                       if e["type"] == "response.output_text.delta")
        # 0.001 USD at 10 USD/Mtok is 100 tokens, ~400 characters, less the input estimate
        assert 0 < len(text) < 600 < len(fake.answer_text)
        err = events[-1]["response"]["error"]
        assert err["type"] == "budget_exceeded" and "would pass a hard budget" in err["message"]
        rows = gw.wait_ledger(1)
        assert rows and rows[0]["outcome"] == "budget_cutoff" and rows[0]["cost_usd"] > 0
        # Codex (another team, budget untouched): stops at the event, shows why, no retry
        token2, _ = gw.issue_token(user="bob", team="platform")
        before = len(fake.requests)
        codex = run_codex(tmp_path, gw.base_url, token2, "say something long")
        out = _codex_text(codex)
        assert codex.returncode != 0
        assert "would pass a hard budget" in out, out
        assert len(fake.requests) - before == 1, "Codex retried a final cut-off"
    finally:
        gw.stop()

"""The gateway process over real sockets: streaming, metering, refusals, shutdown."""

from __future__ import annotations

import csv
import io
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import PROVIDER_KEY, Gateway, free_port, make_gateway
from fakeprovider import FakeProvider


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def responses_body(model: str = "gpt-5.5", stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "input": [{"role": "user", "content": "hi"}], "stream": stream,
            "store": False, **extra}


def test_first_event_reaches_client_while_upstream_still_streams(
        fake: FakeProvider, gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.event_delay = 0.25
    fake.tool_calls = 0
    arrivals: list[float] = []
    t0 = time.monotonic()
    with httpx.stream("POST", f"{gateway.base_url}/responses", json=responses_body(),
                      headers=auth(token), timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 8
    # Events arrive spread out as the fake sends them, not in one burst at the end.
    total = arrivals[-1]
    assert arrivals[0] < total / 3, arrivals
    assert arrivals[len(arrivals) // 2] < total * 0.8, arrivals
    row = gateway.wait_ledger(1)[0]
    assert row["ttfb_ms"] < row["duration_ms"] / 3


def test_session_and_turn_from_codex_headers(fake: FakeProvider, gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.tool_calls = 0
    headers = {**auth(token), "session-id": "0199aaaa-bbbb-cccc-dddd-eeeeffff0000",
               "x-codex-turn-metadata": json.dumps({"turn_id": "turn-7", "request_kind": "turn"})}
    r = httpx.post(f"{gateway.base_url}/responses", json=responses_body(), headers=headers,
                   timeout=10)
    assert r.status_code == 200
    r = httpx.post(f"{gateway.base_url}/responses",
                   json=responses_body(prompt_cache_key="pck-session-2"), headers=auth(token),
                   timeout=10)
    assert r.status_code == 200
    rows = gateway.wait_ledger(2)
    assert (rows[0]["session_id"], rows[0]["turn_id"]) == (
        "0199aaaa-bbbb-cccc-dddd-eeeeffff0000", "turn-7")
    assert (rows[1]["session_id"], rows[1]["turn_id"]) == ("pck-session-2", None)


def test_compact_and_non_streaming_responses_are_metered(fake: FakeProvider,
                                                         gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.tool_calls = 0
    r = httpx.post(f"{gateway.base_url}/responses/compact",
                   json={"model": "gpt-5.5", "input": []}, headers=auth(token), timeout=10)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{gateway.base_url}/responses", json=responses_body(stream=False),
                   headers=auth(token), timeout=10)
    assert r.status_code == 200, r.text
    rows = gateway.wait_ledger(2)
    assert [row["api"] for row in rows] == ["openai.responses.compact", "openai.responses"]
    for row in rows:
        assert row["input_tokens"] == fake.usage.input_tokens
        assert row["output_tokens"] == fake.usage.output_tokens
        assert row["cost_usd"] > 0


def test_chat_completions_streaming_and_not(fake: FakeProvider, gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    body = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=auth(token),
                   timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1200
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions",
                      json={**body, "stream": True}, headers=auth(token), timeout=10) as r:
        text = "".join(r.iter_text())
    assert "data: [DONE]" in text
    # The gateway asked for usage on the stream so it can meter it.
    sent = fake.requests_to("/v1/chat/completions")[-1].json
    assert sent["stream_options"]["include_usage"] is True
    rows = gateway.wait_ledger(2)
    for row in rows:
        assert row["api"] == "openai.chat"
        assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"],
                row["reasoning_tokens"]) == (1200, 1000, 50, 20)
        assert not row["usage_estimated"]


def test_bad_input_gets_openai_errors_and_never_reaches_provider(tmp_path: Path,
                                                                 fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url, limits={"max_body_bytes": 4096})
    gw.start()
    try:
        token, _ = gw.issue_token()
        cases = [
            (httpx.post(f"{gw.base_url}/responses", content=b"not json{",
                        headers=auth(token)), 400, "invalid_request"),
            (httpx.post(f"{gw.base_url}/responses", json={"input": "hi"},
                        headers=auth(token)), 400, "invalid_request"),
            (httpx.post(f"{gw.base_url}/responses",
                        json=responses_body(input="x" * 10_000), headers=auth(token)),
             413, "body_too_large"),
            (httpx.get(f"{gw.base_url}/models", headers=auth(token)), 404, "unknown_path"),
            (httpx.post(f"{gw.base_url}/responses", json=responses_body()), 401,
             "token_missing"),
        ]
        for resp, status, code in cases:
            assert resp.status_code == status, resp.text
            assert resp.headers["content-type"] == "application/json"
            err = resp.json()["error"]
            assert err["code"] == code and "request id req_" in err["message"]
            assert resp.headers["x-egress-request-id"] in err["message"]
        assert fake.requests == []
        assert httpx.get(f"{gw.admin_url}/healthz").status_code == 200
        metrics = httpx.get(f"{gw.admin_url}/metrics").text
        assert 'agent_egress_refusals_total{rule="body_too_large"} 1.0' in metrics
    finally:
        assert gw.stop() == 0


def test_upstream_unreachable_is_a_json_error_not_mitmproxys_page(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = make_gateway(tmp_path, dead)
    gw.start()
    try:
        token, _ = gw.issue_token()
        r = httpx.post(f"{gw.base_url}/responses", json=responses_body(), headers=auth(token),
                       timeout=10)
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert err["code"] == "upstream_unreachable"
        assert r.headers["x-egress-request-id"] in err["message"]
        assert "<html" not in r.text.lower()
        rows = gw.wait_ledger(1)
        assert rows[0]["outcome"] == "upstream_unreachable" and rows[0]["cost_usd"] == 0
        # still serving
        r = httpx.post(f"{gw.base_url}/responses", json=responses_body(), headers=auth(token),
                       timeout=10)
        assert r.status_code == 502
    finally:
        assert gw.stop() == 0


def test_stream_cut_before_usage_is_charged_an_estimate(fake: FakeProvider,
                                                        gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.tool_calls = 0
    fake.cut_stream_after = 4
    with httpx.stream("POST", f"{gateway.base_url}/responses", json=responses_body(),
                      headers=auth(token), timeout=10) as r:
        body = b"".join(r.iter_bytes())
    assert b"response.completed" not in body
    row = gateway.wait_ledger(1)[0]
    assert row["usage_estimated"] is True
    assert row["outcome"] == "stream_cut"
    assert row["input_tokens"] > 0 and row["cost_usd"] > 0


def test_unknown_model_is_recorded_unpriced_not_zero(fake: FakeProvider,
                                                      gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.tool_calls = 0
    r = httpx.post(f"{gateway.base_url}/responses", json=responses_body(model="acme-llm-9"),
                   headers=auth(token), timeout=10)
    assert r.status_code == 200
    row = gateway.wait_ledger(1)[0]
    assert row["cost_usd"] is None and row["price_source"] == "unpriced"
    metrics = httpx.get(f"{gateway.admin_url}/metrics").text
    assert 'agent_egress_unpriced_calls_total{model="acme-llm-9",provider="openai"} 1.0' in metrics
    assert "acme-llm-9" in gateway.logs() and "no price" in gateway.logs()


def test_price_override_from_config(tmp_path: Path, fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url, providers=[{
        "name": "openai", "kind": "openai", "base_url": fake.base_url, "key": "openai",
        "prices": {"acme-*": {"input_per_mtok": 1, "cached_input_per_mtok": "0.1",
                              "output_per_mtok": 10}}}])
    gw.start()
    try:
        token, _ = gw.issue_token()
        fake.tool_calls = 0
        httpx.post(f"{gw.base_url}/responses", json=responses_body(model="acme-llm-9"),
                   headers=auth(token), timeout=10)
        row = gw.wait_ledger(1)[0]
        # 200 uncached * $1 + 1000 cached * $0.1 + 50 output * $10, per million
        assert str(row["cost_usd"]) == "0.0008"
        assert row["price_source"] == "override"
    finally:
        gw.stop()


def test_sigterm_drains_in_flight_stream_then_exits_zero(fake: FakeProvider,
                                                         gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.tool_calls = 0
    fake.event_delay = 0.15  # ~2 s stream
    result: dict[str, Any] = {}

    def client() -> None:
        with httpx.stream("POST", f"{gateway.base_url}/responses", json=responses_body(),
                          headers=auth(token), timeout=30) as r:
            result["body"] = b"".join(r.iter_bytes())

    t = threading.Thread(target=client)
    t.start()
    fake.wait_for_requests(1)
    time.sleep(0.3)
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert b"response.completed" in result["body"], "the in-flight stream finished"
    assert gateway.proc.wait(30) == 0
    rows = gateway.ledger()
    assert len(rows) == 1 and rows[0]["outcome"] == "ok"
    assert "drained" in gateway.logs() and "Traceback" not in gateway.logs()


def test_readyz_reports_missing_provider_key(tmp_path: Path, fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url)
    gw.cli("vault", "delete", "openai")
    gw.start(wait_ready=False)
    try:
        r = httpx.get(f"{gw.admin_url}/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["provider_key"]["fix"] == "agent-egress vault set openai"
        token, _ = gw.issue_token()
        r = httpx.post(f"{gw.base_url}/responses", json=responses_body(), headers=auth(token))
        assert r.status_code == 503 and r.json()["error"]["code"] == "provider_key_missing"
        gw.cli("vault", "set", "openai", input=PROVIDER_KEY)
        r = httpx.post(f"{gw.base_url}/responses", json=responses_body(), headers=auth(token))
        assert r.status_code == 200
        assert httpx.get(f"{gw.admin_url}/readyz").status_code == 200
    finally:
        gw.stop()


def test_expired_token_is_refused(fake: FakeProvider, gateway: Gateway) -> None:
    token, key_id = gateway.issue_token(ttl="1m")
    from agent_egress.addon.store.sql import SQLStore
    store = SQLStore(f"sqlite:///{gateway.home / 'agent-egress.db'}")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE gateway_keys SET expires_at = '2020-01-01 00:00:00'")
    store.close()
    r = httpx.post(f"{gateway.base_url}/responses", json=responses_body(), headers=auth(token))
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
    assert key_id in r.json()["error"]["message"]


def test_no_secret_in_logs_bodies_or_ledger(tmp_path: Path, fake: FakeProvider,
                                            gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.tool_calls = 0
    bodies = []
    for hdrs in (auth(token), auth(token + "x"), auth(PROVIDER_KEY), {"x-api-key": token}):
        r = httpx.post(f"{gateway.base_url}/responses", json=responses_body(), headers=hdrs,
                       timeout=10)
        bodies.append(r.text + json.dumps(dict(r.headers)))
    r = httpx.post(f"{gateway.base_url}/responses", content=b"{bad " + token.encode(),
                   headers=auth(token), timeout=10)
    bodies.append(r.text)
    gateway.wait_ledger(1)
    cli_out = "".join(gateway.cli(*a).stdout for a in (
        ("token", "list"), ("vault", "list"), ("spend", "--by", "user"),
        ("spend", "--by", "model", "--format", "json")))
    gateway.stop()
    haystacks = {
        "gateway log": gateway.logs(),
        "error bodies": "\n".join(bodies[1:]),
        "cli output": cli_out,
        "database file": (gateway.home / "agent-egress.db").read_bytes().decode("latin-1"),
        "vault file": (gateway.home / "vault.json").read_text(),
        "audit log": (gateway.home / "audit.jsonl").read_text(),
    }
    for name, text in haystacks.items():
        assert token not in text, f"gateway token leaked into {name}"
        assert PROVIDER_KEY not in text, f"provider key leaked into {name}"
    # The one successful call reached the provider with the vaulted key only.
    assert [q.header("authorization") for q in fake.requests] == [f"Bearer {PROVIDER_KEY}"]


def test_spend_report_formats(fake: FakeProvider, gateway: Gateway) -> None:
    fake.tool_calls = 0
    t1, _ = gateway.issue_token(user="alice", team="payments")
    t2, _ = gateway.issue_token(user="bob", team="search")
    for tok, n in ((t1, 2), (t2, 1)):
        for _ in range(n):
            httpx.post(f"{gateway.base_url}/responses", json=responses_body(), headers=auth(tok),
                       timeout=10)
    rows = gateway.wait_ledger(3)
    per_call = rows[0]["cost_usd"]
    out = gateway.cli("spend", "--by", "team", "--format", "csv").stdout
    table = list(csv.DictReader(io.StringIO(out)))
    by_team = {r["team"]: r for r in table}
    assert by_team["payments"]["calls"] == "2" and by_team["search"]["calls"] == "1"
    assert float(by_team["payments"]["cost_usd"]) == pytest.approx(float(per_call * 2))
    users = json.loads(gateway.cli("spend", "--by", "user", "--format", "json").stdout)
    assert {u["user"] for u in users} == {"alice", "bob"}
    text = gateway.cli("spend", "--by", "model").stdout
    assert "gpt-5.5" in text and "total cost_usd" in text
    future = gateway.cli("spend", "--since", "2999-01-01", "--format", "json").stdout
    assert json.loads(future) == []


def test_explicit_proxy_listener_meters_provider_and_passes_other_hosts(
        fake: FakeProvider, gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.tool_calls = 0
    proxy = f"http://127.0.0.1:{gateway.proxy_port}"
    with httpx.Client(proxy=proxy, timeout=10) as client:
        # The provider's own URL, through the proxy: authenticated, swapped, metered.
        r = client.post(f"{fake.base_url}/responses", json=responses_body(),
                        headers=auth(token))
        assert r.status_code == 200, r.text
        assert fake.requests[-1].header("authorization") == f"Bearer {PROVIDER_KEY}"
        r = client.post(f"{fake.base_url}/responses", json=responses_body())
        assert r.status_code == 407  # egress mode (issue 9): a proxy-auth challenge
        # Another host:port is not an LLM API: passed through untouched, no token needed.
        r = client.get(f"{gateway.admin_url}/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert len(gateway.wait_ledger(1)) == 1


def test_shutdown_with_idle_keepalive_connections_logs_no_error(fake: FakeProvider,
                                                                gateway: Gateway) -> None:
    token, _ = gateway.issue_token()
    fake.tool_calls = 0
    clients = [httpx.Client(timeout=10) for _ in range(3)]
    try:
        for c in clients:  # each keeps its connection open and idle afterwards
            r = c.post(f"{gateway.base_url}/responses", json=responses_body(),
                       headers=auth(token))
            assert r.status_code == 200
        assert gateway.stop() == 0
    finally:
        for c in clients:
            c.close()
    logs = gateway.logs()
    assert "Traceback" not in logs and " ERROR " not in logs, logs[-2000:]
    assert len(gateway.ledger()) == 3


def test_revocation_of_a_cached_key_applies_to_the_next_request(fake: FakeProvider,
                                                                gateway: Gateway) -> None:
    token, key_id = gateway.issue_token()
    fake.tool_calls = 0
    for _ in range(3):  # now cached in the gateway
        r = httpx.post(f"{gateway.base_url}/responses", json=responses_body(),
                       headers=auth(token), timeout=10)
        assert r.status_code == 200
    out = gateway.cli("token", "revoke", key_id).stdout
    assert "refused from the next request on" in out and "not reachable" not in out
    r = httpx.post(f"{gateway.base_url}/responses", json=responses_body(), headers=auth(token),
                   timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_revoked"


def test_revocation_by_another_writer_is_seen_within_a_second(fake: FakeProvider,
                                                              gateway: Gateway) -> None:
    """Another process (no notification) revokes in the store: the poll catches it."""
    from datetime import UTC, datetime

    from agent_egress.addon.store.sql import SQLStore
    token, key_id = gateway.issue_token()
    fake.tool_calls = 0
    r = httpx.post(f"{gateway.base_url}/responses", json=responses_body(), headers=auth(token),
                   timeout=10)
    assert r.status_code == 200
    store = SQLStore(f"sqlite:///{gateway.home / 'agent-egress.db'}")
    store.revoke_key(key_id, datetime.now(UTC))
    store.close()
    t0 = time.monotonic()
    status = 200
    while status == 200 and time.monotonic() - t0 < 5:
        status = httpx.post(f"{gateway.base_url}/responses", json=responses_body(),
                            headers=auth(token), timeout=10).status_code
    elapsed = time.monotonic() - t0
    print(f"revocation seen after {elapsed * 1000:.0f} ms")
    # polled every 0.25 s; without that, the cache's 30 s TTL (loose: not a speed test)
    assert status == 401 and elapsed < 3.0


def test_admin_actions_and_refusals_are_audited_in_a_verifiable_chain(
        fake: FakeProvider, gateway: Gateway) -> None:
    token, key_id = gateway.issue_token(user="erin", team="search")
    httpx.post(f"{gateway.base_url}/responses", content=b"{not json", headers=auth(token))
    gateway.cli("token", "revoke", key_id)
    httpx.post(f"{gateway.base_url}/responses", json=responses_body(), headers=auth(token))
    httpx.post(f"{gateway.base_url}/responses", json=responses_body(),
               headers={"authorization": "Bearer nope"})
    gateway.stop()  # flushes the gateway's audit writer
    records = [json.loads(line) for line in
               (gateway.home / "audit.jsonl").read_text().splitlines()]
    actions = [(r["action"], r["outcome"], r["detail"].get("rule")) for r in records]
    assert ("vault.set", "ok", None) in actions
    for action in ("org.create", "team.create", "user.create", "key.issue", "key.revoke"):
        assert (action, "ok", None) in actions
    refused = [r for r in records if r["action"] == "request.refused"]
    assert [r["detail"]["rule"] for r in refused] == [
        "invalid_request", "token_revoked", "token_malformed"]
    assert refused[0]["actor"] == key_id and refused[2]["actor"] == "anonymous"
    assert all(r["source"].startswith("127.0.0.1:") and r["request_id"].startswith("req_")
               for r in refused)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    ok = gateway.cli("audit", "verify")
    assert ok.stdout.startswith(f"ok: {len(records)} records")
    # Edit one record: the chain no longer verifies, and says where.
    lines = (gateway.home / "audit.jsonl").read_text().splitlines()
    assert '"outcome":"ok"' in lines[1]
    lines[1] = lines[1].replace('"outcome":"ok"', '"outcome":"error"')
    (gateway.home / "audit.jsonl").write_text("\n".join(lines) + "\n")
    bad = gateway.cli("audit", "verify", check=False)
    assert bad.returncode == 1 and "line 2" in bad.stderr

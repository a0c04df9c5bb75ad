"""Failover with real parts: the real Codex CLI, a real gateway process and fake
providers that fail in each way (issue 8). Timeouts are configured short so each
case takes a few seconds."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Gateway, free_port, make_gateway, run_codex
from fakeprovider import DEFAULT_ANSWER, FakeError, FakeProvider

pytestmark = pytest.mark.codex

TIMEOUTS = {"connect": 1.0, "headers": 1.5, "idle": 1.5, "total": 30}


def provider(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "openai_compatible", "base_url": url, "key": "openai",
            "timeouts": TIMEOUTS, "price_as": "openai", **extra}


def metric(gw: Gateway, line_start: str) -> float:
    for line in httpx.get(f"{gw.admin_url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, FakeProvider,
                                                                     FakeProvider]]:
    """One gateway routing every model to fake `a`, then fake `b`; the breaker stays
    closed here (its own test below) so each case sees a failover by retry."""
    with FakeProvider() as a, FakeProvider() as b:
        tmp = tmp_path_factory.mktemp("pair")
        gw = make_gateway(tmp, a.base_url,
                          providers=[provider("a", a.base_url), provider("b", b.base_url)],
                          routes=[{"model": "*", "providers": ["a", "b"]}],
                          failover={"breaker": {"failures": 1000}})
        gw.start()
        yield gw, a, b
        gw.stop()


@pytest.fixture
def fresh(pair: tuple[Gateway, FakeProvider, FakeProvider]
          ) -> tuple[Gateway, FakeProvider, FakeProvider]:
    gw, a, b = pair
    a.reset()
    b.reset()
    return gw, a, b


def rows_for(gw: Gateway, session: str, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = [r for r in gw.ledger() if r["session_id"] == session]
        if len(rows) >= n:
            break
        time.sleep(0.05)
    return sorted(rows, key=lambda r: r["ts"])


def codex_through_b(tmp_path: Path, gw: Gateway, a: FakeProvider, b: FakeProvider,
                    reason: str, after_first_byte: bool = False) -> list[dict[str, Any]]:
    """Run a Codex tool-loop turn; it must complete via `b` with no error shown.

    A stream that failed after its first byte reached Codex is Codex's to retry, and
    it prints its own notice for that ("Reconnecting... 1/5") and nothing else."""
    token, _ = gw.issue_token(user=f"u-{reason}"[:30])
    before = metric(gw, f'agent_egress_failovers_total{{from_provider="a",reason="{reason}"')
    t0 = time.monotonic()
    res = run_codex(tmp_path, gw.base_url, token)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert DEFAULT_ANSWER in res.stdout
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line]
    assert errors == (["ERROR: Reconnecting... 1/5"] if after_first_byte else []), res.stderr
    assert "error" not in res.stdout.lower()
    assert len(a.requests_to("/responses")) == 1, "only the first attempt went to a"
    b_calls = b.requests_to("/responses")
    assert [r.kind for r in b_calls] == ["tool_call", "answer"]
    # The retry is the same request (after a cut stream Codex reorders client_metadata).
    assert b_calls[0].json == a.requests_to("/responses")[0].json
    outputs = [i for i in b_calls[-1].json["input"] if i.get("type") == "function_call_output"]
    assert outputs and "fake-tool-ran" in json.dumps(outputs)
    after = metric(gw, f'agent_egress_failovers_total{{from_provider="a",reason="{reason}"')
    assert after == before + 1
    session = b_calls[0].header("session-id")
    assert session
    rows = rows_for(gw, session, 3)
    assert [r["provider"] for r in rows] == ["a", "b", "b"], rows
    assert rows[0]["outcome"] != "ok"
    # A cut stream is charged an estimate (never $0); a failure before any byte costs nothing.
    assert (rows[0]["cost_usd"] > 0) if after_first_byte else (rows[0]["cost_usd"] == 0)
    assert all(r["outcome"] == "ok" and r["provider"] == "b" for r in rows[1:]), rows
    print(f"\n{reason}: Codex turn through the fallback in {took:.2f}s")
    return rows


def test_500_fails_over_and_session_sticks(tmp_path: Path, fresh: tuple[Gateway, FakeProvider,
                                                                         FakeProvider]) -> None:
    gw, a, b = fresh
    a.fail_next = [500]
    b.extra_headers = {"x-codex-turn-state": "turn-state-from-b"}
    rows = codex_through_b(tmp_path, gw, a, b, "status_500")
    assert rows[0]["status_code"] == 500
    # Sticky: the rest of the session stayed on b, and Codex echoed b's turn state to b.
    assert b.requests_to("/responses")[1].header("x-codex-turn-state") == "turn-state-from-b"


def test_429_with_retry_after_fails_over_without_waiting(
        tmp_path: Path, fresh: tuple[Gateway, FakeProvider, FakeProvider]) -> None:
    gw, a, b = fresh
    a.fail_next = [FakeError(429, headers={"retry-after": "30"})]
    t0 = time.monotonic()
    codex_through_b(tmp_path, gw, a, b, "status_429")
    assert time.monotonic() - t0 < 15, "the provider's Retry-After: 30 was not waited for"


def test_hang_before_headers_times_out_and_fails_over(
        tmp_path: Path, fresh: tuple[Gateway, FakeProvider, FakeProvider]) -> None:
    gw, a, b = fresh
    a.hang_before_headers = 20
    rows = codex_through_b(tmp_path, gw, a, b, "headers_timeout")
    assert rows[0]["status_code"] is None
    # cut by the 1.5 s headers timeout, not by the fake's 20 s hang (a loose upper bound:
    # CI machines are slow, and this is not a speed test)
    assert 1.4 <= rows[0]["duration_ms"] / 1000 < 10


def test_hang_mid_stream_is_cut_by_idle_timeout(
        tmp_path: Path, fresh: tuple[Gateway, FakeProvider, FakeProvider]) -> None:
    gw, a, b = fresh
    a.hang_mid_stream_after, a.hang_mid_stream = 3, 20
    cuts = metric(gw, 'agent_egress_stream_cuts_total{provider="a",reason="idle_timeout"}')
    rows = codex_through_b(tmp_path, gw, a, b, "idle_timeout", after_first_byte=True)
    assert rows[0]["status_code"] == 200 and rows[0]["usage_estimated"]
    assert metric(gw, 'agent_egress_stream_cuts_total{provider="a",reason="idle_timeout"}'
                  ) == cuts + 1


def test_cut_mid_stream_fails_over(tmp_path: Path, fresh: tuple[Gateway, FakeProvider,
                                                                  FakeProvider]) -> None:
    gw, a, b = fresh
    a.cut_stream_after, a.cut_stream_abort = 3, True
    rows = codex_through_b(tmp_path, gw, a, b, "stream_cut", after_first_byte=True)
    assert rows[0]["status_code"] == 200 and rows[0]["usage_estimated"]


def test_refused_connection_fails_over(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with FakeProvider() as b:
        gw = make_gateway(tmp_path, dead,
                          providers=[provider("a", dead), provider("b", b.base_url)],
                          routes=[{"model": "gpt-5*", "providers": ["a", "b"]}])
        gw.start()
        try:
            token, _ = gw.issue_token()
            res = run_codex(tmp_path, gw.base_url, token)
            assert res.returncode == 0, res.stderr[-3000:]
            assert DEFAULT_ANSWER in res.stdout and "ERROR" not in res.stderr
            assert [r.kind for r in b.requests_to("/responses")] == ["tool_call", "answer"]
            rows = gw.wait_ledger(3)
            assert [r["provider"] for r in sorted(rows, key=lambda r: r["ts"])] == ["a", "b", "b"]
            assert rows[0]["outcome"] == "upstream_unreachable"
            assert metric(gw, 'agent_egress_failovers_total{from_provider="a",'
                          'reason="connect_error",to_provider="b"}') == 1
        finally:
            gw.stop()


def _ask(gw: Gateway, token: str, text: str) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/responses", headers={"authorization": f"Bearer {token}"},
                      json={"model": "gpt-5.5", "input": text, "stream": True}, timeout=30)


def test_breaker_opens_half_opens_and_closes(tmp_path: Path) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{port}/v1"
    with FakeProvider() as b:
        gw = make_gateway(tmp_path, dead,
                          providers=[provider("a", dead), provider("b", b.base_url)],
                          routes=[{"model": "*", "providers": ["a", "b"]}],
                          failover={"breaker": {"failures": 2, "window_seconds": 30,
                                                "open_seconds": 1.5}})
        gw.start()
        try:
            token, _ = gw.issue_token()
            state = 'agent_egress_breaker_state{key="openai",provider="a"}'
            # Two failures (no session: nothing to retry on b) open a's breaker...
            for i in range(2):
                r = _ask(gw, token, f"q{i}")
                assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
                assert "retry goes to 'b'" in r.json()["error"]["message"]
            assert metric(gw, state) == 2
            ready = httpx.get(f"{gw.admin_url}/readyz").json()
            assert ready["checks"]["breakers"]["providers"]["a/openai"]["state"] == "open"
            # ...so the next call goes straight to b, streamed, without touching a.
            r = _ask(gw, token, "q2")
            assert r.status_code == 200 and "response.completed" in r.text
            assert metric(gw, 'agent_egress_failovers_total{from_provider="a",'
                          'reason="breaker_open",to_provider="b"}') == 1
            # Half-open after open_seconds: one probe to a, which fails: open again.
            time.sleep(1.6)
            assert _ask(gw, token, "q3").status_code == 502
            assert metric(gw, state) == 2
            # a comes back; the next probe succeeds and closes the breaker.
            with FakeProvider(port=port) as a:
                time.sleep(1.6)
                r = _ask(gw, token, "q4")
                assert r.status_code == 200 and len(a.requests_to("/responses")) == 1
                assert metric(gw, state) == 0
                assert metric(gw, 'agent_egress_breaker_transitions_total{key="openai",'
                              'provider="a",to_state="half_open"}') == 2
                ready = httpx.get(f"{gw.admin_url}/readyz").json()
                assert ready["checks"]["breakers"]["providers"]["a/openai"]["state"] == "closed"
        finally:
            gw.stop()


def test_chat_only_provider_drives_codex_tool_loop(tmp_path: Path) -> None:
    with FakeProvider() as chat:
        chat.chat_only = True
        chat.chat_tool_calls = True
        gw = make_gateway(tmp_path, chat.base_url,
                          providers=[provider("vllm", chat.base_url, chat_only=True,
                                              models={"gpt-5*": "served-model"})])
        gw.start()
        try:
            token, _ = gw.issue_token()
            res = run_codex(tmp_path, gw.base_url, token)
            assert res.returncode == 0, res.stderr[-3000:]
            assert DEFAULT_ANSWER in res.stdout and "ERROR" not in res.stderr
            calls = chat.requests_to("/chat/completions")
            assert [c.kind for c in calls] == ["chat_tool_call", "chat"]
            assert not chat.requests_to("/responses")
            assert all(c.json["model"] == "served-model" and c.json["stream"] for c in calls)
            tool_msgs = [m for m in calls[1].json["messages"] if m["role"] == "tool"]
            assert tool_msgs and "fake-tool-ran" in tool_msgs[0]["content"]
            rows = gw.wait_ledger(2)
            u = chat.usage
            for row in rows:
                assert row["provider"] == "vllm" and row["outcome"] == "ok"
                assert row["input_tokens"] == u.input_tokens
                assert row["cached_input_tokens"] == u.cached_tokens
                assert row["output_tokens"] == u.output_tokens
                assert not row["usage_estimated"]
        finally:
            gw.stop()


def test_connect_timeout_is_ours_and_json(tmp_path: Path) -> None:
    """mitmproxy has no connect timeout: a provider whose SYNs go unanswered (a full
    accept queue) is given up after timeouts.connect, with a JSON 502, and the retry of
    the same request goes to b."""
    import socket

    with socket.socket() as blackhole, socket.socket() as filler, FakeProvider() as b:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        filler.connect(blackhole.getsockname())  # the queue is full: later SYNs are dropped
        slow = f"http://127.0.0.1:{blackhole.getsockname()[1]}/v1"
        gw = make_gateway(tmp_path, slow,
                          providers=[provider("a", slow), provider("b", b.base_url)],
                          routes=[{"model": "*", "providers": ["a", "b"]}])
        gw.start()
        try:
            token, _ = gw.issue_token()
            body = {"model": "gpt-5.5", "input": "hi", "stream": True}
            hdrs = {"authorization": f"Bearer {token}", "session-id": "s-connect"}
            t0 = time.monotonic()
            r = httpx.post(f"{gw.base_url}/responses", headers=hdrs, json=body, timeout=30)
            took = time.monotonic() - t0
            # the 1 s connect timeout, not the 30 s total (loose: not a speed test)
            assert r.status_code == 502 and 1.0 <= took < 10, (r.status_code, took)
            err = r.json()["error"]
            assert err["code"] == "upstream_unreachable" and "connect timeout" in err["message"]
            assert "retry goes to 'b'" in err["message"]
            r = httpx.post(f"{gw.base_url}/responses", headers=hdrs, json=body, timeout=30)
            assert r.status_code == 200 and "response.completed" in r.text
            assert len(b.requests_to("/responses")) == 1
            assert metric(gw, 'agent_egress_failovers_total{from_provider="a",'
                          'reason="connect_timeout",to_provider="b"}') == 1
        finally:
            gw.stop()

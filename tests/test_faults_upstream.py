"""Upstreams that misbehave (issue 12): one real gateway, two providers routed by model.

``fake`` is tests/fakeprovider.py with short timeouts (slow headers, a stall);
``mis`` is tests/misbehaving.py (garbage SSE, a 10 MB line, huge headers). Every
failure must reach the client as an OpenAI JSON error with our request id (never
mitmproxy's HTML page), every served call must leave a ledger row that is never
$0, and every reservation must be settled (reserved back to 0).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Gateway, make_gateway
from fakeprovider import FakeProvider
from misbehaving import Misbehaving
from test_faults_store import start_gateway
from tlsfake import make_pki

PRICES = {"*": {"input_per_mtok": "10", "output_per_mtok": "10"}}
TIMEOUTS = {"connect": 2.0, "headers": 1.0, "idle": 1.0, "total": 60}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[Gateway, FakeProvider, Misbehaving, str]]:
    with FakeProvider() as fake, Misbehaving() as mis:
        tmp = tmp_path_factory.mktemp("upstream")
        gw = make_gateway(
            tmp, fake.base_url,
            providers=[
                {"name": "fake", "kind": "openai_compatible", "base_url": fake.base_url,
                 "key": "openai", "timeouts": TIMEOUTS, "prices": PRICES},
                {"name": "mis", "kind": "openai_compatible", "base_url": mis.base_url,
                 "key": "openai", "timeouts": TIMEOUTS, "prices": PRICES}],
            routes=[{"model": "mis-*", "providers": ["mis"]},
                    {"model": "*", "providers": ["fake"]}],
            failover={"breaker": {"failures": 1000}}, guardrails={"enabled": False},
            budgets={"teams": {"acme/payments": [{"period": "monthly", "usd": 100}]}})
        start_gateway(gw)
        token, _ = gw.issue_token()
        yield gw, fake, mis, token
        gw.stop()


def _post(gw: Gateway, token: str, model: str, stream: bool = True,
          timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/responses", timeout=timeout,
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": model, "input": "hi", "stream": stream, "store": False})


def _stream(gw: Gateway, token: str) -> Any:
    """A streamed Responses call, read by the caller (``with _stream(...) as r``)."""
    return httpx.stream("POST", f"{gw.base_url}/responses", timeout=30,
                        headers={"authorization": f"Bearer {token}"},
                        json={"model": "gpt-5.5", "input": "hi", "stream": True})


def _row(gw: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for r in gw.ledger():
            if r["request_id"] == request_id:
                return r
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


def _reserved(gw: Gateway) -> Decimal:
    rows = json.loads(gw.cli("budget", "status", "--format", "json").stdout)
    return sum(Decimal(r["reserved_usd"]) * 10**9 + r["reserved_tokens"] for r in rows)


def _settled(gw: Gateway) -> None:
    deadline = time.monotonic() + 5
    while _reserved(gw) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _reserved(gw) == 0, "a reservation was left behind"


def _json_error(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"].startswith("application/json"), r.text[:300]
    err = r.json()["error"]
    assert r.headers["x-egress-request-id"] in err["message"]
    return dict(err)


def _vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def test_slow_response_headers_get_a_json_502_after_the_headers_timeout(env: Any) -> None:
    gw, fake, _, token = env
    fake.reset()
    fake.hang_before_headers = 3.0
    t0 = time.monotonic()
    r = _post(gw, token, "gpt-5.5")
    took = time.monotonic() - t0
    fake.reset()
    assert r.status_code == 502
    err = _json_error(r)
    assert err["code"] == "upstream_unreachable" and "headers timeout" in err["message"]
    print(f"\n[slow headers] headers timeout 1 s: JSON 502 after {took:.2f} s")
    row = _row(gw, r.headers["x-egress-request-id"])
    assert row["outcome"] == "upstream_unreachable" and row["cost_usd"] == 0
    _settled(gw)


def test_stream_stalled_mid_way_is_cut_recorded_partial_and_settled(env: Any) -> None:
    gw, fake, _, token = env
    fake.reset()
    fake.tool_calls = 0
    fake.hang_mid_stream_after, fake.hang_mid_stream = 3, 3.0
    t0 = time.monotonic()
    with _stream(gw, token) as r:
        rid = r.headers["x-egress-request-id"]
        body = b""
        with pytest.raises(httpx.RemoteProtocolError):  # cut: no clean end of the body
            for chunk in r.iter_bytes():
                body += chunk
    took = time.monotonic() - t0
    fake.reset()
    assert b"response.created" in body and b"response.completed" not in body
    row = _row(gw, rid)
    print(f"\n[stall] idle timeout 1 s: stream cut after {took:.2f} s, row {row['outcome']},"
          f" estimated {row['usage_estimated']}, {row['cost_usd']} USD")
    assert row["outcome"] == "stream_error" and row["usage_estimated"]
    assert row["cost_usd"] > 0
    _settled(gw)


def _read_to_completed(gw: Gateway, token: str) -> tuple[str, bytes]:
    """Read a stream the way Codex does: up to ``response.completed``, then hang up."""
    with _stream(gw, token) as r:
        assert r.status_code == 200
        body = b""
        for chunk in r.iter_bytes():
            body += chunk
            if b"event: response.completed" in body:
                break
        return r.headers["x-egress-request-id"], body


def test_client_hanging_up_after_the_last_event_is_a_served_call(env: Any) -> None:
    """Codex closes once it has read ``response.completed``; the upstream's end of body
    may come later. The answer was whole: an ``ok`` row with the provider's usage."""
    gw, fake, _, token = env
    fake.reset()
    fake.tool_calls = 0
    fake.linger_after_last = 3.0  # the body ends well after the client has gone
    cuts = gw.metric("agent_egress_stream_cuts_total", provider="fake")
    rid, body = _read_to_completed(gw, token)
    row = _row(gw, rid)
    fake.reset()
    assert b'"usage"' in body
    assert row["outcome"] == "ok" and not row["usage_estimated"], row
    assert row["error_code"] is None and row["cost_usd"] > 0
    assert gw.metric("agent_egress_stream_cuts_total", provider="fake") == cuts
    _settled(gw)


def test_upstream_stalling_after_the_last_event_is_not_a_cut(env: Any) -> None:
    """The provider sent ``response.completed`` and then went silent until the idle
    timeout dropped it: the client already has the whole answer, so neither a stream cut
    nor a failed call (the client will not retry it)."""
    gw, fake, _, token = env
    fake.reset()
    fake.tool_calls = 0
    fake.linger_after_last = 3.0  # idle timeout is 1 s
    cuts = gw.metric("agent_egress_stream_cuts_total", provider="fake")
    with _stream(gw, token) as r:
        rid = r.headers["x-egress-request-id"]
        body = b""
        with pytest.raises(httpx.RemoteProtocolError):  # the gateway dropped the upstream
            for chunk in r.iter_bytes():
                body += chunk
    row = _row(gw, rid)
    fake.reset()
    assert b"event: response.completed" in body
    assert row["outcome"] == "ok" and not row["usage_estimated"], row
    assert gw.metric("agent_egress_stream_cuts_total", provider="fake") == cuts
    _settled(gw)


def test_garbage_sse_is_passed_on_and_charged_an_estimate_never_zero(env: Any) -> None:
    gw, _, mis, token = env
    mis.mode = "garbage"
    r = _post(gw, token, "mis-gpt")
    assert r.status_code == 200 and b"not json at all" in r.content
    row = _row(gw, r.headers["x-egress-request-id"])
    print(f"\n[garbage SSE] row {row['outcome']}, estimated {row['usage_estimated']},"
          f" {row['cost_usd']} USD")
    assert row["usage_estimated"] and row["cost_usd"] > 0
    assert httpx.get(f"{gw.admin_url}/healthz", timeout=5).status_code == 200
    assert "Traceback" not in gw.logs()
    _settled(gw)


def test_10_and_40_mb_sse_lines_stream_through_with_bounded_memory(env: Any) -> None:
    """The SSE reader drops an event over 8 MiB unread (protocols/sse.py): a 40 MiB line
    must not cost 40 MiB. Peak RSS (VmHWM) of the gateway process, before and after."""
    gw, _, mis, token = env
    mis.mode = "big_line"
    mis.big_lines = [10 * 2**20, 40 * 2**20]
    assert gw.proc is not None
    pid = gw.proc.pid
    hwm0, rss0 = _vm(pid, "VmHWM"), _vm(pid, "VmRSS")
    got = 0
    with httpx.stream("POST", f"{gw.base_url}/responses", timeout=120,
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": "mis-gpt", "input": "hi", "stream": True}) as r:
        rid = r.headers["x-egress-request-id"]
        tail = b""
        for chunk in r.iter_bytes():
            got += len(chunk)
            tail = (tail + chunk)[-4096:]
    hwm1, rss1 = _vm(pid, "VmHWM"), _vm(pid, "VmRSS")
    print(f"\n[10 + 40 MiB SSE lines] client got {got / 2**20:.1f} MiB; gateway peak RSS"
          f" {hwm0 / 2**20:.0f} -> {hwm1 / 2**20:.0f} MiB, RSS {rss0 / 2**20:.0f} ->"
          f" {rss1 / 2**20:.0f} MiB")
    assert got > sum(mis.big_lines) and b"response.completed" in tail
    row = _row(gw, rid)
    # the oversized events are dropped unread; usage from the event after them counts
    assert row["outcome"] == "ok" and not row["usage_estimated"]
    assert row["input_tokens"] == 1000 and row["output_tokens"] == 250
    assert hwm1 - hwm0 < 24 * 2**20, "the stream reader buffered a whole 40 MiB line"
    _settled(gw)


def test_huge_response_headers_get_a_json_error_not_html(env: Any) -> None:
    gw, _, mis, token = env
    mis.mode = "huge_headers"
    r = _post(gw, token, "mis-gpt", stream=False)
    print(f"\n[huge headers] {mis.header_bytes / 2**20:.0f} MiB of response headers:"
          f" client got {r.status_code} {r.headers.get('content-type')}")
    assert r.status_code == 502
    err = _json_error(r)
    assert err["code"] == "upstream_unreachable"
    assert httpx.get(f"{gw.admin_url}/healthz", timeout=5).status_code == 200
    _settled(gw)


def test_upstream_certificate_that_does_not_verify_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")  # the gateway is NOT told about this CA
    with FakeProvider(tls=pki.server) as fake:
        gw = make_gateway(tmp_path, fake.base_url, guardrails={"enabled": False})
        start_gateway(gw)
        try:
            token, _ = gw.issue_token()
            r = _post(gw, token, "gpt-5.5")
            assert r.status_code == 502
            err = _json_error(r)
            print(f"\n[bad upstream cert] {r.status_code}: {err['message']}")
            assert err["code"] == "upstream_certificate_invalid"
            assert "egress.upstream_ca_file" in err["message"]
            assert fake.requests == [], "a request went to an unverified upstream"
        finally:
            gw.stop()

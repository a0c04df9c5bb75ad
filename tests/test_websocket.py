"""Codex over WebSocket (issue 9 item 3): the real Codex 0.169, a custom provider with
``supports_websockets = true``, the real gateway, and a WebSocket fake provider
(tests/fakews.py), in the reverse listener and through the egress proxy listener.

Observed with Codex CLI 0.169.0 against a WebSocket fake (probe run for this module):
- It opens ``GET {base_url}/responses`` with ``Upgrade: websocket`` and the headers of
  an HTTP call (``authorization: Bearer <env_key>``, ``originator``, ``session-id``,
  ``thread-id``, ``x-client-request-id``, ``x-codex-turn-metadata``, ``x-codex-window-id``,
  ``x-codex-beta-features``) plus ``openai-beta: responses_websockets=2026-02-06``; no
  ``Sec-WebSocket-Extensions`` (no compression).
- Messages are text frames ``{"type": "response.create", <a Responses body>}``. The first
  is a warm-up: ``generate: false``, ``request_kind: "prewarm"``, input = the system
  message only. Then the turn's first call with the whole input (no
  ``previous_response_id``), then ``previous_response_id`` = the last response's id with
  only the new items (the ``function_call_output``). ``client_metadata`` carries each
  message's ``x-codex-turn-metadata`` and ``turn_id``; the upgrade's header is the
  warm-up's (empty ``turn_id``), so the turn is read per message.
- Server frames: one Responses event per text frame; ``response.completed`` ends a
  response and the connection is reused for the next message.
- An error frame ``{"type": "error", "status": 400, "error": {...}}``: Codex prints the
  frame (our message is visible) and exits 1 without retrying. Without ``status`` it
  waits on the socket (no output for 90 s). A refused upgrade: 400 is printed with the
  JSON body and not retried; 401, 403 and 429 are retried (7 upgrades in ~6 s) and then
  Codex falls back to HTTP ``POST /responses`` for the turn.
- An error frame with ``"status": 429, "headers": {"retry-after": "2"}``: Codex closes
  the connection, waits 2.0 s, reconnects (no new warm-up) and resends the message.
So a refused message is answered with a ``status: 400`` error frame (429 with a
``headers.retry-after`` for rate limits), and a refused upgrade stays the HTTP refusal.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import PROVIDER_KEY, Gateway, make_gateway, run_codex
from fakeprovider import DEFAULT_ANSWER
from fakews import FakeWSProvider
from otlp_receiver import OTLPReceiver
from tlsfake import make_pki

from agent_egress.addon.classify import classify_path
from agent_egress.addon.policy import Provider
from agent_egress.addon.protocols import responses_ws as ws
from agent_egress.addon.protocols.openai_responses import ResponsesStreamReader
from agent_egress.addon.protocols.summary import BadRequest
from agent_egress.exporters.otel import SessionTracer

AWS = "AKIA" + "QZ7RT2WX9MB4KD6P"
# 10 USD per million tokens of any kind: a fake call (1,250 tokens) costs 0.0125 USD.
PRICES = {"gpt-5.5": {"input_per_mtok": "10", "output_per_mtok": "10"}}
CALL_USD = Decimal("0.0125")


# --- the pure frame module ---------------------------------------------------------
def test_create_frame_is_a_call_other_frames_are_not() -> None:
    meta = '{"turn_id":"t-2","request_kind":"turn"}'
    frame = ws.parse_client_frame(ws.encode({
        "type": "response.create", "model": "gpt-5.5", "previous_response_id": "resp_1",
        "input": [{"type": "function_call_output", "call_id": "c1", "output": "ok"}],
        "client_metadata": {"x-codex-turn-metadata": meta}}))
    assert frame is not None and frame.info.model == "gpt-5.5"
    assert frame.info.tool_output_ids == ("c1",) and not frame.prewarm
    headers = {"session-id": "s-1", "x-codex-turn-metadata": '{"turn_id":""}'}
    view = frame.header_view(headers.get)
    assert view("x-codex-turn-metadata") == meta and view("session-id") == "s-1"
    assert ws.parse_client_frame(b'{"type":"response.processed","response_id":"r"}') is None
    warm = ws.parse_client_frame(b'{"type":"response.create","model":"m","generate":false}')
    assert warm is not None and warm.prewarm
    for bad in (b"not json", b"[1]", b'{"type":"response.create"}'):
        with pytest.raises(BadRequest):
            ws.parse_client_frame(bad)


def test_server_frames_feed_the_responses_reader() -> None:
    usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4},
             "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}}
    frames = [ws.encode(e) for e in (
        {"type": "response.created", "response": {"id": "resp_9", "model": "gpt-5.5"}},
        {"type": "response.output_text.delta", "delta": "hi\n"},
        {"type": "response.output_item.done", "item": {"type": "function_call",
                                                       "call_id": "c", "name": "sh"}},
        {"type": "response.completed", "response": {"id": "resp_9", "status": "completed",
                                                     "usage": usage}})]
    reader = ResponsesStreamReader()
    for i, frame in enumerate(frames):
        reader.feed(ws.as_sse(frame))
        assert (reader.summary.status is not None) == (i == len(frames) - 1)
    reader.close()
    s = reader.summary
    assert (s.response_id, s.status, s.tool_calls) == ("resp_9", "completed", [("c", "sh")])
    assert s.usage is not None and (s.usage.input_tokens, s.usage.cached_input_tokens,
                                    s.usage.output_tokens, s.usage.reasoning_tokens) == (
        10, 4, 3, 1)
    assert ws.as_sse(b'{\n "type": "error"}') == b'event: error\ndata: {  "type": "error"}\n\n'
    assert ws.as_sse(b'{"delta":"x"}') == b'data: {"delta":"x"}\n\n'


def test_frame_splitter_and_error_frame() -> None:
    split = ws.FrameSplitter()
    assert split.feed(b"data: {\"a\":1}\n\ndata: {\"b\"") == [b'{"a":1}']
    assert split.feed(b":2}\n\n") == [b'{"b":2}'] and split.close() == []
    err = json.loads(ws.error_frame("m", type="t", code="c", status=429, retry_after=3))
    assert err == {"type": "error", "status": 429, "headers": {"retry-after": "3"},
                   "error": {"message": "m", "type": "t", "code": "c", "param": None}}


def test_upgrade_is_classified_and_providers_opt_in() -> None:
    assert classify_path("GET", "/v1/responses", "websocket") == ws.WS_API
    assert classify_path("GET", "/responses", "WebSocket") == ws.WS_API
    assert classify_path("GET", "/v1/responses", None) is None
    assert classify_path("GET", "/v1/chat/completions", "websocket") is None
    assert classify_path("POST", "/v1/responses", "websocket") == "openai.responses"
    base = {"name": "p", "base_url": "https://x.example/v1", "key": "k"}
    assert Provider(**base).takes_websockets
    assert not Provider(**base, websockets=False).takes_websockets
    assert not Provider(**base, kind="azure_openai").takes_websockets
    assert Provider(**base, kind="openai_compatible", websockets=True).takes_websockets
    assert not Provider(**base, chat_only=True, websockets=True).takes_websockets


# --- real Codex, real gateway --------------------------------------------------------
def run_codex_ws(tmp_path: Path, base_url: str, prompt: str, env: dict[str, str],
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`codex exec` with a custom provider that speaks WebSocket (supports_websockets);
    ``env`` holds the API key as CORP_API_KEY plus any proxy settings."""
    extra = dict(env)
    token = extra.pop("CORP_API_KEY")
    return run_codex(tmp_path, base_url, token, prompt, timeout,
                     provider_extra="supports_websockets = true\n", env_extra=extra)


def _providers(fake: FakeWSProvider) -> list[dict[str, Any]]:
    return [{"name": "openai", "kind": "openai", "base_url": fake.base_url, "key": "openai",
             "prices": PRICES}]


@pytest.fixture
def fakews() -> Iterator[FakeWSProvider]:
    with FakeWSProvider() as fp:
        yield fp


def _started(tmp_path: Path, fake: FakeWSProvider, **config: Any) -> tuple[Gateway, str]:
    config.setdefault("providers", _providers(fake))
    gw = make_gateway(tmp_path, fake.base_url, **config)
    gw.start()
    token, _ = gw.issue_token()
    return gw, token


def _check_tool_loop(gw: Gateway, fake: FakeWSProvider, token: str,
                     res: subprocess.CompletedProcess[str]) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:] + gw.logs()[-3000:]
    assert DEFAULT_ANSWER in res.stdout and "fake-tool-ran" in out
    assert not [r for r in fake.requests if r.method == "POST"], "Codex fell back to HTTP"
    upgrades = fake.ws_upgrades()
    assert upgrades
    for up in upgrades:
        assert up.header("authorization") == f"Bearer {PROVIDER_KEY}"
        assert token not in repr(up.headers) and "sk-not-a-gateway" not in repr(up.headers)
        assert up.header("proxy-authorization") is None
    msgs = fake.ws_messages()
    assert [m.kind for m in msgs] == ["prewarm", "tool_call", "answer"]
    assert msgs[2].json is not None and msgs[2].json.get("previous_response_id")
    rows = sorted(gw.wait_ledger(3), key=lambda r: r["ts"])
    assert len(rows) == 3, rows
    assert {r["api"] for r in rows} == {ws.WS_API}
    assert len({r["request_id"] for r in rows}) == 3
    assert {r["session_id"] for r in rows} == {upgrades[0].header("session-id")}
    warm, *calls = rows
    assert (warm["input_tokens"], warm["output_tokens"], warm["cost_usd"]) == (0, 0, 0)
    for r in calls:
        assert (r["input_tokens"], r["cached_input_tokens"], r["output_tokens"],
                r["reasoning_tokens"]) == (1200, 1000, 50, 20)
        assert Decimal(str(r["cost_usd"])) == CALL_USD and not r["usage_estimated"]
        assert r["outcome"] == "ok" and r["agent"] == "codex" and r["user"] == "alice"
        assert r["turn_id"] and r["provider"] == "openai"
    assert calls[0]["turn_id"] == calls[1]["turn_id"]


@pytest.mark.codex
def test_codex_tool_loop_over_websocket_is_metered(tmp_path: Path,
                                                   fakews: FakeWSProvider) -> None:
    gw, token = _started(tmp_path, fakews)
    try:
        res = run_codex_ws(tmp_path, gw.base_url, "run the tool", {"CORP_API_KEY": token})
        _check_tool_loop(gw, fakews, token, res)
    finally:
        gw.stop()


@pytest.mark.codex
def test_codex_over_websocket_is_one_trace_per_session(tmp_path: Path,
                                                       fakews: FakeWSProvider) -> None:
    rx = OTLPReceiver()
    gw, token = _started(tmp_path, fakews, telemetry={
        "traces": {"exporter": "otlp-http", "endpoint": rx.endpoint}})
    try:
        res = run_codex_ws(tmp_path, gw.base_url, "run the tool", {"CORP_API_KEY": token})
        assert res.returncode == 0, res.stderr[-2000:]
        assert gw.stop() == 0  # the bounded flush exports the open turn
    finally:
        gw.stop()
    session = fakews.ws_upgrades()[0].header("session-id")
    assert session is not None
    assert rx.wait_for(lambda spans: sum(s.name.startswith("chat ") for s in spans) >= 3,
                       timeout=10)
    spans = rx.spans
    assert {s.trace_id for s in spans} == {SessionTracer.trace_id_for(session)}
    chats = [s for s in spans if s.name.startswith("chat ")]
    tools = [s for s in spans if s.name.startswith("execute_tool ")]
    rows = gw.ledger()
    assert len(chats) == 3 and len(tools) == 1
    assert {c.attributes["agent_egress.request_id"] for c in chats} == {
        r["request_id"] for r in rows}
    assert all(c.attributes["gen_ai.conversation.id"] == session for c in chats)
    issued = [m.json for m in fakews.ws_messages() if m.kind == "answer"]
    call_id = issued[0]["input"][0]["call_id"]
    assert tools[0].attributes["gen_ai.tool.call.id"] == call_id
    assert token not in json.dumps([[s.name, s.attributes] for s in spans], default=str)


@pytest.mark.codex
def test_codex_prompt_with_aws_key_is_blocked_over_websocket(
        tmp_path: Path, fakews: FakeWSProvider) -> None:
    gw, token = _started(tmp_path, fakews)
    try:
        res = run_codex_ws(tmp_path, gw.base_url, f"deploy with key {AWS} please",
                           {"CORP_API_KEY": token})
        out = res.stdout + res.stderr
        assert res.returncode != 0
        assert "guardrail rule secrets.aws_access_key blocked this request" in out, out[-2000:]
        assert [m.kind for m in fakews.ws_messages()] == ["prewarm"]  # the turn never left
        assert not [r for r in fakews.requests if AWS in r.body.decode(errors="replace")]
        assert AWS not in gw.logs()
        assert gw.metric("agent_egress_refusals_total", rule="guardrail_blocked") == 1
        assert [r["outcome"] for r in gw.ledger()] == ["ok"]  # the warm-up only
    finally:
        gw.stop()


@pytest.mark.codex
def test_codex_shows_a_spent_budget_once_over_websocket(tmp_path: Path,
                                                        fakews: FakeWSProvider) -> None:
    gw, token = _started(tmp_path, fakews, budgets={
        "teams": {"acme/payments": [{"period": "monthly", "usd": "0.02"}]},
        "reservation": {"max_usd": "0.001"}})
    try:
        first = run_codex_ws(tmp_path, gw.base_url, "run the tool", {"CORP_API_KEY": token})
        assert first.returncode == 0, first.stderr[-2000:]  # 2 calls: 0.025 USD, over 0.02
        served = len(fakews.ws_messages())
        second = run_codex_ws(tmp_path, gw.base_url, "run the tool again",
                              {"CORP_API_KEY": token})
        out = second.stdout + second.stderr
        assert second.returncode != 0
        assert "monthly budget of team:acme/payments is exhausted" in out, out[-2000:]
        assert "spent $0.0250 of $0.0200" in out
        # only the warm-up (no output asked for) reached the provider; no retry loop
        assert [m.kind for m in fakews.ws_messages()[served:]] == ["prewarm"]
        assert gw.metric("agent_egress_refusals_total", rule="budget_exceeded") == 1
    finally:
        gw.stop()


@pytest.mark.codex
def test_codex_over_websocket_through_the_egress_proxy(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with FakeWSProvider(tls=pki.server) as fake:
        gw, token = _started(tmp_path, fake, egress={"upstream_ca_file": str(pki.ca_cert)})
        try:
            ca = tmp_path / "gateway-ca.pem"
            gw.cli("ca", "export", "--out", str(ca))
            res = run_codex_ws(tmp_path, fake.base_url, "run the tool", {
                "CORP_API_KEY": "sk-not-a-gateway-token",  # identity is the proxy's
                "HTTPS_PROXY": f"http://dev:{token}@127.0.0.1:{gw.proxy_port}",
                "NO_PROXY": "", "CODEX_CA_CERTIFICATE": str(ca)})
            _check_tool_loop(gw, fake, token, res)
        finally:
            gw.stop()


@pytest.mark.codex
def test_codex_output_blocked_mid_stream_over_websocket(tmp_path: Path,
                                                        fakews: FakeWSProvider) -> None:
    """The output guard on server frames: Codex prints our message once, the secret never
    reaches it, and the response (which the provider finished) is metered."""
    gw, token = _started(tmp_path, fakews, guardrails={"default": {"secrets": {
        "action": "block", "directions": ["input", "tool_output", "model_output"]}}})
    try:
        fakews.answer_text = "here it is: " + "x " * 150 + AWS + " and more" * 20
        fakews.tool_calls = 0
        fakews.delta_count = 40
        res = run_codex_ws(tmp_path, gw.base_url, "print the deploy key",
                           {"CORP_API_KEY": token})
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-2000:]
        assert ("agent-egress: the model's output was stopped by guardrail rule"
                " secrets.aws_access_key (action block)") in out, out[-2000:]
        assert "Reconnecting" not in out and AWS not in out
        assert [m.kind for m in fakews.ws_messages()] == ["prewarm", "answer"]
        assert gw.metric("agent_egress_refusals_total", rule="guardrail_blocked") == 1
        rows = sorted(gw.wait_ledger(2), key=lambda r: r["ts"])
        assert len(rows) == 2 and rows[1]["output_tokens"] == 50  # metered to the end
    finally:
        gw.stop()


@pytest.mark.codex
def test_provider_without_websockets_makes_codex_fall_back_to_http(
        tmp_path: Path, fakews: FakeWSProvider) -> None:
    """The upgrade is refused (403, no provider takes WebSocket): Codex retries the
    upgrade, then runs the turn over HTTP POST, metered as usual."""
    providers = _providers(fakews)
    providers[0]["websockets"] = False
    gw, token = _started(tmp_path, fakews, providers=providers)
    try:
        res = run_codex_ws(tmp_path, gw.base_url, "run the tool", {"CORP_API_KEY": token})
        assert res.returncode == 0, res.stderr[-2000:]
        assert DEFAULT_ANSWER in res.stdout
        assert fakews.ws_upgrades() == [] and fakews.ws_messages() == []
        posts = [r.kind for r in fakews.requests if r.method == "POST"]
        assert posts[-2:] == ["tool_call", "answer"]
        rows = gw.wait_ledger(len(posts))
        assert {r["api"] for r in rows} == {"openai.responses"}
        assert gw.metric("agent_egress_refusals_total", rule="provider_not_allowed") >= 1
    finally:
        gw.stop()

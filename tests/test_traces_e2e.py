"""A real Codex session through the gateway becomes one trace at a real OTLP receiver."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from conftest import Gateway, make_gateway, run_codex
from fakeprovider import FakeProvider
from otlp_receiver import OTLPReceiver
from prometheus_client.parser import text_string_to_metric_families

from agent_egress.exporters.otel import SessionTracer

pytestmark = pytest.mark.codex

CANARY = "CANARY-PROMPT-7f3a9e"


def test_codex_session_with_two_turns_and_three_tools_is_one_trace(
        tmp_path: Path, fake: FakeProvider) -> None:
    rx = OTLPReceiver()
    gw = make_gateway(tmp_path, fake.base_url,
                      telemetry={"traces": {"exporter": "otlp-http", "endpoint": rx.endpoint}})
    gw.start()
    try:
        token, key_id = gw.issue_token(user="carol", team="infra")
        fake.tool_calls = 2
        r1 = run_codex(tmp_path, gw.base_url, token, f"first task {CANARY}")
        assert r1.returncode == 0, r1.stderr[-2000:]
        fake.tool_calls = 1
        r2 = run_codex(tmp_path, gw.base_url, token, f"second task {CANARY}", resume=True)
        assert r2.returncode == 0, r2.stderr[-2000:]
        assert gw.stop() == 0  # the bounded flush exports the open turn
    finally:
        gw.stop()
    calls = fake.requests_to("/v1/responses")
    assert len(calls) == 5  # (2 tools + answer) + (1 tool + answer)
    sessions = {c.header("session-id") for c in calls}
    assert len(sessions) == 1, "codex exec resume continues the same session"
    (session,) = sessions
    assert session is not None
    issued = [item["call_id"] for c in calls for item in c.json["input"]
              if item.get("type") == "function_call"]
    issued = list(dict.fromkeys(issued))  # history repeats: unique, in order
    assert len(issued) == 3

    rows = gw.ledger()
    assert len(rows) == 5
    assert rx.wait_for(lambda spans: sum(s.name.startswith("turn") for s in spans) >= 2,
                       timeout=10)
    spans = rx.spans
    assert {s.trace_id for s in spans} == {SessionTracer.trace_id_for(session)}
    turns = sorted((s for s in spans if s.name.startswith("turn")), key=lambda s: s.start_ns)
    chats = [s for s in spans if s.name.startswith("chat ")]
    tools = [s for s in spans if s.name.startswith("execute_tool ")]
    assert len(turns) == 2 and len(chats) == 5 and len(tools) == 3
    turn_ids = [t.span_id for t in turns]
    assert all(c.parent_id in turn_ids for c in chats)
    assert [sum(c.parent_id == t for c in chats) for t in turn_ids] == [3, 2]
    assert sorted(t.attributes["gen_ai.tool.call.id"] for t in tools) == sorted(issued)
    assert [sum(t.parent_id == tid for t in tools) for tid in turn_ids] == [2, 1]
    for t in tools:
        assert t.attributes["gen_ai.tool.name"] == "exec_command"
        assert t.attributes["agent_egress.tool.includes_approval_time"] is True
        assert t.end_ns > t.start_ns
    for c in chats:
        assert c.kind.endswith("CLIENT")
        assert c.attributes["gen_ai.conversation.id"] == session
        assert c.attributes["gen_ai.request.model"] == "gpt-5.5"
        assert c.attributes["gen_ai.usage.input_tokens"] == fake.usage.input_tokens
        assert c.attributes["agent_egress.key_id"] == key_id
        assert c.attributes["agent_egress.team"] == "infra"
        assert c.attributes["server.address"] == "127.0.0.1"
    # Span costs sum to the ledger, to the cent (and closer).
    span_cost = sum(Decimal(str(c.attributes["agent_egress.cost_usd"])) for c in chats)
    ledger_cost = sum(r["cost_usd"] for r in rows)
    assert abs(span_cost - ledger_cost) < Decimal("0.000001")
    # The prompt's content and the token never reach a span.
    blob = json.dumps([[s.name, s.attributes, s.resource] for s in spans], default=str)
    assert CANARY not in blob and token not in blob
    # Content capture is off by default: no content attribute at all.
    assert not any(k.startswith(("gen_ai.input.", "gen_ai.output.", "gen_ai.system_"))
                   for s in spans for k in s.attributes)


def _dropped(gw: Gateway, kind: str) -> float:
    text = httpx.get(f"{gw.admin_url}/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if (sample.name == "agent_egress_telemetry_dropped_total"
                    and sample.labels.get("kind") == kind):
                return float(sample.value)
    raise AssertionError(f"no agent_egress_telemetry_dropped_total{{kind={kind!r}}}")


def test_dead_collector_never_stalls_codex_or_shutdown_and_drops_are_counted(
        tmp_path: Path, fake: FakeProvider) -> None:
    rx = OTLPReceiver()
    rx.stop()  # the collector went away: its port now refuses connections
    gw = make_gateway(tmp_path, fake.base_url,
                      telemetry={"traces": {"exporter": "otlp-http", "endpoint": rx.endpoint}})
    # standard SDK variables: export every 100 ms, give up on a batch after 1 s
    gw.env.update(OTEL_BSP_SCHEDULE_DELAY="100", OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="1")
    gw.start()
    try:
        token, _ = gw.issue_token()
        assert _dropped(gw, "spans") == 0 and _dropped(gw, "audit") == 0
        res = run_codex(tmp_path, gw.base_url, token)
        assert res.returncode == 0, res.stderr[-2000:]
        rows = gw.wait_ledger(2)
        assert len(rows) >= 2
        # a chat span per call and 1 execute_tool span were built and could not be delivered
        want = len(rows) + 1
        deadline = time.monotonic() + 15
        while _dropped(gw, "spans") < want and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _dropped(gw, "spans") == want, gw.logs()[-3000:]
        assert _dropped(gw, "audit") == 0
        t0 = time.monotonic()
        assert gw.stop() == 0
        assert time.monotonic() - t0 < 20  # the trace flush is bounded (10 s)
    finally:
        gw.stop()

"""Session tracing state shared by two gateway replicas through Redis (issue 7).

A turn whose calls alternate between replicas must be one turn span with every
chat span under it, and an execute_tool span must be closed by the replica that
saw the tool's output even when the other one saw the request for it. With Redis
down a replica traces from memory and never makes a call wait.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import services
from conftest import PROVIDER_KEY, Gateway, free_port, make_gateway
from fakeprovider import FakeProvider
from otlp_receiver import OTLPReceiver, RSpan

from agent_egress.exporters.otel import SessionTracer

SESSION = "0199b0c4-aaaa-7bbb-8ccc-ddddeeeeffff"
TOOLS = [{"type": "function", "name": "exec_command",
          "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with services.fresh_database() as url:
        yield url


@pytest.fixture
def rx() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver()
    yield r
    r.stop()


def _gateway(tmp_path: Path, name: str, fake: FakeProvider, rx: OTLPReceiver,
             master: str, **config: Any) -> Gateway:
    (tmp_path / name).mkdir()
    gw = make_gateway(tmp_path / name, fake.base_url,
                      telemetry={"traces": {"exporter": "otlp-http", "endpoint": rx.endpoint}},
                      **config)
    gw.env["AGENT_EGRESS_MASTER_KEY"] = master
    gw.env["OTEL_RESOURCE_ATTRIBUTES"] = f"service.instance.id={name}"
    gw.env["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # export every 200 ms, not every 5 s
    for stale in ("vault.json", "master.key"):  # made by make_gateway with a file key
        (gw.home / stale).unlink(missing_ok=True)
    gw.cli("vault", "set", "openai", input=PROVIDER_KEY + "\n")
    return gw


class Session:
    """Codex's wire shape (DESIGN §4): whole history each call, turn id in a header."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.history: list[dict[str, Any]] = []

    def call(self, gw: Gateway, turn: str, new: list[dict[str, Any]]) -> dict[str, Any]:
        self.history += new
        body = {"model": "gpt-5.5", "input": self.history, "tools": TOOLS, "stream": False,
                "store": False, "prompt_cache_key": SESSION,
                "client_metadata": {"turn_id": turn}}
        r = httpx.post(f"{gw.base_url}/responses", json=body, timeout=10, headers={
            "authorization": f"Bearer {self.token}", "session-id": SESSION,
            "x-codex-turn-metadata": json.dumps({"turn_id": turn, "request_kind": "turn"})})
        assert r.status_code == 200, r.text
        out: list[dict[str, Any]] = r.json()["output"]
        self.history += out
        return out[0]

    def run_tool(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        assert item["type"] == "function_call", item
        return [{"type": "function_call_output", "call_id": item["call_id"],
                 "output": "fake-tool-ran"}]


def _user(text: str) -> list[dict[str, Any]]:
    return [{"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": text}]}]


def test_a_turn_hopping_replicas_is_one_turn_span_with_tools_closed_across(
        tmp_path: Path, fake: FakeProvider, pg_url: str, rx: OTLPReceiver) -> None:
    master = base64.b64encode(os.urandom(32)).decode()
    with services.redis_namespace() as prefix:
        a, b = (_gateway(tmp_path, n, fake, rx, master, database_url=pg_url,
                         redis_url=services.redis_url(), redis_prefix=prefix) for n in "ab")
        token, _ = a.issue_token(user="erin", team="infra")  # also migrates the database
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda g: g.start(), (a, b)))
        try:
            s = Session(token)
            asked1 = s.call(a, "t1", _user("first"))  # turn 1 starts on a: a tool call
            assert s.call(b, "t1", s.run_tool(asked1))["type"] == "message"  # answered on b
            asked2 = s.call(b, "t2", _user("second"))  # turn 2 starts on b: ends turn 1
            assert s.call(a, "t2", s.run_tool(asked2))["type"] == "message"
            assert rx.wait_for(lambda sp: sum(x.name.startswith("chat") for x in sp) == 4)
            assert a.stop() == 0  # a's shutdown ends turn 2 (it is still open in Redis)
            assert b.stop() == 0
        finally:
            a.stop()
            b.stop()
    assert rx.wait_for(lambda sp: sum(x.name.startswith("turn") for x in sp) >= 2, timeout=5)
    time.sleep(0.3)  # a duplicate turn span, if any, would arrive in the same flush
    spans = rx.spans
    trace = SessionTracer.trace_id_for(SESSION)
    assert {x.trace_id for x in spans} == {trace}
    turns = sorted((x for x in spans if x.name.startswith("turn")), key=lambda x: x.start_ns)
    chats = sorted((x for x in spans if x.name.startswith("chat")), key=lambda x: x.start_ns)
    tools = sorted((x for x in spans if x.name.startswith("execute_tool")),
                   key=lambda x: x.start_ns)
    assert [t.name for t in turns] == ["turn 1", "turn 2"]  # one span per turn, not per replica
    assert [t.attributes["agent_egress.turn.model_calls"] for t in turns] == [2, 2]
    assert [t.attributes["agent_egress.turn.end_reason"] for t in turns] == [
        "next_turn", "shutdown"]
    # every chat span under its turn, whichever replica served it
    inst = [c.resource["service.instance.id"] for c in chats]
    assert inst == ["a", "b", "b", "a"]
    assert [c.parent_id for c in chats] == [turns[0].span_id] * 2 + [turns[1].span_id] * 2
    # turn sums cover both replicas' calls
    for t, pair in zip(turns, (chats[:2], chats[2:]), strict=True):
        want = sum(Decimal(str(c.attributes["agent_egress.cost_usd"])) for c in pair)
        assert abs(Decimal(str(t.attributes["agent_egress.cost_usd"])) - want) < Decimal("1e-9")
        assert t.attributes["gen_ai.usage.output_tokens"] == 2 * fake.usage.output_tokens
        assert t.end_ns == pair[1].end_ns
    # tool calls opened on one replica, closed (exactly once) on the other
    assert [x.attributes["gen_ai.tool.call.id"] for x in tools] == [
        asked1["call_id"], asked2["call_id"]]
    assert [x.resource["service.instance.id"] for x in tools] == ["b", "a"]
    assert [x.parent_id for x in tools] == [turns[0].span_id, turns[1].span_id]
    for tool, (opened, closed) in zip(tools, (chats[0:2], chats[2:4]), strict=True):
        assert tool.start_ns == opened.end_ns and tool.end_ns == closed.start_ns


def test_redis_down_traces_from_memory_without_stalling(
        tmp_path: Path, fake: FakeProvider, rx: OTLPReceiver) -> None:
    master = base64.b64encode(os.urandom(32)).decode()
    gw = _gateway(tmp_path, "solo", fake, rx, master,
                  redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    gw.start()
    try:
        token, _ = gw.issue_token()
        s = Session(token)
        t0 = time.monotonic()
        asked = s.call(gw, "t1", _user("first"))
        s.call(gw, "t1", s.run_tool(asked))
        elapsed = time.monotonic() - t0
        assert rx.wait_for(lambda sp: sum(x.name.startswith("chat") for x in sp) == 2)
        assert gw.stop() == 0
    finally:
        gw.stop()
    assert elapsed < 2.0, f"two calls took {elapsed:.2f}s with Redis down"
    assert rx.wait_for(lambda sp: any(x.name == "turn 1" for x in sp))
    spans: list[RSpan] = rx.spans
    (turn,) = [x for x in spans if x.name.startswith("turn")]
    assert turn.attributes["agent_egress.turn.model_calls"] == 2
    (tool,) = [x for x in spans if x.name.startswith("execute_tool")]
    assert tool.parent_id == turn.span_id
    assert tool.attributes["gen_ai.tool.call.id"] == asked["call_id"]
    assert "session state in Redis unavailable" in gw.logs()

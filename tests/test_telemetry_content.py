"""Opt-in message content on chat spans (issue 7): redacted first, capped, only new items.

The e2e test runs the real Codex through a real gateway to a real OTLP receiver;
the unit tests run the per-API extraction (pure) on the shapes each API sends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_gateway, run_codex
from fakeprovider import FakeProvider
from otlp_receiver import OTLPReceiver, RSpan

from agent_egress.addon.protocols import content

# A GitHub token shape the built-in secret rules know; never a real token.
SECRET = "ghp_" + "Zq9" * 12
PROMPT = f"deploy with token {SECRET} please"


def _chats(rx: OTLPReceiver) -> list[RSpan]:
    return sorted((s for s in rx.spans if s.name.startswith("chat ")), key=lambda s: s.start_ns)


@pytest.mark.codex
def test_capture_is_per_team_redacted_capped_and_only_new_items(
        tmp_path: Path, fake: FakeProvider) -> None:
    rx = OTLPReceiver()
    gw = make_gateway(
        tmp_path, fake.base_url,
        telemetry={"traces": {"exporter": "otlp-http", "endpoint": rx.endpoint,
                              "capture_content": False,
                              "capture_content_overrides": {"acme": False, "acme/infra": True},
                              "capture_max_bytes": 512}},
        # the caller's policy lets secrets through to the provider (flag): spans still redact
        guardrails={"default": {"secrets": {"action": "flag"}}})
    gw.env["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # export every 200 ms, not every 5 s
    gw.start()
    try:
        on, _ = gw.issue_token(user="carol", team="infra", org="acme")
        off, _ = gw.issue_token(user="dave", team="payments", org="acme")
        res = run_codex(tmp_path, gw.base_url, on, PROMPT)
        assert res.returncode == 0, res.stderr[-2000:]
        assert rx.wait_for(lambda s: sum(x.name.startswith("chat ") for x in s) >= 2)
        captured = _chats(rx)
        rx.clear()
        res = run_codex(tmp_path, gw.base_url, off, PROMPT)  # a new session
        assert res.returncode == 0, res.stderr[-2000:]
        assert rx.wait_for(lambda s: sum(x.name.startswith("chat ") for x in s) >= 2)
        not_captured = _chats(rx)
        assert gw.stop() == 0
    finally:
        gw.stop()
        rx.stop()
    calls = fake.requests_to("/v1/responses")
    assert any(SECRET in json.dumps(c.json) for c in calls), "policy flag: provider saw it"

    # team acme/infra: content on both chat spans, redacted, capped, new items only
    assert len(captured) == 2
    first, second = captured
    in1 = json.loads(first.attributes["gen_ai.input.messages"])
    in2 = json.loads(second.attributes["gen_ai.input.messages"])
    out1 = json.loads(first.attributes["gen_ai.output.messages"])
    out2 = json.loads(second.attributes["gen_ai.output.messages"])
    texts1 = [p["content"] for m in in1 for p in m["parts"] if p["type"] == "text"]
    assert "deploy with token [REDACTED:secrets.github_token] please" in texts1
    assert {m["role"] for m in in1} >= {"system", "user"}  # Codex's developer prompt is new
    assert first.attributes["agent_egress.content.truncated"] is True  # prompt > 512 bytes
    assert all(len(t.encode()) <= 512 + len("…[truncated]".encode()) for t in texts1)
    # the second call resends the history: only the tool output is new
    assert [m["role"] for m in in2] == ["tool"]
    (part,) = in2[0]["parts"]
    assert part["type"] == "tool_call_response" and "fake-tool-ran" in part["response"]
    assert part["id"] == out1[0]["parts"][0]["id"]
    assert out1[0]["finish_reason"] == "tool_call"
    assert out1[0]["parts"][0]["type"] == "tool_call"
    assert out1[0]["parts"][0]["name"] == "exec_command"
    assert out2 == [{"role": "assistant", "finish_reason": "stop",
                     "parts": [{"type": "text", "content": fake.answer_text}]}]
    # team acme/payments (org acme off, no team override): no content at all
    assert len(not_captured) == 2
    for s in not_captured:
        assert not {k for k in s.attributes if k.startswith(("gen_ai.input", "gen_ai.output",
                                                              "gen_ai.system"))}
    blob = json.dumps([s.attributes for s in captured + not_captured])
    assert SECRET not in blob and "Zq9Zq9Zq9" not in blob


def _clean(text: str, direction: str, role: str) -> str:
    return text.replace(SECRET, "[REDACTED:x]")


def test_chat_completions_new_messages_and_streamed_output() -> None:
    body = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "function": {"name": "sh", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"printed {SECRET}"},
    ]}
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": "hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
    ]
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    got = content.extract("openai.chat", json.dumps(body).encode(), raw + b"data: [DONE]\n\n",
                          True, _clean)
    assert got is not None
    assert got.input == [{"role": "tool", "parts": [
        {"type": "tool_call_response", "id": "c1", "response": "printed [REDACTED:x]"}]}]
    assert got.output == [{"role": "assistant", "finish_reason": "stop",
                           "parts": [{"type": "text", "content": "hello"}]}]


def test_anthropic_messages_first_call_takes_system_and_tool_use_output() -> None:
    body: dict[str, Any] = {"system": [{"type": "text", "text": "you are claude"}],
                            "messages": [{"role": "user", "content": f"use {SECRET}"}]}
    events = [
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "tool_use", "id": "tu1", "name": "Bash", "input": {}}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": '{"command":'}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": '"ls"}'}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}},
    ]
    raw = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    got = content.extract("anthropic.messages", json.dumps(body).encode(), raw, True, _clean)
    assert got is not None
    assert got.system == [{"type": "text", "content": "you are claude"}]
    assert got.input == [{"role": "user", "parts": [{"type": "text",
                                                     "content": "use [REDACTED:x]"}]}]
    assert got.output == [{"role": "assistant", "finish_reason": "tool_call", "parts": [
        {"type": "tool_call", "id": "tu1", "name": "Bash", "arguments": '{"command":"ls"}'}]}]
    # a later call (history ends with the model's tool_use): system is not new, tool result is
    body["messages"] += [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "tu1", "name": "Bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu1",
                                      "content": "a.txt"}]}]
    got = content.extract("anthropic.messages", json.dumps(body).encode(), b"{}", False, _clean)
    assert got is not None and got.system == []
    assert got.input == [{"role": "user", "parts": [
        {"type": "tool_call_response", "id": "tu1", "response": "a.txt"}]}]


def test_unknown_api_captures_nothing() -> None:
    assert content.extract("passthrough", b"{}", b"", False, _clean) is None

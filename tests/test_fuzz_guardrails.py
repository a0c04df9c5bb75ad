"""Property-based fuzzing of the guardrails' parsers and output guards (issue 12.2).

``items.segments`` reads client bodies (a crash there would skip the scan), and the
output guards rewrite provider streams in the stream callable (a crash there cuts the
client's stream). Both get bodies and SSE streams of any shape, cut anywhere, scanned
by a real engine with every secret rule on; the properties: nothing raises, what the
guard emits is SSE, and its held-back text stays bounded.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_protocols import (
    FUZZ,
    _bodies,
    _cuts,
    _objects,
    split,
    sse_streams,
)

from agent_egress.addon.guardrails import items
from agent_egress.addon.guardrails.anthropic_stream import AnthropicOutputGuard
from agent_egress.addon.guardrails.config import GuardrailsConfig
from agent_egress.addon.guardrails.engine import Guardrails
from agent_egress.addon.guardrails.findings import Finding
from agent_egress.addon.guardrails.stream import _MAX_OPEN_KEY, MAX_RUN, OutputGuard, guard_body
from agent_egress.addon.protocols.sse import MAX_EVENT_BYTES

APIS = ("openai.responses", "openai.chat", "anthropic.messages")
ENGINE = Guardrails(GuardrailsConfig.model_validate({"default": {
    "secrets": {"directions": ["input", "tool_output", "model_output"], "action": "redact"},
}})).engine_for("acme", "payments", "key_1")
BLOCKING = Guardrails(GuardrailsConfig.model_validate({"default": {
    "secrets": {"directions": ["model_output"], "action": "block"},
}})).engine_for("acme", "payments", "key_1")
HOLDBACK = GuardrailsConfig().holdback_chars
AWS = "AKIA" + "QZ7RT2WX9MB4KD6P"


def scan(text: str) -> list[Finding]:
    return ENGINE.scan(text, "model_output", "assistant")


def scan_block(text: str) -> list[Finding]:
    return BLOCKING.scan(text, "model_output", "assistant")


def guards(scanner: Any = scan) -> list[Any]:
    def message(f: Finding) -> str:
        return f"blocked by {f.rule}"

    return [OutputGuard("openai.responses", scanner, HOLDBACK, message),
            OutputGuard("openai.chat", scanner, HOLDBACK, message),
            AnthropicOutputGuard(scanner, HOLDBACK, message)]


# --- request items -------------------------------------------------------------------
@FUZZ
@given(_objects)
def test_segments_never_raise_and_paths_put_back(obj: dict[str, Any]) -> None:
    for api in APIS:
        segs = items.segments(obj, api)
        for seg in segs:
            assert isinstance(seg.text, str) and seg.text
            items.put(obj, seg.path, "R")  # every path a segment names can be written
        again = {s.path: s.text for s in items.segments(obj, api)}
        for seg in segs:
            assert again.get(seg.path) == "R"


@pytest.mark.parametrize("bad", [[], {}, 1, None, ["function_call"]])
def test_unhashable_type_tag_does_not_skip_the_scan(bad: Any) -> None:
    """A list as ``type`` used to raise in ``x in frozenset`` and the input went unscanned."""
    body = {"model": "m", "input": [
        {"type": bad, "role": "user", "content": [{"type": bad, "text": "x"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": AWS}]},
        {"type": "function_call_output", "call_id": "c", "output": AWS}]}
    texts = [s.text for s in items.segments(body, "openai.responses")]
    assert texts.count(AWS) == 2


# --- output guards -------------------------------------------------------------------
# Provider JSON of the wrong type or nesting once raised inside the stream callable
# (stream.py / anthropic_stream.py, found by these tests and atheris): regressions.
STREAM_CRASHES = {
    "chat_tool_calls_int": ("openai.chat", b'data: {"choices":[{"index":0,"delta":'
                                           b'{"tool_calls":1}}]}\n\n'),
    "chat_tool_call_not_object": ("openai.chat", b'data: {"choices":[{"index":0,"delta":'
                                  b'{"tool_calls":[{"index":0,"function":{"arguments":"'
                                  + b"abc " * 40 + b'"}}]}}]}\n\ndata: {"choices":[{"index":0,'
                                  b'"delta":{"tool_calls":[5]},"finish_reason":"stop"}]}\n\n'),
    "responses_item_id_list": ("openai.responses", b"event: response.output_text.delta\ndata: "
                               b'{"type":"response.output_text.delta","item_id":[1],'
                               b'"delta":"hi"}\n\n'),
    "chat_nested_5000": ("openai.chat", b"data: " + b"[" * 5000 + b"]" * 5000 + b"\n\n"),
    "responses_nested_5000": ("openai.responses", b"event: response.completed\ndata: "
                              + b"[" * 5000 + b"]" * 5000 + b"\n\n"),
    "anthropic_nested_5000": ("anthropic.messages", b"event: content_block_delta\ndata: "
                              + b"[" * 5000 + b"]" * 5000 + b"\n\n"),
}
BODY_CRASHES = {
    "chat_choices_int": ("openai.chat", b'{"choices":1}'),
    "chat_tool_calls_int": ("openai.chat", b'{"choices":[{"message":{"tool_calls":1}}]}'),
    "responses_output_int": ("openai.responses", b'{"output":1}'),
    "responses_content_int": ("openai.responses", b'{"output":[{"content":1}]}'),
    "anthropic_content_int": ("anthropic.messages", b'{"content":1}'),
    "nested_50000": ("openai.responses", b'{"output":' * 50_000 + b"[]" + b"}" * 50_000),
}


@pytest.mark.parametrize("case", sorted(STREAM_CRASHES))
def test_wrong_typed_stream_json_does_not_crash_the_guard(case: str) -> None:
    api, raw = STREAM_CRASHES[case]
    guard = guards()[APIS.index(api)]
    guard.feed(raw)
    guard.close()


@pytest.mark.parametrize("case", sorted(BODY_CRASHES))
def test_wrong_typed_body_json_does_not_crash_the_guard(case: str) -> None:
    api, body = BODY_CRASHES[case]
    assert guard_body(api, body, scan)[0] is None
def _run(guard: Any, chunks: list[bytes]) -> bytes:
    out = b"".join(guard.feed(c) for c in chunks) + guard.close()
    return out


@FUZZ
@given(sse_streams(), _cuts)
def test_output_guards_survive_any_stream_any_chunking(raw: bytes, cuts: list[int]) -> None:
    for make_scan in (scan, scan_block):
        for guard in guards(make_scan):
            _run(guard, split(raw, cuts))


@FUZZ
@given(st.binary(max_size=2000), _cuts)
def test_output_guards_survive_garbage(raw: bytes, cuts: list[int]) -> None:
    for guard in guards():
        _run(guard, split(raw, cuts))


_delta_text = st.lists(st.sampled_from(["a", "Z", "9", " ", "\n", "-----BEGIN ", "KEY-----",
                                        "-----END ", AWS[:7], AWS[7:], "é", "\\", "x" * 700]),
                       max_size=30).map("".join)


@FUZZ
@given(st.lists(_delta_text, max_size=40), st.sampled_from(APIS))
def test_held_back_text_stays_bounded(deltas: list[str], api: str) -> None:
    """Whatever the text, a guard holds at most the window, one growing run or one
    open key block (plus the delta that just arrived)."""
    if api == "anthropic.messages":
        guard: Any = AnthropicOutputGuard(scan, HOLDBACK, str)
    else:
        guard = OutputGuard(api, scan, HOLDBACK, str)
    bound = HOLDBACK + max(MAX_RUN, _MAX_OPEN_KEY)
    for d in deltas:
        if api == "openai.responses":
            ev = {"type": "response.output_text.delta", "item_id": "m", "output_index": 0,
                  "content_index": 0, "delta": d}
            raw = b"event: response.output_text.delta\ndata: " + json.dumps(ev).encode()
        elif api == "openai.chat":
            raw = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": d}}]}
                                         ).encode()
        else:
            ev = {"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": d}}
            raw = b"event: content_block_delta\ndata: " + json.dumps(ev).encode()
        guard.feed(raw + b"\n\n")
        held = [g for g in guard._texts.values()]
        for g in held:
            pending = (g[1] if isinstance(g, tuple) else g).pending
            assert len(pending) <= bound + len(d)
    guard.close()


def test_guard_buffer_stays_under_the_event_cap() -> None:
    """Megabytes with no event boundary: the SSE tail the guard keeps is capped."""
    chunk = b"x" * 65536
    for guard in guards():
        for _ in range(MAX_EVENT_BYTES // len(chunk) + 8):
            guard.feed(chunk)
            assert len(guard._sse._buf) <= MAX_EVENT_BYTES
        assert guard._sse.oversized >= 1
        guard.close()


@FUZZ
@given(_bodies)
def test_guard_body_never_raises(body: bytes) -> None:
    for api in APIS:
        new, findings = guard_body(api, body, scan)
        assert new is None or isinstance(json.loads(new), dict)
        assert all(isinstance(f, Finding) for f in findings)

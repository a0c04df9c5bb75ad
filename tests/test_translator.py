"""Property tests of the Responses <-> Chat Completions translator (pure, no network)."""

from __future__ import annotations

import itertools
import json
from typing import Any

from fakeprovider import iter_sse
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_egress.addon.protocols.openai_responses import ResponsesStreamReader
from agent_egress.addon.protocols.responses_to_chat import (
    ChatToResponsesStream,
    chat_messages,
    chat_request,
    response_body,
    translate_all,
)

names = st.sampled_from(["exec_command", "apply_patch", "read_file", "grep"])
texts = st.text(max_size=200)
args_st = st.dictionaries(st.sampled_from(["cmd", "path", "n", "q"]),
                          st.one_of(st.text(max_size=40), st.integers()), max_size=3)
calls_st = st.lists(st.tuples(names, args_st), max_size=3)
usage_st = st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6),
                     st.integers(0, 10**6))


def chat_stream(text: str, calls: list[tuple[str, dict[str, Any]]], usage: tuple[int, ...],
                pieces: int = 3) -> bytes:
    """A Chat Completions stream as OpenAI sends it (tool arguments in fragments)."""
    prompt, cached, completion, reasoning = usage

    def chunk(choices: list[dict[str, Any]], **more: Any) -> bytes:
        obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
               "model": "m-1", "choices": choices, **more}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    out = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    step = max(1, len(text) // pieces)
    for i in range(0, len(text), step):
        out.append(chunk([{"index": 0, "delta": {"content": text[i:i + step]}}]))
    for n, (name, args) in enumerate(calls):
        head = {"index": n, "id": f"call_{n}", "type": "function",
                "function": {"name": name, "arguments": ""}}
        out.append(chunk([{"index": 0, "delta": {"tool_calls": [head]}}]))
        raw = json.dumps(args)
        for i in range(0, len(raw), 7):
            frag = {"index": n, "function": {"arguments": raw[i:i + 7]}}
            out.append(chunk([{"index": 0, "delta": {"tool_calls": [frag]}}]))
    finish = "tool_calls" if calls else "stop"
    out.append(chunk([{"index": 0, "delta": {}, "finish_reason": finish}]))
    out.append(chunk([], usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                "prompt_tokens_details": {"cached_tokens": cached},
                                "completion_tokens_details": {"reasoning_tokens": reasoning}}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(data) for _, data in iter_sse(raw)]


@settings(max_examples=150, deadline=None)
@given(texts, calls_st, usage_st, st.lists(st.integers(0, 10**6), max_size=30))
def test_stream_translation(text: str, calls: list[tuple[str, dict[str, Any]]],
                            usage: tuple[int, int, int, int], cuts: list[int]) -> None:
    stream = chat_stream(text, calls, usage)
    custom = frozenset({"apply_patch"})
    whole = translate_all([stream], custom)
    chunked = translate_all(split(stream, cuts), custom)
    assert chunked == whole, "network chunk boundaries do not change the output"
    evs = events(whole)
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert evs[0]["type"] == "response.created" and evs[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta") == text
    done = [e["item"] for e in evs if e["type"] == "response.output_item.done"]
    assert "".join(c["text"] for i in done if i["type"] == "message" for c in i["content"]) == text
    got_calls = [(i["name"], json.loads(i["arguments"]) if i["type"] == "function_call"
                  else i["input"]) for i in done if i["type"] != "message"]
    want = [(n, a if n not in custom else json.dumps(a)) for n, a in calls]
    # A custom tool (apply_patch) takes one string: args without "input" pass whole.
    assert got_calls == want
    final = evs[-1]["response"]
    assert final["output"] == done and final["status"] == "completed"
    prompt, cached, completion, reasoning = usage
    assert final["usage"]["input_tokens"] == prompt
    assert final["usage"]["output_tokens"] == completion
    # What the gateway's own stream reader (ledger, telemetry) sees in the translation:
    reader = ResponsesStreamReader()
    for piece in split(whole, cuts):
        reader.feed(piece)
    reader.close()
    s = reader.summary
    assert s.usage is not None and (s.usage.input_tokens, s.usage.cached_input_tokens,
                                    s.usage.output_tokens, s.usage.reasoning_tokens) == (
        prompt, cached, completion, reasoning)
    assert [n for _, n in s.tool_calls] == [n for n, _ in calls]
    assert s.model == "m-1" and s.status == "completed"


@settings(max_examples=60, deadline=None)
@given(texts, calls_st, usage_st, st.integers(0, 10**6))
def test_cut_stream_never_completes(text: str, calls: list[tuple[str, dict[str, Any]]],
                                    usage: tuple[int, int, int, int], at: int) -> None:
    stream = chat_stream(text, calls, usage)
    cut = stream[: at % stream.index(b'"finish_reason": "')]
    out = translate_all([cut])
    assert b"response.completed" not in out, "the client must see a cut stream and retry"


def test_feed_returns_nothing_until_an_event_completes() -> None:
    tr = ChatToResponsesStream()
    stream = chat_stream("hello", [], (1, 0, 1, 0))
    assert tr.feed(stream[:10]) == b""
    assert tr.feed(stream[10:]).startswith(b"event: response.created")


def test_length_finish_is_incomplete_and_errors_fail() -> None:
    stream = chat_stream("abc", [], (1, 0, 1, 0)).replace(b'"stop"', b'"length"')
    final = events(translate_all([stream]))[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    err = b'data: {"error": {"message": "overloaded", "code": "busy"}}\n\n'
    evs = events(translate_all([err]))
    assert evs[-1]["type"] == "response.failed"
    assert evs[-1]["response"]["error"] == {"code": "busy", "message": "overloaded"}


items_st = st.lists(st.one_of(
    st.tuples(st.just("msg"), st.sampled_from(["user", "assistant", "developer"]), texts),
    st.tuples(st.just("call"), names, args_st)), max_size=8)


@settings(max_examples=150, deadline=None)
@given(items_st)
def test_request_translation(spec: list[tuple[Any, ...]]) -> None:
    items: list[dict[str, Any]] = []
    for n, s in enumerate(spec):
        if s[0] == "msg":
            kind = "output_text" if s[1] == "assistant" else "input_text"
            items.append({"type": "message", "role": s[1],
                          "content": [{"type": kind, "text": s[2]}]})
        else:
            items.append({"type": "function_call", "call_id": f"c{n}", "name": s[1],
                          "arguments": json.dumps(s[2])})
            items.append({"type": "function_call_output", "call_id": f"c{n}",
                          "output": f"out{n}"})
        items.append({"type": "reasoning", "summary": []})  # dropped: no chat equivalent
    body = {"model": "gpt-5.5", "input": items, "stream": True, "store": False,
            "instructions": "be brief", "tools": [
                {"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
                {"type": "custom", "name": "apply_patch", "description": "patch"},
                {"type": "web_search"}],
            "tool_choice": "auto", "max_output_tokens": 100, "client_metadata": {"x": "y"}}
    chat = chat_request(body, "served")
    assert chat["model"] == "served" and chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["max_tokens"] == 100 and "client_metadata" not in chat
    assert [t["function"]["name"] for t in chat["tools"]] == ["exec_command", "apply_patch"]
    msgs = chat["messages"]
    assert msgs[0] == {"role": "system", "content": "be brief"}
    # Texts and tool exchanges keep their order; every tool result follows its call.
    want: list[Any] = []
    for n, s in enumerate(spec):
        want.append(("text", s[2]) if s[0] == "msg" else ("call", f"c{n}", s[1]))
        if s[0] == "call":
            want.append(("result", f"c{n}", f"out{n}"))
    got: list[Any] = []
    for m in msgs[1:]:
        if m["role"] == "tool":
            got.append(("result", m["tool_call_id"], m["content"]))
            continue
        if m.get("content") is not None:
            got.append(("text", m["content"]))
        for tc in m.get("tool_calls", []):
            got.append(("call", tc["id"], tc["function"]["name"]))
    assert got == want


def test_non_streamed_body_and_custom_tools() -> None:
    chat = {"id": "x", "model": "m", "created": 5, "choices": [{"index": 0,
            "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "hi",
            "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "apply_patch", "arguments": json.dumps({"input": "*** Begin Patch"})}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    resp = response_body(chat, frozenset({"apply_patch"}))
    assert resp["status"] == "completed" and resp["usage"]["total_tokens"] == 5
    assert resp["output"][0]["content"][0]["text"] == "hi"
    assert resp["output"][1] == {"type": "custom_tool_call", "id": "fc_x_0", "call_id": "c1",
                                 "name": "apply_patch", "input": "*** Begin Patch",
                                 "status": "completed"}
    # ...and back: a custom tool call in the history becomes a function call again.
    msgs = chat_messages([{"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch",
                           "input": "*** Begin Patch"},
                          {"type": "custom_tool_call_output", "call_id": "c1", "output": "ok"}])
    assert json.loads(msgs[0]["tool_calls"][0]["function"]["arguments"]) == {
        "input": "*** Begin Patch"}
    assert msgs[1] == {"role": "tool", "tool_call_id": "c1", "content": "ok"}

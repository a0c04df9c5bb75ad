"""OpenAI Responses and Chat readers: request facts, stream summaries, bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_egress.addon.protocols import openai_chat, openai_responses
from agent_egress.addon.protocols.summary import BadRequest, ResponseSummary
from agent_egress.addon.protocols.usage import Usage

# ---------------------------------------------------------------- helpers

USAGE_JSON = {
    "input_tokens": 12_000,
    "input_tokens_details": {"cached_tokens": 9_000},
    "output_tokens": 700,
    "output_tokens_details": {"reasoning_tokens": 300},
    "total_tokens": 12_700,
}
USAGE = Usage(
    input_tokens=12_000, cached_input_tokens=9_000, output_tokens=700, reasoning_tokens=300
)
# Text that would fool a naive substring reader if deltas were inspected.
TRICKY = 'he wrote "usage": {"input_tokens": 1} and "response.completed" \n\n data: x'


def sse(obj: dict[str, Any], *, named: bool = True, spaced: bool = False) -> bytes:
    seps = (", ", ": ") if spaced else (",", ":")
    data = json.dumps(obj, separators=seps).encode()
    head = b"event: " + obj["type"].encode() + b"\n" if named else b""
    return head + b"data: " + data + b"\n\n"


def response_obj(status: str, usage: dict[str, Any] | None, **more: Any) -> dict[str, Any]:
    return {
        "id": "resp_abc",
        "object": "response",
        "status": status,
        "model": "gpt-5.5-2026-04-23",
        "output": [],
        "usage": usage,
        "error": None,
        "incomplete_details": None,
        **more,
    }


def codex_events(final: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A 52-event Codex turn: reasoning, a message streamed in deltas, a tool call."""
    seq = iter(range(1000))

    def ev(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(seq), **fields}

    start = response_obj("in_progress", None)
    msg = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "text": TRICKY * 39, "annotations": []}]}
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_A", "name": "shell",
            "arguments": '{"command":["ls"]}', "status": "completed"}
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": []}
    events = [
        ev("response.created", response=start),
        ev("response.in_progress", response=start),
        ev("response.output_item.added", output_index=0, item=reasoning),
        ev("response.output_item.done", output_index=0, item=reasoning),
        ev("response.output_item.added", output_index=1, item={**msg, "content": []}),
        ev("response.content_part.added", item_id="msg_1", output_index=1, content_index=0,
           part={"type": "output_text", "text": ""}),
    ]
    events += [
        ev("response.output_text.delta", item_id="msg_1", output_index=1, content_index=0,
           delta=TRICKY)
        for _ in range(39)
    ]
    events += [
        ev("response.output_text.done", item_id="msg_1", output_index=1, content_index=0,
           text=TRICKY * 39),
        ev("response.output_item.done", output_index=1, item=msg),
        ev("response.output_item.added", output_index=2, item={**call, "arguments": ""}),
        ev("response.function_call_arguments.delta", item_id="fc_1", output_index=2,
           delta=call["arguments"]),
        ev("response.function_call_arguments.done", item_id="fc_1", output_index=2,
           arguments=call["arguments"]),
        ev("response.output_item.done", output_index=2, item=call),
    ]
    events.append(final if final is not None else ev(
        "response.completed", response=response_obj("completed", USAGE_JSON)))
    return events


def split_feed(reader: Any, raw: bytes, cuts: list[int]) -> ResponseSummary:
    prev = 0
    for cut in [*sorted({c % (len(raw) + 1) for c in cuts}), len(raw)]:
        reader.feed(raw[prev:cut])
        prev = cut
    reader.feed(b"")
    reader.close()
    summary: ResponseSummary = reader.summary
    return summary


cuts_st = st.lists(st.integers(0, 200_000), max_size=40)

# ------------------------------------------------------- Responses requests


def test_responses_parse_request() -> None:
    body = json.dumps({
        "model": "gpt-5.5", "stream": True, "input": [{"type": "message"}] * 3,
        "prompt_cache_key": "sess-1", "client_metadata": {"session_id": "sess-1", "turn_id": "t"},
    }).encode()
    info = openai_responses.parse_request(body)
    assert info == openai_responses.RequestInfo("gpt-5.5", True, "sess-1", 3, "sess-1")
    info = openai_responses.parse_request(b'{"model": "m", "input": "hi"}')
    assert (info.stream, info.input_items, info.prompt_cache_key, info.client_session_id) == (
        False, 1, None, None)
    assert openai_responses.parse_request(b'{"model": "m"}').input_items == 0


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (b"{not json", None, "JSON"),
        (b"\xff\xfe", None, "JSON"),
        (b"[" * 200_000, None, "JSON"),
        (b"[1, 2]", None, "object"),
        (b'{"input": "x"}', "model", "model"),
        (b'{"model": "", "input": "x"}', "model", "model"),
        (b'{"model": 5, "input": "x"}', "model", "model"),
        (b'{"model": "m", "input": 5}', "input", "input"),
    ],
)
def test_responses_parse_request_errors(body: bytes, param: str | None, needle: str) -> None:
    with pytest.raises(BadRequest) as exc:
        openai_responses.parse_request(body)
    assert exc.value.param == param
    assert needle in exc.value.message


# --------------------------------------------------------- Responses stream


def test_codex_stream_has_52_events() -> None:
    assert len(codex_events()) == 52


@settings(max_examples=150, deadline=None)
@given(cuts_st, st.booleans(), st.booleans(), st.booleans())
def test_responses_stream_any_split(
    cuts: list[int], crlf: bool, spaced: bool, named: bool
) -> None:
    raw = b"".join(sse(e, spaced=spaced, named=named) for e in codex_events())
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    s = split_feed(openai_responses.ResponsesStreamReader(), raw, cuts)
    assert s.usage == USAGE
    assert s.response_id == "resp_abc"
    assert s.model == "gpt-5.5-2026-04-23"
    assert s.status == "completed"
    assert s.tool_calls == [("call_A", "shell")]
    assert s.events == 52
    assert (s.error_code, s.error_message, s.oversized_events) == (None, None, 0)


def test_responses_stream_cut_before_completed_has_no_usage() -> None:
    raw = b"".join(sse(e) for e in codex_events()[:-1])
    reader = openai_responses.ResponsesStreamReader()
    reader.feed(raw[: len(raw) // 2])
    reader.feed(raw[len(raw) // 2 :])
    reader.close()
    assert reader.summary.usage is None
    assert reader.summary.status is None
    assert reader.summary.response_id == "resp_abc"
    assert reader.summary.tool_calls == [("call_A", "shell")]


def test_responses_stream_failed() -> None:
    final = {"type": "response.failed", "sequence_number": 60, "response": response_obj(
        "failed", None, error={"code": "insufficient_quota", "message": "Quota exceeded"})}
    reader = openai_responses.ResponsesStreamReader()
    reader.feed(b"".join(sse(e) for e in codex_events(final)))
    s = reader.summary
    assert (s.status, s.error_code, s.error_message, s.usage) == (
        "failed", "insufficient_quota", "Quota exceeded", None)


def test_responses_stream_incomplete() -> None:
    final = {"type": "response.incomplete", "sequence_number": 60, "response": response_obj(
        "incomplete", USAGE_JSON, incomplete_details={"reason": "max_output_tokens"})}
    reader = openai_responses.ResponsesStreamReader()
    reader.feed(b"".join(sse(e) for e in codex_events(final)))
    s = reader.summary
    assert (s.status, s.finish_reasons, s.usage) == ("incomplete", ["max_output_tokens"], USAGE)


@pytest.mark.parametrize(
    "event",
    [
        {"type": "error", "sequence_number": 2, "code": "rate_limit_exceeded",
         "message": "Slow down", "param": None},
        {"type": "error", "sequence_number": 2,
         "error": {"type": "server_error", "code": "rate_limit_exceeded", "message": "Slow down"}},
    ],
)
def test_responses_stream_error_event(event: dict[str, Any]) -> None:
    reader = openai_responses.ResponsesStreamReader()
    reader.feed(b"".join(sse(e) for e in codex_events()[:3]) + sse(event))
    reader.close()
    s = reader.summary
    assert (s.status, s.error_code, s.error_message, s.usage) == (
        "failed", "rate_limit_exceeded", "Slow down", None)


def test_responses_stream_final_event_without_blank_line() -> None:
    raw = b"".join(sse(e) for e in codex_events())[:-2]
    reader = openai_responses.ResponsesStreamReader()
    reader.feed(raw)
    assert reader.summary.usage is None
    reader.close()
    assert reader.summary.usage == USAGE


def test_responses_stream_oversized_event_counted() -> None:
    reader = openai_responses.ResponsesStreamReader(max_event_bytes=2048)
    reader.feed(b"".join(sse(e) for e in codex_events()))
    reader.close()
    # the message's output_item.done and output_text.done hold all 39 deltas' text
    assert reader.summary.oversized_events == 2
    assert reader.summary.usage == USAGE


def test_responses_stream_garbage_never_raises() -> None:
    reader = openai_responses.ResponsesStreamReader()
    reader.feed(b"event: response.completed\ndata: {oops\n\n")
    reader.feed(b"event: response.completed\ndata: [1]\n\n")
    reader.feed(b'event: response.completed\ndata: {"type":"response.completed","response":1}\n\n')
    reader.feed(b"\x00\xff garbage \n\n")
    reader.close()
    assert reader.summary.usage is None
    assert reader.summary.status == "completed"


# ------------------------------------------------------ Responses read_body


def test_responses_read_body_response() -> None:
    call = {"type": "function_call", "call_id": "call_B", "name": "shell", "arguments": ""}
    custom = {"type": "custom_tool_call", "call_id": "call_C", "name": "apply_patch",
              "input": "*** Begin Patch"}
    message = {"type": "message", "content": []}
    body = json.dumps(response_obj("completed", USAGE_JSON, output=[call, message, custom]))
    s = openai_responses.read_body(body.encode())
    assert (s.usage, s.response_id, s.model, s.status, s.events) == (
        USAGE, "resp_abc", "gpt-5.5-2026-04-23", "completed", 0)
    assert s.tool_calls == [("call_B", "shell"), ("call_C", "apply_patch")]


def test_responses_read_body_compact() -> None:
    body = json.dumps({
        "id": "resp_cmp", "object": "response.compaction", "created_at": 1,
        "output": [{"type": "compaction", "encrypted_content": "x"}], "usage": USAGE_JSON,
    }).encode()
    s = openai_responses.read_body(body)
    assert (s.usage, s.response_id, s.status, s.model) == (USAGE, "resp_cmp", "completed", None)


def test_responses_read_body_error() -> None:
    body = json.dumps({"error": {"message": "Invalid model", "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}}).encode()
    s = openai_responses.read_body(body)
    assert (s.status, s.error_code, s.error_message, s.usage) == (
        "failed", "model_not_found", "Invalid model", None)
    s = openai_responses.read_body(b'{"error": {"message": "m", "type": "server_error"}}')
    assert s.error_code == "server_error"


@pytest.mark.parametrize("body", [b"", b"<html>502</html>", b"[]", b"\xff", b'{"usage": 3}',
                                  b'{"usage": {"input_tokens": "many"}}'])
def test_responses_read_body_garbage(body: bytes) -> None:
    s = openai_responses.read_body(body)
    assert s.usage is None or s.usage == Usage()


def test_estimate_tokens() -> None:
    assert [openai_responses.estimate_tokens(n) for n in (0, 1, 4, 5, 400)] == [0, 1, 1, 2, 100]


# ------------------------------------------------------------ Chat requests


def test_chat_parse_request() -> None:
    body = json.dumps({"model": "gpt-5.5", "stream": True, "prompt_cache_key": "k",
                       "messages": [{"role": "user", "content": "hi"}] * 2}).encode()
    assert openai_chat.parse_request(body) == openai_responses.RequestInfo(
        "gpt-5.5", True, "k", 2, None)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"nope", None),
        (b'{"messages": []}', "model"),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
    ],
)
def test_chat_parse_request_errors(body: bytes, param: str | None) -> None:
    with pytest.raises(BadRequest) as exc:
        openai_chat.parse_request(body)
    assert exc.value.param == param


def test_with_stream_usage() -> None:
    body = (b'{"model":"m","stream":true,"stream_options":{"x":1},'
            b'"messages":[{"content":"\xc3\xa9"}]}')
    out = openai_chat.with_stream_usage(body)
    assert out is not None
    obj = json.loads(out)
    assert obj["stream_options"] == {"x": 1, "include_usage": True}
    assert list(obj) == ["model", "stream", "stream_options", "messages"]
    assert obj["messages"][0]["content"] == "é"
    assert openai_chat.with_stream_usage(b'{"model":"m","stream":true}') == (
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}')
    for unchanged in (
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        b'{"model":"m","stream":false}',
        b'{"model":"m"}',
        b"garbage",
        b"[]",
    ):
        assert openai_chat.with_stream_usage(unchanged) is None


# -------------------------------------------------------------- Chat stream

CHAT_USAGE_JSON = {
    "prompt_tokens": 5_000,
    "completion_tokens": 400,
    "total_tokens": 5_400,
    "prompt_tokens_details": {"cached_tokens": 4_096, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
}
CHAT_USAGE = Usage(
    input_tokens=5_000, cached_input_tokens=4_096, output_tokens=400, reasoning_tokens=128
)


def chat_events(*, with_usage: bool = True, tools: bool = True) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-5.5-2026-04-23", "system_fingerprint": None}
    extra = {"usage": None} if with_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}], **extra}

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": TRICKY}) for _ in range(30)]
    if tools:
        for i, (cid, name) in enumerate([("call_1", "shell"), ("call_2", "read_file")]):
            events.append(chunk({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                                 "function": {"name": name, "arguments": ""}}]}))
            events += [chunk({"tool_calls": [{"index": i, "function": {
                "arguments": '{"name": "x"}'}}]}) for _ in range(3)]
    events.append(chunk({}, "tool_calls" if tools else "stop"))
    if with_usage:
        events.append({**base, "choices": [], "usage": CHAT_USAGE_JSON})
    return events


def chat_raw(events: list[dict[str, Any]], spaced: bool) -> bytes:
    seps = (", ", ": ") if spaced else (",", ":")
    return b"".join(b"data: " + json.dumps(e, separators=seps).encode() + b"\n\n"
                    for e in events) + b"data: [DONE]\n\n"


@settings(max_examples=150, deadline=None)
@given(cuts_st, st.booleans(), st.booleans())
def test_chat_stream_any_split(cuts: list[int], spaced: bool, crlf: bool) -> None:
    raw = chat_raw(chat_events(), spaced)
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    reader = openai_chat.ChatStreamReader()
    s = split_feed(reader, raw, cuts)
    assert reader.done
    assert s.usage == CHAT_USAGE
    assert (s.response_id, s.model, s.status) == ("chatcmpl-1", "gpt-5.5-2026-04-23", "tool_calls")
    assert s.finish_reasons == ["tool_calls"]
    assert s.tool_calls == [("call_1", "shell"), ("call_2", "read_file")]
    assert s.events == len(chat_events()) + 1


def test_chat_stream_without_usage_chunk() -> None:
    reader = openai_chat.ChatStreamReader()
    reader.feed(chat_raw(chat_events(with_usage=False, tools=False), spaced=True))
    reader.close()
    s = reader.summary
    assert (s.usage, s.status, s.tool_calls, reader.done) == (None, "stop", [], True)


def test_chat_stream_cut_and_error() -> None:
    reader = openai_chat.ChatStreamReader()
    reader.feed(chat_raw(chat_events(), spaced=False)[:2000])
    reader.close()
    assert reader.summary.usage is None and not reader.done
    reader = openai_chat.ChatStreamReader()
    raw = chat_raw(chat_events()[:3], spaced=False)[: -len(b"data: [DONE]\n\n")]
    reader.feed(raw + b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n')
    s = reader.summary
    assert (s.status, s.error_code, s.error_message) == ("failed", "server_error", "boom")


def test_chat_read_body() -> None:
    body = json.dumps({
        "id": "chatcmpl-2", "object": "chat.completion", "model": "gpt-5.5",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "call_9", "type": "function", "function": {"name": "shell",
                                                                 "arguments": "{}"}}]}}],
        "usage": CHAT_USAGE_JSON,
    }).encode()
    s = openai_chat.read_body(body)
    assert (s.usage, s.response_id, s.model, s.status) == (
        CHAT_USAGE, "chatcmpl-2", "gpt-5.5", "tool_calls")
    assert s.tool_calls == [("call_9", "shell")]
    err = openai_chat.read_body(b'{"error": {"message": "bad", "type": "invalid_request_error",'
                                b' "param": null, "code": null}}')
    assert (err.status, err.error_code, err.error_message) == (
        "failed", "invalid_request_error", "bad")
    for garbage in (b"", b"nope", b"[]", b'{"usage": null}'):
        assert openai_chat.read_body(garbage).usage is None


# ------------------------------------------------------- per-chunk economy


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    parsed: list[bytes] = []
    real = json.loads

    def counting(data: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(bytes(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)  # the readers call json.loads
    return parsed


def test_responses_reader_parses_only_needed_events(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = _count_parses(monkeypatch)
    reader = openai_responses.ResponsesStreamReader()
    reader.feed(b"".join(sse(e) for e in codex_events()))
    monkeypatch.undo()
    # response.created is only kept: the terminal event carries id and model too
    assert [json.loads(p)["type"] for p in parsed] == [
        "response.output_item.done", "response.completed"]
    reader.close()
    assert reader.summary.response_id == "resp_abc"


def test_responses_created_parsed_when_stream_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = _count_parses(monkeypatch)
    reader = openai_responses.ResponsesStreamReader()
    reader.feed(b"".join(sse(e) for e in codex_events()[:10]))
    reader.close()
    assert len(parsed) == 1
    assert (reader.summary.response_id, reader.summary.model) == (
        "resp_abc", "gpt-5.5-2026-04-23")


def test_chat_reader_parses_only_needed_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = _count_parses(monkeypatch)
    reader = openai_chat.ChatStreamReader()
    reader.feed(chat_raw(chat_events(), spaced=True))
    # first chunk, two tool-call starts, the finish reason, the usage chunk
    assert len(parsed) == 5


def test_tool_output_ids_from_requests() -> None:
    from agent_egress.addon.protocols import openai_chat, openai_responses

    body = json.dumps({"model": "m", "input": [
        {"type": "message", "role": "user", "content": "x"},
        {"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": "ok"},
        {"type": "function_call_output", "call_id": 3},
    ]}).encode()
    assert openai_responses.parse_request(body).tool_output_ids == ("c1", "c2")
    chat = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "tool", "tool_call_id": "t1", "content": "ok"},
    ]}).encode()
    assert openai_chat.parse_request(chat).tool_output_ids == ("t1",)
    assert openai_responses.parse_request(b'{"model": "m", "input": "hi"}').tool_output_ids == ()

"""Property-based fuzzing of every protocol parser and the stream readers (issue 12.2).

Each parser gets what a hostile client or a broken provider could send: arbitrary
JSON shaped like the real bodies (the field names the parsers look at, with values
of every type), and SSE streams of such events cut at arbitrary byte boundaries,
plus raw garbage. The properties: no exception escapes except the documented ones
(``BadRequest`` for client bodies), and the stream readers' buffers stay under their
cap whatever they are fed. Sizes are bounded and every test has a deadline, so the
file runs in well under a minute on a shared 2-core box.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_egress.addon.protocols import (
    anthropic_messages,
    codex_headers,
    content,
    openai_chat,
    openai_responses,
    output_meter,
    responses_to_chat,
    usage,
    values,
)
from agent_egress.addon.protocols.sse import SSEScanner
from agent_egress.addon.protocols.summary import BadRequest, ResponseSummary

EXAMPLES = int(os.environ.get("AGENT_EGRESS_FUZZ_EXAMPLES", "120"))
"""Raise it for a longer run (the default keeps the file under a minute)."""
FUZZ = settings(max_examples=EXAMPLES, deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Field names and type tags the parsers branch on: drawing keys and strings from them
# makes hypothesis reach the code behind each `obj.get(...)`, not only the first check.
KEYS = [
    "type", "model", "input", "messages", "content", "text", "role", "call_id", "name",
    "arguments", "output", "tools", "tool_calls", "tool_call_id", "tool_use_id", "function",
    "index", "choices", "delta", "message", "usage", "id", "finish_reason", "error", "code",
    "response", "item", "item_id", "output_index", "content_index", "content_block",
    "stop_reason", "status", "instructions", "system", "metadata", "user_id",
    "client_metadata", "session_id", "prompt_cache_key", "stream", "stream_options",
    "include_usage", "input_tokens", "output_tokens", "prompt_tokens", "completion_tokens",
    "cached_tokens", "reasoning_tokens", "input_tokens_details", "output_tokens_details",
    "prompt_tokens_details", "completion_tokens_details", "cache_read_input_tokens",
    "cache_creation_input_tokens", "incomplete_details", "reason", "partial_json", "part",
    "created", "object", "tool_choice", "parallel_tool_calls", "temperature", "top_p",
    "max_output_tokens", "parameters", "description", "image_url", "refusal", "thinking",
    "turn_id", "input_image",
]
TAGS = [
    "message", "function_call", "custom_tool_call", "function_call_output",
    "custom_tool_call_output", "reasoning", "input_text", "output_text", "text", "user",
    "assistant", "developer", "system", "tool", "function", "custom", "tool_use",
    "tool_result", "server_tool_use", "text_delta", "input_json_delta", "error",
    "response.created", "response.completed", "response.incomplete", "response.failed",
    "response.output_item.done", "message_start", "message_delta", "content_block_start",
    "content_block_delta", "response.compaction", "json_schema", "auto", "length",
    "tool_calls", "stop", "incomplete", "in_progress", "completed", "[DONE]",
]
EVENT_NAMES = [
    b"response.created", b"response.output_item.done", b"response.completed",
    b"response.incomplete", b"response.failed", b"error", b"response.output_text.delta",
    b"response.function_call_arguments.delta", b"message_start", b"message_delta",
    b"content_block_start", b"content_block_delta", b"content_block_stop", b"message_stop",
    b"ping",
]

_scalars = (
    st.none() | st.booleans()
    | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(TAGS)
    | st.text(max_size=20)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=6),
    max_leaves=40,
)
json_objects = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8)


# Real shapes (requests, plain bodies, stream events of the three APIs); ``mutants``
# replaces one subtree of one of them with any JSON value, which reaches the deep
# branches (a tool call's index, a delta's text) that random objects rarely do.
_CALL = {"type": "function_call", "call_id": "c1", "name": "sh", "arguments": "{}", "id": "fc"}
_USAGE = {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": 2,
          "output_tokens_details": {"reasoning_tokens": 1}}
TEMPLATES: list[dict[str, Any]] = [
    {"model": "gpt-5", "stream": True, "instructions": "be brief", "prompt_cache_key": "s",
     "client_metadata": {"session_id": "s"}, "tools": [
         {"type": "function", "name": "sh", "parameters": {}},
         {"type": "custom", "name": "apply_patch"}],
     "input": [{"type": "message", "role": "user", "content": [
         {"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": "u"}]},
         _CALL, {"type": "function_call_output", "call_id": "c1", "output": "ok"}]},
    {"model": "gpt-5", "stream": True, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                        "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}]},
    {"model": "claude", "system": "s", "tools": [{"name": "t"}],
     "metadata": {"user_id": "{\"session_id\": \"s\"}"}, "messages": [
         {"role": "user", "content": [{"type": "text", "text": "hi"}]},
         {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "sh",
                                            "input": {"cmd": "ls"}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                       "content": [{"type": "text", "text": "ok"}]}]}]},
    {"type": "response.created", "response": {"id": "r", "model": "m"}},
    {"type": "response.output_text.delta", "item_id": "m", "output_index": 0,
     "content_index": 0, "delta": "hi"},
    {"type": "response.function_call_arguments.delta", "item_id": "fc", "output_index": 1,
     "delta": "{"},
    {"type": "response.output_text.done", "item_id": "m", "output_index": 0,
     "content_index": 0, "text": "hi"},
    {"type": "response.content_part.done", "item_id": "m", "part": {"type": "output_text",
                                                                    "text": "hi"}},
    {"type": "response.output_item.done", "output_index": 1, "item": _CALL},
    {"type": "response.completed", "response": {"id": "r", "status": "completed",
                                                "usage": _USAGE, "output": [_CALL, {
                                                    "type": "message", "content": [
                                                        {"type": "output_text", "text": "x"}]}],
                                                "incomplete_details": {"reason": "x"}}},
    {"type": "error", "error": {"code": "c", "message": "m"}},
    {"id": "c", "model": "m", "created": 1, "usage": {"prompt_tokens": 1,
                                                      "completion_tokens": 2},
     "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": "x"},
                  "delta": {"content": "hi", "tool_calls": [
                      {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}]}}]},
    {"type": "message_start", "message": {"id": "m", "model": "c", "usage": {
        "input_tokens": 3, "cache_read_input_tokens": 1, "cache_creation_input_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {
        "type": "tool_use", "id": "t", "name": "sh", "input": {}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                          "partial_json": "{"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {
        "output_tokens": 4}},
    {"type": "message", "id": "m", "stop_reason": "tool_use", "usage": {"input_tokens": 1},
     "content": [{"type": "text", "text": "x"}, {"type": "tool_use", "id": "t", "name": "n",
                                                 "input": {"a": "b"}}]},
    {"object": "response", "status": "completed", "output": [_CALL], "usage": _USAGE},
]


_wrong_types = st.sampled_from([1, -1, "s", "", None, True, 1.5, [], {}, [1], ["x"], [[]],
                                 [None], {"": 1}])


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutants(draw: st.DrawFn) -> dict[str, Any]:
    """A template with a few subtrees replaced: mostly by a value of the wrong type
    (type confusion is what crashes parsers), sometimes by any JSON value."""
    obj: Any = json.loads(json.dumps(draw(st.sampled_from(TEMPLATES))))
    # deepest first: replacing a node never invalidates a path still to visit
    paths = sorted(_paths(obj)[1:], key=len, reverse=True)
    rate = draw(st.integers(2, 12))  # each node is replaced with probability 1/rate
    for path in [p for p in paths if draw(st.integers(0, rate - 1)) == 0] or paths[-1:]:
        holder = obj
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = draw(_wrong_types | json_values)
    return obj  # type: ignore[no-any-return]


def dumps(value: Any) -> bytes:
    """JSON as providers send it (NaN/Infinity included: Python's json reads them)."""
    return json.dumps(value).encode()


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """A stream of SSE events: real event names with JSON (or junk) data, mixed
    line endings, comments, and the odd nameless or multi-line event."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 10))):
        eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        name = draw(st.none() | st.sampled_from(EVENT_NAMES))
        data = draw(st.one_of(mutants().map(dumps), mutants().map(dumps),
                              st.sampled_from(TEMPLATES).map(dumps), json_objects.map(dumps),
                              st.binary(max_size=60), st.just(b"[DONE]")))
        lines = [] if name is None else [b"event: " + name]
        if draw(st.booleans()):
            lines.append(b": keep-alive")
        lines += [b"data: " + line for line in data.split(b"\n")]
        parts.append(eol.join(lines) + eol + eol)
    return b"".join(parts)


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    """``raw`` cut at the given offsets (taken modulo its length), no empty chunk."""
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in itertools.pairwise(points) if b > a]


_cuts = st.lists(st.integers(0, 1 << 16), max_size=12)
_bodies = st.one_of(mutants().map(dumps), mutants().map(dumps), json_objects.map(dumps),
                    json_values.map(dumps), st.binary(max_size=200))
_objects = st.one_of(mutants(), mutants(), json_objects)


def _nested(depth: int, opener: bytes = b"[") -> bytes:
    closer = b"]" if opener == b"[" else b"}"
    if opener == b"{":
        return b'{"a":' * depth + b"1" + closer * depth
    return opener * depth + closer * depth


def storable(value: Any) -> bool:
    """Every string in it encodes as UTF-8: it can go into a ledger row, a span, a label."""
    if isinstance(value, str):
        return value.encode("utf-8", "strict") is not None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(storable(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, list | tuple):
        return all(storable(v) for v in value)
    return True


# --- request parsers: only BadRequest may escape --------------------------------------
REQUEST_PARSERS: list[Callable[[bytes], Any]] = [
    openai_responses.parse_request, openai_chat.parse_request, anthropic_messages.parse_request,
]


@FUZZ
@given(_bodies)
def test_request_parsers_raise_only_bad_request(body: bytes) -> None:
    for parse in REQUEST_PARSERS:
        try:
            parse(body)
        except BadRequest as e:
            assert e.message  # always a message the refusal can show


@FUZZ
@given(_objects)
def test_request_info_on_decoded_objects(obj: dict[str, Any]) -> None:
    for mod in (openai_responses, openai_chat, anthropic_messages):
        try:
            info = mod.request_info(obj)  # type: ignore[attr-defined]
        except BadRequest:
            continue
        assert isinstance(info.model, str) and info.model
        assert storable(info)


def test_deeply_nested_request_body_is_a_bad_request() -> None:
    for body in (_nested(100_000), _nested(100_000, b"{"),
                 b'{"model":"m","input":' + _nested(50_000) + b"}"):
        for parse in REQUEST_PARSERS:
            try:
                parse(body)
            except BadRequest:
                pass
        assert values.loads_object(body) is None or isinstance(values.loads_object(body), dict)


def test_invalid_utf8_and_bom_bodies_are_bad_requests() -> None:
    for body in (b'{"model":"\xff\xfe"}', b"\xef\xbb\xbf{}", b"\x00" * 10,
                 b'{"model": "m", "input": "\xed\xa0\x80"}', "{\"model\":\"é\"}".encode("latin-1")):
        for parse in REQUEST_PARSERS:
            try:
                parse(body)
            except BadRequest:
                pass


@FUZZ
@given(st.one_of(st.none(), st.text(max_size=300)),
       st.one_of(st.none(), st.text(max_size=300), json_objects.map(json.dumps)),
       st.none() | st.text(max_size=200), st.none() | st.text(max_size=200))
def test_codex_headers(session: str | None, meta: str | None, cache_key: str | None,
                       client_session: str | None) -> None:
    headers = {"session-id": session, "x-codex-turn-metadata": meta}
    sid, turn = codex_headers.session_and_turn(headers.get, cache_key, client_session)
    assert sid is None or len(sid) <= 128
    assert turn is None or len(turn) <= 128


LONE = '"\\ud800"'  # a JSON escape that decodes to a lone surrogate


@pytest.mark.parametrize("model", [LONE, '"gpt\\u0000"', '"gpt\\n5"', '"\\u001b[31m"'])
def test_unstorable_model_is_a_bad_request(model: str) -> None:
    """A lone surrogate in a ledger row or metric label broke every later write/scrape."""
    body = ('{"model":' + model + ',"input":"x","messages":[]}').encode()
    for parse in REQUEST_PARSERS:
        with pytest.raises(BadRequest):
            parse(body)


def test_client_ids_are_made_storable() -> None:
    body = ('{"model":"m","input":[{"type":"function_call_output","call_id":' + LONE + '}],'
            '"prompt_cache_key":' + LONE + ',"client_metadata":{"session_id":' + LONE + '},'
            '"messages":[{"role":"tool","tool_call_id":' + LONE + '},{"role":"user","content":'
            '[{"type":"tool_result","tool_use_id":' + LONE + '}]}],"metadata":{"user_id":'
            '"{\\"session_id\\":' + LONE.replace('"', '\\"') + '}"}}').encode()
    for mod in (openai_responses, openai_chat, anthropic_messages):
        assert storable(mod.parse_request(body))  # type: ignore[attr-defined]
    # mitmproxy decodes header bytes with surrogateescape: b"\xff" arrives as "\udcff"
    headers = {"session-id": "s\udcff\x1b", "x-claude-code-session-id": "a\udcffb",
               "x-codex-turn-metadata": '{"turn_id":' + LONE + '}'}
    assert codex_headers.session_and_turn(headers.get, None, None) == ("s??", "?")
    info = anthropic_messages.parse_request(b'{"model":"m","messages":[]}')
    assert anthropic_messages.session_and_turn(headers.get, info) == ("a?b", None)


def test_anthropic_user_id_nested_deep_is_ignored() -> None:
    user_id = "[" * 50_000 + "]" * 50_000
    body = json.dumps({"model": "m", "messages": [], "metadata": {"user_id": "{" + user_id}})
    assert anthropic_messages.parse_request(body.encode()).session_id is None
    deep = '{"a":' * 50_000 + "1" + "}" * 50_000
    body = json.dumps({"model": "m", "messages": [], "metadata": {"user_id": deep}})
    assert anthropic_messages.parse_request(body.encode()).session_id is None


def test_codex_turn_metadata_nested_deep_is_ignored() -> None:
    deep = '{"turn_id":' * 50_000 + '"t"' + "}" * 50_000
    headers = {"x-codex-turn-metadata": deep}
    assert codex_headers.session_and_turn(headers.get, None, None) == (None, None)


# --- plain (non-streamed) response bodies: never raise -------------------------------
BODY_READERS: list[Callable[[bytes], ResponseSummary]] = [
    openai_responses.read_body, openai_chat.read_body, anthropic_messages.read_body,
]


@FUZZ
@given(_bodies)
def test_body_readers_never_raise(body: bytes) -> None:
    for read in BODY_READERS:
        assert isinstance(read(body), ResponseSummary)
    for read in BODY_READERS:
        read(_nested(100_000, b"{"))


@FUZZ
@given(json_values)
def test_usage_mappers_never_raise(value: Any) -> None:
    u = value if isinstance(value, dict) else {"usage": value}
    for got in (openai_responses.usage_from_responses(u), openai_chat.usage_from_chat(u),
                anthropic_messages.usage_from_anthropic(u),
                anthropic_messages.usage_from_anthropic(u, usage.Usage(input_tokens=3))):
        assert isinstance(got, usage.Usage)
        assert min(got.input_tokens, got.output_tokens, got.cached_input_tokens,
                   got.cache_write_tokens, got.reasoning_tokens) >= 0
    assert values.positive_int(value) >= 0
    assert values.nonempty_str(value) in (None, value)


# --- stream readers: arbitrary events, arbitrary chunking ----------------------------
READERS: list[Callable[[], Any]] = [
    openai_responses.ResponsesStreamReader, openai_chat.ChatStreamReader,
    anthropic_messages.MessagesStreamReader,
]


@FUZZ
@given(sse_streams(), _cuts)
def test_stream_readers_survive_any_events_any_chunking(raw: bytes, cuts: list[int]) -> None:
    chunks = split(raw, cuts)
    for make in READERS:
        whole, pieces = make(), make()
        whole.feed(raw)
        whole.close()
        for c in chunks:
            pieces.feed(c)
        pieces.close()
        # chunk boundaries never change what is read
        assert pieces.summary == whole.summary
        assert storable(pieces.summary)


@FUZZ
@given(st.binary(max_size=2000), _cuts)
def test_stream_readers_survive_garbage(raw: bytes, cuts: list[int]) -> None:
    for make in READERS:
        r = make()
        for c in split(raw, cuts):
            r.feed(c)
        r.close()
        assert r.summary.usage is None or r.summary.usage.input_tokens >= 0


@settings(max_examples=15, deadline=5000,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.integers(1, 4096), st.sampled_from([b"x", b"\r", b"data: ", b"\n", b"event: e\n"]))
def test_stream_reader_buffer_stays_under_its_cap(chunk_size: int, unit: bytes) -> None:
    """Megabytes with no event boundary: the tail buffer never exceeds the cap."""
    cap = 64 * 1024
    garbage = (unit * (1 + 300_000 // len(unit)))[:300_000]
    for make in READERS:
        r = make(max_event_bytes=cap)
        scanner: SSEScanner = r._scanner
        for i in range(0, len(garbage), chunk_size * 97):
            r.feed(garbage[i:i + chunk_size * 97])
            assert len(scanner._buf) <= cap
        r.feed(b"\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"code\":\"c\"}}\n\n")
        r.close()
        assert len(scanner._buf) == 0


def test_oversized_event_is_dropped_then_reading_resumes() -> None:
    cap = 1024
    usage_event = (b'event: response.completed\ndata: {"type":"response.completed",'
                   b'"response":{"usage":{"input_tokens":5,"output_tokens":2}}}\n\n')
    r = openai_responses.ResponsesStreamReader(max_event_bytes=cap)
    r.feed(b"event: response.created\ndata: " + b"A" * (cap * 50))
    assert len(r._scanner._buf) <= cap
    r.feed(b"\n\n" + usage_event)
    r.close()
    assert r.summary.oversized_events == 1
    assert r.summary.usage == usage.Usage(input_tokens=5, output_tokens=2)


def test_stream_event_nested_deep_is_ignored() -> None:
    deep = b'{"type":"response.completed","response":' * 20_000 + b"{}" + b"}" * 20_000
    for make in READERS:
        r = make()
        r.feed(b"event: response.completed\ndata: " + deep + b"\n\n")
        r.feed(b"data: " + deep + b"\n\n")
        r.feed(b"event: message_delta\ndata: " + deep.replace(b"response.completed",
                                                               b"message_delta") + b"\n\n")
        r.close()
        assert r.summary.usage is None


@FUZZ
@given(sse_streams(), _cuts)
def test_output_meter(raw: bytes, cuts: list[int]) -> None:
    whole, pieces = output_meter.OutputMeter(), output_meter.OutputMeter()
    whole.feed(raw)
    for c in split(raw, cuts):
        pieces.feed(c)
    assert pieces.chars == whole.chars >= 0
    assert pieces.tokens >= 0


# --- content capture (telemetry): never raises on any request/response pair ---------
@FUZZ
@given(_bodies, st.one_of(sse_streams(), _bodies), st.booleans())
def test_content_extract_never_raises(request: bytes, response: bytes, streamed: bool) -> None:
    def clean(text: str, direction: str, role: str) -> str:
        assert isinstance(text, str)
        return text[:50]

    for api in ("openai.responses", "openai.chat", "anthropic.messages"):
        got = content.extract(api, request, response, streamed, clean)
        assert got is not None
        content.dumps(got.input)
        content.dumps(got.output)
    assert content.extract("passthrough", request, response, streamed, clean) is None


# --- Responses <-> Chat translator ---------------------------------------------------
@FUZZ
@given(_objects, st.text(min_size=1, max_size=10))
def test_translator_request_never_raises(obj: dict[str, Any], model: str) -> None:
    body = responses_to_chat.chat_request(obj, model)
    assert body["model"] == model and isinstance(body["messages"], list)
    json.dumps(body)
    responses_to_chat.custom_tool_names(obj)


@FUZZ
@given(_objects)
def test_translator_response_body_never_raises(obj: dict[str, Any]) -> None:
    out = responses_to_chat.response_body(obj, frozenset({"apply_patch"}))
    assert out["object"] == "response"
    json.dumps(out)


@FUZZ
@given(sse_streams(), _cuts)
def test_translator_stream_never_raises(raw: bytes, cuts: list[int]) -> None:
    tr = responses_to_chat.ChatToResponsesStream(frozenset({"apply_patch"}))
    out = b"".join([*(tr.feed(c) for c in split(raw, cuts)), tr.close()])
    # whatever came in, what goes out is well-formed SSE whose data is JSON
    scanner = SSEScanner()
    for name, data in [*scanner.feed(out), *scanner.close()]:
        assert name is not None
        assert isinstance(json.loads(data), dict)

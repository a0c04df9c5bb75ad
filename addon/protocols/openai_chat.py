"""OpenAI Chat Completions (``POST /v1/chat/completions``).

Chat streams are nameless ``data: {json}`` events ending in ``data: [DONE]``,
and every chunk repeats ``id``, ``model``, ``"usage":null`` and
``"finish_reason":null``. So the reader decides from cheap substring checks
which few chunks to parse: the first (ids), tool-call starts, non-null finish
reasons, the usage chunk and errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .openai_responses import (
    RequestInfo,
    _apply_error,
    _sub,
    load_object,
    require_model,
)
from .sse import MAX_EVENT_BYTES, SSEScanner
from .summary import BadRequest, ResponseSummary
from .usage import Usage
from .values import loads_object as _loads
from .values import nonempty_str as _str
from .values import positive_int as _int

__all__ = [
    "ChatStreamReader",
    "RequestInfo",
    "parse_request",
    "read_body",
    "request_info",
    "usage_from_chat",
    "with_stream_usage",
]

_DONE = b"[DONE]"
_WS = b" \t\r\n"


def parse_request(body: bytes) -> RequestInfo:
    """Facts the gateway needs before forwarding; raises BadRequest on a malformed body."""
    return request_info(load_object(body))


def request_info(obj: Mapping[str, Any]) -> RequestInfo:
    """Like parse_request, for a caller that already decoded the body."""
    model = require_model(obj)
    messages = obj.get("messages")
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise BadRequest("Invalid 'messages': expected an array.", "messages", "invalid_type")
    key = obj.get("prompt_cache_key")
    return RequestInfo(
        model=model,
        stream=obj.get("stream") is True,
        prompt_cache_key=_str(key),
        input_items=len(messages),
        client_session_id=None,
        tool_output_ids=tuple(
            m["tool_call_id"] for m in messages
            if isinstance(m, dict) and m.get("role") == "tool"
            and _str(m.get("tool_call_id"))
        ),
    )


def with_stream_usage(body: bytes) -> bytes | None:
    """Ask for the final usage chunk on a streamed call that did not.

    Without ``stream_options.include_usage`` a streamed chat call reports no
    usage at all, and the gateway could only guess its cost. Returns the
    rewritten body, or None when nothing needs changing (or it is not ours to fix).
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    options = obj.get("stream_options")
    if isinstance(options, dict):
        if options.get("include_usage") is True:
            return None
        options = dict(options)
    else:
        options = {}
    options["include_usage"] = True
    obj["stream_options"] = options
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class ChatStreamReader:
    """Read a Chat Completions SSE stream chunk by chunk into a ResponseSummary."""

    __slots__ = ("_first", "_scanner", "_seen_calls", "done", "summary")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.summary = ResponseSummary()
        self.done = False
        """``data: [DONE]`` arrived: the stream ended normally."""
        self._scanner = SSEScanner(max_event_bytes=max_event_bytes)
        self._first = True
        self._seen_calls: set[str] = set()

    def feed(self, chunk: bytes) -> None:
        events = self._scanner.feed(chunk)
        if events:
            for _, data in events:
                self._on_data(data)
        self.summary.events = self._scanner.events
        self.summary.oversized_events = self._scanner.oversized

    def close(self) -> None:
        for _, data in self._scanner.close():
            self._on_data(data)
        self.summary.events = self._scanner.events
        self.summary.oversized_events = self._scanner.oversized

    def _on_data(self, data: bytes) -> None:
        if self._first:
            self._first = False
        elif not (
            _non_null(data, b'"finish_reason"')
            or _non_null(data, b'"usage"')
            or (b'"tool_calls"' in data and b'"name"' in data)
            or b'"error"' in data
        ):
            if data == _DONE:
                self.done = True
            return
        obj = _loads(data)
        if obj is None:
            if data == _DONE:
                self.done = True
            return
        _merge(self.summary, obj, "delta", self._seen_calls)


def _merge(s: ResponseSummary, obj: Mapping[str, Any], part: str, seen: set[str]) -> None:
    """Fold one chat completion object (a stream chunk, `part` "delta", or a whole
    response, `part` "message") into the summary."""
    s.response_id = s.response_id or _str(obj.get("id"))
    s.model = s.model or _str(obj.get("model"))
    err = obj.get("error")
    if isinstance(err, dict):
        _apply_error(s, err)
        s.status = "failed"
    usage = obj.get("usage")
    if isinstance(usage, dict):
        s.usage = usage_from_chat(usage)
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        reason = _str(choice.get("finish_reason"))
        if reason:
            s.finish_reasons.append(reason)
            if s.status is None:
                s.status = reason
        body = choice.get(part)
        calls = body.get("tool_calls") if isinstance(body, dict) else None
        if isinstance(calls, list):
            for call in calls:
                pair = _call(call)
                # Some servers repeat id and name on every fragment of a call.
                if pair and pair[0] not in seen:
                    seen.add(pair[0])
                    s.tool_calls.append(pair)


def read_body(body: bytes) -> ResponseSummary:
    """Summarise a non-streamed chat completion or error body; never raises."""
    s = ResponseSummary()
    obj = _loads(body)
    if obj is not None:
        _merge(s, obj, "message", set())
    return s


def usage_from_chat(u: Mapping[str, Any]) -> Usage:
    """Map a Chat ``usage`` object; cached and reasoning counts are subsets of the totals."""
    return Usage(
        input_tokens=_int(u.get("prompt_tokens")),
        cached_input_tokens=_int(_sub(u, "prompt_tokens_details", "cached_tokens")),
        output_tokens=_int(u.get("completion_tokens")),
        reasoning_tokens=_int(_sub(u, "completion_tokens_details", "reasoning_tokens")),
    )


def _call(call: Any) -> tuple[str, str] | None:
    if not isinstance(call, dict):
        return None
    call_id = _str(call.get("id"))
    fn = call.get("function")
    name = _str(fn.get("name")) if isinstance(fn, dict) else None
    return (call_id, name) if call_id and name else None


def _non_null(data: bytes, key: bytes) -> bool:
    """Does JSON ``data`` hold ``key`` with a value other than null?

    A quoted key cannot occur inside a JSON string (its quotes would be
    escaped), so a byte search finds only real keys. The two usual encodings
    of null are checked with ``startswith``; other whitespace byte by byte.
    """
    i = data.find(key)
    while i != -1:
        j = i + len(key)
        if data.startswith(b":null", j) or data.startswith(b": null", j):
            i = data.find(key, j)
            continue
        n = len(data)
        while j < n and data[j] in _WS:
            j += 1
        if j < n and data[j] == 58:  # ":"
            j += 1
            while j < n and data[j] in _WS:
                j += 1
            if not data.startswith(b"null", j):
                return True
        i = data.find(key, j)
    return False

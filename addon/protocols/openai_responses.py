"""OpenAI Responses API (``POST /v1/responses``, ``/v1/responses/compact``).

Request facts for admission and routing, and a stream reader that pulls usage,
ids and tool calls out of the SSE stream while touching as few bytes as it can:
text deltas, which are most of the events, are filtered by their ``event:``
name inside the scanner and never JSON-parsed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .sse import MAX_EVENT_BYTES, SSEScanner
from .summary import BadRequest, ResponseSummary
from .usage import Usage
from .values import loads_object as _loads
from .values import nonempty_str as _str
from .values import positive_int as _int
from .values import utf8

_CREATED = b"response.created"
_ITEM_DONE = b"response.output_item.done"
_COMPLETED = b"response.completed"
_INCOMPLETE = b"response.incomplete"
_FAILED = b"response.failed"
_ERROR = b"error"
_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
WANTED_EVENTS = frozenset({_CREATED, _ITEM_DONE, _COMPLETED, _INCOMPLETE, _FAILED, _ERROR})
"""The only event names whose data is ever looked at."""

# Tool-call item types whose (call_id, name) we report. ``custom_tool_call`` is
# what Codex's freeform tools (apply_patch) come back as.
_CALL_TYPES = ("function_call", "custom_tool_call")  # a tuple: an unhashable `type` must not raise
_CALL_MARKERS = (b'"function_call"', b'"custom_tool_call"')

# For events without an ``event:`` line: a quoted type string can only occur in
# the JSON structure (inside string values quotes are escaped), so a substring
# check is a safe, cheap pre-filter before parsing.
_NAMELESS_MARKERS = tuple(b'"' + name + b'"' for name in WANTED_EVENTS)


@dataclass
class RequestInfo:
    model: str
    stream: bool
    prompt_cache_key: str | None
    input_items: int
    client_session_id: str | None
    tool_output_ids: tuple[str, ...] = ()
    """call_ids of tool outputs the client returns in this request (whole history)."""

_OUTPUT_TYPES = ("function_call_output", "custom_tool_call_output")


def load_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object, or raise BadRequest."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest(
            "We could not parse the JSON body of your request: the body must be valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(obj, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_type")
    return obj


def require_model(obj: Mapping[str, Any]) -> str:
    model = obj.get("model")
    if model is None:
        raise BadRequest(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
    if not isinstance(model, str) or not model or not utf8(model) or not model.isprintable():
        raise BadRequest(
            "Invalid 'model': expected a non-empty string of printable characters.", "model",
            "invalid_value"
        )
    return model


def parse_request(body: bytes) -> RequestInfo:
    """Facts the gateway needs before forwarding; raises BadRequest on a malformed body."""
    return request_info(load_object(body))


def request_info(obj: Mapping[str, Any]) -> RequestInfo:
    """Like parse_request, for a caller that already decoded the (possibly large) body."""
    model = require_model(obj)
    items = obj.get("input")
    outputs: tuple[str, ...] = ()
    if items is None:
        n_items = 0
    elif isinstance(items, str):
        n_items = 1
    elif isinstance(items, list):
        n_items = len(items)
        outputs = tuple(
            item["call_id"] for item in items
            if isinstance(item, dict) and item.get("type") in _OUTPUT_TYPES
            and _str(item.get("call_id"))
        )
    else:
        raise BadRequest("Invalid 'input': expected a string or an array.", "input", "invalid_type")
    metadata = obj.get("client_metadata")
    session = metadata.get("session_id") if isinstance(metadata, dict) else None
    return RequestInfo(
        model=model,
        stream=obj.get("stream") is True,
        prompt_cache_key=_str(obj.get("prompt_cache_key")),
        input_items=n_items,
        client_session_id=_str(session),
        tool_output_ids=outputs,
    )


def estimate_tokens(n_bytes: int) -> int:
    """Rough token count for bytes a provider never accounted for (a cut stream).

    Four bytes per token is OpenAI's own rule of thumb for English and code.
    """
    return max(0, -(-n_bytes // 4))


class ResponsesStreamReader:
    """Read a Responses SSE stream chunk by chunk into a ResponseSummary.

    ``summary.usage`` stays None unless a terminal event carried usage: a stream
    cut short must be visible as such, not settled as free. Read ``summary``
    after ``close()``: ``response.created`` (which echoes the request's tools,
    often tens of KB) is parsed only if no terminal event supplied id and model.
    """

    __slots__ = ("_created", "_scanner", "summary")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.summary = ResponseSummary()
        self._scanner = SSEScanner(only=WANTED_EVENTS, max_event_bytes=max_event_bytes)
        self._created: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        events = self._scanner.feed(chunk)
        if events:
            for name, data in events:
                self._on_event(name, data)
        self.summary.events = self._scanner.events
        self.summary.oversized_events = self._scanner.oversized

    def close(self) -> None:
        for name, data in self._scanner.close():
            self._on_event(name, data)
        self.summary.events = self._scanner.events
        self.summary.oversized_events = self._scanner.oversized
        created, self._created = self._created, None
        s = self.summary
        if created is not None and (s.response_id is None or s.model is None):
            obj = _loads(created)
            resp = obj.get("response") if obj is not None else None
            if isinstance(resp, dict):
                s.response_id = s.response_id or _str(resp.get("id"))
                s.model = s.model or _str(resp.get("model"))

    def _on_event(self, name: bytes | None, data: bytes) -> None:
        if name is None:
            # Provider without ``event:`` lines: pre-filter on the data, then
            # take the type from the parsed JSON.
            if not any(marker in data for marker in _NAMELESS_MARKERS):
                return
        elif name == _CREATED:
            if self._created is None:
                self._created = data
            return
        elif name == _ITEM_DONE and not any(m in data for m in _CALL_MARKERS):
            return  # a message or reasoning item: nothing we need
        obj = _loads(data)
        if obj is None:
            return
        kind = _str(obj.get("type"))  # a list or dict here must not reach `in _FINAL`
        s = self.summary
        if kind == "response.created":
            resp = obj.get("response")
            if isinstance(resp, dict):
                s.response_id = _str(resp.get("id")) or s.response_id
                s.model = _str(resp.get("model")) or s.model
        elif kind == "response.output_item.done":
            _add_call(s, obj.get("item"))
        elif kind in _FINAL:
            resp = obj.get("response")
            if isinstance(resp, dict):
                _apply_response(s, resp, with_calls=False)
            if s.status is None or s.status == "in_progress":
                s.status = str(kind).removeprefix("response.")
        elif kind == "error":
            err = obj.get("error")
            _apply_error(s, err if isinstance(err, dict) else obj)
            s.status = "failed"


def read_body(body: bytes) -> ResponseSummary:
    """Summarise a non-streamed body: a Response, a compaction, or an error.

    Never raises: a body we cannot read yields a summary with usage None.
    """
    s = ResponseSummary()
    obj = _loads(body)
    if obj is None:
        return s
    err = obj.get("error")
    if isinstance(err, dict) and "output" not in obj and "usage" not in obj:
        _apply_error(s, err)
        s.status = "failed"
        return s
    _apply_response(s, obj, with_calls=True)
    if s.status is None and obj.get("object") == "response.compaction":
        s.status = "completed"  # compactions carry no status; a 200 one is done
    return s


def _apply_response(s: ResponseSummary, resp: Mapping[str, Any], *, with_calls: bool) -> None:
    """Fill ``s`` from a Response object (terminal stream event or plain body)."""
    s.response_id = _str(resp.get("id")) or s.response_id
    s.model = _str(resp.get("model")) or s.model
    s.status = _str(resp.get("status")) or s.status
    usage = resp.get("usage")
    if isinstance(usage, dict):
        s.usage = usage_from_responses(usage)
    err = resp.get("error")
    if isinstance(err, dict):
        _apply_error(s, err)
    details = resp.get("incomplete_details")
    if isinstance(details, dict):
        reason = _str(details.get("reason"))
        if reason:
            s.finish_reasons.append(reason)
    if with_calls:
        output = resp.get("output")
        if isinstance(output, list):
            for item in output:
                _add_call(s, item)


def usage_from_responses(u: Mapping[str, Any]) -> Usage:
    """Map a Responses ``usage`` object; both subsets are already inside the totals."""
    return Usage(
        input_tokens=_int(u.get("input_tokens")),
        cached_input_tokens=_int(_sub(u, "input_tokens_details", "cached_tokens")),
        output_tokens=_int(u.get("output_tokens")),
        reasoning_tokens=_int(_sub(u, "output_tokens_details", "reasoning_tokens")),
    )


def _add_call(s: ResponseSummary, item: Any) -> None:
    if isinstance(item, dict) and item.get("type") in _CALL_TYPES:
        call_id, name = item.get("call_id"), item.get("name")
        if isinstance(call_id, str) and isinstance(name, str):
            s.tool_calls.append((call_id, name))


def _apply_error(s: ResponseSummary, err: Mapping[str, Any]) -> None:
    s.error_code = _str(err.get("code")) or _str(err.get("type")) or s.error_code
    s.error_message = _str(err.get("message")) or s.error_message


def _sub(u: Mapping[str, Any], key: str, field: str) -> Any:
    d = u.get(key)
    return d.get(field) if isinstance(d, dict) else None

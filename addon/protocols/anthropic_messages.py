"""Anthropic Messages API (``POST /v1/messages``, with or without ``?beta=true``).

What Claude Code sends and reads (DESIGN §4): request facts for admission, routing,
sessions and turns; a stream reader for usage (``message_start`` carries input and
both cache buckets, ``message_delta`` the output count) and tool calls; a reader
for plain bodies; the error body Claude Code parses. Pure: no mitmproxy import.

Usage is normalised to our convention (``Usage``): ``input_tokens`` includes cache
reads (Anthropic reports them apart), cache writes stay apart, so the ledger row
holds all of Anthropic's numbers and genai-prices prices each bucket once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .openai_responses import load_object, require_model
from .sse import MAX_EVENT_BYTES, SSEScanner
from .summary import BadRequest, ResponseSummary
from .usage import Usage
from .values import loads_object as _loads
from .values import nonempty_str as _str
from .values import printable_id

API = "anthropic.messages"
SESSION_HEADER = "x-claude-code-session-id"

_START = b"message_start"
_DELTA = b"message_delta"
_BLOCK_START = b"content_block_start"
_ERROR = b"error"
WANTED_EVENTS = frozenset({_START, _DELTA, _BLOCK_START, _ERROR})
"""Only these events are parsed; text and JSON deltas (most of a stream) never are."""
_TOOL_USE = b'"tool_use"'


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    model: str
    stream: bool
    session_id: str | None
    """``metadata.user_id`` JSON's ``session_id`` (Claude Code also sends it as a header)."""
    turn_id: str | None
    """Stable id of the turn: a digest of the last user message that carries text and no
    tool_result (its position and text), so every replica infers the same turn."""
    tool_output_ids: tuple[str, ...]
    """``tool_use_id`` of the tool results in the last user message (closes tool spans)."""
    side_call: bool
    """No tools offered: a small-model side call (title, summary), not an agent step."""


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text"
            and isinstance(b.get("text"), str)]


def _tool_results(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    return [printable_id(str(b.get("tool_use_id"))) or "" for b in content
            if isinstance(b, dict) and b.get("type") == "tool_result"]


def turn_of(messages: list[Any]) -> tuple[str | None, tuple[str, ...]]:
    """(turn id, tool_use_ids answered by the last message) of a ``messages`` array.

    A user message with text and no tool_result starts a turn; one with tool results
    continues it (DESIGN §4). The id hashes the starting message's index and text, so
    a compaction that rewrites history starts a new id instead of reusing an old one.
    """
    start: tuple[int, list[str]] | None = None
    last_results: tuple[str, ...] = ()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        content = msg.get("content")
        results = _tool_results(content)
        if results:
            last_results = tuple(results)
            continue
        last_results = ()
        texts = _texts(content)
        if texts:
            start = (i, texts)
    if start is None:
        return None, last_results
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(start[0]).encode())
    for t in start[1]:
        digest.update(b"\x00" + t.encode("utf-8", "replace"))
    return "turn_" + digest.hexdigest(), last_results


def _session_from_metadata(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    user_id = meta.get("user_id") if isinstance(meta, dict) else None
    if not isinstance(user_id, str) or not user_id.startswith("{"):
        return None
    parsed = _loads(user_id)  # a JSON string in the JSON: nested deep, it must not raise
    return _str(parsed.get("session_id")) if parsed is not None else None


def request_info(obj: Mapping[str, Any]) -> MessagesRequest:
    """Facts the gateway needs before forwarding; raises BadRequest on a malformed body."""
    model = require_model(obj)
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("messages: Field required (an array of messages).", "messages",
                         "invalid_request")
    turn, results = turn_of(messages)
    tools = obj.get("tools")
    return MessagesRequest(
        model=model,
        stream=obj.get("stream") is True,
        session_id=_session_from_metadata(obj),
        turn_id=turn,
        tool_output_ids=results,
        side_call=not (isinstance(tools, list) and tools),
    )


def parse_request(body: bytes) -> MessagesRequest:
    return request_info(load_object(body))


def session_and_turn(get_header: Callable[[str], str | None],
                     info: MessagesRequest) -> tuple[str | None, str | None]:
    """Session: the X-Claude-Code-Session-Id header, else metadata's session_id."""
    return printable_id(get_header(SESSION_HEADER) or info.session_id), printable_id(info.turn_id)


def usage_from_anthropic(u: Mapping[str, Any], prior: Usage | None = None) -> Usage:
    """Map Anthropic usage; fields a ``message_delta`` leaves out keep ``prior``'s values."""
    def get(name: str, old: int) -> int:
        v = u.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else old

    p = prior or Usage()
    cache_read = get("cache_read_input_tokens", p.cached_input_tokens)
    fresh = get("input_tokens", p.input_tokens - p.cached_input_tokens)
    return Usage(
        input_tokens=fresh + cache_read,
        cached_input_tokens=cache_read,
        cache_write_tokens=get("cache_creation_input_tokens", p.cache_write_tokens),
        output_tokens=get("output_tokens", p.output_tokens),
    )


class MessagesStreamReader:
    """Read a Messages SSE stream chunk by chunk into a ResponseSummary.

    ``summary.usage`` stays None until ``message_delta`` (the final count) arrives:
    a stream cut before it is settled as an estimate, never as the start's count.
    """

    __slots__ = ("_scanner", "_start", "summary")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.summary = ResponseSummary()
        self._scanner = SSEScanner(only=WANTED_EVENTS, max_event_bytes=max_event_bytes)
        self._start: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        for name, data in self._scanner.feed(chunk):
            self._on_event(name, data)
        self.summary.events = self._scanner.events
        self.summary.oversized_events = self._scanner.oversized

    def close(self) -> None:
        for name, data in self._scanner.close():
            self._on_event(name, data)
        self.summary.events = self._scanner.events
        self.summary.oversized_events = self._scanner.oversized

    def _on_event(self, name: bytes | None, data: bytes) -> None:
        if name == _BLOCK_START and _TOOL_USE not in data:
            return  # a text or thinking block: nothing we need
        obj = _loads(data)
        if obj is None:
            return
        kind = obj.get("type")
        s = self.summary
        if kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                s.response_id = _str(msg.get("id")) or s.response_id
                s.model = _str(msg.get("model")) or s.model
                u = msg.get("usage")
                if isinstance(u, dict):
                    self._start = usage_from_anthropic(u)
        elif kind == "content_block_start":
            _add_call(s, obj.get("content_block"))
        elif kind == "message_delta":
            delta = obj.get("delta")
            reason = _str(delta.get("stop_reason")) if isinstance(delta, dict) else None
            if reason:
                s.finish_reasons.append(reason)
                s.status = "completed"
            u = obj.get("usage")
            if isinstance(u, dict):
                s.usage = usage_from_anthropic(u, self._start)
        elif kind == "error":
            err = obj.get("error")
            _apply_error(s, err if isinstance(err, dict) else obj)
            s.status = "failed"


def read_body(body: bytes) -> ResponseSummary:
    """Summarise a non-streamed Message or error body; never raises."""
    s = ResponseSummary()
    obj = _loads(body)
    if obj is None:
        return s
    if obj.get("type") == "error":
        err = obj.get("error")
        _apply_error(s, err if isinstance(err, dict) else {})
        s.status = "failed"
        return s
    s.response_id = _str(obj.get("id"))
    s.model = _str(obj.get("model"))
    reason = _str(obj.get("stop_reason"))
    if reason:
        s.finish_reasons.append(reason)
        s.status = "completed"
    u = obj.get("usage")
    if isinstance(u, dict):
        s.usage = usage_from_anthropic(u)
    content = obj.get("content")
    if isinstance(content, list):
        for block in content:
            _add_call(s, block)
    return s


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 529: "overloaded_error"}


def error_type_for(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, *, type: str) -> bytes:
    """``{"type":"error","error":{"type","message"}}``: what Claude Code parses and shows."""
    return json.dumps({"type": "error", "error": {"type": type, "message": message}},
                      ensure_ascii=False).encode()


def client_status(status: int) -> int:
    """The status a refusal is sent with so Claude Code shows our message (DESIGN §4).

    It prints the text of 400, 429 and 500 but only "Invalid API key" for 401 (and
    nothing of ours for 403/404/413), so final 4xx refusals go out as 400; 429 and
    5xx (transient, with retry-after) keep theirs.
    """
    return status if status == 429 or status >= 500 else 400


def _add_call(s: ResponseSummary, block: Any) -> None:
    if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use"):
        tid, name = block.get("id"), block.get("name")
        if isinstance(tid, str) and isinstance(name, str):
            s.tool_calls.append((tid, name))


def _apply_error(s: ResponseSummary, err: Mapping[str, Any]) -> None:
    s.error_code = _str(err.get("type")) or s.error_code
    s.error_message = _str(err.get("message")) or s.error_message



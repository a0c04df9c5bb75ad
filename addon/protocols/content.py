"""Message content for opt-in trace capture, in the OTel GenAI message form. Pure.

``gen_ai.input.messages`` / ``gen_ai.output.messages`` are lists of
``{"role", "parts": [{"type": "text", "content"} | {"type": "tool_call", "id",
"name", "arguments"} | {"type": "tool_call_response", "id", "response"}]}``
(output messages add ``finish_reason``). One small function per API turns a
request body or a response (SSE bytes or a JSON body) into that form.

Only the *new* input of a call is taken: agents resend the whole history, so
what is new is the run of items after the model's last output item (an
assistant message, a tool call, reasoning). That needs no per-session state, so
every replica agrees. System instructions (``instructions``, ``system``) are
taken only on a session's first call (when the new run starts at item 0).

Every text goes through ``clean`` (redaction, then the size cap) before it is
placed: nothing raw leaves this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .sse import SSEScanner
from .values import nonempty_str as _str

Clean = Callable[[str, str, str], str]
"""(text, direction, role) -> redacted and capped text."""
Message = dict[str, Any]

_MODEL_ITEMS = frozenset({
    "function_call", "custom_tool_call", "reasoning", "local_shell_call", "web_search_call",
    "mcp_call", "compaction", "image_generation_call", "code_interpreter_call",
    "file_search_call", "computer_call"})
"""Responses input items the model produced (history, not new input)."""
_TOOL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output",
                           "local_shell_call_output", "mcp_call_output",
                           "computer_call_output"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_ROLES = {"developer": "system", "system": "system", "user": "user", "assistant": "assistant",
          "tool": "tool", "function": "tool"}


@dataclass(slots=True)
class Content:
    system: list[dict[str, Any]] = field(default_factory=list)
    input: list[Message] = field(default_factory=list)
    output: list[Message] = field(default_factory=list)


def _text(value: Any) -> str:
    """The text of a content value: a string, or the text parts of a part list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(p["text"] for p in value if isinstance(p, dict)
                         and _str(p.get("type")) in _TEXT_PARTS and isinstance(p.get("text"), str))
    return ""


def _text_parts(value: Any, clean: Clean, direction: str, role: str) -> list[dict[str, Any]]:
    t = _text(value)
    return [{"type": "text", "content": clean(t, direction, role)}] if t else []


def _new_from(items: list[Any], is_model: Callable[[Any], bool]) -> int:
    """Index of the first item after the last one the model produced."""
    for i in range(len(items) - 1, -1, -1):
        if is_model(items[i]):
            return i + 1
    return 0


# --- OpenAI Responses ---------------------------------------------------------------
def _responses_is_model(item: Any) -> bool:
    return isinstance(item, dict) and (_str(item.get("type")) in _MODEL_ITEMS
                                       or item.get("role") == "assistant")


def responses_input(obj: dict[str, Any], clean: Clean) -> Content:
    out = Content()
    items = obj.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        items = []
    start = _new_from(items, _responses_is_model)
    instructions = obj.get("instructions")
    if start == 0 and isinstance(instructions, str) and instructions:
        out.system.append({"type": "text", "content": clean(instructions, "input", "system")})
    for item in items[start:]:
        if not isinstance(item, dict):
            continue
        kind = _str(item.get("type"))
        if kind in _TOOL_OUTPUTS:
            resp = clean(_text(item.get("output")), "tool_output", "tool")
            out.input.append({"role": "tool", "parts": [
                {"type": "tool_call_response", "id": item.get("call_id"), "response": resp}]})
        elif kind == "message" or (kind is None and "role" in item):
            role = _ROLES.get(str(item.get("role")), "user")
            parts = _text_parts(item.get("content"), clean, "input", role)
            if parts:
                out.input.append({"role": role, "parts": parts})
    return out


def _responses_output_items(items: list[Any], clean: Clean) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            parts += _text_parts(item.get("content"), clean, "model_output", "assistant")
        elif kind in ("function_call", "custom_tool_call"):
            args = item.get("arguments", item.get("input"))
            parts.append({"type": "tool_call", "id": item.get("call_id"),
                          "name": item.get("name"),
                          "arguments": clean(args if isinstance(args, str) else "",
                                             "model_output", "assistant")})
    return parts


def _finish(parts: list[dict[str, Any]], status: str | None) -> str:
    if any(p["type"] == "tool_call" for p in parts):
        return "tool_call"
    return "length" if status == "incomplete" else "stop"


def responses_output(raw: bytes, streamed: bool, clean: Clean) -> list[Message]:
    items: list[Any] = []
    status: str | None = None
    if streamed:
        final: list[Any] = []
        for obj in _sse_json(raw):
            kind = obj.get("type")
            if kind == "response.output_item.done":
                items.append(obj.get("item"))
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                resp = _dict(obj.get("response"))
                status = resp.get("status")
                final = _list(resp.get("output"))
        items = items or final
    else:
        obj = _json(raw)
        items = _list(obj.get("output"))
        status = obj.get("status") if isinstance(obj.get("status"), str) else None
    parts = _responses_output_items(items, clean)
    return [{"role": "assistant", "parts": parts, "finish_reason": _finish(parts, status)}]


# --- OpenAI Chat Completions --------------------------------------------------------
def _chat_is_model(msg: Any) -> bool:
    return isinstance(msg, dict) and msg.get("role") == "assistant"


def chat_input(obj: dict[str, Any], clean: Clean) -> Content:
    out = Content()
    msgs = obj.get("messages")
    msgs = msgs if isinstance(msgs, list) else []
    for msg in msgs[_new_from(msgs, _chat_is_model):]:
        if not isinstance(msg, dict):
            continue
        role = _ROLES.get(str(msg.get("role")), "user")
        if role == "tool":
            resp = clean(_text(msg.get("content")), "tool_output", "tool")
            out.input.append({"role": "tool", "parts": [
                {"type": "tool_call_response", "id": msg.get("tool_call_id"), "response": resp}]})
            continue
        parts = _text_parts(msg.get("content"), clean, "input", role)
        if parts:
            out.input.append({"role": role, "parts": parts})
    return out


def chat_output(raw: bytes, streamed: bool, clean: Clean) -> list[Message]:
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish: str | None = None
    chunks = list(_sse_json(raw)) if streamed else [_json(raw)]
    for obj in chunks:
        for choice in _list(obj.get("choices")):
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            finish = _str(choice.get("finish_reason")) or finish
            msg = choice.get("delta") if streamed else choice.get("message")
            if not isinstance(msg, dict):
                continue
            if isinstance(msg.get("content"), str):
                text.append(msg["content"])
            for i, tc in enumerate(_list(msg.get("tool_calls"))):
                if not isinstance(tc, dict):
                    continue
                index = tc.get("index", i)
                slot = calls.setdefault(index if isinstance(index, int) else i,
                                        {"id": "", "name": "", "arguments": ""})
                fn = _dict(tc.get("function"))
                slot["id"] = _str(tc.get("id")) or slot["id"]
                slot["name"] = _str(fn.get("name")) or slot["name"]
                slot["arguments"] += _str(fn.get("arguments")) or ""
    parts: list[dict[str, Any]] = []
    if text:
        parts.append({"type": "text", "content": clean("".join(text), "model_output",
                                                       "assistant")})
    for _, c in sorted(calls.items()):
        parts.append({"type": "tool_call", "id": c["id"], "name": c["name"],
                      "arguments": clean(c["arguments"], "model_output", "assistant")})
    reason = {"tool_calls": "tool_call", None: "stop"}.get(finish, finish or "stop")
    return [{"role": "assistant", "parts": parts, "finish_reason": reason}]


# --- Anthropic Messages -------------------------------------------------------------
def anthropic_input(obj: dict[str, Any], clean: Clean) -> Content:
    out = Content()
    msgs = obj.get("messages")
    msgs = msgs if isinstance(msgs, list) else []
    start = _new_from(msgs, _chat_is_model)
    if start == 0 and (system := _text(obj.get("system"))):
        out.system.append({"type": "text", "content": clean(system, "input", "system")})
    for msg in msgs[start:]:
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        parts: list[dict[str, Any]] = []
        for b in blocks if isinstance(blocks, list) else ():
            if not isinstance(b, dict):
                continue
            if b.get("type") == "text" and isinstance(b.get("text"), str):
                parts.append({"type": "text", "content": clean(b["text"], "input", "user")})
            elif b.get("type") == "tool_result":
                parts.append({"type": "tool_call_response", "id": b.get("tool_use_id"),
                              "response": clean(_text(b.get("content")), "tool_output",
                                                "tool")})
        if parts:
            out.input.append({"role": "user", "parts": parts})
    return out


def anthropic_output(raw: bytes, streamed: bool, clean: Clean) -> list[Message]:
    blocks: dict[int, dict[str, Any]] = {}
    stop: str | None = None
    if streamed:
        for obj in _sse_json(raw):
            kind = obj.get("type")
            idx = obj.get("index")
            idx = idx if isinstance(idx, int) else 0
            if kind == "content_block_start" and isinstance(obj.get("content_block"), dict):
                blocks[idx] = dict(obj["content_block"], _json="")
            elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
                b = blocks.setdefault(idx, {"type": "text", "text": "", "_json": ""})
                d = obj["delta"]
                if d.get("type") == "text_delta":
                    b["text"] = str(b.get("text", "")) + str(d.get("text", ""))
                elif d.get("type") == "input_json_delta":
                    b["_json"] += str(d.get("partial_json", ""))
            elif kind == "message_delta" and isinstance(obj.get("delta"), dict):
                stop = _str(obj["delta"].get("stop_reason")) or stop
    else:
        obj = _json(raw)
        content = obj.get("content")
        blocks = {i: b for i, b in enumerate(content if isinstance(content, list) else ())
                  if isinstance(b, dict)}
        stop = _str(obj.get("stop_reason"))
    parts: list[dict[str, Any]] = []
    for _, b in sorted(blocks.items()):
        if b.get("type") == "text":
            parts.append({"type": "text", "content": clean(str(b.get("text", "")),
                                                           "model_output", "assistant")})
        elif b.get("type") == "tool_use":
            args = b.get("_json") or json.dumps(b.get("input") or {})
            parts.append({"type": "tool_call", "id": b.get("id"), "name": b.get("name"),
                          "arguments": clean(args, "model_output", "assistant")})
    reason = {"tool_use": "tool_call", "max_tokens": "length", None: "stop"}.get(stop, "stop")
    return [{"role": "assistant", "parts": parts, "finish_reason": reason}]


# --- dispatch -----------------------------------------------------------------------
_INPUT: dict[str, Callable[[dict[str, Any], Clean], Content]] = {
    "openai.responses": responses_input, "openai.chat": chat_input,
    "anthropic.messages": anthropic_input}
_OUTPUT: dict[str, Callable[[bytes, bool, Clean], list[Message]]] = {
    "openai.responses": responses_output, "openai.chat": chat_output,
    "anthropic.messages": anthropic_output}


def supported(api: str) -> bool:
    return api in _INPUT


def extract(api: str, request_body: bytes, response: bytes, streamed: bool,
            clean: Clean) -> Content | None:
    """The call's new input and its output, every text cleaned; None for other APIs."""
    take_in, take_out = _INPUT.get(api), _OUTPUT.get(api)
    if take_in is None or take_out is None:
        return None
    content = take_in(_json(request_body), clean)
    content.output = take_out(response, streamed, clean)
    return content


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _json(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _sse_json(raw: bytes) -> Iterator[dict[str, Any]]:
    scanner = SSEScanner()
    for _, data in [*scanner.feed(raw), *scanner.close()]:
        if data and data != b"[DONE]":
            obj = _json(data)
            if obj:
                yield obj


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

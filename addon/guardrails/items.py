"""Where the scannable text is in a request body, and how to put redactions back.

Responses: ``input`` items (messages, ``function_call`` arguments, and tool
outputs: ``function_call_output`` and its kin, the indirect-injection channel)
plus ``instructions``. Chat Completions: ``messages`` (``role: tool`` is tool
output). Reasoning and compaction items are opaque (encrypted) and skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from .config import Direction

Path = tuple[str | int, ...]

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_TOOL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output",
                           "local_shell_call_output", "mcp_call_output",
                           "computer_call_output"})
_TOOL_CALLS = {"function_call": "arguments", "custom_tool_call": "input"}


def _kind(v: Any) -> str | None:
    """A ``type`` tag; a client's list or dict there must not make the set lookups raise
    (that would skip the scan)."""
    return v if isinstance(v, str) else None


class Segment(NamedTuple):
    path: Path
    text: str
    direction: Direction
    role: str
    item: int
    """Index of the input item / message (for messages naming where a hit is)."""


def _content(base: Path, content: Any, direction: Direction, role: str,
             item: int) -> Iterator[Segment]:
    if isinstance(content, str):
        if content:
            yield Segment(base, content, direction, role, item)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and _kind(part.get("type")) in _TEXT_PARTS:
                text = part.get("text")
                if isinstance(text, str) and text:
                    yield Segment((*base, j, "text"), text, direction, role, item)


def responses_segments(obj: dict[str, Any]) -> Iterator[Segment]:
    instructions = obj.get("instructions")
    if isinstance(instructions, str) and instructions:
        yield Segment(("instructions",), instructions, "input", "system", -1)
    items = obj.get("input")
    if isinstance(items, str):
        if items:
            yield Segment(("input",), items, "input", "user", 0)
        return
    if not isinstance(items, list):
        return
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        kind = _kind(item.get("type"))
        if kind in _TOOL_OUTPUTS:
            yield from _content(("input", i, "output"), item.get("output"), "tool_output",
                                "tool", i)
        elif kind in _TOOL_CALLS:
            field = _TOOL_CALLS[kind]
            value = item.get(field)
            if isinstance(value, str) and value:
                yield Segment(("input", i, field), value, "input", "assistant", i)
        elif kind == "message" or (kind is None and "role" in item):
            role = str(item.get("role") or "user")
            yield from _content(("input", i, "content"), item.get("content"), "input", role, i)


def chat_segments(obj: dict[str, Any]) -> Iterator[Segment]:
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        role = str(msg.get("role") or "user")
        direction: Direction = "tool_output" if role in ("tool", "function") else "input"
        yield from _content(("messages", i, "content"), msg.get("content"), direction, role, i)
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                args = fn.get("arguments") if isinstance(fn, dict) else None
                if isinstance(args, str) and args:
                    yield Segment(("messages", i, "tool_calls", j, "function", "arguments"),
                                  args, "input", "assistant", i)


# anthropic (issue 13) -------------------------------------------------------------
def _anthropic_blocks(base: Path, content: Any, direction: Direction, role: str,
                      item: int) -> Iterator[Segment]:
    """Text blocks (and a plain string) of one Messages content value."""
    if isinstance(content, str):
        if content:
            yield Segment(base, content, direction, role, item)
        return
    if not isinstance(content, list):
        return
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            yield Segment((*base, j, "text"), block["text"], direction, role, item)
        elif kind == "tool_result":  # the tool-output channel (indirect injection)
            yield from _anthropic_blocks((*base, j, "content"), block.get("content"),
                                         "tool_output", "tool", item)
        elif kind == "tool_use" and isinstance(block.get("input"), dict):
            for key, value in block["input"].items():
                if isinstance(value, str) and value:
                    yield Segment((*base, j, "input", key), value, "input", role, item)


def anthropic_segments(obj: dict[str, Any]) -> Iterator[Segment]:
    """Messages API: ``system``, then each message's text, tool_use input and
    tool_result content (thinking blocks are signed and opaque: skipped)."""
    yield from _anthropic_blocks(("system",), obj.get("system"), "input", "system", -1)
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return
    for i, msg in enumerate(messages):
        if isinstance(msg, dict):
            yield from _anthropic_blocks(("messages", i, "content"), msg.get("content"),
                                         "input", str(msg.get("role") or "user"), i)


def segments(obj: dict[str, Any], api: str) -> list[Segment]:
    if api == "anthropic.messages":  # anthropic (issue 13)
        return list(anthropic_segments(obj))
    return list(chat_segments(obj) if api == "openai.chat" else responses_segments(obj))


def put(obj: Any, path: Path, value: str) -> None:
    """Set ``value`` at ``path`` inside the decoded body."""
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value

"""Output guard for Anthropic Messages streams (sibling of ``stream.py``, same window).

Each content block's ``text_delta`` text and ``input_json_delta`` JSON (tool
arguments) goes through its own ``TextGuard``: what can no longer become part of
a match is passed on, the rest is held until more text arrives or the block
stops (``content_block_stop``), when it is sent as one last delta. A block hit
ends the stream with an ``event: error`` in Anthropic's format; the caller then
stops the upstream. Non-streamed Message bodies are checked by ``guard_message``.
Pure: no mitmproxy import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..protocols.values import loads_object
from .findings import Finding, redact
from .stream import Scan, SSEGuard, TextGuard

_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_FIELDS = {"text_delta": "text", "input_json_delta": "partial_json"}


def _sse(name: bytes | None, payload: bytes) -> bytes:
    head = b"event: " + name + b"\n" if name else b""
    return head + b"data: " + payload.replace(b"\n", b"\ndata: ") + b"\n\n"


class AnthropicOutputGuard(SSEGuard):
    """Same interface as ``stream.OutputGuard``: feed/close, ``blocked``, ``hits``."""

    def __init__(self, scan: Scan, holdback: int,
                 block_message: Callable[[Finding], str]) -> None:
        super().__init__(scan, holdback, block_message)
        self._texts: dict[int, tuple[str, TextGuard]] = {}

    def _flush_all(self, out: list[bytes]) -> None:
        self._flush(None, out)

    def _event(self, name: bytes | None, data: bytes, out: list[bytes]) -> None:
        if name not in (b"content_block_delta", b"content_block_stop", b"message_delta",
                        b"message_stop", None):
            out.append(_sse(name, data))
            return
        obj = loads_object(data)
        if obj is None:
            out.append(_sse(name, data))
            return
        kind = obj.get("type")
        index = obj.get("index")
        if kind == "content_block_delta" and isinstance(index, int):
            delta = obj.get("delta")
            field = _FIELDS.get(str(delta.get("type")), "") if isinstance(delta, dict) else ""
            if isinstance(delta, dict) and field and isinstance(delta.get(field), str):
                held = self._texts.get(index)
                guard = held[1] if held is not None else TextGuard(self._scan, self._holdback)
                self._texts[index] = (str(delta["type"]), guard)
                text, findings = guard.push(delta[field])
                if self._note(findings):
                    out.append(self._block_event())
                    return
                if not text:
                    return  # all held back for now
                delta[field] = text
        elif kind == "content_block_stop" and isinstance(index, int):
            if not self._flush(index, out):
                return
        elif kind in ("message_delta", "message_stop") and not self._flush(None, out):
            return
        out.append(_sse(name, _DUMPS(obj).encode()))

    def _flush(self, index: int | None, out: list[bytes]) -> bool:
        """Send held text of one block (or all) as a last delta; False if it blocks."""
        for i in [k for k in self._texts if index is None or k == index]:
            kind, guard = self._texts.pop(i)
            text, findings = guard.flush()
            if self._note(findings):
                out.append(self._block_event())
                return False
            if text:
                ev = {"type": "content_block_delta", "index": i,
                      "delta": {"type": kind, _FIELDS[kind]: text}}
                out.append(_sse(b"content_block_delta", _DUMPS(ev).encode()))
        return True

    def _block_event(self) -> bytes:
        assert self.blocked is not None
        err = {"type": "error", "error": {"type": "invalid_request_error",
                                          "message": self._message(self.blocked)}}
        return _sse(b"error", _DUMPS(err).encode())


def guard_message(obj: dict[str, Any], scan: Scan) -> tuple[bool, list[Finding]]:
    """A non-streamed Message: redact text blocks and tool_use string inputs in place;
    (changed, findings)."""
    found: list[Finding] = []
    changed = False

    def fix(holder: dict[str, Any], field: str) -> None:
        nonlocal changed
        text = holder.get(field)
        if isinstance(text, str) and text:
            findings = scan(text)
            if findings:
                found.extend(findings)
                new = redact(text, findings)
                changed |= new != text
                holder[field] = new

    content = obj.get("content")
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            fix(block, "text")
        elif block.get("type") == "tool_use" and isinstance(block.get("input"), dict):
            for key in list(block["input"]):
                fix(block["input"], key)
    return changed, found

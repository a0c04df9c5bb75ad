"""Output guard for streamed responses: redact or block before the client sees it.

The stream callable gets raw network chunks (DESIGN §4b). We split them into SSE
events, and for every event that carries model text (Responses
``output_text.delta`` / ``function_call_arguments.delta``, Chat
``delta.content`` / ``delta.tool_calls[].function.arguments``) we pass on only
the part that can no longer become (part of) a match: the last
``holdback`` characters, the trailing whitespace-free run (a long token still
growing) and an unterminated private-key block are held until more text or
the channel's end arrives. Events that repeat the full text (``.done``,
``content_part.done``, ``output_item.done``, ``response.completed``) are
redacted whole. A ``block`` hit ends the stream with an error event the client
understands (``response.failed`` with a code Codex does not retry / a Chat
``error`` chunk); the caller then stops the upstream. Pure: no mitmproxy import.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Callable
from typing import Any

from ..protocols.sse import SSEScanner
from ..protocols.values import loads_object
from .findings import Finding, redact, worst

Scan = Callable[[str], list[Finding]]

FINAL_CODE = "invalid_prompt"
"""``response.failed`` error code of a mid-stream block. Codex 0.169 retries a failed
stream 5 times unless the code is one it knows is final; with ``invalid_prompt`` it
stops at once and prints our message (see tests/test_guardrails_e2e.py)."""

_CONTEXT = 64
"""Already-sent characters rescanned as left context (lookbehinds, word bounds)."""
MAX_RUN = 4096
"""A whitespace-free run longer than this is no longer held whole."""
_MAX_OPEN_KEY = 16384
_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_RESP_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')

_TEXT_DELTA = "response.output_text.delta"
_ARGS_DELTA = "response.function_call_arguments.delta"
_TEXT_DONE = "response.output_text.done"
_ARGS_DONE = "response.function_call_arguments.done"
_PART_DONE = "response.content_part.done"
_ITEM_DONE = "response.output_item.done"
_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_WATCHED = frozenset({_TEXT_DELTA, _ARGS_DELTA, _TEXT_DONE, _ARGS_DONE, _PART_DONE,
                      _ITEM_DONE, "response.created", *_FINAL})


class TextGuard:
    """The hold-back window over one text channel."""

    __slots__ = ("_ctx", "_holdback", "_scan", "pending")

    def __init__(self, scan: Scan, holdback: int) -> None:
        self._scan = scan
        self._holdback = holdback
        self._ctx = ""
        self.pending = ""

    def push(self, delta: str) -> tuple[str, list[Finding]]:
        """Add text; return what may be sent now (redacted) and the findings seen."""
        self.pending += delta
        p = self.pending
        cut = len(p) - self._holdback
        if cut <= 0:
            return "", []
        run = max(p.rfind(" "), p.rfind("\n"), p.rfind("\t")) + 1
        if len(p) - run <= MAX_RUN:
            cut = min(cut, run)
        key = p.rfind("-----BEGIN")
        if key != -1 and p.find("-----END", key) == -1 and len(p) - key <= _MAX_OPEN_KEY:
            cut = min(cut, key)
        findings = self._findings()
        for f in sorted(findings, key=lambda f: f.start, reverse=True):
            if f.start < cut < f.end:
                cut = f.start
        if any(f.action == "block" for f in findings):
            return "", findings
        if cut <= 0:
            return "", []
        return self._emit(cut, [f for f in findings if f.end <= cut]), findings

    def flush(self) -> tuple[str, list[Finding]]:
        """The channel ended: send everything left (redacted)."""
        if not self.pending:
            return "", []
        findings = self._findings()
        if any(f.action == "block" for f in findings):
            return "", findings
        return self._emit(len(self.pending), findings), findings

    def _findings(self) -> list[Finding]:
        n = len(self._ctx)
        out = []
        for f in self._scan(self._ctx + self.pending):
            if f.end > n:
                out.append(Finding(f.rule, f.action, max(0, f.start - n), f.end - n))
        return out

    def _emit(self, cut: int, findings: list[Finding]) -> str:
        sent = self.pending[:cut]
        self.pending = self.pending[cut:]
        self._ctx = (self._ctx + sent)[-_CONTEXT:]
        return redact(sent, findings)


class SSEGuard(abc.ABC):
    """What every per-API output guard shares: SSE splitting, the feed/close loop,
    hit recording and the block state. Subclasses rewrite events (``_event``) and
    flush what is still held at the end of the body (``_flush_all``)."""

    def __init__(self, scan: Scan, holdback: int,
                 block_message: Callable[[Finding], str]) -> None:
        self._scan = scan
        self._holdback = holdback
        self._message = block_message
        self._sse = SSEScanner()
        self.blocked: Finding | None = None
        self.hits: dict[tuple[str, str], int] = {}
        """(rule, action) -> 1 for every rule that hit in this response (never the text)."""

    def feed(self, chunk: bytes) -> bytes:
        if self.blocked is not None:
            return b""
        out: list[bytes] = []
        for name, data in self._sse.feed(chunk):
            self._event(name, data, out)
            if self.blocked is not None:
                break
        return b"".join(out)

    def close(self) -> bytes:
        """End of the upstream body: flush whatever is still held."""
        if self.blocked is not None:
            return b""
        out: list[bytes] = []
        for name, data in self._sse.close():
            self._event(name, data, out)
        if self.blocked is None:
            self._flush_all(out)
        return b"".join(out)

    def _note(self, findings: list[Finding]) -> bool:
        """Record hits; True (and ``blocked`` set) if one of them blocks."""
        for f in findings:  # held text is rescanned: count each rule once per response
            self.hits[(f.rule, f.action)] = 1
        w = worst(findings)
        if w is not None and w.action == "block":
            self.blocked = w
            return True
        return False

    @abc.abstractmethod
    def _event(self, name: bytes | None, data: bytes, out: list[bytes]) -> None: ...

    @abc.abstractmethod
    def _flush_all(self, out: list[bytes]) -> None: ...


class OutputGuard(SSEGuard):
    """Rewrites one SSE response (``openai.responses`` or ``openai.chat``) for the client.

    ``feed`` returns the bytes to send for a network chunk (possibly empty: the
    text is being held). After a block, ``blocked`` is set, the error event has
    been returned, and every later chunk yields nothing.
    """

    def __init__(self, api: str, scan: Scan, holdback: int,
                 block_message: Callable[[Finding], str]) -> None:
        super().__init__(scan, holdback, block_message)
        self.chat = api == "openai.chat"
        self._texts: dict[tuple[Any, ...], TextGuard] = {}
        self._full_memo: dict[str, str] = {}
        self._response_id: str | None = None
        self._seq = 0

    def _flush_all(self, out: list[bytes]) -> None:
        if self.chat:
            self._chat_flush_all(None, out)
        else:
            self._responses_flush(None, out)

    # -- shared ---------------------------------------------------------------
    def _full(self, text: str) -> str:
        """A text repeated whole (.done, completed): redact it all; memoised per response."""
        done = self._full_memo.get(text)
        if done is not None:
            return done
        findings = self._scan(text)
        if self._note(findings):
            return ""
        done = self._full_memo[text] = redact(text, findings)
        return done

    def _guard(self, key: tuple[Any, ...]) -> TextGuard:
        g = self._texts.get(key)
        if g is None:
            g = self._texts[key] = TextGuard(self._scan, self._holdback)
        return g

    @staticmethod
    def _sse_bytes(name: bytes | None, payload: bytes) -> bytes:
        head = b"event: " + name + b"\n" if name else b""
        if b"\n" in payload:
            payload = payload.replace(b"\n", b"\ndata: ")
        return head + b"data: " + payload + b"\n\n"

    def _emit(self, name: bytes | None, obj: dict[str, Any], out: list[bytes]) -> None:
        out.append(self._sse_bytes(name, _DUMPS(obj).encode()))

    # -- Responses --------------------------------------------------------------
    def _event(self, name: bytes | None, data: bytes, out: list[bytes]) -> None:
        if self.chat:
            self._chat_event(name, data, out)
            return
        kind = name.decode("utf-8", "replace") if name else None
        if kind is not None and kind not in _WATCHED:
            out.append(self._sse_bytes(name, data))
            return
        obj = loads_object(data)
        if obj is None:
            out.append(self._sse_bytes(name, data))
            return
        kind = str(obj.get("type") or kind or "")
        seq = obj.get("sequence_number")
        if isinstance(seq, int):
            self._seq = seq
        if kind == "response.created":
            m = _RESP_ID.search(data)
            self._response_id = m.group(1).decode() if m else None
        elif kind in (_TEXT_DELTA, _ARGS_DELTA) and isinstance(obj.get("delta"), str):
            text, findings = self._guard(_key(kind, obj)).push(obj["delta"])
            if self._note(findings):
                out.append(self._block_event())
                return
            obj["delta"] = text
        elif kind in (_TEXT_DONE, _ARGS_DONE):
            field = "text" if kind == _TEXT_DONE else "arguments"
            if not self._flush_key(_key(kind, obj), obj, kind, out):
                return
            if isinstance(obj.get(field), str):
                obj[field] = self._full(obj[field])
        elif kind == _PART_DONE:
            part = obj.get("part")
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] = self._full(part["text"])
        elif kind == _ITEM_DONE:
            item = obj.get("item")
            if isinstance(item, dict):
                if not self._responses_flush(item.get("id"), out):
                    return
                self._item(item)
        elif kind in _FINAL:
            if not self._responses_flush(None, out):
                return
            resp = obj.get("response")
            output = resp.get("output") if isinstance(resp, dict) else None
            if isinstance(output, list):
                for item in output:
                    if isinstance(item, dict):
                        self._item(item)
        if self.blocked is not None:
            out.append(self._block_event())
            return
        self._emit(name, obj, out)

    def _item(self, item: dict[str, Any]) -> None:
        for field in ("arguments", "input"):
            if isinstance(item.get(field), str):
                item[field] = self._full(item[field])
        content = item.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = self._full(part["text"])

    def _flush_key(self, key: tuple[Any, ...], like: dict[str, Any], kind: str,
                   out: list[bytes]) -> bool:
        """Send a channel's held text as one last delta; False if that text blocks."""
        g = self._texts.pop(key, None)
        if g is None:
            return True
        text, findings = g.flush()
        if self._note(findings):
            out.append(self._block_event())
            return False
        if text:
            delta_kind = _TEXT_DELTA if kind in (_TEXT_DELTA, _TEXT_DONE) else _ARGS_DELTA
            ev: dict[str, Any] = {k: like[k] for k in ("item_id", "output_index", "content_index")
                                  if k in like}
            self._emit(delta_kind.encode(), {"type": delta_kind, "sequence_number": self._seq,
                                             **ev, "delta": text}, out)
        return True

    def _responses_flush(self, item_id: Any, out: list[bytes]) -> bool:
        for key in [k for k in self._texts if item_id is None or k[1] == item_id]:
            kind = key[0]
            like = {"item_id": key[1], "output_index": key[2]}
            if key[3] is not None:
                like["content_index"] = key[3]
            if not self._flush_key(key, like, kind, out):
                return False
        return True

    def _block_event(self) -> bytes:
        assert self.blocked is not None
        message = self._message(self.blocked)
        if self.chat:
            err = {"error": {"message": message, "type": "guardrail_blocked",
                             "code": "guardrail_blocked", "param": None}}
            return self._sse_bytes(None, _DUMPS(err).encode()) + b"data: [DONE]\n\n"
        error = {"code": FINAL_CODE, "message": message, "type": "guardrail_blocked",
                 "param": self.blocked.rule}
        ev = {"type": "response.failed", "sequence_number": self._seq + 1,
              "response": {"id": self._response_id, "object": "response", "status": "failed",
                           "error": error, "incomplete_details": None, "output": [],
                           "usage": None}}
        return self._sse_bytes(b"response.failed", _DUMPS(ev).encode())

    # -- Chat Completions ----------------------------------------------------------
    def _chat_event(self, name: bytes | None, data: bytes, out: list[bytes]) -> None:
        if data.strip() == b"[DONE]":
            if self._chat_flush_all(None, out):
                out.append(self._sse_bytes(name, data))
            return
        obj = loads_object(data)
        choices = obj.get("choices") if obj is not None else None
        if obj is None or not isinstance(choices, list):
            out.append(self._sse_bytes(name, data))
            return
        if not choices:  # the usage chunk: every channel has ended
            if self._chat_flush_all(obj, out):
                self._emit(name, obj, out)
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            idx = _hashable(choice.get("index", 0))
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    text, findings = self._guard(("c", idx)).push(delta["content"])
                    if self._note(findings):
                        out.append(self._block_event())
                        return
                    delta["content"] = text
                for call in _list(delta.get("tool_calls")):
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        g = self._guard(("t", idx, _hashable(call.get("index", 0))))
                        text, findings = g.push(fn["arguments"])
                        if self._note(findings):
                            out.append(self._block_event())
                            return
                        fn["arguments"] = text
            if choice.get("finish_reason") is not None and not self._chat_finish(choice, idx):
                out.append(self._block_event())
                return
        self._emit(name, obj, out)

    def _chat_finish(self, choice: dict[str, Any], index: Any) -> bool:
        """A choice ended: its held text goes into this very chunk; False if it blocks."""
        for key in [k for k in self._texts if k[1] == index]:
            text, findings = self._texts.pop(key).flush()
            if self._note(findings):
                return False
            if not text:
                continue
            delta = choice.setdefault("delta", {})
            if key[0] == "c":
                delta["content"] = (delta.get("content") or "") + text
            else:
                calls = delta.get("tool_calls")
                if not isinstance(calls, list):
                    calls = delta["tool_calls"] = []
                call = next((c for c in calls if isinstance(c, dict)
                             and c.get("index", 0) == key[2]), None)
                if call is None:
                    calls.append({"index": key[2], "function": {"arguments": text}})
                else:
                    fn = call.setdefault("function", {})
                    fn["arguments"] = (fn.get("arguments") or "") + text
        return True

    def _chat_flush_all(self, like: dict[str, Any] | None, out: list[bytes]) -> bool:
        for key in list(self._texts):
            g = self._texts.pop(key)
            text, findings = g.flush()
            if self._note(findings):
                out.append(self._block_event())
                return False
            if not text:
                continue
            delta: dict[str, Any] = ({"content": text} if key[0] == "c" else
                                     {"tool_calls": [{"index": key[2],
                                                      "function": {"arguments": text}}]})
            base = {k: v for k, v in (like or {}).items()
                    if k in ("id", "object", "created", "model", "system_fingerprint")}
            self._emit(None, {**base, "choices": [{"index": key[1], "delta": delta,
                                                   "finish_reason": None}]}, out)
        return True


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _hashable(v: Any) -> Any:
    """A client-visible id used as a dict key: a list or object there must not raise."""
    return v if v is None or isinstance(v, str | int | float) else repr(v)


def _key(kind: str, obj: dict[str, Any]) -> tuple[Any, ...]:
    channel = _TEXT_DELTA if kind in (_TEXT_DELTA, _TEXT_DONE) else _ARGS_DELTA
    return (channel, _hashable(obj.get("item_id")), _hashable(obj.get("output_index")),
            _hashable(obj.get("content_index")) if channel == _TEXT_DELTA else None)


def guard_body(api: str, body: bytes, scan: Scan) -> tuple[bytes | None, list[Finding]]:
    """A non-streamed response: (rewritten body or None if unchanged, findings)."""
    obj = loads_object(body)
    if obj is None:
        return None, []
    if api == "anthropic.messages":  # anthropic (issue 13)
        from .anthropic_stream import guard_message
        changed_msg, found_msg = guard_message(obj, scan)
        return (_DUMPS(obj).encode() if changed_msg else None), found_msg
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
                if new != text:
                    holder[field] = new
                    changed = True

    if api == "openai.chat":
        for choice in _list(obj.get("choices")):
            msg = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(msg, dict):
                fix(msg, "content")
                for call in _list(msg.get("tool_calls")):
                    if isinstance(call, dict) and isinstance(call.get("function"), dict):
                        fix(call["function"], "arguments")
    else:
        for item in _list(obj.get("output")):
            if not isinstance(item, dict):
                continue
            fix(item, "arguments")
            fix(item, "input")
            for part in _list(item.get("content")):
                if isinstance(part, dict):
                    fix(part, "text")
    return (_DUMPS(obj).encode() if changed else None), found

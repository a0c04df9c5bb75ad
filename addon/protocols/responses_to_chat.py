"""Translator: a Responses API client (Codex) to a Chat-Completions-only provider.

One schema pair, both ways, as pure functions (DESIGN §2, after Envoy AI
Gateway's translators): ``chat_request`` turns a Responses request body into a
Chat Completions body; ``ChatToResponsesStream`` turns the provider's chat SSE
stream, chunk by chunk, into the Responses SSE events Codex needs (created,
output_item.added/done, output_text.delta, function_call_arguments.delta/done,
completed with usage); ``response_body`` does the same for a non-streamed body.

Codex's freeform tools (``type: custom``, e.g. apply_patch) become functions
taking one string ``input`` and come back as ``custom_tool_call`` items. Items a
chat model cannot take (reasoning, web search...) are dropped. A stream that
ends without a finish reason gets no ``response.completed``, so the client sees
a cut stream and retries, as it would with the provider itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .sse import SSEScanner

_TEXT_PARTS = ("input_text", "output_text", "text")
_OUTPUTS = ("function_call_output", "custom_tool_call_output")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


# --- request -----------------------------------------------------------------------
def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type") in _TEXT_PARTS
                       and isinstance(p.get("text"), str))
    return ""


def _user_content(content: Any) -> str | list[dict[str, Any]]:
    """User content keeps images; text only stays a plain string."""
    if not isinstance(content, list) or not any(
            isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        return _text(content)
    parts: list[dict[str, Any]] = []
    for p in content:
        if not isinstance(p, dict):
            continue
        if p.get("type") in _TEXT_PARTS and isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"]})
        elif p.get("type") == "input_image" and isinstance(p.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
    return parts


def _tool(tool: Mapping[str, Any]) -> dict[str, Any] | None:
    kind, name = tool.get("type"), tool.get("name")
    if not isinstance(name, str):
        return None
    fn: dict[str, Any] = {"name": name}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    if kind == "function":
        fn["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    elif kind == "custom":
        fn["parameters"] = {"type": "object", "required": ["input"],
                            "properties": {"input": {"type": "string"}}}
    else:
        return None
    return {"type": "function", "function": fn}


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def chat_messages(items: Any, instructions: Any = None) -> list[dict[str, Any]]:
    """Responses ``input`` (and ``instructions``) as chat ``messages``."""
    out: list[dict[str, Any]] = []
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                out.append({"role": "system", "content": _text(item.get("content"))})
            elif role == "user":
                out.append({"role": "user", "content": _user_content(item.get("content"))})
            elif role == "assistant":
                out.append({"role": "assistant", "content": _text(item.get("content"))})
        elif kind in ("function_call", "custom_tool_call"):
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                continue
            args = (item.get("arguments") if kind == "function_call"
                    else json.dumps({"input": item.get("input", "")}))
            tc = _tool_call(call_id, name, args if isinstance(args, str) else "{}")
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(tc)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [tc]})
        elif kind in _OUTPUTS and isinstance(item.get("call_id"), str):
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _text(output)})
    return out


def custom_tool_names(obj: Mapping[str, Any]) -> frozenset[str]:
    tools = obj.get("tools")
    return frozenset(t["name"] for t in tools if isinstance(t, dict) and t.get("type") == "custom"
                     and isinstance(t.get("name"), str)) if isinstance(tools, list) else frozenset()


def chat_request(obj: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A Responses request body as a Chat Completions request body for ``model``."""
    body: dict[str, Any] = {"model": model,
                            "messages": chat_messages(obj.get("input"), obj.get("instructions"))}
    tools = [t for t in (_tool(x) for x in _list(obj.get("tools")) if isinstance(x, dict)) if t]
    if tools:
        body["tools"] = tools
        choice = obj.get("tool_choice")
        if choice in ("auto", "none", "required"):
            body["tool_choice"] = choice
        elif isinstance(choice, dict) and isinstance(choice.get("name"), str):
            body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        if isinstance(obj.get("parallel_tool_calls"), bool):
            body["parallel_tool_calls"] = obj["parallel_tool_calls"]
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"),
                     ("max_output_tokens", "max_tokens")):
        if isinstance(obj.get(src), int | float) and not isinstance(obj.get(src), bool):
            body[dst] = obj[src]
    fmt = (obj.get("text") or {}).get("format") if isinstance(obj.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    if obj.get("stream") is True:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# --- response ----------------------------------------------------------------------
def responses_usage(u: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(u, Mapping):
        return None

    def n(v: Any) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    def sub(key: str, f: str) -> int:
        d = u.get(key)
        return n(d.get(f)) if isinstance(d, dict) else 0

    inp, out = n(u.get("prompt_tokens")), n(u.get("completion_tokens"))
    return {"input_tokens": inp,
            "input_tokens_details": {"cached_tokens": sub("prompt_tokens_details",
                                                          "cached_tokens")},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": sub("completion_tokens_details",
                                                              "reasoning_tokens")},
            "total_tokens": inp + out}


def _call_item(item_id: str, call_id: str, name: str, args: str, custom: bool,
               status: str = "completed") -> dict[str, Any]:
    if not custom:
        return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
                "arguments": args, "status": status}
    try:
        parsed = json.loads(args) if args else {}
    except (ValueError, RecursionError):
        parsed = None
    raw = parsed.get("input") if isinstance(parsed, dict) else None
    return {"type": "custom_tool_call", "id": item_id, "call_id": call_id, "name": name,
            "input": raw if isinstance(raw, str) else args, "status": status}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _response(resp_id: str, model: str, created: int, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None,
              finish: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    reason = _INCOMPLETE.get(finish or "")
    return {"id": resp_id, "object": "response", "created_at": created, "status": status,
            "model": model, "output": output, "usage": usage, "error": error,
            "incomplete_details": {"reason": reason} if reason else None}


def response_body(chat: Mapping[str, Any], custom_tools: frozenset[str] = frozenset()
                  ) -> dict[str, Any]:
    """A non-streamed chat completion as a Responses object."""
    cid = str(chat.get("id") or "chat")
    output: list[dict[str, Any]] = []
    finish: str | None = None
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    if isinstance(choice, dict):
        reason = choice.get("finish_reason")
        finish = reason if isinstance(reason, str) else None
        msg = _dict(choice.get("message"))
        if isinstance(msg.get("content"), str) and msg["content"]:
            output.append(_message_item(f"msg_{cid}", msg["content"]))
        for i, tc in enumerate(_list(msg.get("tool_calls"))):
            fn = _dict(_dict(tc).get("function"))
            name, args = fn.get("name"), fn.get("arguments")
            if isinstance(name, str):
                output.append(_call_item(f"fc_{cid}_{i}", str(_dict(tc).get("id") or f"call_{i}"),
                                         name, args if isinstance(args, str) else "{}",
                                         name in custom_tools))
    status = "incomplete" if finish in _INCOMPLETE else "completed"
    created = chat.get("created")
    return _response(f"resp_{cid}", str(chat.get("model") or ""),
                     created if isinstance(created, int) else int(time.time()), status,
                     output, responses_usage(chat.get("usage")), finish)


@dataclass(slots=True)
class _Call:
    item_id: str
    call_id: str
    name: str
    index: int
    custom: bool
    args: list[str] = field(default_factory=list)


class ChatToResponsesStream:
    """Chat Completions SSE in, Responses SSE out, one network chunk at a time.

    ``feed`` returns the bytes to send for a chunk (often b"": the caller must
    then send nothing, never an empty chunk); ``close`` returns what ends the
    stream (nothing if it was cut before a finish reason).
    """

    def __init__(self, custom_tools: frozenset[str] = frozenset()) -> None:
        self.custom_tools = custom_tools
        self._scanner = SSEScanner()
        self._seq = 0
        self._started = False
        self.finished = False
        self._id = "resp_chat"
        self._model = ""
        self._created = int(time.time())
        self._output: list[dict[str, Any]] = []
        self._msg_id: str | None = None
        self._msg_text: list[str] = []
        self._calls: dict[int, _Call] = {}
        self._usage: dict[str, Any] | None = None
        self._finish: str | None = None

    def _ev(self, out: list[bytes], kind: str, **fields: Any) -> None:
        data = json.dumps({"type": kind, "sequence_number": self._seq, **fields},
                          separators=(",", ":"))
        self._seq += 1
        out.append(b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n")

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for _, data in self._scanner.feed(chunk):
            self._on_data(data, out)
        return b"".join(out)

    def close(self) -> bytes:
        out: list[bytes] = []
        for _, data in self._scanner.close():
            self._on_data(data, out)
        if not self.finished and self._finish is not None:
            self._complete(out)
        return b"".join(out)

    def _on_data(self, data: bytes, out: list[bytes]) -> None:
        if self.finished:
            return
        if data.strip() == b"[DONE]":
            if self._finish is not None or self._started:
                self._complete(out)
            return
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if not isinstance(obj, dict):
            return
        self._start(obj, out)
        err = obj.get("error")
        if isinstance(err, dict):
            self.finished = True
            self._ev(out, "response.failed", response=_response(
                self._id, self._model, self._created, "failed", self._output, self._usage,
                error={"code": str(err.get("code") or err.get("type") or "server_error"),
                       "message": str(err.get("message") or "")}))
            return
        if isinstance(obj.get("usage"), dict):
            self._usage = responses_usage(obj["usage"])
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    self._text(text, out)
                for tc in _list(delta.get("tool_calls")):
                    if isinstance(tc, dict):
                        self._tool_delta(tc, out)
            if isinstance(choice.get("finish_reason"), str):
                self._finish = choice["finish_reason"]

    def _start(self, obj: Mapping[str, Any], out: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        self._id = "resp_" + str(obj.get("id") or "chat")
        self._model = str(obj.get("model") or "")
        if isinstance(obj.get("created"), int):
            self._created = obj["created"]
        resp = _response(self._id, self._model, self._created, "in_progress", [], None)
        self._ev(out, "response.created", response=resp)
        self._ev(out, "response.in_progress", response=resp)

    def _text(self, text: str, out: list[bytes]) -> None:
        if self._msg_id is None:
            self._msg_id = f"msg_{self._id[5:]}_{len(self._output)}"
            self._ev(out, "response.output_item.added", output_index=len(self._output),
                     item=_message_item(self._msg_id, "", "in_progress") | {"content": []})
            self._ev(out, "response.content_part.added", item_id=self._msg_id,
                     output_index=len(self._output), content_index=0,
                     part={"type": "output_text", "text": "", "annotations": []})
        self._msg_text.append(text)
        self._ev(out, "response.output_text.delta", item_id=self._msg_id,
                 output_index=len(self._output), content_index=0, delta=text)

    def _close_message(self, out: list[bytes]) -> None:
        if self._msg_id is None:
            return
        text, idx = "".join(self._msg_text), len(self._output)
        self._ev(out, "response.output_text.done", item_id=self._msg_id, output_index=idx,
                 content_index=0, text=text)
        self._ev(out, "response.content_part.done", item_id=self._msg_id, output_index=idx,
                 content_index=0, part={"type": "output_text", "text": text, "annotations": []})
        item = _message_item(self._msg_id, text)
        self._ev(out, "response.output_item.done", output_index=idx, item=item)
        self._output.append(item)
        self._msg_id, self._msg_text = None, []

    def _tool_delta(self, tc: Mapping[str, Any], out: list[bytes]) -> None:
        index = tc.get("index", 0)
        index = index if isinstance(index, int) else 0
        fn = _dict(tc.get("function"))
        call = self._calls.get(index)
        if call is None:
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                return  # a fragment before its call was announced: nothing to attach it to
            self._close_message(out)
            call = _Call(f"fc_{self._id[5:]}_{index}", str(tc.get("id") or f"call_{index}"),
                         name, index, name in self.custom_tools)
            self._calls[index] = call
            if not call.custom:  # custom calls are announced whole, once their input is known
                self._ev(out, "response.output_item.added", output_index=self._slot(call),
                         item=_call_item(call.item_id, call.call_id, name, "", False,
                                         "in_progress"))
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            call.args.append(args)
            if not call.custom:
                self._ev(out, "response.function_call_arguments.delta", item_id=call.item_id,
                         output_index=self._slot(call), delta=args)

    def _slot(self, call: _Call) -> int:
        """Output index of a call: after the items already done, in call order."""
        return len(self._output) + sorted(self._calls).index(call.index)

    def _complete(self, out: list[bytes]) -> None:
        self._close_message(out)
        for index in sorted(self._calls):
            call = self._calls[index]
            args, idx = "".join(call.args), len(self._output)
            item = _call_item(call.item_id, call.call_id, call.name, args, call.custom)
            if call.custom:
                self._ev(out, "response.output_item.added", output_index=idx, item=item)
            else:
                self._ev(out, "response.function_call_arguments.done", item_id=call.item_id,
                         output_index=idx, arguments=args)
            self._ev(out, "response.output_item.done", output_index=idx, item=item)
            self._output.append(item)
        self._calls.clear()
        self.finished = True
        status = "incomplete" if self._finish in _INCOMPLETE else "completed"
        self._ev(out, f"response.{status}", response=_response(
            self._id, self._model, self._created, status, self._output, self._usage,
            self._finish))


def translate_all(chunks: Iterable[bytes], custom_tools: frozenset[str] = frozenset()
                  ) -> bytes:
    """A whole chat stream at once (tests, benchmarks)."""
    tr = ChatToResponsesStream(custom_tools)
    return b"".join([*(tr.feed(c) for c in chunks), tr.close()])

"""A fake Anthropic Messages provider on 127.0.0.1 that the tests own.

It speaks enough of ``POST /v1/messages`` for the real Claude Code CLI (2.1.197,
headless ``-p``) to complete a turn that runs one Bash tool, and it records every
request it gets (modelled on tests/fakeprovider.py).

    with FakeAnthropic() as fake:
        fake.base_url                 # http://127.0.0.1:PORT (Claude Code adds /v1/messages)
        fake.requests                 # list[RecordedRequest], in arrival order

Scripted tool loop: while the requests' current turn (messages after the last user
message that carries text and no ``tool_result``) holds fewer than ``tool_calls``
tool results and the request offers a ``Bash`` tool, answer with a ``tool_use``
block for Bash running ``tool_command``; then answer with ``answer_text``.
Requests without tools (side calls) get ``answer_text`` at once.

``stream: true`` -> SSE (``message_start`` with input/cache usage, content blocks with
``text_delta`` / ``input_json_delta``, ``message_delta`` with ``output_tokens``,
``message_stop``); otherwise a JSON Message. Knobs: ``answer_text``, ``tool_calls``,
``tool_command``, ``usage``, ``fail_next`` (statuses answered with an Anthropic error
body), ``extra_headers``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fakeprovider import H11_MAX_HEADER_BYTES
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["FakeAnthropic", "FakeAnthropicUsage", "RecordedRequest"]

DEFAULT_ANSWER = "FAKE-CLAUDE-ANSWER-42"
DEFAULT_TOOL_COMMAND = "echo fake-tool-ran"
TOOL_ID_PREFIX = "toolu_fake_"


@dataclass(frozen=True)
class FakeAnthropicUsage:
    """Usage every answer reports (Anthropic's buckets: input excludes both caches)."""

    input_tokens: int = 1200
    cache_creation_input_tokens: int = 300
    cache_read_input_tokens: int = 200
    output_tokens: int = 57

    def start(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens,
                "cache_creation_input_tokens": self.cache_creation_input_tokens,
                "cache_read_input_tokens": self.cache_read_input_tokens,
                "output_tokens": 1}

    def full(self) -> dict[str, int]:
        return {**self.start(), "output_tokens": self.output_tokens}


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    raw: bytes
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def _sse(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode()


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                        status_code=status)


_ERROR_KINDS = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                529: "overloaded_error"}


def turn_results(messages: list[Any]) -> tuple[int, list[str]]:
    """(tool results in the current turn, tool_use_ids of the last message's results)."""
    count = 0
    last: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        content = msg.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            count += len(results)
            last = [str(b.get("tool_use_id")) for b in results]
        else:
            count, last = 0, []
    return count, last


class FakeAnthropic:
    def __init__(self, *, answer_text: str = DEFAULT_ANSWER, tool_calls: int = 1,
                 tool_command: str = DEFAULT_TOOL_COMMAND,
                 usage: FakeAnthropicUsage | None = None) -> None:
        self.port = 0
        self.answer_text = answer_text
        self.tool_calls = tool_calls
        self.tool_command = tool_command
        self.usage = usage or FakeAnthropicUsage()
        self.fail_next: list[int] = []
        self.extra_headers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(routes=[
            Route("/v1/messages", self._messages, methods=["POST"]),
            Route("/{path:path}", self._not_found,
                  methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
        ])

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning",
            lifespan="off", access_log=False, timeout_graceful_shutdown=1,
            h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES))
        self._server = server

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.serve(sockets=[sock]))
            finally:
                loop.close()
                sock.close()

        self._thread = threading.Thread(target=run, name=f"fakeanthropic:{self.port}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake Anthropic provider did not start")
            time.sleep(0.005)
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> FakeAnthropic:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    # ------------------------------------------------------------------ handlers
    async def _record(self, request: Request) -> RecordedRequest:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = RecordedRequest(request.method, request.url.path, request.url.query,
                              {k.lower(): v for k, v in request.headers.items()},
                              body if isinstance(body, dict) else None, raw)
        with self._lock:
            self._requests.append(rec)
        return rec

    async def _not_found(self, request: Request) -> Response:
        await self._record(request)
        return _error(404, "not_found_error", f"fake: no route {request.url.path}")

    def _content(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        has_bash = any(isinstance(t, dict) and t.get("name") == "Bash" for t in tools)
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        done, _ = turn_results(messages)
        if has_bash and done < self.tool_calls:
            return [{"type": "tool_use", "id": f"{TOOL_ID_PREFIX}{next(self._ids)}",
                     "name": "Bash",
                     "input": {"command": self.tool_command,
                               "description": "Run the fake tool"}}]
        return [{"type": "text", "text": self.answer_text}]

    async def _messages(self, request: Request) -> Response:
        rec = await self._record(request)
        if self.fail_next:
            status = self.fail_next.pop(0)
            return _error(status, _ERROR_KINDS.get(status, "api_error"),
                          f"fake: failing with {status}")
        body = rec.body
        if body is None or not isinstance(body.get("model"), str):
            return _error(400, "invalid_request_error", "fake: body must be JSON with a model")
        msg_id = f"msg_fake_{next(self._ids)}"
        content = self._content(body)
        stop = "tool_use" if content[0]["type"] == "tool_use" else "end_turn"
        if body.get("stream") is not True:
            return JSONResponse({"id": msg_id, "type": "message", "role": "assistant",
                                 "model": body["model"], "content": content,
                                 "stop_reason": stop, "stop_sequence": None,
                                 "usage": self.usage.full()}, headers=self.extra_headers)
        events = self._events(msg_id, body["model"], content, stop)
        return StreamingResponse(self._stream(events), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", **self.extra_headers})

    def _events(self, msg_id: str, model: str, content: list[dict[str, Any]],
                stop: str) -> list[bytes]:
        out = [_sse("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": self.usage.start()}}), _sse("ping", {"type": "ping"})]
        for i, block in enumerate(content):
            if block["type"] == "text":
                out.append(_sse("content_block_start", {"type": "content_block_start",
                                "index": i, "content_block": {"type": "text", "text": ""}}))
                text = block["text"]
                step = max(1, len(text) // 4)
                for j in range(0, len(text), step):
                    out.append(_sse("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "text_delta", "text": text[j:j + step]}}))
            else:
                out.append(_sse("content_block_start", {
                    "type": "content_block_start", "index": i,
                    "content_block": {**block, "input": {}}}))
                args = json.dumps(block["input"])
                half = len(args) // 2
                for part in (args[:half], args[half:]):
                    out.append(_sse("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": part}}))
            out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
        out.append(_sse("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": self.usage.output_tokens}}))
        out.append(_sse("message_stop", {"type": "message_stop"}))
        return out

    @staticmethod
    async def _stream(events: list[bytes]) -> AsyncIterator[bytes]:
        for ev in events:
            yield ev
            await asyncio.sleep(0)


logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

"""A fake LLM provider on 127.0.0.1 that the test suite and the benchmarks own.

It speaks enough of the OpenAI API for the real Codex CLI (0.169) to complete a
turn that runs one harmless shell tool, and it records every request it gets.

    with FakeProvider() as fake:          # or: url = fake.start(); ...; fake.stop()
        base_url = fake.base_url          # http://127.0.0.1:PORT/v1
        ...
        fake.requests                     # list[RecordedRequest], in arrival order

Endpoints:
  POST /v1/responses           stream true -> SSE (``event:``/``data:``, each JSON with
                               ``type`` and ``sequence_number``); false -> JSON Response.
                               Scripted tool loop: until the client has run
                               ``tool_calls`` (default 1) shell calls this fake issued
                               in the current turn, answer with a ``function_call`` for
                               the shell tool found in ``tools`` (Codex 0.169:
                               ``exec_command`` with ``{"cmd": ...}``); then answer with
                               an assistant message ``answer_text``. The current turn is
                               Codex's ``client_metadata.turn_id`` when present (survives
                               compaction), else the input after the last user message.
                               Codex compaction calls (``request_kind`` compaction) get
                               ``compaction_summary`` as text, or one ``compaction`` item
                               when the input ends with ``compaction_trigger`` (remote v2).
  POST /v1/responses/compact   JSON ``{"object": "response.compaction", "output": [...]}``.
  POST /v1/chat/completions    stream true -> ``data:`` chunks (+ usage chunk when
                               ``stream_options.include_usage``) then ``data: [DONE]``;
                               false -> chat.completion JSON with usage.
  WebSocket upgrades           recorded (kind "websocket") and refused with 403.
  anything else                404 with an OpenAI error body.

Knobs (plain attributes, settable between requests from any thread): ``answer_text``,
``delta_count``, ``event_delay``, ``fail_next``, ``cut_stream_after``,
``cut_stream_abort``, ``usage``, ``tool_calls``, ``tool_command``,
``compaction_summary``, ``extra_headers``. ``fail_next``, ``cut_stream_after`` and
``event_delay`` apply to every model endpoint. Failover knobs: ``hang_before_headers``
(seconds before answering), ``hang_mid_stream_after`` + ``hang_mid_stream`` (a pause
after N events), ``linger_after_last`` (a pause before the body ends), ``chat_only``
(``/responses*`` answer 404, like a Chat-only server) and ``chat_tool_calls``
(``/chat/completions`` runs the same shell-tool loop).

Standalone (benchmarks): ``python tests/fakeprovider.py --port N`` prints the base URL
on stdout once it accepts connections, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

__all__ = ["FakeError", "FakeProvider", "FakeUsage", "RecordedRequest"]

DEFAULT_ANSWER = "FAKE-ANSWER-42"
DEFAULT_TOOL_COMMAND = "echo fake-tool-ran"
CALL_ID_PREFIX = "call_fake_"
# Shell tools Codex may expose, most preferred first (0.169 exposes exec_command).
SHELL_TOOL_NAMES = ("exec_command", "shell_command", "shell", "container.exec", "local_shell")
OUTPUT_ITEM_TYPES = ("function_call_output", "custom_tool_call_output")
COMPACTION_MARKER = "CONTEXT CHECKPOINT COMPACTION"  # Codex's local compaction prompt
COMPACTED_HISTORY = "FAKE-COMPACTED-HISTORY"  # encrypted_content of compaction items
# h11 refuses a request head that arrives in pieces once 16 KiB are buffered, so a
# large header passed whole or split by the kernel decided a test; fakes take 1 MiB.
H11_MAX_HEADER_BYTES = 1 << 20


@dataclass(frozen=True)
class FakeUsage:
    """Token usage reported for every model call (Responses and Chat)."""

    input_tokens: int = 1200
    cached_tokens: int = 1000
    output_tokens: int = 50
    reasoning_tokens: int = 20

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def responses(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.total_tokens,
        }

    def chat(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.input_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens": self.output_tokens,
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class FakeError:
    """One scripted failure for ``fail_next`` (a bare int status also works)."""

    status: int
    message: str | None = None
    type: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        default_type = {
            400: "invalid_request_error",
            401: "invalid_request_error",
            403: "permission_denied",
            404: "not_found_error",
            429: "rate_limit_exceeded",
        }.get(self.status, "server_error")
        return {
            "error": {
                "message": self.message or f"fake provider error {self.status}",
                "type": self.type or default_type,
                "code": self.code or f"fake_{self.status}",
                "param": None,
            }
        }


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]  # names lower-cased, in arrival order
    body: bytes
    json: Any | None
    received_at: float  # time.time() when the request line arrived at the handler
    received_mono: float  # time.monotonic() at the same instant
    status: int | None = None  # status this fake answered with
    # what the fake did: "tool_call" | "answer" | "compaction" (a /responses compaction
    # call) | "compact" (/responses/compact) | "chat" | "error" | "not_found" | "websocket"
    kind: str = ""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


class _CutStream(Exception):
    """Raised inside a stream to make uvicorn drop the connection mid-body."""


class _QuietCut(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _CutStream)


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _split(text: str, n: int) -> list[str]:
    """Split ``text`` into exactly ``n`` (>= 1) consecutive pieces (some may be empty)."""
    n = max(1, n)
    q, r = divmod(len(text), n)
    out: list[str] = []
    pos = 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        out.append(text[pos : pos + size])
        pos += size
    return out


class FakeProvider:
    def __init__(
        self,
        port: int = 0,
        *,
        answer_text: str = DEFAULT_ANSWER,
        delta_count: int = 8,
        event_delay: float = 0.0,
        usage: FakeUsage | None = None,
        tool_calls: int = 1,
        tool_command: str = DEFAULT_TOOL_COMMAND,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.port = port
        self.tls = tls  # egress mode (issue 9): (certfile, keyfile) serves https
        self._defaults: dict[str, Any] = {
            "answer_text": answer_text,
            "delta_count": delta_count,
            "event_delay": event_delay,
            "usage": usage or FakeUsage(),
            "tool_calls": tool_calls,
            "tool_command": tool_command,
        }
        self._set_knobs()
        # --- state ---
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        # "session/turn" -> call ids this fake issued / saw executed in that Codex turn
        self._turn_issued: dict[str, set[str]] = {}
        self._turn_done: dict[str, set[str]] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/responses/compact", self._compact, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route(
                    "/{path:path}",
                    self._not_found,
                    methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
                ),
                WebSocketRoute("/{path:path}", self._websocket),
            ]
        )

    def _set_knobs(self) -> None:
        d = self._defaults
        self.answer_text: str = d["answer_text"]
        self.delta_count: int = d["delta_count"]  # text delta events per answer
        self.event_delay: float = d["event_delay"]  # seconds between streamed events
        self.usage: FakeUsage = d["usage"]
        self.tool_calls: int = d["tool_calls"]  # shell calls per turn before the answer
        self.tool_command: str = d["tool_command"]
        self.compaction_summary = "FAKE-COMPACTION-SUMMARY"  # answer to compaction calls
        self.fail_next: list[int | FakeError] = []  # statuses for the next N requests
        self.cut_stream_after: int | None = None  # events sent before the stream stops
        self.cut_stream_abort = False  # True: drop the connection instead of a clean EOF
        self.extra_headers: dict[str, str] = {}  # added to every response
        # failover knobs (issue 8); defaults change nothing
        self.hang_before_headers = 0.0  # seconds a model endpoint waits before answering
        self.hang_mid_stream_after: int | None = None  # events sent before a mid-stream pause
        self.hang_mid_stream = 0.0  # seconds of that pause
        self.linger_after_last = 0.0  # seconds between the last event and the body's end
        self.chat_only = False  # /responses and /responses/compact answer 404 (Chat only)
        self.chat_tool_calls = False  # /chat/completions runs the shell-tool loop too

    def reset(self) -> None:
        """Knobs back to the constructor's values, and ``clear()``: one server can be
        shared by many tests."""
        self._set_knobs()
        self.clear()

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        if self._thread is not None:
            return self.base_url
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        uv_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _QuietCut) for f in uv_log.filters):
            uv_log.addFilter(_QuietCut())
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
            h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES,
            **({} if self.tls is None else {"ssl_certfile": self.tls[0],
                                            "ssl_keyfile": self.tls[1]}),
        )
        server = uvicorn.Server(config)
        self._server = server

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.serve(sockets=[sock]))
            finally:
                loop.close()
                sock.close()

        self._thread = threading.Thread(target=run, name=f"fakeprovider:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake provider did not start")
            time.sleep(0.005)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5):
            pass
        return self.base_url

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=3)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=3)
        self._server = self._thread = None

    def __enter__(self) -> FakeProvider:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ recording
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget recorded requests and per-turn tool-call state (knobs are kept)."""
        with self._lock:
            self._requests.clear()
            self._turn_issued.clear()
            self._turn_done.clear()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """Recorded requests whose path ends with ``path`` (e.g. "/responses")."""
        return [r for r in self.requests if r.path.endswith(path)]

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        while len(reqs := self.requests) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"got {len(reqs)} requests, wanted {n}")
            time.sleep(0.005)
        return reqs

    async def _record(self, request: Request) -> RecordedRequest:
        now, mono = time.time(), time.monotonic()
        body = await request.body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        rec = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers=[
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.raw
            ],
            body=body,
            json=parsed,
            received_at=now,
            received_mono=mono,
        )
        with self._lock:
            self._requests.append(rec)
        return rec

    # ------------------------------------------------------------------ helpers
    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": self._next_id("req_fake_"), **self.extra_headers}

    def _pop_failure(self, rec: RecordedRequest) -> Response | None:
        with self._lock:
            if not self.fail_next:
                return None
            fail = self.fail_next.pop(0)
        err = fail if isinstance(fail, FakeError) else FakeError(int(fail))
        rec.status, rec.kind = err.status, "error"
        return JSONResponse(
            err.body(), status_code=err.status, headers={**self._headers(), **err.headers}
        )

    async def _stream(self, events: list[bytes]) -> AsyncIterator[bytes]:
        """Yield events with ``event_delay`` between them, honouring ``cut_stream_after``."""
        cut, abort, delay = self.cut_stream_after, self.cut_stream_abort, self.event_delay
        hang_at, hang = self.hang_mid_stream_after, self.hang_mid_stream
        for i, ev in enumerate(events):
            if cut is not None and i >= cut:
                if abort:
                    raise _CutStream("cut_stream_after")
                return
            if hang_at is not None and i == hang_at and hang > 0:
                await asyncio.sleep(hang)
            if i and delay > 0:
                await asyncio.sleep(delay)
            yield ev
        if self.linger_after_last > 0:
            await asyncio.sleep(self.linger_after_last)

    async def _before_answer(self, rec: RecordedRequest) -> Response | None:
        """Failover knobs: a Chat-only server's 404, or a wait before the headers."""
        if self.hang_before_headers > 0:
            await asyncio.sleep(self.hang_before_headers)
        if self.chat_only and "/responses" in rec.path:
            rec.status, rec.kind = 404, "not_found"
            body = FakeError(404, f"Unknown path POST {rec.path}", "invalid_request_error",
                             "unknown_url").body()
            return JSONResponse(body, status_code=404, headers=self._headers())
        return None

    async def _not_found(self, request: Request) -> Response:
        rec = await self._record(request)
        rec.status, rec.kind = 404, "not_found"
        body = FakeError(
            404,
            f"Unknown path {request.method} {request.url.path}",
            "invalid_request_error",
            "unknown_url",
        ).body()
        return JSONResponse(body, status_code=404, headers=self._headers())

    async def _websocket(self, websocket: WebSocket) -> None:
        """WebSocket upgrades (Codex's built-in openai provider) are recorded and refused
        (HTTP 403), which makes Codex fall back to HTTP POST /responses."""
        rec = RecordedRequest(
            method="GET",
            path=websocket.url.path,
            query=websocket.url.query,
            headers=[
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in websocket.headers.raw
            ],
            body=b"",
            json=None,
            received_at=time.time(),
            received_mono=time.monotonic(),
            status=403,
            kind="websocket",
        )
        with self._lock:
            self._requests.append(rec)
        await websocket.close(code=1008)

    # ------------------------------------------------------------------ responses
    def _shell_call(self, tools: list[Any]) -> dict[str, Any]:
        """An output item asking the client to run ``tool_command`` with its shell tool."""
        by_name: dict[str, dict[str, Any]] = {}
        for t in tools if isinstance(tools, list) else []:
            if not isinstance(t, dict):
                continue
            name = t.get("name") or (t.get("function") or {}).get("name") or t.get("type")
            if isinstance(name, str):
                by_name.setdefault(name, t)
        call_id = self._next_id(CALL_ID_PREFIX)
        cmd = self.tool_command
        for name in SHELL_TOOL_NAMES:
            tool = by_name.get(name)
            if tool is None:
                continue
            if tool.get("type") == "local_shell":
                return {
                    "type": "local_shell_call",
                    "id": self._next_id("lsh_"),
                    "call_id": call_id,
                    "status": "completed",
                    "action": {"type": "exec", "command": ["bash", "-lc", cmd]},
                }
            params = (tool.get("parameters") or {}).get("properties") or {}
            if "cmd" in params:
                args: dict[str, Any] = {"cmd": cmd}
            elif (params.get("command") or {}).get("type") == "array":
                args = {"command": ["bash", "-lc", cmd]}
            else:
                args = {"command": cmd}
            return {
                "type": "function_call",
                "id": self._next_id("fc_"),
                "call_id": call_id,
                "name": name,
                "arguments": json.dumps(args),
                "status": "completed",
            }
        # No known shell tool: still ask for one, the client will report it unknown.
        return {
            "type": "function_call",
            "id": self._next_id("fc_"),
            "call_id": call_id,
            "name": "shell",
            "status": "completed",
            "arguments": json.dumps({"command": ["bash", "-lc", cmd]}),
        }

    @staticmethod
    def _turn_metadata(rec: RecordedRequest, body: dict[str, Any]) -> dict[str, Any]:
        raw = rec.header("x-codex-turn-metadata")
        if raw is None:
            raw = (body.get("client_metadata") or {}).get("x-codex-turn-metadata")
        try:
            md = json.loads(raw) if isinstance(raw, str) else {}
        except ValueError:
            md = {}
        return md if isinstance(md, dict) else {}

    @staticmethod
    def _last_input(body: dict[str, Any]) -> dict[str, Any]:
        items = body.get("input")
        last = items[-1] if isinstance(items, list) and items else None
        return last if isinstance(last, dict) else {}

    def _is_compaction(self, body: dict[str, Any], md: dict[str, Any]) -> bool:
        """A Codex compaction: a /responses call with request_kind compaction (local: the
        input ends with Codex's checkpoint prompt; remote v2: with compaction_trigger)."""
        last = self._last_input(body)
        return (
            md.get("request_kind") == "compaction"
            or last.get("type") == "compaction_trigger"
            or (last.get("role") == "user" and COMPACTION_MARKER in json.dumps(last.get("content")))
        )

    @staticmethod
    def _turn_key(body: dict[str, Any], md: dict[str, Any]) -> str | None:
        turn = md.get("turn_id") or (body.get("client_metadata") or {}).get("turn_id")
        if not turn:
            return None
        return f"{body.get('prompt_cache_key') or md.get('session_id')}/{turn}"

    def _executed_calls(self, body: dict[str, Any], key: str | None) -> int:
        """How many of this fake's tool calls the client has run in the current turn.

        With a Codex turn id (``client_metadata.turn_id``): the calls this fake issued
        for that turn whose output has been seen in any request of the turn (Codex's
        compaction rewrites history and drops tool outputs). Without one: the fake's
        tool outputs in the input after the last user message.
        """
        items = body.get("input")
        items = items if isinstance(items, list) else []
        outputs = [
            (i, str(it["call_id"]))
            for i, it in enumerate(items)
            if isinstance(it, dict)
            and it.get("type") in OUTPUT_ITEM_TYPES
            and str(it.get("call_id", "")).startswith(CALL_ID_PREFIX)
        ]
        if key is not None:
            with self._lock:
                issued = self._turn_issued.get(key, set())
                done = self._turn_done.setdefault(key, set())
                done.update(cid for _, cid in outputs if cid in issued)
                return len(done)
        last_user = max(
            (
                i
                for i, it in enumerate(items)
                if isinstance(it, dict)
                and it.get("role") == "user"
                and it.get("type", "message") == "message"
            ),
            default=-1,
        )
        return len({cid for i, cid in outputs if i > last_user})

    def _response_obj(
        self,
        resp_id: str,
        model: str,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
    ) -> dict[str, Any]:
        return {
            "id": resp_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": model,
            "output": output,
            "usage": usage,
            "error": None,
            "incomplete_details": None,
        }

    async def _responses(self, request: Request) -> Response:
        rec = await self._record(request)
        if (early := await self._before_answer(rec)) is not None:
            return early
        if (fail := self._pop_failure(rec)) is not None:
            return fail
        body = rec.json if isinstance(rec.json, dict) else {}
        model = str(body.get("model") or "fake-model")
        usage = self.usage.responses()
        resp_id = self._next_id("resp_fake_")
        md = self._turn_metadata(rec, body)
        headers = self._headers()
        rec.status = 200
        text = self.answer_text
        key = self._turn_key(body, md)
        executed = self._executed_calls(body, key)  # always: compaction calls carry outputs too
        if self._is_compaction(body, md):
            rec.kind, text = "compaction", self.compaction_summary
        elif executed < self.tool_calls:
            rec.kind = "tool_call"
        else:
            rec.kind = "answer"
        if rec.kind == "tool_call":
            item = self._shell_call(body.get("tools") or [])
            if key is not None:
                with self._lock:
                    self._turn_issued.setdefault(key, set()).add(item["call_id"])
        elif (
            rec.kind == "compaction" and self._last_input(body).get("type") == "compaction_trigger"
        ):
            # Remote compaction v2 (built-in openai provider): exactly one compaction item.
            item = {
                "type": "compaction",
                "id": self._next_id("cmp_fake_"),
                "encrypted_content": COMPACTED_HISTORY,
            }
        else:
            item = {
                "type": "message",
                "id": self._next_id("msg_fake_"),
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        if not body.get("stream"):
            return JSONResponse(
                self._response_obj(resp_id, model, "completed", [item], usage), headers=headers
            )

        seq = itertools.count()

        def ev(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(seq), **fields})

        started = self._response_obj(resp_id, model, "in_progress", [], None)
        events = [
            ev("response.created", response=started),
            ev("response.in_progress", response=started),
        ]
        if item["type"] == "message":
            added = {**item, "status": "in_progress", "content": []}
            events.append(ev("response.output_item.added", output_index=0, item=added))
            for piece in _split(text, self.delta_count):
                events.append(
                    ev(
                        "response.output_text.delta",
                        item_id=item["id"],
                        output_index=0,
                        content_index=0,
                        delta=piece,
                    )
                )
        elif item["type"] == "function_call":
            added = {**item, "status": "in_progress", "arguments": ""}
            events.append(ev("response.output_item.added", output_index=0, item=added))
            events.append(
                ev(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=0,
                    delta=item["arguments"],
                )
            )
            events.append(
                ev(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=0,
                    arguments=item["arguments"],
                )
            )
        else:
            events.append(ev("response.output_item.added", output_index=0, item=item))
        events.append(ev("response.output_item.done", output_index=0, item=item))
        events.append(
            ev(
                "response.completed",
                response=self._response_obj(resp_id, model, "completed", [item], usage),
            )
        )
        return StreamingResponse(
            self._stream(events),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", **headers},
        )

    async def _compact(self, request: Request) -> Response:
        rec = await self._record(request)
        if (early := await self._before_answer(rec)) is not None:
            return early
        if (fail := self._pop_failure(rec)) is not None:
            return fail
        body = rec.json if isinstance(rec.json, dict) else {}
        # Keep the user messages (as Codex's own compaction does) and add a compaction item.
        kept = [
            it
            for it in body.get("input") or []
            if isinstance(it, dict)
            and it.get("type", "message") == "message"
            and it.get("role") == "user"
        ]
        output = [
            *kept,
            {
                "type": "compaction",
                "id": self._next_id("cmp_fake_"),
                "encrypted_content": COMPACTED_HISTORY,
            },
        ]
        rec.status, rec.kind = 200, "compact"
        return JSONResponse(
            {
                "id": self._next_id("resp_fake_"),
                "object": "response.compaction",
                "created_at": int(time.time()),
                "model": str(body.get("model") or "fake-model"),
                "output": output,
                "usage": self.usage.responses(),
            },
            headers=self._headers(),
        )

    # ------------------------------------------------------------------ chat
    def _chat_tool_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """With ``chat_tool_calls``: a shell tool call while the turn (messages after the
        last user message) holds fewer than ``tool_calls`` of this fake's tool results."""
        tools = body.get("tools")
        if not self.chat_tool_calls or not isinstance(tools, list) or not tools:
            return None
        msgs = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
        done = sum(1 for m in msgs[last_user + 1 :] if m.get("role") == "tool"
                   and str(m.get("tool_call_id", "")).startswith(CALL_ID_PREFIX))
        if done >= self.tool_calls:
            return None
        flat = [{"type": "function", **(t.get("function") or {})} for t in tools
                if isinstance(t, dict) and isinstance(t.get("function"), dict)]
        item = self._shell_call(flat)
        return {"id": item["call_id"], "type": "function",
                "function": {"name": item.get("name", "shell"),
                             "arguments": item.get("arguments", "{}")}}

    async def _chat(self, request: Request) -> Response:
        rec = await self._record(request)
        if (early := await self._before_answer(rec)) is not None:
            return early
        if (fail := self._pop_failure(rec)) is not None:
            return fail
        body = rec.json if isinstance(rec.json, dict) else {}
        model = str(body.get("model") or "fake-model")
        cid, created = self._next_id("chatcmpl-fake"), int(time.time())
        headers = self._headers()
        rec.status, rec.kind = 200, "chat"
        tool_call = self._chat_tool_call(body)
        if tool_call is not None:
            rec.kind = "chat_tool_call"
        if not body.get("stream") and tool_call is not None:
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                                 "message": {"role": "assistant", "content": None,
                                             "tool_calls": [tool_call]}}],
                    "usage": self.usage.chat(),
                },
                headers=headers,
            )
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "logprobs": None,
                            "message": {
                                "role": "assistant",
                                "content": self.answer_text,
                                "refusal": None,
                            },
                        }
                    ],
                    "usage": self.usage.chat(),
                },
                headers=headers,
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def chunk(choices: list[dict[str, Any]], **more: Any) -> bytes:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
                **more,
            }
            return f"data: {json.dumps(obj)}\n\n".encode()

        events = [
            chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
        ]
        if tool_call is not None:  # streamed like OpenAI: id and name first, then arguments
            fn = tool_call["function"]
            head = {"index": 0, "id": tool_call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": ""}}
            events.append(chunk([{"index": 0, "delta": {"tool_calls": [head]},
                                  "finish_reason": None}]))
            for piece in _split(fn["arguments"], 2):
                frag = {"index": 0, "function": {"arguments": piece}}
                events.append(chunk([{"index": 0, "delta": {"tool_calls": [frag]},
                                      "finish_reason": None}]))
            events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
        else:
            for piece in _split(self.answer_text, self.delta_count):
                events.append(
                    chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
            events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if include_usage:
            events.append(chunk([], usage=self.usage.chat()))
        events.append(b"data: [DONE]\n\n")
        return StreamingResponse(
            self._stream(events),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", **headers},
        )


def iter_sse(raw: bytes | str) -> Iterator[tuple[str | None, str]]:
    """Parse an SSE byte string into (event, data) pairs (a test helper)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        yield event, "\n".join(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fake OpenAI-compatible provider on 127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--answer", default=DEFAULT_ANSWER)
    p.add_argument("--delta-count", type=int, default=8)
    p.add_argument("--event-delay", type=float, default=0.0)
    p.add_argument("--tool-calls", type=int, default=1)
    args = p.parse_args(argv)
    fake = FakeProvider(
        args.port,
        answer_text=args.answer,
        delta_count=args.delta_count,
        event_delay=args.event_delay,
        tool_calls=args.tool_calls,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(fake.start(), flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

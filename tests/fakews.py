"""A fake provider that also speaks Codex's Responses-over-WebSocket transport.

``FakeWSProvider`` is ``FakeProvider`` (same knobs, same scripted tool loop, plain or
TLS) whose ``/v1/responses`` WebSocket upgrade is accepted instead of refused. Each
``response.create`` text frame is answered with the events the HTTP endpoint would
stream, one JSON event per text frame (DESIGN §4). Every message is recorded like an
HTTP request with method ``"WS"`` (``fake.ws_messages()``); the upgrade itself is
recorded with kind ``"websocket"`` and status 101 (``fake.ws_upgrades()``). Codex's
warm-up message (``generate: false``) gets an empty completed response with zero
usage, recorded with kind ``"prewarm"``. A ``fail_next`` entry becomes an error frame
``{"type": "error", "status": N, "error": {...}}``.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from fakeprovider import FakeProvider, RecordedRequest, iter_sse
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

__all__ = ["FakeWSProvider"]


class FakeWSProvider(FakeProvider):
    def ws_upgrades(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == "websocket"]

    def ws_messages(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "WS"]

    async def _websocket(self, websocket: WebSocket) -> None:
        if not websocket.url.path.rstrip("/").endswith("/responses"):
            await super()._websocket(websocket)
            return
        # the turn is read per message from client_metadata (the upgrade carries the first)
        headers = [(k, v) for k, v in websocket.headers.raw
                   if k.lower() != b"x-codex-turn-metadata"]
        rec = RecordedRequest(
            method="GET", path=websocket.url.path, query=websocket.url.query,
            headers=[(k.decode("latin-1").lower(), v.decode("latin-1"))
                     for k, v in websocket.headers.raw],
            body=b"", json=None, received_at=time.time(), received_mono=time.monotonic(),
            status=101, kind="websocket")
        with self._lock:
            self._requests.append(rec)
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                await self._message(websocket, headers, text)
        except WebSocketDisconnect:
            return

    async def _message(self, websocket: WebSocket, headers: list[tuple[bytes, bytes]],
                       text: str) -> None:
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or obj.get("type") != "response.create":
            return
        body = {k: v for k, v in obj.items() if k != "type"}
        raw = json.dumps(body).encode()
        scope = {"type": "http", "method": "WS", "path": websocket.url.path,
                 "raw_path": websocket.url.path.encode(), "query_string": b"",
                 "headers": headers, "http_version": "1.1", "scheme": "http"}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": raw, "more_body": False}

        request = Request(scope, receive)
        if body.get("generate") is False:
            rec = await self._record(request)
            rec.status, rec.kind = 200, "prewarm"
            for event in self._prewarm(str(body.get("model") or "fake-model")):
                await websocket.send_text(json.dumps(event))
            return
        response = await self._responses(request)
        if isinstance(response, StreamingResponse):
            async for chunk in response.body_iterator:
                raw_chunk = chunk if isinstance(chunk, bytes) else str(chunk).encode()
                for _, data in iter_sse(raw_chunk):
                    await websocket.send_text(data)
            return
        err = json.loads(bytes(response.body))
        await websocket.send_text(json.dumps({"type": "error", "status": response.status_code,
                                              **err}))

    def _prewarm(self, model: str) -> list[dict[str, Any]]:
        resp = self._response_obj(self._next_id("resp_fake_"), model, "in_progress", [], None)
        seq = itertools.count()
        zero = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 0}
        return [{"type": "response.created", "sequence_number": next(seq), "response": resp},
                {"type": "response.completed", "sequence_number": next(seq),
                 "response": {**resp, "status": "completed", "usage": zero}}]

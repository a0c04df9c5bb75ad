"""Codex's Responses-over-WebSocket transport (DESIGN §4), as pure frame functions.

The connection is a ``GET {base_url}/responses`` upgrade; each client text frame
``{"type": "response.create", ...}`` is one model call carrying the Responses body
with only the *new* input items (``previous_response_id`` names the rest); each
server text frame is one Responses stream event, the JSON an SSE ``data:`` line
would carry. So the SSE machinery is reused: a server frame is fed to the stream
reader or output guard as one ``data:`` event (``as_sse``) and a guard's SSE output
is split back into frames (``sse_frames``). No mitmproxy import here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .openai_responses import RequestInfo, load_object, request_info
from .sse import SSEScanner

WS_API: Final = "openai.responses.ws"
CREATE: Final = "response.create"
TURN_METADATA: Final = "x-codex-turn-metadata"


@dataclass(slots=True)
class CreateFrame:
    """One ``response.create`` message: a model call."""

    obj: dict[str, Any]
    info: RequestInfo
    client_metadata: dict[str, Any]

    @property
    def prewarm(self) -> bool:
        """Codex's connection warm-up (``generate: false``): no output is asked for."""
        return self.obj.get("generate") is False

    def header_view(self, headers: Callable[[str], str | None]) -> Callable[[str], str | None]:
        """Header lookup for ``codex_headers.session_and_turn``: the upgrade request's
        headers, except the turn metadata, which Codex sends per message (the upgrade
        carries the first call's, often the prewarm's empty turn id)."""
        meta = self.client_metadata.get(TURN_METADATA)

        def get(name: str) -> str | None:
            if name == TURN_METADATA and isinstance(meta, str):
                return meta
            return headers(name)

        return get


def parse_client_frame(data: bytes) -> CreateFrame | None:
    """A client frame: a ``response.create`` (BadRequest if malformed), else None."""
    obj = load_object(data)
    if obj.get("type") != CREATE:
        return None  # e.g. response.processed acknowledgements: not a model call
    info = request_info(obj)
    meta = obj.get("client_metadata")
    return CreateFrame(obj, info, meta if isinstance(meta, dict) else {})


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


_TYPE = re.compile(rb'\A\s*\{\s*"type"\s*:\s*"([A-Za-z0-9_.]{1,80})"')


def as_sse(frame: bytes) -> bytes:
    """A server frame as one SSE event, named by its ``type`` when that is the first
    key (as OpenAI and Codex write it), so the stream reader skips text deltas
    without parsing them. JSON has no raw newline inside strings, so newlines
    between tokens (pretty-printed JSON) can become spaces."""
    if b"\n" in frame or b"\r" in frame:
        frame = frame.replace(b"\r", b" ").replace(b"\n", b" ")
    m = _TYPE.match(frame)
    if m is None:
        return b"data: " + frame + b"\n\n"
    return b"event: " + m.group(1) + b"\ndata: " + frame + b"\n\n"


class FrameSplitter:
    """Split an SSE byte stream (an output guard's output) back into one frame per event."""

    __slots__ = ("_scanner",)

    def __init__(self) -> None:
        self._scanner = SSEScanner()

    def feed(self, sse: bytes) -> list[bytes]:
        return [data for _, data in self._scanner.feed(sse)] if sse else []

    def close(self) -> list[bytes]:
        return [data for _, data in self._scanner.close()]


def error_frame(message: str, *, type: str, code: str, status: int,
                param: str | None = None, retry_after: int | None = None) -> bytes:
    """A refusal as Codex reads it on this transport.

    Codex 0.169 maps ``{"type": "error", "status": N, "error": {...}}`` to an HTTP
    error with status N (``headers`` as its response headers) and, for 400, prints
    the frame with our message and does not retry. Without ``status`` it waits for
    more frames instead (tests/test_websocket.py records the probe).
    """
    frame: dict[str, Any] = {
        "type": "error", "status": status,
        "error": {"message": message, "type": type, "code": code, "param": param},
    }
    if retry_after is not None:
        frame["headers"] = {"retry-after": str(int(retry_after))}
    return encode(frame)

"""Codex's Responses-over-WebSocket transport: every message is a model call (DESIGN §4).

The upgrade (``GET /v1/responses``) runs through the HTTP chain like a POST:
classify names it ``openai.responses.ws``, authenticate checks the gateway token,
authorize the API scope, and route picks the provider once (a connection cannot
fail over) and swaps in the vaulted key; a refusal there is the usual HTTP error.
Then, per client ``response.create`` frame, a ``Call`` of its own (new request id;
principal, session and provider from the upgrade) gets what the chain does to a
body: size cap, model scope, guardrails on its input items (Codex sends only the
new ones), the provider's model name, budgets and rate limits. The server's frames
(one Responses event each) are metered by the Responses stream reader, guarded by
the output guard, and the terminal event settles the call (one ledger row) and
traces it. A refusal drops the client's frame and answers with an error frame
Codex shows; the connection stays open for the next message.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mitmproxy import ctx, http
from mitmproxy.websocket import WebSocketMessage

from .admit import reply_for
from .authorize import scope_refusal
from .budgets import Budgets
from .call import METADATA_KEY, Call
from .guard_input import GuardInput
from .guard_output import BLOCKED, OutputWrapper
from .policy import Provider
from .protocols import responses_ws as ws
from .protocols.codex_headers import session_and_turn
from .protocols.openai_responses import ResponsesStreamReader
from .protocols.summary import BadRequest
from .settle import Settle
from .telemetry import Telemetry

log = logging.getLogger("agent_egress.websocket")

STATE_KEY = "agent_egress.websocket"


@dataclass(slots=True)
class _Open:
    """The model call whose response frames are arriving."""

    call: Call
    reader: ResponsesStreamReader
    guard: OutputWrapper | None
    frames: ws.FrameSplitter | None
    blocked: bool = False


@dataclass(slots=True)
class _Connection:
    upgrade: Call
    provider: Provider
    open: _Open | None = None


class WebSocket:
    def __init__(self, providers: dict[str, Provider], max_body_bytes: int, settle: Settle,
                 guard: GuardInput, budgets: Budgets) -> None:
        self.providers = providers
        self.max_body_bytes = max_body_bytes
        self.settle = settle
        self.guard = guard
        self.budgets = budgets
        self.telemetry: Telemetry | None = None  # set once telemetry is built (gateway.py)

    # --- the upgrade ---------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if (call is not None and call.api == ws.WS_API and call.refused is None
                and flow.response is not None and flow.response.status_code == 101):
            call.settled = True  # the upgrade itself is no model call: its messages are

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if (call is None or call.api != ws.WS_API or call.principal is None
                or call.provider is None):
            return
        flow.metadata[STATE_KEY] = _Connection(call, self.providers[call.provider])

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        conn: _Connection | None = flow.metadata.pop(STATE_KEY, None)
        if conn is not None and conn.open is not None:
            conn.open.call.error = conn.open.call.error or "websocket closed mid-response"
            self._finish(flow, conn)

    # --- messages ------------------------------------------------------------------
    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        conn: _Connection | None = flow.metadata.get(STATE_KEY)
        if conn is None or flow.websocket is None:
            return
        messages = flow.websocket.messages
        msg = messages[-1]
        if len(messages) > 1:
            del messages[:-1]  # mitmproxy keeps every message of a flow: keep only this one
        if msg.injected:
            return
        if msg.from_client:
            await self._client(flow, conn, msg)
        elif conn.open is not None:
            self._server(flow, conn, conn.open, msg)

    async def _client(self, flow: http.HTTPFlow, conn: _Connection,
                      msg: WebSocketMessage) -> None:
        started = time.perf_counter()
        data = msg.content
        up = conn.upgrade
        call = Call(api=ws.WS_API, agent=up.agent, principal=up.principal, stream=True,
                    provider=up.provider, upstream_host=up.upstream_host,
                    upstream_port=up.upstream_port, tags=dict(up.tags),
                    traceparent=up.traceparent, request_bytes=len(data))
        if len(data) > self.max_body_bytes:
            self._refuse(flow, msg, call, 400, f"message of {len(data)} bytes is over the"
                         f" gateway's limit of {self.max_body_bytes} bytes"
                         " (limits.max_body_bytes)", "invalid_request_error", "body_too_large")
            return
        try:
            frame = ws.parse_client_frame(data)
        except BadRequest as e:
            self._refuse(flow, msg, call, 400, e.message, "invalid_request_error",
                         e.code or "invalid_request", e.param)
            return
        if frame is None:
            return  # not a model call (e.g. an acknowledgement): pass it on
        if conn.open is not None:  # a new request before the last response ended
            conn.open.call.error = conn.open.call.error or "superseded by the next request"
            self._finish(flow, conn)
        info = frame.info
        call.requested_model = info.model[:128]
        call.tool_output_ids = info.tool_output_ids
        call.session_id, call.turn_id = session_and_turn(
            frame.header_view(flow.request.headers.get), info.prompt_cache_key,
            info.client_session_id)
        assert call.principal is not None
        denied = scope_refusal(call.principal, call.requested_model, call.api)
        if denied is not None:
            self._refuse(flow, msg, call, 400, denied[0], "permission_denied", denied[1])
            return
        changed = False
        if self.guard.guardrails is not None:
            blocked, changed = await self.guard.check(flow, call, frame.obj, len(data))
            if blocked is not None:
                rule, direction, message, record = blocked
                if record and self.guard.recorder is not None:
                    self.guard.recorder.hits(flow, call, direction, [(rule, "block", 1)])
                self._refuse(flow, msg, call, 400, message, "invalid_request_error", BLOCKED,
                             rule)
                return
        model = conn.provider.model_for(info.model)
        if model != info.model:
            frame.obj["model"] = model
            changed = True
        # Codex's warm-up asks for no output: metered, but not held to budgets or rates,
        # so a spent budget is refused once, on the turn's call (the warm-up's refusal
        # would only make Codex reconnect)
        refusal = None if frame.prewarm else await self.budgets.admit(call)
        if refusal is not None:
            r = reply_for(refusal)
            self._refuse(flow, msg, call, r.status, r.message, r.type, r.code,
                         retry_after=r.retry_after)
            return
        if changed:
            msg.content = ws.encode(frame.obj)
        wrapper = call.output_guard if isinstance(call.output_guard, OutputWrapper) else None
        reader = ResponsesStreamReader()
        call.reader = reader
        conn.open = _Open(call, reader, wrapper, None if wrapper is None else ws.FrameSplitter())
        call.overhead_s += time.perf_counter() - started

    def _server(self, flow: http.HTTPFlow, conn: _Connection, o: _Open,
                msg: WebSocketMessage) -> None:
        started = time.perf_counter()
        call = o.call
        data = msg.content
        if call.first_byte_at is None:
            call.first_byte_at = time.monotonic()
            call.status_code = 200  # the provider answered this message
        call.response_bytes += len(data)
        event = ws.as_sse(data)
        o.reader.feed(event)
        terminal = o.reader.summary.status is not None
        if o.guard is not None and o.frames is not None:
            # the guard decides what the client gets; injected frames keep their order
            msg.drop()  # type: ignore[no-untyped-call]
            if not o.blocked:
                guard = o.guard.guard
                out = guard.feed(event)
                if terminal and guard.blocked is None:
                    out += guard.close()
                for frame in o.frames.feed(out):
                    self._send(flow, frame)
                if guard.blocked is not None:
                    o.blocked = True  # the rest of this response is dropped, but metered
                    o.guard.recorder.stream_blocked()
        call.overhead_s += time.perf_counter() - started
        if terminal:
            self._finish(flow, conn)

    def _finish(self, flow: http.HTTPFlow, conn: _Connection) -> None:
        o, conn.open = conn.open, None
        if o is None:
            return
        if o.guard is not None:
            o.guard.record(flow)
        self.settle.settle_call(o.call)
        if self.telemetry is not None:
            self.telemetry.record(o.call)

    # --- refusals ------------------------------------------------------------------
    def _refuse(self, flow: http.HTTPFlow, msg: WebSocketMessage, call: Call, status: int,
                message: str, type: str, code: str, param: str | None = None,
                retry_after: int | None = None) -> None:
        """Drop the client's frame and answer it with an error frame Codex shows (for
        400 at once, without retrying: see tests/test_websocket.py)."""
        msg.drop()  # type: ignore[no-untyped-call]
        self._send(flow, ws.error_frame(
            f"agent-egress: {message} (request id {call.request_id})", type=type, code=code,
            status=status, param=param, retry_after=retry_after))
        call.refused = code
        call.status_code = status
        log.info("refused websocket message %s: %s", call.request_id, code)
        self.settle.refused(call, flow.client_conn.peername)

    @staticmethod
    def _send(flow: http.HTTPFlow, frame: bytes) -> None:
        ctx.master.commands.call("inject.websocket", flow, True, frame, True)

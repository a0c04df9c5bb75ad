"""Step 8: hand each settled call to the session tracer, after the fact.

Runs after settle (it reads the ledger row for cost and outcome). The hook only
builds a small record and puts it on a bounded queue; one task drains the queue
in order: content capture (opt-in: redaction in a worker thread), placement in
shared session state (Redis, when configured), then span building (tens of
microseconds). Export happens on the SDK's own thread. So a slow Redis, a slow
redaction or a dead collector drops telemetry (counted), never stalls a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Final

from mitmproxy import http

from agent_egress.exporters.otel import COMPACT_API, CallTrace, SessionTracer
from agent_egress.exporters.session_redis import SharedSessions

from .call import METADATA_KEY, Call
from .capture import ContentCapture
from .policy import Provider

log = logging.getLogger("agent_egress.telemetry")

_MAX_CAPTURED_RESPONSE: Final = 1024 * 1024
"""Bytes of a response kept for content capture (a Codex turn's stream is ~10-50 KB)."""


def call_trace(call: Call, provider: Provider) -> CallTrace | None:
    """The tracer's view of a settled call (None if it never reached a provider)."""
    row = call.row
    if row is None:
        return None
    summary = call.summary
    first_byte_ns = (None if call.first_byte_at is None
                     else call.started_ns + int((call.first_byte_at - call.started) * 1e9))
    return CallTrace(
        request_id=call.request_id,
        session_id=call.session_id,
        turn_id=call.turn_id,
        start_ns=call.started_ns,
        first_byte_ns=first_byte_ns,
        end_ns=call.started_ns + row.duration_ms * 1_000_000,
        api=call.api,
        provider=provider.name,
        provider_kind=provider.kind,
        server_address=call.upstream_host,
        server_port=call.upstream_port,
        request_model=call.requested_model,
        response_model=row.served_model,
        response_id=summary.response_id if summary is not None else None,
        finish_reasons=tuple(summary.finish_reasons) if summary is not None else (),
        usage=summary.usage if summary is not None else None,
        usage_estimated=row.usage_estimated,
        cost_usd=row.cost_usd,
        org=row.org,
        team=row.team,
        user=row.user,
        key_id=row.key_id,
        status_code=row.status_code,
        outcome=row.outcome,
        error_type=row.error_code,
        tool_calls=tuple(summary.tool_calls) if summary is not None else (),
        tool_output_ids=call.tool_output_ids,
        traceparent=call.traceparent,
        tags=call.tags,
        events=tuple(call.route_events),  # failover (issue 8)
    )


@dataclasses.dataclass(slots=True)
class _Job:
    trace: CallTrace
    request_body: bytes | None = None
    """Set only when content is captured for this call."""
    response: bytes = b""
    streamed: bool = False


def _capture_tap(buf: bytearray, inner: Callable[[bytes], Any]
                 ) -> Callable[[bytes], bytes | list[bytes]]:
    """Wrap the stream callable: keep (bounded) what the client is sent. Opt-in only."""
    def on_chunk(chunk: bytes) -> bytes | list[bytes]:
        out = inner(chunk)
        if len(buf) < _MAX_CAPTURED_RESPONSE:
            buf.extend(out if isinstance(out, bytes) else b"".join(out))
        return out  # type: ignore[no-any-return]

    return on_chunk


class Telemetry:
    def __init__(self, tracer: SessionTracer, providers: dict[str, Provider], *,
                 capture: ContentCapture | None = None, shared: SharedSessions | None = None,
                 max_queue: int = 10_000, sweep_seconds: float = 30.0) -> None:
        self.tracer = tracer
        self.providers = providers
        self.capture = capture
        self.shared = shared
        self.dropped = 0
        """Calls not traced because the queue was full (also counted by the tracer)."""
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(max_queue)
        self._sweep_seconds = sweep_seconds
        self._tasks: list[asyncio.Task[None]] = []

    # --- hooks (on the event loop: no waiting) ------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if (self.capture is None or call is None or call.principal is None
                or flow.response is None or call.refused is not None):
            return
        p = call.principal
        if not self.capture.enabled_for(call.api, p.org, p.team):
            return
        call.captured_output = bytearray()
        stream = flow.response.stream
        if callable(stream):  # else the body is read whole in ``response``
            flow.response.stream = _capture_tap(call.captured_output, stream)

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def _record(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is not None:
            self.record(call, flow)

    def record(self, call: Call, flow: http.HTTPFlow | None = None) -> None:
        """Queue a settled call for tracing, once. Without a flow (a WebSocket message,
        addon/websocket.py) there is no content to capture."""
        if call.traced or call.row is None or call.provider is None:
            return
        call.traced = True
        trace = call_trace(call, self.providers[call.provider])
        if trace is None:
            return
        job = _Job(trace)
        if call.captured_output is not None and flow is not None:
            job.request_body = flow.request.get_content(strict=False) or b""
            resp = flow.response
            job.streamed = resp is not None and callable(resp.stream)
            if job.streamed:
                job.response = bytes(call.captured_output)
            elif resp is not None:
                with contextlib.suppress(ValueError):
                    job.response = (resp.content or b"")[:_MAX_CAPTURED_RESPONSE]
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1
            self.tracer.lost()

    # --- the telemetry task ---------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="telemetry"),
                       loop.create_task(self._sweep(), name="telemetry-sweep")]

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._handle(job)
            except Exception:
                self.tracer.lost()
                log.warning("tracing call %s failed", job.trace.request_id, exc_info=True)
            finally:
                self._queue.task_done()

    async def _handle(self, job: _Job) -> None:
        t = job.trace
        if job.request_body is not None and self.capture is not None:
            got = await asyncio.to_thread(self.capture.build, t.api, t.org, t.team, t.key_id,
                                          job.request_body, job.response, job.streamed)
            t = dataclasses.replace(t, content=got)
        if self.shared is not None and t.session_id:
            u = t.usage
            placement = await self.shared.place(
                session_id=t.session_id, request_id=t.request_id, turn_id=t.turn_id,
                compact=t.api == COMPACT_API, start_ns=t.start_ns, end_ns=t.end_ns,
                outcome=t.outcome, org=t.org, team=t.team, user=t.user, cost_usd=t.cost_usd,
                tokens=(0, 0, 0, 0, 0) if u is None else (
                    u.input_tokens, u.cached_input_tokens, u.cache_write_tokens,
                    u.output_tokens, u.reasoning_tokens),
                tool_output_ids=t.tool_output_ids, tool_calls=t.tool_calls)
            if placement is not None:
                self.tracer.record_placed(t, placement)
                return
        self.tracer.record(t)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_seconds)
            try:
                await self.sweep()
            except Exception:
                log.warning("ending idle turns failed", exc_info=True)

    async def sweep(self) -> None:
        """End idle sessions' turns: in memory, and in Redis if no replica saw them since."""
        if self.shared is None:
            self.tracer.sweep()
            return
        cutoff = self.tracer.idle_cutoff_ns()
        for sid in self.tracer.forget_idle():
            ended = await self.shared.end(sid, "idle", idle_before_ns=cutoff)
            if ended:
                self.tracer.emit_ended(ended)

    async def close(self, wait_seconds: float = 5.0) -> None:
        """Trace what is queued (bounded), end this replica's open turns in Redis, stop."""
        if self._tasks:
            try:
                await asyncio.wait_for(self._queue.join(), wait_seconds)
            except TimeoutError:
                log.warning("telemetry: %d calls not traced at shutdown", self._queue.qsize())
                self.tracer.lost(self._queue.qsize())
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.shared is not None:
            for sid in self.tracer.session_ids():
                ended = await self.shared.end(sid, "shutdown")
                if ended:
                    self.tracer.emit_ended(ended)
            await self.shared.close()

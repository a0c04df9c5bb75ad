"""Guardrails on model output, and the one place hits are recorded.

``OutputWrapper`` wraps the stream tap's callable: the tap reads the
provider's bytes (usage), the guard rewrites what the client gets. A block
mid-stream ends the client's response with an error event and stops the
upstream (``mitm_internals.close_upstream``). ``GuardOutput`` handles
non-streamed bodies in the ``response`` hook (after settle has read usage).

Every hit is a metric (rule, action, direction, team), an audit event and a
span event on the call's chat span; never the matched text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from mitmproxy import http

from agent_egress.exporters.audit import AsyncAuditWriter, AuditEvent
from agent_egress.exporters.prometheus import Metrics

from . import mitm_internals
from .call import METADATA_KEY, Call
from .guardrails.anthropic_stream import AnthropicOutputGuard
from .guardrails.engine import Engine
from .guardrails.findings import Finding
from .guardrails.stream import OutputGuard, guard_body
from .overhead import timed
from .protocols import anthropic_messages
from .protocols.errors import openai_error_body

BLOCKED = "guardrail_blocked"


class Recorder:
    """Metrics, audit and span events for guardrail hits."""

    def __init__(self, metrics: Metrics, audit: AsyncAuditWriter | None) -> None:
        self.metrics = metrics
        self.audit = audit

    def hits(self, flow: http.HTTPFlow, call: Call, direction: str,
             counts: Iterable[tuple[str, str, int]]) -> None:
        """Record (rule, action, count) hits of one direction on this call."""
        p = call.principal
        team = p.team if p is not None else "unknown"
        peer = flow.client_conn.peername
        for rule, action, n in counts:
            self.metrics.guardrail_hits.labels(rule, action, direction, team).inc(n)
            call.guard_hits.append((rule, action, direction))
            call.route_events.append(("agent_egress.guardrail", time.time_ns(),
                                      {"rule": rule, "action": action,
                                       "direction": direction, "count": str(n)}))
            if self.audit is not None:
                self.audit.submit(AuditEvent(
                    action="guardrail.hit",
                    actor=p.id if p is not None else "anonymous",
                    outcome="refused" if action == "block" else "ok",
                    target=call.requested_model,
                    source=f"{peer[0]}:{peer[1]}" if peer else None,
                    request_id=call.request_id,
                    detail={"rule": rule, "action": action, "direction": direction,
                            "count": n, "org": p.org if p else None, "team": team},
                ))

    def stream_blocked(self) -> None:
        """A block after the provider answered: settle does not see it as a refusal."""
        self.metrics.refusals.labels(BLOCKED).inc()


def block_message(call: Call, finding: Finding) -> str:
    return (f"agent-egress: the model's output was stopped by guardrail rule {finding.rule}"
            f" (action block); ask again without it or ask your platform team about the"
            f" policy (request id {call.request_id})")


class OutputWrapper:
    """Per call: wraps the stream tap's callable with the output guard."""

    def __init__(self, call: Call, engine: Engine, holdback: int, recorder: Recorder) -> None:
        self.call = call
        self.recorder = recorder

        def scan(text: str) -> list[Finding]:
            return engine.scan(text, "model_output", "assistant")

        self.scan = scan
        self.guard: OutputGuard | AnthropicOutputGuard = OutputGuard(
            call.api, scan, holdback, lambda f: block_message(call, f))
        if call.api == "anthropic.messages":  # anthropic (issue 13)
            self.guard = AnthropicOutputGuard(scan, holdback, lambda f: block_message(call, f))

    def wrap(self, flow: Any, inner: Callable[[bytes], Any]
             ) -> Callable[[bytes], bytes | list[bytes]]:
        guard = self.guard
        call = self.call
        done = False

        def on_chunk(chunk: bytes) -> bytes | list[bytes]:
            nonlocal done
            # inner: the stream tap (usage, TTFT from the provider's bytes) and any
            # translation after it; the guard sees exactly what the client would.
            got = inner(chunk)
            data = got if isinstance(got, bytes) else b"".join(got)
            if done:
                return [] if chunk else b""
            started = time.perf_counter()
            out = guard.feed(data)
            if not chunk and guard.blocked is None:
                out += guard.close()
            if guard.blocked is not None:
                done = True
                out = mitm_internals.close_upstream(flow, out)
                self.record(flow)
                self.recorder.stream_blocked()
            elif not chunk:
                done = True
                self.record(flow)
            call.overhead_s += time.perf_counter() - started
            if chunk and not out:
                return []  # b"" here would end a chunked body early
            return out

        return on_chunk

    def record(self, flow: Any) -> None:
        """Record this call's output-guard hits (metrics, audit, span events)."""
        self.recorder.hits(flow, self.call, "model_output",
                           [(r, a, n) for (r, a), n in self.guard.hits.items()])


class GuardOutput:
    """Wraps streamed responses with the output guard, and guards non-streamed bodies.

    Placed after the failover tap (so it wraps any translation: the guard sees the
    client's wire format) and after settle (which has read usage from the body).
    """

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @timed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if (call is None or call.output_guard is None or call.refused is not None
                or flow.response is None or flow.response.status_code != 200):
            return
        stream = flow.response.stream
        if callable(stream):
            flow.response.stream = call.output_guard.wrap(flow, stream)

    @timed
    def response(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if (call is None or call.refused is not None or flow.response is None
                or call.output_guard is None or call.reader is not None
                or flow.response.status_code >= 400):
            return
        wrapper = call.output_guard
        if not isinstance(wrapper, OutputWrapper):
            return
        body = flow.response.content or b""
        new, findings = guard_body(call.api, body, wrapper.scan)
        counts: dict[tuple[str, str], int] = {}
        for f in findings:
            counts[(f.rule, f.action)] = counts.get((f.rule, f.action), 0) + 1
        self.recorder.hits(flow, call, "model_output",
                           [(r, a, n) for (r, a), n in counts.items()])
        blocking = next((f for f in findings if f.action == "block"), None)
        if blocking is not None:
            self.recorder.stream_blocked()
            body = (anthropic_messages.error_body(  # anthropic (issue 13)
                block_message(call, blocking), type="invalid_request_error")
                if call.api == "anthropic.messages" else
                openai_error_body(block_message(call, blocking), type="invalid_request_error",
                                  code=BLOCKED))
            flow.response = http.Response.make(
                400, body,
                {"content-type": "application/json", "x-egress-request-id": call.request_id,
                 "x-egress-refused-by": BLOCKED, "x-should-retry": "false"})
        elif new is not None:
            flow.response.content = new

"""Step 8: hand each settled call to the session tracer, after the fact.

Runs after settle (it reads the ledger row for cost and outcome). Span building
costs tens of microseconds on the loop; export happens on the SDK's own thread,
so a slow or dead collector drops spans instead of stalling streams.
"""

from __future__ import annotations

from mitmproxy import http

from agent_egress.exporters.otel import CallTrace, SessionTracer

from .call import METADATA_KEY, Call
from .policy import Provider


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


class Telemetry:
    def __init__(self, tracer: SessionTracer, providers: dict[str, Provider]) -> None:
        self.tracer = tracer
        self.providers = providers

    def _record(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or call.traced or call.row is None or call.provider is None:
            return
        call.traced = True
        trace = call_trace(call, self.providers[call.provider])
        if trace is not None:
            self.tracer.record(trace)

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

"""Step 7: turn a finished Call into cost, a ledger row and metrics.

Runs on `response` (also after a streamed body ends) and on `error` (upstream
unreachable, stream cut, client gone). A call that reached a provider always
gets exactly one row; a stream that ended without usage is charged an estimate
and flagged, never $0.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Any

from mitmproxy import http

from agent_egress.exporters.audit import AsyncAuditWriter, AuditEvent
from agent_egress.exporters.otel import SessionTracer
from agent_egress.exporters.prometheus import Metrics

from . import mitm_internals
from .budgets import Budgets
from .call import METADATA_KEY, Call
from .ledger import LedgerWriter
from .policy import Provider
from .pricing import ModelPrice, price_call
from .protocols import anthropic_messages, openai_chat, openai_responses
from .protocols.errors import error_body_for
from .protocols.usage import Usage
from .store.base import LedgerRow

log = logging.getLogger("agent_egress.settle")


def estimate_usage(call: Call) -> Usage:
    """Conservative stand-in when a stream ends before the provider reports usage."""
    return Usage(
        input_tokens=openai_responses.estimate_tokens(call.request_bytes),
        output_tokens=openai_responses.estimate_tokens(call.response_bytes),
    )


def outcome_of(call: Call, estimated: bool) -> str:
    if call.failover_reason is not None:
        return "failover"  # the client was told to retry; the retry went elsewhere
    if call.error == "budget_cutoff":
        return "budget_cutoff"
    if call.error is not None and not (call.summary is not None and call.summary.finished):
        return "upstream_unreachable" if call.status_code is None else "stream_error"
    if call.status_code is None or call.status_code >= 400:
        return "upstream_error"
    summary = call.summary
    if summary is not None and summary.status == "failed":
        return "response_failed"
    if estimated:
        return "stream_cut"
    return "ok"


class Settle:
    def __init__(self, providers: dict[str, Provider], writer: LedgerWriter,
                 metrics: Metrics, exemplars: bool = False,
                 audit: AsyncAuditWriter | None = None, budgets: Budgets | None = None) -> None:
        self.providers = providers
        self.prices: dict[str, dict[str, ModelPrice]] = {
            name: {m: o.to_model_price() for m, o in p.prices.items()}
            for name, p in providers.items()
        }
        self.writer = writer
        self.metrics = metrics
        self.exemplars = exemplars
        self.audit = audit
        """Attach the session's trace id to latency and cost samples (when traces are on)."""
        self.budgets = budgets
        self._warned: set[tuple[str, str]] = set()
        self.max_unpriced_labels = 100  # model names come from responses: bound the series
        self._children: dict[tuple[int, tuple[object, ...]], Any] = {}
        """Labelled series by (metric, label values): ``labels()`` validates and locks on
        every call. Holds what the registry holds, so it adds no series."""

    def _child(self, metric: Any, *values: object) -> Any:
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def response(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None:
            return
        if call.refused is not None:
            self.refused(call, flow.client_conn.peername)
            return
        if call.summary is None and call.reader is None and flow.response is not None:
            body = flow.response.raw_content or b""
            call.response_bytes = len(body)
            reader_mod = openai_chat if call.api == "openai.chat" else openai_responses
            read = (anthropic_messages.read_body if call.api == "anthropic.messages"
                    else reader_mod.read_body)  # anthropic (issue 13)
            try:
                call.summary = read(flow.response.content or b"")
            except ValueError:
                call.summary = read(b"")
        self._settle(call)
        if self.budgets is not None:
            self.budgets.finish(call, call.row)  # no-op when settled with a row above

    def refused(self, call: Call, peer: tuple[str, int] | None) -> None:
        """A call the gateway refused: metric, reservation back, audit event."""
        self.metrics.refusals.labels(call.refused or "unknown").inc()
        call.settled = True
        if self.budgets is not None:
            self.budgets.finish(call, None)  # refused after admit: give the reservation back
        if self.audit is not None:
            self.audit.submit(AuditEvent(
                action="request.refused",
                actor=call.principal.id if call.principal else "anonymous",
                outcome="refused",
                target=call.requested_model,
                source=f"{peer[0]}:{peer[1]}" if peer else None,
                request_id=call.request_id,
                detail={"rule": call.refused, "status": call.status_code,
                        "api": call.api, "agent": call.agent},
            ))

    def settle_call(self, call: Call) -> None:
        """Settle a call with no flow of its own (a WebSocket message): ledger row,
        metrics, budget settlement; exactly once."""
        self._settle(call)
        if self.budgets is not None:
            self.budgets.finish(call, call.row)

    def error(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or call.settled:
            return
        if call.refused is not None:  # refused while mitmproxy failed the flow (body cap)
            self.refused(call, flow.client_conn.peername)
            return
        # keep a cause the gateway recorded itself (budget cut-off, failover) over
        # mitmproxy's generic message for the connection it then closed
        call.error = call.error or (flow.error.msg if flow.error else "unknown error")
        if call.provider is not None and call.status_code is None and flow.response is None:
            # Upstream never answered: mitmproxy will now write its error page;
            # hand it our JSON body with this call's request id.
            message = (f"agent-egress: provider {call.provider!r} could not be reached"
                       f" ({call.error}); retry shortly (request id {call.request_id})")
            mitm_internals.pending_error.set((call.request_id, error_body_for(
                call.api, message, type="server_error", code="upstream_unreachable")))
        if call.refused is None and call.provider is not None:
            self._settle(call)
        if self.budgets is not None:
            self.budgets.finish(call, call.row)  # no row: the call never reached a provider

    def _settle(self, call: Call) -> None:
        if call.settled or call.principal is None or call.provider is None:
            return
        call.settled = True
        now = time.monotonic()
        if call.reader is not None:
            call.reader.close()
            call.summary = call.reader.summary
        summary = call.summary
        usage = summary.usage if summary is not None else None
        ok_status = call.status_code is not None and call.status_code < 400
        estimated = usage is None and ok_status
        if usage is None:
            usage = estimate_usage(call) if estimated else Usage()
        served = (summary.model if summary is not None else None) or call.requested_model
        provider = self.providers[call.provider]
        model_for_price = served or ""
        cost: Decimal | None
        if usage.total_tokens == 0:
            cost, source = Decimal(0), "no_usage"
        else:
            priced = price_call(usage, model_for_price, provider.pricing_provider_id,
                                self.prices[call.provider])
            cost, source = priced.usd, priced.source
        outcome = outcome_of(call, estimated)
        p = call.principal
        row = LedgerRow(
            ts=call.started_wall,
            request_id=call.request_id,
            org=p.org, team=p.team, user=p.user, key_id=p.id,
            session_id=call.session_id, turn_id=call.turn_id,
            api=call.api,
            requested_model=call.requested_model,
            served_model=served[:128] if served else None,
            provider=call.provider,
            status_code=call.status_code,
            input_tokens=usage.input_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            output_tokens=usage.output_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost_usd=cost,
            price_source=source,
            usage_estimated=estimated,
            ttfb_ms=None if call.first_byte_at is None
            else int((call.first_byte_at - call.started) * 1000),
            duration_ms=int((now - call.started) * 1000),
            outcome=outcome,
            tags=call.tags or None,
            agent=call.agent,
            billing=call.billing,  # ChatGPT-login Codex (issue 9): subscription
            error_code=(summary.error_code if summary is not None else None)
            or (outcome if outcome != "ok" else None),
        )
        call.row = row
        self.writer.submit(row)
        if self.budgets is not None:
            self.budgets.finish(call, row)
        self._observe(call, row, usage, now)

    def _observe(self, call: Call, row: LedgerRow, usage: Usage, now: float) -> None:
        m = self.metrics
        model = row.served_model or "unknown"
        if row.cost_usd is None:
            if (row.provider, model) not in self._warned:
                self._warned.add((row.provider, model))
                log.warning("model %r on provider %r has no price: calls are recorded as"
                            " unpriced; add providers[].prices to the config", model,
                            row.provider)
            label = model[:64] if len(self._warned) <= self.max_unpriced_labels else "other"
            m.unpriced.labels(row.provider, label).inc()
        label_model = model[:64] if row.price_source != "unpriced" else "other"
        ex = ({"trace_id": SessionTracer.trace_id_for(call.session_id)}
              if self.exemplars and call.session_id else None)
        self._child(m.calls, row.org, row.team, row.provider, label_model, row.api, call.agent,
                    row.outcome).inc()
        self._child(m.overhead, row.api).observe(call.overhead_s)
        if row.cost_usd and row.billing == "gateway":  # budget burn alerts read this counter:
            # a subscription row's USD is an equivalent nobody paid the gateway (issue 9)
            self._child(m.cost, row.org, row.team, row.provider, label_model, call.agent).inc(
                float(row.cost_usd), exemplar=ex)
        for kind, n in (("input", usage.input_tokens - usage.cached_input_tokens),
                        ("cached_input", usage.cached_input_tokens),
                        ("cache_write", usage.cache_write_tokens),
                        ("output", usage.output_tokens - usage.reasoning_tokens),
                        ("reasoning", usage.reasoning_tokens)):
            if n:
                self._child(m.tokens, row.org, row.team, row.provider, label_model, kind).inc(n)
        if row.usage_estimated:
            m.estimated.labels(row.provider).inc()
        if call.first_byte_at is not None:
            self._child(m.ttfb, row.provider, label_model).observe(
                call.first_byte_at - call.started, exemplar=ex)
        self._child(m.duration, row.provider, label_model, row.api).observe(
            now - call.started, exemplar=ex)

"""OpenTelemetry traces of agent sessions (DESIGN §7), built after each call settles.

One trace per agent session (trace id hashed from the session id, so replicas
agree without talking), a ``turn N`` span per user turn, a ``chat {model}``
CLIENT span per model call and an ``execute_tool {name}`` span per tool run,
reconstructed from ``call_id``: from the response that asked for the tool to the
request that returned its output. Spans get explicit start/end times because we
only know them once a call has finished.

Telemetry must never block or fail the request path: ``record`` only queues
finished spans for the SDK's BatchSpanProcessor, whose own thread exports them;
a dead collector means dropped spans, not a stalled stream.

Attribute names follow the OTel GenAI semantic conventions as shipped in
opentelemetry-semantic-conventions 0.66b2 (now maintained in
open-telemetry/semantic-conventions-genai). They are spelled out here rather
than imported because that package marks its ``gen_ai.*`` constants as moved
and will drop them; a test checks the spellings against the installed package.
No credential is ever recorded, and no message content, prompt, tool argument or
result unless the caller opts in (``CallTrace.content``: redacted and capped by the
gateway before it gets here).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final, Literal
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from agent_egress.addon.protocols.usage import Usage

from .session_state import (
    EndedTurn,
    PendingTool,
    Placement,
    PrimedIdGenerator,
    SessionState,
    SessionTable,
    ToolRun,
    TurnState,
    session_trace_id,
    turn_span_id,
)

_log = logging.getLogger(__name__)

# --- attribute names -------------------------------------------------------
OPERATION: Final = "gen_ai.operation.name"
PROVIDER: Final = "gen_ai.provider.name"  # replaces the deprecated gen_ai.system
CONVERSATION_ID: Final = "gen_ai.conversation.id"
REQUEST_MODEL: Final = "gen_ai.request.model"
RESPONSE_MODEL: Final = "gen_ai.response.model"
RESPONSE_ID: Final = "gen_ai.response.id"
FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
TIME_TO_FIRST_CHUNK: Final = "gen_ai.response.time_to_first_chunk"  # seconds
INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
CACHE_READ_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
CACHE_CREATION_TOKENS: Final = "gen_ai.usage.cache_creation.input_tokens"
REASONING_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"
TOOL_NAME: Final = "gen_ai.tool.name"
TOOL_CALL_ID: Final = "gen_ai.tool.call.id"
INPUT_MESSAGES: Final = "gen_ai.input.messages"  # opt-in content (JSON string on spans)
OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS: Final = "gen_ai.system_instructions"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
ERROR_TYPE: Final = "error.type"
HTTP_STATUS: Final = "http.response.status_code"

AE: Final = "agent_egress."
COST_USD: Final = AE + "cost_usd"
UNPRICED: Final = AE + "unpriced"
TAG_PREFIX: Final = AE + "tag."
TOOL_INCLUDES_APPROVAL: Final = AE + "tool.includes_approval_time"

_ROOT: Final = Context()  # explicit empty context: never parent to whatever span is current
MAX_PENDING_TOOLS: Final = 256  # per turn; a model asking for more is broken or hostile
_MAX_ENDED_TURNS: Final = 8
COMPACT_API: Final = "openai.responses.compact"
_PROPAGATOR: Final = TraceContextTextMapPropagator()

Attrs = dict[str, AttributeValue]


@dataclass(frozen=True, slots=True)
class CapturedContent:
    """GenAI content attributes (JSON strings, the semconv's span form), redacted first."""

    input_messages: str
    output_messages: str
    system_instructions: str | None = None
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class CallTrace:
    """Facts of one finished model call, built by the gateway at settle time."""

    request_id: str
    session_id: str | None
    turn_id: str | None
    """From x-codex-turn-metadata; None: turns are inferred (see ``SessionTracer``)."""
    start_ns: int
    """Unix epoch ns when the request arrived."""
    first_byte_ns: int | None
    end_ns: int
    api: str
    provider: str
    provider_kind: str
    server_address: str | None
    server_port: int | None
    request_model: str | None
    response_model: str | None
    response_id: str | None
    finish_reasons: tuple[str, ...]
    usage: Usage | None
    usage_estimated: bool
    cost_usd: Decimal | None
    """None = unpriced (never recorded as $0)."""
    org: str
    team: str
    user: str
    key_id: str
    status_code: int | None
    outcome: str
    error_type: str | None
    tool_calls: tuple[tuple[str, str], ...]
    """(call_id, tool name) pairs the response asked for."""
    tool_output_ids: tuple[str, ...]
    """call_ids of function_call_output items in the request input (whole history)."""
    traceparent: str | None
    tags: Mapping[str, str] = field(default_factory=dict)
    # failover (issue 8): (name, unix ns, attributes) of failovers and breaker changes
    events: tuple[tuple[str, int, Mapping[str, str]], ...] = ()
    content: CapturedContent | None = None
    """Opt-in message content, already redacted and capped (None: not captured)."""


def _usage_attrs(attrs: Attrs, u: Usage) -> None:
    # Semconv input_tokens includes cache reads and cache writes; our Usage keeps
    # cache writes (Anthropic) outside input_tokens, so add them back.
    attrs[INPUT_TOKENS] = u.input_tokens + u.cache_write_tokens
    attrs[OUTPUT_TOKENS] = u.output_tokens
    attrs[CACHE_READ_TOKENS] = u.cached_input_tokens
    if u.cache_write_tokens:
        attrs[CACHE_CREATION_TOKENS] = u.cache_write_tokens
    attrs[REASONING_TOKENS] = u.reasoning_tokens


def _link(traceparent: str | None) -> tuple[Link, ...]:
    if not traceparent:
        return ()
    sc = get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return (Link(sc),) if sc.is_valid else ()


class DropCounter:
    """Spans lost after they were built (export failed, export queue full); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n


class CountingExporter(SpanExporter):
    """Counts the spans of every batch the wrapped exporter fails to deliver.

    The OTLP exporters only log a failure (after their own bounded retries), so
    without this a dead collector would be invisible to the SRE it is meant to serve.
    """

    def __init__(self, inner: SpanExporter, drops: DropCounter) -> None:
        self.inner = inner
        self.drops = drops

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            self.drops.add(len(spans))
            raise
        if result is not SpanExportResult.SUCCESS:
            self.drops.add(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """BatchSpanProcessor that counts the spans it drops because its queue is full."""

    def __init__(self, exporter: SpanExporter, drops: DropCounter) -> None:
        super().__init__(exporter)
        self.drops = drops
        inner = getattr(self, "_batch_processor", None)
        self._queue = getattr(inner, "_queue", None)
        self._max = int(getattr(inner, "_max_queue_size", 0) or 0)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if (self._queue is not None and ctx is not None and ctx.trace_flags.sampled
                and len(self._queue) >= self._max > 0):
            self.drops.add(1)  # the SDK drops the oldest queued span to make room
        super().on_end(span)


class SessionTracer:
    """Turns settled calls into session traces; cheap, never raises.

    Turns: a call whose ``turn_id`` differs from the open turn's starts a new one
    (ending the old turn at its last call's end). Without a ``turn_id`` a call
    continues the open turn when it returns output of a tool that turn is waiting
    for, is a compaction, or follows a failed call (a client retry); otherwise it
    starts a turn. (``tool_output_ids`` carries the whole history, so "empty"
    alone would not mark a new turn after the first.) Open turns also end when
    their session idles past ``session_ttl_s`` (``sweep``), is evicted to stay
    within ``max_sessions``, or on ``shutdown``.

    Placement (which turn, what ends) is decided here in memory (``record``), or
    by a shared store so replicas agree (``record_placed`` with the store's
    ``Placement``, see ``session_redis``); spans are built the same way either way.
    A turn span is built only when its turn ends, from ``TurnState`` facts, under
    the span id hashed from (session, turn key) that its chat spans already name.

    Thread-safe via one lock, but meant to be driven from one task. In memory,
    turn numbers and inferred turns are per replica; explicit turn ids and the
    trace id are the same on every replica.
    """

    def __init__(
        self,
        provider: TracerProvider,
        *,
        max_sessions: int = 10_000,
        session_ttl_s: float = 1800,
        drops: DropCounter | None = None,
    ) -> None:
        ids = provider.id_generator
        if not isinstance(ids, PrimedIdGenerator):
            raise ValueError("provider must use PrimedIdGenerator (see build_tracer_provider)")
        self._ids = ids
        self.provider = provider
        self._tracer = provider.get_tracer("agent_egress.exporters.otel")
        self._sampler = provider.sampler
        self._sessions = SessionTable(max_sessions)
        self._ttl_ns = int(session_ttl_s * 1e9)
        self._lock = threading.Lock()
        self._closed = False
        self.drops = drops if drops is not None else DropCounter()
        self.dropped = 0
        """Calls whose spans were lost to an error, plus tool calls lost to the per-turn cap."""

    # --- public ----------------------------------------------------------
    @property
    def dropped_total(self) -> int:
        """Everything lost: calls not traced, tool calls over the cap, spans not exported."""
        return self.dropped + self.drops.count

    def record(self, call: CallTrace) -> None:
        """Place the call with in-memory session state and build its spans."""
        self._guarded(call, None)

    def record_placed(self, call: CallTrace, placement: Placement) -> None:
        """Build the spans of a call a shared store already placed (``session_redis``)."""
        self._guarded(call, placement)

    def lost(self, n: int = 1) -> None:
        """Count calls whose spans were lost before they reached the tracer."""
        with self._lock:
            self.dropped += n

    def sweep(self, now_ns: int | None = None) -> int:
        """End the turns of sessions idle past the TTL and forget them; returns turns ended."""
        cutoff = self.idle_cutoff_ns(now_ns)
        with self._lock:
            return sum(self._end_local(st, "idle") for st in self._sessions.pop_idle(cutoff))

    def idle_cutoff_ns(self, now_ns: int | None = None) -> int:
        return (time.time_ns() if now_ns is None else now_ns) - self._ttl_ns

    def forget_idle(self, now_ns: int | None = None) -> list[str]:
        """Pop sessions idle past the TTL, ending their local turns; returns their ids."""
        cutoff = self.idle_cutoff_ns(now_ns)
        with self._lock:
            out = []
            for st in self._sessions.pop_idle(cutoff):
                self._end_local(st, "idle")
                out.append(st.session_id)
            return out

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions.ids())

    def emit_ended(self, turns: list[EndedTurn]) -> None:
        """Export turns a shared store ended (idle, shutdown)."""
        try:
            with self._lock:
                if not self._closed:
                    for t in turns:
                        self._turn_span(t)
        except Exception:
            self._count_error("ended turns")

    def shutdown(self, timeout_ms: int = 10_000) -> None:
        """End all open turns, then flush and shut the provider down within ``timeout_ms``.

        The SDK's own flush ignores its timeout (a dead collector can hold it for
        batches x export timeout), so the provider shuts down (its batch processor
        drains the queue first) on a helper thread we stop waiting for.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for st in self._sessions.pop_all():
                self._end_local(st, "shutdown")
        t = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        t.start()
        t.join(timeout_ms / 1000)
        if t.is_alive():
            _log.warning("trace export did not finish within %d ms; unsent spans are lost",
                         timeout_ms)

    @staticmethod
    def trace_id_for(session_id: str) -> str:
        return format(session_trace_id(session_id), "032x")

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # --- internals -------------------------------------------------------
    def _count_error(self, what: str) -> None:
        self.dropped += 1
        if self.dropped & (self.dropped - 1) == 0:  # log the 1st, 2nd, 4th, 8th...
            _log.warning("tracing %s failed (%d so far)", what, self.dropped, exc_info=True)

    def _guarded(self, call: CallTrace, placement: Placement | None) -> None:
        try:
            with self._lock:
                if not self._closed:
                    self._record(call, placement)
        except Exception:
            self._count_error("call " + call.request_id)

    def _record(self, call: CallTrace, placement: Placement | None) -> None:
        sid = call.session_id
        if not sid:
            self._chat_span(call, _ROOT, None)
            return
        if placement is None:
            placement = self._place(sid, call)
        else:  # shared placement: only remember the session (sweep, shutdown)
            _, evicted = self._sessions.touch(sid, call.end_ns)
            for old in evicted:
                self._end_local(old, "evicted")
        for ended in placement.ended:
            self._turn_span(ended)
        for run in placement.tools:
            self._tool_span(sid, run, call.start_ns)
        self._chat_span(call, self._turn_context(sid, placement.turn_key), sid)

    def _place(self, sid: str, call: CallTrace) -> Placement:
        st, evicted = self._sessions.touch(sid, call.end_ns)
        for old in evicted:
            self._end_local(old, "evicted")
        ended: list[EndedTurn] = []
        turn = self._turn_for(st, call, ended)
        if isinstance(turn, str):  # late call of a turn already ended
            return Placement(turn, ended)
        tools = []
        for cid in call.tool_output_ids:
            pending = turn.pending.pop(cid, None)
            if pending is not None:
                tools.append(ToolRun(cid, pending.name, pending.start_ns, turn.key))
        self._add_to_turn(turn, call)
        return Placement(turn.key, ended, tools)

    def _turn_for(self, st: SessionState, call: CallTrace,
                  ended: list[EndedTurn]) -> TurnState | str:
        cur = st.turn
        if call.turn_id is not None:
            key = call.turn_id
            if cur is not None and cur.key == key:
                return cur
            if key in st.ended:
                return key
        else:
            if cur is not None and (
                call.api == COMPACT_API
                or cur.last_outcome != "ok"
                or any(cid in cur.pending for cid in call.tool_output_ids)
            ):
                return cur
            key = "request:" + call.request_id
        done = self._close_local(st, "next_turn")
        if done is not None:
            ended.append(done)
        st.turns_started += 1
        turn = TurnState(key, st.turns_started, call.start_ns, call.end_ns, call.org,
                         call.team, call.user, call.turn_id)
        st.turn = turn
        return turn

    def _close_local(self, st: SessionState, reason: str) -> EndedTurn | None:
        turn = st.turn
        if turn is None:
            return None
        st.turn = None
        st.ended[turn.key] = None
        while len(st.ended) > _MAX_ENDED_TURNS:
            st.ended.popitem(last=False)
        turn.sums.unanswered_tools = len(turn.pending)
        return EndedTurn(st.session_id, turn.key, turn.number, turn.start_ns,
                         max(turn.last_end_ns, turn.start_ns), turn.org, turn.team, turn.user,
                         turn.turn_id, reason, turn.sums)

    def _end_local(self, st: SessionState, reason: str) -> int:
        done = self._close_local(st, reason)
        if done is None:
            return 0
        self._turn_span(done)
        return 1

    def _add_to_turn(self, turn: TurnState, call: CallTrace) -> None:
        s = turn.sums
        s.calls += 1
        turn.last_end_ns = max(turn.last_end_ns, call.end_ns)
        turn.last_outcome = call.outcome
        if call.cost_usd is None:
            s.unpriced_calls += 1
        else:
            s.cost_usd += call.cost_usd
        if (u := call.usage) is not None:
            s.input_tokens += u.input_tokens
            s.cached_input_tokens += u.cached_input_tokens
            s.cache_write_tokens += u.cache_write_tokens
            s.output_tokens += u.output_tokens
            s.reasoning_tokens += u.reasoning_tokens
        for cid, name in call.tool_calls:
            if len(turn.pending) >= MAX_PENDING_TOOLS:
                self.dropped += 1
                continue
            turn.pending[cid] = PendingTool(name, call.end_ns)

    def _turn_context(self, session_id: str, turn_key: str) -> Context:
        """Parent context naming the turn span (built later, maybe by another replica)."""
        tid = session_trace_id(session_id)
        sampled = (self._sampler.should_sample(_ROOT, tid, "turn").decision
                   is Decision.RECORD_AND_SAMPLE)
        sc = SpanContext(tid, turn_span_id(session_id, turn_key), is_remote=False,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))
        return set_span_in_context(NonRecordingSpan(sc))

    def _turn_span(self, t: EndedTurn) -> None:
        s = t.sums
        attrs: Attrs = {
            OPERATION: "invoke_agent",
            CONVERSATION_ID: t.session_id,
            AE + "turn.number": t.number,
            AE + "org": t.org,
            AE + "team": t.team,
            AE + "user": t.user,
            AE + "turn.model_calls": s.calls,
            AE + "turn.end_reason": t.reason,
            INPUT_TOKENS: s.input_tokens + s.cache_write_tokens,
            OUTPUT_TOKENS: s.output_tokens,
            CACHE_READ_TOKENS: s.cached_input_tokens,
            REASONING_TOKENS: s.reasoning_tokens,
            COST_USD: float(s.cost_usd),
        }
        if t.turn_id is not None:
            attrs[AE + "turn.id"] = t.turn_id
        if s.cache_write_tokens:
            attrs[CACHE_CREATION_TOKENS] = s.cache_write_tokens
        if s.unpriced_calls:
            attrs[AE + "turn.unpriced_calls"] = s.unpriced_calls
        if s.unanswered_tools:
            attrs[AE + "turn.unanswered_tool_calls"] = s.unanswered_tools
        self._ids.prime(trace_id=session_trace_id(t.session_id),
                        span_id=turn_span_id(t.session_id, t.key))
        try:
            span = self._tracer.start_span(f"turn {t.number}", _ROOT, SpanKind.INTERNAL, attrs,
                                           start_time=t.start_ns)
        finally:
            self._ids.clear()
        span.end(end_time=max(t.end_ns, t.start_ns))

    def _chat_span(self, call: CallTrace, parent: Context, session_id: str | None) -> None:
        attrs: Attrs = {
            OPERATION: "chat",
            PROVIDER: call.provider_kind,
            AE + "provider": call.provider,
            AE + "api": call.api,
            AE + "request_id": call.request_id,
            AE + "outcome": call.outcome,
            AE + "usage_estimated": call.usage_estimated,
            AE + "org": call.org,
            AE + "team": call.team,
            AE + "user": call.user,
            AE + "key_id": call.key_id,
        }
        if call.request_model:
            attrs[REQUEST_MODEL] = call.request_model
        if call.server_address:
            attrs[SERVER_ADDRESS] = call.server_address
            if call.server_port is not None:
                attrs[SERVER_PORT] = call.server_port
        if session_id:
            attrs[CONVERSATION_ID] = session_id
        if call.response_model:
            attrs[RESPONSE_MODEL] = call.response_model
        if call.response_id:
            attrs[RESPONSE_ID] = call.response_id
        if call.finish_reasons:
            attrs[FINISH_REASONS] = call.finish_reasons
        if call.first_byte_ns is not None:
            attrs[TIME_TO_FIRST_CHUNK] = max(0, call.first_byte_ns - call.start_ns) / 1e9
        if call.usage is not None:
            _usage_attrs(attrs, call.usage)
        if call.cost_usd is None:
            attrs[UNPRICED] = True
        else:
            attrs[COST_USD] = float(call.cost_usd)
        if call.status_code is not None:
            attrs[HTTP_STATUS] = call.status_code
        failed = call.outcome != "ok"
        if failed or call.error_type:
            attrs[ERROR_TYPE] = call.error_type or call.outcome
        for k, v in call.tags.items():
            attrs[TAG_PREFIX + k] = v
        if call.content is not None:  # opt-in, redacted and capped by the caller
            attrs[INPUT_MESSAGES] = call.content.input_messages
            attrs[OUTPUT_MESSAGES] = call.content.output_messages
            if call.content.system_instructions is not None:
                attrs[SYSTEM_INSTRUCTIONS] = call.content.system_instructions
            if call.content.truncated:
                attrs[AE + "content.truncated"] = True
        name = f"chat {call.request_model}" if call.request_model else "chat"
        span = self._tracer.start_span(name, parent, SpanKind.CLIENT, attrs,
                                       _link(call.traceparent), start_time=call.start_ns)
        for ev_name, ev_ns, ev_attrs in call.events:  # failover (issue 8)
            span.add_event(ev_name, dict(ev_attrs), timestamp=ev_ns)
        if failed:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=max(call.end_ns, call.start_ns))

    def _tool_span(self, session_id: str, run: ToolRun, end_ns: int) -> None:
        attrs: Attrs = {
            OPERATION: "execute_tool",
            TOOL_NAME: run.name,
            TOOL_CALL_ID: run.call_id,
            CONVERSATION_ID: session_id,
            TOOL_INCLUDES_APPROVAL: True,
        }
        span = self._tracer.start_span(f"execute_tool {run.name}",
                                       self._turn_context(session_id, run.turn_key),
                                       SpanKind.INTERNAL, attrs, start_time=run.start_ns)
        span.end(end_time=max(end_ns, run.start_ns))


# --- provider --------------------------------------------------------------
ExporterKind = Literal["otlp-http", "otlp-grpc", "none"]


def _exporter_from_env() -> ExporterKind:
    if os.environ.get(OTEL_TRACES_EXPORTER, "otlp").strip().lower() == "none":
        return "none"
    proto = (os.environ.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)
             or os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL) or "http/protobuf")
    return "otlp-grpc" if proto.strip().lower() == "grpc" else "otlp-http"


def _http_traces_url(endpoint: str) -> str:
    """A path-less base URL gets /v1/traces, as OTEL_EXPORTER_OTLP_ENDPOINT would."""
    return endpoint if urlsplit(endpoint).path not in ("", "/") else (
        endpoint.rstrip("/") + "/v1/traces")


def _processor(kind: ExporterKind, endpoint: str | None,
               headers: Mapping[str, str] | None, drops: DropCounter) -> SpanProcessor | None:
    # Exporters are imported lazily: the gRPC one pulls in grpcio.
    if kind == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        url = _http_traces_url(endpoint) if endpoint else None
        return CountingBatchProcessor(
            CountingExporter(OTLPSpanExporter(endpoint=url, headers=headers), drops), drops)
    if kind == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )
        grpc = GrpcSpanExporter(endpoint=endpoint, headers=dict(headers) if headers else None)
        return CountingBatchProcessor(CountingExporter(grpc, drops), drops)
    return None


def build_tracer_provider(
    *,
    service_name: str | None = None,
    exporter: ExporterKind | None = None,
    endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
    sample_ratio: float | None = None,
    drops: DropCounter | None = None,
) -> TracerProvider:
    """A TracerProvider for ``SessionTracer``; None arguments defer to the OTEL_* env vars.

    service_name: None -> OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else "agent-egress".
    exporter: None -> OTEL_TRACES_EXPORTER ("none" disables) and
      OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL ("grpc" or "http/protobuf", the default).
    endpoint/headers: None -> the exporter reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT/HEADERS.
      For OTLP/HTTP a full traces URL, or a base URL to which /v1/traces is added.
    sample_ratio: ParentBased(TraceIdRatioBased); None -> OTEL_TRACES_SAMPLER[_ARG].
      Trace ids are per session, so every replica keeps or drops a whole session.
    drops: counts spans the exporter fails to deliver or the queue overflows (give the
      same counter to ``SessionTracer`` so ``dropped_total`` includes them).
    """
    resource = Resource.create()
    env_named = not str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service")
    if service_name is not None or not env_named:
        resource = resource.merge(Resource({SERVICE_NAME: service_name or "agent-egress"}))
    sampler: Sampler | None = None
    if sample_ratio is not None:
        sampler = ParentBased(TraceIdRatioBased(sample_ratio))
    # No atexit hook: SessionTracer.shutdown is the bounded flush; the SDK's could hold exit 30 s.
    provider = TracerProvider(sampler=sampler, resource=resource, id_generator=PrimedIdGenerator(),
                              shutdown_on_exit=False)
    proc = _processor(exporter or _exporter_from_env(), endpoint, headers,
                      drops if drops is not None else DropCounter())
    if proc is not None:
        provider.add_span_processor(proc)
    return provider

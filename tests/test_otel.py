"""Session traces end to end: SessionTracer -> SDK -> real OTLP/HTTP exporter -> receiver."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from otlp_receiver import OTLPGrpcReceiver, OTLPReceiver, RSpan

from agent_egress.addon.protocols.usage import Usage
from agent_egress.exporters import otel
from agent_egress.exporters.otel import CallTrace, SessionTracer, build_tracer_provider
from agent_egress.exporters.session_state import turn_span_id

S = 1_000_000_000
T0 = 1_750_000_000 * S
SESSION = "0199a0b4-1111-7222-8333-444455556666"
CODEX_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

CHAT_KEYS = {
    "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
    "gen_ai.response.model", "gen_ai.response.id", "gen_ai.response.finish_reasons",
    "gen_ai.response.time_to_first_chunk", "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.conversation.id", "server.address", "server.port", "error.type",
    "http.response.status_code", "agent_egress.provider", "agent_egress.api",
    "agent_egress.request_id", "agent_egress.outcome", "agent_egress.usage_estimated",
    "agent_egress.org", "agent_egress.team", "agent_egress.user", "agent_egress.key_id",
    "agent_egress.cost_usd", "agent_egress.unpriced",
}
TURN_KEYS = {
    "gen_ai.operation.name", "gen_ai.conversation.id", "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.reasoning.output_tokens",
    "agent_egress.turn.number", "agent_egress.turn.id", "agent_egress.turn.model_calls",
    "agent_egress.turn.end_reason", "agent_egress.turn.unpriced_calls",
    "agent_egress.turn.unanswered_tool_calls", "agent_egress.cost_usd",
    "agent_egress.org", "agent_egress.team", "agent_egress.user",
}
TOOL_KEYS = {"gen_ai.operation.name", "gen_ai.tool.name", "gen_ai.tool.call.id",
             "gen_ai.conversation.id", "agent_egress.tool.includes_approval_time"}


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("OTEL_"):
            monkeypatch.delenv(k)


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver()
    yield r
    r.stop()


def tracer_for(rx: OTLPReceiver, **kw: Any) -> SessionTracer:
    provider = build_tracer_provider(exporter="otlp-http", endpoint=rx.endpoint, sample_ratio=1.0)
    return SessionTracer(provider, **kw)


def call(rid: str, start_s: float, end_s: float, *, session: str | None = SESSION,
         turn: str | None = None, tools: tuple[tuple[str, str], ...] = (),
         outputs: tuple[str, ...] = (), cost: str | None = "0.01", outcome: str = "ok",
         traceparent: str | None = None, tags: dict[str, str] | None = None) -> CallTrace:
    start = T0 + int(start_s * S)
    return CallTrace(
        request_id=rid, session_id=session, turn_id=turn, start_ns=start,
        first_byte_ns=start + S // 4, end_ns=T0 + int(end_s * S),
        api="openai.responses", provider="openai", provider_kind="openai",
        server_address="api.openai.com", server_port=443, request_model="gpt-5-codex",
        response_model="gpt-5-codex-2025", response_id=f"resp_{rid}",
        finish_reasons=("completed",),
        usage=Usage(input_tokens=1000, cached_input_tokens=800, output_tokens=50,
                    reasoning_tokens=20),
        usage_estimated=False, cost_usd=None if cost is None else Decimal(cost),
        org="acme", team="infra", user="ada", key_id="key_7", status_code=200,
        outcome=outcome, error_type=None if outcome == "ok" else "upstream_5xx",
        tool_calls=tools, tool_output_ids=outputs, traceparent=traceparent,
        tags=tags or {},
    )


def codex_session(explicit_turns: bool) -> list[CallTrace]:
    """Turn 1: A, then B, then an answer; turn 2: C, then an answer (one unpriced call)."""
    t1, t2 = ("turn-1", "turn-2") if explicit_turns else (None, None)
    return [
        call("r1", 0, 1, turn=t1, tools=(("call_A", "shell"),), cost="0.010",
             traceparent=CODEX_TRACEPARENT, tags={"project": "billing"}),
        call("r2", 3, 4, turn=t1, outputs=("call_A",), tools=(("call_B", "apply_patch"),),
             cost="0.020"),
        call("r3", 10, 12, turn=t1, outputs=("call_A", "call_B"), cost="0.005"),
        call("r4", 60, 61, turn=t2, outputs=("call_A", "call_B"), tools=(("call_C", "shell"),),
             cost="0.030"),
        call("r5", 63, 65, turn=t2, outputs=("call_A", "call_B", "call_C"), cost=None),
    ]


def by_name(spans: list[RSpan], prefix: str) -> list[RSpan]:
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start_ns)


@pytest.mark.parametrize("explicit_turns", [True, False], ids=["turn_ids", "inferred_turns"])
def test_codex_session_becomes_one_trace(receiver: OTLPReceiver, explicit_turns: bool) -> None:
    tracer = tracer_for(receiver)
    for c in codex_session(explicit_turns):
        tracer.record(c)
    tracer.shutdown()
    assert receiver.wait_for(lambda s: len(s) >= 10, timeout=5)
    spans = receiver.spans
    assert len(spans) == 10
    assert {s.trace_id for s in spans} == {tracer.trace_id_for(SESSION)}
    assert spans[0].resource["service.name"] == "agent-egress"

    turns, chats = by_name(spans, "turn "), by_name(spans, "chat ")
    tools = by_name(spans, "execute_tool ")
    assert [t.name for t in turns] == ["turn 1", "turn 2"]
    assert len(chats) == 5 and len(tools) == 3
    assert all(t.parent_id is None and t.kind == "INTERNAL" for t in turns)
    assert all(t.attributes["gen_ai.operation.name"] == "invoke_agent" for t in turns)
    if explicit_turns:
        assert [t.attributes["agent_egress.turn.id"] for t in turns] == ["turn-1", "turn-2"]
        assert turns[0].span_id == format(turn_span_id(SESSION, "turn-1"), "016x")

    # chat spans: CLIENT, parented to their turn, times as recorded
    t1, t2 = turns
    assert [c.parent_id for c in chats] == [t1.span_id] * 3 + [t2.span_id] * 2
    assert all(c.kind == "CLIENT" and c.name == "chat gpt-5-codex" for c in chats)
    assert chats[0].start_ns == T0 and chats[0].end_ns == T0 + S
    assert chats[0].attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.25)
    assert chats[0].attributes["gen_ai.conversation.id"] == SESSION
    assert chats[0].attributes["gen_ai.usage.cache_read.input_tokens"] == 800
    assert chats[0].attributes["gen_ai.response.finish_reasons"] == ("completed",)
    assert chats[0].attributes["agent_egress.tag.project"] == "billing"
    assert chats[4].attributes["agent_egress.unpriced"] is True
    assert "agent_egress.cost_usd" not in chats[4].attributes

    # the traceparent Codex sent becomes a link, not a parent
    (link,) = chats[0].links
    assert (link.trace_id, link.span_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert all(not c.links for c in chats[1:])

    # tool spans: from the response that asked to the request that answered
    ids_names = [(t.attributes["gen_ai.tool.call.id"], t.attributes["gen_ai.tool.name"])
                 for t in tools]
    assert ids_names == [("call_A", "shell"), ("call_B", "apply_patch"), ("call_C", "shell")]
    assert [t.name for t in tools] == ["execute_tool shell", "execute_tool apply_patch",
                                       "execute_tool shell"]
    assert [t.parent_id for t in tools] == [t1.span_id, t1.span_id, t2.span_id]
    assert [(t.start_ns, t.end_ns) for t in tools] == [
        (chats[0].end_ns, chats[1].start_ns), (chats[1].end_ns, chats[2].start_ns),
        (chats[3].end_ns, chats[4].start_ns)]
    assert all(t.attributes["agent_egress.tool.includes_approval_time"] is True for t in tools)

    # turn spans: span their calls and carry the sums of their chat spans
    for turn, mine in ((t1, chats[:3]), (t2, chats[3:])):
        assert turn.start_ns == mine[0].start_ns and turn.end_ns == mine[-1].end_ns
        assert turn.attributes["agent_egress.turn.model_calls"] == len(mine)
        assert turn.attributes["agent_egress.cost_usd"] == pytest.approx(
            sum(c.attributes.get("agent_egress.cost_usd", 0.0) for c in mine))
        for k in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
                  "gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.reasoning.output_tokens"):
            assert turn.attributes[k] == sum(c.attributes[k] for c in mine)
    assert t1.attributes["agent_egress.turn.end_reason"] == "next_turn"
    assert t2.attributes["agent_egress.turn.end_reason"] == "shutdown"
    assert t2.attributes["agent_egress.turn.unpriced_calls"] == 1

    # nothing beyond the defined attribute set leaves the gateway
    for s, allowed in [*((c, CHAT_KEYS) for c in chats), *((t, TURN_KEYS) for t in turns),
                       *((t, TOOL_KEYS) for t in tools)]:
        extra = {k for k in s.attributes if k not in allowed
                 and not k.startswith("agent_egress.tag.")}
        assert not extra, (s.name, extra)
        assert CODEX_TRACEPARENT not in map(str, s.attributes.values())


def test_calls_without_session_get_their_own_traces(receiver: OTLPReceiver) -> None:
    tracer = tracer_for(receiver)
    tracer.record(call("a", 0, 1, session=None, tools=(("call_X", "shell"),)))
    tracer.record(call("b", 2, 3, session=None, outputs=("call_X",),
                       traceparent=CODEX_TRACEPARENT))
    tracer.shutdown()
    assert receiver.wait_for(lambda s: len(s) >= 2)
    spans = receiver.spans
    assert [s.name for s in spans] == ["chat gpt-5-codex"] * 2
    assert len({s.trace_id for s in spans}) == 2
    assert all(s.parent_id is None and "gen_ai.conversation.id" not in s.attributes
               for s in spans)
    assert [len(s.links) for s in spans] == [0, 1]


def test_late_retry_of_an_ended_turn_joins_it(receiver: OTLPReceiver) -> None:
    tracer = tracer_for(receiver)
    tracer.record(call("r1", 0, 1, turn="t1"))
    tracer.record(call("r2", 5, 6, turn="t2"))
    tracer.record(call("r1b", 2, 7, turn="t1"))  # settled after t2 began
    tracer.shutdown()
    assert receiver.wait_for(lambda s: len(s) >= 5)
    turns = by_name(receiver.spans, "turn ")
    assert len(turns) == 2
    late = next(s for s in receiver.spans if s.attributes.get("agent_egress.request_id") == "r1b")
    assert late.parent_id == turns[0].span_id


def test_inferred_turns_keep_client_retries_in_the_turn(receiver: OTLPReceiver) -> None:
    tracer = tracer_for(receiver)
    tracer.record(call("r1", 0, 1, outcome="upstream_error", cost="0"))
    tracer.record(call("r1-retry", 2, 3))  # byte-identical retry: same (empty) outputs
    tracer.record(call("r2", 9, 10))  # a new user message
    tracer.shutdown()
    assert receiver.wait_for(lambda s: len(s) >= 5)
    turns = by_name(receiver.spans, "turn ")
    assert [t.attributes["agent_egress.turn.model_calls"] for t in turns] == [2, 1]
    failed = next(s for s in receiver.spans if s.attributes.get("agent_egress.request_id") == "r1")
    assert failed.status_code == 2 and failed.attributes["error.type"] == "upstream_5xx"


def test_sweep_ends_idle_turns(receiver: OTLPReceiver) -> None:
    tracer = tracer_for(receiver, session_ttl_s=60)
    tracer.record(call("r1", 0, 1, turn="t1", tools=(("call_A", "shell"),)))
    tracer.record(call("o1", 0, 1, session="other", turn="t1"))
    tracer.record(call("o2", 40, 41, session="other", turn="t1"))
    assert tracer.sweep(T0 + 30 * S) == 0
    assert tracer.sweep(T0 + 62 * S) == 1  # SESSION idle 61 s; "other" only 21 s
    assert tracer.open_sessions == 1
    tracer.provider.force_flush()
    assert receiver.wait_for(lambda s: any(x.name == "turn 1" for x in s))
    (turn,) = by_name(receiver.spans, "turn ")
    assert turn.trace_id == tracer.trace_id_for(SESSION)
    assert turn.attributes["agent_egress.turn.end_reason"] == "idle"
    assert turn.attributes["agent_egress.turn.unanswered_tool_calls"] == 1
    assert turn.end_ns == T0 + S
    tracer.shutdown()


def test_session_table_is_bounded_lru(receiver: OTLPReceiver) -> None:
    tracer = tracer_for(receiver, max_sessions=2)
    tracer.record(call("a", 0, 1, session="s-a", turn="t1"))
    tracer.record(call("b", 1, 2, session="s-b", turn="t1"))
    tracer.record(call("a2", 2, 3, session="s-a", turn="t1"))  # s-a is now the most recent
    tracer.record(call("c", 3, 4, session="s-c", turn="t1"))  # evicts s-b
    assert tracer.open_sessions == 2
    tracer.provider.force_flush()
    assert receiver.wait_for(lambda s: any(x.name.startswith("turn") for x in s))
    (evicted,) = by_name(receiver.spans, "turn ")
    assert evicted.trace_id == tracer.trace_id_for("s-b")
    assert evicted.attributes["agent_egress.turn.end_reason"] == "evicted"
    tracer.shutdown()


def test_replicas_agree_on_ids_and_sampling(receiver: OTLPReceiver) -> None:
    """Two gateway replicas, ratio 0.5: each session is kept or dropped whole, by both."""
    replicas = [SessionTracer(build_tracer_provider(exporter="otlp-http",
                                                    endpoint=receiver.endpoint,
                                                    sample_ratio=0.5)) for _ in range(2)]
    sessions = [f"sess-{i}" for i in range(40)]
    for i, tracer in enumerate(replicas):
        for sid in sessions:
            tracer.record(call(f"{sid}-{i}", i * 5, i * 5 + 1, session=sid, turn="t1",
                               tools=(("call_A", "shell"),)))
        tracer.shutdown()
    spans = receiver.spans
    kept = {s.trace_id for s in spans}
    assert 0 < len(kept) < len(sessions)
    assert kept <= {SessionTracer.trace_id_for(sid) for sid in sessions}
    turns = by_name(spans, "turn ")
    assert len(turns) == 2 * len(kept)  # both replicas emitted each kept turn ...
    assert len({t.span_id for t in turns}) == len(kept)  # ... under the same span id
    assert len(by_name(spans, "chat ")) == 2 * len(kept)


def test_sample_ratio_zero_exports_nothing(receiver: OTLPReceiver) -> None:
    provider = build_tracer_provider(exporter="otlp-http", endpoint=receiver.endpoint,
                                     sample_ratio=0.0)
    tracer = SessionTracer(provider)
    for c in codex_session(True):
        tracer.record(c)
    tracer.record(call("x", 0, 1, session=None))
    tracer.shutdown()
    assert receiver.requests == 0 and receiver.spans == []
    assert tracer.dropped == 0


def test_dead_collector_never_slows_or_breaks_record() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here
    tracer = SessionTracer(build_tracer_provider(
        exporter="otlp-http", endpoint=f"http://127.0.0.1:{port}", sample_ratio=1.0))
    calls = []
    for i in range(250):  # 250 sessions x 4 calls, with turns and tools
        sid = f"dead-{i}"
        calls += [call(f"{i}a", 0, 1, session=sid, turn="t1", tools=(("call_A", "shell"),)),
                  call(f"{i}b", 2, 3, session=sid, turn="t1", outputs=("call_A",)),
                  call(f"{i}c", 5, 6, session=sid, turn="t2"),
                  call(f"{i}d", 7, 8, session=None)]
    t = time.perf_counter()
    for c in calls:
        tracer.record(c)
    elapsed = time.perf_counter() - t
    assert elapsed < 5, elapsed
    assert tracer.dropped == 0
    t = time.perf_counter()
    tracer.shutdown(timeout_ms=500)
    assert time.perf_counter() - t < 2  # bounded, though the queue could not be sent


def test_env_configures_endpoint_service_and_sampler(receiver: OTLPReceiver,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "egress-eu1")
    tracer = SessionTracer(build_tracer_provider())
    tracer.record(call("r1", 0, 1, turn="t1"))
    tracer.shutdown()
    assert receiver.wait_for(lambda s: len(s) >= 2)
    assert {s.resource["service.name"] for s in receiver.spans} == {"egress-eu1"}

    receiver.clear()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    tracer = SessionTracer(build_tracer_provider())
    tracer.record(call("r1", 0, 1, turn="t1"))
    tracer.shutdown()
    assert receiver.spans == []


def test_otlp_grpc_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    rx = OTLPGrpcReceiver()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        tracer = SessionTracer(build_tracer_provider(endpoint=rx.endpoint,
                                                     headers={"x-tenant": "acme"}))
        for c in codex_session(True):
            tracer.record(c)
        tracer.shutdown()
        assert rx.wait_for(lambda s: len(s) >= 10)
        assert {s.trace_id for s in rx.spans} == {tracer.trace_id_for(SESSION)}
    finally:
        rx.stop()


def test_record_never_raises() -> None:
    tracer = SessionTracer(build_tracer_provider(exporter="none"))
    bad = call("r1", 0, 1)
    object.__setattr__(bad, "usage", "not a Usage")
    tracer.record(bad)
    assert tracer.dropped == 1
    tracer.record(call("r2", 2, 3))
    assert tracer.dropped == 1
    tracer.shutdown()


def test_rejects_provider_without_primed_ids() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    with pytest.raises(ValueError, match="PrimedIdGenerator"):
        SessionTracer(TracerProvider(shutdown_on_exit=False))


def test_attribute_names_match_installed_semconv() -> None:
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as g
    from opentelemetry.semconv.attributes import (
        error_attributes,
        http_attributes,
        server_attributes,
    )

    assert otel.OPERATION == g.GEN_AI_OPERATION_NAME
    assert otel.PROVIDER == g.GEN_AI_PROVIDER_NAME
    assert otel.CONVERSATION_ID == g.GEN_AI_CONVERSATION_ID
    assert otel.REQUEST_MODEL == g.GEN_AI_REQUEST_MODEL
    assert otel.RESPONSE_MODEL == g.GEN_AI_RESPONSE_MODEL
    assert otel.RESPONSE_ID == g.GEN_AI_RESPONSE_ID
    assert otel.FINISH_REASONS == g.GEN_AI_RESPONSE_FINISH_REASONS
    assert otel.TIME_TO_FIRST_CHUNK == g.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK
    assert otel.INPUT_TOKENS == g.GEN_AI_USAGE_INPUT_TOKENS
    assert otel.OUTPUT_TOKENS == g.GEN_AI_USAGE_OUTPUT_TOKENS
    assert otel.CACHE_READ_TOKENS == g.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS
    assert otel.CACHE_CREATION_TOKENS == g.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS
    assert otel.REASONING_TOKENS == g.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS
    assert otel.TOOL_NAME == g.GEN_AI_TOOL_NAME
    assert otel.TOOL_CALL_ID == g.GEN_AI_TOOL_CALL_ID
    assert otel.SERVER_ADDRESS == server_attributes.SERVER_ADDRESS
    assert otel.SERVER_PORT == server_attributes.SERVER_PORT
    assert otel.ERROR_TYPE == error_attributes.ERROR_TYPE
    assert otel.HTTP_STATUS == http_attributes.HTTP_RESPONSE_STATUS_CODE
    assert {"chat", "execute_tool", "invoke_agent"} <= {v.value for v in g.GenAiOperationNameValues}

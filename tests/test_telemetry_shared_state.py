"""Shared session state (exporters/session_redis.py) against a real Redis, in process.

The same Codex session, spread over two tracers sharing Redis call by call, must
export exactly the spans one in-memory tracer exports for it: same turns, same
parents, same sums, same tool spans, each exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import services
from otlp_receiver import OTLPReceiver, RSpan
from test_otel import SESSION, T0, S, call, codex_session, tracer_for

from agent_egress.exporters.otel import COMPACT_API, CallTrace, SessionTracer
from agent_egress.exporters.session_redis import SharedSessions


@pytest.fixture
def prefix() -> Iterator[str]:
    with services.redis_namespace() as p:
        yield p


def _shape(spans: list[RSpan]) -> list[tuple[Any, ...]]:
    """Spans without their random ids: name, times, parent's name, attributes."""
    names = {s.span_id: s.name for s in spans}
    return sorted((s.name, s.start_ns, s.end_ns, names.get(s.parent_id or ""),
                   tuple(sorted((k, str(v)) for k, v in s.attributes.items())))
                  for s in spans)


async def _place(shared: SharedSessions, tracer: SessionTracer, c: CallTrace) -> None:
    u = c.usage
    assert u is not None and c.session_id is not None
    placement = await shared.place(
        session_id=c.session_id, request_id=c.request_id, turn_id=c.turn_id,
        compact=c.api == COMPACT_API, start_ns=c.start_ns, end_ns=c.end_ns, outcome=c.outcome,
        org=c.org, team=c.team, user=c.user, cost_usd=c.cost_usd,
        tokens=(u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens,
                u.reasoning_tokens),
        tool_output_ids=c.tool_output_ids, tool_calls=c.tool_calls)
    assert placement is not None
    tracer.record_placed(c, placement)


@pytest.mark.parametrize("explicit_turns", [True, False], ids=["turn_ids", "inferred_turns"])
def test_two_replicas_sharing_redis_export_what_one_tracer_does(prefix: str,
                                                                explicit_turns: bool) -> None:
    calls = codex_session(explicit_turns)
    rx_one, rx_two = OTLPReceiver(), OTLPReceiver()
    try:
        one = tracer_for(rx_one)
        for c in calls:
            one.record(c)
        one.shutdown()

        async def replicas() -> None:
            tracers = [tracer_for(rx_two), tracer_for(rx_two)]
            shared = [SharedSessions(services.redis_url(), prefix) for _ in tracers]
            for i, c in enumerate(calls):  # alternate: a, b, a, b, a
                await _place(shared[i % 2], tracers[i % 2], c)
            for tracer, sh in zip(tracers, shared, strict=True):  # what Telemetry.close does
                ended = await sh.end(SESSION, "shutdown")
                assert ended is not None
                tracer.emit_ended(ended)
                tracer.shutdown()
                await sh.close()

        asyncio.run(replicas())
        assert rx_one.wait_for(lambda s: len(s) >= 10) and rx_two.wait_for(lambda s: len(s) >= 10)
        assert len(rx_two.spans) == 10
        assert _shape(rx_two.spans) == _shape(rx_one.spans)
    finally:
        rx_one.stop()
        rx_two.stop()


def test_idle_end_waits_for_the_last_call_on_any_replica_and_late_calls_join(
        prefix: str) -> None:
    rx = OTLPReceiver()
    try:
        async def run() -> list[RSpan]:
            tracer = tracer_for(rx)
            shared = SharedSessions(services.redis_url(), prefix, max_pending=1)
            await _place(shared, tracer, call("r1", 0, 1, turn="t1",
                                              tools=(("call_A", "shell"), ("call_B", "shell"))))
            assert shared.dropped_tools == 1  # over max_pending: counted, not kept
            await _place(shared, tracer, call("r2", 40, 41, turn="t1"))
            assert await shared.end(SESSION, "idle", idle_before_ns=T0 + 30 * S) == []
            (ended,) = await shared.end(SESSION, "idle", idle_before_ns=T0 + 42 * S) or []
            assert (ended.number, ended.sums.calls, ended.sums.unanswered_tools) == (1, 2, 1)
            tracer.emit_ended([ended])
            await _place(shared, tracer, call("r1-late", 2, 50, turn="t1"))  # joins ended t1
            assert await shared.end(SESSION, "shutdown") == []  # nothing open any more
            tracer.shutdown()
            await shared.close()
            return rx.spans

        asyncio.run(run())
        assert rx.wait_for(lambda s: len(s) >= 4)
        spans = rx.spans
        (turn,) = [s for s in spans if s.name.startswith("turn")]
        assert turn.attributes["agent_egress.turn.end_reason"] == "idle"
        assert turn.end_ns == T0 + 41 * S
        late = next(s for s in spans if s.attributes.get("agent_egress.request_id") == "r1-late")
        assert late.parent_id == turn.span_id
    finally:
        rx.stop()

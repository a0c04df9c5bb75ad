"""Circuit breaker state machine, route planning and retry identity (pure, fast), and
breaker state shared between two boards (two replicas) over a real Redis."""

from __future__ import annotations

import asyncio
import json

import pytest
import services

from agent_egress.addon.breaker import Breaker, BreakerBoard, State
from agent_egress.addon.failover import RetryMemory, body_digest
from agent_egress.addon.policy import BreakerSettings, ConfigError, RouteRule, load_settings
from agent_egress.addon.route import plan

CFG = BreakerSettings(failures=3, window_seconds=10, open_seconds=5, half_open_probes=1)


def test_opens_after_n_failures_in_window_only() -> None:
    b = Breaker("p", "k", CFG)
    assert b.failure(0.0) is None and b.failure(1.0) is None
    assert b.failure(10.5) is None, "the failure at t=0 left the window"
    assert b.failure(10.9) == ("closed", "open")
    assert not b.available(11.0) and not b.available(15.8)


def test_half_open_probe_closes_or_reopens() -> None:
    b = Breaker("p", "k", CFG)
    for t in (0.0, 0.1, 0.2):
        b.failure(t)
    assert b.state == "open" and b.opened_until == pytest.approx(5.2)
    assert b.available(5.3)
    assert b.acquire(5.3) == ("open", "half_open")
    assert not b.available(5.4), "one probe at a time"
    assert b.failure(5.5) == ("half_open", "open")
    assert not b.available(6.0) and b.opened_until == pytest.approx(10.5)
    b.acquire(10.6)
    assert b.success(10.7) == ("half_open", "closed")
    assert b.available(10.8) and not b.failures


def test_stuck_probe_frees_its_slot() -> None:
    b = Breaker("p", "k", CFG)
    for t in (0.0, 0.1, 0.2):
        b.failure(t)
    b.acquire(6.0)  # a probe that never reports back (the client went away)
    assert not b.available(7.0)
    assert b.available(11.1)


def test_plan_orders_and_weights() -> None:
    rules = [RouteRule(model="o3*", providers=["azure"]),
             RouteRule(model="gpt-5*", providers=["a", "b", "c"], weights=[1, 1, 0])]
    assert plan(rules, "default", "claude", "s") == ["default"]
    assert plan(rules, "default", "o3-mini", "s") == ["azure"]
    firsts = {plan(rules, "d", "gpt-5.5", f"session-{i}")[0] for i in range(200)}
    assert firsts == {"a", "b"}, "weight 0 is never drawn first"
    assert plan(rules, "d", "gpt-5.5", "s1") == plan(rules, "d", "gpt-5.5", "s1"), "per session"
    assert sorted(plan(rules, "d", "gpt-5.5", "s1")) == ["a", "b", "c"]


def test_routes_validated(tmp_path: pytest.TempPathFactory) -> None:
    cfg = tmp_path / "c.yaml"  # type: ignore[operator]
    cfg.write_text("providers: [{name: a, base_url: 'http://x/v1', key: k}]\n"
                   "routes: [{model: '*', providers: [a, nope]}]\n")
    with pytest.raises(ConfigError, match=r"routes.0.providers: \['nope'\]"):
        load_settings(cfg, environ={})
    cfg.write_text("providers: [{name: a, base_url: 'http://x/v1', key: k}]\n"
                   "routes: [{model: '*', providers: [a], weights: [0]}]\n")
    with pytest.raises(ConfigError, match="weights"):
        load_settings(cfg, environ={})


def test_retry_identity_ignores_client_metadata_key_order() -> None:
    base = {"model": "gpt-5.5", "input": [{"role": "user", "content": "say {\"x\": 1}"}],
            "stream": True}
    meta = {"turn_id": "t1", "x-codex-turn-metadata": json.dumps({"a": {"b": "}"}}),
            "session_id": "s"}
    one = json.dumps({**base, "client_metadata": meta}).encode()
    two = json.dumps({**base, "client_metadata": dict(reversed(meta.items()))}).encode()
    assert one != two and body_digest(one) == body_digest(two)
    other = json.dumps({**base, "input": "else", "client_metadata": meta}).encode()
    assert body_digest(other) != body_digest(one)
    mem = RetryMemory(ttl=60)
    assert mem.lookup("s", one) is None
    mem.record("s", one, "a", "status_500")
    hit = mem.lookup("s", two)
    assert hit is not None and hit.providers == ["a"] and mem.lookup("t", two) is None


async def test_breaker_shared_between_replicas_over_redis() -> None:
    url = services.redis_url()
    with services.redis_namespace(url) as prefix:
        changes: list[tuple[str, State, State, str]] = []
        cfg = BreakerSettings(failures=2, window_seconds=30, open_seconds=2, sync_seconds=0.05)

        def board(name: str) -> BreakerBoard:
            return BreakerBoard(cfg, [("p", "k")],
                                lambda b, old, new, why: changes.append((name, old, new, why)),
                                redis_url=url, prefix=prefix)

        one, two = board("one"), board("two")
        one.start()
        two.start()
        try:
            # One failure on each replica: neither reaches 2 alone; the shared count does.
            one.failure("p", "k", "status_500")
            await asyncio.sleep(0.1)
            two.failure("p", "k", "status_500")
            for _ in range(100):
                if one.get("p", "k").state == "open" and two.get("p", "k").state == "open":
                    break
                await asyncio.sleep(0.02)
            assert one.get("p", "k").state == "open", changes
            assert two.get("p", "k").state == "open", changes
            assert not one.available("p", "k")
            assert one.redis_ok and two.redis_ok
            # The open key expires when the breaker would half-open.
            await asyncio.sleep(2.1)
            assert one.available("p", "k") and two.available("p", "k")
        finally:
            await one.stop()
            await two.stop()


async def test_breaker_without_redis_stays_local() -> None:
    cfg = BreakerSettings(failures=1, open_seconds=1)
    board = BreakerBoard(cfg, [("p", "k")], lambda *a: None,
                         redis_url="redis://127.0.0.1:1/0", prefix="x:")
    board.start()
    try:
        board.failure("p", "k", "connect_error")
        assert board.get("p", "k").state == "open"
        await asyncio.sleep(0.2)
        assert board.redis_ok is False, "Redis down: noticed, local breakers only"
    finally:
        await board.stop()


def test_failover_and_breaker_changes_are_metrics_and_span_events() -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agent_egress.addon.call import Call
    from agent_egress.addon.failover import Attempt, FailoverState
    from agent_egress.addon.policy import FailoverSettings, Provider
    from agent_egress.exporters.otel import CallTrace, SessionTracer, build_tracer_provider
    from agent_egress.exporters.prometheus import Metrics

    metrics = Metrics()
    pa, pb = (Provider(name=n, base_url=f"http://{n}.internal/v1", key="k") for n in "ab")
    state = FailoverState(FailoverSettings(breaker=BreakerSettings(failures=1)),
                          {"a": pa, "b": pb}, metrics)
    failed = Call(api="openai.responses", session_id="s1")
    state.failed(failed, Attempt(pa, "k", ["a", "b"], "s1", b"{}", ("a.internal", 80)),
                 "status_500")
    retry = Call(api="openai.responses", session_id="s1")
    state.failover(retry, "a", "b", "status_500")
    sample = metrics.registry.get_sample_value
    assert sample("agent_egress_breaker_state", {"provider": "a", "key": "k"}) == 2
    assert sample("agent_egress_breaker_state", {"provider": "b", "key": "k"}) == 0
    assert sample("agent_egress_failovers_total", {"from_provider": "a", "to_provider": "b",
                                                   "reason": "status_500"}) == 1

    provider = build_tracer_provider(exporter="none", sample_ratio=1.0)
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = SessionTracer(provider)
    for n, c in enumerate((failed, retry)):
        tracer.record(CallTrace(
            request_id=c.request_id, session_id="s1", turn_id="t1", start_ns=n * 10**9,
            first_byte_ns=None, end_ns=n * 10**9 + 1, api=c.api, provider="ab"[n],
            provider_kind="openai", server_address=None, server_port=None,
            request_model="gpt-5.5", response_model=None, response_id=None, finish_reasons=(),
            usage=None, usage_estimated=False, cost_usd=None, org="o", team="t", user="u",
            key_id="key", status_code=500 if n == 0 else 200,
            outcome="upstream_error" if n == 0 else "ok", error_type=None, tool_calls=(),
            tool_output_ids=(), traceparent=None, events=tuple(c.route_events)))
    chat = sorted((s for s in spans.get_finished_spans() if s.name.startswith("chat")),
                  key=lambda s: s.start_time or 0)
    assert [(e.name, dict(e.attributes or {})) for e in chat[0].events] == [
        ("agent_egress.breaker", {"provider": "a", "key": "k", "from_state": "closed",
                                  "to_state": "open", "reason": "status_500"})]
    assert [(e.name, dict(e.attributes or {})) for e in chat[1].events] == [
        ("agent_egress.failover", {"from_provider": "a", "to_provider": "b",
                                   "reason": "status_500"})]


def test_provider_paths_per_kind() -> None:
    from agent_egress.addon.policy import Provider
    from agent_egress.addon.route import provider_path

    classic = Provider(name="az", kind="azure_openai", key="k", api_version="2025-04-01-preview",
                       base_url="https://acme.openai.azure.com/openai", models={"gpt-5*": "dep"})
    v1 = Provider(name="az1", kind="azure_openai", key="k",
                  base_url="https://acme.openai.azure.com/openai/v1")
    plain = Provider(name="vllm", kind="openai_compatible", key="k", chat_only=True,
                     base_url="http://vllm:8000/v1")
    dep = classic.model_for("gpt-5.5")
    assert dep == "dep" and classic.model_for("o3") == "o3"
    assert provider_path(classic, "/openai", "/v1/chat/completions", "openai.chat", dep,
                         False) == ("/openai/deployments/dep/chat/completions"
                                    "?api-version=2025-04-01-preview")
    assert provider_path(classic, "/openai", "/v1/responses", "openai.responses", dep,
                         False) == "/openai/responses?api-version=2025-04-01-preview"
    assert provider_path(v1, "/openai/v1", "/v1/responses", "openai.responses", "m",
                         False) == "/openai/v1/responses"
    assert provider_path(plain, "/v1", "/v1/responses", "openai.responses", "m",
                         True) == "/v1/chat/completions"

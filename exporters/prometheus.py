"""Prometheus metrics for the gateway (served on the admin listener at /metrics).

Labels are bounded: org, team, provider, model (only models with a known price
keep their name; anything else is "other"), api, outcome. Never a session id,
user-supplied free text or a token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        call = ["org", "team", "provider", "model", "api", "agent", "outcome"]
        money = ["org", "team", "provider", "model"]
        self.calls = Counter("agent_egress_model_calls", "Model calls settled.", call, registry=r)
        self.cost = Counter("agent_egress_cost_usd", "Cost of model calls in USD.",
                            [*money, "agent"], registry=r)
        self.tokens = Counter("agent_egress_tokens", "Tokens by type.", [*money, "type"],
                              registry=r)
        self.unpriced = Counter("agent_egress_unpriced_calls",
                                "Calls whose model has no price (recorded, not charged $0).",
                                ["provider", "model"], registry=r)
        self.estimated = Counter("agent_egress_estimated_usage_calls",
                                 "Calls charged an estimate because usage never arrived.",
                                 ["provider"], registry=r)
        self.refusals = Counter("agent_egress_refusals", "Requests refused by the gateway.",
                                ["rule"], registry=r)
        self.ttfb = Histogram("agent_egress_time_to_first_byte_seconds",
                              "Request start to first response byte from the provider.",
                              ["provider", "model"], buckets=_LAT_BUCKETS, registry=r)
        self.duration = Histogram("agent_egress_request_duration_seconds",
                                  "Request start to end of response.",
                                  ["provider", "model", "api"], buckets=_LAT_BUCKETS,
                                  registry=r)
        self.overhead = Histogram("agent_egress_gateway_overhead_seconds",
                                  "Time spent in the gateway's own hooks and stream tap per call.",
                                  ["api"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
                                  registry=r)
        self.inflight = Gauge("agent_egress_inflight_calls", "Model calls in flight.",
                              registry=r)
        # budgets and rate limits (issue 5): one series per configured budget
        budget = ["scope_kind", "scope", "period", "mode"]
        self.budget_limit_usd = Gauge("agent_egress_budget_limit_usd",
                                      "Budget limit per scope and period.", budget, registry=r)
        self.budget_spent_usd = Gauge("agent_egress_budget_spent_usd",
                                      "Spend in the budget's current period.", budget,
                                      registry=r)
        self.budget_reserved_usd = Gauge("agent_egress_budget_reserved_usd",
                                         "Reserved by calls in flight.", budget, registry=r)
        self.budget_remaining_usd = Gauge("agent_egress_budget_remaining_usd",
                                          "Limit minus spent minus reserved.", budget,
                                          registry=r)
        self.budget_limit_tokens = Gauge("agent_egress_budget_limit_tokens",
                                         "Token budget limit per scope and period.", budget,
                                         registry=r)
        self.budget_spent_tokens = Gauge("agent_egress_budget_spent_tokens",
                                         "Tokens used in the budget's current period.", budget,
                                         registry=r)
        self.budget_remaining_tokens = Gauge("agent_egress_budget_remaining_tokens",
                                             "Token limit minus used minus reserved.", budget,
                                             registry=r)
        self.budget_exceeded = Counter("agent_egress_budget_exceeded",
                                       "Budgets whose spend passed their limit (soft: alert"
                                       " only; hard: calls now refused).", budget, registry=r)
        self.limits_degraded = Gauge("agent_egress_limits_degraded",
                                     "1 while Redis is unreachable and limits are counted"
                                     " in-process (fail open) or refused (fail closed).",
                                     registry=r)
        # failover (issue 8)
        self.failovers = Counter("agent_egress_failovers",
                                 "Calls sent to another provider than the preferred one.",
                                 ["from_provider", "to_provider", "reason"], registry=r)
        self.breaker_state = Gauge("agent_egress_breaker_state",
                                   "Circuit breaker per provider key: 0 closed, 1 half-open,"
                                   " 2 open.", ["provider", "key"], registry=r)
        self.breaker_changes = Counter("agent_egress_breaker_transitions",
                                       "Circuit breaker state changes.",
                                       ["provider", "key", "to_state"], registry=r)
        self.stream_cuts = Counter("agent_egress_stream_cuts",
                                   "Upstream streams that ended before completing, by reason.",
                                   ["provider", "reason"], registry=r)
        # guardrails (issue 6): rule is the check and rule name (e.g. secrets.aws_access_key),
        # bounded by the config; never the matched text
        self.guardrail_hits = Counter("agent_egress_guardrail_hits",
                                      "Guardrail findings, by rule, action and direction.",
                                      ["rule", "action", "direction", "team"], registry=r)
        # telemetry (issue 7): spans and audit events lost, read live from the exporters
        self.telemetry_drops = TelemetryDrops()
        r.register(self.telemetry_drops)


# telemetry (issue 7) ---------------------------------------------------------------
class TelemetryDrops(Collector):
    """``agent_egress_telemetry_dropped_total{kind}``: telemetry lost so requests never wait.

    The exporters keep plain integer counts (their hot paths must not touch a
    metrics lock); this collector reads them at scrape time. Both kinds are always
    exported, at 0 until something is lost, so the alert has a series to watch.
    """

    KINDS = ("spans", "audit")

    def __init__(self) -> None:
        self._sources: dict[str, list[Callable[[], int]]] = {k: [] for k in self.KINDS}

    def add(self, kind: str, source: Callable[[], int]) -> None:
        self._sources[kind].append(source)

    def value(self, kind: str) -> int:
        return sum(src() for src in self._sources[kind])

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily("agent_egress_telemetry_dropped",
                                    "Spans (or calls whose spans were lost) and audit events"
                                    " dropped.", labels=["kind"])]

    def collect(self) -> Iterable[Metric]:
        fam = CounterMetricFamily("agent_egress_telemetry_dropped",
                                  "Spans (or calls whose spans were lost) and audit events"
                                  " dropped.", labels=["kind"])
        for kind in self.KINDS:
            fam.add_metric([kind], self.value(kind))
        yield fam

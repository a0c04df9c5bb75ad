"""Prometheus metrics for the gateway (served on the admin listener at /metrics).

Labels are bounded: org, team, provider, model (only models with a known price
keep their name; anything else is "other"), api, outcome. Never a session id,
user-supplied free text or a token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        call = ["org", "team", "provider", "model", "api", "agent", "outcome"]
        money = ["org", "team", "provider", "model"]
        self.calls = Counter("agent_egress_model_calls", "Model calls settled.", call, registry=r)
        self.cost = Counter("agent_egress_cost_usd", "Cost of model calls in USD.", money,
                            registry=r)
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
                              ["provider"], buckets=_LAT_BUCKETS, registry=r)
        self.duration = Histogram("agent_egress_request_duration_seconds",
                                  "Request start to end of response.", ["provider", "api"],
                                  buckets=_LAT_BUCKETS, registry=r)
        self.overhead = Histogram("agent_egress_gateway_overhead_seconds",
                                  "Time spent in the gateway's own hooks and stream tap per call.",
                                  ["api"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
                                  registry=r)
        self.inflight = Gauge("agent_egress_inflight_calls", "Model calls in flight.",
                              registry=r)

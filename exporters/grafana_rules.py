"""Prometheus recording and alert rules, generated from one small spec (Sloth/Pyrra style).

Why generated: the burn-rate alerts are four window pairs x two scope kinds of nearly
identical PromQL; writing them by hand is how one of eight ends up with a wrong factor.
The committed `grafana/alerts/agent-egress.rules.yml` is this module's output
(`agent-egress grafana generate`), and a test regenerates it and fails on any diff.

Budget burn rate (DESIGN §7): spend rate / (monthly budget / 30 days). A burn rate of 1
spends exactly the monthly budget in 30 days; 14.4 spends 2 % of it in one hour. Spend
comes from `agent_egress_cost_usd_total` (labels org, team) and the budget from the
`agent_egress_budget_limit_usd{period="monthly"}` gauge, whose `scope` label
("team:acme/payments", "org:acme") is split into org and team to join the two. User and
key budgets get no burn-rate alert: the cost metric carries no user or key label (kept
bounded on purpose); they still get the exhausted / soft-crossed alerts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

MONTH_SECONDS = 30 * 86_400
"""The SRE workbook's 30-day budget period; calendar months of 28-31 days differ by < 7 %."""


@dataclass(frozen=True, slots=True)
class BurnWindow:
    """One multiwindow pair: alert when both windows burn faster than `factor`."""

    long: str
    short: str
    factor: float
    severity: str
    name: str


@dataclass(frozen=True, slots=True)
class ScopeKind:
    kind: str
    """The budget gauge's scope_kind label."""
    by: tuple[str, ...]
    """Labels of the cost metric that identify one such scope."""
    split: tuple[tuple[str, str], ...]
    """(label, regex over the budget's `scope` label) pairs that rebuild `by`."""


@dataclass(frozen=True, slots=True)
class Spec:
    burn_windows: tuple[BurnWindow, ...] = (
        BurnWindow("1h", "5m", 14.4, "page", "Fast"),
        BurnWindow("6h", "30m", 6.0, "page", "Medium"),
        BurnWindow("1d", "2h", 3.0, "ticket", "Slow"),
        BurnWindow("3d", "6h", 1.0, "ticket", "Slower"),
    )
    scopes: tuple[ScopeKind, ...] = (
        ScopeKind("team", ("org", "team"),
                  (("org", "team:([^/]+)/.+"), ("team", "team:[^/]+/(.+)"))),
        ScopeKind("org", ("org",), (("org", "org:(.+)"),)),
    )
    error_ratio: float = 0.05
    """Share of settled model calls that failed at the provider, per provider, over 5m."""
    not_errors: tuple[str, ...] = ("ok", "budget_cutoff")
    """Outcomes that are no provider error (budget_cutoff is our own policy cutting a
    stream). `failover` counts: that provider failed and the retry went elsewhere."""
    error_for: str = "10m"
    ttft_p95_seconds: float = 15.0
    """p95 time to first byte per provider; reasoning models think before the first token."""
    ttft_for: str = "10m"
    evaluation_interval: str = "30s"
    telemetry_drops_for: str = "10m"
    """How long spans or audit events must keep being dropped before a ticket."""


SPEC = Spec()


def _by(labels: tuple[str, ...]) -> str:
    return ", ".join(labels)


def cost_rate_record(scope: ScopeKind, window: str) -> str:
    return f"agent_egress_{scope.kind}:cost_usd:rate{window}"


def budget_record(scope: ScopeKind) -> str:
    return f"agent_egress_{scope.kind}:budget_monthly_usd:max"


def burn_record(scope: ScopeKind, window: str) -> str:
    return f"agent_egress_{scope.kind}:budget_burn_rate:rate{window}"


def windows(spec: Spec) -> list[str]:
    """Every window any burn alert needs, shortest first (for the recording rules)."""
    seconds = {"m": 60, "h": 3600, "d": 86_400}
    ws = {w for b in spec.burn_windows for w in (b.long, b.short)}
    return sorted(ws, key=lambda w: int(w[:-1]) * seconds[w[-1]])


def _budget_expr(scope: ScopeKind) -> str:
    expr = (f'agent_egress_budget_limit_usd{{scope_kind="{scope.kind}",'
            f'period="monthly"}}')
    for label, regex in scope.split:
        expr = f'label_replace({expr}, "{label}", "$1", "scope", "{regex}")'
    # max: every replica exports the same gauge; mode rides along for the alert labels
    return f"max by ({_by((*scope.by, 'mode'))}) ({expr})"


def recording_rules(spec: Spec = SPEC) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for scope in spec.scopes:
        rules.append({"record": budget_record(scope), "expr": _budget_expr(scope)})
        for w in windows(spec):
            rules.append({"record": cost_rate_record(scope, w),
                          "expr": f"sum by ({_by(scope.by)}) "
                                  f"(rate(agent_egress_cost_usd_total[{w}]))"})
            # cost per second x 30 days / monthly budget; group_right keeps `mode`
            rules.append({"record": burn_record(scope, w),
                          "expr": f"{cost_rate_record(scope, w)} * {MONTH_SECONDS}"
                                  f" / on ({_by(scope.by)}) group_right()"
                                  f" {budget_record(scope)}"})
    return rules


def _who(scope: ScopeKind) -> str:
    return "/".join("{{ $labels.%s }}" % label for label in scope.by)  # noqa: UP031


def burn_alerts(spec: Spec = SPEC) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = []
    for scope in spec.scopes:
        for b in spec.burn_windows:
            f = f"{b.factor:g}"
            alerts.append({
                "alert": f"AgentEgressBudgetBurn{b.name}",
                "expr": f"{burn_record(scope, b.long)} > {f}\n"
                        f"and on ({_by((*scope.by, 'mode'))})\n"
                        f"{burn_record(scope, b.short)} > {f}",
                "labels": {"severity": b.severity, "scope_kind": scope.kind,
                           "long_window": b.long, "short_window": b.short},
                "annotations": {
                    "summary": f"{scope.kind} {_who(scope)} is spending its monthly budget"
                               f" {f}x too fast",
                    "description": f"Over the last {b.long} (and still in the last {b.short})"
                                   f" {scope.kind} {_who(scope)} spent at"
                                   " {{ $value | printf \"%.1f\" }}x the pace that uses its"
                                   " monthly budget ({{ $labels.mode }}) in 30 days. At"
                                   f" {f}x the budget is gone in"
                                   f" {30 / b.factor:.1f} days.",
                },
            })
    return alerts


def other_alerts(spec: Spec = SPEC) -> list[dict[str, Any]]:
    exhausted = (
        "max by (scope_kind, scope, period) (agent_egress_budget_remaining_usd{mode=\"hard\"})"
        " <= 0\nor\nmax by (scope_kind, scope, period)"
        " (agent_egress_budget_remaining_tokens{mode=\"hard\"}) <= 0")
    soft = (
        "max by (scope_kind, scope, period) (agent_egress_budget_spent_usd{mode=\"soft\"}"
        " - agent_egress_budget_limit_usd{mode=\"soft\"}) >= 0\nor\n"
        "max by (scope_kind, scope, period) (agent_egress_budget_spent_tokens{mode=\"soft\"}"
        " - agent_egress_budget_limit_tokens{mode=\"soft\"}) >= 0\nor\n"
        "sum by (scope_kind, scope, period)"
        " (increase(agent_egress_budget_exceeded_total{mode=\"soft\"}[1h])) > 0")
    errors = (
        "sum by (provider) (rate(agent_egress_model_calls_total"
        f"{{outcome!~\"{'|'.join(spec.not_errors)}\"}}[5m]))\n/\n"
        "sum by (provider) (rate(agent_egress_model_calls_total[5m]))\n"
        f"> {spec.error_ratio:g}")
    ttft = (
        "histogram_quantile(0.95, sum by (provider, le)"
        " (rate(agent_egress_time_to_first_byte_seconds_bucket[5m])))\n"
        f"> {spec.ttft_p95_seconds:g}")
    return [
        {"alert": "AgentEgressBudgetExhausted", "expr": exhausted,
         "labels": {"severity": "ticket"},
         "annotations": {
             "summary": "{{ $labels.scope }} has used its {{ $labels.period }} hard budget",
             "description": "Calls charged to {{ $labels.scope }} are refused with"
                            " budget_exceeded until the {{ $labels.period }} period resets"
                            " or an admin raises the limit."}},
        {"alert": "AgentEgressSoftBudgetCrossed", "expr": soft,
         "labels": {"severity": "ticket"},
         "annotations": {
             "summary": "{{ $labels.scope }} passed its {{ $labels.period }} soft budget",
             "description": "Soft budgets only alert: calls still go through."}},
        {"alert": "AgentEgressErrorRate", "expr": errors, "for": spec.error_for,
         "labels": {"severity": "page"},
         "annotations": {
             "summary": "{{ $labels.provider }}: {{ $value | humanizePercentage }} of model"
                        " calls fail",
             "description": f"More than {spec.error_ratio:.0%} of settled calls to"
                            " {{ $labels.provider }} ended in an upstream error, a cut"
                            " stream, a failed response or a failover over 5m."}},
        {"alert": "AgentEgressTTFTHigh", "expr": ttft, "for": spec.ttft_for,
         "labels": {"severity": "ticket"},
         "annotations": {
             "summary": "{{ $labels.provider }}: p95 time to first token"
                        " {{ $value | humanizeDuration }}",
             "description": f"p95 time to first byte above {spec.ttft_p95_seconds:g} s"
                            f" for {spec.ttft_for}."}},
        {"alert": "AgentEgressLimitsDegraded",
         "expr": "max(agent_egress_limits_degraded) > 0", "for": "1m",
         "labels": {"severity": "page"},
         "annotations": {
             "summary": "Redis unreachable: budgets and rate limits are degraded",
             "description": "With on_redis_down: open limits are counted per replica (N"
                            " replicas may spend N x a budget); with closed, calls are"
                            " refused with 503."}},
        {"alert": "AgentEgressBreakerOpen",
         "expr": "max by (provider, key) (agent_egress_breaker_state) >= 2", "for": "5m",
         "labels": {"severity": "ticket"},
         "annotations": {
             "summary": "Circuit breaker open for {{ $labels.provider }} key {{ $labels.key }}",
             "description": "Calls are routed to the fallback provider while it stays open."}},
        # telemetry (issue 7): a one-off blip (collector restart) stays quiet; steady loss
        # (collector down, audit disk full) does not
        {"alert": "AgentEgressTelemetryDropped",
         "expr": "sum by (kind) (rate(agent_egress_telemetry_dropped_total[5m])) > 0",
         "for": spec.telemetry_drops_for,
         "labels": {"severity": "ticket"},
         "annotations": {
             "summary": "Telemetry is being dropped: {{ $labels.kind }}",
             "description": "The gateway keeps serving but loses {{ $labels.kind }}"
                            " (spans: the trace collector is down or too slow; audit: the"
                            " audit log cannot be written) for " + spec.telemetry_drops_for
                            + "; check the gateway log and the collector."}},
    ]


def rules_document(spec: Spec = SPEC) -> dict[str, Any]:
    # one group: rules in a group run in order, so the burn alerts read this evaluation's
    # recorded rates (separate groups run in no fixed order and may read the previous one)
    return {"groups": [
        {"name": "agent-egress.budget-burn", "interval": spec.evaluation_interval,
         "rules": recording_rules(spec) + burn_alerts(spec)},
        {"name": "agent-egress.alerts", "interval": spec.evaluation_interval,
         "rules": other_alerts(spec)},
    ]}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the committed YAML reads like PromQL."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = "# Generated by `agent-egress grafana generate` from exporters/grafana_rules.py.\n" \
         "# Do not edit: change the spec and regenerate (a test fails on any diff).\n"


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000)


def render(spec: Spec = SPEC) -> str:
    return HEADER + dump(rules_document(spec))


def all_exprs(spec: Spec = SPEC) -> dict[str, str]:
    """Rule name -> expression, for tests that run every one against a real Prometheus."""
    out: dict[str, str] = {}
    for group in rules_document(spec)["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            key = name if name not in out else f"{name}#{len(out)}"
            out[key] = rule["expr"]
    return out

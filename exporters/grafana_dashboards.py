"""Grafana dashboards as code (grafana-foundation-sdk, the Grafana 11.6 build).

Four dashboards: Cost, Latency & reliability, Sessions, Guardrails. The committed JSON in
`grafana/dashboards/` is this module's output (`agent-egress grafana generate`); a test
regenerates it and fails on any diff, and another runs every Prometheus query against a
Prometheus that scraped a real gateway.

Where the data lives decides the data source. Prometheus has only bounded labels (org,
team, provider, model, api, agent, outcome: DESIGN §7), so anything per user or per
session (top users, top sessions, turns per session) is read from the ledger table in
PostgreSQL, and tool executions from the `execute_tool` spans in Tempo.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    dashboard,
    prometheus,
    stat,
    statetimeline,
    table,
    tempo,
    timeseries,
)
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as prom_models

PROM = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
LEDGER = dm.DataSourceRef(type_val="grafana-postgresql-datasource", uid="${ledger}")
TRACES = dm.DataSourceRef(type_val="tempo", uid="${traces}")

F = 'org=~"$org",team=~"$team",model=~"$model"'
"""The org/team/model filter every Prometheus query carrying those labels applies."""
SQL_F = ("org ~ ('^(' || ${org:sqlstring} || ')$') AND team ~ ('^(' || ${team:sqlstring} || ')$')"
         " AND coalesce(served_model, 'other') ~ ('^(' || ${model:sqlstring} || ')$')")
"""The same filter on the ledger ("All" is the regex .*). sqlstring: Grafana quotes the value
and doubles any quote in it, so a label value cannot break out of the SQL literal."""

Panel = cogbuilder.Builder[dm.Panel]


class SqlQuery(cogvariants.Dataquery):
    """A raw-SQL target for Grafana's PostgreSQL data source (the SDK ships no builder).
    `$FILTER` in the text becomes SQL_F; Grafana expands its macros and variables."""

    def __init__(self, ref_id: str, sql: str, fmt: str = "table") -> None:
        self.ref_id, self.sql, self.fmt = ref_id, sql.replace("$FILTER", SQL_F), fmt

    def to_json(self) -> dict[str, Any]:
        return {"refId": self.ref_id, "datasource": LEDGER.to_json(), "editorMode": "code",
                "format": self.fmt, "rawQuery": True, "rawSql": self.sql}


class Sql(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, ref_id: str, sql: str, fmt: str = "table") -> None:
        self._q = SqlQuery(ref_id, sql, fmt)

    def build(self) -> cogvariants.Dataquery:
        return self._q


def prom(expr: str, legend: str = "", ref: str = "A", instant: bool = False,
         exemplars: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).legend_format(legend or "__auto")
    if instant:
        q = q.instant().format(prom_models.PromQueryFormat.TABLE)
    else:
        q = q.range()
    return q.exemplar(exemplars)


def _quantiles(metric: str, by: str, legend: str, match: str = ""
               ) -> list[prometheus.Dataquery]:
    return [prom(f"histogram_quantile({q}, sum by ({by}, le) "
                 f"(rate({metric}_bucket{{{match}}}[$__rate_interval])))",
                 f"p{int(q * 100)} {legend}", ref, exemplars=True)
            for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))]


def ts(title: str, desc: str, unit: str, targets: Iterable[cogbuilder.Builder[Any]],
       w: int = 12, h: int = 8, stack: bool = False) -> Panel:
    p = (timeseries.Panel().title(title).description(desc).unit(unit).datasource(PROM)
         .span(w).height(h).fill_opacity(10)
         .legend(common.VizLegendOptions().display_mode(common_models.LegendDisplayMode.TABLE)
                 .placement(common_models.LegendPlacement.BOTTOM).show_legend(True)
                 .calcs(["mean", "max", "lastNotNull"])))
    if stack:
        p = p.stacking(common.StackingConfig().mode(common_models.StackingMode.NORMAL))
    for t in targets:
        p = p.with_target(t)
    return p


def stat_panel(title: str, desc: str, unit: str, target: cogbuilder.Builder[Any],
               w: int = 6, h: int = 5, time_from: str | None = None) -> Panel:
    p = (stat.Panel().title(title).description(desc).unit(unit).datasource(PROM)
         .span(w).height(h).decimals(2).with_target(target)
         .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"])))
    return p.time_from(time_from) if time_from else p


def bars(title: str, desc: str, unit: str, target: cogbuilder.Builder[Any], w: int = 12,
         h: int = 8, time_from: str | None = None) -> Panel:
    p = (bargauge.Panel().title(title).description(desc).unit(unit).datasource(PROM)
         .span(w).height(h).with_target(target)
         .orientation(common_models.VizOrientation.HORIZONTAL)
         .display_mode(common_models.BarGaugeDisplayMode.BASIC)
         .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"])))
    return p.time_from(time_from) if time_from else p


def sql_table(title: str, desc: str, unit: str, sql: str, w: int = 24, h: int = 9,
              links: list[dashboard.DashboardLink] | None = None) -> Panel:
    p = (table.Panel().title(title).description(desc).unit("short").datasource(LEDGER)
         .span(w).height(h).with_target(Sql("A", sql))
         .override_by_name("cost_usd", [dm.DynamicConfigValue(id_val="unit", value=unit)]))
    if links:
        p = p.override_by_name("session", [dm.DynamicConfigValue(
            id_val="links", value=[link.build().to_json() for link in links])])
    return p


def variables(d: dashboard.Dashboard, ledger: bool = False,
              traces: bool = False) -> dashboard.Dashboard:
    d = d.with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus")
                        .type("prometheus"))
    if ledger:
        d = d.with_variable(dashboard.DatasourceVariable("ledger").label("Ledger (PostgreSQL)")
                            .type("grafana-postgresql-datasource"))
    if traces:
        d = d.with_variable(dashboard.DatasourceVariable("traces").label("Traces (Tempo)")
                            .type("tempo"))
    sel = "agent_egress_model_calls_total"
    for name, query in (("org", f"label_values({sel}, org)"),
                        ("team", f'label_values({sel}{{org=~"$org"}}, team)'),
                        ("model", f'label_values({sel}{{org=~"$org",team=~"$team"}}, model)')):
        d = d.with_variable(
            dashboard.QueryVariable(name).label(name.capitalize()).datasource(PROM)
            .query(query).refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True).all_value(".*").multi(False)
            .current(dm.VariableOption(selected=True, text="All", value="$__all")))
    return d


def base(uid: str, title: str, desc: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(title).uid(uid).description(desc)
            .tags(["agent-egress"]).refresh("1m").time("now-24h", "now").timezone("browser")
            .editable().link(dashboard.DashboardLink("agent-egress").type(
                dm.DashboardLinkType.DASHBOARDS).tags(["agent-egress"]).as_dropdown(True)
                .include_vars(True).keep_time(True)))


# -- Cost ---------------------------------------------------------------------------------

def cost() -> dashboard.Dashboard:
    c = f"agent_egress_cost_usd_total{{{F}}}"
    tok = f"agent_egress_tokens_total{{{F}}}"
    budget = 'period="monthly"'
    d = variables(base("agent-egress-cost", "agent-egress / Cost",
                       "What the coding agents cost: by org, team, model and user, against"
                       " budgets."), ledger=True)
    panels: list[Panel] = [
        stat_panel("Spend today", "USD spent since midnight (dashboard time zone) for the"
                   " selected org, team and model; Prometheus increase(), so a close"
                   " estimate: the ledger (finance report) is exact.", "currencyUSD",
                   prom(f"sum(increase({c}[$__range]))", instant=True), time_from="now/d"),
        stat_panel("Spend month to date", "USD spent since the first of the month.",
                   "currencyUSD", prom(f"sum(increase({c}[$__range]))", instant=True),
                   time_from="now/M"),
        stat_panel("Cache-hit ratio", "Cached input tokens / all input tokens over the"
                   " dashboard range: how much of the resent history the provider served"
                   " from its prompt cache (cheaper).", "percentunit",
                   prom(f'sum(increase({tok[:-1]},type="cached_input"}}[$__range])) / '
                        f'sum(increase({tok[:-1]},type=~"input|cached_input"}}[$__range]))',
                        instant=True)),
        stat_panel("Calls unpriced", "Calls whose model has no price over the range"
                   " (recorded, not charged $0): add providers[].prices to the config.",
                   "short", prom("sum(increase(agent_egress_unpriced_calls_total[$__range]))"
                                 " or vector(0)", instant=True)),
        bars("Month to date by team", "USD since the first of the month per org/team.",
             "currencyUSD", prom(f"sort_desc(sum by (org, team) (increase({c}[$__range])))",
                                 "{{org}}/{{team}}", instant=True), w=8, time_from="now/M"),
        bars("Month to date by model", "USD since the first of the month per served model"
             " (models without a price are grouped as 'other').", "currencyUSD",
             prom(f"sort_desc(sum by (model) (increase({c}[$__range])))", "{{model}}",
                  instant=True), w=8, time_from="now/M"),
        bars("Today by org", "USD since midnight per org.", "currencyUSD",
             prom(f"sort_desc(sum by (org) (increase({c}[$__range])))", "{{org}}",
                  instant=True), w=8, time_from="now/d"),
        ts("Spend rate by team", "USD per hour, per org/team.", "currencyUSD",
           [prom(f"sum by (org, team) (rate({c}[$__rate_interval])) * 3600",
                 "{{org}}/{{team}}")], stack=True),
        ts("Spend rate by agent", "USD per hour by coding agent (codex, claude-code, other;"
           " from the client's originator / user agent).", "currencyUSD",
           [prom(f"sum by (agent) (rate({c}[$__rate_interval])) * 3600", "{{agent}}")],
           stack=True),
        bars("Budget remaining", "Remaining share of every configured budget in its current"
             " period (limit minus spent minus reserved, over the limit); user and key"
             " budgets included.", "percentunit",
             prom("min by (scope, period, mode) (agent_egress_budget_remaining_usd)"
                  " / max by (scope, period, mode) (agent_egress_budget_limit_usd)",
                  "{{scope}} {{period}} ({{mode}})", instant=True)),
        ts("Burn rate per team (monthly budget)", "Spend rate over the monthly budget's even"
           " pace (budget / 30 days): 1 uses the budget in 30 days; the fast page fires at"
           " 14.4 over 1h and 5m, the ticket at 1 over 3d and 6h.", "none",
           [prom('agent_egress_team:budget_burn_rate:rate1h{org=~"$org",team=~"$team"}',
                 "{{org}}/{{team}} 1h", "A"),
            prom('agent_egress_team:budget_burn_rate:rate6h{org=~"$org",team=~"$team"}',
                 "{{org}}/{{team}} 6h", "B")]),
        ts("Monthly budget spent", "Spent in the current month per budget (the gauge the"
           " gateway enforces: exact, not estimated).", "currencyUSD",
           [prom(f"max by (scope, mode) (agent_egress_budget_spent_usd{{{budget}}})",
                 "{{scope}} spent", "A"),
            prom(f"max by (scope, mode) (agent_egress_budget_limit_usd{{{budget}}})",
                 "{{scope}} limit", "B")]),
        ts("Tokens by type", "Tokens per second: input (not cached), cached input, cache"
           " writes, output (not reasoning) and reasoning.", "short",
           [prom(f"sum by (type) (rate({tok}[$__rate_interval]))", "{{type}}")],
           stack=True),
        sql_table("Top users", "Users by USD over the dashboard range, from the ledger"
                  " (Prometheus has no user label, on purpose).", "currencyUSD",
                  'SELECT "user", org, team, count(*) AS calls,'
                  " sum(input_tokens + output_tokens) AS tokens,"
                  " sum(cost_nano_usd) / 1e9 AS cost_usd FROM ledger"
                  " WHERE $__timeFilter(ts) AND $FILTER"
                  ' GROUP BY "user", org, team ORDER BY cost_usd DESC NULLS LAST LIMIT 20',
                  w=12),
    ]
    for p in panels:
        d = d.with_panel(p)
    return d


# -- Latency & reliability ---------------------------------------------------------------

def latency() -> dashboard.Dashboard:
    d = variables(base("agent-egress-latency", "agent-egress / Latency & reliability",
                       "Time to first token, duration, errors, refusals, failover and the"
                       " gateway's own overhead."))
    calls = f"agent_egress_model_calls_total{{{F}"
    panels: list[Panel] = [
        ts("Time to first token by model and provider", "p50/p95/p99 from request start to"
           " the provider's first byte (unpriced models are grouped as other); exemplars"
           " link to the session's trace.", "s",
           _quantiles("agent_egress_time_to_first_byte_seconds", "model, provider",
                      "{{model}} via {{provider}}", 'model=~"$model"')),
        ts("Duration by model, provider and API", "p50/p95/p99 from request start to the end"
           " of the response; exemplars link to the trace.", "s",
           _quantiles("agent_egress_request_duration_seconds", "model, provider, api",
                      "{{model}} via {{provider}} {{api}}", 'model=~"$model"')),
        ts("Calls by model and provider", "Settled model calls per second.", "reqps",
           [prom(f"sum by (model, provider) (rate({calls}}}[$__rate_interval]))",
                 "{{model}} via {{provider}}")]),
        ts("Errors by type", "Calls that did not end ok, per outcome (upstream_error,"
           " upstream_unreachable, stream_error, stream_cut, response_failed, failover, and"
           " budget_cutoff: our own budget cut, not a provider error), and upstream streams"
           " cut, per reason.", "reqps",
           [prom(f'sum by (outcome) (rate({calls},outcome!="ok"}}[$__rate_interval]))',
                 "{{outcome}}", "A"),
            prom("sum by (provider, reason) (rate(agent_egress_stream_cuts_total"
                 "[$__rate_interval]))", "cut {{provider}} {{reason}}", "B")], stack=True),
        ts("Refusals by rule", "Requests the gateway refused (never reached a provider), per"
           " rule: token, scope, budget, rate limit, guardrail...", "reqps",
           [prom("sum by (rule) (rate(agent_egress_refusals_total[$__rate_interval]))",
                 "{{rule}}")], stack=True),
        ts("Failovers", "Calls sent to another provider than the preferred one, per route"
           " and reason.", "reqps",
           [prom("sum by (from_provider, to_provider, reason)"
                 " (rate(agent_egress_failovers_total[$__rate_interval]))",
                 "{{from_provider}} -> {{to_provider}} ({{reason}})")]),
        (statetimeline.Panel().title("Circuit breaker state").description(
            "Per provider key: closed (0), half-open (1), open (2); worst replica shown.")
         .unit("none").datasource(PROM).span(12).height(8)
         .with_target(prom("max by (provider, key) (agent_egress_breaker_state)",
                           "{{provider}} {{key}}"))
         .mappings([dm.ValueMap({
             "0": dm.ValueMappingResult(text="closed", color="green"),
             "1": dm.ValueMappingResult(text="half-open", color="orange"),
             "2": dm.ValueMappingResult(text="open", color="red")})])),
        ts("Time in our hooks", "p50/p99 of the time spent in the gateway's own hooks and"
           " stream tap per call (the overhead we add), per API.", "s",
           _quantiles("agent_egress_gateway_overhead_seconds", "api", "{{api}}")[::2]),
        ts("In flight and degraded limits", "Model calls in flight per replica, and 1 while"
           " Redis is unreachable and budgets/rate limits are degraded.", "short",
           [prom("sum by (instance) (agent_egress_inflight_calls)", "in flight {{instance}}",
                 "A"),
            prom("max(agent_egress_limits_degraded)", "limits degraded", "B")]),
    ]
    for p in panels:
        d = d.with_panel(p)
    return d


# -- Sessions -----------------------------------------------------------------------------

def _trace_search_url(field: str) -> str:
    """Explore URL that finds the session's trace by gen_ai.conversation.id (the trace id is
    derived from the session id by the gateway, the ledger only has the session id)."""
    pane = {"t": {"datasource": "@DS@", "queries": [{
        "refId": "A", "queryType": "traceql", "datasource": {"type": "tempo", "uid": "@DS@"},
        "query": '{ span.gen_ai.conversation.id = "@SESSION@" }'}],
        "range": {"from": "@FROM@", "to": "@TO@"}}}
    url = quote(json.dumps(pane, separators=(",", ":")), safe="")
    # Grafana expands these variables in the link before the browser follows it
    for mark, var in (("DS", "${traces}"), ("FROM", "${__from}"), ("TO", "${__to}"),
                      ("SESSION", "${__data.fields." + field + ":percentencode}")):
        url = url.replace(f"%40{mark}%40", var)
    return "/explore?schemaVersion=1&panes=" + url


def sessions() -> dashboard.Dashboard:
    d = variables(base("agent-egress-sessions", "agent-egress / Sessions",
                       "Agent sessions: which cost most, how many turns and tool calls, and"
                       " how long tools ran. One session is one trace."),
                  ledger=True, traces=True)
    link = (dashboard.DashboardLink("Open the session's trace").url(_trace_search_url("session"))
            .target_blank(True))
    tool = '{ span.gen_ai.operation.name = "execute_tool" }'
    panels: list[Panel] = [
        sql_table("Top sessions by cost", "Sessions by USD over the dashboard range, from"
                  " the ledger; click a session to open its trace in Tempo.", "currencyUSD",
                  "SELECT session_id AS session, org, team, \"user\","
                  " count(DISTINCT turn_id) AS turns, count(*) AS model_calls,"
                  " sum(cost_nano_usd) / 1e9 AS cost_usd, min(ts) AS started,"
                  " max(ts) AS last_call FROM ledger"
                  " WHERE $__timeFilter(ts) AND session_id IS NOT NULL AND $FILTER"
                  ' GROUP BY session_id, org, team, "user"'
                  " ORDER BY cost_usd DESC NULLS LAST LIMIT 25", links=[link]),
        (timeseries.Panel().title("Turns and model calls per session").description(
            "Average turns (user prompts) and model calls per session that made a call in"
            " each interval, from the ledger.").unit("short").datasource(LEDGER).span(12)
         .height(8).with_target(Sql(
             "A", "SELECT $__timeGroupAlias(ts, $__interval),"
             " count(DISTINCT turn_id)::float / greatest(count(DISTINCT session_id), 1)"
             " AS turns_per_session,"
             " count(*)::float / greatest(count(DISTINCT session_id), 1)"
             " AS calls_per_session FROM ledger"
             " WHERE $__timeFilter(ts) AND session_id IS NOT NULL AND $FILTER"
             " GROUP BY 1 ORDER BY 1", "time_series"))),
        (table.Panel().title("Tool calls per session").description(
            "execute_tool spans (one per tool the agent ran, reconstructed from call ids;"
            " includes human approval time) counted per session over the range, from Tempo"
            " (TraceQL metrics, summed per series).").unit("short")
         .datasource(TRACES).span(12).height(8)
         .with_target(tempo.TempoQuery().ref_id("A").query_type("traceql").query(
             tool + " | count_over_time() by (span.gen_ai.conversation.id)"))
         .with_transformation(dm.DataTransformerConfig(
             id_val="reduce", options={"mode": "seriesToRows", "reducers": ["sum"]}))),
        (timeseries.Panel().title("Tool execution time by tool").description(
            "p50/p95 duration of execute_tool spans per tool name (TraceQL metrics: needs"
            " Tempo's local-blocks metrics processor, as in the compose stack).").unit("s")
         .datasource(TRACES).span(24).height(8)
         .with_target(tempo.TempoQuery().ref_id("A").query_type("traceql").query(
             tool + " | quantile_over_time(duration, .5, .95) by (span.gen_ai.tool.name)"))),
    ]
    for p in panels:
        d = d.with_panel(p)
    return d


# -- Guardrails ---------------------------------------------------------------------------

def guardrails() -> dashboard.Dashboard:
    d = variables(base("agent-egress-guardrails", "agent-egress / Guardrails",
                       "Guardrail findings (secrets, PII, injection, limits, custom rules) by"
                       " rule, action, direction and team. Never the matched text."))
    hits = 'agent_egress_guardrail_hits_total{team=~"$team"}'
    panels: list[Panel] = [
        ts("Hits by rule", "Findings per second per rule (check.rule).", "short",
           [prom(f"sum by (rule) (rate({hits}[$__rate_interval]))", "{{rule}}")],
           w=24, stack=True),
    ]
    for by, what in (("action", "block, redact or flag"),
                     ("direction", "input, tool_output or model_output"), ("team", "team"),
                     ("rule", "rule")):
        panels.append(bars(f"Total by {by}", f"Findings over the dashboard range per {what}.",
                           "short", prom(f"sort_desc(sum by ({by}) (increase({hits}"
                                         "[$__range])))", f"{{{{{by}}}}}", instant=True),
                           w=6))
    panels.append(ts("Blocked requests", "Requests refused by a guardrail block (400"
                     " guardrail_blocked, or a stream ended mid-way).", "reqps",
                     [prom('sum(rate(agent_egress_refusals_total{rule=~"guardrail.*"}'
                           "[$__rate_interval]))", "blocked")], w=24))
    for p in panels:
        d = d.with_panel(p)
    return d


@dataclass(frozen=True, slots=True)
class Generated:
    name: str
    """File name under grafana/dashboards/."""
    body: dict[str, Any]


def dashboards() -> list[Generated]:
    return [Generated(f"{fn.__name__}.json", json.loads(render(fn())))
            for fn in (cost, latency, sessions, guardrails)]


def render(d: dashboard.Dashboard) -> str:
    return json.dumps(d.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"

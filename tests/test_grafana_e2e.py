"""Every dashboard query and every rule expression runs against real data: a real Prometheus
(Debian package, loading our rules) scrapes a real gateway after a real Codex session, and
the ledger panels run on the gateway's real PostgreSQL ledger.

Each query must reference only metrics the gateway exports (so renaming a metric without
fixing a panel fails here) and must return data, except queries on the metrics listed in
MAY_BE_EMPTY, with the reason this run cannot fill them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import services
import yaml
from conftest import free_port, make_gateway, run_codex
from fakeprovider import FakeProvider

from agent_egress.addon.store.sql import SQLStore
from agent_egress.exporters import grafana_alerting, grafana_rules

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
RULES = ROOT / "grafana" / "alerts" / "agent-egress.rules.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
INTERVAL = "500ms"  # Prometheus' scrape and rule evaluation interval here
INTERVAL_S = 0.5

# Grafana's variables as the dashboards' defaults ("All") and a range covering the test.
PROM_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
             "$org": ".*", "$team": ".*", "$model": ".*"}
SQL_VARS = {"${org:sqlstring}": "'.*'", "${team:sqlstring}": "'.*'",
            "${model:sqlstring}": "'.*'", "$__interval": "'15 seconds'::interval"}

MAY_BE_EMPTY = {
    # metric -> why one Codex session through one provider leaves a query on it empty
    "agent_egress_failovers_total": "no failover configured: no provider failed over",
    "agent_egress_breaker_state": "no failover configured: no breaker exists",
    "agent_egress_stream_cuts_total": "no upstream stream was cut",
}
RULES_MAY_BE_EMPTY_PREFIXES = ("AgentEgress",)
"""Alert expressions return series only while firing; a healthy run fires none, so they
must run without error and reference exported metrics, not return data."""


class Prometheus:
    def __init__(self, tmp: Path, target: str, rule_file: Path) -> None:
        if not Path(PROMETHEUS).exists():
            pytest.fail("prometheus is not installed: scripts/test.sh installs it (Debian)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text(yaml.safe_dump({
            "global": {"scrape_interval": INTERVAL, "scrape_timeout": INTERVAL,
                       "evaluation_interval": INTERVAL},
            "rule_files": [str(rule_file)],
            "scrape_configs": [{"job_name": "agent-egress",
                                "static_configs": [{"targets": [target]}]}]}))
        self.http = httpx.Client(timeout=10)  # one connection for the ~150 queries
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    def query(self, q: str) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.url}/api/v1/query", params={"query": q})
        assert r.status_code == 200, f"{q}\n-> {r.status_code} {r.text}"
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def rule_groups(self) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.url}/api/v1/rules")
        assert r.status_code == 200, r.text
        groups: list[dict[str, Any]] = r.json()["data"]["groups"]
        return groups

    def evaluated_since(self, t: float) -> bool:
        """Every rule group has been evaluated (at least once) after the Unix time t."""
        groups = self.rule_groups()
        return bool(groups) and all(_unix(g["lastEvaluation"]) > t for g in groups)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        self.http.close()


def _unix(rfc3339: str) -> float:
    """Prometheus' timestamps (nanoseconds, Z) as Unix time."""
    m = re.fullmatch(r"(.+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert m, rfc3339
    whole = datetime.fromisoformat(m.group(1) + m.group(3).replace("Z", "+00:00"))
    return whole.timestamp() + float(f"0.{m.group(2) or 0}")


def exported_names(exposition: str) -> set[str]:
    """Sample names the gateway exports, from its # TYPE lines (also for families that have
    no sample yet, e.g. failovers before any failover)."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created")}
    names: set[str] = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        name, kind = m.group(1), m.group(2)
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + s for s in suffixes.get(kind, ("",)))
    return names


def metric_refs(expr: str) -> set[str]:
    return set(re.findall(r"\bagent_egress[a-zA-Z0-9_:]*", expr))


def substitute(text: str, variables: dict[str, str]) -> str:
    for k in sorted(variables, key=len, reverse=True):
        text = text.replace(k, variables[k])
    return text


def panel_queries() -> Iterator[tuple[str, str, str, str]]:
    """(dashboard, panel title, datasource type, query) for every target of every panel."""
    for path in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(path.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                kind = (t.get("datasource") or p["datasource"])["type"]
                q = t.get("expr") or t.get("rawSql") or t.get("query")
                yield d["title"], p["title"], kind, q


def pg_ledger(url: str, n: int, timeout: float = 10) -> list[Any]:
    store = SQLStore(url)
    try:
        deadline = time.monotonic() + timeout
        while len(rows := store.ledger_rows()) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        return rows
    finally:
        store.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with services.fresh_database() as url:
        yield url


@pytest.mark.codex
def test_every_panel_and_rule_runs_on_real_data(tmp_path: Path, fake: FakeProvider,
                                                pg_url: str) -> None:
    gw = make_gateway(
        tmp_path, fake.base_url, database_url=pg_url,
        budgets={"teams": {"acme/payments": [{"period": "monthly", "usd": "720"}]},
                 "orgs": {"acme": [{"period": "monthly", "usd": "1000", "mode": "soft"}]}},
        guardrails={"default": {"custom": [
            {"name": "tool-words", "keywords": ["tool"], "action": "flag",
             "directions": ["input"]},
            {"name": "no-launch-codes", "keywords": ["launch-codes"], "action": "block",
             "directions": ["input"]}]}})
    # the same rules, evaluated every INTERVAL instead of every 30 s
    doc = yaml.safe_load(RULES.read_text())
    for g in doc["groups"]:
        g["interval"] = INTERVAL
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump(doc))
    gw.start()
    prom = Prometheus(tmp_path, f"127.0.0.1:{gw.admin_port}", rule_file)
    try:
        token, _ = gw.issue_token(user="dana", team="payments", org="acme")
        res = run_codex(tmp_path, gw.base_url, token)
        assert res.returncode == 0, res.stderr[-2000:]
        # one refusal (malformed token) and one upstream error, for the reliability panels
        body = {"model": "gpt-5.5", "input": "hi", "stream": False}
        assert httpx.post(f"{gw.base_url}/responses", json=body, timeout=10,
                          headers={"authorization": "Bearer nope"}).status_code == 401
        blocked = {**body, "input": "print the launch-codes"}
        assert httpx.post(f"{gw.base_url}/responses", json=blocked, timeout=10,
                          headers={"authorization": f"Bearer {token}"}).status_code == 400
        fake.fail_next = [500]
        httpx.post(f"{gw.base_url}/responses", json=body, timeout=10,
                   headers={"authorization": f"Bearer {token}"})
        # one more priced call once Prometheus holds the session's cost, so rates are > 0
        # (two scrapes of it: the call below then lands in a later sample)
        deadline = time.monotonic() + 15
        while not prom.query("min(count_over_time(agent_egress_cost_usd_total[1m])) >= 2"
                             ) and time.monotonic() < deadline:
            time.sleep(0.1)
        # as Codex (originator header), so it adds to the session's cost series (agent label)
        assert httpx.post(f"{gw.base_url}/responses", json=body, timeout=10,
                          headers={"authorization": f"Bearer {token}",
                                   "originator": "codex_exec"}).status_code == 200
        rows = pg_ledger(pg_url, len(fake.requests_to("/v1/responses")))
        # wait until Prometheus has the last call and the rules evaluated twice since
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            n = prom.query("sum(agent_egress_model_calls_total)")
            burn = prom.query("agent_egress_team:budget_burn_rate:rate5m")
            if n and float(n[0]["value"][1]) >= len(rows) and burn:
                break
            time.sleep(0.1)
        # groups run every INTERVAL: one evaluation later than a full INTERVAL after now
        # means the one before it was after now too
        since = time.time() + INTERVAL_S
        while not prom.evaluated_since(since):
            assert time.monotonic() < deadline + 30, prom.rule_groups()
            time.sleep(0.1)
        exported = exported_names(httpx.get(f"{gw.admin_url}/metrics", timeout=5).text)
        recorded = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
        problems: list[str] = []
        checked = {"prometheus": 0, "sql": 0, "rules": 0}

        def check_promql(where: str, expr: str, need_data: bool) -> None:
            refs = metric_refs(expr)
            unknown = refs - exported - recorded
            if not refs or unknown:
                problems.append(f"{where}: references {sorted(unknown) or 'no metric'}")
                return
            result = prom.query(substitute(expr, PROM_VARS))
            if need_data and not result:
                problems.append(f"{where}: no data\n    {expr}")

        for dash, title, kind, q in panel_queries():
            where = f"{dash} / {title}"
            if kind == "prometheus":
                check_promql(where, q, not metric_refs(q) & MAY_BE_EMPTY.keys())
                checked["prometheus"] += 1
            elif kind == "grafana-postgresql-datasource":
                sql = substitute(q, SQL_VARS).replace(
                    "$__timeFilter(ts)", "ts > now() - interval '1 hour'").replace(
                    "$__timeGroupAlias(ts, '15 seconds'::interval)",
                    "date_bin('15 seconds', ts, timestamptz '2000-01-01') AS time")
                assert "$_" not in sql and "${" not in sql, sql
                with psycopg.connect(services._libpq(pg_url)) as conn:
                    got = conn.execute(sql).fetchall()  # type: ignore[arg-type]
                if not got:
                    problems.append(f"{where}: no rows")
                checked["sql"] += 1
            else:
                assert kind == "tempo"  # no Tempo here: checked only for the attribute names
                assert "gen_ai." in q
        # variables: label_values(metric, label) must name an exported metric with data
        for path in sorted(DASHBOARDS.glob("*.json")):
            for v in json.loads(path.read_text())["templating"]["list"]:
                if v["type"] == "query":
                    m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"])
                    assert m, v["query"]
                    check_promql(f"{path.name} ${v['name']}",
                                 f"group by ({m.group(2)}) ({m.group(1)})", True)
        # rules: as Prometheus loads them (recording rules must return data, alerts run),
        # and as Grafana-managed rules (recording rules inlined)
        for name, expr in grafana_rules.all_exprs().items():
            check_promql(f"rule {name}", expr,
                         not name.startswith(RULES_MAY_BE_EMPTY_PREFIXES))
            checked["rules"] += 1
        for group in grafana_alerting.grafana_rules():
            for rule in group["rules"]:
                check_promql(f"grafana rule {rule['title']}", rule["data"][0]["model"]["expr"],
                             False)
        for g in prom.rule_groups():
            for r in g["rules"]:
                if r["health"] != "ok":
                    problems.append(f"rule {r['name']}: {r['health']} {r.get('lastError')}")
        assert not problems, "\n".join(problems)
        assert checked["prometheus"] >= 30 and checked["sql"] == 3 and checked["rules"] >= 40
        # the burn rate is spend per hour over the even pace of 720 USD / 30 days (1 USD/h)
        assert sum(r.cost_usd for r in rows if r.cost_usd is not None) > 0
        burn = prom.query('agent_egress_team:budget_burn_rate:rate5m{team="payments"}')
        assert burn and burn[0]["metric"]["mode"] == "hard"
        assert float(burn[0]["value"][1]) > 0
        ratio = prom.query('agent_egress_team:budget_burn_rate:rate5m{team="payments"}'
                           ' / on (org, team) group_left()'
                           ' (agent_egress_team:cost_usd:rate5m * 3600)')
        assert float(ratio[0]["value"][1]) == pytest.approx(1.0)
    finally:
        prom.stop()
        gw.stop()


def test_renaming_a_metric_is_caught() -> None:
    """The reference check fails when a panel names a metric the gateway does not export."""
    exported = exported_names("# TYPE agent_egress_cost_usd counter\n"
                              "# TYPE agent_egress_request_duration_seconds histogram\n")
    assert "agent_egress_cost_usd_total" in exported
    assert "agent_egress_request_duration_seconds_bucket" in exported
    assert metric_refs("sum(rate(agent_egress_cost_total[5m]))") - exported == {
        "agent_egress_cost_total"}

"""Dashboards and provisioning as code: the committed files are the generators' output,
every panel has a unit, a description and a data source, and the provisioning files
agree with each other (uids, exemplar link to Tempo, Grafana's $-expansion)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from agent_egress.addon.cli_grafana import generated_files
from agent_egress.exporters import grafana_alerting
from agent_egress.exporters import grafana_rules as gr

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
PROVISIONING = GRAFANA / "provisioning"


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))]


def test_sdk_is_the_grafana_11_6_build() -> None:
    # an unpinned install resolves to the 10.1 build (its epoch is the newest)
    assert version("grafana-foundation-sdk").endswith("!11.6.0")
    assert {d["schemaVersion"] for d in dashboards()} == {41}


def test_regenerating_gives_no_diff(tmp_path: Path) -> None:
    res = subprocess.run([str(Path(sys.executable).parent / "agent-egress"), "grafana",
                          "generate", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    files = generated_files()
    assert len(files) == 6
    for rel, text in files.items():
        assert (tmp_path / rel).read_text() == text
        assert (GRAFANA / rel).read_text() == text, (
            f"grafana/{rel} is stale: run `agent-egress grafana generate`")


def test_the_four_dashboards_and_their_panels() -> None:
    by_title = {d["title"]: d for d in dashboards()}
    assert set(by_title) == {"agent-egress / Cost", "agent-egress / Latency & reliability",
                             "agent-egress / Sessions", "agent-egress / Guardrails"}
    for d in by_title.values():
        names = {v["name"] for v in d["templating"]["list"]}
        assert {"datasource", "org", "team", "model"} <= names, d["title"]
        assert len({p["gridPos"]["y"] * 100 + p["gridPos"]["x"] for p in d["panels"]}) == len(
            d["panels"]), f"{d['title']}: overlapping panels"
        for p in d["panels"]:
            where = f"{d['title']} / {p['title']}"
            assert len(p.get("description", "")) > 20, where
            assert p["fieldConfig"]["defaults"].get("unit"), where
            assert p["datasource"]["uid"] in ("${datasource}", "${ledger}", "${traces}"), where
            assert p["targets"], where
    titles = {p["title"] for d in by_title.values() for p in d["panels"]}
    for wanted in ("Spend today", "Spend month to date", "Budget remaining",
                   "Burn rate per team (monthly budget)", "Top users", "Tokens by type",
                   "Cache-hit ratio", "Time to first token by model and provider", "Errors by type",
                   "Refusals by rule", "Failovers", "Circuit breaker state",
                   "Time in our hooks", "Top sessions by cost",
                   "Turns and model calls per session", "Tool calls per session",
                   "Tool execution time by tool", "Hits by rule", "Total by action",
                   "Total by direction", "Total by team"):
        assert wanted in titles
    ttft = next(p for p in by_title["agent-egress / Latency & reliability"]["panels"]
                if p["title"] == "Time to first token by model and provider")
    assert all(t["exemplar"] for t in ttft["targets"])
    sessions = next(p for p in by_title["agent-egress / Sessions"]["panels"]
                    if p["title"] == "Top sessions by cost")
    [links] = [o["properties"][0]["value"] for o in sessions["fieldConfig"]["overrides"]
               if o["matcher"]["options"] == "session"]
    link = links[0]["url"]
    assert "${__data.fields.session:percentencode}" in link and "${traces}" in link


def _yaml(rel: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((PROVISIONING / rel).read_text())
    return data


def test_provisioning_is_consistent() -> None:
    ds = {d["uid"]: d for d in _yaml("datasources/agent-egress.yaml")["datasources"]}
    assert ds["prometheus"]["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": "tempo"}]  # the gateway's exemplar label
    assert ds["prometheus"]["jsonData"]["alertmanagerUid"] in ds
    assert ds["tempo"]["type"] == "tempo"
    assert ds["ledger"]["secureJsonData"]["password"] == "${GRAFANA_LEDGER_PASSWORD}"
    types = {d["type"] for d in ds.values()}
    for d in dashboards():
        for v in d["templating"]["list"]:
            if v["type"] == "datasource":
                assert v["query"] in types, (d["title"], v["query"])
    provider = _yaml("dashboards/agent-egress.yaml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/agent-egress"
    assert provider["allowUiUpdates"] is False


def _unescape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$$", "$")
    if isinstance(value, list):
        return [_unescape(v) for v in value]
    if isinstance(value, dict):
        return {k: _unescape(v) for k, v in value.items()}
    return value


def test_alerting_file_escapes_dollars_for_grafanas_env_expansion() -> None:
    doc = _yaml("alerting/agent-egress.yaml")
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) == 15  # 4 burn pairs x (team, org) + 7 others (issue 7: drops)
    text = (PROVISIONING / "alerting" / "agent-egress.yaml").read_text()
    assert "is_number($$B)" in text and '"$1"' not in text
    api = {r["uid"]: r for g in grafana_alerting.grafana_rules() for r in g["rules"]}
    for r in rules:
        want = {k: v for k, v in api[r["uid"]].items() if k not in ("folderUID", "ruleGroup")}
        assert _unescape(r) == want
        assert r["data"][0]["datasourceUid"] == "prometheus"
        assert "$$values.B.Value" in json.dumps(r["annotations"]) or "value" not in json.dumps(
            r["annotations"])


def test_recording_rules_are_inlined_for_grafana() -> None:
    records = {"a:b": "sum(x)", "c:d": "a:b * 2"}
    assert grafana_alerting.inline("c:d > 1 and a:b", records) == "((sum(x)) * 2) > 1 and (sum(x))"
    recorded = {r["record"] for g in gr.rules_document()["groups"] for r in g["rules"]
                if "record" in r}
    for g in grafana_alerting.grafana_rules():
        for r in g["rules"]:
            expr = r["data"][0]["model"]["expr"]
            assert not [name for name in recorded if name in expr], r["title"]

"""Prometheus rules: the committed YAML is the generator's output, promtool accepts it,
and promtool's unit tests (grafana/alerts/tests/) fire and stay quiet where they must."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent_egress.exporters import grafana_rules as gr

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "grafana" / "alerts" / "agent-egress.rules.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is not installed: scripts/test.sh installs prometheus (Debian)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_committed_rules_are_the_generators_output() -> None:
    assert RULES.read_text() == gr.render(), (
        "grafana/alerts/agent-egress.rules.yml is stale: run `agent-egress grafana generate`")


def test_burn_windows_and_factors_are_the_sre_workbooks() -> None:
    doc = yaml.safe_load(RULES.read_text())
    burn = [r for g in doc["groups"] for r in g["rules"]
            if r.get("alert", "").startswith("AgentEgressBudgetBurn")]
    got = sorted((r["labels"]["scope_kind"], r["labels"]["long_window"],
                  r["labels"]["short_window"], r["labels"]["severity"],
                  r["expr"].split("> ")[1].split("\n")[0]) for r in burn)
    want = sorted((kind, *w) for kind in ("team", "org") for w in (
        ("1h", "5m", "page", "14.4"), ("6h", "30m", "page", "6"),
        ("1d", "2h", "ticket", "3"), ("3d", "6h", "ticket", "1")))
    assert got == want
    # burn rate = spend per second x 30 days / monthly budget
    rec = {r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"] if "record" in r}
    assert rec["agent_egress_team:budget_burn_rate:rate1h"] == (
        "agent_egress_team:cost_usd:rate1h * 2592000 / on (org, team) group_right()"
        " agent_egress_team:budget_monthly_usd:max")


def test_promtool_check_rules() -> None:
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(gr.all_exprs())} rules found" in res.stdout


def test_promtool_unit_tests_fire_and_stay_quiet() -> None:
    tests = sorted((RULES.parent / "tests").glob("*.test.yml"))
    assert tests
    res = promtool("test", "rules", *(t.name for t in tests), cwd=tests[0].parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_a_wrong_factor_fails_the_unit_tests(tmp_path: Path) -> None:
    """The promtool cases can fail: rules generated with the fast pair at 40x do not page
    at 30x, and the 30 USD/h case says so."""
    fast = gr.BurnWindow("1h", "5m", 40.0, "page", "Fast")
    spec = gr.Spec(burn_windows=(fast, *gr.SPEC.burn_windows[1:]))
    (tmp_path / "alerts").mkdir()
    (tmp_path / "alerts" / "agent-egress.rules.yml").write_text(gr.render(spec))
    case = yaml.safe_load((RULES.parent / "tests" / "agent-egress.test.yml").read_text())
    case["tests"] = case["tests"][:1]  # the 30 USD/h one: quick
    (tmp_path / "alerts" / "tests").mkdir()
    (tmp_path / "alerts" / "tests" / "t.test.yml").write_text(yaml.safe_dump(case))
    res = promtool("test", "rules", "t.test.yml", cwd=tmp_path / "alerts" / "tests")
    assert res.returncode != 0
    assert "AgentEgressBudgetBurnFast" in res.stdout + res.stderr

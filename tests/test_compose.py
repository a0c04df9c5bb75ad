"""docker-compose.yml, checked statically (no Docker engine runs on CI machines): the
services and their pinned images, healthchecks, ports, that every mounted file exists, that
the configs point at each other, and that the gateway config inside validates."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_egress.addon.policy import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
STACK = ROOT / "grafana" / "compose"


def mounts(service: str) -> dict[str, str]:
    """Container path -> host source (bind mounts as ./path, volumes by name)."""
    out = {}
    for v in SERVICES[service].get("volumes", []):
        src, dst = v.split(":")[:2]
        out[dst] = src
    return out


def test_services_and_pinned_images() -> None:
    assert set(SERVICES) == {"gateway", "postgres", "ledger-grant", "redis", "prometheus",
                             "alertmanager", "grafana", "tempo", "otel-collector"}
    for name, svc in SERVICES.items():
        image = svc["image"]
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: pin {image}"
    assert SERVICES["gateway"]["build"] == "."
    assert SERVICES["grafana"]["image"] == "grafana/grafana:11.6.0"


def test_healthchecks_and_start_order() -> None:
    for name, svc in SERVICES.items():
        if name == "ledger-grant":  # one-shot job
            continue
        hc = svc["healthcheck"]
        if name == "otel-collector":  # distroless image: nothing to run inside (commented)
            assert hc == {"disable": True}
            continue
        assert hc["test"][0] in ("CMD", "CMD-SHELL") and hc["interval"], name
    assert "/readyz" in " ".join(SERVICES["gateway"]["healthcheck"]["test"])
    for name, svc in SERVICES.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in SERVICES, (name, dep)
            if cond["condition"] == "service_healthy":
                assert not SERVICES[dep]["healthcheck"].get("disable"), (name, dep)


def test_ports() -> None:
    ports = {name: [p.split(":")[-1] for p in svc.get("ports", [])]
             for name, svc in SERVICES.items()}
    assert ports["gateway"] == ["8787", "8080", "9787"]
    assert ports["grafana"] == ["3000"]
    assert ports["prometheus"] == ["9090"]
    # admin API and internals stay on the host's loopback
    for name, internal in (("gateway", "9787"), ("prometheus", "9090"),
                           ("alertmanager", "9093"), ("tempo", "3200")):
        assert any(p.startswith("127.0.0.1:") and p.endswith(internal)
                   for p in SERVICES[name]["ports"]), name
    assert "ports" not in SERVICES["postgres"] and "ports" not in SERVICES["redis"]


def test_mounted_files_exist_and_volumes_are_declared() -> None:
    declared = set(COMPOSE["volumes"])
    used = set()
    for name in SERVICES:
        for dst, src in mounts(name).items():
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name}: {src} -> {dst} missing"
            else:
                used.add(src)
    assert used == declared
    assert mounts("grafana")["/var/lib/grafana/dashboards/agent-egress"] == "./grafana/dashboards"
    assert (STACK / "postgres-init.sh").stat().st_mode & 0o111


def test_secrets_come_from_env_and_the_example_lists_them() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = {line.split("=")[0] for line in (STACK / "example.env").read_text().splitlines()
               if line and not line.startswith("#")}
    assert required == example
    # the URL carrying the database password comes from the environment, not the file
    assert "database_url" not in yaml.safe_load((STACK / "agent-egress.yaml").read_text())
    assert "EGRESS_DB_PASSWORD" in SERVICES["gateway"]["environment"][
        "AGENT_EGRESS_DATABASE_URL"]


def test_gateway_config_validates(tmp_path: Path) -> None:
    gw = SERVICES["gateway"]
    cfg = mounts("gateway")[gw["environment"]["AGENT_EGRESS_CONFIG"]]
    environ = {"AGENT_EGRESS_HOME": str(tmp_path),
               "AGENT_EGRESS_DATABASE_URL": "postgresql://egress:x@postgres:5432/agent_egress"}
    s = load_settings(ROOT / cfg, environ=environ)
    assert s.listen.reverse == "0.0.0.0:8787" and s.listen.admin == "0.0.0.0:9787"
    assert s.database_url is not None and s.database_url.startswith("postgresql://")
    assert s.redis_url == "redis://redis:6379/0"
    endpoint = s.telemetry.traces.endpoint or ""
    assert endpoint.startswith("http://otel-collector:4318/")
    monthly = [b for specs in (*s.budgets.orgs.values(), *s.budgets.teams.values())
               for b in specs if b.period == "monthly"]
    assert monthly, "the example config should show a monthly budget (burn-rate alerts)"


def test_stop_grace_period_covers_drain_and_flush(tmp_path: Path) -> None:
    """Docker's default 10 s would SIGKILL the gateway mid-drain, before the ledger flush."""
    gw = SERVICES["gateway"]
    cfg = mounts("gateway")[gw["environment"]["AGENT_EGRESS_CONFIG"]]
    s = load_settings(ROOT / cfg, environ={"AGENT_EGRESS_HOME": str(tmp_path)})
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", gw["stop_grace_period"])
    assert m and any(m.groups()), gw["stop_grace_period"]
    grace = int(m[1] or 0) * 60 + int(m[2] or 0)
    assert grace >= s.shutdown.drain_seconds + s.shutdown.flush_seconds + 3, grace


def test_configs_point_at_each_other(tmp_path: Path) -> None:
    prom = yaml.safe_load((STACK / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    assert "gateway:9787" in targets
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"]
    rules_in = mounts("prometheus")
    for rule_file in prom["rule_files"]:
        assert rules_in[rule_file] == "./grafana/alerts/agent-egress.rules.yml"
    assert "--enable-feature=exemplar-storage" in SERVICES["prometheus"]["command"]
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/agent-egress.yaml")
                        .read_text())["datasources"]
    hosts = {d["uid"]: re.sub(r"^https?://", "", d["url"]).split(":")[0] for d in ds}
    assert hosts == {"prometheus": "prometheus", "tempo": "tempo",
                     "alertmanager": "alertmanager", "ledger": "postgres"}
    otel = yaml.safe_load((STACK / "otelcol.yaml").read_text())
    assert otel["exporters"]["otlp/tempo"]["endpoint"] == "tempo:4317"
    tempo = yaml.safe_load((STACK / "tempo.yaml").read_text())
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(
        ":4317")
    # promtool accepts the Prometheus config, with the container paths pointed at the repo
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).exists():
        pytest.fail("promtool is not installed: scripts/test.sh installs prometheus (Debian)")
    prom["rule_files"] = [str(ROOT / "grafana/alerts/agent-egress.rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom))
    res = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11[\d.]*-slim", text, re.M)
    assert "RUN pip install --require-hashes -r requirements.lock" in text
    assert "pip install --no-deps ." in text
    user = re.search(r"^USER (\S+)", text, re.M)
    assert user and not user.group(1).startswith(("root", "0"))
    assert re.search(r"^HEALTHCHECK .*\n.*127\.0\.0\.1:9787/healthz", text, re.M)
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*"):][:6] == ["*", "!pyproject.toml", "!README.md", "!addon/",
                                              "!exporters/", "!requirements.lock"]

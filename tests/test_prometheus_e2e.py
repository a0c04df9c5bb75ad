"""A real Prometheus scrapes the gateway: counters match the ledger, exemplars carry
the Codex session's trace id (so Grafana can jump from a latency spike to the trace)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, make_gateway, run_codex
from fakeprovider import FakeProvider
from otlp_receiver import OTLPReceiver

from agent_egress.exporters.otel import SessionTracer

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        if not Path(PROMETHEUS).exists():
            pytest.fail("prometheus is not installed: scripts/test.sh installs it (Debian)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: agent-egress\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage",
             "--log.level=warn"], stdout=self.log, stderr=subprocess.STDOUT)
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
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": q}, timeout=5)
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def wait_value(self, q: str, want: float, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        value = float("nan")
        while time.monotonic() < deadline:
            res = self.query(q)
            if res:
                value = float(res[0]["value"][1])
                if value == pytest.approx(want):
                    return value
            time.sleep(0.5)
        return value

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def rx() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver()
    yield receiver
    receiver.stop()


@pytest.mark.codex
def test_prometheus_scrapes_costs_and_exemplars_with_the_session_trace_id(
        tmp_path: Path, fake: FakeProvider, rx: OTLPReceiver) -> None:
    gw = make_gateway(tmp_path, fake.base_url,
                      telemetry={"traces": {"exporter": "otlp-http", "endpoint": rx.endpoint}})
    gw.start()
    prom = Prometheus(tmp_path, f"127.0.0.1:{gw.admin_port}")
    try:
        token, _ = gw.issue_token(user="dana", team="payments", org="acme")
        t_start = time.time()
        res = run_codex(tmp_path, gw.base_url, token)
        assert res.returncode == 0, res.stderr[-2000:]
        calls = fake.requests_to("/v1/responses")
        session = calls[0].header("session-id")
        assert session
        rows = gw.wait_ledger(len(calls))
        n = prom.wait_value('sum(agent_egress_model_calls_total{team="payments"})', len(calls))
        assert n == len(calls)
        cost = prom.wait_value('sum(agent_egress_cost_usd_total{team="payments"})',
                               float(sum(r["cost_usd"] for r in rows)))
        assert cost == pytest.approx(float(sum(r["cost_usd"] for r in rows)), rel=1e-9)
        r = httpx.get(f"{prom.url}/api/v1/query_exemplars", params={
            "query": "agent_egress_request_duration_seconds_bucket",
            "start": t_start - 5, "end": time.time() + 5}, timeout=5)
        r.raise_for_status()
        trace_ids = {ex["labels"].get("trace_id") for series in r.json()["data"]
                     for ex in series["exemplars"]}
        assert SessionTracer.trace_id_for(session) in trace_ids
        # Labels are bounded: no session id or token anywhere in the series.
        series = httpx.get(f"{prom.url}/api/v1/series",
                           params={"match[]": '{job="agent-egress"}'}, timeout=5).text
        assert session not in series and token not in series
    finally:
        prom.stop()
        gw.stop()

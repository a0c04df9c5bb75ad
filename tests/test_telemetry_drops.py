"""agent_egress_telemetry_dropped_total reads the exporters' live counts (issue 7).

Spans: tests/test_traces_e2e.py (a real gateway with its collector gone). Audit: a
real AsyncAuditWriter whose queue overflows, read through the gateway's registry in
both exposition formats Prometheus may ask for.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from agent_egress.exporters.audit import AsyncAuditWriter, AuditEvent, AuditLog
from agent_egress.exporters.prometheus import Metrics


def _dropped(text: str) -> dict[str, float]:
    return {s.labels["kind"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "agent_egress_telemetry_dropped_total"}


def test_audit_queue_overflow_is_exported_as_dropped_audit_events(tmp_path: Path) -> None:
    metrics = Metrics()
    log = AuditLog(tmp_path / "audit.jsonl")

    async def run() -> AsyncAuditWriter:
        writer = AsyncAuditWriter(log, max_queue=2)  # not started: nothing drains the queue
        metrics.telemetry_drops.add("audit", lambda: writer.dropped)
        assert _dropped(generate_latest(metrics.registry).decode()) == {"spans": 0, "audit": 0}
        for i in range(5):
            writer.submit(AuditEvent("key.issue", "admin", "ok", target=f"key_{i}"))
        await writer.close()  # writes the 2 queued events
        return writer

    writer = asyncio.run(run())
    assert writer.dropped == 3
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 2
    assert _dropped(generate_latest(metrics.registry).decode()) == {"spans": 0, "audit": 3}
    om = generate_openmetrics(metrics.registry).decode()
    assert 'agent_egress_telemetry_dropped_total{kind="audit"} 3.0' in om

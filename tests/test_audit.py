"""Audit trail: hash chain, tamper detection, torn writes, concurrent writers
(real processes on one file), redaction, and the non-blocking async writer."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent_egress.addon.tokens import REDACTED, generate_token
from agent_egress.exporters import audit
from agent_egress.exporters.audit import (
    GENESIS,
    TORN_ACTION,
    AsyncAuditWriter,
    AuditEvent,
    AuditLog,
    record_hash,
    verify,
)


def ev(i: int = 0, **kw: object) -> AuditEvent:
    fields: dict[str, object] = {"action": "token.issue", "actor": "cli:alice@host",
                                 "outcome": "ok", "target": f"key_{i:04d}", "source": "cli"}
    fields.update(kw)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def log5(tmp_path: Path) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.append(ev(i))
    return log


def test_round_trip(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.head() is None
    assert verify(log.path).problem is not None  # missing file is not ok
    h1 = log.append(ev(1, detail={"team": "core", "n": 3, "x": 1.5, "b": True, "z": None}))
    assert log.append_many([]) is None
    h3 = log.append_many([ev(2), ev(3, outcome="refused", request_id="req_1")])
    assert log.head() == h3
    recs = records(log.path)
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[0]["prev"] == GENESIS and recs[0]["hash"] == h1
    assert [r["prev"] for r in recs[1:]] == [r["hash"] for r in recs[:-1]]
    assert all(record_hash(r) == r["hash"] for r in recs)
    assert recs[0]["detail"] == {"team": "core", "n": 3, "x": 1.5, "b": True, "z": None}
    assert str(recs[0]["ts"]).endswith("Z")
    first = lines(log.path)[0]  # canonical: sorted keys, compact separators
    assert first == json.dumps(recs[0], sort_keys=True, separators=(",", ":")).encode() + b"\n"
    result = verify(log.path, expected_head=h1)
    assert (result.ok, result.records, result.head, result.problem) == (True, 3, h3, None)


def test_empty_file_verifies(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").touch()
    r = verify(tmp_path / "a.jsonl")
    assert (r.ok, r.records, r.head) == (True, 0, None)


def test_bad_outcome_rejected() -> None:
    with pytest.raises(ValueError, match="outcome"):
        ev(outcome="maybe")


def rewrite(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(new))


def test_edited_record_keeping_its_hash(log5: AuditLog) -> None:
    ls = lines(log5.path)
    ls[2] = ls[2].replace(b"key_0002", b"key_9999")
    rewrite(log5.path, ls)
    r = verify(log5.path)
    assert not r.ok and r.line == 3
    assert r.problem == "line 3: hash does not match its content (edited?)"


def test_edited_and_rehashed_record_breaks_the_next_link(log5: AuditLog) -> None:
    ls = lines(log5.path)
    rec = json.loads(ls[2])
    rec["outcome"] = "refused"
    rec["hash"] = record_hash(rec)
    ls[2] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    rewrite(log5.path, ls)
    r = verify(log5.path)
    assert not r.ok and r.line == 4
    assert r.problem == "line 4: prev does not match line 3's hash (removed or reordered?)"


def test_removed_middle_line(log5: AuditLog) -> None:
    ls = lines(log5.path)
    del ls[2]
    rewrite(log5.path, ls)
    r = verify(log5.path)
    assert not r.ok and r.line == 3 and "removed or reordered" in str(r.problem)


def test_removed_first_line(log5: AuditLog) -> None:
    rewrite(log5.path, lines(log5.path)[1:])
    r = verify(log5.path)
    assert not r.ok and r.line == 1 and "start of the chain" in str(r.problem)


def test_swapped_lines(log5: AuditLog) -> None:
    ls = lines(log5.path)
    ls[1], ls[2] = ls[2], ls[1]
    rewrite(log5.path, ls)
    r = verify(log5.path)
    assert not r.ok and r.line == 2 and "removed or reordered" in str(r.problem)


def test_truncated_tail_needs_an_expected_head(log5: AuditLog) -> None:
    head = log5.head()
    assert head is not None
    rewrite(log5.path, lines(log5.path)[:3])
    assert verify(log5.path).ok and verify(log5.path).records == 3
    r = verify(log5.path, expected_head=head)
    assert not r.ok and r.line is None and "truncated" in str(r.problem)


def test_torn_last_line_is_reported(log5: AuditLog) -> None:
    with log5.path.open("ab") as f:
        f.write(lines(log5.path)[0][:40])
    r = verify(log5.path)
    assert not r.ok and r.line == 6
    assert r.problem == "line 6: not valid JSON (torn write?)"
    assert r.records == 5 and r.head == log5.head()


def test_append_after_torn_line_records_and_chains_past_it(log5: AuditLog) -> None:
    head5 = log5.head()
    fragment = lines(log5.path)[0][:40]
    with log5.path.open("ab") as f:
        f.write(fragment)
    h = log5.append(ev(6))
    r = verify(log5.path)
    assert (r.ok, r.records, r.skipped, r.head) == (True, 7, 1, h)
    marker = json.loads(lines(log5.path)[6])
    assert marker["action"] == TORN_ACTION and marker["prev"] == head5 and marker["seq"] == 6
    assert marker["detail"]["bytes"] == len(fragment) + 1 and marker["detail"]["lines"] == 1
    # the skipped bytes are covered by the marker's hash: altering them is caught
    ls = lines(log5.path)
    ls[5] = b"X" + ls[5][1:]
    rewrite(log5.path, ls)
    r = verify(log5.path)
    assert not r.ok and r.line == 6 and "edited" in str(r.problem)


def test_unacknowledged_garbage_mid_file(log5: AuditLog) -> None:
    ls = lines(log5.path)
    ls.insert(2, b"{not json\n")
    rewrite(log5.path, ls)
    r = verify(log5.path)
    assert not r.ok and r.line == 3 and "torn write" in str(r.problem)


def test_complete_last_record_missing_its_newline_is_kept(log5: AuditLog) -> None:
    head = log5.head()
    log5.path.write_bytes(log5.path.read_bytes().rstrip(b"\n"))
    assert verify(log5.path).ok and log5.head() == head
    log5.append(ev(6))
    r = verify(log5.path)
    assert (r.ok, r.records, r.skipped) == (True, 6, 0)


def test_failed_write_leaves_no_partial_line(
        log5: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    before = log5.path.read_bytes()

    def half_then_fail(fd: int, data: bytes) -> None:
        import os
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "_write_all", half_then_fail)
    with pytest.raises(OSError):
        log5.append_many([ev(6), ev(7)])
    assert log5.path.read_bytes() == before
    monkeypatch.undo()
    log5.append(ev(6))
    assert verify(log5.path).records == 6


def test_redaction(tmp_path: Path) -> None:
    token = generate_token()
    typo = token[:-1] + ("A" if token[-1] != "A" else "B")
    provider = "sk-proj-" + "Ab3_" * 12
    anthropic = "sk-ant-api03-" + "x" * 30
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(ev(target=token, source=f"Bearer {typo}", request_id=provider,
                  detail={"note": f"got {provider} and {anthropic}", provider: 1,
                          "task": "task-0123456789abcdefghijkl"}))
    raw = log.path.read_text()
    for secret in (token, typo, token[4:], provider, provider[3:], anthropic[3:]):
        assert secret not in raw
    rec = records(log.path)[0]
    assert rec["target"] == REDACTED and REDACTED in str(rec["source"])
    assert "sk-…[redacted]" in str(rec["detail"])
    assert rec["detail"]["task"] == "task-0123456789abcdefghijkl"  # not an sk- key
    assert verify(log.path).ok


WRITER = """
import random, sys, time
from pathlib import Path
from agent_egress.exporters.audit import AuditEvent, AuditLog
path, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
log = AuditLog(path)
for i in range(50):
    log.append(AuditEvent("token.revoke", actor=name, outcome="ok", target=f"key_{i}"))
    time.sleep(random.random() * 0.002)
"""


async def test_processes_and_async_writer_share_one_chain(tmp_path: Path) -> None:
    path, go = tmp_path / "audit.jsonl", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"proc{i}", str(go)])
             for i in range(4)]
    writer = AsyncAuditWriter(AuditLog(path), batch_window=0.002)
    writer.start()
    await asyncio.sleep(0.3)  # let the interpreters start and wait on `go`
    go.touch()
    for i in range(50):
        writer.submit(ev(i, actor="gateway"))
        await asyncio.sleep(random.random() * 0.003)
    await writer.close()
    codes = [await asyncio.to_thread(p.wait, 10) for p in procs]
    assert codes == [0, 0, 0, 0]
    r = verify(path)
    assert (r.ok, r.records, r.problem) == (True, 250, None)
    recs = records(path)
    assert [x["seq"] for x in recs] == list(range(1, 251))
    actors = [str(x["actor"]) for x in recs]
    assert all(actors.count(a) == 50 for a in ("gateway", "proc0", "proc1", "proc2", "proc3"))
    assert writer.dropped == 0


async def test_async_writer_submit_never_blocks(tmp_path: Path) -> None:
    writer = AsyncAuditWriter(AuditLog(tmp_path / "audit.jsonl"))
    writer.start()
    events = [ev(i, action="request.refused", outcome="refused") for i in range(10_000)]
    t0 = time.perf_counter()
    for e in events:
        writer.submit(e)
    assert time.perf_counter() - t0 < 0.5
    assert await writer.flush(10)
    assert verify(writer.log.path).records == 10_000
    writer.submit(ev(10_000))
    await writer.close()
    r = verify(writer.log.path)
    assert (r.ok, r.records, writer.dropped) == (True, 10_001, 0)


async def test_async_writer_bounded_queue_and_close_without_start(tmp_path: Path) -> None:
    writer = AsyncAuditWriter(AuditLog(tmp_path / "audit.jsonl"), max_queue=10)
    for i in range(15):
        writer.submit(ev(i))
    assert writer.dropped == 5
    assert not await writer.flush(0.1)  # not started: nothing is written
    await writer.close()  # starts the writer to drain the queue
    assert verify(writer.log.path).records == 10
    writer.submit(ev(99))  # after close: counted, not silently lost
    assert writer.dropped == 6


async def test_async_writer_retries_a_failed_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    real = log.append_many
    calls = 0

    def flaky(events: list[AuditEvent]) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(28, "No space left on device")
        return real(events)

    monkeypatch.setattr(log, "append_many", flaky)
    writer = AsyncAuditWriter(log, batch_window=0)
    writer.start()
    for i in range(3):
        writer.submit(ev(i))
    assert await writer.flush(5)
    await writer.close()
    assert writer.errors == 1 and verify(log.path).records == 3


def test_tail_scan_crosses_chunks(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    big = log.append(ev(1, detail={"blob": "y" * 150_000}))  # one record > a 64 KiB chunk
    assert log.head() == big
    with log.path.open("ab") as f:  # a crash left 200 KB of garbage over several lines
        f.write(b"\x00" * 100_000 + b"\n" + b"{" * 100_000)
    log.append(ev(2))
    r = verify(log.path)
    assert (r.ok, r.records, r.skipped) == (True, 3, 2)
    marker = json.loads(lines(log.path)[-2])
    assert marker["action"] == TORN_ACTION and marker["prev"] == big

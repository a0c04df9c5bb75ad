"""The embedded store's disk fills up under a serving gateway (issue 12).

No root tricks: the gateway process gets RLIMIT_FSIZE lowered to 0 from outside
(``prlimit``, on the running pid), so every write that would extend a file fails
with EFBIG (Python ignores SIGXFSZ), as writes do on a full disk; raising it back
is "space returns". The gateway's output goes through a pipe, so its log survives.

What must hold: calls are refused in the client's format while the ledger cannot
be written (fail closed), every call that was served is in the ledger once space
returns (0 lost), the SQLite database passes ``PRAGMA integrity_check``, and the
gateway restarts and serves.

PostgreSQL going away (rows queued, spooled at shutdown, replayed) is
tests/test_budgets_e2e.py::test_postgres_down_spools_the_ledger_and_replays_it.
"""

from __future__ import annotations

import resource
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import httpx
from conftest import AGENT_EGRESS, Gateway, make_gateway
from fakeprovider import FakeProvider

BODY = {"model": "gpt-5.5", "input": "hi", "stream": True, "store": False}
UNLIMITED = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def start_gateway(gw: Gateway, timeout: float = 90.0) -> None:
    """Like Gateway.start, but output is pumped through a pipe into gateway.log (a file
    size limit on the gateway does not silence it) and the wait is longer: on 2 shared
    cores a gateway importing its dependencies can take more than 30 s to be ready."""
    gw.log_path = gw.home / "gateway.log"
    gw.proc = subprocess.Popen([AGENT_EGRESS, "run"], env=gw.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)

    def pump(out: IO[bytes], path: Path) -> None:
        with path.open("ab") as log:
            for line in iter(out.readline, b""):
                log.write(line)
                log.flush()

    threading.Thread(target=pump, args=(gw.proc.stdout, gw.log_path), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert gw.proc.poll() is None, gw.logs()
        try:
            if httpx.get(f"{gw.admin_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway not ready:\n{gw.logs()}")


def _post(gw: Gateway, token: str) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/responses", json=BODY, timeout=30,
                      headers={"authorization": f"Bearer {token}"})


def test_full_disk_refuses_calls_loses_no_row_and_leaves_a_sound_database(
        tmp_path: Path, fake: FakeProvider) -> None:
    fake.tool_calls = 0
    gw = make_gateway(tmp_path, fake.base_url, guardrails={"enabled": False})
    start_gateway(gw)
    assert gw.proc is not None
    pid = gw.proc.pid
    try:
        token, _ = gw.issue_token()
        ok = [_post(gw, token)]
        assert ok[0].status_code == 200
        assert len(gw.wait_ledger(1)) == 1

        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # disk full
        refused: httpx.Response | None = None
        for _ in range(50):  # bounded: the first failed write closes the gate
            r = _post(gw, token)
            if r.status_code == 503:
                refused = r
                break
            assert r.status_code == 200, r.text
            ok.append(r)
            time.sleep(0.1)
        assert refused is not None, "calls were still served with the ledger unwritable"
        served_unwritten = len(ok) - 1
        err = refused.json()["error"]
        assert err["code"] == "ledger_unavailable" and refused.headers["retry-after"] == "30"
        assert refused.headers["x-egress-request-id"] in err["message"]
        assert len(fake.requests) == len(ok), "a refused call reached the provider"
        assert len(gw.ledger()) == 1  # the served call's row waits in memory
        ready = httpx.get(f"{gw.admin_url}/readyz", timeout=5)
        assert ready.status_code == 503 and not ready.json()["checks"]["ledger"]["ok"]

        resource.prlimit(pid, resource.RLIMIT_FSIZE, UNLIMITED)  # space returns
        t0 = time.monotonic()
        back: httpx.Response | None = None
        for _ in range(100):  # bounded: the writer retries with a backoff of at most 5 s
            back = _post(gw, token)
            if back.status_code == 200:
                break
            time.sleep(0.1)
        assert back is not None and back.status_code == 200, back.text if back else ""
        assert httpx.get(f"{gw.admin_url}/readyz", timeout=5).status_code == 200
        ok.append(back)
        recovered = time.monotonic() - t0
        rows = gw.wait_ledger(len(ok))
        assert sorted(r["request_id"] for r in rows) == sorted(
            r.headers["x-egress-request-id"] for r in ok), "a served call is not in the ledger"
        assert gw.stop() == 0
        logs = gw.logs()
        assert "ledger storage failing (SQLITE_" in logs and "writes succeed again" in logs

        db = gw.home / "agent-egress.db"
        with sqlite3.connect(db) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchall()
        assert check == [("ok",)], check
        print(f"\n[disk full, SQLite] {served_unwritten} call(s) served before the first failed"
              f" write, then 503 ledger_unavailable; after space returned, serving again in"
              f" {recovered:.2f} s with all {len(ok)} served calls in the ledger;"
              f" integrity_check {check[0][0]}")

        start_gateway(gw)  # and it restarts on the same database
        assert _post(gw, token).status_code == 200
        assert len(gw.wait_ledger(len(ok) + 1)) == len(ok) + 1
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, UNLIMITED)
        gw.stop()


def test_only_disk_failures_close_the_gate() -> None:
    """A database that is down (PostgreSQL restarting) keeps serving with rows queued;
    only a disk that cannot take the rows closes the gate."""
    import errno

    import sqlalchemy.exc

    from agent_egress.addon.ledger import storage_failure

    class PgDiskFull(Exception):
        sqlstate = "53100"

    wrapped = sqlalchemy.exc.OperationalError("INSERT ...", {}, PgDiskFull("no space"))
    assert storage_failure(wrapped) == "disk_full"
    assert storage_failure(OSError(errno.ENOSPC, "No space left on device")) == "ENOSPC"
    with sqlite3.connect(":memory:") as conn:
        try:
            conn.execute("INSERT INTO missing VALUES (1)")
        except sqlite3.OperationalError as e:
            assert storage_failure(e) is None  # an SQL error is not the disk's
    down = sqlalchemy.exc.OperationalError("INSERT ...", {}, ConnectionRefusedError(
        errno.ECONNREFUSED, "Connection refused"))
    assert storage_failure(down) is None

"""Ledger rows written in batches off the event loop, nothing dropped.

`submit` never blocks the loop; a background task inserts batches through a
thread. If the database is down, rows stay queued and are retried; `close`
spools what could not be written to a JSONL file so a shutdown loses nothing.

A full (or failing) disk is different from a database that is down: the spool
would go to the same disk, so rows could be lost. While a write fails for lack
of space, `LedgerGate` refuses new model calls (fail closed, 503) and the rows
already served stay queued until a write succeeds (issue 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from mitmproxy import http

from .call import METADATA_KEY, Call
from .refuse import refuse
from .store.base import LedgerRow, Store

log = logging.getLogger("agent_egress.ledger")

_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO}


def storage_failure(e: BaseException) -> str | None:
    """What is wrong with the disk, if this write error is the disk's (not a connection).

    SQLite reports a full disk as SQLITE_FULL and a refused write (e.g. over a file
    size limit) as SQLITE_IOERR_*; PostgreSQL as SQLSTATE 53100 (disk_full).
    SQLAlchemy keeps the driver's exception in ``orig``.
    """
    cur: BaseException | None = e
    for _ in range(5):
        if cur is None:
            return None
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return errno.errorcode.get(cur.errno or 0, "OSError")
        name = getattr(cur, "sqlite_errorname", None)
        if isinstance(name, str) and name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
            return name
        if getattr(cur, "sqlstate", None) == "53100":
            return "disk_full"
        cur = getattr(cur, "orig", None) or cur.__cause__
    return None


class LedgerWriter:
    def __init__(self, store: Store, spool_path: Path, batch_size: int = 256,
                 batch_window: float = 0.05) -> None:
        self.store = store
        self.spool_path = spool_path
        self.batch_size = batch_size
        self.batch_window = batch_window
        """Seconds to gather rows before a write: fewer, larger inserts under load."""
        self._pending: list[LedgerRow] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0
        self.storage_error: str | None = None
        """Set while writes fail for lack of space (or a failing disk); `LedgerGate` reads it."""

    def submit(self, row: LedgerRow) -> None:
        self._pending.append(row)
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            if not self._closing:
                await asyncio.sleep(self.batch_window)
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.batch_size]
                try:
                    await asyncio.to_thread(self.store.insert_ledger, batch)
                except Exception as e:
                    failure = storage_failure(e)
                    if failure is not None and self.storage_error is None:
                        log.error("ledger storage failing (%s): refusing new calls until a"
                                  " write succeeds", failure)
                    self.storage_error = failure
                    log.error("ledger write failed (%d rows kept, retrying): %s", len(batch), e)
                    if self._closing:
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
                if self.storage_error is not None:
                    log.warning("ledger writes succeed again: serving calls")
                    self.storage_error = None
                del self._pending[: len(batch)]
                self.written += len(batch)
            self._idle.set()

    async def flush(self, wait_seconds: float | None = None) -> bool:
        """Wait until every submitted row is written; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), wait_seconds)
        except TimeoutError:
            return False
        return True

    async def close(self, wait_seconds: float = 10.0) -> None:
        flushed = await self.flush(wait_seconds)
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not flushed and self._pending:
            self._spool()

    async def replay_spool(self) -> int:
        """Insert rows a previous run spooled at shutdown; the file goes once written."""
        if not self.spool_path.exists():
            return 0
        rows = []
        for line in self.spool_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                d["ts"] = datetime.fromisoformat(d["ts"])
                d["cost_usd"] = None if d["cost_usd"] is None else Decimal(d["cost_usd"])
                rows.append(LedgerRow(**d))
        await asyncio.to_thread(self.store.insert_ledger, rows)
        self.spool_path.unlink()
        log.info("replayed %d spooled ledger rows from %s", len(rows), self.spool_path)
        return len(rows)

    def _spool(self) -> None:
        try:
            with self.spool_path.open("a", encoding="utf-8") as f:
                for row in self._pending:
                    d = dataclasses.asdict(row)
                    d["ts"] = row.ts.isoformat()
                    d["cost_usd"] = None if row.cost_usd is None else str(row.cost_usd)
                    f.write(json.dumps(d) + "\n")
        except OSError as e:  # the spool's disk is full too: say how many rows are lost
            log.error("database unavailable at shutdown and the spool %s cannot be written"
                      " (%s): %d ledger rows LOST", self.spool_path, e, len(self._pending))
            self._pending.clear()
            return
        log.error("database unavailable at shutdown: %d ledger rows spooled to %s",
                  len(self._pending), self.spool_path)
        self._pending.clear()


class LedgerGate:
    """Fail closed while the ledger's storage is full: no call is served unrecorded.

    Runs before admission (no reservation is taken). Calls already served when the
    first write failed stay queued in memory and are written once space returns.
    """

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    def request(self, flow: http.HTTPFlow) -> None:
        failure = self.writer.storage_error
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if failure is None or call is None or flow.response is not None:
            return
        refuse(flow, call, 503, f"the ledger cannot be written ({failure}: the gateway's"
               " database disk is full or failing), so calls are refused rather than served"
               " unrecorded; retry later or tell the gateway's operators",
               type="server_error", code="ledger_unavailable", retry_after=30)

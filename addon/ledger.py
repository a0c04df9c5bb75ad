"""Ledger rows written in batches off the event loop, nothing dropped.

`submit` never blocks the loop; a background task inserts batches through a
thread. If the database is down, rows stay queued and are retried; `close`
spools what could not be written to a JSONL file so a shutdown loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from .store.base import LedgerRow, Store

log = logging.getLogger("agent_egress.ledger")


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
                    log.error("ledger write failed (%d rows kept, retrying): %s", len(batch), e)
                    if self._closing:
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
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
        with self.spool_path.open("a", encoding="utf-8") as f:
            for row in self._pending:
                d = dataclasses.asdict(row)
                d["ts"] = row.ts.isoformat()
                d["cost_usd"] = None if row.cost_usd is None else str(row.cost_usd)
                f.write(json.dumps(d) + "\n")
        log.error("database unavailable at shutdown: %d ledger rows spooled to %s",
                  len(self._pending), self.spool_path)
        self._pending.clear()

"""Key records cached in memory, invalidated the moment a revocation is seen.

A store lookup per request (through a worker thread) cost more CPU than the rest
of the chain together. Entries are dropped when (a) the store's revocation
fingerprint changes (polled every `poll_seconds`, one tiny query), (b) the CLI or
admin API tells this gateway about a revocation (`evict_key`), or (c) they are
older than `ttl_seconds`. Expiry needs no invalidation: it is checked against the
cached record's `expires_at` on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

from .store.base import KeyRecord, Store

log = logging.getLogger("agent_egress.keycache")


class KeyCache:
    def __init__(self, store: Store, *, ttl_seconds: float = 30.0, poll_seconds: float = 0.25,
                 max_entries: int = 50_000) -> None:
        self.store = store
        self.ttl = ttl_seconds
        self.poll_seconds = poll_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[KeyRecord | None, float]] = OrderedDict()
        self._fingerprint: tuple[object, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0

    async def lookup(self, token_hash: str) -> KeyRecord | None:
        entry = self._entries.get(token_hash)
        now = time.monotonic()
        if entry is not None and entry[1] > now:
            self.hits += 1
            return entry[0]
        self.misses += 1
        record = await asyncio.to_thread(self.store.key_by_hash, token_hash)
        self._entries[token_hash] = (record, now + self.ttl)
        self._entries.move_to_end(token_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return record

    def evict_key(self, key_id: str) -> int:
        """Drop every entry of one key (a revocation this gateway was told about)."""
        stale = [h for h, (rec, _) in self._entries.items() if rec is not None and rec.id == key_id]
        for h in stale:
            del self._entries[h]
        return len(stale)

    def clear(self) -> None:
        self._entries.clear()

    async def _watch(self) -> None:
        while True:
            try:
                fp = await asyncio.to_thread(self.store.revocation_fingerprint)
                if fp != self._fingerprint:
                    if self._fingerprint is not None:
                        log.info("key revocations changed: key cache cleared")
                    self._fingerprint = fp
                    self._entries.clear()
            except Exception as e:  # store down: keep serving, but stop trusting the cache
                log.warning("cannot read revocations (%s); key cache cleared", type(e).__name__)
                self._entries.clear()
                self._fingerprint = None
            await asyncio.sleep(self.poll_seconds)

    async def start(self) -> None:
        self._fingerprint = await asyncio.to_thread(self.store.revocation_fingerprint)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

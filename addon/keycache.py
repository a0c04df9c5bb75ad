"""Key records cached in memory, invalidated the moment a revocation is seen.

A store lookup per request (through a worker thread) cost more CPU than the rest
of the chain together. Entries are dropped when (a) a revocation arrives on the
Redis revocation channel (when Redis is configured; every replica at once), (b)
the store's revocation fingerprint changes (polled every `poll_seconds`, one
tiny query; the fallback that needs nothing but the store), (c) the CLI or admin
API tells this gateway about a revocation (`evict_key`), or (d) they are older
than `ttl_seconds`. Expiry needs no invalidation: it is checked against the
cached record's `expires_at` on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

from .store.base import KeyRecord, Store
from .store.revocations import RevocationBus

log = logging.getLogger("agent_egress.keycache")

DEFAULT_TTL_SECONDS = 30.0
BUS_TTL_SECONDS = 5.0
STALE_SECONDS = 300.0
"""How long past its TTL a cached key record serves while the store is unreachable."""
"""With Redis, revocations are pushed; the TTL is only the last line behind push and poll."""


class KeyCache:
    def __init__(self, store: Store, *, ttl_seconds: float | None = None,
                 poll_seconds: float = 0.25, max_entries: int = 50_000,
                 bus: RevocationBus | None = None) -> None:
        self.store = store
        self.bus = bus
        if ttl_seconds is None:
            ttl_seconds = DEFAULT_TTL_SECONDS if bus is None else BUS_TTL_SECONDS
        self.ttl = ttl_seconds
        self.poll_seconds = poll_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[KeyRecord | None, float]] = OrderedDict()
        self._fingerprint: tuple[object, ...] | None = None
        self._generation = 0
        """Bumped by every invalidation: a lookup that raced one does not cache its result."""
        self._task: asyncio.Task[None] | None = None
        self._bus_task: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0

    async def lookup(self, token_hash: str) -> KeyRecord | None:
        entry = self._entries.get(token_hash)
        now = time.monotonic()
        if entry is not None and entry[1] > now:
            self.hits += 1
            return entry[0]
        self.misses += 1
        generation = self._generation
        try:
            record = await asyncio.to_thread(self.store.key_by_hash, token_hash)
        except Exception:
            # Store down: nobody can revoke through it either, so a record seen shortly
            # before still stands, for a bounded time (revocations by Redis still apply).
            if entry is not None and now - entry[1] < STALE_SECONDS:
                self.stale_hits += 1
                return entry[0]
            raise
        if generation == self._generation:  # else it may predate a revocation: don't keep it
            self._entries[token_hash] = (record, now + self.ttl)
            self._entries.move_to_end(token_hash)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return record

    def evict_key(self, key_id: str) -> int:
        """Drop every entry of one key (a revocation this gateway was told about)."""
        self._generation += 1
        stale = [h for h, (rec, _) in self._entries.items() if rec is not None and rec.id == key_id]
        for h in stale:
            del self._entries[h]
        return len(stale)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    def _on_revoked(self, key_id: str) -> None:
        dropped = self.evict_key(key_id)
        log.info("revocation of %s received from redis; %d cache entries dropped",
                 key_id, dropped)

    async def _watch(self) -> None:
        while True:
            try:
                fp = await asyncio.to_thread(self.store.revocation_fingerprint)
                if fp != self._fingerprint:
                    if self._fingerprint is not None:
                        log.info("key revocations changed: key cache cleared")
                    self._fingerprint = fp
                    self.clear()
            except Exception as e:  # store down: entries expire as usual; see lookup
                if self._fingerprint is not None:
                    log.warning("cannot read revocations (%s): cached keys serve for up to"
                                " %.0f s more", type(e).__name__, STALE_SECONDS)
                self._fingerprint = None  # cleared when the store answers again
            await asyncio.sleep(self.poll_seconds)

    async def start(self) -> None:
        self._fingerprint = await asyncio.to_thread(self.store.revocation_fingerprint)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._watch())
        if self.bus is not None:
            # on_reset: a (re)subscription may follow missed messages, so start afresh.
            self._bus_task = loop.create_task(self.bus.run(self._on_revoked, self.clear))

    async def stop(self) -> None:
        for task in (self._task, self._bus_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

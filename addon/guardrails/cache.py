"""Verdicts per input item, so a session's history is scanned once, not every call.

Codex resends the whole history on every call. A verdict (the item's findings,
positions included, so a redaction can be re-applied without rescanning) is
keyed by a hash of policy, session, direction, role and text. Memory is a
bounded LRU; with Redis configured the verdicts are shared by every replica
(one MGET per call for the items this replica has not seen, one pipelined SET
for the new ones). Redis trouble only costs a rescan: it is never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from .findings import Finding

log = logging.getLogger("agent_egress.guardrails")

Verdict = tuple[Finding, ...]


def _digest(fingerprint: str, session: str, direction: str, role: str, text: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{fingerprint}\0{session}\0{direction}\0{role}\0".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


_ENTRY_OVERHEAD = 320
"""Bytes a memo entry costs beyond its text: key tuple, dict entry, digest (tracemalloc)."""


class _KeyMemo:
    """Keys of recently seen items, by their exact text (so no collision can mix two).

    Every call rehashes the whole resent history: ~16k instructions per 600-byte item
    with blake2b against ~3k for this lookup (callgrind). The texts are kept, bounded
    by ``max_bytes`` of string memory; texts over ``max_text`` are always hashed."""

    def __init__(self, max_bytes: int = 4 << 20, max_text: int = 64 << 10) -> None:
        self.max_bytes = max_bytes
        self.max_text = max_text
        self._keys: OrderedDict[tuple[str, str, str, str, str], str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def key(self, fingerprint: str, session: str, direction: str, role: str,
            text: str) -> str:
        k = (fingerprint, session, direction, role, text)
        with self._lock:
            found = self._keys.get(k)
            if found is not None:
                self._keys.move_to_end(k)
                return found
        digest = _digest(*k)
        size = sys.getsizeof(text) + _ENTRY_OVERHEAD
        if len(text) <= self.max_text and size <= self.max_bytes:
            with self._lock:
                if k not in self._keys:
                    self._keys[k] = digest
                    self._bytes += size
                while self._bytes > self.max_bytes:
                    old, _ = self._keys.popitem(last=False)
                    self._bytes -= sys.getsizeof(old[4]) + _ENTRY_OVERHEAD
        return digest

    def __len__(self) -> int:
        return len(self._keys)


_MEMO = _KeyMemo()


def item_key(fingerprint: str, session: str, direction: str, role: str, text: str,
             memo: bool = True) -> str:
    """The verdict key of one item: blake2b of policy, session, direction, role, text
    (``memo``: remember it by text, for items that will be resent)."""
    if not memo:
        return _digest(fingerprint, session, direction, role, text)
    return _MEMO.key(fingerprint, session, direction, role, text)


def _dump(v: Verdict) -> str:
    return json.dumps([list(f) for f in v], separators=(",", ":"))


def _load(raw: bytes | str) -> Verdict | None:
    try:
        return tuple(Finding(str(r), a, int(s), int(e)) for r, a, s, e in json.loads(raw))
    except (ValueError, TypeError):
        return None


class VerdictCache:
    def __init__(self, max_entries: int = 50_000, redis: Any | None = None,
                 prefix: str = "agent-egress:", ttl_seconds: int = 86_400) -> None:
        self.max_entries = max_entries
        self._mem: OrderedDict[str, Verdict] = OrderedDict()
        self._redis = redis
        self._prefix = prefix + "guard:"
        self._ttl = ttl_seconds
        self._redis_down_until = 0.0
        self.hits = 0
        self.misses = 0
        self.shared_hits = 0

    @classmethod
    def from_url(cls, url: str | None, prefix: str, max_entries: int,
                 ttl_seconds: int) -> VerdictCache:
        client = None
        if url is not None:
            import redis.asyncio as aioredis

            client = aioredis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
        return cls(max_entries, client, prefix, ttl_seconds)

    def _client(self) -> Any:
        assert self._redis is not None
        return self._redis

    def _redis_ok(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, e: Exception) -> None:
        if time.monotonic() >= self._redis_down_until:
            log.warning("guardrail verdict cache: Redis unavailable (%s); scanning locally"
                        " for 5 s", type(e).__name__)
        self._redis_down_until = time.monotonic() + 5

    async def get_many(self, keys: Iterable[str]) -> dict[str, Verdict]:
        found: dict[str, Verdict] = {}
        missing: list[str] = []
        mem = self._mem
        for k in keys:
            v = mem.get(k)
            if v is None:
                missing.append(k)
            else:
                mem.move_to_end(k)
                found[k] = v
        self.hits += len(found)
        if missing and self._redis_ok():
            try:
                raws = await self._client().mget([self._prefix + k for k in missing])
            except Exception as e:  # any Redis/network error: scan locally instead
                self._redis_failed(e)
            else:
                for k, raw in zip(missing, raws, strict=True):
                    if raw is not None and (v := _load(raw)) is not None:
                        found[k] = v
                        self._remember(k, v)
                        self.shared_hits += 1
        self.misses += sum(1 for k in missing if k not in found)
        return found

    def _remember(self, key: str, verdict: Verdict) -> None:
        if self.max_entries <= 0:
            return
        self._mem[key] = verdict
        self._mem.move_to_end(key)
        while len(self._mem) > self.max_entries:
            self._mem.popitem(last=False)

    async def put_many(self, verdicts: Mapping[str, Verdict]) -> None:
        for k, v in verdicts.items():
            self._remember(k, v)
        if verdicts and self._redis_ok():
            try:
                async with self._client().pipeline(transaction=False) as pipe:
                    for k, v in verdicts.items():
                        pipe.set(self._prefix + k, _dump(v), ex=self._ttl)
                    await pipe.execute()
            except Exception as e:
                self._redis_failed(e)

    def __len__(self) -> int:
        return len(self._mem)

    async def close(self) -> None:
        """Close the Redis client (gateway shutdown); a failure here must not stop it."""
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception as e:
                log.debug("closing the verdict cache's Redis client failed: %r", e)
            self._redis = None

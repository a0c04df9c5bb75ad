"""Circuit breakers per provider and vault key, optionally shared over Redis.

A breaker opens after ``failures`` failures within ``window_seconds``, refuses
traffic for ``open_seconds``, then lets ``half_open_probes`` calls through at a
time: one success closes it, one failure opens it again. Routing asks a breaker
before connecting, so a dead provider costs nobody a connect timeout twice.

With Redis, every replica counts failures in the same fixed-window counter and
publishes an open breaker as a key that expires when it would half-open; each
replica polls those keys every ``sync_seconds``. Probing stays per replica. Redis
down means local breakers only, never a stalled request: all Redis work runs in
background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from .policy import BreakerSettings

log = logging.getLogger("agent_egress.breaker")

State = Literal["closed", "half_open", "open"]
STATE_VALUE: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}
"""The value of the agent_egress_breaker_state gauge."""

_ADOPTED = "opened by another replica"

OnChange = Callable[["Breaker", State, State, str], None]
"""(breaker, old state, new state, why) -- called on the event loop."""


@dataclass(slots=True)
class Breaker:
    provider: str
    key: str
    cfg: BreakerSettings
    state: State = "closed"
    failures: deque[float] = field(default_factory=deque)
    opened_until: float = 0.0
    """Unix time when an open breaker goes half-open."""
    probe_started: deque[float] = field(default_factory=deque)

    def _prune(self, now: float) -> None:
        while self.failures and self.failures[0] <= now - self.cfg.window_seconds:
            self.failures.popleft()
        # A probe that never reported back (client gone, a 4xx) frees its slot in time.
        while self.probe_started and self.probe_started[0] <= now - self.cfg.open_seconds:
            self.probe_started.popleft()

    def available(self, now: float) -> bool:
        """Would a call be let through now? (No side effect: see ``acquire``.)"""
        if self.state == "closed":
            return True
        if self.state == "open" and now < self.opened_until:
            return False
        self._prune(now)
        return len(self.probe_started) < self.cfg.half_open_probes

    def acquire(self, now: float) -> tuple[State, State] | None:
        """A call goes to this provider key; returns a transition if it caused one."""
        if self.state == "closed":
            return None
        change: tuple[State, State] | None = None
        if self.state == "open" and now >= self.opened_until:
            change = ("open", "half_open")
            self.state = "half_open"
        self.probe_started.append(now)
        return change

    def success(self, now: float) -> tuple[State, State] | None:
        if self.state == "closed":
            return None
        old = self.state
        self.state = "closed"
        self.failures.clear()
        self.probe_started.clear()
        return (old, "closed")

    def failure(self, now: float, shared_count: int = 0) -> tuple[State, State] | None:
        self._prune(now)
        self.failures.append(now)
        if self.state == "open":
            return None
        if self.state == "half_open" or max(len(self.failures), shared_count) >= self.cfg.failures:
            return self.open(now + self.cfg.open_seconds)
        return None

    def open(self, until: float) -> tuple[State, State] | None:
        old = self.state
        self.state = "open"
        self.opened_until = max(until, self.opened_until if old == "open" else 0.0)
        self.probe_started.clear()
        return None if old == "open" else (old, "open")


class BreakerBoard:
    """Every provider key's breaker, and their optional Redis sync."""

    def __init__(self, cfg: BreakerSettings, pairs: Iterable[tuple[str, str]],
                 on_change: OnChange, *, redis_url: str | None = None,
                 prefix: str = "agent-egress:") -> None:
        self.cfg = cfg
        self.on_change = on_change
        self.breakers = {(p, k): Breaker(p, k, cfg) for p, k in pairs}
        self.prefix = prefix
        self.redis: redis.asyncio.Redis | None = None
        if redis_url is not None:
            self.redis = redis.asyncio.Redis.from_url(
                redis_url, decode_responses=True, socket_connect_timeout=1.0,
                socket_timeout=1.0, retry=AsyncRetry(NoBackoff(), 0))
        self.redis_ok: bool | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync: asyncio.Task[None] | None = None

    # --- the request path (sync, never waits on Redis) ----------------------------
    def get(self, provider: str, key: str) -> Breaker:
        b = self.breakers.get((provider, key))
        if b is None:  # a key added to the config while running
            b = self.breakers[(provider, key)] = Breaker(provider, key, self.cfg)
        return b

    def available(self, provider: str, key: str) -> bool:
        return self.get(provider, key).available(time.time())

    def acquire(self, provider: str, key: str) -> None:
        b = self.get(provider, key)
        self._changed(b, b.acquire(time.time()), "probe")

    def success(self, provider: str, key: str) -> None:
        b = self.get(provider, key)
        if b.state != "closed":
            self._changed(b, b.success(time.time()), "probe_succeeded")

    def failure(self, provider: str, key: str, reason: str) -> None:
        b = self.get(provider, key)
        now = time.time()
        self._changed(b, b.failure(now), reason)
        if self.redis is not None:
            self._spawn(self._shared_failure(b, now, reason))

    def seconds_to_half_open(self, pairs: Iterable[tuple[str, str]]) -> float:
        now = time.time()
        return max(0.0, min((self.get(p, k).opened_until - now for p, k in pairs), default=0.0))

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {}
        for (p, k), b in sorted(self.breakers.items()):
            entry: dict[str, Any] = {"state": b.state}
            if b.state == "open":
                entry["half_open_in_s"] = round(max(0.0, b.opened_until - now), 1)
            if b.failures:
                entry["recent_failures"] = len(b.failures)
            out[f"{p}/{k}"] = entry
        return out

    def _changed(self, b: Breaker, change: tuple[State, State] | None, why: str) -> None:
        if change is None:
            return
        old, new = change
        log.warning("breaker %s/%s: %s -> %s (%s)", b.provider, b.key, old, new, why)
        if new == "open" and self.redis is not None and why != _ADOPTED:
            self._spawn(self._publish_open(b))
        self.on_change(b, old, new, why)

    # --- Redis ------------------------------------------------------------------
    def _open_key(self, b: Breaker) -> str:
        return f"{self.prefix}breaker:{b.provider}:{b.key}:open"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _redis_failed(self, e: Exception) -> None:
        if self.redis_ok is not False:
            log.warning("breaker state cannot be shared over Redis (%s); local breakers only",
                        type(e).__name__)
        self.redis_ok = False

    async def _shared_failure(self, b: Breaker, now: float, reason: str) -> None:
        assert self.redis is not None
        bucket = int(now // self.cfg.window_seconds)
        key = f"{self.prefix}breaker:{b.provider}:{b.key}:fail:{bucket}"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, int(self.cfg.window_seconds * 2) + 1)
                count, _ = await pipe.execute()
            self.redis_ok = True
        except (redis.RedisError, OSError) as e:
            self._redis_failed(e)
            return
        if int(count) >= self.cfg.failures and b.state == "closed":
            self._changed(b, b.open(time.time() + self.cfg.open_seconds), reason + " (shared)")

    async def _publish_open(self, b: Breaker) -> None:
        assert self.redis is not None
        ttl_ms = int(max(0.001, b.opened_until - time.time()) * 1000)
        try:
            await self.redis.set(self._open_key(b), repr(b.opened_until), px=ttl_ms)
            self.redis_ok = True
        except (redis.RedisError, OSError) as e:
            self._redis_failed(e)

    async def sync_once(self) -> None:
        """Adopt breakers another replica opened."""
        if self.redis is None:
            return
        items = list(self.breakers.values())
        try:
            values = await self.redis.mget([self._open_key(b) for b in items])
            self.redis_ok = True
        except (redis.RedisError, OSError) as e:
            self._redis_failed(e)
            return
        now = time.time()
        for b, raw in zip(items, values, strict=True):
            try:
                until = float(raw) if raw is not None else 0.0
            except ValueError:
                continue
            if until > now and (b.state == "closed" or until > b.opened_until + 0.001):
                self._changed(b, b.open(until), _ADOPTED)

    async def _sync_loop(self) -> None:
        while True:
            await self.sync_once()
            await asyncio.sleep(self.cfg.sync_seconds)

    def start(self) -> None:
        if self.redis is not None and self._sync is None:
            self._sync = asyncio.get_running_loop().create_task(self._sync_loop())

    async def stop(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync
        for t in list(self._tasks):
            t.cancel()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

"""Revocations pushed to every replica over Redis pub/sub (DESIGN §6).

Whoever revokes a key (the CLI, the admin API) publishes its id on
``<prefix>revocations``; every gateway subscribes and drops that key from its
key cache at once. Pub/sub is fire-and-forget: a replica that was disconnected
may have missed messages, so each (re)subscription calls ``on_reset`` and the
replica flushes its whole cache. The store poll in the key cache stays on as
the fallback when Redis is down.

redis-py's own retry layer is switched off here: it would reconnect and
resubscribe silently, and the replica would never learn that it may have
missed a message. This module reconnects itself, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("agent_egress.revocations")

CHANNEL = "revocations"


def channel_name(prefix: str) -> str:
    return f"{prefix}{CHANNEL}"


class RevocationBus:
    """Publish and receive key revocations on one Redis channel.

    ``run`` is meant to live in its own task for the life of the gateway; it
    returns only when cancelled. Callbacks run on the event loop and must not block.
    """

    def __init__(self, redis_url: str, prefix: str, *, connect_timeout: float = 2.0,
                 ping_interval: float = 5.0, backoff_initial: float = 0.1,
                 backoff_max: float = 5.0) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.channel = channel_name(prefix)
        self.ping_interval = ping_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        common: dict[str, Any] = {"decode_responses": True, "socket_keepalive": True,
                                  "socket_connect_timeout": connect_timeout,
                                  "socket_timeout": connect_timeout}
        # The subscriber must see every disconnect (no retries); a publish may retry
        # once, on a fresh connection, after a pooled one went stale (Redis restarted).
        self._sub: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            redis_url, retry=AsyncRetry(NoBackoff(), 0), **common)
        self._pub: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            redis_url, retry=AsyncRetry(NoBackoff(), 1), **common)
        self.connected = False
        self.connects = 0
        """Successful subscriptions so far (1 after the first, +1 per reconnect)."""
        self.received = 0
        self.last_error: str | None = None

    async def publish(self, key_id: str) -> int:
        """Announce a revocation; returns how many subscribers got it. Raises if unreachable."""
        return int(await self._pub.publish(self.channel, key_id))

    async def ping(self) -> bool:
        try:
            return bool(await self._pub.ping())
        except (redis.RedisError, OSError):
            return False

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"connected": self.connected, "channel": self.channel,
                               "reconnects": max(self.connects - 1, 0)}
        if not self.connected and self.last_error:
            out["last_error"] = self.last_error
        return out

    async def run(self, on_revoked: Callable[[str], None], on_reset: Callable[[], None]) -> None:
        """Subscribe and deliver revocations until cancelled, reconnecting with backoff."""
        backoff = self.backoff_initial
        while True:
            connects_before = self.connects
            pubsub = self._sub.pubsub()
            try:
                await self._listen(pubsub, on_revoked, on_reset)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection lost, Redis restarting, bad URL, ...
                err = f"{type(e).__name__}: {e}"
                quiet = not self.connected and err == self.last_error
                level = logging.DEBUG if quiet else logging.WARNING
                log.log(level, "revocation channel %s unavailable (%s); retrying, the store"
                        " poll covers revocations meanwhile", self.channel, err)
                self.last_error = err
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if self.connects > connects_before:
                backoff = self.backoff_initial  # it was up: the first retry comes quickly
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.backoff_max)

    async def _listen(self, pubsub: Any, on_revoked: Callable[[str], None],
                      on_reset: Callable[[], None]) -> None:
        await pubsub.subscribe(self.channel)
        # Wait for the server's confirmation: only then are we sure to get what follows.
        deadline = time.monotonic() + self.ping_interval
        while True:
            msg = await pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.01))
            if msg is not None and msg.get("type") == "subscribe":
                break
            if time.monotonic() >= deadline:
                raise TimeoutError("no subscribe confirmation from Redis")
        self.connected = True
        self.connects += 1
        self.last_error = None
        if self.connects > 1:
            log.info("revocation channel %s reconnected; key cache flushed", self.channel)
        on_reset()
        last_seen = time.monotonic()
        next_ping = last_seen + self.ping_interval
        while True:
            msg = await pubsub.get_message(timeout=min(1.0, self.ping_interval))
            now = time.monotonic()
            if msg is not None:
                last_seen = now
                if msg.get("type") == "message":
                    self.received += 1
                    data = msg.get("data")
                    if isinstance(data, str) and data:
                        on_revoked(data)
            if now >= next_ping:
                # A half-open TCP connection never errors on read: ping and expect a pong.
                await pubsub.ping()
                next_ping = now + self.ping_interval
            if now - last_seen > 2 * self.ping_interval + 1:
                raise TimeoutError(f"no reply from Redis in {now - last_seen:.0f}s")

    async def close(self) -> None:
        for client in (self._sub, self._pub):
            with contextlib.suppress(Exception):
                await client.aclose()


def publish_sync(redis_url: str, prefix: str, key_id: str, timeout: float = 1.0) -> bool:
    """Publish one revocation from synchronous code (the CLI). Never raises.

    True when Redis accepted the message (whether or not a gateway listens);
    False when Redis cannot be reached or the URL is unusable.
    """
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=timeout,
                                      socket_timeout=timeout, retry=Retry(NoBackoff(), 0))
    except Exception as e:
        log.warning("cannot publish revocation: bad Redis URL (%s)", type(e).__name__)
        return False
    try:
        client.publish(channel_name(prefix), key_id)
        return True
    except Exception as e:
        log.warning("cannot publish revocation to Redis (%s)", type(e).__name__)
        return False
    finally:
        with contextlib.suppress(Exception):
            client.close()

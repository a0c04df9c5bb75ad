"""Repeated bad gateway tokens from one client address: slowed, then 429, each audited.

Runs right after authenticate. Only failing requests are penalised: behind a load
balancer every developer shares the balancer's address, so a lock-out of the
address would let one misconfigured laptop (or an attacker) refuse everybody; a
valid token is never delayed. A guesser gets an exponentially growing, awaited
delay past ``free_failures`` and then a 429 with an integer ``Retry-After`` in the
client's format. Counters are in process memory, bounded (LRU over client
addresses, each a window of at most ``block_failures`` timestamps), so with N
replicas a client gets up to N times the allowance.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http

from agent_egress.exporters.audit import AsyncAuditWriter, AuditEvent

from .call import METADATA_KEY, Call
from .policy import AbuseSettings
from .refuse import refuse

log = logging.getLogger("agent_egress.abuse")

AUTH_FAILURES = frozenset({"token_malformed", "token_unknown", "token_expired",
                           "token_revoked", "token_disabled", "token_rotated"})
"""Refusal rules that mean "a credential was sent and it was not good" (a missing
token is a misconfiguration, not a guess, and is not counted)."""
FINGERPRINT_KEY = "agent_egress.token_fingerprint"
"""flow.metadata: what authenticate saw, without the token: ``hmac:<12 hex>`` of the
keyed hash the store is searched with, ``bad-checksum`` or ``not-a-gateway-token``."""


@dataclass(frozen=True, slots=True)
class Penalty:
    failures: int
    """Failures from this address inside the window, this one included."""
    delay_s: float = 0.0
    retry_after: int | None = None
    """Set when the failure is answered 429 instead of 401."""


class FailureCounter:
    """Sliding-window failure counts per client address; pure, no I/O."""

    def __init__(self, cfg: AbuseSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def fail(self, client: str) -> Penalty:
        cfg, now = self.cfg, self.clock()
        times = self._seen.pop(client, None)
        if times is None:
            times = deque(maxlen=max(cfg.block_failures, cfg.free_failures + 1))
        while times and times[0] <= now - cfg.window_seconds:
            times.popleft()
        times.append(now)
        self._seen[client] = times  # most recent last
        while len(self._seen) > cfg.max_clients:
            self._seen.popitem(last=False)
        n = len(times)
        if n >= cfg.block_failures:
            # the oldest counted failure leaves the window then (rounded up, at least 1 s)
            wait = times[-cfg.block_failures] + cfg.window_seconds - now
            return Penalty(n, retry_after=max(1, math.ceil(wait)))
        if n > cfg.free_failures:
            step = n - cfg.free_failures - 1
            return Penalty(n, delay_s=min(cfg.max_delay_seconds,
                                          cfg.delay_seconds * 2.0 ** min(step, 32)))
        return Penalty(n)


class Abuse:
    def __init__(self, cfg: AbuseSettings, audit: AsyncAuditWriter | None) -> None:
        self.counter = FailureCounter(cfg)
        self.audit = audit

    async def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or call.principal is not None or call.refused not in AUTH_FAILURES:
            return
        peer = flow.client_conn.peername
        client = peer[0] if peer else "unknown"
        penalty = self.counter.fail(client)
        reason = call.refused
        action = ("throttled" if penalty.retry_after is not None
                  else "delayed" if penalty.delay_s else "none")
        if self.audit is not None:
            self.audit.submit(AuditEvent(
                action="auth.failed", actor="anonymous", outcome="refused",
                source=f"{peer[0]}:{peer[1]}" if peer else None, request_id=call.request_id,
                detail={"reason": reason, "token": flow.metadata.get(FINGERPRINT_KEY),
                        "penalty": action, "failures_in_window": penalty.failures,
                        "delay_ms": round(penalty.delay_s * 1000),
                        "retry_after": penalty.retry_after}))
        if penalty.retry_after is not None:
            if penalty.failures == self.counter.cfg.block_failures:
                log.warning("client %s: %d bad gateway tokens in %.0fs; answering 429",
                            client, penalty.failures, self.counter.cfg.window_seconds)
            refuse(flow, call, 429, "too many requests with an invalid gateway token from this"
                   " address; check the token your agent sends (ask your platform team for a"
                   f" new one) and retry in {penalty.retry_after} s", type="rate_limit_error",
                   code="auth_throttled", retry_after=penalty.retry_after)
        elif penalty.delay_s:
            await asyncio.sleep(penalty.delay_s)  # this flow only: the loop keeps serving

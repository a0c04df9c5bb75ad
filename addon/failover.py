"""Failover around a failing provider while no byte has reached the client.

A response made by the gateway is sent whole (DESIGN §4b), so the gateway never
fetches a fallback itself. Two mechanisms instead:

* before connecting, route around providers whose circuit breaker is open
  (addon/breaker.py, chosen in addon/route.py);
* client-driven failover: when an attempt fails before the response starts
  (connect error or timeout, no response headers in time, a 5xx, a 429), the
  client gets a retryable error (503, or 429 with ``Retry-After: 0``; a 502 for
  connection-level failures), the failed (session, body digest) is remembered,
  and the client's byte-identical retry is routed to the next provider and
  streamed from it like any call.

After the first byte nothing is retried by the gateway; a stream cut (or an idle
or total timeout) is recorded, and the client's own retry of the cut stream
also goes to the next provider. Timeouts: mitmproxy has none of its own, so
each call gets one timer that re-arms itself (no per-chunk work beyond the
stream tap's byte counter).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from agent_egress.exporters.prometheus import Metrics

from . import mitm_internals
from .breaker import STATE_VALUE, Breaker, BreakerBoard, State
from .call import METADATA_KEY, Call
from .overhead import timed
from .policy import FailoverSettings, Provider, ProviderTimeouts
from .protocols.errors import error_body_for
from .protocols.responses_to_chat import ChatToResponsesStream, response_body

log = logging.getLogger("agent_egress.failover")


_META = b'"client_metadata"'


def _object_end(body: bytes, start: int) -> int:
    """Index just past the JSON object opening at ``start`` (strings may hold braces)."""
    depth, in_str, esc = 0, False, False
    for j in range(start, len(body)):
        c = body[j]
        if in_str:
            if esc:
                esc = False
            elif c == 92:  # backslash
                esc = True
            elif c == 34:
                in_str = False
        elif c == 34:
            in_str = True
        elif c == 123:
            depth += 1
        elif c == 125:
            depth -= 1
            if depth == 0:
                return j + 1
    return -1


def body_digest(body: bytes) -> str:
    """The retry's identity: the body without ``client_metadata``.

    Codex resends a failed request byte for byte after an HTTP error, but after a
    cut stream it rebuilds it and ``client_metadata`` (a Rust HashMap) comes out
    in another key order (observed with 0.169). Everything else is identical.
    """
    i = body.rfind(_META)
    if i != -1:
        k = i + len(_META)
        while k < len(body) and body[k] in b" \t\r\n:":
            k += 1
        end = _object_end(body, k) if body[k:k + 1] == b"{" else -1
        if end != -1:
            body = body[:i] + body[end:]
    return hashlib.blake2b(body, digest_size=16).hexdigest()


@dataclass(slots=True)
class Failed:
    providers: list[str]
    reason: str
    at: float


class RetryMemory:
    """Requests that failed, by session and body digest, so their retry goes elsewhere.

    Keyed by session first: the body is hashed only for sessions with a recorded
    failure, so the common path costs one dict lookup.
    """

    def __init__(self, ttl: float, max_sessions: int = 10_000) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._by_session: OrderedDict[str, dict[str, Failed]] = OrderedDict()

    def lookup(self, session: str, body: bytes) -> Failed | None:
        entries = self._by_session.get(session)
        if not entries:
            return None
        now = time.monotonic()
        for digest in [d for d, f in entries.items() if now - f.at > self.ttl]:
            del entries[digest]
        return entries.get(body_digest(body)) if entries else None

    def record(self, session: str, body: bytes, provider: str, reason: str) -> Failed:
        entries = self._by_session.setdefault(session, {})
        self._by_session.move_to_end(session)
        while len(self._by_session) > self.max_sessions:
            self._by_session.popitem(last=False)
        digest = body_digest(body)
        failed = entries.get(digest)
        if failed is None:
            failed = entries[digest] = Failed([], reason, 0.0)
        if provider not in failed.providers:
            failed.providers.append(provider)
        failed.reason, failed.at = reason, time.monotonic()
        return failed


class Sticky:
    """Session id -> the provider it runs on (prompt-cache hits depend on staying)."""

    def __init__(self, ttl: float, max_sessions: int = 100_000) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._map: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, session: str) -> str | None:
        hit = self._map.get(session)
        if hit is None or time.monotonic() - hit[1] > self.ttl:
            return None
        return hit[0]

    def set(self, session: str, provider: str) -> None:
        now = time.monotonic()
        self._map[session] = (provider, now)
        self._map.move_to_end(session)
        # oldest first (set always moves to the end): drop the expired, then the overflow
        while self._map and (len(self._map) > self.max_sessions
                             or now - next(iter(self._map.values()))[1] > self.ttl):
            self._map.popitem(last=False)


@dataclass(slots=True)
class Attempt:
    """One call's route: what it was sent to and what the failover hooks need later."""

    provider: Provider
    key_name: str
    candidates: list[str]
    """Providers this call may use, in preference order."""
    session: str
    body: bytes
    """The client's original body (a reference, not a copy): the retry's identity."""
    address: tuple[str, int]
    started: float = field(default_factory=time.monotonic)
    headers_at: float | None = None
    cut_reason: str | None = None
    translator: ChatToResponsesStream | None = None
    custom_tools: frozenset[str] = frozenset()
    timer: asyncio.TimerHandle | None = None
    last_bytes: int = -1
    last_change: float = 0.0
    done: bool = False


class FailoverState:
    """Breakers, retry memory, stickiness and metrics shared by route and the hooks."""

    def __init__(self, cfg: FailoverSettings, providers: dict[str, Provider], metrics: Metrics,
                 *, redis_url: str | None = None, redis_prefix: str = "agent-egress:") -> None:
        self.cfg = cfg
        self.providers = providers
        self.metrics = metrics
        self.memory = RetryMemory(cfg.retry_memory_seconds)
        self.sticky = Sticky(cfg.sticky_seconds)
        pairs = [(p.name, k) for p in providers.values()
                 for k in dict.fromkeys([p.key, *(x.name for x in p.keys)])]
        self._event_call: Call | None = None
        self.breakers = BreakerBoard(cfg.breaker, pairs, self._breaker_changed,
                                     redis_url=redis_url, prefix=redis_prefix)
        for p, k in pairs:
            metrics.breaker_state.labels(p, k).set(0)

    # --- events and metrics -----------------------------------------------------------
    @staticmethod
    def event(call: Call, name: str, **attrs: str) -> None:
        call.route_events.append((name, time.time_ns(), attrs))

    def _breaker_changed(self, b: Breaker, old: State, new: State, why: str) -> None:
        self.metrics.breaker_state.labels(b.provider, b.key).set(STATE_VALUE[new])
        self.metrics.breaker_changes.labels(b.provider, b.key, new).inc()
        if self._event_call is not None:
            self.event(self._event_call, "agent_egress.breaker", provider=b.provider,
                       key=b.key, from_state=old, to_state=new, reason=why)

    def failover(self, call: Call, from_provider: str, to_provider: str, reason: str) -> None:
        self.metrics.failovers.labels(from_provider, to_provider, reason).inc()
        self.event(call, "agent_egress.failover", from_provider=from_provider,
                   to_provider=to_provider, reason=reason)
        log.info("request %s: %s -> %s (%s)", call.request_id, from_provider, to_provider,
                 reason)

    # --- outcomes -----------------------------------------------------------------------
    def available(self, name: str, key_name: str) -> bool:
        return self.breakers.available(name, key_name)

    def alternatives(self, a: Attempt, failed: Iterable[str],
                     key_for: Callable[[Provider], str]) -> list[str]:
        skip = {a.provider.name, *failed}
        return [p for p in a.candidates if p not in skip
                and self.available(p, key_for(self.providers[p]))]

    def failed(self, call: Call, a: Attempt, reason: str) -> Failed:
        """Count a provider failure (breaker) and remember it for the retry."""
        self._event_call = call
        try:
            self.breakers.failure(a.provider.name, a.key_name, reason)
        finally:
            self._event_call = None
        return self.memory.record(a.session, a.body, a.provider.name, reason)

    def succeeded(self, call: Call, a: Attempt) -> None:
        self._event_call = call
        try:
            self.breakers.success(a.provider.name, a.key_name)
        finally:
            self._event_call = None

    def acquire(self, call: Call, provider: str, key_name: str) -> None:
        self._event_call = call
        try:
            self.breakers.acquire(provider, key_name)
        finally:
            self._event_call = None

    # --- timeouts -----------------------------------------------------------------------
    def watch(self, flow: http.HTTPFlow, call: Call, a: Attempt) -> None:
        a.last_change = a.started
        self._arm(flow, call, a, min(a.provider.timeouts.connect, self._first_limit(call, a)))

    @staticmethod
    def _first_limit(call: Call, a: Attempt) -> float:
        t = a.provider.timeouts
        return t.headers if call.stream else t.total

    def _arm(self, flow: http.HTTPFlow, call: Call, a: Attempt, delay: float) -> None:
        loop = asyncio.get_running_loop()
        a.timer = loop.call_later(max(delay, 0.005), self._check, flow, call, a)

    def _check(self, flow: http.HTTPFlow, call: Call, a: Attempt) -> None:
        if a.done or flow.error is not None:
            return
        t: ProviderTimeouts = a.provider.timeouts
        now = time.monotonic()
        elapsed = now - a.started
        if flow.response is None:
            connected = mitm_internals.connected_to(flow, a.address)
            if not connected and elapsed >= t.connect:
                a.cut_reason = "connect_timeout"
                if mitm_internals.abort_connecting(flow, a.address,
                                                   f"connect timeout after {t.connect:g}s"):
                    return
                a.cut_reason = None
            limit = self._first_limit(call, a)
            if elapsed >= limit:
                self._kill(flow, a, "headers_timeout" if call.stream else "total_timeout")
                return
            nxt = limit - elapsed if connected else min(limit, t.connect) - elapsed
            self._arm(flow, call, a, nxt if nxt > 0 else 0.05)
            return
        if elapsed >= t.total:
            self._kill(flow, a, "total_timeout")
            return
        if call.response_bytes != a.last_bytes:
            a.last_bytes, a.last_change = call.response_bytes, now
        if a.translator is not None or call.reader is not None:  # a stream: idle applies
            if now - a.last_change >= t.idle:
                self._kill(flow, a, "idle_timeout")
                return
            self._arm(flow, call, a, min(t.total - elapsed, a.last_change + t.idle - now))
        else:
            self._arm(flow, call, a, t.total - elapsed)

    @staticmethod
    def _kill(flow: http.HTTPFlow, a: Attempt, reason: str) -> None:
        a.cut_reason = reason
        if not mitm_internals.close_server(flow, f"agent-egress: {reason}"):
            log.debug("could not close the upstream connection for %s", reason)

    @staticmethod
    def stop(a: Attempt) -> None:
        a.done = True
        if a.timer is not None:
            a.timer.cancel()
            a.timer = None


def _attempt(flow: http.HTTPFlow) -> tuple[Call, Attempt] | None:
    call: Call | None = flow.metadata.get(METADATA_KEY)
    if call is None or not isinstance(call.attempt, Attempt):
        return None
    return call, call.attempt


def _chunks(out: Any) -> list[bytes]:
    """A stream callable's result as a list of non-empty chunks (b"" would end the body)."""
    if isinstance(out, bytes | bytearray):
        return [bytes(out)] if out else []
    return [bytes(c) for c in out if c]


def translating(tr: ChatToResponsesStream, inner: Any) -> Callable[[bytes], list[bytes]]:
    """Wrap the stream tap so it (and the client) see Responses events, chunk by chunk."""
    def on_chunk(chunk: bytes) -> list[bytes]:
        if chunk:
            out = tr.feed(chunk)
            return _chunks(inner(out)) if out and callable(inner) else ([out] if out else [])
        tail = tr.close()
        if not callable(inner):
            return [tail] if tail else []
        return [*(_chunks(inner(tail)) if tail else []), *_chunks(inner(b""))]

    return on_chunk


class FailoverTap:
    """Response side, between the stream tap and settle: classify the upstream answer."""

    def __init__(self, state: FailoverState, key_for: Callable[[Call, Provider], str]) -> None:
        self.state = state
        self.key_for = key_for

    @timed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        found = _attempt(flow)
        if found is None or flow.response is None:
            return
        call, a = found
        a.headers_at = time.monotonic()
        status = flow.response.status_code
        if status >= 500 or status == 429:
            reason = f"status_{status}"
            failed = self.state.failed(call, a, reason)
            if self.state.alternatives(a, failed.providers, lambda p: self.key_for(call, p)):
                call.failover_reason = reason
                flow.response.stream = False  # a small error body: answer it ourselves
                a.translator = None
            return
        if status < 400:
            self.state.succeeded(call, a)
        tr = a.translator
        if tr is not None:
            if status == 200 and flow.response.headers.get("content-type", "").startswith(
                    "text/event-stream"):
                flow.response.stream = translating(tr, flow.response.stream)
            elif status != 200 or not call.stream:
                a.translator = None  # errors pass through; plain bodies are done in response

    @timed
    def response(self, flow: http.HTTPFlow) -> None:
        found = _attempt(flow)
        if found is None or flow.response is None:
            return
        call, a = found
        self.state.stop(a)
        if call.failover_reason is not None:
            self._retry_elsewhere(flow, call, a)
        elif (a.provider.chat_only and call.api == "openai.responses" and not call.stream
              and flow.response.status_code == 200):
            try:
                chat = json.loads(flow.response.content or b"")
            except (ValueError, RecursionError):  # provider JSON nested beyond the parser
                return
            if isinstance(chat, dict):
                flow.response.content = json.dumps(
                    response_body(chat, a.custom_tools), separators=(",", ":")).encode()

    def _retry_elsewhere(self, flow: http.HTTPFlow, call: Call, a: Attempt) -> None:
        upstream = call.status_code
        retry429 = self.state.cfg.retry_status == 429
        body = error_body_for(
            call.api,
            f"agent-egress: provider {a.provider.name!r} answered {upstream}; your client's"
            f" retry goes to another provider (request id {call.request_id})",
            type="server_error", code="provider_failover")
        headers = {"content-type": "application/json", "x-egress-request-id": call.request_id,
                   "x-request-id": call.request_id, "x-egress-failover": call.failover_reason
                   or ""}
        if retry429:
            headers["retry-after"] = "0"
        flow.response = http.Response.make(429 if retry429 else 503, body, headers)
        call.error = f"failover after {a.provider.name} answered {upstream}"


class FailoverErrors:
    """Error side, after settle: connection failures, timeouts and stream cuts."""

    def __init__(self, state: FailoverState, key_for: Callable[[Call, Provider], str]) -> None:
        self.state = state
        self.key_for = key_for

    def error(self, flow: http.HTTPFlow) -> None:
        found = _attempt(flow)
        if found is None:
            return
        call, a = found
        self.state.stop(a)
        msg = flow.error.msg if flow.error else ""
        if call.refused is not None or msg.lower().startswith("client"):
            return  # the client went away: not the provider's fault
        if a.cut_reason is None and mitm_internals.CLOSED_BY in flow.metadata:
            return  # the gateway stopped the stream itself (guardrail, budget cut-off)
        if call.reader is not None and call.reader.summary.finished:
            return  # the answer was whole before the upstream went: nothing to retry
        if a.headers_at is None:
            reason = a.cut_reason or ("connect_error" if flow.server_conn.timestamp_tcp_setup
                                      is None else "closed_before_headers")
        else:
            reason = a.cut_reason or "stream_cut"
            self.state.metrics.stream_cuts.labels(a.provider.name, reason).inc()
        failed = self.state.failed(call, a, reason)
        alts = self.state.alternatives(a, failed.providers, lambda p: self.key_for(call, p))
        if alts:
            call.failover_reason = reason
        if a.headers_at is None and flow.response is None:
            # mitmproxy now writes its 502 (JSON, see mitm_internals): say what happened.
            nxt = f"; your client's retry goes to {alts[0]!r}" if alts else "; retry shortly"
            mitm_internals.pending_error.set((call.request_id, error_body_for(
                call.api,
                f"agent-egress: provider {a.provider.name!r} failed ({reason.replace('_', ' ')})"
                f"{nxt} (request id {call.request_id})",
                type="server_error", code="upstream_unreachable")))

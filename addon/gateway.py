"""Builds the addon chain and runs mitmproxy, the admin server and the ledger
writer in one asyncio loop (DESIGN §2); SIGTERM/SIGINT drain, then exit 0."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    next_layer,
    proxyserver,
    tlsconfig,
    update_alt_svc,
)
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.master import Master
from opentelemetry.sdk.trace import TracerProvider

from agent_egress.exporters.audit import AsyncAuditWriter, AuditLog
from agent_egress.exporters.otel import DropCounter, SessionTracer, build_tracer_provider
from agent_egress.exporters.prometheus import Metrics
from agent_egress.exporters.session_redis import SharedSessions

from . import admin_api, mitm_internals, state_dir
from .abuse import Abuse
from .admin import AdminServer, build_app
from .admin_limits import install_limits
from .admit import Admit
from .authenticate import Authenticate
from .authorize import Authorize
from .budget_cutoff import BudgetCutoff
from .budgets import Budgets
from .call import METADATA_KEY
from .capture import ContentCapture
from .chain import Chain
from .chatgpt_login import SUBSCRIPTION_PROVIDER, ChatGPTLogin
from .classify import Classify
from .cli_ca import confdir_for, prepare_ca
from .egress import Egress, host_pattern, intercept_pattern
from .failover import FailoverErrors, FailoverState, FailoverTap
from .guard_input import GuardInput
from .guard_output import GuardOutput, Recorder
from .guardrails.cache import VerdictCache
from .guardrails.engine import Guardrails
from .hashkeys import load_hash_keys
from .identity import Identity
from .keycache import KeyCache
from .keyring import Keyring
from .ledger import LedgerGate, LedgerWriter
from .limiter.factory import open_limiter
from .logs import install_redaction
from .policy import ConfigError, Settings
from .pricing import price_call
from .protocols.usage import Usage
from .route import Route, Upstream
from .scrub import ScrubErrors
from .settle import Settle
from .store.base import Store
from .store.revocations import RevocationBus
from .store.sql import open_store
from .stream_tap import StreamTap
from .telemetry import Telemetry
from .vault.spec import open_vault
from .websocket import WebSocket

log = logging.getLogger("agent_egress.gateway")
SUBSCRIPTION = {SUBSCRIPTION_PROVIDER.name: SUBSCRIPTION_PROVIDER}  # ChatGPT-login (issue 9)


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


class Inflight:
    """Counts model calls in flight, so a drain knows when it is done."""

    def __init__(self, metrics: Metrics) -> None:
        self.flows: set[str] = set()
        self.metrics = metrics
        self.idle = asyncio.Event()
        self.idle.set()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if METADATA_KEY in flow.metadata:
            self.flows.add(flow.id)
            self.idle.clear()
            self.metrics.inflight.set(len(self.flows))

    def _done(self, flow: http.HTTPFlow) -> None:
        self.flows.discard(flow.id)
        self.metrics.inflight.set(len(self.flows))
        if not self.flows:
            self.idle.set()

    def response(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)


@dataclass
class Gateway:
    settings: Settings
    store: Store
    keyring: Keyring
    writer: LedgerWriter
    metrics: Metrics
    master: Master
    classify: Classify
    inflight: Inflight
    admin: AdminServer
    tracer: SessionTracer | None
    keys: KeyCache
    audit: AsyncAuditWriter
    revocations: RevocationBus | None = None
    failover: FailoverState | None = None  # failover (issue 8)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _master_task: asyncio.Task[None] | None = None
    telemetry: Telemetry | None = None  # telemetry (issue 7): its task drains on stop
    budgets: Budgets | None = None  # budgets (issue 5)
    _budget_task: asyncio.Task[None] | None = None
    verdicts: VerdictCache | None = None  # guardrails (issue 6): its Redis client is closed

    @property
    def proxyserver(self) -> Proxyserver:
        ps = self.master.addons.get("proxyserver")
        assert isinstance(ps, Proxyserver)
        return ps

    def listen_addrs(self) -> list[tuple[str, int]]:
        return [(a[0], a[1]) for a in self.proxyserver.listen_addrs()]

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        try:
            await asyncio.to_thread(self.store.ping)
            checks["store"] = {"ok": True}
        except Exception as e:
            checks["store"] = {"ok": False, "error": type(e).__name__}
        if self.writer.storage_error is not None:  # faults (issue 12): calls are refused
            checks["ledger"] = {"ok": False, "error": self.writer.storage_error}
        provider = self.settings.provider()
        has_key = self.keyring.get(provider.key) is not None
        checks["provider_key"] = {"ok": has_key, "provider": provider.name, "key": provider.key}
        if not has_key:
            checks["provider_key"]["fix"] = f"agent-egress vault set {provider.key}"
        if self.failover is not None:  # failover (issue 8): informational, never fails
            board = self.failover.breakers
            checks["breakers"] = {"ok": True, "providers": board.snapshot(),
                                  **({} if board.redis is None else {"redis": board.redis_ok})}
        checks["listeners"] = {"ok": bool(self.listen_addrs()) and not self.classify.draining,
                               "draining": self.classify.draining}
        if self.revocations is not None:
            # Informational, never fails readiness: while Redis is down the store poll
            # still delivers revocations within a second.
            checks["redis"] = {"ok": True, **self.revocations.status()}
        return checks

    async def stop(self) -> None:
        """Stop accepting, drain in-flight calls (bounded), flush the ledger, shut down."""
        if self.stopped.is_set():
            return
        self.classify.draining = True
        await self.proxyserver.servers.update([])
        drain = self.settings.shutdown.drain_seconds
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self.inflight.idle.wait(), drain)
        except TimeoutError:
            log.warning("drain timed out after %.0fs with %d calls in flight; closing them",
                        drain, len(self.inflight.flows))
        log.info("drained in %.2fs", time.monotonic() - t0)
        await self._close_client_connections()
        self.master.shutdown()
        if self._master_task is not None:
            await self._master_task
        if self._budget_task is not None:
            self._budget_task.cancel()
        # One budget for every flush (shutdown.flush_seconds), so a database that is down
        # cannot stretch the exit past the orchestrator's grace period and a SIGKILL; the
        # local writers (audit file, trace queue) get a floor of 1 s each.
        deadline = time.monotonic() + self.settings.shutdown.flush_seconds

        def left(floor: float = 0.0) -> float:
            return max(floor, deadline - time.monotonic())

        if self.budgets is not None:  # settles still in flight, before the audit closes;
            await self.budgets.close(min(5.0, left() / 2))  # their spend is in the ledger
        await self.writer.close(left())  # what it cannot write is spooled
        await self.audit.close(left(1.0))
        if self.telemetry is not None:
            await self.telemetry.close(left(1.0))  # queued calls traced, turns ended in Redis
        if self.tracer is not None:  # ends open turns; bounded flush
            await asyncio.to_thread(self.tracer.shutdown, int(left(1.0) * 1000))
        await self.keyring.stop()
        await self.keys.stop()
        if self.failover is not None:
            await self.failover.breakers.stop()
        if self.revocations is not None:
            await self.revocations.close()
        if self.verdicts is not None:  # guardrails (issue 6)
            await self.verdicts.close()
        await self.admin.stop()
        await asyncio.to_thread(self.store.close)
        self.stopped.set()


    async def _close_client_connections(self, wait_seconds: float = 2.0) -> None:
        """Close idle keep-alive connections so their handlers end on their own.

        Left open, they are cancelled when the loop closes, and CPython 3.11's
        stream callback then logs a CancelledError traceback for each one.
        """
        handlers = self.proxyserver.connections
        for handler in list(handlers.values()):
            try:
                if handler.client in handler.transports:  # else it is already closing
                    handler.close_connection(handler.client)
            except Exception as e:  # never let this skip the ledger flush
                log.debug("closing a client connection failed: %r", e)
        deadline = time.monotonic() + wait_seconds
        # mitmproxy signals no event when its connection table empties: poll briefly.
        while handlers and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def _tracer_provider(settings: Settings, drops: DropCounter) -> TracerProvider | None:
    """Traces are built only when asked for (config, or the standard OTEL_* variables)."""
    cfg = settings.telemetry.traces
    exporter = cfg.exporter
    env_asks = any(os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT",
                                               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                                               "OTEL_TRACES_EXPORTER"))
    if exporter == "none" or (exporter is None and not env_asks and cfg.endpoint is None):
        return None
    if os.environ.get("OTEL_TRACES_EXPORTER") == "none" and exporter is None:
        return None
    if exporter is None and cfg.endpoint is not None:
        exporter = "otlp-http"
    return build_tracer_provider(exporter=exporter, endpoint=cfg.endpoint,
                                 sample_ratio=cfg.sample_ratio, drops=drops)


def proxy_addons() -> list[Any]:
    """The mitmproxy addons a gateway needs, not DumpMaster's thirty.

    mitmproxy invokes every addon for every event of every flow, so playback,
    export, map-local and the like cost CPU per request while doing nothing here;
    errorcheck would also sys.exit inside the loop (start() checks listening itself).
    The DNS addons (resolver, HTTPS-record stripping) are left out too: they act on DNS
    flows only, which the reverse and regular modes we run never produce.
    """
    return [core.Core(), block.Block(), disable_h2c.DisableH2C(), proxyserver.Proxyserver(),
            next_layer.NextLayer(), tlsconfig.TlsConfig(), update_alt_svc.UpdateAltSvc()]


def _mitm_options(settings: Settings) -> dict[str, Any]:
    provider = settings.provider()
    up = Upstream.from_url(provider.base_url)
    rhost, rport = _split(settings.listen.reverse)
    modes = [f"reverse:{up.scheme}://{up.netloc}@{rhost}:{rport}"]
    if settings.listen.proxy:
        phost, pport = _split(settings.listen.proxy)
        modes.append(f"regular@{phost}:{pport}")
    extra: dict[str, Any] = {}  # egress proxy mode (issue 9): decrypt only LLM hosts
    if settings.egress.upstream_ca_file is not None:
        extra["ssl_verify_upstream_trusted_ca"] = str(settings.egress.upstream_ca_file)
    return {
        "mode": modes,
        "connection_strategy": "lazy",
        "http2": False,
        "confdir": str(confdir_for(settings)),  # egress.ca_dir: one CA for all replicas
        "allow_hosts": [intercept_pattern(settings)],
        **extra,
    }


async def start(settings: Settings) -> Gateway:
    """Open the store and vault, build the chain and bring every listener up."""
    state_dir.ensure_private(settings.home)  # security (issue 12): refuse a loose home
    await asyncio.to_thread(prepare_ca, settings)  # issue 9: CA present, key private
    mitm_internals.install()
    store = await asyncio.to_thread(open_store, settings.db_url)
    # genai-prices loads its table on first use (~4 ms): do it here, off the loop.
    await asyncio.to_thread(price_call, Usage(input_tokens=1), "gpt-5", "openai", {})
    vault = await asyncio.to_thread(open_vault, settings.vault, home=settings.home)
    hash_keys = await asyncio.to_thread(load_hash_keys, vault, settings.vault, settings.home)
    keyring = Keyring(vault, refresh_seconds=settings.vault.refresh_seconds)
    await keyring.refresh()
    install_redaction(keyring)
    metrics = Metrics()
    writer = LedgerWriter(store, settings.home / "ledger-spool.jsonl")
    await writer.replay_spool()
    writer.start()
    keyring.start()

    audit = AsyncAuditWriter(AuditLog(settings.audit_file))
    audit.start()
    revocations = (None if settings.redis_url is None
                   else RevocationBus(settings.redis_url, settings.redis_prefix))
    keys = KeyCache(store, bus=revocations)
    await keys.start()
    providers = {p.name: p for p in settings.providers}
    span_drops = DropCounter()  # telemetry (issue 7): exported as a metric
    tracer_provider = _tracer_provider(settings, span_drops)
    tracer = None if tracer_provider is None else SessionTracer(
        tracer_provider, session_ttl_s=settings.telemetry.traces.session_ttl_seconds,
        drops=span_drops)
    metrics.telemetry_drops.add("audit", lambda: audit.dropped)
    if tracer is not None:
        metrics.telemetry_drops.add("spans", lambda: tracer.dropped_total)
    upstreams = [Upstream.from_url(p.base_url) for p in settings.providers]
    failover = FailoverState(settings.failover, providers, metrics,  # failover (issue 8)
                             redis_url=settings.redis_url, redis_prefix=settings.redis_prefix)
    failover.breakers.start()
    anthropic_addrs = frozenset((u.host, u.port) for u, p in zip(  # issue 13 item 6
        upstreams, settings.providers, strict=True) if p.kind == "anthropic")
    classify = Classify({(u.host, u.port) for u in upstreams}, settings.limits.max_body_bytes,
                        anthropic_addrs)
    # security (issue 12): a body over the cap is cut off as it arrives, never buffered whole
    mitm_internals.cap_request_bodies(settings.limits.max_body_bytes, classify.provider_addrs)
    budgets = Budgets(settings, store, open_limiter(settings, store, metrics), metrics, audit)
    await budgets.refresh()
    inflight = Inflight(metrics)
    # guardrails (issue 6): engines are built here, off the loop (Presidio imports spaCy)
    gcfg = settings.guardrails
    guardrails = Guardrails(gcfg) if gcfg.enabled else None
    if guardrails is not None:
        try:
            await asyncio.to_thread(guardrails.warm)
        except ValueError as e:  # e.g. an injection classifier that does not import
            raise ConfigError(f"guardrails: {e}") from None
    recorder = Recorder(metrics, audit)
    guard_input = GuardInput(
        settings.limits.max_body_bytes, guardrails,
        VerdictCache.from_url(settings.redis_url, settings.redis_prefix, gcfg.cache_entries,
                              gcfg.cache_ttl_seconds),
        recorder, gcfg.holdback_chars, gcfg.inline_scan_bytes)
    chain = [
        Egress(intercept_pattern(settings), host_pattern(settings.egress.deny_hosts),
               classify.provider_addrs, anthropic_addrs),  # egress mode (issue 9): first
        classify,
        inflight,
        Authenticate(keys, hash_keys.token),
        Abuse(settings.abuse, audit),  # security (issue 12): bad tokens slowed, then 429
        guard_input,
        Authorize(),
        LedgerGate(writer),  # faults (issue 12): fail closed while the ledger disk is full
        Admit(budgets),
        Route(providers, settings.provider().name, settings.routes, keyring, failover),
        ChatGPTLogin(host_pattern(settings.egress.chatgpt_hosts),  # issue 9: after route
                     settings.egress.chatgpt_login, settings.egress.chatgpt_login_overrides,
                     keys, hash_keys.token),
        StreamTap(),
        FailoverTap(failover, Route.key_for),  # after the tap: wraps it to translate
        Settle({**SUBSCRIPTION, **providers}, writer, metrics, exemplars=tracer is not None,
               audit=audit,
               budgets=budgets),
        FailoverErrors(failover, Route.key_for),  # after settle: its own 502 message wins
        GuardOutput(recorder),  # guardrails: after the failover tap and settle (see module)
        BudgetCutoff(settings.budgets.cut_off_streams),  # outermost: meters what is sent
    ]
    websocket = WebSocket(providers, settings.limits.max_body_bytes,  # Codex over WebSocket
                          next(a for a in chain if isinstance(a, Settle)), guard_input, budgets)
    chain.append(websocket)  # (issue 9): each message is a call; telemetry set below
    telemetry = None
    if tracer is not None:  # telemetry (issue 7): content capture and shared session state
        tcfg = settings.telemetry.traces
        capture = (ContentCapture(tcfg, guardrails) if ContentCapture.configured(tcfg)
                   else None)
        if capture is not None:
            await asyncio.to_thread(capture.warm)
        shared = (None if settings.redis_url is None else SharedSessions(
            settings.redis_url, settings.redis_prefix, ttl_s=tcfg.session_ttl_seconds))
        telemetry = Telemetry(tracer, {**SUBSCRIPTION, **providers}, capture=capture,
                              shared=shared)
        chain.append(telemetry)
        websocket.telemetry = telemetry
    chain.append(ScrubErrors(keyring))  # security (issue 12): last, sees the final response
    opts = options.Options()
    master = Master(opts, with_termlog=False)
    master.addons.add(*proxy_addons())
    master.addons.add(Chain(chain))  # one addon for mitmproxy: see chain.py
    opts.update(**_mitm_options(settings))

    ahost, aport = _split(settings.listen.admin)
    gw = Gateway(settings, store, keyring, writer, metrics, master, classify, inflight,
                 AdminServer(build_app(metrics, lambda: gw.readiness(), keys), ahost, aport),
                 tracer, keys, audit, revocations, failover)
    gw._master_task = asyncio.get_running_loop().create_task(master.run())
    expected = len(opts.mode)
    for _ in range(500):
        if len(gw.listen_addrs()) >= expected or gw._master_task.done():
            break
        await asyncio.sleep(0.01)
    if len(gw.listen_addrs()) < expected:
        master.shutdown()
        await gw._master_task
        raise RuntimeError(f"could not listen on {', '.join(opts.mode)} (address in use?)")
    loop = asyncio.get_running_loop()
    identity = Identity(store, hash_keys.token, hash_keys.admin,
                        # API handlers run in worker threads; the audit writer lives on the loop
                        lambda event: loop.call_soon_threadsafe(audit.submit, event))

    def on_key_change(key_id: str | None) -> None:
        """Drop the record here at once, and tell the other replicas (Redis, if any);
        the store poll covers everything else, e.g. a disabled team (key_id None)."""
        loop.call_soon_threadsafe(keys.clear if key_id is None else
                                  lambda: keys.evict_key(key_id))
        if key_id is not None and revocations is not None:
            future = asyncio.run_coroutine_threadsafe(revocations.publish(key_id), loop)
            future.add_done_callback(lambda f: f.exception())  # unreachable Redis: poll covers

    actor_dep = admin_api.install(gw.admin.app, identity, on_key_change)
    install_limits(gw.admin.app, identity, actor_dep, budgets.base,  # budgets (issue 5)
                   lambda: asyncio.run_coroutine_threadsafe(budgets.status(), loop).result(10),
                   lambda: asyncio.run_coroutine_threadsafe(budgets.rebuild(), loop).result(60))
    await gw.admin.start()
    if telemetry is not None:
        telemetry.start()
        gw.telemetry = telemetry
    gw.budgets = budgets
    gw.verdicts = guard_input.cache  # guardrails (issue 6)
    gw._budget_task = asyncio.get_running_loop().create_task(budgets.run())
    return gw


async def serve(settings: Settings) -> int:
    """`agent-egress run`: start, wait for SIGTERM/SIGINT, drain, exit 0."""
    gw = await start(settings)
    # Everything built so far (mitmproxy, Presidio/spaCy, SQLAlchemy: ~250k objects) lives
    # as long as the process: out of the collector's sight, a full collection no longer
    # walks it. Measured at 64 streams: full collections went from 100 ms of pause each
    # (the loop stalls; p99 time to first event) to 16 ms at most (benchmarks/README.md).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addrs = gw.listen_addrs()
    log.info("agent-egress ready: reverse http://%s:%d/v1%s, admin http://%s:%d",
             addrs[0][0], addrs[0][1],
             f", proxy {addrs[1][0]}:{addrs[1][1]}" if len(addrs) > 1 else "",
             *_split(settings.listen.admin))
    await stop.wait()
    log.info("stopping: draining in-flight calls (up to %.0fs)",
             settings.shutdown.drain_seconds)
    await gw.stop()
    log.info("stopped; ledger rows written this run: %d", gw.writer.written)
    return 0

"""Time spent in our own hooks, per call: the gateway's overhead, as a metric.

A decorator on each hook method adds its wall time (awaits included: a cache
miss's store lookup is latency we add) to the flow's Call record.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mitmproxy import http

from .call import METADATA_KEY, Call
from .refuse import refuse

log = logging.getLogger("agent_egress.gateway")

A = TypeVar("A")


def _fail_closed(flow: http.HTTPFlow, name: str) -> bool:
    """A request hook that raised must not let the call through unchecked (mitmproxy
    logs addon errors and carries on with the flow): refuse it instead."""
    call: Call | None = flow.metadata.get(METADATA_KEY)
    if call is None or flow.response is not None:
        return False
    log.exception("%s failed for %s: refusing the call", name, call.request_id)
    refuse(flow, call, 503, "the gateway could not check this call (a store or service it"
           " needs is unavailable); retry shortly", type="server_error",
           code="gateway_unavailable", retry_after=5)
    return True


def _add(flow: http.HTTPFlow, started: float) -> None:
    call: Call | None = flow.metadata.get(METADATA_KEY)
    if call is not None:
        call.overhead_s += time.perf_counter() - started


def timed(hook: Callable[[A, http.HTTPFlow], None]) -> Callable[[A, http.HTTPFlow], None]:
    @functools.wraps(hook)
    def wrapper(self: A, flow: http.HTTPFlow) -> None:
        started = time.perf_counter()
        try:
            hook(self, flow)
        except Exception:
            if not _fail_closed(flow, hook.__qualname__):
                raise
        finally:
            _add(flow, started)

    return wrapper


def timed_async(
    hook: Callable[[A, http.HTTPFlow], Awaitable[None]],
) -> Callable[[A, http.HTTPFlow], Awaitable[None]]:
    @functools.wraps(hook)
    async def wrapper(self: A, flow: http.HTTPFlow) -> None:
        started = time.perf_counter()
        try:
            await hook(self, flow)
        except Exception:
            if not _fail_closed(flow, hook.__qualname__):
                raise
        finally:
            _add(flow, started)

    return wrapper

"""Time spent in our own hooks, per call: the gateway's overhead, as a metric.

A decorator on each hook method adds its wall time (awaits included: a cache
miss's store lookup is latency we add) to the flow's Call record.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mitmproxy import http

from .call import METADATA_KEY, Call

A = TypeVar("A")


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
        finally:
            _add(flow, started)

    return wrapper

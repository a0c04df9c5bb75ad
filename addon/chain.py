"""Our addons registered with mitmproxy as one, each hook calling only those that define it.

mitmproxy dispatches every event of every flow to every addon in its chain, and runs each
flow event twice (the hook, then ``update``): per addon and per dispatch a generator, a
context manager and a coroutine, whether the addon has the hook or not. With our twenty
addons registered one by one (beside nine of mitmproxy's) that was 22 % of the event
loop's time on plain calls (py-spy, ``benchmarks/README.md``), 10 % after. Registered
through this one addon, mitmproxy dispatches to eight addons instead of twenty-nine, and
each hook here is a loop over the bound methods that implement it, in chain order.

The semantics are mitmproxy's: the addons run in order, each awaited before the next; an
addon that raises is logged and the next one runs (``safecall``); ``AddonHalt`` and
``OptionsError`` propagate. Each addon keeps one concern; only the dispatch is shared.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import exceptions, hooks
from mitmproxy.proxy import layers, server_hooks

log = logging.getLogger("agent_egress.gateway")

_PASS = (exceptions.AddonHalt, exceptions.OptionsError)
_HOOK_MODULES = (layers, server_hooks)
"""Imported for their hook classes, which fill ``hooks.all_hooks`` as they are defined."""


def _hooks_of(addons: Sequence[object], name: str) -> list[tuple[Callable[..., Any], bool]]:
    out: list[tuple[Callable[..., Any], bool]] = []
    for addon in addons:
        func = getattr(addon, name, None)
        if callable(func):
            out.append((func, inspect.iscoroutinefunction(func)))
    return out


def _sync_dispatch(name: str, funcs: list[tuple[Callable[..., Any], bool]]
                   ) -> Callable[..., None]:
    def dispatch(*args: Any) -> None:
        for func, _ in funcs:
            try:
                func(*args)
            except _PASS:
                raise
            except Exception:
                log.exception("addon error in %s (%s)", name, getattr(func, "__qualname__", func))

    return dispatch


def _async_dispatch(name: str, funcs: list[tuple[Callable[..., Any], bool]]
                    ) -> Callable[..., Any]:
    async def dispatch(*args: Any) -> None:
        for func, is_coro in funcs:
            try:
                if is_coro:
                    await func(*args)
                else:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except _PASS:
                raise
            except Exception:
                log.exception("addon error in %s (%s)", name, getattr(func, "__qualname__", func))

    return dispatch


class Chain:
    """The request path's addons (DESIGN §2), in order, as one mitmproxy addon.

    Build it with the complete list: hooks are bound once, here. It has no ``addons``
    attribute on purpose (mitmproxy would then walk into the children itself).
    """

    def __init__(self, addons: Sequence[object]) -> None:
        self.chain = list(addons)
        self.hook_names: list[str] = []
        for name in hooks.all_hooks:
            funcs = _hooks_of(self.chain, name)
            if not funcs:
                continue
            self.hook_names.append(name)
            dispatch = (_async_dispatch(name, funcs) if any(c for _, c in funcs)
                        else _sync_dispatch(name, funcs))
            setattr(self, name, dispatch)

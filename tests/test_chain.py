"""The composite addon (addon/chain.py) dispatches as mitmproxy would, through mitmproxy."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import taddons, tflow

from agent_egress.addon import gateway
from agent_egress.addon.chain import Chain


class Recorder:
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    async def request(self, flow: object) -> None:
        await asyncio.sleep(0)  # really suspends: the next addon must still wait for it
        self.seen.append(f"{self.name}.request")

    def response(self, flow: object) -> None:
        self.seen.append(f"{self.name}.response")


class Raises:
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def request(self, flow: object) -> None:
        self.seen.append("raises.request")
        raise RuntimeError("boom")


class Halts:
    def response(self, flow: object) -> None:
        raise exceptions.AddonHalt()


def test_hooks_run_in_order_and_an_error_does_not_stop_the_next(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    chain = Chain([Recorder("a", seen), Raises(seen), Recorder("b", seen)])
    flow = tflow.tflow()

    async def run() -> None:
        with taddons.context() as tctx:
            tctx.master.addons.add(chain)
            await tctx.master.addons.handle_lifecycle(HttpRequestHook(flow))
            await tctx.master.addons.handle_lifecycle(HttpResponseHook(flow))

    with caplog.at_level(logging.ERROR, "agent_egress.gateway"):
        asyncio.run(run())
    assert seen == ["a.request", "raises.request", "b.request", "a.response", "b.response"]
    assert any("boom" in r.getMessage() or (r.exc_info and "boom" in str(r.exc_info[1]))
               for r in caplog.records)


def test_addon_halt_propagates_and_absent_hooks_are_absent() -> None:
    chain = Chain([Halts()])
    assert not hasattr(chain, "request")  # mitmproxy then skips us for that event
    with pytest.raises(exceptions.AddonHalt):
        chain.response(tflow.tflow(resp=True))  # type: ignore[attr-defined]


def test_sync_hooks_stay_sync() -> None:
    """mitmproxy calls load/configure through invoke_addon_sync, which refuses coroutines."""
    seen: list[str] = []
    chain = Chain([Recorder("a", seen)])
    assert not inspect.iscoroutinefunction(chain.response)  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(chain.request)  # type: ignore[attr-defined]


def test_every_hook_of_the_gateway_addons_is_dispatched() -> None:
    """Each addon class the gateway builds: every method named like a mitmproxy hook is
    one the Chain binds (a hook module not imported would leave it silently uncalled)."""
    classes = [obj for obj in vars(gateway).values()
               if inspect.isclass(obj) and obj.__module__.startswith("agent_egress.addon")]
    hook_methods = {(c.__name__, name) for c in classes for name in hooks.all_hooks
                    if callable(getattr(c, name, None))}
    assert ("Classify", "requestheaders") in hook_methods
    assert ("WebSocket", "websocket_message") in hook_methods
    for cls_name, name in hook_methods:
        cls = getattr(gateway, cls_name)
        # a bare instance is enough to bind; the hooks are looked up on the class
        chain = Chain([cls.__new__(cls)])
        assert name in chain.hook_names, (cls_name, name)

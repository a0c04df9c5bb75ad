"""``agent-egress run`` with every garbage collection timed (``profile_gateway.py --gc``).

    python benchmarks/gc_gateway.py OUT.json   # environment as for agent-egress run

Collections during start-up are dropped: what counts is the pauses while serving. On
exit (SIGTERM: the gateway drains and returns) it writes, per generation, how many
collections ran, their total and longest pause in ms.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_started = [0.0]


def _timer(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses[info["generation"]].append(time.perf_counter() - _started[0])


def _write(out: Path) -> None:
    out.write_text(json.dumps({str(g): {
        "collections": len(v), "total_ms": round(1000 * sum(v), 1),
        "longest_ms": round(1000 * max(v), 2) if v else 0.0} for g, v in _pauses.items()}))


def main() -> None:
    out = Path(sys.argv[1])
    from agent_egress.addon import cli, gateway

    start = gateway.start

    async def timed_start(settings: Any) -> gateway.Gateway:
        gw = await start(settings)
        # serve() collects and freezes the start-up heap right after this, before it next
        # awaits: forget what was timed up to then
        asyncio.get_running_loop().call_soon(lambda: [v.clear() for v in _pauses.values()])
        return gw

    gateway.start = timed_start  # type: ignore[assignment]
    gc.callbacks.append(_timer)
    atexit.register(_write, out)
    sys.argv = ["agent-egress", "run"]
    cli.main()


if __name__ == "__main__":
    main()

"""Admin listener: liveness, readiness and metrics (the admin API grows here).

Served by uvicorn inside the gateway's own event loop; uvicorn's signal
capture is disabled because the gateway owns SIGTERM/SIGINT (drain first).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent_egress.exporters.prometheus import Metrics

from .keycache import KeyCache


def build_app(metrics: Metrics, readiness: Callable[[], Any], keys: KeyCache) -> FastAPI:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        checks: dict[str, Any] = await readiness()
        ready = all(c.get("ok") for c in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        # Exemplars (trace ids) exist only in OpenMetrics; Prometheus asks for it.
        if "application/openmetrics-text" in request.headers.get("accept", ""):
            return Response(openmetrics.generate_latest(metrics.registry),  # type: ignore[no-untyped-call]
                            media_type=openmetrics.CONTENT_TYPE_LATEST)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def evict(request: Request) -> Response:
        """The CLI calls this after `token revoke` so the next request is refused.

        Unauthenticated on purpose: it can only drop cache entries (forcing a
        re-read from the store), never grant anything.
        """
        key_id = request.path_params["key_id"]
        return JSONResponse({"key_id": key_id, "evicted": keys.evict_key(key_id)})

    app = FastAPI(title="agent-egress admin API", version="1", docs_url=None, redoc_url=None)
    for path, endpoint, methods in (("/internal/keys/{key_id}/evict", evict, ["POST"]),
                                    ("/healthz", healthz, ["GET"]),
                                    ("/readyz", readyz, ["GET"]),
                                    ("/metrics", metrics_endpoint, ["GET"])):
        app.router.routes.append(Route(path, endpoint, methods=methods))
    return app


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False)
        self.server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise RuntimeError("admin server stopped during start")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        servers = self.server.servers
        return int(servers[0].sockets[0].getsockname()[1]) if servers else 0

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task

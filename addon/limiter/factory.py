"""Pick the limiter backend from the settings: Redis when configured, else SQL."""

from __future__ import annotations

from collections.abc import Callable

from agent_egress.exporters.prometheus import Metrics

from ..policy import Settings
from ..store.base import Store
from .base import Limiter
from .fallback import FallbackLimiter
from .redis import RedisLimiter
from .sql import SQLLimiter


def open_limiter(settings: Settings, store: Store, metrics: Metrics | None = None) -> Limiter:
    if settings.redis_url is None:
        engine = getattr(store, "engine", None)
        if engine is None:
            raise ValueError("the embedded limiter needs a SQL store")
        return SQLLimiter(engine)
    sums: Callable[..., dict[str, tuple[int, int]]] = store.budget_sums
    primary = RedisLimiter.from_url(settings.redis_url, settings.redis_prefix, sums)

    def on_change(degraded: bool) -> None:
        if metrics is not None:
            metrics.limits_degraded.set(1 if degraded else 0)

    return FallbackLimiter(primary, settings.budgets.on_redis_down, sums, on_change)

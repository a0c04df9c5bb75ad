"""Step 4: rate limits, then a budget reservation, on every scope at once (DESIGN §2, §6).

A transient limit is a 429 with an integer Retry-After (Codex waits exactly that
long and retries); a spent budget is a 400, which Codex shows at once with our
text and does not retry (402/403 are retried five times first: DESIGN §4).
"""

from __future__ import annotations

from mitmproxy import http

from .budgets import Budgets
from .call import METADATA_KEY, Call
from .overhead import timed_async
from .refuse import refuse


class Admit:
    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    @timed_async
    async def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.response is not None or call.principal is None:
            return
        refusal = await self.budgets.admit(call)
        if refusal is None:
            return
        if refusal.kind == "budget":
            refuse(flow, call, 400, refusal.message + "; ask your admin to raise it",
                   type="budget_exceeded", code=refusal.code, final=True)
        elif refusal.kind == "rate":
            refuse(flow, call, 429, refusal.message, type="rate_limit_error",
                   code=refusal.code, retry_after=refusal.retry_after)
        else:
            refuse(flow, call, 503, refusal.message, type="server_error", code=refusal.code,
                   retry_after=refusal.retry_after)

"""Step 4: rate limits, then a budget reservation, on every scope at once (DESIGN §2, §6).

A transient limit is a 429 with an integer Retry-After (Codex waits exactly that
long and retries); a spent budget is a 400, which Codex shows at once with our
text and does not retry (402/403 are retried five times first: DESIGN §4).
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

from .budget_policy import Refusal
from .budgets import Budgets
from .call import METADATA_KEY, Call
from .overhead import timed_async
from .protocols.responses_ws import WS_API
from .refuse import refuse


@dataclass(frozen=True, slots=True)
class Reply:
    """How a budget/rate-limit refusal is told to the client (status, OpenAI error)."""

    status: int
    message: str
    type: str
    code: str
    retry_after: int | None = None
    final: bool = False


def reply_for(refusal: Refusal) -> Reply:
    if refusal.kind == "budget":
        return Reply(400, refusal.message + "; ask your admin to raise it", "budget_exceeded",
                     refusal.code, final=True)
    if refusal.kind == "rate":
        return Reply(429, refusal.message, "rate_limit_error", refusal.code, refusal.retry_after)
    return Reply(503, refusal.message, "server_error", refusal.code, refusal.retry_after)


class Admit:
    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    @timed_async
    async def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if (call is None or flow.response is not None or call.principal is None
                or call.api == WS_API):  # WebSocket: each message is admitted (websocket.py)
            return
        refusal = await self.budgets.admit(call)
        if refusal is None:
            return
        r = reply_for(refusal)
        refuse(flow, call, r.status, r.message, type=r.type, code=r.code,
               retry_after=r.retry_after, final=r.final)

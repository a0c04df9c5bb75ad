"""Step 1: decide whether a flow is a model call we own, and start its Call record.

The reverse listener only serves the LLM API, so an unknown path there is a 404
in OpenAI format. On the explicit-proxy listener, hosts that are not a configured
provider pass through untouched (interception policy is the egress-mode issue).
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from .call import METADATA_KEY, Api, Call
from .overhead import timed
from .refuse import refuse

log = logging.getLogger("agent_egress.classify")

_ROUTES: dict[tuple[str, str], Api] = {
    ("POST", "/responses"): "openai.responses",
    ("POST", "/responses/compact"): "openai.responses.compact",
    ("POST", "/chat/completions"): "openai.chat",
    ("POST", "/messages"): "anthropic.messages",  # anthropic (issue 13): ?beta=true too
}


def agent_of(originator: str | None, user_agent: str | None) -> str:
    """A bounded agent label for metrics: codex, claude-code or other."""
    ua = (user_agent or "").lower()
    if (originator or "").startswith("codex") or ua.startswith("codex"):
        return "codex"
    if ua.startswith(("claude-cli", "claude-code")):
        return "claude-code"
    return "other"


def classify_path(method: str, path: str) -> Api | None:
    """Map METHOD + path (with or without the /v1 prefix, any query) to an API."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.startswith("/v1/"):
        path = path[3:]
    return _ROUTES.get((method.upper(), path))


class Classify:
    def __init__(self, provider_addrs: set[tuple[str, int]], max_body_bytes: int) -> None:
        self.provider_addrs = provider_addrs
        self.max_body_bytes = max_body_bytes
        self.draining = False

    @timed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        reverse = isinstance(flow.client_conn.proxy_mode, ReverseMode)
        if not reverse and (flow.request.pretty_host, flow.request.port) not in self.provider_addrs:
            return  # not an LLM host: passthrough, untouched
        api = classify_path(flow.request.method, flow.request.path)
        if api is None:
            refuse(
                flow,
                None,
                404,
                f"{flow.request.method} {flow.request.path.split('?', 1)[0]} is not an API"
                " this gateway serves (it serves POST /v1/responses, /v1/responses/compact"
                ", /v1/chat/completions and /v1/messages)",
                type="invalid_request_error",
                code="unknown_path",
            )
            return
        call = Call(api=api, agent=agent_of(flow.request.headers.get("originator"),
                                            flow.request.headers.get("user-agent")))
        flow.metadata[METADATA_KEY] = call
        if self.draining:
            refuse(
                flow,
                call,
                503,
                "this gateway replica is shutting down; retry",
                type="server_error",
                code="draining",
                close=True,
            )
            return
        length = flow.request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            refuse(
                flow,
                call,
                413,
                f"request body of {int(length)} bytes is over the gateway's limit of"
                f" {self.max_body_bytes} bytes (limits.max_body_bytes)",
                type="invalid_request_error",
                code="body_too_large",
                close=True,
            )

"""Step 1: decide whether a flow is a model call we own, and start its Call record.

The reverse listener only serves the LLM API, so an unknown path there is a 404
in OpenAI format. On the explicit-proxy listener, hosts that are not a configured
provider pass through untouched (interception policy is the egress-mode issue).
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from . import mitm_internals
from .call import METADATA_KEY, Api, Call
from .mitm_internals import REQUEST_TOO_LARGE
from .overhead import timed
from .protocols.responses_ws import WS_API
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


def classify_path(method: str, path: str, upgrade: str | None = None) -> Api | None:
    """Map METHOD + path (with or without the /v1 prefix, any query) to an API.

    ``upgrade``: the Upgrade header; ``GET /responses`` upgraded to a WebSocket is
    Codex's Responses-over-WebSocket transport (addon/websocket.py).
    """
    path = path.split("?", 1)[0].rstrip("/")
    if path.startswith("/v1/"):
        path = path[3:]
    if (upgrade or "").lower() == "websocket" and method.upper() == "GET" and path == "/responses":
        return WS_API
    return _ROUTES.get((method.upper(), path))


class Classify:
    def __init__(self, provider_addrs: set[tuple[str, int]], max_body_bytes: int,
                 anthropic_addrs: frozenset[tuple[str, int]] = frozenset()) -> None:
        self.provider_addrs = provider_addrs
        self.anthropic_addrs = anthropic_addrs
        """Egress mode (issue 13 item 6): Claude Code's own non-model calls to an Anthropic
        host (/api/claude_code/*, event logging, /api/oauth/*) pass through there; the
        egress addon has already refused any that carry a gateway token."""
        self.max_body_bytes = max_body_bytes
        self.draining = False

    @timed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        reverse = isinstance(flow.client_conn.proxy_mode, ReverseMode)
        if not reverse and (flow.request.pretty_host, flow.request.port) not in self.provider_addrs:
            return  # not an LLM host: passthrough, untouched
        api = classify_path(flow.request.method, flow.request.path,
                            flow.request.headers.get("upgrade"))
        if api is None and not reverse and (
                flow.request.pretty_host, flow.request.port) in self.anthropic_addrs:
            return  # egress mode (issue 13): a non-model Anthropic call, passed untouched
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
        if reverse and flow.request.authority:  # absolute-form: the client names a host
            refuse(flow, call, 400, "the reverse listener takes origin-form requests only"
                   " (POST /v1/...): the upstream comes from the gateway's config",
                   type="invalid_request_error", code="absolute_form", close=True)
            return
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
            self._too_large(flow, call, f"request body of {int(length)} bytes")

    def _too_large(self, flow: http.HTTPFlow, call: Call, what: str) -> None:
        refuse(flow, call, 413, f"{what} is over the gateway's limit of"
               f" {self.max_body_bytes} bytes (limits.max_body_bytes)",
               type="invalid_request_error", code="body_too_large", close=True)

    @timed
    def error(self, flow: http.HTTPFlow) -> None:
        """A body cut off as it arrived (mitm_internals.cap_request_bodies): mitmproxy now
        writes its error page; hand it our refusal so the client sees its own format."""
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.error is None or flow.error.msg != REQUEST_TOO_LARGE:
            return
        if call.refused is None:  # chunked: no length to refuse on in requestheaders
            self._too_large(flow, call, "a request body of more than that")
        mitm_internals.pending_response.set(flow.response)

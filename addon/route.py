"""Step 5: send the call to its provider with the vaulted key in place of the token.

Foundation routing is one provider (the default); failover and routing rules
extend this step. Re-routing works by rewriting scheme/host/port/path in the
`request` hook (DESIGN §4b).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from mitmproxy import http

from .call import METADATA_KEY, Call
from .keyring import Keyring
from .overhead import timed_async
from .policy import Provider
from .protocols import openai_chat
from .refuse import refuse

_DROP_HEADERS = ("openai-organization", "openai-project", "proxy-authorization")


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str
    port: int
    path_prefix: str
    netloc: str

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        assert parts.hostname is not None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), parts.netloc)


def upstream_path(prefix: str, client_path: str) -> str:
    """/v1/responses?x -> <prefix>/responses?x (the provider base URL holds the version)."""
    path, sep, query = client_path.partition("?")
    if path.startswith("/v1/") or path == "/v1":
        path = path[3:]
    return f"{prefix}{path}{sep}{query}"


class Route:
    def __init__(self, provider: Provider, keyring: Keyring) -> None:
        self.provider = provider
        self.upstream = Upstream.from_url(provider.base_url)
        self.keyring = keyring

    @timed_async
    async def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.response is not None:
            return
        p = call.principal
        name = (self.provider.key_for(p.org, p.team, call.tags) if p is not None
                else self.provider.key)
        key = self.keyring.get(name)
        if key is None:
            await self.keyring.refresh()  # a key set since the last refresh
            key = self.keyring.get(name)
        if key is None:
            refuse(flow, call, 503, f"the provider key {name!r} for provider"
                   f" {self.provider.name!r} is not in the gateway's vault; an admin runs"
                   f" `agent-egress vault set {name}`",
                   type="server_error", code="provider_key_missing")
            return
        if call.api == "openai.chat" and call.stream:
            rewritten = openai_chat.with_stream_usage(flow.request.content or b"")
            if rewritten is not None:
                flow.request.content = rewritten
        up = self.upstream
        req = flow.request
        req.scheme, req.host, req.port = up.scheme, up.host, up.port
        req.path = upstream_path(up.path_prefix, req.path)
        req.headers["host"] = up.netloc
        for name in _DROP_HEADERS:
            req.headers.pop(name, None)
        req.headers["authorization"] = f"Bearer {key}"
        call.provider = self.provider.name
        call.upstream_host = up.host
        call.upstream_port = up.port

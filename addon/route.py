"""Step 5: choose the provider for a call and rewrite the request for it.

Choice, in order: the route rule matching the model (ordered providers, the
first one drawn by weight per session when weights are given; no rule: the
default provider); only providers the key's scope allows and that serve the API;
the session's sticky provider first (prompt caches); then skip providers this
exact request already failed on (the client's retry, see addon/failover.py) and
providers whose breaker is open. Nothing usable: a 503 saying when to retry.

The rewrite per provider kind: scheme/host/port/path from ``base_url`` (the
`request` hook is where mitmproxy lets us re-route, DESIGN §4b), the vaulted key
(``Authorization: Bearer`` or Azure's ``api-key``), Azure's deployment path and
``api-version``, the provider's model name, and for a Chat-only provider the
Responses request translated to Chat Completions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http

from .call import METADATA_KEY, Call
from .failover import Attempt, FailoverState
from .identity import matches_any
from .keyring import Keyring
from .overhead import timed_async
from .policy import Provider, RouteRule
from .protocols import openai_chat
from .protocols.responses_to_chat import ChatToResponsesStream, chat_request, custom_tool_names
from .protocols.responses_ws import WS_API
from .refuse import refuse

_DROP_HEADERS = ("openai-organization", "openai-project", "proxy-authorization")
TURN_STATE = "x-codex-turn-state"


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


def provider_path(p: Provider, prefix: str, client_path: str, api: str, model: str,
                  translate: bool) -> str:
    """The upstream path for this provider kind (Azure deployments, chat translation)."""
    if translate:
        client_path = "/chat/completions"
    if p.kind == "anthropic":  # anthropic (issue 13)
        return anthropic_path(prefix, client_path)
    if p.kind == "azure_openai" and p.api_version:
        path = client_path.partition("?")[0].removeprefix("/v1")
        if api == "openai.chat" or translate:
            path = f"/deployments/{model}/chat/completions"
        return f"{prefix}{path}?api-version={p.api_version}"
    return upstream_path(prefix, client_path)


def plan(routes: Sequence[RouteRule], default: str, model: str, session: str) -> list[str]:
    """Providers for a model in preference order (pure; weights drawn per session)."""
    rule = next((r for r in routes if fnmatchcase(model, r.model)), None)
    if rule is None:
        return [default]
    order = list(rule.providers)
    if rule.weights:
        digest = hashlib.blake2b(session.encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") % sum(rule.weights)
        for name, weight in zip(rule.providers, rule.weights, strict=True):
            if point < weight:
                order.remove(name)
                order.insert(0, name)
                break
            point -= weight
    return order


def serves(p: Provider, api: str) -> bool:
    """Chat-only providers cannot take remote compaction (no Chat equivalent)."""
    if not same_family(p, api):  # anthropic (issue 13)
        return False  # an Anthropic provider speaks only Messages, and only it does
    if api == WS_API:  # Codex over WebSocket: only providers configured to take it
        return p.takes_websockets
    return not (p.chat_only and api == "openai.responses.compact")


def same_family(p: Provider, api: str) -> bool:
    """Anthropic providers and Messages calls belong together; OpenAI kinds the rest."""
    return (p.kind == "anthropic") == (api == "anthropic.messages")


def anthropic_path(prefix: str, client_path: str) -> str:
    """/v1/messages?beta=true under an Anthropic base URL given with or without /v1."""
    path, sep, query = client_path.partition("?")
    if not path.startswith("/v1/"):
        path = "/v1" + path
    return f"{prefix.removesuffix('/v1')}{path}{sep}{query}"


class Route:
    def __init__(self, providers: Mapping[str, Provider], default: str,
                 routes: Sequence[RouteRule], keyring: Keyring, state: FailoverState) -> None:
        self.providers = dict(providers)
        self.upstreams = {n: Upstream.from_url(p.base_url) for n, p in providers.items()}
        self.default = default
        self.routes = list(routes)
        self.keyring = keyring
        self.state = state

    @staticmethod
    def key_for(call: Call, p: Provider) -> str:
        k = call.principal
        return p.key_for(k.org, k.team, call.tags) if k is not None else p.key

    @timed_async
    async def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.response is not None:
            return
        if call.principal is None:  # never spend a vaulted key on an unauthenticated call
            refuse(flow, call, 401, "no authenticated gateway token on this call",
                   type="invalid_request_error", code="token_missing")
            return
        session = call.session_id or ""
        allowed = call.principal.allowed_providers if call.principal is not None else []
        planned = plan(self.routes, self.default, call.requested_model or "", session)
        candidates = [n for n in planned
                      if matches_any(n, allowed) and serves(self.providers[n], call.api)]
        if not any(same_family(self.providers[n], call.api) for n in planned):
            # anthropic (issue 13): the planned providers speak another API family (e.g.
            # the OpenAI default for a Claude Code call): use the configured ones that do
            candidates = [n for n, p in self.providers.items()
                          if matches_any(n, allowed) and serves(p, call.api)]
        if not candidates:
            refuse(flow, call, 403, f"no provider this key may use serves model"
                   f" {call.requested_model!r} for {call.api}; ask your platform team",
                   type="permission_denied", code="provider_not_allowed")
            return
        body = flow.request.raw_content or b""
        failed = self.state.memory.lookup(session, body)
        sticky = self.state.sticky.get(session) if session else None
        if sticky in candidates:
            candidates.remove(sticky)
            candidates.insert(0, sticky)
        preferred = candidates[0]
        avoid = set(failed.providers) if failed is not None else set()
        if avoid.issuperset(candidates):
            avoid = set()  # every provider failed this request once: start over
        chosen = next((n for n in candidates if n not in avoid
                       and self.state.available(n, self.key_for(call, self.providers[n]))), None)
        if chosen is None:
            wait = self.state.breakers.seconds_to_half_open(
                (n, self.key_for(call, self.providers[n])) for n in candidates)
            refuse(flow, call, 503, f"every provider for model {call.requested_model!r}"
                   f" ({', '.join(candidates)}) is failing; retry in {max(1, int(wait + 0.999))}s",
                   type="server_error", code="providers_unavailable",
                   retry_after=max(1, int(wait + 0.999)))
            return
        provider = self.providers[chosen]
        key_name = self.key_for(call, provider)
        key = self.keyring.get(key_name)
        if key is None:
            await self.keyring.refresh()  # a key set since the last refresh
            key = self.keyring.get(key_name)
        if key is None:
            refuse(flow, call, 503, f"the provider key {key_name!r} for provider"
                   f" {provider.name!r} is not in the gateway's vault; an admin runs"
                   f" `agent-egress vault set {key_name}`",
                   type="server_error", code="provider_key_missing")
            return
        if chosen != preferred:
            if failed is not None and preferred in failed.providers:
                self.state.failover(call, failed.providers[-1], chosen, failed.reason)
            else:
                self.state.failover(call, preferred, chosen, "breaker_open")
        if sticky is not None and sticky != chosen:
            flow.request.headers.pop(TURN_STATE, None)  # the old provider's routing token
        if session:
            self.state.sticky.set(session, chosen)
        up = self.upstreams[chosen]
        attempt = Attempt(provider, key_name, candidates, session, body, (up.host, up.port))
        if not self._rewrite(flow, call, provider, up, key, attempt):
            return
        self.state.acquire(call, chosen, key_name)
        call.attempt = attempt
        call.provider = provider.name
        call.upstream_host = up.host
        call.upstream_port = up.port
        self.state.watch(flow, call, attempt)

    def _rewrite(self, flow: http.HTTPFlow, call: Call, p: Provider, up: Upstream, key: str,
                 attempt: Attempt) -> bool:
        req = flow.request
        model = p.model_for(call.requested_model or "")
        translate = p.chat_only and call.api == "openai.responses"
        if call.api != WS_API and (translate or model != call.requested_model):
            try:
                obj: Any = json.loads(req.content or b"")
            except ValueError:
                obj = None
            if not isinstance(obj, dict):  # guard_input parsed it: only a decode problem
                refuse(flow, call, 400, "the request body could not be read for this provider",
                       type="invalid_request_error", code="invalid_body")
                return False
            if translate:
                attempt.custom_tools = custom_tool_names(obj)
                attempt.translator = ChatToResponsesStream(attempt.custom_tools)
                obj = chat_request(obj, model)
            else:
                obj["model"] = model
            req.content = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        if (call.api == "openai.chat" or translate) and call.stream:
            rewritten = openai_chat.with_stream_usage(req.content or b"")
            if rewritten is not None:
                req.content = rewritten
        req.scheme, req.host, req.port = up.scheme, up.host, up.port
        req.path = provider_path(p, up.path_prefix, req.path, call.api, model, translate)
        req.headers["host"] = up.netloc
        for name in _DROP_HEADERS:
            req.headers.pop(name, None)
        if p.kind == "azure_openai":
            req.headers.pop("authorization", None)
            req.headers["api-key"] = key
        elif p.kind == "anthropic":  # anthropic (issue 13): anthropic-version/-beta pass
            req.headers.pop("authorization", None)
            req.headers["x-api-key"] = key
        else:
            req.headers["authorization"] = f"Bearer {key}"
        return True

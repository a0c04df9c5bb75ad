"""ChatGPT-login Codex in egress proxy mode (issue 9 item 4, DESIGN §4).

Codex logged in with ChatGPT sends its model calls to
``chatgpt.com/backend-api/codex/responses`` with the developer's own ChatGPT JWT. No
vaulted key is involved, so none of the gateway's own steps (authenticate, guard, admit,
route) apply: this addon sits after route and before the stream tap, and by policy
(``egress.chatgpt_login``, per-org overrides) either

- ``refuse``: a 400 in OpenAI's format, which Codex prints at once without retrying
  (DESIGN §4), telling the developer to use their gateway token;
- ``meter``: lets the call through untouched (own credential, no rerouting, no failover;
  a WebSocket upgrade gets a 403, so Codex falls back to HTTP, which is metered)
  and hands a ``Call`` marked ``billing="subscription"`` to the stream tap and settle,
  which read usage from the Responses stream and write one ledger row priced as
  equivalent USD; subscription rows never count against gateway budgets;
- ``passthrough``: nothing.

Bootstrap calls on the same host (accounts check, models list) always pass untouched.
The JWT is only read for attribution claims (addon/protocols/chatgpt_login.py), never
logged or stored.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mitmproxy import http

from . import egress, tokens
from .call import METADATA_KEY, Call
from .classify import agent_of
from .keycache import KeyCache
from .overhead import timed_async
from .policy import Provider
from .protocols import openai_responses
from .protocols.chatgpt_login import (
    ChatGPTIdentity,
    ChatGPTPolicy,
    chatgpt_policy,
    identity,
    is_model_path,
    refusal_message,
)
from .protocols.codex_headers import session_and_turn
from .protocols.summary import BadRequest
from .refuse import refuse
from .store.base import KeyRecord

log = logging.getLogger("agent_egress.chatgpt_login")

SUBSCRIPTION_PROVIDER = Provider(name="chatgpt", kind="openai",
                                 base_url="https://chatgpt.com/backend-api/codex", key="-")
"""The ledger's provider for subscription calls; priced as OpenAI (same models)."""
SUBSCRIBER_SCOPE = "chatgpt"
"""org, team and key id of subscription rows without a gateway token: the metric labels
stay bounded; the account and user are in the row's user and chatgpt_* tags."""
_INLINE_PARSE_BYTES = 256 * 1024  # larger bodies are decoded in a worker thread
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def subscriber(who: ChatGPTIdentity) -> KeyRecord:
    """The principal of a metered call that carried no gateway token: the JWT's email."""
    user = who.email or who.user_id or who.account_id or "unknown"
    return KeyRecord(id=SUBSCRIBER_SCOPE, org=SUBSCRIBER_SCOPE, team=SUBSCRIBER_SCOPE,
                     user=user[:128], description="ChatGPT subscription (unverified claims)",
                     created_at=_EPOCH, expires_at=None, revoked_at=None)


def _load(req: http.Request) -> dict[str, Any]:
    """The JSON body, decoded first if Codex compressed it (content-encoding)."""
    return openai_responses.load_object(req.content or b"")


class ChatGPTLogin:
    """Goes after route and before the stream tap (see the module docstring)."""

    def __init__(self, hosts: str | None, default: ChatGPTPolicy,
                 overrides: Mapping[str, ChatGPTPolicy], keys: KeyCache,
                 hash_key: bytes) -> None:
        self.hosts = None if hosts is None else re.compile(hosts, re.IGNORECASE)
        self.default = default
        self.overrides = dict(overrides)
        self.keys = keys
        self.hash_key = hash_key

    def wants(self, flow: http.HTTPFlow) -> bool:
        """A ChatGPT-login model call on the proxy listener that no step has answered."""
        return (flow.response is None and METADATA_KEY not in flow.metadata
                and self.hosts is not None and egress.is_proxied(flow)
                and self.hosts.match(f"{flow.request.pretty_host}:{flow.request.port}")
                is not None and is_model_path(flow.request.path))

    async def principal(self, flow: http.HTTPFlow) -> KeyRecord | None:
        """The active key record of the gateway token in the proxy credential, if any."""
        token = flow.metadata.get(egress.PROXY_CREDENTIAL_KEY)
        if not token or not tokens.is_well_formed(token):
            return None
        record = await self.keys.lookup(tokens.hash_token(token, self.hash_key))
        if record is None or record.state(datetime.now(UTC)) != "active":
            return None  # not a usable gateway identity: the top-level policy applies
        return record

    @timed_async
    async def request(self, flow: http.HTTPFlow) -> None:
        if not self.wants(flow):
            return
        record = await self.principal(flow)
        policy = chatgpt_policy(self.default, self.overrides,
                                record.org if record else None, record.team if record else None)
        if policy == "passthrough":
            return
        req = flow.request
        who = identity(req.headers.get("authorization"), req.headers.get("chatgpt-account-id"))
        call = Call(api="chatgpt.codex", billing="subscription", chatgpt=who,
                    agent=agent_of(req.headers.get("originator"), req.headers.get("user-agent")))
        call.principal = record
        flow.metadata[METADATA_KEY] = call
        if policy == "refuse":
            log.info("refused ChatGPT-login call %s (account %s)", call.request_id,
                     who.account_id or "-")
            refuse(flow, call, 400, refusal_message(req.pretty_host),
                   type="invalid_request_error", code="chatgpt_login_refused", final=True)
            return
        if req.headers.get("upgrade", "").lower() == "websocket":
            # Metering reads the HTTP stream; the WebSocket form is not metered yet. A 403
            # on the upgrade makes Codex retry it briefly, then fall back to HTTP POST
            # (observed with 0.169, tests/test_websocket.py), which is metered.
            refuse(flow, call, 403, "metered ChatGPT-login traffic goes over HTTP; Codex"
                   " falls back to it by itself", type="invalid_request_error",
                   code="chatgpt_websocket_not_metered")
            return
        call.principal = record or subscriber(who)
        call.tags = {**who.tags(), **(record.tags if record is not None else {})}
        call.provider = SUBSCRIPTION_PROVIDER.name
        call.upstream_host, call.upstream_port = req.pretty_host, req.port
        raw = req.raw_content or b""
        call.request_bytes = len(raw)
        try:
            obj = (_load(req) if len(raw) <= _INLINE_PARSE_BYTES
                   else await asyncio.to_thread(_load, req))
            info = openai_responses.request_info(obj)
        except (BadRequest, ValueError):
            return  # still metered: usage (and the served model) come from the response
        call.requested_model, call.stream = info.model[:128], info.stream
        call.tool_output_ids = info.tool_output_ids
        call.session_id, call.turn_id = session_and_turn(
            req.headers.get, info.prompt_cache_key, info.client_session_id)

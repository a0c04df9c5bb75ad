"""ChatGPT-login Codex (DESIGN §4): recognise its model calls, read who is calling, decide.

Codex logged in with ChatGPT calls ``POST https://chatgpt.com/backend-api/codex/responses``
(the same Responses stream; or a WebSocket upgrade on the same path) with
``Authorization: Bearer <ChatGPT JWT>`` and ``ChatGPT-Account-ID``, after bootstrap calls
(``/backend-api/wham/accounts/check``, a models list, ...). Only the model calls matter
here; everything else on the host passes through untouched.

The JWT is decoded WITHOUT verifying its signature: the gateway does not authenticate
anyone with it (the developer's own credential goes to OpenAI, which verifies it), it only
attributes metered usage. A forged token can therefore only mislabel the caller's own
traffic. The token itself is never logged or stored: only the claims below are kept.
Pure functions, no mitmproxy import (the WebSocket path reuses them).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .values import loads_object

ChatGPTPolicy = Literal["meter", "refuse", "passthrough"]
POLICIES: tuple[ChatGPTPolicy, ...] = ("meter", "refuse", "passthrough")
AUTH_CLAIM = "https://api.openai.com/auth"
PROFILE_CLAIM = "https://api.openai.com/profile"
_MODEL_PATHS = ("/backend-api/codex/responses", "/backend-api/codex/responses/compact")
_MAX_TOKEN = 16 * 1024  # a ChatGPT access token is ~2 KB; bound the work on junk


def is_model_path(path: str) -> bool:
    """True for the Codex model-call paths (any method, any query): HTTP POST and the
    WebSocket GET upgrade share them. Bootstrap calls (accounts check, models) are not."""
    return path.split("?", 1)[0].rstrip("/") in _MODEL_PATHS


@dataclass(frozen=True, slots=True)
class ChatGPTIdentity:
    """Who a ChatGPT-login call belongs to, from unverified JWT claims and headers."""

    account_id: str | None = None
    user_id: str | None = None
    email: str | None = None
    plan_type: str | None = None

    def tags(self) -> dict[str, str]:
        """Ledger/span tags (bounded like request tags: 128 characters)."""
        out = {"chatgpt_account": self.account_id, "chatgpt_user": self.user_id,
               "chatgpt_plan": self.plan_type, "chatgpt_email": self.email}
        return {k: v[:128] for k, v in out.items() if v}


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (see the module docstring); {} when unreadable."""
    parts = token.split(".")
    if len(token) > _MAX_TOKEN or len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        raw = base64.urlsafe_b64decode(payload.encode("ascii"))
    except (binascii.Error, UnicodeError, ValueError):
        return {}
    return loads_object(raw) or {}


def _str(value: object) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def identity(authorization: str | None, account_header: str | None) -> ChatGPTIdentity:
    """Identity claims from ``Authorization: Bearer <JWT>`` and ``ChatGPT-Account-ID``
    (the header wins for the account: it is the workspace Codex chose)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    claims = jwt_claims(token.strip()) if scheme.lower() == "bearer" else {}
    auth = claims.get(AUTH_CLAIM)
    auth = auth if isinstance(auth, dict) else {}
    profile = claims.get(PROFILE_CLAIM)
    profile = profile if isinstance(profile, dict) else {}
    return ChatGPTIdentity(
        account_id=_str(account_header) or _str(auth.get("chatgpt_account_id")),
        user_id=_str(auth.get("chatgpt_user_id")) or _str(auth.get("user_id")),
        email=_str(claims.get("email")) or _str(profile.get("email")),
        plan_type=_str(auth.get("chatgpt_plan_type")),
    )


def chatgpt_policy(default: ChatGPTPolicy, overrides: Mapping[str, ChatGPTPolicy],
                   org: str | None, team: str | None = None) -> ChatGPTPolicy:
    """The policy for a caller: ``org/team`` override, else ``org``, else the default.

    The org is known only when the proxy credential carries a valid gateway token;
    without one (org None) the top-level default applies.
    """
    if org is not None:
        if team is not None and f"{org}/{team}" in overrides:
            return overrides[f"{org}/{team}"]
        if org in overrides:
            return overrides[org]
    return default


def refusal_message(host: str) -> str:
    """What Codex shows under ``refuse``: why, and the two ways to comply."""
    return (f"ChatGPT-login Codex traffic to {host} is not allowed through this company's"
            " gateway (egress.chatgpt_login: refuse). Use your agent-egress gateway token"
            " instead: `printenv AGENT_EGRESS_TOKEN | codex login --with-api-key`, or the"
            " Codex config your platform team gave you (`agent-egress token issue` prints it)")

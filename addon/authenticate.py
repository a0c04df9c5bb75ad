"""Step 2: gateway token -> key record (org, team, user); the token never goes upstream."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from mitmproxy import http

from . import egress, tokens
from .abuse import FINGERPRINT_KEY
from .call import METADATA_KEY, Call
from .keycache import KeyCache
from .overhead import timed_async
from .refuse import refuse

log = logging.getLogger("agent_egress.auth")

_CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")


class Authenticate:
    def __init__(self, keys: KeyCache, hash_key: bytes) -> None:
        self.keys = keys
        self.hash_key = hash_key

    @timed_async
    async def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.response is not None:
            return
        token = tokens.extract_token(flow.request.headers.get("authorization"))
        if token is None and call.api == "anthropic.messages":  # anthropic (issue 13):
            # Claude Code sends ANTHROPIC_API_KEY as x-api-key
            token = flow.request.headers.get("x-api-key", "").strip() or None
        for name in _CREDENTIAL_HEADERS:
            flow.request.headers.pop(name, None)
        # egress proxy mode (issue 9): the proxy credential wins over the agent's API key
        token = flow.metadata.get(egress.PROXY_CREDENTIAL_KEY) or token
        if egress.is_proxied(flow) and (not token or not tokens.is_well_formed(token)):
            egress.challenge(flow, call, egress.MISSING_CREDENTIAL, "proxy_auth_required")
            return
        if not token:
            self._refuse(flow, call, "no gateway token: send Authorization: Bearer <your"
                         " agent-egress token> (ask your platform team for one)", "token_missing")
            return
        if not tokens.is_well_formed(token) and not token.startswith(tokens.TOKEN_PREFIX):
            flow.metadata[FINGERPRINT_KEY] = "not-a-gateway-token"
            self._refuse(flow, call, "the credential sent is not an agent-egress gateway token"
                         f" (they start with {tokens.TOKEN_PREFIX}); check the environment"
                         " variable your agent's env_key names", "token_malformed")
            return
        # security (issue 12): a bad checksum and an unknown token get the same answer (no
        # oracle for a guesser); the audit record (addon/abuse.py) keeps which it was.
        digest = tokens.hash_token(token, self.hash_key)
        well_formed = tokens.is_well_formed(token)
        flow.metadata[FINGERPRINT_KEY] = "hmac:" + digest[:12] if well_formed else "bad-checksum"
        record = await self.keys.lookup(digest) if well_formed else None
        if record is None:
            self._refuse(flow, call, "this gateway token is not known to the gateway; ask"
                         " your platform team for a new one", "token_unknown")
            call.refused = "token_unknown" if well_formed else "token_malformed"
            return
        state = record.state(datetime.now(UTC))
        if state == "disabled":
            level = "" if record.disabled_by == "key" else f" (its {record.disabled_by} is)"
            self._refuse(flow, call, f"gateway token {record.id} is disabled{level}; ask your"
                         " platform team", "token_disabled")
            return
        if state == "expired" and record.grace_until is not None:
            self._refuse(flow, call, f"this gateway token for {record.id} was replaced by a"
                         f" rotation and stopped working at {record.grace_until:%Y-%m-%d %H:%M}"
                         " UTC; use the new token", "token_rotated")
            return
        if state != "active":
            when = record.revoked_at if state == "revoked" else record.expires_at
            verb = "was revoked" if state == "revoked" else "expired"
            self._refuse(flow, call, f"gateway token {record.id} {verb} at"
                         f" {when:%Y-%m-%d %H:%M} UTC; ask your platform team for a new one",
                         f"token_{state}")
            return
        call.principal = record

    @staticmethod
    def _refuse(flow: http.HTTPFlow, call: Call, message: str, code: str) -> None:
        log.info("refused %s: %s", call.request_id, code)
        refuse(flow, call, 401, message, type="invalid_request_error", code=code)

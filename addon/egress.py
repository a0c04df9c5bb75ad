"""Egress proxy mode (issue 9): the explicit-proxy listener's own rules.

Which CONNECTs are decrypted is mitmproxy's ``allow_hosts`` (built here from
``egress.intercept_hosts`` plus the providers' host:port): every other tunnel
carries the client's own TLS handshake to the server untouched. ``allow_hosts``
does not cover plain HTTP (DESIGN §4b), so this addon checks hosts itself, refuses
``egress.deny_hosts``, takes the gateway token from ``Proxy-Authorization`` (Basic,
token as the password, or Bearer) and never lets a gateway token leave upstream: not to
other hosts, and not with a provider host's non-model calls either (Claude Code's own
``/api/claude_code/*``, event logging and ``/api/oauth/*`` on api.anthropic.com), which
are refused in the client's format when they carry one and pass untouched otherwise.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from mitmproxy import connection, http
from mitmproxy.proxy.mode_specs import RegularMode

from . import tokens
from .call import Call
from .classify import classify_path
from .policy import Settings
from .refuse import refuse

log = logging.getLogger("agent_egress.egress")

PROXY_CREDENTIAL_KEY = "agent_egress.proxy_credential"
"""flow.metadata key: the gateway token the proxy credential carried (authenticate reads it)."""
CHALLENGE = 'Basic realm="agent-egress"'
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")


def host_pattern(patterns: Iterable[str]) -> str | None:
    """One regex over mitmproxy's ``host:port`` strings for ``host``, ``host:port`` and
    ``*.suffix[:port]`` patterns (a bare host matches any port); None for no pattern."""
    alternatives = []
    for raw in patterns:
        host, sep, port = raw.strip().lower().rpartition(":")
        if not sep or not port.isdigit():
            host, port = raw.strip().lower(), ""
        wildcard = host.startswith("*.")
        body = re.escape(host[2:] if wildcard else host)
        alt = (r"[^:/]+\." if wildcard else "") + body + (f":{port}" if port else r"(?::\d+)?")
        alternatives.append(alt)
    return "^(?:" + "|".join(alternatives) + ")$" if alternatives else None


def intercept_pattern(settings: Settings) -> str:
    """mitmproxy ``allow_hosts`` entry: ``egress.intercept_hosts``, ``egress.chatgpt_hosts``
    and every provider's own host:port (a provider on a non-standard port is decrypted,
    nothing more)."""
    ups = [urlsplit(p.base_url) for p in settings.providers]
    own = [f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}" for u in ups]
    pattern = host_pattern([*settings.egress.intercept_hosts, *settings.egress.chatgpt_hosts,
                            *own])
    assert pattern is not None  # there is always at least one provider
    return pattern


def proxy_credential(header: str | None) -> str | None:
    """The token in a Proxy-Authorization header: Basic's password (or its user when the
    password is empty) or a Bearer credential; None when there is none."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    return (password or user).strip() or None


def is_proxied(flow: http.HTTPFlow) -> bool:
    """True for flows on the explicit-proxy listener (HTTPS_PROXY), not the reverse one."""
    return isinstance(flow.client_conn.proxy_mode, RegularMode)


def challenge(flow: http.HTTPFlow, call: Call | None, message: str, code: str) -> None:
    """407 with Proxy-Authenticate, in the client's own error format (addon/refuse.py)."""
    refuse(flow, call, 407, message, type="invalid_request_error", code=code)
    assert flow.response is not None
    flow.response.status_code = 407
    flow.response.headers["proxy-authenticate"] = CHALLENGE
    if call is not None:
        call.status_code = 407


MISSING_CREDENTIAL = ("this proxy needs your agent-egress gateway token: set HTTPS_PROXY="
            "http://user:<token>@<gateway>:<port> or give the token as your agent's API key"
            " (ask your platform team for one)")


def _text(status: int, message: str) -> http.Response:
    return http.Response.make(status, f"agent-egress: {message}\n",
                              {"content-type": "text/plain; charset=utf-8"})


class Egress:
    """Goes before classify: host checks and the proxy credential, proxy listener only."""

    def __init__(self, intercept: str | None, deny: str | None,
                 provider_addrs: set[tuple[str, int]],
                 anthropic_addrs: frozenset[tuple[str, int]] = frozenset()) -> None:
        self.intercept = None if intercept is None else re.compile(intercept, re.IGNORECASE)
        self.deny = None if deny is None else re.compile(deny, re.IGNORECASE)
        self.provider_addrs = provider_addrs
        self.anthropic_addrs = anthropic_addrs
        self._tokens: dict[str, str] = {}  # client connection id -> token from its CONNECT

    def _denied(self, host: str, port: int) -> bool:
        return self.deny is not None and self.deny.match(f"{host}:{port}") is not None

    def _intercepted(self, host: str, port: int) -> bool:
        return self.intercept is not None and self.intercept.match(f"{host}:{port}") is not None

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if not is_proxied(flow):
            return
        host, port = flow.request.host, flow.request.port
        if self._denied(host, port) and not self._intercepted(host, port):
            log.info("egress: CONNECT to %s:%d denied by egress.deny_hosts", host, port)
            flow.response = _text(403, f"{host}:{port} is blocked by this gateway's egress"
                                  " policy (egress.deny_hosts); ask your platform team")
            return
        token = proxy_credential(flow.request.headers.get("proxy-authorization"))
        if token is None:
            return  # the token may still come as the agent's API key inside the tunnel
        if self._intercepted(host, port) and not tokens.is_well_formed(token):
            flow.response = _text(407, "the proxy credential is not an agent-egress gateway"
                                  f" token (they start with {tokens.TOKEN_PREFIX})")
            flow.response.headers["proxy-authenticate"] = CHALLENGE
            return
        self._tokens[flow.client_conn.id] = token

    def client_disconnected(self, client: connection.Client) -> None:
        self._tokens.pop(client.id, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_proxied(flow) or flow.request.method == "CONNECT":
            return
        token = (proxy_credential(flow.request.headers.pop("proxy-authorization", None))
                 or self._tokens.get(flow.client_conn.id))
        if token is not None:
            flow.metadata[PROXY_CREDENTIAL_KEY] = token
        host, port = flow.request.pretty_host, flow.request.port
        llm_host = (host, port) in self.provider_addrs
        if llm_host and classify_path(flow.request.method, flow.request.path,
                                      flow.request.headers.get("upgrade")) is not None:
            return  # an LLM call: classify and authenticate take it from here
        if not llm_host and self._denied(host, port):
            log.info("egress: request to %s:%d denied by egress.deny_hosts", host, port)
            flow.response = _text(403, f"{host}:{port} is blocked by this gateway's egress"
                                  " policy (egress.deny_hosts); ask your platform team")
            return
        for name in _CREDENTIAL_HEADERS:  # passthrough: a gateway token never leaves
            value = flow.request.headers.get(name, "")
            if tokens.find_tokens(value):
                log.info("egress: refused a gateway token bound for %s:%d", host, port)
                self._refuse_token(flow, host, port, llm_host)
                return

    def _refuse_token(self, flow: http.HTTPFlow, host: str, port: int, llm_host: bool) -> None:
        """403 in the client's format: Anthropic's for Claude Code's own calls (an Anthropic
        provider host, or any request with ``anthropic-version``), OpenAI's otherwise."""
        anthropic = ((host, port) in self.anthropic_addrs
                     or "anthropic-version" in flow.request.headers)
        what = (f"{flow.request.path.split('?', 1)[0]} on {host} is not a model call this"
                " gateway meters" if llm_host else
                f"{host} is not an LLM provider this gateway serves")
        hint = (" (Claude Code: set CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1, or give the"
                " token only in HTTPS_PROXY)" if anthropic else "")
        refuse(flow, Call(api="anthropic.messages") if anthropic else None, 403,
               f"a gateway token was sent with a request to {host}, and {what}; the token"
               f" is never forwarded{hint}", type="invalid_request_error",
               code="token_not_forwarded")

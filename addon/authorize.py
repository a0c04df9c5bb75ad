"""Step 3b: the key's scopes (models, routes, providers) and the request's tags.

Runs after the body is parsed (it needs the model). Scope refusals are final:
403 in OpenAI format naming the scope and what the key allows. Tags come from
the key (set by admins) and from `x-egress-tag-<name>` request headers (Codex
sends them via `http_headers`); key tags win, and the headers never go upstream.
"""

from __future__ import annotations

import re

from mitmproxy import http

from .call import METADATA_KEY, Call
from .identity import matches_any
from .overhead import timed
from .protocols.responses_ws import WS_API
from .refuse import refuse
from .store.base import KeyRecord

TAG_HEADER = "x-egress-tag-"
MAX_REQUEST_TAGS = 8
_TAG_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class BadTag(ValueError):
    pass


def request_tags(headers: http.Headers) -> dict[str, str]:
    """Tags from x-egress-tag-<name> headers, bounded in count and length."""
    tags: dict[str, str] = {}
    for raw_name, raw_value in headers.fields:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("utf-8", "replace")
        lname = name.lower()
        if not lname.startswith(TAG_HEADER):
            continue
        key = lname[len(TAG_HEADER):]
        if not _TAG_NAME.match(key) or len(value) > 128 or not value.isprintable():
            raise BadTag(f"header {name[:60]}: tag names are 1-32 of [a-z0-9_-] and values at"
                         " most 128 printable characters")
        tags[key] = value
        if len(tags) > MAX_REQUEST_TAGS:
            raise BadTag(f"at most {MAX_REQUEST_TAGS} x-egress-tag-* headers per request")
    return tags


def scope_refusal(key: KeyRecord, model: str | None, api: str) -> tuple[str, str] | None:
    """(message, code) if the key's model or API scope excludes this call, else None.

    ``model`` None skips the model check (a WebSocket upgrade names no model: each
    of its messages is checked). The WebSocket transport is the Responses API, so a
    key scoped to ``openai.responses`` may use it.
    """
    apis = (api, "openai.responses") if api == WS_API else (api,)
    checks = [("APIs", api, key.allowed_routes, "route_not_allowed",
               any(matches_any(a, key.allowed_routes) for a in apis))]
    if model is not None:
        checks.insert(0, ("models", model, key.allowed_models, "model_not_allowed",
                          matches_any(model, key.allowed_models)))
    for what, value, allowed, code, ok in checks:
        if not ok:
            return (f"gateway token {key.id} may use {what} {', '.join(allowed)}; this request"
                    f" asked for {value!r}. Ask your platform team to widen the key's scope.",
                    code)
    return None


class Authorize:
    """Model and API scopes. The provider scope is route's: it knows the candidates."""

    @timed
    def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.response is not None or call.principal is None:
            return
        key = call.principal
        denied = scope_refusal(key, None if call.api == WS_API else call.requested_model or "",
                               call.api)
        if denied is not None:
            refuse(flow, call, 403, denied[0], type="permission_denied", code=denied[1])
            return
        try:
            tags = request_tags(flow.request.headers)
        except BadTag as e:
            refuse(flow, call, 400, str(e), type="invalid_request_error", code="invalid_tag")
            return
        for name in [n for n in flow.request.headers if n.lower().startswith(TAG_HEADER)]:
            del flow.request.headers[name]
        call.tags = {**tags, **key.tags}

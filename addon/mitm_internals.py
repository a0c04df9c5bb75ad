"""The one place that leans on mitmproxy internals (pinned to 11.0.x).

When mitmproxy itself fails a request (upstream unreachable, malformed request
head) it writes an HTML page from ``_http1.make_error_response``. Clients such
as Codex expect JSON errors, so we replace that function. The ``error`` hook
runs in the same asyncio task that then builds the page (mitmproxy awaits hooks
in the connection task and resumes the layer synchronously), so a ContextVar set
by our hook carries the request id and client-format body into the page.
"""

from __future__ import annotations

import contextvars

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1

from .call import new_request_id
from .protocols.errors import universal_error_body

pending_error: contextvars.ContextVar[tuple[str, bytes] | None] = contextvars.ContextVar(
    "agent_egress_pending_error", default=None
)


def json_error_response(status_code: int, message: str = "") -> bytes:
    prepared = pending_error.get()
    pending_error.set(None)
    if prepared is not None:
        request_id, body = prepared
    else:
        request_id = new_request_id()
        body = universal_error_body(
            f"agent-egress: the request could not be proxied ({status_code}): {message}"
            f" (request id {request_id})",
            type="gateway_error",
            code="gateway_error",
        )
    resp = http.Response.make(
        status_code,
        body,
        http.Headers(
            Server=version.MITMPROXY,
            Connection="close",
            Content_Type="application/json",
            X_Egress_Request_Id=request_id,
        ),
    )
    return bytes(http1.assemble_response(resp))


def install() -> None:
    """Idempotently swap mitmproxy's HTML error page for a JSON one."""
    _http1.make_error_response = json_error_response


def installed() -> bool:
    return _http1.make_error_response is json_error_response

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
from collections.abc import Generator
from typing import Any

from mitmproxy import ctx, flow, http, version
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http import http1
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.proxy.layers.http import HttpStream, SendHttp, _http1
from mitmproxy.proxy.layers.http._events import ResponseProtocolError
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook, HttpRequestHeadersHook
from mitmproxy.proxy.mode_specs import ReverseMode

from .call import new_request_id
from .protocols.errors import universal_error_body

pending_error: contextvars.ContextVar[tuple[str, bytes] | None] = contextvars.ContextVar(
    "agent_egress_pending_error", default=None
)
pending_response: contextvars.ContextVar[http.Response | None] = contextvars.ContextVar(
    "agent_egress_pending_response", default=None
)
"""A whole refusal (status, headers, body) our ``error`` hook made for mitmproxy's page."""


def json_error_response(status_code: int, message: str = "") -> bytes:
    prepared = pending_error.get()
    pending_error.set(None)
    refusal = pending_response.get()
    if refusal is not None:
        pending_response.set(None)
        refusal.headers["connection"] = "close"  # mitmproxy closes after its error page
        return bytes(http1.assemble_response(refusal))
    if "certificate verify failed" in message.lower():
        # Our hooks only know the upstream failed: say why, since only config fixes it.
        request_id = prepared[0] if prepared is not None else new_request_id()
        body = universal_error_body(
            f"agent-egress: the provider's TLS certificate did not verify ({message});"
            " the gateway refuses unverified upstreams. If the provider uses a private CA,"
            f" set egress.upstream_ca_file (request id {request_id})",
            type="gateway_error", code="upstream_certificate_invalid")
    elif prepared is not None:
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
    """Idempotently swap mitmproxy's HTML error page for a JSON one, and cap bodies."""
    _http1.make_error_response = json_error_response
    if HttpStream.check_body_size is not _check_body_size:
        global _original_check_body_size
        _original_check_body_size = HttpStream.check_body_size
        HttpStream.check_body_size = _check_body_size  # type: ignore[method-assign]


# --- security (issue 12): a request body over the cap is refused, not buffered ----------
# mitmproxy reads (and buffers) a request body in full before it sends a response an
# addon set in ``requestheaders``, so a client could make the gateway hold any amount
# of memory before authenticating. Its own ``body_size_limit`` option cuts a body off
# as it arrives but applies to every flow and to responses too, which would break
# large passthrough downloads in egress mode. This applies the same cut to request
# bodies of flows the gateway owns: the reverse listener and configured provider hosts.
REQUEST_TOO_LARGE = "Request body exceeds the gateway's limits.max_body_bytes."
_request_cap: int | None = None
_owned_hosts: frozenset[tuple[str, int]] = frozenset()
_original_check_body_size: Any = None


def cap_request_bodies(max_bytes: int, provider_addrs: set[tuple[str, int]]) -> None:
    """Refuse request bodies over ``max_bytes`` as they arrive (gateway start)."""
    global _request_cap, _owned_hosts
    _request_cap, _owned_hosts = max_bytes, frozenset(provider_addrs)


def _owned(stream: HttpStream) -> bool:
    request = stream.flow.request
    return (isinstance(stream.context.client.proxy_mode, ReverseMode)
            or (request.pretty_host, request.port) in _owned_hosts)


def _check_body_size(self: HttpStream, request: bool) -> Generator[Any, Any, bool]:
    cap = _request_cap
    if request and cap is not None and _owned(self):
        buffered = len(self.request_body_buf)
        try:
            size = buffered or expected_http_body_size(self.flow.request, None)
        except ValueError:
            size = None  # a malformed length: mitmproxy's own checks refuse it
        if size is not None and size > cap:
            if not buffered:
                yield HttpRequestHeadersHook(self.flow)  # classify builds our refusal
            self.flow.error = flow.Error(REQUEST_TOO_LARGE)
            yield HttpErrorHook(self.flow)
            yield SendHttp(ResponseProtocolError(self.stream_id, REQUEST_TOO_LARGE, 413),
                           self.context.client)
            self.client_state = self.state_errored
            self.flow.live = False
            return True
    result: bool = yield from _original_check_body_size(self, request)
    return result


def installed() -> bool:
    return _http1.make_error_response is json_error_response


# --- failover (issue 8): ending an upstream connection from outside the layer -----------
# mitmproxy 11 has no connect or response timeout and no API to drop a server
# connection. Its connection handler (one per client connection, in
# ``proxyserver.connections`` by client id) runs one task per server connection:
# the connecting task, then the reading one. Cancelling that task is what
# ``ConnectionHandler.close_connection`` itself does; mitmproxy then reports the
# flow as failed (a JSON 502 before response headers, a closed client connection
# after them) and calls the ``error`` hook.


def _handler(client: Any) -> Any | None:
    """The proxyserver's ConnectionHandler for a client connection, if it is still live."""
    try:
        proxyserver = ctx.master.addons.get("proxyserver")
    except AttributeError:  # no master (unit tests without one)
        return None
    connections = getattr(proxyserver, "connections", None)
    return None if connections is None else connections.get(client.id)


def _cancel(handler: Any, server: Any, reason: str) -> bool:
    io = handler.transports.get(server)
    task = getattr(io, "handler", None)
    if task is None or task.done():
        return False
    server.state = ConnectionState.CLOSED  # as close_connection() does before cancelling
    task.cancel(reason)
    return True


def abort_connecting(flow: http.HTTPFlow, address: tuple[str, int], reason: str) -> bool:
    """Cancel a connection attempt to ``address`` for this flow's client (connect timeout).

    While connecting, ``flow.server_conn`` is not yet the new connection, so it is
    found among the handler's transports: same address, TCP setup not done.
    """
    handler = _handler(flow.client_conn)
    if handler is None:
        return False
    for conn in list(handler.transports):
        if (isinstance(conn, Server) and conn.address is not None
                and tuple(conn.address[:2]) == address and conn.timestamp_tcp_setup is None):
            return _cancel(handler, conn, reason)
    return False


def connected_to(flow: http.HTTPFlow, address: tuple[str, int]) -> bool:
    """Is the flow's upstream connection to ``address`` established?"""
    conn = flow.server_conn
    return (conn.address is not None and tuple(conn.address[:2]) == address
            and conn.timestamp_tcp_setup is not None)


CLOSED_BY = "agent_egress.closed_by"
"""flow.metadata key: why the gateway itself dropped the upstream (not a provider fault)."""


def close_server(flow: http.HTTPFlow, reason: str) -> bool:
    """Drop the flow's established upstream connection (response or idle timeout)."""
    flow.metadata[CLOSED_BY] = reason
    handler = _handler(flow.client_conn)
    return handler is not None and _cancel(handler, flow.server_conn, reason)


# --- guardrails (issue 6): stop a stream early and end the client's response cleanly -----
def close_upstream(flow: http.HTTPFlow, last: bytes = b"") -> bytes:
    """Stop the provider's stream now; the client's response ends after ``last``.

    Called from a response stream callable. Returns what the callable must
    return for this chunk: ``last`` followed by the end of the body. With chunked
    transfer encoding we frame ``last`` and the terminating chunk ourselves and
    drop the header from the (shared) response object, so mitmproxy writes no
    second terminator when the upstream is then cut; ``connection: close`` makes
    it close the client connection afterwards. The client sees a complete body
    (a clean end, DESIGN §4b), not a transport error it would retry.
    """
    out = last
    resp = flow.response
    if resp is not None:
        if "chunked" in resp.headers.get("transfer-encoding", "").lower():
            framed = b"%x\r\n%s\r\n" % (len(last), last) if last else b""
            out = framed + b"0\r\n\r\n"
            del resp.headers["transfer-encoding"]
        resp.headers["connection"] = "close"
    close_server(flow, "agent-egress: stream stopped by the gateway")
    return out

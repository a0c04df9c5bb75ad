"""Build refusals in the client's own error format (DESIGN §5).

Every refusal names the rule and what to do, carries the request id in the
message (Codex shows `error.message`, not headers) and never echoes a secret.
"""

from __future__ import annotations

from mitmproxy import http

from .call import Call, new_request_id
from .protocols import anthropic_messages
from .protocols.errors import openai_error_body


def refuse(
    flow: http.HTTPFlow,
    call: Call | None,
    status: int,
    message: str,
    *,
    type: str,
    code: str,
    param: str | None = None,
    retry_after: int | None = None,
    close: bool = False,
    final: bool = False,
) -> None:
    request_id = call.request_id if call is not None else new_request_id()
    body = openai_error_body(
        f"agent-egress: {message} (request id {request_id})", type=type, code=code, param=param
    )
    if call is not None and call.api == "anthropic.messages":  # anthropic (issue 13)
        final = final or (status != 429 and status < 500)
        body = anthropic_messages.error_body(
            f"agent-egress: {message} (request id {request_id})",
            type=anthropic_messages.error_type_for(status))
        status = anthropic_messages.client_status(status)
    headers = {
        "content-type": "application/json",
        "x-egress-request-id": request_id,
        "x-request-id": request_id,  # Codex prints this header as "request id"
        "x-egress-refused-by": code,
    }
    if retry_after is not None:
        headers["retry-after"] = str(int(retry_after))
    if close:
        headers["connection"] = "close"
    if final:
        headers["x-should-retry"] = "false"  # honoured by Anthropic/Stainless clients
    flow.response = http.Response.make(status, body, headers)
    if call is not None:
        call.refused = code
        call.status_code = status

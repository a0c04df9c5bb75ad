"""Step 3: the request must be a well-formed call we can meter.

Parsing here (not in route) means a malformed body is refused before any
provider sees it; later guardrails (secrets, PII, injection) extend this step.
"""

from __future__ import annotations

from mitmproxy import http

from .call import METADATA_KEY, Call
from .overhead import timed
from .protocols import openai_chat, openai_responses
from .protocols.codex_headers import session_and_turn
from .protocols.summary import BadRequest
from .refuse import refuse


class GuardInput:
    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    @timed
    def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.response is not None:
            return
        body = flow.request.raw_content or b""
        call.request_bytes = len(body)
        if len(body) > self.max_body_bytes:
            refuse(flow, call, 413, f"request body of {len(body)} bytes is over the gateway's"
                   f" limit of {self.max_body_bytes} bytes (limits.max_body_bytes)",
                   type="invalid_request_error", code="body_too_large")
            return
        if flow.request.headers.get("content-encoding", "identity") != "identity":
            try:
                body = flow.request.content or b""
            except ValueError:
                refuse(flow, call, 400, "the request body could not be decoded",
                       type="invalid_request_error", code="invalid_body")
                return
        parser = openai_chat if call.api == "openai.chat" else openai_responses
        try:
            info = parser.parse_request(body)
        except BadRequest as e:
            refuse(flow, call, 400, e.message, type="invalid_request_error",
                   code="invalid_request", param=e.param)
            return
        call.requested_model = info.model[:128]
        call.stream = info.stream
        call.tool_output_ids = info.tool_output_ids
        call.traceparent = flow.request.headers.get("traceparent")
        call.session_id, call.turn_id = session_and_turn(
            flow.request.headers.get, info.prompt_cache_key, info.client_session_id
        )

"""Step 6: pass every chunk on the moment it arrives and read usage on the way.

mitmproxy buffers bodies unless `flow.response.stream` is set in
`responseheaders`; the callable gets network chunks and a final b"" (which it
must return as-is: it is the end-of-body marker). Per-chunk work is a clock
read, a counter and the reader's cheap boundary scan.

mitmproxy 11 has no limit on the size of a response head and relays whatever
it read: a provider (or a middlebox) answering with a megabyte of headers would
make clients fail with their own parse error. A head over
``MAX_RESPONSE_HEAD_BYTES`` is refused here instead: the upstream is dropped and
the client gets a JSON 502 with the request id (issue 12).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmproxy import http

from . import mitm_internals
from .call import METADATA_KEY, Call, StreamReader
from .overhead import timed
from .protocols import anthropic_messages, openai_chat, openai_responses
from .protocols.errors import error_body_for

MAX_RESPONSE_HEAD_BYTES = 64 * 1024
"""Larger than any provider's real head (a few KB), smaller than clients' own limits."""
HEAD_TOO_LARGE = "upstream response headers too large"


def make_reader(call: Call) -> StreamReader:
    if call.api == "anthropic.messages":  # anthropic (issue 13)
        return anthropic_messages.MessagesStreamReader()
    if call.api == "openai.chat":
        return openai_chat.ChatStreamReader()
    return openai_responses.ResponsesStreamReader()


def tap(call: Call, reader: StreamReader) -> Callable[[bytes], bytes]:
    def on_chunk(chunk: bytes) -> bytes:
        started = time.perf_counter()
        if chunk:
            if call.first_byte_at is None:
                call.first_byte_at = time.monotonic()
            call.response_bytes += len(chunk)
            reader.feed(chunk)
        else:
            reader.close()
        call.overhead_s += time.perf_counter() - started
        return chunk

    return on_chunk


class StreamTap:
    @timed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.response is None:
            return
        flow.response.headers["x-egress-request-id"] = call.request_id
        if call.refused is not None:
            return
        size = sum(len(k) + len(v) + 4 for k, v in flow.response.headers.fields)
        if size > MAX_RESPONSE_HEAD_BYTES:
            call.error = f"{HEAD_TOO_LARGE} ({size} bytes)"
            mitm_internals.close_server(flow, f"agent-egress: {call.error}")
            return
        call.status_code = flow.response.status_code
        ctype = flow.response.headers.get("content-type", "")
        if ctype.startswith("text/event-stream"):
            call.reader = make_reader(call)
            flow.response.stream = tap(call, call.reader)
        else:
            call.first_byte_at = time.monotonic()

    def response(self, flow: http.HTTPFlow) -> None:
        """The body arrived before the upstream was dropped: answer the 502 ourselves."""
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is not None and call.error is not None and call.error.startswith(HEAD_TOO_LARGE):
            flow.response = http.Response.make(502, self._body(call), {
                "content-type": "application/json", "x-egress-request-id": call.request_id,
                "connection": "close"})

    def error(self, flow: http.HTTPFlow) -> None:
        """The upstream was dropped: mitmproxy now writes its 502 with this body."""
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is not None and call.error is not None and call.error.startswith(HEAD_TOO_LARGE):
            mitm_internals.pending_error.set((call.request_id, self._body(call)))

    @staticmethod
    def _body(call: Call) -> bytes:
        return error_body_for(
            call.api, f"agent-egress: the answer of provider {call.provider!r} was refused:"
            f" {call.error}, over the gateway's limit of {MAX_RESPONSE_HEAD_BYTES} bytes;"
            f" the call was not served (request id {call.request_id})",
            type="server_error", code="upstream_unreachable")

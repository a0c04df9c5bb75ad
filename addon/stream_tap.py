"""Step 6: pass every chunk on the moment it arrives and read usage on the way.

mitmproxy buffers bodies unless `flow.response.stream` is set in
`responseheaders`; the callable gets network chunks and a final b"" (which it
must return as-is: it is the end-of-body marker). Per-chunk work is a clock
read, a counter and the reader's cheap boundary scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmproxy import http

from .call import METADATA_KEY, Call, StreamReader
from .overhead import timed
from .protocols import anthropic_messages, openai_chat, openai_responses


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
        call.status_code = flow.response.status_code
        ctype = flow.response.headers.get("content-type", "")
        if ctype.startswith("text/event-stream"):
            call.reader = make_reader(call)
            flow.response.stream = tap(call, call.reader)
        else:
            call.first_byte_at = time.monotonic()

"""Optional mid-stream cut-off (`budgets.cut_off_streams`, off by default).

A stream whose metered cost (the input estimate plus the output written so far)
passes what its hard budgets had left when it was admitted is ended at the next
event boundary with an event the client understands, and the upstream is
closed (DESIGN §4b, through `mitm_internals.close_upstream`). Codex stops on a
`response.failed` whose code it treats as final and prints our message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from . import mitm_internals
from .budget_policy import Admission, usd
from .call import METADATA_KEY, Call
from .overhead import timed
from .protocols.output_meter import OutputMeter

FINAL_CODE = "invalid_prompt"
"""A response.failed code Codex 0.169 does not retry (it prints the message)."""
_RESP_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"\\]{1,200})"')


def cutoff_message(call: Call, adm: Admission) -> str:
    room = usd(max(0, adm.headroom_nano or 0))
    return (f"agent-egress: response stopped: it would pass a hard budget (${room} was left"
            f" when it started); ask your admin to raise the budget (request id"
            f" {call.request_id})")


def cutoff_event(api: str, message: str, response_id: str | None) -> bytes:
    """The last event the client gets: a final failure in its own API's format."""
    error = {"message": message, "type": "budget_exceeded", "code": FINAL_CODE, "param": None}
    if api == "anthropic.messages":  # Anthropic's mid-stream error event
        err = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(err).encode() + b"\n\n"
    if api == "openai.chat":
        return b"data: " + json.dumps({"error": {**error, "code": "budget_exceeded"}}
                                      ).encode() + b"\n\ndata: [DONE]\n\n"
    ev = {"type": "response.failed", "sequence_number": 0,
          "response": {"id": response_id or "resp_agent_egress_cutoff", "object": "response",
                       "status": "failed", "error": error, "incomplete_details": None,
                       "output": [], "usage": None}}
    return b"event: response.failed\ndata: " + json.dumps(ev).encode() + b"\n\n"


class BudgetCutoff:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @timed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if (not self.enabled or call is None or call.refused is not None
                or flow.response is None or flow.response.status_code != 200):
            return
        adm = call.admission
        stream = flow.response.stream
        if (adm is None or adm.headroom_nano is None or adm.out_rate_nano <= 0
                or not callable(stream)):
            return
        flow.response.stream = self.wrap(flow, call, adm, stream)

    @staticmethod
    def wrap(flow: http.HTTPFlow, call: Call, adm: Admission,
             inner: Callable[[bytes], Any]) -> Callable[[bytes], bytes | list[bytes]]:
        meter = OutputMeter()
        state = {"over": False, "done": False}
        response_id: list[str] = []
        limit = adm.headroom_nano or 0

        def on_chunk(chunk: bytes) -> bytes | list[bytes]:
            got = inner(chunk)
            if state["done"]:
                return [] if chunk else b""
            data = got if isinstance(got, bytes) else b"".join(got)
            if not chunk:
                return got  # type: ignore[no-any-return]
            if not response_id and (m := _RESP_ID.search(data)):
                response_id.append(m.group(1).decode())
            if not state["over"]:
                meter.feed(data)
                state["over"] = adm.input_nano + meter.tokens * adm.out_rate_nano > limit
            if state["over"]:
                end = data.rfind(b"\n\n")
                if end < 0:
                    return got  # type: ignore[no-any-return]  # cut at the next boundary
                state["done"] = True
                last = data[:end + 2] + cutoff_event(
                    call.api, cutoff_message(call, adm), response_id[0] if response_id else None)
                call.error = "budget_cutoff"
                return mitm_internals.close_upstream(flow, last)
            return got  # type: ignore[no-any-return]

        return on_chunk

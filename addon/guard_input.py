"""Step 3: the request must be a well-formed call we can meter, and pass guardrails.

Parsing here (not in route) means a malformed body is refused before any
provider sees it. Then the caller's guardrail policy: limits (model allowlist,
input size, output-token cap), and secrets / PII / injection / custom rules on
each input item. Codex resends the whole history on every call, so verdicts
are cached per item (``guardrails.cache``): only new items are scanned, small
batches on the loop, larger ones in a worker thread. A block is a 400 in the
client's format naming the rule (Codex shows it at once, no retry); a redaction
rewrites the body before it goes upstream; a flag is recorded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

from mitmproxy import http

from .call import METADATA_KEY, Call
from .guard_output import BLOCKED, OutputWrapper, Recorder
from .guardrails import items, limits
from .guardrails.cache import Verdict, VerdictCache, item_key
from .guardrails.engine import Engine, Guardrails
from .guardrails.findings import Finding, redact
from .overhead import timed_async
from .protocols import anthropic_messages, openai_chat, openai_responses
from .protocols.codex_headers import session_and_turn
from .protocols.responses_ws import WS_API
from .protocols.summary import BadRequest
from .refuse import refuse

_WHERE = {"input": "input", "tool_output": "tool output", "model_output": "model output"}
Block = tuple[str, str, str, bool]
"""(rule, direction, message, record the hit): a guardrail refusal, before it is sent."""


def scan_segments(engine: Engine, todo: Sequence[tuple[str, items.Segment]]
                  ) -> dict[str, Verdict]:
    """Scan new items (pure; runs on the loop or in a worker thread)."""
    return {key: tuple(engine.scan(seg.text, seg.direction, seg.role)) for key, seg in todo}


class GuardInput:
    def __init__(self, max_body_bytes: int, guardrails: Guardrails | None = None,
                 cache: VerdictCache | None = None, recorder: Recorder | None = None,
                 holdback: int = 64, inline_scan_bytes: int = 2048) -> None:
        self.max_body_bytes = max_body_bytes
        self.guardrails = guardrails
        # not `cache or ...`: an empty cache is falsy (len 0), and replacing it dropped
        # the configured Redis client and size
        self.cache = cache if cache is not None else VerdictCache()
        self.recorder = recorder
        self.holdback = holdback
        self.inline_scan_bytes = inline_scan_bytes

    @timed_async
    async def request(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or flow.response is not None:
            return
        if call.api == WS_API:  # a WebSocket upgrade has no body: each message is guarded
            call.session_id, call.turn_id = session_and_turn(  # in addon/websocket.py
                flow.request.headers.get, None, None)
            call.traceparent = flow.request.headers.get("traceparent")
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
        if call.api == "anthropic.messages":  # anthropic (issue 13)
            parser = anthropic_messages
        try:
            obj = openai_responses.load_object(body)
            info = parser.request_info(obj)
        except BadRequest as e:
            refuse(flow, call, 400, e.message, type="invalid_request_error",
                   code="invalid_request", param=e.param)
            return
        call.requested_model = info.model[:128]
        call.stream = info.stream
        call.tool_output_ids = info.tool_output_ids
        call.traceparent = flow.request.headers.get("traceparent")
        if isinstance(info, anthropic_messages.MessagesRequest):  # anthropic (issue 13)
            call.session_id, call.turn_id = anthropic_messages.session_and_turn(
                flow.request.headers.get, info)
            call.side_call = info.side_call
            if info.side_call:  # marked on the chat span (a title/summary call, no tools)
                call.route_events.append(("agent_egress.side_call", time.time_ns(), {}))
        else:
            call.session_id, call.turn_id = session_and_turn(
                flow.request.headers.get, info.prompt_cache_key, info.client_session_id
            )
        if self.guardrails is not None and call.principal is not None:
            await self._guard(flow, call, obj, len(body))

    async def _guard(self, flow: http.HTTPFlow, call: Call, obj: dict[str, Any],
                     n_bytes: int) -> None:
        blocked, changed = await self.check(flow, call, obj, n_bytes)
        if blocked is not None:
            self._refuse(flow, call, *blocked)
            return
        if changed:
            flow.request.content = json.dumps(obj, ensure_ascii=False,
                                              separators=(",", ":")).encode()

    async def check(self, flow: http.HTTPFlow, call: Call, obj: dict[str, Any],
                    n_bytes: int) -> tuple[Block | None, bool]:
        """The caller's policy over a parsed request: (the block, if any; whether ``obj``
        was rewritten). The flow only gives hits their peer address, so the WebSocket
        transport runs this per message. Unblocked, sets ``call.output_guard`` when the
        policy checks model output. Needs ``guardrails`` and ``call.principal``."""
        p = call.principal
        assert p is not None and self.guardrails is not None
        engine = self.guardrails.engine_for(p.org, p.team, p.id)
        changed = False
        verdict = limits.check(engine.policy.limits, obj, call.requested_model or "", n_bytes,
                               call.api)
        if verdict.rule is not None:
            return (verdict.rule, "input", verdict.message, True), False
        if verdict.clamp:
            obj.update(verdict.clamp)
            changed = True
        segs = [s for s in items.segments(obj, call.api) if engine.policy.scans(s.direction)]
        if segs:
            blocked, rewritten = await self._scan(flow, call, engine, obj, segs)
            if blocked is not None:
                return blocked, False
            changed |= rewritten
        if engine.policy.scans("model_output") and self.recorder is not None:
            call.output_guard = OutputWrapper(call, engine, self.holdback, self.recorder)
        return None, changed

    async def _scan(self, flow: http.HTTPFlow, call: Call, engine: Engine,
                    obj: dict[str, Any], segs: list[items.Segment]) -> tuple[Block | None, bool]:
        """Scan what is new, apply every verdict: (the block, if any; body rewritten)."""
        # No session id: a key with this request's id can never hit again, so caching it
        # would only evict useful entries (found by a tracemalloc soak).
        cacheable = call.session_id is not None
        session = call.session_id or call.request_id
        keys = [item_key(engine.fingerprint, session, s.direction, s.role, s.text,
                         memo=cacheable) for s in segs]
        known = await self.cache.get_many(set(keys)) if cacheable else {}
        todo = list({k: s for k, s in zip(keys, segs, strict=True) if k not in known}.items())
        new: dict[str, Verdict] = {}
        if todo:
            size = sum(len(s.text) for _, s in todo)
            if size <= self.inline_scan_bytes:
                new = scan_segments(engine, todo)
            else:
                new = await asyncio.to_thread(scan_segments, engine, todo)
            if cacheable:
                await self.cache.put_many(new)
        verdicts = {**known, **new}
        # Hits are recorded when an item is first seen in the session, not on every resend.
        self._record(flow, call, [(s, new[k]) for k, s in todo if new[k]])
        blocking: tuple[items.Segment, Finding] | None = None
        changed = False
        for key, seg in zip(keys, segs, strict=True):
            findings = verdicts[key]
            if not findings:
                continue
            block = next((f for f in findings if f.action == "block"), None)
            if block is not None:
                blocking = blocking or (seg, block)
                continue
            if any(f.action == "redact" for f in findings):
                items.put(obj, seg.path, redact(seg.text, findings))
                changed = True
        if blocking is not None:
            seg, f = blocking
            where = _WHERE[seg.direction]
            what = f"{where} (item {seg.item})" if seg.item >= 0 else where
            return (f.rule, seg.direction,
                    f"guardrail rule {f.rule} blocked this request: the {what} contains"
                    " something it does not allow. Remove it and retry (if it is in an"
                    " earlier message, start a new session)", False), changed
        return None, changed

    def _record(self, flow: http.HTTPFlow, call: Call,
                found: list[tuple[items.Segment, Verdict]]) -> None:
        if self.recorder is None or not found:
            return
        by_dir: dict[str, dict[tuple[str, str], int]] = {}
        for seg, verdict in found:
            counts = by_dir.setdefault(seg.direction, {})
            for f in verdict:
                counts[(f.rule, f.action)] = counts.get((f.rule, f.action), 0) + 1
        for direction, counts in by_dir.items():
            self.recorder.hits(flow, call, direction,
                               [(r, a, n) for (r, a), n in counts.items()])

    def _refuse(self, flow: http.HTTPFlow, call: Call, rule: str, direction: str,
                message: str, record: bool = True) -> None:
        if record and self.recorder is not None:
            self.recorder.hits(flow, call, direction, [(rule, "block", 1)])
        refuse(flow, call, 400, message, type="invalid_request_error", code=BLOCKED,
               param=rule)

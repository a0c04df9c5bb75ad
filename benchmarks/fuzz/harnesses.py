"""One fuzz target per parser: bytes in, an exception out only on a real bug.

Pure functions of the input bytes (no atheris import), so a crash file replays with
``run.py --replay FILE --harness NAME`` and the same targets can be driven by any
engine. Stream targets cut the input into chunks at offsets derived from its first
byte, feed it both whole and cut, and check that the result is the same and that the
scanner's tail buffer stays under its cap (bounded memory).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from agent_egress.addon.guardrails import items
from agent_egress.addon.guardrails.anthropic_stream import AnthropicOutputGuard
from agent_egress.addon.guardrails.config import GuardrailsConfig
from agent_egress.addon.guardrails.engine import Engine, Guardrails
from agent_egress.addon.guardrails.findings import Finding
from agent_egress.addon.guardrails.stream import OutputGuard, guard_body
from agent_egress.addon.protocols import (
    anthropic_messages,
    codex_headers,
    content,
    openai_chat,
    openai_responses,
    output_meter,
    responses_to_chat,
)
from agent_egress.addon.protocols.summary import BadRequest

APIS = ("openai.responses", "openai.chat", "anthropic.messages")
CAP = 4096
"""Scanner cap the stream targets run with, so a short input can exceed it."""

_engine: Engine | None = None


def _scan(text: str) -> list[Finding]:
    global _engine
    if _engine is None:  # built on first use: the child process pays for it, not import
        cfg = GuardrailsConfig.model_validate({"default": {"secrets": {
            "directions": ["input", "tool_output", "model_output"], "action": "redact"}}})
        _engine = Guardrails(cfg).engine_for("fuzz", "fuzz", "fuzz")
    return _engine.scan(text, "model_output", "assistant")


def _chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    """(stream, its chunks): the first byte seeds where the rest is cut."""
    if not data:
        return b"", []
    rng = random.Random(data[0])
    raw = data[1:]
    out, i = [], 0
    while i < len(raw):
        n = rng.randint(1, 64)
        out.append(raw[i:i + n])
        i += n
    return raw, out


def _obj(data: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def request_parsers(data: bytes) -> None:
    for mod in (openai_responses, openai_chat, anthropic_messages):
        try:
            mod.parse_request(data)  # type: ignore[attr-defined]
        except BadRequest:
            pass
    headers = {"x-codex-turn-metadata": data.decode("utf-8", "replace"), "session-id": "s"}
    codex_headers.session_and_turn(headers.get, None, None)


def body_readers(data: bytes) -> None:
    for mod in (openai_responses, openai_chat, anthropic_messages):
        mod.read_body(data)  # type: ignore[attr-defined]
    for api in APIS:
        guard_body(api, data, _scan)


def stream_readers(data: bytes) -> None:
    raw, chunks = _chunks(data)
    for make in (openai_responses.ResponsesStreamReader, openai_chat.ChatStreamReader,
                 anthropic_messages.MessagesStreamReader):
        whole, cut = make(max_event_bytes=CAP), make(max_event_bytes=CAP)
        whole.feed(raw)
        whole.close()
        for c in chunks:
            cut.feed(c)
            assert len(cut._scanner._buf) <= CAP, "scanner tail over its cap"
        cut.close()
        if not raw.startswith(b"\xef\xbb\xbf"):
            assert whole.summary == cut.summary, "chunking changed what was read"
    meter_whole, meter_cut = output_meter.OutputMeter(), output_meter.OutputMeter()
    meter_whole.feed(raw)
    for c in chunks:
        meter_cut.feed(c)
    assert meter_whole.chars == meter_cut.chars


def translator(data: bytes) -> None:
    raw, chunks = _chunks(data)
    obj = _obj(raw)
    if obj is not None:
        json.dumps(responses_to_chat.chat_request(obj, "m"))
        json.dumps(responses_to_chat.response_body(obj, frozenset({"apply_patch"})))
    tr = responses_to_chat.ChatToResponsesStream(frozenset({"apply_patch"}))
    out = b"".join([*(tr.feed(c) for c in chunks), tr.close()])
    assert not out or out.endswith(b"\n\n")


def content_capture(data: bytes) -> None:
    raw, _ = _chunks(data)
    cut = len(raw) // 2

    def clean(text: str, direction: str, role: str) -> str:
        assert isinstance(text, str)
        return text

    for api in APIS:
        for streamed in (True, False):
            got = content.extract(api, raw[:cut], raw[cut:], streamed, clean)
            assert got is not None
            content.dumps(got.input)
            content.dumps(got.output)


def guard_items(data: bytes) -> None:
    obj = _obj(data)
    if obj is None:
        return
    for api in APIS:
        for seg in items.segments(obj, api):
            items.put(obj, seg.path, "R")


def output_guards(data: bytes) -> None:
    _, chunks = _chunks(data)
    guards: list[Any] = [OutputGuard("openai.responses", _scan, 64, str),
                         OutputGuard("openai.chat", _scan, 64, str),
                         AnthropicOutputGuard(_scan, 64, str)]
    for g in guards:
        for c in chunks:
            g.feed(c)
        g.close()


HARNESSES: dict[str, Callable[[bytes], None]] = {
    f.__name__: f for f in (request_parsers, body_readers, stream_readers, translator,
                            content_capture, guard_items, output_guards)}

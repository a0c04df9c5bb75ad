"""Anthropic Messages protocol functions (pure): request facts, turns, stream usage, errors."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from fakeanthropic import FakeAnthropic, FakeAnthropicUsage

from agent_egress.addon.guardrails import items
from agent_egress.addon.pricing import price_call
from agent_egress.addon.protocols import anthropic_messages as am
from agent_egress.addon.protocols.summary import BadRequest
from agent_egress.addon.protocols.usage import Usage

SID = "29795b3e-7a65-4b64-9a0e-e20add83aaf2"
USER_ID = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": SID})


def _user(*blocks: dict[str, object]) -> dict[str, object]:
    return {"role": "user", "content": list(blocks)}


def _body(messages: list[dict[str, object]], **more: object) -> dict[str, object]:
    return {"model": "claude-sonnet-4-5", "messages": messages, "stream": True,
            "metadata": {"user_id": USER_ID}, "tools": [{"name": "Bash"}], **more}


FIRST = _user({"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
              {"type": "text", "text": "run the tool", "cache_control": {"type": "ephemeral"}})
TOOL_USE = {"role": "assistant", "content": [
    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]}
RESULT = _user({"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"})


def test_turns_are_inferred_from_the_last_user_message() -> None:
    first = am.request_info(_body([FIRST]))
    assert first.session_id == SID and first.stream and not first.side_call
    assert first.tool_output_ids == () and first.turn_id is not None
    # tool_result continues the turn (cache_control moved: same turn id)
    moved = _user({"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                  {"type": "text", "text": "run the tool"})
    cont = am.request_info(_body([moved, TOOL_USE, RESULT]))
    assert cont.turn_id == first.turn_id and cont.tool_output_ids == ("toolu_1",)
    # a new user text starts a new turn; the old tool_result is not "returned" again
    nxt = am.request_info(_body([moved, TOOL_USE, RESULT,
                                 {"role": "assistant", "content": "done"},
                                 {"role": "user", "content": "next task"}]))
    assert nxt.turn_id not in (None, first.turn_id) and nxt.tool_output_ids == ()
    # the same text at another position (e.g. after a compaction) is another turn
    again = am.request_info(_body([{"role": "user", "content": "summary"}, moved]))
    assert again.turn_id != first.turn_id


def test_side_calls_sessions_and_bad_bodies() -> None:
    side = am.request_info({"model": "claude-haiku-4-5", "messages": [FIRST]})
    assert side.side_call and side.session_id is None and not side.stream
    assert am.session_and_turn({"x-claude-code-session-id": "hdr"}.get, side)[0] == "hdr"
    with pytest.raises(BadRequest):
        am.parse_request(b'{"model": "claude-sonnet-4-5"}')
    with pytest.raises(BadRequest):
        am.parse_request(b'{"messages": []}')


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_stream_reader_takes_usage_and_tool_calls_across_chunks(chunk: int) -> None:
    fa = FakeAnthropic(usage=FakeAnthropicUsage(1200, 300, 200, 57))
    content = [{"type": "tool_use", "id": "toolu_9", "name": "Bash", "input": {"command": "ls"}}]
    raw = b"".join(fa._events("msg_1", "claude-sonnet-4-5", content, "tool_use"))
    reader = am.MessagesStreamReader()
    for i in range(0, len(raw), chunk):
        reader.feed(raw[i:i + chunk])
    reader.close()
    s = reader.summary
    assert s.usage == Usage(input_tokens=1400, cached_input_tokens=200, cache_write_tokens=300,
                            output_tokens=57)
    assert (s.response_id, s.model, s.tool_calls) == ("msg_1", "claude-sonnet-4-5",
                                                      [("toolu_9", "Bash")])
    assert s.finish_reasons == ["tool_use"] and s.status == "completed"


def test_a_stream_cut_before_message_delta_has_no_usage() -> None:
    fa = FakeAnthropic()
    events = fa._events("msg_1", "m", [{"type": "text", "text": "hello"}], "end_turn")
    reader = am.MessagesStreamReader()
    reader.feed(b"".join(events[:-2]))  # no message_delta / message_stop
    reader.close()
    assert reader.summary.usage is None  # settle charges an estimate, never the start's 1


def test_mid_stream_error_and_plain_bodies() -> None:
    reader = am.MessagesStreamReader()
    reader.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
                b'"message":"busy"}}\n\n')
    reader.close()
    assert (reader.summary.status, reader.summary.error_code) == ("failed", "overloaded_error")
    body = {"id": "msg_2", "type": "message", "model": "claude-sonnet-4-5",
            "stop_reason": "end_turn", "content": [{"type": "text", "text": "hi"}],
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5,
                      "cache_creation_input_tokens": 0, "output_tokens": 3}}
    s = am.read_body(json.dumps(body).encode())
    assert s.usage == Usage(input_tokens=15, cached_input_tokens=5, output_tokens=3)
    err = am.read_body(am.error_body("nope", type="rate_limit_error"))
    assert (err.status, err.error_code, err.error_message) == ("failed", "rate_limit_error",
                                                               "nope")
    assert am.read_body(b"not json").usage is None


def test_usage_is_priced_once_per_bucket() -> None:
    usage = am.usage_from_anthropic({"input_tokens": 1200, "cache_read_input_tokens": 200,
                                     "cache_creation_input_tokens": 300, "output_tokens": 57})
    cost = price_call(usage, "claude-sonnet-4-5", "anthropic", {})
    # list price per Mtok: input 3, cache read 0.30, cache write 3.75, output 15
    assert cost.usd == Decimal("0.00564") and cost.source == "genai-prices"


def test_error_format_and_status_choice() -> None:
    assert json.loads(am.error_body("m", type="permission_error")) == {
        "type": "error", "error": {"type": "permission_error", "message": "m"}}
    assert [am.client_status(s) for s in (401, 403, 404, 413, 400, 429, 503)] == [
        400, 400, 400, 400, 400, 429, 503]
    assert am.error_type_for(401) == "authentication_error"


def test_guardrail_segments_cover_system_text_tool_use_and_tool_results() -> None:
    body = _body([FIRST, TOOL_USE, _user({"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text", "text": "out"}]})],
                 system=[{"type": "text", "text": "sys"}])
    segs = {(s.path, s.direction, s.role, s.text) for s in items.segments(body, am.API)}
    assert (("system", 0, "text"), "input", "system", "sys") in segs
    assert (("messages", 0, "content", 1, "text"), "input", "user", "run the tool") in segs
    assert (("messages", 1, "content", 0, "input", "command"), "input", "assistant",
            "ls") in segs
    assert (("messages", 2, "content", 0, "content", 0, "text"), "tool_output", "tool",
            "out") in segs
    items.put(body, ("messages", 2, "content", 0, "content", 0, "text"), "[REDACTED]")
    assert "[REDACTED]" in json.dumps(body)

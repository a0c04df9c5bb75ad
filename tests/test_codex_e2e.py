"""The real Codex CLI through the real gateway against the tests' own fake provider."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from conftest import PROVIDER_KEY, Gateway, run_codex
from fakeprovider import DEFAULT_ANSWER, FakeProvider

from agent_egress.addon.pricing import price_call
from agent_egress.addon.protocols.usage import Usage

pytestmark = pytest.mark.codex


def test_codex_turn_with_tool_through_gateway(tmp_path: Path, fake: FakeProvider,
                                              gateway: Gateway) -> None:
    token, key_id = gateway.issue_token(user="alice", team="payments", org="acme")
    res = run_codex(tmp_path, gateway.base_url, token)
    assert res.returncode == 0, res.stderr[-3000:]
    assert DEFAULT_ANSWER in res.stdout

    calls = fake.requests_to("/v1/responses")
    assert len(calls) >= 2, "expected a tool call and a final answer"
    # The tool really ran: the second call carries its output back.
    outputs = [item for item in calls[-1].json["input"]
               if item.get("type") in ("function_call_output", "custom_tool_call_output")]
    assert outputs and "fake-tool-ran" in json.dumps(outputs)

    # The provider saw only the vaulted key, never the gateway token.
    for req in fake.requests:
        assert req.header("authorization") == f"Bearer {PROVIDER_KEY}"
        blob = json.dumps(req.headers) + req.body.decode(errors="replace")
        assert token not in blob

    rows = gateway.wait_ledger(len(calls))
    assert len(rows) == len(calls), "exactly one ledger row per model call"
    session = calls[0].header("session-id")
    u = fake.usage
    expected_cost = price_call(
        Usage(input_tokens=u.input_tokens, cached_input_tokens=u.cached_tokens,
              output_tokens=u.output_tokens, reasoning_tokens=u.reasoning_tokens),
        "gpt-5.5", "openai", {}).usd
    assert expected_cost is not None and expected_cost > 0
    for row in rows:
        assert (row["org"], row["team"], row["user"], row["key_id"]) == (
            "acme", "payments", "alice", key_id)
        assert row["input_tokens"] == u.input_tokens
        assert row["cached_input_tokens"] == u.cached_tokens
        assert row["output_tokens"] == u.output_tokens
        assert row["reasoning_tokens"] == u.reasoning_tokens
        assert row["cost_usd"] == expected_cost
        assert row["outcome"] == "ok" and not row["usage_estimated"]
        assert row["requested_model"] == row["served_model"] == "gpt-5.5"
        assert row["session_id"] == session and session
        assert row["turn_id"]
        assert row["status_code"] == 200

    metrics = httpx.get(f"{gateway.admin_url}/metrics").text
    assert (f'agent_egress_model_calls_total{{agent="codex",api="openai.responses",'
            f'model="gpt-5.5",org="acme",outcome="ok",provider="openai",team="payments"}}'
            f" {float(len(calls))}") in metrics
    assert (f'agent_egress_gateway_overhead_seconds_count{{api="openai.responses"}}'
            f" {float(len(calls))}") in metrics

    spend = json.loads(gateway.cli("spend", "--by", "team", "--format", "json").stdout)
    assert spend[0]["team"] == "payments"
    assert Decimal(spend[0]["cost_usd"]) == expected_cost * len(calls)


def test_revoked_token_shows_our_message_in_codex(tmp_path: Path, fake: FakeProvider,
                                                  gateway: Gateway) -> None:
    token, key_id = gateway.issue_token(user="bob", team="search")
    gateway.cli("token", "revoke", key_id)
    res = run_codex(tmp_path, gateway.base_url, token)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert f"gateway token {key_id} was revoked" in out, out[-3000:]
    assert "request id req_" in out
    assert fake.requests == [], "a refused call must never reach the provider"
    assert gateway.ledger() == []


def test_unknown_token_shows_our_message_in_codex(tmp_path: Path, fake: FakeProvider,
                                                  gateway: Gateway) -> None:
    res = run_codex(tmp_path, gateway.base_url, "sk-a-provider-key-on-a-laptop")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "not an agent-egress gateway token" in out, out[-3000:]
    assert "sk-a-provider-key-on-a-laptop" not in out
    assert fake.requests == []

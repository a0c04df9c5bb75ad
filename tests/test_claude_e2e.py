"""Claude Code through the gateway (issue 13): the real Claude Code CLI (2.1.197, headless),
a real gateway process and a fake Anthropic provider the tests own (DESIGN §4)."""

from __future__ import annotations

import json
import os
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Gateway, make_gateway, run_codex
from fakeanthropic import DEFAULT_ANSWER, FakeAnthropic
from fakeprovider import FakeProvider
from otlp_receiver import OTLPReceiver

from agent_egress.exporters.otel import SessionTracer

CLAUDE = os.environ.get("CLAUDE_BIN") or str(ROOT / "tools" / "claude" / "node_modules" / ".bin"
                                             / "claude")
ANTHROPIC_KEY = "sk-ant-api03-CANARYvaultedANTHROPICkey0123456789abcdef"
MODEL = "claude-sonnet-4-5"
# Anthropic's list price for claude-sonnet-4-5, USD per million tokens: input 3, cache
# read 0.30, cache write 3.75, output 15. The fake reports 1200 / 200 / 300 / 57.
CALL_USD = (1200 * Decimal(3) + 200 * Decimal("0.3") + 300 * Decimal("3.75")
            + 57 * Decimal(15)) / 1_000_000
GH = "ghp_" + "R4nd0mT0kenV4lue" * 2 + "abcd"


@pytest.fixture
def fake_anthropic() -> Any:
    with FakeAnthropic() as fa:
        yield fa


def claude_gateway(tmp_path: Path, openai: FakeProvider, fa: FakeAnthropic,
                   **config: Any) -> Gateway:
    """OpenAI stays the default provider: Claude Code's calls must still find Anthropic."""
    gw = make_gateway(tmp_path, openai.base_url, providers=[
        {"name": "openai", "kind": "openai", "base_url": openai.base_url, "key": "openai"},
        {"name": "anthropic", "kind": "anthropic", "base_url": fa.base_url,
         "key": "anthropic"}], **config)
    gw.cli("vault", "set", "anthropic", input=ANTHROPIC_KEY + "\n")
    return gw


def run_claude(tmp_path: Path, gw: Gateway, token: str, prompt: str = "run the tool", *,
               api_key: bool = False, timeout: float = 120,
               env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Headless Claude Code at the gateway, a temporary HOME, nonessential traffic off."""
    if not Path(CLAUDE).exists():
        pytest.fail(f"Claude Code CLI missing at {CLAUDE}: run scripts/test.sh (it installs it)")
    home = tmp_path / "claude-home"
    work = tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{gw.reverse_port}",
           "ANTHROPIC_API_KEY" if api_key else "ANTHROPIC_AUTH_TOKEN": token,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
           "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_MAX_RETRIES": "2", "NO_PROXY": "*", **(env_extra or {})}
    return subprocess.run([CLAUDE, "-p", prompt, "--allowedTools", "Bash", "--model", MODEL,
                           "--output-format", "stream-json", "--verbose"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=work,
                          env=env, timeout=timeout)


def result_of(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The final ``result`` line of Claude Code's stream-json output."""
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    results = [x for x in lines if x.get("type") == "result"]
    assert results, res.stdout[-3000:] + res.stderr[-2000:]
    return results[-1]



def test_claude_code_runs_a_bash_tool_through_the_gateway(
        tmp_path: Path, fake: FakeProvider, fake_anthropic: FakeAnthropic) -> None:
    rx = OTLPReceiver()
    gw = claude_gateway(tmp_path, fake, fake_anthropic, telemetry={
        "traces": {"exporter": "otlp-http", "endpoint": rx.endpoint}})
    gw.start()
    try:
        token, key_id = gw.issue_token()
        res = run_claude(tmp_path, gw, token)  # ANTHROPIC_AUTH_TOKEN: Authorization: Bearer
        out = result_of(res)
        assert res.returncode == 0 and out["subtype"] == "success", res.stdout[-3000:]
        assert out["result"] == DEFAULT_ANSWER
        res2 = run_claude(tmp_path, gw, token, "again", api_key=True)  # ANTHROPIC_API_KEY
        assert res2.returncode == 0 and result_of(res2)["result"] == DEFAULT_ANSWER
        rows = gw.wait_ledger(4)
        assert gw.metric("agent_egress_model_calls_total", agent="claude-code") == 4
        assert gw.stop() == 0  # the bounded flush exports the open turns
    finally:
        gw.stop()
        rx.stop()

    calls = fake_anthropic.requests
    assert [(c.method, c.path, c.query) for c in calls] == [
        ("POST", "/v1/messages", "beta=true")] * 4
    assert fake.requests == []  # the OpenAI default provider saw nothing
    for c in calls:  # only the vaulted key, in Anthropic's header; no gateway token
        assert c.header("x-api-key") == ANTHROPIC_KEY
        assert c.header("authorization") is None
        assert token not in json.dumps(c.headers)
        assert c.header("anthropic-version") == "2023-06-01"
        assert "claude-code-20250219" in (c.header("anthropic-beta") or "")
    # the tool really ran, and its result went back in the next request
    results = [b for b in calls[1].body["messages"][-1]["content"]  # type: ignore[index]
               if b.get("type") == "tool_result"]
    assert results and "fake-tool-ran" in json.dumps(results)
    tool_id = results[0]["tool_use_id"]

    sessions = [c.header("x-claude-code-session-id") for c in calls]
    assert sessions[0] == sessions[1] and sessions[2] == sessions[3] != sessions[0]
    assert len(rows) == 4
    rows.sort(key=lambda r: r["ts"])
    for row, session in zip(rows, sessions, strict=True):
        assert row["api"] == "anthropic.messages" and row["provider"] == "anthropic"
        assert row["key_id"] == key_id and row["session_id"] == session
        assert row["served_model"] == MODEL and row["status_code"] == 200
        assert (row["input_tokens"], row["cached_input_tokens"], row["cache_write_tokens"],
                row["output_tokens"]) == (1400, 200, 300, 57)
        assert row["cost_usd"] == CALL_USD and row["price_source"] == "genai-prices"
        assert row["outcome"] == "ok" and not row["usage_estimated"]
    assert rows[0]["turn_id"] == rows[1]["turn_id"] is not None  # tool_result continues
    assert rows[2]["turn_id"] != rows[0]["turn_id"]

    assert rx.wait_for(lambda spans: sum(s.name.startswith("turn") for s in spans) >= 2,
                       timeout=10)
    spans = [s for s in rx.spans if s.trace_id == SessionTracer.trace_id_for(sessions[0])]
    turns = [s for s in spans if s.name.startswith("turn")]
    chats = [s for s in spans if s.name.startswith("chat ")]
    tools = [s for s in spans if s.name.startswith("execute_tool ")]
    assert len(turns) == 1 and len(chats) == 2 and len(tools) == 1, [s.name for s in spans]
    assert all(c.parent_id == turns[0].span_id for c in chats)
    assert tools[0].name == "execute_tool Bash"
    assert tools[0].attributes["gen_ai.tool.call.id"] == tool_id
    assert tools[0].parent_id == turns[0].span_id and tools[0].end_ns > tools[0].start_ns
    for c in chats:
        assert c.name == f"chat {MODEL}"
        assert c.attributes["gen_ai.provider.name"] == "anthropic"
        assert c.attributes["gen_ai.conversation.id"] == sessions[0]
        assert Decimal(str(c.attributes["agent_egress.cost_usd"])) == CALL_USD
    assert token not in json.dumps([[s.name, s.attributes] for s in rx.spans], default=str)


def test_planted_secret_in_a_tool_result_is_redacted(
        tmp_path: Path, fake: FakeProvider, fake_anthropic: FakeAnthropic) -> None:
    gw = claude_gateway(tmp_path, fake, fake_anthropic)  # default policy: tool output redacted
    gw.start()
    try:
        token, _ = gw.issue_token()
        (tmp_path / "work").mkdir()
        (tmp_path / "work" / "creds.txt").write_text(f"github token: {GH}\n")
        fake_anthropic.tool_command = "cat creds.txt"
        res = run_claude(tmp_path, gw, token, "show me creds.txt")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    finally:
        gw.stop()
    calls = fake_anthropic.requests
    assert len(calls) == 2
    results = [b for b in calls[1].body["messages"][-1]["content"]  # type: ignore[index]
               if b.get("type") == "tool_result"]
    assert "[REDACTED:secrets.github_token]" in json.dumps(results), results
    assert all(GH.encode() not in c.raw for c in calls)
    assert GH not in gw.logs()


def test_a_bad_token_is_shown_by_claude_code_not_retried(
        tmp_path: Path, fake: FakeProvider, fake_anthropic: FakeAnthropic) -> None:
    """A 401 would print only "Invalid API key" after 10 retries: we send 400 + no-retry."""
    gw = claude_gateway(tmp_path, fake, fake_anthropic)
    gw.start()
    try:
        res = run_claude(tmp_path, gw, "sk-ant-api03-not-a-gateway-token")
        out = result_of(res)
        assert out["is_error"] is True
        assert "agent-egress: the credential sent is not an agent-egress gateway token" in (
            out["result"]), out
        assert gw.metric("agent_egress_refusals_total", rule="token_malformed") == 1
        assert fake_anthropic.requests == []
    finally:
        gw.stop()


def test_spent_budget_is_shown_once_without_a_retry_storm(
        tmp_path: Path, fake: FakeProvider, fake_anthropic: FakeAnthropic) -> None:
    """Codex and Claude Code share the team's budget: Codex spends it, Claude Code is told."""
    prices = {"*": {"input_per_mtok": "10", "output_per_mtok": "10"}}
    gw = make_gateway(tmp_path, fake.base_url, providers=[
        {"name": "openai", "kind": "openai", "base_url": fake.base_url, "key": "openai",
         "prices": prices},
        {"name": "anthropic", "kind": "anthropic", "base_url": fake_anthropic.base_url,
         "key": "anthropic", "prices": prices}],
        budgets={"teams": {"acme/payments": [{"period": "monthly", "usd": "0.02"}]},
                 "reservation": {"max_usd": "0.001"}})
    gw.cli("vault", "set", "anthropic", input=ANTHROPIC_KEY + "\n")
    gw.start()
    try:
        token, _ = gw.issue_token()
        first = run_codex(tmp_path, gw.base_url, token, "run the tool")
        assert first.returncode == 0, first.stderr[-2000:]  # 2 calls: 0.025 USD > 0.02
        res = run_claude(tmp_path, gw, token)
        text = res.stdout + res.stderr
        out = result_of(res)
        assert res.returncode != 0 and out["is_error"] is True, text[-3000:]
        message = "monthly budget of team:acme/payments is exhausted"
        assert out["result"].startswith("API Error: 400 agent-egress: the " + message), out
        assert out["result"].count(message) == 1
        assert fake_anthropic.requests == []  # nothing reached the provider
        # Final: Claude Code sent one request and showed it (no retry storm).
        assert gw.metric("agent_egress_refusals_total", rule="budget_exceeded") == 1
    finally:
        gw.stop()


def test_streamed_model_output_is_redacted_for_claude_code(
        tmp_path: Path, fake: FakeProvider, fake_anthropic: FakeAnthropic) -> None:
    """With the opt-in output guard, text_delta and input_json_delta pass the hold-back
    window: a key the model writes never reaches Claude Code (nor its Bash tool)."""
    aws = "AKIA" + "QZ7RT2WX9MB4KD6P"
    gw = claude_gateway(tmp_path, fake, fake_anthropic, guardrails={"default": {"secrets": {
        "directions": ["input", "tool_output", "model_output"],
        "action": {"input": "block", "tool_output": "redact", "model_output": "redact"}}}})
    gw.start()
    try:
        token, _ = gw.issue_token()
        fake_anthropic.answer_text = f"the key is {aws} and that is all"
        fake_anthropic.tool_command = f"echo {aws}"
        res = run_claude(tmp_path, gw, token)
        out = result_of(res)
    finally:
        gw.stop()
    assert out["result"] == "the key is [REDACTED:secrets.aws_access_key] and that is all"
    assert aws not in res.stdout, res.stdout[-3000:]
    tool_input = fake_anthropic.requests[1].body["messages"][-2]["content"][0]["input"]  # type: ignore[index]
    assert tool_input["command"] == "echo [REDACTED:secrets.aws_access_key]"


def test_token_issue_prints_claude_code_lines_that_work(
        tmp_path: Path, fake: FakeProvider, fake_anthropic: FakeAnthropic) -> None:
    gw = claude_gateway(tmp_path, fake, fake_anthropic)
    gw.start()
    try:
        text = gw.cli("token", "issue", "--user", "dana", "--team", "payments", "--org",
                      "acme").stdout
        exports = dict(line.removeprefix("export ").split("=", 1) for line in text.splitlines()
                       if line.startswith("export ANTHROPIC_"))
        assert exports["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{gw.reverse_port}"
        res = run_claude(tmp_path, gw, exports["ANTHROPIC_AUTH_TOKEN"])
        assert result_of(res)["result"] == DEFAULT_ANSWER, res.stdout[-3000:]
    finally:
        gw.stop()

"""Guardrails end to end: the real Codex CLI, a real gateway process, the fake provider."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_gateway, run_codex
from fakeprovider import FakeProvider, iter_sse

AWS = "AKIA" + "QZ7RT2WX9MB4KD6P"
GH = "ghp_" + "R4nd0mT0kenV4lue" * 2 + "abcd"

ALL_DIRECTIONS = ["input", "tool_output", "model_output"]


@pytest.mark.codex
def test_codex_prompt_with_aws_key_is_blocked(tmp_path: Path, fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url)
    gw.start()
    try:
        token, _ = gw.issue_token()
        res = run_codex(tmp_path, gw.base_url, token, prompt=f"deploy with key {AWS} please")
        out = res.stdout + res.stderr
        assert "guardrail rule secrets.aws_access_key blocked this request" in out, out[-2000:]
        assert AWS not in gw.logs()
        assert fake.requests_to("/responses") == []  # nothing reached the provider
        metrics = httpx.get(f"{gw.admin_url}/metrics").text
        assert 'agent_egress_refusals_total{rule="guardrail_blocked"}' in metrics
        assert 'rule="secrets.aws_access_key"' in metrics
        deadline = time.monotonic() + 5  # the audit writer batches off the loop
        while "guardrail.hit" not in (audit := (gw.home / "audit.jsonl").read_text()):
            assert time.monotonic() < deadline, audit
            time.sleep(0.05)
        assert AWS not in audit
    finally:
        gw.stop()


@pytest.mark.codex
def test_codex_tool_output_with_key_is_redacted_upstream(tmp_path: Path,
                                                         fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url)
    gw.start()
    try:
        token, _ = gw.issue_token()
        (tmp_path / "work").mkdir(exist_ok=True)
        (tmp_path / "work" / "creds.txt").write_text(f"github token: {GH}\n")
        fake.tool_command = "cat creds.txt"
        res = run_codex(tmp_path, gw.base_url, token, prompt="show me creds.txt")
        assert res.returncode == 0, res.stderr[-2000:]
        reqs = fake.requests_to("/responses")
        outputs = [it for r in reqs for it in (r.json or {}).get("input", [])
                   if isinstance(it, dict) and it.get("type") == "function_call_output"]
        assert outputs, [r.json for r in reqs]
        assert all(GH not in json.dumps(o) for o in outputs)
        assert any("[REDACTED:secrets.github_token]" in json.dumps(o) for o in outputs)
        assert all(GH.encode() not in r.body for r in reqs)
    finally:
        gw.stop()


def _stream(gw_url: str, token: str) -> tuple[str, list[tuple[str | None, str]]]:
    body = {"model": "gpt-5.5", "stream": True, "input": "say it"}
    with httpx.stream("POST", f"{gw_url}/responses", json=body, timeout=30,
                      headers={"authorization": f"Bearer {token}"}) as r:
        raw = b"".join(r.iter_bytes())  # raises if the body does not end cleanly
    return raw.decode(), list(iter_sse(raw))


def test_streamed_secret_in_deltas_is_redacted(tmp_path: Path, fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url,  # the output guard is opt-in
                      guardrails={"default": {"secrets": {"directions": ALL_DIRECTIONS}}})
    gw.start()
    try:
        token, _ = gw.issue_token()
        fake.answer_text = "Sure. The key is " + AWS + " and that is all you need. " * 3
        fake.tool_calls = 0
        fake.delta_count = 29
        raw, events = _stream(gw.base_url, token)
        assert AWS not in raw
        assert "[REDACTED:secrets.aws_access_key]" in raw
        assert events[-1][0] == "response.completed"
        rows = gw.wait_ledger(1)
        assert rows and rows[0]["input_tokens"] > 0  # usage still read from the provider
    finally:
        gw.stop()


def test_streamed_secret_blocked_mid_stream_ends_cleanly(tmp_path: Path,
                                                        fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url,
                      guardrails={"default": {"secrets": {"action": "block",
                                                         "directions": ALL_DIRECTIONS}}})
    gw.start()
    try:
        token, _ = gw.issue_token()
        fake.answer_text = "x " * 200 + AWS + " y" * 400
        fake.tool_calls = 0
        fake.delta_count = 120
        fake.event_delay = 0.1  # the whole stream would take ~12 s
        t0 = time.monotonic()
        raw, events = _stream(gw.base_url, token)
        took = time.monotonic() - t0
        assert AWS not in raw
        assert events[-1][0] == "response.failed"
        err = json.loads(events[-1][1])["response"]["error"]
        assert err["code"] == "invalid_prompt" and err["type"] == "guardrail_blocked"
        assert "secrets.aws_access_key" in err["message"]
        assert took < 8, took  # the client's stream ended at the block, not at the upstream's end
        metrics = httpx.get(f"{gw.admin_url}/metrics").text
        assert 'agent_egress_refusals_total{rule="guardrail_blocked"}' in metrics
    finally:
        gw.stop()


@pytest.mark.codex
def test_codex_output_blocked_mid_stream_shows_message_once(tmp_path: Path,
                                                            fake: FakeProvider) -> None:
    """A mid-stream block must be final for Codex: our message on its screen, no retries.

    Measured with Codex 0.169: a ``response.failed`` with any code it does not know is
    retried 5 times ("Reconnecting... 1/5".."5/5", six requests to the provider, each
    billed); with ``invalid_prompt`` it stops after the first and prints the message."""
    gw = make_gateway(tmp_path, fake.base_url,
                      guardrails={"default": {"secrets": {"action": "block",
                                                         "directions": ALL_DIRECTIONS}}})
    gw.start()
    try:
        token, _ = gw.issue_token()
        fake.answer_text = "here it is: " + "x " * 150 + AWS + " and more" * 20
        fake.tool_calls = 0
        fake.delta_count = 40
        res = run_codex(tmp_path, gw.base_url, token, prompt="print the deploy key")
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-2000:]
        assert ("agent-egress: the model's output was stopped by guardrail rule"
                " secrets.aws_access_key (action block)") in out, out[-2000:]
        assert "Reconnecting" not in out, out[-2000:]
        assert len(fake.requests_to("/responses")) == 1
        assert AWS not in out
        metrics = httpx.get(f"{gw.admin_url}/metrics").text
        assert 'agent_egress_refusals_total{rule="guardrail_blocked"} 1.0' in metrics
    finally:
        gw.stop()


def test_gateway_shares_verdicts_in_the_configured_redis(tmp_path: Path,
                                                         fake: FakeProvider) -> None:
    """The gateway's input guard uses the Redis verdict cache built from redis_url (an
    empty cache is falsy: ``cache or VerdictCache()`` once replaced it by a local one)."""
    import uuid

    import redis
    from services import redis_url

    url, prefix = redis_url(), f"guard-e2e-{uuid.uuid4().hex[:8]}:"
    gw = make_gateway(tmp_path, fake.base_url, redis_url=url, redis_prefix=prefix)
    gw.start()
    client = redis.Redis.from_url(url)
    try:
        token, _ = gw.issue_token()
        fake.tool_calls = 0
        r = httpx.post(f"{gw.base_url}/responses", timeout=30,
                       # verdicts are cached per session: no session id, no cache
                       headers={"authorization": f"Bearer {token}",
                                "session-id": "sess-guard-e2e"},
                       json={"model": "gpt-5.5", "stream": False, "input": [
                           {"role": "user", "content": "first message"},
                           {"role": "user", "content": "second message"}]})
        assert r.status_code == 200, r.text
        assert len(client.keys(prefix + "guard:*")) == 2  # one verdict per input item
    finally:
        gw.stop()
        for key in client.scan_iter(prefix + "*"):
            client.delete(key)
        client.close()

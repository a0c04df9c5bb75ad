"""Anthropic Messages through a real gateway process with a real HTTP client (httpx):
plain bodies, both token headers, refusals in Anthropic's format, both APIs side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from conftest import Gateway
from fakeanthropic import FakeAnthropic
from fakeprovider import FakeProvider
from test_claude_e2e import ANTHROPIC_KEY, CALL_USD, claude_gateway

BODY: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 100,
                        "messages": [{"role": "user", "content": "hi"}]}


def _post(gw: Gateway, headers: dict[str, str], body: dict[str, Any] | None = None,
          path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{gw.reverse_port}{path}", json=body or BODY,
                      headers={"anthropic-version": "2023-06-01", **headers}, timeout=30)


def test_plain_calls_both_token_headers_and_both_apis(tmp_path: Path, fake: FakeProvider
                                                      ) -> None:
    with FakeAnthropic() as fa:
        gw = claude_gateway(tmp_path, fake, fa)
        gw.start()
        try:
            token, _ = gw.issue_token()
            r1 = _post(gw, {"x-api-key": token, "anthropic-beta": "b1"})
            r2 = _post(gw, {"authorization": f"Bearer {token}"}, path="/v1/messages?beta=true")
            assert r1.status_code == r2.status_code == 200, r1.text
            assert r1.json()["content"][0]["text"] == fa.answer_text
            # Codex's API still goes to the OpenAI provider
            r3 = httpx.post(f"{gw.base_url}/responses", timeout=30,
                            json={"model": "gpt-5.5", "input": "hi", "stream": False},
                            headers={"authorization": f"Bearer {token}"})
            assert r3.status_code == 200, r3.text
            rows = gw.wait_ledger(3)
        finally:
            gw.stop()
        assert [(c.path, c.query) for c in fa.requests] == [("/v1/messages", ""),
                                                            ("/v1/messages", "beta=true")]
        for c in fa.requests:
            assert c.header("x-api-key") == ANTHROPIC_KEY and c.header("authorization") is None
            assert c.header("anthropic-version") == "2023-06-01"
        assert fa.requests[0].header("anthropic-beta") == "b1"
        assert len(fake.requests) == 1 and fake.requests[0].header("x-api-key") is None
        by_api = sorted((r["api"], r["provider"], r["cost_usd"] == CALL_USD) for r in rows)
        assert by_api == [("anthropic.messages", "anthropic", True),
                          ("anthropic.messages", "anthropic", True),
                          ("openai.responses", "openai", False)]


def test_refusals_are_in_anthropic_format_with_claude_code_statuses(
        tmp_path: Path, fake: FakeProvider) -> None:
    with FakeAnthropic() as fa:
        gw = claude_gateway(tmp_path, fake, fa, rate_limits={"per_user": {"rpm": 1}})
        gw.start()
        try:
            token, _ = gw.issue_token()
            narrow = gw.cli("token", "issue", "--user", "bob", "--team", "payments", "--org",
                            "acme", "--model", "gpt-5*", "--format", "json").stdout
            narrow_token = json.loads(narrow)["token"]
            missing = _post(gw, {})
            scope = _post(gw, {"x-api-key": narrow_token})
            ok = _post(gw, {"x-api-key": token})
            limited = _post(gw, {"x-api-key": token})
        finally:
            gw.stop()
        for r, kind, code in ((missing, "authentication_error", "token_missing"),
                              (scope, "permission_error", "model_not_allowed")):
            assert r.status_code == 400, r.text  # Claude Code prints a 400's message
            assert r.headers["x-should-retry"] == "false"
            assert r.headers["x-egress-refused-by"] == code
            body = r.json()
            assert body["type"] == "error" and body["error"]["type"] == kind
            assert body["error"]["message"].startswith("agent-egress: ")
            assert r.headers["x-egress-request-id"] in body["error"]["message"]
        assert ok.status_code == 200
        assert limited.status_code == 429 and "x-should-retry" not in limited.headers
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert len(fa.requests) == 1

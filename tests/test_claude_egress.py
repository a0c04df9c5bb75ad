"""Claude Code through the egress proxy (issue 13 item 6): the real Claude Code CLI
(2.1.197) with HTTPS_PROXY and NODE_EXTRA_CA_CERTS, a real gateway process and a TLS fake
Anthropic provider; and Claude Code's own non-model calls never carry a gateway token
upstream."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import Gateway, make_gateway
from fakeanthropic import DEFAULT_ANSWER, FakeAnthropic
from fakeprovider import FakeProvider
from test_claude_e2e import ANTHROPIC_KEY, CALL_USD, CLAUDE, MODEL, result_of
from tlsfake import Pki, make_pki


class TlsFakeAnthropic(FakeAnthropic):
    """The fake Anthropic provider served over https (certificate from the test CA)."""

    def __init__(self, tls: tuple[str, str]) -> None:
        super().__init__()
        self.tls = tls

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> str:
        server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
            access_log=False, timeout_graceful_shutdown=1, ssl_certfile=self.tls[0],
            ssl_keyfile=self.tls[1]))
        self._server = server

        def run() -> None:
            asyncio.run(server.serve())

        self._thread = threading.Thread(target=run, name="tlsfakeanthropic", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("TLS fake Anthropic provider did not start")
            time.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self.base_url


@dataclass
class Env:
    gw: Gateway
    pki: Pki
    anthropic: TlsFakeAnthropic
    gateway_ca: Path
    token: str
    key_id: str

    def proxy(self, token: str | None = None) -> str:
        auth = "" if token is None else f"dev:{token}@"
        return f"http://{auth}127.0.0.1:{self.gw.proxy_port}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("claude-egress")
    pki = make_pki(tmp / "pki")
    with FakeProvider() as openai, TlsFakeAnthropic(pki.server) as fa:
        gw = make_gateway(tmp, openai.base_url, providers=[
            {"name": "openai", "kind": "openai", "base_url": openai.base_url, "key": "openai"},
            {"name": "anthropic", "kind": "anthropic", "base_url": fa.base_url,
             "key": "anthropic"}], egress={"upstream_ca_file": str(pki.ca_cert)})
        gw.cli("vault", "set", "anthropic", input=ANTHROPIC_KEY + "\n")
        gw.start()
        try:
            token, key_id = gw.issue_token()
            ca = tmp / "gateway-ca.pem"
            gw.cli("ca", "export", "--out", str(ca))
            yield Env(gw, pki, fa, ca, token, key_id)
        finally:
            gw.stop()


def run_claude_via_proxy(env: Env, tmp_path: Path, proxy: str, api_key: str,
                         prompt: str = "run the tool") -> subprocess.CompletedProcess[str]:
    """Headless Claude Code with only the egress set-up a developer laptop gets."""
    home, work = tmp_path / "claude-home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
               "ANTHROPIC_BASE_URL": env.anthropic.base_url, "ANTHROPIC_API_KEY": api_key,
               "HTTPS_PROXY": proxy, "NODE_EXTRA_CA_CERTS": str(env.gateway_ca),
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
               "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1",
               "CLAUDE_CODE_MAX_RETRIES": "2"}
    return subprocess.run([CLAUDE, "-p", prompt, "--allowedTools", "Bash", "--model", MODEL,
                           "--output-format", "stream-json", "--verbose"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=work,
                          env=run_env, timeout=120)


@pytest.mark.parametrize("where", ["proxy_url", "api_key"])
def test_claude_code_runs_a_bash_tool_through_the_egress_proxy(
        env: Env, tmp_path: Path, where: str) -> None:
    if not Path(CLAUDE).exists():
        pytest.fail(f"Claude Code CLI missing at {CLAUDE}: run scripts/test.sh")
    env.anthropic.clear()
    before = len(env.gw.ledger())
    if where == "proxy_url":  # the agent's own key is not a gateway token: never forwarded
        res = run_claude_via_proxy(env, tmp_path, env.proxy(env.token), "sk-ant-not-ours")
    else:
        res = run_claude_via_proxy(env, tmp_path, env.proxy(), env.token)
    out = result_of(res)
    assert res.returncode == 0 and out["subtype"] == "success", (
        res.stdout[-3000:] + res.stderr[-2000:] + env.gw.logs()[-3000:])
    assert out["result"] == DEFAULT_ANSWER
    calls = env.anthropic.requests
    assert [(c.method, c.path) for c in calls] == [("POST", "/v1/messages")] * 2
    for c in calls:  # only the vaulted key reached the provider
        assert c.header("x-api-key") == ANTHROPIC_KEY
        assert c.header("authorization") is None and c.header("proxy-authorization") is None
        assert env.token not in json.dumps(c.headers) and "sk-ant-not-ours" not in json.dumps(
            c.headers)
    results = [b for b in calls[1].body["messages"][-1]["content"]  # type: ignore[index]
               if b.get("type") == "tool_result"]
    assert results and "fake-tool-ran" in json.dumps(results)  # the Bash tool really ran
    rows = env.gw.wait_ledger(before + 2)[before:]
    assert len(rows) == 2
    for row in rows:
        assert row["api"] == "anthropic.messages" and row["provider"] == "anthropic"
        assert row["key_id"] == env.key_id and row["agent"] == "claude-code"
        assert row["billing"] == "gateway"
        assert (row["input_tokens"], row["cached_input_tokens"], row["cache_write_tokens"],
                row["output_tokens"]) == (1400, 200, 300, 57)
        assert row["cost_usd"] == CALL_USD and row["outcome"] == "ok"


def _client(proxy: str, env: Env) -> httpx.Client:
    return httpx.Client(proxy=proxy, verify=ssl.create_default_context(
        cafile=str(env.gateway_ca)), timeout=10, trust_env=False)


@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
def test_claude_codes_own_calls_with_a_gateway_token_are_refused(
        env: Env, header: str) -> None:
    env.anthropic.clear()
    value = env.token if header == "x-api-key" else f"Bearer {env.token}"
    with _client(env.proxy(), env) as c:
        r = c.post(f"{env.anthropic.base_url}/api/claude_code/metrics", json={"m": 1},
                   headers={header: value, "anthropic-version": "2023-06-01"})
        r2 = c.get(f"{env.anthropic.base_url}/api/oauth/profile", headers={header: value})
    for resp in (r, r2):
        # Anthropic's error format with a status Claude Code prints, and no retry
        assert resp.status_code == 400, resp.text
        assert resp.headers["x-should-retry"] == "false"
        body = resp.json()
        assert body["type"] == "error" and body["error"]["type"] == "permission_error"
        assert "gateway token" in body["error"]["message"]
        assert "never forwarded" in body["error"]["message"]
        assert env.token not in resp.text
    assert env.anthropic.requests == []  # the fake saw nothing


def test_claude_codes_own_calls_without_a_gateway_token_pass_untouched(env: Env) -> None:
    """The developer's own credential (e.g. a claude.ai OAuth token) is theirs to send;
    the proxy credential (the gateway token) is stripped on the way."""
    env.anthropic.clear()
    with _client(env.proxy(env.token), env) as c:
        r = c.post(f"{env.anthropic.base_url}/api/claude_code/metrics", json={"m": 1},
                   headers={"authorization": "Bearer sk-ant-oat01-developers-own"})
    assert r.status_code == 404 and "fake: no route" in r.text  # the fake's own answer
    (seen,) = env.anthropic.requests
    assert seen.path == "/api/claude_code/metrics"
    assert seen.header("authorization") == "Bearer sk-ant-oat01-developers-own"
    assert seen.header("proxy-authorization") is None
    assert env.token not in json.dumps(seen.headers)

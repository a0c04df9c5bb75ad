"""ChatGPT-login Codex in egress proxy mode (issue 9 item 4): refuse / meter / passthrough
by policy, with a real gateway process and a TLS fake of chatgpt.com's Codex backend."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from conftest import PROVIDER_KEY, Gateway, make_gateway
from fakeprovider import DEFAULT_ANSWER, FakeProvider
from services import fresh_database
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tlsfake import Pki, make_pki

from agent_egress.addon.protocols.chatgpt_login import (
    ChatGPTIdentity,
    chatgpt_policy,
    identity,
    is_model_path,
    jwt_claims,
)
from agent_egress.addon.report import build, render_csv, render_html
from agent_egress.addon.store.base import LedgerRow
from agent_egress.addon.store.sql import SQLStore

ACCOUNT = "acct-1111-2222"
EMAIL = "dev@example.com"
# gpt-5.5 list price (genai-prices), USD per million tokens: input 5, cached input 0.50,
# output 30. The fake reports 1200 input (1000 cached) and 50 output tokens.
CALL_USD = (200 * Decimal(5) + 1000 * Decimal("0.5") + 50 * Decimal(30)) / 1_000_000


def make_jwt(claims: dict[str, object]) -> str:
    """An unsigned JWT-shaped token (the gateway never verifies it: attribution only)."""
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


JWT = make_jwt({"email": EMAIL, "https://api.openai.com/auth": {
    "chatgpt_account_id": ACCOUNT, "chatgpt_plan_type": "pro",
    "chatgpt_user_id": "user-abc123"}})


# pure parts -------------------------------------------------------------------
def test_model_paths_are_only_the_codex_responses_calls() -> None:
    assert is_model_path("/backend-api/codex/responses")
    assert is_model_path("/backend-api/codex/responses/compact?x=1")
    assert not is_model_path("/backend-api/wham/accounts/check")
    assert not is_model_path("/backend-api/codex/models")
    assert not is_model_path("/v1/responses")


def test_identity_reads_unverified_claims_and_the_account_header_wins() -> None:
    who = identity(f"Bearer {JWT}", None)
    assert who == ChatGPTIdentity(account_id=ACCOUNT, user_id="user-abc123", email=EMAIL,
                                  plan_type="pro")
    assert identity(f"Bearer {JWT}", "acct-header").account_id == "acct-header"
    assert who.tags() == {"chatgpt_account": ACCOUNT, "chatgpt_user": "user-abc123",
                          "chatgpt_plan": "pro", "chatgpt_email": EMAIL}
    for junk in ("Bearer not-a-jwt", "Bearer a.!!!.c", "Basic " + JWT, "", None,
                 "Bearer " + make_jwt({"email": 5})[:-1] + "." * 3):
        assert identity(junk, None) == ChatGPTIdentity()
    assert jwt_claims("a." + base64.urlsafe_b64encode(b"[1,2]").decode() + ".c") == {}
    deep = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode()
    assert jwt_claims(f"a.{deep}.c") == {} and jwt_claims("a.\u00e9.c") == {}


def test_policy_team_override_wins_over_org_and_default_without_an_org() -> None:
    overrides = {"acme": "refuse", "acme/payments": "meter"}
    assert chatgpt_policy("passthrough", overrides, None) == "passthrough"
    assert chatgpt_policy("passthrough", overrides, "acme", "web") == "refuse"
    assert chatgpt_policy("passthrough", overrides, "acme", "payments") == "meter"
    assert chatgpt_policy("meter", overrides, "other", "payments") == "meter"


def row(i: int, billing: str, usd: str) -> LedgerRow:
    return LedgerRow(
        ts=datetime.now(UTC), request_id=f"req_{i}", org="beta", team="payments",
        user="alice", key_id="key_1", session_id=None, turn_id=None,
        api="chatgpt.codex" if billing == "subscription" else "openai.responses",
        requested_model="gpt-5.5", served_model="gpt-5.5", provider="p",
        status_code=200, input_tokens=100, cached_input_tokens=0, cache_write_tokens=0,
        output_tokens=10, reasoning_tokens=0, cost_usd=Decimal(usd),
        price_source="genai-prices", usage_estimated=False, ttfb_ms=1, duration_ms=2,
        outcome="ok", error_code=None, billing=billing)


def test_the_monthly_report_shows_subscription_spend_apart() -> None:
    month = datetime.now(UTC).strftime("%Y-%m")
    report = build([row(1, "gateway", "0.25"), row(2, "subscription", "7")], month)
    html = render_html(report)
    assert 'id="total-usd" data-usd="7.25"' in html
    assert 'id="subscription-usd" data-usd="7"' in html and "1 ChatGPT-login Codex call" in html
    lines = list(csv.DictReader(io.StringIO(render_csv(report))))
    assert sorted((x["billing"], x["cost_usd"]) for x in lines) == [
        ("gateway", "0.25"), ("subscription", "7")]
    assert "subscription-usd" not in render_html(build([row(1, "gateway", "1")], month))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_subscription_rows_never_count_against_budgets(tmp_path: Path, backend: str) -> None:
    """budget_sums rebuilds the limiter's counters from the ledger: gateway rows only."""
    from agent_egress.addon.budget_policy import Window

    url_cm = (fresh_database() if backend == "postgres"
              else contextlib.nullcontext(f"sqlite:///{tmp_path / 'l.db'}"))
    with url_cm as url:
        store = SQLStore(url)
        try:
            store.migrate()
            store.insert_ledger([row(1, "gateway", "0.25"), row(2, "subscription", "7"),
                                 row(3, "subscription", "1")])
            sums = store.budget_sums([Window("total", "total", None, None)])
            assert sums["team:beta/payments|total"] == (250_000_000, 110)
            assert {r.billing for r in store.ledger_rows()} == {"gateway", "subscription"}
            split = {r.group: (r.calls, r.cost_usd) for r in store.spend("billing")}
            assert split == {"gateway": (1, Decimal("0.25")), "subscription": (2, Decimal(8))}
        finally:
            store.close()


# a gateway in proxy mode with a fake ChatGPT backend -----------------------------
@dataclass
class Env:
    gw: Gateway
    pki: Pki
    llm: FakeProvider  # the configured OpenAI provider (gateway calls)
    chatgpt: FakeProvider  # stands in for chatgpt.com's /backend-api
    gateway_ca: Path
    tokens: dict[str, tuple[str, str]]  # org -> (token, key id)

    def client(self, org: str | None = None) -> httpx.Client:
        auth = "" if org is None else f"dev:{self.tokens[org][0]}@"
        return httpx.Client(proxy=f"http://{auth}127.0.0.1:{self.gw.proxy_port}",
                            verify=ssl.create_default_context(cafile=str(self.gateway_ca)),
                            timeout=10, trust_env=False)

    @property
    def backend(self) -> str:
        return f"https://127.0.0.1:{self.chatgpt.port}/backend-api"


def chatgpt_backend(fake: FakeProvider) -> FakeProvider:
    """The fake answers Codex's ChatGPT paths: the Responses stream and a bootstrap call."""
    async def accounts(request: Request) -> JSONResponse:
        await fake._record(request)
        return JSONResponse({"accounts": [{"id": ACCOUNT, "plan_type": "pro"}]})

    fake.app.router.routes[:0] = [
        Route("/backend-api/codex/responses", fake._responses, methods=["POST"]),
        Route("/backend-api/wham/accounts/check", accounts, methods=["GET"])]
    return fake


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("chatgpt")
    pki = make_pki(tmp / "pki")
    chatgpt = chatgpt_backend(FakeProvider(tls=pki.server, tool_calls=0))
    with FakeProvider(tls=pki.server, tool_calls=0) as llm, chatgpt:
        gw = make_gateway(tmp, llm.base_url, egress={
            "upstream_ca_file": str(pki.ca_cert),
            "chatgpt_hosts": [f"127.0.0.1:{chatgpt.port}"],
            "chatgpt_login": "meter",  # callers without a gateway token, and org beta
            "chatgpt_login_overrides": {"acme": "refuse", "gamma": "passthrough"}})
        gw.start()
        try:
            toks = {org: gw.issue_token(org=org) for org in ("acme", "beta", "gamma")}
            ca = tmp / "gateway-ca.pem"
            gw.cli("ca", "export", "--out", str(ca))
            yield Env(gw, pki, llm, chatgpt, ca, toks)
        finally:
            gw.stop()


CODEX_HEADERS = {"authorization": f"Bearer {JWT}", "chatgpt-account-id": ACCOUNT,
                 "originator": "codex_cli_rs", "session-id": "sess-chatgpt-1"}
BODY = {"model": "gpt-5.5", "input": [{"role": "user", "content": "hi"}], "stream": True,
        "store": False}


def _codex_call(c: httpx.Client, env: Env) -> httpx.Response:
    return c.post(f"{env.backend}/codex/responses", json=BODY, headers=CODEX_HEADERS)


def test_refuse_shows_our_message_and_bootstrap_calls_pass(env: Env) -> None:
    env.chatgpt.clear()
    before = len(env.gw.ledger())
    with env.client("acme") as c:
        boot = c.get(f"{env.backend}/wham/accounts/check", headers=CODEX_HEADERS)
        r = _codex_call(c, env)
    assert boot.status_code == 200 and ACCOUNT in boot.text
    (seen,) = env.chatgpt.requests  # only the bootstrap call, untouched
    assert seen.path == "/backend-api/wham/accounts/check"
    assert seen.header("authorization") == f"Bearer {JWT}"
    assert seen.header("proxy-authorization") is None
    # a 400 Codex prints at once, in OpenAI's format, without retrying (DESIGN §4)
    assert r.status_code == 400, r.text
    assert r.headers["x-should-retry"] == "false"
    err = r.json()["error"]
    assert err["code"] == "chatgpt_login_refused"
    assert err["message"].startswith("agent-egress: ChatGPT-login Codex traffic")
    assert "codex login --with-api-key" in err["message"]
    assert JWT not in r.text and env.tokens["acme"][0] not in r.text
    assert len(env.gw.wait_ledger(before, timeout=1)) == before  # no row for a refusal
    assert env.gw.metric("agent_egress_refusals_total", rule="chatgpt_login_refused") == 1


def test_meter_without_a_gateway_token_attributes_to_the_jwt_identity(env: Env) -> None:
    env.chatgpt.clear()
    before = len(env.gw.ledger())
    with env.client() as c:
        r = _codex_call(c, env)
    assert r.status_code == 200 and DEFAULT_ANSWER in r.text and "response.completed" in r.text
    (seen,) = env.chatgpt.requests  # the developer's own credential, not a vaulted key
    assert seen.path == "/backend-api/codex/responses"
    assert seen.header("authorization") == f"Bearer {JWT}"
    assert seen.header("chatgpt-account-id") == ACCOUNT
    assert PROVIDER_KEY not in json.dumps(seen.headers)
    assert env.llm.requests == []  # not rerouted
    (row,) = env.gw.wait_ledger(before + 1)[before:]
    assert row["billing"] == "subscription" and row["api"] == "chatgpt.codex"
    assert (row["org"], row["team"], row["user"], row["key_id"]) == (
        "chatgpt", "chatgpt", EMAIL, "chatgpt")
    assert row["provider"] == "chatgpt" and row["agent"] == "codex"
    assert row["session_id"] == "sess-chatgpt-1" and row["served_model"] == "gpt-5.5"
    assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"],
            row["reasoning_tokens"]) == (1200, 1000, 50, 20)
    assert row["cost_usd"] == CALL_USD and row["price_source"] == "genai-prices"
    assert row["tags"] == {"chatgpt_account": ACCOUNT, "chatgpt_user": "user-abc123",
                           "chatgpt_plan": "pro", "chatgpt_email": EMAIL}
    assert JWT not in json.dumps(row, default=str)
    assert JWT.split(".")[1] not in env.gw.logs()
    # counted like other calls, but its equivalent USD stays out of the cost counter
    # that the budget burn-rate alerts read
    assert env.gw.metric("agent_egress_model_calls_total", provider="chatgpt",
                  api="chatgpt.codex") >= 1
    assert env.gw.metric("agent_egress_tokens_total", provider="chatgpt") > 0
    assert env.gw.metric("agent_egress_cost_usd_total", provider="chatgpt") == 0


def test_meter_sends_a_websocket_upgrade_back_to_http(env: Env) -> None:
    """Codex answers a 403 on its upgrade by falling back to HTTP POST, which is metered."""
    env.chatgpt.clear()
    before = len(env.gw.ledger())
    ws = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
          "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
    with env.client() as c:
        r = c.get(f"{env.backend}/codex/responses", headers={**CODEX_HEADERS, **ws})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "chatgpt_websocket_not_metered"
    assert env.chatgpt.requests == []  # nothing reached the backend
    assert len(env.gw.wait_ledger(before, timeout=1)) == before
    assert JWT not in r.text


def test_meter_with_a_gateway_token_attributes_to_its_key_and_spend_splits(env: Env) -> None:
    env.chatgpt.clear()
    env.llm.clear()
    before = len(env.gw.ledger())
    token, key_id = env.tokens["beta"]
    with env.client("beta") as c:
        sub = _codex_call(c, env)
        # the same developer's gateway call, through the configured provider
        gw_call = c.post(f"{env.llm.base_url}/responses", json={**BODY, "stream": False})
    assert sub.status_code == 200 and gw_call.status_code == 200, gw_call.text
    assert token not in json.dumps(env.chatgpt.requests[0].headers)
    rows = env.gw.wait_ledger(before + 2)[before:]
    by_billing = {r["billing"]: r for r in rows}
    assert set(by_billing) == {"gateway", "subscription"}
    sub_row = by_billing["subscription"]
    assert (sub_row["org"], sub_row["user"], sub_row["key_id"]) == ("beta", "alice", key_id)
    assert sub_row["tags"]["chatgpt_account"] == ACCOUNT
    assert sub_row["cost_usd"] == CALL_USD
    split = json.loads(env.gw.cli("spend", "--by", "billing", "--format", "json").stdout)
    assert {s["billing"] for s in split} == {"gateway", "subscription"}
    subs = next(s for s in split if s["billing"] == "subscription")
    assert subs["calls"] == sum(r["billing"] == "subscription" for r in env.gw.ledger())


def test_passthrough_org_is_untouched_and_unrecorded(env: Env) -> None:
    env.chatgpt.clear()
    before = len(env.gw.ledger())
    with env.client("gamma") as c:
        r = _codex_call(c, env)
    assert r.status_code == 200 and DEFAULT_ANSWER in r.text
    assert env.chatgpt.requests[0].header("authorization") == f"Bearer {JWT}"
    assert len(env.gw.wait_ledger(before, timeout=1)) == before


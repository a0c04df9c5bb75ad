"""Egress proxy mode (issue 9, first part): selective TLS interception, proxy identity,
deny list and `agent-egress ca export`, with a real gateway process, real Codex and
TLS fake servers on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import CODEX, PROVIDER_KEY, Gateway, make_gateway
from fakeprovider import DEFAULT_ANSWER, FakeProvider
from tlsfake import Pki, cert_sha256, make_pki

from agent_egress.addon.cli_ca import check_ca_dir
from agent_egress.addon.egress import host_pattern, proxy_credential
from agent_egress.addon.policy import ConfigError


# pure parts -------------------------------------------------------------------
def test_host_pattern_matches_host_port_and_wildcards() -> None:
    import re

    rx = re.compile(host_pattern(["api.openai.com", "127.0.0.1:8443",
                                  "*.openai.azure.com"]) or "", re.I)
    assert rx.match("api.openai.com:443") and rx.match("API.OPENAI.COM:8443")
    assert rx.match("127.0.0.1:8443") and not rx.match("127.0.0.1:8444")
    assert rx.match("acme.openai.azure.com:443") and not rx.match("openai.azure.com:443")
    assert not rx.match("api.openai.com.evil.test:443") and not rx.match("xapi.openai.com:443")
    assert host_pattern([]) is None


def test_proxy_credential_forms() -> None:
    basic = "Basic " + base64.b64encode(b"dev:ae_TOKEN").decode()
    assert proxy_credential(basic) == "ae_TOKEN"
    assert proxy_credential("Basic " + base64.b64encode(b"ae_TOKEN:").decode()) == "ae_TOKEN"
    assert proxy_credential("Bearer ae_X") == "ae_X"
    assert proxy_credential("Basic !!!") is None
    assert proxy_credential("Digest x") is None and proxy_credential(None) is None


# a gateway in proxy mode, shared by the module -----------------------------------
@dataclass
class Env:
    gw: Gateway
    pki: Pki
    llm: FakeProvider  # TLS, a configured provider: intercepted
    other: FakeProvider  # TLS, not an LLM host: tunnelled
    plain: FakeProvider  # plain HTTP, not an LLM host
    token: str
    gateway_ca: Path

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.gw.proxy_port}"

    def proxy_with_token(self) -> str:
        return f"http://dev:{self.token}@127.0.0.1:{self.gw.proxy_port}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("egress")
    pki = make_pki(tmp / "pki")
    with (FakeProvider(tls=pki.server) as llm, FakeProvider(tls=pki.server) as other,
          FakeProvider() as plain):
        gw = make_gateway(tmp, llm.base_url,
                          egress={"upstream_ca_file": str(pki.ca_cert),
                                  "deny_hosts": ["blocked.example", "*.denied.example"]})
        gw.start()
        try:
            token, _ = gw.issue_token()
            ca = tmp / "gateway-ca.pem"
            gw.cli("ca", "export", "--out", str(ca))
            yield Env(gw, pki, llm, other, plain, token, ca)
        finally:
            gw.stop()


def _client(proxy: str, cafile: Path) -> httpx.Client:
    return httpx.Client(proxy=proxy, verify=ssl.create_default_context(cafile=str(cafile)),
                        timeout=10, trust_env=False)


BODY = {"model": "gpt-5.5", "input": "hi", "stream": False}


def test_ca_export_writes_the_gateway_ca_and_keeps_the_key_private(env: Env) -> None:
    confdir = env.gw.home / "mitmproxy"
    assert env.gateway_ca.read_bytes() == (confdir / "mitmproxy-ca-cert.pem").read_bytes()
    assert b"PRIVATE KEY" not in env.gateway_ca.read_bytes()
    assert (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o777 == 0o600
    assert confdir.stat().st_mode & 0o777 == 0o700
    stdout = env.gw.cli("ca", "export").stdout
    assert stdout.encode() == env.gateway_ca.read_bytes()


def test_no_token_on_an_intercepted_host_gets_407(env: Env) -> None:
    env.llm.clear()
    with _client(env.proxy, env.gateway_ca) as c:
        r = c.post(f"{env.llm.base_url}/responses", json=BODY)
        # an agent's own (non-gateway) API key is not an identity either
        r2 = c.post(f"{env.llm.base_url}/responses", json=BODY,
                    headers={"authorization": "Bearer sk-proj-developers-own-key"})
    for resp in (r, r2):
        assert resp.status_code == 407, resp.text
        assert resp.headers["proxy-authenticate"] == 'Basic realm="agent-egress"'
        assert "HTTPS_PROXY=http://user:<token>@" in resp.json()["error"]["message"]
        assert resp.json()["error"]["code"] == "proxy_auth_required"
    assert env.llm.requests == []


def test_token_as_api_key_is_swapped_for_the_vaulted_key(env: Env) -> None:
    env.llm.clear()
    before = len(env.gw.ledger())
    with _client(env.proxy, env.gateway_ca) as c:
        r = c.post(f"{env.llm.base_url}/responses", json=BODY,
                   headers={"authorization": f"Bearer {env.token}"})
    assert r.status_code == 200, r.text
    (rec,) = env.llm.requests
    assert rec.header("authorization") == f"Bearer {PROVIDER_KEY}"
    assert env.token not in repr(rec.headers)
    assert len(env.gw.wait_ledger(before + 1)) == before + 1


def test_non_llm_tls_host_is_tunnelled_with_the_clients_own_handshake(env: Env) -> None:
    env.other.clear()
    url = f"{env.other.base_url}/anything"
    # the client verifies the server's own certificate (test CA), not the gateway's
    with _client(env.proxy, env.pki.ca_cert) as c:
        with c.stream("GET", url) as r:
            stream = r.extensions["network_stream"]
            der = stream.get_extra_info("ssl_object").getpeercert(True)
            status = r.status_code
    assert status == 404  # the fake's own answer for an unknown path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    assert x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()) == \
        cert_sha256(env.pki.server_cert)
    (rec,) = env.other.requests
    assert rec.header("proxy-authorization") is None
    # trusting only the gateway's CA fails: nothing was decrypted on the way
    with _client(env.proxy, env.gateway_ca) as c, pytest.raises(httpx.ConnectError):
        c.get(url)


def test_deny_list_refuses_connect_and_plain_http(env: Env) -> None:
    with _client(env.proxy, env.pki.ca_cert) as c:
        r = c.get("http://blocked.example/x")
        assert r.status_code == 403 and "egress.deny_hosts" in r.text
        assert r.headers["content-type"].startswith("text/plain")
        with pytest.raises(httpx.ProxyError, match="403"):
            c.get("https://api.denied.example/")


def test_gateway_token_is_never_forwarded_to_a_non_llm_host(env: Env) -> None:
    env.plain.clear()
    with _client(env.proxy_with_token(), env.pki.ca_cert) as c:
        ok = c.get(f"{env.plain.base_url}/public")
        bad = c.get(f"{env.plain.base_url}/leak", headers={"authorization": f"Bearer {env.token}"})
    assert ok.status_code == 404  # reached the host, proxy credential stripped
    assert bad.status_code == 403 and bad.json()["error"]["code"] == "token_not_forwarded"
    assert env.token not in bad.text
    (rec,) = env.plain.requests
    assert rec.path.endswith("/public") and rec.header("proxy-authorization") is None


@pytest.mark.codex
def test_codex_through_https_proxy_is_metered_like_reverse_mode(
        env: Env, tmp_path: Path) -> None:
    env.llm.clear()
    before = len(env.gw.ledger())
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (codex_home / "config.toml").write_text(
        'model = "gpt-5.5"\nmodel_provider = "corp"\napproval_policy = "never"\n'
        'sandbox_mode = "workspace-write"\n[model_providers.corp]\nname = "corp"\n'
        f'base_url = "{env.llm.base_url}"\nenv_key = "CORP_API_KEY"\n'
        'wire_api = "responses"\n[analytics]\nenabled = false\n[features]\nplugins = false\n')
    run_env = {k: v for k, v in os.environ.items()
               if not k.upper().startswith(("OPENAI_", "CODEX_", "AGENT_EGRESS_", "HTTP_PROXY",
                                            "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                                            "SSL_CERT"))}
    run_env.update({"CODEX_HOME": str(codex_home), "RUST_LOG": "error",
                    "CORP_API_KEY": "sk-not-a-gateway-token",  # identity is the proxy's
                    "HTTPS_PROXY": env.proxy_with_token(),
                    "CODEX_CA_CERTIFICATE": str(env.gateway_ca)})
    res = subprocess.run([CODEX, "exec", "--skip-git-repo-check", "run the tool"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=work,
                         env=run_env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:] + env.gw.logs()[-3000:]
    assert DEFAULT_ANSWER in res.stdout
    calls = env.llm.requests_to("/v1/responses")
    assert [c.kind for c in calls] == ["tool_call", "answer"]
    for c in calls:
        assert c.header("authorization") == f"Bearer {PROVIDER_KEY}"
        assert c.header("proxy-authorization") is None
        assert env.token not in repr(c.headers) and "sk-not-a-gateway" not in repr(c.headers)
    rows = env.gw.wait_ledger(before + 2)[before:]
    assert len(rows) == 2
    assert {r["user"] for r in rows} == {"alice"} and {r["agent"] for r in rows} == {"codex"}
    assert all(r["input_tokens"] > 0 and r["cost_usd"] > 0 for r in rows)


# shared CA for replicas (issue 9 item 5) ------------------------------------------------
def _presented_ca_issuer(gw: Gateway, url: str, cafile: Path) -> bytes:
    """The issuer of the certificate a gateway presents for an intercepted host, verified
    against ``cafile`` only (so the request succeeds only if that CA signed it)."""
    from cryptography import x509

    token, _ = gw.issue_token()
    with httpx.Client(proxy=f"http://dev:{token}@127.0.0.1:{gw.proxy_port}", timeout=10,
                      verify=ssl.create_default_context(cafile=str(cafile)),
                      trust_env=False) as c, c.stream("POST", url, json=BODY) as r:
        der = r.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
        assert r.status_code == 200
    return x509.load_der_x509_certificate(der).issuer.public_bytes()


def test_replicas_with_one_ca_dir_present_the_same_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    shared = tmp_path / "shared-ca"  # stands in for a secret mounted in every replica
    with FakeProvider(tls=pki.server) as llm:
        gws = []
        for i in range(2):
            (tmp_path / f"replica{i}").mkdir()
            gws.append(make_gateway(tmp_path / f"replica{i}", llm.base_url, egress={
                "upstream_ca_file": str(pki.ca_cert), "ca_dir": str(shared)}))
        ca = tmp_path / "ca.pem"
        gws[0].cli("ca", "export", "--out", str(ca))  # creates the shared CA, once
        assert (shared / "mitmproxy-ca.pem").stat().st_mode & 0o777 == 0o600
        shared.chmod(0o500)  # read-only from here on, like a mounted secret
        try:
            assert gws[1].cli("ca", "export").stdout == ca.read_text()
            for gw in gws:
                gw.start()
            issuers = [_presented_ca_issuer(gw, f"{llm.base_url}/responses", ca) for gw in gws]
        finally:
            for gw in gws:
                if gw.proc is not None:
                    gw.stop()
            shared.chmod(0o700)
        for gw in gws:  # neither replica made a CA of its own
            assert not (gw.home / "mitmproxy" / "mitmproxy-ca.pem").exists()
    assert issuers[0] == issuers[1]


def test_a_shared_ca_dir_without_a_ca_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mitmproxy-ca\.pem is missing.*ca export"):
        check_ca_dir(tmp_path)


def test_a_ca_key_others_can_read_stops_the_gateway(tmp_path: Path) -> None:
    shared = tmp_path / "shared-ca"
    gw = make_gateway(tmp_path, "https://127.0.0.1:9/v1", egress={"ca_dir": str(shared)})
    gw.cli("ca", "export")
    (shared / "mitmproxy-ca.pem").chmod(0o640)
    res = gw.cli("run", check=False)
    assert res.returncode != 0
    assert "readable by group or others (mode 0640)" in res.stderr, res.stderr
    # export refuses it too: the key is the one thing that must stay private
    assert gw.cli("ca", "export", check=False).returncode != 0

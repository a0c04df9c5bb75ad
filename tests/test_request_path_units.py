"""Pure helpers of the request path, and hooks driven with mitmproxy's test tools."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import tflow

from agent_egress.addon import mitm_internals
from agent_egress.addon.call import METADATA_KEY
from agent_egress.addon.classify import Classify, agent_of, classify_path
from agent_egress.addon.cli import codex_snippet, parse_ttl
from agent_egress.addon.protocols.codex_headers import session_and_turn
from agent_egress.addon.route import upstream_path


@pytest.mark.parametrize(("method", "path", "api"), [
    ("POST", "/v1/responses", "openai.responses"),
    ("POST", "/responses", "openai.responses"),
    ("POST", "/v1/responses?x=1", "openai.responses"),
    ("POST", "/v1/responses/compact", "openai.responses.compact"),
    ("POST", "/v1/chat/completions", "openai.chat"),
    ("post", "/v1/chat/completions/", "openai.chat"),
    ("GET", "/v1/responses", None),
    ("POST", "/v1/embeddings", None),
    ("POST", "/v2/responses", None),
])
def test_classify_path(method: str, path: str, api: str | None) -> None:
    assert classify_path(method, path) == api


@pytest.mark.parametrize(("prefix", "path", "out"), [
    ("/v1", "/v1/responses", "/v1/responses"),
    ("/openai/v1", "/v1/responses?a=b", "/openai/v1/responses?a=b"),
    ("", "/v1/chat/completions", "/chat/completions"),
    ("/v1", "/responses/compact", "/v1/responses/compact"),
])
def test_upstream_path(prefix: str, path: str, out: str) -> None:
    assert upstream_path(prefix, path) == out


def test_session_and_turn_sources() -> None:
    hdrs = {"session-id": "S1", "x-codex-turn-metadata": json.dumps({"turn_id": "T1"})}
    assert session_and_turn(hdrs.get, "pck", "cm") == ("S1", "T1")
    assert session_and_turn({}.get, "pck", "cm") == ("pck", None)
    assert session_and_turn({}.get, None, "cm") == ("cm", None)
    bad = {"x-codex-turn-metadata": "{not json"}
    assert session_and_turn(bad.get, None, None) == (None, None)
    long = {"session-id": "x" * 500}
    assert session_and_turn(long.get, None, None)[0] == "x" * 128


def test_parse_ttl() -> None:
    assert parse_ttl("30d") == timedelta(days=30)
    assert parse_ttl("12h") == timedelta(hours=12)
    assert parse_ttl("2w") == timedelta(weeks=2)
    assert parse_ttl("never") is None
    with pytest.raises(Exception, match="bad --ttl"):
        parse_ttl("30 days")


def test_codex_snippet_is_valid_toml() -> None:
    import tomllib
    cfg = tomllib.loads(codex_snippet("http://gw:8787/v1"))
    prov = cfg["model_providers"][cfg["model_provider"]]
    assert prov == {"name": "agent-egress", "base_url": "http://gw:8787/v1",
                    "env_key": "AGENT_EGRESS_TOKEN", "wire_api": "responses"}


def test_classify_refuses_unknown_path_and_oversized_body() -> None:
    c = Classify({("api.openai.com", 443)}, max_body_bytes=10)
    f = tflow.tflow()
    f.request.host, f.request.port = "api.openai.com", 443
    f.request.method, f.request.path = "GET", "/v1/files"
    c.requestheaders(f)
    assert f.response is not None and f.response.status_code == 404
    assert json.loads(f.response.content or b"")["error"]["code"] == "unknown_path"

    f = tflow.tflow()
    f.request.host, f.request.port = "api.openai.com", 443
    f.request.method, f.request.path = "POST", "/v1/responses"
    f.request.headers["content-length"] = "11"
    c.requestheaders(f)
    assert f.response is not None and f.response.status_code == 413
    assert METADATA_KEY in f.metadata


def test_classify_leaves_other_hosts_alone_on_the_proxy_listener() -> None:
    c = Classify({("api.openai.com", 443)}, max_body_bytes=10)
    f = tflow.tflow()
    f.request.host, f.request.port, f.request.path = "github.com", 443, "/v1/responses"
    c.requestheaders(f)
    assert f.response is None and METADATA_KEY not in f.metadata
    f = tflow.tflow()  # same host, another port: not the provider either
    f.request.host, f.request.port, f.request.path = "api.openai.com", 8443, "/v1/responses"
    c.requestheaders(f)
    assert f.response is None and METADATA_KEY not in f.metadata


def test_json_error_page_replaces_mitmproxy_html() -> None:
    mitm_internals.install()
    assert mitm_internals.installed()
    raw = _http1.make_error_response(502, "Connection refused")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == "gateway_error" and "Connection refused" in err["message"]
    # A body prepared by our error hook (same task) wins and is used once.
    mitm_internals.pending_error.set(("req_abc", b'{"error": {"message": "ours"}}'))
    head, _, body = _http1.make_error_response(502, "x").partition(b"\r\n\r\n")
    assert body == b'{"error": {"message": "ours"}}' and b"req_abc" in head
    assert b"ours" not in _http1.make_error_response(502, "x")


def test_agent_label_is_bounded() -> None:
    assert agent_of("codex_exec", "codex_exec/0.169.0 (Linux)") == "codex"
    assert agent_of("codex_cli_rs", None) == "codex"
    assert agent_of(None, "claude-cli/2.1.197 (external, sdk-cli)") == "claude-code"
    assert agent_of(None, "python-httpx/0.28") == "other"
    assert agent_of("my-agent-" + "x" * 500, "anything") == "other"

"""Hostile requests against a real gateway process (issue 12.2): each gets a clear error in
the client's own format and the gateway stays up (a normal call succeeds after each).

One gateway (``agent-egress run``) serves every case, in front of a fake OpenAI and a
fake Anthropic provider. A third server, ``evil``, is where a client tries to send the
gateway; it must never see a request. Shapes HTTP clients refuse to send (smuggling,
control characters, HTTP/2 prefaces, absolute-form URIs) go over raw sockets.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import Gateway
from fakeanthropic import FakeAnthropic
from fakeprovider import FakeProvider
from test_claude_e2e import claude_gateway

CAP = 1024 * 1024
"""limits.max_body_bytes for this gateway (the 100k-level nesting cases fit under it)."""
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
OK_BODY = {RESPONSES: {"model": "gpt-5.5", "input": "hi", "stream": False},
           MESSAGES: {"model": "claude-sonnet-4-5", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]}}


@dataclass
class Env:
    gw: Gateway
    fake: FakeProvider
    anthropic: FakeAnthropic
    evil: FakeProvider
    token: str

    def auth(self, path: str) -> dict[str, str]:
        return ({"x-api-key": self.token, "anthropic-version": "2023-06-01"} if path == MESSAGES
                else {"authorization": f"Bearer {self.token}"})

    def upstream_count(self) -> int:
        return len(self.fake.requests) + len(self.anthropic.requests)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with ExitStack() as stack:
        fake = stack.enter_context(FakeProvider())
        evil = stack.enter_context(FakeProvider())
        fa = stack.enter_context(FakeAnthropic())
        gw = claude_gateway(tmp_path_factory.mktemp("hostile"), fake, fa,
                            limits={"max_body_bytes": CAP})
        gw.start()
        stack.callback(gw.stop)
        token, _ = gw.issue_token()
        yield Env(gw, fake, fa, evil, token)


@pytest.fixture(autouse=True)
def stays_up(env: Env) -> Iterator[None]:
    """After every case: the process lives, both APIs answer, evil saw nothing."""
    yield
    assert env.gw.proc is not None and env.gw.proc.poll() is None, env.gw.logs()[-3000:]
    for path in (RESPONSES, MESSAGES):
        r = httpx.post(f"http://127.0.0.1:{env.gw.reverse_port}{path}", json=OK_BODY[path],
                       headers=env.auth(path), timeout=30)
        assert r.status_code == 200, (path, r.text)
    assert env.evil.requests == []


# --- helpers -----------------------------------------------------------------------------
def post(env: Env, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{env.gw.reverse_port}{path}", content=body,
                      headers={"content-type": "application/json", **env.auth(path), **headers},
                      timeout=30)


def assert_client_error(status: int, body: bytes, path: str, expect: int | None = None) -> dict[
        str, Any]:
    """A refusal in the format of the API the client called, naming the gateway."""
    obj = json.loads(body)
    if path == MESSAGES:  # Claude Code shows a 400's message (DESIGN §4)
        assert obj["type"] == "error" and obj["error"]["type"], obj
        assert 400 <= status < 500 if expect is None else status == (
            400 if 400 <= expect < 500 and expect != 429 else expect), (status, obj)
    else:
        assert set(obj["error"]) >= {"message", "type", "code", "param"}, obj
        assert expect is None or status == expect, (status, obj)
    assert obj["error"]["message"].startswith("agent-egress: "), obj
    return obj  # type: ignore[no-any-return]


@dataclass
class Raw:
    status: int | None
    headers: dict[str, str]
    body: bytes
    data: bytes
    """Everything the server sent before closing (or going quiet)."""


def raw(port: int, data: bytes, quiet: float = 1.5, limit: float = 20) -> Raw:
    """Send bytes as they are; read until the server closes or is quiet for ``quiet`` s."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + limit
        s.settimeout(quiet)
        while time.monotonic() < deadline:
            try:
                part = s.recv(65536)
            except TimeoutError:
                if got:
                    break
                continue
            except ConnectionResetError:
                break
            if not part:
                break
            got += part
    head, _, rest = got.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 "):
        return Raw(None, {}, b"", got)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.decode().strip().lower()] = v.decode().strip()
    n = int(headers.get("content-length", len(rest)))
    return Raw(int(lines[0].split()[1]), headers, rest[:n], got)


def request_bytes(env: Env, path: str = RESPONSES, body: bytes | None = None,
                  target: str | None = None, extra: str = "", host: str | None = None,
                  framing: str | None = None) -> bytes:
    """An HTTP/1.1 request with the token; ``framing`` replaces the Content-Length line."""
    body = json.dumps(OK_BODY[path]).encode() if body is None else body
    auth = "".join(f"{k}: {v}\r\n" for k, v in env.auth(path).items())
    framing = f"Content-Length: {len(body)}\r\n" if framing is None else framing
    return (f"POST {target or path} HTTP/1.1\r\nHost: {host or '127.0.0.1'}\r\n{auth}"
            f"Content-Type: application/json\r\n{extra}{framing}\r\n").encode() + body


# --- bodies ---------------------------------------------------------------------------
BAD_BODIES = {
    "malformed_json": b'{"model": "gpt-5.5", "input": [',
    "not_an_object": b'[{"model": "gpt-5.5"}]',
    "nested_array_100k": b"[" * 100_000 + b"]" * 100_000,
    "nested_object_100k": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "nested_inside_input_100k": (b'{"model":"gpt-5.5","messages":' + b"[" * 100_000
                                 + b"]" * 100_000 + b',"input":' + b"[" * 100_000
                                 + b"]" * 100_000 + b"}"),
    "invalid_utf8": b'{"model": "gpt-5.5\xff\xfe", "input": "\xc3\x28"}',
    "lone_surrogate_escape": b'{"model": "\\ud800", "input": "hi", "messages": []}',
    "nan_model": b'{"model": NaN, "input": "hi", "messages": []}',
    "empty": b"",
    "nul_bytes": b"\x00" * 64,
}


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_bodies_get_a_400_in_the_clients_format(env: Env, path: str, case: str) -> None:
    before = env.upstream_count()
    r = post(env, path, BAD_BODIES[case])
    assert_client_error(r.status_code, r.content, path, 400)
    assert env.upstream_count() == before


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_hostile_type_tags_are_still_scanned_or_refused(env: Env, path: str) -> None:
    """``type`` as a list or object (unhashable): parsed and forwarded, never a crash."""
    body: dict[str, Any] = dict(OK_BODY[path])
    if path == RESPONSES:
        body["input"] = [{"type": [], "role": "user", "content": [{"type": {}, "text": "x"}]}]
    else:
        body["messages"] = [{"role": "user", "content": [{"type": [], "text": "x"}]}]
    # nested deep in a header the gateway parses (only the Anthropic fake ignores it)
    deep = {"x-codex-turn-metadata": '{"turn_id":' * 5000 + "1" + "}" * 5000,
            "x-claude-code-session-id": "s"} if path == MESSAGES else {}
    r = post(env, path, json.dumps(body).encode(), **deep)
    assert r.status_code == 200, r.text


def test_undecodable_ids_do_not_poison_the_ledger_or_metrics(env: Env) -> None:
    """A header byte that is not UTF-8 (mitmproxy keeps it as a lone surrogate) or a JSON
    ``\\udcff`` escape used to reach the ledger and the metrics: every later ledger
    write and /metrics scrape then failed."""
    rows = len(env.gw.ledger())
    body = json.dumps({"model": "gpt-5.5", "input": "hi", "stream": False,
                       "prompt_cache_key": "k\udcff"}).encode()
    for data in (request_bytes(env, extra="session-id: s@x\r\n").replace(b"s@x", b"s\xffx"),
                 request_bytes(env, body=body)):
        res = raw(env.gw.reverse_port, data)
        assert res.status == 200, res.data[:300]
    assert len(env.gw.wait_ledger(rows + 2)) >= rows + 2
    assert httpx.get(f"{env.gw.admin_url}/metrics", timeout=10).status_code == 200


# --- size cap -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_body_over_the_cap_with_content_length(env: Env, path: str) -> None:
    before = env.upstream_count()
    r = post(env, path, b" " * (CAP + 1))
    obj = assert_client_error(r.status_code, r.content, path, 413)
    assert r.headers["x-egress-refused-by"] == "body_too_large"
    assert f"{CAP} bytes (limits.max_body_bytes)" in obj["error"]["message"]
    assert env.upstream_count() == before


def test_declared_length_over_the_cap_is_refused_before_the_body(env: Env) -> None:
    """Content-Length of 10 GB and no body sent: the 413 comes at once, nothing is read."""
    res = raw(env.gw.reverse_port, request_bytes(env, body=b"",
                                                 framing="Content-Length: 10000000000\r\n"))
    assert res.status == 413, res.data[:500]
    assert_client_error(res.status, res.body, RESPONSES, 413)
    assert res.headers.get("connection") == "close"


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_chunked_body_over_the_cap(env: Env, path: str) -> None:
    before = env.upstream_count()
    chunk = b" " * 65536
    n = CAP // len(chunk) + 2
    body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * n + b"0\r\n\r\n"
    res = raw(env.gw.reverse_port, request_bytes(env, path, body=body,
                                                 framing="Transfer-Encoding: chunked\r\n"))
    assert res.status is not None, res.data[:300]
    obj = assert_client_error(res.status, res.body, path, 413)
    assert f"{CAP} bytes (limits.max_body_bytes)" in obj["error"]["message"]
    assert env.upstream_count() == before


@pytest.mark.parametrize("length", ["-1", "1e9", "0x10", "5, 6", "+5", " "])
def test_invalid_content_length(env: Env, length: str) -> None:
    res = raw(env.gw.reverse_port, request_bytes(env, body=b"{}",
                                                 framing=f"Content-Length: {length}\r\n"))
    assert res.status == 400, res.data[:300]
    assert json.loads(res.body)["error"]["message"].startswith("agent-egress: ")


# --- tag headers ----------------------------------------------------------------------------
CONTROL = "\x1b[31mPWNED\x07"
TAG_CASES = {
    "escape_in_value": f"X-Egress-Tag-Project: {CONTROL}\r\n",
    "nul_in_value": "X-Egress-Tag-Project: a\x00PWNED\r\n",
    "del_in_value": "X-Egress-Tag-Project: a\x7fPWNED\r\n",
    "obs_fold_value": "X-Egress-Tag-Project: a\r\n PWNED\r\n",
    "cr_in_value": "X-Egress-Tag-Project: a\rPWNED\r\n",
    "escape_in_name": f"X-Egress-Tag-{CONTROL}: v\r\n",
    "too_long": "X-Egress-Tag-Project: " + "PWNED" * 40 + "\r\n",
    "bad_name": "X-Egress-Tag-PWNED!: v\r\n",
}
ECHOED_NAME = {"bad_name", "escape_in_name"}
"""The refusal names the bad header (printable, JSON-escaped); never a value."""


@pytest.mark.parametrize("case", sorted(TAG_CASES))
def test_tag_headers_with_control_characters(env: Env, case: str) -> None:
    before = env.upstream_count()
    res = raw(env.gw.reverse_port, request_bytes(env, extra=TAG_CASES[case]))
    assert res.status == 400, res.data[:500]
    obj = json.loads(res.body)
    assert obj["error"]["message"].startswith("agent-egress: ")
    # the value is never echoed, and no control character reaches the body or a header
    assert b"PWNED" not in res.data or case in ECHOED_NAME
    assert not any(c in res.data for c in (b"\x1b", b"\x00", b"\x07", b"\x7f"))
    assert env.upstream_count() == before
    log = env.gw.logs()
    assert "\x1b" not in log and "\x00" not in log and "\x07" not in log


# --- paths ----------------------------------------------------------------------------------
PATHS = ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/responses/../../metrics", "//v1/responses",
         "/v1//responses", "/v1/responses%00", "/v1/responses/..;/x", "/v1/%2e%2e/v1/responses",
         "/admin/keys", "/healthz", "/metrics", "/v1/responses/%2e%2e/%2e%2e/healthz",
         "/..%2f..%2fetc/passwd", "*"]


@pytest.mark.parametrize("target", PATHS)
def test_path_traversal_is_a_404(env: Env, target: str) -> None:
    before = env.upstream_count()
    res = raw(env.gw.reverse_port, request_bytes(env, target=target))
    assert res.status in (400, 404), res.data[:300]
    obj = json.loads(res.body)
    assert obj["error"]["message"].startswith("agent-egress: ")
    assert env.upstream_count() == before


# --- HTTP/2 -------------------------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.mark.parametrize("listener", ["reverse", "proxy"])
def test_http2_prior_knowledge_is_refused(env: Env, listener: str) -> None:
    port = env.gw.reverse_port if listener == "reverse" else env.gw.proxy_port
    before = env.upstream_count()
    res = raw(port, PREFACE + SETTINGS)
    # never an HTTP/2 frame back: an HTTP/1.1 error, or the connection closed
    assert res.data == b"" or res.data.startswith(b"HTTP/1.1 4"), res.data[:200]
    if res.status is not None:
        assert json.loads(res.body)["error"]["message"].startswith("agent-egress: ")
    assert env.upstream_count() == before


def test_h2c_upgrade_is_not_taken(env: Env) -> None:
    before = len(env.fake.requests)
    extra = ("Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
             "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
    res = raw(env.gw.reverse_port, request_bytes(env, extra=extra))
    assert res.status == 200, res.data[:300]  # answered over HTTP/1.1, no 101
    got = env.fake.requests[before:]
    assert len(got) == 1 and got[0].header("upgrade") is None
    assert got[0].header("http2-settings") is None


# --- request smuggling ------------------------------------------------------------------------
def smuggled(env: Env) -> bytes:
    """A second, complete request hidden in the first one's body."""
    return request_bytes(env, target="/v1/responses?smuggled=1")


def smuggling_cases(env: Env) -> dict[str, bytes]:
    inner = smuggled(env)
    chunked = b"0\r\n\r\n" + inner
    te_cl = b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
    return {
        "cl_te": request_bytes(env, body=chunked, framing=(
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n")),
        "te_cl": request_bytes(env, body=te_cl, framing=(
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n")),
        "duplicate_cl": request_bytes(env, body=b"{}" + inner, framing=(
            f"Content-Length: 2\r\nContent-Length: {2 + len(inner)}\r\n")),
        "te_obfuscated": request_bytes(env, body=chunked, framing=(
            "Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n")),
        "te_list": request_bytes(env, body=chunked, framing=(
            "Content-Length: 5\r\nTransfer-Encoding: chunked, identity\r\n")),
        "te_obs_fold": request_bytes(env, body=chunked, framing=(
            "Content-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n")),
        "cl_obs_fold": request_bytes(env, body=b"{}" + inner, framing=(
            "Content-Length: 2\r\n 0\r\n")),
        "te_space_before_colon": request_bytes(env, body=chunked, framing=(
            "Content-Length: 5\r\nTransfer-Encoding : chunked\r\n")),
    }


CASES = ["cl_te", "te_cl", "duplicate_cl", "te_obfuscated", "te_list", "te_obs_fold",
         "cl_obs_fold", "te_space_before_colon"]


@pytest.mark.parametrize("listener", ["reverse", "proxy"])
@pytest.mark.parametrize("case", CASES)
def test_request_smuggling_shapes(env: Env, case: str, listener: str) -> None:
    data = smuggling_cases(env)[case]
    port = env.gw.reverse_port
    if listener == "proxy":  # absolute-form to the provider: the proxy path classifies it
        netloc = env.fake.base_url.split("/")[2]
        data = data.replace(b"POST /v1/responses HTTP/1.1", f"POST http://{netloc}/v1/"
                            "responses HTTP/1.1".encode(), 1)
        port = env.gw.proxy_port
    res = raw(port, data)
    time.sleep(0.3)  # a smuggled request would reach the fake by now
    assert not [r for r in env.fake.requests if "smuggled" in r.query]
    assert res.status is not None and 400 <= res.status < 500, res.data[:400]
    assert json.loads(res.body)["error"]["message"].startswith("agent-egress: ")
    assert res.data.count(b"HTTP/1.1 ") == 1  # one response, never a second for the inner one


# --- choosing the upstream --------------------------------------------------------------------
def test_client_cannot_pick_the_upstream_in_reverse_mode(env: Env) -> None:
    evil = env.evil.base_url.split("/")[2]
    fake = env.fake.base_url.split("/")[2]
    attempts = {
        "host": request_bytes(env, host=evil),
        "absolute_form": request_bytes(env, target=f"http://{evil}/v1/responses", host=evil),
        "x_forwarded_host": request_bytes(env, extra=f"X-Forwarded-Host: {evil}\r\n"
                                                     f"Forwarded: host={evil}\r\n"
                                                     "X-Forwarded-Proto: http\r\n"),
        "connect": f"CONNECT {evil} HTTP/1.1\r\nHost: {evil}\r\n\r\n".encode(),
    }
    for name, data in attempts.items():
        before = len(env.fake.requests)
        res = raw(env.gw.reverse_port, data)
        assert res.status is not None, (name, res.data[:200])
        if res.status == 200:
            got = env.fake.requests[before:]
            assert len(got) == 1 and got[0].header("host") == fake, (name, got)
        else:
            assert 400 <= res.status < 500, (name, res.data[:300])
            assert res.body.startswith(b"{"), (name, res.data[:300])
            assert json.loads(res.body)["error"]["message"].startswith("agent-egress: ")
        assert env.evil.requests == [], name


def test_bare_lf_in_a_tag_header_ends_the_line(env: Env) -> None:
    """mitmproxy accepts a bare LF as a line end: two headers, the tag is valid and
    stripped, nothing of it goes upstream with a raw control character."""
    before = len(env.fake.requests)
    res = raw(env.gw.reverse_port, request_bytes(
        env, extra="X-Egress-Tag-Project: atlas\nX-Other: 1\r\n"))
    assert res.status == 200, res.data[:300]
    got = env.fake.requests[before:]
    assert len(got) == 1 and got[0].header("x-egress-tag-project") is None
    assert all("\n" not in v and "\r" not in v for _, v in got[0].headers)


def test_gateway_log_holds_no_raw_control_characters(env: Env) -> None:
    """After the whole matrix (this runs last in the module)."""
    log = env.gw.logs()
    assert not any(c in log for c in ("\x1b", "\x00", "\x07", "\x7f")), log[-2000:]



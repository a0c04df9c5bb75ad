"""Secrets never leak: canary provider keys and gateway tokens pushed through every path a
call can take (success streamed and not, every refusal, upstream errors that echo the key,
an unreachable provider, a hook that crashes), with debug logging on, then searched for
in everything the gateway writes or answers.

tests/test_gateway_http.py::test_no_secret_in_logs_bodies_or_ledger covers bad tokens,
a malformed body and the CLI's own output at the default log level; this sweep adds the
paths and the sinks it does not have (debug log, mitmproxy's event log, spans, metrics,
every file of the state directory, every table row).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import AGENT_EGRESS, PROVIDER_KEY, free_port, make_gateway
from fakeprovider import FakeError, FakeProvider
from otlp_receiver import OTLPReceiver

from agent_egress.addon import tokens

CRASH = "CRASH-THE-CLASSIFIER"
CLASSIFIER = f'''
def score(text, direction):
    if "{CRASH}" in text:  # a classifier library that puts its input in its error
        raise RuntimeError("classifier backend refused input: " + text[-400:])
    return None
'''


def _haystack_of_dir(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
            if p.is_file()}


def _sqlite_rows(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return "\n".join(conn.iterdump())


def _canaries(secrets: dict[str, str]) -> dict[str, str]:
    """Each secret and its distinctive middle (a leak may drop a prefix or get cut)."""
    out = dict(secrets)
    for name, value in secrets.items():
        out[f"{name} (middle)"] = value[6:26]
    return out


def test_no_canary_in_any_sink_on_any_path(tmp_path: Path, fake: FakeProvider) -> None:
    rx = OTLPReceiver()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "crashclf.py").write_text(CLASSIFIER)
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connection refused
    gw = make_gateway(
        tmp_path, fake.base_url, log_level="debug",
        providers=[{"name": "openai", "kind": "openai", "base_url": fake.base_url,
                    "key": "openai"},
                   {"name": "dead", "kind": "openai", "base_url": dead, "key": "openai"}],
        routes=[{"model": "dead-*", "providers": ["dead"]}],
        telemetry={"traces": {"exporter": "otlp-http", "endpoint": rx.endpoint,
                              "capture_content": True}},
        guardrails={"default": {
            "injection": {"classifier": "crashclf:score"},
            "custom": [{"name": "no-project-x", "keywords": ["project-x-secret"],
                        "action": "block"}]}},
        budgets={"teams": {"acme/broke": [{"period": "monthly", "usd": "0.000001"}]}})
    gw.env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(plugins), gw.env.get("PYTHONPATH")) if p)
    gw.start()
    fake.tool_calls = 0
    good, _ = gw.issue_token()  # the CLI (root) makes acme/payments/alice
    admin = json.loads(gw.cli("admin-token", "issue", "--role", "org-admin", "--org", "acme",
                              "--format", "json").stdout)["token"]

    def admin_api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The other tokens come from the gateway's admin API: its (debug) log and audit
        see them too, and it spares a CLI process start (~1 s) per token."""
        r = httpx.request(method, f"{gw.admin_url}/v1{path}", json=body, timeout=30,
                          headers={"authorization": f"Bearer {admin}"})
        assert r.status_code in (200, 201), (path, r.status_code, r.text)
        return r.json()

    (payments,) = admin_api("GET", "/teams")  # made with alice by the CLI above
    teams = {"payments": payments["id"], "broke": admin_api(
        "POST", f"/orgs/{payments['org_id']}/teams", {"name": "broke"})["id"]}

    def issue(user: str, team: str = "payments", **scope: Any) -> tuple[str, str]:
        user_id = admin_api("POST", f"/teams/{teams[team]}/users", {"name": user})["id"]
        out = admin_api("POST", f"/users/{user_id}/keys", {"ttl_days": 30, **scope})
        return out["token"], out["key"]["id"]

    revoked, revoked_id = issue("mallory")
    broke, _ = issue("pat", team="broke")
    narrow, _ = issue("nina", models=["gpt-4*"])
    pasted, _ = issue("quinn")  # a developer pastes a token into a prompt
    never_issued = tokens.generate_token()
    admin_api("POST", f"/keys/{revoked_id}/revoke")
    answers: list[str] = []

    def call(path: str, body: Any, headers: dict[str, str], expect: int | None = None,
             **kw: Any) -> httpx.Response:
        url = f"{gw.base_url}{path}"
        r = httpx.post(url, headers=headers, timeout=30, **(
            {"content": body} if isinstance(body, bytes) else {"json": body}), **kw)
        answers.append(f"{r.status_code} {json.dumps(dict(r.headers))}\n{r.text}")
        if expect is not None:
            assert r.status_code == expect, (path, headers.keys(), r.status_code, r.text)
        return r

    def bearer(t: str) -> dict[str, str]:
        return {"authorization": f"Bearer {t}"}

    def body(text: str = "hi", model: str = "gpt-5.5", stream: bool = False) -> dict[str, Any]:
        return {"model": model, "input": text, "stream": stream}

    try:
        # success: SSE and JSON, Responses and Chat
        sse = call("/responses", body(stream=True), bearer(good), 200)
        assert "response.completed" in sse.text
        call("/responses", body(), bearer(good), 200)
        call("/chat/completions", {"model": "gpt-5.5", "stream": True,
                                   "stream_options": {"include_usage": True},
                                   "messages": [{"role": "user", "content": "hi"}]},
             bearer(good), 200)
        # refusals: unknown, bad checksum, revoked, provider key as credential, x-api-key,
        # scope, custom guardrail, secret guardrail (the token pasted in a prompt), budget
        call("/responses", body(), bearer(never_issued), 401)
        call("/responses", body(), bearer(good[:-1] + ("x" if good[-1] != "x" else "y")), 401)
        call("/responses", body(), bearer(revoked), 401)
        call("/responses", body(), bearer(PROVIDER_KEY), 401)
        call("/responses", body(), {"x-api-key": good}, 401)
        call("/responses", body(), bearer(narrow), 403)
        call("/responses", body("tell me the project-x-secret"), bearer(good), 400)
        call("/responses", body(f"my token is {pasted} and key {PROVIDER_KEY}"), bearer(good),
             400)
        call("/responses", body(), bearer(broke), 400)
        call("/responses", b'{"model": "gpt-5.5", "input": "' + never_issued.encode(),
             bearer(good), 400)
        # upstream errors: a 500, and a 401 that echoes the key the provider received
        fake.fail_next = [FakeError(500, message="upstream exploded"),
                          FakeError(401, message=f"Incorrect API key provided: {PROVIDER_KEY}."
                                    " You can find your API key at https://example.invalid")]
        call("/responses", body(), bearer(good))
        call("/responses", body(stream=True), bearer(good))
        call("/responses", body(model="dead-model"), bearer(good))  # connection refused
        # a hook that raises (fail closed), with secrets in the exception's message
        crash = call("/responses", body(f"{CRASH} {pasted} {PROVIDER_KEY}"), bearer(good))
        assert crash.status_code in (400, 503), crash.text
        # admin API: a wrong admin token, a good one
        for t in (never_issued, admin, PROVIDER_KEY):
            r = httpx.get(f"{gw.admin_url}/v1/keys", headers=bearer(t), timeout=30)
            answers.append(f"{r.status_code} {json.dumps(dict(r.headers))}\n{r.text}")
        metrics = httpx.get(f"{gw.admin_url}/metrics", timeout=30).text
        gw.wait_ledger(5)
        assert gw.stop() == 0
    finally:
        gw.stop()
    assert rx.wait_for(lambda spans: any(s.name.startswith("chat ") for s in spans), 10)

    log = gw.logs()
    assert "DEBUG" in log and " mitmproxy" in log, "debug logging (ours and mitmproxy's) ran"
    assert "fail" in log.lower() and "classifier backend refused input" in log, (
        "the crash path was taken and logged")
    sinks: dict[str, str] = {
        "gateway stdout/stderr (debug, incl. mitmproxy)": log,
        "answers to the client": "\n".join(answers),
        "OTLP spans": "\n".join(repr(s) for s in rx.spans),
        "/metrics": metrics,
        "ledger rows (every table)": _sqlite_rows(gw.home / "agent-egress.db"),
    }
    for name, data in _haystack_of_dir(gw.home).items():
        sinks[f"file {name}"] = data.decode("latin-1")
    secrets = _canaries({"provider key": PROVIDER_KEY, "gateway token": good,
                         "revoked token": revoked, "budget-less token": broke,
                         "scoped token": narrow, "token pasted in a prompt": pasted,
                         "admin token": admin, "never issued token": never_issued})
    leaks = [(secret, sink) for sink, text in sinks.items()
             for secret, value in secrets.items() if value in text]
    print(f"\nleak sweep: {len(answers)} answers, {len(sinks)} sinks, {len(secrets)} canaries"
          f" ({len(rx.spans)} spans, {len(log.splitlines())} log lines): {len(leaks)} leaks")
    assert not leaks, leaks
    assert "audit.jsonl" in " ".join(sinks) and any("agent-egress.db" in s for s in sinks)
    assert [q.header("authorization") for q in fake.requests] == [
        f"Bearer {PROVIDER_KEY}"] * len(fake.requests)


def test_tracebacks_and_stack_info_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """A traceback is formatted after the filters ran: the filter must format it itself."""
    import logging

    from agent_egress.addon.logs import install_redaction
    token = tokens.generate_token()
    logger = logging.getLogger("agent_egress.test_leaks")
    handler = logging.StreamHandler()
    logging.getLogger().addHandler(handler)
    try:
        install_redaction(None)
        try:
            raise RuntimeError(f"backend refused input: {token}")
        except RuntimeError:
            logger.exception("hook failed for %s", token)
        logger.error("with stack", stack_info=True, extra={})
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "backend refused input: aeg_…[redacted]" in err and "Traceback" in err
    assert token not in err


def test_vault_ca_key_and_state_dir_are_private(tmp_path: Path, fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url)
    gw.start()
    try:
        gw.issue_token()
    finally:
        gw.stop()
    home = gw.home
    mode = stat.S_IMODE
    assert mode(home.stat().st_mode) == 0o700
    for name in ("vault.json", "master.key"):
        assert mode((home / name).stat().st_mode) == 0o600, name
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca.p12"):  # the CA's private key
        assert mode((home / "mitmproxy" / name).stat().st_mode) == 0o600, name
    assert mode((home / "mitmproxy").stat().st_mode) == 0o700


LOOSE_MODES = (0o755, 0o750, 0o701, 0o770, 0o707)


def _who(mode: int) -> str:
    return " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if mode & bits)


def test_gateway_refuses_a_state_dir_others_can_use(tmp_path: Path,
                                                    fake: FakeProvider) -> None:
    """End to end, for the commonest loose mode (umask 022): `agent-egress run` refuses,
    with the very message of state_dir.ensure_private (the first thing gateway.start
    does; every loose mode goes through it below), and starts once the fix is applied."""
    from agent_egress.addon.state_dir import StateDirError, ensure_private
    gw = make_gateway(tmp_path, fake.base_url)  # vault set: the home holds secrets now
    gw.home.chmod(0o755)
    res = subprocess.run([AGENT_EGRESS, "run"], env=gw.env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"chmod 700 {gw.home}" in res.stderr and "accessible by" in res.stderr, res.stderr
    with pytest.raises(StateDirError) as refused:
        ensure_private(gw.home)
    assert f"agent-egress: {refused.value}" in res.stderr, res.stderr
    gw.home.chmod(0o700)
    gw.start()  # the fix named is the fix
    gw.stop()


@pytest.mark.parametrize("loose", LOOSE_MODES)
def test_every_loose_mode_is_refused_naming_the_fix(tmp_path: Path, loose: int) -> None:
    """The check `agent-egress run` makes (above), for each way others can get in."""
    from agent_egress.addon.state_dir import StateDirError, ensure_private
    home = tmp_path / "egress-home"
    home.mkdir(mode=0o700)
    home.chmod(loose)
    with pytest.raises(StateDirError) as refused:
        ensure_private(home)
    message = str(refused.value)
    assert f"accessible by {_who(loose)} (mode {loose:o})" in message, message
    assert message.endswith(f"Fix: chmod 700 {home}"), message
    home.chmod(0o700)
    ensure_private(home)  # the fix named is the fix
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_a_missing_state_dir_is_created_private(tmp_path: Path) -> None:
    from agent_egress.addon.state_dir import ensure_private
    home = tmp_path / "a" / "b"
    ensure_private(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_no_flow_dump_option_exists_or_can_be_set(tmp_path: Path, fake: FakeProvider) -> None:
    """Our lean mitmproxy master loads no addon that writes flows (save_stream_file,
    dumper, eventstore, termlog), mitmproxy refuses unknown options, and our config
    refuses keys it does not know, so no setting can turn a flow dump on."""
    from mitmproxy import options
    from mitmproxy.master import Master

    from agent_egress.addon.gateway import proxy_addons

    async def lean_options() -> options.Options:
        opts = options.Options()
        Master(opts, with_termlog=False).addons.add(*proxy_addons())
        return opts

    opts = asyncio.run(lean_options())
    assert not {"save_stream_file", "save_stream_filter", "flow_detail", "dumper_filter",
                "termlog_verbosity", "hardump", "server_replay"} & set(opts.keys())
    with pytest.raises(KeyError, match="Unknown options: save_stream_file"):
        opts.update(save_stream_file=str(tmp_path / "flows"))
    gw = make_gateway(tmp_path, fake.base_url)
    cfg = yaml.safe_load((gw.home / "config.yaml").read_text())
    for extra in ({"save_stream_file": str(tmp_path / "flows")},
                  {"mitmproxy": {"save_stream_file": str(tmp_path / "flows")}}):
        (gw.home / "config.yaml").write_text(yaml.safe_dump({**cfg, **extra}))
        res = subprocess.run([AGENT_EGRESS, "run"], env=gw.env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 2 and next(iter(extra)) in res.stderr, res.stderr
    assert not (tmp_path / "flows").exists()

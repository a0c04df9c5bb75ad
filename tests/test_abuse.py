"""Repeated bad gateway tokens from one address: slowed, then 429, each one audited;
the client cannot tell a bad checksum from an unknown token; a valid token is never held up."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import Gateway, make_gateway
from fakeanthropic import FakeAnthropic
from fakeprovider import FakeProvider
from test_claude_e2e import claude_gateway

from agent_egress.addon import tokens
from agent_egress.addon.abuse import FailureCounter
from agent_egress.addon.policy import AbuseSettings

BODY = {"model": "gpt-5.5", "input": "hi", "stream": False}
ABUSE = {"free_failures": 2, "delay_seconds": 0.5, "max_delay_seconds": 2,
         "block_failures": 6, "window_seconds": 120}


def _post(gw: Gateway, token: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/responses", json=BODY, timeout=timeout,
                      headers={"authorization": f"Bearer {token}"})


def _without_request_id(r: httpx.Response) -> tuple[int, str, str]:
    err = r.json()["error"]
    return r.status_code, err["code"], re.sub(r"req_[0-9a-f]+", "req_X", err["message"])


def _audit(gw: Gateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (gw.home / "audit.jsonl").read_text().splitlines()]


def _bad_checksum(token: str) -> str:
    last = token[-1]
    return token[:-1] + ("A" if last != "A" else "B")


def test_counter_window_doubling_block_and_bounds() -> None:
    now = [1000.0]
    cfg = AbuseSettings(free_failures=2, delay_seconds=0.5, max_delay_seconds=3,
                        block_failures=6, window_seconds=60, max_clients=3)
    c = FailureCounter(cfg, clock=lambda: now[0])
    got = [c.fail("10.0.0.1") for _ in range(7)]
    assert [p.delay_s for p in got[:5]] == [0, 0, 0.5, 1.0, 2.0]
    assert [p.retry_after for p in got] == [None] * 5 + [60, 60]
    now[0] += 59.5  # the oldest counted failure leaves the window in 0.5 s: rounded up to 1
    assert c.fail("10.0.0.1").retry_after == 1
    now[0] += 61  # a quiet window later the address starts afresh
    assert c.fail("10.0.0.1").failures == 1
    for addr in ("a", "b", "c", "d"):  # bounded: the least recently failing one is forgotten
        c.fail(addr)
    assert len(c) == 3 and c.fail("10.0.0.1").failures == 1
    big = FailureCounter(AbuseSettings(free_failures=1, block_failures=10_000,
                                       max_delay_seconds=4), clock=lambda: now[0])
    assert max(big.fail("x").delay_s for _ in range(2000)) == 4  # capped, no overflow


def test_bad_tokens_are_slowed_then_refused_429_and_audited(tmp_path: Path,
                                                            fake: FakeProvider) -> None:
    gw = make_gateway(tmp_path, fake.base_url, abuse=ABUSE)
    gw.start()
    try:
        fake.tool_calls = 0
        good, key_id = gw.issue_token()
        unknown = tokens.generate_token()
        bad_sum = _bad_checksum(tokens.generate_token())
        assert tokens.is_well_formed(unknown) and not tokens.is_well_formed(bad_sum)
        r_unknown, r_bad_sum = _post(gw, unknown), _post(gw, bad_sum)
        # no oracle: same status, code and message whether the checksum or the token is wrong
        assert _without_request_id(r_unknown) == _without_request_id(r_bad_sum)
        assert _without_request_id(r_unknown)[:2] == (401, "token_unknown")

        delays = []
        for _ in range(2):  # failures 3 and 4: answered 401 after an awaited delay
            t0 = time.monotonic()
            r = _post(gw, unknown)
            delays.append(time.monotonic() - t0)
            assert r.status_code == 401
        assert delays[0] >= 0.5 and delays[1] >= 1.0, delays  # lower bounds only

        # a valid token from the same address is served while a bad one is being held
        done: list[str] = []
        held = threading.Thread(target=lambda: done.append(
            f"bad:{_post(gw, unknown).status_code}"))
        held.start()  # the 5th failure: held 2 s
        time.sleep(0.1)
        assert _post(gw, good).status_code == 200
        done.append("good")
        held.join(30)
        assert done[0] == "good", done

        throttled = _post(gw, unknown)  # 6th failure in the window: 429 + integer Retry-After
        assert throttled.status_code == 429
        assert re.fullmatch(r"[1-9][0-9]*", throttled.headers["retry-after"])
        assert int(throttled.headers["retry-after"]) <= 120
        err = throttled.json()["error"]
        assert err["code"] == "auth_throttled" and err["message"].startswith("agent-egress: ")
        assert _post(gw, good).status_code == 200  # still never blocked
        gw.cli("token", "revoke", key_id)
        assert _post(gw, good).status_code == 429  # a revoked one counts as a failure too
    finally:
        gw.stop()
    assert len(fake.requests) == 2, "nothing refused reaches the provider"
    failed = [r for r in _audit(gw) if r["action"] == "auth.failed"]
    assert [r["detail"]["reason"] for r in failed] == [
        "token_unknown", "token_malformed", "token_unknown", "token_unknown", "token_unknown",
        "token_unknown", "token_revoked"]
    assert [r["detail"]["penalty"] for r in failed] == ["none"] * 2 + ["delayed"] * 3 + [
        "throttled"] * 2
    assert [r["detail"]["delay_ms"] for r in failed[:5]] == [0, 0, 500, 1000, 2000]
    assert [r["detail"]["retry_after"] is not None for r in failed] == [False] * 5 + [True] * 2
    assert failed[1]["detail"]["token"] == "bad-checksum"
    fingerprints = {r["detail"]["token"] for r in failed
                    if r["detail"]["reason"] == "token_unknown"}
    assert len(fingerprints) == 1, fingerprints  # one keyed-hash prefix for one token
    assert re.fullmatch(r"hmac:[0-9a-f]{12}", fingerprints.pop())
    assert all(r["source"].startswith("127.0.0.1:") and r["request_id"].startswith("req_")
               for r in failed)
    blob = (gw.home / "audit.jsonl").read_text() + gw.logs()
    for secret in (good, unknown, bad_sum):
        assert secret not in blob and secret[4:20] not in blob


def test_throttle_answers_in_anthropic_format(tmp_path: Path, fake: FakeProvider) -> None:
    with FakeAnthropic() as fa:
        gw = claude_gateway(tmp_path, fake, fa, abuse={**ABUSE, "delay_seconds": 0,
                                                       "block_failures": 3})
        gw.start()
        try:
            bad = tokens.generate_token()
            rs = [httpx.post(f"http://127.0.0.1:{gw.reverse_port}/v1/messages", timeout=30,
                             json={"model": "claude-sonnet-4-5", "max_tokens": 16,
                                   "messages": [{"role": "user", "content": "hi"}]},
                             headers={"x-api-key": bad, "anthropic-version": "2023-06-01"})
                  for _ in range(3)]
        finally:
            gw.stop()
    assert [r.status_code for r in rs] == [400, 400, 429]  # Claude Code: 400 final, 429 retry
    body = rs[2].json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "too many requests with an invalid gateway token" in body["error"]["message"]
    assert rs[2].headers["retry-after"].isdigit() and "x-should-retry" not in rs[2].headers
    assert fa.requests == []

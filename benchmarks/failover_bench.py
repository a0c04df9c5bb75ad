"""Benchmark: time to first token (TTFT) with and without a failover in the path.

    .venv/bin/python benchmarks/failover_bench.py [--runs 60] [--codex-runs 8] [--json PATH]

One `agent-egress run` gateway (tests/conftest.make_gateway) routes every model to
fake provider `a`, then `b` (tests/fakeprovider.py, in this process, 52-event
streams). The client streams `POST /v1/responses` and takes TTFT as the time from
sending the request to the first complete SSE event; like Codex, it resends the
same body after a 5xx (at once here: the gateway's own cost is what is measured).

Scenarios (each on a fresh gateway, so breakers start closed):
  baseline          a healthy: no failover
  after_500         a answers 500 once per request: 503 from the gateway, retry goes to b
  after_refused     a refuses connections (breaker threshold out of reach): 502, retry to b
  after_hang        a hangs before headers; headers timeout 0.5 s: 502, retry to b
  breaker_open      a refuses connections and its breaker is open: straight to b

With --codex-runs, the real Codex CLI (tools/codex) runs a turn per scenario and the
gap between the request reaching `a` and its retry reaching `b` is taken from the
fakes' receive times: the TTFT a Codex user loses to a failover, Codex's own retry
delay included (503 vs 429 with Retry-After: 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import CODEX, Gateway, free_port, make_gateway, run_codex  # noqa: E402
from fakeprovider import FakeProvider  # noqa: E402

ANSWER = ("The quick brown fox jumps over the lazy dog. " * 5).strip()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@contextmanager
def gateway(tmp: Path, a_url: str, b_url: str, **failover: Any) -> Iterator[Gateway]:
    t = {"connect": 1.0, "headers": 0.5, "idle": 5, "total": 30}
    prov = [{"name": n, "kind": "openai_compatible", "base_url": u, "key": "openai",
             "timeouts": t, "price_as": "openai"} for n, u in (("a", a_url), ("b", b_url))]
    gw = make_gateway(tmp, a_url, providers=prov, log_level="warning",
                      routes=[{"model": "*", "providers": ["a", "b"]}],
                      failover={"breaker": {"failures": 10**6}, **failover})
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def ttft(client: httpx.Client, gw: Gateway, token: str, n: int) -> tuple[float, int]:
    """Seconds to the first SSE event (retrying 5xx at once, like a client), attempts."""
    body = json.dumps({"model": "gpt-5.5", "input": f"q{n}", "stream": True}).encode()
    t0 = time.perf_counter()
    for attempt in range(1, 6):
        with client.stream("POST", f"{gw.base_url}/responses", content=body,
                           headers={"authorization": f"Bearer {token}",
                                    "content-type": "application/json",
                                    "session-id": f"bench-{n}"}) as r:
            if r.status_code >= 500:
                r.read()
                continue
            buf, first = b"", None
            for chunk in r.iter_raw():
                buf += chunk
                if first is None and b"\n\n" in buf:
                    first = time.perf_counter() - t0
            if first is not None and b"response.completed" in buf:
                return first, attempt
    raise RuntimeError("no answer after 5 attempts")


def scenario(name: str, runs: int, setup: Callable[[FakeProvider, FakeProvider], str | None],
             failover: dict[str, Any] | None = None, warm_open: bool = False
             ) -> dict[str, Any]:
    with FakeProvider(delta_count=47, tool_calls=0, answer_text=ANSWER) as a, \
            FakeProvider(delta_count=47, tool_calls=0, answer_text=ANSWER) as b, \
            tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
        a_url = setup(a, b) or a.base_url
        with gateway(Path(tmp), a_url, b.base_url, **(failover or {})) as gw, \
                httpx.Client(timeout=30) as client:
            token, _ = gw.issue_token(user="bench", team="bench")
            for i in range(5):  # warm-up (and, for breaker_open, open the breaker)
                ttft(client, gw, token, -1 - i)
            times, attempts = [], []
            for i in range(runs):
                if name == "after_500":
                    a.fail_next = [500]
                t, k = ttft(client, gw, token, i)
                times.append(t * 1000)
                attempts.append(k)
            served_b = len(b.requests_to("/responses"))
    return {"scenario": name, "runs": runs, "p50_ms": round(statistics.median(times), 2),
            "p90_ms": round(pct(times, 0.9), 2), "max_ms": round(max(times), 2),
            "attempts": sorted(set(attempts)), "b_served": served_b}


def codex_gap(kind: str, runs: int) -> dict[str, Any]:
    """Real Codex: a answers 500 (or refuses); gap from a's receive to b's receive."""
    gaps, totals = [], []
    retry_status = 429 if kind == "after_500_429" else 503
    with FakeProvider(tool_calls=0) as a, FakeProvider(tool_calls=0) as b, \
            tempfile.TemporaryDirectory(prefix="failover-bench-codex-") as tmp:
        (Path(tmp) / "gw").mkdir()
        with gateway(Path(tmp) / "gw", a.base_url, b.base_url,
                     retry_status=retry_status) as gw:
            token, _ = gw.issue_token(user="bench", team="bench")
            for i in range(runs):
                a.clear()
                b.clear()
                if kind != "baseline":
                    a.fail_next = [500]
                t0 = time.monotonic()
                (Path(tmp) / f"run{i}").mkdir()
                res = run_codex(Path(tmp) / f"run{i}", gw.base_url, token, prompt="hi")
                totals.append((time.monotonic() - t0) * 1000)
                assert res.returncode == 0, res.stderr[-2000:]
                if kind != "baseline":
                    ra, rb = a.requests_to("/responses"), b.requests_to("/responses")
                    gaps.append((rb[0].received_mono - ra[0].received_mono) * 1000)
    out: dict[str, Any] = {"scenario": f"codex_{kind}", "runs": runs,
                           "codex_exec_p50_ms": round(statistics.median(totals), 1)}
    if gaps:
        out.update(gap_p50_ms=round(statistics.median(gaps), 1),
                   gap_max_ms=round(max(gaps), 1))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--codex-runs", type=int, default=8)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    results = [
        scenario("baseline", args.runs, lambda a, b: None),
        scenario("after_500", args.runs, lambda a, b: None),
        scenario("after_refused", args.runs, lambda a, b: dead),
        scenario("after_hang", max(10, args.runs // 4),
                 lambda a, b: setattr(a, "hang_before_headers", 30)),  # type: ignore[func-returns-value]
        scenario("breaker_open", args.runs, lambda a, b: dead,
                 {"breaker": {"failures": 2, "open_seconds": 600}}),
    ]
    if args.codex_runs and Path(CODEX).exists():
        for kind in ("baseline", "after_500", "after_500_429"):
            results.append(codex_gap(kind, args.codex_runs))
    cpu = os.cpu_count()
    print(f"# failover TTFT, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu} cores")
    for r in results:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: direct vs bare mitmproxy vs agent-egress vs LiteLLM, on one fake upstream.

    .venv/bin/python benchmarks/bench.py [--quick] [--repeat 3] [--json PATH]

One command, one run, four parts (all on 127.0.0.1, see benchmarks/README.md):

1. levels: every target started once; per repeat, per phase (streams at each
   ``--levels`` concurrency, then non-streaming calls) the targets take turns in a
   rotating order, so machine drift hits each alike; figures are medians over the
   repeats with their min-max. CPU per stream and RSS (sampled every 0.1 s) of each
   gateway's processes, from /proc. Stream fidelity: one stream per target compared
   byte for byte with one straight from the fake.
2. capacity: the most concurrent paced streams (52 events 20 ms apart, like a model
   writing) one gateway process carries before its p99 time to first event passes
   50 ms; a bounded doubling-then-bisecting search per target.
3. scale-out: 1, 2 and 4 agent-egress processes behind HAProxy sharing PostgreSQL and
   Redis (tests/services.py: a fresh database and key prefix), interleaved likewise.
4. the tables, to stdout (progress to stderr); ``--json`` keeps everything raw.

Processes: the fake upstream (``tests/fakeprovider.py``), ``mitmdump`` (reverse mode,
streaming on, no addon), ``agent-egress run`` (default chain, throwaway home), LiteLLM's
proxy (PyPI, its own venv under benchmarks/.litellm-venv, created on first use), and
the load generator: this process (bench_lib.py, raw asyncio HTTP/1.1, closed loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fidelity
import bench_targets
from bench_lib import (  # noqa: F401 (guardrails_bench imports some from here)
    EVENTS_PER_STREAM,
    HOST,
    ROOT,
    Conn,
    Phase,
    Procs,
    free_port,
    machine_info,
    other_load_pct,
    pct,
    proc_cpu_s,
    rss_kb,
    run_phase,
    start_fake,
    venv_bin,
    wait_http,
)
from bench_render import render
from bench_targets import (  # noqa: F401
    HAPROXY_MISSING,
    Target,
    egress_env,
    egress_ledger_calls,
    start_egress,
    start_haproxy,
    start_litellm,
    start_mitmdump,
    start_replicas,
)

TARGETS = ("direct", "mitmproxy", "agent-egress", "litellm")
CAPACITY_TTFE_P99_MS = 50.0
PACED_EVENT_DELAY_S = 0.02  # the reference: 52-event streams, 20 ms apart


@dataclass
class Plan:
    levels: list[int]
    repeat: int
    min_streams_c1: int
    min_streams: int
    min_per_worker: int
    plain_concurrency: int
    plain_duration_s: float
    level_time_limit_s: float
    warmup_streams: int
    warmup_plain: int
    capacity_max: int
    capacity_streams_per_worker: int
    scale: list[int]
    scale_concurrency: int
    scale_duration_s: float

    def per_worker(self, c: int) -> int:
        if c == 1:
            return self.min_streams_c1
        return max(math.ceil(self.min_streams / c), self.min_per_worker)


def plan_for(args: argparse.Namespace) -> Plan:
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    scale = [int(x) for x in args.scale.split(",") if x.strip()]
    if args.quick:
        return Plan(levels, args.repeat or 2, 30, 64, 2, args.plain_concurrency, 2.0, 15.0,
                    8, 20, min(args.capacity_max, 256), 2, scale, 32, 2.0)
    return Plan(levels, args.repeat or 3, 500, 1600, 8, args.plain_concurrency,
                args.plain_duration, 30.0, 100, 400, args.capacity_max, 3, scale, 64, 5.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rotate(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


def start_target(name: str, procs: Procs, fake_port: int, args: argparse.Namespace,
                 suffix: str = "") -> Target:
    if name == "direct":
        return Target("direct", fake_port, "sk-bench-key")
    if name == "mitmproxy":
        return start_mitmdump(procs, fake_port, "mitmproxy" + suffix)
    if name == "agent-egress":
        return start_egress(procs, fake_port, "agent-egress" + suffix)
    return start_litellm(procs, fake_port, args.litellm_workers, "litellm" + suffix)


def phase_line(t: str, s: dict[str, Any]) -> str:
    if s["stream"]:
        return (f"  {t:<12} {s['name']:<10} n={s['requests']:<5} err={s['errors']} "
                f"ttfe p50={s['ttfe_p50_ms'] or 0:7.2f} p99={s['ttfe_p99_ms'] or 0:7.2f} ms  "
                f"total p50={s['total_p50_ms'] or 0:7.2f} ms  {s['rate_per_s'] or 0:6.1f}/s  "
                f"proxy cpu {s['proxy_cpu_pct'] or 0:.0f}%  client cpu "
                f"{s['client_cpu_pct'] or 0:.0f}%")
    return (f"  {t:<12} {s['name']:<10} n={s['requests']:<5} err={s['errors']} "
            f"{s['rate_per_s'] or 0:7.1f} req/s  p50={s['total_p50_ms'] or 0:.2f} ms  "
            f"proxy cpu {s['proxy_cpu_pct'] or 0:.0f}%  client cpu "
            f"{s['client_cpu_pct'] or 0:.0f}%")


# --------------------------------------------------------------------------- part 1
async def fidelity(targets: list[Target]) -> dict[str, Any]:
    """One stream from the fake (direct), then one through each target."""
    direct = next(t for t in targets if t.name == "direct")
    out: dict[str, Any] = {}
    for t in targets:
        if t.name == "direct":
            continue
        sent_conn, got_conn = Conn(direct.port, direct.auth), Conn(t.port, t.auth)
        try:
            sent = (await sent_conn.request(True, keep_body=True)).body or b""
            got = (await got_conn.request(True, keep_body=True)).body or b""
        finally:
            sent_conn.close()
            got_conn.close()
        out[t.name] = bench_fidelity.compare(sent, got)
    return out


async def run_levels(targets: list[Target], plan: Plan, upstream_pid: int) -> dict[str, Any]:
    lim = plan.level_time_limit_s
    sent = {t.name: 0 for t in targets}
    for t in targets:  # warm-up (unrecorded): streams and plain calls at concurrency 4
        for stream, n in ((True, plan.warmup_streams), (False, plan.warmup_plain)):
            ph = await run_phase(Phase("warmup", 4, stream), t.port, t.auth,
                                 per_worker=max(1, n // 4), duration_s=None, time_limit_s=lim,
                                 proxy_pids=t.pids, upstream_pid=upstream_pid, record=False)
            sent[t.name] += ph.requests + 4
            if ph.errors or ph.warm_errors:
                log(f"  {t.name} warm-up: {ph.errors + ph.warm_errors} errors: "
                    f"{ph.error_samples[:3]}")
    specs = [(f"stream@{c}", c, True) for c in plan.levels]
    specs.append((f"plain@{plan.plain_concurrency}", plan.plain_concurrency, False))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {t.name: {} for t in targets}
    for rep in range(plan.repeat):
        log(f"repeat {rep + 1}/{plan.repeat}")
        for i, (name, c, stream) in enumerate(specs):
            for t in rotate(targets, rep + i):
                ph = await run_phase(
                    Phase(name, c, stream), t.port, t.auth,
                    per_worker=plan.per_worker(c) if stream else None,
                    duration_s=None if stream else plan.plain_duration_s, time_limit_s=lim,
                    proxy_pids=t.pids, upstream_pid=upstream_pid)
                sent[t.name] += ph.requests + c
                s = ph.summary()
                runs[t.name].setdefault(name, []).append(s)
                log(phase_line(t.name, s))
    return {"runs": runs, "sent": sent}


# --------------------------------------------------------------------------- part 2
async def capacity_search(t: Target, plan: Plan, upstream_pid: int) -> dict[str, Any]:
    """Largest tested concurrency whose paced streams all succeed with p99 TTFE <= 50 ms:
    double from 8 until one fails (or ``capacity_max``), then bisect twice."""
    tried: dict[int, dict[str, Any]] = {}

    async def ok(c: int) -> bool:
        ph = await run_phase(Phase(f"paced@{c}", c, True), t.port, t.auth,
                             per_worker=plan.capacity_streams_per_worker, duration_s=None,
                             time_limit_s=60.0, proxy_pids=t.pids, upstream_pid=upstream_pid,
                             stagger_s=EVENTS_PER_STREAM * PACED_EVENT_DELAY_S)
        s = ph.summary()
        p99 = s["ttfe_p99_ms"]
        s["pass"] = bool(ph.errors == 0 and ph.warm_errors == 0 and p99 is not None
                         and p99 <= CAPACITY_TTFE_P99_MS)
        tried[c] = s
        log(f"  {t.name:<12} paced c={c:<4} n={ph.requests:<5} err={ph.errors + ph.warm_errors} "
            f"ttfe p50={s['ttfe_p50_ms'] or 0:7.2f} p99={p99 or 0:7.2f} ms  proxy cpu "
            f"{s['proxy_cpu_pct'] or 0:.0f}%  client cpu {s['client_cpu_pct'] or 0:.0f}%  "
            f"{'pass' if s['pass'] else 'FAIL'}")
        return bool(s["pass"])

    lo, hi = 0, None
    c = 8
    while c <= plan.capacity_max:
        if await ok(c):
            lo, c = c, c * 2
        else:
            hi = c
            break
    if lo == 0 and hi is not None:  # fails at 8: look below
        c = 4
        while c >= 1:
            if await ok(c):
                lo = c
                break
            hi, c = c, c // 2
    for _ in range(2):  # bisect, bounded
        if hi is None or lo == 0 or hi - lo <= max(1, lo // 8):
            break
        mid = (lo + hi) // 2
        if await ok(mid):
            lo = mid
        else:
            hi = mid
    return {"capacity": lo, "first_failing": hi, "capped": hi is None,
            "tried": {str(k): v for k, v in sorted(tried.items())}}


# --------------------------------------------------------------------------- part 3
async def run_scale_out(procs: Procs, fake_port: int, upstream_pid: int,
                        plan: Plan) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    import pytest
    import services  # type: ignore[import-not-found]  # tests/services.py

    try:
        pg = services.postgres_url()
        redis_url = services.redis_url()
    except (Exception, pytest.skip.Exception) as e:
        return {"skipped": f"no PostgreSQL/Redis: {e}"}
    with services.fresh_database(pg) as db_url, services.redis_namespace(redis_url) as prefix:
        replicas = start_replicas(procs, fake_port, max(plan.scale), db_url, redis_url, prefix)
        log(f"scale-out: {len(replicas)} replicas on ports {[r.port for r in replicas]}")
        lbs = {n: start_haproxy(procs, replicas[:n], f"haproxy-{n}") for n in plan.scale}
        all_pids = [p for r in replicas for p in r.pids]
        c = plan.scale_concurrency
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {str(n): {} for n in plan.scale}
        sent = 0
        for n, lb in lbs.items():  # warm every replica through its balancer
            sent += max(8, 2 * n) * 5
            await run_phase(Phase("warmup", max(8, 2 * n), True), lb.port, lb.auth,
                            per_worker=4, duration_s=None, time_limit_s=30,
                            proxy_pids=all_pids, upstream_pid=upstream_pid, record=False)
        specs = [(f"stream@{c}", True), (f"plain@{c}", False)]
        for rep in range(plan.repeat):
            for i, (name, stream) in enumerate(specs):
                for n in rotate(list(plan.scale), rep + i):
                    lb = lbs[n]
                    assert lb.proc is not None
                    ph = await run_phase(Phase(name, c, stream), lb.port, lb.auth,
                                         per_worker=None, duration_s=plan.scale_duration_s,
                                         time_limit_s=plan.scale_duration_s + 30,
                                         proxy_pids=all_pids, upstream_pid=upstream_pid,
                                         lb_pids=[lb.proc.pid])
                    sent += ph.requests + c
                    s = ph.summary()
                    s["lb_cpu_pct"] = (100 * s["lb_cpu_s"] / s["wall_s"]) if s["wall_s"] else None
                    runs[str(n)].setdefault(name, []).append(s)
                    log(phase_line(f"{n} x egress", s))
        for r in [*lbs.values(), *replicas]:
            assert r.proc is not None
            procs.stop(r.proc)
        r0 = replicas[0]
        env = r0.extra.get("env")
        ledger = egress_ledger_calls(r0.home, env if isinstance(env, dict) else None) \
            if r0.home else None
    return {"runs": {n: {k: summarise(v) for k, v in ph.items()} for n, ph in runs.items()},
            "concurrency": c, "ledger_calls": ledger, "calls_sent": sent,
            "replicas": len(replicas)}


# --------------------------------------------------------------------------- driver
async def wait_idle(args: argparse.Namespace) -> tuple[float, float]:
    t0 = time.monotonic()
    other = other_load_pct(2.0)
    if other > 20 and args.wait_idle > 0:
        log(f"bench: other processes use {other:.0f}% of a core; waiting up to "
            f"{args.wait_idle:.0f} s for the machine to be idle")
        give_up = time.monotonic() + args.wait_idle
        while other > 20 and time.monotonic() < give_up:
            other = other_load_pct(5.0)
    if other > 20:
        log(f"bench: WARNING: other processes use {other:.0f}% of a core; results will be"
            " distorted")
    return other, time.monotonic() - t0


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and (min, max) over repeats of every numeric figure of one phase."""
    out: dict[str, Any] = {"name": runs[0]["name"], "repeats": len(runs),
                           "requests": sum(r["requests"] for r in runs),
                           "errors": sum(r["errors"] + r["warm_errors"] for r in runs),
                           "hit_time_limit": any(r["hit_time_limit"] for r in runs),
                           "error_samples": [e for r in runs for e in r["error_samples"]][:5]}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in out:
            vals = [r[k] for r in runs if r.get(k) is not None]
            if vals:
                out[k] = {"med": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


async def amain(args: argparse.Namespace) -> int:
    plan = plan_for(args)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad:
        raise SystemExit(f"bench: unknown target(s) {bad}; choose from {TARGETS}")
    if "direct" not in names:
        names.insert(0, "direct")  # the fidelity reference and the latency floor
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bench_targets.EXTRA_CONFIG.update(json.loads(args.egress_config or "{}"))
    other, waited = await wait_idle(args)
    t_start = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine_info(), "plan": {**asdict(plan), "quick": args.quick},
        "client": "raw asyncio streams, HTTP/1.1 keep-alive, one connection per worker, "
                  "closed loop", "litellm_workers": args.litellm_workers,
        "egress_config": bench_targets.EXTRA_CONFIG,
        "other_cpu_pct_before": round(other, 1), "waited_for_idle_s": round(waited, 1)}
    with tempfile.TemporaryDirectory(prefix="agent-egress-bench-") as tmp:
        procs = Procs(Path(tmp))
        try:
            fake, fake_port = start_fake(procs)
            log(f"fake upstream pid {fake.pid} on :{fake_port}")
            targets = [start_target(n, procs, fake_port, args) for n in names]
            for t in targets:
                log(f"{t.name}: port {t.port}" + (f", pids {t.pids}" if t.proc else ""))
            if "fidelity" not in skip:
                results["fidelity"] = await fidelity(targets)
            lv = await run_levels(targets, plan, fake.pid)
            results["levels"] = {t: {k: summarise(v) for k, v in ph.items()}
                                 for t, ph in lv["runs"].items()}
            results["levels_raw"] = lv["runs"]
            results["peak_rss_kb"] = {t.name: rss_kb(t.pids, "VmHWM") for t in targets
                                      if t.proc is not None}
            for t in targets:
                if t.proc is None:
                    continue
                rc = procs.stop(t.proc)
                if rc not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
                    log(f"  {t.name} exited with {rc}:\n{procs.stderr_tail(t.name)}")
                if t.name == "agent-egress" and t.home is not None:
                    results["ledger_calls"] = egress_ledger_calls(t.home)
                    # plus the one fidelity stream, sent before the levels
                    results["egress_calls_sent"] = (lv["sent"][t.name]
                                                    + ("fidelity" in results))
            if "capacity" not in skip:
                paced, paced_port = start_fake(procs, PACED_EVENT_DELAY_S, "fake-paced")
                results["capacity"] = {}
                for n in names:
                    t = start_target(n, procs, paced_port, args, "-paced")
                    results["capacity"][n] = await capacity_search(t, plan, paced.pid)
                    if t.proc is not None:
                        procs.stop(t.proc)
                procs.stop(paced)
            if "scaleout" not in skip:
                try:
                    results["scale_out"] = await run_scale_out(procs, fake_port, fake.pid, plan)
                except FileNotFoundError as e:
                    results["scale_out"] = {"skipped": str(e)}
                    log(f"scale-out skipped: {e}")
        finally:
            procs.stop_all()
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    print(render(results))
    print(f"\n(run took {results['elapsed_s']:.0f} s, plus {waited:.0f} s checking that the"
          " machine is idle)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        log(f"raw results: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--levels", default="1,16,64,256",
                   help="stream concurrency levels (1,16,64,256)")
    p.add_argument("--repeat", type=int, default=0,
                   help="repeats of the level phases, medians reported (3; --quick: 2)")
    p.add_argument("--json", metavar="PATH", help="write raw results (JSON) here")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="subset of direct,mitmproxy,agent-egress,litellm (direct always runs)")
    p.add_argument("--skip", default="", help="parts to leave out: fidelity,capacity,scaleout")
    p.add_argument("--litellm-workers", type=int, default=1,
                   help="LiteLLM proxy worker processes (1)")
    p.add_argument("--capacity-max", type=int, default=1024,
                   help="highest concurrency the capacity search tries (1024; --quick: 256)")
    p.add_argument("--scale", default="1,2,4",
                   help="agent-egress process counts behind HAProxy (1,2,4)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before starting, wait up to this long for other processes to go"
                        " quiet (under 20%% of a core)")
    p.add_argument("--egress-config", metavar="JSON",
                   help="merged into agent-egress's config.yaml (top-level keys), e.g."
                        """ '{"guardrails": {"default": {"pii": {"enabled": false}}}}'""")
    p.add_argument("--plain-concurrency", type=int, default=16,
                   help="concurrency of the non-streaming phase (16)")
    p.add_argument("--plain-duration", type=float, default=5.0,
                   help="seconds of the non-streaming phase (5; --quick: 2)")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

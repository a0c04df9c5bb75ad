"""Soak: does a gateway's memory stay flat under hours of streams? (mitmproxy #7414)

    .venv/bin/python benchmarks/soak.py [--minutes 20] [--target agent-egress] [--json PATH]

One fake upstream (paced: 52 events 20 ms apart, like a model writing), one gateway
(``agent-egress run`` with its default chain, or bare ``mitmdump`` to compare), and
``--concurrency`` closed-loop clients streaming for ``--minutes``. Every 10 s the
gateway's RSS (VmRSS of its processes, /proc) is sampled with the streams done, errors,
p99 time to first event and gateway CPU over the interval.

Verdict: growth = median RSS of the last three samples minus the RSS at the end of the
warm-up (the first fifth of the run, at most 2 minutes: caches, pools and the allocator
settle there). The run fails (exit 1) if the growth passes ``--max-growth-mib`` (25) or
more than 1 % of the streams failed. A least-squares slope (MiB per hour) over the
samples after the warm-up is reported beside it, to tell a leak from a step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lib import (  # benchmarks/ is not a package
    Phase,
    Procs,
    cpu_of,
    machine_info,
    pct,
    rss_kb,
    run_phase,
    start_fake,
)
from bench_targets import start_egress, start_mitmdump

SAMPLE_S = 10.0


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB), in MiB per hour."""
    if len(points) < 3:
        return None
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return None if den == 0 else 3600 * sum((x - mx) * (y - my) for x, y in points) / den


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    procs = Procs(workdir)
    try:
        fake, fake_port = start_fake(procs, args.event_delay)
        t = (start_egress if args.target == "agent-egress" else start_mitmdump)(procs, fake_port)
        pids = t.pids
        print(f"soak: {t.name} pids {pids} on :{t.port}, fake pid {fake.pid}; "
              f"{args.concurrency} streams for {args.minutes:g} min", file=sys.stderr,
              flush=True)
        duration = args.minutes * 60
        phase = Phase("soak", args.concurrency, True)
        load = asyncio.create_task(run_phase(
            phase, t.port, t.auth, per_worker=None, duration_s=duration,
            time_limit_s=duration + 60, proxy_pids=pids, upstream_pid=fake.pid,
            stagger_s=52 * args.event_delay))
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        last_cpu, last_t, seen = cpu_of(pids), t0, 0
        while not load.done():
            await asyncio.wait({load}, timeout=SAMPLE_S)
            now = time.monotonic()
            cpu = cpu_of(pids)
            new = phase.ttfe_ms[seen:]
            seen += len(new)
            s = {"t_s": round(now - t0, 1), "rss_mib": round(rss_kb(pids) / 1024, 2),
                 "fake_rss_mib": round(rss_kb([fake.pid]) / 1024, 1),
                 "streams": phase.requests, "errors": phase.errors,
                 "ttfe_p99_ms": pct(new, 0.99),
                 "cpu_pct": round(100 * (cpu - last_cpu) / (now - last_t), 1)}
            last_cpu, last_t = cpu, now
            samples.append(s)
            print(f"  t={s['t_s']:7.1f}s rss={s['rss_mib']:7.2f} MiB streams={s['streams']:<7} "
                  f"errors={s['errors']:<4} ttfe p99={s['ttfe_p99_ms'] or 0:7.2f} ms "
                  f"cpu={s['cpu_pct']:.0f}%", file=sys.stderr, flush=True)
        await load
        peak = rss_kb(pids, "VmHWM") / 1024
        if t.proc is not None:
            procs.stop(t.proc)
    finally:
        procs.stop_all()
    warm_s = min(duration / 5, 120.0)
    after = [s for s in samples if s["t_s"] >= warm_s]
    if len(after) < 4:
        raise SystemExit("soak: too short to judge (need 4 samples after the warm-up)")
    base = after[0]["rss_mib"]
    end = statistics.median(s["rss_mib"] for s in after[-3:])
    growth = end - base
    err_rate = phase.errors / phase.requests if phase.requests else 1.0
    return {
        "machine": machine_info(), "target": t.name, "minutes": args.minutes,
        "concurrency": args.concurrency, "event_delay_s": args.event_delay,
        "warmup_s": warm_s, "rss_after_warmup_mib": base, "rss_end_mib": end,
        "growth_mib": round(growth, 2), "max_growth_mib": args.max_growth_mib,
        "slope_mib_per_hour": slope_per_hour([(s["t_s"], s["rss_mib"]) for s in after]),
        "peak_rss_mib": round(peak, 2), "streams": phase.requests, "errors": phase.errors,
        "error_samples": phase.error_samples[:5], "ttfe_p50_ms": pct(phase.ttfe_ms, 0.5),
        "ttfe_p99_ms": pct(phase.ttfe_ms, 0.99),
        "passed": growth <= args.max_growth_mib and err_rate <= 0.01, "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="length of the soak (20)")
    p.add_argument("--target", choices=("agent-egress", "mitmproxy"), default="agent-egress")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent streams (64)")
    p.add_argument("--event-delay", type=float, default=0.02,
                   help="seconds between a stream's events (0.02)")
    p.add_argument("--max-growth-mib", type=float, default=25.0,
                   help="fail if RSS grows more than this after the warm-up (25)")
    p.add_argument("--json", metavar="PATH", help="write the samples and verdict here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agent-egress-soak-") as tmp:
        r = asyncio.run(soak(args, Path(tmp)))
    sl = r["slope_mib_per_hour"]
    print(f"{r['target']}: {r['streams']} streams ({r['errors']} errors) in {r['minutes']:g} min "
          f"at c={r['concurrency']}; TTFE p50 {r['ttfe_p50_ms'] or 0:.2f} ms, p99 "
          f"{r['ttfe_p99_ms'] or 0:.2f} ms")
    print(f"RSS {r['rss_after_warmup_mib']:.1f} MiB after the {r['warmup_s']:.0f} s warm-up -> "
          f"{r['rss_end_mib']:.1f} MiB at the end: {r['growth_mib']:+.1f} MiB (bound "
          f"{r['max_growth_mib']:g}); slope {'-' if sl is None else f'{sl:+.1f}'} MiB/h; peak "
          f"{r['peak_rss_mib']:.1f} MiB. {'PASS' if r['passed'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

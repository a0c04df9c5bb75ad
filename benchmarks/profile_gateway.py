"""Where a gateway's CPU goes per call: py-spy samples agent-egress under the bench's load.

    .venv/bin/python benchmarks/profile_gateway.py --mode plain --seconds 20 [--raw /tmp/p.txt]
    .venv/bin/python benchmarks/profile_gateway.py --mode stream --concurrency 64
    .venv/bin/python benchmarks/profile_gateway.py --gc   # garbage-collection pauses instead

Starts the fake upstream and one gateway (default chain, as ``bench.py`` does), warms it,
then drives closed-loop load while ``py-spy record --gil`` samples only the thread holding
the GIL: on one event loop that is the time other calls wait for. Prints the share of
samples spent in mitmproxy's hook dispatch, in each of our hooks, and the hottest of our
functions. py-spy is not a project dependency: it is looked up on PATH and next to this
Python; ``pip install py-spy`` into any environment provides it (it attaches by pid).

``--gc`` runs the gateway under ``gc_gateway.py`` instead and reports its garbage
collections while serving (count, total and longest pause per generation): a full
collection stops the loop, so its pause lands on every call in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_lib as bl
import bench_targets as bt

_DISPATCH = ("addonmanager.py", "contextlib.py", "overhead.py", "chain.py")


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, n = line.rstrip().rpartition(" ")
    frames = [re.sub(r"\((?:/[^()]*?/(?:site-packages|python3\.\d+)/|" + re.escape(str(bl.ROOT))
                     + r"/)", "(", f) for f in stack.split(";")]
    return frames, int(n)


def summarise(raw: Path, top: int = 25) -> str:
    """Hook dispatch vs hook bodies vs our hottest functions, as shares of all samples."""
    total = 0
    hooks: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        frames, n = _frames(line)
        total += n
        for i, f in enumerate(frames):
            if f.startswith("AddonManager.trigger_event"):
                j = i + 1
                while j < len(frames) and any(s in frames[j] for s in _DISPATCH):
                    j += 1
                hooks[re.sub(r":\d+\)", ")", frames[j]) if j < len(frames)
                      else "(dispatch: mitmproxy's and ours)"] += n
                break
        for f in set(frames):
            if f.split("(")[-1].startswith(("addon/", "exporters/")):
                ours[re.sub(r":\d+\)", ")", f)] += n
    if not total:
        return "no samples"
    out = [f"samples holding the GIL: {total}", "", "hook events (share of all samples):"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in hooks.most_common(top)]
    out += ["", "our functions, inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in ours.most_common(top)
            if "cli.py" not in k]
    return "\n".join(out)


def py_spy() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        sys.exit("py-spy not found: pip install py-spy (any environment; it attaches by pid)")
    return found


async def _load(t: bt.Target, fake_pid: int, stream: bool, concurrency: int,
                seconds: float, spy: list[str]) -> bl.Phase:
    await bl.run_phase(bl.Phase("warm", 4, stream), t.port, t.auth, per_worker=50,
                       duration_s=None, time_limit_s=30, proxy_pids=t.pids,
                       upstream_pid=fake_pid, record=False)
    recorder = subprocess.Popen(spy)
    await asyncio.sleep(1.0)  # py-spy attached before the measured load starts
    phase = bl.Phase("profiled", concurrency, stream)
    await bl.run_phase(phase, t.port, t.auth, per_worker=None, duration_s=seconds - 2,
                       time_limit_s=seconds + 10, proxy_pids=t.pids, upstream_pid=fake_pid)
    await asyncio.to_thread(recorder.wait)
    return phase


async def _gc_load(t: bt.Target, fake_pid: int, seconds: float) -> None:
    for concurrency, stream in ((4, True), (64, True), (64, True), (16, False)):
        phase = bl.Phase("gc", concurrency, stream)
        await bl.run_phase(phase, t.port, t.auth, per_worker=None, duration_s=seconds / 4,
                           time_limit_s=seconds, proxy_pids=t.pids, upstream_pid=fake_pid)
        s = phase.summary()
        ttfe = (f", TTFE p50/p99 {s['ttfe_p50_ms']:.1f}/{s['ttfe_p99_ms']:.1f} ms"
                if s["ttfe_p99_ms"] is not None else "")
        print(f"{'stream' if stream else 'plain'} c={concurrency}: {s['requests']} calls,"
              f" {s['errors']} errors, {s['rate_per_s']:.0f}/s{ttfe}")


def gc_pauses(seconds: int) -> int:
    with tempfile.TemporaryDirectory(prefix="agent-egress-gc-") as tmp:
        procs = bl.Procs(Path(tmp))
        out = Path(tmp) / "gc.json"
        try:
            fake, fake_port = bl.start_fake(procs)
            home, env, port, admin = bt.prepare_egress(procs, fake_port, "agent-egress")
            token = bt.issue_token(env)
            proc = procs.start("agent-egress", [
                sys.executable, str(Path(__file__).with_name("gc_gateway.py")), str(out)],
                env=env)
            bl.wait_http(f"http://{bl.HOST}:{admin}/readyz", 60, proc, "agent-egress", procs,
                         "agent-egress")
            target = bt.Target("agent-egress", port, token, proc, home)
            asyncio.run(_gc_load(target, fake.pid, seconds))
            procs.stop(proc)
        finally:
            procs.stop_all()
        print("\ngarbage collections while serving (generation: count, total, longest):")
        for gen, v in json.loads(out.read_text()).items():
            print(f"  {gen}: {v['collections']}, {v['total_ms']} ms, {v['longest_ms']} ms")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("plain", "stream"), default="plain")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--raw", type=Path, help="keep py-spy's raw (collapsed) stacks here")
    ap.add_argument("--gc", action="store_true",
                    help="time garbage collections instead (no py-spy needed)")
    args = ap.parse_args()
    if args.gc:
        return gc_pauses(args.seconds)
    spy_bin = py_spy()
    with tempfile.TemporaryDirectory(prefix="agent-egress-profile-") as tmp:
        procs = bl.Procs(Path(tmp))
        raw = args.raw or Path(tmp) / "stacks.txt"
        try:
            fake, fake_port = bl.start_fake(procs)
            target = bt.start_egress(procs, fake_port)
            assert target.proc is not None
            spy = [spy_bin, "record", "--gil", "-p", str(target.proc.pid), "-r", str(args.rate),
                   "-f", "raw", "-o", str(raw), "-d", str(args.seconds)]
            phase = asyncio.run(_load(target, fake.pid, args.mode == "stream",
                                      args.concurrency, args.seconds, spy))
        finally:
            procs.stop_all()
        s = phase.summary()
        print(f"{args.mode} c={args.concurrency}: {s['requests']} calls, {s['errors']} errors,"
              f" {s['rate_per_s']:.0f}/s, gateway CPU {s['proxy_cpu_ms_per_req']:.2f} ms/call"
              " (under sampling)\n")
        print(summarise(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())

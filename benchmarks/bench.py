"""Benchmark: direct vs bare mitmproxy vs agent-egress, on one fake upstream.

    .venv/bin/python benchmarks/bench.py [--quick] [--levels 1,16,64] [--json PATH]

Everything runs on 127.0.0.1. Processes:

* fake upstream: ``tests/fakeprovider.py`` (uvicorn, its own process), 52-event SSE
  streams (``--delta-count 47``: created, in_progress, output_item.added, 47 text
  deltas, output_item.done, completed) and no tool calls (``--tool-calls 0``);
* bare mitmproxy: ``mitmdump --mode reverse:...`` subprocess, streaming on;
* agent-egress: ``agent-egress run`` subprocess with a throwaway AGENT_EGRESS_HOME;
* load generator: this process. A lean client on raw asyncio streams speaking
  HTTP/1.1 with keep-alive (one connection per worker, closed loop), stdlib only.

Per target: time to first complete SSE event and total stream time (p50/p99) at each
concurrency level, streams/s, non-streaming req/s at a fixed concurrency, and for the
proxies their CPU (from /proc/<pid>/stat) per stream / per request and peak RSS
(VmHWM). The client's and the fake upstream's CPU over the same windows are reported
too, so a saturated client or upstream is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DELTA_COUNT = 47  # -> 52 SSE events per stream
EVENTS_PER_STREAM = DELTA_COUNT + 5
ANSWER = ("The quick brown fox jumps over the lazy dog. " * 5).strip()  # 224 chars
BODY_STREAM = json.dumps(
    {"model": "gpt-5.5", "input": [{"role": "user", "content": "hi"}], "stream": True,
     "store": False}, separators=(",", ":")).encode()
BODY_PLAIN = json.dumps(
    {"model": "gpt-5.5", "input": [{"role": "user", "content": "hi"}], "stream": False,
     "store": False}, separators=(",", ":")).encode()
TARGETS = ("direct", "mitmproxy", "agent-egress")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- utils
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def venv_bin(name: str) -> str:
    for cand in (ROOT / ".venv" / "bin" / name, Path(sys.executable).parent / name):
        if cand.exists():
            return str(cand)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"bench: {name} not found (run with the project's .venv/bin/python)")
    return found


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat


def sys_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over cores (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    total = sum(v)
    return (total - v[3] - v[4]) / CLK_TCK, total / CLK_TCK


def other_load_pct(seconds: float) -> float:
    """CPU used on this machine by everything else, in % of one core, over ``seconds``."""
    b0, _ = sys_cpu_s()
    mine0 = time.process_time()
    time.sleep(seconds)
    b1, _ = sys_cpu_s()
    return 100 * ((b1 - b0) - (time.process_time() - mine0)) / seconds


def proc_status_kb(pid: int, key: str) -> int | None:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        from mitmproxy.version import VERSION as mitm_version
    except ImportError:
        mitm_version = "unknown"
    commit = "unknown"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitm_version,
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------- client
class HTTPError(Exception):
    pass


@dataclass(slots=True)
class Result:
    status: int
    ttfe: float | None  # seconds from request write to first complete SSE event
    total: float  # seconds from request write to the end of the body
    events: int
    ok: bool


class Conn:
    """One keep-alive HTTP/1.1 connection; parses just enough of the response."""

    def __init__(self, port: int, auth: str) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = bytearray()
        head = (f"POST /v1/responses HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"Authorization: Bearer {auth}\r\nContent-Type: application/json\r\n"
                "Accept: text/event-stream\r\n")
        self.req_stream = (head + f"Content-Length: {len(BODY_STREAM)}\r\n\r\n").encode() \
            + BODY_STREAM
        self.req_plain = (head.replace("Accept: text/event-stream", "Accept: application/json")
                          + f"Content-Length: {len(BODY_PLAIN)}\r\n\r\n").encode() + BODY_PLAIN

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.buf.clear()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def _fill(self) -> None:
        assert self.reader is not None
        data = await self.reader.read(65536)
        if not data:
            raise HTTPError("connection closed by peer")
        self.buf += data

    async def request(self, stream: bool) -> Result:
        if self.writer is None:
            await self.open()
        assert self.writer is not None
        buf = self.buf
        t0 = time.perf_counter()
        self.writer.write(self.req_stream if stream else self.req_plain)
        # status line + headers
        while (end := buf.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        parts: list[bytes] = []
        ttfe: float | None = None
        first = bytearray()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                while (nl := buf.find(b"\r\n")) < 0:
                    await self._fill()
                size = int(bytes(buf[:nl]).split(b";", 1)[0], 16)
                if size == 0:
                    del buf[: nl + 2]
                    while (nl := buf.find(b"\r\n")) < 0:  # trailers, then an empty line
                        await self._fill()
                    while nl != 0:
                        del buf[: nl + 2]
                        while (nl := buf.find(b"\r\n")) < 0:
                            await self._fill()
                    del buf[:2]
                    break
                need = nl + 2 + size + 2
                while len(buf) < need:
                    await self._fill()
                chunk = bytes(buf[nl + 2 : nl + 2 + size])
                del buf[:need]
                parts.append(chunk)
                if ttfe is None and stream:
                    first += chunk
                    if b"\n\n" in first:
                        ttfe = time.perf_counter() - t0
        else:
            length = int(headers.get("content-length", "0"))
            while len(buf) < length:
                await self._fill()
            parts.append(bytes(buf[:length]))
            del buf[:length]
        total = time.perf_counter() - t0
        if headers.get("connection", "").lower() == "close":
            self.close()
        body = b"".join(parts)
        if stream:
            events = body.count(b"event: ")
            ok = (status == 200 and events == EVENTS_PER_STREAM and ttfe is not None
                  and b"response.completed" in body)
        else:
            events = 0
            ok = status == 200 and b'"status":"completed"' in body.replace(b" ", b"")
        return Result(status, ttfe, total, events, ok)


# --------------------------------------------------------------------------- phases
@dataclass
class Phase:
    name: str
    concurrency: int
    stream: bool
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    ttfe_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    proxy_cpu_s: float | None = None
    upstream_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    machine_busy_s: float = 0.0  # all cores, every process (from /proc/stat)
    hit_time_limit: bool = False

    def summary(self) -> dict[str, Any]:
        ok = self.requests - self.errors
        d: dict[str, Any] = {
            "name": self.name, "concurrency": self.concurrency, "stream": self.stream,
            "requests": self.requests, "errors": self.errors,
            "error_samples": self.error_samples[:5], "wall_s": round(self.wall_s, 3),
            "rate_per_s": ok / self.wall_s if self.wall_s else None,
            "total_p50_ms": pct(self.total_ms, 0.5), "total_p99_ms": pct(self.total_ms, 0.99),
            "ttfe_p50_ms": pct(self.ttfe_ms, 0.5), "ttfe_p99_ms": pct(self.ttfe_ms, 0.99),
            "proxy_cpu_s": self.proxy_cpu_s, "upstream_cpu_s": self.upstream_cpu_s,
            "client_cpu_s": self.client_cpu_s,
            "client_cpu_pct": 100 * self.client_cpu_s / self.wall_s if self.wall_s else None,
            "upstream_cpu_pct": (100 * self.upstream_cpu_s / self.wall_s
                                 if self.wall_s and self.upstream_cpu_s is not None else None),
            "proxy_cpu_pct": (100 * self.proxy_cpu_s / self.wall_s
                              if self.wall_s and self.proxy_cpu_s is not None else None),
            "proxy_cpu_ms_per_req": (1000 * self.proxy_cpu_s / ok
                                     if ok and self.proxy_cpu_s is not None else None),
            "machine_busy_pct": (100 * self.machine_busy_s / self.wall_s
                                 if self.wall_s else None),
            # CPU used by processes outside this benchmark, % of one core
            "other_cpu_pct": (100 * (self.machine_busy_s - self.client_cpu_s
                                     - (self.upstream_cpu_s or 0) - (self.proxy_cpu_s or 0))
                              / self.wall_s if self.wall_s else None),
            "hit_time_limit": self.hit_time_limit,
        }
        return d


async def run_phase(phase: Phase, port: int, auth: str, *, per_worker: int | None,
                    duration_s: float | None, time_limit_s: float, proxy_pid: int | None,
                    upstream_pid: int, stagger_s: float = 0.05, record: bool = True) -> Phase:
    """Closed loop: ``concurrency`` workers, each on its own keep-alive connection, each
    warmed by one unmeasured request, released together (start staggered over
    ``stagger_s``); each sends ``per_worker`` requests or until ``duration_s``."""
    c = phase.concurrency
    conns = [Conn(port, auth) for _ in range(c)]

    async def warm(conn: Conn) -> None:
        await conn.open()
        r = await conn.request(phase.stream)
        if not r.ok:
            raise RuntimeError(f"{phase.name}: warm-up request failed (status {r.status}, "
                               f"{r.events} events)")

    await asyncio.gather(*(warm(cn) for cn in conns))
    go = asyncio.Event()
    stop_at = [0.0]
    limit_at = [0.0]

    async def worker(i: int, conn: Conn) -> None:
        await go.wait()
        if stagger_s and c > 1:
            await asyncio.sleep(stagger_s * i / c)
        n = 0
        while True:
            now = time.perf_counter()
            if per_worker is not None and n >= per_worker:
                break
            if duration_s is not None and now >= stop_at[0]:
                break
            if now >= limit_at[0]:
                phase.hit_time_limit = True
                break
            n += 1
            try:
                r = await conn.request(phase.stream)
            except (OSError, HTTPError, ValueError, IndexError) as e:
                phase.requests += 1
                phase.errors += 1
                phase.error_samples.append(f"{type(e).__name__}: {e}")
                conn.close()
                continue
            phase.requests += 1
            if not r.ok:
                phase.errors += 1
                phase.error_samples.append(f"status {r.status}, {r.events} events")
                continue
            if record:
                phase.total_ms.append(r.total * 1000)
                if r.ttfe is not None:
                    phase.ttfe_ms.append(r.ttfe * 1000)

    tasks = [asyncio.create_task(worker(i, cn)) for i, cn in enumerate(conns)]
    await asyncio.sleep(0.05)  # let every worker reach go.wait()
    p0 = proc_cpu_s(proxy_pid) if proxy_pid else None
    u0 = proc_cpu_s(upstream_pid)
    c0 = time.process_time()
    m0, _ = sys_cpu_s()
    t0 = time.perf_counter()
    stop_at[0] = t0 + (duration_s or 0)
    limit_at[0] = t0 + time_limit_s
    go.set()
    await asyncio.gather(*tasks)
    phase.wall_s = time.perf_counter() - t0
    phase.client_cpu_s = time.process_time() - c0
    phase.machine_busy_s = sys_cpu_s()[0] - m0
    phase.upstream_cpu_s = proc_cpu_s(upstream_pid) - u0
    if proxy_pid:
        assert p0 is not None
        phase.proxy_cpu_s = proc_cpu_s(proxy_pid) - p0
    for cn in conns:
        cn.close()
    await asyncio.sleep(0.2)  # let the target finish tearing the connections down
    return phase


# --------------------------------------------------------------------------- processes
class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen[bytes]:
        err = open(self.workdir / f"{name}.stderr", "wb")
        p = subprocess.Popen(argv, stdout=stdout if stdout is not None else subprocess.DEVNULL,
                             stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.procs.append((name, p))
        return p

    def stderr_tail(self, name: str, n: int = 20) -> str:
        path = self.workdir / f"{name}.stderr"
        if not path.exists():
            return ""
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-n:])

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 15) -> int | None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            self.stop(p)


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], what: str,
              procs: Procs, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n"
                               f"{procs.stderr_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} after {timeout:.0f}s:\n"
                       f"{procs.stderr_tail(name)}")


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], what: str,
              procs: Procs, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n"
                               f"{procs.stderr_tail(name)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not listening on {port} after {timeout:.0f}s")


def start_fake(procs: Procs) -> tuple[subprocess.Popen[bytes], int]:
    script = ROOT / "tests" / "fakeprovider.py"
    argv = [sys.executable, str(script), "--port", "0", "--delta-count", str(DELTA_COUNT),
            "--tool-calls", "0", "--answer", ANSWER]
    p = procs.start("fakeprovider", argv, stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()  # the base URL, once it accepts connections
    if not line.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"fake provider did not start: {line!r}\n"
                           f"{procs.stderr_tail('fakeprovider')}")
    port = int(line.split(":")[2].split("/")[0])
    return p, port


def start_mitmdump(procs: Procs, fake_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    confdir = procs.workdir / "mitmproxy-conf"
    confdir.mkdir(exist_ok=True)
    p = procs.start("mitmdump", [
        venv_bin("mitmdump"), "--mode", f"reverse:http://{HOST}:{fake_port}@{HOST}:{port}",
        "--set", "stream_large_bodies=1", "--set", "connection_strategy=lazy",
        "--set", f"confdir={confdir}", "-q"])
    wait_port(port, 30, p, "mitmdump", procs, "mitmdump")
    return p, port


def egress_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_EGRESS_")}
    env["AGENT_EGRESS_HOME"] = str(home)
    return env


def start_egress(procs: Procs, fake_port: int) -> tuple[subprocess.Popen[bytes], int, str, Path]:
    home = procs.workdir / "egress-home"
    home.mkdir(mode=0o700)
    port, admin = free_port(), free_port()
    (home / "config.yaml").write_text(
        f'listen: {{reverse: "{HOST}:{port}", proxy: null, admin: "{HOST}:{admin}"}}\n'
        f'providers: [{{name: openai, kind: openai, base_url: "http://{HOST}:{fake_port}/v1",'
        ' key: openai}]\n'
        "log_level: warning\n", encoding="utf-8")
    env = egress_env(home)
    cli = venv_bin("agent-egress")
    subprocess.run([cli, "vault", "set", "openai"], input=b"sk-bench-key", env=env, check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run([cli, "token", "issue", "--user", "bench", "--team", "bench",
                          "--format", "json"], env=env, check=True, capture_output=True,
                         timeout=60)
    token = json.loads(out.stdout)["token"]
    p = procs.start("agent-egress", [cli, "run"], env=env)
    wait_http(f"http://{HOST}:{admin}/readyz", 60, p, "agent-egress", procs, "agent-egress")
    return p, port, token, home


def egress_ledger_calls(home: Path) -> int | None:
    """Calls in the gateway's ledger (run after it stopped, so everything is flushed)."""
    try:
        out = subprocess.run([venv_bin("agent-egress"), "spend", "--by", "team", "--format",
                              "json"], env=egress_env(home), capture_output=True, check=True,
                             timeout=60)
        return sum(int(r["calls"]) for r in json.loads(out.stdout))
    except (subprocess.SubprocessError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- driver
@dataclass
class Plan:
    levels: list[int]
    min_streams_c1: int
    min_streams: int
    min_per_worker: int
    plain_concurrency: int
    plain_duration_s: float
    level_time_limit_s: float
    warmup_streams: int
    warmup_plain: int

    def per_worker(self, c: int) -> int:
        if c == 1:
            return self.min_streams_c1
        return max(math.ceil(self.min_streams / c), self.min_per_worker)


def plan_for(args: argparse.Namespace) -> Plan:
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if args.quick:
        return Plan(levels, 30, 64, 2, args.plain_concurrency, 2.0, 20.0, 8, 20)
    return Plan(levels, 1000, 1600, 25, args.plain_concurrency, args.plain_duration, 60.0, 100,
                400)


async def bench_target(name: str, port: int, auth: str, proxy_pid: int | None,
                       upstream_pid: int, plan: Plan, sent: list[int]) -> dict[str, Any]:
    lim = plan.level_time_limit_s
    # warm-up (unrecorded): streams and plain calls at a small concurrency
    w = await run_phase(Phase("warmup-stream", 4, True), port, auth,
                        per_worker=max(1, plan.warmup_streams // 4), duration_s=None,
                        time_limit_s=lim, proxy_pid=proxy_pid, upstream_pid=upstream_pid,
                        record=False)
    w2 = await run_phase(Phase("warmup-plain", 4, False), port, auth,
                         per_worker=max(1, plan.warmup_plain // 4), duration_s=None,
                         time_limit_s=lim, proxy_pid=proxy_pid, upstream_pid=upstream_pid,
                         record=False)
    sent[0] += w.requests + w2.requests + 8
    phases = []
    for c in plan.levels:
        ph = await run_phase(Phase(f"stream@{c}", c, True), port, auth,
                             per_worker=plan.per_worker(c), duration_s=None, time_limit_s=lim,
                             proxy_pid=proxy_pid, upstream_pid=upstream_pid)
        sent[0] += ph.requests + c
        phases.append(ph.summary())
        s = phases[-1]
        print(f"  {name:<12} stream c={c:<3} n={ph.requests:<5} err={ph.errors} "
              f"ttfe p50={s['ttfe_p50_ms'] or 0:7.2f} p99={s['ttfe_p99_ms'] or 0:7.2f} ms  "
              f"total p50={s['total_p50_ms'] or 0:7.2f} p99={s['total_p99_ms'] or 0:7.2f} ms  "
              f"{s['rate_per_s'] or 0:6.1f}/s  client cpu {s['client_cpu_pct']:.0f}%",
              file=sys.stderr, flush=True)
    c = plan.plain_concurrency
    ph = await run_phase(Phase(f"plain@{c}", c, False), port, auth, per_worker=None,
                         duration_s=plan.plain_duration_s, time_limit_s=lim,
                         proxy_pid=proxy_pid, upstream_pid=upstream_pid)
    sent[0] += ph.requests + c
    phases.append(ph.summary())
    s = phases[-1]
    print(f"  {name:<12} plain  c={c:<3} n={ph.requests:<5} err={ph.errors} "
          f"{s['rate_per_s'] or 0:7.1f} req/s  p50={s['total_p50_ms'] or 0:.2f} ms  "
          f"client cpu {s['client_cpu_pct']:.0f}%", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"target": name, "phases": phases}
    if proxy_pid:
        result["peak_rss_kb"] = proc_status_kb(proxy_pid, "VmHWM")
    return result


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    targets = [t for t in TARGETS if t in results["targets"]]
    by = {t: {p["name"]: p for p in results["targets"][t]["phases"]} for t in targets}
    plan = results["plan"]
    levels = plan["levels"]
    pc = plan["plain_concurrency"]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn: Any) -> None:
        rows.append((label, [fn(t) for t in targets]))

    for c in levels:
        k = f"stream@{c}"
        add(f"TTFE p50 / p99 ms @c={c}",
            lambda t, k=k: f"{fmt(by[t][k]['ttfe_p50_ms'], 2)} / {fmt(by[t][k]['ttfe_p99_ms'], 2)}")
    for c in levels:
        k = f"stream@{c}"
        add(f"stream total p50 / p99 ms @c={c}",
            lambda t, k=k: f"{fmt(by[t][k]['total_p50_ms'], 2)} / "
                           f"{fmt(by[t][k]['total_p99_ms'], 2)}")
    for c in levels:
        k = f"stream@{c}"
        add(f"streams/s @c={c} (n, errors)",
            lambda t, k=k: f"{fmt(by[t][k]['rate_per_s'])} ({by[t][k]['requests']}, "
                           f"{by[t][k]['errors']})")
    kp = f"plain@{pc}"
    add(f"non-streaming req/s @c={pc} (n, errors)",
        lambda t: f"{fmt(by[t][kp]['rate_per_s'])} ({by[t][kp]['requests']}, "
                  f"{by[t][kp]['errors']})")
    add(f"non-streaming p50 / p99 ms @c={pc}",
        lambda t: f"{fmt(by[t][kp]['total_p50_ms'], 2)} / {fmt(by[t][kp]['total_p99_ms'], 2)}")
    if 1 in levels:
        d = by.get("direct", {}).get("stream@1")

        def overhead(t: str, key: str) -> str:
            if t == "direct" or d is None or by[t]["stream@1"][key] is None:
                return "-"
            return f"+{by[t]['stream@1'][key] - d[key]:.2f}"

        add("overhead vs direct, TTFE p50 ms @c=1", lambda t: overhead(t, "ttfe_p50_ms"))
        add("overhead vs direct, total p50 ms @c=1", lambda t: overhead(t, "total_p50_ms"))
    for c in levels:
        k = f"stream@{c}"
        add(f"proxy CPU ms/stream @c={c} (proxy core %)",
            lambda t, k=k: "-" if t == "direct" else
            f"{fmt(by[t][k]['proxy_cpu_ms_per_req'], 2)} ({fmt(by[t][k]['proxy_cpu_pct'], 0)}%)")
    add(f"proxy CPU ms/request, non-streaming @c={pc} (proxy core %)",
        lambda t: "-" if t == "direct" else
        f"{fmt(by[t][kp]['proxy_cpu_ms_per_req'], 2)} ({fmt(by[t][kp]['proxy_cpu_pct'], 0)}%)")
    add("proxy peak RSS MiB (VmHWM)",
        lambda t: "-" if t == "direct" else fmt(results["targets"][t]["peak_rss_kb"] / 1024))
    add("client CPU % of one core, max over phases",
        lambda t: fmt(max(p["client_cpu_pct"] for p in by[t].values()), 0))
    add("fake upstream CPU % of one core, max over phases",
        lambda t: fmt(max(p["upstream_cpu_pct"] for p in by[t].values()), 0))
    add("other processes' CPU % of one core, max over phases",
        lambda t: fmt(max(0, *(p["other_cpu_pct"] for p in by[t].values())), 0))

    counts = ", ".join(f"c={c}: {by[targets[0]]['stream@' + str(c)]['requests']} streams"
                       for c in levels)
    lines = [
        f"Date: {m['date']}. Machine: {m['nproc']} cores, {m['cpu_model']}, Linux "
        f"{m['kernel']}; Python {m['python']}, mitmproxy {m['mitmproxy']}; commit "
        f"{m['commit']}.",
        f"Streams: {EVENTS_PER_STREAM} SSE events each; levels {levels} "
        f"({counts} per target); non-streaming: c={pc} for {plan['plain_duration_s']:g} s."
        f"{' QUICK run.' if plan['quick'] else ''}",
        "",
        "| metric | " + " | ".join(targets) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    lines.append("")
    if "ledger_calls" in results:
        lines.append(f"agent-egress ledger: {results['ledger_calls']} rows for "
                     f"{results['egress_calls_sent']} calls sent (warm-ups included).")
    lines.append(f"Other processes' CPU before the run: {results['other_cpu_pct_before']:.0f}%"
                 " of one core.")
    busy = [f"{t}/{p['name']} ({p['other_cpu_pct']:.0f}%)" for t in targets
            for p in by[t].values() if p["other_cpu_pct"] > 20]
    if busy:
        lines.append("WARNING: other processes used over 20% of a core during "
                     f"{', '.join(busy)}: those numbers are distorted; rerun on a quiet machine.")
    limited = [f"{t}/{p['name']}" for t in targets for p in by[t].values() if p["hit_time_limit"]]
    if limited:
        lines.append(f"Time limit hit (fewer requests than planned): {', '.join(limited)}")
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    plan = plan_for(args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise SystemExit(f"bench: unknown target(s) {bad}; choose from {TARGETS}")
    t_wait = time.monotonic()
    other = other_load_pct(2.0)
    if other > 20 and args.wait_idle > 0:
        print(f"bench: other processes use {other:.0f}% of a core; waiting up to "
              f"{args.wait_idle:.0f} s for the machine to be idle", file=sys.stderr, flush=True)
        give_up = time.monotonic() + args.wait_idle
        while other > 20 and time.monotonic() < give_up:
            other = other_load_pct(5.0)
    if other > 20:
        print(f"bench: WARNING: other processes use {other:.0f}% of a core; results will be "
              "distorted", file=sys.stderr, flush=True)
    waited = time.monotonic() - t_wait
    t_start = time.monotonic()
    results: dict[str, Any] = {"machine": machine_info(),
                               "plan": {**asdict(plan), "quick": args.quick},
                               "client": "raw asyncio streams, HTTP/1.1 keep-alive, one "
                                         "connection per worker, closed loop",
                               "other_cpu_pct_before": round(other, 1),
                               "waited_for_idle_s": round(waited, 1),
                               "targets": {}}
    with tempfile.TemporaryDirectory(prefix="agent-egress-bench-") as tmp:
        procs = Procs(Path(tmp))
        try:
            fake, fake_port = start_fake(procs)
            print(f"fake upstream pid {fake.pid} on :{fake_port}", file=sys.stderr)
            for t in targets:
                sent = [0]
                home: Path | None = None
                if t == "direct":
                    proc, port, auth = None, fake_port, "sk-bench-key"
                elif t == "mitmproxy":
                    proc, port = start_mitmdump(procs, fake_port)
                    auth = "sk-bench-key"
                else:
                    proc, port, auth, home = start_egress(procs, fake_port)
                print(f"{t}: port {port}" + (f", pid {proc.pid}" if proc else ""),
                      file=sys.stderr, flush=True)
                res = await bench_target(t, port, auth, proc.pid if proc else None, fake.pid,
                                         plan, sent)
                results["targets"][t] = res
                if proc is not None:
                    rc = procs.stop(proc)
                    res["exit_code"] = rc
                    if rc not in (0, -signal.SIGTERM):
                        print(f"  {t} exited with {rc}:\n{procs.stderr_tail(t)}",
                              file=sys.stderr)
                    tail = procs.stderr_tail(t, 10)
                    if tail:
                        res["stderr_tail"] = tail
                if home is not None:
                    results["ledger_calls"] = egress_ledger_calls(home)
                    results["egress_calls_sent"] = sent[0]
        finally:
            procs.stop_all()
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    table = render(results)
    print(table)
    print(f"\n(run took {results['elapsed_s']:.0f} s, plus {waited:.0f} s checking that the"
          " machine is idle)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"raw results: {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--levels", default="1,16,64", help="stream concurrency levels (1,16,64)")
    p.add_argument("--json", metavar="PATH", help="write raw results (JSON) here")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="subset of direct,mitmproxy,agent-egress")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before starting, wait up to this long for other processes to go"
                        " quiet (under 20%% of a core)")
    p.add_argument("--plain-concurrency", type=int, default=16,
                   help="concurrency of the non-streaming phase (16)")
    p.add_argument("--plain-duration", type=float, default=5.0,
                   help="seconds of the non-streaming phase (5; --quick: 2)")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

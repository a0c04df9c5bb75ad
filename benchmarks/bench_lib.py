"""The benchmark's load generator and process plumbing (used by bench.py and soak.py).

Stdlib only, so the client costs the same whatever target it drives: a lean HTTP/1.1
client on raw asyncio streams (one keep-alive connection per worker, closed loop), CPU
and memory of the measured processes read from /proc, and a small process supervisor.
"""

from __future__ import annotations

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
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DELTA_COUNT = 47  # -> 52 SSE events per stream
EVENTS_PER_STREAM = DELTA_COUNT + 5
ANSWER = ("The quick brown fox jumps over the lazy dog. " * 5).strip()  # 224 chars
MODEL = "gpt-5.5"
BODY_STREAM = json.dumps(
    {"model": MODEL, "input": [{"role": "user", "content": "hi"}], "stream": True,
     "store": False}, separators=(",", ":")).encode()
BODY_PLAIN = json.dumps(
    {"model": MODEL, "input": [{"role": "user", "content": "hi"}], "stream": False,
     "store": False}, separators=(",", ":")).encode()
CLK_TCK = os.sysconf("SC_CLK_TCK")
REQUEST_TIMEOUT_S = 30.0  # one request; a hung target must not hang the benchmark


# --------------------------------------------------------------------------- /proc
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
    """utime + stime of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (LiteLLM's uvicorn workers are children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def cpu_of(pids: list[int]) -> float:
    return sum(proc_cpu_s(p) for p in pids)


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
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kb(pids: list[int], key: str = "VmRSS") -> int:
    """Summed over processes (VmHWM: each process's own peak)."""
    return sum(proc_status_kb(p, key) or 0 for p in pids)


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
    body: bytes | None = None  # kept only when asked for (fidelity check)


def count_events(body: bytes) -> int:
    """SSE events carrying data, ``data: [DONE]`` excluded: works with or without
    ``event:`` lines (LiteLLM drops them)."""
    n = body.count(b"\ndata:") + body.startswith(b"data:")
    return n - body.count(b"data: [DONE]")


class Conn:
    """One keep-alive HTTP/1.1 connection; parses just enough of the response."""

    def __init__(self, port: int, auth: str) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = bytearray()
        self.got_bytes = False
        self.reconnects = 0
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
        self.got_bytes = True
        self.buf += data

    async def request(self, stream: bool, keep_body: bool = False) -> Result:
        """One request; resent once on a new connection when a reused keep-alive
        connection turns out closed before any response byte (the server's idle
        timeout, e.g. uvicorn's 5 s, raced us: it never saw the request)."""
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            reused = self.writer is not None
            try:
                return await self._request(stream, keep_body)
            except (HTTPError, ConnectionResetError, BrokenPipeError):
                if not reused or self.got_bytes:
                    raise
            self.close()
            self.reconnects += 1
            return await self._request(stream, keep_body)

    async def _request(self, stream: bool, keep_body: bool) -> Result:
        if self.writer is None:
            await self.open()
        assert self.writer is not None
        buf = self.buf
        self.got_bytes = False
        t0 = time.perf_counter()
        self.writer.write(self.req_stream if stream else self.req_plain)
        while (end := buf.find(b"\r\n\r\n")) < 0:  # status line + headers
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
            events = count_events(body)
            ok = (status == 200 and events == EVENTS_PER_STREAM and ttfe is not None
                  and b"response.completed" in body)
        else:
            events = 0
            ok = status == 200 and b'"status":"completed"' in body.replace(b" ", b"")
        return Result(status, ttfe, total, events, ok, body if keep_body else None)


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
    lb_cpu_s: float | None = None  # HAProxy, in the scale-out runs
    upstream_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    machine_busy_s: float = 0.0  # all cores, every process (from /proc/stat)
    peak_rss_kb: int | None = None  # gateway processes' summed RSS, sampled every 0.1 s
    hit_time_limit: bool = False
    warm_errors: int = 0
    reconnects: int = 0  # idle keep-alive connections the target had closed (resent)

    def summary(self) -> dict[str, Any]:
        ok = self.requests - self.errors
        w = self.wall_s
        mine = self.client_cpu_s + (self.upstream_cpu_s or 0) + (self.proxy_cpu_s or 0) \
            + (self.lb_cpu_s or 0)
        return {
            "name": self.name, "concurrency": self.concurrency, "stream": self.stream,
            "requests": self.requests, "errors": self.errors, "warm_errors": self.warm_errors,
            "reconnects": self.reconnects,
            "error_samples": self.error_samples[:5], "wall_s": round(w, 3),
            "rate_per_s": ok / w if w else None,
            "total_p50_ms": pct(self.total_ms, 0.5), "total_p99_ms": pct(self.total_ms, 0.99),
            "ttfe_p50_ms": pct(self.ttfe_ms, 0.5), "ttfe_p99_ms": pct(self.ttfe_ms, 0.99),
            "proxy_cpu_s": self.proxy_cpu_s, "upstream_cpu_s": self.upstream_cpu_s,
            "lb_cpu_s": self.lb_cpu_s, "client_cpu_s": self.client_cpu_s,
            "client_cpu_pct": 100 * self.client_cpu_s / w if w else None,
            "upstream_cpu_pct": (100 * self.upstream_cpu_s / w
                                 if w and self.upstream_cpu_s is not None else None),
            "proxy_cpu_pct": (100 * self.proxy_cpu_s / w
                              if w and self.proxy_cpu_s is not None else None),
            "proxy_cpu_ms_per_req": (1000 * self.proxy_cpu_s / ok
                                     if ok and self.proxy_cpu_s is not None else None),
            "machine_busy_pct": 100 * self.machine_busy_s / w if w else None,
            # CPU used by processes outside this benchmark, % of one core
            "other_cpu_pct": 100 * (self.machine_busy_s - mine) / w if w else None,
            "peak_rss_kb": self.peak_rss_kb,
            "hit_time_limit": self.hit_time_limit,
        }


async def _sample_rss(pids: list[int], phase: Phase, stop: asyncio.Event) -> None:
    while not stop.is_set():
        phase.peak_rss_kb = max(phase.peak_rss_kb or 0, rss_kb(pids))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def run_phase(phase: Phase, port: int, auth: str, *, per_worker: int | None,
                    duration_s: float | None, time_limit_s: float, proxy_pids: list[int],
                    upstream_pid: int, lb_pids: list[int] | None = None,
                    stagger_s: float = 0.05, record: bool = True) -> Phase:
    """Closed loop: ``concurrency`` workers, each on its own keep-alive connection, each
    warmed by one unmeasured request, released together (start staggered over
    ``stagger_s``); each sends ``per_worker`` requests or until ``duration_s``.
    Failed requests (status, event count, timeout, reset) are counted, not raised."""
    c = phase.concurrency
    conns = [Conn(port, auth) for _ in range(c)]

    def fail(what: str, conn: Conn) -> None:
        phase.errors += 1
        phase.requests += 1
        phase.error_samples.append(what)
        conn.close()

    async def warm(conn: Conn) -> None:
        try:
            await conn.open()
            r = await conn.request(phase.stream)
        except (OSError, HTTPError, ValueError, IndexError, TimeoutError) as e:
            phase.warm_errors += 1
            phase.error_samples.append(f"warm-up: {type(e).__name__}: {e}")
            conn.close()
            return
        if not r.ok:
            phase.warm_errors += 1
            phase.error_samples.append(f"warm-up: status {r.status}, {r.events} events")

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
            except (OSError, HTTPError, ValueError, IndexError, TimeoutError) as e:
                fail(f"{type(e).__name__}: {e}", conn)
                continue
            if not r.ok:
                fail(f"status {r.status}, {r.events} events", conn)
                continue
            phase.requests += 1
            if record:
                phase.total_ms.append(r.total * 1000)
                if r.ttfe is not None:
                    phase.ttfe_ms.append(r.ttfe * 1000)

    tasks = [asyncio.create_task(worker(i, cn)) for i, cn in enumerate(conns)]
    await asyncio.sleep(0.05)  # let every worker reach go.wait()
    stop_rss = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(proxy_pids, phase, stop_rss)) if proxy_pids \
        else None
    p0, l0 = cpu_of(proxy_pids), cpu_of(lb_pids or [])
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
    if proxy_pids:
        phase.proxy_cpu_s = cpu_of(proxy_pids) - p0
    if lb_pids:
        phase.lb_cpu_s = cpu_of(lb_pids) - l0
    stop_rss.set()
    if sampler is not None:
        await sampler
    phase.reconnects = sum(cn.reconnects for cn in conns)
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
                             stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                             start_new_session=True)
        self.procs.append((name, p))
        return p

    def stderr_tail(self, name: str, n: int = 20) -> str:
        path = self.workdir / f"{name}.stderr"
        if not path.exists():
            return ""
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-n:])

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 15) -> int | None:
        """SIGTERM to the process group (it is its own session: workers go too)."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        with contextlib.suppress(ProcessLookupError):  # leftover children of the group
            os.killpg(p.pid, signal.SIGKILL)
        return p.returncode

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            self.stop(p)


def _wait(ready: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes],
          what: str, procs: Procs, name: str, not_ready: str) -> None:
    """Poll ``ready`` every 0.1 s until it holds, the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n"
                               f"{procs.stderr_tail(name)}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} {not_ready} after {timeout:.0f}s:\n{procs.stderr_tail(name)}")


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], what: str,
              procs: Procs, name: str) -> None:
    def ok() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False
    _wait(ok, timeout, proc, what, procs, name, f"not ready at {url}")


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], what: str,
              procs: Procs, name: str) -> None:
    def listening() -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return True
        except OSError:
            return False
    _wait(listening, timeout, proc, what, procs, name, f"not listening on {port}")


def start_fake(procs: Procs, event_delay: float = 0.0,
               name: str = "fakeprovider") -> tuple[subprocess.Popen[bytes], int]:
    """``tests/fakeprovider.py`` in its own process: 52-event streams, no tool calls,
    ``event_delay`` seconds between events (0: back to back)."""
    script = ROOT / "tests" / "fakeprovider.py"
    argv = [sys.executable, str(script), "--port", "0", "--delta-count", str(DELTA_COUNT),
            "--tool-calls", "0", "--answer", ANSWER, "--event-delay", str(event_delay)]
    p = procs.start(name, argv, stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()  # the base URL, once it accepts connections
    if not line.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"fake provider did not start: {line!r}\n{procs.stderr_tail(name)}")
    port = int(line.split(":")[2].split("/")[0])
    return p, port

"""Guardrails benchmark: scan throughput, per-call cost over a long session, TTFT.

    .venv/bin/python benchmarks/guardrails_bench.py [--quick] [--only scan,session,ttft]
                                                    [--runs 3] [--json PATH]

Three measurements (results table on stdout, progress on stderr):

* scan: MB/s of ``Engine.scan`` per check (secrets, PII, injection, custom rules,
  and the default policy with the custom rules) over ~1 MiB each of real code
  (mitmproxy's source), prose (licence texts and this repo's docs) and JSON tool
  output (npm's ``.package-lock.json`` of the bundled Codex, botocore examples),
  cut into ~4 KiB tool outputs the way an agent sends them.
* session: a synthetic Codex session of 200 calls whose ``input`` grows to ~1 MB,
  each call's input extending the previous one (a developer prompt, then
  ``function_call`` + ``function_call_output`` pairs and now and then a user turn).
  Every call goes through ``GuardInput.request`` (the gateway's step-3 hook, on a
  ``mitmproxy.test.tflow`` flow, verdict cache included), through the same hook with
  guardrails off (body parsing only), and through the guard alone with the cache
  disabled (calls 1-10 and 190-200 only). Also: the cost of a scan on the event loop
  versus in a worker thread by size, which sets ``inline_scan_bytes``.
* ttft: a real ``agent-egress run`` subprocess in front of ``tests/fakeprovider.py``
  (its own process). Paced streams (``--delta-chars`` characters per text delta,
  ``--event-delay`` seconds between events, like a model at ~100 tokens/s) measure
  the hold-back window's cost to the first visible token; unpaced streams (all
  events at once) measure its CPU cost. Targets: the fake directly, the gateway
  with guardrails disabled, with the output guard off, and on at several
  ``holdback_chars``.

Every measurement is repeated ``--runs`` times; tables show the median over runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # benchmarks/ is not a package
    HOST,
    ROOT,
    Procs,
    egress_env,
    free_port,
    machine_info,
    other_load_pct,
    pct,
    proc_cpu_s,
    venv_bin,
    wait_http,
)

SITE = Path(sysconfig.get_paths()["purelib"])
MIB = 1 << 20
CUSTOM = [
    {"name": "internal-hosts", "regex": r"\b[a-z0-9-]+\.corp\.internal\b", "action": "redact"},
    {"name": "codenames", "action": "flag",
     "keywords": ["bluebird", "nightjar", "project kestrel", "atlas-next", "hummingbird",
                  "red-kite", "osprey", "merlin-v2", "peregrine", "goshawk", "harrier",
                  "sparrowhawk", "buzzard", "kestrel-ops", "falconry", "lanner",
                  "saker", "gyrfalcon", "hobby-net", "eyas"]},
]
CHECKS: dict[str, dict[str, Any]] = {
    "secrets": {"secrets": {}, "pii": {"enabled": False}, "injection": {"enabled": False}},
    "secrets+entropy": {"secrets": {"entropy": True}, "pii": {"enabled": False},
                        "injection": {"enabled": False}},
    "pii (4 default entities)": {"secrets": {"enabled": False}, "pii": {},
                                 "injection": {"enabled": False}},
    "pii (all 13 entities)": {"secrets": {"enabled": False},
                              "pii": {"entities": "ALL"}, "injection": {"enabled": False}},
    "injection": {"secrets": {"enabled": False}, "pii": {"enabled": False}, "injection": {}},
    "custom (2 rules)": {"secrets": {"enabled": False}, "pii": {"enabled": False},
                         "injection": {"enabled": False}, "custom": CUSTOM},
    "default policy + custom": {"custom": CUSTOM},
}
ANSWER = (
    "To fix the failing test, open src/orders/total.py and look at compute_total. The loop "
    "adds the discount twice when an order has more than one coupon, so the expected value "
    "in test_total_with_coupons is off by the second discount. Change the loop so that each "
    "coupon is applied once, then run the tests again with pytest -q tests/test_total.py. "
    "I also noticed that the helper format_money rounds half down; Python's round uses "
    "banker's rounding, which is why 2.675 becomes 2.67. Use Decimal with ROUND_HALF_UP "
    "if the invoices must match the accounting system. Nothing else in the diff needs to "
    "change, and the public API stays the same, so no callers have to be updated."
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- corpora
def _take(paths: list[Path], limit: int) -> str:
    out: list[str] = []
    size = 0
    for p in paths:
        try:
            text = p.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.append(text)
        size += len(text.encode())
        if size >= limit:
            break
    return "".join(out).encode()[:limit].decode("utf-8", "ignore")


def corpora(limit: int) -> dict[str, str]:
    code = _take(sorted((SITE / "mitmproxy").rglob("*.py")), limit)
    prose_paths = sorted(Path("/usr/share/common-licenses").glob("*"))
    prose_paths += [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
                    Path("/work/shared/DESIGN.md")]
    prose_paths += sorted(SITE.glob("*.dist-info/METADATA"))
    prose = _take([p for p in prose_paths if p.is_file() and not p.is_symlink()], limit)
    lock = ROOT / "tools" / "codex" / "node_modules" / ".package-lock.json"
    json_paths = [lock, *sorted((SITE / "botocore" / "data").glob("*/*/examples-1.json"))]
    js = _take([p for p in json_paths if p.is_file()], limit)
    return {"code": code, "prose": prose, "json": js}


def items_of(text: str, size: int = 4096) -> list[str]:
    """Cut at line ends into ~``size``-byte tool outputs."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def make_engine(policy: dict[str, Any]) -> Any:
    from agent_egress.addon.guardrails.config import PII_ENTITIES, GuardrailsConfig
    from agent_egress.addon.guardrails.engine import Guardrails

    policy = json.loads(json.dumps(policy))
    if policy.get("pii", {}).get("entities") == "ALL":
        policy["pii"]["entities"] = sorted(PII_ENTITIES)
    cfg = GuardrailsConfig.model_validate({"default": policy})
    return Guardrails(cfg).engine_for("bench", "bench", "key_bench")


# --------------------------------------------------------------------------- scan
def bench_scan(limit: int, runs: int) -> dict[str, Any]:
    texts = corpora(limit)
    chunks = {name: items_of(t) for name, t in texts.items()}
    sizes = {name: sum(len(c.encode()) for c in cs) for name, cs in chunks.items()}
    log("scan: corpora " + ", ".join(f"{n} {s / MIB:.2f} MiB in {len(chunks[n])} items"
                                     for n, s in sizes.items()))
    results: dict[str, Any] = {"bytes": sizes, "items": {n: len(c) for n, c in chunks.items()},
                               "checks": {}}
    for check, policy in CHECKS.items():
        engine = make_engine(policy)
        engine.scan("warm up", "tool_output", "tool")
        row: dict[str, Any] = {}
        for name, cs in chunks.items():
            rates, hits = [], 0
            for _ in range(runs):
                t0 = time.perf_counter()
                found = [engine.scan(c, "tool_output", "tool") for c in cs]
                rates.append(sizes[name] / MIB / (time.perf_counter() - t0))
                hits = sum(len(f) for f in found)
            row[name] = {"mib_s": med(rates), "all_mib_s": rates, "findings": hits}
        results["checks"][check] = row
        log(f"scan: {check}: " + ", ".join(f"{n} {r['mib_s']:.2f} MiB/s ({r['findings']} hits)"
                                           for n, r in row.items()))
    return results


# --------------------------------------------------------------------------- session
def session_bodies(n_calls: int, target: int, seed: int = 11) -> list[bytes]:
    """Request bodies of one synthetic Codex session; each input extends the last."""
    rnd = random.Random(seed)
    texts = corpora(2 * MIB)
    pools = {k: items_of(v, 512) for k, v in texts.items()}
    session = str(uuid.UUID(int=rnd.getrandbits(128)))
    history: list[dict[str, Any]] = [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": texts["prose"][:12_000]}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text":
            "<environment_context><cwd>/home/dev/shop</cwd><shell>bash</shell>"
            "</environment_context>"}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "fix the failing order total test"}]},
    ]
    per_call = max(200, (target - 14_000) // n_calls)
    kinds = ["code", "json", "prose", "code"]
    bodies: list[bytes] = []
    for i in range(n_calls):
        if i:
            if i % 25 == 0:
                history.append({"type": "message", "role": "assistant", "content": [
                    {"type": "output_text", "text": ANSWER[: rnd.randint(200, len(ANSWER))]}]})
                history.append({"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": f"now step {i}: also check the invoices"}]})
            call_id = f"call_{i:04d}"
            history.append({"type": "function_call", "name": "exec_command", "call_id": call_id,
                            "arguments": json.dumps({"cmd": f"sed -n {i},{i + 80}p src/f{i}.py"})})
            pool = pools[kinds[i % len(kinds)]]
            want = int(per_call * rnd.uniform(0.3, 1.7))
            start = rnd.randrange(len(pool))
            out, n = [], 0
            while n < want:
                piece = pool[(start + len(out)) % len(pool)]
                out.append(piece)
                n += len(piece)
            history.append({"type": "function_call_output", "call_id": call_id,
                            "output": f"Chunk ID: {i}\nOutput:\n" + "".join(out)[:want]})
        body = {"model": "gpt-5.5", "input": history, "tools": [
            {"type": "function", "name": "exec_command", "parameters": {"type": "object"}}],
            "stream": True, "store": False, "prompt_cache_key": session}
        bodies.append(json.dumps(body, separators=(",", ":")).encode())
    return bodies


def _flow(body: bytes, session: str, principal: Any) -> Any:
    from mitmproxy.test import tflow

    from agent_egress.addon.call import METADATA_KEY, Call

    f = tflow.tflow()
    f.request.method = "POST"
    f.request.path = "/v1/responses"
    f.request.headers["content-type"] = "application/json"
    f.request.headers["session-id"] = session
    f.request.content = body
    f.metadata[METADATA_KEY] = Call(api="openai.responses", principal=principal)
    return f


def _principal() -> Any:
    from agent_egress.addon.store.base import KeyRecord

    return KeyRecord(id="key_bench", org="bench", team="bench", user="bench",
                     description=None, created_at=datetime.now(UTC), expires_at=None,
                     revoked_at=None)


async def _run_session(bodies: list[bytes], guarded: bool, inline: int,
                       cache_entries: int, only: set[int] | None) -> list[float | None]:
    from agent_egress.addon.call import METADATA_KEY
    from agent_egress.addon.guard_input import GuardInput
    from agent_egress.addon.guard_output import Recorder
    from agent_egress.addon.guardrails.cache import VerdictCache
    from agent_egress.addon.guardrails.config import GuardrailsConfig
    from agent_egress.addon.guardrails.engine import Guardrails
    from agent_egress.exporters.prometheus import Metrics

    guardrails = Guardrails(GuardrailsConfig.model_validate({"default": {"custom": CUSTOM}}))
    guardrails.warm()
    gi = GuardInput(32 * MIB, guardrails if guarded else None,
                    VerdictCache(max_entries=cache_entries), Recorder(Metrics(), None),
                    128, inline)
    principal = _principal()
    session = str(uuid.uuid4())
    times: list[float | None] = []
    for i, body in enumerate(bodies):
        if only is not None and i + 1 not in only:
            times.append(None)
            continue
        flow = _flow(body, session, principal)
        t0 = time.perf_counter()
        await gi.request(flow)
        times.append(time.perf_counter() - t0)
        call = flow.metadata[METADATA_KEY]
        if call.refused is not None:
            raise RuntimeError(f"call {i + 1} refused: {call.refused}")
    return times


async def _ticker(gaps: list[float], done: asyncio.Event, every: float = 0.0005) -> None:
    """Stands for other flows on the loop: records how late each wake-up is."""
    last = time.perf_counter()
    while not done.is_set():
        await asyncio.sleep(every)
        now = time.perf_counter()
        gaps.append(now - last - every)
        last = now


async def _loop_vs_thread(sizes: list[int], reps: int) -> dict[str, Any]:
    """Per size of new content: scan time on the loop vs to_thread (wall, and loop stall)."""
    from agent_egress.addon.guard_input import scan_segments
    from agent_egress.addon.guardrails import items as gitems
    from agent_egress.addon.guardrails.cache import item_key

    engine = make_engine({"custom": CUSTOM})
    pool = corpora(MIB)["code"]
    rnd = random.Random(5)
    out: dict[str, Any] = {}

    def todo(size: int) -> list[tuple[str, Any]]:
        start = rnd.randrange(len(pool) - size)
        text = pool[start:start + size]
        seg = gitems.Segment(("input", 0, "output"), text, "tool_output", "tool", 0)
        return [(item_key("fp", "s", "tool_output", "tool", text), seg)]

    for size in sizes:
        inline, thread, stall = [], [], []
        for _ in range(reps):
            t = todo(size)
            t0 = time.perf_counter()
            scan_segments(engine, t)
            inline.append(time.perf_counter() - t0)
            t = todo(size)
            gaps: list[float] = []
            done = asyncio.Event()
            tick = asyncio.create_task(_ticker(gaps, done))
            await asyncio.sleep(0.002)
            gaps.clear()
            t0 = time.perf_counter()
            await asyncio.to_thread(scan_segments, engine, t)
            thread.append(time.perf_counter() - t0)
            done.set()
            await tick
            stall.append(max(gaps, default=0.0))
        out[str(size)] = {"inline_ms": 1000 * med(inline), "thread_ms": 1000 * med(thread),
                          "thread_loop_stall_ms": 1000 * med(stall)}
        log(f"session: new {size} B: inline {out[str(size)]['inline_ms']:.2f} ms, to_thread "
            f"{out[str(size)]['thread_ms']:.2f} ms (loop stall "
            f"{out[str(size)]['thread_loop_stall_ms']:.2f} ms)")
    return out


def bench_session(n_calls: int, target: int, runs: int, inline: int) -> dict[str, Any]:
    bodies = session_bodies(n_calls, target)
    first = list(range(1, min(10, n_calls) + 1))
    last = list(range(max(1, n_calls - 10), n_calls + 1))
    log(f"session: {n_calls} calls, body {len(bodies[0]) / 1000:.1f} KB -> "
        f"{len(bodies[-1]) / 1e6:.2f} MB")
    variants = {
        "hook, guardrails on (cache)": dict(guarded=True, cache_entries=50_000, only=None),
        "hook, guardrails off (parse only)": dict(guarded=False, cache_entries=50_000,
                                                  only=None),
        "hook, guardrails on, no cache": dict(guarded=True, cache_entries=0,
                                              only=set(first + last)),
    }
    res: dict[str, Any] = {"calls": n_calls, "first_body_bytes": len(bodies[0]),
                           "last_body_bytes": len(bodies[-1]), "inline_scan_bytes": inline,
                           "variants": {}}
    for name, kw in variants.items():
        per_run = []
        for r in range(runs):
            times = asyncio.run(_run_session(bodies, inline=inline, **kw))  # type: ignore[arg-type]
            w1 = [t for i, t in enumerate(times, 1) if i in first and t is not None]
            w2 = [t for i, t in enumerate(times, 1) if i in last and t is not None]
            all_t = [t for t in times if t is not None]
            per_run.append({"first_p50": pct(w1, .5), "first_p95": pct(w1, .95),
                            "last_p50": pct(w2, .5), "last_p95": pct(w2, .95),
                            "total_s": sum(all_t)})
            log(f"session: {name} run {r + 1}: calls {first[0]}-{first[-1]} p50 "
                f"{1000 * (pct(w1, .5) or 0):.2f} ms, calls {last[0]}-{last[-1]} p50 "
                f"{1000 * (pct(w2, .5) or 0):.2f} ms")
        res["variants"][name] = {
            k: med([p[k] for p in per_run if p[k] is not None]) for k in per_run[0]}
        res["variants"][name]["runs"] = per_run
    res["windows"] = [f"{first[0]}-{first[-1]}", f"{last[0]}-{last[-1]}"]
    res["loop_vs_thread"] = asyncio.run(
        _loop_vs_thread([512, 1024, 2048, 4096, 8192, 16384], max(5, 3 * runs)))
    return res


# --------------------------------------------------------------------------- ttft
class Stream:
    """One keep-alive HTTP/1.1 connection reading SSE, timing the first visible text."""

    def __init__(self, port: int, token: str) -> None:
        body = json.dumps({"model": "gpt-5.5", "input": [{"role": "user", "content": "hi"}],
                           "stream": True, "store": False}).encode()
        self.port = port
        self.req = (f"POST /v1/responses HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                    f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def one(self) -> dict[str, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None and self.writer is not None
        t0 = time.perf_counter()
        self.writer.write(self.req)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"chunked" not in head.lower():
            raise RuntimeError(f"expected a chunked stream, got {head[:200]!r}")
        buf = b""
        text: list[str] = []
        first_event = first_text = None
        last = None
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            buf += data[:-2]
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                now = time.perf_counter()
                first_event = first_event or now
                payload = b"".join(line[6:] for line in block.split(b"\n")
                                   if line.startswith(b"data: "))
                obj = json.loads(payload) if payload else {}
                last = obj.get("type")
                if last == "response.output_text.delta" and obj.get("delta"):
                    first_text = first_text or now
                    text.append(obj["delta"])
        end = time.perf_counter()
        ok = status == 200 and "".join(text) == ANSWER and last == "response.completed"
        return {"ok": ok, "ttfe": (first_event or end) - t0, "ttft": (first_text or end) - t0,
                "total": end - t0}


async def _streams(port: int, token: str, n: int, conc: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    left = n

    async def worker() -> None:
        nonlocal left
        s = Stream(port, token)
        await s.one()  # connection setup and the proxy's upstream connection: not measured
        while left > 0:
            left -= 1
            out.append(await s.one())
        if s.writer is not None:
            s.writer.close()

    await asyncio.gather(*(worker() for _ in range(conc)))
    return out


def _start_fake(procs: Procs, name: str, delay: float, delta_chars: int) -> int:
    argv = [sys.executable, str(ROOT / "tests" / "fakeprovider.py"), "--port", "0",
            "--delta-count", str(max(1, len(ANSWER) // delta_chars)), "--tool-calls", "0",
            "--event-delay", str(delay), "--answer", ANSWER]
    p = procs.start(name, argv, stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()
    if not line.startswith(f"http://{HOST}:"):
        raise RuntimeError(f"fake provider did not start: {line!r}\n{procs.stderr_tail(name)}")
    return int(line.split(":")[2].split("/")[0])


def _start_gateway(procs: Procs, name: str, fake_ports: dict[str, int],
                   guardrails: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int, str]:
    home = procs.workdir / name
    home.mkdir(mode=0o700)
    port, admin = free_port(), free_port()
    providers = [{"name": n, "kind": "openai", "base_url": f"http://{HOST}:{p}/v1",
                  "key": "openai"} for n, p in fake_ports.items()]
    cfg = {"listen": {"reverse": f"{HOST}:{port}", "proxy": None, "admin": f"{HOST}:{admin}"},
           "providers": providers, "log_level": "warning", "guardrails": guardrails}
    (home / "config.yaml").write_text(json.dumps(cfg), encoding="utf-8")
    env = egress_env(home)
    cli = venv_bin("agent-egress")
    subprocess.run([cli, "vault", "set", "openai"], input=b"sk-bench-key", env=env, check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run([cli, "token", "issue", "--user", "bench", "--team", "bench",
                          "--format", "json"], env=env, check=True, capture_output=True,
                         timeout=60)
    p = procs.start(name, [cli, "run"], env=env)
    wait_http(f"http://{HOST}:{admin}/readyz", 60, p, name, procs, name)
    return p, port, json.loads(out.stdout)["token"]


def bench_ttft(args: argparse.Namespace) -> dict[str, Any]:
    holdbacks = [int(h) for h in args.holdbacks.split(",")]
    targets: list[tuple[str, dict[str, Any] | None]] = [
        ("direct (no gateway)", None),
        ("gateway, guardrails disabled", {"enabled": False}),
        ("gateway, output guard off", {"default": {"secrets": {
            "directions": ["input", "tool_output"]}}}),
        *[(f"gateway, output guard on, holdback {h}", {"holdback_chars": h})
          for h in holdbacks],
    ]
    res: dict[str, Any] = {"answer_chars": len(ANSWER), "delta_chars": args.delta_chars,
                           "event_delay_s": args.event_delay, "paced_streams": args.streams,
                           "paced_concurrency": args.concurrency,
                           "unpaced_streams": args.unpaced, "targets": {}}
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        procs = Procs(Path(tmp))
        try:
            fakes = {"paced": _start_fake(procs, "fake-paced", args.event_delay,
                                          args.delta_chars),
                     "unpaced": _start_fake(procs, "fake-unpaced", 0.0, args.delta_chars)}
            for name, guard in targets:
                gw = None
                if guard is None:
                    ports, token = fakes, "sk-bench-key"
                else:
                    gw, port, token = _start_gateway(procs, f"gw-{len(res['targets'])}",
                                                     {"openai": fakes["paced"]}, guard)
                    ports = {"paced": port}
                    # the same gateway in front of the unpaced fake: a second one
                    gw2, port2, token2 = _start_gateway(
                        procs, f"gw-{len(res['targets'])}-unpaced",
                        {"openai": fakes["unpaced"]}, guard)
                row: dict[str, Any] = {"runs": []}
                for r in range(args.runs):
                    paced = asyncio.run(_streams(ports["paced"], token, args.streams,
                                                 args.concurrency))
                    if gw is None:
                        unpaced = asyncio.run(_streams(fakes["unpaced"], token, args.unpaced, 1))
                        cpu = None
                    else:
                        c0 = proc_cpu_s(gw2.pid)
                        unpaced = asyncio.run(_streams(port2, token2, args.unpaced, 1))
                        cpu = (proc_cpu_s(gw2.pid) - c0) / len(unpaced) * 1000
                    bad = sum(not s["ok"] for s in paced + unpaced)
                    run = {"errors": bad, "cpu_ms_per_stream": cpu}
                    for label, rows in (("paced", paced), ("unpaced", unpaced)):
                        for k in ("ttfe", "ttft", "total"):
                            vals = [s[k] * 1000 for s in rows if s["ok"]]
                            run[f"{label}_{k}_p50"] = pct(vals, .5)
                            run[f"{label}_{k}_p95"] = pct(vals, .95)
                    row["runs"].append(run)
                    log(f"ttft: {name} run {r + 1}: paced TTFT p50 {run['paced_ttft_p50']:.1f}"
                        f" ms, unpaced TTFT p50 {run['unpaced_ttft_p50']:.2f} ms, "
                        f"errors {bad}" + ("" if cpu is None else f", CPU {cpu:.2f} ms/stream"))
                for k in row["runs"][0]:
                    vals = [x[k] for x in row["runs"] if x[k] is not None]
                    row[k] = med(vals) if vals else None
                row["errors"] = sum(x["errors"] for x in row["runs"])
                res["targets"][name] = row
                if gw is not None:
                    procs.stop(gw)
                    procs.stop(gw2)
        finally:
            procs.stop_all()
    return res


# --------------------------------------------------------------------------- report
def render(results: dict[str, Any]) -> str:
    out: list[str] = []
    f2: Callable[[float | None], str] = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    if "scan" in results:
        s = results["scan"]
        names = list(s["bytes"])
        out.append("Scan throughput, MiB/s (median of runs; findings in brackets), items ~4 KiB:")
        out.append("| check | " + " | ".join(f"{n} ({s['bytes'][n] / MIB:.2f} MiB)"
                                             for n in names) + " |")
        out.append("|---|" + "---:|" * len(names))
        for check, row in s["checks"].items():
            out.append(f"| {check} | " + " | ".join(
                f"{row[n]['mib_s']:.2f} ({row[n]['findings']})" for n in names) + " |")
        out.append("")
    if "session" in results:
        s = results["session"]
        w1, w2 = s["windows"]
        out.append(f"Session of {s['calls']} calls, input {s['first_body_bytes'] / 1000:.1f} KB"
                   f" -> {s['last_body_bytes'] / 1e6:.2f} MB; per-call ms (median of runs):")
        out.append(f"| path | calls {w1} p50 / p95 | calls {w2} p50 / p95 | all calls, s |")
        out.append("|---|---:|---:|---:|")
        for name, v in s["variants"].items():
            ms = {k: (None if v.get(k) is None else v[k] * 1000) for k in
                  ("first_p50", "first_p95", "last_p50", "last_p95")}
            out.append(f"| {name} | {f2(ms['first_p50'])} / {f2(ms['first_p95'])} | "
                       f"{f2(ms['last_p50'])} / {f2(ms['last_p95'])} | "
                       f"{v['total_s']:.2f} |")
        out.append("")
        out.append("New content scanned on the loop vs in a worker thread (default policy + "
                   "custom, ms, median):")
        out.append("| new bytes | inline (loop blocked) | to_thread wall | loop stall "
                   "during to_thread |")
        out.append("|---:|---:|---:|---:|")
        for size, v in s["loop_vs_thread"].items():
            out.append(f"| {size} | {v['inline_ms']:.2f} | {v['thread_ms']:.2f} | "
                       f"{v['thread_loop_stall_ms']:.2f} |")
        out.append("")
    if "ttft" in results:
        t = results["ttft"]
        out.append(f"TTFT: answer {t['answer_chars']} chars in ~{t['delta_chars']}-char deltas;"
                   f" paced {t['event_delay_s'] * 1000:.0f} ms between events, "
                   f"{t['paced_streams']} streams at c={t['paced_concurrency']}; unpaced "
                   f"{t['unpaced_streams']} streams at c=1; ms, median of runs:")
        out.append("| target | paced TTFT p50 / p95 | paced first event p50 | paced total p50 |"
                   " unpaced TTFT p50 / p95 | unpaced total p50 | gateway CPU ms/stream |"
                   " errors |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, v in t["targets"].items():
            out.append(f"| {name} | {f2(v['paced_ttft_p50'])} / {f2(v['paced_ttft_p95'])} | "
                       f"{f2(v['paced_ttfe_p50'])} | {f2(v['paced_total_p50'])} | "
                       f"{f2(v['unpaced_ttft_p50'])} / {f2(v['unpaced_ttft_p95'])} | "
                       f"{f2(v['unpaced_total_p50'])} | {f2(v['cpu_ms_per_stream'])} | "
                       f"{v['errors']} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="scan,session,ttft")
    p.add_argument("--quick", action="store_true", help="smaller corpora, fewer calls/streams")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scan-bytes", type=int, default=MIB)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--session-bytes", type=int, default=1_000_000)
    p.add_argument("--inline-scan-bytes", type=int, default=2048)
    p.add_argument("--holdbacks", default="32,64,128")
    p.add_argument("--streams", type=int, default=12, help="paced streams per run")
    p.add_argument("--concurrency", type=int, default=4, help="paced streams at once")
    p.add_argument("--unpaced", type=int, default=100, help="unpaced streams per run (c=1)")
    p.add_argument("--delta-chars", type=int, default=4)
    p.add_argument("--event-delay", type=float, default=0.01)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.scan_bytes, args.calls = 1, 256 * 1024, 40
        args.session_bytes, args.streams, args.unpaced = 200_000, 4, 20
    only = set(args.only.split(","))
    other = other_load_pct(1.0)
    results: dict[str, Any] = {"machine": machine_info(), "args": {
        k: str(v) for k, v in vars(args).items()}, "other_load_pct_before": other}
    t0 = time.monotonic()
    if "scan" in only:
        results["scan"] = bench_scan(args.scan_bytes, args.runs)
    if "session" in only:
        results["session"] = bench_session(args.calls, args.session_bytes, args.runs,
                                           args.inline_scan_bytes)
    if "ttft" in only:
        results["ttft"] = bench_ttft(args)
    results["other_load_pct_after"] = other_load_pct(1.0)
    results["seconds"] = time.monotonic() - t0
    m = results["machine"]
    print(f"{m['date']}; {m['nproc']} cores, {m['cpu_model']}; Python {m['python']}, "
          f"mitmproxy {m['mitmproxy']}; commit {m['commit']}; took {results['seconds']:.0f} s;"
          f" other processes' CPU {other:.0f}% of a core before, "
          f"{results['other_load_pct_after']:.0f}% after\n")
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

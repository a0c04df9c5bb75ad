"""Markdown tables from bench.py's results: levels (median, min-max over repeats),
the issue's goals as ratios, stream fidelity, capacity and scale-out."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bench_lib import EVENTS_PER_STREAM

ORDER = ("direct", "mitmproxy", "agent-egress", "litellm")


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def med(fig: Any) -> float | None:
    return None if fig is None else float(fig["med"])


def cell(fig: Any, digits: int = 1, scale: float = 1.0) -> str:
    """``median (min-max)``; just the median when there was one repeat."""
    if fig is None:
        return "-"
    m, lo, hi = fig["med"] * scale, fig["min"] * scale, fig["max"] * scale
    if lo == hi:
        return fmt(m, digits)
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_levels(results: dict[str, Any]) -> list[str]:
    lv = results["levels"]
    targets = [t for t in ORDER if t in lv]
    plan = results["plan"]
    levels, pc = plan["levels"], plan["plain_concurrency"]
    rows: list[list[str]] = []

    def add(label: str, fn: Callable[[str, str], str], k: str = "") -> None:
        rows.append([label, *[fn(t, k) for t in targets]])

    def fig(t: str, phase: str, key: str) -> Any:
        return lv[t].get(phase, {}).get(key)

    for c in levels:
        k = f"stream@{c}"
        add(f"TTFE p50 ms @c={c}", lambda t, k: cell(fig(t, k, "ttfe_p50_ms"), 2), k)
        add(f"TTFE p99 ms @c={c}", lambda t, k: cell(fig(t, k, "ttfe_p99_ms"), 2), k)
    for c in levels:
        k = f"stream@{c}"
        add(f"stream total p50 / p99 ms @c={c}",
            lambda t, k: f"{fmt(med(fig(t, k, 'total_p50_ms')), 2)} / "
                         f"{fmt(med(fig(t, k, 'total_p99_ms')), 2)}", k)
    for c in levels:
        k = f"stream@{c}"
        add(f"streams/s @c={c} [n, errors]",
            lambda t, k: f"{cell(fig(t, k, 'rate_per_s'))} [{lv[t][k]['requests']}, "
                         f"{lv[t][k]['errors']}]", k)
    kp = f"plain@{pc}"
    add(f"non-streaming req/s @c={pc} [n, errors]",
        lambda t, k: f"{cell(fig(t, k, 'rate_per_s'))} [{lv[t][k]['requests']}, "
                     f"{lv[t][k]['errors']}]", kp)
    add(f"non-streaming p50 / p99 ms @c={pc}",
        lambda t, k: f"{fmt(med(fig(t, k, 'total_p50_ms')), 2)} / "
                     f"{fmt(med(fig(t, k, 'total_p99_ms')), 2)}", kp)
    if 1 in levels:
        def overhead(t: str, key: str) -> str:
            d, v = med(fig("direct", "stream@1", key)), med(fig(t, "stream@1", key))
            return "-" if t == "direct" or d is None or v is None else f"+{v - d:.2f}"

        add("added vs direct, TTFE p50 ms @c=1", lambda t, _k: overhead(t, "ttfe_p50_ms"))
        add("added vs direct, total p50 ms @c=1", lambda t, _k: overhead(t, "total_p50_ms"))
    for c in levels:
        k = f"stream@{c}"
        add(f"gateway CPU ms/stream @c={c} [core %]",
            lambda t, k: "-" if t == "direct" else
            f"{cell(fig(t, k, 'proxy_cpu_ms_per_req'), 2)} "
            f"[{fmt(med(fig(t, k, 'proxy_cpu_pct')), 0)}%]", k)
    add(f"gateway CPU ms/request, non-streaming @c={pc} [core %]",
        lambda t, k: "-" if t == "direct" else
        f"{cell(fig(t, k, 'proxy_cpu_ms_per_req'), 2)} "
        f"[{fmt(med(fig(t, k, 'proxy_cpu_pct')), 0)}%]", kp)
    for c in levels:
        k = f"stream@{c}"
        add(f"gateway RSS MiB, peak during c={c}",
            lambda t, k: "-" if t == "direct" else
            cell(fig(t, k, "peak_rss_kb"), 1, 1 / 1024), k)
    add("gateway peak RSS MiB (VmHWM, whole run)",
        lambda t, _k: "-" if t == "direct" else
        fmt(results["peak_rss_kb"].get(t, 0) / 1024))

    def worst(t: str, key: str) -> str:
        vals = [p[key]["max"] for p in lv[t].values() if key in p]
        return fmt(max(vals), 0) if vals else "-"

    add("client CPU % of one core, max", lambda t, _k: worst(t, "client_cpu_pct"))
    add("fake upstream CPU % of one core, max", lambda t, _k: worst(t, "upstream_cpu_pct"))
    add("other processes' CPU % of one core, max", lambda t, _k: worst(t, "other_cpu_pct"))
    return _table(["metric", *targets], rows)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def render_goals(results: dict[str, Any]) -> list[str]:
    """The issue's goals, from the medians of this run."""
    lv = results["levels"]
    if "agent-egress" not in lv or "mitmproxy" not in lv:
        return []
    levels, pc = results["plan"]["levels"], results["plan"]["plain_concurrency"]

    def m(t: str, phase: str, key: str) -> float | None:
        return med(lv.get(t, {}).get(phase, {}).get(key))

    def added(t: str) -> float | None:
        v, d = m(t, "stream@1", "total_p50_ms"), m("direct", "stream@1", "total_p50_ms")
        return None if v is None or d is None else v - d

    hi = "stream@64" if 64 in levels else f"stream@{max(levels)}"
    kp = f"plain@{pc}"
    e, b, ll = "agent-egress", "mitmproxy", "litellm"
    rows: list[list[str]] = []

    def goal(label: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        rows.append([label, "-" if value is None else f"{value:.2f}{unit}",
                     "-" if ok is None else ("yes" if ok else "**no**")])

    a = added(e)
    goal("added latency @c=1 (total p50 vs direct) <= 2.5 ms", a,
         None if a is None else a <= 2.5, " ms")
    r = _ratio(m(e, kp, "rate_per_s"), m(b, kp, "rate_per_s"))
    goal("non-streaming req/s >= 0.7x mitmproxy", r, None if r is None else r >= 0.7, "x")
    r = _ratio(m(e, hi, "proxy_cpu_ms_per_req"), m(b, hi, "proxy_cpu_ms_per_req"))
    goal(f"CPU per stream ({hi}) <= 1.5x mitmproxy", r, None if r is None else r <= 1.5, "x")
    for q in ("p50", "p99"):
        r = _ratio(m(e, hi, f"ttfe_{q}_ms"), m(b, hi, f"ttfe_{q}_ms"))
        goal(f"TTFE {q} {hi} <= 1.3x mitmproxy", r, None if r is None else r <= 1.3, "x")
    rss = m(e, hi, "peak_rss_kb")
    rss_mb = None if rss is None else rss * 1024 / 1e6
    goal(f"peak RSS during {hi} <= 150 MB", rss_mb, None if rss_mb is None else rss_mb <= 150,
         " MB")
    if ll in lv:
        pairs = [
            ("added latency @c=1", _ratio(added(ll), a)),
            ("non-streaming req/s", _ratio(m(e, kp, "rate_per_s"), m(ll, kp, "rate_per_s"))),
            (f"CPU per stream ({hi})", _ratio(m(ll, hi, "proxy_cpu_ms_per_req"),
                                              m(e, hi, "proxy_cpu_ms_per_req"))),
            (f"TTFE p50 {hi}", _ratio(m(ll, hi, "ttfe_p50_ms"), m(e, hi, "ttfe_p50_ms"))),
            (f"TTFE p99 {hi}", _ratio(m(ll, hi, "ttfe_p99_ms"), m(e, hi, "ttfe_p99_ms"))),
        ]
        for label, r in pairs:
            goal(f">= 5x better than LiteLLM: {label}", r, None if r is None else r >= 5, "x")
    return _table(["goal (issue 11)", "agent-egress, this run", "met"], rows)


def render_fidelity(results: dict[str, Any]) -> list[str]:
    fid = results.get("fidelity")
    if not fid:
        return []
    rows = [[t, "yes" if f["identical"] else "no", "; ".join(f["differences"]) or "-"]
            for t, f in fid.items()]
    return _table(["target", "bytes identical to the fake's", "what differs"], rows)


def render_capacity(results: dict[str, Any]) -> list[str]:
    cap = results.get("capacity")
    if not cap:
        return []
    rows = []
    for t in [t for t in ORDER if t in cap]:
        c = cap[t]
        best = c["tried"].get(str(c["capacity"])) or c["tried"].get(str(c["first_failing"]), {})
        tried = ", ".join(f"{k}{'' if v['pass'] else '✗'}" for k, v in c["tried"].items())
        rows.append([
            t, f"{c['capacity']}{'+' if c['capped'] else ''}", fmt(c["first_failing"], 0),
            f"{fmt(best.get('ttfe_p50_ms'), 2)} / {fmt(best.get('ttfe_p99_ms'), 2)}",
            fmt(best.get("proxy_cpu_pct"), 0), fmt(best.get("client_cpu_pct"), 0), tried])
    return _table(["target", "streams carried (p99 TTFE <= 50 ms)", "first failing",
                   "TTFE p50 / p99 ms there (none passed: at 1)", "gateway core %",
                   "client core %",
                   "levels tried (✗ failed)"], rows)


def render_scale(results: dict[str, Any]) -> list[str]:
    so = results.get("scale_out")
    if not so:
        return []
    if "skipped" in so:
        return [f"Scale-out skipped: {so['skipped']}"]
    c = so["concurrency"]
    rows = []
    base = med(so["runs"].get("1", {}).get(f"stream@{c}", {}).get("rate_per_s"))
    for n, ph in so["runs"].items():
        s, p = ph[f"stream@{c}"], ph[f"plain@{c}"]
        rate = med(s.get("rate_per_s"))
        rows.append([
            n, cell(s.get("rate_per_s")), fmt(_ratio(rate, base), 2),
            f"{fmt(med(s.get('ttfe_p50_ms')), 1)} / {fmt(med(s.get('ttfe_p99_ms')), 1)}",
            cell(p.get("rate_per_s")), f"{s['errors']} / {p['errors']}",
            fmt(med(s.get("proxy_cpu_pct")), 0), fmt(med(s.get("lb_cpu_pct")), 0),
            fmt(med(s.get("upstream_cpu_pct")), 0), fmt(med(s.get("client_cpu_pct")), 0),
            fmt(med(s.get("machine_busy_pct")), 0)])
    out = _table(["agent-egress processes", f"streams/s @c={c}", "vs 1", "TTFE p50 / p99 ms",
                  f"non-streaming req/s @c={c}", "errors (stream / plain)",
                  "gateways' core % (sum)", "HAProxy core %", "fake core %", "client core %",
                  "machine busy % (of one core)"], rows)
    out.append("")
    out.append(f"Ledger (PostgreSQL, shared): {so.get('ledger_calls')} rows for "
               f"{so.get('calls_sent')} calls sent (warm-ups included).")
    return out


def render(results: dict[str, Any]) -> str:
    m, plan = results["machine"], results["plan"]
    lv = results["levels"]
    first = next(iter(lv.values()))
    counts = ", ".join(f"c={c}: {first[f'stream@{c}']['requests']}" for c in plan["levels"])
    lines = [
        f"Date: {m['date']}. Machine: {m['nproc']} cores, {m['cpu_model']}, Linux "
        f"{m['kernel']}; Python {m['python']}, mitmproxy {m['mitmproxy']}; commit "
        f"{m['commit']}; LiteLLM workers: {results['litellm_workers']}."
        + (f" agent-egress config added: `{json.dumps(results['egress_config'])}`."
           if results.get("egress_config") else ""),
        f"Streams: {EVENTS_PER_STREAM} SSE events each, back to back; levels {plan['levels']} "
        f"(streams per target over all repeats: {counts}); non-streaming: "
        f"c={plan['plain_concurrency']} for {plan['plain_duration_s']:g} s; {plan['repeat']} "
        "repeats, interleaved; cells are median (min-max) over repeats."
        f"{' QUICK run.' if plan['quick'] else ''}",
        "",
        *render_levels(results),
        "",
    ]
    if "ledger_calls" in results:
        lines.append(f"agent-egress ledger: {results['ledger_calls']} rows for "
                     f"{results['egress_calls_sent']} calls sent (warm-ups included).")
    before = max(0.0, results["other_cpu_pct_before"])  # ticks can make it a hair below 0
    lines.append(f"Other processes' CPU before the run: {before:.0f}% of one core.")
    busy = [f"{t}/{k}" for t, ph in lv.items() for k, p in ph.items()
            if p.get("other_cpu_pct", {}).get("max", 0) > 20]
    if busy:
        lines.append("WARNING: other processes used over 20% of a core during "
                     f"{', '.join(busy)}: those numbers are distorted; rerun on a quiet machine.")
    limited = [f"{t}/{k}" for t, ph in lv.items() for k, p in ph.items() if p["hit_time_limit"]]
    if limited:
        lines.append(f"Time limit hit (fewer requests than planned): {', '.join(limited)}")
    rec = [f"{t}/{k}: {p['reconnects']['max']:.0f}" for t, ph in lv.items()
           for k, p in ph.items() if p.get("reconnects", {}).get("max")]
    if rec:
        lines.append("Idle keep-alive connections the target had closed, request resent on a "
                     f"new one (max per repeat): {', '.join(rec)}")
    errs = [f"{t}/{k}: {p['error_samples'][:2]}" for t, ph in lv.items() for k, p in ph.items()
            if p["errors"]]
    if errs:
        lines.append(f"Errors: {'; '.join(errs)}")
    for title, part in (("Goals", render_goals(results)),
                        ("Stream fidelity", render_fidelity(results)),
                        ("Capacity (paced streams, 20 ms between events)",
                         render_capacity(results)),
                        ("Scale-out behind HAProxy", render_scale(results))):
        if part:
            lines += ["", f"### {title}", "", *part]
    return "\n".join(lines)

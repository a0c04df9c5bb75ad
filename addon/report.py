"""`agent-egress report --month YYYY-MM --out report.html`: the monthly finance report.

For people without Grafana access: one self-contained HTML file (inline CSS and SVG, no
script, nothing fetched) with spend by team, model, user and day, and a CSV beside it
(one row per org, team, user, model and provider) that sums to the same cents. Everything
comes from the ledger, whose costs are exact (integer nano-USD), so the page's totals equal
`agent-egress spend --period YYYY-MM`. ChatGPT-login Codex calls metered in egress mode
(billing ``subscription``: a developer's ChatGPT plan paid, the cost is the list-price
equivalent) are in the totals and shown apart, so the gateway's own spend is readable.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any

from .policy import ConfigError, load_settings
from .store.base import LedgerRow
from .store.sql import open_store

CENT = Decimal("0.01")


@dataclass
class Line:
    """Sums over the ledger rows that share one key."""

    key: str
    calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced_calls: int = 0
    estimated_calls: int = 0

    def add(self, r: LedgerRow) -> None:
        self.calls += 1
        self.input_tokens += r.input_tokens
        self.cached_input_tokens += r.cached_input_tokens
        self.output_tokens += r.output_tokens
        self.reasoning_tokens += r.reasoning_tokens
        if r.cost_usd is None:
            self.unpriced_calls += 1
        else:
            self.cost_usd += r.cost_usd
        self.estimated_calls += r.usage_estimated


@dataclass
class Report:
    month: str
    since: datetime
    until: datetime
    total: Line
    by_team: list[Line] = field(default_factory=list)
    by_model: list[Line] = field(default_factory=list)
    by_user: list[Line] = field(default_factory=list)
    by_day: list[Line] = field(default_factory=list)
    by_billing: list[Line] = field(default_factory=list)
    detail: list[tuple[tuple[str, ...], Line]] = field(default_factory=list)

    @property
    def subscription(self) -> Line | None:
        return next((x for x in self.by_billing if x.key == "subscription"), None)


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """'2026-11' -> [2026-11-01, 2026-12-01) in UTC (as `spend --period`)."""
    try:
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --month {month!r}: use YYYY-MM") from None
    end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    return start, end


def model_of(r: LedgerRow) -> str:
    return r.served_model or r.requested_model or "(unknown)"


def _group(rows: Iterable[LedgerRow], key: Callable[[LedgerRow], str]) -> list[Line]:
    lines: dict[str, Line] = {}
    for r in rows:
        k = key(r)
        lines.setdefault(k, Line(k)).add(r)
    return sorted(lines.values(), key=lambda x: (-x.cost_usd, x.key))


def build(rows: list[LedgerRow], month: str) -> Report:
    since, until = month_bounds(month)
    rows = [r for r in rows if since <= r.ts < until]
    total = Line("total")
    for r in rows:
        total.add(r)
    detail: dict[tuple[str, ...], Line] = {}
    for r in rows:
        k = (r.org, r.team, r.user, model_of(r), r.provider, r.billing)
        detail.setdefault(k, Line("/".join(k))).add(r)
    return Report(
        month=month, since=since, until=until, total=total,
        by_team=_group(rows, lambda r: f"{r.org}/{r.team}"),
        by_model=_group(rows, model_of),
        by_user=_group(rows, lambda r: f"{r.org}/{r.user}"),
        by_day=sorted(_group(rows, lambda r: r.ts.astimezone(UTC).strftime("%Y-%m-%d")),
                      key=lambda x: x.key),
        by_billing=_group(rows, lambda r: r.billing),
        detail=sorted(detail.items()))


# -- CSV ------------------------------------------------------------------------------------

CSV_COLUMNS = ("month", "org", "team", "user", "model", "provider", "calls", "input_tokens",
               "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost_usd",
               "unpriced_calls", "estimated_calls", "billing")


def render_csv(report: Report) -> str:
    """Exact costs (no rounding): the rows sum to the ledger to the nano-dollar."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for (org, team, user, model, provider, billing), x in report.detail:
        w.writerow([report.month, org, team, user, model, provider, x.calls, x.input_tokens,
                    x.cached_input_tokens, x.output_tokens, x.reasoning_tokens,
                    f"{x.cost_usd:f}", x.unpriced_calls, x.estimated_calls, billing])
    return buf.getvalue()


# -- HTML -----------------------------------------------------------------------------------

def usd(value: Decimal) -> str:
    return f"${value.quantize(CENT):,}"


def bar_chart(title: str, lines: list[Line], limit: int = 12, width: int = 640) -> str:
    """Horizontal bars, largest first; the rest folded into one 'others' bar."""
    items = [(x.key, x.cost_usd) for x in lines[:limit]]
    rest = sum((x.cost_usd for x in lines[limit:]), Decimal(0))
    if len(lines) > limit:
        items.append((f"{len(lines) - limit} others", rest))
    top = max((v for _, v in items), default=Decimal(0)) or Decimal(1)
    label_w, row_h, bar_max = 200, 24, width - 200 - 90
    h = row_h * len(items) + 8
    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{width}"'
             f' height="{h}" viewBox="0 0 {width} {h}" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, value) in enumerate(items):
        y = 4 + i * row_h
        w = max(1.0, float(value / top) * bar_max) if value else 0.0
        short = label if len(label) <= 28 else label[:27] + "…"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{escape(short)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}"'
            f' rx="2"><title>{escape(label)}: {usd(value)}</title></rect>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 16}">{usd(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def day_chart(lines: list[Line], width: int = 640, height: int = 160) -> str:
    """Vertical bars per day of the month."""
    top = max((x.cost_usd for x in lines), default=Decimal(0)) or Decimal(1)
    n = max(len(lines), 1)
    step = (width - 20) / n
    parts = [f'<svg class="chart" role="img" aria-label="spend per day" width="{width}"'
             f' height="{height + 20}" viewBox="0 0 {width} {height + 20}"'
             ' xmlns="http://www.w3.org/2000/svg">']
    for i, x in enumerate(lines):
        bh = max(1.0, float(x.cost_usd / top) * height) if x.cost_usd else 0.0
        parts.append(f'<rect x="{10 + i * step + 1:.1f}" y="{height - bh:.1f}"'
                     f' width="{max(step - 2, 1):.1f}" height="{bh:.1f}">'
                     f'<title>{x.key}: {usd(x.cost_usd)}</title></rect>'
                     f'<text x="{10 + i * step + step / 2:.1f}" y="{height + 14}"'
                     f' text-anchor="middle" class="small">{x.key[-2:]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def table(kind: str, lines: list[Line], head: str) -> str:
    rows = "".join(
        f'<tr><td>{escape(x.key)}</td><td class="n">{x.calls:,}</td>'
        f'<td class="n">{x.input_tokens + x.cached_input_tokens:,}</td>'
        f'<td class="n">{x.output_tokens:,}</td>'
        f'<td class="n" data-usd="{x.cost_usd:f}">{usd(x.cost_usd)}</td>'
        f'<td class="n">{x.unpriced_calls or ""}</td></tr>' for x in lines)
    return (f'<table id="by-{kind}"><thead><tr><th>{head}</th><th>calls</th>'
            '<th>input tokens</th><th>output tokens</th><th>cost</th><th>unpriced</th></tr>'
            f'</thead><tbody>{rows}</tbody></table>')


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:32px auto;
max-width:1000px;color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.muted,.small{color:#5b6475}.small{font-size:10px}
.cards{display:flex;gap:16px;margin:16px 0}.card{border:1px solid #d8dde6;border-radius:6px;
padding:10px 16px;min-width:150px}.card b{display:block;font-size:20px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:8px 24px}
table{border-collapse:collapse;width:100%;margin:6px 0 12px}
th,td{padding:3px 8px;border-bottom:1px solid #e6e9ef;text-align:left}
td.n,th:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
svg.chart rect{fill:#3d71d9}svg.chart text{font-size:12px;fill:#1d2330}
@media print{body{margin:0}}
"""


def render_html(report: Report, csv_name: str | None = None) -> str:
    t = report.total
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    csv_link = (f' The same figures per org, team, user, model and provider:'
                f' <a href="{escape(csv_name)}">{escape(csv_name)}</a>.' if csv_name else "")
    cards = "".join(f'<div class="card">{label}<b id="{i}"{attr}>{value}</b></div>'
                    for label, i, attr, value in (
                        ("Total spend", "total-usd", f' data-usd="{t.cost_usd:f}"',
                         usd(t.cost_usd)),
                        ("Model calls", "total-calls", f' data-calls="{t.calls}"',
                         f"{t.calls:,}"),
                        ("Teams", "team-count", "", f"{len(report.by_team)}"),
                        ("Users", "user-count", "", f"{len(report.by_user)}")))
    sub = report.subscription
    if sub is not None:
        cards += (f'<div class="card">of which ChatGPT subscription<b id="subscription-usd"'
                  f' data-usd="{sub.cost_usd:f}">{usd(sub.cost_usd)}</b></div>')
    subscription = (f'<p class="muted">{sub.calls:,} ChatGPT-login Codex call'
                    f'{"s" * (sub.calls != 1)} went through the egress proxy on developers\''
                    " own ChatGPT plans: their cost is the list-price equivalent, included in"
                    " the total and never charged to gateway budgets.</p>" if sub else "")
    n = t.unpriced_calls
    unpriced = (f'<p class="muted">{n} call{"s" * (n != 1)} had no price (model unknown to'
                " the price list) and counted $0 here; see the unpriced column.</p>"
                if n else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>agent-egress spend {escape(report.month)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>{STYLE}</style></head>
<body>
<h1>Coding-agent spend, {escape(report.month)}</h1>
<p class="muted">From the agent-egress ledger, {report.since:%Y-%m-%d} to
{report.until:%Y-%m-%d} (exclusive), UTC; provider usage as the gateway saw it, priced
per call. Generated {generated}.{csv_link}</p>
<div class="cards">{cards}</div>
{unpriced}{subscription}
<h2>Spend per day</h2>
{day_chart(report.by_day)}
<div class="grid">
<div><h2>By team</h2>{bar_chart("spend by team", report.by_team, width=460)}</div>
<div><h2>By model</h2>{bar_chart("spend by model", report.by_model, width=460)}</div>
</div>
<h2>By user (top 12)</h2>
{bar_chart("spend by user", report.by_user)}
<h2>Teams</h2>{table("team", report.by_team, "org/team")}
<h2>Models</h2>{table("model", report.by_model, "model")}
<h2>Users</h2>{table("user", report.by_user, "org/user")}
</body></html>
"""


# -- CLI ------------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    since, until = month_bounds(args.month)
    settings = load_settings(getattr(args, "config", None))
    store = open_store(settings.db_url)
    try:
        rows = store.ledger_rows(since, until)
    finally:
        store.close()
    report = build(rows, args.month)
    out: Path = args.out
    csv_path: Path = args.csv or out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text(render_csv(report), encoding="utf-8")
    csv_name = csv_path.name if csv_path.parent == out.parent else str(csv_path)
    out.write_text(render_html(report, csv_name), encoding="utf-8")
    print(f"wrote {out} and {csv_path}: {report.total.calls} calls,"
          f" {usd(report.total.cost_usd)}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="monthly finance report: self-contained HTML + CSV")
    p.add_argument("--month", required=True, help="YYYY-MM (UTC calendar month)")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument("--csv", type=Path, help="CSV file (default: --out with .csv)")
    p.set_defaults(func=_checked)


def _checked(args: argparse.Namespace) -> int:
    try:
        month_bounds(args.month)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(str(e)) from None
    if args.out.suffix.lower() not in (".html", ".htm"):
        print("agent-egress: --out should be an .html file", file=sys.stderr)
        return 2
    return cmd_report(args)

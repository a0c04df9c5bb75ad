"""`agent-egress report`: a self-contained HTML page and a CSV from the ledger, rendered in
headless Chromium (Debian package): the bars are drawn, and the page's and the CSV's totals
equal the ledger's (to the nano-dollar in data attributes and the CSV, to the cent on screen).
"""

from __future__ import annotations

import csv
import io
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from agent_egress.addon.report import build, month_bounds, render_html
from agent_egress.addon.store.base import LedgerRow
from agent_egress.addon.store.sql import SQLStore

AGENT_EGRESS = str(Path(sys.executable).parent / "agent-egress")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BAR = (0x3D, 0x71, 0xD9)  # the charts' bar colour (report.STYLE)

TEAMS = {"payments": ["alice", "bob", "chen"], "platform": ["dana", "emil"],
         "data": ["fatima", "gus", "hana"], "mobile": ["ivan", "jo"]}
MODELS = {"gpt-5.5": Decimal("0.021"), "gpt-5-codex": Decimal("0.012"),
          "gpt-5.1-codex": Decimal("0.015"), "o3": Decimal("0.034")}


def ledger_rows(n: int = 600, seed: int = 11) -> list[LedgerRow]:
    """A month of plausible traffic (seeded), plus rows just outside the month and one
    unpriced call."""
    rnd = random.Random(seed)
    start, end = month_bounds("2026-11")
    rows = []
    for i in range(n):
        team = rnd.choice(list(TEAMS))
        model = rnd.choice(list(MODELS))
        ts = start + timedelta(seconds=rnd.randrange(int((end - start).total_seconds())))
        inp, out = rnd.randrange(2_000, 60_000), rnd.randrange(50, 4_000)
        cost = (MODELS[model] * inp / 1000 + MODELS[model] * 4 * out / 1000).quantize(
            Decimal("0.000000001"))
        rows.append(_row(i, ts, team, rnd.choice(TEAMS[team]), model, inp, out, cost))
    rows.append(_row(n, start - timedelta(seconds=1), "payments", "alice", "o3", 10, 10,
                     Decimal("99")))  # October
    rows.append(_row(n + 1, end, "payments", "alice", "o3", 10, 10, Decimal("77")))  # December
    rows.append(_row(n + 2, start + timedelta(days=3), "data", "gus", "mystery-1", 500, 20,
                     None))
    return rows


def _row(i: int, ts: datetime, team: str, user: str, model: str, inp: int, out: int,
         cost: Decimal | None) -> LedgerRow:
    return LedgerRow(
        ts=ts, request_id=f"req_{i:06d}", org="acme", team=team, user=user,
        key_id=f"key_{user}", session_id=f"s-{i % 40}", turn_id=f"t-{i}",
        api="openai.responses", requested_model=model, served_model=model, provider="openai",
        status_code=200, input_tokens=inp, cached_input_tokens=inp // 3, cache_write_tokens=0,
        output_tokens=out, reasoning_tokens=out // 4, cost_usd=cost,
        price_source="unpriced" if cost is None else "genai-prices", usage_estimated=False,
        ttfb_ms=300, duration_ms=2000, outcome="ok", error_code=None, tags=None)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into scanlines."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = bpp = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, lines, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        lines.append(bytes(line))
        prev = line
    return width, bpp, lines


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: scripts/test.sh installs it (Debian)")
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars",
                           "--no-first-run", "--disable-extensions", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    store = SQLStore(f"sqlite:///{home / 'agent-egress.db'}")
    store.migrate()
    store.insert_ledger(ledger_rows())
    store.close()
    return home


def test_report_renders_in_chromium_and_its_totals_equal_the_ledger(
        home: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    env = {"AGENT_EGRESS_HOME": str(home), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([AGENT_EGRESS, "report", "--month", "2026-11", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    store = SQLStore(f"sqlite:///{home / 'agent-egress.db'}")
    since, until = month_bounds("2026-11")
    ledger = store.ledger_rows(since, until)
    by_team = {r.group: r.cost_usd for r in store.spend("team", since, until)}
    store.close()
    total = sum((r.cost_usd for r in ledger if r.cost_usd is not None), Decimal(0))
    assert len(ledger) == 601 and total > 0

    html = out.read_text()
    assert not re.search(r"<script|<link|src=|url\(", html)  # self-contained, nothing fetched
    dom = chromium("--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert Decimal(re.search(r'id="total-usd" data-usd="([^"]+)"', page).group(1)) == total
    assert f"${total.quantize(Decimal('0.01')):,}" in page
    assert re.search(r'data-calls="(\d+)"', page).group(1) == "601"
    teams = dict(re.findall(r'<tr><td>acme/([^<]+)</td>.*?data-usd="([^"]+)"',
                            page.split('id="by-team"')[1].split("</table>")[0]))
    assert {k: Decimal(v) for k, v in teams.items()} == by_team
    assert "1 call had no price" in page

    # the CSV beside it sums to the ledger exactly
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert sum(Decimal(r["cost_usd"]) for r in rows) == total
    assert sum(int(r["calls"]) for r in rows) == 601
    assert 'href="report.csv"' in page

    # rendered: a screenshot shows the bars in the chart colour
    shot = tmp_path / "report.png"
    res = chromium(f"--screenshot={shot}", "--window-size=1100,1500", out.as_uri())
    assert shot.exists(), res.stderr[-2000:]
    width, bpp, lines = png_pixels(shot.read_bytes())
    bar_pixels = sum(1 for line in lines for x in range(0, width * bpp, bpp)
                     if tuple(line[x:x + 3]) == BAR)
    assert bar_pixels > 5_000, bar_pixels


def test_month_bounds_and_escaping() -> None:
    assert month_bounds("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC),
                                       datetime(2027, 1, 1, tzinfo=UTC))
    row = _row(1, datetime(2026, 11, 5, tzinfo=UTC), "<b>ops</b>", "x", "gpt-5.5", 1, 1,
               Decimal("1.5"))
    html = render_html(build([row], "2026-11"))
    assert "<b>ops</b>" not in html and "&lt;b&gt;ops&lt;/b&gt;" in html

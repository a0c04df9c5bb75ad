"""What a check reports: a rule, an action and where in the text (never the text)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .config import Action, severity


class Finding(NamedTuple):
    rule: str
    """``check.rule``, e.g. ``secrets.aws_access_key``; shown to users and in metrics."""
    action: Action
    start: int
    end: int


def worst(findings: Iterable[Finding]) -> Finding | None:
    """The finding with the strongest action (block > redact > flag), first on ties."""
    best: Finding | None = None
    for f in findings:
        if best is None or severity(f.action) > severity(best.action):
            best = f
    return best


def redact(text: str, findings: Sequence[Finding]) -> str:
    """Replace every redact/block span with ``[REDACTED:<rule>]`` (overlaps merged)."""
    spans = sorted((f.start, f.end, f.rule) for f in findings
                   if f.action != "flag" and f.end > f.start)
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    cur_s, cur_e, cur_rule = spans[0]
    for s, e, rule in spans[1:]:
        if s < cur_e:
            cur_e = max(cur_e, e)
            continue
        out.append(text[pos:cur_s])
        out.append(f"[REDACTED:{cur_rule}]")
        pos = cur_e
        cur_s, cur_e, cur_rule = s, e, rule
    out.append(text[pos:cur_s])
    out.append(f"[REDACTED:{cur_rule}]")
    out.append(text[cur_e:])
    return "".join(out)

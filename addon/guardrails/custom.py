"""Operator rules: a regex or a keyword list (host names, code names, banned words)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from .config import CustomRule


def compile_rule(rule: CustomRule) -> re.Pattern[str]:
    """One regex per rule; keywords become a word-bounded alternation."""
    parts = [rule.regex] if rule.regex is not None else []
    if rule.keywords:
        words = sorted(rule.keywords, key=len, reverse=True)
        parts.append(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)")
    return re.compile("|".join(f"(?:{p})" for p in parts),
                      0 if rule.case_sensitive else re.IGNORECASE)


def scan(pattern: re.Pattern[str], text: str) -> Iterator[tuple[int, int]]:
    for m in pattern.finditer(text):
        if m.end() > m.start():
            yield m.start(), m.end()

"""`agent-egress report --month YYYY-MM --out report.html`: the finance report."""

from __future__ import annotations

from typing import Any


def add_parser(sub: Any) -> None:
    """Placeholder until the report lands (issue 10, item 7)."""

"""Defensive readers for JSON from providers and clients: wrong types read as absent."""

from __future__ import annotations

import json
from typing import Any


def loads_object(data: bytes) -> dict[str, Any] | None:
    """A JSON object, or None for anything else (invalid, not an object, too deep)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def nonempty_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def positive_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

"""Defensive readers for JSON from providers and clients: wrong types read as absent.

Strings that cannot be encoded as UTF-8 (lone surrogates: a JSON ``"\\ud800"`` escape,
or a header byte mitmproxy decoded with ``surrogateescape``) read as absent too, or are
repaired by ``printable_id``: one of them in a ledger row or a metric label made every
later write and scrape fail (issue 12 fuzzing).
"""

from __future__ import annotations

import json
from typing import Any


def loads_object(data: bytes | str) -> dict[str, Any] | None:
    """A JSON object, or None for anything else (invalid, not an object, too deep)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def utf8(v: str) -> bool:
    """Can ``v`` be stored and exported (no lone surrogate)?"""
    if v.isascii():
        return True
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def nonempty_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v and utf8(v) else None


def printable_id(v: str | None, limit: int = 128) -> str | None:
    """A client-chosen id (session, turn) cut to ``limit``, every character that is not
    printable UTF-8 replaced by ``?``: it goes into logs, spans and ledger rows."""
    if not v:
        return None
    v = v[:limit]
    if v.isascii() and v.isprintable():
        return v
    return "".join(c if c.isprintable() and utf8(c) else "?" for c in v)


def positive_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

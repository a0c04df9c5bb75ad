"""Stream fidelity: do the bytes the fake upstream sent reach the client unchanged?

The fake numbers its ids per call (``resp_fake_000042``, ``msg_fake_000043``) and stamps
``created_at`` with the current second, so two calls never match byte for byte. Both
bodies are compared after replacing exactly those three values with placeholders; any
other difference (a rewritten id, re-serialised JSON, dropped ``event:`` lines, an added
``data: [DONE]``) counts and is described.
"""

from __future__ import annotations

import json
import re
from typing import Any

_VOLATILE = [
    (re.compile(rb"resp_fake_\d+"), b"resp_fake_N"),
    (re.compile(rb"msg_fake_\d+"), b"msg_fake_N"),
    (re.compile(rb'"created_at": ?\d+'), b'"created_at": 0'),
]


def normalise(body: bytes) -> bytes:
    for rx, repl in _VOLATILE:
        body = rx.sub(repl, body)
    return body


def _events(body: bytes) -> list[tuple[str | None, str]]:
    """(event line, data) per SSE block."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        ev, data = None, []
        for line in block.decode("utf-8", "replace").split("\n"):
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            out.append((ev, "\n".join(data)))
    return out


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def compare(sent: bytes, got: bytes) -> dict[str, Any]:
    """``identical`` after normalising the fake's volatile values, else what differs."""
    a, b = normalise(sent), normalise(got)
    if a == b:
        return {"identical": True, "differences": []}
    diffs: list[str] = []
    ea, eb = _events(a), _events(b)
    n_ev_a = sum(1 for e, _ in ea if e)
    n_ev_b = sum(1 for e, _ in eb if e)
    if n_ev_a != n_ev_b:
        diffs.append(f"`event:` lines {n_ev_a} -> {n_ev_b}")
    done = [d for _, d in eb if d.strip() == "[DONE]"]
    if done and not any(d.strip() == "[DONE]" for _, d in ea):
        diffs.append("`data: [DONE]` appended")
    eb = [(e, d) for e, d in eb if d.strip() != "[DONE]"]
    if len(ea) != len(eb):
        diffs.append(f"events {len(ea)} -> {len(eb)}")
    added: set[str] = set()
    removed: set[str] = set()
    changed: set[str] = set()
    reserialised = False
    for (_, da), (_, db) in zip(ea, eb, strict=False):
        if da == db:
            continue
        try:
            ja, jb = json.loads(da), json.loads(db)
        except ValueError:
            changed.add("non-JSON data")
            continue
        if ja == jb:
            reserialised = True
            continue
        reserialised = True
        fa, fb = _flat(ja), _flat(jb)
        added |= {k for k in fb if k not in fa}
        removed |= {k for k in fa if k not in fb}
        changed |= {k for k in fa if k in fb and fa[k] != fb[k]}
    if reserialised:
        diffs.append("JSON re-serialised (key order / spacing)")

    def short(keys: set[str]) -> str:
        generic = sorted({re.sub(r"\[\d+\]", "[]", k) for k in keys})
        return ", ".join(generic[:8]) + (" ..." if len(generic) > 8 else "")

    if changed:
        diffs.append(f"values changed: {short(changed)}")
    if added:
        diffs.append(f"fields added: {short(added)}")
    if removed:
        diffs.append(f"fields removed: {short(removed)}")
    if not diffs:
        diffs.append("bytes differ (framing or whitespace)")
    return {"identical": False, "differences": diffs}

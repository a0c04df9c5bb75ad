"""Hash-chained audit trail: who did what, when, from where, with what outcome.

Security and finance need a record they can trust, so every JSON line carries
the previous line's hash: :func:`verify` finds an edited, removed or reordered
record and, given a head hash kept elsewhere, a truncated tail.

The gateway and short CLI commands append to the same file. Each batch holds an
exclusive ``flock`` on the file, reads the last record from the tail (never the
whole file) and appends with one write, so ``seq`` and ``prev`` form a single
chain across processes. A failed write is truncated away under the lock, so a
batch lands whole or not at all.

Torn writes (a crash mid-write) leave a line that is not valid JSON. The next
append terminates it and first writes an ``audit.torn_skipped`` record that
chains from the last complete record and carries the skipped bytes' line count,
length and sha256. :func:`verify` accepts unreadable lines only when such a
record, matching them byte for byte, follows them; otherwise it reports them.
A last line that is a complete record missing only its newline is kept.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import math
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from agent_egress.addon.tokens import REDACTED, TOKEN_LENGTH, TOKEN_PREFIX

log = logging.getLogger(__name__)

VERSION = 1
GENESIS = "0" * 64
TORN_ACTION = "audit.torn_skipped"
OUTCOMES = frozenset({"ok", "refused", "error"})
PROVIDER_KEY_REDACTED = "sk-…[redacted]"

_FIELDS = frozenset({"v", "seq", "ts", "action", "actor", "outcome", "target", "source",
                     "request_id", "detail", "prev", "hash"})
_CHUNK = 64 * 1024
_MAX_TAIL = 8 * 1024 * 1024  # unreadable bytes we scan back over before giving up
_MAX_BATCH = 5_000

# Shape, not checksum: a mistyped real token still leaks most of its bits.
_TOKEN_SHAPED = re.compile(rf"{TOKEN_PREFIX}[0-9A-Za-z]{{{TOKEN_LENGTH - len(TOKEN_PREFIX)},}}")
_PROVIDER_KEY = re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{20,}")

DetailValue = str | int | float | bool | None


class AuditError(Exception):
    """The log cannot be appended to without a human looking at it."""


@dataclass(frozen=True)
class AuditEvent:
    """One admin action or refused request. ``ts`` is taken at construction, so an
    event queued for a batched write keeps the time it happened."""

    action: str
    actor: str
    outcome: str
    target: str | None = None
    source: str | None = None
    request_id: str | None = None
    detail: Mapping[str, DetailValue] = field(default_factory=dict)
    ts: datetime | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {self.outcome!r}")
        if not self.action or not self.actor:
            raise ValueError("an audit event needs an action and an actor")
        if self.ts is None:
            object.__setattr__(self, "ts", datetime.now(UTC))


def cli_actor() -> str:
    """``cli:<os user>@<host>``: who ran an admin command, as the OS knows them."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def scrub(text: str) -> str:
    """Last line of defence: no gateway token or provider key reaches the file."""
    return _PROVIDER_KEY.sub(PROVIDER_KEY_REDACTED, _TOKEN_SHAPED.sub(REDACTED, text))


def _scrub_opt(text: str | None) -> str | None:
    return None if text is None else scrub(str(text))


def _detail_value(value: object) -> DetailValue:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN
    return scrub(value if isinstance(value, str) else str(value))


def _format_ts(ts: datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _body(event: AuditEvent) -> dict[str, Any]:
    """The record's event fields, redacted; the chain fields are added under the lock."""
    assert event.ts is not None  # set by __post_init__
    return {
        "ts": _format_ts(event.ts),
        "action": scrub(event.action),
        "actor": scrub(event.actor),
        "outcome": event.outcome,
        "target": _scrub_opt(event.target),
        "source": _scrub_opt(event.source),
        "request_id": _scrub_opt(event.request_id),
        "detail": {scrub(str(k)): _detail_value(v) for k, v in event.detail.items()},
    }


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 hex over the canonical JSON of the record without its ``hash``."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _parse(line: bytes) -> Any:
    """The JSON value of a line, or ``...`` when it is not JSON (a torn write)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return ...


def _chain_point(line: bytes) -> tuple[str, int] | None:
    obj = _parse(line)
    if not isinstance(obj, dict):
        return None
    h, seq = obj.get("hash"), obj.get("seq")
    if isinstance(h, str) and isinstance(seq, int) and not isinstance(seq, bool):
        return h, seq
    return None


@dataclass(frozen=True)
class _Tail:
    prev: str
    seq: int
    size: int
    lead: bytes  # b"\n" when the file does not end with a newline
    skipped: bytes  # unreadable bytes after the last record, newline-terminated


def _tail(prev: str, seq: int, size: int, after: bytes) -> _Tail:
    lead = b"\n" if after and not after.endswith(b"\n") else b""
    return _Tail(prev, seq, size, lead, after + lead)


def _read_tail(fd: int) -> _Tail:
    """Last record's hash and seq, read backwards from the end in chunks."""
    size = os.fstat(fd).st_size
    start, data = size, b""
    while True:
        lines = data.split(b"\n")
        first = 0 if start == 0 else 1  # lines[0] may begin before `start`
        end = len(data)
        for i in range(len(lines) - 1, first - 1, -1):
            begin = end - len(lines[i])
            point = _chain_point(lines[i])
            if point is not None:
                rest = data[end:]
                if not rest:  # complete record, only its newline missing
                    return _Tail(point[0], point[1], size, b"\n", b"")
                return _tail(point[0], point[1], size, rest[1:])
            end = begin - 1
        if start == 0:
            return _tail(GENESIS, 0, size, data)
        if size - start >= _MAX_TAIL:
            raise AuditError(f"no audit record in the last {size - start} bytes of the log; "
                             "run `agent-egress audit verify`")
        n = min(_CHUNK, start)
        start -= n
        data = os.pread(fd, n, start) + data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class AuditLog:
    """Appends hash-chained records; safe across threads and processes (``flock``)."""

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self._fsync = fsync

    def append(self, event: AuditEvent) -> str:
        """Write one event; returns its record hash."""
        h = self.append_many([event])
        assert h is not None
        return h

    def append_many(self, events: Sequence[AuditEvent]) -> str | None:
        """Write events under one lock with one write; returns the new head hash."""
        if not events:
            return None
        bodies = [_body(e) for e in events]  # redact before taking the lock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            tail = _read_tail(fd)
            if tail.skipped:
                log.warning("audit: %s ends in %d unreadable bytes (torn write?); recording "
                            "and chaining past them", self.path, len(tail.skipped))
                bodies.insert(0, _body(AuditEvent(
                    TORN_ACTION, actor=f"audit:{os.getpid()}@{socket.gethostname()}",
                    outcome="error", detail=_torn_detail(tail.skipped))))
            prev, seq, out = tail.prev, tail.seq, [tail.lead]
            for body in bodies:
                seq += 1
                record = {**body, "v": VERSION, "seq": seq, "prev": prev}
                prev = record["hash"] = record_hash(record)
                out.append(_canonical(record) + b"\n")
            try:
                _write_all(fd, b"".join(out))
                if self._fsync:
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):  # else the next append sees a torn line
                    os.ftruncate(fd, tail.size)
                raise
            return prev
        finally:
            os.close(fd)  # releases the lock

    def head(self) -> str | None:
        """Hash of the last complete record, or None for an empty or missing log."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            tail = _read_tail(fd)
            return tail.prev if tail.seq else None
        finally:
            os.close(fd)


def _torn_detail(skipped: bytes) -> dict[str, DetailValue]:
    return {"lines": skipped.count(b"\n"), "bytes": len(skipped),
            "sha256": hashlib.sha256(skipped).hexdigest()}


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    head: str | None
    problem: str | None
    line: int | None
    skipped: int = 0  # torn lines acknowledged by an audit.torn_skipped record


def _shape_problem(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "not an audit record"
    if obj.get("v") != VERSION:
        return f"unsupported record version {obj.get('v')!r}"
    if set(obj) != _FIELDS:
        return f"not an audit record (fields {sorted(set(obj) ^ _FIELDS)} differ)"
    strings = all(isinstance(obj[k], str) for k in ("ts", "action", "actor", "outcome", "prev",
                                                    "hash"))
    optional = all(obj[k] is None or isinstance(obj[k], str)
                   for k in ("target", "source", "request_id"))
    seq_ok = isinstance(obj["seq"], int) and not isinstance(obj["seq"], bool)
    if not (strings and optional and seq_ok and isinstance(obj["detail"], dict)):
        return "not an audit record (a field has the wrong type)"
    return None


def _lines(f: BinaryIO) -> Iterator[bytes]:
    """Lines up to the size seen under a shared lock: a whole number of batches."""
    fcntl.flock(f, fcntl.LOCK_SH)
    left = os.fstat(f.fileno()).st_size
    fcntl.flock(f, fcntl.LOCK_UN)
    while left > 0 and (raw := f.readline(left)):
        left -= len(raw)
        yield raw


def verify(path: Path, expected_head: str | None = None) -> VerifyResult:
    """Walk the chain. ``expected_head`` is a head hash recorded elsewhere earlier
    (printed by the CLI, stored in the database): it must still be in the chain,
    which catches a truncated tail that the chain alone cannot."""
    try:
        f = Path(path).open("rb")
    except FileNotFoundError:
        return VerifyResult(False, 0, None, f"{path}: no such file", None)
    with f:
        return _verify(_lines(f), expected_head)


def _verify(lines: Iterator[bytes], expected_head: str | None) -> VerifyResult:
    records, prev, prev_seq, prev_line, skipped, found = 0, GENESIS, 0, 0, 0, False
    torn: list[tuple[int, bytes]] = []

    def fail(problem: str, line: int | None) -> VerifyResult:
        return VerifyResult(False, records, None if prev_line == 0 else prev, problem, line)

    for n, raw in enumerate(lines, 1):
        obj = _parse(raw)
        if obj is ...:
            torn.append((n, raw))
            continue
        if (why := _shape_problem(obj)) is not None:
            return fail(f"line {n}: {why}", n)
        if record_hash(obj) != obj["hash"]:
            return fail(f"line {n}: hash does not match its content (edited?)", n)
        if torn:
            first, last = torn[0][0], torn[-1][0]
            if obj["action"] != TORN_ACTION:
                return fail(f"line {first}: not valid JSON (torn write?)", first)
            if obj["detail"] != _torn_detail(b"".join(r for _, r in torn)):
                return fail(f"line {first}: unreadable lines {first}-{last} differ from what "
                            f"line {n} recorded about them (edited?)", first)
            skipped += len(torn)
            torn = []
        if obj["prev"] != prev:
            if prev_line == 0:
                return fail(f"line {n}: prev is not the start of the chain "
                            "(earlier records removed?)", n)
            return fail(f"line {n}: prev does not match line {prev_line}'s hash "
                        "(removed or reordered?)", n)
        if obj["seq"] != prev_seq + 1:
            return fail(f"line {n}: seq {obj['seq']} does not follow seq {prev_seq} "
                        "(removed or reordered?)", n)
        records, prev, prev_seq, prev_line = records + 1, obj["hash"], obj["seq"], n
        found = found or prev == expected_head
    if torn:
        return fail(f"line {torn[0][0]}: not valid JSON (torn write?)", torn[0][0])
    if expected_head is not None and not found:
        return fail(f"expected head {expected_head[:16]}… is not in the log "
                    "(tail truncated or log rewritten?)", None)
    return VerifyResult(True, records, prev if records else None, None, None, skipped)


class AsyncAuditWriter:
    """Batches events for the gateway: ``submit`` only appends to a bounded queue,
    the file work runs in a thread. Call ``submit`` from the event loop's thread.

    A failed write is retried with backoff (the batch lands whole or not at all);
    events are lost only on queue overflow or a timed-out ``close``, and both are
    counted in ``dropped`` and logged.
    """

    def __init__(self, log: AuditLog, batch_window: float = 0.05,
                 max_queue: int = 100_000) -> None:
        self.log = log
        self.dropped = 0
        self.errors = 0  # failed write attempts (retried)
        self._window = batch_window
        self._max_queue = max_queue
        self._queue: collections.deque[AuditEvent] = collections.deque()
        self._accepted = 0
        self._written = 0
        self._closed = False
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, event: AuditEvent) -> None:
        if self._closed or len(self._queue) >= self._max_queue:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("audit: %d events dropped (%s)", self.dropped,
                          "writer closed" if self._closed else "queue full")
            return
        self._queue.append(event)
        self._accepted += 1
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            if self._window > 0:
                await asyncio.sleep(self._window)
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), _MAX_BATCH))]
                try:
                    await asyncio.to_thread(self.log.append_many, batch)
                except Exception:
                    self._queue.extendleft(reversed(batch))
                    self.errors += 1
                    failures += 1
                    log.exception("audit: writing %d events to %s failed; retrying",
                                  len(batch), self.log.path)
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                    continue
                failures = 0
                self._written += len(batch)
                self._progress.set()

    async def flush(self, wait_seconds: float | None = None) -> bool:
        """Wait until every event submitted so far is on disk; False on timeout."""
        target = self._accepted
        if self._written >= target:
            return True
        if self._task is None:
            return False
        self._wake.set()
        try:
            async with asyncio.timeout(wait_seconds):
                while self._written < target:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, wait_seconds: float = 5.0) -> None:
        """Write what is queued (starting the writer if need be), then stop."""
        self._closed = True
        if self._queue:
            self.start()
        await self.flush(wait_seconds)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue:
            self.dropped += len(self._queue)
            log.error("audit: %d events not written to %s at shutdown", len(self._queue),
                      self.log.path)
            self._queue.clear()

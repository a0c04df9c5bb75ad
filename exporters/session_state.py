"""Per-session tracing state and deterministic trace/span ids.

Trace and turn-span ids are hashes of the session id (and turn key), so every
gateway replica that sees calls of one session adds them to the same trace, and
a chat span can name its turn span as parent before that turn span is exported
(it is exported only when the turn ends, possibly long after).
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import INVALID_SPAN_ID, INVALID_TRACE_ID

_SESSION_NS = b"agent-egress/session/"
_TURN_NS = b"agent-egress/turn/"


def session_trace_id(session_id: str) -> int:
    """128-bit trace id: first 16 bytes of sha256 over a namespaced session id."""
    tid = int.from_bytes(hashlib.sha256(_SESSION_NS + session_id.encode()).digest()[:16], "big")
    return tid or 1  # all-zero is the invalid id; a 2**-128 chance, but be exact


def turn_span_id(session_id: str, turn_key: str) -> int:
    """64-bit span id of a turn span; the NUL separator keeps (a, bc) != (ab, c)."""
    raw = _TURN_NS + session_id.encode() + b"\0" + turn_key.encode()
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") or 1


class PrimedIdGenerator(IdGenerator):
    """Random ids, except the next trace/span id can be primed for one ``start_span``.

    The SDK offers no way to pass ids to ``start_span``; it asks its IdGenerator.
    Primed values live in a thread-local, so a span started on another thread (an
    unrelated instrumentation sharing the provider, the export thread) can never
    take them; ``SessionTracer`` primes and starts on the same thread, and clears
    in ``finally`` so an unused priming (root-only trace id, a disabled tracer)
    never leaks into the next span.
    """

    def __init__(self) -> None:
        self._primed = threading.local()

    def prime(self, *, trace_id: int | None = None, span_id: int | None = None) -> None:
        self._primed.trace_id = trace_id
        self._primed.span_id = span_id

    def clear(self) -> None:
        self._primed.trace_id = None
        self._primed.span_id = None

    def generate_span_id(self) -> int:
        sid: int | None = getattr(self._primed, "span_id", None)
        if sid is not None:
            self._primed.span_id = None
            return sid
        sid = random.getrandbits(64)
        while sid == INVALID_SPAN_ID:
            sid = random.getrandbits(64)
        return sid

    def generate_trace_id(self) -> int:
        tid: int | None = getattr(self._primed, "trace_id", None)
        if tid is not None:
            self._primed.trace_id = None
            return tid
        tid = random.getrandbits(128)
        while tid == INVALID_TRACE_ID:
            tid = random.getrandbits(128)
        return tid

    def is_trace_id_random(self) -> bool:
        # Hash-derived ids are uniformly distributed, which is what ratio samplers need.
        return True


@dataclass(slots=True)
class PendingTool:
    """A tool call the model asked for; its span is built when its output comes back."""

    name: str
    start_ns: int


@dataclass(slots=True)
class TurnSums:
    """What a turn span reports when it ends (summed over every call, on any replica)."""

    calls: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced_calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    unanswered_tools: int = 0


@dataclass(slots=True)
class TurnState:
    """An open turn: its span is built only when it ends, from these facts.

    Holding facts instead of a live SDK span is what lets another replica (through
    Redis) end a turn this one started: the span id is a hash, the rest is data.
    """

    key: str
    number: int
    start_ns: int
    last_end_ns: int
    org: str
    team: str
    user: str
    turn_id: str | None
    last_outcome: str = "ok"
    sums: TurnSums = field(default_factory=TurnSums)
    pending: dict[str, PendingTool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndedTurn:
    """A turn to export now: exactly one replica gets it (Redis decides which)."""

    session_id: str
    key: str
    number: int
    start_ns: int
    end_ns: int
    org: str
    team: str
    user: str
    turn_id: str | None
    reason: str
    sums: TurnSums


@dataclass(frozen=True, slots=True)
class ToolRun:
    """A tool execution to export now: asked for in turn ``turn_key``, answered now."""

    call_id: str
    name: str
    start_ns: int
    turn_key: str


@dataclass(slots=True)
class Placement:
    """Where one settled call goes: its turn, and what it ends (turns, tool runs)."""

    turn_key: str
    ended: list[EndedTurn] = field(default_factory=list)
    tools: list[ToolRun] = field(default_factory=list)


@dataclass(slots=True)
class SessionState:
    session_id: str
    trace_id: int
    last_seen_ns: int
    turns_started: int = 0
    turn: TurnState | None = None
    ended: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Recently ended turn keys, so a late call of one parents to it instead of reopening it."""


class SessionTable:
    """Sessions in least-recently-used order, bounded in count; not thread-safe."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max(1, max_sessions)
        self._by_id: OrderedDict[str, SessionState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def touch(self, session_id: str, now_ns: int) -> tuple[SessionState, list[SessionState]]:
        """The session's state (made if new, marked most recent) and the sessions evicted."""
        st = self._by_id.get(session_id)
        if st is None:
            st = SessionState(session_id, session_trace_id(session_id), now_ns)
            self._by_id[session_id] = st
        else:
            self._by_id.move_to_end(session_id)
            st.last_seen_ns = max(st.last_seen_ns, now_ns)
        evicted = []
        while len(self._by_id) > self.max_sessions:
            evicted.append(self._by_id.popitem(last=False)[1])
        return st, evicted

    def pop_idle(self, cutoff_ns: int) -> Iterator[SessionState]:
        """Remove and yield sessions last seen before ``cutoff_ns``, oldest first.

        Access order tracks last-seen closely (calls settle roughly in order), so
        the scan stops at the first recent session instead of walking the table.
        """
        while self._by_id:
            st = next(iter(self._by_id.values()))
            if st.last_seen_ns >= cutoff_ns:
                return
            del self._by_id[st.session_id]
            yield st

    def ids(self) -> list[str]:
        return list(self._by_id)

    def pop_all(self) -> list[SessionState]:
        out = list(self._by_id.values())
        self._by_id.clear()
        return out

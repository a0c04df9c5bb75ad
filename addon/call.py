"""The typed record each addon hands to the next through ``flow.metadata``.

One ``Call`` per HTTP flow the gateway owns, created by classify and filled in
step by step; settle turns it into a ledger row. Keeping it in one dataclass
(rather than loose metadata keys) is what lets every step stay small.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from .budget_policy import Admission
from .protocols.chatgpt_login import ChatGPTIdentity
from .protocols.summary import ResponseSummary
from .store.base import KeyRecord, LedgerRow

METADATA_KEY = "agent_egress.call"

Api = Literal["openai.responses", "openai.responses.compact", "openai.chat",
              "anthropic.messages",  # anthropic (issue 13)
              "chatgpt.codex",  # ChatGPT-login Codex, metered in egress mode (issue 9)
              "openai.responses.ws"]  # Codex over WebSocket (issue 9): addon/websocket.py


class StreamReader(Protocol):
    summary: ResponseSummary

    def feed(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...


class StreamWrapper(Protocol):
    """Guardrails' output guard, as the stream tap sees it (addon/guard_output.py)."""

    def wrap(self, flow: Any, inner: Callable[[bytes], Any]
             ) -> Callable[[bytes], bytes | list[bytes]]: ...


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex[:24]


@dataclass(slots=True)
class Call:
    api: Api
    request_id: str = field(default_factory=new_request_id)
    started_wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.monotonic)
    started_ns: int = field(default_factory=time.time_ns)
    principal: KeyRecord | None = None
    requested_model: str | None = None
    stream: bool = False
    session_id: str | None = None
    turn_id: str | None = None
    request_bytes: int = 0
    tool_output_ids: tuple[str, ...] = ()
    """call_ids of tool outputs this request returns (closes execute_tool spans)."""
    traceparent: str | None = None
    provider: str | None = None
    upstream_host: str | None = None
    upstream_port: int | None = None
    status_code: int | None = None
    first_byte_at: float | None = None
    response_bytes: int = 0
    reader: StreamReader | None = None
    summary: ResponseSummary | None = None
    refused: str | None = None
    """Rule that refused the call before it reached a provider (no ledger row)."""
    error: str | None = None
    overhead_s: float = 0.0
    """Wall time spent in the gateway's own hooks and stream tap for this call."""
    agent: str = "other"
    tags: dict[str, str] = field(default_factory=dict)
    """Key tags and x-egress-tag-* request tags: on the ledger row and the span."""
    settled: bool = False
    row: LedgerRow | None = None
    """The ledger row settle wrote; telemetry reads cost and outcome from it."""
    traced: bool = False
    # failover (issue 8) -------------------------------------------------------
    attempt: object | None = None
    """The failover addon's per-call state (addon/failover.py ``Attempt``)."""
    failover_reason: str | None = None
    """Why this attempt failed over (e.g. status_503, connect_timeout, stream_cut): the
    client was told to retry and the retry goes to another provider."""
    route_events: list[tuple[str, int, dict[str, str]]] = field(default_factory=list)
    """(name, unix ns, attributes) span events: failovers and breaker changes."""
    # guardrails (issue 6) ------------------------------------------------------
    guard_hits: list[tuple[str, str, str]] = field(default_factory=list)
    """(rule, action, direction) of guardrail hits on this call (never the matched text)."""
    output_guard: StreamWrapper | None = None
    """Set by guard input when the caller's policy checks model output; guard output
    wraps the response's stream callable with it."""
    # budgets (issue 5) -----------------------------------------------------------
    admission: Admission | None = None
    """The budget/rate-limit reservation admit took; settle turns it into spend."""
    # anthropic (issue 13) ----------------------------------------------------------
    side_call: bool = False
    """A request offering no tools (Claude Code's small-model title/summary calls)."""
    # telemetry (issue 7) ---------------------------------------------------------
    captured_output: bytearray | None = None
    """The response as sent to the client, bounded, when content capture is on for the
    caller (addon/capture.py); None otherwise."""
    # ChatGPT-login Codex (issue 9) -------------------------------------------------
    billing: Literal["gateway", "subscription"] = "gateway"
    """subscription: the developer's own ChatGPT plan paid for the call (metered, never
    charged to gateway budgets); gateway: a vaulted provider key did."""
    chatgpt: ChatGPTIdentity | None = None
    """The ChatGPT account and JWT identity claims of a subscription call."""

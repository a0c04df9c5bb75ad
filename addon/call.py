"""The typed record each addon hands to the next through ``flow.metadata``.

One ``Call`` per HTTP flow the gateway owns, created by classify and filled in
step by step; settle turns it into a ledger row. Keeping it in one dataclass
(rather than loose metadata keys) is what lets every step stay small.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from .protocols.summary import ResponseSummary
from .store.base import KeyRecord, LedgerRow

METADATA_KEY = "agent_egress.call"

Api = Literal["openai.responses", "openai.responses.compact", "openai.chat"]


class StreamReader(Protocol):
    summary: ResponseSummary

    def feed(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...


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

"""The store interface: gateway keys and the ledger, one implementation per backend.

Methods are synchronous; the request path calls them through ``asyncio.to_thread``
(or a batching writer) so the event loop never waits on a database.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

NANO = Decimal("1e-9")
SpendGroup = Literal["team", "user", "model", "org", "key", "provider", "session"]


def usd_to_nano(usd: Decimal | None) -> int | None:
    return None if usd is None else int((usd / NANO).to_integral_value())


def nano_to_usd(nano: int | None) -> Decimal | None:
    return None if nano is None else (Decimal(nano) * NANO).normalize()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    org: str
    team: str
    user: str
    description: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime) -> Literal["active", "expired", "revoked"]:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class LedgerRow:
    ts: datetime
    request_id: str
    org: str
    team: str
    user: str
    key_id: str
    session_id: str | None
    turn_id: str | None
    api: str
    requested_model: str | None
    served_model: str | None
    provider: str
    status_code: int | None
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal | None
    price_source: str
    usage_estimated: bool
    ttfb_ms: int | None
    duration_ms: int
    outcome: str
    error_code: str | None


@dataclass(frozen=True, slots=True)
class SpendRow:
    group: str
    calls: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal
    unpriced_calls: int
    estimated_calls: int


class Store(abc.ABC):
    @abc.abstractmethod
    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent)."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise if the database cannot be reached."""

    @abc.abstractmethod
    def create_key(
        self,
        *,
        key_id: str,
        token_hash: str,
        org: str,
        team: str,
        user: str,
        expires_at: datetime | None,
        description: str | None,
    ) -> KeyRecord: ...

    @abc.abstractmethod
    def key_by_hash(self, token_hash: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    def list_keys(self) -> list[KeyRecord]: ...

    @abc.abstractmethod
    def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        """Revoke a key; returns None when no such key exists."""

    @abc.abstractmethod
    def revocation_fingerprint(self) -> tuple[object, ...]:
        """Changes whenever any key is revoked; polled by every gateway's key cache."""

    @abc.abstractmethod
    def insert_ledger(self, rows: Sequence[LedgerRow]) -> None: ...

    @abc.abstractmethod
    def ledger_rows(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[LedgerRow]: ...

    @abc.abstractmethod
    def spend(
        self, by: SpendGroup, since: datetime | None = None, until: datetime | None = None
    ) -> list[SpendRow]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

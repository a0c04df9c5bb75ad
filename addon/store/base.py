"""The store interface: gateway keys and the ledger, one implementation per backend.

Methods are synchronous; the request path calls them through ``asyncio.to_thread``
(or a batching writer) so the event loop never waits on a database.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..budget_policy import BudgetSpec, RateSpec, Window

NANO = Decimal("1e-9")
SpendGroup = str
"""team, user, model, org, key, provider, session, or tag:<name>."""
KeyState = Literal["active", "expired", "revoked", "disabled"]
Role = Literal["org-admin", "team-admin", "viewer"]
ROLES: tuple[Role, ...] = ("org-admin", "team-admin", "viewer")


def usd_to_nano(usd: Decimal | None) -> int | None:
    return None if usd is None else int((usd / NANO).to_integral_value())


def nano_to_usd(nano: int | None) -> Decimal | None:
    return None if nano is None else (Decimal(nano) * NANO).normalize()


@dataclass(frozen=True, slots=True)
class Entity:
    """An org, team or user record (one shape: they differ only in their parents)."""

    kind: Literal["org", "team", "user"]
    id: str
    name: str
    org_id: str | None
    team_id: str | None
    email: str | None
    created_at: datetime
    disabled_at: datetime | None


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
    org_id: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    allowed_models: tuple[str, ...] = ()
    """Model globs this key may call; empty = any."""
    allowed_providers: tuple[str, ...] = ()
    allowed_routes: tuple[str, ...] = ()
    """API globs, e.g. openai.responses*, openai.chat; empty = any."""
    tags: Mapping[str, str] = field(default_factory=dict)
    disabled_at: datetime | None = None
    disabled_by: str | None = None
    """Which level is disabled: key, user, team or org (the first found, top down)."""
    grace_until: datetime | None = None
    """Set when the token presented is the one replaced by a rotation."""

    def state(self, now: datetime) -> KeyState:
        if self.revoked_at is not None:
            return "revoked"
        if self.disabled_by is not None:
            return "disabled"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.grace_until is not None and self.grace_until <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class AdminTokenRecord:
    id: str
    role: Role
    org_id: str | None
    team_id: str | None
    description: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


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
    tags: Mapping[str, str] | None = None
    agent: str | None = None
    """codex, claude-code or other (from the user agent): finance splits spend by it."""
    billing: str = "gateway"
    """gateway (a vaulted key paid) or subscription (a developer's ChatGPT plan did; the
    cost is the equivalent USD, never counted against budgets). Migration 0005."""


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

    # hierarchy ------------------------------------------------------------
    @abc.abstractmethod
    def create_entity(self, kind: Literal["org", "team", "user"], name: str, *,
                      parent_id: str | None = None, email: str | None = None) -> Entity:
        """Create an org (no parent), a team (parent: org id) or a user (parent: team id)."""

    @abc.abstractmethod
    def get_entity(self, kind: Literal["org", "team", "user"], entity_id: str) -> Entity | None:
        ...

    @abc.abstractmethod
    def find_entity(self, kind: Literal["org", "team", "user"], name: str,
                    org_id: str | None = None) -> Entity | None:
        """By name: orgs globally, teams and users within an org."""

    @abc.abstractmethod
    def list_entities(self, kind: Literal["org", "team", "user"], *, org_id: str | None = None,
                      team_id: str | None = None) -> list[Entity]: ...

    @abc.abstractmethod
    def set_entity_disabled(self, kind: Literal["org", "team", "user"], entity_id: str,
                            disabled: bool) -> Entity | None: ...

    # keys -----------------------------------------------------------------
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
        org_id: str | None = None,
        team_id: str | None = None,
        user_id: str | None = None,
        allowed_models: Sequence[str] = (),
        allowed_providers: Sequence[str] = (),
        allowed_routes: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
    ) -> KeyRecord: ...

    @abc.abstractmethod
    def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    def update_key(self, key_id: str, *, disabled: bool | None = None,
                   allowed_models: Sequence[str] | None = None,
                   allowed_providers: Sequence[str] | None = None,
                   allowed_routes: Sequence[str] | None = None,
                   tags: Mapping[str, str] | None = None,
                   description: str | None = None) -> KeyRecord | None: ...

    @abc.abstractmethod
    def rotate_key(self, key_id: str, new_token_hash: str,
                   grace_until: datetime) -> KeyRecord | None:
        """New token for the key; the old one stays valid until grace_until."""

    # admin tokens ---------------------------------------------------------
    @abc.abstractmethod
    def create_admin_token(self, *, token_id: str, token_hash: str, role: Role,
                           org_id: str | None, team_id: str | None, description: str | None,
                           created_by: str, expires_at: datetime | None) -> AdminTokenRecord:
        ...

    @abc.abstractmethod
    def admin_token_by_hash(self, token_hash: str) -> AdminTokenRecord | None: ...

    @abc.abstractmethod
    def revoke_admin_token(self, token_id: str, at: datetime) -> AdminTokenRecord | None: ...

    @abc.abstractmethod
    def key_by_hash(self, token_hash: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    def list_keys(self, *, org_id: str | None = None, team_id: str | None = None,
                  user_id: str | None = None) -> list[KeyRecord]: ...

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
        self, by: SpendGroup, since: datetime | None = None, until: datetime | None = None,
        *, org: str | None = None, team: str | None = None,
    ) -> list[SpendRow]:
        """Spend grouped by `by`; org/team (names) narrow it to one scope."""

    # -- budgets and rate limits set through the admin API (config ones are not here)

    @abc.abstractmethod
    def budget_sums(self, windows: Sequence[Window]) -> dict[str, tuple[int, int]]:
        """Ledger spend (nano-USD, tokens) per counter id (scope|window) since each window."""

    @abc.abstractmethod
    def rebuild_budget_counters(self, windows: Sequence[Window]) -> int:
        """Embedded limiter counters := ledger sums for these windows; returns how many."""

    @abc.abstractmethod
    def list_budgets(self) -> list[tuple[str, BudgetSpec]]: ...

    @abc.abstractmethod
    def set_budget(self, scope: str, spec: BudgetSpec, by: str) -> None: ...

    @abc.abstractmethod
    def delete_budget(self, scope: str, period: str) -> bool: ...

    @abc.abstractmethod
    def list_rate_limits(self) -> list[tuple[str, RateSpec]]: ...

    @abc.abstractmethod
    def set_rate_limit(self, scope: str, spec: RateSpec, by: str) -> None: ...

    @abc.abstractmethod
    def delete_rate_limit(self, scope: str) -> bool: ...

    @abc.abstractmethod
    def limits_fingerprint(self) -> tuple[object, ...]:
        """Changes whenever a stored budget or rate limit changes; polled by gateways."""

    @abc.abstractmethod
    def close(self) -> None: ...

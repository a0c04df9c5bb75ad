"""Tables shared by every SQL backend (SQLite embedded, PostgreSQL scale-out).

Money is stored as integer nano-USD so sums reconcile to the cent without
floating-point drift; the API converts to Decimal.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

orgs = Table(
    "orgs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
)

teams = Table(
    "teams",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("org_id", "name", name="uq_teams_org_name"),
)

users = Table(
    "users",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False),
    Column("team_id", String(40), ForeignKey("teams.id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("email", String(256), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("org_id", "name", name="uq_users_org_name"),
)

admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("role", String(20), nullable=False),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=True),
    Column("team_id", String(40), ForeignKey("teams.id"), nullable=True),
    Column("description", Text, nullable=True),
    Column("created_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

gateway_keys = Table(
    "gateway_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("org", String(128), nullable=False),
    Column("team", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("description", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("org_id", String(40), nullable=True),
    Column("team_id", String(40), nullable=True),
    Column("user_id", String(40), nullable=True),
    Column("allowed_models", JSON, nullable=True),
    Column("allowed_providers", JSON, nullable=True),
    Column("allowed_routes", JSON, nullable=True),
    Column("tags", JSON, nullable=True),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=True),
    Column("previous_token_hash", String(64), nullable=True),
    Column("previous_valid_until", DateTime(timezone=True), nullable=True),
    Index("ix_gateway_keys_previous_hash", "previous_token_hash"),
    Index("ix_gateway_keys_user", "user_id"),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("request_id", String(40), nullable=False),
    Column("org", String(128), nullable=False),
    Column("team", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("session_id", String(128), nullable=True),
    Column("turn_id", String(128), nullable=True),
    Column("api", String(40), nullable=False),
    Column("requested_model", String(128), nullable=True),
    Column("served_model", String(128), nullable=True),
    Column("provider", String(64), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_input_tokens", BigInteger, nullable=False, default=0),
    Column("cache_write_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("cost_nano_usd", BigInteger, nullable=True),
    Column("price_source", String(20), nullable=False),
    Column("usage_estimated", Boolean, nullable=False, default=False),
    Column("ttfb_ms", Integer, nullable=True),
    Column("duration_ms", Integer, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("error_code", String(64), nullable=True),
    Column("tags", JSON, nullable=True),
    Column("agent", String(32), nullable=True),
    Column("billing", String(16), nullable=False, server_default="gateway"),  # 0005
    Index("ix_ledger_ts", "ts"),
    Index("ix_ledger_team_ts", "team", "ts"),
    Index("ix_ledger_session", "session_id"),
)

# Budgets and rate limits (0003). Counters and reservations are the embedded
# limiter's live state; with Redis they live there and these stay empty.
budget_counters = Table(
    "budget_counters",
    metadata,
    Column("counter", String(300), primary_key=True),  # <scope>|<window>
    Column("nano", BigInteger, nullable=False, default=0),
    Column("tokens", BigInteger, nullable=False, default=0),
)

budget_reservations = Table(
    "budget_reservations",
    metadata,
    Column("res_id", String(40), primary_key=True),
    Column("counter", String(300), primary_key=True),
    Column("nano", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_budget_reservations_counter", "counter", "expires_at"),
)

budgets = Table(
    "budgets",
    metadata,
    Column("scope", String(300), primary_key=True),
    Column("period", String(10), primary_key=True),
    Column("usd_nano", BigInteger, nullable=True),
    Column("tokens", BigInteger, nullable=True),
    Column("mode", String(10), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("updated_by", String(128), nullable=False),
)

rate_limits = Table(
    "rate_limits",
    metadata,
    Column("scope", String(300), primary_key=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", BigInteger, nullable=True),
    Column("concurrent", Integer, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("updated_by", String(128), nullable=False),
)

"""Tables shared by every SQL backend (SQLite embedded, PostgreSQL scale-out).

Money is stored as integer nano-USD so sums reconcile to the cent without
floating-point drift; the API converts to Decimal.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

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
    Index("ix_ledger_ts", "ts"),
    Index("ix_ledger_team_ts", "team", "ts"),
    Index("ix_ledger_session", "session_id"),
)

"""Gateway keys and the per-call ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("org", sa.String(128), nullable=False),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "ledger",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("org", sa.String(128), nullable=False),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=True),
        sa.Column("turn_id", sa.String(128), nullable=True),
        sa.Column("api", sa.String(40), nullable=False),
        sa.Column("requested_model", sa.String(128), nullable=True),
        sa.Column("served_model", sa.String(128), nullable=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger, nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_nano_usd", sa.BigInteger, nullable=True),
        sa.Column("price_source", sa.String(20), nullable=False),
        sa.Column("usage_estimated", sa.Boolean, nullable=False),
        sa.Column("ttfb_ms", sa.Integer, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
    )
    op.create_index("ix_ledger_ts", "ledger", ["ts"])
    op.create_index("ix_ledger_team_ts", "ledger", ["team", "ts"])
    op.create_index("ix_ledger_session", "ledger", ["session_id"])


def downgrade() -> None:
    op.drop_table("ledger")
    op.drop_table("gateway_keys")

"""Budgets, rate limits, the embedded limiter's counters and reservations.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_counters",
        sa.Column("counter", sa.String(300), primary_key=True),
        sa.Column("nano", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("tokens", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "budget_reservations",
        sa.Column("res_id", sa.String(40), primary_key=True),
        sa.Column("counter", sa.String(300), primary_key=True),
        sa.Column("nano", sa.BigInteger, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_budget_reservations_counter", "budget_reservations",
                    ["counter", "expires_at"])
    op.create_table(
        "budgets",
        sa.Column("scope", sa.String(300), primary_key=True),
        sa.Column("period", sa.String(10), primary_key=True),
        sa.Column("usd_nano", sa.BigInteger, nullable=True),
        sa.Column("tokens", sa.BigInteger, nullable=True),
        sa.Column("mode", sa.String(10), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "rate_limits",
        sa.Column("scope", sa.String(300), primary_key=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.BigInteger, nullable=True),
        sa.Column("concurrent", sa.Integer, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_limits")
    op.drop_table("budgets")
    op.drop_index("ix_budget_reservations_counter", "budget_reservations")
    op.drop_table("budget_reservations")
    op.drop_table("budget_counters")

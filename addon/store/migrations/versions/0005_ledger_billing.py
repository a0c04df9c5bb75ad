"""Who paid for a ledger row: gateway (a vaulted key) or subscription (ChatGPT-login Codex
metered in egress mode, equivalent USD). Existing rows are all gateway.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("billing", sa.String(16), nullable=False,
                                   server_default="gateway"))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("billing")

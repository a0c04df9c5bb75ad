"""Org > team > user records, key scopes/tags/rotation, admin tokens, ledger tags.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def upgrade() -> None:
    op.create_table(
        "orgs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "teams",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("org_id", sa.String(40), sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("org_id", "name", name="uq_teams_org_name"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("org_id", sa.String(40), sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("email", sa.String(256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("org_id", "name", name="uq_users_org_name"),
    )
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("org_id", sa.String(40), sa.ForeignKey("orgs.id"), nullable=True),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id"), nullable=True),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    with op.batch_alter_table("gateway_keys") as b:
        b.add_column(sa.Column("org_id", sa.String(40), nullable=True))
        b.add_column(sa.Column("team_id", sa.String(40), nullable=True))
        b.add_column(sa.Column("user_id", sa.String(40), nullable=True))
        b.add_column(sa.Column("allowed_models", sa.JSON, nullable=True))
        b.add_column(sa.Column("allowed_providers", sa.JSON, nullable=True))
        b.add_column(sa.Column("allowed_routes", sa.JSON, nullable=True))
        b.add_column(sa.Column("tags", sa.JSON, nullable=True))
        b.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("previous_token_hash", sa.String(64), nullable=True))
        b.add_column(sa.Column("previous_valid_until", sa.DateTime(timezone=True),
                               nullable=True))
        b.create_index("ix_gateway_keys_previous_hash", ["previous_token_hash"])
        b.create_index("ix_gateway_keys_user", ["user_id"])
    with op.batch_alter_table("ledger") as b:
        b.add_column(sa.Column("tags", sa.JSON, nullable=True))

    # Keys issued before the hierarchy existed: create their org/team/user records.
    conn = op.get_bind()
    now = datetime.now(UTC)
    rows = conn.execute(sa.text('SELECT id, org, team, "user" FROM gateway_keys')).all()
    orgs: dict[str, str] = {}
    teams: dict[tuple[str, str], str] = {}
    users: dict[tuple[str, str], str] = {}
    for key_id, org, team, user in rows:
        if org not in orgs:
            orgs[org] = _id("org")
            conn.execute(sa.text("INSERT INTO orgs (id, name, created_at, updated_at)"
                                 " VALUES (:i, :n, :t, :t)"), {"i": orgs[org], "n": org, "t": now})
        if (org, team) not in teams:
            teams[(org, team)] = _id("team")
            conn.execute(sa.text("INSERT INTO teams (id, org_id, name, created_at, updated_at)"
                                 " VALUES (:i, :o, :n, :t, :t)"),
                         {"i": teams[(org, team)], "o": orgs[org], "n": team, "t": now})
        if (org, user) not in users:
            users[(org, user)] = _id("user")
            conn.execute(sa.text("INSERT INTO users (id, org_id, team_id, name, created_at,"
                                 " updated_at) VALUES (:i, :o, :tm, :n, :t, :t)"),
                         {"i": users[(org, user)], "o": orgs[org], "tm": teams[(org, team)],
                          "n": user, "t": now})
        conn.execute(sa.text("UPDATE gateway_keys SET org_id = :o, team_id = :tm, user_id = :u,"
                             " updated_at = :t WHERE id = :k"),
                     {"o": orgs[org], "tm": teams[(org, team)], "u": users[(org, user)],
                      "t": now, "k": key_id})


def downgrade() -> None:
    with op.batch_alter_table("ledger") as b:
        b.drop_column("tags")
    with op.batch_alter_table("gateway_keys") as b:
        b.drop_index("ix_gateway_keys_user")
        b.drop_index("ix_gateway_keys_previous_hash")
        for col in ("previous_valid_until", "previous_token_hash", "updated_at", "disabled_at",
                    "tags", "allowed_routes", "allowed_providers", "allowed_models", "user_id",
                    "team_id", "org_id"):
            b.drop_column(col)
    op.drop_table("admin_tokens")
    op.drop_table("users")
    op.drop_table("teams")
    op.drop_table("orgs")

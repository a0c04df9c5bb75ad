"""SQLAlchemy implementation of the store (SQLite embedded; PostgreSQL by URL)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any, Literal

from sqlalchemy import (
    Engine,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url

from .base import (
    AdminTokenRecord,
    Entity,
    KeyRecord,
    LedgerRow,
    Role,
    SpendGroup,
    SpendRow,
    Store,
    nano_to_usd,
    usd_to_nano,
)
from .schema import admin_tokens, gateway_keys, ledger, orgs, teams, users
from .sql_limits import SQLLimitsMixin

_LEDGER_FIELDS = tuple(f.name for f in dataclasses.fields(LedgerRow))

EntityKind = Literal["org", "team", "user"]
_ENTITY_TABLES = {"org": orgs, "team": teams, "user": users}

# Key rows joined with their user, team and org, so one query says whether any
# level above the key is disabled.
_KEY_SELECT = (
    select(
        gateway_keys,
        users.c.disabled_at.label("user_disabled_at"),
        teams.c.disabled_at.label("team_disabled_at"),
        orgs.c.disabled_at.label("org_disabled_at"),
    )
    .select_from(
        gateway_keys.outerjoin(users, users.c.id == gateway_keys.c.user_id)
        .outerjoin(teams, teams.c.id == gateway_keys.c.team_id)
        .outerjoin(orgs, orgs.c.id == gateway_keys.c.org_id)
    )
)

_GROUP_COLUMNS = {
    "team": ledger.c.team,
    "user": ledger.c.user,
    "org": ledger.c.org,
    "key": ledger.c.key_id,
    "provider": ledger.c.provider,
    "session": ledger.c.session_id,
    "agent": ledger.c.agent,
    "billing": ledger.c.billing,  # gateway | subscription (ChatGPT-login Codex, issue 9)
    "model": func.coalesce(ledger.c.served_model, ledger.c.requested_model),
}


def group_column(by: str) -> Any:
    """A spend grouping: a ledger column, or `tag:<name>` (the row's tag of that name)."""
    if by.startswith("tag:"):
        name = by[4:]
        if not name or len(name) > 64:
            raise ValueError(f"tag grouping needs a tag name: tag:<name> (got {by!r})")
        return ledger.c.tags[name].as_string()
    if by not in _GROUP_COLUMNS:
        raise ValueError(f"cannot group spend by {by!r}: one of {sorted(_GROUP_COLUMNS)}"
                         " or tag:<name>")
    return _GROUP_COLUMNS[by]


def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything we store is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for a store URL: SQLite (WAL pragmas) or PostgreSQL through psycopg 3.

    ``postgresql://`` (and ``postgres://``) URLs are normalised to
    ``postgresql+psycopg://``; SQLAlchemy's default driver for them is psycopg2,
    which is not a dependency. The pool is sized for a gateway: a handful of
    worker threads (key lookups, revocation poll, the ledger writer) plus bursts.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,  # a replica outlives database restarts and failovers
        "pool_size": 5,
        "max_overflow": 10,
        "pool_timeout": 10,  # seconds to wait for a pooled connection before failing
        "pool_recycle": 1800,  # below typical proxy/LB idle cut-offs
    }
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": 5}  # fail fast when the server is gone
    return create_engine(parsed, **kwargs)


HEAD_REVISION = "0005"
"""The newest migration (``migrations/versions``; tests/test_store.py checks it is Alembic's
head). A store already there is not handed to Alembic, which is then never imported."""


def schema_is_current(conn: Connection) -> bool:
    if not inspect(conn).has_table("alembic_version"):
        return False
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar() \
        == HEAD_REVISION


def run_migrations(conn: Connection) -> None:
    from alembic import command  # alembic (and mako): only loaded to migrate
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option(
        "script_location", str(resources.files("agent_egress.addon.store") / "migrations")
    )
    cfg.attributes["connection"] = conn
    # Replicas starting together must migrate one at a time: take the database's
    # write lock before Alembic looks at the schema, so the second waits and then
    # finds nothing to do.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(7236450219)"))
    elif conn.dialect.name == "sqlite":
        dbapi = conn.connection.dbapi_connection
        if dbapi is not None and not getattr(dbapi, "in_transaction", True):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    command.upgrade(cfg, "head")


class SQLStore(SQLLimitsMixin, Store):
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def migrate(self) -> None:
        with self.engine.begin() as conn:
            if not schema_is_current(conn):
                run_migrations(conn)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def close(self) -> None:
        self.engine.dispose()

    # hierarchy ----------------------------------------------------------
    @staticmethod
    def _entity(kind: EntityKind, row: Any) -> Entity:
        m = row._mapping
        return Entity(
            kind=kind, id=m["id"], name=m["name"],
            org_id=m.get("org_id"), team_id=m.get("team_id"), email=m.get("email"),
            created_at=_utc(m["created_at"]) or datetime.now(UTC),
            disabled_at=_utc(m["disabled_at"]),
        )

    def create_entity(self, kind: EntityKind, name: str, *, parent_id: str | None = None,
                      email: str | None = None) -> Entity:
        now = datetime.now(UTC)
        values: dict[str, Any] = {"id": f"{kind}_{uuid.uuid4().hex[:16]}", "name": name,
                                  "created_at": now, "updated_at": now}
        with self.engine.begin() as conn:
            if kind == "team":
                values["org_id"] = parent_id
            elif kind == "user":
                team = conn.execute(select(teams).where(teams.c.id == parent_id)).first()
                if team is None:
                    raise KeyError(f"no team {parent_id!r}")
                values.update(org_id=team.org_id, team_id=parent_id, email=email)
            conn.execute(insert(_ENTITY_TABLES[kind]).values(**values))
            row = conn.execute(select(_ENTITY_TABLES[kind]).where(
                _ENTITY_TABLES[kind].c.id == values["id"])).one()
        return self._entity(kind, row)

    def get_entity(self, kind: EntityKind, entity_id: str) -> Entity | None:
        t = _ENTITY_TABLES[kind]
        with self.engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.id == entity_id)).first()
        return None if row is None else self._entity(kind, row)

    def find_entity(self, kind: EntityKind, name: str, org_id: str | None = None
                    ) -> Entity | None:
        t = _ENTITY_TABLES[kind]
        stmt = select(t).where(t.c.name == name)
        if kind != "org":
            stmt = stmt.where(t.c.org_id == org_id)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else self._entity(kind, row)

    def list_entities(self, kind: EntityKind, *, org_id: str | None = None,
                      team_id: str | None = None) -> list[Entity]:
        t = _ENTITY_TABLES[kind]
        stmt = select(t).order_by(t.c.name)
        if org_id is not None:
            stmt = stmt.where((t.c.id if kind == "org" else t.c.org_id) == org_id)
        if team_id is not None and kind != "org":
            stmt = stmt.where((t.c.id if kind == "team" else t.c.team_id) == team_id)
        with self.engine.connect() as conn:
            return [self._entity(kind, r) for r in conn.execute(stmt)]

    def set_entity_disabled(self, kind: EntityKind, entity_id: str, disabled: bool
                            ) -> Entity | None:
        t = _ENTITY_TABLES[kind]
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(update(t).where(t.c.id == entity_id).values(
                disabled_at=now if disabled else None, updated_at=now))
        return self.get_entity(kind, entity_id)

    # keys ---------------------------------------------------------------
    @staticmethod
    def _key(row: Any, grace_until: datetime | None = None) -> KeyRecord:
        m = row._mapping
        disabled_by = None
        for level, col in (("org", "org_disabled_at"), ("team", "team_disabled_at"),
                           ("user", "user_disabled_at"), ("key", "disabled_at")):
            if m.get(col) is not None:
                disabled_by = level
                break
        return KeyRecord(
            id=m["id"],
            org=m["org"],
            team=m["team"],
            user=m["user"],
            description=m["description"],
            created_at=_utc(m["created_at"]) or datetime.now(UTC),
            expires_at=_utc(m["expires_at"]),
            revoked_at=_utc(m["revoked_at"]),
            org_id=m.get("org_id"),
            team_id=m.get("team_id"),
            user_id=m.get("user_id"),
            allowed_models=tuple(m.get("allowed_models") or ()),
            allowed_providers=tuple(m.get("allowed_providers") or ()),
            allowed_routes=tuple(m.get("allowed_routes") or ()),
            tags=dict(m.get("tags") or {}),
            disabled_at=_utc(m.get("disabled_at")),
            disabled_by=disabled_by,
            grace_until=grace_until,
        )

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
    ) -> KeyRecord:
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(
                insert(gateway_keys).values(
                    id=key_id, token_hash=token_hash, org=org, team=team, user=user,
                    description=description, created_at=now, updated_at=now,
                    expires_at=expires_at, org_id=org_id, team_id=team_id, user_id=user_id,
                    allowed_models=list(allowed_models), allowed_providers=list(allowed_providers),
                    allowed_routes=list(allowed_routes), tags=dict(tags or {}),
                )
            )
        record = self.get_key(key_id)
        assert record is not None
        return record

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_KEY_SELECT.where(gateway_keys.c.id == key_id)).first()
        return None if row is None else self._key(row)

    def key_by_hash(self, token_hash: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_KEY_SELECT.where(or_(
                gateway_keys.c.token_hash == token_hash,
                gateway_keys.c.previous_token_hash == token_hash))).first()
        if row is None:
            return None
        if row._mapping["token_hash"] != token_hash:  # the token a rotation replaced
            return self._key(row, grace_until=_utc(row._mapping["previous_valid_until"]))
        return self._key(row)

    def list_keys(self, *, org_id: str | None = None, team_id: str | None = None,
                  user_id: str | None = None) -> list[KeyRecord]:
        stmt = _KEY_SELECT.order_by(gateway_keys.c.created_at)
        for col, value in ((gateway_keys.c.org_id, org_id), (gateway_keys.c.team_id, team_id),
                           (gateway_keys.c.user_id, user_id)):
            if value is not None:
                stmt = stmt.where(col == value)
        with self.engine.connect() as conn:
            return [self._key(r) for r in conn.execute(stmt)]

    def update_key(self, key_id: str, *, disabled: bool | None = None,
                   allowed_models: Sequence[str] | None = None,
                   allowed_providers: Sequence[str] | None = None,
                   allowed_routes: Sequence[str] | None = None,
                   tags: Mapping[str, str] | None = None,
                   description: str | None = None) -> KeyRecord | None:
        now = datetime.now(UTC)
        values: dict[str, Any] = {"updated_at": now}
        if disabled is not None:
            values["disabled_at"] = now if disabled else None
        for name, value in (("allowed_models", allowed_models),
                            ("allowed_providers", allowed_providers),
                            ("allowed_routes", allowed_routes)):
            if value is not None:
                values[name] = list(value)
        if tags is not None:
            values["tags"] = dict(tags)
        if description is not None:
            values["description"] = description
        with self.engine.begin() as conn:
            conn.execute(update(gateway_keys).where(gateway_keys.c.id == key_id).values(**values))
        return self.get_key(key_id)

    def rotate_key(self, key_id: str, new_token_hash: str, grace_until: datetime
                   ) -> KeyRecord | None:
        with self.engine.begin() as conn:
            row = conn.execute(select(gateway_keys.c.token_hash).where(
                gateway_keys.c.id == key_id, gateway_keys.c.revoked_at.is_(None))).first()
            if row is None:
                return None
            conn.execute(update(gateway_keys).where(gateway_keys.c.id == key_id).values(
                token_hash=new_token_hash, previous_token_hash=row.token_hash,
                previous_valid_until=grace_until, updated_at=datetime.now(UTC)))
        return self.get_key(key_id)

    def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        with self.engine.begin() as conn:
            conn.execute(
                update(gateway_keys)
                .where(gateway_keys.c.id == key_id, gateway_keys.c.revoked_at.is_(None))
                .values(revoked_at=at, updated_at=at)
            )
        return self.get_key(key_id)

    # admin tokens -------------------------------------------------------
    @staticmethod
    def _admin(row: Any) -> AdminTokenRecord:
        m = row._mapping
        return AdminTokenRecord(
            id=m["id"], role=m["role"], org_id=m["org_id"], team_id=m["team_id"],
            description=m["description"], created_by=m["created_by"],
            created_at=_utc(m["created_at"]) or datetime.now(UTC),
            expires_at=_utc(m["expires_at"]), revoked_at=_utc(m["revoked_at"]),
        )

    def create_admin_token(self, *, token_id: str, token_hash: str, role: Role,
                           org_id: str | None, team_id: str | None, description: str | None,
                           created_by: str, expires_at: datetime | None) -> AdminTokenRecord:
        with self.engine.begin() as conn:
            conn.execute(insert(admin_tokens).values(
                id=token_id, token_hash=token_hash, role=role, org_id=org_id, team_id=team_id,
                description=description, created_by=created_by,
                created_at=datetime.now(UTC), expires_at=expires_at))
            row = conn.execute(select(admin_tokens).where(admin_tokens.c.id == token_id)).one()
        return self._admin(row)

    def admin_token_by_hash(self, token_hash: str) -> AdminTokenRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(admin_tokens).where(
                admin_tokens.c.token_hash == token_hash)).first()
        return None if row is None else self._admin(row)

    def revoke_admin_token(self, token_id: str, at: datetime) -> AdminTokenRecord | None:
        with self.engine.begin() as conn:
            conn.execute(update(admin_tokens).where(
                admin_tokens.c.id == token_id, admin_tokens.c.revoked_at.is_(None)).values(
                revoked_at=at))
            row = conn.execute(select(admin_tokens).where(admin_tokens.c.id == token_id)).first()
        return None if row is None else self._admin(row)

    def revocation_fingerprint(self) -> tuple[object, ...]:
        """Changes on any revocation, key update (scopes, disable, rotation) or a
        disabled org, team or user: everything a cached key record depends on."""
        with self.engine.connect() as conn:
            row = conn.execute(select(
                func.count(gateway_keys.c.revoked_at),
                select(func.max(gateway_keys.c.updated_at)).scalar_subquery(),
                select(func.max(users.c.updated_at)).scalar_subquery(),
                select(func.max(teams.c.updated_at)).scalar_subquery(),
                select(func.max(orgs.c.updated_at)).scalar_subquery(),
            )).one()
        return tuple(row)

    # ledger -------------------------------------------------------------
    def insert_ledger(self, rows: Sequence[LedgerRow]) -> None:
        if not rows:
            return
        values = []
        for r in rows:  # shallow: dataclasses.asdict deep-copies every row's tags
            d = {name: getattr(r, name) for name in _LEDGER_FIELDS}
            d["cost_nano_usd"] = usd_to_nano(d.pop("cost_usd"))
            values.append(d)
        with self.engine.begin() as conn:
            conn.execute(insert(ledger), values)

    @staticmethod
    def _window(stmt: Any, since: datetime | None, until: datetime | None) -> Any:
        if since is not None:
            stmt = stmt.where(ledger.c.ts >= since)
        if until is not None:
            stmt = stmt.where(ledger.c.ts < until)
        return stmt

    def ledger_rows(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[LedgerRow]:
        stmt = self._window(select(ledger).order_by(ledger.c.id), since, until)
        names = [f.name for f in dataclasses.fields(LedgerRow)]
        out = []
        with self.engine.connect() as conn:
            for row in conn.execute(stmt):
                m = dict(row._mapping)
                m["cost_usd"] = nano_to_usd(m.pop("cost_nano_usd"))
                m["ts"] = _utc(m["ts"])
                out.append(LedgerRow(**{n: m[n] for n in names}))
        return out

    def spend(
        self, by: SpendGroup, since: datetime | None = None, until: datetime | None = None,
        *, org: str | None = None, team: str | None = None,
    ) -> list[SpendRow]:
        group = group_column(by)
        stmt = select(
            group.label("g"),
            func.count().label("calls"),
            func.coalesce(func.sum(ledger.c.input_tokens), 0),
            func.coalesce(func.sum(ledger.c.cached_input_tokens), 0),
            func.coalesce(func.sum(ledger.c.output_tokens), 0),
            func.coalesce(func.sum(ledger.c.reasoning_tokens), 0),
            func.coalesce(func.sum(ledger.c.cost_nano_usd), 0),
            func.sum(case((ledger.c.cost_nano_usd.is_(None), 1), else_=0)),
            func.sum(case((ledger.c.usage_estimated.is_(True), 1), else_=0)),
        ).group_by(group)
        stmt = self._window(stmt, since, until).order_by(
            func.sum(ledger.c.cost_nano_usd).desc().nulls_last())
        if org is not None:
            stmt = stmt.where(ledger.c.org == org)
        if team is not None:
            stmt = stmt.where(ledger.c.team == team)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [
            SpendRow(
                group=str(r[0]) if r[0] is not None else "(none)",
                calls=int(r[1]),
                input_tokens=int(r[2]),
                cached_input_tokens=int(r[3]),
                output_tokens=int(r[4]),
                reasoning_tokens=int(r[5]),
                cost_usd=nano_to_usd(int(r[6])) or Decimal(0),
                unpriced_calls=int(r[7] or 0),
                estimated_calls=int(r[8] or 0),
            )
            for r in rows
        ]


def open_store(url: str) -> Store:
    """The store for a database URL; today every SQL backend shares SQLStore."""
    store = SQLStore(url)
    store.migrate()
    return store

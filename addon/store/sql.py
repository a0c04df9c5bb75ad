"""SQLAlchemy implementation of the store (SQLite embedded; PostgreSQL by URL)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, case, create_engine, event, func, insert, select, update
from sqlalchemy.engine import Connection

from .base import (
    KeyRecord,
    LedgerRow,
    SpendGroup,
    SpendRow,
    Store,
    nano_to_usd,
    usd_to_nano,
)
from .schema import gateway_keys, ledger

_GROUP_COLUMNS = {
    "team": ledger.c.team,
    "user": ledger.c.user,
    "org": ledger.c.org,
    "key": ledger.c.key_id,
    "provider": ledger.c.provider,
    "session": ledger.c.session_id,
    "model": func.coalesce(ledger.c.served_model, ledger.c.requested_model),
}


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
    engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def run_migrations(conn: Connection) -> None:
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(resources.files("agent_egress.addon.store") / "migrations")
    )
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


class SQLStore(Store):
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def migrate(self) -> None:
        with self.engine.begin() as conn:
            run_migrations(conn)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def close(self) -> None:
        self.engine.dispose()

    # keys ---------------------------------------------------------------
    @staticmethod
    def _key(row: Any) -> KeyRecord:
        return KeyRecord(
            id=row.id,
            org=row.org,
            team=row.team,
            user=row.user,
            description=row.description,
            created_at=_utc(row.created_at) or datetime.now(UTC),
            expires_at=_utc(row.expires_at),
            revoked_at=_utc(row.revoked_at),
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
    ) -> KeyRecord:
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(
                insert(gateway_keys).values(
                    id=key_id,
                    token_hash=token_hash,
                    org=org,
                    team=team,
                    user=user,
                    description=description,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
        return KeyRecord(key_id, org, team, user, description, now, expires_at, None)

    def key_by_hash(self, token_hash: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(gateway_keys).where(gateway_keys.c.token_hash == token_hash)
            ).first()
        return None if row is None else self._key(row)

    def list_keys(self) -> list[KeyRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(gateway_keys).order_by(gateway_keys.c.created_at)).all()
        return [self._key(r) for r in rows]

    def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        with self.engine.begin() as conn:
            conn.execute(
                update(gateway_keys)
                .where(gateway_keys.c.id == key_id, gateway_keys.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            row = conn.execute(select(gateway_keys).where(gateway_keys.c.id == key_id)).first()
        return None if row is None else self._key(row)

    def revocation_fingerprint(self) -> tuple[object, ...]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(func.count(gateway_keys.c.revoked_at), func.max(gateway_keys.c.revoked_at))
            ).one()
        return (int(row[0]), row[1])

    # ledger -------------------------------------------------------------
    def insert_ledger(self, rows: Sequence[LedgerRow]) -> None:
        if not rows:
            return
        values = []
        for r in rows:
            d = dataclasses.asdict(r)
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
        self, by: SpendGroup, since: datetime | None = None, until: datetime | None = None
    ) -> list[SpendRow]:
        group = _GROUP_COLUMNS[by]
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
        stmt = self._window(stmt, since, until).order_by(func.sum(ledger.c.cost_nano_usd).desc())
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

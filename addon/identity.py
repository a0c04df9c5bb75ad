"""The service layer behind the admin API and the CLI: who may do what, in one place.

Roles: `root` (the local CLI, which owns the store), `org-admin` (everything in
one org), `team-admin` (users and keys of one team), `viewer` (read one org or
team). Every action, allowed or refused, is audited; no token is ever logged.
Methods are synchronous (they hit the store): the API runs them in a thread.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from agent_egress.exporters.audit import AuditEvent

from . import tokens
from .store.base import (
    ROLES,
    AdminTokenRecord,
    Entity,
    KeyRecord,
    Role,
    SpendGroup,
    SpendRow,
    Store,
)

ActorRole = Literal["root", "org-admin", "team-admin", "viewer"]
EntityKind = Literal["org", "team", "user"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_TAG_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_TAGS = 16


@dataclass(frozen=True, slots=True)
class Actor:
    id: str
    role: ActorRole
    org_id: str | None = None
    team_id: str | None = None
    source: str | None = None


class IdentityError(Exception):
    status = 400
    code = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthenticated(IdentityError):
    status, code = 401, "unauthenticated"


class NotFound(IdentityError):
    status, code = 404, "not_found"


class Forbidden(IdentityError):
    status, code = 403, "forbidden"


class Conflict(IdentityError):
    status, code = 409, "conflict"


class Invalid(IdentityError):
    status, code = 422, "invalid"


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise Invalid(f"{what} must be 1-128 characters of letters, digits and _.@- "
                      "(starting with a letter or digit)")
    return value


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise Invalid(f"at most {MAX_TAGS} tags")
    for k, v in tags.items():
        if not _TAG_NAME.match(k) or not isinstance(v, str) or len(v) > 128:
            raise Invalid(f"tag {k[:40]!r}: names are 1-32 of [a-z0-9_-], values at most"
                          " 128 characters")
    return dict(tags)


def matches_any(value: str, patterns: Sequence[str]) -> bool:
    """Empty means unrestricted; otherwise fnmatch globs (e.g. gpt-5*)."""
    return not patterns or any(fnmatch.fnmatchcase(value, p) for p in patterns)


class Identity:
    def __init__(self, store: Store, key_hash_key: bytes, admin_hash_key: bytes,
                 audit: Callable[[AuditEvent], object]) -> None:
        self.store = store
        self.key_hash_key = key_hash_key
        self.admin_hash_key = admin_hash_key
        self._audit_sink = audit

    # audit and authorization --------------------------------------------
    def _audit(self, actor: Actor, action: str, target: str | None,
               outcome: Literal["ok", "refused", "error"] = "ok",
               **detail: str | int | bool | None) -> None:
        self._audit_sink(AuditEvent(action=action, actor=actor.id, outcome=outcome,
                                    target=target, source=actor.source,
                                    detail={k: v for k, v in detail.items() if v is not None}))

    def audit_unauthenticated(self, source: str | None, path: str) -> None:
        """An admin API call without a valid admin token."""
        self._audit_sink(AuditEvent(action="admin.auth", actor="anonymous", outcome="refused",
                                    source=source, target=path))

    def _require(self, actor: Actor, allowed: bool, action: str, target: str | None) -> None:
        if not allowed:
            self._audit(actor, action, target, "refused", role=actor.role)
            raise Forbidden(f"{actor.role} {actor.id} may not {action.replace('.', ' ')}"
                            f" {target or ''}".rstrip())

    @staticmethod
    def _reads(actor: Actor, org_id: str | None, team_id: str | None) -> bool:
        if actor.role == "root":
            return True
        if actor.org_id is None or actor.org_id != org_id:
            return False
        return actor.team_id is None or actor.team_id == team_id

    @classmethod
    def _writes(cls, actor: Actor, org_id: str | None, team_id: str | None) -> bool:
        return actor.role != "viewer" and cls._reads(actor, org_id, team_id)

    def _entity(self, kind: EntityKind, entity_id: str) -> Entity:
        found = self.store.get_entity(kind, entity_id)
        if found is None:
            raise NotFound(f"no {kind} {entity_id!r}")
        return found

    def _key(self, key_id: str) -> KeyRecord:
        found = self.store.get_key(key_id)
        if found is None:
            raise NotFound(f"no key {key_id!r}")
        return found

    def require(self, actor: Actor, *, org_id: str | None, team_id: str | None, write: bool,
                action: str, target: str | None) -> None:
        """Refuse (and audit) unless the actor may read/write within that org and team."""
        allowed = (self._writes if write else self._reads)(actor, org_id, team_id)
        self._require(actor, allowed, action, target)

    def audit(self, actor: Actor, action: str, target: str | None,
              **detail: str | int | bool | None) -> None:
        self._audit(actor, action, target, "ok", **detail)

    def scope_owner(self, kind: str, name: str) -> tuple[str | None, str | None]:
        """(org id, team id) a budget scope belongs to, for authorization."""
        if kind == "key":
            k = self._key(name)
            return k.org_id, k.team_id
        org_name, _, rest = name.partition("/")
        org = self.store.find_entity("org", org_name)
        if org is None:
            raise NotFound(f"no org {org_name!r}")
        if kind == "org":
            return org.id, None
        found = self.store.find_entity("team" if kind == "team" else "user", rest, org.id)
        if found is None:
            raise NotFound(f"no {kind} {rest!r} in org {org_name!r}")
        return org.id, found.id if kind == "team" else found.team_id

    # orgs, teams, users -------------------------------------------------
    def create_org(self, actor: Actor, name: str) -> Entity:
        self._require(actor, actor.role == "root", "org.create", name)
        if self.store.find_entity("org", check_name(name, "org name")) is not None:
            raise Conflict(f"org {name!r} exists")
        org = self.store.create_entity("org", name)
        self._audit(actor, "org.create", org.id, name=name)
        return org

    def create_team(self, actor: Actor, org_id: str, name: str) -> Entity:
        org = self._entity("org", org_id)
        self._require(actor, self._writes(actor, org.id, None) and actor.team_id is None,
                      "team.create", org_id)
        if self.store.find_entity("team", check_name(name, "team name"), org.id) is not None:
            raise Conflict(f"team {name!r} exists in org {org.name!r}")
        team = self.store.create_entity("team", name, parent_id=org.id)
        self._audit(actor, "team.create", team.id, org_id=org.id, name=name)
        return team

    def create_user(self, actor: Actor, team_id: str, name: str,
                    email: str | None = None) -> Entity:
        team = self._entity("team", team_id)
        self._require(actor, self._writes(actor, team.org_id, team.id), "user.create", team_id)
        if self.store.find_entity("user", check_name(name, "user name"), team.org_id):
            raise Conflict(f"user {name!r} exists in this org")
        user = self.store.create_entity("user", name, parent_id=team.id, email=email)
        self._audit(actor, "user.create", user.id, team_id=team.id, name=name)
        return user

    def list_entities(self, actor: Actor, kind: EntityKind, *, org_id: str | None = None,
                      team_id: str | None = None) -> list[Entity]:
        if actor.role != "root":
            org_id = actor.org_id
            team_id = actor.team_id or team_id
        found = self.store.list_entities(kind, org_id=org_id, team_id=team_id)
        return [e for e in found
                if self._reads(actor, e.org_id if kind != "org" else e.id,
                               e.team_id if kind == "user" else (e.id if kind == "team"
                                                                 else actor.team_id))]

    def get_entity(self, actor: Actor, kind: EntityKind, entity_id: str) -> Entity:
        e = self._entity(kind, entity_id)
        org_id = e.id if kind == "org" else e.org_id
        team_id = e.id if kind == "team" else e.team_id if kind == "user" else actor.team_id
        self._require(actor, self._reads(actor, org_id, team_id), f"{kind}.read", entity_id)
        return e

    def set_disabled(self, actor: Actor, kind: EntityKind, entity_id: str,
                     disabled: bool) -> Entity:
        e = self._entity(kind, entity_id)
        if kind == "org":
            allowed = actor.role == "root"
        elif kind == "team":
            allowed = self._writes(actor, e.org_id, None) and actor.team_id is None
        else:
            allowed = self._writes(actor, e.org_id, e.team_id)
        action = f"{kind}.{'disable' if disabled else 'enable'}"
        self._require(actor, allowed, action, entity_id)
        updated = self.store.set_entity_disabled(kind, entity_id, disabled)
        assert updated is not None
        self._audit(actor, action, entity_id)
        return updated

    def ensure_path(self, actor: Actor, org: str, team: str, user: str) -> Entity:
        """CLI convenience: find or create org/team/user by name (root only)."""
        self._require(actor, actor.role == "root", "user.create", f"{org}/{team}/{user}")
        o = self.store.find_entity("org", org) or self.create_org(actor, org)
        t = self.store.find_entity("team", team, o.id) or self.create_team(actor, o.id, team)
        u = self.store.find_entity("user", user, o.id)
        if u is None:
            return self.create_user(actor, t.id, user)
        if u.team_id != t.id:
            raise Conflict(f"user {user!r} belongs to another team of org {org!r}")
        return u

    # keys ---------------------------------------------------------------
    def issue_key(self, actor: Actor, user_id: str, *, ttl: timedelta | None,
                  models: Sequence[str] = (), providers: Sequence[str] = (),
                  routes: Sequence[str] = (), tags: Mapping[str, str] | None = None,
                  description: str | None = None) -> tuple[str, KeyRecord]:
        user = self._entity("user", user_id)
        self._require(actor, self._writes(actor, user.org_id, user.team_id), "key.issue",
                      user_id)
        assert user.org_id is not None and user.team_id is not None
        org = self._entity("org", user.org_id)
        team = self._entity("team", user.team_id)
        token = tokens.generate_token()
        record = self.store.create_key(
            key_id=tokens.new_key_id(),
            token_hash=tokens.hash_token(token, self.key_hash_key),
            org=org.name, team=team.name, user=user.name,
            expires_at=None if ttl is None else datetime.now(UTC) + ttl,
            description=description, org_id=org.id, team_id=team.id, user_id=user.id,
            allowed_models=list(models), allowed_providers=list(providers),
            allowed_routes=list(routes), tags=check_tags(tags or {}))
        self._audit(actor, "key.issue", record.id, user_id=user.id, team_id=team.id,
                    org_id=org.id, expires_at=record.expires_at.isoformat()
                    if record.expires_at else None)
        return token, record

    def get_key(self, actor: Actor, key_id: str) -> KeyRecord:
        k = self._key(key_id)
        self._require(actor, self._reads(actor, k.org_id, k.team_id), "key.read", key_id)
        return k

    def list_keys(self, actor: Actor, *, org_id: str | None = None, team_id: str | None = None,
                  user_id: str | None = None) -> list[KeyRecord]:
        if actor.role != "root":
            org_id, team_id = actor.org_id, actor.team_id or team_id
        return [k for k in self.store.list_keys(org_id=org_id, team_id=team_id, user_id=user_id)
                if self._reads(actor, k.org_id, k.team_id)]

    def update_key(self, actor: Actor, key_id: str, *, disabled: bool | None = None,
                   models: Sequence[str] | None = None, providers: Sequence[str] | None = None,
                   routes: Sequence[str] | None = None, tags: Mapping[str, str] | None = None,
                   description: str | None = None) -> KeyRecord:
        k = self._key(key_id)
        self._require(actor, self._writes(actor, k.org_id, k.team_id), "key.update", key_id)
        updated = self.store.update_key(
            key_id, disabled=disabled, allowed_models=models, allowed_providers=providers,
            allowed_routes=routes, tags=None if tags is None else check_tags(tags),
            description=description)
        assert updated is not None
        self._audit(actor, "key.update", key_id, disabled=disabled)
        return updated

    def rotate_key(self, actor: Actor, key_id: str, grace: timedelta) -> tuple[str, KeyRecord]:
        k = self._key(key_id)
        self._require(actor, self._writes(actor, k.org_id, k.team_id), "key.rotate", key_id)
        if k.revoked_at is not None:
            raise Conflict(f"key {key_id} is revoked; issue a new one")
        token = tokens.generate_token()
        updated = self.store.rotate_key(key_id, tokens.hash_token(token, self.key_hash_key),
                                        datetime.now(UTC) + grace)
        assert updated is not None
        self._audit(actor, "key.rotate", key_id, grace_seconds=int(grace.total_seconds()))
        return token, updated

    def revoke_key(self, actor: Actor, key_id: str) -> KeyRecord:
        k = self._key(key_id)
        self._require(actor, self._writes(actor, k.org_id, k.team_id), "key.revoke", key_id)
        updated = self.store.revoke_key(key_id, datetime.now(UTC))
        assert updated is not None
        self._audit(actor, "key.revoke", key_id, user=k.user, team=k.team, org=k.org)
        return updated

    # admin tokens -------------------------------------------------------
    def issue_admin_token(self, actor: Actor, role: Role, *, org_id: str | None,
                          team_id: str | None = None, ttl: timedelta | None = None,
                          description: str | None = None) -> tuple[str, AdminTokenRecord]:
        if role not in ROLES:
            raise Invalid(f"role must be one of {', '.join(ROLES)}")
        if team_id is not None:
            team = self._entity("team", team_id)
            if org_id not in (None, team.org_id):
                raise Invalid("team_id is not in org_id")
            org_id = team.org_id
        if org_id is None:
            raise Invalid("an admin token is bound to an org (org_id) or a team (team_id)")
        self._entity("org", org_id)
        if role == "team-admin" and team_id is None:
            raise Invalid("a team-admin token needs team_id")
        if role == "org-admin":
            team_id = None
        allowed = actor.role == "root" or (
            actor.role == "org-admin" and actor.org_id == org_id) or (
            actor.role == "team-admin" and role == "viewer" and team_id is not None
            and actor.team_id == team_id)
        self._require(actor, allowed, "admin_token.issue", f"{role}@{team_id or org_id}")
        token = tokens.generate_token()
        record = self.store.create_admin_token(
            token_id="adm_" + tokens.new_key_id()[4:],
            token_hash=tokens.hash_token(token, self.admin_hash_key), role=role,
            org_id=org_id, team_id=team_id, description=description, created_by=actor.id,
            expires_at=None if ttl is None else datetime.now(UTC) + ttl)
        self._audit(actor, "admin_token.issue", record.id, role=role, org_id=org_id,
                    team_id=team_id)
        return token, record

    def authenticate_admin(self, token: str | None, source: str | None) -> Actor | None:
        if not token or not tokens.is_well_formed(token):
            return None
        record = self.store.admin_token_by_hash(tokens.hash_token(token, self.admin_hash_key))
        if record is None or not record.usable(datetime.now(UTC)):
            return None
        return Actor(id=record.id, role=record.role, org_id=record.org_id,
                     team_id=record.team_id, source=source)

    # spend --------------------------------------------------------------
    def spend(self, actor: Actor, by: SpendGroup, since: datetime | None = None,
              until: datetime | None = None) -> list[SpendRow]:
        org = team = None
        if actor.role != "root":
            assert actor.org_id is not None
            org = self._entity("org", actor.org_id).name
            if actor.team_id is not None:
                team = self._entity("team", actor.team_id).name
        self._audit(actor, "spend.read", org or "all", by=by)
        try:
            return self.store.spend(by, since, until, org=org, team=team)
        except ValueError as e:
            raise Invalid(str(e)) from None

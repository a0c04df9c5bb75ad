"""CLI verbs for orgs, teams, users, keys and admin tokens: one implementation each.

Every verb is a call on the admin REST API. Locally (no `--url`) the CLI runs
that same API in-process over the local store as `root`; with `--url` it calls a
running gateway's admin listener with an admin token. So the CLI and the API
cannot drift apart, and both go through the identity service's checks and audit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from agent_egress.exporters.audit import AuditLog, cli_actor

from . import admin_api
from .admin_limits import install_limits
from .budget_policy import BudgetStatus, LimitBook
from .hashkeys import load_hash_keys
from .identity import Actor, Identity
from .policy import Settings
from .store.sql import open_store
from .vault.spec import open_vault

T = TypeVar("T")
ENV_URL = "AGENT_EGRESS_ADMIN_URL"
ENV_TOKEN = "AGENT_EGRESS_ADMIN_TOKEN"  # noqa: S105 - an environment variable name


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Api:
    """The admin API, remote (HTTP + admin token) or in-process (local store, root)."""

    def __init__(self, settings: Settings, url: str | None, admin_token: str | None,
                 notify: Callable[[str | None], None]) -> None:
        self.settings = settings
        self.url = url.rstrip("/") if url else None
        self.admin_token = admin_token
        self.notify = notify
        self._app: FastAPI | None = None

    @property
    def local(self) -> bool:
        return self.url is None

    def _local_app(self) -> FastAPI:
        if self._app is None:
            s = self.settings
            s.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            keys = load_hash_keys(open_vault(s.vault, home=s.home), s.vault, s.home)
            log = AuditLog(s.audit_file)
            identity = Identity(open_store(s.db_url), keys.token, keys.admin, log.append)
            app = FastAPI()
            actor_dep = admin_api.install(app, identity, self.notify)
            install_limits(app, identity, actor_dep,
                           LimitBook.from_config(s.budgets, s.rate_limits),
                           lambda: asyncio.run(local_budget_status(s)),
                           lambda: asyncio.run(local_budget_rebuild(s)))
            root = Actor(id=cli_actor(), role="root", source="cli")
            app.dependency_overrides[actor_dep] = lambda: root
            self._app = app
        return self._app

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> Any:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        if self.url is not None:
            headers = {"authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
            try:
                r = httpx.request(method, f"{self.url}/v1{path}", json=body, params=params,
                                  headers=headers, timeout=30)
            except httpx.HTTPError as e:
                raise ApiError(0, f"cannot reach {self.url}: {e}") from None
        else:
            r = asyncio.run(self._local_call(method, path, body, params))
        try:
            data = r.json()
        except ValueError:
            data = {"error": {"message": r.text[:300]}}
        if r.status_code >= 400:
            raise ApiError(r.status_code, data.get("error", {}).get("message", str(data)))
        return data

    async def _local_call(self, method: str, path: str, body: dict[str, Any] | None,
                          params: dict[str, Any]) -> httpx.Response:
        transport = httpx.ASGITransport(app=self._local_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://cli") as client:
            return await client.request(method, f"/v1{path}", json=body, params=params)

    def resolve(self, kind: str, value: str, org_id: str | None = None) -> str:
        """An id as given, or the id of the org/team/user with that name."""
        if value.startswith(f"{kind}_"):
            return value
        params = {"org_id": org_id} if kind == "team" else {}
        found = [e for e in self.call("GET", f"/{kind}s", params=params) if e["name"] == value
                 and (org_id is None or e.get("org_id") in (None, org_id) or kind == "org")]
        if len(found) != 1:
            raise ApiError(404, f"no single {kind} named {value!r}"
                           + (f" in org {org_id}" if org_id else ""))
        return str(found[0]["id"])


def _print(data: Any, fmt: str, columns: tuple[str, ...]) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return
    rows = data if isinstance(data, list) else [data]
    table = [[c.upper() for c in columns]] + [[str(r.get(c, "")) for c in columns]
                                                for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _tags(values: list[str] | None) -> dict[str, str] | None:
    if values is None:
        return None
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep:
            raise ApiError(422, f"--tag takes NAME=VALUE, got {v!r}")
        out[k] = val
    return out


ENTITY_COLUMNS = ("id", "name", "org_id", "team_id", "disabled")
KEY_COLUMNS = ("id", "org", "team", "user", "state", "expires_at", "models")


def run_verb(api: Api, args: argparse.Namespace) -> Any:
    """Dispatch one verb; returns what to print (or None when the verb printed)."""
    verb = (args.cmd, getattr(args, "sub", None))
    org_id: str | None
    team_id: str | None
    if verb == ("org", "create"):
        return api.call("POST", "/orgs", {"name": args.name})
    if verb == ("org", "list"):
        return api.call("GET", "/orgs")
    if verb == ("team", "create"):
        org_id = api.resolve("org", args.org)
        return api.call("POST", f"/orgs/{org_id}/teams", {"name": args.name})
    if verb == ("team", "list"):
        return api.call("GET", "/teams", params={
            "org_id": api.resolve("org", args.org) if args.org else None})
    if verb == ("user", "create"):
        org_id = api.resolve("org", args.org) if args.org else None
        team_id = api.resolve("team", args.team, org_id)
        return api.call("POST", f"/teams/{team_id}/users", {"name": args.name,
                                                            "email": args.email})
    if verb == ("user", "list"):
        return api.call("GET", "/users", params={"team_id": args.team})
    if verb in (("org", "disable"), ("org", "enable"), ("team", "disable"),
                ("team", "enable"), ("user", "disable"), ("user", "enable")):
        return api.call("PATCH", f"/{args.cmd}s/{args.id}", {"disabled": args.sub == "disable"})
    if verb == ("admin-token", "issue"):
        org_id = api.resolve("org", args.org) if args.org else None
        team_id = api.resolve("team", args.team, org_id) if args.team else None
        return api.call("POST", "/admin-tokens", {
            "role": args.role, "org_id": org_id, "team_id": team_id,
            "ttl_days": args.ttl_days, "description": args.description})
    raise ApiError(2, f"unknown verb {verb}")


def add_parsers(sub: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    """Register org/team/user/admin-token verbs on the top-level subparsers."""
    for kind in ("org", "team", "user"):
        p = sub.add_parser(kind, help=f"{kind}s of the hierarchy org > team > user > key")
        s = p.add_subparsers(dest="sub", required=True)
        c = s.add_parser("create")
        c.add_argument("name")
        if kind in ("team", "user"):
            c.add_argument("--org", required=kind == "team", help="org id or name")
        if kind == "user":
            c.add_argument("--team", required=True, help="team id or name (with --org)")
            c.add_argument("--email")
        lst = s.add_parser("list")
        if kind == "team":
            lst.add_argument("--org", help="org id or name")
        if kind == "user":
            lst.add_argument("--team", help="team id")
        for action in ("disable", "enable"):
            a = s.add_parser(action, help=f"{action} the {kind} (and every key under it)")
            a.add_argument("id")
        for q in (c, lst, *[s.choices[a] for a in ("disable", "enable")]):
            q.add_argument("--format", choices=("table", "json"), default="table")
            q.set_defaults(func=handler, columns=ENTITY_COLUMNS)
            remote_options(q)
    at = sub.add_parser("admin-token", help="tokens for the admin API (roles)")
    ats = at.add_subparsers(dest="sub", required=True)
    ati = ats.add_parser("issue", help="printed once; stored as a keyed hash")
    ati.add_argument("--role", required=True, choices=("org-admin", "team-admin", "viewer"))
    ati.add_argument("--org", help="org id or name")
    ati.add_argument("--team", help="team id or name (team-admin, or a team viewer)")
    ati.add_argument("--ttl-days", type=float, default=90)
    ati.add_argument("--description")
    ati.add_argument("--format", choices=("table", "json"), default="table")
    ati.set_defaults(func=handler, columns=("token", "id", "role", "org_id", "team_id"))
    remote_options(ati)


def remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get(ENV_URL),
                   help=f"admin URL of a running gateway (env {ENV_URL}); default: local store")
    p.add_argument("--admin-token", default=os.environ.get(ENV_TOKEN),
                   help=f"admin token for --url (env {ENV_TOKEN})")


def flatten(data: Any) -> Any:
    """`{"token", "admin_token": {...}}` responses print as one row."""
    if isinstance(data, dict) and "admin_token" in data:
        return {"token": data["token"], **data["admin_token"]}
    return data


def fail(e: ApiError) -> int:
    print(f"agent-egress: {e}", file=sys.stderr)
    return 1


async def _with_budgets(settings: Settings, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run one action on this machine's limiter (SQL, or the configured Redis)."""
    from agent_egress.exporters.prometheus import Metrics

    from .budgets import Budgets
    from .limiter.factory import open_limiter

    store = open_store(settings.db_url)
    budgets = Budgets(settings, store, open_limiter(settings, store), Metrics())
    try:
        await budgets.refresh()
        return await action(budgets)
    finally:
        await budgets.limiter.close()
        store.close()


async def local_budget_status(settings: Settings) -> list[BudgetStatus]:
    return await _with_budgets(settings, lambda b: b.status())


async def local_budget_rebuild(settings: Settings) -> str:
    return await _with_budgets(settings, lambda b: b.rebuild())

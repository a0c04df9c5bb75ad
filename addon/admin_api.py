"""Admin API (JSON, OpenAPI at /openapi.json) over the identity service.

Authenticated by admin tokens (`Authorization: Bearer ...`) bound to an org or a
team with a role. Endpoints are plain `def`: FastAPI runs them in its thread
pool, so store calls never block the gateway's event loop.
"""


import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import tokens
from .identity import Actor, Identity, IdentityError, Unauthenticated
from .store.base import AdminTokenRecord, Entity, KeyRecord, Role, SpendRow

MAX_TTL_DAYS = 36_500  # 100 years; more overflows datetime (found by the schemathesis fuzz)


_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _iso_8601(value: object) -> object:
    """The document promises ISO 8601: pydantic alone would also read ``since=5`` as Unix
    time (1970), a silent and surprising answer to a typo; refused instead (422)."""
    if isinstance(value, str) and _NUMBER.fullmatch(value):  # query values are strings
        raise ValueError("expected an ISO 8601 date or date-time, e.g. 2026-11-01T00:00:00Z")
    return value


IsoTime = Annotated[datetime, BeforeValidator(_iso_8601)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as documented:
    # lax mode read `true` as 1 and "30" as 30 (found by the fuzz's negative-data check)


class NameIn(_Body):
    name: str = Field(min_length=1, max_length=128)


class UserIn(NameIn):
    email: str | None = Field(default=None, max_length=256)


class DisabledIn(_Body):
    disabled: bool


class KeyIn(_Body):
    ttl_days: float | None = Field(default=30, gt=0, le=MAX_TTL_DAYS,
                                   description="null: never expires")
    models: list[str] = Field(default_factory=list, description="model globs; empty: any")
    providers: list[str] = Field(default_factory=list)
    routes: list[str] = Field(default_factory=list, description="API globs, e.g. openai.*")
    tags: dict[str, str] = Field(default_factory=dict)
    description: str | None = Field(default=None, max_length=500)


class KeyPatch(_Body):
    disabled: bool | None = None
    models: list[str] | None = None
    providers: list[str] | None = None
    routes: list[str] | None = None
    tags: dict[str, str] | None = None
    description: str | None = Field(default=None, max_length=500)


class RotateIn(_Body):
    grace_seconds: int = Field(default=3600, ge=0, le=30 * 86400)


class AdminTokenIn(_Body):
    role: Role
    org_id: str | None = None
    team_id: str | None = None
    ttl_days: float | None = Field(default=90, gt=0, le=MAX_TTL_DAYS)
    description: str | None = Field(default=None, max_length=500)


class ErrorDetail(BaseModel):
    message: str
    type: Literal["admin_error"]
    code: str


class ErrorOut(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {  # every route may answer these (OpenAPI)
    status: {"model": ErrorOut, "description": what} for status, what in (
        (400, "malformed request (e.g. a body that is not JSON)"),
        (401, "no valid admin token"), (403, "the token's role may not do this"),
        (404, "no such object"), (409, "conflicts with an existing object"),
        (422, "invalid request"))}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def entity_json(e: Entity) -> dict[str, Any]:
    return {"id": e.id, "kind": e.kind, "name": e.name, "org_id": e.org_id,
            "team_id": e.team_id, "email": e.email, "created_at": _iso(e.created_at),
            "disabled": e.disabled_at is not None}


def key_json(k: KeyRecord) -> dict[str, Any]:
    return {"id": k.id, "org": k.org, "team": k.team, "user": k.user, "org_id": k.org_id,
            "team_id": k.team_id, "user_id": k.user_id, "state": k.state(datetime.now(
                k.created_at.tzinfo)), "created_at": _iso(k.created_at),
            "expires_at": _iso(k.expires_at), "revoked_at": _iso(k.revoked_at),
            "models": list(k.allowed_models), "providers": list(k.allowed_providers),
            "routes": list(k.allowed_routes), "tags": dict(k.tags),
            "description": k.description}


def admin_token_json(a: AdminTokenRecord) -> dict[str, Any]:
    return {"id": a.id, "role": a.role, "org_id": a.org_id, "team_id": a.team_id,
            "created_by": a.created_by, "created_at": _iso(a.created_at),
            "expires_at": _iso(a.expires_at), "description": a.description}


def spend_json(by: str, r: SpendRow) -> dict[str, Any]:
    return {by: r.group, "calls": r.calls, "input_tokens": r.input_tokens,
            "cached_input_tokens": r.cached_input_tokens, "output_tokens": r.output_tokens,
            "reasoning_tokens": r.reasoning_tokens, "cost_usd": str(r.cost_usd),
            "unpriced_calls": r.unpriced_calls, "estimated_calls": r.estimated_calls}


def _days(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(days=value)


def error_body(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "admin_error", "code": code}},
                        status_code=status)


def install(app: FastAPI, identity: Identity,
            on_key_change: Callable[[str | None], None]) -> Callable[..., Actor]:
    """Add the /v1 admin routes and error handlers to the admin app.

    on_key_change(key_id | None): drop cached key records on this replica at once
    (None: everything, e.g. a team was disabled); others see it by polling.
    """

    def actor(request: Request,
              authorization: Annotated[str | None, Header()] = None) -> Actor:
        peer = request.client
        source = f"{peer.host}:{peer.port}" if peer else None
        token = tokens.extract_token(authorization)
        found = identity.authenticate_admin(token, source)
        if found is None:
            identity.audit_unauthenticated(source, request.url.path)
            raise Unauthenticated("a valid admin token is required: Authorization: Bearer"
                                  " <admin token> (agent-egress admin-token issue)")
        return found

    Who = Annotated[Actor, Depends(actor)]
    r = APIRouter(prefix="/v1", tags=["admin"], responses=ERRORS)

    @r.post("/orgs", status_code=201)
    def create_org(who: Who, body: NameIn) -> dict[str, Any]:
        return entity_json(identity.create_org(who, body.name))

    @r.get("/orgs")
    def list_orgs(who: Who) -> list[dict[str, Any]]:
        return [entity_json(e) for e in identity.list_entities(who, "org")]

    @r.post("/orgs/{org_id}/teams", status_code=201)
    def create_team(who: Who, org_id: str, body: NameIn) -> dict[str, Any]:
        return entity_json(identity.create_team(who, org_id, body.name))

    @r.get("/teams")
    def list_teams(who: Who, org_id: str | None = None) -> list[dict[str, Any]]:
        return [entity_json(e) for e in identity.list_entities(who, "team", org_id=org_id)]

    @r.post("/teams/{team_id}/users", status_code=201)
    def create_user(who: Who, team_id: str, body: UserIn) -> dict[str, Any]:
        return entity_json(identity.create_user(who, team_id, body.name, body.email))

    @r.get("/users")
    def list_users(who: Who, team_id: str | None = None) -> list[dict[str, Any]]:
        return [entity_json(e) for e in identity.list_entities(who, "user", team_id=team_id)]

    def entity_routes(kind: Literal["org", "team", "user"]) -> None:
        def get_entity(who: Who, entity_id: str) -> dict[str, Any]:
            return entity_json(identity.get_entity(who, kind, entity_id))

        def patch_entity(who: Who, entity_id: str, body: DisabledIn) -> dict[str, Any]:
            e = identity.set_disabled(who, kind, entity_id, body.disabled)
            on_key_change(None)
            return entity_json(e)

        r.add_api_route(f"/{kind}s/{{entity_id}}", get_entity, methods=["GET"],
                        name=f"get_{kind}")
        r.add_api_route(f"/{kind}s/{{entity_id}}", patch_entity, methods=["PATCH"],
                        name=f"patch_{kind}", summary=f"Disable or enable a {kind}")

    for kind in ("org", "team", "user"):
        entity_routes(kind)

    @r.post("/users/{user_id}/keys", status_code=201)
    def issue_key(who: Who, user_id: str, body: KeyIn) -> dict[str, Any]:
        token, k = identity.issue_key(who, user_id, ttl=_days(body.ttl_days),
                                      models=body.models, providers=body.providers,
                                      routes=body.routes, tags=body.tags,
                                      description=body.description)
        return {"token": token, "key": key_json(k)}

    @r.get("/keys")
    def list_keys(who: Who, team_id: str | None = None,
                  user_id: str | None = None) -> list[dict[str, Any]]:
        return [key_json(k) for k in identity.list_keys(who, team_id=team_id, user_id=user_id)]

    @r.get("/keys/{key_id}")
    def get_key(who: Who, key_id: str) -> dict[str, Any]:
        return key_json(identity.get_key(who, key_id))

    @r.patch("/keys/{key_id}")
    def patch_key(who: Who, key_id: str, body: KeyPatch) -> dict[str, Any]:
        k = identity.update_key(who, key_id, disabled=body.disabled, models=body.models,
                                providers=body.providers, routes=body.routes, tags=body.tags,
                                description=body.description)
        on_key_change(key_id)
        return key_json(k)

    @r.post("/keys/{key_id}/rotate")
    def rotate_key(who: Who, key_id: str, body: RotateIn) -> dict[str, Any]:
        token, k = identity.rotate_key(who, key_id, timedelta(seconds=body.grace_seconds))
        on_key_change(key_id)
        return {"token": token, "key": key_json(k), "previous_valid_seconds": body.grace_seconds}

    @r.post("/keys/{key_id}/revoke")
    def revoke_key(who: Who, key_id: str) -> dict[str, Any]:
        k = identity.revoke_key(who, key_id)
        on_key_change(key_id)
        return key_json(k)

    @r.post("/admin-tokens", status_code=201)
    def issue_admin_token(who: Who, body: AdminTokenIn) -> dict[str, Any]:
        token, a = identity.issue_admin_token(who, body.role, org_id=body.org_id,
                                              team_id=body.team_id, ttl=_days(body.ttl_days),
                                              description=body.description)
        return {"token": token, "admin_token": admin_token_json(a)}

    @r.get("/spend")
    def spend(who: Who,
              by: Annotated[str, Query(description="team, user, model, org, key, provider"
                                             " or tag:<name>")] = "team",
              since: Annotated[IsoTime | None, Query()] = None,
              until: Annotated[IsoTime | None, Query()] = None) -> list[dict[str, Any]]:
        return [spend_json(by, row) for row in identity.spend(who, by, since, until)]

    app.include_router(r)

    @app.exception_handler(IdentityError)
    async def identity_error(_: Request, exc: IdentityError) -> JSONResponse:
        return error_body(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own errors (a body that is not JSON: 400) in the same format as ours
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")
        return error_body(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_body(422, "invalid", problems or "invalid request")

    return actor

"""Admin API for budgets and rate limits (/v1/budgets, /v1/rate-limits).

Org and team budgets are declared in the config file (reviewed like code); user
and key budgets and rate limits are set here, stored, and picked up by every
replica within seconds. Status reads the live limiter (spent, reserved, reset).
"""


from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .admin_api import ERRORS
from .budget_policy import (
    NANO_PER_USD,
    BudgetSpec,
    BudgetStatus,
    LimitBook,
    Period,
    RateSpec,
    parse_scope,
)
from .identity import Actor, Forbidden, Identity, Invalid, NotFound

StatusFn = Callable[[], list[BudgetStatus]]


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: str = Field(description="user:<org>/<user> or key:<key id>")
    period: Period
    usd: Decimal | None = None
    tokens: int | None = None
    mode: str = "hard"


class RateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: str
    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None


def status_json(s: BudgetStatus) -> dict[str, Any]:
    return {
        "scope": s.scope, "period": s.period, "mode": s.mode, "window": s.window,
        "resets_at": None if s.resets_at is None else s.resets_at.isoformat(),
        "limit_usd": None if s.limit_usd is None else str(s.limit_usd),
        "spent_usd": str(Decimal(s.spent_nano) / NANO_PER_USD),
        "reserved_usd": str(Decimal(s.reserved_nano) / NANO_PER_USD),
        "remaining_usd": None if s.remaining_usd is None else str(s.remaining_usd),
        "limit_tokens": s.limit_tokens, "spent_tokens": s.spent_tokens,
        "reserved_tokens": s.reserved_tokens, "remaining_tokens": s.remaining_tokens,
    }


def _spec_json(scope: str, spec: BudgetSpec, source: str) -> dict[str, Any]:
    return {"scope": scope, "period": spec.period, "mode": spec.mode, "source": source,
            "usd": None if spec.usd is None else str(spec.usd), "tokens": spec.tokens}


def install_limits(app: FastAPI, identity: Identity, actor: Callable[..., Actor],
                   config_book: LimitBook, status: StatusFn | None,
                   rebuild: Callable[[], str] | None = None) -> None:
    Who = Annotated[Actor, Depends(actor)]
    r = APIRouter(prefix="/v1", tags=["budgets"], responses=ERRORS)
    store = identity.store

    def check(who: Actor, scope: str, *, write: bool, action: str) -> None:
        try:
            kind, name = parse_scope(scope)
        except ValueError as e:
            raise Invalid(str(e)) from None
        if write and kind in ("org", "team"):
            raise Invalid(f"{kind} budgets and rate limits are declared in the config file"
                          " (budgets.orgs / budgets.teams, rate_limits.*); the API sets user"
                          " and key ones")
        if who.role == "root":
            return
        try:
            org_id, team_id = identity.scope_owner(kind, name)
        except NotFound:
            org_id = team_id = None
        identity.require(who, org_id=org_id, team_id=team_id, write=write, action=action,
                         target=scope)

    def visible(who: Actor, scope: str) -> bool:
        try:
            check(who, scope, write=False, action="budget.read")
        except Exception:
            return False
        return True

    @r.get("/budgets")
    def list_budgets(who: Who) -> list[dict[str, Any]]:
        out = [_spec_json(s, spec, "config") for s, specs in sorted(config_book.budgets.items())
               for spec in specs]
        out += [_spec_json(s, spec, "api") for s, spec in store.list_budgets()]
        return [b for b in out if who.role == "root" or visible(who, b["scope"])]

    @r.put("/budgets")
    def set_budget(who: Who, body: BudgetIn) -> dict[str, Any]:
        check(who, body.scope, write=True, action="budget.set")
        try:
            spec = BudgetSpec(period=body.period, usd=body.usd, tokens=body.tokens,
                              mode=body.mode)  # type: ignore[arg-type]
        except ValidationError as e:
            raise Invalid("; ".join(err["msg"] for err in e.errors())) from None
        store.set_budget(body.scope, spec, who.id)
        identity.audit(who, "budget.set", body.scope, period=spec.period, mode=spec.mode,
                       usd=None if spec.usd is None else str(spec.usd), tokens=spec.tokens)
        return _spec_json(body.scope, spec, "api")

    @r.delete("/budgets")
    def delete_budget(who: Who, scope: Annotated[str, Query()],
                      period: Annotated[Period, Query()]) -> dict[str, Any]:
        check(who, scope, write=True, action="budget.delete")
        if not store.delete_budget(scope, period):
            raise NotFound(f"no {period} budget set through the API on {scope}")
        identity.audit(who, "budget.delete", scope, period=period)
        return {"deleted": True, "scope": scope, "period": period}

    @r.get("/budgets/status")
    def budget_status(who: Who) -> list[dict[str, Any]]:
        if status is None:
            raise Invalid("budget status needs the limiter (run it against the gateway)")
        return [status_json(s) for s in status()
                if who.role == "root" or visible(who, s.scope)]

    @r.post("/budgets/rebuild")
    def rebuild_counters(who: Who) -> dict[str, Any]:
        if who.role != "root":
            raise Forbidden("only root may rebuild the budget counters")
        if rebuild is None:
            raise Invalid("rebuild needs the limiter")
        done = rebuild()
        identity.audit(who, "budget.rebuild", "all", result=done)
        return {"rebuilt": done}

    @r.get("/rate-limits")
    def list_rates(who: Who) -> list[dict[str, Any]]:
        rows = [{"scope": s, "source": "config", **spec.model_dump()}
                for s, spec in sorted(config_book.rates.items())]
        rows += [{"scope": f"{k}:*", "source": "config", **spec.model_dump()}
                 for k, spec in (("user", config_book.per_user), ("key", config_book.per_key))]
        rows += [{"scope": s, "source": "api", **spec.model_dump()}
                 for s, spec in store.list_rate_limits()]
        return [x for x in rows if who.role == "root" or visible(who, x["scope"])]

    @r.put("/rate-limits")
    def set_rate(who: Who, body: RateIn) -> dict[str, Any]:
        check(who, body.scope, write=True, action="ratelimit.set")
        try:
            spec = RateSpec(rpm=body.rpm, tpm=body.tpm, concurrent=body.concurrent)
        except ValidationError as e:
            raise Invalid("; ".join(err["msg"] for err in e.errors())) from None
        store.set_rate_limit(body.scope, spec, who.id)
        identity.audit(who, "ratelimit.set", body.scope, rpm=spec.rpm, tpm=spec.tpm,
                       concurrent=spec.concurrent)
        return {"scope": body.scope, "source": "api", **spec.model_dump()}

    @r.delete("/rate-limits")
    def delete_rate(who: Who, scope: Annotated[str, Query()]) -> dict[str, Any]:
        check(who, scope, write=True, action="ratelimit.delete")
        if not store.delete_rate_limit(scope):
            raise NotFound(f"no rate limit set through the API on {scope}")
        identity.audit(who, "ratelimit.delete", scope)
        return {"deleted": True, "scope": scope}

    app.include_router(r)

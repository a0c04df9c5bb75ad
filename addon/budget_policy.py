"""Budgets and rate limits as data: the config model and the pure rules around it.

Nothing here touches a store or the network. The limiter backends (SQL, Redis,
in-process) take a `Plan` built here and only count; which scopes apply, which
calendar window a call falls in, when it resets and how much to reserve are
decided once, in this module, so every backend agrees.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Period = Literal["daily", "weekly", "monthly", "total"]
PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly", "total")
ScopeKind = Literal["org", "team", "user", "key"]
SCOPE_KINDS: tuple[ScopeKind, ...] = ("org", "team", "user", "key")
MAX_USD = Decimal(10_000_000)
"""Larger budgets are a typo (an extra zero, cents for dollars), refused as config errors."""
MAX_TOKENS = 10**13
NANO_PER_USD = 1_000_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetSpec(_Strict):
    """One budget on one scope: USD and/or tokens per calendar period."""

    period: Period
    usd: Decimal | None = Field(default=None, description="limit in USD per period")
    tokens: int | None = Field(default=None, description="limit in tokens per period")
    mode: Literal["hard", "soft"] = "hard"
    """hard: refuse once spent; soft: alert only (metric and audit event)."""

    @field_validator("usd")
    @classmethod
    def _usd(cls, v: Decimal | None) -> Decimal | None:
        if v is not None and not (0 < v <= MAX_USD):
            raise ValueError(f"usd must be > 0 and <= {MAX_USD} (got {v})")
        return v

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: int | None) -> int | None:
        if v is not None and not (0 < v <= MAX_TOKENS):
            raise ValueError(f"tokens must be > 0 and <= {MAX_TOKENS} (got {v})")
        return v

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSpec:
        if self.usd is None and self.tokens is None:
            raise ValueError("a budget needs usd and/or tokens")
        return self

    @property
    def usd_nano(self) -> int | None:
        return None if self.usd is None else int(self.usd * NANO_PER_USD)


class RateSpec(_Strict):
    """Per-scope rate limits; None means unlimited."""

    rpm: int | None = Field(default=None, gt=0, le=10_000_000, description="requests/minute")
    tpm: int | None = Field(default=None, gt=0, le=MAX_TOKENS, description="tokens/minute")
    concurrent: int | None = Field(default=None, gt=0, le=100_000,
                                   description="streams in flight at once")


class Reservation(_Strict):
    """How much one call reserves before it is forwarded."""

    output_tokens: int = Field(default=4096, gt=0, le=1_000_000)
    """Default output allowance, added to the input estimate (not max_output_tokens)."""
    models: dict[str, int] = Field(default_factory=dict)
    """Model glob -> output allowance, first match wins (e.g. {"gpt-5*": 8192})."""
    max_usd: Decimal = Field(default=Decimal(5), gt=0, le=Decimal(10_000))
    """Cap on one reservation, so one huge request cannot block a whole team's budget."""
    lease_seconds: int = Field(default=1800, ge=30, le=86_400)
    """A reservation not settled by then (its replica died) stops counting."""

    def output_allowance(self, model: str) -> int:
        for pattern, n in self.models.items():
            if fnmatch.fnmatchcase(model, pattern):
                return n
        return self.output_tokens


def _scope_map(kind: str, value: Mapping[str, object]) -> None:
    for name in value:
        if kind == "team" and name.count("/") != 1:
            raise ValueError(f"team budgets are keyed 'org/team' (got {name!r})")
        if kind == "org" and "/" in name:
            raise ValueError(f"org names contain no '/' (got {name!r})")


class Budgets(_Strict):
    """The `budgets:` config section. User and key budgets live in the store (admin API)."""

    timezone: str = "UTC"
    """Where calendar periods start (daily, weekly on Monday, monthly)."""
    orgs: dict[str, list[BudgetSpec]] = Field(default_factory=dict)
    teams: dict[str, list[BudgetSpec]] = Field(default_factory=dict)
    """Keyed "org/team"."""
    reservation: Reservation = Field(default_factory=Reservation)
    on_redis_down: Literal["closed", "open"] = "closed"
    """closed: refuse with 503 while Redis is unreachable; open: count in-process (alert)."""
    cut_off_streams: bool = False
    """End a stream whose metered cost passes what its hard budgets had left (off)."""

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r}") from e
        return v

    @model_validator(mode="after")
    def _check(self) -> Budgets:
        for kind, table in (("org", self.orgs), ("team", self.teams)):
            _scope_map(kind, table)
            for name, specs in table.items():
                periods = [s.period for s in specs]
                if len(set(periods)) != len(periods):
                    raise ValueError(f"{kind} {name!r}: one budget per period (got {periods})")
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class RateLimits(_Strict):
    """The `rate_limits:` config section; per-user/key overrides live in the store."""

    orgs: dict[str, RateSpec] = Field(default_factory=dict)
    teams: dict[str, RateSpec] = Field(default_factory=dict)
    """Keyed "org/team"."""
    per_user: RateSpec = Field(default_factory=RateSpec)
    """Applies to every user without an override of their own."""
    per_key: RateSpec = Field(default_factory=RateSpec)

    @model_validator(mode="after")
    def _check(self) -> RateLimits:
        _scope_map("org", self.orgs)
        _scope_map("team", self.teams)
        return self


# -- scopes and windows ---------------------------------------------------------------


def scopes_of(org: str, team: str, user: str, key_id: str) -> tuple[str, str, str, str]:
    """The four scope ids a call counts against, broadest first."""
    return (f"org:{org}", f"team:{org}/{team}", f"user:{org}/{user}", f"key:{key_id}")


def parse_scope(scope: str) -> tuple[str, str]:
    kind, sep, name = scope.partition(":")
    if not sep or kind not in SCOPE_KINDS or not name:
        raise ValueError(f"scope must be org:<org>, team:<org>/<team>, user:<org>/<user> or"
                         f" key:<key id> (got {scope!r})")
    if kind in ("team", "user") and name.count("/") != 1:
        raise ValueError(f"{kind} scopes are {kind}:<org>/<name> (got {scope!r})")
    return kind, name


@dataclass(frozen=True, slots=True)
class Window:
    period: Period
    key: str
    """e.g. d2026-11-25, w2026-11-23, m2026-11, total: part of every counter's name."""
    start: datetime | None
    resets_at: datetime | None

    @property
    def ttl_seconds(self) -> int:
        """How long a counter must outlive its window's end (0: forever)."""
        if self.resets_at is None or self.start is None:
            return 0
        return int((self.resets_at - self.start).total_seconds()) + 2 * 86_400


def window(period: Period, now: datetime, tz: ZoneInfo) -> Window:
    """The calendar window holding `now`, in the configured zone, and when it resets."""
    if period == "total":
        return Window("total", "total", None, None)
    local = now.astimezone(tz)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        start, end = day, day + timedelta(days=1)
        key = f"d{start:%Y-%m-%d}"
    elif period == "weekly":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
        key = f"w{start:%Y-%m-%d}"
    else:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        key = f"m{start:%Y-%m}"
    # Rebuild from the wall clock so a DST change inside the window is honoured.
    start = start.replace(tzinfo=None).replace(tzinfo=tz)
    end = end.replace(tzinfo=None).replace(tzinfo=tz)
    return Window(period, key, start.astimezone(UTC), end.astimezone(UTC))


_LAST_WINDOWS: dict[ZoneInfo, tuple[datetime, datetime, tuple[Window, ...]]] = {}
"""Per zone, the windows last computed and the span in which they all still hold: every
call needs them and they change once a day (computing them was 3 % of a plain call's CPU)."""


def windows(now: datetime, tz: ZoneInfo) -> tuple[Window, ...]:
    """The window of each period holding ``now`` (``Window`` is frozen: the tuple is shared)."""
    last = _LAST_WINDOWS.get(tz)
    if last is not None and last[0] <= now < last[1]:
        return last[2]
    wins = tuple(window(p, now, tz) for p in PERIODS)
    bounded = [w for w in wins if w.start is not None and w.resets_at is not None]
    if bounded:
        _LAST_WINDOWS[tz] = (max(w.start for w in bounded if w.start is not None),
                             min(w.resets_at for w in bounded if w.resets_at is not None),
                             wins)
    return wins


def counter_id(scope: str, win: Window) -> str:
    return f"{scope}|{win.key}"


# -- the plan a backend executes -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetLine:
    scope: str
    window: Window
    spec: BudgetSpec

    @property
    def counter(self) -> str:
        return counter_id(self.scope, self.window)


@dataclass(frozen=True, slots=True)
class RateLine:
    scope: str
    spec: RateSpec


@dataclass(slots=True)
class Plan:
    """Everything a backend needs to admit one call, decided up front."""

    res_id: str
    now: datetime
    scopes: tuple[str, ...]
    windows: tuple[Window, ...]
    budgets: list[BudgetLine]
    rates: list[RateLine]
    est_nano: int
    est_tokens: int
    lease_seconds: int

    @property
    def counters(self) -> list[tuple[str, Window]]:
        """Every (counter id, window) a settle adds to: all scopes x all periods."""
        return [(counter_id(s, w), w) for s in self.scopes for w in self.windows]

    @property
    def minute(self) -> int:
        return int(self.now.timestamp() // 60)


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: Literal["budget", "rate", "unavailable"]
    scope: str
    message: str
    retry_after: int | None = None
    code: str = "budget_exceeded"


@dataclass(slots=True)
class Admission:
    plan: Plan
    backend: str
    """Which backend holds the reservation (settle goes back to the same one)."""
    settled: bool = False
    headroom_nano: int | None = None
    """Least USD left on any hard budget before this call's own reservation: what the
    optional mid-stream cut-off lets one stream spend."""
    input_nano: int = 0
    """The estimated cost of the input (the cut-off adds metered output to it)."""
    out_rate_nano: float = 0.0
    """Nano-USD per output token for the requested model."""


def headroom(line: BudgetLine, spent_nano: int, reserved_nano: int, current: int | None
             ) -> int | None:
    """The smaller of `current` and what this hard USD line has left."""
    limit = line.spec.usd_nano
    if line.spec.mode != "hard" or limit is None:
        return current
    left = limit - spent_nano - reserved_nano
    return left if current is None else min(current, left)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    scope: str
    period: Period
    mode: str
    window: str
    resets_at: datetime | None
    limit_usd: Decimal | None
    limit_tokens: int | None
    spent_nano: int
    spent_tokens: int
    reserved_nano: int
    reserved_tokens: int

    @property
    def remaining_usd(self) -> Decimal | None:
        if self.limit_usd is None:
            return None
        return self.limit_usd - Decimal(self.spent_nano + self.reserved_nano) / NANO_PER_USD

    @property
    def remaining_tokens(self) -> int | None:
        if self.limit_tokens is None:
            return None
        return self.limit_tokens - self.spent_tokens - self.reserved_tokens


@dataclass(slots=True)
class LimitBook:
    """Budgets and rate limits by scope: config ones merged with the store's."""

    budgets: dict[str, list[BudgetSpec]] = field(default_factory=dict)
    rates: dict[str, RateSpec] = field(default_factory=dict)
    per_user: RateSpec = field(default_factory=RateSpec)
    per_key: RateSpec = field(default_factory=RateSpec)

    @classmethod
    def from_config(cls, budgets: Budgets, rates: RateLimits) -> LimitBook:
        book = cls(per_user=rates.per_user, per_key=rates.per_key)
        for name, specs in budgets.orgs.items():
            book.budgets[f"org:{name}"] = list(specs)
        for name, specs in budgets.teams.items():
            book.budgets[f"team:{name}"] = list(specs)
        for name, spec in rates.orgs.items():
            book.rates[f"org:{name}"] = spec
        for name, spec in rates.teams.items():
            book.rates[f"team:{name}"] = spec
        return book

    def with_store(self, budgets: Iterable[tuple[str, BudgetSpec]],
                   rates: Iterable[tuple[str, RateSpec]]) -> LimitBook:
        """A copy with store-set limits added (they win over config for the same period)."""
        book = LimitBook({k: list(v) for k, v in self.budgets.items()}, dict(self.rates),
                         self.per_user, self.per_key)
        for scope, spec in budgets:
            kept = [s for s in book.budgets.get(scope, []) if s.period != spec.period]
            book.budgets[scope] = [*kept, spec]
        for scope, rspec in rates:
            book.rates[scope] = rspec
        return book

    def rate_for(self, scope: str) -> RateSpec | None:
        spec = self.rates.get(scope)
        if spec is None:
            if scope.startswith("user:"):
                spec = self.per_user
            elif scope.startswith("key:"):
                spec = self.per_key
        if spec is None or (spec.rpm is None and spec.tpm is None and spec.concurrent is None):
            return None
        return spec


def make_plan(res_id: str, now: datetime, scopes: tuple[str, ...], book: LimitBook,
              tz: ZoneInfo, est_nano: int, est_tokens: int, lease_seconds: int) -> Plan:
    wins = windows(now, tz)
    by_period = {w.period: w for w in wins}
    lines = [BudgetLine(s, by_period[spec.period], spec)
             for s in scopes for spec in book.budgets.get(s, ())]
    rates = [RateLine(s, r) for s in scopes if (r := book.rate_for(s)) is not None]
    return Plan(res_id, now, scopes, wins, lines, rates, est_nano, est_tokens, lease_seconds)


def estimate(input_tokens: int, output_allowance: int, in_rate_nano: float, out_rate_nano: float,
             cap_nano: int) -> tuple[int, int]:
    """(nano-USD, tokens) to reserve: input priced at the input rate plus the allowance."""
    nano = math.ceil(input_tokens * in_rate_nano + output_allowance * out_rate_nano)
    return min(nano, cap_nano), input_tokens + output_allowance


def seconds_until(when: datetime | None, now: datetime) -> int | None:
    return None if when is None else max(1, math.ceil((when - now).total_seconds()))


def usd(nano: int) -> str:
    """Cents, or four decimals below $10 so small budgets do not read "$0.02 of $0.02"."""
    v = Decimal(nano) / NANO_PER_USD
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def budget_message(line: BudgetLine, spent_nano: int, spent_tokens: int,
                   reserved_nano: int, reserved_tokens: int, in_usd: bool) -> str:
    """What the developer reads in Codex: which scope, spent / limit, when it resets."""
    spec = line.spec
    if in_usd:
        amount = (f"spent ${usd(spent_nano)} of ${usd(spec.usd_nano or 0)}"
                  + (f" (+${usd(reserved_nano)} reserved by calls in flight)"
                     if reserved_nano else ""))
    else:
        amount = (f"used {spent_tokens:,} of {spec.tokens:,} tokens"
                  + (f" (+{reserved_tokens:,} reserved by calls in flight)"
                     if reserved_tokens else ""))
    when = ("it never resets (total budget); ask an admin to raise it"
            if line.window.resets_at is None
            else f"it resets at {line.window.resets_at:%Y-%m-%d %H:%M} UTC")
    return f"the {spec.period} budget of {line.scope} is exhausted: {amount}; {when}"


def check_budget(line: BudgetLine, spent_nano: int, spent_tokens: int, reserved_nano: int,
                 reserved_tokens: int, est_nano: int, est_tokens: int) -> Refusal | None:
    """A hard budget refuses when spent + reserved + this call's estimate would pass it."""
    spec = line.spec
    if spec.mode != "hard":
        return None
    nano_limit = spec.usd_nano
    if nano_limit is not None and spent_nano + reserved_nano + est_nano > nano_limit:
        return Refusal("budget", line.scope, budget_message(
            line, spent_nano, spent_tokens, reserved_nano, reserved_tokens, in_usd=True))
    if spec.tokens is not None and spent_tokens + reserved_tokens + est_tokens > spec.tokens:
        return Refusal("budget", line.scope, budget_message(
            line, spent_nano, spent_tokens, reserved_nano, reserved_tokens, in_usd=False))
    return None


def check_rate(line: RateLine, requests: int, tokens: int, streams: int, est_tokens: int,
               now: datetime) -> Refusal | None:
    """Counts are this minute's requests and tokens and the streams in flight."""
    spec = line.spec
    to_next_minute = max(1, 60 - int(now.timestamp()) % 60)
    if spec.rpm is not None and requests + 1 > spec.rpm:
        return Refusal("rate", line.scope, f"rate limit of {line.scope}: {spec.rpm} requests"
                       f" per minute; retry in {to_next_minute} s", to_next_minute,
                       "rate_limited")
    if spec.tpm is not None and tokens > 0 and tokens + est_tokens > spec.tpm:
        return Refusal("rate", line.scope, f"rate limit of {line.scope}: {spec.tpm:,} tokens"
                       f" per minute (this call is estimated at {est_tokens:,}); retry in"
                       f" {to_next_minute} s", to_next_minute, "rate_limited")
    if spec.concurrent is not None and streams + 1 > spec.concurrent:
        return Refusal("rate", line.scope, f"concurrency limit of {line.scope}:"
                       f" {spec.concurrent} calls in flight; retry in 2 s", 2, "rate_limited")
    return None

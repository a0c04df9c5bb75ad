"""The ``guardrails:`` section of the config file (pydantic, validated at load).

A policy names, per check, the directions it scans (``input``: user, system
and assistant messages; ``tool_output``: ``function_call_output`` and tool
messages; ``model_output``: what the provider streams back) and the action on a
hit (``block``, ``redact``, ``flag``). Policies exist at four levels: default,
org, team, key. For each check, the most specific level that sets it wins (key >
team > org > default); a check nobody sets keeps its built-in default below.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Direction = Literal["input", "tool_output", "model_output"]
Action = Literal["block", "redact", "flag"]
DIRECTIONS: tuple[Direction, ...] = ("input", "tool_output", "model_output")
_SEVERITY: dict[str, int] = {"flag": 0, "redact": 1, "block": 2}
_RULE_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


_SECRET_ACTIONS: dict[Direction, Action] = {"input": "block", "tool_output": "redact",
                                            "model_output": "redact"}


def severity(action: str) -> int:
    return _SEVERITY[action]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Check(_Strict):
    enabled: bool = True
    directions: tuple[Direction, ...] = DIRECTIONS
    action: Action | dict[Direction, Action] = "flag"
    """One action for every direction, or one per direction (missing ones: flag)."""
    rules: dict[str, Action | Literal["off"]] = Field(default_factory=dict)
    """Per-rule override, by rule name without the check prefix (e.g. ``jwt: flag``)."""

    def action_for(self, direction: Direction, rule: str) -> Action | None:
        """The action for a hit of ``rule`` in ``direction``; None: not checked."""
        if not self.enabled or direction not in self.directions:
            return None
        override = self.rules.get(rule)
        if override == "off":
            return None
        if override is not None:
            return override
        if isinstance(self.action, str):
            return self.action
        return self.action.get(direction, "flag")

    def scans(self, direction: Direction) -> bool:
        return self.enabled and direction in self.directions


class SecretsCheck(Check):
    directions: tuple[Direction, ...] = ("input", "tool_output")
    """model_output is opt-in: its hold-back window delays every stream's first token
    (~150 ms at 10 ms per 4-character delta, benchmarks/README.md) and costs ~3x the
    gateway's CPU per stream, while a model that never saw a secret (input blocked,
    tool outputs redacted) rarely writes one."""
    action: Action | dict[Direction, Action] = Field(default_factory=lambda: _SECRET_ACTIONS)
    detect_secrets: bool = True
    """detect-secrets' regex plugins (never its keyword plugin: too noisy on code)."""
    entropy: bool = False
    """detect-secrets' Base64/Hex high-entropy plugins (off: they flag hashes in lockfiles)."""


PII_ENTITIES = frozenset({
    "CREDIT_CARD", "CRYPTO", "EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "MAC_ADDRESS",
    "PHONE_NUMBER", "UK_NINO", "URL", "US_BANK_NUMBER", "US_ITIN", "US_PASSPORT", "US_SSN"})
"""Presidio entities with a pattern/checksum recognizer (no NLP model needed)."""


class PiiCheck(Check):
    directions: tuple[Direction, ...] = ("input", "tool_output")
    entities: tuple[str, ...] = ("CREDIT_CARD", "US_SSN", "IBAN_CODE", "EMAIL_ADDRESS")
    """Presidio entity names; recognizers are regex/checksum ones only (no NLP model)."""
    score_threshold: float = Field(default=0.5, ge=0, le=1)

    @field_validator("entities")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - PII_ENTITIES)
        if unknown:
            raise ValueError(f"unknown PII entities {unknown}; known: {sorted(PII_ENTITIES)}")
        return v


class InjectionCheck(Check):
    directions: tuple[Direction, ...] = ("input", "tool_output")
    threshold: float = Field(default=1.0, gt=0)
    """A text is a hit when its heuristic score reaches this (one strong signal = 1)."""
    classifier: str | None = None
    """``package.module:function`` (or dotted) taking (text, direction) and returning a
    score in [0, 1] or None; a score >= classifier_threshold is a hit."""
    classifier_threshold: float = Field(default=0.5, ge=0, le=1)

    @field_validator("classifier")
    @classmethod
    def _dotted(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?", v):
            raise ValueError(f"expected 'package.module:function', got {v!r}")
        return v


class LimitsCheck(_Strict):
    models: tuple[str, ...] = ()
    """Model globs allowed (empty: any)."""
    max_input_bytes: int | None = Field(default=None, gt=0)
    max_input_tokens: int | None = Field(default=None, gt=0)
    """Estimated as bytes / 4 (OpenAI's rule of thumb for English and code)."""
    max_output_tokens: int | None = Field(default=None, gt=0)
    """Cap on ``max_output_tokens`` / ``max_tokens`` / ``max_completion_tokens``."""
    output_tokens_action: Literal["clamp", "block"] = "clamp"
    """clamp: lower (or set) the request's cap; block: refuse a request above it."""


class CustomRule(_Strict):
    name: str = Field(pattern=_RULE_NAME)
    regex: str | None = None
    keywords: tuple[str, ...] = ()
    case_sensitive: bool = False
    directions: tuple[Direction, ...] = DIRECTIONS
    action: Action = "flag"

    @model_validator(mode="after")
    def _check(self) -> CustomRule:
        if self.regex is None and not self.keywords:
            raise ValueError(f"custom rule {self.name!r}: give a regex or keywords")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"custom rule {self.name!r}: bad regex: {e}") from None
        return self


class Policy(_Strict):
    """One level's settings; a check left out is inherited from the level above."""

    secrets: SecretsCheck | None = None
    pii: PiiCheck | None = None
    injection: InjectionCheck | None = None
    limits: LimitsCheck | None = None
    custom: tuple[CustomRule, ...] | None = None

    @field_validator("custom")
    @classmethod
    def _unique(cls, v: tuple[CustomRule, ...] | None) -> tuple[CustomRule, ...] | None:
        names = [r.name for r in v or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate custom rule names in {names}")
        return v


class Resolved(_Strict):
    """A complete policy for one caller (every check present)."""

    secrets: SecretsCheck = Field(default_factory=SecretsCheck)
    pii: PiiCheck = Field(default_factory=PiiCheck)
    injection: InjectionCheck = Field(
        default_factory=lambda: InjectionCheck(directions=("input", "tool_output")))
    limits: LimitsCheck = Field(default_factory=LimitsCheck)
    custom: tuple[CustomRule, ...] = ()

    def scans(self, direction: Direction) -> bool:
        return (self.secrets.scans(direction) or self.pii.scans(direction)
                or self.injection.scans(direction)
                or any(direction in r.directions for r in self.custom))


class GuardrailsConfig(_Strict):
    enabled: bool = True
    default: Policy = Field(default_factory=Policy)
    orgs: dict[str, Policy] = Field(default_factory=dict)
    teams: dict[str, Policy] = Field(default_factory=dict)
    """By team name, or ``org/team`` when team names repeat across orgs."""
    keys: dict[str, Policy] = Field(default_factory=dict)
    """By key id (``key_…``)."""
    holdback_chars: int = Field(default=64, ge=16, le=4096)
    """Streamed model output kept back until this many characters follow it. A secret
    without whitespace is held whole anyway (the trailing run is never cut), so this only
    bounds matches that contain spaces: the built-in ones (an IBAN or card number written
    in groups) are under 50 characters. Each held character delays the first visible
    token (measured: ~+160 ms at 64, ~+330 ms at 128 for a model at ~100 tokens/s;
    benchmarks/README.md); raise it for custom rules matching longer phrases."""
    cache_entries: int = Field(default=50_000, ge=0)
    """In-memory verdict cache size (items); 0 disables it."""
    cache_ttl_seconds: int = Field(default=86_400, gt=0)
    """Lifetime of verdicts shared in Redis (when redis_url is set)."""
    inline_scan_bytes: int = Field(default=2048, ge=0)
    """New content up to this size is scanned on the event loop; more goes to a thread."""

    def resolve(self, org: str, team: str, key_id: str) -> Resolved:
        levels = [self.keys.get(key_id), self.teams.get(f"{org}/{team}"),
                  self.teams.get(team), self.orgs.get(org), self.default]
        picked: dict[str, object] = {}
        for name in ("secrets", "pii", "injection", "limits", "custom"):
            for level in levels:
                value = getattr(level, name) if level is not None else None
                if value is not None:
                    picked[name] = value
                    break
        return Resolved.model_validate(picked)

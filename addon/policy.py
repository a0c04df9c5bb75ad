"""Gateway configuration: one YAML file validated by pydantic.

Precedence for every setting is flag > environment variable > config file >
built-in default, so `agent-egress run` works with no file at all (embedded
defaults: SQLite and an encrypted vault file under the state directory).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from decimal import Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .budget_policy import Budgets, RateLimits
from .guardrails.config import GuardrailsConfig
from .pricing import ModelPrice
from .vault.spec import FileVaultSpec, VaultSpec

DEFAULT_HOME = "~/.agent-egress"
ENV_HOME = "AGENT_EGRESS_HOME"
ENV_CONFIG = "AGENT_EGRESS_CONFIG"


class ConfigError(Exception):
    """A config file or setting that cannot be used; the message names the key."""


def _check_hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


HostPort = Annotated[str, Field(description="HOST:PORT")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Strict):
    reverse: HostPort = "127.0.0.1:8787"
    """Clients use http://<reverse>/v1 as their OpenAI base URL."""
    proxy: HostPort | None = "127.0.0.1:8080"
    """Explicit HTTP(S) proxy listener (HTTPS_PROXY); null disables it."""
    admin: HostPort = "127.0.0.1:9787"
    """/healthz, /readyz, /metrics."""

    @field_validator("reverse", "proxy", "admin")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        return None if v is None else _check_hostport(v)


class PriceOverride(_Strict):
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None

    def to_model_price(self) -> ModelPrice:
        return ModelPrice(
            input_per_mtok=self.input_per_mtok,
            output_per_mtok=self.output_per_mtok,
            cached_input_per_mtok=self.cached_input_per_mtok,
            cache_write_per_mtok=self.cache_write_per_mtok,
        )


# --- failover (issue 8): timeouts, routes, breaker ---
class ProviderTimeouts(_Strict):
    """Seconds; mitmproxy itself has no connect or response timeout."""

    connect: float = Field(default=5.0, gt=0)
    headers: float = Field(default=60.0, gt=0)
    """Request start to response headers, for streamed calls (a plain call waits for `total`)."""
    idle: float = Field(default=240.0, gt=0)
    """Longest silence between stream chunks; below Codex's own 300 s idle timeout."""
    total: float = Field(default=3600.0, gt=0)


class RouteRule(_Strict):
    """Calls whose model matches `model` (a glob) go to `providers`, in order of preference."""

    model: str = "*"
    providers: list[str] = Field(min_length=1)
    weights: list[int] | None = None
    """Optional: the first provider of a session is drawn by weight (per session id), the
    others follow in list order as fallbacks."""

    @model_validator(mode="after")
    def _weights(self) -> RouteRule:
        if self.weights is not None and (len(self.weights) != len(self.providers)
                                         or any(w < 0 for w in self.weights)
                                         or not any(self.weights)):
            raise ValueError("weights: one non-negative weight per provider, not all zero")
        return self


class BreakerSettings(_Strict):
    failures: int = Field(default=5, ge=1)
    """Failures within `window_seconds` that open a provider key's breaker."""
    window_seconds: float = Field(default=30.0, gt=0)
    open_seconds: float = Field(default=30.0, gt=0)
    """How long an open breaker refuses traffic before half-open probes."""
    half_open_probes: int = Field(default=1, ge=1)
    """Calls let through at once while half-open; one success closes the breaker."""
    sync_seconds: float = Field(default=0.5, gt=0)
    """With Redis: how often a replica reads the shared breaker state."""


class FailoverSettings(_Strict):
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    retry_status: Literal[503, 429] = 503
    """What the client gets when its retry will go to another provider: 503 (Codex retries
    after ~0.2 s, silently) or 429 with Retry-After: 0 (~15 ms, but Codex prints
    "Reconnecting... n/5" and retries at most 5 times)."""
    retry_memory_seconds: float = Field(default=120.0, gt=0)
    """How long a failed request is remembered so its byte-identical retry goes elsewhere."""
    sticky_seconds: float = Field(default=3600.0, gt=0)
    """A session stays on the provider it started on (prompt cache) while idle less than this."""


class ProviderKey(_Strict):
    """A vault key used for the calls that match every selector given (empty: ignored)."""

    name: str
    orgs: list[str] = Field(default_factory=list)
    teams: list[str] = Field(default_factory=list)
    projects: list[str] = Field(default_factory=list)
    """Values of the `project` tag (from the key or an x-egress-tag-project header)."""

    def matches(self, org: str, team: str, tags: Mapping[str, str]) -> bool:
        return ((not self.orgs or org in self.orgs) and (not self.teams or team in self.teams)
                and (not self.projects or tags.get("project") in self.projects))


class Provider(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    kind: Literal["openai", "azure_openai", "openai_compatible",
                  "anthropic"] = "openai"  # anthropic (issue 13): x-api-key, /v1/messages
    base_url: str
    """Provider API root including the version path, e.g. https://api.openai.com/v1
    (anthropic: https://api.anthropic.com, with or without /v1)."""
    key: str
    """Name of the provider API key in the vault (`agent-egress vault set NAME`)."""
    keys: list[ProviderKey] = Field(default_factory=list)
    """Per-org/team/project keys, first match wins; `key` is used when none matches."""
    prices: dict[str, PriceOverride] = Field(default_factory=dict)
    """USD per million tokens by model name or glob; wins over genai-prices."""
    price_as: str | None = None
    """genai-prices provider id to price with (default: 'openai' for kind openai)."""
    # --- failover (issue 8) ---
    models: dict[str, str] = Field(default_factory=dict)
    """Requested model (name or glob) -> this provider's model name (Azure: deployment)."""
    chat_only: bool = False
    """Speaks only Chat Completions: Responses calls are translated both ways."""
    api_version: str | None = None
    """azure_openai: `api-version` query (classic API); None for Azure's /openai/v1 API."""
    timeouts: ProviderTimeouts = Field(default_factory=lambda: ProviderTimeouts())
    websockets: bool | None = None
    """Takes Codex's Responses-over-WebSocket transport (GET /responses upgrade; routed
    once per connection). Default: kind openai and not chat_only."""

    @property
    def takes_websockets(self) -> bool:
        if self.websockets is not None:
            return self.websockets and self.kind != "anthropic" and not self.chat_only
        return self.kind == "openai" and not self.chat_only

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {v!r}")
        if parts.query or parts.fragment:
            raise ValueError("base_url must not have a query or fragment")
        return v.rstrip("/")

    def key_for(self, org: str, team: str, tags: Mapping[str, str]) -> str:
        return next((k.name for k in self.keys if k.matches(org, team, tags)), self.key)

    def model_for(self, requested: str) -> str:
        """This provider's name for a requested model (exact key first, then globs)."""
        if requested in self.models:
            return self.models[requested]
        return next((v for k, v in self.models.items() if fnmatchcase(requested, k)), requested)

    @property
    def pricing_provider_id(self) -> str | None:
        if self.price_as:
            return self.price_as
        if self.kind == "anthropic":  # anthropic (issue 13)
            return "anthropic"
        return "openai" if self.kind == "openai" else None


class Limits(_Strict):
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    """Largest request body accepted; larger ones are refused with 413."""


class Shutdown(_Strict):
    drain_seconds: float = Field(default=30.0, ge=0)
    """How long SIGTERM waits for in-flight streams before closing them."""
    flush_seconds: float = Field(default=10.0, ge=0)
    """Then how long the ledger, budget settles, audit and traces get to reach their
    stores; ledger rows still unwritten are spooled to disk (never lost). The process
    exits within drain + flush + about 3 s: give the orchestrator's grace period more."""


class AbuseSettings(_Strict):
    """Bad gateway tokens from one client address (security, issue 12; addon/abuse.py)."""

    window_seconds: float = Field(default=60.0, gt=0, le=86400)
    free_failures: int = Field(default=10, ge=1)
    """Failures in the window answered at once (Codex alone retries a 401 five times)."""
    delay_seconds: float = Field(default=0.25, ge=0, le=60)
    """Delay added to the first failure past ``free_failures``; doubles with each one."""
    max_delay_seconds: float = Field(default=4.0, ge=0, le=60)
    block_failures: int = Field(default=30, ge=1)
    """From this many failures in the window on, a failure is answered 429 + Retry-After."""
    max_clients: int = Field(default=10_000, ge=1)
    """Client addresses remembered (least recently failing forgotten first)."""


class Traces(_Strict):
    exporter: Literal["otlp-http", "otlp-grpc", "none"] | None = None
    """None: on when OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT or OTEL_TRACES_EXPORTER is set."""
    endpoint: str | None = None
    """OTLP endpoint; None defers to OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT."""
    sample_ratio: float | None = Field(default=None, ge=0, le=1)
    """Per-session sampling (trace ids come from session ids); None: OTEL_TRACES_SAMPLER."""
    session_ttl_seconds: float = Field(default=1800, gt=0)
    """A session idle this long has its open turn span ended."""
    # telemetry (issue 7): opt-in message content on chat spans (addon/capture.py)
    capture_content: bool = False
    """Put each call's new input and its output on its chat span (gen_ai.input.messages,
    gen_ai.output.messages), redacted by the guardrail engine first. Off by default."""
    capture_content_overrides: dict[str, bool] = Field(default_factory=dict)
    """Per org (``acme``) or team (``acme/payments``, wins over its org): on or off."""
    capture_max_bytes: int = Field(default=8192, ge=256)
    """Each captured text (a message's text, a tool output, tool arguments) is cut here."""


class Telemetry(_Strict):
    traces: Traces = Field(default_factory=Traces)


# --- egress proxy mode (issue 9) ---
class Egress(_Strict):
    """The explicit-proxy listener (HTTPS_PROXY). Host patterns are ``host``, ``host:port``
    or ``*.suffix[:port]``; a bare host matches any port."""

    intercept_hosts: list[str] = Field(
        default_factory=lambda: ["api.openai.com", "api.anthropic.com", "chatgpt.com"])
    """TLS is decrypted only for these and the providers' own host:port; every other
    CONNECT is tunnelled untouched (the client's handshake reaches the server)."""
    deny_hosts: list[str] = Field(default_factory=list)
    """Non-LLM destinations refused with 403 (CONNECT and plain HTTP)."""
    upstream_ca_file: Path | None = None
    """CA bundle (PEM) that replaces the default one for verifying upstream TLS (mitmproxy
    ssl_verify_upstream_trusted_ca), e.g. a corporate CA; the tests trust a self-signed fake."""
    # ChatGPT-login Codex (issue 9 item 4)
    chatgpt_hosts: list[str] = Field(default_factory=lambda: ["chatgpt.com"])
    """Hosts whose /backend-api/codex/responses calls are ChatGPT-login Codex model calls."""
    chatgpt_login: Literal["meter", "refuse", "passthrough"] = "refuse"
    """refuse: Codex shows a message pointing at the gateway; meter: pass through with the
    developer's own credential and record tokens + equivalent USD as `subscription`;
    passthrough: untouched. Bootstrap calls (accounts check, models) always pass."""
    chatgpt_login_overrides: dict[str, Literal["meter", "refuse", "passthrough"]] = Field(
        default_factory=dict)
    """Per org (``acme``) or team (``acme/payments``, wins over its org), for callers whose
    proxy credential is a gateway token; others get `chatgpt_login`."""
    # shared CA for replicas (issue 9 item 5)
    ca_dir: Path | None = None
    """Directory holding mitmproxy-ca.pem (key + certificate), e.g. a mounted secret shared
    by every replica; default <home>/mitmproxy. The key file must not be group/world
    readable. Env AGENT_EGRESS_CA_DIR."""


class Settings(_Strict):
    home: Path
    listen: Listen = Field(default_factory=Listen)
    database_url: str | None = None
    """SQLAlchemy URL; default sqlite:///<home>/agent-egress.db."""
    redis_url: str | None = None
    """Redis (redis://, rediss://, unix://) for cross-replica revocation; None: store poll only."""
    redis_prefix: str = "agent-egress:"
    """Prefix of every Redis key and channel, so deployments can share one Redis."""
    vault: VaultSpec = Field(default_factory=FileVaultSpec)
    """Where provider keys live: kind file (default, <home>/vault.json), aws or hashicorp."""
    audit_path: Path | None = None
    """Hash-chained audit log (JSON lines); default <home>/audit.jsonl."""
    providers: list[Provider] = Field(
        default_factory=lambda: [
            Provider(
                name="openai", kind="openai", base_url="https://api.openai.com/v1", key="openai"
            )
        ]
    )
    default_provider: str | None = None
    """Provider for calls no route matches; default: the first."""
    # --- failover (issue 8) ---
    routes: list[RouteRule] = Field(default_factory=list)
    """First matching rule wins; none: the default provider."""
    failover: FailoverSettings = Field(default_factory=FailoverSettings)
    limits: Limits = Field(default_factory=Limits)
    shutdown: Shutdown = Field(default_factory=Shutdown)
    abuse: AbuseSettings = Field(default_factory=AbuseSettings)  # security (issue 12)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # --- budgets and rate limits (issue 5) ---
    budgets: Budgets = Field(default_factory=Budgets)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    # --- guardrails (issue 6) ---
    guardrails: GuardrailsConfig = Field(default_factory=GuardrailsConfig)
    # --- egress proxy mode (issue 9) ---
    egress: Egress = Field(default_factory=Egress)

    @model_validator(mode="after")
    def _providers(self) -> Settings:
        names = [p.name for p in self.providers]
        if not names:
            raise ValueError("providers: at least one provider is required")
        if len(set(names)) != len(names):
            raise ValueError(f"providers: duplicate provider names in {names}")
        if self.default_provider is not None and self.default_provider not in names:
            raise ValueError(
                f"default_provider: {self.default_provider!r} is not one of the providers {names}"
            )
        for i, rule in enumerate(self.routes):  # failover (issue 8)
            unknown = [p for p in rule.providers if p not in names]
            if unknown:
                raise ValueError(f"routes.{i}.providers: {unknown} are not providers {names}")
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'agent-egress.db'}"

    @property
    def audit_file(self) -> Path:
        return self.audit_path or self.home / "audit.jsonl"


    def provider(self, name: str | None = None) -> Provider:
        wanted = name or self.default_provider or self.providers[0].name
        return next(p for p in self.providers if p.name == wanted)


ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "AGENT_EGRESS_REVERSE_LISTEN": ("listen", "reverse"),
    "AGENT_EGRESS_PROXY_LISTEN": ("listen", "proxy"),
    "AGENT_EGRESS_ADMIN_LISTEN": ("listen", "admin"),
    "AGENT_EGRESS_DATABASE_URL": ("database_url",),
    "AGENT_EGRESS_REDIS_URL": ("redis_url",),
    "AGENT_EGRESS_LOG_LEVEL": ("log_level",),
    "AGENT_EGRESS_CA_DIR": ("egress", "ca_dir"),  # egress proxy mode (issue 9)
}


def resolve_home(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(ENV_HOME) or DEFAULT_HOME).expanduser()


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{part}: expected a mapping")
        tree = node
    tree[path[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_settings(
    config_path: Path | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> Settings:
    """Build Settings from defaults, the YAML file, env vars and flag overrides."""
    home = resolve_home(environ)
    path = config_path or (Path(environ[ENV_CONFIG]) if environ.get(ENV_CONFIG) else None)
    if path is None and (home / "config.yaml").exists():
        path = home / "config.yaml"
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        raw = loaded
    raw.setdefault("home", str(home))
    for var, key_path in ENV_OVERRIDES.items():
        if environ.get(var):
            _set(raw, key_path, None if environ[var] == "off" else environ[var])
    for key_path, value in (overrides or {}).items():
        _set(raw, key_path, value)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None
    return settings.model_copy(update={"home": settings.home.expanduser()})

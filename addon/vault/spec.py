"""The config's ``vault:`` section and the one place that turns it into a Vault.

``refresh_seconds`` is how often every gateway replica re-reads the vault, so
it bounds how long a rotated provider key takes to be used everywhere without a
restart. Remote backends default to 60 s because each refresh reads every
secret (an API call per key, and AWS bills per call).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator

from .base import Vault, VaultError, load_master_key
from .file import FileVault

VAULT_FILE = "vault.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(value: str | None) -> str | None:
    if value is not None:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value


class FileVaultSpec(_Strict):
    kind: Literal["file"] = "file"
    path: Path | None = None
    """Encrypted vault file; default <home>/vault.json."""
    refresh_seconds: float = Field(default=5.0, gt=0)


class AwsVaultSpec(_Strict):
    kind: Literal["aws"]
    prefix: str = Field(default="agent-egress/", pattern=r"^[A-Za-z0-9/_+=.@-]*$")
    """Secret id = prefix + name."""
    region: str | None = None
    """Default: the AWS chain (AWS_REGION, AWS_DEFAULT_REGION, profile)."""
    endpoint_url: str | None = None
    """A VPC endpoint or a local emulator; default: the regional endpoint."""
    recovery_window_days: int = Field(default=7, ge=7, le=30)
    """Days a deleted secret stays restorable (Secrets Manager allows 7-30)."""
    refresh_seconds: float = Field(default=60.0, gt=0)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return _http_url(v)


class HashiCorpVaultSpec(_Strict):
    kind: Literal["hashicorp"]
    url: str
    """e.g. https://vault.example.com:8200"""
    mount: str = "secret"
    """Mount point of a KV version 2 engine."""
    path_prefix: str = "agent-egress/"
    namespace: str | None = None
    """Vault Enterprise / HCP namespace."""
    verify: bool | str = True
    """TLS verification: true, false, or a CA bundle path."""
    token_env: str = Field(default="VAULT_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Environment variable holding the token; the token is never in the config file."""
    refresh_seconds: float = Field(default=60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v) or v


def _kind(value: Any) -> str:
    """``kind`` defaults to file, so ``vault: {path: ...}`` still parses."""
    if isinstance(value, Mapping):
        return str(value.get("kind", "file"))
    return str(getattr(value, "kind", "file"))


VaultSpec = Annotated[
    Annotated[FileVaultSpec, Tag("file")]
    | Annotated[AwsVaultSpec, Tag("aws")]
    | Annotated[HashiCorpVaultSpec, Tag("hashicorp")],
    Discriminator(
        _kind,
        custom_error_type="vault_kind",
        custom_error_message="kind must be one of 'file', 'aws', 'hashicorp'",
    ),
]
"""Use as a Settings field: ``vault: VaultSpec = Field(default_factory=FileVaultSpec)``."""

_ADAPTER: TypeAdapter[VaultSpec] = TypeAdapter(VaultSpec)


def parse_vault_spec(data: Any) -> VaultSpec:
    """Validate a ``vault:`` mapping; raises pydantic's ValidationError naming the key."""
    return _ADAPTER.validate_python({} if data is None else data)


def open_vault(
    spec: VaultSpec,
    *,
    home: Path,
    environ: Mapping[str, str] = os.environ,
) -> Vault:
    """Build the configured backend. ``environ`` supplies the master key and the
    Vault token; AWS credentials come from boto3's own chain (the process env)."""
    if isinstance(spec, FileVaultSpec):
        master = load_master_key(home, environ)
        return FileVault((spec.path or home / VAULT_FILE).expanduser(), master.key)
    if isinstance(spec, AwsVaultSpec):
        from .aws import AwsSecretsManagerVault  # boto3: only when configured

        return AwsSecretsManagerVault(
            spec.prefix,
            region=spec.region,
            endpoint_url=spec.endpoint_url,
            recovery_window_days=spec.recovery_window_days,
        )
    token = environ.get(spec.token_env)
    if not token:
        raise VaultError(
            f"vault.kind is hashicorp but {spec.token_env} is not set; export a Vault token"
            " in it (or name another variable in vault.token_env)"
        )
    from .hashicorp import HashiCorpVault  # hvac: only when configured

    return HashiCorpVault(
        spec.url,
        token=token,
        mount=spec.mount,
        path_prefix=spec.path_prefix,
        namespace=spec.namespace,
        verify=spec.verify,
    )

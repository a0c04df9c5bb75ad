"""Provider keys in HashiCorp Vault (or OpenBao) KV version 2.

A secret ``name`` lives at ``{mount}/data/{path_prefix}{name}`` with the key in
data field ``value``, so an operator can also write it with
``vault kv put -mount=secret agent-egress/openai value=@key.txt``. Errors become
:class:`SecretNotFound` or a :class:`VaultError` saying what to fix; none
carries a secret value.
"""

from __future__ import annotations

import builtins
import os
from datetime import datetime
from typing import Any

import hvac  # type: ignore[import-untyped]
from hvac import exceptions as hvac_errors

from .base import SecretInfo, SecretNotFound, Vault, VaultError, fingerprint, validate_name

TOKEN_ENV = "VAULT_TOKEN"  # noqa: S105 (a variable name, not a secret)
VALUE_FIELD = "value"


class HashiCorpVault(Vault):
    """KV v2 backend; ``delete`` removes the metadata and every version.

    A name whose latest version was soft-deleted (``vault kv delete``) reads as
    absent and is left out of :meth:`list`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        mount: str = "secret",
        path_prefix: str = "agent-egress/",
        namespace: str | None = None,
        verify: bool | str = True,
        client: Any = None,
    ) -> None:
        self.url = url
        self.mount = mount.strip("/")
        prefix = path_prefix.strip("/")
        self.path_prefix = prefix + "/" if prefix else ""  # KV lists folders, so end in "/"
        if client is None:
            token = token or os.environ.get(TOKEN_ENV)
            if not token:
                raise VaultError(
                    f"no HashiCorp Vault token: set {TOKEN_ENV} (or the variable named by"
                    " vault.token_env) to a token that can use"
                    f" {self.mount}/data/{self.path_prefix}*"
                )
            # timeout bounds how long a hung server stalls a keyring refresh
            client = hvac.Client(
                url=url, token=token, namespace=namespace, verify=verify, timeout=10
            )
        self._kv: Any = client.secrets.kv.v2

    def get(self, name: str) -> str:
        validate_name(name)
        resp = self._call(
            "read", name, self._kv.read_secret_version,
            path=self._path(name), mount_point=self.mount, raise_on_deleted_version=True,
        )
        value = ((resp.get("data") or {}).get("data") or {}).get(VALUE_FIELD)
        if not isinstance(value, str) or not value:
            raise VaultError(
                f"{self._where(name)} has no string field {VALUE_FIELD!r}; store the key"
                f" with: agent-egress vault set {name}"
            )
        return value

    def set(self, name: str, value: str) -> SecretInfo:
        validate_name(name)
        if not value:
            raise ValueError("secret value is empty")
        self._call(
            "write", name, self._kv.create_or_update_secret,
            path=self._path(name), secret={VALUE_FIELD: value}, mount_point=self.mount,
        )
        try:
            return self._info(name, fingerprint(value))
        except SecretNotFound:  # a KV v1 mount takes the write at ".../data/..." literally
            raise VaultError(
                f"wrote {self._where(name)} but it has no KV v2 metadata: {self.mount!r} is"
                f" not a KV version 2 mount; enable one with"
                f" `vault secrets enable -version=2 -path={self.mount} kv`"
            ) from None

    def delete(self, name: str) -> None:
        validate_name(name)
        self._metadata(name)  # Vault deletes a missing path silently; the contract says raise
        self._call(
            "delete", name, self._kv.delete_metadata_and_all_versions,
            path=self._path(name), mount_point=self.mount,
        )

    def list(self) -> builtins.list[SecretInfo]:
        try:
            resp = self._call(
                "list", None, self._kv.list_secrets, path=self.path_prefix, mount_point=self.mount
            )
        except SecretNotFound:  # Vault answers 404 for an empty folder
            return []
        infos = []
        for key in sorted(resp.get("data", {}).get("keys", [])):
            try:
                name = validate_name(key)  # sub-folders ("x/") and foreign names are skipped
                infos.append(self._info(name, fingerprint(self.get(name))))
            except (ValueError, SecretNotFound):  # soft-deleted, or deleted since listed
                continue
        return infos

    # -- Vault calls ---------------------------------------------------------

    def _path(self, name: str) -> str:
        return self.path_prefix + name

    def _where(self, name: str | None) -> str:
        return f"{self.url} {self.mount}/{self._path(name or '')}"

    def _metadata(self, name: str) -> dict[str, Any]:
        resp = self._call(
            "read metadata of", name, self._kv.read_secret_metadata,
            path=self._path(name), mount_point=self.mount,
        )
        data: dict[str, Any] = resp["data"]
        return data

    def _info(self, name: str, fp: str) -> SecretInfo:
        meta = self._metadata(name)
        try:
            created = _time(meta["created_time"])
            updated = _time(meta.get("updated_time") or meta["created_time"])
        except (KeyError, TypeError, ValueError):
            raise VaultError(f"{self._where(name)}: unreadable KV v2 metadata") from None
        return SecretInfo(name, fp, created, updated)

    def _call(self, what: str, name: str | None, fn: Any, **kwargs: Any) -> Any:
        """One KV request; 404 becomes SecretNotFound, the rest a VaultError with a fix."""
        where = self._where(name)
        try:
            return fn(**kwargs)
        except hvac_errors.InvalidPath:
            if name is None:
                raise SecretNotFound(self.path_prefix) from None
            raise SecretNotFound(name) from None
        except (hvac_errors.Forbidden, hvac_errors.Unauthorized) as exc:
            raise VaultError(
                f"HashiCorp Vault refused to {what} {where} ({_first(exc)}): the token is"
                f" invalid or expired, or its policy lacks create/read/update/delete/list on"
                f" {self.mount}/data/{self.path_prefix}* and {self.mount}/metadata/"
                f"{self.path_prefix}*; set {TOKEN_ENV} (or vault.token_env) to a valid token"
            ) from None
        except (hvac_errors.VaultDown, hvac_errors.VaultNotInitialized) as exc:
            raise VaultError(
                f"HashiCorp Vault at {self.url} is sealed, uninitialised or in standby"
                f" ({_first(exc)}); unseal it or point vault.url at the active node"
            ) from None
        except (hvac_errors.InvalidRequest, hvac_errors.UnsupportedOperation) as exc:
            raise VaultError(
                f"HashiCorp Vault rejected {what} {where} ({_first(exc)}); check that"
                f" {self.mount!r} is a KV version 2 mount"
            ) from None
        except hvac_errors.VaultError as exc:
            raise VaultError(
                f"HashiCorp Vault failed to {what} {where}: {type(exc).__name__}: {_first(exc)}"
            ) from None
        except OSError as exc:  # requests' errors, connection refused, TLS
            raise VaultError(
                f"cannot reach HashiCorp Vault at {self.url} ({type(exc).__name__});"
                " check vault.url, vault.verify (CA bundle) and network access"
            ) from None


def _first(exc: Any) -> str:
    """Vault's own error text; never request data, which Vault does not echo."""
    errors = getattr(exc, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)[:200]
    return str(exc.args[0] if exc.args else type(exc).__name__)[:200] or "no detail"


def _time(text: str) -> datetime:
    """RFC 3339 from Vault; fromisoformat truncates its nanoseconds to microseconds."""
    return datetime.fromisoformat(text)

"""Provider keys in AWS Secrets Manager, for replicas that share one vault.

Secret id = ``prefix + name``; the value is the SecretString. Credentials come
from the standard AWS chain (env, profile, SSO, container or instance role), so
nothing here ever holds an AWS key. Every AWS failure becomes
:class:`SecretNotFound` or a :class:`VaultError` that says what to fix; no
message carries a secret value.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from .base import SecretInfo, SecretNotFound, Vault, VaultError, fingerprint, validate_name

_log = logging.getLogger("agent_egress.vault")

# Bounded so a hung endpoint stalls a keyring refresh for seconds, not minutes.
_CONFIG = Config(
    connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 3}
)

_CREDENTIALS = (
    "AWS rejected the gateway's credentials ({code}); check AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance/task role, and that they are not expired"
)
_HINTS = {
    "AccessDeniedException": "grant the gateway's IAM identity secretsmanager:{action} on"
    " {resource}",
    "DecryptionFailure": "the secret's KMS key refused to decrypt; grant kms:Decrypt on it",
    "KMSAccessDeniedException": "grant the gateway's IAM identity kms:Decrypt/kms:GenerateDataKey"
    " on the secret's KMS key",
    "UnrecognizedClientException": _CREDENTIALS,
    "InvalidClientTokenId": _CREDENTIALS,
    "InvalidSignatureException": _CREDENTIALS,
    "ExpiredTokenException": _CREDENTIALS,
    "ThrottlingException": "Secrets Manager is throttling; raise vault.refresh_seconds",
}


class AwsSecretsManagerVault(Vault):
    """Secrets Manager backend; ``delete`` schedules deletion, it does not purge.

    ``delete`` uses a recovery window (``recovery_window_days``, 7-30, default 7)
    and never ``ForceDeleteWithoutRecovery``: a mistaken delete of a provider key
    can be undone with ``aws secretsmanager restore-secret``. Setting a name that
    is scheduled for deletion restores it and stores the new value, so
    delete-then-set behaves as with the other backends.
    """

    def __init__(
        self,
        prefix: str = "agent-egress/",
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        recovery_window_days: int = 7,
        client: Any = None,
    ) -> None:
        if not 7 <= recovery_window_days <= 30:
            raise ValueError("recovery_window_days must be 7-30 (the Secrets Manager limits)")
        self.prefix = prefix
        self.recovery_window_days = recovery_window_days
        if client is None:
            try:
                client = boto3.session.Session().client(
                    "secretsmanager", region_name=region, endpoint_url=endpoint_url,
                    config=_CONFIG,
                )
            except NoRegionError:
                raise VaultError(
                    "no AWS region for Secrets Manager: set vault.region in the config,"
                    " or AWS_REGION / AWS_DEFAULT_REGION, or a region in the AWS profile"
                ) from None
        self._client: Any = client

    def get(self, name: str) -> str:
        validate_name(name)
        return self._value(name, self._id(name))

    def set(self, name: str, value: str) -> SecretInfo:
        validate_name(name)
        if not value:
            raise ValueError("secret value is empty")
        sid = self._id(name)
        try:
            self._call("CreateSecret", name, Name=sid, SecretString=value)
        except _AwsError as exc:
            # Taken: live (ResourceExists) or, on AWS, scheduled for deletion (InvalidRequest).
            if exc.code not in ("ResourceExistsException", "InvalidRequestException"):
                raise
            if self._describe(name).get("DeletedDate"):
                self._call("RestoreSecret", name, SecretId=sid)
            elif exc.code != "ResourceExistsException":
                raise
            self._call("PutSecretValue", name, SecretId=sid, SecretString=value)
        return _info(name, fingerprint(value), self._describe(name))

    def delete(self, name: str) -> None:
        validate_name(name)
        try:
            self._call(
                "DeleteSecret", name, SecretId=self._id(name),
                RecoveryWindowInDays=self.recovery_window_days,
            )
        except _AwsError as exc:
            if exc.code == "InvalidRequestException":
                self._raise_if_deleted(name)  # already scheduled: absent, for us
            raise

    def list(self) -> builtins.list[SecretInfo]:
        infos = []
        for entry in self._entries():
            name = entry["Name"][len(self.prefix):]
            try:
                value = self._value(name, entry["ARN"])
            except SecretNotFound:  # deleted since it was listed
                continue
            infos.append(_info(name, fingerprint(value), entry))
        return sorted(infos, key=lambda i: i.name)

    # -- AWS calls -----------------------------------------------------------

    def _id(self, name: str) -> str:
        return self.prefix + name

    def _entries(self) -> Iterator[dict[str, Any]]:
        """Our secrets not scheduled for deletion; the AWS name filter is a
        case-insensitive prefix match, so the prefix is re-checked exactly."""
        kwargs: dict[str, Any] = {"PaginationConfig": {"PageSize": 100}}
        if self.prefix:
            kwargs["Filters"] = [{"Key": "name", "Values": [self.prefix]}]
        try:
            for page in self._client.get_paginator("list_secrets").paginate(**kwargs):
                for entry in page.get("SecretList", []):
                    full = entry["Name"]
                    if not full.startswith(self.prefix) or entry.get("DeletedDate"):
                        continue
                    try:
                        validate_name(full[len(self.prefix):])
                    except ValueError:
                        _log.debug("skipping %r: not an agent-egress secret name", full)
                        continue
                    yield entry
        except (ClientError, BotoCoreError) as exc:
            raise self._error("ListSecrets", None, exc) from None

    def _value(self, name: str, sid: str) -> str:
        try:
            resp = self._call("GetSecretValue", name, SecretId=sid)
        except _AwsError as exc:
            if exc.code == "InvalidRequestException":
                self._raise_if_deleted(name)
            raise
        value = resp.get("SecretString")
        if not isinstance(value, str):
            raise VaultError(
                f"secret {self._id(name)!r} in Secrets Manager has no SecretString (binary?);"
                f" store it again with: agent-egress vault set {name}"
            )
        return value

    def _describe(self, name: str) -> dict[str, Any]:
        resp: dict[str, Any] = self._call("DescribeSecret", name, SecretId=self._id(name))
        return resp

    def _raise_if_deleted(self, name: str) -> None:
        if self._describe(name).get("DeletedDate"):
            raise SecretNotFound(name)

    def _call(self, action: str, name: str, **params: Any) -> Any:
        """One API call; ResourceNotFound becomes SecretNotFound, the rest _AwsError."""
        method = getattr(self._client, _snake(action))
        try:
            return method(**params)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                raise SecretNotFound(name) from None
            raise self._error(action, name, exc, params.get("SecretString")) from None
        except BotoCoreError as exc:
            raise self._error(action, name, exc) from None

    def _error(
        self, action: str, name: str | None, exc: Exception, secret: str | None = None
    ) -> _AwsError:
        target = f" {self._id(name)!r}" if name is not None else f" under {self.prefix!r}"
        what = f"Secrets Manager {action}{target} failed"
        code = ""
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            detail = ("no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                      " or AWS_PROFILE, or run with an instance/task role")
        elif isinstance(exc, EndpointConnectionError):
            detail = (f"cannot reach {self._client.meta.endpoint_url}; check vault.region,"
                      " vault.endpoint_url and network access to Secrets Manager")
        elif isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "Unknown"))
            # ListSecrets takes no resource-level permissions; the rest are per secret
            resource = ("Resource *" if action == "ListSecrets"
                        else f"arn:aws:secretsmanager:*:*:secret:{self.prefix}*")
            detail = f"{code}: " + _HINTS.get(code, "{message}").format(
                action=action, resource=resource, code=code, message=err.get("Message", "")
            )
        else:
            detail = f"{type(exc).__name__}: {exc}"
        if secret:  # AWS does not echo values, but never risk it
            detail = detail.replace(secret, "<redacted>")
        return _AwsError(f"{what}: {detail}", code)


class _AwsError(VaultError):
    """A VaultError that remembers the AWS error code, for the few we handle."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _snake(action: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in action).lstrip("_")


def _info(name: str, fp: str, meta: dict[str, Any]) -> SecretInfo:
    created: datetime = meta["CreatedDate"]
    updated: datetime = meta.get("LastChangedDate") or created
    return SecretInfo(name, fp, created, updated)

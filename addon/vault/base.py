"""Vault interface and the master key every backend and the token store derive from.

Provider API keys live only in a vault so developers never hold them. Backends
hand out a secret's value only from :meth:`Vault.get`; everything else deals in
:class:`SecretInfo`, whose fingerprint lets an operator confirm which key is
stored without anything ever printing it.
"""

from __future__ import annotations

import abc
import base64
import binascii
import builtins
import hashlib
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_ENV = "AGENT_EGRESS_MASTER_KEY"
MASTER_KEY_FILE = "master.key"
KEY_BYTES = 32

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_log = logging.getLogger("agent_egress.vault")


class VaultError(Exception):
    """The vault is there but unusable: wrong master key, corrupt or tampered file."""


class SecretNotFound(KeyError):
    """No secret of that name; carries the name only, never a value."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:  # KeyError's default would repr() the message
        return f"no secret named {self.name!r} in the vault"


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown about a secret: deliberately has no value field."""

    name: str
    fingerprint: str
    created_at: datetime
    updated_at: datetime


def validate_name(name: str) -> str:
    """Return ``name`` if valid; names end up in file keys, AAD, CLIs and logs.

    The error does not echo the name: a pasted API key is a common wrong argument.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid secret name ({len(name)} characters): use 1-64 of A-Z a-z 0-9 _ . -,"
            " starting with a letter or digit"
        )
    return name


def fingerprint(value: str) -> str:
    """Short SHA-256 so an operator can check ``printf %s "$KEY" | sha256sum``."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]


class Vault(abc.ABC):
    """Named secrets; sync because backends are local files or quick RPCs."""

    @abc.abstractmethod
    def get(self, name: str) -> str:
        """Return the value; raise :class:`SecretNotFound` if absent."""

    @abc.abstractmethod
    def set(self, name: str, value: str) -> SecretInfo:
        """Create or replace a secret."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove a secret; raise :class:`SecretNotFound` if absent."""

    @abc.abstractmethod
    def list(self) -> builtins.list[SecretInfo]:
        """All secrets' metadata, sorted by name; never values."""


@dataclass(frozen=True)
class MasterKey:
    """The key-encryption key, plus where it came from (for startup logs)."""

    key: bytes = field(repr=False)
    source: str


def derive_key(master: bytes, purpose: str) -> bytes:
    """A 32-byte subkey per purpose, so one leaked derived key exposes nothing else."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=b"agent-egress/" + purpose.encode(),
    )
    return hkdf.derive(master)


def load_master_key(home: Path, environ: Mapping[str, str] = os.environ) -> MasterKey:
    """The env var (production: from a secret manager) wins; else a local key file.

    The file is generated on first use so a laptop setup works with no steps,
    with a warning because a key stored beside the vault protects little.
    """
    if MASTER_KEY_ENV in environ:
        key = _decode_key(environ[MASTER_KEY_ENV])
        if key is None:
            raise ValueError(
                f"{MASTER_KEY_ENV} must be base64 (standard or urlsafe) of exactly"
                f" {KEY_BYTES} bytes; generate one with: openssl rand -base64 {KEY_BYTES}"
            )
        return MasterKey(key, f"env:{MASTER_KEY_ENV}")

    path = home / MASTER_KEY_FILE
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    key = os.urandom(KEY_BYTES)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())
    _log.warning(
        "generated a master key at %s; for production set %s from your secret manager"
        " and remove the file",
        path,
        MASTER_KEY_ENV,
    )
    return MasterKey(key, f"file:{path}")


def _read_key_file(path: Path) -> MasterKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        _log.warning(
            "master key file %s is readable by group/others (mode %o); run: chmod 600 %s",
            path,
            mode,
            path,
        )
    key = _decode_key(path.read_text())
    if key is None:
        raise ValueError(
            f"{path} must hold base64 of exactly {KEY_BYTES} bytes; restore it from backup"
        )
    return MasterKey(key, f"file:{path}")


def _decode_key(text: str) -> bytes | None:
    """Accept standard or urlsafe base64, padded or not; None rather than an echoing error."""
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        key = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == KEY_BYTES else None

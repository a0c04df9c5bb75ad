"""Embedded default vault: one envelope-encrypted JSON file.

Each secret has its own random data key (DEK), wrapped by the master key, so the
file alone reveals nothing and a master key rotation only re-wraps DEKs. The
AAD binds each ciphertext and DEK to the secret's name, so swapping entries in
the file is detected. The file is re-read on every call: the CLI writes it while
a separate gateway process reads it.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .base import (
    KEY_BYTES,
    MASTER_KEY_ENV,
    SecretInfo,
    SecretNotFound,
    Vault,
    VaultError,
    fingerprint,
    validate_name,
)

_VERSION = 1
_NONCE_BYTES = 12
_DEK_AAD = b"agent-egress/dek/"
_CHECK_AAD = b"agent-egress/kek-check"
_CHECK_PLAINTEXT = b"agent-egress kek check v1"


@dataclass(frozen=True)
class _Record:
    wrapped_dek: bytes
    dek_nonce: bytes
    nonce: bytes
    ciphertext: bytes
    fingerprint: str
    created_at: datetime
    updated_at: datetime

    def info(self, name: str) -> SecretInfo:
        return SecretInfo(name, self.fingerprint, self.created_at, self.updated_at)


class FileVault(Vault):
    """AES-256-GCM envelope encryption in a 0600 file, written atomically."""

    def __init__(self, path: Path, master_key: bytes) -> None:
        if len(master_key) != KEY_BYTES:
            raise ValueError(f"master key must be {KEY_BYTES} bytes")
        self.path = path
        self._kek = AESGCM(master_key)

    def get(self, name: str) -> str:
        validate_name(name)
        record = self._load().get(name)
        if record is None:
            raise SecretNotFound(name)
        try:
            dek = self._kek.decrypt(record.dek_nonce, record.wrapped_dek, _DEK_AAD + name.encode())
            value = AESGCM(dek).decrypt(record.nonce, record.ciphertext, name.encode()).decode()
        except (InvalidTag, ValueError):
            raise self._corrupt(f"secret {name!r} fails authentication") from None
        if fingerprint(value) != record.fingerprint:
            raise self._corrupt(f"secret {name!r} does not match its fingerprint")
        return value

    def set(self, name: str, value: str) -> SecretInfo:
        validate_name(name)
        if not value:
            raise ValueError("secret value is empty")
        dek = AESGCM.generate_key(256)
        dek_nonce, nonce = os.urandom(_NONCE_BYTES), os.urandom(_NONCE_BYTES)
        with self._locked():
            records = self._load()
            now = datetime.now(UTC)
            old = records.get(name)
            records[name] = record = _Record(
                wrapped_dek=self._kek.encrypt(dek_nonce, dek, _DEK_AAD + name.encode()),
                dek_nonce=dek_nonce,
                nonce=nonce,
                ciphertext=AESGCM(dek).encrypt(nonce, value.encode(), name.encode()),
                fingerprint=fingerprint(value),
                created_at=old.created_at if old else now,
                updated_at=now,
            )
            self._store(records)
        return record.info(name)

    def delete(self, name: str) -> None:
        validate_name(name)
        with self._locked():
            records = self._load()
            if records.pop(name, None) is None:
                raise SecretNotFound(name)
            self._store(records)

    def list(self) -> builtins.list[SecretInfo]:
        return [record.info(name) for name, record in sorted(self._load().items())]

    def rotate_kek(self, new_master_key: bytes) -> int:
        """Re-wrap every DEK under ``new_master_key``; values are not re-encrypted.

        All-or-nothing: every DEK is unwrapped (and so authenticated) before one
        atomic file replace, so a failure leaves the vault readable with the old
        key. Afterwards only the new key opens the file. Returns the count re-wrapped.
        """
        successor = FileVault(self.path, new_master_key)
        with self._locked():
            records = {}
            for name, record in self._load().items():
                aad = _DEK_AAD + name.encode()
                try:
                    dek = self._kek.decrypt(record.dek_nonce, record.wrapped_dek, aad)
                except (InvalidTag, ValueError):
                    raise self._corrupt(f"secret {name!r} fails authentication") from None
                dek_nonce = os.urandom(_NONCE_BYTES)
                records[name] = replace(
                    record,
                    wrapped_dek=successor._kek.encrypt(dek_nonce, dek, aad),
                    dek_nonce=dek_nonce,
                )
            successor._store(records)
        self._kek = successor._kek
        return len(records)

    # -- file handling -------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write across processes; readers need no lock."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, _Record]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            if doc.get("version") != _VERSION:
                raise VaultError(
                    f"{self.path} has unsupported version {doc.get('version')!r};"
                    " upgrade agent-egress to read it"
                )
            check = doc["kek_check"]
            nonce, ciphertext = _unb64(check["nonce"]), _unb64(check["ciphertext"])
            records = {validate_name(n): _parse(e) for n, e in doc["secrets"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._corrupt(f"{type(exc).__name__}: {exc}") from None
        try:
            ok = self._kek.decrypt(nonce, ciphertext, _CHECK_AAD) == _CHECK_PLAINTEXT
        except (InvalidTag, ValueError):
            ok = False
        if not ok:
            raise VaultError(
                f"cannot decrypt {self.path}: wrong master key? {MASTER_KEY_ENV} (or the"
                f" master.key file) differs from the one that wrote {self.path}."
                " Use that key, or restore the vault from backup."
            )
        return records

    def _store(self, records: dict[str, _Record]) -> None:
        check_nonce = os.urandom(_NONCE_BYTES)
        doc = {
            "version": _VERSION,
            "kek_check": {
                "nonce": _b64(check_nonce),
                "ciphertext": _b64(self._kek.encrypt(check_nonce, _CHECK_PLAINTEXT, _CHECK_AAD)),
            },
            "secrets": {name: _dump(records[name]) for name in sorted(records)},
        }
        _atomic_write(self.path, json.dumps(doc, indent=2).encode() + b"\n")

    def _corrupt(self, detail: str) -> VaultError:
        return VaultError(
            f"vault file {self.path} is corrupt or was tampered with ({detail});"
            " restore it from backup or set the affected secrets again"
        )


def generate_master_key() -> str:
    """A new master key as the base64 text ``AGENT_EGRESS_MASTER_KEY`` expects."""
    return _b64(os.urandom(KEY_BYTES))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected a base64 string")
    return base64.b64decode(text, validate=True)


def _parse(entry: Any) -> _Record:
    return _Record(
        wrapped_dek=_unb64(entry["wrapped_dek"]),
        dek_nonce=_unb64(entry["dek_nonce"]),
        nonce=_unb64(entry["nonce"]),
        ciphertext=_unb64(entry["ciphertext"]),
        fingerprint=str(entry["fingerprint"]),
        created_at=datetime.fromisoformat(entry["created_at"]),
        updated_at=datetime.fromisoformat(entry["updated_at"]),
    )


def _dump(record: _Record) -> dict[str, str]:
    return {
        "wrapped_dek": _b64(record.wrapped_dek),
        "dek_nonce": _b64(record.dek_nonce),
        "nonce": _b64(record.nonce),
        "ciphertext": _b64(record.ciphertext),
        "fingerprint": record.fingerprint,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file (mkstemp: mode 0600) + fsync + rename + dir fsync: never a torn vault."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

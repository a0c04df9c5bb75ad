"""FileVault and master key handling, against real files and real crypto."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from agent_egress.addon.vault import (
    MASTER_KEY_ENV,
    FileVault,
    SecretNotFound,
    VaultError,
    derive_key,
    load_master_key,
)

VALUE = "sk-proj-THIS-IS-A-TEST-VALUE-0123456789abcdef"


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vault" / "secrets.json"


@pytest.fixture
def vault(path: Path, key: bytes) -> FileVault:
    return FileVault(path, key)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_round_trip(vault: FileVault) -> None:
    info = vault.set("openai", VALUE)
    assert info.name == "openai"
    assert info.fingerprint == "sha256:" + hashlib.sha256(VALUE.encode()).hexdigest()[:12]
    vault.set("anthropic", "other")
    assert vault.get("openai") == VALUE
    assert [i.name for i in vault.list()] == ["anthropic", "openai"]

    replaced = vault.set("openai", VALUE + "2")
    assert vault.get("openai") == VALUE + "2"
    assert replaced.created_at == info.created_at
    assert replaced.updated_at >= info.updated_at
    assert replaced.fingerprint != info.fingerprint

    vault.delete("openai")
    with pytest.raises(SecretNotFound, match="openai"):
        vault.get("openai")
    with pytest.raises(SecretNotFound):
        vault.delete("openai")
    assert [i.name for i in vault.list()] == ["anthropic"]


def test_missing_file_is_empty_and_reads_create_nothing(vault: FileVault, path: Path) -> None:
    assert vault.list() == []
    with pytest.raises(SecretNotFound):
        vault.get("openai")
    assert not path.exists()


def test_file_is_private_and_holds_no_plaintext(vault: FileVault, path: Path) -> None:
    vault.set("openai", VALUE)
    assert mode(path) == 0o600
    raw = path.read_bytes()
    assert VALUE.encode() not in raw
    assert b"THIS-IS-A-TEST" not in raw
    assert base64.b64encode(VALUE.encode()) not in raw
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def _tamper(path: Path, name: str, field: str) -> None:
    doc = json.loads(path.read_text())
    data = bytearray(base64.b64decode(doc["secrets"][name][field]))
    data[0] ^= 0x01
    doc["secrets"][name][field] = base64.b64encode(bytes(data)).decode()
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_dek", "nonce", "dek_nonce"])
def test_tampering_is_detected(vault: FileVault, path: Path, field: str) -> None:
    vault.set("openai", VALUE)
    _tamper(path, "openai", field)
    with pytest.raises(VaultError, match="tampered"):
        vault.get("openai")


def test_entries_are_bound_to_their_names(vault: FileVault, path: Path) -> None:
    vault.set("openai", VALUE)
    vault.set("anthropic", "other")
    doc = json.loads(path.read_text())
    doc["secrets"]["anthropic"] = doc["secrets"]["openai"]
    path.write_text(json.dumps(doc))
    with pytest.raises(VaultError):
        vault.get("anthropic")


def test_garbage_file_is_a_vault_error(vault: FileVault, path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(VaultError, match="restore it from backup"):
        vault.list()


def test_wrong_master_key_is_explained(vault: FileVault, path: Path) -> None:
    vault.set("openai", VALUE)
    before = path.read_bytes()
    other = FileVault(path, os.urandom(32))
    for call in (other.list, lambda: other.get("openai"), lambda: other.set("x", "y")):
        with pytest.raises(VaultError) as exc:
            call()
        assert "wrong master key?" in str(exc.value)
        assert MASTER_KEY_ENV in str(exc.value)
        assert str(path) in str(exc.value)
    assert path.read_bytes() == before


def test_two_instances_share_one_file(path: Path, key: bytes) -> None:
    cli, gateway = FileVault(path, key), FileVault(path, key)
    assert gateway.list() == []
    cli.set("openai", VALUE)
    assert gateway.get("openai") == VALUE
    gateway.set("anthropic", "other")
    cli.delete("openai")
    assert [i.name for i in gateway.list()] == ["anthropic"]
    assert cli.get("anthropic") == "other"


def test_list_never_exposes_values(vault: FileVault) -> None:
    vault.set("openai", VALUE)
    (info,) = vault.list()
    assert {f.name for f in dataclasses.fields(info)} == {
        "name",
        "fingerprint",
        "created_at",
        "updated_at",
    }
    assert VALUE not in repr(info)


@pytest.mark.parametrize(
    "name", ["", "-lead", ".lead", "_lead", "a" * 65, "a b", "a/b", "../x", "é", "ok\n"]
)
def test_invalid_names_are_rejected(vault: FileVault, name: str) -> None:
    for call in (lambda: vault.set(name, "v"), lambda: vault.get(name), lambda: vault.delete(name)):
        with pytest.raises(ValueError, match="invalid secret name"):
            call()


@pytest.mark.parametrize("name", ["a", "a" * 64, "OPENAI_API_KEY", "openai.prod-1", "9x"])
def test_valid_names(vault: FileVault, name: str) -> None:
    vault.set(name, "v")
    assert vault.get(name) == "v"


def test_empty_value_is_rejected(vault: FileVault) -> None:
    with pytest.raises(ValueError, match="empty"):
        vault.set("openai", "")


# -- master key -------------------------------------------------------------


def test_master_key_is_generated_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "home"
    with caplog.at_level(logging.WARNING, logger="agent_egress.vault"):
        first = load_master_key(home, environ={})
    key_file = home / "master.key"
    assert len(first.key) == 32
    assert first.source == f"file:{key_file}"
    assert mode(home) == 0o700
    assert mode(key_file) == 0o600
    (record,) = caplog.records
    assert "generated a master key" in record.getMessage()
    assert str(key_file) in record.getMessage()
    assert MASTER_KEY_ENV in record.getMessage()
    assert first.key.hex() not in repr(first)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent_egress.vault"):
        assert load_master_key(home, environ={}).key == first.key
    assert caplog.records == []


def test_loose_key_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_master_key(tmp_path, environ={})
    (tmp_path / "master.key").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="agent_egress.vault"):
        load_master_key(tmp_path, environ={})
    assert "chmod 600" in caplog.text


def test_env_var_wins(tmp_path: Path) -> None:
    raw = b"\xfb\xff" * 16  # encodes with + and / (standard) or - and _ (urlsafe)
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")):
        got = load_master_key(tmp_path, environ={MASTER_KEY_ENV: encoded.decode() + "\n"})
        assert got.key == raw
        assert got.source == f"env:{MASTER_KEY_ENV}"
    assert not (tmp_path / "master.key").exists()


@pytest.mark.parametrize(
    "bad",
    ["", "not base64 at all!!", base64.b64encode(b"s3cr3t-short-key").decode()],
)
def test_bad_env_var_is_named_not_echoed(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError) as exc:
        load_master_key(tmp_path, environ={MASTER_KEY_ENV: bad})
    assert MASTER_KEY_ENV in str(exc.value)
    if bad:
        assert bad not in str(exc.value)
    assert exc.value.__cause__ is None
    assert exc.value.__context__ is None


def test_derive_key() -> None:
    master = os.urandom(32)
    token_key = derive_key(master, "token-hash")
    assert len(token_key) == 32
    assert token_key == derive_key(master, "token-hash")
    assert token_key != derive_key(master, "other")
    assert token_key != derive_key(os.urandom(32), "token-hash")
    assert token_key != master

"""The keys that hash gateway and admin tokens, kept in the vault.

Only keyed hashes of tokens are stored, so this key must outlive any master-key
rotation: it lives in the vault as an ordinary secret (re-wrapped, not changed,
by `vault rotate-kek`). First use seeds it from the master key when there is one
(so tokens issued before this existed stay valid), else from random bytes.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .vault import SecretNotFound, Vault, derive_key, load_master_key
from .vault.spec import FileVaultSpec, VaultSpec

TOKEN_HASH_SECRET = "gateway.token-hash-key"  # noqa: S105 - a secret's name
ADMIN_HASH_SECRET = "gateway.admin-token-hash-key"  # noqa: S105 - a secret's name


@dataclass(frozen=True)
class HashKeys:
    token: bytes
    admin: bytes


def _load(vault: Vault, name: str, seed: bytes | None) -> bytes:
    try:
        return base64.b64decode(vault.get(name))
    except SecretNotFound:
        value = seed or secrets.token_bytes(32)
        vault.set(name, base64.b64encode(value).decode())
        # Another replica may have raced us: whatever the vault holds now wins.
        return base64.b64decode(vault.get(name))


def load_hash_keys(vault: Vault, spec: VaultSpec, home: Path) -> HashKeys:
    master: bytes | None = None
    if isinstance(spec, FileVaultSpec) or os.environ.get("AGENT_EGRESS_MASTER_KEY"):
        master = load_master_key(home).key
    return HashKeys(
        token=_load(vault, TOKEN_HASH_SECRET,
                    derive_key(master, "token-hash") if master else None),
        admin=_load(vault, ADMIN_HASH_SECRET,
                    derive_key(master, "admin-token-hash") if master else None),
    )

"""Where provider API keys live; the gateway holds them in memory only."""

from .base import (
    MASTER_KEY_ENV,
    MasterKey,
    SecretInfo,
    SecretNotFound,
    Vault,
    VaultError,
    derive_key,
    fingerprint,
    load_master_key,
    validate_name,
)
from .file import FileVault

__all__ = [
    "MASTER_KEY_ENV",
    "FileVault",
    "MasterKey",
    "SecretInfo",
    "SecretNotFound",
    "Vault",
    "VaultError",
    "derive_key",
    "fingerprint",
    "load_master_key",
    "validate_name",
]

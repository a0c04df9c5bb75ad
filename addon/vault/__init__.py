"""Where provider API keys live; the gateway holds them in memory only."""

from .aws import AwsSecretsManagerVault
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
from .file import FileVault, generate_master_key
from .hashicorp import HashiCorpVault
from .spec import (
    AwsVaultSpec,
    FileVaultSpec,
    HashiCorpVaultSpec,
    VaultSpec,
    open_vault,
    parse_vault_spec,
)

__all__ = [
    "MASTER_KEY_ENV",
    "AwsSecretsManagerVault",
    "AwsVaultSpec",
    "FileVault",
    "FileVaultSpec",
    "HashiCorpVault",
    "HashiCorpVaultSpec",
    "MasterKey",
    "SecretInfo",
    "SecretNotFound",
    "Vault",
    "VaultError",
    "VaultSpec",
    "derive_key",
    "fingerprint",
    "generate_master_key",
    "load_master_key",
    "open_vault",
    "parse_vault_spec",
    "validate_name",
]

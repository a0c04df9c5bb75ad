"""Where provider API keys live; the gateway holds them in memory only.

The AWS and HashiCorp backends (``.aws``, ``.hashicorp``) are imported only when
configured: boto3 and hvac cost memory in every gateway that does not use them.
"""

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
    "AwsVaultSpec",
    "FileVault",
    "FileVaultSpec",
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

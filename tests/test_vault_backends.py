"""Vault backends over real protocols: AWS via moto's HTTP server, HashiCorp KV v2
via real hvac against tests/kv2_server.py, FileVault KEK rotation on real files;
plus the ``vault:`` config spec and one contract every backend must meet."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import hvac
import pytest
from botocore.config import Config
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer
from pydantic import BaseModel, Field, ValidationError

from agent_egress.addon.vault import (
    MASTER_KEY_ENV,
    AwsVaultSpec,
    FileVault,
    FileVaultSpec,
    HashiCorpVaultSpec,
    SecretInfo,
    SecretNotFound,
    Vault,
    VaultError,
    VaultSpec,
    fingerprint,
    generate_master_key,
    load_master_key,
    open_vault,
    parse_vault_spec,
)
from agent_egress.addon.vault.aws import AwsSecretsManagerVault
from agent_egress.addon.vault.hashicorp import HashiCorpVault

sys.path.insert(0, str(Path(__file__).parent))
from kv2_server import KV2Server

VALUE = "sk-proj-THIS-IS-A-TEST-VALUE-0123456789abcdef"
VALUE2 = "sk-proj-ROTATED-TEST-VALUE-fedcba9876543210"
OTHER = "sk-ant-unicode-ключ-✓"
REGION = "us-east-1"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake static credentials, and nothing else from the AWS chain (no profile, no IMDS)."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}/"  # moto's state is per server: isolate each test


@pytest.fixture
def aws_vault(aws_env: None, moto_url: str, prefix: str) -> AwsSecretsManagerVault:
    return AwsSecretsManagerVault(prefix, region=REGION, endpoint_url=moto_url)


@pytest.fixture
def sm(aws_env: None, moto_url: str) -> Any:
    """A raw boto3 client on the same server, to see what the backend really did."""
    return boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_url)


@pytest.fixture
def kv2() -> Iterator[KV2Server]:
    with KV2Server() as server:
        yield server


@pytest.fixture
def hashicorp_vault(kv2: KV2Server) -> HashiCorpVault:
    return HashiCorpVault(kv2.url, token=kv2.token)


@pytest.fixture
def file_vault(tmp_path: Path) -> FileVault:
    return FileVault(tmp_path / "vault.json", os.urandom(32))


# -- the contract every backend meets -----------------------------------------


def check_contract(vault: Vault) -> None:
    assert vault.list() == []
    with pytest.raises(SecretNotFound, match="openai"):
        vault.get("openai")
    with pytest.raises(SecretNotFound):
        vault.delete("openai")
    with pytest.raises(ValueError, match="invalid secret name"):
        vault.set("../openai", VALUE)
    with pytest.raises(ValueError, match="empty"):
        vault.set("openai", "")

    info = vault.set("openai", VALUE)
    assert (info.name, info.fingerprint) == ("openai", fingerprint(VALUE))
    assert info.created_at.tzinfo is not None and info.updated_at >= info.created_at
    vault.set("anthropic", OTHER)
    assert vault.get("openai") == VALUE
    assert vault.get("anthropic") == OTHER

    listed = vault.list()
    assert [(i.name, i.fingerprint) for i in listed] == [
        ("anthropic", fingerprint(OTHER)), ("openai", fingerprint(VALUE))
    ]
    assert all(type(i) is SecretInfo for i in listed)
    assert VALUE not in repr(listed) and OTHER not in repr(listed)

    replaced = vault.set("openai", VALUE2)
    assert replaced.created_at == info.created_at
    assert replaced.updated_at >= info.updated_at
    assert replaced.fingerprint == fingerprint(VALUE2)
    assert vault.get("openai") == VALUE2
    (after,) = [i for i in vault.list() if i.name == "openai"]
    assert (after.fingerprint, after.created_at) == (fingerprint(VALUE2), info.created_at)

    vault.delete("openai")
    with pytest.raises(SecretNotFound):
        vault.get("openai")
    with pytest.raises(SecretNotFound):
        vault.delete("openai")
    assert [i.name for i in vault.list()] == ["anthropic"]

    vault.set("openai", VALUE)  # a deleted name can be set again
    # what the keyring does every refresh_seconds
    assert {i.name: vault.get(i.name) for i in vault.list()} == {
        "anthropic": OTHER, "openai": VALUE
    }


@pytest.mark.parametrize("backend", ["file_vault", "aws_vault", "hashicorp_vault"])
def test_contract(backend: str, request: pytest.FixtureRequest) -> None:
    check_contract(request.getfixturevalue(backend))


@pytest.mark.skipif(
    not (os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN")),
    reason="live HashiCorp Vault: set VAULT_ADDR and VAULT_TOKEN (KV v2 mount in"
    " VAULT_KV_MOUNT, default 'secret') to run the contract against a real server",
)
def test_contract_live_hashicorp() -> None:
    vault = HashiCorpVault(
        os.environ["VAULT_ADDR"],
        token=os.environ["VAULT_TOKEN"],
        mount=os.environ.get("VAULT_KV_MOUNT", "secret"),
        path_prefix=f"agent-egress-test/{uuid.uuid4().hex}/",
        namespace=os.environ.get("VAULT_NAMESPACE"),
        verify=os.environ.get("VAULT_CACERT") or True,
    )
    try:
        check_contract(vault)
    finally:
        for info in vault.list():
            vault.delete(info.name)


# -- AWS Secrets Manager -------------------------------------------------------


def test_aws_stores_under_prefix_and_deletes_with_recovery_window(
    aws_env: None, moto_url: str, prefix: str, sm: Any
) -> None:
    vault = AwsSecretsManagerVault(
        prefix, region=REGION, endpoint_url=moto_url, recovery_window_days=10
    )
    vault.set("openai", VALUE)
    got = sm.get_secret_value(SecretId=prefix + "openai")
    assert got["SecretString"] == VALUE

    vault.delete("openai")
    meta = sm.describe_secret(SecretId=prefix + "openai")  # still there: recoverable
    window = meta["DeletedDate"] - datetime.now(UTC)
    assert timedelta(days=9) < window <= timedelta(days=10, minutes=1)
    sm.restore_secret(SecretId=prefix + "openai")
    assert vault.get("openai") == VALUE

    with pytest.raises(ValueError, match="7-30"):
        AwsSecretsManagerVault(prefix, region=REGION, endpoint_url=moto_url,
                               recovery_window_days=3)


def test_aws_list_paginates_and_keeps_to_its_prefix(
    aws_vault: AwsSecretsManagerVault, prefix: str, sm: Any
) -> None:
    for i in range(120):  # > the 100-per-page maximum
        sm.create_secret(Name=f"{prefix}key{i:03d}", SecretString=f"{VALUE}-{i}")
    sm.create_secret(Name=f"{prefix}sub/nested", SecretString=VALUE)  # not a valid name
    sm.create_secret(Name=f"{prefix.upper()}shouted", SecretString=VALUE)  # filter ignores case
    sm.create_secret(Name=f"other-{prefix}key000", SecretString=VALUE)
    sm.delete_secret(SecretId=f"{prefix}key119", RecoveryWindowInDays=7)

    listed = aws_vault.list()
    assert [i.name for i in listed] == [f"key{i:03d}" for i in range(119)]
    assert listed[7].fingerprint == fingerprint(f"{VALUE}-7")
    assert VALUE not in repr(listed)


def test_aws_not_found_and_binary(aws_vault: AwsSecretsManagerVault, prefix: str, sm: Any
                                  ) -> None:
    with pytest.raises(SecretNotFound) as exc:
        aws_vault.get("missing")
    assert str(exc.value) == "no secret named 'missing' in the vault"
    sm.create_secret(Name=prefix + "binary", SecretBinary=b"\x00\x01")
    with pytest.raises(VaultError, match="no SecretString"):
        aws_vault.get("binary")


def test_aws_without_credentials_says_what_to_set(
    aws_env: None, moto_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    vault = AwsSecretsManagerVault(prefix, region=REGION, endpoint_url=moto_url)
    with pytest.raises(VaultError, match="no AWS credentials found") as exc:
        vault.set("openai", VALUE)
    assert VALUE not in str(exc.value) and "AWS_PROFILE" in str(exc.value)
    with pytest.raises(VaultError, match=r"ListSecrets.*no AWS credentials"):
        vault.list()


def test_aws_without_region_says_what_to_set(aws_env: None) -> None:
    with pytest.raises(VaultError, match=r"no AWS region.*vault\.region.*AWS_REGION"):
        AwsSecretsManagerVault()


def test_aws_unreachable_endpoint(aws_env: None) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=url,
                          config=Config(retries={"max_attempts": 1}))
    with pytest.raises(VaultError, match=r"cannot reach http://127\.0\.0\.1"):
        AwsSecretsManagerVault(client=client).get("openai")


@pytest.mark.parametrize(("code", "message", "expect"), [
    ("AccessDeniedException", "User: arn:aws:iam::1:user/x is not authorized",
     r"AccessDeniedException: grant .* secretsmanager:GetSecretValue on"
     r" arn:aws:secretsmanager:\*:\*:secret:agent-egress/\*"),
    ("UnrecognizedClientException", "The security token included in the request is invalid",
     "rejected the gateway's credentials"),
    ("ExpiredTokenException", "expired", "not expired"),
    ("DecryptionFailure", "kms", "kms:Decrypt"),
    ("InternalServiceError", "try again", "InternalServiceError: try again"),
])
def test_aws_error_messages_say_what_to_do(aws_env: None, code: str, message: str, expect: str
                                           ) -> None:
    client = boto3.client("secretsmanager", region_name=REGION)
    with Stubber(client) as stub:
        stub.add_client_error("get_secret_value", code, message)
        with pytest.raises(VaultError, match=expect) as exc:
            AwsSecretsManagerVault(client=client).get("openai")
    assert "'agent-egress/openai'" in str(exc.value)


def test_aws_list_denied_names_the_permission(aws_env: None) -> None:
    client = boto3.client("secretsmanager", region_name=REGION)
    with Stubber(client) as stub:
        stub.add_client_error("list_secrets", "AccessDeniedException", "not authorized")
        with pytest.raises(VaultError, match=r"secretsmanager:ListSecrets on Resource \*"):
            AwsSecretsManagerVault(client=client).list()


def test_aws_errors_never_echo_the_value(aws_env: None) -> None:
    client = boto3.client("secretsmanager", region_name=REGION)
    with Stubber(client) as stub:
        stub.add_client_error("create_secret", "ValidationException", f"bad value {VALUE}")
        with pytest.raises(VaultError) as exc:
            AwsSecretsManagerVault(client=client).set("openai", VALUE)
    assert VALUE not in str(exc.value) and "<redacted>" in str(exc.value)


# -- HashiCorp Vault KV v2 -----------------------------------------------------


def test_hashicorp_speaks_documented_kv2(kv2: KV2Server, hashicorp_vault: HashiCorpVault
                                         ) -> None:
    hashicorp_vault.set("openai", VALUE)
    hashicorp_vault.get("openai")
    hashicorp_vault.list()
    hashicorp_vault.delete("openai")
    assert [(r.method, r.path) for r in kv2.requests] == [
        ("POST", "/v1/secret/data/agent-egress/openai"),
        ("GET", "/v1/secret/metadata/agent-egress/openai"),  # created/updated for SecretInfo
        ("GET", "/v1/secret/data/agent-egress/openai"),
        ("LIST", "/v1/secret/metadata/agent-egress"),  # hvac strips the "/"
        ("GET", "/v1/secret/data/agent-egress/openai"),
        ("GET", "/v1/secret/metadata/agent-egress/openai"),
        ("GET", "/v1/secret/metadata/agent-egress/openai"),  # delete: 404 if absent
        ("DELETE", "/v1/secret/metadata/agent-egress/openai"),
    ]
    assert kv2.requests[0].body == {"options": {}, "data": {"value": VALUE}}
    assert all(r.headers["x-vault-token"] == kv2.token for r in kv2.requests)
    assert all(r.body is None for r in kv2.requests[1:])  # the value goes out only on write
    assert kv2.mounts["secret"] == {}  # metadata and all versions gone


def test_hashicorp_mount_prefix_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    with KV2Server(mounts=("kv",)) as kv2:
        monkeypatch.setenv("VAULT_TOKEN", kv2.token)  # the token comes from the environment
        vault = HashiCorpVault(kv2.url, mount="/kv/", path_prefix="team/ae",
                               namespace="admin/eng")
        vault.set("openai", VALUE)
        assert vault.get("openai") == VALUE
    assert kv2.requests[0].path == "/v1/kv/data/team/ae/openai"
    assert {r.headers.get("x-vault-namespace") for r in kv2.requests} == {"admin/eng"}


def test_hashicorp_wrong_or_missing_token(kv2: KV2Server, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    vault = HashiCorpVault(kv2.url, token="s.not-the-token")
    with pytest.raises(VaultError, match=r"refused to read.*permission denied.*token") as exc:
        vault.get("openai")
    assert "s.not-the-token" not in str(exc.value)
    with pytest.raises(VaultError, match="refused to write") as exc:
        vault.set("openai", VALUE)
    assert VALUE not in str(exc.value)
    with pytest.raises(VaultError, match="refused to list"):
        vault.list()

    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    with pytest.raises(VaultError, match="no HashiCorp Vault token: set VAULT_TOKEN"):
        HashiCorpVault(kv2.url)


def test_hashicorp_soft_deleted_foreign_and_malformed(kv2: KV2Server,
                                                      hashicorp_vault: HashiCorpVault) -> None:
    raw = hvac.Client(url=kv2.url, token=kv2.token).secrets.kv.v2
    hashicorp_vault.set("openai", VALUE)
    hashicorp_vault.set("gone", VALUE)
    raw.delete_latest_version_of_secret("agent-egress/gone")  # `vault kv delete`
    raw.create_or_update_secret("agent-egress/team/nested", {"value": VALUE})
    with pytest.raises(SecretNotFound):
        hashicorp_vault.get("gone")
    assert [i.name for i in hashicorp_vault.list()] == ["openai"]

    raw.create_or_update_secret("agent-egress/odd", {"api_key": VALUE})
    with pytest.raises(VaultError, match="no string field 'value'") as exc:
        hashicorp_vault.get("odd")
    assert VALUE not in str(exc.value)


def test_hashicorp_unreachable() -> None:
    vault = HashiCorpVault(f"http://127.0.0.1:{closed_port()}", token="t")
    with pytest.raises(VaultError, match="cannot reach HashiCorp Vault"):
        vault.list()


# -- FileVault KEK rotation ----------------------------------------------------


def test_rotate_kek_rewraps_deks_only(tmp_path: Path) -> None:
    path, old, new = tmp_path / "vault.json", os.urandom(32), os.urandom(32)
    vault = FileVault(path, old)
    for name, value in [("openai", VALUE), ("anthropic", OTHER), ("azure", VALUE2)]:
        vault.set(name, value)
    before = json.loads(path.read_text())

    assert vault.rotate_kek(new) == 3

    after = json.loads(path.read_text())
    assert after["kek_check"] != before["kek_check"]
    for name, b in before["secrets"].items():
        a = after["secrets"][name]
        same = ("ciphertext", "nonce", "fingerprint", "created_at", "updated_at")
        assert {k: a[k] for k in same} == {k: b[k] for k in same}  # values not re-encrypted
        assert a["wrapped_dek"] != b["wrapped_dek"] and a["dek_nonce"] != b["dek_nonce"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vault.json", "vault.json.lock"]

    with pytest.raises(VaultError, match="wrong master key"):
        FileVault(path, old).list()
    fresh = FileVault(path, new)
    assert [fresh.get(n) for n in ("openai", "anthropic", "azure")] == [VALUE, OTHER, VALUE2]
    assert vault.get("openai") == VALUE  # the rotating instance switched keys too
    vault.set("mistral", VALUE)
    assert fresh.get("mistral") == VALUE


def test_rotate_kek_is_all_or_nothing(tmp_path: Path) -> None:
    path, old = tmp_path / "vault.json", os.urandom(32)
    vault = FileVault(path, old)
    vault.set("anthropic", OTHER)
    vault.set("openai", VALUE)
    doc = json.loads(path.read_text())
    doc["secrets"]["openai"]["wrapped_dek"] = doc["secrets"]["anthropic"]["wrapped_dek"]
    path.write_text(json.dumps(doc))
    tampered = path.read_bytes()

    with pytest.raises(VaultError, match="'openai' fails authentication"):
        vault.rotate_kek(os.urandom(32))
    assert path.read_bytes() == tampered
    assert FileVault(path, old).get("anthropic") == OTHER


def test_rotate_kek_of_empty_vault_and_generated_keys(tmp_path: Path) -> None:
    path, old = tmp_path / "vault.json", os.urandom(32)
    key = generate_master_key()
    assert len(base64.b64decode(key, validate=True)) == 32 and key != generate_master_key()
    new = load_master_key(tmp_path, {MASTER_KEY_ENV: key}).key
    assert FileVault(path, old).rotate_kek(new) == 0
    with pytest.raises(VaultError, match="wrong master key"):
        FileVault(path, old).list()
    assert FileVault(path, new).list() == []
    with pytest.raises(ValueError, match="32 bytes"):
        FileVault(path, new).rotate_kek(b"short")


# -- the vault: config section -------------------------------------------------


def test_spec_defaults() -> None:
    assert parse_vault_spec(None) == parse_vault_spec({}) == FileVaultSpec()
    assert parse_vault_spec({"path": "/x/v.json"}) == FileVaultSpec(path=Path("/x/v.json"))
    assert FileVaultSpec().refresh_seconds == 5
    aws = parse_vault_spec({"kind": "aws"})
    assert isinstance(aws, AwsVaultSpec)
    assert (aws.prefix, aws.region, aws.recovery_window_days, aws.refresh_seconds) == (
        "agent-egress/", None, 7, 60
    )
    hc = parse_vault_spec({"kind": "hashicorp", "url": "https://vault.internal:8200"})
    assert isinstance(hc, HashiCorpVaultSpec)
    assert (hc.mount, hc.path_prefix, hc.token_env, hc.verify, hc.refresh_seconds) == (
        "secret", "agent-egress/", "VAULT_TOKEN", True, 60
    )
    with pytest.raises(ValidationError, match="frozen"):
        hc.mount = "kv"  # type: ignore[misc]


@pytest.mark.parametrize(("spec", "key"), [
    ({"kind": "aws", "recovery_window_days": 3}, "vault.aws.recovery_window_days"),
    ({"kind": "aws", "regoin": "eu-west-1"}, "vault.aws.regoin"),
    ({"kind": "aws", "endpoint_url": "localhost:4566"}, "vault.aws.endpoint_url"),
    ({"kind": "hashicorp"}, "vault.hashicorp.url"),
    ({"kind": "hashicorp", "url": "https://v", "token": "s.x"}, "vault.hashicorp.token"),
    ({"kind": "file", "refresh_seconds": 0}, "vault.file.refresh_seconds"),
    ({"kind": "gcp"}, "vault"),
])
def test_bad_spec_names_the_key(spec: dict[str, Any], key: str) -> None:
    class Settings(BaseModel):  # how policy.Settings embeds it
        vault: VaultSpec = Field(default_factory=FileVaultSpec)

    assert isinstance(Settings().vault, FileVaultSpec)
    with pytest.raises(ValidationError) as exc:
        Settings.model_validate({"vault": spec})
    (err,) = exc.value.errors()
    assert ".".join(map(str, err["loc"])) == key
    if spec["kind"] == "gcp":
        assert err["msg"] == "kind must be one of 'file', 'aws', 'hashicorp'"


def test_open_vault_file(tmp_path: Path) -> None:
    env = {MASTER_KEY_ENV: generate_master_key()}
    vault = open_vault(parse_vault_spec({}), home=tmp_path, environ=env)
    assert isinstance(vault, FileVault) and vault.path == tmp_path / "vault.json"
    vault.set("openai", VALUE)
    custom = parse_vault_spec({"path": str(tmp_path / "other.json")})
    assert open_vault(custom, home=tmp_path, environ=env).list() == []
    assert open_vault(parse_vault_spec({}), home=tmp_path, environ=env).get("openai") == VALUE
    with pytest.raises(VaultError, match="wrong master key"):  # no env: generates master.key
        open_vault(parse_vault_spec({}), home=tmp_path, environ={}).list()
    assert (tmp_path / "master.key").exists()


def test_open_vault_aws(aws_env: None, moto_url: str, prefix: str) -> None:
    spec = parse_vault_spec({"kind": "aws", "prefix": prefix, "region": REGION,
                             "endpoint_url": moto_url, "recovery_window_days": 30})
    vault = open_vault(spec, home=Path("/nonexistent"), environ={})
    assert isinstance(vault, AwsSecretsManagerVault) and vault.recovery_window_days == 30
    vault.set("openai", VALUE)
    assert vault.get("openai") == VALUE


def test_open_vault_hashicorp(kv2: KV2Server) -> None:
    spec = parse_vault_spec({"kind": "hashicorp", "url": kv2.url, "token_env": "AE_VAULT_TOKEN",
                             "path_prefix": "gw", "verify": False})
    vault = open_vault(spec, home=Path("/nonexistent"), environ={"AE_VAULT_TOKEN": kv2.token})
    assert isinstance(vault, HashiCorpVault)
    vault.set("openai", VALUE)
    assert kv2.requests[0].path == "/v1/secret/data/gw/openai"
    with pytest.raises(VaultError, match="AE_VAULT_TOKEN is not set"):
        open_vault(spec, home=Path("/nonexistent"), environ={"VAULT_TOKEN": kv2.token})

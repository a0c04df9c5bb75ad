"""Config validation: clear errors naming the bad key; precedence flag > env > file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_egress.addon.policy import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = load_settings(environ={"AGENT_EGRESS_HOME": str(tmp_path)})
    assert s.home == tmp_path
    assert s.listen.reverse == "127.0.0.1:8787"
    assert s.listen.proxy == "127.0.0.1:8080"
    assert s.listen.admin == "127.0.0.1:9787"
    assert s.db_url == f"sqlite:///{tmp_path / 'agent-egress.db'}"
    assert s.vault.kind == "file" and s.vault.path is None  # <home>/vault.json
    assert s.provider().base_url == "https://api.openai.com/v1"
    assert s.limits.max_body_bytes == 32 * 1024 * 1024


def test_home_config_file_is_read(tmp_path: Path) -> None:
    write(tmp_path, "listen:\n  reverse: 0.0.0.0:9000\n")
    s = load_settings(environ={"AGENT_EGRESS_HOME": str(tmp_path)})
    assert s.listen.reverse == "0.0.0.0:9000"


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "listen:\n  reverse: 127.0.0.1:1\n  admin: 127.0.0.1:2\n")
    env = {"AGENT_EGRESS_HOME": str(tmp_path), "AGENT_EGRESS_REVERSE_LISTEN": "127.0.0.1:3",
           "AGENT_EGRESS_ADMIN_LISTEN": "127.0.0.1:4", "AGENT_EGRESS_PROXY_LISTEN": "off"}
    s = load_settings(cfg, environ=env, overrides={("listen", "admin"): "127.0.0.1:5"})
    assert s.listen.reverse == "127.0.0.1:3"
    assert s.listen.admin == "127.0.0.1:5"
    assert s.listen.proxy is None


@pytest.mark.parametrize(("text", "needle"), [
    ("listen:\n  reverse: localhost\n", "listen.reverse"),
    ("lissten: {}\n", "lissten: Extra inputs are not permitted"),
    ("providers:\n  - name: a\n    base_url: ftp://x\n    key: k\n", "providers.0.base_url"),
    ("providers:\n  - name: a\n    base_url: http://x\n", "providers.0.key"),
    ("providers: []\n", "at least one provider"),
    ("default_provider: nope\n", "default_provider"),
    ("limits:\n  max_body_bytes: -1\n", "limits.max_body_bytes"),
    ("providers:\n  - {name: a, base_url: 'http://x', key: k, prices: {m: {input_per_mtok: x,"
     " output_per_mtok: 1}}}\n", "providers.0.prices.m.input_per_mtok"),
    ("- just a list\n", "top level must be a mapping"),
    ("listen: [\n", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, environ={"AGENT_EGRESS_HOME": str(tmp_path)})
    assert needle in str(e.value)
    assert str(cfg) in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", environ={"AGENT_EGRESS_HOME": str(tmp_path)})


def test_example_config_is_valid(tmp_path: Path) -> None:
    from importlib import resources
    text = (resources.files("agent_egress.addon") / "example-config.yaml").read_text()
    s = load_settings(write(tmp_path, text), environ={"AGENT_EGRESS_HOME": str(tmp_path)})
    assert s.provider().name == "openai"

"""Shared fixtures: a fake provider, a gateway run as a real `agent-egress run`
process on free loopback ports, the CLI, and the real Codex CLI."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from fakeprovider import FakeProvider

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AGENT_EGRESS = str(BIN / "agent-egress")
CODEX = os.environ.get("CODEX_BIN") or str(ROOT / "tools" / "codex" / "node_modules" / ".bin"
                                           / "codex")
PROVIDER_KEY = "sk-proj-CANARYvaultedKEY0123456789abcdefABCDEF"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    home: Path
    env: dict[str, str]
    reverse_port: int
    proxy_port: int
    admin_port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.reverse_port}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def cli(self, *args: str, input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([AGENT_EGRESS, *args], env=self.env, input=input,
                             capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"agent-egress {' '.join(args)} failed: {res.stderr}")
        return res

    def issue_token(self, user: str = "alice", team: str = "payments", org: str = "acme",
                    ttl: str = "30d") -> tuple[str, str]:
        out = self.cli("token", "issue", "--user", user, "--team", team, "--org", org,
                       "--ttl", ttl, "--format", "json").stdout
        data = json.loads(out)
        return data["token"], data["key_id"]

    def start(self, wait_ready: bool = True) -> None:
        self.log_path = self.home / "gateway.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([AGENT_EGRESS, "run"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60  # start-up is ~3 s; a loaded CI box is slower
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.logs()}")
            try:
                r = httpx.get(f"{self.admin_url}/readyz" if wait_ready else
                              f"{self.admin_url}/healthz", timeout=1)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready in 60 s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ledger(self) -> list[dict[str, Any]]:
        from agent_egress.addon.store.sql import SQLStore

        store = SQLStore(f"sqlite:///{self.home / 'agent-egress.db'}")
        try:
            import dataclasses
            return [dataclasses.asdict(r) for r in store.ledger_rows()]
        finally:
            store.close()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s series on /metrics whose labels include ``labels``."""
        total = 0.0
        for line in httpx.get(f"{self.admin_url}/metrics", timeout=5).text.splitlines():
            if line.startswith((name + "{", name + " ")) and all(
                    f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_ledger(self, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.ledger()
            if len(rows) >= n:
                return rows
            time.sleep(0.05)
        return rows


def make_gateway(tmp_path: Path, provider_url: str, **config: Any) -> Gateway:
    gw = make_gateway_without_key(tmp_path, provider_url, **config)
    gw.cli("vault", "set", "openai", input=PROVIDER_KEY + "\n")
    return gw


def make_gateway_without_key(tmp_path: Path, provider_url: str, **config: Any) -> Gateway:
    """make_gateway, but the provider key is not stored yet (no vault, no master key
    file): for callers that store it their way, e.g. replicas sharing a master key."""
    home = tmp_path / "egress-home"
    home.mkdir(mode=0o700)  # the gateway refuses a state directory others can read
    gw = Gateway(home=home, env={}, reverse_port=free_port(), proxy_port=free_port(),
                 admin_port=free_port())
    cfg: dict[str, Any] = {
        "listen": {"reverse": f"127.0.0.1:{gw.reverse_port}",
                   "proxy": f"127.0.0.1:{gw.proxy_port}",
                   "admin": f"127.0.0.1:{gw.admin_port}"},
        "providers": [{"name": "openai", "kind": "openai", "base_url": provider_url,
                       "key": "openai"}],
        "shutdown": {"drain_seconds": 10},
    }
    for k, v in config.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    (home / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AGENT_EGRESS_", "OPENAI_", "HTTP_PROXY", "HTTPS_PROXY",
                                "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"))}
    env["AGENT_EGRESS_HOME"] = str(home)
    env["NO_PROXY"] = "*"
    gw.env = env
    return gw


def make_replicas(tmp_path: Path, provider_url: str, db_url: str, redis_url: str,
                  prefix: str, **config: Any) -> tuple[Gateway, Gateway]:
    """Two replicas (homes tmp_path/a and tmp_path/b) of one deployment: one database,
    one Redis (keys under ``prefix``), one master key (environment), the provider key in
    each home's vault (stored by both at once)."""
    master = base64.b64encode(os.urandom(32)).decode()
    gws = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        gw = make_gateway_without_key(tmp_path / name, provider_url, database_url=db_url,
                                      redis_url=redis_url, redis_prefix=prefix, **config)
        gw.env["AGENT_EGRESS_MASTER_KEY"] = master
        gws.append(gw)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda g: g.cli("vault", "set", "openai", input=PROVIDER_KEY + "\n"),
                      gws))
    return gws[0], gws[1]


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


@pytest.fixture
def gateway(tmp_path: Path, fake: FakeProvider) -> Iterator[Gateway]:
    gw = make_gateway(tmp_path, fake.base_url)
    gw.start()
    yield gw
    gw.stop()


# Codex --------------------------------------------------------------------
def codex_available() -> bool:
    return Path(CODEX).exists() or shutil.which("codex") is not None


def run_codex(tmp_path: Path, base_url: str, token: str, prompt: str = "run the tool",
              timeout: float = 120, resume: bool = False, provider_extra: str = "",
              env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`codex exec` with a custom provider at the gateway (DESIGN §4, driving Codex).

    ``provider_extra``: more lines for the provider block (e.g. supports_websockets);
    ``env_extra``: set last (e.g. HTTPS_PROXY and CODEX_CA_CERTIFICATE for egress mode)."""
    if not Path(CODEX).exists():
        pytest.fail(f"Codex CLI missing at {CODEX}: run scripts/test.sh (it installs it)")
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir(exist_ok=True)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(
        'model = "gpt-5.5"\n'
        'model_provider = "agent-egress"\n'
        'approval_policy = "never"\n'
        'sandbox_mode = "workspace-write"\n'
        "[model_providers.agent-egress]\n"
        'name = "agent-egress"\n'
        f'base_url = "{base_url}"\n'
        'env_key = "AGENT_EGRESS_TOKEN"\n'
        'wire_api = "responses"\n'
        f"{provider_extra}"
        "[analytics]\nenabled = false\n"
        "[features]\nplugins = false\n"
    )
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "CODEX_", "AGENT_EGRESS_", "SSL_CERT"))}
    env.update({"CODEX_HOME": str(codex_home), "AGENT_EGRESS_TOKEN": token,
                "NO_PROXY": "*", "RUST_LOG": "error"})
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
                "all_proxy"):
        env.pop(var, None)
    env.update(env_extra or {})
    argv = [CODEX, "exec", "--skip-git-repo-check", *(["resume", "--last"] if resume else []),
            prompt]
    return subprocess.run(argv,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          cwd=work, env=env, timeout=timeout)

"""The benchmarked gateways, each started as its own process against one fake upstream:
bare mitmdump, ``agent-egress run`` (alone on SQLite, or as replicas sharing PostgreSQL
and Redis), LiteLLM's proxy from PyPI in its own virtual environment, and HAProxy in
front of replicas. Nothing here is installed with apt: a missing HAProxy is reported."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from bench_lib import HOST, MODEL, ROOT, Procs, free_port, proc_tree, venv_bin, wait_http, wait_port

LITELLM_VERSION = "1.106.12"
"""Pinned: 1.110.2 and 1.108.14 did not install (their ``[proxy]`` extra pins
litellm-proxy / litellm-proxy-extras builds the index lacked); this one did."""
PROVIDER_KEY = "sk-bench-key"
EXTRA_CONFIG: dict[str, object] = {}
"""Merged into every agent-egress config.yaml (``bench.py --egress-config``)."""


@dataclass
class Target:
    """A running gateway (or the fake itself for ``direct``): where to send, as whom."""

    name: str
    port: int
    auth: str
    proc: subprocess.Popen[bytes] | None = None
    home: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pids(self) -> list[int]:
        """The gateway's processes now (LiteLLM workers included)."""
        return proc_tree(self.proc.pid) if self.proc is not None else []


def clean_env() -> dict[str, str]:
    """Our environment without proxy settings and agent-egress overrides."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("AGENT_EGRESS_")
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}


# --------------------------------------------------------------------------- mitmproxy
def start_mitmdump(procs: Procs, fake_port: int, name: str = "mitmproxy") -> Target:
    port = free_port()
    confdir = procs.workdir / f"{name}-conf"
    confdir.mkdir(exist_ok=True)
    p = procs.start(name, [
        venv_bin("mitmdump"), "--mode", f"reverse:http://{HOST}:{fake_port}@{HOST}:{port}",
        "--set", "stream_large_bodies=1", "--set", "connection_strategy=lazy",
        "--set", f"confdir={confdir}", "-q"], env=clean_env())
    wait_port(port, 30, p, "mitmdump", procs, name)
    return Target(name, port, PROVIDER_KEY, p)


# --------------------------------------------------------------------------- agent-egress
def egress_env(home: Path) -> dict[str, str]:
    env = clean_env()
    env["AGENT_EGRESS_HOME"] = str(home)
    return env


def egress_cli(env: dict[str, str], *args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run([venv_bin("agent-egress"), *args], input=stdin, env=env, check=True,
                          capture_output=True, timeout=120).stdout


def prepare_egress(procs: Procs, fake_port: int, name: str, *, database_url: str | None = None,
                   redis_url: str | None = None, redis_prefix: str | None = None,
                   master_key: str | None = None) -> tuple[Path, dict[str, str], int, int]:
    """A home with config and the provider key in its vault; returns (home, env, port,
    admin port). Replicas share a database, a Redis prefix and the vault's master key."""
    home = procs.workdir / f"{name}-home"
    home.mkdir(mode=0o700)
    port, admin = free_port(), free_port()
    cfg: dict[str, object] = {
        "listen": {"reverse": f"{HOST}:{port}", "proxy": None, "admin": f"{HOST}:{admin}"},
        "providers": [{"name": "openai", "kind": "openai",
                       "base_url": f"http://{HOST}:{fake_port}/v1", "key": "openai"}],
        "log_level": "warning",
    }
    cfg.update(EXTRA_CONFIG)
    if database_url:
        cfg["database_url"] = database_url
    if redis_url:
        cfg["redis_url"] = redis_url
        cfg["redis_prefix"] = redis_prefix or "agent-egress-bench:"
    (home / "config.yaml").write_text(json.dumps(cfg) + "\n", encoding="utf-8")  # JSON is YAML
    env = egress_env(home)
    if master_key:
        env["AGENT_EGRESS_MASTER_KEY"] = master_key
    egress_cli(env, "vault", "set", "openai", stdin=PROVIDER_KEY.encode())
    return home, env, port, admin


def issue_token(env: dict[str, str]) -> str:
    out = egress_cli(env, "token", "issue", "--user", "bench", "--team", "bench",
                     "--format", "json")
    return str(json.loads(out)["token"])


def run_egress(procs: Procs, name: str, env: dict[str, str], port: int, admin: int,
               token: str, home: Path) -> Target:
    p = procs.start(name, [venv_bin("agent-egress"), "run"], env=env)
    wait_http(f"http://{HOST}:{admin}/readyz", 60, p, name, procs, name)
    return Target(name, port, token, p, home, extra={"env": env})


def start_egress(procs: Procs, fake_port: int, name: str = "agent-egress") -> Target:
    """One gateway, default chain, SQLite store in a throwaway home."""
    home, env, port, admin = prepare_egress(procs, fake_port, name)
    return run_egress(procs, name, env, port, admin, issue_token(env), home)


def start_replicas(procs: Procs, fake_port: int, n: int, database_url: str, redis_url: str,
                   redis_prefix: str) -> list[Target]:
    """``n`` gateways on one PostgreSQL database and one Redis prefix (started one after
    the other: the first one's CLI creates the schema)."""
    master = base64.b64encode(os.urandom(32)).decode()
    out: list[Target] = []
    token = ""
    for i in range(n):
        name = f"replica-{i}"
        home, env, port, admin = prepare_egress(
            procs, fake_port, name, database_url=database_url, redis_url=redis_url,
            redis_prefix=redis_prefix, master_key=master)
        if i == 0:
            token = issue_token(env)
        out.append(run_egress(procs, name, env, port, admin, token, home))
    return out


def egress_ledger_calls(home: Path, env: dict[str, str] | None = None) -> int | None:
    """Calls in the gateway's ledger (run after it stopped, so everything is flushed)."""
    try:
        out = egress_cli(env or egress_env(home), "spend", "--by", "team", "--format", "json")
        return sum(int(r["calls"]) for r in json.loads(out))
    except (subprocess.SubprocessError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- LiteLLM
def litellm_venv_dir() -> Path:
    """``$AGENT_EGRESS_BENCH_LITELLM_VENV``, else benchmarks/.litellm-venv (git-ignored)."""
    env = os.environ.get("AGENT_EGRESS_BENCH_LITELLM_VENV")
    return Path(env) if env else ROOT / "benchmarks" / ".litellm-venv"


def ensure_litellm(log: TextIO = sys.stderr) -> Path:
    """The LiteLLM proxy's own venv, created on first use (``pip install
    'litellm[proxy]==LITELLM_VERSION'``, a few minutes); returns its ``litellm`` script."""
    venv = litellm_venv_dir()
    marker = venv / "bench-litellm-version"
    exe = venv / "bin" / "litellm"
    if exe.exists() and marker.exists() and marker.read_text().strip() == LITELLM_VERSION:
        return exe
    print(f"bench: creating {venv} with litellm[proxy]=={LITELLM_VERSION} (once; a few"
          " minutes)", file=log, flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                    f"litellm[proxy]=={LITELLM_VERSION}"], check=True, timeout=1800)
    marker.write_text(LITELLM_VERSION + "\n")
    return exe


def start_litellm(procs: Procs, fake_port: int, workers: int = 1,
                  name: str = "litellm") -> Target:
    """``litellm --config`` with one model on the fake upstream; no database (so no spend
    tracking); a random master key, which clients send as their bearer token (LiteLLM
    refuses to start without one); no retries; the bundled cost map (no network)."""
    exe = ensure_litellm()
    port = free_port()
    master = "sk-bench-" + os.urandom(16).hex()
    cfg = procs.workdir / f"{name}.yaml"
    cfg.write_text(json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": f"http://{HOST}:{fake_port}/v1",
            "api_key": PROVIDER_KEY}}],
        "litellm_settings": {"num_retries": 0, "request_timeout": 30, "drop_params": True},
        "general_settings": {"master_key": master},
    }) + "\n", encoding="utf-8")
    env = clean_env()
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                "HOME": str(procs.workdir), "NO_PROXY": "*"})
    env.pop("DATABASE_URL", None)
    p = procs.start(name, [str(exe), "--config", str(cfg), "--host", HOST, "--port", str(port),
                           "--num_workers", str(workers)], env=env)
    wait_http(f"http://{HOST}:{port}/health/liveliness", 180, p, name, procs, name)
    return Target(name, port, master, p, extra={"workers": workers,
                                                      "version": LITELLM_VERSION})


# --------------------------------------------------------------------------- HAProxy
HAPROXY_MISSING = "HAProxy not found: apt-get install haproxy (Debian package), then rerun"


def start_haproxy(procs: Procs, backends: list[Target], name: str) -> Target:
    """HAProxy in TCP mode, round robin over the replicas: each client keep-alive
    connection is pinned to one replica, so 64 connections spread evenly; TCP mode keeps
    HAProxy's own CPU small on a 2-core box (it does not parse HTTP)."""
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(exe).exists():
        raise FileNotFoundError(HAPROXY_MISSING)
    port = free_port()
    servers = "\n".join(f"  server g{i} {HOST}:{b.port}" for i, b in enumerate(backends))
    cfg = procs.workdir / f"{name}.cfg"
    cfg.write_text(f"""global
  maxconn 8192
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend fe
  bind {HOST}:{port}
  default_backend be
backend be
  balance roundrobin
{servers}
""", encoding="utf-8")
    p = procs.start(name, [exe, "-f", str(cfg), "-db"], env=clean_env())
    wait_port(port, 15, p, "haproxy", procs, name)
    return Target(name, port, backends[0].auth, p)

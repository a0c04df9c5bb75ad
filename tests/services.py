"""PostgreSQL and Redis for the tests: the machine's own when reachable, else ours.

    postgres_url()      URL of a reachable PostgreSQL server (its maintenance database)
    redis_url()         URL of a reachable Redis
    fresh_database()    context manager: a new, uniquely named database; dropped after
    redis_namespace()   context manager: a unique key/channel prefix; its keys deleted after

Where to look first (``AGENT_EGRESS_TEST_POSTGRES_URL`` / ``AGENT_EGRESS_TEST_REDIS_URL``
override): postgresql://postgres@127.0.0.1:5432/test, then the same as the OS user,
and redis://127.0.0.1:6379/0. When nothing answers (a fresh laptop), a private
server is started from the Debian binaries (``postgresql``: initdb/postgres under
/usr/lib/postgresql/*/bin; ``redis-server``) on a free loopback port in a temp
dir, once per test session, and stopped at exit. Without the binaries the tests
that need the service are skipped with the package to install; set
``AGENT_EGRESS_TEST_SERVICES=require`` (CI) to make that a failure instead.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

ENV_POSTGRES = "AGENT_EGRESS_TEST_POSTGRES_URL"
ENV_REDIS = "AGENT_EGRESS_TEST_REDIS_URL"
ENV_REQUIRE = "AGENT_EGRESS_TEST_SERVICES"

_resolved: dict[tuple[str, str | None], str] = {}
_started: list[PostgresServer | RedisServer] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unavailable(message: str) -> None:
    if os.environ.get(ENV_REQUIRE) == "require":
        pytest.fail(message)
    pytest.skip(message)


def _libpq(url: str) -> str:
    """A SQLAlchemy-style URL as psycopg wants it (no +driver)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_reachable(url: str, timeout: float = 2.0) -> bool:
    try:
        with psycopg.connect(_libpq(url), connect_timeout=max(int(timeout), 1),
                             autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


# our own servers ----------------------------------------------------------
def _run_as() -> pwd.struct_passwd | None:
    """initdb and postgres refuse to run as root: run them as postgres (or nobody)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


def postgres_bindir() -> Path | None:
    for exe in ("initdb", "pg_ctl"):  # on PATH (Homebrew, a custom build, our symlinks)
        found = shutil.which(exe)
        if found and shutil.which("postgres", path=str(Path(found).resolve().parent)):
            return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    return None


class PostgresServer:
    """A throwaway cluster: initdb into a temp dir, postgres on 127.0.0.1:<free port>."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="agent-egress-pg-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._kw: dict[str, object] = {}

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 30) -> PostgresServer:
        user = _run_as()
        kw: dict[str, object] = {}
        if user is not None:
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            kw = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        data = self.dir / "data"
        log = self.dir / "postgres.log"
        res = subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres",
                              "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
                             capture_output=True, text=True, cwd=self.dir, timeout=60,
                             **kw)
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed: {res.stderr}")
        self._kw = kw
        for _attempt in range(3):
            self.port = free_port()
            if self._spawn(timeout):
                return self
        raise RuntimeError(f"postgres did not start:\n{log.read_text(errors='replace')[-3000:]}")

    def _spawn(self, timeout: float) -> bool:
        log = self.dir / "postgres.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.dir / "data"), "-p",
                 str(self.port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={self.dir}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.dir, **self._kw)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if postgres_reachable(self.url, timeout=1):
                return True
            time.sleep(0.05)
        self._kill()
        return False

    def halt(self) -> None:
        """Stop the server but keep its data and port: a database outage."""
        self._kill()

    def resume(self, timeout: float = 30) -> None:
        if not self._spawn(timeout):
            raise RuntimeError("postgres did not come back on its port")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    """redis-server on 127.0.0.1:<port> with no persistence, in a temp dir."""

    def __init__(self, port: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="agent-egress-redis-"))
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server")
        fixed = bool(self.port)
        for _attempt in range(3):
            if not fixed:
                self.port = free_port()
            with (self.dir / "redis.log").open("ab") as out:
                self.proc = subprocess.Popen(
                    [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"],
                    stdout=out, stderr=subprocess.STDOUT, cwd=self.dir)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if redis_reachable(self.url, timeout=0.5):
                    return self
                time.sleep(0.02)
            self.kill()
        log = (self.dir / "redis.log").read_text(errors="replace")
        raise RuntimeError(f"redis-server did not start:\n{log[-3000:]}")

    def kill(self) -> None:
        """Stop it now (a crash, as far as clients can tell); start() brings it back."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _stop_started() -> None:
    while _started:
        with contextlib.suppress(Exception):
            _started.pop().stop()


atexit.register(_stop_started)


# resolution ----------------------------------------------------------------
def postgres_url() -> str:
    """A reachable PostgreSQL server (URL of a database to connect to for admin work)."""
    override = os.environ.get(ENV_POSTGRES)
    cache_key = ("postgres", override)
    if cache_key in _resolved:
        return _resolved[cache_key]
    candidates = [override] if override else [
        "postgresql://postgres@127.0.0.1:5432/test",
        f"postgresql://{getpass.getuser()}@127.0.0.1:5432/test",
        "postgresql://postgres@127.0.0.1:5432/postgres",
    ]
    for url in candidates:
        if postgres_reachable(url):
            _resolved[cache_key] = url
            return url
    bindir = postgres_bindir()
    if bindir is None:
        _unavailable(f"no PostgreSQL at {', '.join(candidates)} and no initdb to start one"
                     " (apt-get install postgresql)")
    assert bindir is not None
    server = PostgresServer(bindir).start()
    _started.append(server)
    _resolved[cache_key] = server.url
    return server.url


def redis_url() -> str:
    """A reachable Redis (the machine's, else one started for this session)."""
    override = os.environ.get(ENV_REDIS)
    cache_key = ("redis", override)
    if cache_key in _resolved:
        return _resolved[cache_key]
    url = override or "redis://127.0.0.1:6379/0"
    if redis_reachable(url):
        _resolved[cache_key] = url
        return url
    if shutil.which("redis-server") is None:
        _unavailable(f"no Redis at {url} and no redis-server to start one"
                     " (apt-get install redis-server)")
    server = RedisServer().start()
    _started.append(server)
    _resolved[cache_key] = server.url
    return server.url


def started_servers() -> list[PostgresServer | RedisServer]:
    return list(_started)


@contextlib.contextmanager
def fresh_database(server: str | None = None) -> Iterator[str]:
    """A new database ae_test_<hex> on the server; yields its postgresql:// URL, then drops it."""
    server = server or postgres_url()
    name = f"ae_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(server), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(server), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))


@contextlib.contextmanager
def redis_namespace(url: str | None = None) -> Iterator[str]:
    """A prefix no other run uses; every key under it is deleted afterwards."""
    url = url or redis_url()
    prefix = f"ae-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        with contextlib.suppress(redis.RedisError, OSError):
            keys = list(client.scan_iter(match=f"{prefix}*", count=500))
            if keys:
                client.delete(*keys)
        client.close()

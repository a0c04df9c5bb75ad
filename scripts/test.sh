#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what the tests need (Debian
# packages when missing, a virtualenv with the dev dependencies, the pinned
# Codex CLI from npm), then ruff, mypy --strict and pytest. Extra arguments go
# to pytest (e.g. scripts/test.sh -k codex). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
}

# Debian packages the tests need: node/npm run the Codex CLI; a real Prometheus
# scrapes the gateway in the metrics tests; PostgreSQL and Redis for the replicas.
if command -v dpkg-query >/dev/null; then
  command -v node >/dev/null || apt_install nodejs
  command -v npm >/dev/null || apt_install npm
  python3 -c "import venv, ensurepip" 2>/dev/null || apt_install python3-venv
  command -v prometheus >/dev/null || apt_install prometheus
  command -v chromium >/dev/null || apt_install chromium  # renders the finance report (headless)
  # The tests use PostgreSQL and Redis on 127.0.0.1 when running, else start their own
  # from these binaries on free ports.
  command -v redis-server >/dev/null || apt_install redis-server
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Every dependency (runtime + dev) at the version and hash in the lock file; then the
# project itself without resolving anything. Refresh the lock: see SECURITY.md.
.venv/bin/python -m pip install -q --require-hashes -r requirements-dev.lock
.venv/bin/python -m pip install -q --no-deps -e .

# The Codex CLI, pinned (tools/codex/package.json), into a project-local prefix.
CODEX_VERSION="$(.venv/bin/python -c 'import json;print(json.load(open("tools/codex/package.json"))["dependencies"]["@openai/codex"])')"
if ! tools/codex/node_modules/.bin/codex --version 2>/dev/null | grep -q "$CODEX_VERSION"; then
  npm install --prefix tools/codex --no-package-lock --no-audit --no-fund --loglevel=error
fi
export CODEX_BIN="$PWD/tools/codex/node_modules/.bin/codex"
# anthropic (issue 13): the Claude Code CLI, pinned (tools/claude/package.json), the same way.
CLAUDE_VERSION="$(.venv/bin/python -c 'import json;print(json.load(open("tools/claude/package.json"))["dependencies"]["@anthropic-ai/claude-code"])')"
if ! tools/claude/node_modules/.bin/claude --version 2>/dev/null | grep -q "$CLAUDE_VERSION"; then
  npm install --prefix tools/claude --no-package-lock --no-audit --no-fund --loglevel=error
fi
export CLAUDE_BIN="$PWD/tools/claude/node_modules/.bin/claude"
# PostgreSQL/Redis: use the machine's, else start our own; never skip silently.
export AGENT_EGRESS_TEST_SERVICES="${AGENT_EGRESS_TEST_SERVICES:-require}"

# mypy sees the installed import names through symlinks (the folders are mapped
# into agent_egress.* by setuptools' package-dir, which mypy cannot follow).
mkdir -p .typecheck/agent_egress
ln -sfn ../../addon .typecheck/agent_egress/addon
ln -sfn ../../exporters .typecheck/agent_egress/exporters

echo "== ruff"
.venv/bin/ruff check addon exporters tests benchmarks
echo "== mypy --strict (addon, exporters)"
MYPYPATH=.typecheck .venv/bin/mypy -p agent_egress.addon -p agent_egress.exporters
echo "== pip-audit (requirements-dev.lock)"
# Advisories we cannot fix while mitmproxy 11 pins these versions (mitmproxy 12 needs
# Python 3.12); why each does not reach us is in SECURITY.md. Any other advisory fails.
PIP_AUDIT_IGNORED=(
  GHSA-847f-9342-265h  # h2 4.1.0: CRLF in HTTP/2 headers -> smuggling on an h2->h1 hop
  GHSA-6hr6-w5qg-qmwg  # h2 4.1.0: duplicate Host/:authority on an h2->h1 hop
  GHSA-63cx-g855-hvv4  # mitmproxy 11.0.2: the same h2 advisory, as shipped by mitmproxy
  GHSA-vqfr-h8mv-ghfj  # h11 0.14: lenient chunk trailers; mitmproxy does not use h11 to proxy
)
# pip-audit asks PyPI's JSON API (pypi.org/pypi/<name>/<version>/json). Where that is not
# reachable (a mirror-only network) it could audit nothing: AGENT_EGRESS_PIP_AUDIT=auto
# (default) then says so loudly and goes on; =require fails instead; =off skips it.
PIP_AUDIT_MODE="${AGENT_EGRESS_PIP_AUDIT:-auto}"
if [ "$PIP_AUDIT_MODE" != off ]; then
  if [ "$PIP_AUDIT_MODE" = require ] || .venv/bin/python -c '
import sys, urllib.request
try:
    urllib.request.urlopen("https://pypi.org/pypi/pip-audit/2.10.1/json", timeout=10)
except Exception as e:
    sys.exit(f"{e}")' 2>/dev/null; then
    .venv/bin/pip-audit --strict --disable-pip --require-hashes -r requirements-dev.lock \
      --progress-spinner off $(printf -- '--ignore-vuln %s ' "${PIP_AUDIT_IGNORED[@]}")
  else
    echo "!! pip-audit SKIPPED: PyPI's vulnerability API is not reachable from here;"
    echo "!! set AGENT_EGRESS_PIP_AUDIT=require to make this a failure."
  fi
fi
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Installs agent-egress into ./.venv and starts it on its embedded defaults:
# SQLite and an encrypted vault file under $AGENT_EGRESS_HOME (~/.agent-egress).
# Extra arguments go to `agent-egress run` (e.g. --reverse-listen 0.0.0.0:8787).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# the runtime dependencies at the versions and hashes of the lock file, then the project
.venv/bin/python -m pip install -q --require-hashes -r requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
exec .venv/bin/agent-egress run "$@"

"""A plain wheel install works, not only the editable one (DESIGN §3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("agent_egress-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    # Dependencies come from the dev venv's site-packages, added *after* the new
    # venv's own, as a plain path entry (no .pth processing, so the editable
    # finder that points at the source tree is not loaded).
    deps = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": deps, "AGENT_EGRESS_HOME": str(tmp_path / "home")}
    py = str(venv / "bin" / "python")
    out = subprocess.run(
        [py, "-c", "import json, agent_egress.addon.cli as c, agent_egress.exporters.prometheus"
         " as p; print(json.dumps([c.__file__, p.__file__]))"],
        env=env, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    for path in json.loads(out):
        assert str(target) in path, path
    # Package data ships: the example config and the Alembic migrations.
    cli = [py, "-m", "agent_egress.addon.cli"]
    subprocess.run([*cli, "init", "--path", str(tmp_path / "c.yaml")], env=env, check=True,
                   cwd=tmp_path, capture_output=True)
    assert "providers:" in (tmp_path / "c.yaml").read_text()
    res = subprocess.run([*cli, "token", "list", "--format", "json"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []

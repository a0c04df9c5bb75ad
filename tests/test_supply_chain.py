"""The lock files agree with pyproject.toml: every declared dependency is pinned there,
at a version its specifier allows, with hashes; so a dependency added to pyproject
without refreshing the locks (command in SECURITY.md) fails here, not on a fresh machine."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", re.M)


def _pins(lock: Path) -> dict[str, str]:
    text = lock.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    pins = {}
    for block in blocks:
        m = PIN.match(block)
        if m:
            assert "--hash=sha256:" in block, f"{m[1]} has no hash in {lock.name}"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


@pytest.mark.parametrize(("lock", "extras"), [("requirements.lock", ()),
                                              ("requirements-dev.lock", ("dev",))])
def test_lock_pins_every_declared_dependency(lock: str, extras: tuple[str, ...]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in extras:
        declared += project["optional-dependencies"][extra]
    pins = _pins(ROOT / lock)
    assert len(pins) > 50
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not in {lock}: refresh the locks"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {req.name}=={pins[name]}, outside {req.specifier}: refresh the locks")

"""The lock matches pyproject.toml: the check CI runs, and that it catches a stale lock."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)


def test_the_lock_matches_pyproject_and_a_stale_one_is_named():
    pyproject = check_lock.tomllib.loads((ROOT / "pyproject.toml").read_text())
    lock = (ROOT / "requirements.lock").read_text()
    assert check_lock.problems(pyproject, lock) == []
    pinned, direct = check_lock.pins(lock)
    assert {"torch", "pytorch-lightning", "mlflow", "hydra-core", "ray"} <= set(pinned)
    assert "l2lab" not in pinned and "zipp" not in direct  # no path of this machine in it
    # a range moved past the lock, a new dependency, a dropped one: each named
    pyproject["project"]["dependencies"] = [
        d.replace("mlflow>=3,<3.18", "mlflow>=3.18") for d in pyproject["project"]["dependencies"]
        if not d.startswith("scipy")] + ["tabulate>=0.9"]
    found = check_lock.problems(pyproject, lock)
    assert any(p.startswith("mlflow: the lock pins 3.") and ">=3.18" in p for p in found)
    assert "tabulate: in pyproject.toml, not in the lock" in found
    assert "scipy: pinned as a dependency of l2lab, which no longer asks for it" in found

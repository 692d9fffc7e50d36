"""The environment a run trained in, recorded as tags of its MLflow run, and compared later.

MLflow records the git commit (``mlflow.source.git.commit``, which the harness sets for every
run); this adds what decides whether numbers can be reproduced exactly: whether the tree had
uncommitted changes (and the diff, as the artifact ``environment/git.diff``), the versions of
Python and the libraries that train and record, the device with its CUDA and cuDNN, the CPU's
vector instruction set torch's kernels run (AVX2 and AVX-512 round some functions differently),
torch's thread count (a CPU sum splits by it) and the deterministic flags. Computed once per
process and stack, not per job: a vectorized stack's K runs share it. ``reproduce --check``
prints what differs from today's environment, and whether that can explain a mismatch.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from l2lab.base import CONF_DIR

PREFIX = "l2lab.env."
DIFF_ARTIFACT = "environment/git.diff"
MAX_DIFF_CHARS = 1_000_000
#: Keys whose change can move a CPU run's numbers (the others are recorded for the record).
NUMERIC = ("torch", "torch_threads", "cpu_capability", "device", "cuda", "cudnn",
           "deterministic", "git_dirty", "git_diff_sha", "lightning", "python", "machine")
_PACKAGES = {"torch": "torch", "lightning": "pytorch-lightning", "hydra": "hydra-core",
             "omegaconf": "omegaconf", "mlflow": "mlflow", "numpy": "numpy"}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


@functools.lru_cache(maxsize=4)
def git_state(root: Path = CONF_DIR.parent) -> tuple[bool | None, str]:
    """(dirty, diff against HEAD) of the project's checkout; (None, "") outside git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=False)

    try:
        status = git("status", "--porcelain", "--untracked-files=no")
        if status.returncode != 0:
            return None, ""
        if not status.stdout.strip():
            return False, ""
        return True, git("diff", "HEAD").stdout[:MAX_DIFF_CHARS]
    except (OSError, subprocess.SubprocessError):
        return None, ""


def device(accelerator: str = "auto") -> str:
    import torch

    if str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible)"
    return "cpu"


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels dispatch to (``AVX2``, ``AVX512``,
    ``DEFAULT``...): a kernel computes a tensor in vector blocks and its tail in scalar code, and
    where the two round differently (sigmoid, SiLU, softplus) the block width changes the bits."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def tags(trainer: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The environment as run tags (``l2lab.env.*``): one call per stack. ``trainer``: the
    run's trainer settings (its ``accelerator`` and ``deterministic`` are recorded)."""
    import hashlib

    import torch

    trainer = trainer or {}
    dirty, diff = git_state()
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    cudnn = torch.backends.cudnn.version() if cuda else None
    out = {
        "python": platform.python_version(),
        **{name: _version(dist) for name, dist in _PACKAGES.items()},
        "torch": torch.__version__,  # with its build (+cu130, +cpu)
        "machine": f"{platform.system()} {platform.machine()}",
        "device": device(trainer.get("accelerator", "auto")),
        "cuda": str(cuda or "none"), "cudnn": str(cudnn or "none"),
        "torch_threads": str(torch.get_num_threads()),
        "cpu_capability": cpu_capability(),
        "deterministic": (f"trainer.deterministic={trainer.get('deterministic')}, "
                          f"torch.use_deterministic_algorithms="
                          f"{torch.are_deterministic_algorithms_enabled()}, "
                          f"cudnn.deterministic={torch.backends.cudnn.deterministic}, "
                          f"cudnn.benchmark={torch.backends.cudnn.benchmark}"),
        "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
    }
    if dirty:
        out["git_diff_sha"] = hashlib.sha256(diff.encode()).hexdigest()[:16]
    return {PREFIX + k: v for k, v in out.items()}


def diff_artifact() -> dict[str, str]:
    """``{"environment/git.diff": diff}`` when the tree is dirty, else nothing."""
    dirty, diff = git_state()
    return {DIFF_ARTIFACT: diff} if dirty and diff else {}


def differences(logged: Mapping[str, str], now: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(key, logged, now) for every environment tag that differs (a key a run did not record,
    an older run's, is left out)."""
    keys = sorted(k for k in now if k.startswith(PREFIX) and k in logged)
    return [(k[len(PREFIX):], logged[k], now[k]) for k in keys if logged[k] != now[k]]


def verdict(diffs: list[tuple[str, str, str]], metrics_differ: bool) -> str:
    """One paragraph for ``reproduce --check``: whether the environment explains the outcome."""
    numeric = [d for d in diffs if d[0] in NUMERIC]
    shown = ", ".join(f"{k} {a} -> {b}" for k, a, b in numeric)
    if metrics_differ and numeric:
        return (f"The environment differs in what can change the numbers ({shown}): that can "
                "explain the mismatch. CPU results are exact only with the same torch build, "
                "CPU instruction set, thread count (torch.set_num_threads) and code; re-run "
                "there to tell a bug from the environment.")
    if metrics_differ:
        return ("The environment is the same in everything that can change the numbers: the "
                "mismatch is not explained by it (a change in the code or a non-determinism).")
    if numeric:
        return f"The environment differs ({shown}), yet the results agree."
    return "Same environment in everything that can change the numbers."

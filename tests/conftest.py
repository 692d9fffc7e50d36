"""Shared fixtures: a temporary SQLite store, tiny configs, and the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

import l2lab.config.schema  # noqa: F401  (registers the config schemas that conf/ names)
from l2lab import CONF_DIR

# Tiny, fast settings shared by the end-to-end tests (digits: no download).
TINY = ["data.train_size=120", "data.val_size=60", "data.batch_size=40", "model.hidden=[32]",
        "trainer.max_epochs=3"]


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    """Tests choose their store explicitly; a developer's MLFLOW_TRACKING_URI must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


@pytest.fixture
def client(store: str) -> MlflowClient:
    return MlflowClient(store)


def make_cfg(*overrides: str, tiny: bool = True):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*(TINY if tiny else []), *overrides])


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 600, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if env is None or \
        "MLFLOW_TRACKING_URI" not in env else None
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def runs_of(client: MlflowClient, **filters: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    return client.search_runs(exps, filter_string=flt, max_results=1000)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float,
                 output: Callable[[], str]) -> None:
    """Wait until the MLflow server at ``base`` answers ``/health``; fail with its ``output()``
    if it exits, or when ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            assert proc.poll() is None, output()[-3000:]
            assert time.time() < deadline, f"the mlflow server at {base} did not start"
            time.sleep(0.5)

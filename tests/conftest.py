"""Shared fixtures and helpers: a temporary SQLite store, tiny configs, the CLI in a subprocess,
free ports, MLflow servers (started, waited for, stopped) and the checks of a finished sweep.

Test modules import helpers from here only, never from one another."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

import l2lab.config.schema  # noqa: F401  (registers the config schemas that conf/ names)
from l2lab import CONF_DIR
from l2lab.console import KNOWN_WARNINGS

# Tiny, fast settings shared by the end-to-end tests (digits: no download).
TINY = ["data.train_size=120", "data.val_size=60", "data.batch_size=40", "model.hidden=[32]",
        "trainer.max_epochs=3"]


def ignored(message: str, category: type[Warning], module: str) -> str:
    """A ``filterwarnings`` line (pytest's ini and mark syntax: regular expressions) that ignores
    one of ``console.KNOWN_WARNINGS``."""
    return f"ignore:{message}:{category.__name__}:{module}"


#: The suite's warning filters: the third-party warnings the harness cannot fix, and no other.
KNOWN = tuple(ignored(*w) for w in KNOWN_WARNINGS)


#: Torch's threads in each test process and in every process a test starts (they inherit the
#: environment): one. `make test` runs one xdist worker per core, and two workers whose OpenMP
#: pools each want every core spin against each other; measured on the 2-core CPU, two test
#: files side by side took 212 s with torch's default threads and 103 s with one each. Set
#: before any test module imports torch; a value already in the environment is kept.
TEST_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pytest_configure(config: pytest.Config) -> None:
    for key, value in TEST_THREADS.items():
        os.environ.setdefault(key, value)
    for line in KNOWN:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    """Tests choose their store explicitly; a developer's MLFLOW_TRACKING_URI must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty SQLite store with MLflow's schema, made once per session (per xdist worker):
    creating the schema (MLflow's migrations) takes 3-10 s on 2 busy cores, copying it none."""
    from l2lab.tracking import tracker

    db = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    tracker.connect(f"sqlite:///{db}")
    with sqlite3.connect(db) as con:  # everything in the one file, nothing in its -wal
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def copy_store(template: Path, folder: Path) -> str:
    """A fresh store at ``folder/mlruns/mlflow.db`` (where the harness puts its default one),
    copied from ``template``; returns its URI."""
    db = folder / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, db)
    return f"sqlite:///{db}"


@pytest.fixture
def store(tmp_path: Path, store_template: Path) -> str:
    """This test's own SQLite store (already created: in-process code and the CLI alike find
    the schema in place)."""
    return copy_store(store_template, tmp_path)


@pytest.fixture
def client(store: str) -> MlflowClient:
    return MlflowClient(store)


@pytest.fixture(scope="session")
def mnist1d_root(tmp_path_factory) -> Path:
    """MNIST-1D generated once per session (per xdist worker), for ``data.root=``: generating
    it takes 2-12 s on 2 cores, and the cached file serves every split and size."""
    from l2lab.core.data import load_data

    root = tmp_path_factory.mktemp("mnist1d_data")
    load_data({"name": "mnist1d", "root": str(root), "train_size": None, "val_size": 500,
               "split_seed": 0, "batch_size": 100})
    return root


#: The fake CIFAR-10's sizes: five training batches of 60 and a test batch of 60 (360 images).
CIFAR_TRAIN_PER_BATCH, CIFAR_TEST = 60, 60


def write_cifar10(root: Path, seed: int = 0) -> dict[str, str]:
    """Random images in CIFAR-10's own on-disk format (``root/cifar-10-batches-py``: pickled
    dicts ``data_batch_1..5``, ``test_batch``, ``batches.meta``), so that torchvision's own class
    reads them; returns each file's md5, for :func:`trust_cifar10`."""
    import hashlib
    import pickle

    import numpy as np

    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n: int) -> dict:
        return {"batch_label": b"fake", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, n).tolist(), "filenames": [b""] * n}

    files = {f"data_batch_{i}": batch(CIFAR_TRAIN_PER_BATCH) for i in range(1, 6)}
    files["test_batch"] = batch(CIFAR_TEST)
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)],
                             "num_cases_per_batch": CIFAR_TRAIN_PER_BATCH, "num_vis": 3072}
    for name, content in files.items():
        (base / name).write_bytes(pickle.dumps(content))
    return {name: hashlib.md5((base / name).read_bytes()).hexdigest() for name in files}


def trust_cifar10(monkeypatch: pytest.MonkeyPatch, md5s: dict[str, str]) -> None:
    """Point torchvision's CIFAR10 at these files' checksums (its class lists name the official
    files' md5s), so its own integrity check runs, and passes, on the fake files."""
    import torchvision

    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5s[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5s[n]] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})


@pytest.fixture(scope="session")
def _cifar10_files(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("cifar10_data")
    return root, write_cifar10(root)


@pytest.fixture
def cifar10_root(_cifar10_files, monkeypatch) -> Path:
    """A ``data.root`` holding the fake CIFAR-10 (written once per session), with torchvision
    pointed at its checksums for this test."""
    root, md5s = _cifar10_files
    trust_cifar10(monkeypatch, md5s)
    return root


def make_cfg(*overrides: str, tiny: bool = True):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*(TINY if tiny else []), *overrides])


def python_c(code: str, *, env: dict | None = None, cwd: Path | None = None,
             timeout: float = 300) -> str:
    """The stdout of ``python -c code`` in a fresh interpreter, which must exit 0: for tests whose
    subject is what a new process imports (``env`` None: this process's environment)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=timeout)
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-3000:]
    return r.stdout


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


def free_port() -> int:
    """A loopback port free now (the OS picks it, so parallel xdist workers never collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the team store (scripts/mlflow_server.sh on a throwaway PostgreSQL) ------------------------
def postgres_missing() -> str | None:
    """Why ``scripts/mlflow_server.sh --local`` cannot run here, or None when it can."""
    if not (shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb")):
        return "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


def _pids_with(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmd:
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return pids


def stop_server(server: subprocess.Popen, pg_dir: Path, port: int) -> list[int]:
    """Stop ``scripts/mlflow_server.sh`` (SIGTERM: it stops mlflow, then PostgreSQL), kill what
    it left behind and remove its data folder; returns the processes it left (none expected)."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    leftovers = _pids_with(str(pg_dir)) + _pids_with(f"--port {port}")
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(pg_dir, ignore_errors=True)
    return leftovers


def check_sweep(client: MlflowClient, r: subprocess.CompletedProcess, tmp_path: Path,
                lams: tuple[str, ...] = ("0.0", "0.1"), epochs: int = 3) -> None:
    """One FINISHED parent, one FINISHED child per λ with every epoch logged, and the summary
    (its rows agree with the children's final val/ce)."""
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    assert parent.info.status == "FINISHED"
    children = runs_of(client, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(c.data.params["regularization.lam"] for c in children) == sorted(lams)
    # named after the swept keys only (seed is not swept here)
    assert sorted(c.data.tags["mlflow.runName"] for c in children) == sorted(
        f"lam={float(x):g}" for x in lams)
    for c in children:
        assert c.info.status == "FINISHED"
        for key in ("train/ce", "val/ce", "weights/sq_norm_total"):
            steps = [m.step for m in client.get_metric_history(c.info.run_id, key)]
            assert sorted(steps) == list(range(epochs)), key
    df = pd.read_csv(client.download_artifacts(parent.info.run_id, "summary.csv",
                                               str(tmp_path)))
    assert [f"{x:g}" for x in df["lam"]] == [f"{float(x):g}" for x in sorted(lams, key=float)]
    by_lam = {c.data.params["regularization.lam"]: c.data.metrics["val/ce"] for c in children}
    assert df["val/ce_mean"].tolist() == pytest.approx([by_lam[x] for x in sorted(lams,
                                                                                 key=float)])
    assert "lam" in r.stdout and "val/ce" in r.stdout


@contextlib.contextmanager
def mlflow_server(store_uri: str, cwd: Path, *args: str, timeout: float = 300) -> Iterator[str]:
    """``mlflow server`` on ``store_uri`` on a free loopback port: yields its base URL once
    ``/health`` answers (a loaded 2-core machine takes a minute or more), then stops it."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store_uri,
         *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout, lambda: proc.stderr.read().decode())
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a temporary SQLite store, serving artifacts (one per test module
    that asks: the UI tests)."""
    root = tmp_path_factory.mktemp("ui")
    with mlflow_server(f"sqlite:///{root}/mlflow.db", root,
                       "--artifacts-destination", str(root / "artifacts")) as base:
        yield root, base


@pytest.fixture
def float64():
    """float64 as torch's default dtype for exact comparisons of the maths; restored after, so
    other tests keep float32."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def reg_cfg(**kw) -> dict:
    """A whole ``regularization`` node (l2's defaults, λ = 0.3) with ``kw`` changed: what
    ``build_penalty`` reads, without composing a config."""
    base = dict(lam=0.3, layers=["*"], exclude=[], types=["Linear", "Conv1d", "Conv2d"],
                min_params=0, lam_per_layer={}, include_bias=False, normalize="batch",
                mode="loss")
    return {**base, **kw}

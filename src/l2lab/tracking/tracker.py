"""One run's MLflow record through the public client: the store, a run's life, its params, tags,
metrics and artifacts. (Many runs at once: :mod:`l2lab.tracking.bulk`; reading runs back:
:mod:`l2lab.tracking.runs`.)

The default store is SQLite at ``<cwd>/mlruns/mlflow.db`` with artifacts as plain files under
``mlruns/artifacts``. Several processes (parallel sweep jobs) may write to it at once, so the schema
is created under a file lock, and every SQLite connection waits for locks instead of failing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

if TYPE_CHECKING:
    import torch

from l2lab.base import ConfigError
from l2lab.records import FAILURE_TAG  # noqa: F401  (why a run ended FAILED or KILLED)
from l2lab.tracking import store

# The URI and login checks need neither torch nor MLflow: they live in l2lab.tracking.store (a
# single run's unreachable server or refused login is reported before the heavy imports),
# re-exported here.
from l2lab.tracking.store import ENV_URI, PROBE_TIMEOUT_S, probe_server, resolve_uri  # noqa: F401

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep CLI output readable
_VALID_KEY = re.compile(r"^[/\w.\- :]*$")


# -- the store -----------------------------------------------------------------------------------
def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Where new experiments keep artifacts: beside the database for SQLite, the server's choice
    otherwise."""
    db = sqlite_path(uri)
    return (db.parent / "artifacts").as_uri() if db else None


SQLITE_BUSY_TIMEOUT_MS = 60_000


def _sqlite_busy_timeout() -> None:
    """Make every SQLite connection of this process wait up to 60 s for a lock held by another
    job, instead of failing at once with 'database is locked'."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if getattr(_sqlite_busy_timeout, "done", False):
        return

    @event.listens_for(Engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        if type(dbapi_conn).__module__.startswith("sqlite3"):
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.close()

    _sqlite_busy_timeout.done = True  # type: ignore[attr-defined]


_CLIENTS: dict[str, Any] = {}
MLFLOW_SECONDS = [0.0]  # time spent inside MLflow client calls by this process (benchmarks)


class _TimedClient:
    """An ``MlflowClient`` that adds the time of every call to ``MLFLOW_SECONDS``."""

    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                MLFLOW_SECONDS[0] += time.perf_counter() - t0

        return timed

_EXPERIMENTS: dict[tuple[str, str], str] = {}
#: A training experiment, for the MLflow versions that read it (3.17 follows the link's
#: ``?workflowType=machine_learning`` instead).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def connect(uri: str):
    """An ``MlflowClient`` on a store that is known to work (schema created, server answering).

    Once per process and store: the jobs of a sweep share a process and a store."""
    if uri not in _CLIENTS:
        t0 = time.perf_counter()
        _CLIENTS[uri] = _TimedClient(_connect(uri))
        MLFLOW_SECONDS[0] += time.perf_counter() - t0
    return _CLIENTS[uri]


def _connect(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        probe_server(uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        return MlflowClient(uri)
    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(uri)
    _sqlite_busy_timeout()
    db.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent schema creation on a fresh file races ("duplicate column name"): one at a time.
    with FileLock(str(db) + ".lock", timeout=300):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        import sqlite3

        with sqlite3.connect(db, timeout=60) as con:  # WAL: readers (the UI) never block a writer
            con.execute("PRAGMA journal_mode=WAL")
    return client


def experiment_id(client, name: str, uri: str) -> str:
    """Get or create the experiment (under the store lock, so parallel jobs create it once)."""
    if (uri, name) not in _EXPERIMENTS:
        _EXPERIMENTS[(uri, name)] = _experiment_id(client, name, uri)
    return _EXPERIMENTS[(uri, name)]


def _experiment_id(client, name: str, uri: str) -> str:
    db = sqlite_path(uri)
    with FileLock(str(db) + ".lock", timeout=300) if db else contextlib.nullcontext():
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"experiment_name: experiment {name!r} is deleted in {uri}; restore it "
                    "(mlflow experiments restore) or choose another experiment_name."
                )
            return exp.experiment_id

        return client.create_experiment(name, artifact_location=artifact_location(uri),
                                        tags=EXPERIMENT_KIND)


# -- params --------------------------------------------------------------------------------------
def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """A resolved config as Hydra override keys (``optimizer.lr``): lists as JSON, and a dict
    whose keys MLflow rejects (``lam_per_layer`` with ``*``), or an empty one, as one JSON value."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            if v and all(_VALID_KEY.match(str(kk)) for kk in v):
                out.update(flatten_params(v, key + "."))
            else:
                out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = _value(v)
    return out


@functools.lru_cache(maxsize=8)
def git_commit(cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                           timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


MAX_METRICS = 1000  # MLflow's cap on metrics per log_batch
FAILURE_MAX_CHARS = 7000  # a reason is cut here: well inside MLflow's 8000-character tag values


def epoch_chunks(epochs: list[tuple[int, Mapping[str, float], int]], size: int) -> list[list]:
    """Metric lists of at most ``size`` entries that end on epoch boundaries (an epoch larger
    than ``size`` on its own is split, having no better choice)."""
    from mlflow.entities import Metric

    chunks: list[list] = [[]]
    for step, metrics, ts in epochs:
        rows = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        if chunks[-1] and len(chunks[-1]) + len(rows) > size:
            chunks.append([])
        while len(rows) > size:
            chunks[-1].extend(rows[:size])
            rows = rows[size:]
            chunks.append([])
        chunks[-1].extend(rows)
    return [c for c in chunks if c]


# -- a run -----------------------------------------------------------------------------------------
class RunTracker:
    """One MLflow run, driven with explicit ids (no global 'active run': jobs may share a
    process)."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.ended = self.reopened = False

    @classmethod
    def start(cls, client, exp_id: str, run_name: str, tags: Mapping[str, str],
              start_time: int | None = None) -> RunTracker:
        try:
            run = client.create_run(exp_id, run_name=run_name, tags=dict(tags),
                                    start_time=start_time)
        except Exception as e:  # a login without EDIT there (HTTP 403): one clear paragraph
            if denied := store.permission_denied(e, exp_id):
                raise denied from None
            raise
        return cls(client, run.info.run_id)

    @classmethod
    def reopen(cls, client, run_id: str) -> RunTracker:
        """Continue a run (resume): RUNNING again, and the old failure reason no longer holds."""
        client.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, FAILURE_TAG)
        tracker = cls(client, run_id)
        tracker.reopened = True  # its logged epochs are not logged again
        return tracker

    def _log_batch(self, kind: str, items: list, size: int, **extra: list) -> None:
        """MLflow caps a batch at 100 params/tags or 1000 metrics: send in chunks."""
        for i in range(0, max(len(items), 1), size):
            self.client.log_batch(self.run_id, **{kind: items[i:i + size]}, **extra,
                                  synchronous=True)
            extra = {}

    def log_params(self, params: Mapping[str, str], tags: Mapping[str, str] | None = None
                   ) -> None:
        """Params (and a few tags: at most 100 together in the first call) in few store calls."""
        from mlflow.entities import Param, RunTag

        self._log_batch("params", [Param(k, str(v)) for k, v in params.items()], 100,
                        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._log_batch("tags", [RunTag(k, str(v)) for k, v in tags.items()], 100)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_epochs([(step, metrics, int(time.time() * 1000))])

    def log_epochs(self, epochs: Iterable[tuple[int, Mapping[str, float], int]]) -> None:
        """Several steps' metrics in as few calls as MLflow allows (1000 metrics a call), each
        call holding whole epochs: a kill between two calls never leaves an epoch half logged
        (logged epochs are detected by ``train/loss``, so the rest would never come)."""
        for chunk in epoch_chunks(list(epochs), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_state_dict(self, module: torch.nn.Module, artifact_file: str) -> None:
        import torch

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, p)
            self.log_file(p, str(Path(artifact_file).parent))

    def finish(self, status: str = "FINISHED", failure: str | None = None,
               end_time: int | None = None) -> None:
        """End the run once; a failure reason goes to the ``l2lab.failure`` tag first."""
        if self.ended:
            return
        if failure:
            self.client.set_tag(self.run_id, FAILURE_TAG, failure[:FAILURE_MAX_CHARS])
        self.client.set_terminated(self.run_id, status=status, end_time=end_time)
        self.ended = True


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["regularization.lam=0.1", "+x=1"]`` -> ``{"regularization.lam": "0.1", "x": "1"}``."""
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


class NullTracker:
    """Records nothing: DDP ranks 1..N-1 (only rank 0 writes) and the benchmark's no-MLflow
    side."""

    run_id = None
    ended = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def finish(self, status: str = "FINISHED", failure: str | None = None) -> None:
        pass

    def __getattr__(self, name: str):  # any other recording call: nothing either
        return lambda *args, **kwargs: None

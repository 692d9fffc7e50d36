"""The MLflow client on a store, and what every writer of runs shares: connecting once per process
and store, experiments, the time spent in MLflow, MLflow's batch limits and a failure's one line.

The default store is SQLite at ``<cwd>/mlruns/mlflow.db`` with artifacts as plain files under
``mlruns/artifacts``. Several processes (parallel sweep jobs) may write to it at once, so the schema
is created under a file lock, and every SQLite connection waits for locks instead of failing.
Below both the run writer (:mod:`l2lab.tracking.bulk`) and a run's view on it
(:mod:`l2lab.tracking.tracker`, which re-exports these names).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from l2lab.base import ConfigError
from l2lab.records import FAILURE_TAG  # noqa: F401  (why a run ended FAILED or KILLED)
from l2lab.tracking.store import probe_server

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep CLI output readable


# -- the client on a store ---------------------------------------------------------------------
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

    Once per process and store: the jobs of a sweep share a process and a store. On a SQLite
    store the bulk writer can write without MLflow (``compat.mlflow_sqlite.writable``), the
    client is :class:`_SqliteFirst`: MLflow is imported only if a call needs it."""
    if uri not in _CLIENTS:
        t0 = time.perf_counter()
        db = sqlite_path(uri)
        lazy = _SqliteFirst.open(uri, db) if db is not None else None
        _CLIENTS[uri] = _TimedClient(lazy if lazy is not None else _connect(uri))
        MLFLOW_SECONDS[0] += time.perf_counter() - t0
    return _CLIENTS[uri]


class _SqliteFirst:
    """``MlflowClient`` on a SQLite store whose schema l2lab reads and writes itself
    (``compat.mlflow_sqlite``), with MLflow imported only if a call needs it. Answered with
    ``sqlite3``: the reads a training command and a sweep's report make (an experiment by name,
    a run, metric histories) and an experiment's tag; a run's writes go through :attr:`writer`
    (``bulk.sqlite.SqliteRunWriter``, made by ``tracker.as_writer``). Any other call (creating
    an experiment, a run it cannot find, to let MLflow raise its own error) goes to a real
    client, made on first need. Why: MLflow's import and store are ~1.9 s of every command's
    start."""

    def __init__(self, uri: str, db: Path, reader: Any) -> None:
        self.tracking_uri, self._db, self._reader = uri, db, reader
        self._client: Any = None
        #: the store's ``sqlite`` run writer, made by ``tracker.as_writer`` (one connection)
        self.writer: Any = None

    @classmethod
    def open(cls, uri: str, db: Path) -> _SqliteFirst | None:
        from l2lab.compat import mlflow_sqlite as cs

        if cs.writable(db) is not None:
            return None
        reader = cs.open_reader(db, uri)
        return cls(uri, db, reader) if reader is not None else None

    def _real(self) -> Any:
        if self._client is None:
            self._client = _connect(self.tracking_uri)
        return self._client

    def get_experiment_by_name(self, name: str) -> Any:
        return self._reader.get_experiment_by_name(name)

    def get_run(self, run_id: str) -> Any:
        from l2lab.compat import mlflow_sqlite as cs

        try:
            return self._reader.get_run(run_id)
        except cs.NotFound:  # MLflow's own error
            return self._real().get_run(run_id)

    def metric_histories(self, run_ids: Any, keys: Any) -> Any:
        return self._reader.metric_histories(run_ids, keys)

    def set_experiment_tag(self, experiment_id: str, key: str, value: Any) -> None:
        from l2lab.compat import mlflow_sqlite as cs

        cs.set_experiment_tag(self._db, experiment_id, key, str(value),
                              SQLITE_BUSY_TIMEOUT_MS / 1000)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # none of the client's own (pickle's lookups, a half-made one)
            raise AttributeError(name)
        return getattr(self._real(), name)


def reader(uri: str):
    """A client for reading only (``compare``, ``load_runs``): on a SQLite store whose schema
    :mod:`l2lab.compat.mlflow_sqlite` knows, its tables read with ``sqlite3`` and MLflow never
    imported (~2.6 s of CPU saved); otherwise :func:`connect`."""
    db = sqlite_path(uri)
    if db is not None:
        from l2lab.compat.mlflow_sqlite import open_reader

        found = open_reader(db, uri)
        if found is not None:
            return found
    from l2lab.console import quiet_libraries

    quiet_libraries()
    return connect(uri)


_LOCKS: dict[Path, FileLock] = {}


def store_lock(db: Path) -> FileLock:
    """The SQLite store's file lock, one object per store and process, so that it is reentrant:
    creating an experiment under it may make the client, which takes it too."""
    if db not in _LOCKS:
        _LOCKS[db] = FileLock(str(db) + ".lock", timeout=300)
    return _LOCKS[db]


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
    with store_lock(db):
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
    with store_lock(db) if db else contextlib.nullcontext():
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


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

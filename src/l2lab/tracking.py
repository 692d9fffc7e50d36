"""Everything that talks to MLflow: the store, a run's life, params/tags/metrics/artifacts.

The default store is SQLite at ``<cwd>/mlruns/mlflow.db`` with artifacts as plain files under
``mlruns/artifacts``. Several processes (parallel sweep jobs) may write to it at once, so the schema
is created under a file lock, and every SQLite connection waits for locks instead of failing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from filelock import FileLock

from l2lab import ConfigError, store

# The URI and login checks need neither torch nor MLflow: they live in l2lab.store (a single run's
# unreachable server or refused login is reported before the heavy imports), re-exported here.
from l2lab.store import ENV_URI, PROBE_TIMEOUT_S, probe_server, resolve_uri  # noqa: F401

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
            cur.execute("PRAGMA busy_timeout = 60000")
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
        return client.create_experiment(name, artifact_location=artifact_location(uri))


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


# -- a run -----------------------------------------------------------------------------------------
class RunTracker:
    """One MLflow run, driven with explicit ids (no global 'active run': jobs may share a
    process)."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.ended = False

    @classmethod
    def start(cls, client, exp_id: str, run_name: str, tags: Mapping[str, str]) -> RunTracker:
        try:
            run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        except Exception as e:  # a login without EDIT there (HTTP 403): one clear paragraph
            if denied := store.permission_denied(e, exp_id):
                raise denied from None
            raise
        return cls(client, run.info.run_id)

    @classmethod
    def reopen(cls, client, run_id: str) -> RunTracker:
        """Continue a run (resume): RUNNING again, and the old failure reason no longer holds."""
        client.update_run(run_id, status="RUNNING")
        if "l2lab.failure" in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, "l2lab.failure")
        return cls(client, run_id)

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
        """Several steps' metrics in as few calls as MLflow allows (1000 metrics a call)."""
        from mlflow.entities import Metric

        self._log_batch("metrics", [Metric(k, float(v), ts, int(step))
                                    for step, metrics, ts in epochs for k, v in metrics.items()],
                        1000)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_state_dict(self, module: torch.nn.Module, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, p)
            self.log_file(p, str(Path(artifact_file).parent))

    def finish(self, status: str = "FINISHED", failure: str | None = None) -> None:
        """End the run once; a failure reason goes to the ``l2lab.failure`` tag first."""
        if self.ended:
            return
        if failure:
            self.client.set_tag(self.run_id, "l2lab.failure", failure[:7000])
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True


# -- the Lightning side: buffered per-epoch metrics + checkpoints -------------------------------
FLUSH_EVERY_S = 5.0


class MetricBuffer:
    """One run's per-epoch metrics on their way to the store.

    Each ``log_batch`` is a SQLite transaction (~15-20 ms), so one per run per epoch dominated a
    sweep of small networks. Epochs wait here and go out together (every few seconds and at the
    end: the UI still shows live curves). Epochs the store already holds are skipped: a resumed
    run re-trains the epochs past its checkpoint, and every step is still logged exactly once.
    """

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self.pending: list[tuple[int, dict[str, float], int]] = []
        self.logged: set[int] = set()

    def add(self, epoch: int, metrics: Mapping[str, float], ts: int | None = None) -> None:
        if epoch not in self.logged:
            self.pending.append((int(epoch), dict(metrics), ts or int(time.time() * 1000)))

    def flush(self) -> None:
        if self.pending:
            self.tracker.log_epochs(self.pending)
            self.logged.update(e for e, _, _ in self.pending)
            self.pending = []


def _restore_pending(buffer: MetricBuffer, state: Mapping[str, Any] | None) -> None:
    """On resume: the epochs a checkpoint carried but the store may lack (a kill between saving
    the checkpoint and logging), then skip every epoch the store already has."""
    if state is None:
        return
    buffer.logged = buffer.tracker.logged_steps("train/loss")
    pending = state.get("pending")
    if pending is None and state.get("last"):  # checkpoints written before buffering
        pending = [(*state["last"], None)]
    for epoch, metrics, ts in pending or []:
        buffer.add(epoch, metrics, ts)
    buffer.flush()


def _due(trainer: pl.Trainer, since: float, every_s: float) -> bool:
    last = trainer.current_epoch >= (trainer.max_epochs or 0) - 1 or trainer.should_stop
    return last or time.monotonic() - since >= every_s


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class EpochRecorder(pl.callbacks.Checkpoint):
    """Every epoch's metrics (``step = epoch``) into the run's buffer; every ``flush_every_s`` and
    at the last epoch: ``last.ckpt`` first, then the buffered metrics; on an error or interrupt:
    the buffered metrics (the weights are mid-epoch then, so no checkpoint).

    It is a ``Checkpoint`` so that Lightning calls it after the module's ``on_train_epoch_end``
    (where the epoch's numbers are made) and adds no checkpoint callback of its own. The buffered
    epochs travel inside the checkpoint: a run killed between the save and the logging logs them
    on resume, so every step is logged exactly once.
    """

    def __init__(self, tracker: RunTracker, ckpt_path: Path, echo: bool = True,
                 flush_every_s: float = FLUSH_EVERY_S) -> None:
        self.tracker, self.ckpt_path, self.echo = tracker, Path(ckpt_path), echo
        self.buffer, self.flush_every_s = MetricBuffer(tracker), float(flush_every_s)
        self.last: tuple[int, dict[str, float]] | None = None
        self._restored: dict[str, Any] | None = None
        self._flushed_at = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last, "pending": list(self.buffer.pending)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last, self._restored = state_dict.get("last"), state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _restore_pending(self.buffer, self._restored)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, metrics = trainer.current_epoch, dict(pl_module.epoch_metrics)
        self.last = (epoch, metrics)
        self.buffer.add(epoch, metrics)
        if self.echo:
            shown = ("train/ce", "train/l2", "val/ce", "gap/ce", "val/acc")
            parts = [f"{k}={metrics[k]:.4f}" for k in shown if k in metrics]
            print(f"epoch {epoch:3d}  " + "  ".join(parts), flush=True)
        # under DDP every rank must take the same decision (saving is collective): rank 0's
        if trainer.strategy.broadcast(_due(trainer, self._flushed_at, self.flush_every_s)):
            trainer.save_checkpoint(self.ckpt_path.with_suffix(".tmp"), weights_only=False)
            if trainer.is_global_zero:  # the only rank that writes it
                os.replace(self.ckpt_path.with_suffix(".tmp"), self.ckpt_path)
            self.buffer.flush()
            self._flushed_at = time.monotonic()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.buffer.flush()


class StackedRecorder(pl.callbacks.Checkpoint):
    """``EpochRecorder`` for K stacked networks, one MLflow run each.

    A network that diverges has its run ended FAILED at once, with its reason, while the others
    train on. Checkpoints are written per network in the ordinary format
    (``make_checkpoints``), so ``resume=RUN_ID`` continues any of them alone, the ordinary way.
    """

    def __init__(self, trackers: list[RunTracker], ckpt_paths: list[Path],
                 make_checkpoints: Callable[[pl.Trainer, list], list[dict]],
                 flush_every_s: float = FLUSH_EVERY_S) -> None:
        self.trackers, self.ckpt_paths = trackers, [Path(p) for p in ckpt_paths]
        self.make_checkpoints, self.flush_every_s = make_checkpoints, float(flush_every_s)
        self.buffers = [MetricBuffer(t) for t in trackers]
        self.last: list[tuple[int, dict[str, float]] | None] = [None] * len(trackers)
        self._flushed_at = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        for k, metrics in enumerate(pl_module.epoch_metrics):
            if metrics is not None and not self.trackers[k].ended:
                self.last[k] = (epoch, metrics)
                self.buffers[k].add(epoch, metrics)
        for k, reason in pl_module.failures.items():
            if not self.trackers[k].ended:
                self.buffers[k].flush()
                self.trackers[k].finish("FAILED", failure=f"NonFiniteLossError: {reason}")
        if _due(trainer, self._flushed_at, self.flush_every_s):
            live = [k for k, t in enumerate(self.trackers) if not t.ended]
            states = [{"last": self.last[k], "pending": list(self.buffers[k].pending)}
                      if k in live else None for k in range(len(self.trackers))]
            for k, ckpt in enumerate(self.make_checkpoints(trainer, states)):
                if k in live:
                    save_atomic(ckpt, self.ckpt_paths[k])
            for k in live:
                self.buffers[k].flush()
            self._flushed_at = time.monotonic()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        for b in self.buffers:
            b.flush()


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


# -- reading runs back (sweep summary, compare) ---------------------------------------------------
HISTORY_KEYS = ("train/ce", "val/ce", "weights/sq_norm_total")
_NOT_GROUPED = ("seed", "tracking.uri", "resume", "reuse", "experiment_name")


def varying_keys(runs: Iterable) -> list[str]:
    """Config keys (other than ``seed`` and bookkeeping) whose value differs between runs, as
    overridden or as logged in params: they make the rows of the summary table, so runs are
    pooled over seeds only when their configs are otherwise the same."""
    runs = list(runs)
    overrides = [parse_overrides(json.loads(r.data.tags.get("l2lab.overrides", "[]")))
                 for r in runs]
    keys = {k for ov in overrides for k in ov
            if not k.startswith("hydra.") and k not in _NOT_GROUPED}
    varying = {k for k in keys if len({ov.get(k) for ov in overrides}) > 1}
    trained = [r.data.params for r in runs if r.data.params]
    params = {k for p in trained for k in p if k not in _NOT_GROUPED and not k.startswith("l2.")}
    varying |= {k for k in params if len({p.get(k) for p in trained}) > 1}
    return sorted(varying, key=lambda k: (k != "regularization.lam", k))


def load_records(client, runs: Iterable) -> list:
    """MLflow runs -> ``report.RunRecord`` (final values and the histories the figures need)."""
    from l2lab.report import RunRecord

    runs = list(runs)
    keys = varying_keys(runs)
    records = []
    for run in runs:
        params, tags = run.data.params, run.data.tags
        ov = parse_overrides(json.loads(tags.get("l2lab.overrides", "[]")))
        group = {k: ov.get(k, params.get(k, "")) for k in keys}
        try:
            lam = float(params.get("regularization.lam", "nan"))
        except ValueError:
            lam = math.nan
        history = {}
        if run.data.metrics:
            for k in HISTORY_KEYS:
                points = client.get_metric_history(run.info.run_id, k)
                history[k] = sorted((m.step, m.value) for m in points)
        records.append(RunRecord(
            run_id=run.info.run_id, name=tags.get("mlflow.runName", run.info.run_id),
            status=run.info.status, group=group, lam=lam,
            seed=int(params.get("seed", 0) or 0), failure=tags.get("l2lab.failure"),
            final=dict(run.data.metrics), history=history))
    return records

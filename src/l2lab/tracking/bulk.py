"""The MLflow record of a whole stack at once: K runs cost O(1) store round trips per operation.

A stack of K networks is K MLflow runs. Written one run at a time through ``MlflowClient``, every
create, params, flush and finish is K store calls (each a SQLite transaction of ~15-20 ms, or an
HTTP request), which dominated sweeps of small networks. ``BulkStore`` takes the K runs together:

- **SQL stores** (``sqlite://``, ``postgresql://``...): one transaction per call for all K runs,
  written through MLflow's own ORM tables (``SqlRun``, ``SqlTag``, ``SqlParam``, ``SqlMetric``,
  ``SqlLatestMetric``) on the engine of MLflow's own store, with MLflow's own validation, so the
  rows are the ones ``SqlAlchemyStore`` writes (``latest_metrics`` included). This is only done when
  the database's alembic revision is the installed MLflow's head: the schema is then exactly the one
  these tables describe. Otherwise (another revision, a workspace-aware store, a file store) the
  writer falls back to the public client.
- **A tracking server** (``http(s)://``): REST has no multi-run call, so the K runs' calls go out
  concurrently from a small thread pool, each batch as large as MLflow allows (1000 metrics, 100
  params or tags).
- **Artifacts**: a run whose artifact URI is local (``file://``, as with the default SQLite store)
  gets its files written in place, with no store call at all; others get one call per file.

Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from l2lab.tracking import tracker as tr

# (step, {key: value}, timestamp in ms): one epoch of one run, as RunTracker.log_epochs takes it
Epoch = tuple[int, Mapping[str, float], int]
_IN_CHUNK = 500  # ids per SQL IN (...) list: far below every backend's bound-parameter limit
REST_WORKERS = 8


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _check_sql_names() -> None:
    from mlflow.store.tracking.dbmodels.models import (  # noqa: F401
        SqlExperiment,
        SqlLatestMetric,
        SqlMetric,
        SqlParam,
        SqlRun,
        SqlTag,
    )
    from mlflow.utils.name_utils import _generate_random_name  # noqa: F401
    from mlflow.utils.validation import (  # noqa: F401
        _validate_metric,
        _validate_param,
        _validate_tag,
    )


@functools.lru_cache(maxsize=1)
def expected_revision() -> str:
    """The alembic head of the installed MLflow: the schema its ORM tables describe."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def local_artifact_dir(artifact_uri: str | None) -> Path | None:
    """The folder of a ``file://`` (or plain path) artifact URI; ``None`` for remote stores."""
    if not artifact_uri:
        return None
    scheme = urlparse(artifact_uri).scheme
    if scheme == "file":
        from mlflow.utils.file_utils import local_file_uri_to_path

        return Path(local_file_uri_to_path(artifact_uri))
    if scheme == "" and os.path.isabs(artifact_uri):
        return Path(artifact_uri)
    return None


def _relative(artifact_path: str | None) -> str:
    """A run-relative POSIX path that cannot leave the run's artifact folder."""
    p = posixpath.normpath(artifact_path or ".")
    if p.startswith(("/", "../")) or p == "..":
        raise ValueError(f"artifact path must stay inside the run: {artifact_path!r}")
    return "" if p == "." else p


class BulkStore:
    """Writes the runs of one stack (or any set of runs in one store) together.

    Every method takes all runs at once and returns when the store has them. ``round_trips``
    counts store round trips (SQL transactions or client calls) made by this writer; ``mode``
    says which path it takes: ``"sql"``, ``"rest"`` or ``"client"`` (the fallback).
    """

    def __init__(self, uri: str, client: Any | None = None) -> None:
        self.uri = uri
        client = client if client is not None else tr.connect(uri)
        # the bare client, counted: this writer times its calls itself (tr.MLFLOW_SECONDS), once
        # for a whole group, whose calls may overlap in threads
        self.client = _Counting(getattr(client, "_client", client), self)
        self.round_trips = 0
        self._artifact_uris: dict[str, str] = {}
        self._engine: Any = None
        self._store: Any = None
        self.mode, self.why = self._choose_mode()

    # -- which path -------------------------------------------------------------------------
    def _choose_mode(self) -> tuple[str, str]:
        if self.uri.startswith(("http://", "https://")):
            return "rest", "tracking server: concurrent client calls"
        from mlflow.tracking._tracking_service.utils import _get_store

        try:
            from mlflow.store.db.utils import _get_schema_version
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            _check_sql_names()  # the private names the SQL path uses exist in this MLflow

            store = _get_store(self.uri)
            if type(store) is not SqlAlchemyStore:  # file store, workspace-aware store, ...
                return "client", f"not a plain SqlAlchemyStore ({type(store).__name__})"
            found, head = _get_schema_version(store.engine), expected_revision()
        except Exception as e:  # noqa: BLE001  any surprise: the public client still works
            return "client", f"SQL path unavailable ({tr.one_line(e)})"
        if found != head:
            return "client", f"alembic revision {found} is not this MLflow's head {head}"
        self._engine = store.engine  # MLflow's cached engine: its pool, the busy timeout hook
        self._store = store
        return "sql", f"{store.engine.dialect.name} at alembic head {head}"

    def _timed(self, fn: Callable[[], Any]) -> Any:
        """Adds the time to ``tracking.MLFLOW_SECONDS``, as the client's own calls do."""
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            tr.MLFLOW_SECONDS[0] += time.perf_counter() - t0

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        """One transaction, set up as MLflow's managed sessions are, except that SQLite waits as
        long as the project says (``tracking.SQLITE_BUSY_TIMEOUT_MS``), not MLflow's 20 s."""
        from sqlalchemy import text
        from sqlalchemy.orm import Session

        self.round_trips += 1
        with Session(self._engine) as s:
            if self._engine.dialect.name == "sqlite":
                s.execute(text("PRAGMA foreign_keys = ON;"))
                s.execute(text(f"PRAGMA busy_timeout = {tr.SQLITE_BUSY_TIMEOUT_MS};"))
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def _each(self, fn: Callable[[Any], Any], run_ids: Sequence[Any]) -> list:
        """``fn`` per run through the client: concurrently for a server, in turn otherwise."""
        if self.mode == "rest" and len(run_ids) > 1:
            with ThreadPoolExecutor(min(REST_WORKERS, len(run_ids))) as pool:
                return list(pool.map(fn, run_ids))
        return [fn(r) for r in run_ids]

    def _tracker(self, run_id: str) -> tr.RunTracker:
        return tr.RunTracker(self.client, run_id)

    # -- runs ------------------------------------------------------------------------------
    def create_runs(self, experiment_id: str, names: Sequence[str],
                    tags_list: Sequence[Mapping[str, str]], start_time: int | None = None
                    ) -> list[str]:
        """Creates one RUNNING run per name (tags as given, ``mlflow.runName`` = name) in one
        transaction; returns their ids in order."""
        if len(names) != len(tags_list):
            raise ValueError("create_runs: one tags mapping per name")
        start = start_time or _now_ms()
        if self.mode != "sql":
            def create(i: int) -> str:
                run = self.client.create_run(experiment_id, start_time=start,
                                             tags={k: str(v) for k, v in tags_list[i].items()},
                                             run_name=names[i])
                self._artifact_uris[run.info.run_id] = run.info.artifact_uri
                return run.info.run_id

            return self._timed(lambda: self._each(create, range(len(names))))
        return self._timed(lambda: self._create_sql(experiment_id, names, tags_list, start))

    def _create_sql(self, experiment_id: str, names: Sequence[str],
                    tags_list: Sequence[Mapping[str, str]], start: int) -> list[str]:
        from mlflow.entities import LifecycleStage, RunStatus, SourceType
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
        from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlRun, SqlTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
        from mlflow.utils.name_utils import _generate_random_name
        from mlflow.utils.uri import append_to_uri_path

        runs, tags, ids = [], [], []
        with self._session() as s:
            exp = s.get(SqlExperiment, int(experiment_id))
            if exp is None:
                raise MlflowException(f"No Experiment with id={experiment_id} exists",
                                      RESOURCE_DOES_NOT_EXIST)
            if exp.lifecycle_stage != LifecycleStage.ACTIVE:
                raise MlflowException(f"The experiment {experiment_id} must be in the 'active' "
                                      f"state. Current state is {exp.lifecycle_stage}.",
                                      INVALID_PARAMETER_VALUE)
            for name, given in zip(names, tags_list, strict=True):  # as SqlAlchemyStore.create_run
                run_tags = {k: str(v) for k, v in given.items()}
                tag_name = run_tags.get(MLFLOW_RUN_NAME)
                if name and tag_name and name != tag_name:
                    raise MlflowException(f"Both 'run_name' argument and 'mlflow.runName' tag are "
                                          f"specified, but with different values "
                                          f"(run_name='{name}', mlflow.runName='{tag_name}').",
                                          INVALID_PARAMETER_VALUE)
                name = name or tag_name or _generate_random_name()
                run_tags.setdefault(MLFLOW_RUN_NAME, name)
                run_id = uuid.uuid4().hex
                artifact_uri = append_to_uri_path(exp.artifact_location, run_id, "artifacts")
                runs.append(dict(
                    run_uuid=run_id, name=name, artifact_uri=artifact_uri,
                    experiment_id=int(experiment_id),
                    source_type=SourceType.to_string(SourceType.UNKNOWN), source_name="",
                    entry_point_name="", user_id=run_tags.get(MLFLOW_USER, "unknown"),
                    status=RunStatus.to_string(RunStatus.RUNNING), start_time=start,
                    end_time=None, deleted_time=None, source_version="",
                    lifecycle_stage=LifecycleStage.ACTIVE))
                tags += [dict(run_uuid=run_id, key=k, value=v) for k, v in run_tags.items()]
                ids.append(run_id)
                self._artifact_uris[run_id] = artifact_uri
            _insert(s, SqlRun, runs)
            if tags:
                _insert(s, SqlTag, tags)
        return ids

    def _active_runs(self, s: Any, run_ids: Sequence[str]) -> dict[str, Any]:
        """The runs' rows (one SELECT per 500), checked as ``_check_run_is_active`` does."""
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
        from mlflow.store.tracking.dbmodels.models import SqlRun
        from sqlalchemy import select

        rows: dict[str, Any] = {}
        for chunk in _chunks(list(dict.fromkeys(run_ids)), _IN_CHUNK):
            rows.update({r.run_uuid: r for r in s.execute(
                select(SqlRun.run_uuid, SqlRun.lifecycle_stage, SqlRun.artifact_uri)
                .where(SqlRun.run_uuid.in_(chunk)))})
        for run_id in run_ids:
            run = rows.get(run_id)
            if run is None:
                raise MlflowException(f"Run with id={run_id} not found", RESOURCE_DOES_NOT_EXIST)
            if run.lifecycle_stage != LifecycleStage.ACTIVE:
                raise MlflowException(f"The run {run_id} must be in the 'active' state. Current "
                                      f"state is {run.lifecycle_stage}.", INVALID_PARAMETER_VALUE)
            self._artifact_uris.setdefault(run_id, run.artifact_uri)
        return rows

    # -- params and tags -------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Mapping[str, Any]],
                   tags: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Params (and tags) of every run: one transaction. As MLflow: a param logged again
        with the same value is a no-op, with another value an error."""
        tags = tags or {}
        run_ids = list(dict.fromkeys([*params, *tags]))
        if not run_ids:
            return
        if self.mode != "sql":
            self._timed(lambda: self._each(
                lambda r: self._tracker(r).log_params(params.get(r, {}), tags.get(r)), run_ids))
            return
        self._timed(lambda: self._params_tags_sql(run_ids, params, tags))

    def set_tags(self, tags: Mapping[str, Mapping[str, Any]]) -> None:
        """Sets (or overwrites) tags of every run: one transaction."""
        run_ids = [r for r, t in tags.items() if t]
        if not run_ids:
            return
        if self.mode != "sql":
            self._timed(lambda: self._each(lambda r: self._tracker(r).set_tags(tags[r]), run_ids))
            return
        self._timed(lambda: self._params_tags_sql(run_ids, {}, tags))

    def _params_tags_sql(self, run_ids: Sequence[str], params: Mapping[str, Mapping[str, Any]],
                         tags: Mapping[str, Mapping[str, Any]]) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
        from mlflow.store.tracking.dbmodels.models import SqlParam
        from mlflow.utils.validation import _validate_param
        from sqlalchemy import select

        checked = {r: [_validate_param(k, str(v), path=f"params[{i}]")
                       for i, (k, v) in enumerate(params.get(r, {}).items())] for r in run_ids}
        with self._session() as s:
            self._active_runs(s, run_ids)
            existing: dict[tuple[str, str], str] = {}
            with_params = [r for r in run_ids if checked[r]]
            for chunk in _chunks(with_params, _IN_CHUNK):
                for r, k, v in s.execute(select(SqlParam.run_uuid, SqlParam.key, SqlParam.value)
                                         .where(SqlParam.run_uuid.in_(chunk))):
                    existing[(r, k)] = v
            new, changed = [], []
            for r in with_params:
                for p in checked[r]:
                    old = existing.get((r, p.key))
                    if old is None:
                        new.append(dict(run_uuid=r, key=p.key, value=p.value))
                    elif old != p.value:
                        changed.append({"key": p.key, "old_value": old, "new_value": p.value})
                if changed:
                    raise MlflowException("Changing param values is not allowed. Params were "
                                          f"already logged='{changed}' for run ID='{r}'.",
                                          INVALID_PARAMETER_VALUE)
            if new:
                _insert(s, SqlParam, new)
            self._set_tags_sql(s, {r: tags[r] for r in run_ids if tags.get(r)})

    def _set_tags_sql(self, s: Any, tags: Mapping[str, Mapping[str, Any]]) -> None:
        """As ``SqlAlchemyStore._set_tags``: overwrite or insert; ``mlflow.runName`` renames."""
        from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
        from mlflow.utils.validation import _validate_tag
        from sqlalchemy import select

        wanted = {r: {t.key: t.value for t in (_validate_tag(k, str(v), path=f"tags[{i}]")
                                                for i, (k, v) in enumerate(kv.items()))}
                  for r, kv in tags.items() if kv}
        if not wanted:
            return
        keys = sorted({k for kv in wanted.values() for k in kv})
        current: set[tuple[str, str]] = set()
        for chunk in _chunks(list(wanted), _IN_CHUNK):
            current.update(s.execute(select(SqlTag.run_uuid, SqlTag.key).where(
                SqlTag.run_uuid.in_(chunk), SqlTag.key.in_(keys))).tuples())
        rows = [dict(run_uuid=r, key=k, value=v) for r, kv in wanted.items() for k, v in kv.items()]
        if changed := [row for row in rows if (row["run_uuid"], row["key"]) in current]:
            _update(s, SqlTag, changed)
        if new := [row for row in rows if (row["run_uuid"], row["key"]) not in current]:
            _insert(s, SqlTag, new)
        if renamed := [dict(run_uuid=row["run_uuid"], name=row["value"]) for row in rows
                       if row["key"] == MLFLOW_RUN_NAME]:
            _update(s, SqlRun, renamed)

    # -- metrics ---------------------------------------------------------------------------
    def log_metrics(self, epochs: Mapping[str, Sequence[Epoch]]) -> None:
        """Every run's pending epochs in one transaction (a server: one ``log_batch`` per 1000
        metrics per run, runs concurrently). ``latest_metrics`` follows as MLflow keeps it."""
        run_ids = [r for r, e in epochs.items() if e and any(m for _, m, _ in e)]
        if not run_ids:
            return
        if self.mode != "sql":
            self._timed(lambda: self._each(lambda r: self._tracker(r).log_epochs(epochs[r]),
                                           run_ids))
            return
        import sqlalchemy.exc

        try:
            self._timed(lambda: self._metrics_sql(run_ids, epochs))
        except sqlalchemy.exc.IntegrityError:
            # A row with the same (key, step, timestamp, value) is already stored (a re-sent
            # flush): MLflow's own store skips exactly those, run by run.
            self._timed(lambda: self._each_store(run_ids, epochs))

    def _each_store(self, run_ids: Sequence[str], epochs: Mapping[str, Sequence[Epoch]]) -> None:
        """Run by run through MLflow's store, in whole epochs (as ``RunTracker.log_epochs``)."""
        for r in run_ids:
            for chunk in tr.epoch_chunks(list(epochs[r]), tr.MAX_METRICS):
                self.round_trips += 1
                self._store.log_batch(r, metrics=chunk, params=[], tags=[])

    def _metrics_sql(self, run_ids: Sequence[str], epochs: Mapping[str, Sequence[Epoch]]
                     ) -> None:
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
        from mlflow.utils.validation import _validate_metric
        from sqlalchemy import select

        rows, seen = [], set()
        latest: dict[tuple[str, str], dict[str, Any]] = {}  # newest of this flush per run, key
        for r in run_ids:
            for step, kv, ts in epochs[r]:
                for k, v in kv.items():
                    value, step_, ts_ = float(v), int(step), int(ts)
                    _validate_metric(k, value, ts_, step_)
                    is_nan = math.isnan(value)  # as SqlAlchemyStore.sanitize_metric_value
                    if is_nan:
                        value = 0.0
                    elif math.isinf(value):
                        value = 1.7976931348623157e308 if value > 0 else -1.7976931348623157e308
                    row = dict(run_uuid=r, key=k, value=value, timestamp=ts_, step=step_,
                               is_nan=is_nan)
                    ident = (r, k, ts_, step_, value, is_nan)
                    if ident in seen:  # MLflow drops exact duplicates within a batch
                        continue
                    seen.add(ident)
                    rows.append(row)
                    if (r, k) not in latest or _newer(row, latest[(r, k)]):
                        latest[(r, k)] = row
        with self._session() as s:
            self._active_runs(s, run_ids)
            for chunk in _chunks(rows, 5000):
                _insert(s, SqlMetric, list(chunk))
            # After the inserts, as MLflow does: on SQLite the write lock is held from here on,
            # so the latest values read below cannot change before this transaction commits.
            keys = sorted({k for _, k in latest})
            stored: dict[tuple[str, str], Any] = {}
            t = SqlLatestMetric
            for chunk in _chunks(sorted(run_ids), _IN_CHUNK):
                q = (select(t.run_uuid, t.key, t.step, t.timestamp, t.value)
                     .where(t.run_uuid.in_(chunk), t.key.in_(keys))
                     .order_by(t.run_uuid, t.key).with_for_update())  # as MLflow: rows locked
                stored.update({(m.run_uuid, m.key): m for m in s.execute(q)})
            new = [row for ident, row in latest.items() if ident not in stored]
            newer = [row for ident, row in latest.items()
                     if ident in stored and _newer(row, stored[ident])]
            if new:
                _insert(s, SqlLatestMetric, new)
            if newer:
                _update(s, SqlLatestMetric, newer)

    def logged_steps(self, run_ids: Sequence[str], key: str) -> dict[str, set[int]]:
        """The steps of ``key`` the store holds per run (one query): what a resumed stack must
        not log again."""
        if self.mode != "sql":
            return dict(zip(run_ids, self._timed(lambda: self._each(
                lambda r: self._tracker(r).logged_steps(key), run_ids)), strict=True))
        from mlflow.store.tracking.dbmodels.models import SqlMetric

        def query() -> dict[str, set[int]]:
            out: dict[str, set[int]] = {r: set() for r in run_ids}
            with self._session() as s:
                for chunk in _chunks(list(run_ids), _IN_CHUNK):
                    for r, step in (s.query(SqlMetric.run_uuid, SqlMetric.step)
                                    .filter(SqlMetric.run_uuid.in_(chunk), SqlMetric.key == key)):
                        out[r].add(int(step))
            return out

        return self._timed(query)

    def metric_histories(self, run_ids: Sequence[str], keys: Sequence[str]
                         ) -> dict[str, dict[str, list[Any]]]:
        """``{run_id: {key: [Metric, ...]}}``: for every run and key exactly what
        ``MlflowClient.get_metric_history(run_id, key)`` returns (every stored row, in its order,
        NaN as NaN; ``[]`` for none), in one query per 500 runs (a server: the runs' calls
        concurrently)."""
        run_ids, keys = list(dict.fromkeys(run_ids)), list(dict.fromkeys(keys))
        if not run_ids or not keys:
            return {r: {k: [] for k in keys} for r in run_ids}
        if self.mode != "sql":
            def per_run(r: str) -> dict[str, list[Any]]:
                return {k: list(self.client.get_metric_history(r, k)) for k in keys}

            return dict(zip(run_ids, self._timed(lambda: self._each(per_run, run_ids)),
                            strict=True))
        from mlflow.entities import Metric
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from sqlalchemy import select

        t = SqlMetric

        def query() -> dict[str, dict[str, list[Any]]]:
            out: dict[str, dict[str, list[Any]]] = {r: {k: [] for k in keys} for r in run_ids}
            with self._session() as s:
                for chunk in _chunks(run_ids, _IN_CHUNK):
                    # per (run, key) the order of SqlAlchemyStore.get_metric_history
                    q = (select(t.run_uuid, t.key, t.value, t.timestamp, t.step, t.is_nan)
                         .where(t.run_uuid.in_(chunk), t.key.in_(keys))
                         .order_by(t.run_uuid, t.key, t.timestamp, t.step, t.value))
                    for r, k, value, ts, step, is_nan in s.execute(q):
                        # as SqlMetric.to_mlflow_entity
                        out[r][k].append(Metric(key=k, value=value if not is_nan else math.nan,
                                                timestamp=ts, step=step))
            return out

        return self._timed(query)

    # -- the end ---------------------------------------------------------------------------
    def finish(self, ends: Mapping[str, tuple[str, str | None]], end_time: int | None = None
               ) -> None:
        """Ends every run with its status; a failure reason goes to tag ``l2lab.failure`` first,
        as ``RunTracker.finish`` does. One transaction."""
        if not ends:
            return
        end = end_time or _now_ms()
        run_ids = list(ends)
        if self.mode != "sql":
            self._timed(lambda: self._each(
                lambda r: self._tracker(r).finish(ends[r][0], failure=ends[r][1], end_time=end),
                run_ids))
            return
        from mlflow.entities import RunStatus
        from mlflow.store.tracking.dbmodels.models import SqlRun

        statuses = {r: RunStatus.to_string(RunStatus.from_string(st)) for r, (st, _) in
                    ends.items()}

        def write() -> None:
            with self._session() as s:
                self._active_runs(s, run_ids)
                self._set_tags_sql(s, {r: {tr.FAILURE_TAG: why[:tr.FAILURE_MAX_CHARS]}
                                       for r, (_, why) in ends.items() if why})
                _update(s, SqlRun, [dict(run_uuid=r, status=statuses[r], end_time=end)
                                           for r in run_ids])

        self._timed(write)

    def reopen(self, run_ids: Sequence[str]) -> None:
        """Runs continued by ``resume``: RUNNING again, and an old failure reason no longer
        holds (as ``RunTracker.reopen``). One transaction."""
        if self.mode != "sql":
            self._timed(lambda: self._each(lambda r: tr.RunTracker.reopen(self.client, r),
                                           run_ids))
            return
        from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
        from sqlalchemy import delete

        def write() -> None:
            with self._session() as s:
                self._active_runs(s, run_ids)
                _update(s, SqlRun, [dict(run_uuid=r, status="RUNNING") for r in run_ids])
                for chunk in _chunks(list(run_ids), _IN_CHUNK):
                    s.execute(delete(SqlTag).where(SqlTag.run_uuid.in_(chunk),
                                                   SqlTag.key == tr.FAILURE_TAG))

        self._timed(write)

    # -- artifacts -------------------------------------------------------------------------
    def artifact_uris(self, run_ids: Sequence[str]) -> dict[str, str]:
        """Each run's artifact URI: known for runs this writer created, else one query for all
        (a server: one call per run)."""
        missing = [r for r in run_ids if r not in self._artifact_uris]
        if missing and self.mode == "sql":
            def query() -> None:
                with self._session() as s:
                    self._active_runs(s, missing)

            self._timed(query)
        elif missing:
            uris = self._timed(lambda: self._each(
                lambda r: self.client.get_run(r).info.artifact_uri, missing))
            self._artifact_uris.update(zip(missing, uris, strict=True))
        return {r: self._artifact_uris[r] for r in run_ids}

    def local_path(self, run_id: str, artifact_file: str) -> Path | None:
        """Where ``artifact_file`` of the run lives when its artifact store is a local folder
        (parents created), so that a caller can write it there directly; ``None`` otherwise."""
        root = local_artifact_dir(self.artifact_uris([run_id])[run_id])
        if root is None:
            return None
        path = root / _relative(artifact_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """``artifact_file`` (run-relative) holding ``text`` (UTF-8), as ``MlflowClient.log_text``:
        a local store gets the file written in place, others one client call."""
        dest = self.local_path(run_id, artifact_file)
        if dest is None:
            self._timed(lambda: self.client.log_text(run_id, text, artifact_file))
            return
        _write_atomic(dest, lambda f: f.write(text.encode("utf-8")))

    def log_file(self, run_id: str, local_path: str | Path, artifact_dir: str | None = None
                 ) -> None:
        """A local file into the run's ``artifact_dir`` (its name kept), as
        ``MlflowClient.log_artifact``: copied in place for a local store, else one call."""
        name = Path(local_path).name
        dest = self.local_path(run_id, posixpath.join(_relative(artifact_dir), name))
        if dest is None:
            self._timed(lambda: self.client.log_artifact(run_id, str(local_path), artifact_dir))
            return
        with open(local_path, "rb") as src:
            _write_atomic(dest, lambda f: shutil.copyfileobj(src, f))

    def log_texts(self, texts: Mapping[str, Mapping[str, str]]) -> None:
        """``{run_id: {artifact_file: text}}``: ``log_text`` for many runs (for a server, the
        runs concurrently)."""
        self.artifact_uris(list(texts))
        self._each(lambda r: [self.log_text(r, t, f) for f, t in texts[r].items()], list(texts))

    def log_files(self, files: Mapping[str, Sequence[tuple[str | Path, str | None]]]) -> None:
        """``{run_id: [(local_path, artifact_dir), ...]}``: ``log_file`` for many runs (for a
        server, the runs concurrently)."""
        self.artifact_uris(list(files))
        self._each(lambda r: [self.log_file(r, f, d) for f, d in files[r]], list(files))


class _Counting:
    """A client whose every call adds one to its writer's ``round_trips`` (thread-safe)."""

    def __init__(self, client: Any, writer: BulkStore) -> None:
        self._client, self._writer, self._lock = client, writer, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._writer.round_trips += 1
            return attr(*args, **kwargs)

        return counted


def _insert(s: Any, model: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """One executemany INSERT into the model's table (Core: no ORM bookkeeping per row)."""
    if rows:
        s.execute(model.__table__.insert(), list(rows))


def _update(s: Any, model: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """One executemany UPDATE of the model's table by primary key; the rows name the primary key
    and the same other columns."""
    if not rows:
        return
    from sqlalchemy import bindparam

    table = model.__table__
    pk = [c.name for c in table.primary_key.columns]
    cols = [k for k in rows[0] if k not in pk]
    stmt = (table.update().where(*[table.c[k] == bindparam(f"w_{k}") for k in pk])
            .values({k: bindparam(f"v_{k}") for k in cols}))
    s.execute(stmt, [{**{f"w_{k}": r[k] for k in pk}, **{f"v_{k}": r[k] for k in cols}}
                     for r in rows])


def _newer(a: Mapping[str, Any], b: Any) -> bool:
    """MLflow's order for ``latest_metrics``: larger step, then timestamp, then value."""
    get = (lambda m, k: m[k]) if isinstance(b, Mapping) else getattr
    return (a["step"], a["timestamp"], a["value"]) > (get(b, "step"), get(b, "timestamp"),
                                                      get(b, "value"))


def _write_atomic(dest: Path, write: Callable[[Any], Any]) -> None:
    """Readers (the UI, a download) never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

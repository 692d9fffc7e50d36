"""The bulk writer's SQL backend: a stack's K runs in one transaction per call, as rows of
MLflow's own ORM tables.

Used only where :func:`l2lab.tracking.bulk.choose_backend` allows it (a plain ``SqlAlchemyStore`` at
the installed MLflow's alembic head). Each write mirrors what ``SqlAlchemyStore`` does for one run,
checks included: the same validation (MLflow's own functions) and the same ``MlflowException``
(message and error code) for a missing or deleted experiment or run, a changed param, a run name
that contradicts its ``mlflow.runName`` tag. ``tests/test_bulk.py`` holds both backends to the
same errors and the same rows. MLflow's private names come from :mod:`l2lab.compat.mlflow`.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from l2lab.compat import mlflow as cm
from l2lab.compat import mlflow_sqlite as cs
from l2lab.tracking import connection as cn
from l2lab.tracking.bulk import base as b
from l2lab.tracking.bulk.base import (
    Choice,
    Epoch,
    OneTransactionWriter,
    _chunks,
)

_IN_CHUNK = 500  # ids per SQL IN (...) list: far below every backend's bound-parameter limit


class SqlRunWriter(OneTransactionWriter):
    """K runs per transaction (backend ``sql``)."""

    def __init__(self, uri: str, client: Any | None, choice: Choice) -> None:
        super().__init__(uri, client, choice)
        self._store = choice.store
        self._engine = choice.store.engine  # MLflow's cached engine: its pool, busy timeout hook
        self._t = cm.sql_models()

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
                s.execute(text(f"PRAGMA busy_timeout = {cn.SQLITE_BUSY_TIMEOUT_MS};"))
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def _create(self, experiment_id: str, names: Sequence[str],
                tags_list: Sequence[Mapping[str, str]], start: int) -> list[str]:
        from mlflow.entities import LifecycleStage, RunStatus, SourceType
        SqlExperiment, SqlRun, SqlTag = self._t.Experiment, self._t.Run, self._t.Tag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
        from mlflow.utils.uri import append_to_uri_path

        runs, tags, ids = [], [], []
        with self._session() as s:
            exp = s.get(SqlExperiment, int(experiment_id))
            if exp is None:
                raise cs.mlflow_error(*cs.no_experiment(experiment_id))
            if exp.lifecycle_stage != LifecycleStage.ACTIVE:
                raise cs.mlflow_error(*cs.inactive_experiment(experiment_id, exp.lifecycle_stage))
            for name, given in zip(names, tags_list, strict=True):  # as SqlAlchemyStore.create_run
                run_tags = {k: str(v) for k, v in given.items()}
                tag_name = run_tags.get(MLFLOW_RUN_NAME)
                if name and tag_name and name != tag_name:
                    raise cs.mlflow_error(*cs.name_against_tag(name, tag_name))
                name = name or tag_name or cm.random_run_name()
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
        from sqlalchemy import select

        SqlRun = self._t.Run

        rows: dict[str, Any] = {}
        for chunk in _chunks(list(dict.fromkeys(run_ids)), _IN_CHUNK):
            rows.update({r.run_uuid: r for r in s.execute(
                select(SqlRun.run_uuid, SqlRun.lifecycle_stage, SqlRun.artifact_uri)
                .where(SqlRun.run_uuid.in_(chunk)))})
        for run_id in run_ids:
            run = rows.get(run_id)
            if run is None:
                raise cs.mlflow_error(*cs.no_run(run_id))
            if run.lifecycle_stage != LifecycleStage.ACTIVE:
                raise cs.mlflow_error(*cs.inactive_run(run_id, run.lifecycle_stage))
            self._artifact_uris.setdefault(run_id, run.artifact_uri)
        return rows

    def _params_tags(self, run_ids: Sequence[str], params: Mapping[str, Mapping[str, Any]],
                     tags: Mapping[str, Mapping[str, Any]]) -> None:
        from sqlalchemy import select

        checked = {r: [cm.validate_param(k, str(v), path=f"params[{i}]")
                       for i, (k, v) in enumerate(params.get(r, {}).items())] for r in run_ids}
        SqlParam = self._t.Param
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
                    raise cs.mlflow_error(*cs.changed_params(changed, r))
            if new:
                _insert(s, SqlParam, new)
            self._set_tags_sql(s, {r: tags[r] for r in run_ids if tags.get(r)})

    def _set_tags_sql(self, s: Any, tags: Mapping[str, Mapping[str, Any]]) -> None:
        """As ``SqlAlchemyStore._set_tags``: overwrite or insert; ``mlflow.runName`` renames."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
        from sqlalchemy import select

        SqlRun, SqlTag = self._t.Run, self._t.Tag

        wanted = {r: {t.key: t.value for t in (cm.validate_tag(k, str(v), path=f"tags[{i}]")
                                                for i, (k, v) in enumerate(kv.items()))}
                  for r, kv in tags.items() if kv}
        if not wanted:
            return
        keys = sorted({k for kv in wanted.values() for k in kv})
        current: set[tuple[str, str]] = set()
        for chunk in _chunks(list(wanted), _IN_CHUNK):
            current.update((r, k) for r, k in s.execute(select(SqlTag.run_uuid, SqlTag.key).where(
                SqlTag.run_uuid.in_(chunk), SqlTag.key.in_(keys))))
        rows = [dict(run_uuid=r, key=k, value=v) for r, kv in wanted.items() for k, v in kv.items()]
        if changed := [row for row in rows if (row["run_uuid"], row["key"]) in current]:
            _update(s, SqlTag, changed)
        if new := [row for row in rows if (row["run_uuid"], row["key"]) not in current]:
            _insert(s, SqlTag, new)
        if renamed := [dict(run_uuid=row["run_uuid"], name=row["value"]) for row in rows
                       if row["key"] == MLFLOW_RUN_NAME]:
            _update(s, SqlRun, renamed)

    def _metrics(self, run_ids: Sequence[str], epochs: Mapping[str, Sequence[Epoch]]) -> None:
        import sqlalchemy.exc

        try:
            self._metrics_sql(run_ids, epochs)
        except sqlalchemy.exc.IntegrityError:
            # A row with the same (key, step, timestamp, value) is already stored (a re-sent
            # flush): MLflow's own store skips exactly those, run by run.
            self._each_store(run_ids, epochs)

    def _each_store(self, run_ids: Sequence[str], epochs: Mapping[str, Sequence[Epoch]]) -> None:
        """Run by run through MLflow's store, in whole epochs (as the client backend sends them)."""
        for r in run_ids:
            for chunk in cn.epoch_chunks(list(epochs[r]), cn.MAX_METRICS):
                self.round_trips += 1
                self._store.log_batch(r, metrics=chunk, params=[], tags=[])

    def _metrics_sql(self, run_ids: Sequence[str], epochs: Mapping[str, Sequence[Epoch]]
                     ) -> None:
        from sqlalchemy import select

        SqlLatestMetric, SqlMetric = self._t.LatestMetric, self._t.Metric

        rows, latest = b.metric_rows(run_ids, epochs, cm.validate_metric)
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
                     if ident in stored and b.newer(row, stored[ident])]
            if new:
                _insert(s, SqlLatestMetric, new)
            if newer:
                _update(s, SqlLatestMetric, newer)

    def logged_steps(self, run_ids: Sequence[str], key: str) -> dict[str, set[int]]:
        """The steps of ``key`` the store holds per run (one query): what a resumed stack must
        not log again."""
        SqlMetric = self._t.Metric

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
        NaN as NaN; ``[]`` for none), in one query per 500 runs."""
        run_ids, keys = list(dict.fromkeys(run_ids)), list(dict.fromkeys(keys))
        if not run_ids or not keys:
            return {r: {k: [] for k in keys} for r in run_ids}
        from mlflow.entities import Metric
        from sqlalchemy import select

        t = self._t.Metric

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

    def _finish(self, statuses: Mapping[str, str], reasons: Mapping[str, Mapping[str, str]],
                end: int) -> None:
        with self._session() as s:
            self._active_runs(s, list(statuses))
            self._set_tags_sql(s, reasons)
            _update(s, self._t.Run, [dict(run_uuid=r, status=st, end_time=end)
                                     for r, st in statuses.items()])

    def _reopen(self, run_ids: Sequence[str]) -> None:
        from sqlalchemy import delete

        SqlRun, SqlTag = self._t.Run, self._t.Tag
        with self._session() as s:
            self._active_runs(s, run_ids)
            _update(s, SqlRun, [dict(run_uuid=r, status="RUNNING") for r in run_ids])
            for chunk in _chunks(list(run_ids), _IN_CHUNK):
                s.execute(delete(SqlTag).where(SqlTag.run_uuid.in_(chunk),
                                               SqlTag.key == cn.FAILURE_TAG))

    def _check_runs(self, run_ids: Sequence[str]) -> None:
        with self._session() as s:
            self._active_runs(s, run_ids)


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


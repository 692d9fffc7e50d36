"""The bulk writer's SQLite backend: the rows :mod:`~l2lab.tracking.bulk.sql` writes through
MLflow's ORM, written with the standard library's ``sqlite3`` and MLflow never imported.

Why: importing MLflow and opening its SQLAlchemy store is ~1.9 s of every training command's
start (``docs/performance.md``), more than a small run's whole training. A SQLite store is the
default, so a run written into it needs neither.

Only where :func:`l2lab.compat.mlflow_sqlite.writable` allows it: an MLflow store at a schema
revision these statements were checked against, with an MLflow version they were checked with.
Each call is one ``BEGIN IMMEDIATE`` transaction (the write lock first, so two jobs never
deadlock on an upgrade from a read lock), waiting up to ``SQLITE_BUSY_TIMEOUT_MS`` for it.
Checks, errors and rows are the SQL backend's (the metric rows in :mod:`.base`, MLflow's errors
and checks in :mod:`l2lab.compat.mlflow_sqlite`); ``tests/test_bulk.py`` holds the backends to the
same record and the same errors. MLflow is imported only to raise its exception, or to check an
input that is not plainly valid.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from l2lab.compat import mlflow_sqlite as cs
from l2lab.tracking import connection as cn
from l2lab.tracking.bulk import base as b
from l2lab.tracking.bulk.base import Choice, Epoch, OneTransactionWriter, _chunks

_IN_CHUNK = 500  # ids per IN (...): well inside SQLite's bound-variable limit


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SqliteRunWriter(OneTransactionWriter):
    """K runs per transaction on a SQLite store, without MLflow (backend ``sqlite``)."""

    def __init__(self, uri: str, client: Any | None, choice: Choice) -> None:
        super().__init__(uri, client, choice)
        self._db = cn.sqlite_path(uri)
        self._lock = threading.Lock()
        self._con: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            con = sqlite3.connect(self._db, timeout=cn.SQLITE_BUSY_TIMEOUT_MS / 1000,
                                  isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA foreign_keys = ON")
            self._con = con
        return self._con

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (one round trip)."""
        with self._lock:
            self.round_trips += 1
            con = self._connection()
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """Reads (one round trip), each statement on its own committed snapshot."""
        with self._lock:
            self.round_trips += 1
            yield self._connection()

    def _read(self, sql: str, args: Sequence[Any]) -> list[tuple]:
        with self._reading() as con:
            return con.execute(sql, list(args)).fetchall()

    # -- runs ------------------------------------------------------------------------------
    def _create(self, experiment_id: str, names: Sequence[str],
                tags_list: Sequence[Mapping[str, str]], start: int) -> list[str]:
        runs, tags, ids = [], [], []
        with self._write() as con:
            found = con.execute("SELECT lifecycle_stage, artifact_location FROM experiments "
                                "WHERE experiment_id = ?", (int(experiment_id),)).fetchone()
            if found is None:
                raise cs.mlflow_error(*cs.no_experiment(experiment_id))
            stage, location = found
            if stage != cs.ACTIVE:
                raise cs.mlflow_error(*cs.inactive_experiment(experiment_id, stage))
            for name, given in zip(names, tags_list, strict=True):  # as SqlAlchemyStore.create_run
                run_tags = {k: str(v) for k, v in given.items()}
                tag_name = run_tags.get(cs.RUN_NAME_TAG)
                if name and tag_name and name != tag_name:
                    raise cs.mlflow_error(*cs.name_against_tag(name, tag_name))
                if not (name or tag_name):
                    from l2lab.compat import mlflow as cm

                    name = cm.random_run_name()
                name = name or tag_name
                run_tags.setdefault(cs.RUN_NAME_TAG, name)
                run_id = uuid.uuid4().hex
                artifact_uri = cs.run_artifact_uri(location, run_id)
                runs.append((run_id, name, cs.SOURCE_UNKNOWN, "", "",
                             run_tags.get(cs.USER_TAG, "unknown"), "RUNNING", start, None, None,
                             "", cs.ACTIVE, artifact_uri, int(experiment_id)))
                tags += [(k, v, run_id) for k, v in run_tags.items()]
                ids.append(run_id)
                self._artifact_uris[run_id] = artifact_uri
            con.executemany(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
                "user_id, status, start_time, end_time, deleted_time, source_version, "
                "lifecycle_stage, artifact_uri, experiment_id) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", runs)
            con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)", tags)
        return ids

    def _active_runs(self, con: sqlite3.Connection, run_ids: Sequence[str]) -> None:
        """The runs exist and are active (as ``_check_run_is_active``); their artifact URIs."""
        rows: dict[str, tuple[str, str]] = {}
        for chunk in _chunks(list(dict.fromkeys(run_ids)), _IN_CHUNK):
            rows.update({r: (stage, art) for r, stage, art in con.execute(
                "SELECT run_uuid, lifecycle_stage, artifact_uri FROM runs WHERE run_uuid IN "
                f"({_marks(len(chunk))})", list(chunk))})
        for run_id in run_ids:
            if run_id not in rows:
                raise cs.mlflow_error(*cs.no_run(run_id))
            stage, art = rows[run_id]
            if stage != cs.ACTIVE:
                raise cs.mlflow_error(*cs.inactive_run(run_id, stage))
            self._artifact_uris.setdefault(run_id, art)

    # -- params and tags ----------------------------------------------------------------------
    def _params_tags(self, run_ids: Sequence[str], params: Mapping[str, Mapping[str, Any]],
                     tags: Mapping[str, Mapping[str, Any]]) -> None:
        checked = {r: [cs.checked_param(k, str(v), path=f"params[{i}]")
                       for i, (k, v) in enumerate(params.get(r, {}).items())] for r in run_ids}
        with self._write() as con:
            self._active_runs(con, run_ids)
            existing: dict[tuple[str, str], str] = {}
            with_params = [r for r in run_ids if checked[r]]
            for chunk in _chunks(with_params, _IN_CHUNK):
                for r, k, v in con.execute("SELECT run_uuid, key, value FROM params WHERE "
                                           f"run_uuid IN ({_marks(len(chunk))})", list(chunk)):
                    existing[(r, k)] = v
            new, changed = [], []
            for r in with_params:
                for key, value in checked[r]:
                    old = existing.get((r, key))
                    if old is None:
                        new.append((key, value, r))
                    elif old != value:
                        changed.append({"key": key, "old_value": old, "new_value": value})
                if changed:
                    raise cs.mlflow_error(*cs.changed_params(changed, r))
            con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)", new)
            self._set_tags(con, {r: tags[r] for r in run_ids if tags.get(r)})

    def _set_tags(self, con: sqlite3.Connection, tags: Mapping[str, Mapping[str, Any]]) -> None:
        """As ``SqlAlchemyStore._set_tags``: overwrite or insert; ``mlflow.runName`` renames."""
        rows = [(r, *cs.checked_tag(k, str(v), path=f"tags[{i}]"))
                for r, kv in tags.items() if kv for i, (k, v) in enumerate(kv.items())]
        if not rows:
            return
        con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?) "
                        "ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value",
                        [(k, v, r) for r, k, v in rows])
        con.executemany("UPDATE runs SET name = ? WHERE run_uuid = ?",
                        [(v, r) for r, k, v in rows if k == cs.RUN_NAME_TAG])

    # -- metrics ------------------------------------------------------------------------------
    def _metrics(self, run_ids: Sequence[str], epochs: Mapping[str, Sequence[Epoch]]) -> None:
        rows, latest = b.metric_rows(run_ids, epochs, cs.check_metric)
        insert = ("INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES "
                  "(?, ?, ?, ?, ?, ?)")

        def values(rs: Sequence[Mapping[str, Any]]) -> list[tuple]:
            return [(m["key"], m["value"], m["timestamp"], m["step"], m["is_nan"],
                     m["run_uuid"]) for m in rs]

        with self._write() as con:
            self._active_runs(con, run_ids)
            try:
                with _savepoint(con):
                    con.executemany(insert, values(rows))
            except sqlite3.IntegrityError:  # some rows are stored already: write the others
                stored = set()
                keys = sorted({m["key"] for m in rows})
                for chunk in _chunks(list(run_ids), _IN_CHUNK):
                    stored.update(con.execute(
                        "SELECT run_uuid, key, timestamp, step, value, is_nan FROM metrics "
                        f"WHERE run_uuid IN ({_marks(len(chunk))}) AND key IN "
                        f"({_marks(len(keys))})", [*chunk, *keys]))
                rows = [m for m in rows if (m["run_uuid"], m["key"], m["timestamp"], m["step"],
                                            m["value"], int(m["is_nan"])) not in stored]
                con.executemany(insert, values(rows))
                latest = {}
                for m in rows:
                    ident = (m["run_uuid"], m["key"])
                    if ident not in latest or b.newer(m, latest[ident]):
                        latest[ident] = m
            self._latest(con, latest)

    def _latest(self, con: sqlite3.Connection,
                latest: Mapping[tuple[str, str], Mapping[str, Any]]) -> None:
        """``latest_metrics``: a new key inserted, a newer value (step, timestamp, value)
        replacing the stored one; read under the transaction's write lock."""
        if not latest:
            return
        keys = sorted({k for _, k in latest})
        stored: dict[tuple[str, str], dict[str, Any]] = {}
        for chunk in _chunks(sorted({r for r, _ in latest}), _IN_CHUNK):
            for r, k, step, ts, value in con.execute(
                    "SELECT run_uuid, key, step, timestamp, value FROM latest_metrics WHERE "
                    f"run_uuid IN ({_marks(len(chunk))}) AND key IN ({_marks(len(keys))})",
                    [*chunk, *keys]):
                stored[(r, k)] = {"step": step, "timestamp": ts, "value": value}
        write = [m for ident, m in latest.items() if ident not in stored
                 or b.newer(m, stored[ident])]
        con.executemany(
            "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES "
            "(?, ?, ?, ?, ?, ?) ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value, "
            "timestamp = excluded.timestamp, step = excluded.step, is_nan = excluded.is_nan",
            [(m["key"], m["value"], m["timestamp"], m["step"], m["is_nan"], m["run_uuid"])
             for m in write])

    def logged_steps(self, run_ids: Sequence[str], key: str) -> dict[str, set[int]]:
        """The steps of ``key`` the store holds per run: what a resumed stack must not log
        again."""
        def query() -> dict[str, set[int]]:
            out: dict[str, set[int]] = {r: set() for r in run_ids}
            for chunk in _chunks(list(run_ids), _IN_CHUNK):
                for r, step in self._read("SELECT run_uuid, step FROM metrics WHERE run_uuid IN "
                                          f"({_marks(len(chunk))}) AND key = ?", [*chunk, key]):
                    out[r].add(int(step))
            return out

        return self._timed(query)

    def metric_histories(self, run_ids: Sequence[str], keys: Sequence[str]
                         ) -> dict[str, dict[str, list[Any]]]:
        """``{run_id: {key: [Metric, ...]}}`` as ``MlflowClient.get_metric_history`` returns
        each (the reader's query and ``Metric``: :mod:`l2lab.compat.mlflow_sqlite`)."""
        def query() -> dict[str, dict[str, list[Any]]]:
            with self._reading() as con:
                return cs.metric_histories(con, run_ids, keys)

        return self._timed(query)

    # -- the end of a run -----------------------------------------------------------------------
    def _finish(self, statuses: Mapping[str, str], reasons: Mapping[str, Mapping[str, str]],
                end: int) -> None:
        with self._write() as con:
            self._active_runs(con, list(statuses))
            self._set_tags(con, reasons)
            con.executemany("UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?",
                            [(st, end, r) for r, st in statuses.items()])

    def _reopen(self, run_ids: Sequence[str]) -> None:
        with self._write() as con:
            self._active_runs(con, run_ids)
            con.executemany("UPDATE runs SET status = 'RUNNING' WHERE run_uuid = ?",
                            [(r,) for r in run_ids])
            con.executemany("DELETE FROM tags WHERE run_uuid = ? AND key = ?",
                            [(r, cn.FAILURE_TAG) for r in run_ids])

    def _check_runs(self, run_ids: Sequence[str]) -> None:
        with self._reading() as con:
            self._active_runs(con, run_ids)


@contextlib.contextmanager
def _savepoint(con: sqlite3.Connection) -> Iterator[None]:
    """A nested transaction: an error undoes what was written inside it only."""
    con.execute("SAVEPOINT rows")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK TO rows")
        con.execute("RELEASE rows")
        raise
    con.execute("RELEASE rows")

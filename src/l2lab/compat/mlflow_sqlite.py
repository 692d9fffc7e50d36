"""A SQLite MLflow store read with the standard library's ``sqlite3``, without importing MLflow.

``compare`` and ``load_runs`` only read. Through ``MlflowClient`` they first import MLflow and
open its SQLAlchemy store: about 2.6 s of CPU before the first row, more than the whole report of
a 24-run sweep takes to draw. :class:`SqliteReader` answers the few client calls they make
(``search_experiments``, ``get_experiment``, ``search_runs`` by tag equality and start time,
``get_run``, ``get_metric_history``, and the bulk writer's ``metric_histories``) with MLflow's
values, order and types, from MLflow's own tables (``experiments``, ``experiment_tags``,
``runs``, ``tags``, ``params``, ``latest_metrics``, ``metrics``).
:func:`sqlite_runs_with_prefix` answers a mistyped run id the same way, for every command.

Those tables are MLflow's private schema. :func:`open_reader` reads only a database at an alembic
revision listed in :data:`KNOWN_REVISIONS` (the ones ``tests/test_sqlite_reader.py`` compares,
value for value, with the public client), in the default workspace; anything else gets ``None``
and the caller uses the client. A new MLflow whose head is not listed fails that test first.
"""

from __future__ import annotations

import contextlib
import math
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CHECKED_WITH = "mlflow 3.17.2"
#: Alembic revisions whose tables this module was checked against (mlflow 3.17.2's head).
KNOWN_REVISIONS = frozenset({"dc11669786a5"})
DEFAULT_WORKSPACE = "default"
_IN_CHUNK = 500  # run ids per IN (...): well inside SQLite's 32766 bound variables


@dataclass(frozen=True)
class Metric:
    """As ``mlflow.entities.Metric`` (NaN as NaN, ±inf as MLflow stores it: ±1.8e308)."""

    key: str
    value: float
    timestamp: int
    step: int


@dataclass
class RunInfo:
    run_id: str
    run_name: str
    experiment_id: str
    user_id: str | None
    status: str
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str
    artifact_uri: str | None

    @property
    def run_uuid(self) -> str:
        return self.run_id


@dataclass
class RunData:
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    info: RunInfo
    data: RunData


@dataclass
class Experiment:
    experiment_id: str
    name: str
    artifact_location: str | None
    lifecycle_stage: str
    tags: dict[str, str]


class NotFound(LookupError):
    """A run or experiment id that the store does not hold (MLflow: RESOURCE_DOES_NOT_EXIST)."""


# ``tags.key = 'value'`` or ``tags.`key` = 'value'``, joined by ``and``: the filters l2lab's
# readers pass (run.sweep.sweep_children, tracking.runs.select).
_TAG_EQ = re.compile(r"\s*tags\.(?:`([^`]+)`|([\w.]+))\s*=\s*'([^']*)'\s*", re.IGNORECASE)
_ORDER = re.compile(r"\s*attributes\.start_time(?:\s+(ASC|DESC))?\s*", re.IGNORECASE)


def _tag_filters(filter_string: str) -> list[tuple[str, str]]:
    if not filter_string.strip():
        return []
    out = []
    for part in re.split(r"\s+and\s+", filter_string.strip(), flags=re.IGNORECASE):
        m = _TAG_EQ.fullmatch(part)
        if m is None:
            raise NotImplementedError(f"SqliteReader filters by tag equality only: {part!r}")
        out.append((m.group(1) or m.group(2), m.group(3)))
    return out


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i:i + _IN_CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _value(value: float | None, is_nan: int) -> float:
    return math.nan if is_nan else float(value)  # as SqlMetric.to_mlflow_entity


class SqliteReader:
    """The read calls of ``MlflowClient`` that reports make, on one SQLite store, read-only."""

    def __init__(self, db: Path, uri: str) -> None:
        self.db, self.tracking_uri = db, uri
        self._con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60,
                                    check_same_thread=False)

    def close(self) -> None:
        self._con.close()

    # -- experiments -------------------------------------------------------------------------
    def search_experiments(self) -> list[Experiment]:
        """The active experiments (as ``search_experiments()``'s default view)."""
        rows = self._con.execute(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments "
            "WHERE lifecycle_stage = 'active' ORDER BY creation_time DESC, experiment_id")
        return self._experiments(rows.fetchall())

    def get_experiment(self, experiment_id: str) -> Experiment:
        rows = self._con.execute(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments "
            "WHERE experiment_id = ?", (int(experiment_id),)).fetchall()
        if not rows:
            raise NotFound(f"no experiment {experiment_id} in {self.tracking_uri}")
        return self._experiments(rows)[0]

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        """The experiment of that name, deleted or not (as the client's), or ``None``."""
        rows = self._con.execute(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments "
            "WHERE name = ?", (name,)).fetchall()
        return self._experiments(rows)[0] if rows else None

    def _experiments(self, rows: list[tuple]) -> list[Experiment]:
        tags: dict[int, dict[str, str]] = {r[0]: {} for r in rows}
        for exp, key, value in self._con.execute(
                f"SELECT experiment_id, key, value FROM experiment_tags WHERE experiment_id IN "
                f"({_marks(len(tags))})", list(tags)):
            tags[exp][key] = value
        return [Experiment(str(e), name, loc, stage, tags[e]) for e, name, loc, stage in rows]

    # -- runs --------------------------------------------------------------------------------
    def search_runs(self, experiment_ids: Sequence[str], filter_string: str = "",
                    order_by: Sequence[str] | None = None, max_results: int = 1000) -> list[Run]:
        """Active runs of the experiments whose tags equal the filter's values, ordered as
        ``SqlAlchemyStore`` orders them: by start time (NULL last), then by run id."""
        if not experiment_ids:
            return []
        direction = "DESC"
        for clause in order_by or []:
            m = _ORDER.fullmatch(clause)
            if m is None:
                raise NotImplementedError(f"SqliteReader orders by start time only: {clause!r}")
            direction = (m.group(1) or "ASC").upper()
        where, args = ["lifecycle_stage = 'active'",
                       f"experiment_id IN ({_marks(len(experiment_ids))})"], \
            [int(e) for e in experiment_ids]
        for key, value in _tag_filters(filter_string):
            where.append("run_uuid IN (SELECT run_uuid FROM tags WHERE key = ? AND value = ?)")
            args += [key, value]
        ids = [r for (r,) in self._con.execute(
            f"SELECT run_uuid FROM runs WHERE {' AND '.join(where)} ORDER BY "
            f"CASE WHEN start_time IS NULL THEN 1 ELSE 0 END, start_time {direction}, run_uuid "
            f"LIMIT ?", [*args, int(max_results)])]
        return self._runs(ids)

    def get_run(self, run_id: str) -> Run:
        found = self._runs([run_id])
        if not found:
            raise NotFound(f"no run {run_id} in {self.tracking_uri}")
        return found[0]

    def _runs(self, ids: Sequence[str]) -> list[Run]:
        runs: dict[str, Run] = {}
        for chunk in _chunks(ids):
            marks = _marks(len(chunk))
            for (rid, name, exp, user, status, start, end, stage, art) in self._con.execute(
                    "SELECT run_uuid, name, experiment_id, user_id, status, start_time, "
                    f"end_time, lifecycle_stage, artifact_uri FROM runs WHERE run_uuid IN "
                    f"({marks})", list(chunk)):
                runs[rid] = Run(RunInfo(rid, name, str(exp), user, status, start, end, stage,
                                        art), RunData())
            for rid, key, value in self._con.execute(
                    f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({marks})", chunk):
                runs[rid].data.tags[key] = value
            for rid, key, value in self._con.execute(
                    f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({marks})",
                    chunk):
                runs[rid].data.params[key] = value
            for rid, key, value, is_nan in self._con.execute(
                    "SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN "
                    f"({marks})", chunk):
                runs[rid].data.metrics[key] = _value(value, is_nan)
        for run in runs.values():  # as SqlRun.to_mlflow_entity
            if not run.info.run_name:
                run.info.run_name = run.data.tags.get("mlflow.runName", run.info.run_name)
        return [runs[r] for r in ids if r in runs]

    # -- metric histories --------------------------------------------------------------------
    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        return self.metric_histories([run_id], [key])[run_id][key]

    def metric_histories(self, run_ids: Sequence[str], keys: Sequence[str]
                         ) -> dict[str, dict[str, list[Metric]]]:
        """``{run_id: {key: [Metric, ...]}}``: every stored row, per run and key in the order of
        ``SqlAlchemyStore.get_metric_history`` (as ``bulk.RunWriter.metric_histories``)."""
        return metric_histories(self._con, run_ids, keys)


def metric_histories(con: sqlite3.Connection, run_ids: Sequence[str], keys: Sequence[str]
                     ) -> dict[str, dict[str, list[Metric]]]:
    """:meth:`SqliteReader.metric_histories` on any connection to the store (the writer's)."""
    run_ids, keys = list(dict.fromkeys(run_ids)), list(dict.fromkeys(keys))
    out: dict[str, dict[str, list[Metric]]] = {r: {k: [] for k in keys} for r in run_ids}
    if not keys:
        return out
    for chunk in _chunks(run_ids):
        for rid, key, value, ts, step, is_nan in con.execute(
                "SELECT run_uuid, key, value, timestamp, step, is_nan FROM metrics WHERE "
                f"run_uuid IN ({_marks(len(chunk))}) AND key IN ({_marks(len(keys))}) "
                "ORDER BY run_uuid, key, timestamp, step, value", [*chunk, *keys]):
            out[rid][key].append(Metric(key, _value(value, is_nan), ts, step))
    return out


def open_reader(db: Path, uri: str) -> SqliteReader | None:
    """A reader on ``db``, or ``None`` when the client must read it: no such file, not an
    MLflow store, a schema revision not in :data:`KNOWN_REVISIONS`, or experiments outside the
    default workspace."""
    if not db.is_file():
        return None
    reader = SqliteReader(db, uri)
    try:
        (revision,) = reader._con.execute("SELECT version_num FROM alembic_version").fetchone()
        workspaces = {w for (w,) in reader._con.execute(
            "SELECT DISTINCT workspace FROM experiments")}
    except (sqlite3.Error, TypeError, ValueError):  # not (yet) an MLflow store, or no workspaces
        revision, workspaces = None, set()
    if revision not in KNOWN_REVISIONS or workspaces - {DEFAULT_WORKSPACE, None}:
        with contextlib.suppress(sqlite3.Error):
            reader.close()
        return None
    return reader


# --------------------------------------------------------------------------- run ids by prefix
# MLflow's ``runs`` table, read with the standard library's sqlite3 and without importing MLflow:
# a mistyped run id is answered in well under a second (design.md §6), where the client would
# first import MLflow and open the store (seconds). The public search would do (``search_runs``
# with ``attributes.run_id LIKE``), and does for other stores.


def sqlite_runs_with_prefix(db: Path, prefix: str) -> list[tuple[str, str, str]]:
    """(run id, name, status) of the active runs of the SQLite store ``db`` whose id starts with
    ``prefix`` (lowercase hex), oldest first; ``[]`` for a missing file or a database that is not
    (yet) an MLflow store."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        try:
            return [tuple(r) for r in con.execute(
                "SELECT run_uuid, name, status FROM runs WHERE run_uuid LIKE ? "
                "AND lifecycle_stage = 'active' ORDER BY start_time", (prefix + "%",))]
        except sqlite3.OperationalError:  # not (yet) an MLflow store
            return []


# --------------------------------------------------------------------------- writing runs
# What ``SqlAlchemyStore`` writes for a run, as literals (``tests/test_compat.py`` checks each
# against MLflow's own name), and MLflow's checks of params, tags and metrics done without
# importing MLflow where the input is plainly inside them: the bulk writer's ``sqlite`` backend
# (``tracking/bulk/sqlite.py``) writes a run into ``runs``, ``tags``, ``params``, ``metrics`` and
# ``latest_metrics`` of a database that :func:`writable` accepts, with no MLflow import at all.

#: MLflow versions whose SQLite store the no-import writer was checked against (their alembic
#: head is in :data:`KNOWN_REVISIONS`); another installed MLflow gets its own ORM writer.
WRITER_CHECKED_WITH = frozenset({"3.17.2"})
RUN_NAME_TAG = "mlflow.runName"  # mlflow.utils.mlflow_tags.MLFLOW_RUN_NAME
USER_TAG = "mlflow.user"  # mlflow.utils.mlflow_tags.MLFLOW_USER
ACTIVE = "active"  # mlflow.entities.LifecycleStage.ACTIVE
SOURCE_UNKNOWN = "UNKNOWN"  # SourceType.to_string(SourceType.UNKNOWN)
RUN_STATUSES = frozenset({"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"})
MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAM_VALUE_LENGTH = 6000  # MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_LENGTH = 8000  # MAX_TAG_VAL_LENGTH
INF = 1.7976931348623157e308  # what SqlAlchemyStore stores for ±inf
_NAME = re.compile(r"[/\w.\- :]+")  # MLflow's allowed characters (POSIX), newline excluded
_FILE_URI = re.compile(r"file:///[^?#]*[^/?#]")


def writable(db: Path) -> str | None:
    """Why the no-import writer may not write ``db`` (``None``: it may): it must be an MLflow
    store at a known revision in the default workspace (:func:`open_reader`) and the installed
    MLflow one of :data:`WRITER_CHECKED_WITH` (a newer MLflow would refuse that revision as out of
    date, so its own store must decide)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("mlflow")
    except PackageNotFoundError:
        return "MLflow is not installed"
    if installed not in WRITER_CHECKED_WITH:
        return f"mlflow {installed} is not one the SQLite writer was checked with"
    reader = open_reader(db, f"sqlite:///{db}")
    if reader is None:
        return "not an MLflow store at a known schema revision in the default workspace"
    reader.close()
    return None


def _plain_name(name: object) -> bool:
    """A name MLflow surely accepts: its characters, a unique path, within its length."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_KEY_LENGTH:
        return False
    import posixpath

    return posixpath.normpath(name) == name and not name.startswith(("..", "/")) and name != "."


def checked_param(key: str, value: str, path: str) -> tuple[str, str]:
    """(key, value) as MLflow stores a param: MLflow's own check (``_validate_param``: its error,
    or a long value cut) unless the input is plainly inside it."""
    if _plain_name(key) and isinstance(value, str) and len(value) <= MAX_PARAM_VALUE_LENGTH:
        return key, value
    from l2lab.compat import mlflow as cm

    p = cm.validate_param(key, value, path=path)
    return p.key, p.value


def checked_tag(key: str, value: str, path: str) -> tuple[str, str]:
    """(key, value) as MLflow stores a run tag (``_validate_tag`` unless plainly inside it)."""
    if _plain_name(key) and isinstance(value, str) and len(value) <= MAX_TAG_VALUE_LENGTH:
        return key, value
    from l2lab.compat import mlflow as cm

    t = cm.validate_tag(key, value, path=path)
    return t.key, t.value


MAX_EXPERIMENT_TAG_VALUE_LENGTH = 20000  # MAX_EXPERIMENT_TAG_VAL_LENGTH
_TRACE_TAGS = "mlflow.trace"  # keys MLflow checks further (_validate_trace_experiment_tag)


def checked_experiment_tag(key: str, value: str) -> tuple[str, str]:
    """(key, value) of an experiment tag: MLflow's ``_validate_experiment_tag`` unless the
    input is plainly inside it (it cuts nothing: a long value is its error)."""
    if _plain_name(key) and isinstance(value, str) and not key.startswith(_TRACE_TAGS) \
            and len(value) <= MAX_EXPERIMENT_TAG_VALUE_LENGTH:
        return key, value
    from l2lab.compat import mlflow as cm

    cm.validate_experiment_tag(key, value)
    return key, value


def check_metric(key: str, value: float, timestamp: int, step: int, path: str) -> None:
    """MLflow's check of a metric (``_validate_metric``) unless plainly inside it."""
    if _plain_name(key) and type(value) is float and type(timestamp) is int and timestamp >= 0 \
            and type(step) is int:
        return
    from l2lab.compat import mlflow as cm

    cm.validate_metric(key, value, timestamp, step, path=path)


def run_status(status: str) -> str:
    """A run status as MLflow stores it (``RunStatus.to_string(RunStatus.from_string(...))``:
    MLflow's error for an unknown one)."""
    if status in RUN_STATUSES:
        return status
    from mlflow.entities import RunStatus

    return RunStatus.to_string(RunStatus.from_string(status))


def run_artifact_uri(location: str, run_id: str) -> str:
    """``append_to_uri_path(location, run_id, "artifacts")``: joined here for a plain
    ``file:///`` location (l2lab's, beside the database), by MLflow otherwise."""
    if _FILE_URI.fullmatch(location) and "//" not in location[len("file:///"):]:
        return f"{location}/{run_id}/artifacts"
    from mlflow.utils.uri import append_to_uri_path

    return append_to_uri_path(location, run_id, "artifacts")


# (message, error code) of the ``MlflowException`` that ``SqlAlchemyStore`` raises for each case
def no_experiment(experiment_id: str) -> tuple[str, str]:
    return f"No Experiment with id={experiment_id} exists", "RESOURCE_DOES_NOT_EXIST"


def inactive_experiment(experiment_id: str, stage: str) -> tuple[str, str]:
    return (f"The experiment {experiment_id} must be in the 'active' state. Current state is "
            f"{stage}.", "INVALID_PARAMETER_VALUE")


def name_against_tag(name: str, tag_name: str) -> tuple[str, str]:
    return (f"Both 'run_name' argument and 'mlflow.runName' tag are specified, but with "
            f"different values (run_name='{name}', mlflow.runName='{tag_name}').",
            "INVALID_PARAMETER_VALUE")


def no_run(run_id: str) -> tuple[str, str]:
    return f"Run with id={run_id} not found", "RESOURCE_DOES_NOT_EXIST"


def inactive_run(run_id: str, stage: str) -> tuple[str, str]:
    return (f"The run {run_id} must be in the 'active' state. Current state is {stage}.",
            "INVALID_PARAMETER_VALUE")


def changed_params(changed: Sequence[Mapping[str, str]], run_id: str) -> tuple[str, str]:
    return (f"Changing param values is not allowed. Params were already logged='{changed}' "
            f"for run ID='{run_id}'.", "INVALID_PARAMETER_VALUE")


def mlflow_error(message: str, code: str) -> Exception:
    """The ``MlflowException`` MLflow's store raises (``code``: ``RESOURCE_DOES_NOT_EXIST``,
    ``INVALID_PARAMETER_VALUE``); MLflow is imported only on this error path."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(message, getattr(databricks_pb2, code))


def set_experiment_tag(db: Path, experiment_id: str, key: str, value: str,
                       timeout_s: float) -> None:
    """As ``SqlAlchemyStore.set_experiment_tag``: checked, on an active experiment, set or
    overwritten, in one ``BEGIN IMMEDIATE`` transaction (waiting up to ``timeout_s`` for the
    write lock)."""
    key, value = checked_experiment_tag(key, value)
    with contextlib.closing(sqlite3.connect(db, timeout=timeout_s, isolation_level=None)) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            found = con.execute("SELECT lifecycle_stage FROM experiments WHERE experiment_id = ?",
                                (int(experiment_id),)).fetchone()
            if found is None:
                raise mlflow_error(*no_experiment(experiment_id))
            if found[0] != ACTIVE:
                raise mlflow_error(*inactive_experiment(experiment_id, found[0]))
            con.execute("INSERT INTO experiment_tags (key, value, experiment_id) VALUES (?, ?, ?) "
                        "ON CONFLICT (key, experiment_id) DO UPDATE SET value = excluded.value",
                        (key, value, int(experiment_id)))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

"""The MLflow record of a whole stack at once: K runs cost O(1) store round trips per operation.

A stack of K networks is K MLflow runs. Written one run at a time through ``MlflowClient``, every
create, params, flush and finish is K store calls (each a SQLite transaction of ~15-20 ms, or an
HTTP request), which dominated sweeps of small networks. ``RunWriter`` takes the K runs together:

- **The default SQLite store** (``bulk.sqlite.SqliteRunWriter``): the SQL stores' rows, written
  with ``sqlite3`` and MLflow never imported (its import and store are ~1.9 s of a command's
  start), where :func:`l2lab.compat.mlflow_sqlite.writable` knows the schema and the MLflow.
- **SQL stores** (``sqlite://``, ``postgresql://``...; ``bulk.sql.SqlRunWriter``): one
  transaction per call for all K runs, written through MLflow's own ORM tables on the engine of
  MLflow's own store, with MLflow's own validation, so the rows are the ones ``SqlAlchemyStore``
  writes (``latest_metrics`` included). This is only done when the database's alembic revision is
  the installed MLflow's head: the schema is then exactly the one these tables describe.
  Otherwise (another revision, a workspace-aware store) the public client writes
  (:class:`ClientRunWriter`).
- **A tracking server** (``http(s)://``; :class:`ClientRunWriter` in backend ``rest``): REST has no
  multi-run call, so the K runs' calls go out concurrently from a small thread pool, each batch as
  large as MLflow allows (1000 metrics, 100 params or tags).
- **Artifacts**: a run whose artifact URI is local (``file://``, as with the default SQLite store)
  gets its files written in place, with no store call at all; others get one call per file.

Every backend answers one interface (:class:`RunWriter`) and raise the same ``MlflowException``
(same error code) for the same bad input; :func:`open_writer` chooses. MLflow's private names are
in :mod:`l2lab.compat.mlflow`. Nothing here imports torch or Lightning.
"""

from __future__ import annotations

from typing import Any

from l2lab.compat import mlflow as cm
from l2lab.compat import mlflow_sqlite as cs
from l2lab.tracking import connection as cn
from l2lab.tracking.bulk.base import (  # noqa: F401  (the writer's public names)
    Choice,
    Epoch,
    RunWriter,
    local_artifact_dir,
)
from l2lab.tracking.bulk.client import ClientRunWriter


def choose_backend(uri: str) -> Choice:
    """The bulk SQL path only where its rows are certainly MLflow's own: a SQLite store that
    :func:`l2lab.compat.mlflow_sqlite.writable` accepts gets ``sqlite3`` (no MLflow import); a
    plain ``SqlAlchemyStore`` at the installed MLflow's alembic head whose private names all
    exist gets MLflow's ORM tables; a server gets concurrent REST calls; anything else (an
    import or store error, another store class, another revision) the public client."""
    if uri.startswith(("http://", "https://")):
        return Choice("rest", "tracking server: concurrent client calls")
    db = cn.sqlite_path(uri)
    if db is not None and cs.writable(db) is None:
        return Choice("sqlite", "SQLite store at a known schema revision: sqlite3, no MLflow")
    try:
        cm.check_all()  # the private names the SQL path uses exist in this MLflow
        store = cm.tracking_store(uri)
        if type(store) is not cm.sql_store_class():  # workspace-aware store, ...
            return Choice("client", f"not a plain SqlAlchemyStore ({type(store).__name__})")
        found, head = cm.schema_revision(store.engine), cm.head_revision()
    except Exception as e:  # noqa: BLE001  any surprise: the public client still works
        return Choice("client", f"SQL path unavailable ({cn.one_line(e)})")
    if found != head:
        return Choice("client", f"alembic revision {found} is not this MLflow's head {head}")
    return Choice("sql", f"{store.engine.dialect.name} at alembic head {head}", store)


def open_writer(uri: str, client: Any | None = None) -> RunWriter:
    """The bulk writer for ``uri``: :class:`~l2lab.tracking.bulk.sql.SqlRunWriter` where
    :func:`choose_backend` allows it, else :class:`ClientRunWriter`."""
    choice = choose_backend(uri)
    if choice.backend == "sqlite":
        from l2lab.tracking.bulk.sqlite import SqliteRunWriter

        return SqliteRunWriter(uri, client, choice)
    if choice.backend == "sql":
        from l2lab.tracking.bulk.sql import SqlRunWriter

        return SqlRunWriter(uri, client, choice)
    return ClientRunWriter(uri, client, choice)

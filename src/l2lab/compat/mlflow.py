"""MLflow's private names that l2lab uses (the bulk SQL writer, ``tracking/bulk_sql.py``).

Checked against mlflow 3.17.2 (``pyproject.toml``: ``mlflow>=3,<3.18``). The SQL writer writes
MLflow's own ORM tables only when the database is at the installed MLflow's alembic head
(:func:`head_revision`), and ``tests/test_bulk.py`` compares every row it writes with what the
public client writes: what is checked here is that each name still exists and behaves.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

CHECKED_WITH = "mlflow 3.17.2"


def tracking_store(uri: str) -> Any:
    """The store MLflow's client uses for ``uri`` (cached by MLflow: its engine and pool)."""
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store(uri)


def sql_store_class() -> type:
    """The plain SQL store: only a store of exactly this class gets the bulk SQL path."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return SqlAlchemyStore


def schema_revision(engine: Any) -> str:
    """The alembic revision a database is at."""
    from mlflow.store.db.utils import _get_schema_version

    return _get_schema_version(engine)


def head_revision() -> str:
    """The alembic head of the installed MLflow: the schema its ORM tables describe."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def sql_models() -> SimpleNamespace:
    """MLflow's ORM tables (``experiments``, ``runs``, ``tags``, ``params``, ``metrics``,
    ``latest_metrics``)."""
    from mlflow.store.tracking.dbmodels import models as m

    return SimpleNamespace(Experiment=m.SqlExperiment, Run=m.SqlRun, Tag=m.SqlTag,
                           Param=m.SqlParam, Metric=m.SqlMetric, LatestMetric=m.SqlLatestMetric)


def random_run_name() -> str:
    """A run name as MLflow makes one for a run created without a name."""
    from mlflow.utils.name_utils import _generate_random_name

    return _generate_random_name()


def validate_param(key: str, value: str, path: str) -> Any:
    """MLflow's check of a param (name, length); returns the ``Param`` to store."""
    from mlflow.utils.validation import _validate_param

    return _validate_param(key, value, path=path)


def validate_tag(key: str, value: str, path: str) -> Any:
    """MLflow's check of a tag (name, length); returns the ``RunTag`` to store."""
    from mlflow.utils.validation import _validate_tag

    return _validate_tag(key, value, path=path)


def validate_metric(key: str, value: float, timestamp: int, step: int, path: str = "") -> None:
    """MLflow's check of a metric (name, a number, integer step and timestamp); ``path`` names
    it in the error, as ``log_batch`` does (``metrics[i]``)."""
    from mlflow.utils.validation import _validate_metric

    _validate_metric(key, value, timestamp, step, path=path)


def check_all() -> None:
    """Imports every name above: a store whose MLflow lacks one takes the public client path."""
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version  # noqa: F401
    from mlflow.store.tracking.dbmodels.models import (  # noqa: F401
        SqlExperiment,
        SqlLatestMetric,
        SqlMetric,
        SqlParam,
        SqlRun,
        SqlTag,
    )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401
    from mlflow.tracking._tracking_service.utils import _get_store  # noqa: F401
    from mlflow.utils.name_utils import _generate_random_name  # noqa: F401
    from mlflow.utils.validation import (  # noqa: F401
        _validate_metric,
        _validate_param,
        _validate_tag,
    )

"""MLflow's private names and formats that l2lab uses: the bulk SQL writer's
(``tracking/bulk/sql.py``) and the UI's shared views (the sweep's chart link). A SQLite store's
tables read without MLflow (``compare``, ``load_runs``, run id prefixes) are
:mod:`l2lab.compat.mlflow_sqlite`.

Checked against mlflow 3.17.2 (``pyproject.toml``: ``mlflow>=3,<3.18``; the shared views against
its UI bundle, ``mlflow/server/js/build``). The SQL writer writes MLflow's own ORM tables only
when the database is at the installed MLflow's alembic head (:func:`head_revision`), and
``tests/test_bulk.py`` compares every row it writes with what the public client writes: what
``tests/test_compat.py`` checks is that each name still exists and behaves; the shared view is
checked in chromium by ``tests/test_shared_view.py``.
"""

from __future__ import annotations

import json
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


def validate_experiment_tag(key: str, value: str) -> None:
    """MLflow's check of an experiment tag (name, lengths, its trace settings)."""
    from mlflow.utils.validation import _validate_experiment_tag

    _validate_experiment_tag(key, value)


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
        _validate_experiment_tag,
        _validate_metric,
        _validate_param,
        _validate_tag,
    )


# --------------------------------------------------------------------------- shared views
# The runs page of MLflow's UI keeps a shared view as an experiment tag
# ``mlflow.sharedViewState.<key>`` and opens it from ``#/experiments/<id>/runs?viewStateShareKey=
# <key>``. Its value may be plain JSON of the page's state: search facets (``searchFilter``,
# ``orderByKey``, ``orderByAsc``, ...) and UI state (``selectedColumns``, ``runsHiddenMode``,
# ``compareRunCharts``, ...; ``runsExpanded``, ``runsPinned`` and ``runsHidden`` are ignored when
# a view is opened). The view is applied only when the URL has no search facet of its own.

SHARED_VIEW_TAG = "mlflow.sharedViewState."
SHARE_KEY_PARAM = "viewStateShareKey"
#: ``runsHiddenMode`` that draws every run in the charts (the default draws the first 10).
SHOW_ALL_RUNS = "SHOW_ALL"


def sweep_view_state(parent_run_id: str) -> dict[str, Any]:
    """The runs page showing a sweep's children, not its parent: filtered on the parent's id
    (children of a parent that is not listed are listed flat, so none is collapsed), ordered
    by λ, every child drawn in the charts, the val/ce charts shown, λ and val/ce in the
    table."""
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": "params.`regularization.lam`",
        "orderByAsc": True,
        "runsHiddenMode": SHOW_ALL_RUNS,
        "chartsSearchFilter": "val/ce",  # the charts of val/ce first (the search box: clear it
        # for every metric); charts further down are drawn only once scrolled to
        "selectedColumns": ["params.`regularization.lam`", "params.`seed`",
                            "metrics.`val/ce`", "metrics.`train/ce`"],
    }


def share_view(client: Any, experiment_id: str, key: str, state: dict[str, Any]) -> None:
    """Store ``state`` as the experiment's shared view ``key`` (what the UI's share button
    writes)."""
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))


def shared_view_query(key: str) -> str:
    """The query that opens shared view ``key`` (no search facet beside it: the UI would then
    ignore the view)."""
    return f"{SHARE_KEY_PARAM}={key}"

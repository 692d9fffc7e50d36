"""MLflow's private names that l2lab uses.

Checked against mlflow 3.17.2 (its UI bundle, ``mlflow/server/js/build``).
"""

from __future__ import annotations

import json
from typing import Any

CHECKED_WITH = "mlflow 3.17.2"


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

"""Links into the MLflow UI, always in its training view.

MLflow 3 opens an experiment in its GenAI view unless the URL says otherwise (the choice is then
the browser's saved one, which starts as GenAI): an assistant panel, and a runs table without
metric or param columns. ``?workflowType=machine_learning`` opens "Model training" with Runs,
Models and Traces in the side bar; ``&compareRunsMode=CHART`` opens the runs' chart view. Every
link the harness prints or writes is built here.

``python -m l2lab.tracking.ui`` prints the runs page of the store's most recently used experiment
(what ``make ui`` shows before it starts the UI).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

UI_URL = "http://127.0.0.1:5000"  # `make ui`
UI_ENV = "L2LAB_UI_URL"  # where `make ui` runs when it is not 127.0.0.1:5000
TRAINING_VIEW = "workflowType=machine_learning"
CHART_VIEW = "compareRunsMode=CHART"


def ui_base(tracking_uri: str | None = None) -> str:
    """The UI that shows this store: a tracking server serves its own UI; for a local store it is
    ``make ui`` (``$L2LAB_UI_URL``, else http://127.0.0.1:5000)."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return os.environ.get(UI_ENV, UI_URL).rstrip("/")


def runs_url(base: str, experiment_id: str | None = None, *, chart: bool = False) -> str:
    """An experiment's runs (its chart view with ``chart``), or the experiment list."""
    query = TRAINING_VIEW + (f"&{CHART_VIEW}" if chart else "")
    if experiment_id is None:
        return f"{base}/#/experiments?{query}"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def charts_url(base: str, experiment_id: str, share_key: str | None = None) -> str:
    """An experiment's chart view, opened on its shared view ``share_key`` when there is one (a
    sweep's: its children alone, every one drawn; ``run.sweep.share_sweep_view``). The one
    builder of a chart link: the console's and the report's are the same link."""
    url = runs_url(base, experiment_id, chart=True)
    if share_key is None:
        return url
    from l2lab.compat.mlflow import shared_view_query

    return f"{url}&{shared_view_query(share_key)}"


def run_url(base: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page, or one of its artifacts shown in the run's Artifacts tab."""
    path = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    if artifact:
        path += f"/artifacts/{artifact}"
    return f"{path}?{TRAINING_VIEW}"


@dataclass(frozen=True)
class UiLinks:
    """The links a report puts in (``report.html.Links``): pages of the UI at ``base``.
    ``views``: experiment id -> the key of a shared view stored on it (a sweep's), which its
    chart link opens instead of every run of the experiment."""

    base: str
    views: Mapping[str, str] = field(default_factory=dict)

    def run(self, experiment_id: str, run_id: str) -> str:
        return run_url(self.base, experiment_id, run_id)

    def runs(self, experiment_id: str, *, chart: bool = False) -> str:
        if chart:
            return charts_url(self.base, experiment_id, self.views.get(experiment_id))
        return runs_url(self.base, experiment_id)


def latest_experiment(client) -> str | None:
    """The experiment of the most recently started run (None for an empty store)."""
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return None
    runs = client.search_runs(exps, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.experiment_id if runs else exps[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m l2lab.tracking.ui",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db")
    ap.add_argument("--base", help=f"where the UI runs (default: ${UI_ENV} or {UI_URL})")
    args = ap.parse_args(argv)

    from l2lab.console import quiet_libraries
    from l2lab.tracking import tracker as tr

    quiet_libraries()
    base = (args.base or ui_base()).rstrip("/")
    uri = tr.resolve_uri(args.tracking_uri)
    exp = None
    db = tr.sqlite_path(uri)
    if db is None or db.exists():  # `make ui` on a fresh checkout: no store yet, no error
        try:
            exp = latest_experiment(tr.connect(uri))
        except Exception as e:  # the UI still starts; the link then opens the experiment list
            print(f"l2lab: could not read {uri}: {tr.one_line(e)}", file=sys.stderr)
    print(f"l2lab: MLflow UI (training view): {runs_url(base, exp)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The sweep's printed chart link opens MLflow's runs page on the sweep's children with every one
drawn (a view shared through the experiment, ``l2lab.compat.mlflow``): checked in headless
chromium against a real ``mlflow server``, as ``test_ui.py`` does, with 12 children (the UI's
default draws only the first 10, and leaves the children collapsed under their parent)."""

from __future__ import annotations

import json
import time

import pytest
from browser import Browser, chromium_path
from conftest import TINY, run_cli
from mlflow.tracking import MlflowClient

from l2lab.compat import mlflow as compat

LAMS = ["0", "0.01", "0.1", "1", "3", "10"]


def test_the_sweep_view_state_in_mlflows_format(store):
    """Plain JSON under ``mlflow.sharedViewState.<key>``: search facets and UI state the runs
    page reads (its ``runsExpanded`` is ignored by MLflow, so the filter lists the children
    without their parent)."""
    client = MlflowClient(store)
    exp = client.create_experiment("v")
    compat.share_view(client, exp, "p" * 32, compat.sweep_view_state("p" * 32))
    value = client.get_experiment(exp).tags["mlflow.sharedViewState." + "p" * 32]
    state = json.loads(value)
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{'p' * 32}'"
    assert state["runsHiddenMode"] == "SHOW_ALL" and "runsExpanded" not in state
    assert compat.shared_view_query("k1") == "viewStateShareKey=k1"


@pytest.fixture(scope="module")
def sweep12(server):  # noqa: F811
    root, base = server
    r = run_cli("l2lab.train", "-m", "hydra/launcher=vectorized",
                f"regularization.lam={','.join(LAMS)}", "seed=0,1", *TINY,
                f"tracking.uri={base}", f"hydra.sweep.dir={root}/multirun/view", cwd=root,
                env={"L2LAB_PROGRESS": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    return base, r.stdout


@pytest.mark.skipif(chromium_path() is None,
                    reason="headless chromium is not installed (apt-get install chromium)")
def test_the_printed_chart_link_draws_every_child(sweep12):
    base, stdout = sweep12
    line = next(ln for ln in stdout.splitlines() if "charts: " in ln)
    url = line.split("charts: ", 1)[1].strip()
    assert "compareRunsMode=CHART" in url and "viewStateShareKey=" in url
    names = [f"lam={lam} seed={s}" for lam in LAMS for s in (0, 1)]
    with Browser(1400, 1000) as b:
        b.goto(url)
        b.wait_for("document.body.innerText.includes('12 matching runs') && "
                   "document.body.innerText.includes('(val/ce)')", timeout=120)
        time.sleep(2)  # the charts' legends fill in after the first draw
        text = b.evaluate("document.body.innerText")
    assert "12 matching runs" in text  # the children, listed flat: the parent is not a row
    assert all(f"{n} (val/ce)" in text for n in names), text[:3000]  # all 12 drawn, not 10
    assert "sweep view" not in text  # the parent run (named "sweep <id>") is not listed

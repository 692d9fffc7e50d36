"""The MLflow UI as a reader meets it: a sweep tracked by a real ``mlflow server``, its printed
parent-run link opened in headless chromium (the training view, not the GenAI one), and the HTML
report reachable from the parent run."""

from __future__ import annotations

import re
import urllib.request

import pytest
from browser import Browser, chromium_path
from conftest import TINY, run_cli

from l2lab.tracking import ui

needs_chromium = pytest.mark.skipif(
    chromium_path() is None,
    reason="headless chromium is not installed (apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def sweep(server):
    root, base = server
    r = run_cli("l2lab.train", "-m", "hydra/launcher=vectorized", "regularization.lam=0,0.1",
                "seed=0,1", *TINY, f"tracking.uri={base}",
                f"hydra.sweep.dir={root}/multirun/ui", cwd=root, env={"L2LAB_PROGRESS": "0"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _printed(stdout: str, label: str) -> str:
    match = re.search(rf"{label}\s*(http://\S+)", stdout)
    assert match, (label, stdout)
    return match.group(1)


@pytest.mark.slow
def test_every_printed_link_opens_the_training_view(server, sweep):
    root, base = server
    parent = _printed(sweep.stdout, "parent run:")
    report = _printed(sweep.stdout, "In the UI:")
    charts = _printed(sweep.stdout, "charts:")
    assert parent.startswith(f"{base}/#/experiments/") and "/runs/" in parent
    for url in (parent, report, charts):
        assert "workflowType=machine_learning" in url, url
    assert "compareRunsMode=CHART" in charts
    assert report.split("?")[0].endswith("/artifacts/report/index.html")
    job_lines = [ln for ln in sweep.stdout.splitlines() if ln.startswith("l2lab: #")]
    assert len(job_lines) == 4 and all(re.search(r": run [0-9a-f]{8}, 3 epochs", ln)
                                       for ln in job_lines), sweep.stdout
    assert "[HYDRA] \t#" not in sweep.stdout and "GPU available" not in sweep.stdout


@pytest.mark.slow
@needs_chromium
def test_the_parent_link_shows_the_training_view_and_the_report(server, sweep, tmp_path):
    root, base = server
    parent = _printed(sweep.stdout, "parent run:")
    run_id = parent.split("/runs/")[1].split("?")[0]
    with Browser() as b:
        b.goto(parent)
        b.wait_for("document.body && document.body.innerText.includes('Model registry') && "
                   "document.body.innerText.includes('sweep ui')", timeout=180)
        text = b.text()
        assert "Judges" not in text, text[:2000]  # the GenAI view's side bar
        assert "Model training" in text
        # the description says how to chart val/ce against λ in the UI
        assert "Scatter chart" in text and "regularization.lam" in text, text[:3000]
        b.screenshot(tmp_path / "parent.png")

        b.goto(_printed(sweep.stdout, "In the UI:"))
        b.wait_for("document.body && document.body.innerText.includes('index.html') && "
                   "document.querySelector('iframe') !== null", timeout=180)
        b.screenshot(tmp_path / "report_in_ui.png")
        listed = b.text()
    assert "report" in listed and "summary.csv" in listed and "figures" in listed
    # the report itself, served by the tracking server from the parent's artifacts
    url = f"{base}/get-artifact?path=report/index.html&run_uuid={run_id}"
    with urllib.request.urlopen(url, timeout=60) as resp:
        page = resp.read().decode()
    assert '<table id="summary">' in page and page.count("data:image/png;base64,") == 3
    assert f"{base}/#/experiments/" in page  # its runs link into this server's UI


def test_ui_links_module() -> None:
    assert ui.run_url("http://h:1", "3", "abc") == \
        "http://h:1/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui.runs_url("http://h:1", "3", chart=True) == \
        "http://h:1/#/experiments/3/runs?workflowType=machine_learning&compareRunsMode=CHART"
    assert ui.ui_base("http://srv:5000/") == "http://srv:5000"
    assert ui.ui_base("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"

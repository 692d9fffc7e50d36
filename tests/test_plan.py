"""What a run is, decided before training (``l2lab.run.plan``), over a fake store: no training,
no MLflow. The end-to-end tests (test_workflow, test_faults, test_interrupts) train each kind."""

from __future__ import annotations

import math
import uuid
from types import SimpleNamespace

import pytest
from conftest import make_cfg

from l2lab.run.engine import prepared
from l2lab.run.plan import plan
from l2lab.tracking.runs import HASH_TAG, config_hash


def _run(status: str, metrics: dict, tags: dict) -> SimpleNamespace:
    rid = uuid.uuid4().hex
    return SimpleNamespace(info=SimpleNamespace(run_id=rid, status=status, experiment_id="7"),
                           data=SimpleNamespace(metrics=metrics, params={},
                                                tags={"mlflow.runName": "old", **tags}))


class FakeStore:
    """Answers the searches a plan makes with ``runs``; records that nothing is written."""

    def __init__(self, *runs: SimpleNamespace) -> None:
        self.runs, self.searches = list(runs), []

    def get_experiment_by_name(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(experiment_id="7", lifecycle_stage="active")

    def search_runs(self, experiment_ids, filter_string: str, **kw) -> list:
        self.searches.append(filter_string)
        return [r for r in self.runs if f"'{r.data.tags.get(HASH_TAG)}'" in filter_string
                or "sweep_id" in filter_string]


@pytest.fixture
def cfg(tmp_path):
    return prepared(make_cfg(f"tracking.uri=sqlite:///{tmp_path}/{uuid.uuid4().hex}.db",
                             "regularization.lam=0.1"))


def _sweep(**kw) -> dict:
    return {"sweep_id": uuid.uuid4().hex, "parent_run_id": "p", "experiment_id": "7",
            "swept": ["regularization.lam"], **kw}


def test_a_fresh_run_asks_the_store_nothing(cfg, tmp_path):
    got = plan(None, cfg, ["regularization.lam=0.1", "seed=3"], tmp_path / "out", None,
               tags={"l2lab.reproduced_from": "x"})
    assert (got.kind, got.name, got.note, got.source) == ("fresh", "lam=0.1 seed=3", "", None)
    assert got.job.output_dir == (tmp_path / "out").resolve() and got.job.tracker is None
    assert got.job.tags == {"l2lab.reproduced_from": "x"} and not got.job.reopened
    with pytest.raises(AttributeError):  # one frozen answer
        got.kind = "done"  # type: ignore[misc]


def test_reuse_returns_the_finished_run_of_the_same_config(cfg, tmp_path):
    same = _run("FINISHED", {"val/ce": 0.25}, {HASH_TAG: config_hash(cfg)})
    other = _run("FINISHED", {"val/ce": 9.0}, {HASH_TAG: "0" * 16})
    with_reuse = cfg.copy()
    with_reuse.reuse = True
    got = plan(FakeStore(other, same), with_reuse, ["regularization.lam=0.1"], tmp_path, None)
    assert (got.kind, got.job, got.source, got.metrics) == ("reused", None, same, {"val/ce": 0.25})
    assert plan(FakeStore(other), with_reuse, [], tmp_path, None).kind == "fresh"
    assert plan(FakeStore(same), cfg, [], tmp_path, None).kind == "fresh"  # reuse=false


@pytest.mark.parametrize("status", ["FINISHED", "FAILED"])
def test_a_continued_sweep_keeps_its_ended_jobs(cfg, tmp_path, status):
    kept = _run(status, {"train/ce": 0.5} if status == "FAILED" else {"val/ce": 0.3},
                {HASH_TAG: config_hash(cfg)})
    got = plan(FakeStore(kept), cfg, ["regularization.lam=0.1"], tmp_path,
               _sweep(continuing=True), label=lambda n: f"#4 {n}")
    assert (got.kind, got.job, got.source) == ("done", None, kept)
    assert got.note.startswith(f"l2lab: #4 old: kept run {kept.info.run_id[:8]} ({status})")
    val = got.metrics["val/ce"]
    assert math.isnan(val) if status == "FAILED" else val == 0.3


def test_a_continued_sweep_resumes_its_stopped_job_as_the_same_run(cfg, tmp_path):
    stopped = _run("KILLED", {"test/ce": 1.0},
                   {HASH_TAG: config_hash(cfg), "l2lab.output_dir": str(tmp_path / "old")})
    got = plan(FakeStore(stopped), cfg, ["regularization.lam=0.1"], tmp_path / "new",
               _sweep(continuing=True))
    assert (got.kind, got.source, got.job.output_dir) == ("resumed", stopped, tmp_path / "old")
    assert got.job.reopened and got.job.logged_test and got.job.ckpt is None  # no epoch saved
    assert got.job.tracker is None  # reopened by train, not by the plan
    assert "continues from epoch 0 of" in got.note and "(was KILLED)" in got.note
    # a job the stopped sweep never started trains as a fresh run
    assert plan(FakeStore(), cfg, [], tmp_path, _sweep(continuing=True)).kind == "fresh"
    # nothing is looked up in a sweep that is not continued
    store = FakeStore(stopped)
    assert plan(store, cfg, [], tmp_path, _sweep()).kind == "fresh" and store.searches == []

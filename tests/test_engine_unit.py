"""The engine's run lifecycle (``run.engine``: ``fit_jobs``, ``open_runs``, ``_fit_stack``,
``finish``) over an in-memory store (``tests/fakes.py``): real networks, real Lightning fits, no
MLflow store. What ``test_engine.py`` and ``test_train.py`` check end to end through SQLite, here
in a second each: a rejected job, a diverging network, the names and steps of the metrics, the
params of the selection, ``test/*`` once, and Ctrl-C.

Every job is tiny (40 examples in one batch: one optimizer step per epoch, hidden [8]), so that
the numbers can be checked by hand: with ``normalize=batch`` the penalty of an epoch is
λ/n·||W||² of the weights the previous epoch ended with (n = 40)."""

from __future__ import annotations

import inspect
import math
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_cfg
from fakes import FakeStore, FakeWriter, install

from l2lab.base import ConfigError
from l2lab.core.module import NonFiniteLossError
from l2lab.run import engine, lifecycle, progress
from l2lab.tracking.bulk.base import RunWriter

EPOCHS = 2
SMALL = ["data.train_size=40", "data.val_size=40", "data.batch_size=40", "model.hidden=[8]"]
# design.md §4: every per-epoch metric a run may log (layer names: the MLP's fc1 and out)
PER_EPOCH = {"train/loss", "train/ce", "train/l2", "train/acc", "val/ce", "val/acc", "gap/ce",
             "gap/acc", "train_eval/ce", "train_eval/acc", "weights/sq_norm/fc1",
             "weights/sq_norm/out", "weights/sq_norm_total"}
OPTIONAL = {"train/lr", "train/l1",
            "weights/eff_lr/fc1", "weights/eff_lr/out"}
AT_END = {"test/ce", "test/acc"}  # the digits' held-out test split: once, at the last epoch
DIGITS_L2_PARAMS = 64 * 8 + 8 * 10  # fc1 and out weights of a 64-8-10 MLP (biases not selected)


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeStore:
    return install(monkeypatch, tmp_path / "store")


def _stack(tmp_path: Path, jobs: list[list[str]], *extra: str, epochs: int = EPOCHS,
           sweep: dict | None = None) -> list:
    """``jobs`` (overrides of the stacked keys) trained as one stack, as the vectorized launcher
    does; returns each job's result (final metrics, or the exception that ended it)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # never created: the fake store stands in for it
    cfgs = [make_cfg(f"tracking.uri={uri}", *SMALL, f"trainer.max_epochs={epochs}", *extra, *j,
                     tiny=False) for j in jobs]
    results = engine.fit_configs(cfgs, jobs, [tmp_path / f"job{i}" for i in range(len(jobs))],
                                 sweep=sweep)
    assert not (tmp_path / "mlflow.db").exists()
    return results


def test_the_fake_writer_answers_the_bulk_writers_interface():
    """Every public method of ``RunWriter``, with its parameters: the engine's tests here hold
    for the real writer's interface (when it changes, ``tests/fakes.py`` follows)."""
    public = {n: f for n, f in inspect.getmembers(RunWriter, inspect.isfunction)
              if not n.startswith("_")}
    assert {"create_runs", "log_params", "log_metrics", "finish", "local_path"} <= set(public)
    for name, fn in public.items():
        mine = getattr(FakeWriter, name, None)
        assert mine is not None, f"FakeWriter lacks RunWriter.{name}"
        assert list(inspect.signature(mine).parameters) == \
            list(inspect.signature(fn).parameters), name


def test_a_stack_records_every_job_as_the_contract_says(tmp_path, fake):
    jobs = [["regularization.lam=0.01", "seed=0"], ["regularization.lam=0.3", "seed=1"]]
    results = _stack(tmp_path, jobs)
    runs = fake.by_name()
    assert set(runs) == {"lam=0.01 seed=0", "lam=0.3 seed=1"}
    groups = {r.tags["l2lab.vectorized_group"] for r in runs.values()}
    assert len(groups) == 1  # trained together
    # bookkeeping per stack, not per job: one call creates, one ends, one flush per kind (the
    # epochs, then test/*)
    assert [fake.calls.count(f"writer.{c}") for c in ("create_runs", "finish", "log_metrics")] \
        == [1, 1, 2]
    for (ov, result), run in zip(zip(jobs, results, strict=True), runs.values(), strict=True):
        lam = float(ov[0].split("=")[1])
        assert run.status == "FINISHED" and run.ends == ["FINISHED"]  # ended once
        assert "l2lab.failure" not in run.tags
        assert float(run.params["regularization.lam"]) == lam
        assert run.params["seed"] == ov[1].split("=")[1]
        assert run.params["l2.layers"] == "fc1,out"
        assert run.params["l2.num_params"] == str(DIGITS_L2_PARAMS)
        # per-epoch metrics: step = epoch, every one of the contract's names, no other
        per_epoch = set(run.metrics) - AT_END
        assert PER_EPOCH <= per_epoch <= PER_EPOCH | OPTIONAL and AT_END <= set(run.metrics)
        for key in per_epoch:
            assert [s for s, _ in run.history(key)] == list(range(EPOCHS)), key
        for key in AT_END:
            assert [s for s, _ in run.history(key)] == [EPOCHS - 1], key
        for e in range(EPOCHS):
            m = {k: dict(run.history(k))[e] for k in per_epoch}
            assert m["train/loss"] == pytest.approx(m["train/ce"] + m["train/l2"], rel=1e-9)
            assert m["gap/ce"] == pytest.approx(m["val/ce"] - m["train_eval/ce"], rel=1e-6)
            assert m["weights/sq_norm_total"] == pytest.approx(
                m["weights/sq_norm/fc1"] + m["weights/sq_norm/out"], rel=1e-6)
        # one step per epoch: epoch 1's penalty is λ/n·||W||² of the weights epoch 0 ended with
        assert run.final("train/l2") == pytest.approx(
            lam / 40 * dict(run.history("weights/sq_norm_total"))[0], rel=1e-5)
        # the job's result is the last recorded epoch
        assert set(result) == set(run.metrics)
        assert all(result[k] == run.final(k) for k in result)
        # its config (what reproduce re-runs) and its final weights, as artifacts
        logged = yaml.safe_load((fake.artifact_dir(run.run_id) / "config/config.yaml")
                                .read_text())
        assert logged["regularization"]["lam"] == lam and logged["model"]["hidden"] == [8]
        weights = torch.load(fake.artifact_dir(run.run_id) / "model/state_dict.pt")
        assert weights["fc1.weight"].shape == (8, 64)
        assert float(sum(weights[f"{n}.weight"].pow(2).sum() for n in ("fc1", "out"))) == \
            pytest.approx(run.final("weights/sq_norm_total"), rel=1e-5)


def test_an_ordinary_run_is_a_stack_of_one_with_the_same_numbers(tmp_path, fake):
    """``fit_jobs`` with one job (what ``train(cfg)`` runs): no stack tag, and on CPU every
    logged number equals that job's as the second network of a stack."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ["regularization.lam=0.3", "seed=1"]
    cfg = engine.prepared(make_cfg(f"tracking.uri={uri}", *SMALL,
                                   f"trainer.max_epochs={EPOCHS}", *overrides, tiny=False))
    job = engine.Job(cfg, overrides, tmp_path / "ordinary", engine.run_name(overrides, cfg))
    engine.fit_jobs([job])
    assert isinstance(job.result, dict)
    _stack(tmp_path, [["regularization.lam=0.01", "seed=0"], overrides])
    ordinary, _, child = fake.runs.values()
    assert ordinary.name == child.name == "lam=0.3 seed=1"
    assert "l2lab.vectorized_group" not in ordinary.tags
    assert ordinary.status == child.status == "FINISHED"
    assert set(ordinary.metrics) == set(child.metrics)
    for key in ordinary.metrics:
        assert ordinary.history(key) == child.history(key), key
    assert ordinary.params == child.params


def test_test_metrics_are_logged_once_at_the_last_epoch(tmp_path, fake, mnist1d_root):
    (result,) = _stack(tmp_path, [["regularization.lam=0.01"]], "data=mnist1d",
                       f"data.root={mnist1d_root}")
    (run,) = fake.runs.values()
    assert run.status == "FINISHED"
    for key in ("test/ce", "test/acc"):
        assert run.history(key) == [(EPOCHS - 1, pytest.approx(result[key]))]
    assert 0 <= result["test/acc"] <= 1 and math.isfinite(result["test/ce"])
    assert run.params["l2.num_params"] == str(40 * 8 + 8 * 10)  # input (1, 40)


@pytest.mark.parametrize(("bad", "reason"), [
    ("regularization.lam=-1", "regularization.lam must be a finite number >= 0"),
    ("regularization.layers=[nope*]", "nope*"),
], ids=["negative-lam", "unknown-layer"])
def test_a_job_rejected_by_validation_fails_with_its_reason_and_the_others_train(
        tmp_path, fake, bad, reason):
    jobs = [["regularization.lam=0.01"], [bad], ["regularization.lam=0.1"]]
    results = _stack(tmp_path, jobs)
    assert isinstance(results[1], ConfigError) and reason in str(results[1])
    assert [isinstance(r, dict) for r in results] == [True, False, True]
    runs = list(fake.runs.values())
    assert [r.status for r in runs] == ["FINISHED", "FAILED", "FINISHED"]
    assert runs[1].ends == ["FAILED"]
    assert runs[1].tags["l2lab.failure"].startswith("ConfigError: ")
    assert reason in runs[1].tags["l2lab.failure"]
    assert runs[1].metrics == {}  # rejected before training: no metrics, its config logged
    assert "regularization.lam" in runs[1].params
    for r in (runs[0], runs[2]):
        assert [s for s, _ in r.history("train/loss")] == list(range(EPOCHS))


def test_a_diverging_network_fails_with_the_reason_and_keeps_its_epochs(tmp_path, fake):
    """λ = 1e30: epoch 0's loss is finite (the weights it starts from are small), its one step
    multiplies them by about -2.5e27, so epoch 1's penalty is infinite."""
    jobs = [["regularization.lam=0.01"], ["regularization.lam=1e30"]]
    results = _stack(tmp_path, jobs, epochs=3)
    assert isinstance(results[0], dict) and isinstance(results[1], NonFiniteLossError)
    ok, bad = fake.runs.values()
    assert ok.status == "FINISHED" and [s for s, _ in ok.history("train/ce")] == [0, 1, 2]
    assert bad.status == "FAILED" and bad.ends == ["FAILED"]
    assert bad.tags["l2lab.failure"] == f"NonFiniteLossError: {results[1]}"
    assert "at epoch 1" in bad.tags["l2lab.failure"]
    (step, loss), = bad.history("train/loss")  # epoch 0 kept, nothing after it
    assert step == 0 and math.isfinite(loss)
    # its penalty: λ/n·||W||² of the weights it was initialised with (seed 0)
    assert dict(bad.history("train/l2"))[0] == pytest.approx(1e30 / 40 * _initial_sq_norm(),
                                                             rel=1e-5)


def _initial_sq_norm() -> float:
    """||W||² of fc1 and out of the network a job of seed 0 starts from."""
    from l2lab.core.data import load_data

    cfg = make_cfg(*SMALL, tiny=False)
    net = engine.build_member(cfg, load_data(cfg.data)).net
    return float(sum(p.detach().pow(2).sum() for n, p in net.named_parameters()
                     if n.endswith("weight")))


def test_ctrl_c_ends_every_unfinished_run_killed_and_keeps_the_epochs(tmp_path, fake,
                                                                     monkeypatch):
    """Ctrl-C arrives as epoch 1 starts: both runs and the sweep's parent end KILLED with the
    reason, epoch 0 stays logged, and each network's ``last.ckpt`` holds it."""
    import pytorch_lightning as pl

    class CtrlC(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                raise lifecycle.Interrupted(signal.SIGINT)

    callbacks = progress.callbacks
    monkeypatch.setattr(progress, "callbacks", lambda *a: [*callbacks(*a), CtrlC()])
    (parent,) = fake.writer.create_runs("0", ["sweep"], [{"l2lab.role": "sweep"}])
    sweep = {"sweep_id": "s1", "parent_run_id": parent, "swept": ["regularization.lam"]}
    jobs = [["regularization.lam=0.01"], ["regularization.lam=0.1"]]
    with pytest.raises(lifecycle.Interrupted):
        _stack(tmp_path, jobs, epochs=3, sweep=sweep)
    children = [r for r in fake.runs.values() if r.run_id != parent]
    assert [r.name for r in children] == ["lam=0.01", "lam=0.1"]
    for i, run in enumerate(children):
        assert run.status == "KILLED" and run.ends == ["KILLED"]
        assert run.tags["l2lab.failure"] == "interrupted (SIGINT)"
        assert run.tags["mlflow.parentRunId"] == parent and run.tags["l2lab.sweep_id"] == "s1"
        assert [s for s, _ in run.history("train/loss")] == [0]
        ckpt = torch.load(tmp_path / f"job{i}" / "checkpoints" / "last.ckpt", weights_only=False)
        assert ckpt["epoch"] == 0
    stopped = fake.run(parent)
    assert stopped.status == "KILLED"
    assert stopped.tags["l2lab.failure"] == \
        f"interrupted (SIGINT) during run {children[0].run_id}"


def test_a_failure_shared_by_several_jobs_is_grouped_to_be_said_once():
    from types import SimpleNamespace

    boom, other = ConfigError("pattern 'nope' matches no layer"), ConfigError("other")
    jobs = [SimpleNamespace(result=r) for r in (boom, {"val/ce": 0.3}, boom, other, boom)]
    groups = engine.shared_failures(jobs)
    assert list(groups) == [str(boom)]  # "other" failed once: its own line
    assert groups[str(boom)] == [jobs[0], jobs[2], jobs[4]]

"""The vectorized launcher: K jobs as one stack equal the ordinary runs, and keep the contract."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_cfg, run_cli, runs_of
from mlflow.tracking import MlflowClient

from hydra_plugins.l2lab_launchers.vectorized_launcher import group_key, plan
from l2lab import reproduce
from l2lab import tracking as tr
from l2lab.data import StackedBatches, TensorBatches
from l2lab.train import train, train_group

LAMS, SEEDS = (0.0, 0.01, 0.3), (0, 1)


def _history(client, rid: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(rid, key))


def _by_dir(client) -> dict[str, object]:
    return {r.data.tags["l2lab.output_dir"]: r for r in runs_of(client)}


def test_stacked_batches_give_each_network_its_own_order():
    x, y = torch.arange(230.0)[:, None], torch.arange(230)
    stacked = StackedBatches(x, y, 50, seeds=[0, 7, 3])
    alone = [TensorBatches(x, y, 50, shuffle=True, seed=s) for s in (0, 7, 3)]
    for epoch in (0, 4):
        stacked.sampler.set_epoch(epoch)
        for a in alone:
            a.sampler.set_epoch(epoch)
        for (xs, ys), *own in zip(stacked, *alone, strict=True):
            n = len(own[0][1])  # 50, …, and a short last batch of 30
            for k, (xk, yk) in enumerate(own):
                assert torch.equal(ys[k * n:(k + 1) * n], yk)
                assert torch.equal(xs[k * n:(k + 1) * n], xk)


@pytest.mark.parametrize("extra", [
    ["optimizer=sgd", "regularization.mode=loss", "regularization.normalize=batch"],
    ["optimizer=adam", "regularization.mode=optimizer", "regularization.normalize=dataset"],
    ["optimizer=adamw", "regularization.mode=optimizer", "regularization.normalize=none",
     "optimizer.lr=0.01"],
    ["optimizer=adamw", "regularization.mode=loss", "+regularization.lam_per_layer.out=0.5"],
    ["model=cnn", "model.channels=[4,8]", "model.hidden=[16]", "optimizer=sgd"],
    ["model=cnn", "model.channels=[4]", "model.hidden=[16]", "optimizer=adam",
     "regularization.mode=optimizer"],
    ["model.dropout=0.3", "optimizer=sgd"],
    ["experiment=mnist1d", "model=cnn", "data.val_size=100", "trainer.max_epochs=3"],
], ids=["sgd-loss-batch", "adam-opt-dataset", "adamw-opt-none", "adamw-per-layer", "cnn-sgd",
        "cnn-adam-opt", "dropout", "mnist1d-conv1d-adam-lr1e-2"])
def test_a_stack_equals_the_ordinary_runs_every_epoch(tmp_path, store, client, extra):
    """3 λ × 2 seeds: every per-epoch metric of every job within rel 1e-4 of its ordinary run.

    With dropout, each network draws its masks from its own generator, seeded as the ordinary
    run's global one: on CPU the masks are the very same, so equality holds there too."""
    jobs = [(lam, seed) for lam in LAMS for seed in SEEDS]
    if "experiment=mnist1d" in extra:  # Adam at lr 1e-2 amplifies any rounding difference
        extra = [*extra, f"data.root={tmp_path}/data"]
    ovs = [[f"regularization.lam={lam}", f"seed={seed}", "data.batch_size=50", *extra]
           for lam, seed in jobs]
    if "adamw-per-layer" in str(extra) or "+regularization.lam_per_layer.out=0.5" in extra:
        ovs[1] = [*ovs[1], "+regularization.lam_per_layer.fc1=0.2"]  # per-job per-layer λ
    cfgs = [make_cfg(f"tracking.uri={store}", *ov) for ov in ovs]
    for i, (cfg, ov) in enumerate(zip(cfgs, ovs, strict=True)):
        train(cfg, overrides=ov, output_dir=tmp_path / f"ordinary{i}")
    results = train_group(cfgs, ovs, [tmp_path / f"stacked{i}" for i in range(len(jobs))])
    assert all(isinstance(r, dict) for r in results), results
    runs = _by_dir(client)
    keys = [k for k in runs[str(tmp_path / "ordinary0")].data.metrics]
    assert "weights/sq_norm/out" in keys and "val/acc" in keys
    for i in range(len(jobs)):
        a, b = runs[str(tmp_path / f"ordinary{i}")], runs[str(tmp_path / f"stacked{i}")]
        assert b.info.status == "FINISHED" and "l2lab.vectorized_group" in b.data.tags
        assert a.data.params == b.data.params
        for key in keys:
            ha, hb = _history(client, a.info.run_id, key), _history(client, b.info.run_id, key)
            steps = [2] if key.startswith("test/") else [0, 1, 2]  # test/*: once, at the end
            assert [s for s, _ in ha] == [s for s, _ in hb] == steps, key
            for (_, va), (_, vb) in zip(ha, hb, strict=True):
                assert math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-6), (i, key, va, vb)
        assert results[i]["val/ce"] == pytest.approx(b.data.metrics["val/ce"])
    # the networks really differ: λ and seed matter
    finals = {round(r["train/ce"], 6) for r in results}
    assert len(finals) == len(jobs)


def test_buffered_metrics_reach_the_store_in_one_call_per_flush(tmp_path, store, client,
                                                                 monkeypatch):
    calls = []
    original = tr.RunTracker.log_epochs
    monkeypatch.setattr(tr.RunTracker, "log_epochs",
                        lambda self, epochs: (calls.append(list(epochs)), original(self, epochs)))
    train(make_cfg(f"tracking.uri={store}", "trainer.max_epochs=4",
                   "tracking.flush_every_s=1e9"), output_dir=tmp_path)
    assert len(calls) == 1 and [e for e, _, _ in calls[0]] == [0, 1, 2, 3]
    (run,) = runs_of(client)
    assert [s for s, _ in _history(client, run.info.run_id, "val/ce")] == [0, 1, 2, 3]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 3 and [e for e, _, _ in ckpt["callbacks"]["EpochRecorder"][
        "pending"]] == [0, 1, 2, 3]


def test_jobs_are_grouped_only_when_they_differ_in_lam_lam_per_layer_and_seed():
    base = ["regularization.lam=0.1", "seed=0"]
    cfgs = [
        make_cfg(*base),
        make_cfg("regularization.lam=0.3", "seed=2"),
        make_cfg("regularization.lam=0.3", "seed=2", "+regularization.lam_per_layer.fc1=1"),
        make_cfg(*base, "optimizer.lr=0.01"),            # another lr: another group
        make_cfg(*base, "optimizer=adam"),
        make_cfg("regularization.lam=-1"),                 # rejected: ordinary path records it
        make_cfg(*base, "resume=abc"),                     # resume: ordinary
        make_cfg(*base, "+optimizer.alpha=0.9", "optimizer._target_=torch.optim.RMSprop"),
        make_cfg(*base, "model=cnn"),
    ]
    assert plan([group_key(c) for c in cfgs]) == [[0, 1, 2], [3], [4], [5], [6], [7], [8]]
    assert group_key(cfgs[5]) is None and group_key(cfgs[6]) is None


def test_vectorized_sweep_records_every_job_and_its_faults(tmp_path):
    """6 stacked jobs (max 4 a stack) of which 2 diverge, and 2 jobs rejected by validation;
    the grouped sweeper composes one of the 8 and derives the others, λ=-1 included."""
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    r = run_cli("l2lab.train", "-m", "hydra/launcher=vectorized", "hydra/sweeper=grouped",
                "hydra.launcher.max_models=4",
                "regularization.lam=0,0.01,1e8,-1", "seed=0,1", *TINY,
                f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/multirun/v", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    client = MlflowClient(store)
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    assert parent.info.status == "FAILED"
    kids = {c.data.tags["mlflow.runName"]: c for c in
            runs_of(client, **{"mlflow.parentRunId": parent.info.run_id})}
    assert len(kids) == 8, sorted(kids)
    ok = [kids[f"lam={lam} seed={s}"] for lam in ("0", "0.01") for s in (0, 1)]
    assert all(c.info.status == "FINISHED" for c in ok)
    diverged = [kids[f"lam=100000000.0 seed={s}"] for s in (0, 1)]
    for c in diverged:
        assert c.info.status == "FAILED"
        assert "non-finite loss at epoch" in c.data.tags["l2lab.failure"]
    rejected = [kids[f"lam=-1 seed={s}"] for s in (0, 1)]
    for c in rejected:
        assert c.info.status == "FAILED" and "regularization.lam" in c.data.tags["l2lab.failure"]
        assert not c.data.metrics and "l2lab.vectorized_group" not in c.data.tags
    groups = [c.data.tags["l2lab.vectorized_group"] for c in ok + diverged]
    assert len(set(groups)) == 2 and sorted(groups.count(g) for g in set(groups)) == [2, 4]
    for c in ok:
        rid = c.info.run_id
        for key in ("train/loss", "val/ce", "gap/acc", "weights/sq_norm/fc1",
                    "weights/sq_norm_total"):
            assert [s for s, _ in _history(client, rid, key)] == [0, 1, 2], key
        assert c.data.params["regularization.lam"] in ("0.0", "0.01")
        assert c.data.params["l2.layers"] == "fc1,out"
        assert c.data.tags["l2lab.sweep_id"] == "v"
        state = torch.load(client.download_artifacts(rid, "model/state_dict.pt", str(tmp_path)))
        assert state["fc1.weight"].shape == (32, 64)
        assert float((state["fc1.weight"] ** 2).sum()) == pytest.approx(
            c.data.metrics["weights/sq_norm/fc1"], rel=1e-5)
        out_dir = Path(c.data.tags["l2lab.output_dir"])
        assert (out_dir / "checkpoints" / "last.ckpt").exists()
        assert (out_dir / ".hydra" / "overrides.yaml").exists()
    for c in diverged:  # the epochs before the divergence stay, nothing after
        steps = [s for s, _ in _history(client, c.info.run_id, "train/loss")]
        assert steps == list(range(len(steps)))
    assert "lam=-1" in r.stdout and "summary" not in r.stderr.lower()
    assert all(f"#{i} :" in r.stdout + r.stderr for i in range(8))
    # the table and summary are built from the children as for any sweep
    assert client.list_artifacts(parent.info.run_id, "figures")
    # reproduce --check re-runs a stacked job the ordinary way, within the documented tolerance
    rc = reproduce.main([ok[3].info.run_id, "--check", "--tracking-uri", store,
                         "--out", str(tmp_path / "again")])
    assert rc == 0


def _wait_for_child_epochs(client, n: int, proc: subprocess.Popen, timeout: float = 180) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if Path(client.tracking_uri[len("sqlite:///"):]).exists():
            kids = [c for c in runs_of(client) if c.data.tags.get("l2lab.vectorized_group")]
            if len(kids) == 2 and all(
                    len(client.get_metric_history(c.info.run_id, "train/loss")) >= n
                    for c in kids):
                return kids
        time.sleep(0.3)
    raise AssertionError("training did not reach the epochs in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_stack_is_killed_and_a_child_resumes_alone(tmp_path, store, client, sig):
    args = [sys.executable, "-m", "l2lab.train", "-m", "hydra/launcher=vectorized",
            "regularization.lam=0,0.1", f"tracking.uri={store}", *TINY, "trainer.max_epochs=400",
            "data.train_size=600", "data.batch_size=20", "tracking.flush_every_s=0.5",
            f"hydra.sweep.dir={tmp_path}/multirun/i"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    kids = _wait_for_child_epochs(client, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    assert client.get_run(parent.info.run_id).info.status == "KILLED", err[-2000:]
    for c in kids:
        run = client.get_run(c.info.run_id)
        assert run.info.status == "KILLED" and "interrupted" in run.data.tags["l2lab.failure"]
        steps = [s for s, _ in _history(client, c.info.run_id, "train/loss")]
        assert len(steps) >= 3 and steps == list(range(len(steps)))
    if sig != signal.SIGINT:
        return
    rid = kids[0].info.run_id
    e = len(_history(client, rid, "train/loss"))
    r = run_cli("l2lab.train", f"resume={rid}", f"trainer.max_epochs={e + 3}",
                f"tracking.uri={store}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and "l2lab.failure" not in run.data.tags
    for key in ("train/loss", "val/ce", "weights/sq_norm_total"):
        assert [s for s, _ in _history(client, rid, key)] == list(range(e + 3)), key
    ce = [v for _, v in _history(client, rid, "train/ce")]
    assert ce[-1] < ce[0]  # it trained on from the stack's weights, not from scratch
    assert json.loads(run.data.tags["l2lab.overrides"])  # the same run, not a new one

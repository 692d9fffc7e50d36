"""The vectorized launcher: K jobs as one stack equal the ordinary runs, and keep the contract."""

from __future__ import annotations

import re
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
from l2lab.core.data import StackedBatches, TensorBatches
from l2lab.train import train

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


def test_buffered_metrics_reach_the_store_in_one_call_per_flush(tmp_path, store, client,
                                                                monkeypatch):
    from l2lab.tracking.bulk.sqlite import SqliteRunWriter  # the backend of a SQLite store

    calls = []
    original = SqliteRunWriter.log_metrics
    monkeypatch.setattr(SqliteRunWriter, "log_metrics",
                        lambda self, epochs: (calls.append(dict(epochs)), original(self, epochs)))
    train(make_cfg(f"tracking.uri={store}", "trainer.max_epochs=4",
                   "tracking.flush_every_s=1e9"), output_dir=tmp_path)
    (run,) = runs_of(client)
    assert len(calls) == 2 and [e for e, _, _ in calls[0][run.info.run_id]] == [0, 1, 2, 3]
    # then the digits' test split, once at the end
    assert [(e, set(m)) for e, m, _ in calls[1][run.info.run_id]] == [(3, {"test/ce",
                                                                          "test/acc"})]
    assert [s for s, _ in _history(client, run.info.run_id, "val/ce")] == [0, 1, 2, 3]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 3 and [e for e, _, _ in ckpt["callbacks"]["Recorder"][
        "pending"]] == [0, 1, 2, 3]


def test_jobs_are_grouped_unless_they_differ_in_a_shape_the_data_or_the_optimizer_class():
    """A shape is a network kind or depth; widths of one depth are per-network settings
    (``tests/test_width_stacks.py``)."""
    base = ["regularization.lam=0.1", "seed=0"]
    cfgs = [
        make_cfg(*base),
        make_cfg("regularization.lam=0.3", "seed=2"),
        make_cfg("regularization.lam=0.3", "seed=2", "+regularization.lam_per_layer.fc1=1"),
        make_cfg(*base, "optimizer.lr=0.01", "optimizer.momentum=0.5",
                 "optimizer.nesterov=true"),                # per-network optimizer settings
        make_cfg(*base, "regularization=l2_hidden", "regularization.normalize=dataset",
                 "regularization.mode=optimizer", "regularization.include_bias=true"),
        make_cfg(*base, "model.dropout=0.2", "trainer.gradient_clip_val=0.5",
                 "trainer.gradient_clip_algorithm=value"),
        make_cfg(*base, "optimizer=adam"),                  # another optimizer class
        make_cfg(*base, "optimizer=adam", "optimizer.betas=[0.8,0.9]", "optimizer.eps=1e-6"),
        make_cfg("regularization.lam=-1"),                 # rejected: ordinary path records it
        make_cfg(*base, "resume=abc"),                     # resume: ordinary
        make_cfg(*base, "+optimizer.alpha=0.9", "optimizer._target_=torch.optim.RMSprop"),
        make_cfg(*base, "model=cnn"),                      # shapes
        make_cfg(*base, "model.hidden=[16,16]"),           # another depth (a width stacks)
        make_cfg(*base, "data.batch_size=20"),             # the data stream
        make_cfg(*base, "trainer.max_epochs=2"),
    ]
    assert plan([group_key(c) for c in cfgs]) == [[0, 1, 2, 3, 4, 5], [6, 7], [8], [9], [10],
                                                  [11], [12], [13], [14]]
    assert group_key(cfgs[8]) is None and group_key(cfgs[9]) is None


def test_a_lr_by_selection_by_lam_by_seed_grid_trains_as_one_stack(tmp_path):
    """The issue's grid on experiment=lambda_sweep (shrunk): its 16 children share one
    vectorized group, children with another lr train otherwise, and a child re-run alone
    (reproduce --check) gives its numbers exactly."""
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    r = run_cli("l2lab.train", "-m", "experiment=lambda_sweep", "optimizer.lr=0.01,0.05",
                "regularization=l2,l2_dense", "regularization.lam=0,0.1", "seed=0,1",
                "data.train_size=90", "data.val_size=60", "data.batch_size=40",
                "model.hidden=[64,64]", "trainer.max_epochs=2", f"tracking.uri={store}",
                f"hydra.sweep.dir={tmp_path}/multirun/g", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "16 stacked in 1 group(s)" in r.stdout + r.stderr
    client = MlflowClient(store)
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    kids = runs_of(client, **{"mlflow.parentRunId": parent.info.run_id})
    assert len(kids) == 16 and all(c.info.status == "FINISHED" for c in kids)
    assert len({c.data.tags["l2lab.vectorized_group"] for c in kids}) == 1
    by = {(c.data.params["optimizer.lr"], c.data.params["regularization.name"],
           c.data.params["regularization.lam"], c.data.params["seed"]): c for c in kids}
    assert len(by) == 16
    assert by[("0.05", "l2_dense", "0.1", "1")].data.params["l2.layers"] == "fc1,fc2"
    assert by[("0.05", "l2", "0.1", "1")].data.params["l2.layers"] == "fc1,fc2,out"
    for reg in ("l2", "l2_dense"):
        for lam in ("0.0", "0.1"):
            for seed in ("0", "1"):
                slow, fast = by[("0.01", reg, lam, seed)], by[("0.05", reg, lam, seed)]
                assert _history(client, slow.info.run_id, "train/ce") != \
                    _history(client, fast.info.run_id, "train/ce")
    child = by[("0.05", "l2_dense", "0.1", "1")]
    rc = reproduce.main([child.info.run_id, "--check", "--tracking-uri", store,
                         "--out", str(tmp_path / "again")])
    assert rc == 0


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
    # every job's own line, with its run id, without Hydra's prefix
    assert all(re.search(rf"^l2lab: #{i} lam=\S+ seed=\d: run [0-9a-f]{{8}}", r.stdout + r.stderr,
                         re.M) for i in (0, 1, 2, 3, 6, 7)), r.stdout + r.stderr
    # the two networks of one stack that diverged alike: one line with both jobs and runs
    assert re.search(r"^l2lab: 2 jobs \(#4, #5; runs [0-9a-f]{8}, [0-9a-f]{8}\) FAILED: "
                     r"non-finite loss", r.stdout + r.stderr, re.M), r.stdout + r.stderr
    assert "[HYDRA] \t#" not in r.stdout + r.stderr
    # the table and summary are built from the children as for any sweep
    assert client.list_artifacts(parent.info.run_id, "figures")
    # reproduce --check re-runs a stacked job as a stack of one: on CPU exactly its numbers
    for i, c in enumerate(ok):
        rc = reproduce.main([c.info.run_id, "--check", "--tracking-uri", store,
                             "--out", str(tmp_path / f"again{i}")])
        assert rc == 0, c.data.tags["mlflow.runName"]


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
    # a child continues alone; trained to another length than it was asked, it is a new run
    r = run_cli("l2lab.train", f"resume={rid}", f"trainer.max_epochs={e + 3}",
                f"tracking.uri={store}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (new,) = runs_of(client, **{"l2lab.continued_from": rid})
    assert new.info.status == "FINISHED" and new.data.params["trainer.max_epochs"] == str(e + 3)
    for key in ("train/loss", "val/ce", "weights/sq_norm_total"):
        assert [s for s, _ in _history(client, new.info.run_id, key)] == list(range(e + 3)), key
    ce = [v for _, v in _history(client, new.info.run_id, "train/ce")]
    assert ce[-1] < ce[0]  # it trained on from the stack's weights, not from scratch
    old = client.get_run(rid)
    assert old.info.status == "KILLED" and old.data.tags["l2lab.continued_by"] == new.info.run_id


def test_the_lr_by_decay_preset_is_one_stack_of_90_networks():
    """experiment=mnist1d_lr_decay: 2 arms × 3 lr × 5 λ × 3 seeds, composed twice (one per arm)
    and planned as one stack; each arm's own unit of λ (the README's λ × lr figures)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from l2lab import CONF_DIR
    from l2lab.config.composing import SweepConfigs
    from l2lab.config.stackable import member_lams, shape_key, task_config, valid_lams

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    master = loader.load_configuration("train", overrides=["experiment=mnist1d_lr_decay"],
                                       run_mode=RunMode.MULTIRUN)
    params = ["experiment=mnist1d_lr_decay",
              *(f"{k}={v}" for k, v in master.hydra.sweeper.params.items())]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    assert len(batch) == 90
    configs = SweepConfigs(loader)
    configs.validate(master, batch)
    assert configs.compositions == 2
    members = [configs.member(master, ov) for ov in batch]
    keys = {shape_key(OmegaConf.to_container(task_config(m.rep), resolve=True))
            for m in members if valid_lams(member_lams(m.values))}
    assert len(keys) == 1 and None not in keys
    arms = {(m.values["regularization.name"], m.values["regularization.mode"],
             m.values["regularization.normalize"]) for m in members}
    assert arms == {("l2", "loss", "batch"), ("decoupled", "optimizer", "none")}
    assert {m.rep.optimizer._target_ for m in members} == {"torch.optim.AdamW"}
    assert {m.rep.model.hidden[0] for m in members} == {100}  # the paper's MLP


def test_adamw_without_weight_decay_steps_as_adam():
    """The preset's L2 arm runs on AdamW (one optimizer class, one stack): with weight_decay 0
    its step is Adam's, bit for bit."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50, 7))
    b = torch.nn.Parameter(a.detach().clone())
    opts = [torch.optim.Adam([a], lr=3e-3), torch.optim.AdamW([b], lr=3e-3, weight_decay=0.0)]
    for step in range(20):
        g = torch.randn(50, 7) * (step + 1)
        for p, opt in zip((a, b), opts, strict=True):
            p.grad = g.clone()
            opt.step()
        assert torch.equal(a, b)

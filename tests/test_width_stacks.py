"""Networks of other widths in one stack (issue 32, item 3): which jobs share a stack (the 2×
padding rule, the activation rule on CUDA), and on CPU each child of a λ × width stack equal to
its ordinary run, bit for bit, over the whole run (as ``tests/test_engine.py`` for λ × seed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_cfg, run_cli, runs_of
from mlflow.tracking import MlflowClient

from l2lab.config.stackable import group_key, pads_exactly, width_stacks
from l2lab.run.engine import fit_configs
from l2lab.train import train

TINY = ["data.train_size=230", "data.val_size=60", "data.batch_size=50",
        "trainer.max_epochs=6"]


def _mlp(*hidden: int, inputs: int = 64, classes: int = 10) -> list[tuple[int, int]]:
    """An MLP's weight shapes (out, in)."""
    dims = [inputs, *hidden]
    return [*((o, i) for i, o in zip(dims[:-1], hidden, strict=True)), (classes, dims[-1])]


def test_widths_group_while_padding_at_most_doubles_the_work():
    # work: 64·16+16·16+10·16 = 1440, 64·32+32·32+10·32 = 3392, 64·64+64·64+10·64 = 8832
    shapes = [_mlp(16, 16), _mlp(64, 64), _mlp(32, 32), _mlp(64, 64)]
    # widest first: 64, 64 (equal), then 32 (3·8832 = 26496 <= 2·(2·8832 + 3392) = 42112), then
    # 16 (4·8832 = 35328 <= 2·(21056 + 1440) = 44992): one stack
    assert width_stacks(shapes) == [[0, 1, 2, 3]]
    # one 300-wide network and three 2-wide ones: the narrow three would quadruple the work
    wide, narrow = _mlp(300, 300), _mlp(2, 2)
    # (work 112200 and 152): the wide one and one narrow (2·112200 <= 2·112352), then the
    # other two narrow ones on their own
    assert width_stacks([narrow, wide, narrow, narrow]) == [[0, 1], [2, 3]]
    # the limit is the rule's one number: at 1.0 only equal shapes share a stack
    assert width_stacks(shapes, limit=1.0) == [[1, 3], [2], [0]]


def test_an_activation_without_f0_equal_0_splits_widths_on_cuda_only():
    shapes = [_mlp(16, 16), _mlp(32, 32), _mlp(16, 16)]
    for act in ("relu", "tanh", "gelu"):
        assert pads_exactly(act, cuda=True)
    assert not pads_exactly("sigmoid", cuda=True)
    assert pads_exactly("sigmoid", cuda=False)  # CPU: each network at its own width
    assert width_stacks(shapes, pads_exactly("sigmoid", cuda=True)) == [[1], [0, 2]]
    assert width_stacks(shapes, pads_exactly("sigmoid", cuda=False)) == [[0, 1, 2]]


def test_the_shape_key_stacks_widths_at_one_depth_of_mlp_and_cnn_only():
    def key(*ov: str) -> str | None:
        return group_key(make_cfg(*ov, tiny=False))

    assert key("model.hidden=[16,16]") == key("model.hidden=[64,32]")
    assert key("model.hidden=[16,16]") != key("model.hidden=[16]")  # depth differs
    cnn = ["model=cnn", "model.hidden=[16]"]
    assert key(*cnn, "model.channels=[4,8]") == key(*cnn, "model.channels=[8,16]")
    assert key(*cnn, "model.channels=[4,8]") != key(*cnn, "model.channels=[4]")
    res = ["model=resnet1d", "data=mnist1d"]  # BatchNorm: widths are its shape
    assert key(*res, "model.channels=[4,8]") != key(*res, "model.channels=[8,16]")


def _history(client: MlflowClient, rid: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(rid, key))


def _weights(client: MlflowClient, rid: str, tmp: Path) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(rid, "model/state_dict.pt", dst_path=str(tmp / rid))
    return torch.load(path, weights_only=True)


def _grid_equals_ordinary(tmp_path: Path, store: str, extra: list[str],
                          jobs: list[list[str]], dying: list[list[str]] = ()) -> None:
    """Each job alone and all in one stack (with ``dying``: jobs that diverge and leave it),
    each child equal to its ordinary run."""
    cfgs = [make_cfg(f"tracking.uri={store}", *TINY, *extra, *ov, tiny=False) for ov in jobs]
    for i, (cfg, ov) in enumerate(zip(cfgs, jobs, strict=True)):
        train(cfg, overrides=ov, output_dir=tmp_path / f"ordinary{i}")
    results = fit_configs(
        cfgs + [make_cfg(f"tracking.uri={store}", *TINY, *extra, *ov, tiny=False)
                for ov in dying], jobs + list(dying),
        [tmp_path / f"stacked{i}" for i in range(len(jobs) + len(dying))])
    assert all(not isinstance(r, dict) for r in results[len(jobs):]), results
    results = results[:len(jobs)]
    assert all(isinstance(r, dict) for r in results), results
    client = MlflowClient(store)
    by_dir = {r.data.tags["l2lab.output_dir"]: r for r in runs_of(client)}
    children = [by_dir[str(tmp_path / f"stacked{i}")] for i in range(len(jobs))]
    assert len({c.data.tags["l2lab.vectorized_group"] for c in children}) == 1  # one stack
    for i, child in enumerate(children):
        ordinary = by_dir[str(tmp_path / f"ordinary{i}")]
        assert ordinary.data.metrics.keys() == child.data.metrics.keys()
        for key in ordinary.data.metrics:  # every epoch of every metric, exactly
            assert _history(client, ordinary.info.run_id, key) == \
                _history(client, child.info.run_id, key), (jobs[i], key)
        wa = _weights(client, ordinary.info.run_id, tmp_path)
        wb = _weights(client, child.info.run_id, tmp_path)  # at its own width
        assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (jobs[i], name)
    assert len({round(r["train/ce"], 6) for r in results}) == len(jobs)


def test_a_lambda_by_width_grid_is_one_stack_each_child_its_ordinary_run(tmp_path, store):
    """model.hidden over 3 widths × 2 λ × 2 seeds, with dropout (each mask drawn at its
    network's width)."""
    jobs = [[f"model.hidden=[{h},{h}]", f"regularization.lam={lam}", f"seed={seed}"]
            for h in (8, 16, 24) for lam in (0, 0.3) for seed in (0, 1)]
    _grid_equals_ordinary(tmp_path, store, ["model.dropout=0.2"], jobs)


def test_cnn_channels_and_a_sigmoid_stack_on_cpu_each_child_its_ordinary_run(tmp_path, store):
    """model.channels (the dense head's input width follows), Adam with mode=optimizer decay,
    gradient clipping by norm (each norm at its network's width) and an activation with
    f(0) != 0: on CPU each network computes at its own width."""
    jobs = [[f"model.channels=[{c},{2 * c}]", f"regularization.lam={lam}", "seed=0"]
            for c in (2, 3, 4) for lam in (0, 0.3)]
    _grid_equals_ordinary(tmp_path, store, [
        "model=cnn", "model.hidden=[8]", "model.activation=sigmoid", "optimizer=adam",
        "regularization.mode=optimizer", "trainer.gradient_clip_val=0.5"], jobs)


def test_when_the_widest_network_leaves_a_width_stack_the_others_train_on_exactly(
        tmp_path, store, monkeypatch):
    """The 24-wide network diverges in its first epoch and leaves the stack: the stack is rebuilt
    at the next widest (16), its weights and optimizer state cut to it, and the two that stay
    still equal their ordinary runs."""
    from l2lab.core.module import L2Module

    removals = []
    remove = L2Module.remove

    def spy(self, positions):
        removals.append((self.current_epoch, self.k))
        remove(self, positions)

    monkeypatch.setattr(L2Module, "remove", spy)
    jobs = [[f"model.hidden=[{h}]", "regularization.lam=0.1", "seed=0"] for h in (8, 16)]
    _grid_equals_ordinary(tmp_path, store, ["optimizer=sgd", "optimizer.momentum=0.9"], jobs,
                          dying=[["model.hidden=[24]", "seed=0", "optimizer.lr=1e30"]])
    assert removals == [(0, 3)]


def test_odd_sizes_whose_rows_start_off_the_allocators_boundary_stack_exactly(tmp_path, store):
    """Widths 7 and 13 with batches of 37: a network's rows start i·37·7 floats into the stack's
    tensor, off the 64-byte boundary every ordinary run's tensor starts on, where F.linear
    rounds otherwise on an AVX-512 CPU (each network's rows are copied to an aligned start)."""
    jobs = [["model.hidden=[7,13]", f"regularization.lam={lam}", f"seed={seed}"]
            for lam in (0, 0.3) for seed in (0, 1)]
    _grid_equals_ordinary(tmp_path, store, ["data.batch_size=37", "model.activation=gelu",
                                            "model.dropout=0.3", "optimizer=adam"], jobs)


def test_a_sigmoid_stack_left_by_all_but_one_network_trains_it_on_exactly(tmp_path, store):
    """The stack of two sigmoid networks (its activations run network by network) becomes a
    stack of one (the activation runs once) when the other diverges: the one left still equals
    its ordinary run."""
    _grid_equals_ordinary(tmp_path, store, ["model.activation=sigmoid", "optimizer=sgd"],
                          [["model.hidden=[8]", "regularization.lam=0.1", "seed=0"]],
                          dying=[["model.hidden=[12]", "seed=0", "optimizer.lr=1e30"]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_width_stack_on_gpu_pads_with_zeros_that_stay_zero(tmp_path, store):
    """One batched matmul over zero-padded weights: each child within rel 1e-3 of its ordinary
    GPU run, and its saved weights at its own width."""
    jobs = [[f"model.hidden=[{h},{h}]", f"regularization.lam={lam}", "seed=0",
             "trainer.accelerator=gpu", "model.dropout=0.2"]
            for h in (8, 16, 24) for lam in (0, 0.3)]
    cfgs = [make_cfg(f"tracking.uri={store}", *ov) for ov in jobs]
    alone = [train(c, overrides=ov, output_dir=tmp_path / f"o{i}")
             for i, (c, ov) in enumerate(zip(cfgs, jobs, strict=True))]
    nodrop = [[*ov[:-1], "model.dropout=0"] for ov in jobs]
    cfgs0 = [make_cfg(f"tracking.uri={store}", *ov) for ov in nodrop]
    alone0 = [train(c, overrides=ov, output_dir=tmp_path / f"p{i}")
              for i, (c, ov) in enumerate(zip(cfgs0, nodrop, strict=True))]
    stacked0 = fit_configs(cfgs0, nodrop, [tmp_path / f"t{i}" for i in range(len(jobs))])
    for a, s in zip(alone0, stacked0, strict=True):
        for k in ("train/ce", "val/ce", "weights/sq_norm_total"):
            assert s[k] == pytest.approx(a[k], rel=1e-3), k
    stacked = fit_configs(cfgs, jobs, [tmp_path / f"s{i}" for i in range(len(jobs))])
    assert all(isinstance(r, dict) for r in stacked)  # dropout: masks differ on CUDA
    for a, s in zip(alone, stacked, strict=True):
        assert s["weights/sq_norm_total"] == pytest.approx(a["weights/sq_norm_total"], rel=0.5)


def test_width_children_checkpoint_at_their_own_width_and_resume_alone(tmp_path, store):
    """Each child's ``last.ckpt`` is a stack of one at its own width (weights and optimizer
    state): it continues alone (``resume``) exactly as its ordinary run trains on, and such
    checkpoints of other widths merge into one padded stack's."""
    from l2lab.base import last_checkpoint
    from l2lab.core.stacked import merge_member_checkpoints

    base = ["data.train_size=230", "data.val_size=60", "data.batch_size=50", "optimizer=sgd",
            "optimizer.momentum=0.9", "regularization.lam=0.1", "seed=0"]
    jobs = [["model.hidden=[8]"], ["model.hidden=[24]"]]
    cfgs = [make_cfg(f"tracking.uri={store}", *base, *ov, "trainer.max_epochs=3", tiny=False)
            for ov in jobs]
    dirs = [tmp_path / f"stacked{i}" for i in range(len(jobs))]
    assert all(isinstance(r, dict) for r in fit_configs(cfgs, jobs, dirs))
    ckpts = [last_checkpoint(d) for d in dirs]
    for ck, h in zip(ckpts, (8, 24), strict=True):
        state = torch.load(ck, weights_only=True)
        assert state["state_dict"]["net.fc1.weight"].shape == (1, h, 64)
        assert state["state_dict"]["net.out.weight"].shape == (1, 10, h)
        moments = [v["momentum_buffer"] for v in state["optimizer_states"][0]["state"].values()]
        assert moments[0].shape == (1, h, 64)
    merged = torch.load(merge_member_checkpoints(ckpts), weights_only=True)
    w = merged["state_dict"]["net.fc1.weight"]
    assert w.shape == (2, 24, 64)
    narrow = torch.load(ckpts[0], weights_only=True)["state_dict"]["net.fc1.weight"][0]
    assert torch.equal(w[0, :8], narrow) and not w[0, 8:].any()
    # the narrow child resumed alone to 5 epochs == its ordinary 5-epoch run
    client = MlflowClient(store)
    by_dir = {r.data.tags["l2lab.output_dir"]: r for r in runs_of(client)}
    rid = by_dir[str(dirs[0])].info.run_id
    five = [*base, *jobs[0], "trainer.max_epochs=5"]
    resumed = train(make_cfg(f"tracking.uri={store}", *five, f"resume={rid}", tiny=False),
                    overrides=[f"resume={rid}", "trainer.max_epochs=5"],
                    output_dir=tmp_path / "resumed")
    ordinary = train(make_cfg(f"tracking.uri={store}", *five, tiny=False), overrides=five,
                     output_dir=tmp_path / "ordinary")
    assert resumed["val/ce"] == ordinary["val/ce"]
    assert resumed["weights/sq_norm_total"] == ordinary["weights/sq_norm_total"]


def test_a_width_sweep_through_the_vectorized_launcher_is_one_stack_and_reproduces(tmp_path):
    """``model.hidden`` swept on the command line: the grouped sweeper composes one config, the
    launcher trains the 6 jobs as one stack, each child logs its own width, and ``reproduce
    --check`` of a narrow child (an ordinary run of its own config) agrees."""
    from l2lab import reproduce

    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    r = run_cli("l2lab.train", "-m", "hydra/launcher=vectorized", "hydra/sweeper=grouped",
                "model.hidden=[8],[16],[24]", "regularization.lam=0,0.3", "data.train_size=120",
                "data.val_size=60", "data.batch_size=40", "trainer.max_epochs=3",
                f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/multirun/w", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(store)
    kids = [c for c in runs_of(client) if c.data.tags.get("l2lab.role") != "sweep"]
    assert len(kids) == 6 and all(c.info.status == "FINISHED" for c in kids)
    assert len({c.data.tags["l2lab.vectorized_group"] for c in kids}) == 1
    assert sorted(c.data.params["model.hidden"] for c in kids) == \
        sorted(["[8]", "[16]", "[24]"] * 2)
    narrow = next(c for c in kids if c.data.params["model.hidden"] == "[8]")
    rc = reproduce.main([narrow.info.run_id, "--check", "--tracking-uri", store,
                         "--out", str(tmp_path / "again")])
    assert rc == 0

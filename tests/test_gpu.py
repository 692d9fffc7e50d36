"""GPU checks; skipped without CUDA (CI has none). Run them on a GPU machine with `make test`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg, runs_of

from l2lab import reproduce
from l2lab.train import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_on_gpu_is_recorded_and_close_to_cpu(tmp_path, store, client):
    gpu = train(make_cfg(f"tracking.uri={store}", "trainer.accelerator=gpu",
                         "trainer.deterministic=true"), output_dir=tmp_path / "g")
    cpu = train(make_cfg(f"tracking.uri={store}", "trainer.accelerator=cpu"),
                output_dir=tmp_path / "c")
    assert all(r.info.status == "FINISHED" for r in runs_of(client))
    for k in ("train/ce", "val/ce", "weights/sq_norm_total"):
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-3), k


def test_reproduce_on_gpu_within_the_documented_tolerance(tmp_path, store, client, capsys):
    train(make_cfg(f"tracking.uri={store}", "trainer.accelerator=gpu",
                   "trainer.deterministic=true"), output_dir=tmp_path / "g")
    (orig,) = runs_of(client)
    rc = reproduce.main([orig.info.run_id, "--check", "--tracking-uri", store,
                         "--out", str(tmp_path / "again")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "GPU, rtol=0.0001" in out


def test_a_stack_on_gpu_trains_each_network_as_its_ordinary_gpu_run(tmp_path, store, client):
    from l2lab.run.engine import fit_configs

    ovs = [[f"regularization.lam={lam}", f"seed={seed}", "trainer.accelerator=gpu",
            "model=cnn", "model.channels=[4]", "model.hidden=[16]"]
           for lam in (0.0, 0.3) for seed in (0, 1)]
    cfgs = [make_cfg(f"tracking.uri={store}", *ov) for ov in ovs]
    alone = [train(c, overrides=ov, output_dir=tmp_path / f"o{i}")
             for i, (c, ov) in enumerate(zip(cfgs, ovs, strict=True))]
    stacked = fit_configs(cfgs, ovs, [tmp_path / f"s{i}" for i in range(len(ovs))])
    for a, s in zip(alone, stacked, strict=True):  # grouped convolutions round differently
        for k in ("train/ce", "val/ce", "weights/sq_norm_total"):
            assert s[k] == pytest.approx(a[k], rel=1e-3), k


def test_a_batchnorm_resnet_stack_on_gpu_is_its_ordinary_gpu_runs_within_tolerance(
        tmp_path, store, client):
    """One ``F.batch_norm`` over the K networks' channels and one grouped convolution per layer:
    each child within rel 1e-3 of its ordinary GPU run over 3 epochs (docs/models.md)."""
    from l2lab.run.engine import fit_configs

    ovs = [[f"regularization.lam={lam}", f"seed={seed}", "trainer.accelerator=gpu",
            "model=resnet1d", "data=mnist1d", "data.train_size=400", "data.val_size=100",
            "data.batch_size=50", f"data.root={tmp_path}/data"]
           for lam in (0.0, 0.3) for seed in (0, 1)]
    cfgs = [make_cfg(f"tracking.uri={store}", *ov) for ov in ovs]
    alone = [train(c, overrides=ov, output_dir=tmp_path / f"o{i}")
             for i, (c, ov) in enumerate(zip(cfgs, ovs, strict=True))]
    stacked = fit_configs(cfgs, ovs, [tmp_path / f"s{i}" for i in range(len(ovs))])
    for a, s in zip(alone, stacked, strict=True):
        for k in ("train/ce", "val/ce", "weights/sq_norm_total"):
            assert s[k] == pytest.approx(a[k], rel=1e-3), k


@pytest.mark.parametrize(("precision", "lams"), [("bf16-mixed", (0.032,)),
                                                 ("32-true", (0.0, 0.032))],
                         ids=["bf16-one", "fp32-stack-of-two"])
def test_a_resnet18_step_on_gpu_never_waits_for_the_host(precision, lams, tmp_path, monkeypatch):
    """The preset's recipe (ResNet-18, CIFAR stem, SGD Nesterov, per-step cosine) on CIFAR-shaped
    tensors on the GPU: every hook from a step's ``on_train_batch_start`` to its
    ``on_train_batch_end`` (forward, backward, optimizer and schedule, two optimizer steps a
    Lightning batch) runs under
    ``torch.cuda.set_sync_debug_mode("error")``, so a host-device synchronisation inside a step
    fails the test. The images and the stack's convolution weights are channels-last, and under
    bf16-mixed the convolutions compute in bf16."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from l2lab.base import last_checkpoint
    from l2lab.core.data import Splits
    from l2lab.run import engine, progress
    from l2lab.run.recorder import Recorder
    from l2lab.tracking.tracker import NullTracker

    steps, dtypes = [], []

    class SyncGuard(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")
            steps.append(batch_idx)

    own = progress.callbacks  # the guard's hooks run first: before the recorder's and these
    monkeypatch.setattr(progress, "callbacks", lambda *a: [SyncGuard(), *own(*a)])
    monkeypatch.setattr(engine, "STEPS_PER_BATCH", 2)  # the 4 steps in 2 Lightning batches
    g = torch.Generator().manual_seed(0)
    image = lambda n: (torch.randn(n, 3, 32, 32, generator=g),  # noqa: E731
                       torch.randint(0, 10, (n,), generator=g))
    splits = Splits("synthetic", image(128), image(64), None, 10)
    cfgs = [make_cfg("model=resnet18", "model.cifar_stem=true", "optimizer.lr=0.1",
                     "optimizer.nesterov=true", "scheduler=cosine", "scheduler.interval=step",
                     f"regularization.lam={lam}", "data.batch_size=32", "trainer.max_epochs=1",
                     "trainer.accelerator=gpu", f"trainer.precision={precision}", tiny=False)
            for lam in lams]
    members = [engine.build_member(c, splits, OmegaConf.to_container(c, resolve=True))
               for c in cfgs]
    module = engine.stack(cfgs[0], members, example=splits.train[0])
    module.net.layer1[0].conv1.register_forward_hook(
        lambda m, i, out: dtypes.append(out.dtype) if m.training else None)
    recorder = Recorder([NullTracker() for _ in lams],
                        [last_checkpoint(tmp_path / f"n{i}") for i in range(len(lams))])
    try:
        engine.lightning_fit(cfgs[0], module, splits, recorder, [0] * len(lams), tmp_path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps == [0, 1]
    w = module.net.conv1.weight
    assert w.is_cuda and w.reshape(-1, *w.shape[2:]).is_contiguous(
        memory_format=torch.channels_last)
    want = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    assert dtypes and set(dtypes) == {want} and w.dtype == torch.float32
    assert all(math.isfinite(v) for _, m in recorder.last for v in m.values())

"""GPU checks; skipped without CUDA (CI has none). Run them on a GPU machine with `make test`."""

from __future__ import annotations

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

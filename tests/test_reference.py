"""The harness against its spec, ``l2lab.core.reference``: an independent plain-PyTorch loop that
imports nothing of the harness (``tests/test_layers.py``). On CPU the harness trains exactly what
the plain loop trains, for each kind of network and setting: every per-epoch metric and the final
weights (buffers included) compared with ``==``, not a tolerance. Each setting is also shown to
change the result, so that the equality is not that of a setting both sides ignore."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_cfg, reg_cfg, runs_of
from mlflow.tracking import MlflowClient

from l2lab.base import ConfigError
from l2lab.core import reference
from l2lab.core.data import EpochShuffle, StackedBatches, TensorBatches, load_data
from l2lab.core.regularization import select_layers
from l2lab.models import CNN, MLP, ResNet1d, resnet18
from l2lab.train import train

CNN_SMALL = ["model=cnn", "model.channels=[4,8]"]

#: id -> (the run's overrides, the overrides that the checked settings add to them)
CASES = {
    "cnn-per-layer-lam": (
        [*CNN_SMALL, "regularization.lam=0.05"],
        ["+regularization.lam_per_layer.conv1=0.5", "+regularization.lam_per_layer.out=0.0"]),
    "dropout-clip-value": (
        ["regularization.lam=0.05"],
        ["model.dropout=0.3", "trainer.gradient_clip_val=0.01",
         "trainer.gradient_clip_algorithm=value"]),
    "cnn-dropout-clip-norm": (
        [*CNN_SMALL, "regularization.lam=0.05"],
        ["model.dropout=0.2", "trainer.gradient_clip_val=0.05"]),
    "cnn-augment-crop-flip": (
        [*CNN_SMALL, "regularization.lam=0.05"], ["data.augment=true", "data.augment_pad=2"]),
    "adamw-optimizer-mode": (
        ["optimizer=adamw", "optimizer.lr=0.01", "regularization.lam=0"],
        ["regularization.mode=optimizer", "regularization.lam=0.5",
         "+regularization.lam_per_layer.out=0.1"]),
}


def _logged(client: MlflowClient, rid: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(rid, key), key=lambda m: m.step)]


def _harness_equals_reference(tmp_path: Path, store: str, *overrides: str, tiny: bool = True
                              ) -> dict[str, torch.Tensor]:
    """Train ``overrides`` (on conftest's TINY settings unless ``tiny=False``) with the harness
    and with the plain loop; assert the same whole run; returns the plain loop's final state,
    buffers included."""
    cfg = make_cfg(f"tracking.uri={store}", *overrides, tiny=tiny)
    train(cfg, output_dir=tmp_path / "run")
    client = MlflowClient(store)
    (run,) = runs_of(client)
    rid = run.info.run_id
    net, history = reference.train(cfg, load_data(cfg.data))
    assert len(history) == int(cfg.trainer.max_epochs)
    per_epoch = [k for k in history[0]]
    assert {*per_epoch, "test/ce"} >= {"train/ce", "train/loss", "train/acc", "val/ce",
                                       "gap/ce", "weights/sq_norm_total"}
    # every key the harness logs, but the effective learning rates (lr/||W||², a function of
    # the per-layer norms compared here)
    assert {k for k in run.data.metrics if not k.startswith("weights/eff_lr/")} == \
        set(history[-1])
    for key in per_epoch:
        assert _logged(client, rid, key) == [m[key] for m in history], key
    for key in (k for k in history[-1] if k.startswith("test/")):
        assert run.data.metrics[key] == history[-1][key], key
    logged = torch.load(client.download_artifacts(rid, "model/state_dict.pt", str(tmp_path)),
                        weights_only=True)
    mine = net.state_dict()
    assert logged.keys() == mine.keys()
    for name, value in mine.items():
        assert torch.equal(logged[name], value), name
    return mine


@pytest.mark.parametrize("case", list(CASES))
def test_the_harness_trains_exactly_what_the_plain_loop_trains(tmp_path, store, case):
    base, settings = CASES[case]
    final = _harness_equals_reference(tmp_path, store, *base, *settings)
    cfg = make_cfg(*base)
    without, _ = reference.train(cfg, load_data(cfg.data))
    assert any(not torch.equal(v, final[k]) for k, v in without.state_dict().items()), \
        f"{settings} changed nothing: the comparison would not see them"


def test_a_batchnorm_resnet_trains_exactly_as_the_plain_loop_running_statistics_included(
        tmp_path, store, mnist1d_root):
    """``model=resnet1d`` with BatchNorm: the plain loop trains an ordinary module (``train()``
    to train, ``eval()`` for val and test); the harness's run equals it, the running
    statistics and their batch counts in the final state included."""
    final = _harness_equals_reference(
        tmp_path, store, "model=resnet1d", "model.channels=[8,16]", "data=mnist1d",
        f"data.root={mnist1d_root}", "data.train_size=96", "data.val_size=64",
        "data.batch_size=32", "trainer.max_epochs=2", "regularization.lam=0.05", tiny=False)
    stats = [k for k in final if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 6  # bn1, two per block, one per downsample
    assert all(int(v) == 2 * 3 for k, v in final.items() if k.endswith("num_batches_tracked"))
    assert not torch.equal(final["bn1.running_var"], torch.ones_like(final["bn1.running_var"]))


def test_the_spec_batches_in_the_harness_order():
    """The documented order (seed·1000003 + epoch) is the one the harness's loaders walk, alone
    and as network i of a stack."""
    x, y = torch.arange(23.0)[:, None], torch.arange(23)
    for seed, epoch in [(0, 0), (0, 1), (7, 3)]:
        alone = TensorBatches(x, y, 5, shuffle=True, seed=seed)
        alone.sampler.set_epoch(epoch)
        stacked = StackedBatches(x, y, 5, [seed + 1, seed])
        stacked.sampler.set_epoch(epoch)
        mine = list(reference.batches(x, y, 5, reference.epoch_order(23, seed, epoch)))
        for (xa, ya), (_, ys), (xm, ym) in zip(alone, stacked, mine, strict=True):
            assert torch.equal(xa, xm) and torch.equal(ya, ym)
            assert torch.equal(ys[len(ym):], ym)  # network 1 of the stack
    assert not torch.equal(reference.epoch_order(23, 0, 0), reference.epoch_order(23, 0, 1))
    assert torch.equal(EpochShuffle(23, 4, True).order(), reference.epoch_order(23, 4, 0))


NETS = {
    "cnn": lambda: CNN((1, 8, 8), 10, channels=(4, 8), hidden=(16,)),
    "mlp": lambda: MLP((1, 8, 8), 10, (16, 8)),
    "resnet1d": lambda: ResNet1d((1, 40), 10, channels=(4, 8), blocks=2),
    "resnet18": lambda: resnet18((1, 8, 8), 10),
    "attention": lambda: torch.nn.MultiheadAttention(8, 2),  # out_proj: a Linear subclass
}


@pytest.mark.parametrize("reg", [
    {},
    {"layers": ["conv*", "fc*"], "lam_per_layer": {"*conv2": 0.7, "*conv*": 0.2}},
    {"types": ["Conv2d"], "include_bias": True},
    {"exclude": ["fc*"], "min_params": 100, "lam_per_layer": {"c*": 0.1}},
    {"types": ["Linear"], "layers": "*", "include_bias": True, "lam_per_layer": {"out": 0.0}},
    {"types": ["BatchNorm*", "Conv*"], "layers": ["layer*", "bn1"], "exclude": ["*.downsample.*"],
     "lam_per_layer": {"*bn*": 0.0, "layer2.*": 0.9}},
    {"types": ["Conv*", "Linear"], "min_params": 1000, "include_bias": True},
], ids=["default", "patterns-first-match", "types-bias", "exclude-min-params", "string-layers",
        "norms-and-convs", "big-layers"])
def test_the_spec_selects_the_layers_the_harness_selects(reg):
    """The plain selection, written again from the config, against the harness's rule, on each
    kind of network; where the harness refuses a selection for a network (a pattern that
    matches none of its layers), at least one other network takes it."""
    compared = 0
    for make in NETS.values():
        net, node = make(), reg_cfg(**reg)
        try:
            want = select_layers(net, lam=node["lam"], layers=node["layers"],
                                 exclude=node["exclude"], types=node["types"],
                                 min_params=node["min_params"],
                                 lam_per_layer=node["lam_per_layer"],
                                 include_bias=node["include_bias"])
        except ConfigError:
            continue
        compared += 1
        got = reference.select(net, node)
        assert [(s.name, s.lam) for s in got] == [(s.name, s.lam) for s in want]
        assert [[id(p) for p in s.tensors] for s in got] == [[id(p) for p in s.params]
                                                             for s in want]
    assert compared >= 2

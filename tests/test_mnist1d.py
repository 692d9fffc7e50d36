"""MNIST-1D: the package's generator (offline, deterministic, cached), the 1-D CNN, and a short
end-to-end run recorded as the contract says."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import runs_of
from hydra import compose, initialize_config_dir
from torch import nn

from l2lab import CONF_DIR
from l2lab.core.data import load_data
from l2lab.run.engine import build_net
from l2lab.train import train


def _data(root, **kw) -> dict:
    return {"name": "mnist1d", "root": str(root), "train_size": None, "val_size": 500,
            "split_seed": 0, "batch_size": 100, **kw}


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture(scope="module")
def root(mnist1d_root):
    """One generated copy (the session's) shared by the tests that only read it."""
    return mnist1d_root


def test_generation_is_deterministic_offline_and_cached(tmp_path, monkeypatch, root):
    import mnist1d.data

    def no_network(*a, **kw):
        raise AssertionError("MNIST-1D must be generated, not downloaded")

    monkeypatch.setattr(mnist1d.data.requests, "get", no_network)
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    b = load_data(_data(tmp_path / "b"))  # an independent generation (the module's is another)
    # the generator seeds numpy's and random's global state; loading leaves both as they were
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    # the module's root may also cache other sizes (other tests share it): the file of these
    # generation arguments is the one the independent generation wrote
    (fresh,) = (tmp_path / "b" / "mnist1d").glob("*.npz")
    cache = root / "mnist1d" / fresh.name

    # loading the module's root reads its cache: the generator is not called again
    def generator_called(*a, **kw):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(mnist1d.data, "make_dataset", generator_called)
    stamp = cache.stat().st_mtime_ns
    a = load_data(_data(root))
    assert cache.stat().st_mtime_ns == stamp
    for split in ("train", "val", "test"):  # two generations, the same data
        for t_a, t_b in zip(getattr(a, split), getattr(b, split), strict=True):
            assert torch.equal(t_a, t_b), split

    # shapes, classes and sizes: 4000 train (here 3500 + 500 val) and 1000 test sequences of 1×40
    assert a.in_shape == (1, 40) and a.num_classes == 10
    assert len(a.train[1]) == 3500 and len(a.val[1]) == 500 and len(a.test[1]) == 1000
    assert a.train[0].dtype == torch.float32 and a.train[1].dtype == torch.int64
    for _, y in (a.train, a.val, a.test):
        assert sorted(torch.unique(y).tolist()) == list(range(10))
    # the generator standardises the whole set (train + test) to mean 0, std 1
    everything = torch.cat([a.train[0], a.val[0], a.test[0]]).double()
    assert abs(float(everything.mean())) < 1e-4
    assert float(everything.std()) == pytest.approx(1, rel=1e-3)


def test_sizes_and_split_seed_as_for_other_datasets(root):
    small = load_data(_data(root, train_size=300, val_size=100))
    full = load_data(_data(root, val_size=100))
    assert len(small.train[1]) == 300 and len(full.train[1]) == 3900
    assert torch.equal(small.val[0], full.val[0])
    assert torch.equal(small.train[0], full.train[0][:300])  # a fixed, nested subset
    other = load_data(_data(root, val_size=100, split_seed=1))
    assert not torch.equal(other.val[0], full.val[0])
    assert torch.equal(other.test[0], full.test[0])  # the official test split never moves
    from l2lab import ConfigError

    with pytest.raises(ConfigError, match=r"data.train_size.*3900"):
        load_data(_data(root, train_size=4000, val_size=100))


def test_experiment_gives_the_paper_setup_for_each_model():
    mlp = _compose("experiment=mnist1d", "model=mlp")
    cnn = _compose("experiment=mnist1d", "model=cnn")
    for cfg in (mlp, cnn):
        assert cfg.data.name == "mnist1d" and cfg.data.batch_size == 100
        assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 0.01
        assert cfg.regularization.lam == 0.0 and cfg.trainer.max_epochs == 150
        assert cfg.data.val_size == 0  # the paper trains on all 4000
    assert list(mlp.model.hidden) == [100, 100] and mlp.experiment_name == "mnist1d-mlp"
    assert list(cnn.model.channels) == [25, 25, 25] and list(cnn.model.kernel_size) == [5, 3, 3]
    assert "experiment_model" not in cnn
    sweep = _compose("experiment=mnist1d_sweep", "model=cnn")
    assert sweep.model == cnn.model and sweep.data.val_size == 500
    assert sweep.trainer.max_epochs == 50 and sweep.optimizer.lr == 0.01
    grid = _compose("experiment=mnist1d_sweep", hydra=True).hydra.sweeper.params
    assert grid["regularization.lam"].split(",")[0] == "0" and grid["seed"] == "0,1,2"
    # outside the experiment the models keep their own defaults
    assert list(_compose("model=cnn").model.channels) == [16, 32]
    assert list(_compose("data=mnist1d").model.hidden) == [256, 256]


def test_cnn_is_one_dimensional_for_sequences_and_trains(root):
    splits = load_data(_data(root))
    net = build_net(_compose("experiment=mnist1d", "model=cnn"), splits)
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)}
    assert list(convs) == ["conv1", "conv2", "conv3"]
    assert all(isinstance(m, nn.Conv1d) for m in convs.values())
    assert [(m.kernel_size, m.stride) for m in convs.values()] == [((5,), (2,)), ((3,), (2,)),
                                                                  ((3,), (2,))]
    assert net.out.in_features == 25 * 5  # 40 -> 19 -> 10 -> 5 positions, no pooling
    assert sum(p.numel() for p in net.parameters()) == 5210  # the paper's ConvBase
    # the default CNN on MNIST-1D: Conv1d with max-pooling; on images still Conv2d
    default = build_net(_compose("data=mnist1d", "model=cnn"), splits)
    assert isinstance(default.conv1, nn.Conv1d) and default(splits.val[0][:3]).shape == (3, 10)
    digits = build_net(_compose("model=cnn"), load_data({"name": "digits", "val_size": 100}))
    assert isinstance(digits.conv1, nn.Conv2d)

    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = splits.train[0][:500], splits.train[1][:500]
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(np.log(10), abs=0.3)
    assert losses[-1] < 0.8 * losses[0]


CONTRACT = ["train/loss", "train/ce", "train/l2", "train/acc", "val/ce", "val/acc", "gap/ce",
            "gap/acc", "weights/sq_norm/conv1", "weights/sq_norm/conv3", "weights/sq_norm/out",
            "weights/sq_norm_total"]


def test_three_epoch_run_records_the_contract(tmp_path, root, store, client):
    overrides = ["experiment=mnist1d", "model=cnn", "regularization.lam=0.01",
                 "data.train_size=300", "data.val_size=100", "trainer.max_epochs=3"]
    cfg = _compose(*overrides, f"data.root={root}", f"tracking.uri={store}")
    final = train(cfg, overrides=overrides, output_dir=tmp_path / "out")
    (run,) = runs_of(client)
    rid, m, p = run.info.run_id, run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "mnist1d-cnn"
    for key in CONTRACT:
        assert [x.step for x in client.get_metric_history(rid, key)] == [0, 1, 2], key
    for key in ("test/ce", "test/acc"):  # once, at the end
        assert len(client.get_metric_history(rid, key)) == 1 and final[key] == m[key]
    assert m["weights/sq_norm_total"] == pytest.approx(sum(
        m[f"weights/sq_norm/{n}"] for n in ("conv1", "conv2", "conv3", "out")), rel=1e-6)
    ce = [x.value for x in client.get_metric_history(rid, "train/ce")]
    assert ce[-1] < ce[0]
    assert p["data.name"] == "mnist1d" and p["model.kernel_size"] == "[5, 3, 3]"
    assert p["optimizer.lr"] == "0.01" and p["l2.layers"] == "conv1,conv2,conv3,out"
    assert int(p["l2.num_params"]) == 5 * 25 + 2 * 3 * 25 * 25 + 125 * 10

    # test/* are the logged final weights evaluated on the 1000 official test sequences
    splits = load_data(cfg.data)
    net = build_net(cfg, splits)
    net.load_state_dict(torch.load(client.download_artifacts(rid, "model/state_dict.pt",
                                                             str(tmp_path))))
    with torch.no_grad():
        logits = net(splits.test[0])
    assert m["test/ce"] == pytest.approx(float(F.cross_entropy(logits, splits.test[1])), rel=1e-5)
    assert m["test/acc"] == pytest.approx(float((logits.argmax(1) == splits.test[1]).float()
                                                .mean()), abs=1e-6)
    assert m["test/acc"] > 0.2  # three epochs of the paper's CNN already beat chance

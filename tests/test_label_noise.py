"""``data.label_noise`` (training labels redrawn uniformly, the same for every job of a sweep, val
and test clean) and MNIST-1D's own sizes (``data.num_samples``, ``data.train_split``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_cfg, runs_of
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from l2lab.base import ConfigError
from l2lab.config.schema import validate
from l2lab.core.data import load_data
from l2lab.core.rules import MNIST1D_SIZES
from l2lab.tracking.runs import config_hash


def _digits(**kw) -> dict:
    return {"name": "digits", "train_size": None, "val_size": 297, "split_seed": 0,
            "batch_size": 50, **kw}


def _mnist1d(root, **kw) -> dict:
    return {"name": "mnist1d", "root": str(root), "train_size": None, "val_size": 500,
            "split_seed": 0, "batch_size": 100, **kw}


def test_every_job_of_a_sweep_sees_the_same_noisy_labels():
    """Jobs that differ in seed and λ (a sweep's usual axes) load the same noisy labels; another
    split_seed draws others."""
    jobs = [make_cfg("data.label_noise=0.3", "data.train_size=null", f"seed={s}",
                     f"regularization.lam={lam}") for s, lam in ((0, 0.0), (7, 0.1))]
    a, b = (load_data(job.data) for job in jobs)
    clean = load_data(make_cfg("data.train_size=null").data)
    assert torch.equal(a.train[1], b.train[1]) and torch.equal(a.train[0], b.train[0])
    assert not torch.equal(a.train[1], clean.train[1])
    other = load_data(make_cfg("data.label_noise=0.3", "data.train_size=null",
                               "data.split_seed=1").data)
    other_clean = load_data(make_cfg("data.train_size=null", "data.split_seed=1").data)
    flipped = lambda d, c: (d.train[1] != c.train[1]).numpy()  # noqa: E731
    assert not np.array_equal(flipped(a, clean), flipped(other, other_clean))


def test_only_training_labels_change_and_about_noise_times_nine_tenths_of_them(mnist1d_root):
    """A label is redrawn with probability p from all ten classes (itself included, as the
    notebook does): p·(1 − 1/10) of them change. Inputs, val and test stay as without noise."""
    clean = load_data(_mnist1d(mnist1d_root))
    for p in (0.15, 0.5):
        noisy = load_data(_mnist1d(mnist1d_root, label_noise=p))
        assert torch.equal(noisy.train[0], clean.train[0])
        for split in ("val", "test"):
            for t_noisy, t_clean in zip(getattr(noisy, split), getattr(clean, split), strict=True):
                assert torch.equal(t_noisy, t_clean), split
        changed = float((noisy.train[1] != clean.train[1]).double().mean())
        n = len(clean.train[1])  # 3500: one binomial standard deviation is under 0.009
        assert changed == pytest.approx(p * 0.9, abs=4 * (p * 0.9 * (1 - p * 0.9) / n) ** 0.5)
        assert sorted(torch.unique(noisy.train[1]).tolist()) == list(range(10))
        assert noisy.train[1].dtype == torch.int64


def test_a_smaller_training_set_keeps_the_noisy_labels_of_the_examples_it_keeps():
    """The noise is drawn per example of the training split, so a λ × train size sweep compares
    nested training sets with the same noisy labels."""
    full = load_data(_digits(label_noise=0.4))
    part = load_data(_digits(label_noise=0.4, train_size=300))
    assert torch.equal(part.train[0], full.train[0][:300])
    assert torch.equal(part.train[1], full.train[1][:300])


def test_zero_noise_is_todays_data_and_todays_config_hash():
    """label_noise=0 (the default) loads the labels as before, and a run's config hash is the
    one it had before the key existed: reuse still finds runs logged then."""
    cfg = make_cfg()
    assert cfg.data.label_noise == 0.0
    a, b = load_data(cfg.data), load_data({k: v for k, v in cfg.data.items() if k != "label_noise"})
    assert all(torch.equal(x, y) for x, y in zip(a.train, b.train, strict=True))
    tree = OmegaConf.to_container(cfg, resolve=True)
    before = {**tree, "data": {k: v for k, v in tree["data"].items() if k != "label_noise"}}
    assert config_hash(tree) == config_hash(before)
    noisy = make_cfg("data.label_noise=0.15")
    assert config_hash(noisy) != config_hash(cfg)
    assert config_hash(noisy) != config_hash(make_cfg("data.label_noise=0.2"))


@pytest.mark.parametrize("value", [1, 1.0, -0.1, 2, "nan"])
def test_a_noise_outside_zero_to_one_is_refused_with_its_key(value):
    with pytest.raises(ConfigError, match=r"data\.label_noise must be a number in \[0, 1\)"):
        validate(make_cfg(f"data.label_noise={value}"))
    with pytest.raises(ConfigError, match=r"data\.label_noise"):
        load_data(_digits(label_noise=value))


def test_the_noise_is_logged_as_a_param(tmp_path, store):
    from l2lab.train import train

    train(make_cfg("data.label_noise=0.2", "trainer.max_epochs=1", f"tracking.uri={store}"),
          output_dir=tmp_path / "out")
    (run,) = runs_of(MlflowClient(store))
    assert run.info.status == "FINISHED"
    assert float(run.data.params["data.label_noise"]) == 0.2


# -- MNIST-1D's sizes ----------------------------------------------------------------------------
def test_the_default_sizes_are_the_packages():
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    assert {k: args[k] for k in MNIST1D_SIZES} == MNIST1D_SIZES
    data = make_cfg("data=mnist1d").data
    assert (data.num_samples, data.train_split) == (5000, 0.8)


def test_num_samples_and_train_split_size_the_splits_and_key_the_cache(tmp_path, mnist1d_root):
    """The notebook's split is a config (here a tenth of it, 400 / 1200: the same share); each
    size gets its own cache file, and the defaults read the file they always did."""
    from mnist1d.data import get_dataset_args, make_dataset

    before = sorted(p.name for p in (mnist1d_root / "mnist1d").glob("*.npz"))
    d = load_data(_mnist1d(tmp_path, num_samples=1600, train_split=0.25, val_size=100))
    assert (len(d.train[1]), len(d.val[1]), len(d.test[1])) == (300, 100, 1200)
    again = load_data(_mnist1d(tmp_path, num_samples=1600, train_split=0.25, val_size=100))
    assert torch.equal(again.test[0], d.test[0])
    # the share alone changes the cut, hence the cache file; 1600 sequences are another set
    other = load_data(_mnist1d(tmp_path, num_samples=1600, train_split=0.5, val_size=100))
    assert len(other.test[1]) == 800 and torch.equal(other.test[0], d.test[0][400:])
    assert len(list((tmp_path / "mnist1d").glob("*.npz"))) == 2

    # defaults: the package's own generation, bit for bit, from the cache file of before
    default = load_data(_mnist1d(mnist1d_root, val_size=0))
    assert sorted(p.name for p in (mnist1d_root / "mnist1d").glob("*.npz")) == before
    ref = make_dataset(get_dataset_args())
    assert np.array_equal(default.test[0].numpy()[:, 0, :], ref["x_test"].astype(np.float32))
    assert np.array_equal(default.test[1].numpy(), ref["y_test"])


@pytest.mark.parametrize(("override", "key"), [
    ("data.num_samples=5", "data.num_samples"), ("data.num_samples=0", "data.num_samples"),
    ("data.train_split=1.0", "data.train_split"), ("data.train_split=0", "data.train_split"),
    ("data.train_split=0.01", "data.train_split")])
def test_bad_mnist1d_sizes_name_the_key(override, key):
    cfg = make_cfg("data=mnist1d", "data.num_samples=50", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_mnist1d_sizes_are_part_of_the_config_hash_and_the_defaults_hash_as_before():
    cfg = make_cfg("data=mnist1d")
    tree = OmegaConf.to_container(cfg, resolve=True)
    before = {**tree, "data": {k: v for k, v in tree["data"].items()
                               if k not in ("num_samples", "train_split", "label_noise")}}
    assert config_hash(tree) == config_hash(before)
    notebook = make_cfg("data=mnist1d", "data.num_samples=16000", "data.train_split=0.25")
    share = make_cfg("data=mnist1d", "data.train_split=0.25")
    assert len({config_hash(cfg), config_hash(notebook), config_hash(share)}) == 3

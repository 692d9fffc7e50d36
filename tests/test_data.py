"""Datasets: the seeded split, and torchvision's real loaders on tiny files in their formats."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision
from conftest import python_c

from l2lab import ConfigError
from l2lab.core.data import TensorBatches, load_data


def _cfg(**kw):
    return {"name": "digits", "root": "data", "download": False, "train_size": None,
            "val_size": 300, "split_seed": 0, "batch_size": 32, "test_size": 360, **kw}


def test_digits_split_is_disjoint_seeded_and_independent_of_sizes():
    a = load_data(_cfg(train_size=200))
    b = load_data(_cfg(train_size=500))
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train[1]) == 200 and len(a.val[1]) == 300
    assert torch.equal(a.val[0], b.val[0])          # same val set whatever the train size
    assert torch.equal(a.train[0], b.train[0][:200])  # a fixed subset, nested
    train_rows = {tuple(r.tolist()) for r in a.train[0].flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in a.val[0].flatten(1)[:50])
    c = load_data(_cfg(train_size=200, split_seed=1))
    assert not torch.equal(a.val[0], c.val[0])
    assert abs(float(load_data(_cfg()).train[0].mean())) < 0.1  # normalised


def test_digits_hold_out_a_fixed_test_split_disjoint_from_train_and_val():
    """360 of the 1,797 images, the same whatever split_seed (and seed: the loader never sees
    it), in no training pool or validation split; the pool keeps the other 1,437."""
    a = load_data(_cfg(val_size=300))
    b = load_data(_cfg(val_size=600, split_seed=7))
    assert len(a.test[1]) == 360 and len(a.train[1]) == 1437 - 300
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.test[1], b.test[1])
    rows = lambda t: {tuple(r.tolist()) for r in t.flatten(1)}  # noqa: E731
    test = rows(a.test[0])
    assert len(test) == 360  # (the digits hold no duplicate images)
    for s in (a, b):
        assert not test & rows(s.train[0]) and not test & rows(s.val[0])
    assert sorted(torch.bincount(a.test[1], minlength=10).tolist())[0] >= 25  # every class
    assert abs(float(a.train[0].mean())) < 0.1 and abs(float(a.test[0].mean())) < 0.2
    # the pool is what data.train_size and data.val_size are bounded by
    assert len(load_data(_cfg(val_size=1436)).train[1]) == 1
    with pytest.raises(ConfigError, match=r"data\.val_size must be between 0 and 1436"):
        load_data(_cfg(val_size=1437))
    with pytest.raises(ConfigError, match=r"data\.train_size must be between 1 and 1137"):
        load_data(_cfg(train_size=1138))
    # a config logged before the split existed (no data.test_size) trains on what it trained on
    old = {k: v for k, v in _cfg(val_size=300).items() if k != "test_size"}
    for before in (load_data(old), load_data(_cfg(val_size=300, test_size=0))):
        assert before.test is None and len(before.train[1]) == 1797 - 300
    with pytest.raises(ConfigError, match=r"data\.test_size must be 360 .* or 0"):
        load_data(_cfg(test_size=100))


@pytest.mark.parametrize("kw, key", [({"train_size": 5000}, "data.train_size"),
                                     ({"val_size": 1797}, "data.val_size"),
                                     ({"name": "imagenet"}, "data.name")])
def test_bad_sizes_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        load_data(_cfg(**kw))


def test_batches_cover_the_data_and_shuffle_per_epoch():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    b = TensorBatches(x, y, 4, shuffle=True, seed=3)
    assert len(b) == 3 and [len(yy) for _, yy in b] == [4, 4, 2]
    e0 = torch.cat([yy for _, yy in b])
    assert sorted(e0.tolist()) == list(range(10))
    b.sampler.set_epoch(1)
    e1 = torch.cat([yy for _, yy in b])
    b.sampler.set_epoch(0)
    assert torch.equal(torch.cat([yy for _, yy in b]), e0)  # a function of (seed, epoch)
    assert not torch.equal(e0, e1)


def _write_idx(path, array: np.ndarray) -> None:
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, dtype_code, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(">u1").tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = (np.arange(30) % 10).astype(np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", imgs)
    _write_idx(raw / "train-labels-idx1-ubyte", labels)
    _write_idx(raw / "t10k-images-idx3-ubyte", imgs[:12])
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[:12])
    s = load_data(_cfg(name=name, root=str(tmp_path), val_size=10, train_size=None))
    assert s.in_shape == (1, 28, 28)
    assert len(s.train[1]) == 20 and len(s.val[1]) == 10 and len(s.test[1]) == 12
    assert s.train[0].dtype == torch.float32 and s.train[1].dtype == torch.int64
    # pixel values went through torchvision unchanged, then the dataset's normalisation
    mean, std = (0.1307, 0.3081) if name == "mnist" else (0.2860, 0.3530)
    want = (torch.from_numpy(imgs[:12]).float() / 255 - mean) / std
    torch.testing.assert_close(s.test[0][:, 0], want)
    assert sorted(torch.cat([s.train[1], s.val[1]]).tolist()) == sorted(labels.tolist())


def test_cifar10_pickle_batches(tmp_path, monkeypatch):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)

    def batch(n, offset):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "labels": [(i + offset) % 10 for i in range(n)]}

    batches = {f"data_batch_{i}": batch(4, i) for i in range(1, 6)}
    batches["test_batch"] = batch(6, 0)
    for fname, content in batches.items():
        with open(base / fname, "wb") as f:
            pickle.dump(content, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    # torchvision checks the official files' md5; these are our own tiny ones.
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, None] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, None] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
    s = load_data(_cfg(name="cifar10", root=str(tmp_path), val_size=5))
    assert s.in_shape == (3, 32, 32)
    assert len(s.train[1]) == 15 and len(s.val[1]) == 5 and len(s.test[1]) == 6
    raw = batches["test_batch"]["data"].reshape(6, 3, 32, 32).astype(np.float32) / 255
    want = (raw[:, 0] - 0.4914) / 0.2470  # red channel, CHW as in the pickle
    torch.testing.assert_close(s.test[0][:, 0], torch.from_numpy(want))


def test_missing_files_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_data(_cfg(name="mnist", root=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert "data.download" in msg and str(tmp_path / "nowhere" / "MNIST" / "raw") in msg


def test_digits_are_scikit_learns_arrays_read_without_importing_scikit_learn():
    """The start-up saving (docs/performance.md): the bundled file gives load_digits' arrays,
    and a process that loads the digits never imports scikit-learn or SciPy."""

    from sklearn.datasets import load_digits

    from l2lab.core.data import _digits_file

    images, target = _digits_file()
    d = load_digits()
    assert images.dtype == d.images.dtype and np.array_equal(images, d.images)
    assert np.array_equal(target, d.target) and len(target) == 1797
    code = ("import sys; from l2lab.core.data import load_data; "
            f"load_data({_cfg()!r}); "
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    assert python_c(code).strip() == "[]"

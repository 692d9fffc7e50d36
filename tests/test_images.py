"""CIFAR through torchvision's own classes on fake files in their on-disk formats, and a
researcher's own images (``data=imagefolder``): loading, normalisation, the split, the errors
before training, and a ResNet-18 trained on a folder of PNGs."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
import torchvision
from conftest import CIFAR_TEST, CIFAR_TRAIN_PER_BATCH, make_cfg, runs_of, write_cifar10
from PIL import Image

from l2lab import ConfigError
from l2lab.core.data import load_data


def _cfg(**kw) -> dict:
    return {"name": "cifar10", "root": "data", "download": False, "train_size": None,
            "val_size": 50, "split_seed": 0, "batch_size": 32, **kw}


# -- CIFAR ---------------------------------------------------------------------------------------
def test_cifar10_loads_through_torchvision_with_the_usual_normalisation(cifar10_root):
    s = load_data(_cfg(root=str(cifar10_root)))
    n_train = 5 * CIFAR_TRAIN_PER_BATCH
    assert s.in_shape == (3, 32, 32) and s.num_classes == 10
    assert (len(s.train[1]), len(s.val[1]), len(s.test[1])) == (n_train - 50, 50, CIFAR_TEST)
    # the official test split, in its file's order, normalised by the usual CIFAR-10 constants
    raw = pickle.loads((cifar10_root / "cifar-10-batches-py" / "test_batch").read_bytes())
    x = raw["data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32)[None, :, None, None]
    std = np.array([0.2470, 0.2435, 0.2616], np.float32)[None, :, None, None]
    torch.testing.assert_close(s.test[0], torch.from_numpy((x - mean) / std))
    assert s.test[1].tolist() == raw["labels"]
    # train and val are the training batches, disjoint, drawn by split_seed alone
    labels = sum((pickle.loads((cifar10_root / "cifar-10-batches-py" / f"data_batch_{i}")
                               .read_bytes())["labels"] for i in range(1, 6)), [])
    assert sorted(torch.cat([s.train[1], s.val[1]]).tolist()) == sorted(labels)
    again, other = load_data(_cfg(root=str(cifar10_root))), \
        load_data(_cfg(root=str(cifar10_root), split_seed=1))
    assert torch.equal(again.val[0], s.val[0]) and not torch.equal(other.val[0], s.val[0])


def test_cifar10_files_are_checked_by_torchvision_against_their_md5(tmp_path, monkeypatch):
    """torchvision's own integrity check runs: a file that differs from its checksum is refused,
    naming the folder and data.download=true."""
    from conftest import trust_cifar10

    md5s = write_cifar10(tmp_path)
    trust_cifar10(monkeypatch, {**md5s, "data_batch_3": hashlib.md5(b"other").hexdigest()})
    with pytest.raises(ConfigError, match="corrupted") as e:
        load_data(_cfg(root=str(tmp_path)))
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)
    assert "data.download=true" in str(e.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_a_missing_cifar_folder_says_where_and_how_to_fetch_it(name, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_data(_cfg(name=name, root=str(tmp_path / "nowhere")))
    msg = str(e.value)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    assert str(tmp_path / "nowhere" / folder) in msg and "data.download=true" in msg
    assert "\n" not in msg  # one paragraph


def test_cifar100_has_its_hundred_classes_and_constants(tmp_path, monkeypatch):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(1)
    files = {name: {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": (np.arange(n) % 100).tolist(),
                    "coarse_labels": (np.arange(n) % 20).tolist()}
             for name, n in (("train", 300), ("test", 100))}
    files["meta"] = {"fine_label_names": [f"c{i}" for i in range(100)]}
    for name, content in files.items():
        (base / name).write_bytes(pickle.dumps(content))
    md5 = {n: hashlib.md5((base / n).read_bytes()).hexdigest() for n in files}
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(cls, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["meta"]})
    s = load_data(_cfg(name="cifar100", root=str(tmp_path), val_size=100))
    assert s.num_classes == 100 and s.in_shape == (3, 32, 32)
    assert (len(s.train[1]), len(s.val[1]), len(s.test[1])) == (200, 100, 100)
    red = files["test"]["data"].reshape(-1, 3, 32, 32)[:, 0].astype(np.float32) / 255
    torch.testing.assert_close(s.test[0][:, 0], torch.from_numpy((red - 0.5071) / 0.2673))
    assert s.test[1].tolist() == files["test"]["fine_labels"]


# -- the researcher's own images ------------------------------------------------------------------
def _write_pngs(folder, classes=("cat", "dog"), n: int = 10, size=(8, 8), seed: int = 0):
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):  # class k is brighter in channel k: learnable
            a = rng.integers(0, 128, (*size[::-1], 3), dtype=np.uint8)
            a[..., k % 3] += 100
            Image.fromarray(a).save(folder / c / f"{i:03d}.png")


def test_imagefolder_reads_classes_normalises_by_train_and_keeps_test_apart(tmp_path):
    _write_pngs(tmp_path / "train", n=10)
    _write_pngs(tmp_path / "test", classes=("dog",), n=3, seed=1)  # a subset of train's classes
    s = load_data(_cfg(name="imagefolder", root=str(tmp_path), val_size=4))
    assert s.in_shape == (3, 8, 8) and s.num_classes == 2
    assert (len(s.train[1]), len(s.val[1]), len(s.test[1])) == (16, 4, 3)
    assert s.test[1].tolist() == [1, 1, 1]  # "dog" is train's class 1, not test/'s class 0
    everything = torch.cat([s.train[0], s.val[0]])  # all of train/: mean 0, std 1 per channel
    torch.testing.assert_close(everything.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(everything.std((0, 2, 3), correction=0), torch.ones(3),
                               atol=1e-4, rtol=0)
    a = np.asarray(Image.open(tmp_path / "test" / "dog" / "000.png"), np.float64) / 255
    pix = np.stack([np.asarray(Image.open(p), np.float64) / 255
                    for p in sorted((tmp_path / "train").glob("*/*.png"))])
    want = (a - pix.mean((0, 1, 2))) / pix.std((0, 1, 2))
    torch.testing.assert_close(s.test[0][0], torch.from_numpy(want.transpose(2, 0, 1)).float(),
                               atol=1e-5, rtol=0)


def _error(tmp_path) -> str:
    with pytest.raises(ConfigError) as e:
        load_data(_cfg(name="imagefolder", root=str(tmp_path), val_size=0))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_imagefolder_errors_name_the_path_before_training(tmp_path):
    assert str(tmp_path / "none") in _error(tmp_path / "none")  # no root
    (tmp_path / "a").mkdir()
    assert str(tmp_path / "a" / "train") in _error(tmp_path / "a")  # no train/
    (tmp_path / "a" / "train").mkdir()
    assert "one subfolder of images per class" in _error(tmp_path / "a")  # no class folder
    _write_pngs(tmp_path / "b" / "train", classes=("cat",), n=2)
    assert "single class" in _error(tmp_path / "b") and "'cat'" in _error(tmp_path / "b")
    _write_pngs(tmp_path / "c" / "train", n=2)
    _write_pngs(tmp_path / "c" / "train", classes=("dog",), n=1, size=(9, 8), seed=2)
    msg = _error(tmp_path / "c")
    assert "differ in size" in msg and str(tmp_path / "c" / "train" / "dog" / "000.png") in msg
    _write_pngs(tmp_path / "d" / "train", n=2)
    (tmp_path / "d" / "train" / "dog" / "bad.png").write_bytes(b"not a png")
    msg = _error(tmp_path / "d")
    assert "cannot read" in msg and str(tmp_path / "d" / "train" / "dog" / "bad.png") in msg
    _write_pngs(tmp_path / "e" / "train", n=2)
    _write_pngs(tmp_path / "e" / "test", classes=("cat", "cow"), n=1)
    assert "cow" in _error(tmp_path / "e") and str(tmp_path / "e" / "test") in _error(
        tmp_path / "e")
    _write_pngs(tmp_path / "f" / "train", n=2)
    _write_pngs(tmp_path / "f" / "test", n=1, size=(4, 4))
    assert "one size" in _error(tmp_path / "f")


def test_resnet18_trains_on_a_folder_of_pngs_with_test_from_its_test_folder(tmp_path, store,
                                                                             client):
    from l2lab.train import train

    _write_pngs(tmp_path / "img" / "train", n=10)
    _write_pngs(tmp_path / "img" / "test", n=3, seed=1)
    ov = ["data=imagefolder", f"data.root={tmp_path / 'img'}", "data.val_size=4",
          "data.batch_size=8", "model=resnet18", "model.cifar_stem=true",
          "trainer.max_epochs=1", "trainer.accelerator=cpu"]
    final = train(make_cfg(*ov, f"tracking.uri={store}", tiny=False), overrides=ov,
                  output_dir=tmp_path / "out")
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED", run.data.tags.get("l2lab.failure")
    assert run.data.params["data.name"] == "imagefolder"
    assert 0.0 <= final["test/acc"] <= 1.0 and np.isfinite(final["test/ce"])
    assert run.data.metrics["test/ce"] == pytest.approx(final["test/ce"])

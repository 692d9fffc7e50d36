"""Datasets as in-memory tensors, a seeded train/val split, and index-batching on the device.

Every supported dataset fits in memory, so it is loaded once into tensors, moved to the training
device, and batched by indexing: no DataLoader workers, no per-example Python. The train/val split
depends only on ``data.split_seed``; the shuffling order only on ``seed`` and the epoch, so runs
with different λ share the same split and a resumed run sees the same batches. The test split is
the dataset's official one, or for the digits (which have none) a fixed held-out 20 %.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from l2lab.base import ConfigError
from l2lab.core.rules import DATASETS, check_label_noise, check_mnist1d_sizes

NUM_CLASSES = 10  # every supported dataset has ten classes
_NOISE_STREAM = 0x6C6E  # tells the label-noise stream of a split_seed apart from its permutation

# Per-channel (mean, std) of the official training splits.
_TORCHVISION = {
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass
class Splits:
    """Normalised float32 inputs (N, C, H, W) or (N, C, L) and int64 labels per split; ``test``
    may be absent."""

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor] | None
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])

    def train_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training examples the eval-mode pass measures (``train_eval/*``): the first
        :func:`train_eval_size` of the training subset, itself a ``split_seed`` draw, so the
        same for every network, epoch and seed."""
        m = train_eval_size(len(self.train[1]), len(self.val[1]))
        return self.train[0][:m], self.train[1][:m]

    def to(self, device: torch.device | str) -> Splits:
        move = lambda xy: None if xy is None else (xy[0].to(device), xy[1].to(device))  # noqa: E731
        return Splits(self.name, move(self.train), move(self.val), move(self.test),
                      self.num_classes)


#: The digits' held-out test split: 360 of the 1,797 images (20 %), drawn once by a fixed
#: generator, independent of ``seed`` and ``data.split_seed``: every digits run of every sweep
#: is judged on the same images, which no training pool or validation split ever holds.
DIGITS_TEST_SIZE = 360
DIGITS_TEST_SEED = 20_260_101


#: How many training examples the eval-mode pass measures when there is no validation split.
TRAIN_EVAL_WITHOUT_VAL = 1024


def train_eval_size(n_train: int, n_val: int) -> int:
    """As many training examples as the validation split holds (so train_eval/* and val/* are
    means over equally many examples and the pass costs what val costs), all of them when the
    training set is smaller; without a validation split, at most 1,024 (one evaluation chunk)."""
    return min(n_train, n_val if n_val else TRAIN_EVAL_WITHOUT_VAL)


def _digits_file() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and the
    label per row), read as ``sklearn.datasets.load_digits`` reads it (``np.loadtxt``, float64),
    without importing scikit-learn: its import (SciPy with it) was ~2 s of a run's start-up."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # a top-level name: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data=digits needs scikit-learn installed (its bundled digits).")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / \
        "digits.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _load_digits(test_size: int = DIGITS_TEST_SIZE
                 ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The 1,437-image pool (in scikit-learn's order) and the fixed 360-image test split.
    Scaled by the pool's own mean and std, so the test images inform nothing of training.
    ``test_size=0`` (``data.test_size``, absent from configs logged before the split existed):
    all 1,797 images and no test split, as those runs trained, so they still reproduce."""
    images, target = _digits_file()
    x = (images.astype(np.float32) / 16.0)[:, None, :, :]
    y = target.astype(np.int64)
    if test_size == 0:
        return (x - x.mean()) / x.std(), y, None
    if test_size != DIGITS_TEST_SIZE:
        raise ConfigError(f"data.test_size must be {DIGITS_TEST_SIZE} (the digits' fixed test "
                          f"split) or 0 (none, as runs logged before it), got {test_size!r}.")
    test = np.zeros(len(y), dtype=bool)
    test[np.random.default_rng(DIGITS_TEST_SEED).permutation(len(y))[:DIGITS_TEST_SIZE]] = True
    pool = x[~test]
    mean, std = pool.mean(), pool.std()
    scale = lambda a: np.ascontiguousarray((a - mean) / std, dtype=np.float32)  # noqa: E731
    return scale(pool), y[~test], (scale(x[test]), y[test])


def _load_mnist1d(root: str, num_samples: object = None, train_split: object = None
                  ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """MNIST-1D (Greydanus 2020) built by the ``mnist1d`` package's own generator with its default
    arguments (seed 42: 4000 train / 1000 test sequences of length 40), offline; ``num_samples``
    and ``train_split`` (None: the package's defaults) replace the package's own two sizes.

    The package's ``get_dataset`` first tries to download the authors' pickle and generates only
    when that fails; ``make_dataset`` is that generator, called directly (no network). The result
    is cached under ``root`` as an ``.npz`` named after a hash of the generation arguments, so a
    change of arguments never reads a stale file, and written atomically, so parallel jobs never
    see half a file. The generator seeds numpy's and ``random``'s global state; both are
    restored so that generating the data or reading the cache leaves a run's randomness the same.
    """
    import hashlib
    import json
    import os
    import random
    import tempfile

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # where the authors' pickle lives; not a generation argument
    args["num_samples"], args["train_split"] = check_mnist1d_sizes(
        args["num_samples"] if num_samples is None else num_samples,
        args["train_split"] if train_split is None else train_split)
    key = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(root).expanduser().resolve() / "mnist1d"
    path = folder / f"mnist1d_{key}.npz"
    if not path.exists():
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            generator_args = get_dataset_args()
            generator_args.num_samples = args["num_samples"]
            generator_args.train_split = args["train_split"]
            d = make_dataset(generator_args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"],
                     args=json.dumps(args, sort_keys=True))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is for everyone
        os.replace(tmp, path)
    with np.load(path) as z:
        # the generator already centres the whole set and scales it to unit std
        as_x = lambda a: np.ascontiguousarray(a, dtype=np.float32)[:, None, :]  # noqa: E731
        return (as_x(z["x"]), z["y"].astype(np.int64),
                (as_x(z["x_test"]), z["y_test"].astype(np.int64)))


def _load_torchvision(name: str, root: str, download: bool):
    import torchvision

    cls_name, mean, std = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    root_path = Path(root).expanduser().resolve()
    try:
        train = cls(str(root_path), train=True, download=download)
        test = cls(str(root_path), train=False, download=download)
    except RuntimeError as e:
        where = root_path / ("cifar-10-batches-py" if name == "cifar10" else f"{cls_name}/raw")
        raise ConfigError(
            f"data={name}: dataset files not found or corrupted under {where} "
            f"(data.root={root!r}, data.download={download}). Set data.download=true to fetch "
            f"them, or point data.root at a folder holding them. ({e})"
        ) from None

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(ds.data, dtype=np.float32) / 255.0  # MNIST: (N,H,W); CIFAR: (N,H,W,C)
        x = x[:, None, :, :] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        m = np.asarray(mean, dtype=np.float32)[None, :, None, None]
        s = np.asarray(std, dtype=np.float32)[None, :, None, None]
        return np.ascontiguousarray((x - m) / s), np.asarray(ds.targets, dtype=np.int64)

    return (*arrays(train), arrays(test))


def load_data(cfg: Mapping) -> Splits:
    """Load ``cfg.name`` and cut the seeded train/val split (validated before any training)."""
    name = cfg.get("name")
    if name not in DATASETS:
        raise ConfigError(f"data.name must be one of {list(DATASETS)}, got {name!r}.")
    if name == "digits":
        x, y, test = _load_digits(int(cfg.get("test_size") or 0))
    elif name == "mnist1d":
        x, y, test = _load_mnist1d(str(cfg.get("root", "data")), cfg.get("num_samples"),
                                   cfg.get("train_split"))
    else:
        x, y, test = _load_torchvision(name, str(cfg.get("root", "data")),
                                       bool(cfg.get("download", False)))
    n = len(y)
    val_size = int(cfg.get("val_size") or 0)
    train_size = cfg.get("train_size")
    if val_size < 0 or val_size >= n:
        raise ConfigError(
            f"data.val_size must be between 0 and {n - 1} for data={name} "
            f"({n} examples in its training split, its test split held out), got {val_size}."
        )
    available = n - val_size
    train_size = available if train_size is None else int(train_size)
    if not 1 <= train_size <= available:
        raise ConfigError(
            f"data.train_size must be between 1 and {available} for data={name} ({n} examples, "
            f"{val_size} held out by data.val_size), or null for all; got {train_size}."
        )
    batch_size = int(cfg.get("batch_size", 64))
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}.")
    perm = np.random.default_rng(int(cfg.get("split_seed", 0))).permutation(n)
    val_idx, train_idx = perm[:val_size], perm[val_size:val_size + train_size]
    as_t = lambda a, idx: (torch.from_numpy(a[0][idx]), torch.from_numpy(a[1][idx]))  # noqa: E731
    test_t = None if test is None else (torch.from_numpy(test[0]), torch.from_numpy(test[1]))
    # the noise is drawn per example of the whole training split, then only the training rows
    # take it: a smaller train_size keeps the noisy labels of the examples it keeps
    train_y = noisy_labels(y, cfg.get("label_noise", 0.0), int(cfg.get("split_seed", 0)),
                           NUM_CLASSES)[train_idx]
    train = (torch.from_numpy(x[train_idx]), torch.from_numpy(train_y))
    return Splits(name, train, as_t((x, y), val_idx), test_t, NUM_CLASSES)


def noisy_labels(y: np.ndarray, label_noise: object, split_seed: int,
                 num_classes: int) -> np.ndarray:
    """The training labels with each, with probability ``label_noise``, replaced by a class drawn
    uniformly, as the MNIST-1D deep-double-descent notebook does (so a label may be redrawn as
    itself: about ``label_noise · (1 − 1/classes)`` of them change).

    Drawn from ``split_seed`` alone, in a stream of its own (not the split's permutation), so
    every job of a sweep, whatever its ``seed`` or λ, trains on the same noisy labels. The caller
    keeps only the training rows of the result: validation and test labels stay clean. 0 returns
    ``y`` itself.
    """
    noise = check_label_noise(label_noise)
    if noise == 0.0:
        return y
    rng = np.random.default_rng([int(split_seed), _NOISE_STREAM])
    redraw = rng.random(len(y)) < noise
    drawn = rng.integers(0, num_classes, size=len(y))
    return np.where(redraw, drawn, y).astype(y.dtype)


class EpochShuffle:
    """The shuffling order of an epoch, a pure function of (seed, epoch).

    Lightning calls ``set_epoch`` on a loader's ``sampler`` before each epoch (as for a
    DistributedSampler), which is what makes a resumed run replay the same batches.
    """

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)


class TensorBatches:
    """Mini-batches ``(x[idx], y[idx])`` of tensors that already live on the training device.

    With ``world > 1`` (DDP) every rank walks the same global order and batches and keeps its
    strided shard of each: every example is seen once per epoch, every rank takes the same number
    of steps, and each batch is ``(x, y, n)`` with ``n`` the global batch size, so the module can
    normalise by it.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.rank, self.world = int(rank), int(world)
        self.sampler = EpochShuffle(len(y), seed, shuffle)
        self.batch_sampler = None  # Lightning inspects loaders like a DataLoader

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.sampler.order().to(self.x.device)
        for idx in order.split(self.batch_size):
            if self.world == 1:
                yield self.x[idx], self.y[idx]
            else:
                mine = idx[self.rank::self.world]
                yield self.x[mine], self.y[mine], len(idx)


class _Shuffles:
    """K networks' epoch orders behind one ``set_epoch`` (what Lightning calls on a sampler)."""

    def __init__(self, shuffles: list[EpochShuffle]) -> None:
        self.shuffles = shuffles

    def set_epoch(self, epoch: int) -> None:
        for s in self.shuffles:
            s.set_epoch(epoch)


class StackedBatches:
    """Mini-batches for K stacked networks, each in its own seed's order, as one (K·B) batch.

    Network i's rows come at [i·b, (i+1)·b): the same examples, in the same order, as
    ``TensorBatches(x, y, batch_size, shuffle=True, seed=seeds[i])`` gives that network alone.
    With ``world > 1`` (DDP) each rank keeps its strided shard of every network's batch and the
    batch is ``(x, y, n)``, n the global batch size, as ``TensorBatches`` does.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 seeds: list[int], *, rank: int = 0, world: int = 1) -> None:
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.rank, self.world = int(rank), int(world)
        self.sampler = _Shuffles([EpochShuffle(len(y), s, True) for s in seeds])
        self.batch_sampler = None

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def keep(self, positions: list[int]) -> None:
        """From the next epoch on, only the networks at ``positions`` (the others left the
        stack: ``L2Module.remove``), each still in its own order."""
        self.sampler.shuffles = [self.sampler.shuffles[p] for p in positions]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        orders = torch.stack([s.order() for s in self.sampler.shuffles]).to(self.x.device)
        for idx in orders.split(self.batch_size, dim=1):
            if self.world == 1:
                flat = idx.reshape(-1)
                yield self.x[flat], self.y[flat]
            else:
                flat = idx[:, self.rank::self.world].reshape(-1)
                yield self.x[flat], self.y[flat], idx.shape[1]

"""Datasets as in-memory tensors, a seeded train/val split, and index-batching on the device.

Every supported dataset fits in memory, so it is loaded once into tensors, moved to the training
device, and batched by indexing: no DataLoader workers, no per-example Python. The train/val split
depends only on ``data.split_seed``; the shuffling order only on ``seed`` and the epoch, so runs
with different λ share the same split and a resumed run sees the same batches. The test split is
the dataset's official one, or for the digits (which have none) a fixed held-out 20 %; for a
researcher's own images (``data=imagefolder``) their ``test/`` folder, when there is one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from l2lab.base import ConfigError
from l2lab.core.augment import EpochAugment, augment
from l2lab.core.rules import DATASETS, check_label_noise, check_mnist1d_sizes

NUM_CLASSES = 10  # the digits', MNIST-1D's, MNIST's and CIFAR-10's; others say their own
_NOISE_STREAM = 0x6C6E  # tells the label-noise stream of a split_seed apart from its permutation

# torchvision's class, and the usual per-channel (mean, std) of the official training split (all
# of it, before data.val_size is held out; published constants, not recomputed per run).
_TORCHVISION = {
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
#: The file suffixes ``data=imagefolder`` reads (torchvision's ``IMG_EXTENSIONS``).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Arrays = tuple[np.ndarray, np.ndarray]


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

    def to(self, device: torch.device | str,
           memory_format: torch.memory_format = torch.preserve_format) -> Splits:
        """On ``device``; ``memory_format=torch.channels_last`` lays images out NHWC there
        (indexing a batch keeps it: ``x[idx]`` of a channels-last tensor is channels-last)."""
        move = lambda xy: None if xy is None else (  # noqa: E731
            xy[0].to(device, memory_format=memory_format), xy[1].to(device))
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


def _normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W), per channel
    ``(x/255 - mean) / std``."""
    x = np.asarray(x, dtype=np.float32) / 255.0
    x = x[:, None, :, :] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    m = np.asarray(mean, dtype=np.float32)[None, :, None, None]
    s = np.asarray(std, dtype=np.float32)[None, :, None, None]
    return np.ascontiguousarray((x - m) / s)


def _load_torchvision(name: str, root: str, download: bool) -> tuple[np.ndarray, np.ndarray,
                                                                       Arrays, int]:
    """The official train and test splits through torchvision's own class (which checks the
    files' md5), normalised by the dataset's usual constants; and the class count."""
    import torchvision

    cls_name, mean, std = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    root_path = Path(root).expanduser().resolve()
    try:
        train = cls(str(root_path), train=True, download=download)
        test = cls(str(root_path), train=False, download=download)
    except RuntimeError as e:
        where = root_path / getattr(cls, "base_folder", f"{cls_name}/raw")  # CIFAR's, MNIST's
        raise ConfigError(
            f"data={name}: dataset files not found or corrupted under {where} "
            f"(data.root={root!r}, data.download={download}). Set data.download=true to fetch "
            f"them, or point data.root at a folder holding them. ({e})"
        ) from None

    def arrays(ds) -> Arrays:  # MNIST: (N,H,W); CIFAR: (N,H,W,C)
        return _normalise(np.asarray(ds.data), mean, std), np.asarray(ds.targets, dtype=np.int64)

    return (*arrays(train), arrays(test), len(train.classes))


def _read_images(folder: Path, classes: list[str] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One ``ImageFolder`` split as uint8 (N, H, W, 3) and int64 labels, and its class names;
    ``classes``: the training split's, whose indices a test split's labels take. Every error is
    a ConfigError naming the path, raised here, before any training."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise ConfigError(f"data=imagefolder: no folder {folder}. data.root must hold train/ "
                          f"(and optionally test/) with one subfolder of images per class, "
                          f"e.g. {folder}/cat/0001.png.")
    try:
        ds = ImageFolder(str(folder), loader=lambda path: path)  # paths only: read below
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        raise ConfigError(f"data=imagefolder: {folder} needs one subfolder of images per class "
                          f"({', '.join(IMAGE_SUFFIXES)}), e.g. {folder}/cat/0001.png; "
                          f"torchvision says: {e}") from None
    if classes is None and len(ds.classes) < 2:
        raise ConfigError(f"data=imagefolder: {folder} has a single class folder "
                          f"({ds.classes[0]!r}); a classifier needs two or more.")
    if classes is not None and (extra := sorted(set(ds.classes) - set(classes))):
        raise ConfigError(f"data=imagefolder: {folder} has class folders that train/ lacks: "
                          f"{', '.join(extra)} (train/ has {', '.join(classes)}).")
    index = {c: i for i, c in enumerate(classes or ds.classes)}
    images, first = [], None
    for path, _ in ds.samples:
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data=imagefolder: cannot read the image {path} ({e}). Remove "
                              f"or replace it.") from None
        if first is None:
            first = (path, a.shape)
        elif a.shape != first[1]:
            h, w = first[1][:2]
            raise ConfigError(f"data=imagefolder: images differ in size: {path} is "
                              f"{a.shape[1]}x{a.shape[0]}, {first[0]} is {w}x{h}. Resize them "
                              f"to one size first (the data are held in memory as one tensor).")
        images.append(a)
    labels = np.asarray([index[ds.classes[t]] for _, t in ds.samples], dtype=np.int64)
    return np.stack(images), labels, list(classes or ds.classes)


def _load_imagefolder(root: str) -> tuple[np.ndarray, np.ndarray, Arrays | None, int]:
    """A researcher's own images: ``root/train/<class>/*`` and, when present, ``root/test/``,
    as RGB, normalised per channel by the mean and std of all of ``train/`` (before
    ``data.val_size`` is held out, as CIFAR's constants are), never of ``test/``."""
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise ConfigError(f"data=imagefolder: data.root={root!r} is no folder ({base}). It must "
                          f"hold train/ (and optionally test/) with one subfolder of images "
                          f"per class.")
    x, y, classes = _read_images(base / "train")
    channels = [x[..., c].astype(np.float32) / 255.0 for c in range(x.shape[-1])]  # one at a
    mean = np.array([ch.mean(dtype=np.float64) for ch in channels])  # time would do; 3 is few
    std = np.array([ch.std(dtype=np.float64) for ch in channels])
    std = np.where(std > 0, std, 1.0)  # a constant channel: centred, not divided by 0
    del channels
    test = None
    if (base / "test").exists():
        tx, ty, _ = _read_images(base / "test", classes)
        if tx.shape[1:] != x.shape[1:]:
            raise ConfigError(f"data=imagefolder: the images of {base / 'test'} are "
                              f"{tx.shape[2]}x{tx.shape[1]}, those of {base / 'train'} "
                              f"{x.shape[2]}x{x.shape[1]}; they must be one size.")
        test = (_normalise(tx, mean, std), ty)
    return _normalise(x, mean, std), y, test, len(classes)


def load_data(cfg: Mapping) -> Splits:
    """Load ``cfg.name`` and cut the seeded train/val split (validated before any training)."""
    name = cfg.get("name")
    if name not in DATASETS:
        raise ConfigError(f"data.name must be one of {list(DATASETS)}, got {name!r}.")
    num_classes = NUM_CLASSES
    if name == "digits":
        x, y, test = _load_digits(int(cfg.get("test_size") or 0))
    elif name == "mnist1d":
        x, y, test = _load_mnist1d(str(cfg.get("root", "data")), cfg.get("num_samples"),
                                   cfg.get("train_split"))
    elif name == "imagefolder":
        x, y, test, num_classes = _load_imagefolder(str(cfg.get("root", "data")))
    else:
        x, y, test, num_classes = _load_torchvision(name, str(cfg.get("root", "data")),
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
                           num_classes)[train_idx]
    train = (torch.from_numpy(x[train_idx]), torch.from_numpy(train_y))
    return Splits(name, train, as_t((x, y), val_idx), test_t, num_classes)


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

    ``augments`` (``data.augment``, one flag per network; None: none) augments network i's rows
    with its own seed's draws of the epoch (``core/augment.py``), padded by ``pad``; only
    training batches come from here, so val, test and train_eval are never augmented.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 seeds: list[int], *, rank: int = 0, world: int = 1,
                 augments: list[bool] | None = None, pad: int = 0) -> None:
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.rank, self.world = int(rank), int(world)
        self.sampler = _Shuffles([EpochShuffle(len(y), s, True) for s in seeds])
        self.augments = [EpochAugment(s, pad, on) for s, on in zip(seeds, augments, strict=True)] \
            if augments is not None and any(augments) else None
        self.batch_sampler = None

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def keep(self, positions: list[int]) -> None:
        """From the next epoch on, only the networks at ``positions`` (the others left the
        stack: ``L2Module.remove``), each still in its own order and augmentation."""
        self.sampler.shuffles = [self.sampler.shuffles[p] for p in positions]
        if self.augments is not None:
            self.augments = [self.augments[p] for p in positions]

    def _draws(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every network's augmentation draws of this epoch, (K, N, 2|1) and (K, N), on the
        device in one transfer each (None: no network augments)."""
        if self.augments is None:
            return None
        epoch, image = self.sampler.shuffles[0].epoch, self.x.dim() == 4
        drawn = [a.draws(len(self.y), epoch, image) for a in self.augments]
        host = [torch.from_numpy(np.stack([d[j] for d in drawn])) for j in (0, 1)]
        if self.x.device.type == "cuda":  # pinned: the copy does not wait for the device
            return tuple(t.pin_memory().to(self.x.device, non_blocking=True) for t in host)
        return host[0], host[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        orders = torch.stack([s.order() for s in self.sampler.shuffles]).to(self.x.device)
        draws = self._draws()
        start = 0
        mine = slice(self.rank, None, self.world)  # this rank's shard of a batch (DDP)
        for idx in orders.split(self.batch_size, dim=1):
            flat = idx.reshape(-1) if self.world == 1 else idx[:, mine].reshape(-1)
            x = self.x[flat]
            if draws is not None:
                cols = slice(start, start + idx.shape[1])
                offsets, flips = (d[:, cols][:, mine] for d in draws)
                x = augment(x, offsets.reshape(len(flat), -1), flips.reshape(-1),
                            self.augments[0].pad)
            start += idx.shape[1]
            yield (x, self.y[flat]) if self.world == 1 else (x, self.y[flat], idx.shape[1])


class Steps:
    """``count`` consecutive mini-batches of a loader's epoch, taken from its iterator only when
    iterated (so Lightning's look-ahead at the next Lightning batch takes none); each is one
    optimizer step (``L2Module.training_step``)."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, ...]], count: int) -> None:
        self.batches, self.count = batches, int(count)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return islice(self.batches, self.count)


class Chunks:
    """A training loader's mini-batches, ``size`` at a time: one Lightning batch is ``size``
    optimizer steps (the last one of an epoch fewer).

    Why: Lightning's loop costs about 0.4 ms per batch whatever the step computes (its hooks,
    the logger connector, the fetcher: docs/performance.md, "Lightning's floor"), as much as a
    whole step of a small network on a CPU; over ``size`` steps it is paid once. The batches,
    their order and the networks' steps are those of the loader one by one. ``sampler`` (for
    ``set_epoch``) and ``keep`` are the loader's.
    """

    def __init__(self, loader: StackedBatches, size: int) -> None:
        if int(size) < 1:
            raise ValueError(f"Chunks: size must be >= 1, got {size}")
        self.loader, self.size = loader, int(size)
        self.batch_sampler = None  # Lightning inspects loaders like a DataLoader

    @property
    def sampler(self) -> _Shuffles:
        return self.loader.sampler

    def __len__(self) -> int:
        return -(-len(self.loader) // self.size)

    def keep(self, positions: list[int]) -> None:
        self.loader.keep(positions)

    def __iter__(self) -> Iterator[Steps]:
        batches, left = iter(self.loader), len(self.loader)
        while left > 0:
            count = min(self.size, left)
            yield Steps(batches, count)
            left -= count


def steps_of(batch: Steps | Iterable[torch.Tensor]) -> Iterable[tuple[torch.Tensor, ...]]:
    """The mini-batches of one Lightning training batch: a chunk's, or the batch itself (a
    loader given to Lightning unchunked)."""
    return batch if isinstance(batch, Steps) else (batch,)

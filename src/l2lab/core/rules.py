"""What exists and what is allowed, written once: the datasets, networks, activations and layer
types the harness knows, and the penalty's allowed values and the check of λ.

Torch-free on purpose: the config layer checks a job in about a second, before torch is imported
(``config/schema.py``), and ``core/`` builds from and checks against the same lists when it
builds the data, the network and the penalty. Each rule is written here once, and ``core/``
imports nothing of the layers above it.
"""

from __future__ import annotations

import fnmatch
import math
import re

from l2lab.base import ConfigError

#: ``data.name``: the datasets ``core.data.load_data`` loads (``conf/data/<name>.yaml`` each).
DATASETS: tuple[str, ...] = ("digits", "mnist1d", "mnist", "fashion_mnist", "cifar10", "cifar100",
                             "imagefolder")

#: MNIST-1D's sizes as the ``mnist1d`` package's ``get_dataset_args()`` names and sets them (the
#: schema's defaults, and the values at which a run's config hash stays the one it had before these
#: keys existed): ``num_samples`` sequences generated, the first ``train_split`` of them the
#: training pool, the rest the test split. ``tests/test_mnist1d.py`` checks they match the package.
MNIST1D_SIZES: dict[str, int | float] = {"num_samples": 5000, "train_split": 0.8}

#: ``model=<name>`` -> its class or factory: the presets of ``conf/model/``. Any other importable
#: ``nn.Module`` class or factory may be named by ``model._target_`` (:func:`network_error`).
NETWORKS: dict[str, str] = {"mlp": "l2lab.models.MLP", "cnn": "l2lab.models.CNN",
                            "resnet18": "l2lab.models.resnet18",
                            "resnet1d": "l2lab.models.ResNet1d"}
#: The presets whose keys ``activation``, ``dropout``, ``hidden``, ``channels`` mean what the
#: schema checks (a researcher's own network's keys are its own).
OWN_NETWORKS: tuple[str, ...] = ("l2lab.models.MLP", "l2lab.models.CNN")

#: ``model.activation`` -> its ``torch.nn`` class name.
ACTIVATIONS: dict[str, str] = {"relu": "ReLU", "tanh": "Tanh", "gelu": "GELU",
                               "sigmoid": "Sigmoid"}

#: ``regularization.types``: the default selection's layer classes. Normalization layers are
#: left out, by the usual convention (their weights set a scale that a following layer undoes).
LAYER_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d")
#: The layer classes a ``regularization.types`` entry (a name or an fnmatch pattern such as
#: ``Conv*`` or ``BatchNorm*``) may name: ``torch.nn`` classes with a ``weight``.
SELECTABLE_TYPES: tuple[str, ...] = (
    "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "Embedding", "EmbeddingBag")
#: ``regularization.normalize``: the n of λ/n (the note's mini-batch n, the training-set N, or 1).
NORMALIZE: tuple[str, ...] = ("batch", "dataset", "none")
#: ``regularization.mode``: the penalty in the loss, or as the optimizer's weight decay.
MODES: tuple[str, ...] = ("loss", "optimizer")
#: ``scheduler``: torch's ``lr_scheduler`` classes (``core/schedules.py``), ``none`` the default.
SCHEDULERS: tuple[str, ...] = ("none", "cosine", "step", "onecycle")
#: ``scheduler.interval``: stepped after every optimizer step, or every epoch.
INTERVALS: tuple[str, ...] = ("step", "epoch")
#: ``scheduler.anneal_strategy`` of ``onecycle`` (torch's ``OneCycleLR``).
ANNEAL_STRATEGIES: tuple[str, ...] = ("cos", "linear")
#: ``trainer.precision`` values that mean autocast (Lightning's names, old and new). They apply on
#: CUDA only: elsewhere a run trains in ``32-true`` (:func:`effective_precision`), so a preset
#: written for a GPU (``experiment=cifar10_resnet18``) also runs, in full precision, on a laptop.
MIXED_PRECISIONS: tuple[object, ...] = ("bf16-mixed", "16-mixed", "bf16", "16", 16)


def effective_precision(precision: object, on_cuda: bool) -> object:
    """The ``trainer.precision`` a run trains with: a mixed precision on CUDA only, else
    ``32-true``; any other value as given."""
    return "32-true" if precision in MIXED_PRECISIONS and not on_cuda else precision


#: ``regularization._target_`` of the default penalty (conf/regularization/l2.yaml names it too).
DEFAULT_PENALTY = "l2lab.core.penalties.L2"


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def network_error(target: object) -> str | None:
    """Why ``model._target_`` cannot name a network (None: it can), told before torch is
    imported. Any importable ``nn.Module`` class or factory is allowed; whether it imports, builds
    and answers (batch, classes) is checked when it is built (``core/networks.py``), before any
    training."""
    if isinstance(target, str) and _DOTTED.fullmatch(target):
        return None
    names = ", ".join(f"model={k}" for k in NETWORKS)
    return (f"model._target_ must name an nn.Module class or factory as 'package.module.Name' "
            f"(a preset: {names}; or your own, e.g. model=custom "
            f"model._target_=mylab.nets.MyNet); got {target!r}.")


def type_error(pattern: object) -> str | None:
    """Why a ``regularization.types`` entry names no selectable layer class (None: it does)."""
    if isinstance(pattern, str) and fnmatch.filter(SELECTABLE_TYPES, pattern):
        return None
    return (f"regularization.types: each must name a layer class or a pattern over them "
            f"({', '.join(SELECTABLE_TYPES)}; e.g. Conv*, BatchNorm*); got {pattern!r}.")


def check_lam(key: str, value: object) -> float:
    """λ as a float, or a ConfigError naming ``key``: λ must be finite and >= 0."""
    try:
        lam = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number >= 0, got {value!r}.") from None
    if not math.isfinite(lam) or lam < 0:
        raise ConfigError(
            f"{key} must be a finite number >= 0 (0 disables the penalty), got {value!r}.")
    return lam


def check_lams(lam: object, lam_per_layer: object = None) -> None:
    """``regularization.lam`` and every ``regularization.lam_per_layer`` value (a mapping)."""
    check_lam("regularization.lam", lam)
    for layer, value in (lam_per_layer or {}).items():  # type: ignore[attr-defined]
        check_lam(f"regularization.lam_per_layer.{layer}", value)


def check_ratio(value: object) -> float:
    """``regularization.l1_ratio`` (elastic net: the share of λ on the L1 term) in [0, 1]."""
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ratio = math.nan
    if isinstance(value, bool) or not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"regularization.l1_ratio must be a number in [0, 1], got {value!r}.")
    return ratio


def check_label_noise(value: object) -> float:
    """``data.label_noise`` (the share of training labels redrawn uniformly) in [0, 1): 1 would
    leave no label to learn from."""
    try:
        noise = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        noise = math.nan
    if isinstance(value, bool) or not 0.0 <= noise < 1.0:
        raise ConfigError(f"data.label_noise must be a number in [0, 1) (0: clean labels), "
                          f"got {value!r}.")
    return noise


def check_mnist1d_sizes(num_samples: object, train_split: object) -> tuple[int, float]:
    """``data.num_samples`` and ``data.train_split`` of MNIST-1D: the generator makes
    ``num_samples // 10`` sequences per class, and both the training pool and the test split must
    keep at least one."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ConfigError(f"data.num_samples must be an integer >= 10 (MNIST-1D generates "
                          f"num_samples // 10 sequences per class), got {num_samples!r}.")
    try:
        share = float(train_split)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        share = math.nan
    total = num_samples // 10 * 10
    if isinstance(train_split, bool) or not 0.0 < share < 1.0 or \
            not 0 < int(total * share) < total:
        raise ConfigError(f"data.train_split must be a number in (0, 1) that leaves both splits "
                          f"non-empty ({total} sequences for data.num_samples={num_samples}), "
                          f"got {train_split!r}.")
    return num_samples, share

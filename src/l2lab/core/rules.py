"""What exists and what is allowed, written once: the datasets, networks, activations and layer
types the harness knows, and the penalty's allowed values and the check of λ.

Torch-free on purpose: the config layer checks a job in about a second, before torch is imported
(``config/schema.py``), and ``core/`` builds from and checks against the same lists when it
builds the data, the network and the penalty. Each rule is written here once, and ``core/``
imports nothing of the layers above it.
"""

from __future__ import annotations

import math

from l2lab.base import ConfigError

#: ``data.name``: the datasets ``core.data.load_data`` loads (``conf/data/<name>.yaml`` each).
DATASETS: tuple[str, ...] = ("digits", "mnist1d", "mnist", "fashion_mnist", "cifar10")

#: ``model=<name>`` -> its class: the networks the harness builds and stacks.
NETWORKS: dict[str, str] = {"mlp": "l2lab.models.MLP", "cnn": "l2lab.models.CNN"}

#: ``model.activation`` -> its ``torch.nn`` class name.
ACTIVATIONS: dict[str, str] = {"relu": "ReLU", "tanh": "Tanh", "gelu": "GELU",
                               "sigmoid": "Sigmoid"}

#: ``regularization.types``: the layer classes a selection can penalise (also its default).
LAYER_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d")
#: ``regularization.normalize``: the n of λ/n (the note's mini-batch n, the training-set N, or 1).
NORMALIZE: tuple[str, ...] = ("batch", "dataset", "none")
#: ``regularization.mode``: the penalty in the loss, or as the optimizer's weight decay.
MODES: tuple[str, ...] = ("loss", "optimizer")
#: ``regularization._target_`` of the default penalty (conf/regularization/l2.yaml names it too).
DEFAULT_PENALTY = "l2lab.core.penalties.L2"


def network_error(target: object) -> str | None:
    """Why ``model._target_`` is not a network the harness builds (None: it is)."""
    if target in NETWORKS.values():
        return None
    names = ", ".join(f"model={k}" for k in NETWORKS)
    return (f"model._target_ must be a network of l2lab.models ({names}: "
            f"{', '.join(NETWORKS.values())}); got {target!r}.")


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

"""The penalty's rules that need no torch: the allowed values and the check of λ.

Why a module of its own: the config layer checks a job in about a second, before torch is
imported (``config/schema.py``), and the penalty checks the same keys when it is built
(``core/regularization.py``). Both read the rules from here, so each is written once, and
``core/`` imports nothing of the layers above it.
"""

from __future__ import annotations

import math

from l2lab.base import ConfigError

#: regularization.normalize: the n of λ/n (the note's mini-batch n, the training-set N, or 1).
NORMALIZE = ("batch", "dataset", "none")
#: regularization.mode: the penalty in the loss, or as the optimizer's weight decay.
MODES = ("loss", "optimizer")
#: regularization.types: the layer classes a selection may name (and its default).
LAYER_TYPES = ("Linear", "Conv1d", "Conv2d")
#: regularization._target_ of the default penalty (conf/regularization/l2.yaml names it too).
DEFAULT_PENALTY = "l2lab.core.penalties.L2"


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

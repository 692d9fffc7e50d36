"""Which jobs of a sweep may train together as one stack of networks, decided from their composed
configs alone, and the one list of the settings a stack holds per network (light: the vectorized
launcher imports it when Hydra starts).

A setting stacks when it keeps the network's shapes and the data stream and l2lab has proven it
per network (``tests/test_engine.py``: each child equals its ordinary run bit for bit on CPU):
the seed, every key of ``regularization`` for one penalty class (its ``_target_`` is not
stacked: an L1 job and an L2 job train in different stacks), one optimizer class's
hyperparameters (each network's step is its own torch param group), ``model.dropout`` (each
network its own rate and generator), ``data.augment`` (each network its own seed's draws, on its
own rows of the batch) and gradient clipping (each network by its own norm or
value). The ``scheduler`` node has no per-network key: its kind and settings are part of the shape
key, and each network follows the schedule from its own ``optimizer.lr``. The composer
(``composing.SweepConfigs``), the launcher, the engine and the tests all read :data:`STACKED`.

Widths (:data:`WIDTH_KEYS`) stack for the networks of :data:`WIDTH_MODELS` only, at one depth:
each network is padded to the stack's widest (``stacked.StackedLinear``), and
:func:`width_stacks` is the one rule of which widths share a stack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from l2lab.base import ConfigError
from l2lab.core.rules import check_lams

#: The per-network settings of a stack: dotted keys of the task config. A job's values are those
#: of these keys that its config has (an optimizer class has its own keys; the jobs of a stack
#: share the class, so they share the key set).
STACKED = (
    "seed",
    "regularization.name", "regularization.lam", "regularization.lam_per_layer",
    "regularization.layers", "regularization.exclude", "regularization.types",
    "regularization.min_params", "regularization.include_bias", "regularization.normalize",
    "regularization.mode", "regularization.l1_ratio",
    "optimizer.lr", "optimizer.momentum", "optimizer.dampening", "optimizer.nesterov",
    "optimizer.betas", "optimizer.eps", "optimizer.weight_decay", "optimizer.amsgrad",
    "model.dropout", "data.augment", "model.hidden", "model.channels",
    "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm",
)
#: Of those, the keys whose value is a dict set entry by entry (``+key.<name>=value``).
STACKED_DICTS = ("regularization.lam_per_layer",)
#: The optimizer's hyperparameters among them: networks that differ here get their own param group.
OPTIMIZER_KEYS = tuple(k for k in STACKED if k.startswith("optimizer."))

#: Optimizers whose update is elementwise (so one instance over stacked tensors equals K).
STACKABLE_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")
ANY = object()
#: Layer widths: per network for :data:`WIDTH_MODELS` (the number of layers, the list's
#: length, is shared); for any other network part of the shape key, as any setting.
WIDTH_KEYS = ("model.hidden", "model.channels")
#: Networks whose widths may differ in a stack: every tensor of theirs is a Linear's or a
#: convolution's (``groups=1``), which pad to the widest with zeros.
WIDTH_MODELS = ("l2lab.models.MLP", "l2lab.models.CNN")
#: Activations with f(0) = 0: a zero-padded unit stays exactly zero through them, so the padded
#: batched kernels (CUDA) compute each network's own numbers. Any other activation stacks
#: widths on CPU only, where each network computes at its own width.
ZERO_AT_ZERO = ("relu", "tanh", "gelu")
#: A stack's padded work (K networks at its widest) may be at most this many times its real work.
PADDING_LIMIT = 2.0
#: Trainer settings proven to act per network in a stack (``tests/test_engine.py``), with the
#: values allowed; any other setting or value makes the job train alone (a stack of one). For
#: example 16-bit precision would share one GradScaler: one overflow would skip every network's
#: step. (``gradient_clip_*`` are per network: :data:`STACKED`.)
STACKABLE_TRAINER: dict[str, object] = {
    "max_epochs": ANY, "accelerator": ANY, "deterministic": ANY, "enable_progress_bar": ANY,
    "devices": (1, "1"), "num_nodes": (1,), "strategy": ("auto",),
    "precision": ("32-true", "32", 32), "eval_train": ANY,
}
_MARK = "<stacked>"


def _stackable_trainer(trainer: dict) -> bool:
    for key, value in trainer.items():
        if f"trainer.{key}" in STACKED:
            continue
        allowed = STACKABLE_TRAINER.get(key)
        if allowed is None or (allowed is not ANY and value not in allowed):  # type: ignore
            return False
    return True


def group_key(cfg: DictConfig) -> str | None:
    """What a job must share with others to be stacked with them; ``None``: train it alone."""
    try:
        tree = OmegaConf.to_container(task_config(cfg), resolve=True)
    except Exception:  # an interpolation error is the ordinary path's to report
        return None
    return shape_key(tree) if valid_lams(tree.get("regularization") or {}) else None


def shape_key(tree: dict) -> str | None:
    """:func:`group_key` of a resolved task config, its λ values not judged (a member's are its
    own: :func:`valid_lams`): the config with each stacked key's value blanked (a key that is
    absent stays absent, so optimizers with other keys never share a stack)."""
    if (tree.get("resume") or tree.get("reuse")
            or (tree.get("optimizer") or {}).get("_target_") not in STACKABLE_OPTIMIZERS
            or not _stackable_trainer(tree.get("trainer") or {})):
        return None
    return json.dumps(_blank(tree), sort_keys=True, default=str)


def _blank(tree: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in tree.items()}
    widths = (out.get("model") or {}).get("_target_") in WIDTH_MODELS
    for key in STACKED:
        parent, _, leaf = key.rpartition(".")
        node = out.get(parent) if parent else out
        if not (isinstance(node, dict) and leaf in node):
            continue
        if key not in WIDTH_KEYS:
            node[leaf] = _MARK
        elif widths:  # the depth stays in the key: only widths stack
            value = node[leaf]
            node[leaf] = f"{_MARK}x{len(value)}" if isinstance(value, list) else value
    return out


def values_of(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`STACKED` keys that a config tree has, with their values (as they are)."""
    out: dict[str, Any] = {}
    for key in STACKED:
        parent, _, leaf = key.rpartition(".")
        node = tree.get(parent) if parent else tree
        if isinstance(node, Mapping) and leaf in node:
            out[key] = node[leaf]
    return out


def member_values(cfg: DictConfig) -> dict[str, Any]:
    """A job's values of the stacked keys, resolved, as plain containers."""
    return values_of(OmegaConf.to_container(task_config(cfg), resolve=True))


def task_config(cfg: DictConfig) -> DictConfig:
    """The job's config as its task function sees it: without the ``hydra`` node."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def valid_lams(reg: dict) -> bool:
    """Jobs with a bad λ go the ordinary way, which records them FAILED with the reason
    (``rules.check_lams``, the one check of λ)."""
    try:
        check_lams(reg.get("lam"), reg.get("lam_per_layer"))
    except ConfigError:
        return False
    return True


def member_lams(values: Mapping[str, Any]) -> dict[str, Any]:
    """A member's λ values as :func:`valid_lams` reads them."""
    return {"lam": values.get("regularization.lam"),
            "lam_per_layer": values.get("regularization.lam_per_layer")}


def optimizer_key(values: Mapping[str, Any]) -> str:
    """Members with equal keys share one optimizer param group (sorted together in a stack)."""
    return json.dumps({k: values.get(k) for k in OPTIMIZER_KEYS}, sort_keys=True, default=str)


def width_stacks(shapes: Sequence[Sequence[Sequence[int]]], pads_exactly: bool = True,
                 limit: float = PADDING_LIMIT) -> list[list[int]]:
    """Which jobs (by position) train together, given each job's weight shapes (one tuple per
    Linear or convolution, in the network's order; all jobs of one depth): jobs of a stack's
    widest shape always join it; jobs of other widths share one while its padded work, K networks at
    the elementwise widest shape, stays within ``limit`` × its real work Σ_k work_k (work: Σ
    over layers of the weight's size, in × out × kernel). Widest first, each job joins the
    current stack or opens the next. ``pads_exactly`` False (the padded kernels of CUDA with an
    activation where f(0) ≠ 0: :func:`pads_exactly`): one stack per shape."""
    def work(shape: Sequence[Sequence[int]]) -> int:
        return sum(math.prod(s) for s in shape)

    keyed = [tuple(tuple(int(d) for d in s) for s in shape) for shape in shapes]
    order = sorted(range(len(keyed)), key=lambda i: (-work(keyed[i]), keyed[i]))
    stacks: list[list[int]] = []
    widest: list[tuple[int, ...]] = []
    real = 0
    for i in order:
        shape = keyed[i]
        if stacks and keyed[stacks[-1][0]] == shape:  # the stack's widest: no padding
            stacks[-1].append(i)
            real += work(shape)
            continue
        if stacks and pads_exactly and len(shape) == len(widest):
            padded = [tuple(map(max, a, b)) for a, b in zip(widest, shape, strict=True)]
            if (len(stacks[-1]) + 1) * work(padded) <= limit * (real + work(shape)):
                stacks[-1].append(i)
                widest, real = padded, real + work(shape)
                continue
        stacks.append([i])
        widest, real = list(shape), work(shape)
    return [sorted(s) for s in stacks]


def pads_exactly(activation: Any, cuda: bool) -> bool:
    """Whether networks of other widths may share a stack: on CPU always (each computes at its
    own width), on CUDA when the activation keeps padded units at zero (:data:`ZERO_AT_ZERO`)."""
    return not cuda or activation in ZERO_AT_ZERO

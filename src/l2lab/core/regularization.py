"""Which layers are penalised (one rule for every penalty), and the penalty interface. Pure torch.

The source note defines the regularized objective over a mini-batch of n examples as

    J = (1/n) Σ_i CCE(ŷ_i, y_i) + (λ/n) Σ_{l ∈ selected} ||W_l||_F²,   ||W||_F² = Σ_ij w_ij²

whose gradient w.r.t. a selected W is ∂(mean CCE)/∂W + (2λ/n)·W (the note prints "2λ||W||",
which is not the derivative of its own J). Other penalties keep the note's λ/n and its selection
and change the norm (``core/penalties.py``: L2, L1, elastic net). Autograd differentiates each
penalty's terms, so each formula is written once: in its class.

``regularization._target_`` names the class; :func:`build_penalty` resolves it and builds it for
a network (a class, not ``hydra.utils.instantiate``: a penalty needs the network and the data
size, and a stack builds one penalty from its networks' own: :meth:`Penalty.stack`).
"""

from __future__ import annotations

import fnmatch
import importlib
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any, ClassVar

import torch
from torch import nn

from l2lab.base import ConfigError
from l2lab.core.rules import (
    DEFAULT_PENALTY,
    LAYER_TYPES,
    MODES,
    NORMALIZE,
    check_lams,
    type_error,
)


@dataclass(frozen=True)
class SelectedLayer:
    """One penalised layer: its name in ``named_modules()``, its λ and the tensors penalised."""

    name: str
    lam: float
    weight: nn.Parameter
    bias: nn.Parameter | None  # only when include_bias

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


def _as_list(key: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return [str(v) for v in value]
    raise ConfigError(f"{key} must be a list of fnmatch patterns, got {value!r}.")


def select_layers(
    model: nn.Module,
    *,
    lam: float,
    layers: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    types: Sequence[str] = LAYER_TYPES,
    min_params: int = 0,
    lam_per_layer: Mapping[str, float] | None = None,
    include_bias: bool = False,
) -> list[SelectedLayer]:
    """Resolve the config's selection into layers, validating every key against the model.

    A layer is selected when its class is in ``types``, its name matches a ``layers`` pattern and
    no ``exclude`` pattern, and its weight has at least ``min_params`` elements. Its λ is that of
    the first ``lam_per_layer`` key matching its name, else ``lam``.
    """
    check_lams(lam, lam_per_layer)
    lam = float(lam)  # type: ignore[arg-type]
    layers = _as_list("regularization.layers", layers)
    exclude = _as_list("regularization.exclude", exclude)
    types = _as_list("regularization.types", types)
    per_layer = {str(key): float(v) for key, v in (lam_per_layer or {}).items()}
    try:
        min_params = int(min_params)
    except (TypeError, ValueError):
        raise ConfigError(
            f"regularization.min_params must be an integer >= 0, got {min_params!r}.") from None
    if min_params < 0:
        raise ConfigError(f"regularization.min_params must be >= 0, got {min_params}.")

    candidates = {
        name: module
        for name, module in model.named_modules()
        if name and isinstance(getattr(module, "weight", None), nn.Parameter)
    }
    names = compact_names(candidates) or "(none)"
    for t in types:
        if why := type_error(t):
            raise ConfigError(why)
    if not layers:
        raise ConfigError("regularization.layers is empty; use ['*'] to select every layer.")
    for pattern in layers:
        if not fnmatch.filter(candidates, pattern):
            raise ConfigError(
                f"regularization.layers: pattern {pattern!r} matches no layer. "
                f"Layer names of this model: {names}."
            )
    for key in per_layer:
        if not fnmatch.filter(candidates, key):
            raise ConfigError(
                f"regularization.lam_per_layer: key {key!r} matches no layer. "
                f"Layer names of this model: {names}."
            )

    selected = []
    for name, module in candidates.items():
        if not any(fnmatch.fnmatchcase(c, t) for c in _class_names(module) for t in types):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in layers):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if module.weight.numel() < min_params:
            continue
        layer_lam = next((v for key, v in per_layer.items() if fnmatch.fnmatchcase(name, key)),
                         lam)
        bias = getattr(module, "bias", None) if include_bias else None
        selected.append(SelectedLayer(name, layer_lam, module.weight,
                                      bias if isinstance(bias, nn.Parameter) else None))
    if not selected:
        raise ConfigError(
            "regularization selects no layer: layers="
            f"{layers}, exclude={exclude}, types={types}, min_params={min_params} leave nothing "
            f"of {names}. Use regularization=none for an unregularized run."
        )
    return selected


def _class_names(module: nn.Module) -> list[str]:
    """The ``torch.nn`` class names a layer is (its class and its bases): a subclass of
    ``nn.Linear`` (torchvision's, a researcher's) is a Linear for ``regularization.types``."""
    return [c.__name__ for c in type(module).__mro__ if c.__module__.startswith("torch.nn")] \
        or [type(module).__name__]


def compact_names(names: Iterable[str], width: int = 8) -> str:
    """Layer names for an error message, short even for a network of 60 layers: up to 12 as
    they are; beyond, names that differ only in their numbers are one entry with the numbers
    in braces (``layer{1-4}.{0,1}.conv1``), and a long list ends with how many more."""
    import re

    names = list(names)
    if len(names) <= 12:
        return ", ".join(names)
    groups: dict[tuple[str, ...], list[list[int]]] = {}
    for name in names:
        parts = re.split(r"(\d+)", name)
        skeleton = tuple(p if i % 2 == 0 else "#" for i, p in enumerate(parts))
        numbers = [int(p) for p in parts[1::2]]
        groups.setdefault(skeleton, []).append(numbers)

    def spans(values: list[int]) -> str:
        values = sorted(set(values))
        if len(values) == 1:
            return str(values[0])
        if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
            return f"{{{values[0]}-{values[-1]}}}"
        return "{" + ",".join(map(str, values)) + "}"

    entries = []
    for skeleton, numbers in groups.items():
        columns = [[row[i] for row in numbers] for i in range(len(numbers[0]))]
        filled = iter(spans(c) for c in columns)
        entries.append("".join(next(filled) if p == "#" else p for p in skeleton))
    more = len(entries) - width * 4
    return ", ".join(entries[:width * 4]) + (f", and {more} more" if more > 0 else "")


#: The attribute of a stacked parameter that lists each network's own shape, where a stack pads
#: networks of other widths to its widest (``stacked.StackedLinear``); absent: one shape.
NETWORK_SHAPES = "l2lab_network_shapes"


def network_views(t: torch.Tensor, shapes: Sequence[Sequence[int]] | None) -> list[torch.Tensor]:
    """Each network's own tensor of a stacked ``t`` (``shapes``: :data:`NETWORK_SHAPES`): row i,
    cut to network i's shape where it is narrower than the stack, and then contiguous: a sum
    over a strided slice, or over zeros between the numbers, adds in another order than over the
    ordinary run's tensor, and network i's numbers must be its ordinary run's."""
    rows = t.unbind(0)
    if shapes is None:
        return list(rows)
    return [r if tuple(r.shape) == tuple(s) else r[tuple(slice(0, n) for n in s)].contiguous()
            for r, s in zip(rows, shapes, strict=True)]


def _squares(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2)


def _magnitudes(t: torch.Tensor) -> torch.Tensor:
    return t.abs()


class Penalty(nn.Module, ABC):
    """A penalty on the selected layers: the interface every ``regularization`` preset builds.

    What is shared, and so written here once: the selection (:func:`select_layers`: layers,
    exclude, types, min_params, lam_per_layer, include_bias), λ per layer ``lams`` ((L,) for one
    network; (L, K) for K stacked networks, whose selected weights carry a leading K dimension),
    the n of λ/n (``normalize``), and how a stack's penalty is made from its networks' own
    (:meth:`stack`: a layer a network does not select has λ = 0 for it, which adds exact zeros).

    What a penalty class says (``core/penalties.py``):

    * :data:`TERMS` and :meth:`terms`: its terms per network, a dict name -> tensor (a scalar,
      or (K,) in a stack), logged as ``train/<name>``; ``train/loss`` adds them to the CCE;
    * :data:`MODES`: ``loss`` always; ``optimizer`` where the penalty has a weight-decay form
      (:meth:`decay`, :meth:`param_groups`; L2 only);
    * :meth:`settings`: its own per-network settings read from the config (elastic net's
      ``l1_ratio``), passed to ``__init__`` and, per network, by :meth:`stack`;
    * :meth:`after_step`: called after every optimizer step (default: nothing), so that a
      constraint such as max-norm (project each selected W back into ||W|| <= c; no terms,
      ``TERMS = ()``) is one more class with no change to the module (no preset has one yet).
    """

    #: The names of the terms :meth:`terms` returns (``train/<name>``).
    TERMS: ClassVar[tuple[str, ...]] = ()
    #: The ``regularization.mode`` values this penalty supports.
    MODES: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, selected: list[SelectedLayer], normalize: str = "batch",
                 dataset_size: int | None = None, lams: torch.Tensor | None = None,
                 bias_mask: torch.Tensor | None = None,
                 normalizes: Sequence[str] | None = None) -> None:
        super().__init__()
        if normalize not in NORMALIZE:
            raise ConfigError(
                f"regularization.normalize must be one of {list(NORMALIZE)}, got {normalize!r}."
            )
        if normalize == "dataset" and not dataset_size:
            raise ConfigError("regularization.normalize=dataset needs the training-set size.")
        self.selected = selected
        self.normalize = normalize
        self.dataset_size = dataset_size
        lams = torch.tensor([s.lam for s in selected]) if lams is None else lams
        self.stacked = lams.dim() == 2
        self.register_buffer("lams", lams, persistent=False)
        # a stack whose networks differ: (L, K) 1.0/0.0, whether network i penalises layer l's
        # bias (x + 1.0·y and x + 0.0·y are exactly x + y and x); per network its normalize
        self.bias_mask = bias_mask
        self.normalizes = list(normalizes) if normalizes and len(set(normalizes)) > 1 else None
        for n in self.normalizes or ():
            if n not in NORMALIZE:
                raise ConfigError(
                    f"regularization.normalize must be one of {list(NORMALIZE)}, got {n!r}.")

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def settings(cls, cfg: Mapping) -> dict[str, Any]:
        """The class's own settings from a ``regularization`` config, checked (default: none)."""
        return {}

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Mapping,
                    dataset_size: int | None = None) -> Penalty:
        """The penalty of one network, every key checked against it before training."""
        mode = cfg.get("mode", "loss")
        if mode not in MODES or mode not in cls.MODES:
            only = "" if set(cls.MODES) == set(MODES) else \
                f" for {cls.__name__} (a penalty without a weight-decay form)"
            raise ConfigError(f"regularization.mode must be one of {list(cls.MODES)}{only}, "
                              f"got {mode!r}.")
        selected = select_layers(
            model,
            lam=cfg.get("lam", 0.0),
            layers=cfg.get("layers", ["*"]),
            exclude=cfg.get("exclude", []),
            types=cfg.get("types", LAYER_TYPES),
            min_params=cfg.get("min_params", 0),
            lam_per_layer=cfg.get("lam_per_layer") or {},
            include_bias=bool(cfg.get("include_bias", False)),
        )
        return cls(selected, normalize=cfg.get("normalize", "batch"),
                   dataset_size=dataset_size, **cls.settings(cfg))

    @classmethod
    def stack(cls, penalties: Sequence[Penalty], selected: list[SelectedLayer]) -> Penalty:
        """One penalty for K stacked networks from their own (one class): ``selected`` is the
        union of their selections in the stacked network (``stacked.stack_members``), each
        network keeps its λ per layer (0 where it does not select the layer), its bias choice,
        its normalize and its :meth:`settings`."""
        names = [s.name for s in selected]
        own = [{s.name: s for s in p.selected} for p in penalties]
        lams = torch.tensor([[o[n].lam if n in o else 0.0 for o in own] for n in names])  # (L, K)
        bias = torch.tensor([[1.0 if n in o and o[n].bias is not None else 0.0 for o in own]
                             for n in names])
        uniform_bias = all(bool((row == 1.0).all()) for row, s in zip(bias, selected, strict=True)
                           if s.bias is not None)
        p0 = penalties[0]
        return cls(selected, normalize=p0.normalize, dataset_size=p0.dataset_size, lams=lams,
                   bias_mask=None if uniform_bias else bias,
                   normalizes=[p.normalize for p in penalties],
                   **cls.stacked_settings(penalties))

    @classmethod
    def stacked_settings(cls, penalties: Sequence[Penalty]) -> dict[str, Any]:
        """:meth:`settings` of K networks, one value per network (default: none)."""
        return {}

    # -- what the module reads -----------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [s.name for s in self.selected]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for s in self.selected for p in s.params)

    def divisor(self, batch_size: int) -> float | torch.Tensor:
        """The n of λ/n for a mini-batch of ``batch_size`` examples (K of them, float64, for a
        stack whose networks normalize differently)."""
        if self.normalizes is not None:
            return torch.tensor([self._divisor(n, batch_size) for n in self.normalizes],
                                dtype=torch.float64)
        return self._divisor(self.normalize, batch_size)

    def _divisor(self, normalize: str, batch_size: int) -> float:
        if normalize == "batch":
            return float(batch_size)
        if normalize == "dataset":
            return float(self.dataset_size)  # type: ignore[arg-type]
        return 1.0

    def _sum(self, p: torch.Tensor, elementwise: Callable[[torch.Tensor], torch.Tensor]
             ) -> torch.Tensor:
        """Σ elementwise(p) over one network's tensor: a scalar, or K of them for a stacked
        tensor (on CPU one sum per network: a large sum's threading depends on its size, and
        network i's value must not depend on how many networks share the stack)."""
        if not self.stacked:
            return elementwise(p).sum()
        if p.device.type == "cpu":  # unbind: an O(K) backward; each at its own width
            if p.shape[0] == 1:  # a stack of one: its one contiguous block, summed as one
                return elementwise(p).sum().reshape(1)
            return torch.stack([elementwise(w).sum()
                                for w in network_views(p, getattr(p, NETWORK_SHAPES, None))])
        return elementwise(p).flatten(1).sum(1)

    def layer_sums(self, elementwise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Σ elementwise(w) over each selected layer's penalised tensors (its weight, and its
        bias where penalised): (L,) or (L, K)."""
        if self.bias_mask is None:  # reduce, not sum(): no 0 + t (an op and a node, exact)
            return torch.stack([reduce(operator.add, (self._sum(p, elementwise)
                                                      for p in s.params))
                                for s in self.selected])
        mask = self.bias_mask.to(self.selected[0].weight)
        return torch.stack([self._sum(s.weight, elementwise) if s.bias is None
                            else self._sum(s.weight, elementwise)
                            + mask[i] * self._sum(s.bias, elementwise)
                            for i, s in enumerate(self.selected)])

    def sq_norms(self) -> torch.Tensor:
        """||W_l||_F² (plus ||b_l||² when biases are penalised) per selected layer."""
        return self.layer_sums(_squares)

    def abs_norms(self) -> torch.Tensor:
        """||W_l||_1 = Σ|w| (plus ||b_l||_1 when biases are penalised) per selected layer."""
        return self.layer_sums(_magnitudes)

    def weight_sq_norms(self) -> dict[str, torch.Tensor]:
        """||W_l||_F² of each selected layer's weight alone (the logged ``weights/sq_norm/*``,
        whatever the penalty)."""
        with torch.no_grad():  # not detach(): the weight's network shapes are its attribute
            return {s.name: self._sum(s.weight, _squares) for s in self.selected}

    def weighted(self, norms: torch.Tensor, lams: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Σ_l λ_l·norm_l / n per network: the note's (λ/n)Σ over the selected layers."""
        w = self.selected[0].weight
        lams = lams.to(device=w.device, dtype=w.dtype)
        divisor = self.divisor(batch_size)
        if torch.is_tensor(divisor):
            divisor = divisor.to(device=w.device, dtype=w.dtype)
        per_layer = lams * norms
        if per_layer.dim() == 2 and per_layer.device.type == "cpu" and per_layer.shape[1] == 1:
            return per_layer.sum().reshape(1) / divisor  # one network: a contiguous column
        if per_layer.dim() == 2 and per_layer.device.type == "cpu":  # one sum per network:
            # a strided column sums in another order than a contiguous one (21 layers of a
            # ResNet-18 showed it), and network i's value must not depend on K
            return torch.stack([c.contiguous().sum() for c in per_layer.unbind(1)]) / divisor
        return per_layer.sum(0) / divisor

    @abstractmethod
    def terms(self, batch_size: int, lams: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The penalty's terms ({name: value}, in :data:`TERMS` order) for a mini-batch of
        ``batch_size`` examples, with the given λ per layer ((L, K); default its own)."""

    def forward(self, batch_size: int, lams: torch.Tensor | None = None) -> torch.Tensor:
        """The whole penalty: its terms added (one term: that term itself)."""
        return added(self.terms(batch_size, lams))

    def decay(self, batch_size: int, lams: torch.Tensor | None = None) -> torch.Tensor:
        """The per-layer weight decay equivalent to the penalty (``mode=optimizer``)."""
        raise ConfigError(f"regularization.mode must be loss for {type(self).__name__}.")

    def param_groups(self, model: nn.Module, batch_size: int) -> list[dict]:
        """Optimizer groups that apply the penalty as weight decay (``mode=optimizer``)."""
        raise ConfigError(f"regularization.mode must be loss for {type(self).__name__}.")

    def after_step(self) -> None:
        """Called after each optimizer step, with the updated weights (default: nothing). A
        max-norm constraint would rescale each selected W here (no gradient, no term)."""


def added(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A penalty's terms added in their order (one term: that tensor itself, so that L2's loss
    stays ce + l2 to the bit)."""
    values = list(terms.values())
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def penalty_class(target: str) -> type[Penalty]:
    """The class that ``regularization._target_`` names."""
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Penalty)):
        raise ConfigError(
            f"regularization._target_ must name a penalty class (a subclass of "
            f"l2lab.core.regularization.Penalty, e.g. {DEFAULT_PENALTY}), got {target!r}.")
    return cls


def build_penalty(model: nn.Module, cfg: Mapping, dataset_size: int | None = None) -> Penalty:
    """The penalty that a ``regularization`` config node names (``_target_``; default L2),
    built for ``model`` and validated here, before training."""
    return penalty_class(cfg.get("_target_") or DEFAULT_PENALTY).from_config(
        model, cfg, dataset_size)

"""Selective L2: which layers are penalised, and the penalty itself. Pure torch.

The source note defines the regularized objective over a mini-batch of n examples as

    J = (1/n) Σ_i CCE(ŷ_i, y_i) + (λ/n) Σ_{l ∈ selected} ||W_l||_F²,   ||W||_F² = Σ_ij w_ij²

whose gradient w.r.t. a selected W is ∂(mean CCE)/∂W + (2λ/n)·W (the note prints "2λ||W||",
which is not the derivative of its own J). Autograd differentiates the penalty below, so the
maths is written once: here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from l2lab.base import ConfigError
from l2lab.config.schema import MODES, NORMALIZE, check_lam
from l2lab.core.rules import LAYER_TYPES


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
    lam = check_lam("regularization.lam", lam)
    layers = _as_list("regularization.layers", layers)
    exclude = _as_list("regularization.exclude", exclude)
    types = _as_list("regularization.types", types)
    per_layer = {str(k): check_lam(f"regularization.lam_per_layer.{k}", v)
                 for k, v in (lam_per_layer or {}).items()}
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
    names = ", ".join(candidates) or "(none)"
    known_types = sorted({type(m).__name__ for m in candidates.values()})
    for t in types:
        if not hasattr(nn, t) or not isinstance(getattr(nn, t), type):
            raise ConfigError(
                f"regularization.types: {t!r} is not a torch.nn layer class; "
                f"this model's weighted layer classes are {known_types}."
            )
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
        if type(module).__name__ not in types:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in layers):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if module.weight.numel() < min_params:
            continue
        layer_lam = next((v for k, v in per_layer.items() if fnmatch.fnmatchcase(name, k)), lam)
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


class L2Penalty(nn.Module):
    """(λ/n) Σ ||W_l||_F² over the selected layers, with n chosen by ``normalize``.

    ``normalize``: ``batch`` (the note: n = examples in this mini-batch), ``dataset`` (n = N, the
    training-set size, so the penalty does not depend on the batch size), ``none`` (n = 1, as
    Keras). It holds no parameters of its own: it reads the model's.
    """

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
        # (L,) for one network; (L, K) for K stacked networks (``stacked``), whose selected weights
        # carry a leading K dimension and whose penalty is then a vector of K values.
        lams = torch.tensor([s.lam for s in selected]) if lams is None else lams
        self.stacked = lams.dim() == 2
        self.register_buffer("lams", lams, persistent=False)
        # a stack whose networks differ: (L, K) 1.0/0.0, whether network k penalises layer l's
        # bias (x + 1.0·y and x + 0.0·y are exactly x + y and x); per network its normalize
        self.bias_mask = bias_mask
        self.normalizes = list(normalizes) if normalizes and len(set(normalizes)) > 1 else None
        for n in self.normalizes or ():
            if n not in NORMALIZE:
                raise ConfigError(
                    f"regularization.normalize must be one of {list(NORMALIZE)}, got {n!r}.")

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

    def _sq(self, p: torch.Tensor) -> torch.Tensor:
        """Σ p² over one network's tensor: a scalar, or K of them for a stacked tensor (on CPU
        one sum per network: a large sum's threading depends on its size, and network k's value
        must not depend on how many networks share the stack)."""
        if not self.stacked:
            return p.pow(2).sum()
        if p.device.type == "cpu":
            return torch.stack([w.pow(2).sum() for w in p.unbind(0)])  # O(K) backward
        return p.pow(2).flatten(1).sum(1)

    def sq_norms(self) -> torch.Tensor:
        """||W_l||_F² (plus ||b_l||² when biases are penalised) per selected layer: (L,) or
        (L, K)."""
        if self.bias_mask is None:
            return torch.stack([sum(self._sq(p) for p in s.params) for s in self.selected])
        mask = self.bias_mask.to(self.selected[0].weight)
        return torch.stack([self._sq(s.weight) if s.bias is None
                            else self._sq(s.weight) + mask[i] * self._sq(s.bias)
                            for i, s in enumerate(self.selected)])

    def weight_sq_norms(self) -> dict[str, torch.Tensor]:
        """||W_l||_F² of each selected layer's weight alone (the logged ``weights/sq_norm/*``)."""
        return {s.name: self._sq(s.weight.detach()) for s in self.selected}

    def forward(self, batch_size: int, lams: torch.Tensor | None = None) -> torch.Tensor:
        """The penalty, with the given λ ((L, K); default the penalty's own)."""
        w = self.selected[0].weight
        lams = (self.lams if lams is None else lams).to(device=w.device, dtype=w.dtype)
        divisor = self.divisor(batch_size)
        if torch.is_tensor(divisor):
            divisor = divisor.to(device=w.device, dtype=w.dtype)
        return (lams * self.sq_norms()).sum(0) / divisor

    def decay(self, batch_size: int, lams: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer weight decay 2λ/n equivalent to the penalty (float64; (L,) or (L, K))."""
        lams = self.lams if lams is None else lams
        return 2.0 * lams.double() / self.divisor(batch_size)

    def param_groups(self, model: nn.Module, batch_size: int) -> list[dict]:
        """Optimizer groups that apply the same penalty as weight decay (``mode=optimizer``).

        For L = (λ/n)||W||², ∂L/∂W = (2λ/n)·W, i.e. weight_decay = 2λ/n with n = the nominal batch
        size (or N, or 1). Every other parameter gets weight_decay = 0, so that no parameter is
        decayed twice or decayed without being selected.
        """
        n = self.divisor(batch_size)
        by_decay: dict[float, list[nn.Parameter]] = {}
        chosen: set[int] = set()
        for s in self.selected:
            for p in s.params:
                by_decay.setdefault(2.0 * s.lam / n, []).append(p)
                chosen.add(id(p))
        groups = [{"params": ps, "weight_decay": wd} for wd, ps in by_decay.items()]
        rest = [p for p in model.parameters() if id(p) not in chosen]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        return groups


def build_penalty(model: nn.Module, cfg: Mapping, dataset_size: int | None = None) -> L2Penalty:
    """Build the penalty from a ``regularization`` config node (validated here, before training)."""
    mode = cfg.get("mode", "loss")
    if mode not in MODES:
        raise ConfigError(f"regularization.mode must be one of {list(MODES)}, got {mode!r}.")
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
    return L2Penalty(selected, normalize=cfg.get("normalize", "batch"), dataset_size=dataset_size)

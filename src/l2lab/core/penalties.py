"""The penalties a ``regularization`` preset names by ``_target_``: L2 (the note), L1, elastic net.

Each is one class behind :class:`l2lab.core.regularization.Penalty`, which holds what they share:
the selection, λ per layer, the note's n of λ/n (``normalize``) and stacking. A class says only
its terms, so L1 against L2 "at their own best strength" is a condition like any other, swept on
the same ``regularization.lam`` axis. Over a mini-batch of n examples, for the selected layers:

    L2:          J = mean CCE + (λ/n)  Σ_l ||W_l||_F²                    (the note)
    L1:          J = mean CCE + (λ/n)  Σ_l ||W_l||_1,    ||W||_1 = Σ_ij |w_ij|
    ElasticNet:  J = mean CCE + (λ₁/n) Σ_l ||W_l||_1 + (λ₂/n) Σ_l ||W_l||_F²,
                 λ₁ = l1_ratio·λ, λ₂ = (1 − l1_ratio)·λ

(with ``lam_per_layer``, λ is the layer's own). Gradients w.r.t. a selected W: ∂(mean CCE)/∂W
plus (2λ/n)·W, (λ/n)·sign(W), (λ₁/n)·sign(W) + (2λ₂/n)·W (``tests/test_penalties.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from l2lab.core.regularization import Penalty, SelectedLayer
from l2lab.core.rules import check_ratio


class L2(Penalty):
    """(λ/n) Σ ||W_l||_F² over the selected layers, with n chosen by ``normalize``; logged as
    ``train/l2``.

    ``normalize``: ``batch`` (the note: n = examples in this mini-batch), ``dataset`` (n = N, the
    training-set size, so the penalty does not depend on the batch size), ``none`` (n = 1, as
    Keras). The one penalty with a weight-decay form (``mode=optimizer``): ∂/∂W of (λ/n)||W||² is
    (2λ/n)·W. It holds no parameters of its own: it reads the model's.
    """

    TERMS = ("l2",)
    MODES = ("loss", "optimizer")

    def terms(self, batch_size: int, lams: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"l2": self.weighted(self.sq_norms(), self.lams if lams is None else lams,
                                    batch_size)}

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


class L1(Penalty):
    """(λ/n) Σ ||W_l||_1 over the selected layers (the note's normalization, its norm swapped
    for Σ|w|); logged as ``train/l1``. Its gradient (λ/n)·sign(W) has no weight-decay form in
    torch's optimizers, so ``mode`` is ``loss`` only."""

    TERMS = ("l1",)

    def terms(self, batch_size: int, lams: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"l1": self.weighted(self.abs_norms(), self.lams if lams is None else lams,
                                    batch_size)}


class ElasticNet(Penalty):
    """λ₁·||W||_1 + λ₂·||W||_F² with the note's 1/n, logged as ``train/l1`` and ``train/l2``.

    One strength on the λ axis of L2 and L1: ``regularization.lam`` (λ, per layer with
    ``lam_per_layer``) is split by ``regularization.l1_ratio`` r in [0, 1] (default 0.5), as
    scikit-learn's ElasticNet: λ₁ = r·λ, λ₂ = (1 − r)·λ. r = 0 is L2 and r = 1 is L1 (same
    numbers up to rounding, with a zero term logged beside). Each network of a stack has its own
    r. ``mode`` is ``loss`` only (the L1 term has no weight-decay form).
    """

    TERMS = ("l1", "l2")

    def __init__(self, selected: list[SelectedLayer], normalize: str = "batch",
                 dataset_size: int | None = None, lams: torch.Tensor | None = None,
                 bias_mask: torch.Tensor | None = None,
                 normalizes: Sequence[str] | None = None,
                 l1_ratio: float | Sequence[float] = 0.5) -> None:
        super().__init__(selected, normalize, dataset_size, lams, bias_mask, normalizes)
        self.l1_ratio = l1_ratio  # a float, or one per network of a stack
        ratios = torch.tensor(l1_ratio if isinstance(l1_ratio, Sequence) else float(l1_ratio))
        self.register_buffer("l1_ratios", ratios, persistent=False)  # () or (K,)

    @classmethod
    def settings(cls, cfg: Mapping) -> dict[str, Any]:
        return {"l1_ratio": check_ratio(cfg.get("l1_ratio", 0.5))}

    @classmethod
    def stacked_settings(cls, penalties: Sequence[Penalty]) -> dict[str, Any]:
        return {"l1_ratio": [float(p.l1_ratio) for p in penalties]}  # type: ignore[attr-defined]

    def terms(self, batch_size: int, lams: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        lams = self.lams if lams is None else lams
        ratio = self.l1_ratios.to(device=lams.device, dtype=lams.dtype)
        return {"l1": self.weighted(self.abs_norms(), lams * ratio, batch_size),
                "l2": self.weighted(self.sq_norms(), lams * (1 - ratio), batch_size)}

"""Learning-rate schedules per network of a stack: torch's own ``lr_scheduler`` classes, one per
run of networks with equal optimizer settings.

Why one per run and not one over the stack: a stack's optimizer is one torch optimizer (all
networks share their settings) or a ``module.SegmentedOptimizer`` (one inner optimizer per run of
equal settings). A torch scheduler over an inner optimizer, whose one param group is its networks'
own, computes exactly the lrs that the same scheduler computes over an ordinary run's optimizer:
so a child of a stack follows its ordinary run's schedule bit for bit, from its own base lr.

The state is kept per network (:meth:`NetworkSchedulers.state_dict`: one entry per stack
position), so a stack's checkpoint splits into its members' (``run/checkpoints.py``) and merges
back (``stacked.merge_member_checkpoints``) as the optimizer state does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import lr_scheduler

#: optimizer -> its scheduler (the run layer builds it from the config's ``scheduler`` node).
MakeScheduler = Callable[[torch.optim.Optimizer], lr_scheduler.LRScheduler]


def scheduler_factory(name: str, settings: dict[str, Any], total: int) -> MakeScheduler | None:
    """optimizer -> the torch scheduler ``name`` with ``settings`` over ``total`` intervals (steps
    or epochs: the whole run); None for ``none``. The keys are those of ``conf/scheduler/*.yaml``
    (checked there: ``config/schema.validate``)."""
    s = dict(settings)
    if name == "none":
        return None
    if name == "cosine":
        warmup, start, eta_min = int(s["warmup"]), float(s["warmup_start_factor"]), \
            float(s["eta_min"])

        def cosine(opt: torch.optim.Optimizer) -> lr_scheduler.LRScheduler:
            anneal = lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup),
                                                    eta_min=eta_min)
            if not warmup:
                return anneal
            ramp = lr_scheduler.LinearLR(opt, start_factor=start, end_factor=1.0,
                                         total_iters=warmup)
            return lr_scheduler.SequentialLR(opt, [ramp, anneal], milestones=[warmup])
        return cosine
    if name == "step":
        return lambda opt: lr_scheduler.StepLR(opt, step_size=int(s["step_size"]),
                                               gamma=float(s["gamma"]))
    if name == "onecycle":
        # the peak is each network's own base lr; momentum stays the optimizer's (not cycled),
        # so that a resumed run's optimizer state is all the state there is
        return lambda opt: lr_scheduler.OneCycleLR(
            opt, max_lr=[float(g["lr"]) for g in opt.param_groups], total_steps=total,
            pct_start=float(s["pct_start"]), anneal_strategy=str(s["anneal_strategy"]),
            div_factor=float(s["div_factor"]), final_div_factor=float(s["final_div_factor"]),
            three_phase=bool(s["three_phase"]), cycle_momentum=False)
    raise ValueError(f"unknown scheduler {name!r}")


class NetworkSchedulers:
    """The schedule of every network of a stack: one torch scheduler per inner optimizer of a
    ``SegmentedOptimizer`` (``segments``: (a, b, inner optimizer) per run of networks [a, b)),
    or one over a plain optimizer shared by all ``k`` networks.

    Lightning steps it through ``L2Module.lr_scheduler_step`` and saves its :meth:`state_dict`
    in the checkpoint (``optimizer`` is what Lightning checks it is attached to)."""

    def __init__(self, optimizer: torch.optim.Optimizer, make: MakeScheduler, k: int,
                 segments: Sequence[tuple[int, int, torch.optim.Optimizer]] | None = None) -> None:
        self.optimizer = optimizer
        self.k = k
        runs = segments if segments is not None else [(0, k, optimizer)]
        self.parts = [(a, b, make(opt)) for a, b, opt in runs]

    def step(self) -> None:
        for _, _, s in self.parts:
            s.step()

    def lrs(self) -> list[float]:
        """Each network's lr now (what its optimizer steps with)."""
        return [float(s.optimizer.param_groups[0]["lr"]) for a, b, s in self.parts
                for _ in range(a, b)]

    def state_dict(self) -> dict[str, Any]:
        """One scheduler state per network (the same for the networks of one run), copied."""
        return {"networks": [copy.deepcopy(s.state_dict()) for a, b, s in self.parts
                             for _ in range(a, b)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each run's scheduler from its first network's state, and its optimizer's lr set to the
        lr that state last gave it: a rebuilt or resumed optimizer's param groups may hold the
        base lr (a ``SegmentedOptimizer`` loads its settings from the config), so the schedule
        would otherwise jump back to its start."""
        networks = state["networks"]
        for a, _, s in self.parts:
            s.load_state_dict(copy.deepcopy(networks[a]))
            for group, lr in zip(s.optimizer.param_groups, s.get_last_lr(), strict=True):
                group["lr"] = lr

    def at(self, positions: Sequence[int]) -> dict[str, Any]:
        """The state of the networks at stack ``positions`` (a smaller stack's, after some
        networks left)."""
        networks = self.state_dict()["networks"]
        return {"networks": [networks[p] for p in positions]}

"""PyTorch Lightning's private names that l2lab uses.

Checked against pytorch-lightning 2.6.6 (``pyproject.toml``: ``pytorch-lightning>=2.5,<2.7``).
"""

from __future__ import annotations

from typing import Any

CHECKED_WITH = "pytorch-lightning 2.6.6"


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The checkpoint dict Lightning would save now (loop state, optimizer states, callbacks),
    without writing it: a stack's ``last.ckpt`` per network is cut from it
    (``core/stacked.member_checkpoints``). Lightning has no public call that returns it."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def replace_optimizer(trainer: Any, optimizer: Any, scheduler: Any = None) -> None:
    """Give a running fit another optimizer (a stack that lost networks has new parameters,
    ``core/module.L2Module.remove``), and its schedule when the fit has one. The setter is
    public; that automatic optimization reads ``trainer.optimizers[0]`` anew at every step (not
    once per fit) is not, nor that the loops step and save whatever scheduler the strategy's
    ``lr_scheduler_configs`` hold at the time, so a test steps through them
    (``tests/test_compat.py``, ``tests/test_schedules.py``)."""
    trainer.strategy.optimizers = [optimizer]
    if scheduler is not None:
        trainer.strategy.lr_scheduler_configs[0].scheduler = scheduler

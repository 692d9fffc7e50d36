"""PyTorch Lightning's private names that l2lab uses.

Checked against pytorch-lightning 2.6.6 (``pyproject.toml``: ``pytorch-lightning>=2.5,<2.7``).
"""

from __future__ import annotations

from collections.abc import Callable
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


#: The callback hooks that Lightning's manual backward and optimizer step dispatch around each
#: step, and the module's (its ``on_before_optimizer_step`` is its own to call).
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad")
MODULE_STEP_HOOKS = ("on_before_backward", "backward", "on_after_backward")


def direct_steps(trainer: Any, module: Any) -> Callable[[int], None] | None:
    """Where Lightning's manual ``backward`` and ``optimizer.step`` would only dispatch hooks
    that nobody implements, a module may call ``loss.backward()`` and the torch optimizer itself
    (``L2Module.training_step``): one device (no DDP wrapper to sync), the 32-bit precision
    plugin (no autocast scaler to unscale), and no callback with a step hook. Then the hooks cost
    more than a small network's step. Returns what adds ``n`` such steps to
    ``trainer.global_step`` (as Lightning's wrapper counts them; the counter is private), or
    None: use Lightning's wrappers. ``module``'s own ``on_before_optimizer_step`` is its to
    call."""
    from pytorch_lightning import Callback, LightningModule
    from pytorch_lightning.plugins.precision import Precision
    from pytorch_lightning.strategies import SingleDeviceStrategy
    from pytorch_lightning.utilities.model_helpers import is_overridden

    if type(trainer.precision_plugin) is not Precision \
            or type(trainer.strategy) is not SingleDeviceStrategy \
            or any(is_overridden(h, c, Callback) for c in trainer.callbacks for h in STEP_HOOKS) \
            or any(is_overridden(h, module, LightningModule) for h in MODULE_STEP_HOOKS):
        return None
    return trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_by

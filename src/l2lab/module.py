"""The LightningModule: mean CCE + selective L2, and the per-epoch numbers the contract logs.

Kept thin on purpose: the penalty lives in ``regularization``, MLflow in ``tracking``. Per-step
values are accumulated on the device and turned into floats once per epoch, so the training step
never waits for the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from l2lab.regularization import L2Penalty


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


def nonfinite_message(epoch: int, m: dict[str, float]) -> str:
    """Why a run stopped: the epoch and the diverged numbers, and what to change."""
    return (f"non-finite loss at epoch {epoch}: train/loss={m['train/loss']} "
            f"(train/ce={m['train/ce']}, train/l2={m['train/l2']}); "
            "lower optimizer.lr or regularization.lam")


class L2Module(pl.LightningModule):
    """J = mean CCE + (λ/n)Σ||W||² (``mode=loss``), or mean CCE with the penalty applied by the
    optimizer as weight decay (``mode=optimizer``)."""

    def __init__(self, net: nn.Module, penalty: L2Penalty,
                 make_optimizer: Callable[[nn.Module, L2Penalty], torch.optim.Optimizer],
                 mode: str = "loss", batch_size: int = 64) -> None:
        super().__init__()
        self.net, self.penalty, self.make_optimizer = net, penalty, make_optimizer
        self.mode, self.batch_size = mode, batch_size
        self.epoch_metrics: dict[str, float] = {}  # last finished epoch's values, for the tracker
        self._val_metrics: dict[str, float] = {}
        self.test_metrics: dict[str, float] = {}
        self._sums: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.net, self.penalty)

    # -- accumulation on the device ------------------------------------------------------------
    def _add(self, key: str, value: torch.Tensor, n: int) -> None:
        v = value.detach() * n
        self._sums[key] = self._sums[key] + v if key in self._sums else v
        self._sums[f"{key}#n"] = self._sums.get(f"{key}#n", 0) + n

    def _means(self, prefix: str) -> dict[str, float]:
        """Epoch means of the accumulated values, fetched from the device in one transfer. Under
        DDP the sums and counts are first added over ranks (one collective)."""
        keys = [k for k in self._sums if k.startswith(prefix) and not k.endswith("#n")]
        if not keys:
            return {}
        if self.trainer.world_size > 1:
            sums = torch.stack([self._sums.pop(k) for k in keys])
            counts = torch.tensor([float(self._sums.pop(f"{k}#n")) for k in keys],
                                  dtype=sums.dtype, device=sums.device)
            sums, counts = self.trainer.strategy.reduce(
                torch.cat([sums, counts]), reduce_op="sum").split(len(keys))
            return dict(zip(keys, (sums / counts).tolist(), strict=True))
        means = torch.stack([self._sums.pop(k) / self._sums.pop(f"{k}#n") for k in keys])
        return dict(zip(keys, means.tolist(), strict=True))

    def _ce_step(self, batch, split: str) -> tuple[torch.Tensor, int]:
        """Mean CCE of the batch, and its n.

        A DDP shard comes as ``(x, y, n)``, n the global batch size; it returns ΣCCE over the
        shard × world/n with that n. DDP averages gradients over the ranks, which then gives
        exactly the gradient of the global batch's mean CCE (whatever the shard sizes, even 0),
        and every value accumulated with weight n is world × the shard's sum, so the sums added
        over ranks divided by the counts (world × n) are the 1-process means.
        """
        x, y = batch[0], batch[1]
        logits = self.net(x)
        hit = logits.detach().argmax(1) == y
        if len(batch) == 3:
            n = int(batch[2])
            scale = self.trainer.world_size / n
            self._add(f"{split}/acc", hit.float().sum() * scale, n)
            return F.cross_entropy(logits, y, reduction="sum") * scale, n
        ce = F.cross_entropy(logits, y)  # the note's (1/n)ΣCCE
        # accuracy as a device-side mean too (torchmetrics' bincount would sync on CUDA)
        self._add(f"{split}/acc", hit.float().mean(), len(y))
        return ce, len(y)

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ce, n = self._ce_step(batch, "train")
        if self.mode == "loss":
            l2 = self.penalty(n)
            loss = ce + l2
        else:  # the optimizer applies it; log the equivalent with the nominal n
            with torch.no_grad():
                l2 = self.penalty(self.batch_size)
            loss = ce
        self._add("train/ce", ce, n)
        self._add("train/l2", l2, n)
        return loss

    def on_train_epoch_end(self) -> None:
        m = self._means("train/")
        m["train/loss"] = m["train/ce"] + m["train/l2"]
        if not math.isfinite(m["train/loss"]):
            raise NonFiniteLossError(nonfinite_message(self.current_epoch, m))
        sq = self.penalty.weight_sq_norms()
        m.update({f"weights/sq_norm/{k}": v for k, v in
                  zip(sq, torch.stack(list(sq.values())).tolist(), strict=True)})
        m["weights/sq_norm_total"] = sum(m[f"weights/sq_norm/{k}"] for k in sq)
        m.update(self._val_metrics)  # val/* from this epoch's validation, which ran just before
        self._val_metrics = {}
        if "val/ce" in m:
            m["gap/ce"] = m["val/ce"] - m["train/ce"]
            m["gap/acc"] = m["train/acc"] - m["val/acc"]
        self.epoch_metrics = m

    # -- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        ce, n = self._ce_step(batch, "val")
        self._add("val/ce", ce, n)

    def on_validation_epoch_end(self) -> None:
        means = self._means("val/")
        if not self.trainer.sanity_checking:  # contract: no sanity-check values are logged
            self._val_metrics = means

    def test_step(self, batch, batch_idx: int) -> None:
        ce, n = self._ce_step(batch, "test")
        self._add("test/ce", ce, n)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._means("test/")

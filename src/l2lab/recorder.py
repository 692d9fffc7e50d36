"""The Lightning side of a run's record: per-epoch metrics buffered on their way to MLflow, and
the checkpoints that make every step logged exactly once across a kill and ``resume``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from l2lab import progress
from l2lab.tracking import RunTracker

FLUSH_EVERY_S = 5.0


class MetricBuffer:
    """One run's per-epoch metrics on their way to the store.

    Each ``log_batch`` is a SQLite transaction (~15-20 ms), so one per run per epoch dominated a
    sweep of small networks. Epochs wait here and go out together (every few seconds and at the
    end: the UI still shows live curves). Epochs the store already holds are skipped: a resumed
    run re-trains the epochs past its checkpoint, and every step is still logged exactly once.
    """

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self.pending: list[tuple[int, dict[str, float], int]] = []
        self.logged: set[int] = set()

    def add(self, epoch: int, metrics: Mapping[str, float], ts: int | None = None) -> None:
        if epoch not in self.logged:
            self.pending.append((int(epoch), dict(metrics), ts or int(time.time() * 1000)))

    def flush(self) -> None:
        if self.pending:
            self.tracker.log_epochs(self.pending)
            self.logged.update(e for e, _, _ in self.pending)
            self.pending = []


def _restore_pending(buffer: MetricBuffer, state: Mapping[str, Any] | None) -> None:
    """On resume: the epochs a checkpoint carried but the store may lack (a kill between saving
    the checkpoint and logging), then skip every epoch the store already has."""
    if state is None:
        return
    buffer.logged = buffer.tracker.logged_steps("train/loss")
    pending = state.get("pending")
    if pending is None and state.get("last"):  # checkpoints written before buffering
        pending = [(*state["last"], None)]
    for epoch, metrics, ts in pending or []:
        buffer.add(epoch, metrics, ts)
    buffer.flush()


def _due(trainer: pl.Trainer, since: float, every_s: float) -> bool:
    last = trainer.current_epoch >= (trainer.max_epochs or 0) - 1 or trainer.should_stop
    return last or time.monotonic() - since >= every_s


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class EpochRecorder(pl.callbacks.Checkpoint):
    """Every epoch's metrics (``step = epoch``) into the run's buffer; every ``flush_every_s`` and
    at the last epoch: ``last.ckpt`` first, then the buffered metrics; on an error or interrupt:
    the buffered metrics (the weights are mid-epoch then, so no checkpoint).

    It is a ``Checkpoint`` so that Lightning calls it after the module's ``on_train_epoch_end``
    (where the epoch's numbers are made) and adds no checkpoint callback of its own. The buffered
    epochs travel inside the checkpoint: a run killed between the save and the logging logs them
    on resume, so every step is logged exactly once.
    """

    def __init__(self, tracker: RunTracker, ckpt_path: Path, echo: bool = True,
                 flush_every_s: float = FLUSH_EVERY_S) -> None:
        self.tracker, self.ckpt_path, self.echo = tracker, Path(ckpt_path), echo
        self.buffer, self.flush_every_s = MetricBuffer(tracker), float(flush_every_s)
        self.last: tuple[int, dict[str, float]] | None = None
        self._restored: dict[str, Any] | None = None
        self._flushed_at = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last, "pending": list(self.buffer.pending)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last, self._restored = state_dict.get("last"), state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _restore_pending(self.buffer, self._restored)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, metrics = trainer.current_epoch, dict(pl_module.epoch_metrics)
        self.last = (epoch, metrics)
        self.buffer.add(epoch, metrics)
        if self.echo:
            shown = ("train/ce", "train/l2", "val/ce", "gap/ce", "val/acc")
            parts = [f"{k}={metrics[k]:.4f}" for k in shown if k in metrics]
            progress.echo(f"epoch {epoch:3d}  " + "  ".join(parts))  # above a live bar
        # under DDP every rank must take the same decision (saving is collective): rank 0's
        if trainer.strategy.broadcast(_due(trainer, self._flushed_at, self.flush_every_s)):
            trainer.save_checkpoint(self.ckpt_path.with_suffix(".tmp"), weights_only=False)
            if trainer.is_global_zero:  # the only rank that writes it
                os.replace(self.ckpt_path.with_suffix(".tmp"), self.ckpt_path)
            self.buffer.flush()
            self._flushed_at = time.monotonic()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.buffer.flush()


class StackedRecorder(pl.callbacks.Checkpoint):
    """``EpochRecorder`` for K stacked networks, one MLflow run each.

    A network that diverges has its run ended FAILED at once, with its reason, while the others
    train on. Checkpoints are written per network in the ordinary format
    (``make_checkpoints``), so ``resume=RUN_ID`` continues any of them alone, the ordinary way.
    """

    def __init__(self, trackers: list[RunTracker], ckpt_paths: list[Path],
                 make_checkpoints: Callable[[pl.Trainer, list], list[dict]],
                 flush_every_s: float = FLUSH_EVERY_S) -> None:
        self.trackers, self.ckpt_paths = trackers, [Path(p) for p in ckpt_paths]
        self.make_checkpoints, self.flush_every_s = make_checkpoints, float(flush_every_s)
        self.buffers = [MetricBuffer(t) for t in trackers]
        self.last: list[tuple[int, dict[str, float]] | None] = [None] * len(trackers)
        self._flushed_at = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        for k, metrics in enumerate(pl_module.epoch_metrics):
            if metrics is not None and not self.trackers[k].ended:
                self.last[k] = (epoch, metrics)
                self.buffers[k].add(epoch, metrics)
        for k, reason in pl_module.failures.items():
            if not self.trackers[k].ended:
                self.buffers[k].flush()
                self.trackers[k].finish("FAILED", failure=f"NonFiniteLossError: {reason}")
        if _due(trainer, self._flushed_at, self.flush_every_s):
            live = [k for k, t in enumerate(self.trackers) if not t.ended]
            states = [{"last": self.last[k], "pending": list(self.buffers[k].pending)}
                      if k in live else None for k in range(len(self.trackers))]
            for k, ckpt in enumerate(self.make_checkpoints(trainer, states)):
                if k in live:
                    save_atomic(ckpt, self.ckpt_paths[k])
            for k in live:
                self.buffers[k].flush()
            self._flushed_at = time.monotonic()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        for b in self.buffers:
            b.flush()

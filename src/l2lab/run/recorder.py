"""The Lightning side of a run's record: per-epoch metrics buffered on their way to MLflow, and
the checkpoints that make every step logged exactly once across a kill and ``resume``.

One recorder serves every stack, one network or K: each network has its own run, buffer and
``last.ckpt`` (in the format of a stack of one, so ``resume=RUN_ID`` continues any of them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from l2lab import metrics as mt
from l2lab.console import log
from l2lab.run import lifecycle, progress
from l2lab.run.checkpoints import member_checkpoints, stack_checkpoint
from l2lab.tracking.tracker import RunTracker

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

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """On resume: the epochs a checkpoint carried but the store may lack (a kill between
        saving the checkpoint and logging), then skip every epoch the store already has."""
        self.logged = self.tracker.logged_steps(mt.TRAIN_LOSS)
        for epoch, metrics, ts in (state or {}).get("pending") or []:
            self.add(epoch, metrics, ts)
        self.flush()

    def flush(self) -> None:
        if self.pending:
            self.tracker.log_epochs(self.pending)
            self.logged.update(e for e, _, _ in self.pending)
            self.pending = []


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Recorder(pl.callbacks.Checkpoint):
    """Every epoch's metrics (``step = epoch``) into each network's buffer; every
    ``flush_every_s`` and at the last epoch: each network's ``last.ckpt`` first, then the
    buffered metrics. Between saves the last completed epoch's checkpoint is kept in memory (one
    copy of the stack's tensors), and on an error or interrupt it is written with the buffered
    metrics: a run stopped at any point resumes from its last completed epoch. A network that
    diverges has its run ended FAILED at once, with its reason, while the others train on.

    It is a ``Checkpoint`` so that Lightning calls it after the module's ``on_train_epoch_end``
    (where the epoch's numbers are made) and adds no checkpoint callback of its own. The buffered
    epochs travel inside the checkpoint: a run killed between the save and the logging logs them
    on resume, so every step is logged exactly once.
    """

    def __init__(self, trackers: Sequence[RunTracker], ckpt_paths: Sequence[Path], *,
                 echo: bool = False, flush_every_s: float = FLUSH_EVERY_S,
                 writer: Any = None) -> None:
        self.trackers, self.ckpt_paths = list(trackers), [Path(p) for p in ckpt_paths]
        self.writer = writer  # bulk.RunWriter: every run's epochs in one store call
        self.echo, self.flush_every_s = echo, float(flush_every_s)
        self.buffers = [MetricBuffer(t) for t in self.trackers]
        self.last: list[tuple[int, dict[str, float]] | None] = [None] * len(self.trackers)
        self._restored: list[dict[str, Any]] | None = None
        self._flushed_at = time.monotonic()
        self._snapshot: tuple[dict, list, list] | None = None  # the last epoch's, not yet on disk

    def _state(self, k: int) -> dict[str, Any]:
        return {"last": self.last[k], "pending": list(self.buffers[k].pending)}

    def state_dict(self) -> dict[str, Any]:  # a stack of one's own state (member checkpoints)
        return self._state(0) if len(self.trackers) == 1 else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run (a stack of one) gets its checkpoint's recorder state here; a stack of
        resumed runs (``stacked.merge_member_checkpoints``) each network's, under ``members``."""
        members = state_dict.get("members") or [state_dict]
        for k, state in enumerate(members[:len(self.last)]):
            self.last[k] = state.get("last")
        self._restored = members

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for k, state in enumerate(self._restored or []):
            self.buffers[k].restore(state)
        for k, buffer in enumerate(self.buffers):  # continued without a checkpoint: from
            if getattr(self.trackers[k], "reopened", False) and not buffer.logged:  # scratch
                buffer.logged = self.trackers[k].logged_steps(mt.TRAIN_LOSS)

    def _due(self, trainer: pl.Trainer) -> bool:
        last = trainer.current_epoch >= (trainer.max_epochs or 0) - 1 or trainer.should_stop
        return last or time.monotonic() - self._flushed_at >= self.flush_every_s

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        for k, metrics in enumerate(pl_module.epoch_metrics):
            if metrics is not None and not self.trackers[k].ended:
                self.last[k] = (epoch, metrics)
                self.buffers[k].add(epoch, metrics)
        if len(self.trackers) == 1 and pl_module.epoch_metrics and pl_module.epoch_metrics[0]:
            m = pl_module.epoch_metrics[0]
            text = f"epoch {epoch:3d}  " + mt.shown(m, mt.EPOCH_LINE)
            if self.echo:
                progress.echo(text)  # above a live progress bar
            log.info(text)  # the run's train.log, in a sweep too (Hydra's job log: file only)
        for k, reason in pl_module.failures.items():
            if not self.trackers[k].ended:
                self.buffers[k].flush()
                self.trackers[k].finish("FAILED", failure=f"NonFiniteLossError: {reason}")
        # under DDP every rank must take the same decision: rank 0's
        due = trainer.strategy.broadcast(self._due(trainer))
        live = [k for k, t in enumerate(self.trackers) if not t.ended]
        with lifecycle.held():  # a Ctrl-C now waits for the epoch's record to be whole
            if trainer.is_global_zero:  # the only rank that writes
                states = [self._state(k) if k in live else None for k in range(len(self.last))]
                slots = list(pl_module.slots)  # which network each stack position holds
                if due:
                    ckpts = member_checkpoints(trainer, states, self.state_key, slots=slots)
                    for k in live:
                        save_atomic(ckpts[k], self.ckpt_paths[k])
                    self._snapshot = None
                else:  # kept in memory: written if training stops before the next save
                    self._snapshot = (stack_checkpoint(trainer), states, slots)
            if due:
                self._flush(live)
                self._flushed_at = time.monotonic()

    def _flush(self, ks: Sequence[int]) -> None:
        """The buffered epochs of networks ``ks``: with a group writer, one store call for all
        of them (whole epochs, so a kill never leaves one half logged)."""
        if self.writer is None:
            for k in ks:
                self.buffers[k].flush()
            return
        pending = {self.trackers[k].run_id: self.buffers[k].pending for k in ks
                   if self.buffers[k].pending}
        if pending:
            self.writer.log_metrics(pending)
        for k in ks:
            self.buffers[k].logged.update(e for e, _, _ in self.buffers[k].pending)
            self.buffers[k].pending = []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """A stop or an error mid-training: the last completed epoch's checkpoint (from the
        in-memory snapshot, when it is newer than the file) and its metrics, so that nothing
        trained is lost and ``resume`` continues from exactly there."""
        with lifecycle.held():  # a second Ctrl-C waits the few milliseconds this takes
            live = [k for k, t in enumerate(self.trackers) if not t.ended]
            if self._snapshot is not None and trainer.is_global_zero:
                base, states, slots = self._snapshot
                ckpts = member_checkpoints(trainer, states, self.state_key, base=base,
                                           slots=slots)
                for k in live:
                    if ckpts[k] is not None:
                        save_atomic(ckpts[k], self.ckpt_paths[k])
                self._snapshot = None
            self._flush(live)

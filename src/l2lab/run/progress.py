"""A live progress line while a run or a stack of runs trains: epoch i/N, the jobs in the stack,
elapsed time and ETA.

On a terminal it is a tqdm bar that updates in place; anywhere else (a CI log, a file, a
notebook's captured output) a plain line every ``EVERY_S`` seconds, which also goes to the run's
``train.log`` through the ``l2lab`` logger. ``L2LAB_PROGRESS=0`` switches it off (the tests do),
``L2LAB_PROGRESS=1`` forces the plain lines on, and ``L2LAB_PROGRESS_EVERY_S`` sets their period.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

import pytorch_lightning as pl
from tqdm import tqdm
from tqdm.std import tqdm as std_tqdm

from l2lab.console import log

ENV = "L2LAB_PROGRESS"
EVERY_ENV = "L2LAB_PROGRESS_EVERY_S"
EVERY_S = 10.0
_ACTIVE: list[tqdm] = []  # the live bar, so that other lines are written above it


#: The vectorized sweep this process trains, stack after stack: its job count, when it started,
#: and the jobs and stacks done, so that each stack's line places it in the whole sweep.
SWEEP: dict[str, float] = {}


def sweep_started(jobs: int) -> None:
    SWEEP.clear()
    SWEEP.update(jobs=int(jobs), started=time.monotonic(), done=0, stacks=0)


def sweep_eta(jobs_done: float) -> str:
    """The whole sweep's ETA from its rate so far (jobs done, counting a stack's part-way)."""
    elapsed = time.monotonic() - SWEEP["started"]
    if jobs_done <= 0:
        return "?"
    return std_tqdm.format_interval(elapsed / jobs_done * (SWEEP["jobs"] - jobs_done))


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("0", "false", "no", "off")


def echo(text: str) -> None:
    """Print a line without breaking a live bar (tqdm writes it above the bar)."""
    if _ACTIVE:
        _ACTIVE[-1].write(text)
    else:
        print(text, flush=True)


def line(label: str, epoch: int, total: int, jobs: int, elapsed: float, start: int = 0) -> str:
    """``l2lab: lam=0.1 seed=0: epoch 12/40, 1 job, 00:07 elapsed, ETA 00:16`` (the rate is of the
    epochs trained since ``start``: a resumed run starts part-way)."""
    fmt = std_tqdm.format_interval
    eta = elapsed / (epoch - start) * (total - epoch) if epoch > start else float("nan")
    jobs_text = f"{jobs} job{'s' * (jobs != 1)} in the stack" if jobs > 1 else "1 job"
    eta_text = fmt(eta) if eta == eta else "?"
    return (f"l2lab: {label}: epoch {epoch}/{total}, {jobs_text}, {fmt(elapsed)} elapsed, "
            f"ETA {eta_text}")


class Progress(pl.Callback):
    """Lightning callback for the progress of one fit (a single run, or a stack of K jobs)."""

    def __init__(self, label: str, jobs: int, total_epochs: int, *, stream: TextIO | None = None,
                 every_s: float | None = None) -> None:
        self.label, self.jobs, self.total = label, int(jobs), int(total_epochs)
        self.stream = stream or sys.stderr
        self.every_s = float(os.environ.get(EVERY_ENV, every_s if every_s is not None
                                            else EVERY_S))
        forced = os.environ.get(ENV, "").strip() == "1"
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and not forced
        self.bar: tqdm | None = None
        self.started = self.last_line = 0.0
        self.done = self.start = 0

    def _rank0(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero

    def _in_sweep(self) -> bool:
        return bool(SWEEP) and self.label.startswith("stack ")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._rank0(trainer):
            return
        if self._in_sweep():  # "stack 2, jobs 17-32 of 45" rather than this group's "1/1"
            SWEEP["stacks"] += 1
            first = int(SWEEP["done"]) + 1
            self.label = (f"stack {int(SWEEP['stacks'])}, jobs {first}-"
                          f"{first + self.jobs - 1} of {int(SWEEP['jobs'])}")
        self.started = self.last_line = time.monotonic()
        self.done = self.start = trainer.current_epoch  # a resumed run starts part-way
        if self.tty:
            jobs = f" ×{self.jobs}" if self.jobs > 1 else ""
            self.bar = tqdm(total=self.total, initial=self.done, desc=f"l2lab: {self.label}{jobs}",
                            unit="epoch", file=self.stream, dynamic_ncols=True, leave=False)
            _ACTIVE.append(self.bar)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._rank0(trainer):
            return
        self.done = trainer.current_epoch + 1
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
        if now - self.last_line >= self.every_s and self.done < self.total:
            text = line(self.label, self.done, self.total, self.jobs, now - self.started,
                        self.start)
            if self._in_sweep():
                part = self.jobs * (self.done - self.start) / max(self.total - self.start, 1)
                text += f", sweep ETA {sweep_eta(SWEEP['done'] + part)}"
            if self.bar is None:
                print(text, file=self.stream, flush=True)
            log.info(text)  # train.log, whether or not the console shows the line
            self.last_line = now

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if self.bar in _ACTIVE:
                _ACTIVE.remove(self.bar)
            self.bar = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        if self._in_sweep() and self._rank0(trainer):
            SWEEP["done"] += self.jobs

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close()


def callbacks(label: str, jobs: int, total_epochs: int) -> list[pl.Callback]:
    """``[Progress(...)]``, or ``[]`` when ``L2LAB_PROGRESS=0``: for a Trainer's callbacks."""
    return [Progress(label, jobs, total_epochs)] if enabled() else []

"""What a run is, decided once, before anything trains: one :class:`Plan` from :func:`plan`.

``train`` used to tell a continued sweep's job, ``resume=RUN_ID``, ``reuse=true`` and a fresh run
apart as it went, with a ``Job``, a dict or an MLflow ``Run`` in one variable. Here the order of
precedence is written once, and the answer is one type whose ``kind`` says which case it is:

- ``fresh``: a new run trains from the start.
- ``resumed``: an existing run trains on as the same MLflow run from its last checkpoint
  (``resume=RUN_ID`` with its logged epochs, or a stopped job of a continued sweep).
- ``continued``: a new run continues an old one to more epochs (``resume=RUN_ID
  trainer.max_epochs=M``; the new run is tagged ``l2lab.continued_from``, :mod:`.resume`).
- ``reused``: ``reuse=true`` and a FINISHED run of the same config exists; nothing trains.
- ``done``: nothing to train: a FINISHED run resumed without more epochs, or a continued sweep's
  FINISHED or FAILED job (kept as it is).

Planning only reads runs (it may create the experiment, to look in it): the resumed run is
reopened, the continued one's history copied and the reused one listed when ``train`` acts on
the plan. The one thing it writes is a continued run's new folder, with the checkpoint it
continues from.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, open_dict

from l2lab.base import ConfigError, last_checkpoint
from l2lab.run import lifecycle
from l2lab.run.engine import Job, run_name
from l2lab.run.resume import CONTINUED_FROM, logged_config, resume_config, with_epochs
from l2lab.tracking import tracker as tr

Kind = Literal["fresh", "resumed", "continued", "reused", "done"]


@dataclass(frozen=True)
class Plan:
    """What one ``train`` call does. ``job`` is what trains (``None`` for ``reused`` and ``done``,
    which return ``metrics``, the existing run's final metrics, instead); ``source`` is the
    existing MLflow run the plan starts from (resumed, continued, reused or kept); ``note`` is
    the line that says what was decided ("" when there is nothing to say before training)."""

    kind: Kind
    name: str
    job: Job | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    source: Any = None
    note: str = ""


def plan(client, cfg: DictConfig, overrides: Sequence[str], output_dir: Path | None,
         sweep: Mapping | None, *, tags: Mapping[str, str] | None = None,
         label: Callable[[str], str] = str) -> Plan:
    """The plan of one job of config ``cfg`` (prepared: its tracking URI absolute). Precedence:
    a continued sweep's earlier run of the same config, then ``resume``, then ``reuse``, else a
    fresh run. ``label`` names a job in a sweep's lines (its job number and name)."""
    from l2lab.tracking import runs

    if sweep and sweep.get("continuing") and not cfg.resume:
        from l2lab.run.sweep import sweep_runs

        run = sweep_runs(client, sweep).get(runs.config_hash(cfg))
        if run is not None:  # else the job never started in the stopped sweep: it trains
            return _in_sweep(run, cfg, overrides, label)
    if cfg.resume:
        return _resume(client, cfg, overrides, output_dir)
    name = run_name(overrides, cfg, sweep.get("swept") if sweep else None)
    if cfg.get("reuse"):
        exp = tr.experiment_id(client, str(cfg.experiment_name), str(cfg.tracking.uri))
        found = runs.find_finished(client, exp, runs.config_hash(cfg))
        if found is not None:
            return Plan("reused", name, metrics=dict(found.data.metrics), source=found)
    return Plan("fresh", name, Job(cfg, list(overrides), new_dir(output_dir), name,
                                   dict(tags or {})))


def new_dir(output_dir: Path | None) -> Path:
    """A new run's folder: Hydra's output dir, or ``outputs/<timestamp>`` outside Hydra."""
    return Path(output_dir or Path("outputs") / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S-%f")).resolve()


def _in_sweep(run, cfg: DictConfig, overrides: Sequence[str],
              label: Callable[[str], str]) -> Plan:
    """A job of a continued sweep (the same command in the same sweep folder) whose earlier run
    exists. FINISHED or FAILED: kept, its final metrics returned. KILLED, or RUNNING (a process
    killed outright): the same run continues from its last completed epoch, or from the start
    when it stopped in its first (its logged epochs are not logged again)."""
    from l2lab import metrics as mt
    from l2lab.core.stacked import epochs_done

    rid, status = run.info.run_id, run.info.status
    name, metrics = run.data.tags.get("mlflow.runName", rid), dict(run.data.metrics)
    if status in ("FINISHED", "FAILED"):
        shown = mt.shown(metrics, mt.JOB_LINE)
        return Plan("done", name, metrics={**metrics, "val/ce": metrics.get("val/ce", math.nan)},
                    source=run,
                    note=f"l2lab: {label(name)}: kept run {rid[:8]} ({status})  {shown}".rstrip())
    out = Path(run.data.tags["l2lab.output_dir"])
    ckpt = last_checkpoint(out)
    done = epochs_done(ckpt)
    job = Job(cfg, list(overrides), out, name, reopened=True, ckpt=ckpt if done else None,
              logged_test="test/ce" in metrics)
    return Plan("resumed", name, job, source=run,
                note=f"l2lab: {name}: run {rid[:8]} continues from epoch {done} of "
                     f"{cfg.trainer.max_epochs} (was {status})")


def _resume(client, cfg: DictConfig, overrides: Sequence[str], output_dir: Path | None) -> Plan:
    """``resume=RUN_ID``: only ``trainer.max_epochs`` may differ from the logged config. With the
    logged epochs the same run trains on (or, FINISHED, nothing does); with more, a new run
    continues it (MLflow params are immutable); with fewer than it trained, an error."""
    from l2lab.core.stacked import epochs_done
    from l2lab.tracking.runs import resolve_run_id

    run = client.get_run(resolve_run_id(str(cfg.resume), str(cfg.tracking.uri), "resume"))
    rid, status = run.info.run_id, run.info.status
    name = run.data.tags.get("mlflow.runName", rid)
    logged = logged_config(client, rid)
    cfg = resume_config(cfg, overrides, logged)
    old_dir = Path(run.data.tags["l2lab.output_dir"])
    ckpt = last_checkpoint(old_dir)
    done, total = epochs_done(ckpt), int(cfg.trainer.max_epochs)
    if not done and status != "FINISHED":  # stopped in its first epoch: nothing to continue
        ckpt = None  # from; it trains from the start, as the same run
    planned = int(logged.trainer.max_epochs)
    old_overrides = yaml.safe_load(run.data.tags.get("l2lab.overrides", "[]")) or []
    if total == planned:
        if status == "FINISHED":
            return Plan("done", name, metrics=dict(run.data.metrics), source=run, note=(
                f"l2lab: run {rid} ({name}) is FINISHED: {done} of {done} epochs trained, "
                f"nothing to resume. To train it longer (as a new run that continues it): "
                f"{lifecycle.resume_command(rid)} trainer.max_epochs={done + 10}  "
                f"(any number > {done})"))
        job = Job(cfg, old_overrides, old_dir, name, reopened=True, ckpt=ckpt,
                  logged_test="test/ce" in run.data.metrics)
        return Plan("resumed", name, job, source=run,
                    note=f"l2lab: resuming run {rid} ({name}) from epoch {done} of {total} "
                         f"(was {status})")
    if total < done:
        raise ConfigError(
            f"resume: trainer.max_epochs={total} is fewer than the {done} epochs run {rid} has "
            f"trained; give a number > {done} to train it longer.")
    new_overrides = with_epochs(old_overrides, total)
    out = new_dir(output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        shutil.copyfile(ckpt, last_checkpoint(out))
    with open_dict(cfg):
        cfg.resume = None  # the new run's own config: what it trains, not how it started
    new_name = run_name(new_overrides, cfg)
    job = Job(cfg, new_overrides, out, new_name, tags={CONTINUED_FROM: rid},
              ckpt=last_checkpoint(out) if ckpt is not None else None)
    return Plan("continued", new_name, job, source=run,
                note=f"l2lab: continuing run {rid} ({name}, {status} after {done} epochs) as a "
                     f"new run trained to {total} epochs (its params say {planned})")

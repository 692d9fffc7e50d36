"""``resume=RUN_ID``: continue a run from its last per-epoch checkpoint, every step logged once.

Only ``trainer.max_epochs`` may differ from the logged config. With the logged number of epochs,
the same MLflow run continues (an interrupted run finishes what it was asked to train). With
another number, the run would no longer be what its params say (MLflow params are immutable), so
a new run continues it: it gets the old run's metric history, its own params, name and config
hash, the tag ``l2lab.continued_from`` (the old run gets ``l2lab.continued_by``), and trains on
from the checkpoint. ``reuse``, ``compare`` and ``load_runs`` then see the epochs each run trained.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from l2lab.base import ConfigError, last_checkpoint
from l2lab.console import say
from l2lab.core.stacked import epochs_done
from l2lab.run import lifecycle
from l2lab.run.engine import Job, run_name
from l2lab.tracking import tracker as tr

CONTINUED_FROM, CONTINUED_BY = "l2lab.continued_from", "l2lab.continued_by"


def logged_config(client, run_id: str) -> DictConfig:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "config/config.yaml", dst_path=tmp)
        return OmegaConf.create(yaml.safe_load(Path(path).read_text()))


def resume_config(cfg: DictConfig, overrides: Sequence[str], logged: DictConfig) -> DictConfig:
    """The logged config, with only ``trainer.max_epochs`` taken from this invocation (when it
    is given there: otherwise the run keeps its own). Any other difference is refused."""
    allowed = ("trainer.max_epochs", "resume", "reuse")
    given = tr.parse_overrides(overrides)
    wrong = []
    for key in given:
        if key in allowed or key.startswith(("hydra.", "tracking.")):
            continue
        now, then = OmegaConf.select(cfg, key), OmegaConf.select(logged, key)
        if isinstance(now, DictConfig | Mapping) or now != then:
            wrong.append(f"{key} (logged {then!r}, given {now!r})")
    if wrong:
        raise ConfigError(
            "resume: only trainer.max_epochs may differ from the resumed run's logged config; "
            f"these differ: {', '.join(wrong)}."
        )
    out = logged.copy()
    with open_dict(out):
        if "trainer.max_epochs" in given:
            out.trainer.max_epochs = cfg.trainer.max_epochs
        out.resume = cfg.resume
        out.tracking = cfg.tracking
    return out


def _with_epochs(overrides: Sequence[str], epochs: int) -> list[str]:
    kept = [o for o in overrides if tr.parse_overrides([o]) and
            next(iter(tr.parse_overrides([o]))) != "trainer.max_epochs"]
    return [*kept, f"trainer.max_epochs={epochs}"]


def continue_job(client, cfg: DictConfig, overrides: Sequence[str],
                 output_dir: Path | None) -> Job | dict[str, float]:
    """The job that continues run ``cfg.resume``, or its final metrics when there is nothing to
    train (a FINISHED run asked for no more epochs)."""
    from l2lab.tracking.runs import resolve_run_id

    run = client.get_run(resolve_run_id(str(cfg.resume), cfg.tracking.uri, "resume"))
    rid, name = run.info.run_id, run.data.tags.get("mlflow.runName", run.info.run_id)
    logged = logged_config(client, rid)
    cfg = resume_config(cfg, overrides, logged)
    old_dir = Path(run.data.tags["l2lab.output_dir"])
    ckpt = last_checkpoint(old_dir)
    done, total = epochs_done(ckpt), int(cfg.trainer.max_epochs)
    if not done and run.info.status != "FINISHED":  # stopped in its first epoch: nothing
        ckpt = None  # to continue from; it trains from the start, as the same run
    planned = int(logged.trainer.max_epochs)
    old_overrides = yaml.safe_load(run.data.tags.get("l2lab.overrides", "[]")) or []
    if total == planned:
        if run.info.status == "FINISHED":
            say(f"l2lab: run {rid} ({name}) is FINISHED: {done} of {done} epochs trained, "
                f"nothing to resume. To train it longer (as a new run that continues it): "
                f"{lifecycle.resume_command(rid)} trainer.max_epochs={done + 10}  "
                f"(any number > {done})")
            return dict(run.data.metrics)
        say(f"l2lab: resuming run {rid} ({name}) from epoch {done} of {total} "
            f"(was {run.info.status})")
        return Job(cfg, old_overrides, old_dir, name, tracker=tr.RunTracker.reopen(client, rid),
                   reopened=True,
                   ckpt=ckpt, logged_test="test/ce" in run.data.metrics)
    if total < done:
        raise ConfigError(
            f"resume: trainer.max_epochs={total} is fewer than the {done} epochs run {rid} has "
            f"trained; give a number > {done} to train it longer.")
    new_overrides = _with_epochs(old_overrides, total)
    new_dir = Path(output_dir or Path("outputs") / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S-%f")).resolve()
    (new_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        shutil.copyfile(ckpt, last_checkpoint(new_dir))
    with open_dict(cfg):
        cfg.resume = None  # the new run's own config: what it trains, not how it started
    job = Job(cfg, new_overrides, new_dir, run_name(new_overrides, cfg),
              tags={CONTINUED_FROM: rid},
              ckpt=last_checkpoint(new_dir) if ckpt is not None else None)
    say(f"l2lab: continuing run {rid} ({name}, {run.info.status} after {done} epochs) as a new "
        f"run trained to {total} epochs (its params say {planned})")
    return job


def copy_into(client, job: Job, source_id: str) -> None:
    """Once the new run exists: the old run's history into it, and a pointer both ways."""
    from l2lab.tracking.runs import copy_history

    # test/* is the continued run's own, measured once at its end
    copy_history(client, client.get_run(source_id), job.tracker.run_id, skip=("test/",))
    client.set_tag(source_id, CONTINUED_BY, job.tracker.run_id)


def from_where(ckpt: Path, logged: int) -> str:
    """Where a stopped run's resume starts, as its KILLED line says it: only a checkpoint that
    exists is named."""
    saved = epochs_done(ckpt)
    if not saved:
        return "; no epoch was completed, so it starts over" if not logged else \
            "; no checkpoint, so it starts over (the logged epochs are not logged twice)"
    return f", resumes from its checkpoint at epoch {saved}" if saved < logged else ""


def in_sweep(client, sweep: Mapping, cfg: DictConfig, overrides: Sequence[str],
             label=None) -> Job | dict[str, float] | None:  # noqa: ANN001
    """A job of a continued sweep (the same command in the same sweep folder): its earlier run,
    found by config hash among the sweep's children. FINISHED or FAILED: kept, its final metrics
    returned (nothing trains). KILLED, or RUNNING (a process killed outright): the same run
    continues from its last completed epoch. None: the job never started; it trains."""
    from l2lab.run.sweep import sweep_runs
    from l2lab.tracking import runs

    run = sweep_runs(client, sweep).get(runs.config_hash(cfg))
    if run is None:
        return None
    rid, name = run.info.run_id, run.data.tags.get("mlflow.runName", run.info.run_id)
    if run.info.status in ("FINISHED", "FAILED"):
        from l2lab.console import SHOWN

        shown = "  ".join(f"{k}={run.data.metrics[k]:.4f}" for k in SHOWN
                          if k in run.data.metrics)
        said = label(name) if label else name
        say(f"l2lab: {said}: kept run {rid[:8]} ({run.info.status})  {shown}".rstrip())
        return {**dict(run.data.metrics), "val/ce": run.data.metrics.get("val/ce", math.nan)}
    return stopped_job(client, run, cfg, overrides)


def stopped_job(client, run, cfg: DictConfig, overrides: Sequence[str]) -> Job:
    """The job that continues a stopped run as the same run: from its checkpoint, or from the
    start when it stopped in its first epoch (its logged epochs are not logged again)."""
    rid, name = run.info.run_id, run.data.tags.get("mlflow.runName", run.info.run_id)
    out = Path(run.data.tags["l2lab.output_dir"])
    ckpt = last_checkpoint(out)
    done = epochs_done(ckpt)
    say(f"l2lab: {name}: run {rid[:8]} continues from epoch {done} of "
        f"{cfg.trainer.max_epochs} (was {run.info.status})")
    return Job(cfg, list(overrides), out, name, tracker=tr.RunTracker.reopen(client, rid),
               reopened=True, ckpt=ckpt if done else None,
               logged_test="test/ce" in run.data.metrics)

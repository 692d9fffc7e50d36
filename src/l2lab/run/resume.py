"""``resume=RUN_ID``: continue a run from its last per-epoch checkpoint, every step logged once.

Only ``trainer.max_epochs`` may differ from the logged config. With the logged number of epochs,
the same MLflow run continues (an interrupted run finishes what it was asked to train). With
another number, the run would no longer be what its params say (MLflow params are immutable), so
a new run continues it: it gets the old run's metric history, its own params, name and config
hash, the tag ``l2lab.continued_from`` (the old run gets ``l2lab.continued_by``), and trains on
from the checkpoint. ``reuse``, ``compare`` and ``load_runs`` then see the epochs each run trained.

Which of these a ``resume`` is gets decided with every other kind of run in :mod:`.plan`; this
module holds the pieces that the plan and ``train`` use.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from l2lab.base import ConfigError
from l2lab.core.stacked import epochs_done
from l2lab.run.engine import Job
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
    schedule = OmegaConf.select(logged, "scheduler.name", default="none")
    if "trainer.max_epochs" in given and schedule != "none" and \
            cfg.trainer.max_epochs != logged.trainer.max_epochs:
        raise ConfigError(
            f"resume: trainer.max_epochs cannot change for a run on a schedule "
            f"(scheduler={schedule}, logged {logged.trainer.max_epochs} epochs, given "
            f"{cfg.trainer.max_epochs}): the schedule's length is the run's, and its state "
            "would go on past its end. Start a new run with the longer trainer.max_epochs."
        )
    out = logged.copy()
    with open_dict(out):
        if "trainer.max_epochs" in given:
            out.trainer.max_epochs = cfg.trainer.max_epochs
        out.resume = cfg.resume
        out.tracking = cfg.tracking
    return out


def with_epochs(overrides: Sequence[str], epochs: int) -> list[str]:
    """``overrides`` with ``trainer.max_epochs`` set to ``epochs`` (a continued run's own)."""
    kept = [o for o in overrides if tr.parse_overrides([o]) and
            next(iter(tr.parse_overrides([o]))) != "trainer.max_epochs"]
    return [*kept, f"trainer.max_epochs={epochs}"]


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

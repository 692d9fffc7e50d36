"""``python -m l2lab.train [overrides]``: one job, read as plan -> fit -> return.

``train(cfg)`` is a plain function (tests and ``reproduce`` call it; the package exports it as
``l2lab.train_run``): it plans the run (:mod:`l2lab.run.plan`: fresh, resumed, continued, reused or
nothing to do), returns at once when nothing trains, else fits the job with
:mod:`l2lab.run.engine` (build, fit, test, record: the same for an ordinary run, a stack of one,
and a vectorized sweep) and returns its final metrics. :func:`reported` is the failure policy of
the job's lines. ``hydra_main`` is the thin Hydra task that returns the sweep objective (final
``val/ce``).

This module imports only Hydra, OmegaConf and :mod:`l2lab.config.schema` at load time: ``--help``,
``--cfg`` and a bad key or value are answered in about a second, and torch, Lightning and MLflow
are imported once the config has passed :func:`l2lab.config.schema.validate`.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m l2lab.train: from the first import on, Ctrl-C is one line
    from l2lab.run.lifecycle import guard_startup

    guard_startup()

import functools
import json
import math
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from l2lab import metrics as mt
from l2lab.base import CONF_DIR, ConfigError
from l2lab.config import cli, schema
from l2lab.console import job_line, quiet_warnings, say
from l2lab.run.sweep import SWEEP_INFO
from l2lab.tracking import store

if TYPE_CHECKING:
    from l2lab.run.engine import Job
    from l2lab.run.plan import Plan

quiet_warnings()  # the known third-party ones (console.KNOWN_WARNINGS), before Hydra composes

Metrics = dict[str, float]


def train(cfg: DictConfig, *, overrides: Sequence[str] = (), output_dir: Path | None = None,
          tags: Mapping[str, str] | None = None) -> Metrics:
    """Train one configuration into one MLflow run and return its final metrics.

    Any failure after the run exists, a rejected config included, is recorded: FAILED with the
    tag ``l2lab.failure`` on errors, KILLED on Ctrl-C/SIGTERM; what was logged stays. With
    ``reuse=true`` a FINISHED run of the same config is returned instead of training (in a sweep,
    listed by a new child run tagged ``l2lab.reused_from``); ``resume=RUN_ID`` continues a run
    (:mod:`l2lab.run.resume`).
    """
    from l2lab.console import quiet_libraries
    from l2lab.run import engine
    from l2lab.run.plan import plan
    from l2lab.tracking import tracker as tr

    quiet_libraries()
    cfg = engine.prepared(cfg)
    uri = str(cfg.tracking.uri)
    client = tr.connect(uri)
    sweep = _sweep_info()
    todo = plan(client, cfg, overrides, output_dir, sweep, tags=tags, label=_job_label)
    if todo.note:
        say(todo.note)
    if todo.kind == "reused":
        return _list_reused(client, todo, overrides, sweep, tags)
    if todo.job is None:  # done: a kept sweep job, or a FINISHED run resumed with no more epochs
        return todo.metrics
    if todo.kind == "resumed":  # the same run again: RUNNING, its old failure reason gone
        todo.job.tracker = tr.RunTracker.reopen(client, todo.source.info.run_id)
    metrics = _fit(todo, client, sweep)
    job, rid = todo.job, todo.job.tracker.run_id
    epochs = int(job.cfg.trainer.max_epochs)
    from l2lab.run import lifecycle

    try:
        if sweep:
            say(job_line(_job_label(job.name), rid, epochs, metrics))
        else:
            say(_summary("FINISHED", rid, job.name, metrics, epochs, job.output_dir,
                         ui_url(client, rid, uri)))
    except lifecycle.Interrupted as e:  # the run is whole: say so, not "nothing recorded"
        say(f"\nl2lab: run {rid} FINISHED before the {e}; its record is complete.", err=True)
        e.l2lab_reported = True  # type: ignore[attr-defined]
        raise
    return metrics


def reported(fit: Callable[[Plan, object, dict | None], Metrics]
             ) -> Callable[[Plan, object, dict | None], Metrics]:
    """The failure policy of one job's lines, in one place. Ctrl-C/SIGTERM (the runs are already
    KILLED by the engine): alone, the line with the epochs logged, where a resume starts and the
    command that continues it; in a sweep, the job's one line (the sweep's own line says how to
    continue the whole sweep). Any other failure in a sweep: the job's FAILED line, once (the
    exception is marked so that ``hydra_main`` does not say it again). Everything is re-raised."""

    @functools.wraps(fit)
    def guarded(todo: Plan, client: object, sweep: dict | None) -> Metrics:
        from l2lab.run import lifecycle

        job = todo.job
        try:
            return fit(todo, client, sweep)
        except lifecycle.Interrupted as e:
            say(_killed_line(job, sweep, e), err=True)
            e.l2lab_reported = True  # type: ignore[attr-defined]
            raise
        except BaseException as e:
            if sweep and job.tracker is not None:
                say(f"l2lab: {_job_label(job.name)}: run {job.tracker.run_id[:8]} FAILED: {e}",
                    err=True)
                e.l2lab_reported = True  # type: ignore[attr-defined]
            raise

    return guarded


@reported
def _fit(todo: Plan, client: object, sweep: dict | None) -> Metrics:
    """Build, fit, test and record the plan's job (:func:`l2lab.run.engine.fit_jobs`)."""
    from l2lab.run import engine, resume

    def opened(job: Job) -> None:
        if todo.kind == "continued":  # the old run's history into the new one
            resume.copy_into(client, job, todo.source.info.run_id)
        if not sweep and job.ckpt is None or todo.kind == "continued":
            say(f"l2lab: run {job.tracker.run_id} ({job.name}) in experiment "
                f"{job.cfg.experiment_name!r}, {job.cfg.trainer.max_epochs} epochs")

    job = todo.job
    # In a sweep, one line per job instead of one per epoch keeps the table readable.
    engine.fit_jobs([job], sweep=sweep, echo=sweep is None, on_open=opened,
                    label=_job_label(job.name) if sweep else "run")
    if isinstance(job.result, BaseException):
        raise job.result
    return job.result


def _killed_line(job: Job, sweep: dict | None, e: BaseException) -> str:
    """What a job stopped by Ctrl-C/SIGTERM says: its run, the epochs it logged and, alone, how
    to continue it."""
    from l2lab.run import lifecycle, resume

    if job.tracker is None:  # stopped before its run was created (engine.fit_jobs opens it)
        if sweep:
            label = _job_label(job.name)
            return f"\nl2lab: {label}: stopped before its run was created ({e.reason})"
        return f"\n{lifecycle.nothing_recorded(e.signum)}"
    rid = job.tracker.run_id
    logged = len(job.tracker.logged_steps("train/loss"))
    epochs = job.cfg.trainer.max_epochs
    if sweep:
        return (f"\nl2lab: {_job_label(job.name)}: run {rid[:8]} KILLED after {logged} of "
                f"{epochs} epochs ({e.reason})")
    return (f"\nl2lab: run {rid} ({job.name}) KILLED after {logged} of {epochs} epochs "
            f"({e.reason}{resume.from_where(job.ckpt_path, logged)}); continue it with: "
            f"{lifecycle.resume_command(rid)}")


def _sweep_info() -> dict | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        path = Path(hc.sweep.dir) / SWEEP_INFO
    except ValueError:  # not inside a Hydra app
        return None
    return json.loads(path.read_text()) if path.exists() else None


def _job_label(name: str) -> str:
    """``#3 lam=0.01 seed=1`` in a sweep (Hydra's job number), the run name otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"#{HydraConfig.get().job.num} {name}"
    except (ValueError, AttributeError):
        return name


def ui_url(client, run_id: str, tracking_uri: str | None = None) -> str:
    """The run's page in the MLflow UI's training view: the tracking server's own UI, or
    ``make ui`` (127.0.0.1:5000) over a local store."""
    from l2lab.tracking import ui

    exp = client.get_run(run_id).info.experiment_id
    return ui.run_url(ui.ui_base(tracking_uri), exp, run_id)


def _summary(status: str, run_id: str, name: str, metrics: Mapping[str, float], epochs: int,
             output_dir: Path, url: str) -> str:
    shown = mt.shown(metrics, mt.RUN_LINE)
    return (f"l2lab: run {run_id} ({name}) {status} after {epochs} epochs: {shown}\n"
            f"       folder: {output_dir}\n       UI: {url}  (make ui)")


def _list_reused(client, todo: Plan, overrides: Sequence[str], sweep: dict | None,
                 tags: Mapping[str, str] | None) -> Metrics:
    """``reuse=true`` found a FINISHED run of the same config: no training. In a sweep a child
    run lists it (tag ``l2lab.reused_from``) so the sweep's table and figures include it."""
    from l2lab.tracking import runs

    found, metrics = todo.source, todo.metrics
    shown = mt.shown(metrics, mt.SUMMARY)
    src = found.info.run_id
    if sweep:
        listed = runs.list_reused(client, found, found.info.experiment_id, todo.name, {
            "l2lab.overrides": json.dumps(list(overrides)),
            "l2lab.sweep_id": sweep["sweep_id"], "mlflow.parentRunId": sweep["parent_run_id"],
            **(tags or {})})
        say(f"l2lab: {_job_label(todo.name)}: reused run {src[:8]} (FINISHED, same config; "
            f"listed as {listed[:8]})  {shown}")
    else:
        say(f"l2lab: reuse: run {src} ({found.data.tags.get('mlflow.runName', '')}) already "
            f"FINISHED with this config; not trained again.  {shown}\n"
            f"       UI: {ui_url(client, src, found.data.params.get('tracking.uri'))}")
    return metrics


def _error(message: str) -> None:
    say(f"l2lab: error: {message}", err=True)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    """The Hydra task: one job. Returns the sweep objective, the final val/ce (nan when the job
    failed, so that a sweep goes on and an Optuna study records the trial as failed)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from l2lab.run.lifecycle import Interrupted

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if not multirun:  # a single run's bad value or store: reported now, before heavy imports
        _check_now(cfg)
    try:
        metrics = train(cfg, overrides=list(hc.overrides.task),
                        output_dir=Path(hc.runtime.output_dir))
    except Interrupted as e:  # the runs are KILLED and the line printed: stop, as Ctrl-C does
        if multirun:
            raise  # past Hydra's launcher (not an Exception) to main(), which ends the sweep
        _stopped(e)
    except Exception as e:
        return _failed(e, multirun)
    return float(metrics.get("val/ce", math.nan))


def _check_now(cfg: DictConfig) -> None:
    """A single run's checks that need neither torch nor MLflow: the schema's ranges, a tracking
    server that answers, a ``resume`` prefix made the full run id. A failure exits 2 with one
    paragraph."""
    try:
        schema.validate(cfg)
        if (uri := store.resolve_uri(cfg.tracking.uri)).startswith(("http://", "https://")):
            store.probe_server(uri)
        if cfg.resume:  # a prefix, as the lines print it; a bad one said at once
            from omegaconf import open_dict

            from l2lab.tracking.runs import resolve_run_id

            with open_dict(cfg):
                cfg.resume = resolve_run_id(str(cfg.resume), uri, "resume")
    except ConfigError as e:
        _error(str(e))
        sys.exit(2)


def _failed(e: Exception, multirun: bool) -> float:
    """A job that failed (its run is FAILED already). In a sweep: its line once, and nan, so
    that the sweep goes on. Alone: a known failure (a rejected config, a non-finite loss) is one
    line and exit 2 or 1; anything else goes on as a traceback."""
    from l2lab.core.module import NonFiniteLossError
    from l2lab.tracking.tracker import one_line

    known = isinstance(e, ConfigError | NonFiniteLossError)
    if multirun:
        if not getattr(e, "l2lab_reported", False):
            _error(str(e) if known else f"job failed: {one_line(e)}")
        return math.nan
    if not known:
        raise e
    _error(str(e))
    sys.exit(2 if isinstance(e, ConfigError) else 1)


def _stopped(e: BaseException) -> None:
    """A single run's Ctrl-C/SIGTERM: exit 128 + signal with one line, the KILLED line when the
    run existed (said already), else that nothing was recorded."""
    from l2lab.run import lifecycle

    signum = getattr(e, "signum", signal.SIGINT)
    if not getattr(e, "l2lab_reported", False):
        say(f"\n{lifecycle.nothing_recorded(signum)}", err=True)
    sys.exit(128 + signum)


def main() -> None:
    """``python -m l2lab.train`` / ``l2lab-train``: unknown keys are refused (with the closest
    valid ones) before Hydra composes, so no run and no sweep starts on a typo. Ctrl-C at any
    point ends with one line and no traceback (``lifecycle``)."""
    from l2lab.run import lifecycle

    argv = sys.argv[1:]
    if not any(a in ("-m", "--multirun") for a in argv):
        try:
            with lifecycle.interrupts():
                _main(argv)
        except (lifecycle.Interrupted, KeyboardInterrupt) as e:
            _stopped(e)
        return
    _main(argv)


def _main(argv: list[str]) -> None:
    other = ("--hydra-help", "--shell-completion", "-sc", "--info",  # or another primary config:
             "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
    if not any(a.split("=")[0] in other for a in argv):
        try:
            cli.check_overrides(cli.cli_overrides(argv))
        except ConfigError as e:
            print(f"l2lab: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        if "--help" in argv or "-h" in argv:  # Hydra's own --help takes seconds (cli.help_text)
            print(cli.help_text([a for a in cli.cli_overrides(argv)
                                    if not a.startswith(("hydra/", "hydra."))]))
            return
    if not any(a in ("-m", "--multirun") for a in argv):
        hydra_main()
        return
    from l2lab.run import lifecycle, sweep

    try:
        with lifecycle.interrupts():  # also between jobs, and while a launcher waits
            hydra_main()
    except (lifecycle.Interrupted, KeyboardInterrupt) as e:
        sys.exit(sweep.stopped(getattr(e, "signum", signal.SIGINT)))


def program() -> None:
    """The console script: :func:`main` as the whole process (``lifecycle.run_as_program``)."""
    from l2lab.run.lifecycle import run_as_program

    run_as_program(main)


if __name__ == "__main__":
    program()

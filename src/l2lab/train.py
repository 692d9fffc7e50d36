"""``python -m l2lab.train [overrides]``: compose -> build -> fit -> record. One MLflow run per job.

``train(cfg)`` is a plain function (tests and ``reproduce`` call it directly); ``main`` is the thin
Hydra wrapper that returns the sweep objective (final ``val/ce``). The training itself is
:mod:`l2lab.run.engine`'s, the same for an ordinary run (a stack of one) and a vectorized sweep.

This module imports only Hydra, OmegaConf and :mod:`l2lab.config.schema` at load time: ``--help``,
``--cfg`` and a bad key or value are answered in about a second, and torch, Lightning and MLflow
are imported once the config has passed :func:`l2lab.config.schema.validate`.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig

from l2lab.base import CONF_DIR, ConfigError
from l2lab.config import cli, schema
from l2lab.console import job_line, say  # noqa: F401  (job_line re-exported)
from l2lab.run.engine import build_net, fit_configs  # noqa: F401  (public names, re-exported)
from l2lab.run.sweep import SWEEP_INFO
from l2lab.tracking import store

# conf/hydra/launcher/{ray,submitit_local}.yaml extend the plugins' schemas of the same name on
# purpose; Hydra warns about that on every composition.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")


def train(cfg: DictConfig, *, overrides: Sequence[str] = (), output_dir: Path | None = None,
          tags: Mapping[str, str] | None = None) -> dict[str, float]:
    """Train one configuration into one MLflow run and return its final metrics.

    Any failure after the run exists, a rejected config included, is recorded: FAILED with the
    tag ``l2lab.failure`` on errors, KILLED on Ctrl-C/SIGTERM; what was logged stays. With
    ``reuse=true`` a FINISHED run of the same config is returned instead of training (in a sweep,
    listed by a new child run tagged ``l2lab.reused_from``); ``resume=RUN_ID`` continues a run
    (:mod:`l2lab.run.resume`).
    """
    from l2lab.console import quiet_libraries
    from l2lab.run import engine, lifecycle, resume
    from l2lab.tracking import runs
    from l2lab.tracking import tracker as tr

    quiet_libraries()
    cfg = engine.prepared(cfg)
    client = tr.connect(cfg.tracking.uri)
    sweep = _sweep_info()
    found = resume.in_sweep(client, sweep, cfg, overrides, _job_label) \
        if sweep and sweep.get("continuing") and not cfg.resume else None
    if isinstance(found, dict):  # a continued sweep keeps the job's FINISHED or FAILED run
        return found
    if found is not None:  # a stopped job of a continued sweep: the same run, on from its
        job = found  # last completed epoch
    elif cfg.resume:
        job = resume.continue_job(client, cfg, overrides, output_dir)
        if isinstance(job, dict):
            return job
    else:
        name = engine.run_name(overrides, cfg, sweep.get("swept") if sweep else None)
        if cfg.get("reuse"):
            exp = tr.experiment_id(client, str(cfg.experiment_name), cfg.tracking.uri)
            found = runs.find_finished(client, exp, runs.config_hash(cfg))
            if found is not None:
                return _reuse(client, found, exp, name, overrides, sweep, tags)
        output_dir = Path(output_dir or Path("outputs") / datetime.now().strftime(
            "%Y-%m-%d_%H-%M-%S-%f")).resolve()
        job = engine.Job(cfg, list(overrides), output_dir, name, dict(tags or {}))

    def opened(job: engine.Job) -> None:
        if source := job.tags.get(resume.CONTINUED_FROM):
            resume.copy_into(client, job, source)
        if not sweep and job.ckpt is None or source:
            say(f"l2lab: run {job.tracker.run_id} ({job.name}) in experiment "
                f"{job.cfg.experiment_name!r}, {job.cfg.trainer.max_epochs} epochs")

    try:
        # In a sweep, one line per job instead of one per epoch keeps the table readable.
        engine.fit_jobs([job], sweep=sweep, echo=sweep is None, on_open=opened,
                          label=_job_label(job.name) if sweep else "run")
        if isinstance(job.result, BaseException):
            raise job.result
    except lifecycle.Interrupted as e:
        rid = job.tracker.run_id if job.tracker else "?"
        logged = len(job.tracker.logged_steps("train/loss")) if job.tracker else 0
        if sweep:  # the sweep's one line says how to continue the whole sweep
            say(f"\nl2lab: {_job_label(job.name)}: run {rid[:8]} KILLED after {logged} of "
                f"{job.cfg.trainer.max_epochs} epochs ({e.reason})", err=True)
            raise
        say(f"\nl2lab: run {rid} ({job.name}) KILLED after {logged} of "
            f"{job.cfg.trainer.max_epochs} epochs ({e.reason}"
            f"{resume.from_where(job.ckpt_path, logged)}); continue it with: "
            f"{lifecycle.resume_command(rid)}", err=True)
        raise
    except BaseException as e:
        if sweep and job.tracker is not None:  # the job's one line
            say(f"l2lab: {_job_label(job.name)}: run {job.tracker.run_id[:8]} FAILED: {e}",
                err=True)
            e.l2lab_reported = True  # type: ignore[attr-defined]
        raise
    metrics, rid = job.result, job.tracker.run_id
    epochs = int(job.cfg.trainer.max_epochs)
    if sweep:
        say(job_line(_job_label(job.name), rid, epochs, metrics))
    else:
        say(_summary("FINISHED", rid, job.name, metrics, epochs, job.output_dir,
                     ui_url(client, rid, job.cfg.tracking.uri)))
    return metrics


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
    shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in ("train/ce", "val/ce", "gap/ce", "test/acc")
                      if k in metrics)
    return (f"l2lab: run {run_id} ({name}) {status} after {epochs} epochs: {shown}\n"
            f"       folder: {output_dir}\n       UI: {url}  (make ui)")


def _reuse(client, found, exp: str, name: str, overrides: Sequence[str], sweep: dict | None,
           tags: Mapping[str, str] | None) -> dict[str, float]:
    """``reuse=true`` and a FINISHED run of the same config exists: no training. In a sweep a
    child run lists it (tag ``l2lab.reused_from``) so the sweep's table and figures include it."""
    from l2lab.tracking import runs

    metrics = dict(found.data.metrics)
    shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in ("train/ce", "val/ce", "gap/ce", "val/acc")
                      if k in metrics)
    src = found.info.run_id
    if sweep:
        listed = runs.list_reused(client, found, exp, name, {
            "l2lab.overrides": json.dumps(list(overrides)),
            "l2lab.sweep_id": sweep["sweep_id"], "mlflow.parentRunId": sweep["parent_run_id"],
            **(tags or {})})
        say(f"l2lab: {_job_label(name)}: reused run {src[:8]} (FINISHED, same config; listed as "
            f"{listed[:8]})  {shown}")
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
    try:
        metrics = train(cfg, overrides=list(hc.overrides.task),
                        output_dir=Path(hc.runtime.output_dir))
        return float(metrics.get("val/ce", math.nan))
    except Interrupted as e:  # the runs are KILLED and the line printed: stop, as Ctrl-C does
        if multirun:
            raise  # past Hydra's launcher (not an Exception) to main(), which ends the sweep
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        from l2lab.core.module import NonFiniteLossError
        from l2lab.tracking.tracker import one_line

        known = isinstance(e, ConfigError | NonFiniteLossError)
        if multirun:  # a failed job must not stop the sweep: it is a FAILED child run
            if not getattr(e, "l2lab_reported", False):
                _error(str(e) if known else f"job failed: {one_line(e)}")
            return math.nan
        if not known:
            raise
        _error(str(e))
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def main() -> None:
    """``python -m l2lab.train`` / ``l2lab-train``: unknown keys are refused (with the closest
    valid ones) before Hydra composes, so no run and no sweep starts on a typo."""
    argv = sys.argv[1:]
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


if __name__ == "__main__":
    main()

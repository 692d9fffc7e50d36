"""``hydra/launcher=vectorized``: a sweep's jobs trained as stacks of networks.

Jobs whose composed configs differ only in per-network settings (``stackable.STACKED``: seed,
every ``regularization`` key, the optimizer's hyperparameters, ``model.dropout``, gradient
clipping, an MLP's or CNN's layer widths) train together, as stacks of K networks in one
Lightning fit each (``l2lab.run.engine.fit_variants``; widths grouped by
``stackable.width_stacks``); every other job runs the ordinary way, in the same sweep.
Each job keeps its own output folder, ``.hydra/`` files, MLflow run and return value, so
sweepers, callbacks and ``compare`` see an ordinary sweep.

Per job, nothing costs more than microseconds: a job of a group is its composition plus its
values (``composing.JobValues``), its ``.hydra/`` documents are rendered from its composition's
templates, and its own config (~10 ms to derive, as much again to copy or dump) is made only if
something reads it: a callback with job hooks (then ``run_job``'s own bookkeeping, logging
included), a JobReturn's ``cfg``, ``hydra.job.chdir``, a sweep subdir other than the job number.

Where the stacks train (``l2lab.run.scaleout``): in this process, in job order; with several CUDA
devices (or ``workers=N``), on one worker process per device, in parallel; with
``backend=ray``, each stack as one Ray task. Jobs that cannot stack run here, after the stacks.

Hydra imports every module of ``hydra_plugins`` at start-up (``--help`` included): nothing heavy
is imported here until ``launch``. (Hydra executes plugin modules outside ``sys.modules``, so no
``from __future__ import annotations`` here: dataclasses would not find this module.)
"""

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from l2lab.compat.hydra import flush_loggers
from l2lab.compat.hydra_run_job import LOG_FILE, completed, has_job_hooks, record_job
from l2lab.config.composing import (
    JobValues,
    SweepConfigs,
    YamlTemplate,
    dump_yaml,
    to_yaml,
)
from l2lab.config.stackable import (
    group_key,
    member_lams,
    member_values,
    shape_key,
    task_config,
    valid_lams,
)
from l2lab.run.scaleout import Stack

__all__ = ["VectorizedLauncher", "group_key", "plan", "to_yaml"]

log = logging.getLogger(__name__)


@dataclass
class RayInitConf:
    address: Optional[str] = None  # noqa: UP045 (OmegaConf) null: a local Ray instance
    num_cpus: Optional[int] = None  # noqa: UP045 a local instance's CPUs; null: all


@dataclass
class RayConf:
    init: RayInitConf = field(default_factory=RayInitConf)
    # resources of one stack's task; num_gpus null: 1 with CUDA, else 0
    remote: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": None})


@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.l2lab_launchers.vectorized_launcher.VectorizedLauncher"
    max_models: Optional[int] = None  # noqa: UP045 (OmegaConf) networks per stack; null: what fits the device's memory
    workers: Optional[int] = None  # noqa: UP045 worker processes; null: one per CUDA device when there are several
    backend: str = "local"  # local (this machine's devices) or ray
    ray: RayConf = field(default_factory=RayConf)


ConfigStore.instance().store(group="hydra/launcher", name="l2lab_vectorized",
                             node=VectorizedLauncherConf, provider="l2lab")


def plan(keys: Sequence[str | None]) -> list[list[int]]:
    """Jobs (by position) grouped by key, in order of each group's first job; ``None`` alone."""
    groups: dict[str, list[int]] = {}
    out: list[list[int]] = []
    for i, key in enumerate(keys):
        if key is None:
            out.append([i])
        elif key in groups:
            groups[key].append(i)
        else:
            groups[key] = [i]
            out.append(groups[key])
    return out


#: What a job's hydra node holds of its own, beyond its group's composition.
HYDRA_JOB_KEYS = ("hydra.job.num", "hydra.job.id", "hydra.job.override_dirname",
                  "hydra.overrides.task", "hydra.runtime.output_dir")


@dataclass
class _Job:
    """One job of the batch: a member of a composition (no config of its own) or, where it has
    no member form, its own config."""

    num: int
    overrides: list[str]
    member: Optional[JobValues] = None  # noqa: UP045
    cfg: Optional[DictConfig] = None  # noqa: UP045 its own config, once made
    output_dir: Optional[str] = None  # noqa: UP045


@dataclass
class _CompositionCache:
    """What the members of one composition share, made once."""

    rep: DictConfig
    shape: Optional[str] = None  # noqa: UP045 stackable.shape_key (None: train alone)
    base: Optional[DictConfig] = None  # noqa: UP045 the task config (no hydra node)
    sweep_dir: Optional[str] = None  # noqa: UP045 None: a job's folder needs its config
    files: Any = None  # (config template, hydra template, output subdir, log files) or False


class VectorizedLauncher(Launcher):
    def __init__(self, max_models: int | None = None, workers: int | None = None,
                 backend: str = "local", ray: Any = None) -> None:
        super().__init__()
        if backend not in ("local", "ray"):
            raise ValueError(f"hydra.launcher.backend must be local or ray, got {backend!r}")
        self.max_models, self.workers, self.backend = max_models, workers, backend
        self.ray = OmegaConf.to_container(ray) if OmegaConf.is_config(ray) else dict(ray or {})
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self._compositions: dict[int, _CompositionCache] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        # shared with the sweeper: the launcher takes the jobs it composed, or derives them
        if not isinstance(hydra_context.config_loader, SweepConfigs):
            hydra_context.config_loader = SweepConfigs(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        loader = self.hydra_context.config_loader
        jobs = [_Job(initial_job_idx + i, list(ov), loader.member(self.config, list(ov)))
                for i, ov in enumerate(job_overrides)]
        groups = plan([self._key(job) for job in jobs])
        stacks = [g for g in groups if len(g) > 1]
        devices = self._devices(len(stacks))
        where = ("as Ray tasks" if self.backend == "ray" else
                 f"on {len(devices)} worker processes" if devices else "here")
        log.info(f"Launching {len(jobs)} jobs: {sum(map(len, stacks))} stacked in "
                 f"{len(stacks)} group(s), trained {where}; "
                 f"{len(jobs) - sum(map(len, stacks))} ordinary")
        returns: dict[int, JobReturn] = {}
        if self.backend == "local" and not devices:  # in this process, in job order
            from l2lab.run.progress import sweep_started

            sweep_started(sum(map(len, stacks)))  # each stack's line places it in the sweep
            for group in groups:
                if len(group) == 1:
                    returns[group[0]] = self._run(self._config(jobs[group[0]]))
                else:
                    for _, results in self._fit_groups(jobs, [group], devices):
                        self._record([jobs[i] for i in group], group, results, returns)
            return [returns[i] for i in range(len(jobs))]
        for s, results in self._fit_groups(jobs, stacks, devices):  # as each stack ends
            self._record([jobs[i] for i in stacks[s]], stacks[s], results, returns)
        for group in groups:
            if len(group) == 1:
                returns[group[0]] = self._run(self._config(jobs[group[0]]))
        return [returns[i] for i in range(len(jobs))]

    # -- a job without a config of its own -------------------------------------------------------
    def _group(self, member: JobValues) -> _CompositionCache:
        if member.composition not in self._compositions:
            g = self._compositions[member.composition] = _CompositionCache(member.rep)
            try:
                g.base = task_config(member.rep)
                g.shape = shape_key(OmegaConf.to_container(g.base, resolve=True))
            except Exception:  # an interpolation error is the ordinary path's to report
                g.shape = None
            sweep = OmegaConf.to_container(member.rep.hydra.sweep, resolve=False)
            if sweep.get("subdir") == "${hydra.job.num}" and "${hydra:" not in str(sweep):
                g.sweep_dir = str(member.rep.hydra.sweep.dir)
        return self._compositions[member.composition]

    def _key(self, job: _Job) -> str | None:
        """The job's stack (``stackable.group_key``), from its composition when a member."""
        if job.member is None:
            return group_key(self._config(job))
        values = job.member.values
        if not valid_lams(member_lams(values)):
            return None
        return self._group(job.member).shape

    def _config(self, job: _Job) -> DictConfig:
        """The job's own config (derived from its composition when a member: ~10 ms)."""
        if job.cfg is None:
            assert self.hydra_context is not None
            cfg = self.hydra_context.config_loader.take(self.config, job.overrides)
            with open_dict(cfg):
                cfg.hydra.job.id = cfg.hydra.job.num = job.num
            job.cfg = cfg
            if job.output_dir is not None:
                self._set_output_dir(cfg, job.output_dir)
        return job.cfg

    @staticmethod
    def _set_output_dir(cfg: DictConfig, output_dir: str) -> None:
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = output_dir  # as run_job sets it

    def _output_dir(self, job: _Job) -> str:
        """The job's folder, as run_job makes it."""
        if job.output_dir is None:
            g = self._group(job.member) if job.member is not None else None
            if g is not None and g.sweep_dir is not None:
                job.output_dir = os.path.abspath(Path(g.sweep_dir) / str(job.num))
            else:
                cfg = self._config(job)
                if "${hydra:" in str(OmegaConf.to_container(cfg.hydra.sweep)):  # that resolver
                    HydraConfig.instance().set_config(cfg)  # reads HydraConfig: set to this job
                job.output_dir = os.path.abspath(Path(str(cfg.hydra.sweep.dir)) /
                                                 str(cfg.hydra.sweep.subdir))
                self._set_output_dir(cfg, job.output_dir)
        return job.output_dir

    def _task(self, job: _Job) -> tuple[DictConfig, dict[str, Any]]:
        """(the job's config without ``hydra``, its values of the stacked keys)."""
        if job.member is not None:
            return self._group(job.member).base, job.member.values
        cfg = task_config(self._config(job))
        return cfg, member_values(cfg)

    def _overrides(self, job: _Job) -> list[str]:
        if job.member is not None:
            return list(job.member.task)
        return list(self._config(job).hydra.overrides.task)

    # -- where the stacks train -------------------------------------------------------------------
    def _devices(self, n_stacks: int) -> list[int | None]:
        """Worker processes' devices; none (train here) for one stack or one device."""
        if self.backend != "local" or n_stacks < 2:
            return []
        from l2lab.run.scaleout import worker_devices

        return worker_devices(self.workers)[:n_stacks]

    def _run(self, cfg: DictConfig, task: Any = None) -> JobReturn:
        """Hydra's own job bookkeeping (output folder, ``.hydra/``, callbacks, return value)."""
        overrides = " ".join(filter_overrides(cfg.hydra.overrides.task))
        log.debug(f"\t#{cfg.hydra.job.num} : {overrides}")
        ret = run_job(hydra_context=self.hydra_context, task_function=task or self.task_function,
                      config=cfg, job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _stack(self, jobs: list[_Job]) -> Stack:
        """What a worker needs to train these jobs: one config, each job's values, overrides and
        output folder (no job's own config)."""
        tasks = [self._task(job) for job in jobs]
        return Stack(tasks[0][0], [values for _, values in tasks],
                     [self._overrides(job) for job in jobs],
                     [self._output_dir(job) for job in jobs], [job.num for job in jobs])

    def _fit_groups(self, jobs: list[_Job], groups: list[list[int]],
                    devices: list[int | None]) -> Iterator[tuple[int, list]]:
        """Train the groups where this launcher is set to; per group as it ends, its results
        (per job its final metrics or the exception that ended it)."""
        from l2lab.run import scaleout
        from l2lab.run.sweep import SWEEP_INFO
        from l2lab.tracking.tracker import one_line

        info_path = Path(str(self.config.hydra.sweep.dir)) / SWEEP_INFO
        sweep = json.loads(info_path.read_text()) if info_path.exists() else None
        stacks = [self._stack([jobs[i] for i in g]) for g in groups]
        if self.backend == "ray":
            outcomes = scaleout.on_ray(stacks, self.ray, sweep, self.max_models)
        elif devices:
            outcomes = scaleout.on_workers(stacks, devices, sweep, self.max_models)
        else:
            outcomes = ((0, _here(stacks[0], sweep, self.max_models)),)
        for s, results in outcomes:
            if isinstance(results, BaseException):  # its runs are FAILED with the reason
                log.error(f"l2lab: a stacked group failed: {one_line(results)}")
                results = [results] * len(groups[s])
            yield s, results

    # -- Hydra's bookkeeping of a trained job -----------------------------------------------------
    def _record(self, jobs: list[_Job], group: list[int], results: list,
                returns: dict[int, JobReturn]) -> None:
        """Hydra's bookkeeping of each job of a trained group, its objective the final val/ce
        (each job's line, with its run id, was printed where the stack trained)."""
        assert self.hydra_context is not None
        values = [float(r.get("val/ce", math.nan)) if isinstance(r, dict) else math.nan
                  for r in results]
        hooks = has_job_hooks(self.hydra_context.callbacks)
        slow = False
        for i, job, value in zip(group, jobs, values, strict=True):
            files = None if hooks or job.member is None else self._files(job.member)
            if files:
                returns[i] = self._done_fast(job, files, value)
            else:
                returns[i] = self._done(self._config(job), value)
                slow = True
        flush_loggers()
        if slow:
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    def _files(self, member: JobValues) -> Any:
        """A composition's (config.yaml template, hydra.yaml template, output subdir, log file
        names), or False where a job needs ``run_job``'s own way: ``hydra.job.chdir``, or a log
        file named otherwise than ``<output dir>/<job name>.log``."""
        g = self._group(member)
        if g.files is None:
            rep = g.rep
            logging_cfg = OmegaConf.to_container(rep.hydra.job_logging, resolve=False) or {}
            names = [h.get("filename") for h in (logging_cfg.get("handlers") or {}).values()
                     if isinstance(h, dict) and "filename" in h]
            if rep.hydra.job.chdir or any(n != LOG_FILE for n in names) or g.base is None:
                g.files = False
            else:
                task = OmegaConf.to_container(g.base, resolve=False, enum_to_str=True)
                hydra = {"hydra": OmegaConf.to_container(rep.hydra, resolve=False,
                                                         enum_to_str=True)}
                subdir = rep.hydra.output_subdir
                g.files = (YamlTemplate(task, list(member.values)),
                           YamlTemplate(hydra, HYDRA_JOB_KEYS),
                           None if subdir is None else str(subdir),
                           [f"{rep.hydra.job.name}.log"] if names else [])
        return g.files

    def _done_fast(self, job: _Job, files: Any, value: float) -> JobReturn:
        """``run_job``'s record of a stacked job, from its composition's templates: its folder,
        ``.hydra/`` files (the documents ``run_job`` writes) and log file, and a JobReturn whose
        configs are made if read. No job logging is configured: nothing logs here, and no
        callback has job hooks (else :meth:`_done`)."""
        config, hydra, subdir, logs = files
        member = job.member
        out = Path(self._output_dir(job))
        out.mkdir(parents=True, exist_ok=True)
        for name in logs:
            (out / name).touch()
        if subdir is not None:
            (out / subdir).mkdir(exist_ok=True)
            own = {"hydra.job.num": job.num, "hydra.job.id": str(job.num),
                   "hydra.job.override_dirname": member.dirname,
                   "hydra.overrides.task": list(member.task),
                   "hydra.runtime.output_dir": str(out)}
            for name, text in (("config.yaml", config.render(member.values)),
                               ("hydra.yaml", hydra.render(own)),
                               ("overrides.yaml", dump_yaml(list(member.task)))):
                (out / subdir / name).write_text(text, encoding="utf-8")
        return completed(lambda: self._configs(job), list(member.task), value)

    def _configs(self, job: _Job) -> tuple[DictConfig, DictConfig]:
        """(task config, hydra config) of a job, as ``run_job`` leaves them in its JobReturn."""
        cfg = self._config(job)
        return task_config(cfg), OmegaConf.masked_copy(cfg, "hydra")

    def _done(self, cfg: DictConfig, value: float) -> JobReturn:
        """``run_job``'s bookkeeping of a job trained in a stack (``compat.hydra_run_job``)."""
        return record_job(self.hydra_context, self.task_function, cfg, value, task_config(cfg),
                          to_yaml)


def _here(stack: Stack, sweep: Any, max_models: int | None) -> Any:
    """Train in this process; an exception is the group's outcome, as from a worker."""
    from l2lab.run.scaleout import fit_here

    try:
        return fit_here(stack, sweep, max_models)
    except Exception as e:
        return e

"""``hydra/launcher=vectorized``: a sweep's λ × seed jobs trained as stacks of networks.

Jobs whose composed configs differ only in ``regularization.lam``,
``regularization.lam_per_layer.*`` and ``seed`` train together, as one stack of K networks in one
Lightning fit (``l2lab.train.train_group``); every other job runs the ordinary way, in the same
sweep. Each job keeps its own output folder, ``.hydra/`` files, MLflow run and return value, so
sweepers, callbacks and ``compare`` see an ordinary sweep.

Where the stacks train (``l2lab.scaleout``): in this process, in job order; with several CUDA
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

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    _flush_loggers,
    configure_log,
    env_override,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf._utils import OmegaConfDumper

from l2lab.composing import SweepConfigs
from l2lab.scaleout import Stack
from l2lab.stackable import group_key, task_config  # noqa: F401  (re-exported)

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


class _LibyamlDumper(getattr(yaml, "CDumper", yaml.Dumper)):
    """OmegaConf's YAML dumper on libyaml's emitter (the same representers)."""


_LibyamlDumper.add_representer(str, OmegaConfDumper.str_representer)


def to_yaml(cfg: Any) -> str:
    """``OmegaConf.to_yaml``, emitted by libyaml: the same document, 2-3× faster (a job's
    ``.hydra/`` files were the larger part of its bookkeeping); long strings may wrap
    differently."""
    return yaml.dump(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True),
                     Dumper=_LibyamlDumper, default_flow_style=False, allow_unicode=True,
                     sort_keys=False)


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
        self._tasks: list[DictConfig] = []  # each job's config without hydra.*, by position

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
        configs = []
        for i, overrides in enumerate(job_overrides):
            cfg = self.hydra_context.config_loader.take(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = cfg.hydra.job.num = initial_job_idx + i
            configs.append(cfg)
        self._tasks = [task_config(c) for c in configs]  # made once: group_key, workers, JobReturn
        groups = plan([group_key(t) for t in self._tasks])
        stacks = [g for g in groups if len(g) > 1]
        devices = self._devices(len(stacks))
        where = ("as Ray tasks" if self.backend == "ray" else
                 f"on {len(devices)} worker processes" if devices else "here")
        log.info(f"Launching {len(configs)} jobs: {sum(map(len, stacks))} stacked in "
                 f"{len(stacks)} group(s), trained {where}; "
                 f"{len(configs) - sum(map(len, stacks))} ordinary")
        returns: dict[int, JobReturn] = {}
        if self.backend == "local" and not devices:  # in this process, in job order
            for group in groups:
                if len(group) == 1:
                    returns[group[0]] = self._run(configs[group[0]], self.task_function)
                else:
                    for _, results in self._train(configs, [group], devices):
                        self._record(configs, group, results, returns)
            return [returns[i] for i in range(len(configs))]
        for s, results in self._train(configs, stacks, devices):  # as each stack ends
            self._record(configs, stacks[s], results, returns)
        for group in groups:
            if len(group) == 1:
                returns[group[0]] = self._run(configs[group[0]], self.task_function)
        return [returns[i] for i in range(len(configs))]

    def _devices(self, n_stacks: int) -> list[int | None]:
        """Worker processes' devices; none (train here) for one stack or one device."""
        if self.backend != "local" or n_stacks < 2:
            return []
        from l2lab.scaleout import worker_devices

        return worker_devices(self.workers)[:n_stacks]

    def _run(self, cfg: DictConfig, task: Any, result: str = "") -> JobReturn:
        """Hydra's own job bookkeeping (output folder, ``.hydra/``, callbacks, return value)."""
        overrides = " ".join(filter_overrides(cfg.hydra.overrides.task))
        log.debug(f"\t#{cfg.hydra.job.num} : {overrides}")
        ret = run_job(hydra_context=self.hydra_context, task_function=task, config=cfg,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _stack(self, configs: list[DictConfig], group: list[int]) -> Stack:
        """What a worker needs to train these jobs: task configs, overrides, output folders."""
        dirs, overrides = [], []
        for cfg in configs:
            if "${hydra:" in str(OmegaConf.to_container(cfg.hydra.sweep)):  # that resolver
                HydraConfig.instance().set_config(cfg)  # reads HydraConfig: set to this job
            dirs.append(os.path.abspath(Path(str(cfg.hydra.sweep.dir)) /
                                        str(cfg.hydra.sweep.subdir)))
            with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = dirs[-1]  # as run_job sets it
            overrides.append(list(cfg.hydra.overrides.task))
        return Stack([self._tasks[i] for i in group], overrides, dirs,
                      [int(c.hydra.job.num) for c in configs])

    def _train(self, configs: list[DictConfig], groups: list[list[int]],
               devices: list[int | None]) -> Iterator[tuple[int, list]]:
        """Train the groups where this launcher is set to; per group as it ends, its results
        (per job its final metrics or the exception that ended it)."""
        from l2lab import scaleout
        from l2lab.sweep import SWEEP_INFO
        from l2lab.tracking import one_line

        info_path = Path(str(self.config.hydra.sweep.dir)) / SWEEP_INFO
        sweep = json.loads(info_path.read_text()) if info_path.exists() else None
        stacks = [self._stack([configs[i] for i in g], g) for g in groups]
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

    def _record(self, configs: list[DictConfig], group: list[int], results: list,
                returns: dict[int, JobReturn]) -> None:
        """Hydra's bookkeeping of each job of a trained group, its objective the final val/ce
        (each job's line, with its run id, was printed where the stack trained)."""
        values = [float(r.get("val/ce", math.nan)) if isinstance(r, dict) else math.nan
                  for r in results]
        for i, value in zip(group, values, strict=True):
            returns[i] = self._done(configs[i], self._tasks[i], value)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    def _done(self, cfg: DictConfig, task_cfg: DictConfig, value: float) -> JobReturn:
        """``run_job`` for a job trained in a stack: the same folder, ``.hydra/`` files, job
        logging, callbacks and JobReturn, without its four copies of the config and with the YAML
        emitted by libyaml (run_job took ~0.3 s a job here, two thirds of it in those). The rare
        ``hydra.job.chdir=true`` goes through ``run_job`` itself. The caller restores Hydra's own
        logging after a group's jobs."""
        if cfg.hydra.job.chdir:
            return run_job(hydra_context=self.hydra_context, task_function=lambda _cfg: value,
                           config=cfg, job_dir_key="hydra.sweep.dir",
                           job_subdir_key="hydra.sweep.subdir")
        hydra_context, orig = self.hydra_context, HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)  # with runtime.output_dir (set by _stack)
        try:
            ret = JobReturn()
            ret.cfg, ret.hydra_cfg = task_cfg, HydraConfig.instance().cfg
            ret.overrides = list(cfg.hydra.overrides.task)
            ret.working_dir = os.getcwd()
            out = Path(str(cfg.hydra.runtime.output_dir))
            out.mkdir(parents=True, exist_ok=True)
            configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
            if cfg.hydra.output_subdir is not None:
                files = out / str(cfg.hydra.output_subdir)
                files.mkdir(parents=True, exist_ok=True)
                for name, node in (("config.yaml", task_cfg), ("hydra.yaml", ret.hydra_cfg),
                                   ("overrides.yaml", cfg.hydra.overrides.task)):
                    (files / name).write_text(to_yaml(node), encoding="utf-8")
            with env_override(ret.hydra_cfg.hydra.job.env_set):
                hydra_context.callbacks.on_job_start(config=cfg, task_function=self.task_function)
                ret.return_value, ret.status = value, JobStatus.COMPLETED
            ret.task_name = JobRuntime.instance().get("name")
            _flush_loggers()
            hydra_context.callbacks.on_job_end(config=cfg, job_return=ret)
            return ret
        finally:
            HydraConfig.instance().cfg = orig  # (hydra logging: restored by _record)


def _here(stack: Stack, sweep: Any, max_models: int | None) -> Any:
    """Train in this process; an exception is the group's outcome, as from a worker."""
    from l2lab.scaleout import train_here

    try:
        return train_here(stack, sweep, max_models)
    except Exception as e:
        return e

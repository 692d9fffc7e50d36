"""``hydra/launcher=vectorized``: a sweep's λ × seed jobs trained as stacks of networks.

Jobs whose composed configs differ only in ``regularization.lam``,
``regularization.lam_per_layer.*`` and ``seed`` train together, as one stack of K networks in one
Lightning fit (``l2lab.train.train_group``); every other job runs the ordinary way, in the same
sweep, in job order. Each job keeps its own output folder, ``.hydra/`` files, MLflow run and
return value, so sweepers, callbacks and ``compare`` see an ordinary sweep.

Hydra imports every module of ``hydra_plugins`` at start-up (``--help`` included): nothing heavy
is imported here until ``launch``. (Hydra executes plugin modules outside ``sys.modules``, so no
``from __future__ import annotations`` here: dataclasses would not find this module.)
"""

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from l2lab.stackable import group_key, task_config  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.l2lab_launchers.vectorized_launcher.VectorizedLauncher"
    max_models: Optional[int] = None  # noqa: UP045 (OmegaConf) networks per stack; null: what fits the device's memory


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


class _ComposedOnce:
    """Hydra's config loader, keeping each job's composition for the launcher to take.

    A sweeper composes every job of a batch to validate it, then hands the batch to the launcher,
    which composes each again (~0.1 s a job here). Both happen in this process, with the same
    master config and overrides: the launcher takes the sweeper's composition instead.
    """

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._composed: dict[tuple, DictConfig] = {}

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        cfg = self._loader.load_sweep_config(master_config, list(sweep_overrides))
        self._composed[key] = cfg
        return cfg

    def take(self, master_config: DictConfig, sweep_overrides: list) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        if key in self._composed:
            return self._composed.pop(key)
        return self._loader.load_sweep_config(master_config, list(sweep_overrides))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class VectorizedLauncher(Launcher):
    def __init__(self, max_models: int | None = None) -> None:
        super().__init__()
        self.max_models = max_models
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        if not isinstance(hydra_context.config_loader, _ComposedOnce):  # shared with the sweeper
            hydra_context.config_loader = _ComposedOnce(hydra_context.config_loader)

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
        groups = plan([group_key(c) for c in configs])
        stacked = sum(len(g) for g in groups if len(g) > 1)
        log.info(f"Launching {len(configs)} jobs: {stacked} stacked in "
                 f"{sum(len(g) > 1 for g in groups)} group(s), "
                 f"{len(configs) - stacked} ordinary")
        returns: dict[int, JobReturn] = {}
        for group in groups:
            if len(group) == 1:
                returns[group[0]] = self._run(configs[group[0]], self.task_function)
                continue
            values = self._train_group([configs[i] for i in group])
            for i, value in zip(group, values, strict=True):
                returns[i] = self._run(configs[i], lambda _cfg, v=value: v)
        return [returns[i] for i in range(len(configs))]

    def _run(self, cfg: DictConfig, task: Any) -> JobReturn:
        """Hydra's own job bookkeeping (output folder, ``.hydra/``, callbacks, return value).
        Each job's line is l2lab's (with its run id), printed when the job ends."""
        overrides = " ".join(filter_overrides(cfg.hydra.overrides.task))
        log.debug(f"\t#{cfg.hydra.job.num} : {overrides}")
        ret = run_job(hydra_context=self.hydra_context, task_function=task, config=cfg,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _train_group(self, configs: list[DictConfig]) -> list[float]:
        """Train the group (each job's line is printed as it ends); per job its objective, the
        final val/ce."""
        import pytorch_lightning  # noqa: F401  (sets its loggers to INFO: import, then quieten)

        from l2lab import tracking as tr
        from l2lab.console import quiet_libraries
        from l2lab.engine import train_group
        from l2lab.sweep import SWEEP_INFO

        quiet_libraries()
        dirs, tasks, overrides = [], [], []
        for cfg in configs:
            HydraConfig.instance().set_config(cfg)  # resolves hydra.sweep.subdir for this job
            dirs.append(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir))
            overrides.append(list(cfg.hydra.overrides.task))
            tasks.append(task_config(cfg))
        info_path = Path(str(self.config.hydra.sweep.dir)) / SWEEP_INFO
        sweep = json.loads(info_path.read_text()) if info_path.exists() else None
        try:
            results = train_group(tasks, overrides, [os.path.abspath(d) for d in dirs],
                                  sweep=sweep, max_models=self.max_models,
                                  job_nums=[int(c.hydra.job.num) for c in configs])
        except Exception as e:  # its runs are FAILED with the reason; the sweep goes on
            log.error(f"l2lab: a stacked group failed: {tr.one_line(e)}")
            results = [e] * len(configs)
        return [float(r.get("val/ce", math.nan)) if isinstance(r, dict) else math.nan
                for r in results]

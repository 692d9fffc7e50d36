"""The vectorized launcher's copy of Hydra's ``run_job``: the bookkeeping of a job that trained
elsewhere (in a stack), without ``run_job``'s four copies of the config.

Mirrors ``hydra.core.utils.run_job`` of hydra-core 1.3.2 to 1.3.8 (``pyproject.toml``:
``hydra-core>=1.3.2,<1.4``): the job's folder, its ``.hydra/`` files (``config.yaml``,
``hydra.yaml``, ``overrides.yaml``), job logging, ``env_set``, the callbacks' job hooks and the
``JobReturn``. ``tests/test_compat.py`` runs one sweep through Hydra's basic launcher and through
the vectorized launcher (with and without job hooks) and compares every field of those files, so a
Hydra release whose ``run_job`` writes something else fails there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, env_override, run_job
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from l2lab.compat.hydra import flush_loggers

CHECKED_WITH = "hydra-core 1.3.8"
#: The job log file of Hydra's default ``hydra/job_logging``; a job whose logging names another
#: file needs ``record_job`` (which configures job logging), not the launcher's templates.
LOG_FILE = "${hydra.runtime.output_dir}/${hydra.job.name}.log"


class LazyJobReturn(JobReturn):
    """A JobReturn whose ``cfg`` and ``hydra_cfg`` (the job's own config: ~20 ms to derive) are
    made when first read; Hydra's sweepers read only the overrides, status and value. (The two
    dataclass fields are shadowed by properties: ``tests/test_compat.py`` checks that
    ``JobReturn`` still has them.)"""

    def __init__(self, make: Callable[[], tuple[DictConfig, DictConfig]], **kwargs: Any) -> None:
        self._make, self._made = make, None
        super().__init__(**kwargs)

    def _configs(self) -> tuple[DictConfig, DictConfig]:
        if self._made is None:
            self._made = self._make()
        return self._made

    @property
    def cfg(self) -> DictConfig:  # type: ignore[override]
        return self._configs()[0]

    @cfg.setter
    def cfg(self, value: Any) -> None:
        if value is not None:
            self._made = (value, self._configs()[1])

    @property
    def hydra_cfg(self) -> DictConfig:  # type: ignore[override]
        return self._configs()[1]

    @hydra_cfg.setter
    def hydra_cfg(self, value: Any) -> None:
        if value is not None:
            self._made = (self._configs()[0], value)


def completed(make: Callable[[], tuple[DictConfig, DictConfig]], overrides: list[str],
              value: Any) -> JobReturn:
    """The JobReturn ``run_job`` gives a job that returned ``value``, its configs made if read."""
    ret = LazyJobReturn(make, overrides=list(overrides), working_dir=os.getcwd(),
                        task_name=JobRuntime.instance().get("name"))
    ret.return_value, ret.status = value, JobStatus.COMPLETED
    return ret


def has_job_hooks(callbacks: Any) -> bool:
    """Whether a callback does anything at a job's start or end (l2lab's own does not); callbacks
    of an unknown shape count as having hooks, so that ``run_job``'s own way is taken."""
    return any(getattr(type(c), "on_job_start", None) is not Callback.on_job_start
               or getattr(type(c), "on_job_end", None) is not Callback.on_job_end
               for c in getattr(callbacks, "callbacks", [object()]))


def record_job(hydra_context: Any, task_function: Any, cfg: DictConfig, value: Any,
               task_cfg: DictConfig, to_yaml: Callable[[Any], str]) -> JobReturn:
    """``run_job`` for a job trained in a stack, returning ``value``: the same folder,
    ``.hydra/`` files, job logging, callbacks and JobReturn, with the YAML emitted by
    ``to_yaml`` (libyaml). The rare ``hydra.job.chdir=true`` goes through ``run_job`` itself.
    The caller restores Hydra's own logging afterwards."""
    if cfg.hydra.job.chdir:
        return run_job(hydra_context=hydra_context, task_function=lambda _cfg: value,
                       config=cfg, job_dir_key="hydra.sweep.dir",
                       job_subdir_key="hydra.sweep.subdir")
    orig = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # with runtime.output_dir set, as run_job sets it
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
            for name, node in (("config.yaml", ret.cfg), ("hydra.yaml", ret.hydra_cfg),
                               ("overrides.yaml", cfg.hydra.overrides.task)):
                (files / name).write_text(to_yaml(node), encoding="utf-8")
        with env_override(ret.hydra_cfg.hydra.job.env_set):
            hydra_context.callbacks.on_job_start(config=cfg, task_function=task_function)
            ret.return_value, ret.status = value, JobStatus.COMPLETED
        ret.task_name = JobRuntime.instance().get("name")
        flush_loggers()
        hydra_context.callbacks.on_job_end(config=cfg, job_return=ret)
        return ret
    finally:
        HydraConfig.instance().cfg = orig

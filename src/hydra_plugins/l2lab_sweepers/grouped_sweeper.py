"""``hydra/sweeper=grouped``: Hydra's grid sweeper, composing one job per group, not every job.

Hydra's BasicSweeper composes every job of a batch to validate it (0.2-0.5 s each here); this one
keeps its override grammar, batches and job order, and validates through
:class:`l2lab.config.composing.SweepConfigs`: one composition per distinct set of non-stackable
overrides, a type check per distinct stackable value (the per-network settings of
``l2lab.config.stackable.STACKED``), and jobs derived from their group's composition when a
launcher asks for them. (Plugin module: no ``from __future__ import annotations``, see the
vectorized launcher.)
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Dict, Optional  # noqa: UP035 (OmegaConf reads these annotations)

from hydra.core.config_store import ConfigStore
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from l2lab.compat.hydra import BasicSweeper
from l2lab.config.composing import SweepConfigs

log = logging.getLogger(__name__)


@dataclass
class GroupedSweeperConf:
    _target_: str = "hydra_plugins.l2lab_sweepers.grouped_sweeper.GroupedSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045 (OmegaConf)
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045 (OmegaConf)


ConfigStore.instance().store(group="hydra/sweeper", name="l2lab_grouped",
                             node=GroupedSweeperConf, provider="l2lab")


class GroupedSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        # before the launcher is made: it shares the loader, and takes the jobs from it
        if not isinstance(hydra_context.config_loader, SweepConfigs):
            hydra_context.config_loader = SweepConfigs(hydra_context.config_loader)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        assert self.hydra_context is not None and self.config is not None
        configs = self.hydra_context.config_loader
        tic, before = time.perf_counter(), configs.compositions
        configs.validate(self.config, batch)
        log.debug(f"Validated {len(batch)} jobs with {configs.compositions - before} "
                  f"composition(s) in {time.perf_counter() - tic:.2f} s")

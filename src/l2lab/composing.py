"""A sweep's job configs: one composition per group of jobs, the rest derived from it.

Why: Hydra composes every job of a sweep (0.2-0.5 s each here), once when the sweeper validates
the batch and again when a launcher runs it; 300 MNIST-1D jobs spent a minute in composition
before the first one started. Jobs that differ only in *stackable* overrides (``seed``,
``regularization.lam``, ``regularization.lam_per_layer.<layer>``) compose to the same config but
for those values and a few ``hydra.*`` fields, so :class:`SweepConfigs` composes one
representative per distinct set of other overrides and derives each other job from a copy of it:
the job's stackable overrides are applied exactly as Hydra applies command-line overrides (the
schema's type checks included), then ``hydra.overrides.task`` and ``hydra.job.override_dirname``
are set as Hydra's ``load_sweep_config`` sets them. Each distinct value is type-checked when the
batch is validated; a value the check refuses is composed the ordinary way, so Hydra raises its
own error for it. Range checks (λ >= 0 ...) stay where they were: in the job, which ends FAILED.

Light (Hydra and OmegaConf only): the sweeper and the launcher plugins import it at start-up.
"""

from __future__ import annotations

import functools
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: Override keys whose values a job may set on a copy of its group's representative.
STACKED_LEAVES = ("seed", "regularization.lam")
STACKED_PREFIXES = ("regularization.lam_per_layer.",)
_PRIMITIVE = (str, int, float, bool, type(None))

_parser: OverridesParser | None = None
_parsed: dict[str, Override] = {}


def parse(line: str) -> Override:
    """One override, parsed once per distinct string (the parser costs ~0.3 ms a call)."""
    global _parser
    if line not in _parsed:
        _parser = _parser or OverridesParser.create()
        _parsed[line] = _parser.parse_override(line)
    return _parsed[line]


@functools.lru_cache(maxsize=65536)
def _kind(line: str) -> tuple[bool, bool]:
    """(only sets a stackable value, may write over a stackable key otherwise), per string."""
    o = parse(line)
    key, value = o.key_or_group, None if o.is_delete() else o.value()
    stacks = (not o.is_delete() and o.package is None and not o.is_sweep_override()
              and (key in STACKED_LEAVES or (key.startswith(STACKED_PREFIXES) and
                                             key.count(".") == 2))
              and isinstance(value, _PRIMITIVE))
    return stacks, not stacks and (o.is_delete() or not isinstance(value, str))


def split(overrides: Sequence[str]) -> tuple[tuple[str, ...], list[Override]] | None:
    """(the job's group: its overrides with each stackable value blanked, its stackable
    overrides), or ``None`` when the job must be composed itself."""
    base, stacked, keys = [], [], set()
    for line in overrides:
        o = parse(line)
        if _kind(line)[0]:
            if o.key_or_group in keys:
                return None
            keys.add(o.key_or_group)
            stacked.append(o)
            base.append(f"{o.get_key_element()}=<stacked>")
        else:
            base.append(line)
    for line in overrides:  # another override writing over a stackable key (a dict, a
        k = parse(line).key_or_group  # delete; not a group choice): then order would matter
        if keys and _kind(line)[1] and any(s.startswith(k + ".") for s in keys):
            return None
    return tuple(base), stacked


def apply(cfg: DictConfig, o: Override) -> None:
    """Set one stackable override on ``cfg`` as Hydra's ``_apply_overrides_to_config`` does.

    ``+key=v`` is applied as a forced add: the representative was composed with its own
    ``+key=...``, so the key did not exist in the job's base config either."""
    try:
        if o.is_add() or o.is_force_add():
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True, force_add=True)
        else:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    except OmegaConfBaseException as ex:
        raise ConfigCompositionException(f"Error merging override {o.input_line}") from ex


def overrides_dirname(overrides: Sequence[Override], hydra_job: DictConfig) -> str:
    """``hydra.job.override_dirname`` as Hydra's ``get_overrides_dirname`` writes it."""
    conf = hydra_job.config.override_dirname
    lines = sorted(o.input_line for o in overrides if o.key_or_group not in conf.exclude_keys)
    return re.sub("[=]", str(conf.kv_sep), str(conf.item_sep).join(lines))


@dataclass
class _Group:
    """A composed representative, pickled once: unpickling is ~10× cheaper than composing."""

    blob: bytes
    scratch: DictConfig  # a copy on which each distinct stackable value is type-checked
    checked: set[str] = field(default_factory=set)


class SweepConfigs:
    """Hydra's config loader for a sweep: composes once per group, derives the other jobs.

    It replaces ``hydra_context.config_loader``, which the sweeper and the launcher share, and
    forwards everything else to Hydra's loader. ``validate`` (the sweeper's) records how each job
    of a batch is made; ``load_sweep_config`` (any in-process launcher's) then derives, or hands
    over the composition made while validating, or composes a job it has not seen."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._composed: dict[tuple, DictConfig] = {}
        self._groups: dict[tuple, _Group] = {}
        self._derived: dict[tuple, tuple[_Group, list[Override]]] = {}
        self.compositions = 0  # how many jobs were composed by Hydra (the rest were derived)

    def _compose(self, master: DictConfig, overrides: Sequence[str]) -> DictConfig:
        self.compositions += 1
        return self._loader.load_sweep_config(master, list(overrides))

    def validate(self, master: DictConfig, batch: Sequence[Sequence[str]]) -> None:
        """Check that every job of ``batch`` can be composed, composing one job per group."""
        for overrides in batch:
            job = (id(master), tuple(overrides))
            if job in self._derived or job in self._composed:
                continue
            parts = split(overrides)
            if parts is None:
                self._composed[job] = self._compose(master, overrides)
                continue
            base, stacked = parts
            group = self._groups.get((id(master), base))
            if group is None:
                cfg = self._compose(master, overrides)
                self._composed[job] = cfg
                blob = pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL)
                group = self._groups[(id(master), base)] = _Group(blob, pickle.loads(blob))
                group.checked.update(o.input_line for o in stacked)
                continue
            try:
                for o in stacked:
                    if o.input_line not in group.checked:
                        apply(group.scratch, o)
                        group.checked.add(o.input_line)
            except ConfigCompositionException:  # Hydra's own composition says why, or passes
                group.scratch = pickle.loads(group.blob)
                self._composed[job] = self._compose(master, overrides)
                continue
            self._derived[job] = (group, stacked)

    def load_sweep_config(self, master_config: DictConfig,
                          sweep_overrides: Sequence[str]) -> DictConfig:
        """The job's config: derived, or the composition made for it before (handed over once:
        a sweeper that validates by calling this, as Hydra's own does, and then a launcher that
        composes the same job, compose it once)."""
        job = (id(master_config), tuple(sweep_overrides))
        if job in self._composed:
            return self._composed.pop(job)
        if job in self._derived:
            group, stacked = self._derived[job]
            return self._derive(master_config, group, stacked, sweep_overrides)
        cfg = self._composed[job] = self._compose(master_config, sweep_overrides)
        return cfg

    def take(self, master_config: DictConfig, sweep_overrides: Sequence[str]) -> DictConfig:
        """The job's config for the launcher that runs it (nothing kept for a later call)."""
        job = (id(master_config), tuple(sweep_overrides))
        if job in self._composed or job in self._derived:
            return self.load_sweep_config(master_config, sweep_overrides)
        return self._compose(master_config, sweep_overrides)

    @staticmethod
    def _derive(master: DictConfig, group: _Group, stacked: list[Override],
                overrides: Sequence[str]) -> DictConfig:
        cfg = pickle.loads(group.blob)
        for o in stacked:
            apply(cfg, o)
        app = [o for o in map(parse, overrides) if not o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in app]
        cfg.hydra.job.override_dirname = overrides_dirname(app, cfg.hydra.job)
        OmegaConf.copy_cache(from_config=master, to_config=cfg)
        return cfg

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

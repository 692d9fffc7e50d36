"""A sweep's job configs: one composition per group of jobs, the rest derived from it.

Why: Hydra composes every job of a sweep (0.2-0.5 s each here), once when the sweeper validates
the batch and again when a launcher runs it; 300 MNIST-1D jobs spent a minute in composition
before the first one started. Jobs that differ only in *stackable* overrides (a key of
``stackable.STACKED`` set to a plain value or a list of them, e.g. ``seed``, ``optimizer.lr``,
``regularization.lam``, ``regularization.lam_per_layer.<layer>``) compose to the same config but
for those values and a few ``hydra.*`` fields, so :class:`SweepConfigs` composes one
representative per distinct set of other overrides and derives each other job from a copy of it:
the job's stackable overrides are applied exactly as Hydra applies command-line overrides (the
schema's type checks included), then ``hydra.overrides.task`` and ``hydra.job.override_dirname``
are set as Hydra's ``load_sweep_config`` sets them. Each distinct value is type-checked when the
batch is validated; a value the check refuses is composed the ordinary way, so Hydra raises its
own error for it. Range checks (λ >= 0 ...) stay where they were: in the job, which ends FAILED.

A job need not become a config of its own at all: :meth:`SweepConfigs.member` gives it as its
group's representative plus its :class:`JobValues` values (the stacked keys, complete, as the schema
converts them), which is all the vectorized launcher and the engine need per job (a config of its
own costs ~10 ms to derive and as much again each time it is copied, resolved or dumped).
:func:`substitute` and :class:`YamlTemplate` give a member's resolved tree and YAML documents from
its representative's, in microseconds.

Light (Hydra, OmegaConf and PyYAML only): the sweeper and the launcher plugins import it at
start-up.
"""

from __future__ import annotations

import functools
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from l2lab.compat.omegaconf import yaml_str_representer
from l2lab.config.stackable import STACKED, STACKED_DICTS

#: Override keys whose values a job may set on a copy of its group's representative: the stacked
#: keys (``stackable.STACKED``), a dict-valued one entry by entry.
STACKED_LEAVES = tuple(k for k in STACKED if k not in STACKED_DICTS)
STACKED_PREFIXES = tuple(f"{k}." for k in STACKED_DICTS)
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
    plain = isinstance(value, _PRIMITIVE) or (
        isinstance(value, list) and all(isinstance(v, _PRIMITIVE) for v in value))
    stacks = (not o.is_delete() and o.package is None and not o.is_sweep_override()
              and (key in STACKED_LEAVES or (key.startswith(STACKED_PREFIXES) and
                                             key.count(".") == 2))
              and plain)
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


_INTERPOLATION = object()  # a stacked value that is an interpolation: no member form


def _read(cfg: DictConfig, key: str) -> Any:
    """A stacked key's value as the schema converted it."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if OmegaConf.is_interpolation(node, leaf):
        return _INTERPOLATION
    value = node[leaf]
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _reads_stacked(text: str) -> bool:
    """Whether an interpolation may read a stacked key (any resolver may: assume it does)."""
    return any(":" in m or any(m == k or k.startswith(m + ".") or m.startswith(k + ".")
                               for k in STACKED)
               for m in re.findall(r"\$\{([^}]*)\}", text))


def _member_base(rep: DictConfig) -> dict[str, Any] | None:
    """The representative's values of the stacked keys it has; ``None`` when members cannot
    be made from it: a stacked key that is (or holds) an interpolation, or an interpolation of
    the task config that may read one."""
    tree = OmegaConf.to_container(rep, resolve=False)
    task = {k: v for k, v in tree.items() if k != "hydra"}
    base: dict[str, Any] = {}
    for key in STACKED:
        parent, _, leaf = key.rpartition(".")
        node = task.get(parent) if parent else task
        if not isinstance(node, Mapping) or leaf not in node:
            continue
        texts: list[str] = []
        _strings({leaf: node[leaf]}, texts)
        if texts:
            return None
        base[key] = node[leaf]
    texts = []
    _strings(task, texts)
    if any(_reads_stacked(t) for t in texts):
        return None
    return base


def _strings(tree: Any, out: list[str]) -> None:
    """Every string of ``tree`` that holds an interpolation."""
    if isinstance(tree, Mapping):
        for v in tree.values():
            _strings(v, out)
    elif isinstance(tree, list):
        for v in tree:
            _strings(v, out)
    elif isinstance(tree, str) and "${" in tree:
        out.append(tree)


@dataclass
class JobValues:
    """A job of a group, without a config of its own: its group's representative (shared,
    never to be changed) and what differs."""

    rep: DictConfig
    values: dict[str, Any]  # stacked key (``stackable.STACKED``) -> this job's value
    task: list[str]  # hydra.overrides.task
    dirname: str  # hydra.job.override_dirname
    composition: int  # members of one composition share it (and its YAML templates)


def with_values(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with a member's values set (its own config, for what needs one)."""
    cfg = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


KeyPath = str | tuple[str, ...]  # a dotted key, or its parts (a layer name may hold dots)


def _parts(key: KeyPath) -> tuple[str, ...]:
    return tuple(key.split(".")) if isinstance(key, str) else key


def substitute(tree: Mapping[str, Any], values: Mapping[KeyPath, Any]) -> dict[str, Any]:
    """``tree`` (a plain container) with the keys of ``values`` set; only the dicts on their
    paths are copied, the rest is shared (so: read the result, do not change it)."""
    out = dict(tree)
    fresh = {id(out)}
    for key, value in values.items():
        *parents, leaf = _parts(key)
        node = out
        for p in parents:
            child = node.get(p)
            if not (isinstance(child, dict) and id(child) in fresh):
                child = dict(child) if isinstance(child, Mapping) else {}
                node[p] = child
                fresh.add(id(child))
            node = child
        node[leaf] = value
    return out


def _get(tree: Mapping[str, Any], key: KeyPath) -> Any:
    for p in _parts(key):
        tree = tree.get(p) if isinstance(tree, Mapping) else None
    return tree


# -- YAML, fast --------------------------------------------------------------------------------
class _LibyamlDumper(getattr(yaml, "CDumper", yaml.Dumper)):  # type: ignore[misc]
    """OmegaConf's YAML dumper on libyaml's emitter (the same representers)."""


_LibyamlDumper.add_representer(str, yaml_str_representer())


def dump_yaml(tree: Any) -> str:
    """A plain container as ``OmegaConf.to_yaml`` writes it, emitted by libyaml: the same
    document, several times faster (long strings may wrap differently)."""
    return yaml.dump(tree, Dumper=_LibyamlDumper, default_flow_style=False,
                     allow_unicode=True, sort_keys=False)


def to_yaml(cfg: Any) -> str:
    """``OmegaConf.to_yaml`` (unresolved) through :func:`dump_yaml`."""
    return dump_yaml(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
                     if OmegaConf.is_config(cfg) else cfg)


class YamlTemplate:
    """The YAML documents of trees that differ only at a few keys (the jobs of a group): dumped
    once with a token at each leaf of those keys, then each document is that text with the
    tokens replaced (microseconds, where dumping a job's hydra node costs ~5 ms). A value that
    would not render as the template's one line (a multi-line string, a dict of other keys, an
    empty list) is dumped the slow way: the result is always the same as
    ``dump_yaml(substitute(tree, values))``."""

    def __init__(self, tree: Mapping[str, Any], keys: Sequence[str]) -> None:
        self.tree, self.keys = tree, list(keys)
        self.shapes: dict[str, list[str] | None] = {}  # a dict-valued key: its keys, in order
        slots: dict[KeyPath, Any] = {}
        for key in self.keys:
            current = _get(tree, key)
            if isinstance(current, Mapping):  # a slot per key (none for an empty dict)
                self.shapes[key] = list(current)
                for sub in current:
                    slots[(*_parts(key), sub)] = None
            else:
                self.shapes[key] = None
                slots[key] = [None] if isinstance(current, list) else None
        self.tokens = {path: f"L2LABSLOT{i}X" for i, path in enumerate(slots)}
        marked = {p: [t] if isinstance(slots[p], list) else t for p, t in self.tokens.items()}
        self.text = dump_yaml(substitute(tree, marked))
        self.ok = all(self.text.count(t) == 1 for t in self.tokens.values())

    def render(self, values: Mapping[str, Any]) -> str:
        text = self.text if self.ok else None
        leaves: dict[KeyPath, Any] = {}
        for key in self.keys:
            value, shape = values[key], self.shapes[key]
            if shape is not None or isinstance(value, Mapping):
                if not isinstance(value, Mapping) or list(value) != shape:
                    text = None
                    break
                leaves.update(((*_parts(key), sub), v) for sub, v in value.items())
            else:
                leaves[key] = value
        for path, value in leaves.items() if text is not None else ():
            token = self.tokens[path]
            if isinstance(value, list | tuple):
                text = _render_list(text, token, value)
            else:
                one = _scalar(value)
                text = None if one is None else text.replace(token, one)
            if text is None:
                break
        return text if text is not None else dump_yaml(substitute(self.tree, values))


@functools.lru_cache(maxsize=65536)
def _scalar_cached(value: Any, kind: type) -> str | None:
    out = dump_yaml({"k": value})
    if not out.startswith("k: ") or out.count("\n") != 1:
        return None
    return out[3:-1]


def _scalar(value: Any) -> str | None:
    """One value as it follows ``key: `` in a block mapping (None: not on one line)."""
    if not isinstance(value, str | int | float | bool | type(None)):
        return None
    return _scalar_cached(value, type(value))  # 1 and 1.0 and True are different YAML


def _render_list(text: str, token: str, items: Sequence[Any]) -> str | None:
    """The list's one-item block sequence (``<indent>- TOKEN``) made ``items``' lines."""
    start = text.index(token)
    line_start = text.rfind("\n", 0, start) + 1
    prefix = text[line_start:start]
    if not prefix.strip() == "-":
        return None
    if not items:  # "key:\n- TOKEN" -> "key: []"
        return None if line_start == 0 else \
            text[:line_start - 1] + " []" + text[start + len(token):]
    lines = [_scalar(v) for v in items]
    if any(v is None for v in lines):
        return None
    return text[:line_start] + "\n".join(prefix + v for v in lines) + text[start + len(token):]


@dataclass
class _Composition:
    """A composed representative, pickled once: unpickling is ~10× cheaper than composing."""

    blob: bytes
    scratch: DictConfig  # a copy on which each distinct stackable value is type-checked
    checked: set[str] = field(default_factory=set)
    rep: DictConfig | None = None  # the composition, kept for members (never changed)
    base: dict[str, Any] | None = None  # stacked values as composed (None: no members; with rep)
    values: dict[str, Any] = field(default_factory=dict)  # override line -> value, converted


class SweepConfigs:
    """Hydra's config loader for a sweep: composes once per group, derives the other jobs.

    It replaces ``hydra_context.config_loader``, which the sweeper and the launcher share, and
    forwards everything else to Hydra's loader. ``validate`` (the sweeper's) records how each job
    of a batch is made; ``load_sweep_config`` (any in-process launcher's) then derives, or hands
    over the composition made while validating, or composes a job it has not seen."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._composed: dict[tuple, DictConfig] = {}
        self._compositions: dict[tuple, _Composition] = {}
        self._derived: dict[tuple, tuple[_Composition, list[Override]]] = {}
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
            group = self._compositions.get((id(master), base))
            if group is None:
                cfg = self._compose(master, overrides)
                self._composed[job] = cfg
                blob = pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL)
                group = _Composition(blob, pickle.loads(blob))
                self._compositions[(id(master), base)] = group
                group.checked.update(o.input_line for o in stacked)
                group.values.update((o.input_line, _read(cfg, o.key_or_group)) for o in stacked)
                self._derived[job] = (group, stacked)
                continue
            try:
                for o in stacked:
                    if o.input_line not in group.checked:
                        apply(group.scratch, o)
                        group.checked.add(o.input_line)
                        group.values[o.input_line] = _read(group.scratch, o.key_or_group)
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

    def member(self, master_config: DictConfig, sweep_overrides: Sequence[str]
               ) -> JobValues | None:
        """The job as its group's representative plus its values, without a config of its own
        (``None``: take its config; a value that is an interpolation, or a representative whose
        config may read the stacked keys, has no member form)."""
        job = (id(master_config), tuple(sweep_overrides))
        if job not in self._derived:
            return None
        group, stacked = self._derived[job]
        if group.rep is None:
            group.rep = pickle.loads(group.blob)
            OmegaConf.copy_cache(from_config=master_config, to_config=group.rep)
            group.base = _member_base(group.rep)
        values = [group.values[o.input_line] for o in stacked]
        if group.base is None or any(v is _INTERPOLATION for v in values):
            return None
        self._composed.pop(job, None)  # the representative's own: not needed any more
        own = dict(group.base)
        for o, value in zip(stacked, values, strict=True):
            if o.key_or_group.startswith(STACKED_PREFIXES):
                key, _, entry = o.key_or_group.rpartition(".")
                own[key] = {**(own.get(key) or {}), entry: value}
            else:
                own[o.key_or_group] = value
        app = [o for o in map(parse, sweep_overrides) if not o.is_hydra_override()]
        return JobValues(group.rep, own, [o.input_line for o in app],
                      overrides_dirname(app, group.rep.hydra.job), id(group))

    def take(self, master_config: DictConfig, sweep_overrides: Sequence[str]) -> DictConfig:
        """The job's config for the launcher that runs it (nothing kept for a later call)."""
        job = (id(master_config), tuple(sweep_overrides))
        if job in self._composed or job in self._derived:
            return self.load_sweep_config(master_config, sweep_overrides)
        return self._compose(master_config, sweep_overrides)

    @staticmethod
    def _derive(master: DictConfig, group: _Composition, stacked: list[Override],
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

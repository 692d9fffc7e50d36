"""The command line, read before Hydra composes: unknown keys and wrong types are refused with the
closest valid keys (Hydra's own hint, "use +key", would silently add a key nobody reads), and
``--help`` renders the harness's help page without Hydra's slower one. Light: Hydra and OmegaConf
only, like :mod:`l2lab.config.schema`, whose types and ranges it applies.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from l2lab.base import CONF_DIR, ConfigError
from l2lab.compat.omegaconf import child_node
from l2lab.config.schema import OPEN_DICTS
from l2lab.core.rules import NETWORKS

# -- keys ----------------------------------------------------------------------------------------
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--info", "-i", "--experimental-rerun",
                "--shell-completion", "-sc"}


def cli_overrides(argv: Sequence[str]) -> list[str]:
    """The override arguments of a Hydra command line (flags and their values skipped)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = arg in _VALUE_FLAGS and arg not in ("--info", "-i")  # --info takes an optional
            continue
        if "=" in arg:
            out.append(arg)
    return out


def _is_group(key: str) -> bool:
    return key.startswith("hydra") or (CONF_DIR / key).is_dir()


def _first_choice(override) -> str | None:  # noqa: ANN001
    """The first value of a group override (``model=mlp,cnn`` -> ``mlp``), for key checks."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    try:
        return next(iter(override.sweep_string_iterator()))
    except Exception:  # glob(), interval(): no single value to compose with
        return None


def _keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            out.append(full)
            if full not in OPEN_DICTS:
                out += _keys(child_node(node, k), full + ".")
    return out


def _suggest(key: str, valid: Iterable[str]) -> ConfigError:
    """The error for an unknown key: the closest valid key(s) and the group's valid keys."""
    valid = sorted(valid)
    group, _, leaf = key.rpartition(".")
    siblings = [k for k in valid if k.rpartition(".")[0] == group]
    names = {k.rpartition(".")[2]: k for k in siblings}
    close = [names[n] for n in difflib.get_close_matches(leaf, list(names), n=2, cutoff=0.6)]
    if not close:  # a misspelt group (regularisation.lam) or a key put in the wrong group
        close = difflib.get_close_matches(key, valid, n=2, cutoff=0.8)
    hint = f" Did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else ""
    where = f"`{group}`" if group else "the top level"
    listed = ", ".join(names) if siblings else "(no such group)"
    return ConfigError(
        f"unknown config key `{key}`.{hint} Valid keys of {where}: {listed}. "
        "Nothing was run."
    )


# Options that Hydra or a plugin provides (no file under conf/), and what brings each plugin.
_BUILTIN_OPTIONS = {"hydra/launcher": ("basic", "joblib", "submitit_slurm"),
                    "hydra/sweeper": ("basic", "optuna")}
_PLUGINS = {  # (group, option) -> (module, extra)
    ("hydra/launcher", "parallel"): ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    ("hydra/launcher", "ray"): ("hydra_plugins.hydra_ray_launcher", "ray"),
    ("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}


def group_choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group: its files under ``conf/``, and for Hydra's launcher and
    sweeper groups the ones Hydra and its plugins bring."""
    d = conf_dir / group
    names = {p.stem for p in d.glob("*.yaml")} if d.is_dir() else set()
    return sorted(names | set(_BUILTIN_OPTIONS.get(group, ())))


def _missing_extra(group: str, option: str) -> ConfigError | None:
    """A launcher or sweeper whose plugin is not installed: the install that brings it."""
    import importlib.util

    module, extra = _PLUGINS.get((group, option), (None, None))
    if module is None:
        return None
    try:
        if importlib.util.find_spec(module) is not None:
            return None
    except (ImportError, ValueError):
        pass
    return ConfigError(
        f"{group}={option} needs the {module.split('.')[-1].replace('_', '-')} plugin, which is "
        f"not installed: pip install -e \".[{extra}]\" (in this project's folder; `make test` "
        "installs every extra). Nothing was run.")


def _presets_need(option: str) -> list[tuple[str, str]]:
    """The launcher and sweeper choices an experiment preset makes (``override hydra/...``)."""
    path = CONF_DIR / "experiment" / f"{option}.yaml"
    text = path.read_text() if path.exists() else ""
    found = []
    for line in text.splitlines():
        line = line.strip().lstrip("-").strip().replace("override /", "override ")
        for group in ("hydra/launcher", "hydra/sweeper"):
            if line.startswith(f"override {group}:"):
                found.append((group, line.split(":", 1)[1].strip()))
    return found


def check_choices(overrides: Sequence[str]) -> None:
    """A misspelt option of a config group (``data=mnsit``), or a launcher/sweeper whose extra is
    not installed, is refused with the closest option and the group's options, in a fraction of
    a second, instead of Hydra's raw "Could not find" and its search path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:
        return  # a syntax error: Hydra reports it with its own pointer into the string
    for o in parsed:
        group = o.get_key_element().lstrip("+~").split("@")[0]
        if o.is_delete() or not (CONF_DIR / group).is_dir() and group not in _BUILTIN_OPTIONS:
            continue
        if group.startswith("hydra") and group not in _BUILTIN_OPTIONS:
            continue
        try:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else \
                [o.get_value_element_as_str()]
        except Exception:  # glob() and the like: Hydra's to expand
            continue
        options = group_choices(group)
        for value in values:
            if value in ("null", "None") and group == "experiment":
                continue
            if value not in options:
                close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
                hint = f" Did you mean `{group}={close[0]}`?" if close else ""
                raise ConfigError(f"{group}: no option {value!r}.{hint} Options of {group}: "
                                  f"{', '.join(options)}. Nothing was run.")
            needs = [(group, value)] + (_presets_need(value) if group == "experiment" else [])
            for g, v in needs:
                if missing := _missing_extra(g, v):
                    raise missing


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse overrides of keys that no schema knows, before Hydra composes or anything runs.

    The config is composed once with only the group choices of the command line (the first value
    of a swept group), and every other override's key must exist in it (``+`` included: it may
    only add entries under :data:`OPEN_DICTS`). Values are left to the schemas: Hydra's own
    composition reports a wrong type, naming the key.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not overrides:
        return
    check_choices(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:
        return  # a syntax error: Hydra reports it with its own pointer into the string
    choices, leaves = [], []
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if o.is_delete():
            continue
        if _is_group(key.split("@")[0]):
            if not key.startswith("hydra") and (value := _first_choice(o)) is not None:
                choices.append(f"{o.get_key_element()}={value}")
        else:
            leaves.append((key, o))
    if not leaves:
        return
    if GlobalHydra.instance().is_initialized():  # compose inside an app or a test
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=choices)
    except Exception:
        return  # a bad group choice: Hydra lists the options itself
    valid = set(_keys(cfg))
    # a researcher's own network (not a preset's class): its constructor's keys are its own
    targets = [v for key, o in leaves if key == "model._target_" for v in _values(o)]
    own_model = any(t not in NETWORKS.values() for t in targets) or \
        OmegaConf.is_missing(cfg.model, "_target_")
    for key, o in leaves:
        if own_model and key.startswith("model.") and key not in valid:
            if not o.get_key_element().startswith("+"):
                raise ConfigError(f"{key}: a key of your own network is added with a +: "
                                  f"+{key}=... . Nothing was run.")
            continue
        if not (key in valid or any(key.startswith(d + ".") and key.count(".") == d.count(".") + 1
                                    for d in OPEN_DICTS)):
            raise _suggest(key, valid)
        for value in _values(o):  # every value of a sweep: a wrong type would stop it half-made
            _check_type(cfg, key, value)


def _values(override) -> list:  # noqa: ANN001
    """The values an override sets (each choice of a sweep; none for interval()/glob())."""
    try:
        if override.is_sweep_override():
            return list(override.sweep_iterator())
        return [override.value()]
    except Exception:
        return []


def _check_type(cfg: DictConfig, key: str, value: Any) -> None:
    """Set ``key`` on a copy of the composed, typed config: the schema refuses a wrong type."""
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    node = cfg.copy()
    try:
        with open_dict(node):
            OmegaConf.update(node, key, value, merge=True)
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{key}={value!r} has the wrong type: {reason}. Nothing was run.") \
            from None


# -- help ----------------------------------------------------------------------------------------
def group_options(conf_dir: Path = CONF_DIR) -> str:
    """``data: cifar10, digits, ...`` one line per config group, for ``--help``."""
    lines = []
    for group in ("data", "model", "regularization", "optimizer", "scheduler", "trainer",
                  "experiment", "hydra/launcher", "hydra/sweeper"):
        names = group_choices(group, conf_dir)
        lines.append(f"  {group + ':':<17} {', '.join(names)}")
    return "\n".join(lines)


def help_text(overrides: Sequence[str] = ()) -> str:
    """``--help``: the template of ``conf/hydra/help/l2lab.yaml`` with the composed config.

    Rendered here rather than by Hydra, whose ``--help`` lists the options of every Hydra group
    (launchers', sweepers' and samplers' included) whether the template shows them or not: that
    took 4-5 s of the 2-core machine's time for a page that should answer at once.
    """
    import string

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    template = str(cfg.hydra.help.template)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return string.Template(template).safe_substitute(
        CONFIG=OmegaConf.to_yaml(job), FLAGS_HELP="", APP_CONFIG_GROUPS=group_options(),
        HYDRA_CONFIG_GROUPS="")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("l2lab_groups"):
        OmegaConf.register_new_resolver("l2lab_groups", lambda: group_options())


_register_resolvers()


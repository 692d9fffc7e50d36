"""Every experiment preset trains, not only composes (as lightning-hydra-template's tests do), and
every option of a typed group is typed by its schema.

A preset is discovered from ``conf/experiment/*.yaml`` (with each ``conf/experiment_model/``
network shape it offers for a ``model=`` choice), shrunk to a few examples and one step per epoch,
cut to one job when it is a sweep (the first value of each swept key), and trained through the
real path: ``train(cfg)`` in-process, real Lightning, a real SQLite store. The run must end
FINISHED with a finite ``train/loss`` per epoch and the preset's own keys in its params."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pytest
from conftest import runs_of
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from l2lab import CONF_DIR
from l2lab.config.schema import SCHEMAS
from l2lab.core.rules import MNIST1D_SIZES as SIZES
from l2lab.train import train

EPOCHS = 2
# One batch per epoch: a preset's network and optimizer, trained for two steps.
TINY = {"data.train_size": 40, "data.batch_size": 40, "trainer.max_epochs": EPOCHS}
#: ``data.num_samples`` for a preset that sets its own MNIST-1D size (cut for its two steps).
SMALL_MNIST1D = 1000
#: ``data.val_size`` of a CIFAR-10 preset (5000 held out: more than the fake files hold).
SMALL_VAL = 20
#: conf/ folders that are not typed groups: presets of the whole config (`# @package _global_`),
#: an experiment's network shape merged into the (typed) model, and Hydra's own.
UNTYPED = ("experiment", "experiment_model", "hydra")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _cases() -> list[tuple[str, str | None]]:
    """(preset, model): every preset with the default model, and with each model for which it
    has its own network shape (``experiment=mnist1d model=cnn``)."""
    return [(exp, model) for exp in _options("experiment")
            for model in [None, *(m for m in _options("model") if m != "mlp" and
                                  (CONF_DIR / "experiment_model" / f"{exp}_{m}.yaml").exists())]]


def _compose(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def _first_values(params: Mapping[str, str]) -> dict[str, Any]:
    """One job of a sweep: each swept key at its first grid value (an interval: its start)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    out = {}
    for o in parsed:
        value = o.value()
        if isinstance(value, ChoiceSweep):
            out[o.key_or_group] = value.list[0]
        elif isinstance(value, IntervalSweep):
            out[o.key_or_group] = value.start
        else:
            out[o.key_or_group] = value
    return out


def _preset_keys(name: str) -> dict[str, Any]:
    """The keys a preset sets itself (and through the presets it extends), as dotted keys: a
    group it picks (``override /optimizer: adamw``) as ``<group>.name``."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml"))
    keys: dict[str, Any] = {}
    for entry in raw.pop("defaults", []):
        if isinstance(entry, str):  # another experiment it extends
            keys.update(_preset_keys(entry))
            continue
        ((target, choice),) = entry.items()
        group = target.removeprefix("override").strip().lstrip("/")
        if not group.startswith("hydra"):
            keys[f"{group}.name"] = choice
    raw.pop("hydra", None)

    def flat(node: Mapping, prefix: str = "") -> None:
        for k, v in node.items():
            if isinstance(v, Mapping):
                flat(v, f"{prefix}{k}.")
            else:
                keys[f"{prefix}{k}"] = v

    flat(raw)
    return keys


def _shape_keys(name: str) -> dict[str, Any]:
    """An experiment's network shape (``conf/experiment_model/<name>.yaml``, with the shapes it
    extends) as ``model.*`` keys; none when the preset has no shape for that model."""
    path = CONF_DIR / "experiment_model" / f"{name}.yaml"
    if not path.exists():
        return {}
    own = OmegaConf.to_container(OmegaConf.load(path))
    keys: dict[str, Any] = {}
    for parent in own.pop("defaults", []):
        keys.update(_shape_keys(parent))
    return {**keys, **{f"model.{k}": v for k, v in own.items()}}


def _logged(value: str, expected: Any) -> bool:
    """A param as MLflow holds it (a string) equals a config value."""
    if isinstance(expected, bool) or expected is None:
        return value == json.dumps(expected)
    if isinstance(expected, int | float):
        return float(value) == float(expected)
    if isinstance(expected, list):
        return json.loads(value) == expected
    return value == str(expected)


@pytest.mark.parametrize(("preset", "model"), _cases(),
                         ids=[f"{e}-{m}" if m else e for e, m in _cases()])
def test_every_experiment_preset_trains(preset, model, tmp_path, store, mnist1d_root,
                                        cifar10_root):
    chosen = [f"experiment={preset}", *([f"model={model}"] if model else [])]
    full = _compose(chosen, hydra=True)
    swept = _first_values(full.hydra.sweeper.get("params") or {})
    # a swept group (regularization: l2,decoupled) is picked by its option, a key by its value
    job = [f"{k}={v}" for k, v in swept.items()]
    roots = {"mnist1d": mnist1d_root, "cifar10": cifar10_root}  # CIFAR-10: fake files in its
    data = [f"data.root={roots[full.data.name]}"] if full.data.name in roots else []  # format
    tiny = dict(TINY)
    if full.data.name == "cifar10":  # the fake CIFAR-10 has 300 training images
        tiny["data.val_size"] = SMALL_VAL
    if full.data.get("num_samples", SIZES["num_samples"]) != SIZES["num_samples"]:
        # a preset's own MNIST-1D size (16000 sequences: 10-30 s to generate) is generated
        # small: two steps need no more, and the cache serves every such preset
        tiny["data.num_samples"] = SMALL_MNIST1D
    overrides = [*chosen, *job, *(f"{k}={v}" for k, v in tiny.items()), *data,
                 f"tracking.uri={store}"]
    cfg = _compose(overrides)
    final = train(cfg, overrides=[*chosen, *job], output_dir=tmp_path / "out")

    client = MlflowClient(store)
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED", run.data.tags.get("l2lab.failure")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(EPOCHS))
    assert all(math.isfinite(m.value) for m in history)
    last = max(history, key=lambda m: m.step).value
    assert final["train/loss"] == pytest.approx(last)

    params = run.data.params
    expected = {**_preset_keys(preset), **_shape_keys(f"{preset}_{model or 'mlp'}"), **tiny, **{
        f"{k}.name" if (CONF_DIR / k).is_dir() else k: v for k, v in swept.items()}}
    if model:
        expected["model.name"] = model
    wrong = {k: (params.get(k), v) for k, v in expected.items()
             if not _logged(params.get(k, "<missing>"), v)}
    assert not wrong, f"params that differ from the preset (logged, expected): {wrong}"
    assert params["optimizer._target_"] == cfg.optimizer._target_  # the preset's optimizer class
    assert params["l2.layers"] and int(params["l2.num_params"]) > 0


# -- every option of a typed group is typed ------------------------------------------------------
def test_every_config_folder_is_a_typed_group_or_named_untyped():
    """A new group in conf/ gets a schema in ``schema.SCHEMAS`` (or a reason to be untyped)."""
    folders = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert folders - set(UNTYPED) == set(SCHEMAS)


@pytest.mark.parametrize(("group", "option"),
                         [(g, o) for g in sorted(SCHEMAS) for o in _options(g)
                          if (g, o) != ("model", "custom")])
def test_every_option_of_a_group_is_typed_by_its_schema(group, option):
    """Each YAML of ``conf/<group>/`` names its schema in its defaults list (itself or through
    the option it extends), so that Hydra refuses a wrong type at composition, naming the key.
    (``model=custom`` alone is open: a researcher's own network's keys are its own.)"""
    cfg = _compose([f"{group}={option}"])
    assert OmegaConf.get_type(cfg[group]) in SCHEMAS[group].values(), (group, option)
    key = next((k for k, v in cfg[group].items() if isinstance(v, int | float)), None)
    if key is not None:  # (scheduler=none has no number to get wrong)
        with pytest.raises(Exception, match=f"{group}.{key}"):
            _compose([f"{group}={option}", f"{group}.{key}=not-a-number"])
    custom = _compose(["model=custom", "model._target_=mylab.nets.TinyNet", "+model.width=3"])
    assert custom.model.width == 3

"""Hydra composition: every preset composes, and the CLI behaves as any Hydra app."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import make_cfg, python_c, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from l2lab import CONF_DIR, ConfigError
from l2lab.config.cli import check_overrides, cli_overrides
from l2lab.config.schema import validate


def _options(group: str) -> list[str]:
    """A config group's options, as the files in ``conf/<group>/`` name them."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Every option of every group of conf/*/*.yaml, as the override that selects it. An experiment is
# composed with each of l2lab's own networks (its experiment_model file is chosen by the pair;
# the ResNets and a researcher's own network have other keys, and an experiment that uses one
# names it), and the experiment_model group, which no override names, is covered through those
# pairs; an experiment that names another network is also composed with it. ``model=custom``
# names a network: the test package's own.
_GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
_OWN = ("cnn", "mlp")


def _networks(experiment: str) -> list[str]:
    """l2lab's own networks, and the one the experiment's defaults select (``override /model``)."""
    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    named = re.findall(r"override /model: *(\w+)", text)
    return sorted({*_OWN, *named})


PRESETS = [[f"{g}={o}"] + (["model._target_=mylab.nets.TinyNet"] if o == "custom" else [])
           for g in _GROUPS if g not in ("experiment", "experiment_model")
           for o in _options(g)] + [[f"experiment={e}", f"model={m}"]
                                    for e in _options("experiment") for m in _networks(e)]


def test_the_preset_list_is_every_file_of_conf():
    assert {"data", "model", "regularization", "optimizer", "trainer", "experiment",
            "experiment_model"} <= set(_GROUPS)
    selected = {o for p in PRESETS for o in p}
    for g in _GROUPS:
        if g != "experiment_model":
            assert {f"{g}={o}" for o in _options(g)} <= selected, g
    assert {"data=mnist1d", "experiment=mnist1d", "experiment=mnist1d_sweep"} <= selected
    pairs = {f"{e}_{m}" for e in _options("experiment") for m in _networks(e)}
    assert set(_options("experiment_model")) <= pairs  # each one is picked by some pair


@pytest.mark.parametrize("overrides", PRESETS, ids=" ".join)
def test_every_preset_composes(overrides):
    cfg = make_cfg(*overrides, tiny=False)
    for o in overrides:
        group, opt = o.split("=")
        if group in ("data", "model", "regularization", "optimizer"):
            assert cfg[group].name == opt
    if overrides[0].startswith("experiment="):
        exp, model = (o.split("=")[1] for o in overrides)
        shape = CONF_DIR / "experiment_model" / f"{exp}_{model}.yaml"
        if shape.exists():  # the experiment's own network shape for this model was applied
            for key, value in _shape(shape).items():
                assert cfg.model[key] == value, (overrides, key)


def _shape(path) -> dict:
    """An experiment_model file's keys, with those of the files its defaults list names."""
    own = yaml.safe_load(path.read_text()) or {}
    merged: dict = {}
    for name in own.pop("defaults", []):
        merged.update(_shape(path.with_name(f"{name}.yaml")))
    return {**merged, **own}


def test_defaults_match_the_contract():
    cfg = make_cfg(tiny=False)
    assert cfg.seed == 0 and cfg.resume is None and cfg.tracking.uri is None
    assert cfg.experiment_name == "digits-mlp"
    r = cfg.regularization
    assert list(r.layers) == ["*"] and list(r.exclude) == [] and r.include_bias is False
    assert list(r.types) == ["Linear", "Conv1d", "Conv2d"]
    assert r.normalize == "batch" and r.mode == "loss" and r.name == "l2"
    assert make_cfg("regularization=none", tiny=False).regularization.lam == 0.0
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.devices == 1
    assert make_cfg("data=cifar10", "model=cnn", tiny=False).experiment_name == "cifar10-cnn"


def test_experiment_overlay_needs_no_plus_and_defines_the_grid():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=lambda_sweep"], return_hydra_config=True)
    assert cfg.data.train_size == 200
    params = cfg.hydra.sweeper.params
    lams = [float(x) for x in str(params["regularization.lam"]).split(",")]
    assert lams[0] == 0 and lams == sorted(lams) and len(lams) >= 5
    assert str(params.seed) == "0,1,2"


def test_lam_per_layer_from_the_command_line():
    cfg = make_cfg("+regularization.lam_per_layer.fc1=0.2", tiny=False)
    assert dict(cfg.regularization.lam_per_layer) == {"fc1": 0.2}


def test_cfg_job_and_help_work_as_in_any_hydra_app(tmp_path):
    r = run_cli("l2lab.train", "--cfg", "job", "regularization.lam=0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["regularization"]["lam"] == 0.5
    r = run_cli("l2lab.train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "regularization" in r.stdout
    assert not (tmp_path / "mlruns").exists()  # neither trains nor touches a store


# -- typed configs: a wrong type fails at composition, naming the key (one case per group) -----
@pytest.mark.parametrize("override, key", [
    ("data.batch_size=1.5", "data.batch_size"),
    ("data.download=maybe", "data.download"),
    ("model.hidden=[a,b]", "model.hidden"),
    ("model=cnn model.channels=[1.5]", "model.channels"),
    ("regularization.lam=abc", "regularization.lam"),
    ("+regularization.lam_per_layer.fc1=abc", "regularization.lam_per_layer.fc1"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("optimizer=adam optimizer.amsgrad=sometimes", "optimizer.amsgrad"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs"),
    ("seed=1.5", "seed"),
    ("reuse=perhaps", "reuse"),
])
def test_a_wrong_type_fails_at_composition_naming_the_key(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        make_cfg(*override.split(), tiny=False)
    text = f"{e.value} {e.value.__cause__}"
    assert key in text, text


# -- ranges: checked right after composition, before torch/Lightning/MLflow --------------------
@pytest.mark.parametrize("override, words", [
    ("regularization.lam=-0.1", ["regularization.lam", ">= 0"]),
    ("regularization.lam=inf", ["regularization.lam", "finite"]),
    ("+regularization.lam_per_layer.fc1=-1", ["regularization.lam_per_layer.fc1", ">= 0"]),
    ("regularization.normalize=mean", ["regularization.normalize", "batch, dataset, none"]),
    ("regularization.mode=decay", ["regularization.mode", "loss, optimizer"]),
    ("regularization.types=[Dense]", ["regularization.types", "Linear, Bilinear, Conv1d",
                                      "Conv*, BatchNorm*", "'Dense'"]),
    ("regularization.min_params=-1", ["regularization.min_params", ">= 0"]),
    ("data.name=svhn", ["data.name", "digits"]),
    ("data.train_size=0", ["data.train_size", ">= 1"]),
    ("data.val_size=-3", ["data.val_size", ">= 0"]),
    ("data.batch_size=0", ["data.batch_size", ">= 1"]),
    ("model.activation=swish", ["model.activation", "relu"]),
    ("model.dropout=1.0", ["model.dropout", "[0, 1)"]),
    ("model.hidden=[0]", ["model.hidden", ">= 1"]),
    ("optimizer.lr=0", ["optimizer.lr", "> 0"]),
    ("optimizer.weight_decay=0.1", ["optimizer.weight_decay", "regularization.mode"]),
    ("trainer.max_epochs=0", ["trainer.max_epochs", ">= 1"]),
    ("trainer.accelerator=quantum", ["trainer.accelerator", "auto, cpu, gpu"]),
    ("trainer.devices=0", ["trainer.devices", ">= 1"]),
    ("seed=-1", ["seed", ">= 0"]),
])
def test_range_checks_name_the_key_and_the_allowed_values(override, words):
    cfg = make_cfg(override, tiny=False)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides", PRESETS, ids=" ".join)
def test_every_preset_passes_the_range_checks(overrides):
    validate(make_cfg(*overrides, tiny=False))


# -- unknown keys: refused before anything runs, with the closest valid key ------------------
@pytest.mark.parametrize("override, suggestion, listed", [
    ("regularization.lamda=0.1", "regularization.lam", "lam_per_layer"),
    ("+regularization.lamda=0.1", "regularization.lam", "normalize"),
    ("data.trainsize=100", "data.train_size", "batch_size"),
    ("+model.hiden=[3]", "model.hidden", "dropout"),
    ("optimizer.momentun=0.5", "optimizer.momentum", "lr"),
    ("+trainer.max_epoch=3", "trainer.max_epochs", "accelerator"),
    ("regularisation.lam=0.1", "regularization.lam", "(no such group)"),
    ("sed=1", "seed", "experiment_name"),
    ("+tracking.url=x", "tracking.uri", "uri"),
])
def test_unknown_keys_are_refused_with_a_suggestion(override, suggestion, listed):
    with pytest.raises(ConfigError) as e:
        check_overrides([override, "regularization.lam=0.1"])
    text = str(e.value)
    assert f"Did you mean `{suggestion}`" in text and listed in text, text
    assert "Nothing was run" in text


def test_known_keys_launchers_sweeps_and_plus_entries_pass_the_key_check():
    check_overrides(["+regularization.lam_per_layer.fc1=0.2", "+regularization.lam_per_layer.*=1",
                     "regularization.lam=0,1e-3,tag(log, interval(1e-4, 3))",
                     "model=mlp,cnn", "model.hidden=[8]", "hydra/launcher=parallel",
                     "hydra.launcher.n_jobs=2", "hydra.sweep.dir=x", "experiment=lambda_sweep",
                     "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "trainer.max_epochs=2",
                     "reuse=true", "resume=abc", "tracking.uri=sqlite:///x.db", "seed=0,1"])
    check_overrides(["model=cnn", "model.channels=[4]"])  # a key of the chosen option
    with pytest.raises(ConfigError, match="model.channels"):
        check_overrides(["model.channels=[4]"])  # not a key of the default mlp
    with pytest.raises(ConfigError, match="lam_per_layer.fc1.x"):
        check_overrides(["+regularization.lam_per_layer.fc1.x=1"])  # only one level below


def test_cli_overrides_skips_flags_and_their_values():
    argv = ["-m", "--cfg", "job", "a.b=1", "-cn", "train", "--package", "x", "c=2", "--help"]
    assert cli_overrides(argv) == ["a.b=1", "c=2"]


def test_help_explains_the_harness_and_lists_every_option(tmp_path):
    r = run_cli("l2lab.train", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for words in ("overfitting versus L2 strength", "== Main keys ==", "regularization.lam",
                  "-m regularization.lam=", "resume=RUN_ID", "trainer.max_epochs=N",
                  "make ui", "mlruns/mlflow.db", "multirun/", "--format csv|json",
                  "experiment=lambda_search", "+regularization.lam_per_layer"):
        assert words in out, words
    for group in ("data", "model", "regularization", "optimizer", "experiment",
                  "hydra/launcher"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(group + ":"))
        for yaml_file in (CONF_DIR / group).glob("*.yaml"):
            assert yaml_file.stem in line, (group, yaml_file.stem, line)
    assert "optuna" in out and not (tmp_path / "mlruns").exists()


# python -m l2lab.train exits through lifecycle.run_as_program (os._exit after the atexit
# handlers): what it imported is read in an atexit handler, its status from the process.
FAST_PROBE = """
import atexit, runpy, sys
sys.argv = ["l2lab.train", *sys.argv[1:]]
heavy = lambda: [m for m in ("torch", "pytorch_lightning", "mlflow") if m in sys.modules]
atexit.register(lambda: print("HEAVY=" + ",".join(heavy()), file=sys.stderr))
runpy.run_module(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("args, code, words", [
    (["--help"], 0, []),
    (["--cfg", "job", "regularization.lam=0.5"], 0, []),
    (["regularization.lam=-1"], 2, ["regularization.lam must be a finite number >= 0"]),
    (["trainer.max_epochs=0"], 2, ["trainer.max_epochs must be an integer >= 1, got 0"]),
    (["+regularization.lamda=0.1"], 2, ["Did you mean `regularization.lam`"]),
    (["data.batch_size=1.5"], 2, ["data.batch_size=1.5 has the wrong type",
                                  "could not be converted to Integer"]),
    # in a sweep every value is checked first: Hydra would stop at the bad job, parent RUNNING
    (["-m", "data.batch_size=64,1.5"], 2, ["data.batch_size=1.5 has the wrong type"]),
])
def test_fast_paths_import_neither_torch_lightning_nor_mlflow(tmp_path, args, code, words):
    """--help, --cfg and a bad config are answered without the heavy imports (the time this
    saves is measured by scripts/startup_times.py, not asserted here), and create no run."""
    r = subprocess.run([sys.executable, "-c", FAST_PROBE, *args], cwd=tmp_path, text=True,
                       capture_output=True, timeout=300)
    assert "HEAVY=\n" in r.stderr and r.returncode == code, (r.returncode, r.stderr[-2000:])
    for w in words:
        assert w in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "mlruns").exists()


def test_import_l2lab_stays_light():
    code = ("import sys, l2lab, l2lab.train, l2lab.run.sweep, l2lab.compare, l2lab.reproduce; "
            "print([m for m in ('torch', 'mlflow', 'pandas', 'matplotlib') if m in sys.modules])")
    assert python_c(code).strip() == "[]"


def test_each_rule_is_written_once_and_the_configs_follow_it():
    """core.rules is the one list of datasets, networks, activations and layer types: every
    data and model preset is in it, and the code builds what it lists."""
    from torch import nn

    from l2lab.base import CONF_DIR
    from l2lab.core import rules
    from l2lab.core.data import _TORCHVISION

    assert {p.stem for p in (CONF_DIR / "data").glob("*.yaml")} == set(rules.DATASETS)
    # load_data's branches
    assert set(rules.DATASETS) == {"digits", "mnist1d", "imagefolder", *_TORCHVISION}
    targets = {p.stem: OmegaConf.load(p)._target_ for p in (CONF_DIR / "model").glob("*.yaml")
               if p.stem != "custom"}  # custom: the researcher names it (model._target_=...)
    assert targets == rules.NETWORKS
    assert all(isinstance(getattr(nn, c)(), nn.Module) for c in rules.ACTIVATIONS.values())
    assert all(issubclass(getattr(nn, t), nn.Module) for t in rules.LAYER_TYPES)
    assert rules.network_error("l2lab.models.MLP") is None
    assert rules.network_error("mylab.nets.TinyNet") is None  # any class, built and checked later
    assert "model=mlp, model=cnn, model=resnet18, model=resnet1d" in rules.network_error("relu")
    assert all(rules.type_error(t) is None for t in (*rules.LAYER_TYPES, "Conv*", "BatchNorm*"))
    assert all(issubclass(getattr(nn, t), nn.Module) for t in rules.SELECTABLE_TYPES)

"""Hydra composition: every preset composes, and the CLI behaves as any Hydra app."""

from __future__ import annotations

import pytest
import yaml
from conftest import make_cfg, run_cli
from hydra import compose, initialize_config_dir

from l2lab import CONF_DIR


@pytest.mark.parametrize("group, options", [
    ("data", ["digits", "mnist1d", "mnist", "fashion_mnist", "cifar10"]),
    ("model", ["mlp", "cnn"]),
    ("regularization", ["l2", "none", "l2_dense", "l2_hidden"]),
    ("optimizer", ["sgd", "adam", "adamw"]),
])
def test_every_preset_composes(group, options):
    for opt in options:
        cfg = make_cfg(f"{group}={opt}", tiny=False)
        assert cfg[group].name == opt


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

"""Trust when reproducing (design.md §6): a logged config may name only code the user trusts,
the default packages plus the prefixes given with ``--trust`` or ``$L2LAB_TRUSTED_TARGETS``,
never prefixes the logged config names itself."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import hydra
import pytest
import torch
from conftest import make_cfg, runs_of

from l2lab import ConfigError, reproduce
from l2lab.train import train

PKG = "trustlab_user"  # the researcher's own package, written under tmp_path

MODEL = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A researcher's own network: flatten -> linear -> relu -> linear."""

    def __init__(self, in_shape, num_classes, hidden=8):
        super().__init__()
        width = 1
        for d in in_shape:
            width *= int(d)
        self.fc = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x.flatten(1))))
'''

PENALTY = '''
from l2lab.core.penalties import L2


class MyL2(L2):
    """A researcher's own penalty class: L2's formula, in their own package."""
'''

USER_MODEL_CONFIG = f"""\
trusted_targets: [{PKG}.]
{reproduce.TRUST_ENV}: {PKG}.
model:
  _target_: {PKG}.models.TinyNet
  hidden: 5
optimizer:
  _target_: torch.optim.SGD
  lr: 0.1
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> Path:
    """``trustlab_user`` (``models.TinyNet``, ``penalties.MyL2``) importable from ``tmp_path``,
    as a researcher's package on PYTHONPATH; forgotten after the test."""
    pkg = tmp_path / "src" / PKG
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(MODEL))
    (pkg / "penalties.py").write_text(textwrap.dedent(PENALTY))
    monkeypatch.syspath_prepend(str(pkg.parent))
    yield pkg
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def _refusal(text: str, trusted=None) -> str:
    with pytest.raises(ConfigError) as e:
        reproduce.safe_config(text, trusted)
    return str(e.value)


def test_the_default_allowlist_is_design_6s():
    assert reproduce.ALLOWED_TARGETS == ("l2lab.", "torch.nn.", "torch.optim.",
                                         "torchvision.models.", "pytorch_lightning.callbacks.")
    cfg = reproduce.safe_config("model:\n  _target_: torchvision.models.resnet18\n",
                                reproduce.trusted_prefixes((), {}))
    assert cfg.model._target_ == "torchvision.models.resnet18"


def test_a_config_naming_os_system_is_refused_and_no_prefix_is_offered():
    msg = _refusal("model:\n  _target_: os.system\n", reproduce.trusted_prefixes((), {}))
    assert msg.startswith("refusing to reproduce: model._target_ = 'os.system' (as written)")
    assert "standard library" in msg and "--trust" not in msg
    assert "\n" not in msg  # one paragraph


def test_an_untrusted_user_prefix_is_refused_naming_the_prefix_to_add():
    msg = _refusal(USER_MODEL_CONFIG, reproduce.trusted_prefixes((), {}))
    assert f"model._target_ = '{PKG}.models.TinyNet' (as written)" in msg
    assert f"add --trust {PKG}.models. or L2LAB_TRUSTED_TARGETS={PKG}.models." in msg
    # the logged config's own trusted_targets / L2LAB_TRUSTED_TARGETS keys trust nothing
    assert reproduce.trusted_prefixes((), {}) == reproduce.ALLOWED_TARGETS
    # a prefix of another package does not cover it; nor does it after resolving
    _refusal(USER_MODEL_CONFIG, reproduce.trusted_prefixes(["trustlab_other."], {}))
    msg = _refusal(f'src: "{{_target_: {PKG}.models.TinyNet}}"\nmodel: ${{oc.create:${{src}}}}\n',
                   reproduce.trusted_prefixes((), {}))
    assert "after resolving interpolations" in msg and f"--trust {PKG}.models." in msg


@pytest.mark.parametrize("how", ["--trust", "env-comma", "env-pathsep"])
def test_a_trusted_user_model_passes_the_check_and_builds(user_package, how):
    """Trusted on the command line or in the environment, the researcher's own class passes,
    and the checked config builds it."""
    if how == "--trust":
        trusted = reproduce.trusted_prefixes([f"{PKG}.models."], {})
    else:
        sep = "," if how == "env-comma" else os.pathsep
        trusted = reproduce.trusted_prefixes(
            (), {reproduce.TRUST_ENV: f" other.pkg.{sep}{PKG}.models.{sep}"})
        assert trusted[-2:] == ("other.pkg.", f"{PKG}.models.")
    cfg = reproduce.safe_config(USER_MODEL_CONFIG, trusted)
    net = hydra.utils.instantiate(cfg.model, in_shape=(1, 8, 8), num_classes=10)
    assert type(net).__module__ == f"{PKG}.models" and net.fc.out_features == 5
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_a_run_of_a_users_own_model_reproduces_exactly_once_trusted(
        user_package, tmp_path, store, client, capsys, monkeypatch):
    """End to end through ``reproduce.main``: a run of the researcher's own network (and own
    penalty class) is refused, naming the prefix to add, with no new run; trusted with
    ``--trust`` for one and ``$L2LAB_TRUSTED_TARGETS`` for the other, it reproduces exactly."""
    model, penalty = f"{PKG}.models.TinyNet", f"{PKG}.penalties.MyL2"
    overrides = ["model=custom", f"model._target_={model}", "+model.hidden=6",
                 f"regularization._target_={penalty}"]
    cfg = make_cfg(f"tracking.uri={store}", "data.train_size=120", "data.val_size=60",
                   "trainer.max_epochs=2", *overrides, tiny=False)
    train(cfg, overrides=overrides, output_dir=tmp_path / "orig")
    (orig,) = runs_of(client)
    rid = orig.info.run_id
    assert orig.data.params["l2.layers"] == "fc,out"
    monkeypatch.delenv(reproduce.TRUST_ENV, raising=False)
    assert reproduce.main([rid, "--check", "--tracking-uri", store,
                           "--trust", f"{PKG}.models."]) == 2
    err = capsys.readouterr().err
    assert f"regularization._target_ = '{penalty}'" in err
    assert f"--trust {PKG}.penalties." in err and "\n" not in err.strip()
    assert not runs_of(client, **{"l2lab.reproduced_from": rid})
    monkeypatch.setenv(reproduce.TRUST_ENV, f"{PKG}.penalties.")
    rc = reproduce.main([rid, "--check", "--tracking-uri", store, "--trust", f"{PKG}.models.",
                         "--out", str(tmp_path / "again")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "CPU, exact" in out and " NO" not in out
    (new,) = runs_of(client, **{"l2lab.reproduced_from": rid})
    assert new.data.metrics == orig.data.metrics and "weights/sq_norm/fc" in new.data.metrics
    assert new.data.params["model._target_"] == model

"""The penalty interface: L1 and elastic net against hand-written formulas and hand-derived
gradients, stacking per network, the plain-loop reference, and core/ standing alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_cfg, reg_cfg, run_cli, runs_of
from mlflow.tracking import MlflowClient

from l2lab import ConfigError
from l2lab.core import reference
from l2lab.core.data import load_data
from l2lab.core.penalties import L1, L2, ElasticNet
from l2lab.core.regularization import Penalty, SelectedLayer, build_penalty
from l2lab.models import MLP
from l2lab.train import train

SRC = Path(__file__).resolve().parents[1] / "src" / "l2lab"
L1_PATH, ELASTIC_PATH = "l2lab.core.penalties.L1", "l2lab.core.penalties.ElasticNet"


@pytest.fixture
def net(float64):
    torch.manual_seed(0)
    return MLP((1, 4, 4), 10, hidden=[12, 8])


@pytest.fixture
def batch(float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 4, 4, generator=g), torch.randint(0, 10, (6,), generator=g)


def _by_hand(net, lams: dict[str, tuple[float, float]], n: float, bias: bool = False):
    """{term: value}: Σ_l (λ₁·Σ|w| , λ₂·Σw²) / n over the named layers."""
    l1 = l2 = 0.0
    for name, (lam1, lam2) in lams.items():
        m = getattr(net, name)
        ps = [m.weight, m.bias] if bias else [m.weight]
        l1 += lam1 * sum(p.detach().abs().sum().item() for p in ps)
        l2 += lam2 * sum((p.detach() ** 2).sum().item() for p in ps)
    return l1 / n, l2 / n


@pytest.mark.parametrize("target, kw, lams, n", [
    (L1_PATH, {}, {"fc1": (0.3, 0), "fc2": (0.3, 0), "out": (0.3, 0)}, 6),
    (L1_PATH, {"exclude": ["out"], "lam_per_layer": {"fc2": 2.0}},
     {"fc1": (0.3, 0), "fc2": (2.0, 0)}, 6),
    (L1_PATH, {"normalize": "dataset"}, {"fc1": (0.3, 0), "fc2": (0.3, 0), "out": (0.3, 0)}, 600),
    (ELASTIC_PATH, {}, {"fc1": (0.15, 0.15), "fc2": (0.15, 0.15), "out": (0.15, 0.15)}, 6),
    (ELASTIC_PATH, {"l1_ratio": 0.2, "layers": ["fc*"], "normalize": "none"},
     {"fc1": (0.06, 0.24), "fc2": (0.06, 0.24)}, 1),
    (ELASTIC_PATH, {"l1_ratio": 1.0, "min_params": 100}, {"fc1": (0.3, 0.0)}, 6),
])
def test_terms_match_the_formula(net, target, kw, lams, n):
    penalty = build_penalty(net, {**reg_cfg(**kw), "_target_": target}, dataset_size=600)
    assert penalty.layer_names == list(lams)
    terms = penalty.terms(6)
    assert list(terms) == list(type(penalty).TERMS)
    l1, l2 = _by_hand(net, lams, n)
    assert terms["l1"].item() == pytest.approx(l1, rel=1e-12)
    if target == ELASTIC_PATH:
        assert terms["l2"].item() == pytest.approx(l2, rel=1e-12, abs=1e-15)
        assert penalty(6).item() == pytest.approx(l1 + l2, rel=1e-12)
    else:
        assert penalty(6).item() == terms["l1"].item()


def test_include_bias_adds_the_bias_terms(net):
    penalty = build_penalty(net, {**reg_cfg(include_bias=True, l1_ratio=0.4),
                                  "_target_": ELASTIC_PATH})
    l1, l2 = _by_hand(net, {k: (0.12, 0.18) for k in ("fc1", "fc2", "out")}, 6, bias=True)
    terms = penalty.terms(6)
    assert terms["l1"].item() == pytest.approx(l1, rel=1e-12)
    assert terms["l2"].item() == pytest.approx(l2, rel=1e-12)


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("target, lam, ratio", [
    (L1_PATH, 0.7, 1.0), (ELASTIC_PATH, 0.7, 0.3), (ELASTIC_PATH, 2.5, 0.5),
    (ELASTIC_PATH, 0.0, 0.5),
])
def test_gradient_is_ce_gradient_plus_sign_and_decay(net, batch, target, lam, ratio):
    """grad(J) − grad(mean CCE) = (λ₁/n)·sign(W) + (2λ₂/n)·W on selected weights (W has no
    zero entry), 0 elsewhere; λ₁ = r·λ, λ₂ = (1 − r)·λ."""
    x, y = batch
    assert all((p != 0).all() for p in net.parameters())
    penalty = build_penalty(net, {**reg_cfg(lam=lam, layers=["fc*"], l1_ratio=ratio),
                                  "_target_": target})
    g_ce = _grads(net, F.cross_entropy(net(x), y))
    g_j = _grads(net, F.cross_entropy(net(x), y) + penalty(len(y)))
    lam1, lam2, n = ratio * lam, (1 - ratio) * lam, len(y)
    for name, p in net.named_parameters():
        diff = g_j[name] - g_ce[name]
        if name in ("fc1.weight", "fc2.weight"):
            want = lam1 / n * torch.sign(p.detach()) + 2 * lam2 / n * p.detach()
            torch.testing.assert_close(diff, want, rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(diff, torch.zeros_like(diff), rtol=0, atol=1e-14)


@pytest.mark.parametrize("target", [L1_PATH, ELASTIC_PATH])
def test_a_penalty_without_decay_form_refuses_optimizer_mode(net, target):
    with pytest.raises(ConfigError) as e:
        build_penalty(net, {**reg_cfg(mode="optimizer"), "_target_": target})
    assert "regularization.mode" in str(e.value) and "['loss']" in str(e.value)


@pytest.mark.parametrize("cfg, words", [
    ({"_target_": ELASTIC_PATH, "l1_ratio": 1.5}, ["regularization.l1_ratio", "[0, 1]"]),
    ({"_target_": "torch.nn.Linear"}, ["regularization._target_", "Penalty"]),
    ({"_target_": "l2lab.core.penalties.Nope"}, ["regularization._target_"]),
    ({"_target_": L1_PATH, "lam": -1}, ["regularization.lam", ">= 0"]),
])
def test_bad_penalty_config_names_the_key(net, cfg, words):
    with pytest.raises(ConfigError) as e:
        build_penalty(net, {**reg_cfg(), **cfg})
    for w in words:
        assert w in str(e.value)


def test_the_default_and_the_presets_name_their_classes(net):
    assert type(build_penalty(net, reg_cfg())) is L2
    for preset, cls in (("l2", L2), ("none", L2), ("l1", L1), ("elastic", ElasticNet),
                        ("decoupled", L2), ("l2_hidden", L2)):
        cfg = make_cfg(f"regularization={preset}")
        assert type(build_penalty(net, cfg.regularization, dataset_size=100)) is cls, preset


@pytest.mark.parametrize("cls, extra", [(L1, [{}, {}, {}]),
                                        (ElasticNet, [{"l1_ratio": r} for r in (0.1, 0.9, 0.5)])])
def test_a_stack_gives_each_network_its_own_terms(float64, cls, extra):
    """K networks, each its own λ, selection, normalize, bias and l1_ratio: the stack's terms
    are each network's own, on CPU exactly."""
    torch.manual_seed(0)
    nets = [MLP((1, 4, 4), 10, hidden=[12, 8]) for _ in range(3)]
    cfgs = [reg_cfg(lam=0.3), reg_cfg(lam=2.0, layers=["fc*"], normalize="none", include_bias=True),
            reg_cfg(lam=0.0, exclude=["fc1"], normalize="dataset")]
    own = [cls.from_config(n, {**c, **e}, dataset_size=50)
           for n, c, e in zip(nets, cfgs, extra, strict=True)]
    stacked = {name: torch.nn.Parameter(torch.stack([n.get_submodule(name).weight.detach()
                                                     for n in nets]))
               for name in ("fc1", "fc2", "out")}
    biases = {name: torch.nn.Parameter(torch.stack([n.get_submodule(name).bias.detach()
                                                    for n in nets]))
              for name in ("fc1", "fc2", "out")}
    selected = [SelectedLayer(name, 0.0, stacked[name], biases[name]) for name in stacked]
    penalty = cls.stack(own, selected)
    assert isinstance(penalty, Penalty) and penalty.lams.shape == (3, 3)
    terms = penalty.terms(6)
    for i, p in enumerate(own):
        for name, value in p.terms(6).items():
            assert terms[name][i].item() == value.item(), (i, name)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")
def test_the_after_step_hook_sees_each_updated_network(tmp_path):
    """A penalty class's ``after_step`` (where a max-norm constraint would project the weights)
    runs after every optimizer step of a fit, on the stack's updated weights."""
    import pytorch_lightning as pl

    from l2lab.core.data import StackedBatches
    from l2lab.core.stacked import StackMember, stack_members

    seen: list[torch.Tensor] = []

    class Watched(L2):
        def after_step(self) -> None:
            seen.append(self.selected[0].weight.detach().clone())

    torch.manual_seed(0)
    nets = [MLP((1, 4, 4), 10, hidden=[8]) for _ in range(2)]
    first = [n.fc1.weight.detach().clone() for n in nets]
    members = [StackMember(n, Watched.from_config(n, reg_cfg(lam=0.1)), torch.Generator(),
                           optimizer={"lr": 0.1}) for n in nets]
    module = stack_members(members, torch.optim.SGD, batch_size=10)
    assert type(module.penalty) is Watched
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 10, (40,))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=StackedBatches(x, y, 10, [0, 1]))
    assert len(seen) == 4 and seen[0].shape == (2, 8, 16)  # 4 steps, the stack of 2
    assert not torch.equal(seen[0][0], first[0]) and not torch.equal(seen[0][1], first[1])
    assert torch.equal(seen[-1], module.net.fc1.weight.detach())
    assert module.epoch_metrics[0]["train/l2"] > 0


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")
def test_a_constraint_without_terms_is_one_class(tmp_path):
    """A max-norm-like constraint (no term; each selected W of each network rescaled into
    ||W||_F <= c after every step) needs no change to the module: train/loss is train/ce."""
    import pytorch_lightning as pl

    from l2lab.core.data import StackedBatches
    from l2lab.core.stacked import StackMember, stack_members

    class Capped(Penalty):
        TERMS = ()

        def terms(self, batch_size, lams=None):
            return {}

        def after_step(self) -> None:
            with torch.no_grad():
                for s in self.selected:
                    norms = s.weight.flatten(1).norm(dim=1).view(-1, 1, 1)
                    s.weight.mul_(torch.clamp(0.5 / norms, max=1.0))

    torch.manual_seed(0)
    nets = [MLP((1, 4, 4), 10, hidden=[8]) for _ in range(2)]
    members = [StackMember(n, Capped.from_config(n, reg_cfg(layers=["fc1"])), torch.Generator(),
                           optimizer={"lr": 0.5}) for n in nets]
    module = stack_members(members, torch.optim.SGD, batch_size=10)
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 10, (40,))
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path)
               ).fit(module, train_dataloaders=StackedBatches(x, y, 10, [0, 1]))
    assert module.net.fc1.weight.detach().flatten(1).norm(dim=1).max() <= 0.5 + 1e-6
    for m in module.epoch_metrics:
        assert m["train/loss"] == m["train/ce"] and not any(
            k.startswith("train/l") and k not in ("train/loss", "train/lr") for k in m)


def test_core_imports_nothing_of_the_layers_above_it():
    """core/ (the science) stands alone: no import of run/, config/, tracking/, report/ or
    compat/ in any core module, at top level or inside a function."""
    above = ("l2lab.run", "l2lab.config", "l2lab.tracking", "l2lab.report", "l2lab.compat")
    found = []
    for path in sorted((SRC / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [(path.name, n) for n in names if n.startswith(above)]
    assert found == []
    # and the rules the config layer reads before torch is imported stay torch-free
    rules = ast.parse((SRC / "core" / "rules.py").read_text())
    imported = {a.name for n in ast.walk(rules) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in ast.walk(rules) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "fnmatch", "math", "re", "l2lab.base"}, imported


@pytest.mark.parametrize("extra", [
    ["regularization=l1", "regularization.lam=0.05"],
    ["regularization=elastic", "regularization.lam=0.2", "regularization.l1_ratio=0.3",
     "+regularization.lam_per_layer.out=0.5"],
    ["regularization=l1", "optimizer=adam", "regularization.normalize=dataset",
     "regularization.include_bias=true"],
], ids=["l1-sgd", "elastic-per-layer", "l1-adam-dataset-bias"])
def test_the_harness_trains_what_the_plain_loop_trains(tmp_path, store, extra):
    """``core.reference`` writes L1 and elastic net out as plain formulas: the harness follows
    it to float rounding, epoch by epoch (the tolerance of the L2 test in test_engine.py)."""
    cfg = make_cfg(f"tracking.uri={store}", "trainer.max_epochs=4", "data.batch_size=40", *extra)
    train(cfg, output_dir=tmp_path / "run")
    (run,) = runs_of(MlflowClient(store))
    _, history = reference.train(cfg, load_data(cfg.data))
    client = MlflowClient(store)
    keys = ["train/ce", "train/l1", "train/loss", "val/ce", "weights/sq_norm_total"]
    if "regularization=elastic" in extra:
        keys.append("train/l2")
    else:
        assert "train/l2" not in run.data.metrics and "train/l2" not in history[-1]
    for key in keys:
        logged = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                          key=lambda m: m.step)]
        assert logged == pytest.approx([m[key] for m in history], rel=1e-5, abs=1e-7), key
    assert history[-1]["train/l1"] > 0
    assert run.data.params["l2.layers"] == "fc1,out" and int(run.data.params["l2.num_params"]) > 0


def test_a_sweep_of_penalties_stacks_per_penalty_and_each_child_is_its_ordinary_run(tmp_path):
    """``-m regularization=l1,l2,elastic regularization.lam=...`` with the vectorized launcher:
    one stack per penalty class (its λ and seeds inside), each child equal to its ordinary run
    (every epoch of every metric, exactly)."""
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    r = run_cli("l2lab.train", "-m", "hydra/launcher=vectorized", "hydra/sweeper=grouped",
                "regularization=l1,l2,elastic", "regularization.lam=0.01,0.3", "seed=0,1",
                *TINY, f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/multirun/v",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(store)
    kids = [c for c in runs_of(client) if c.data.tags.get("l2lab.vectorized_group")]
    assert len(kids) == 12 and all(c.info.status == "FINISHED" for c in kids)
    groups: dict[str, set[str]] = {}
    for c in kids:
        groups.setdefault(c.data.params["regularization.name"], set()).add(
            c.data.tags["l2lab.vectorized_group"])
    assert all(len(g) == 1 for g in groups.values()) and len(set.union(*groups.values())) == 3
    l1 = [c for c in kids if c.data.params["regularization.name"] == "l1"]
    assert all("train/l1" in c.data.metrics and "train/l2" not in c.data.metrics for c in l1)
    el = [c for c in kids if c.data.params["regularization.name"] == "elastic"]
    assert all({"train/l1", "train/l2"} <= c.data.metrics.keys() for c in el)
    # two children, one per new penalty, against their ordinary runs
    for child in (l1[-1], el[-1]):
        params = child.data.params
        ov = [f"regularization={params['regularization.name']}",
              f"regularization.lam={params['regularization.lam']}", f"seed={params['seed']}"]
        train(make_cfg(f"tracking.uri={store}", *ov), overrides=ov,
              output_dir=tmp_path / f"ordinary-{params['regularization.name']}")
        (ordinary,) = [c for c in runs_of(client) if c.data.tags["l2lab.output_dir"] ==
                       str(tmp_path / f"ordinary-{params['regularization.name']}")]
        assert ordinary.data.metrics.keys() == child.data.metrics.keys()
        for key in child.data.metrics:
            want = [(m.step, m.value) for m in client.get_metric_history(ordinary.info.run_id,
                                                                         key)]
            got = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(got) == sorted(want), key


def test_a_penalty_is_part_of_a_runs_identity_and_l2_keeps_the_one_it_had():
    """``reuse`` finds runs by config hash: an L1 run is not an L2 run of the same λ, and an L2
    run hashes as it did before presets named their class (no ``_target_``)."""
    from omegaconf import OmegaConf

    from l2lab.tracking.runs import config_hash

    l2, l1 = (OmegaConf.to_container(make_cfg(*o, "regularization.lam=0.1"), resolve=True)
              for o in ((), ("regularization=l1",)))
    before = {**l2, "regularization": {k: v for k, v in l2["regularization"].items()
                                       if k != "_target_"}}
    assert config_hash(l2) == config_hash(before)
    assert config_hash(l1) != config_hash(l2)
    l1["regularization"]["name"] = "l2"  # the class alone tells them apart
    assert config_hash(l1) != config_hash(l2)

"""The penalty and its gradient against hand-written formulas of the note."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import reg_cfg
from torch import nn

from l2lab import ConfigError
from l2lab.core.regularization import build_penalty, select_layers
from l2lab.models import CNN, MLP

pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons of the maths


@pytest.fixture
def net():
    torch.manual_seed(0)
    return MLP((1, 4, 4), 10, hidden=[12, 8])  # fc1: 12x16=192, fc2: 8x12=96, out: 10x8=80


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 4, 4, generator=g), torch.randint(0, 10, (6,), generator=g)


def _objective(net, penalty, batch):
    x, y = batch
    return F.cross_entropy(net(x), y) + penalty(len(y))


def _by_hand(net, batch, lams: dict[str, float], n: float, bias: bool = False):
    x, y = batch
    logits = net(x)
    ce = -torch.log_softmax(logits, 1)[torch.arange(len(y)), y].sum() / len(y)
    pen = 0.0
    for name, lam in lams.items():
        m = getattr(net, name)
        sq = (m.weight ** 2).sum() + ((m.bias ** 2).sum() if bias else 0.0)
        pen = pen + lam * sq
    return ce + pen / n


@pytest.mark.parametrize("kw, lams, n", [
    ({}, {"fc1": 0.3, "fc2": 0.3, "out": 0.3}, 6),                      # all layers
    ({"layers": ["fc*"]}, {"fc1": 0.3, "fc2": 0.3}, 6),                # by pattern
    ({"exclude": ["out"]}, {"fc1": 0.3, "fc2": 0.3}, 6),               # exclusion
    ({"min_params": 96}, {"fc1": 0.3, "fc2": 0.3}, 6),                 # min_params (note's dense)
    ({"min_params": 100}, {"fc1": 0.3}, 6),
    ({"lam_per_layer": {"fc1": 0.05, "o*": 2.0}}, {"fc1": 0.05, "fc2": 0.3, "out": 2.0}, 6),
    ({"normalize": "dataset"}, {"fc1": 0.3, "fc2": 0.3, "out": 0.3}, 600),
    ({"normalize": "none"}, {"fc1": 0.3, "fc2": 0.3, "out": 0.3}, 1),
])
def test_total_loss_matches_the_note(net, batch, kw, lams, n):
    penalty = build_penalty(net, reg_cfg(**kw), dataset_size=600)
    assert penalty.layer_names == list(lams)
    got = _objective(net, penalty, batch)
    want = _by_hand(net, batch, lams, n)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # and the penalty alone, against plain numbers
    sq = {k: (getattr(net, k).weight ** 2).sum().item() for k in lams}
    assert penalty(6).item() == pytest.approx(sum(lams[k] * sq[k] for k in lams) / n, rel=1e-12)


def test_include_bias_adds_bias_squares(net, batch):
    penalty = build_penalty(net, reg_cfg(include_bias=True))
    want = _by_hand(net, batch, {"fc1": 0.3, "fc2": 0.3, "out": 0.3}, 6, bias=True)
    assert _objective(net, penalty, batch).item() == pytest.approx(want.item(), rel=1e-12)
    assert penalty.num_params == sum(p.numel() for p in net.parameters())


def test_short_last_batch_uses_its_own_n(net, batch):
    penalty = build_penalty(net, reg_cfg())
    assert penalty(6).item() == pytest.approx(penalty(3).item() / 2, rel=1e-12)


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("lam", [0.0, 0.1, 2.5])
def test_gradient_is_ce_gradient_plus_2_lam_over_n_w(net, batch, lam):
    """grad(J) - grad(mean CCE) = (2λ/n)·W on selected weights, 0 elsewhere."""
    x, y = batch
    penalty = build_penalty(net, reg_cfg(lam=lam, layers=["fc*"]))
    g_ce = _grads(net, F.cross_entropy(net(x), y))
    g_j = _grads(net, _objective(net, penalty, batch))
    for name, p in net.named_parameters():
        diff = g_j[name] - g_ce[name]
        if name in ("fc1.weight", "fc2.weight"):
            torch.testing.assert_close(diff, 2 * lam / len(y) * p.detach(), rtol=1e-10, atol=1e-12)
        else:  # non-selected layer and biases: gradient independent of λ
            torch.testing.assert_close(diff, torch.zeros_like(diff), rtol=0, atol=1e-14)


def test_softmax_regression_matches_the_analytic_gradient():
    """One linear layer + softmax: ∂J/∂W = (A − Y_onehot)ᵀX/n + (2λ/n)W (the note, corrected)."""
    torch.manual_seed(3)
    layer = nn.Linear(5, 4, bias=False)
    model = nn.Sequential()
    model.add_module("out", layer)
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    lam, n = 0.7, 7
    penalty = build_penalty(model, reg_cfg(lam=lam))
    loss = F.cross_entropy(model(x), y) + penalty(n)
    loss.backward()
    a = torch.softmax(x @ layer.weight.detach().T, dim=1)
    y1 = F.one_hot(y, 4).to(a.dtype)
    analytic = (a - y1).T @ x / n + 2 * lam / n * layer.weight.detach()
    torch.testing.assert_close(layer.weight.grad, analytic, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_loss_and_optimizer_modes_train_identically(batch, opt):
    """Coupled weight_decay = 2λ/n is the penalty's gradient: same weights after several steps."""
    torch.manual_seed(0)
    net_a = MLP((1, 4, 4), 10, hidden=[12, 8])
    net_b = copy.deepcopy(net_a)
    pen_a = build_penalty(net_a, reg_cfg(lam=0.4, exclude=["out"], lam_per_layer={"fc2": 1.0}))
    pen_b = build_penalty(net_b, reg_cfg(lam=0.4, exclude=["out"], lam_per_layer={"fc2": 1.0},
                                      mode="optimizer"))
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt == "sgd" else \
        (lambda p: torch.optim.Adam(p, lr=0.01))
    opt_a = make(net_a.parameters())
    opt_b = make(pen_b.param_groups(net_b, batch_size=6))
    x, y = batch
    for _ in range(8):
        opt_a.zero_grad()
        (F.cross_entropy(net_a(x), y) + pen_a(6)).backward()
        opt_a.step()
        opt_b.zero_grad()
        F.cross_entropy(net_b(x), y).backward()
        opt_b.step()
    for (k, a), (_, b) in zip(net_a.named_parameters(), net_b.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=k)
    # the weights did move, and differ from an unregularized run
    assert not torch.allclose(net_a.fc1.weight, MLP((1, 4, 4), 10, hidden=[12, 8]).fc1.weight)


def test_param_groups_decay_each_parameter_once(net):
    penalty = build_penalty(net, reg_cfg(lam=0.5, lam_per_layer={"out": 0.1}, normalize="dataset"),
                            dataset_size=100)
    groups = penalty.param_groups(net, batch_size=10)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # each exactly once
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(net.fc1.weight)] == pytest.approx(2 * 0.5 / 100)
    assert wd[id(net.out.weight)] == pytest.approx(2 * 0.1 / 100)
    assert wd[id(net.fc1.bias)] == 0.0


def test_cnn_layer_names_and_selection_by_type():
    net = CNN((3, 32, 32), 10)
    sel = select_layers(net, lam=0.1, types=["Conv2d"])
    assert [s.name for s in sel] == ["conv1", "conv2"]
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert CNN((1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert CNN((1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("kw, words", [
    ({"lam": -1.0}, ["regularization.lam", ">= 0"]),
    ({"lam": float("nan")}, ["regularization.lam", "finite"]),
    ({"layers": ["conv*"]}, ["regularization.layers", "'conv*'", "fc1, fc2, out"]),
    ({"lam_per_layer": {"fc9": 0.1}}, ["regularization.lam_per_layer", "'fc9'", "fc1, fc2, out"]),
    ({"types": ["Dense"]}, ["regularization.types", "'Dense'", "Linear"]),
    ({"normalize": "mean"}, ["regularization.normalize", "batch", "dataset", "none"]),
    ({"mode": "decay"}, ["regularization.mode", "loss", "optimizer"]),
    ({"min_params": 10**9}, ["selects no layer", "fc1, fc2, out"]),
])
def test_bad_selection_names_the_key_and_the_choices(net, kw, words):
    with pytest.raises(ConfigError) as e:
        build_penalty(net, reg_cfg(**kw))
    for w in words:
        assert w in str(e.value)

"""``l2lab.models.MLP``/``CNN`` stay what every logged run names: the same layer names, the same
initial weights from a seed and the same outputs.

The numbers below were recorded from the networks as they were before their dense head was built
in one place (commit 05e458b); a change that renames, reorders or re-initialises a layer, or moves
the activation or dropout, fails here. Initial weights come from torch's seeded CPU generator (the
same on every machine); the forward pass is compared to 1e-5, which rounding on any CPU meets.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import get_class

from l2lab import ConfigError
from l2lab.models import CNN, MLP

CASES = {  # name: (network, input shape, arguments)
    "mlp": (MLP, (1, 8, 8), {"hidden": [32, 16]}),
    "mlp_no_hidden": (MLP, (1, 8, 8), {"hidden": []}),
    "mlp_tanh_dropout": (MLP, (1, 40), {"hidden": [24, 12], "activation": "tanh",
                                         "dropout": 0.2}),
    "cnn_digits": (CNN, (1, 8, 8), {"channels": [8, 16], "hidden": [32], "dropout": 0.1}),
    "cnn_mnist1d": (CNN, (1, 40), {"channels": [25, 25, 25], "kernel_size": [5, 3, 3],
                                   "stride": 2, "padding": 1, "pool": False, "pooled": None,
                                   "hidden": []}),
}

# name: (submodules in order, (parameter, shape, sum of its initial values), the first two
# rows' first three logits, the sum of all 4x10 logits) of a train-mode forward pass
RECORDED = {
    "mlp": (
        ["act", "drop", "fc1", "fc2", "out"],
        [("fc1.weight", (32, 64), -0.357721), ("fc1.bias", (32,), 0.001947),
         ("fc2.weight", (16, 32), -1.905031), ("fc2.bias", (16,), -0.116473),
         ("out.weight", (10, 16), -1.490384), ("out.bias", (10,), 0.407764)],
        [-0.161508, -0.192532, 0.028857, 0.036843, -0.122054, 0.051519], 1.238348),
    "mlp_no_hidden": (
        ["act", "drop", "out"],
        [("out.weight", (10, 64), -0.728989), ("out.bias", (10,), -0.068216)],
        [-0.217822, -0.124731, 0.025315, 0.053105, -0.439412, 0.194881], 1.3956),
    "mlp_tanh_dropout": (
        ["act", "drop", "fc1", "fc2", "out"],
        [("fc1.weight", (24, 40), 0.178597), ("fc1.bias", (24,), 0.106591),
         ("fc2.weight", (12, 24), -3.018437), ("fc2.bias", (12,), 0.057195),
         ("out.weight", (10, 12), 1.705375), ("out.bias", (10,), 0.559683)],
        [0.358105, -0.141143, 0.25093, -0.354346, 0.135842, 0.299615], 2.902056),
    "cnn_digits": (
        ["act", "drop", "conv1", "conv2", "pool", "squeeze", "fc1", "out"],
        [("conv1.weight", (8, 1, 3, 3), -0.890139), ("conv1.bias", (8,), 0.589981),
         ("conv2.weight", (16, 8, 3, 3), -1.821908), ("conv2.bias", (16,), -0.490423),
         ("fc1.weight", (32, 256), 2.320677), ("fc1.bias", (32,), -0.139439),
         ("out.weight", (10, 32), -0.061081), ("out.bias", (10,), 0.168871)],
        [0.09772, 0.174835, 0.092409, 0.08699, 0.144689, 0.092529], 0.648061),
    "cnn_mnist1d": (
        ["act", "drop", "conv1", "conv2", "conv3", "pool", "out"],
        [("conv1.weight", (25, 1, 5), -1.702467), ("conv1.bias", (25,), -0.586071),
         ("conv2.weight", (25, 25, 3), -0.212073), ("conv2.bias", (25,), 0.378831),
         ("conv3.weight", (25, 25, 3), -3.574405), ("conv3.bias", (25,), -0.238465),
         ("out.weight", (10, 125), -1.1956), ("out.bias", (10,), 0.369262)],
        [-0.005327, 0.082253, 0.144045, 0.03184, 0.07663, 0.137705], 2.254156),
}


@pytest.mark.parametrize("name", CASES)
def test_layer_names_initial_weights_and_outputs_are_as_recorded(name):
    cls, shape, kwargs = CASES[name]
    modules, params, logits, total = RECORDED[name]
    torch.manual_seed(0)
    net = cls(shape, 10, **kwargs)
    assert [n for n, _ in net.named_modules()][1:] == modules
    got = [(n, tuple(p.shape), float(p.detach().double().sum())) for n, p in
           net.named_parameters()]
    assert [g[:2] for g in got] == [p[:2] for p in params]
    assert [g[2] for g in got] == pytest.approx([p[2] for p in params], abs=1e-6)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # train mode: dropout's masks come from this seed
    with torch.no_grad():
        y = net(x)
    assert y.shape == (4, 10)
    assert y[:2, :3].flatten().tolist() == pytest.approx(logits, abs=1e-5)
    assert float(y.double().sum()) == pytest.approx(total, abs=1e-5)


def test_logged_targets_still_resolve():
    """Every logged config names ``l2lab.models.MLP``/``CNN`` as its ``_target_``."""
    assert get_class("l2lab.models.MLP") is MLP and get_class("l2lab.models.CNN") is CNN


@pytest.mark.parametrize("cls, shape", [(MLP, (1, 8, 8)), (CNN, (1, 8, 8))])
def test_both_networks_refuse_a_dropout_outside_0_1(cls, shape):
    with pytest.raises(ConfigError, match=r"model.dropout must be in \[0, 1\)"):
        cls(shape, 10, dropout=1.0)
    with pytest.raises(ConfigError, match="model.activation must be one of"):
        cls(shape, 10, activation="swish")

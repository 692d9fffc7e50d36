"""Any network: the researcher's own model and torchvision's, built, checked, selected, stacked.

The networks of a researcher's own package are written into ``tmp_path`` and imported from there,
as a package outside l2lab would be.
"""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
from conftest import make_cfg, run_cli, runs_of
from mlflow.tracking import MlflowClient
from torch import nn

from l2lab.base import ConfigError
from l2lab.core.networks import check_output, network_factory
from l2lab.core.regularization import compact_names, select_layers
from l2lab.core.stacked import NotStackable, stack_networks
from l2lab.models import ResNet1d, resnet18
from l2lab.train import train

OWN = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A researcher's own network: it takes the data's facts by the names it chooses."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU())
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


class Scaled(nn.Module):
    """A layer l2lab does not stack: a parameter of its own beside its child."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.inner = nn.Linear(width, width)

    def forward(self, x):
        return self.inner(x) * self.scale


class WithScaled(nn.Module):
    def __init__(self, in_shape, num_classes: int) -> None:
        super().__init__()
        width = int(torch.tensor(in_shape).prod())
        self.mid = Scaled(width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.mid(x.flatten(1))))


class Centred(nn.Module):
    """Mixes the rows of its batch: subtracts the batch mean."""

    def __init__(self, in_shape, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x - x.mean(0))


class Noisy(nn.Module):
    """Draws from torch's global generator in its forward."""

    def __init__(self, in_shape, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)

    def forward(self, x):
        return self.fc(torch.nn.functional.dropout(x.flatten(1), 0.2, self.training))


def wrong_output(in_shape, num_classes):
    return nn.Flatten()


def not_a_network(in_shape, num_classes):
    return 42
'''


@pytest.fixture
def own_package(tmp_path, monkeypatch):
    """``mylab.nets``: a package of the researcher's own, importable from ``tmp_path``."""
    pkg = tmp_path / "pkgs" / "mylab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(OWN))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    return tmp_path / "pkgs"


# -- building --------------------------------------------------------------------------------
def test_the_data_reaches_a_constructor_under_the_names_it_accepts(own_package):
    make = network_factory({"_target_": "mylab.nets.TinyNet", "name": "tiny", "width": 8})
    net = make((1, 8, 8), 10)
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert net.head.in_features == 8
    make = network_factory({"_target_": "l2lab.models.ResNet1d", "channels": [4, 8]})
    assert make((1, 40), 10)(torch.zeros(2, 1, 40)).shape == (2, 10)


@pytest.mark.parametrize("model, says", [
    ({"_target_": "nolab.nets.Net"}, "no module named 'nolab'"),
    ({"_target_": "mylab.nets.Missing"}, "module mylab.nets has no Missing"),
    ({"_target_": "mylab.nets.TinyNet", "hidden": [32]},
     "model.hidden: mylab.nets.TinyNet does not accept hidden; it accepts in_channels, "
     "num_classes, width"),
    ({"_target_": "mylab.nets.not_a_network"}, "returned a int, not an nn.Module"),
    ({"_target_": "torch.nn.functional.relu"}, "needs input, which neither the config nor"),
])
def test_a_network_that_cannot_be_built_is_one_paragraph_naming_why(own_package, model, says):
    with pytest.raises(ConfigError, match=None) as e:
        network_factory(model)((1, 8, 8), 10)
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_a_network_whose_output_is_not_batch_by_classes_is_refused():
    net = nn.Sequential(nn.Flatten())
    with pytest.raises(ConfigError, match=r"must return logits of shape \(batch, classes\) = "
                                          r"\(2, 10\).*returned \(2, 64\)"):
        check_output(net, torch.zeros(5, 1, 8, 8), 10, "mylab.nets.wrong_output")
    ok = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.5))
    state = torch.get_rng_state()
    check_output(ok, torch.zeros(5, 1, 8, 8), 10, "ok")
    assert ok.training and torch.equal(state, torch.get_rng_state())


def test_a_bad_target_stops_the_command_in_one_paragraph_before_training(tmp_path):
    proc = run_cli("l2lab.train", "model=custom", "model._target_=nolab.nets.Net",
                   f"tracking.uri=sqlite:///{tmp_path}/m.db", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "no module named 'nolab'" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    bare = run_cli("l2lab.train", "model=custom", cwd=tmp_path, timeout=60)
    assert bare.returncode == 2 and "model=custom needs the network" in bare.stderr
    own = ["model=custom", "model._target_=mylab.nets.TinyNet"]
    job = run_cli("l2lab.train", *own, "+model.width=16", "--cfg", "job", cwd=tmp_path,
                  timeout=60)
    assert job.returncode == 0 and "width: 16" in job.stdout  # its own keys are open
    plain = run_cli("l2lab.train", *own, "model.width=16", cwd=tmp_path, timeout=60)
    assert plain.returncode == 2 and "is added with a +: +model.width=" in plain.stderr


# -- training a network of one's own and torchvision's ------------------------------------------
def test_a_researchers_own_model_trains_and_logs_its_layers(tmp_path, store, own_package):
    cfg = make_cfg(f"tracking.uri={store}", "model=custom", "model._target_=mylab.nets.TinyNet",
                   "+model.width=12", "data.train_size=120", "data.val_size=60",
                   "trainer.max_epochs=2", tiny=False)
    final = train(cfg, output_dir=tmp_path / "run")
    (run,) = runs_of(MlflowClient(store))
    assert run.info.status == "FINISHED" and run.data.params["model._target_"] == \
        "mylab.nets.TinyNet"
    # the default types select the Linear layers, not the LayerNorm (the usual convention)
    assert run.data.params["l2.layers"] == "body.1,head"
    history = MlflowClient(store).get_metric_history(run.info.run_id, "weights/sq_norm/head")
    assert [m.step for m in history] == [0, 1] and final["val/ce"] > 0


def test_resnet18_trains_on_the_digits_with_per_layer_norms(tmp_path, store):
    cfg = make_cfg(f"tracking.uri={store}", "model=resnet18", "data.train_size=64",
                   "data.val_size=32", "data.batch_size=32", "trainer.max_epochs=2", tiny=False)
    train(cfg, output_dir=tmp_path / "run")
    (run,) = runs_of(MlflowClient(store))
    assert run.info.status == "FINISHED"
    layers = run.data.params["l2.layers"].split(",")
    assert layers[0] == "conv1" and "layer4.1.conv2" in layers and layers[-1] == "fc"
    assert not any("bn" in name for name in layers)  # normalization weights: not by default
    assert len(layers) == 21  # 20 convolutions (3 of them shortcuts) and fc
    assert "weights/sq_norm/layer1.0.conv1" in run.data.metrics


def test_resnet18_fits_its_stem_to_the_data():
    assert resnet18((1, 8, 8), 10).conv1.in_channels == 1
    cifar = resnet18((3, 32, 32), 10, cifar_stem=True)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# -- selection on any network ---------------------------------------------------------------------
def test_types_take_patterns_and_match_subclasses_and_norms_only_when_asked():
    net = resnet18((1, 8, 8), 10)
    default = [s.name for s in select_layers(net, lam=1.0)]
    assert "bn1" not in default and "fc" in default
    norms = [s.name for s in select_layers(net, lam=1.0, types=["BatchNorm*"])]
    assert norms[:2] == ["bn1", "layer1.0.bn1"] and len(norms) == 20
    convs = [s.name for s in select_layers(net, lam=1.0, types=["Conv*"], layers=["layer4.*"])]
    assert convs == ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0",
                     "layer4.1.conv1", "layer4.1.conv2"]
    mha = nn.MultiheadAttention(8, 2)  # its out_proj is a subclass of nn.Linear
    assert [s.name for s in select_layers(mha, lam=1.0, types=["Linear"])] == ["out_proj"]


def test_a_pattern_that_matches_nothing_lists_60_layers_compactly():
    net = resnet18((1, 8, 8), 10)
    with pytest.raises(ConfigError) as e:
        select_layers(net, lam=1.0, layers=["layer5.*"])
    msg = str(e.value)
    assert "layer{1-4}.{0,1}.conv{1,2}" in msg and "layer{2-4}.0.downsample.{0,1}" in msg
    assert len(msg) < 300
    assert compact_names(["fc1", "fc2", "out"]) == "fc1, fc2, out"


# -- stacking -------------------------------------------------------------------------------
def _nets(cls, k: int, *args, **kw) -> list[nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(cls(*args, **kw))
    return out


def _gens(k: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(k)]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="no CUDA device"))])
def test_dropout_streams_saved_mid_training_go_on_in_a_fresh_stack_network_by_network(device):
    """What a checkpoint keeps of each network's dropout streams (on CUDA the device's own
    generators, made on first use) restores them into a freshly built stack, where each network
    then draws the masks the first stack draws; another stack's streams are refused."""
    from l2lab.core.module import dropout_streams, load_dropout_streams

    def build(k: int) -> nn.Module:
        torch.manual_seed(0)
        nets = [nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 4),
                              nn.Dropout(p)) for p in (0.5, 0.2)[:k]]
        return stack_networks(nets, _gens(k)).to(device).train()

    x = torch.ones(2 * 5, 6, device=device)
    first = build(2)
    for _ in range(3):  # training moves the streams on
        first(x)
    saved = dropout_streams(first)
    assert [[s["device"] for s in own] for own in saved] == [[device] * 2] * 2
    fresh = build(2)
    assert not torch.equal(fresh(x), first(x))  # from the seeds: other masks
    fresh = build(2)
    load_dropout_streams(fresh, saved)  # the checkpoint's, as a resumed run loads them
    load_dropout_streams(first, saved)
    for _ in range(2):
        assert torch.equal(fresh(x), first(x))
    with pytest.raises(ValueError, match="dropout streams for 2 networks"):
        load_dropout_streams(build(1), saved)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2),
                          nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding="same",
                                                        padding_mode="reflect", bias=False),
                          nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.LayerNorm(16),
                          nn.Linear(16, 3)),
    lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, padding_mode="circular"),
                          nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)),
    # 5 rows × 3 units: 15 elements, a CPU kernel's vector block and scalar tail, which round
    # differently for these four (over all 3 networks' rows at once, 45, the split is another)
    lambda: nn.Sequential(nn.Linear(6, 3), nn.Sigmoid(), nn.Linear(3, 3), nn.SiLU(),
                          nn.Linear(3, 3), nn.ELU(), nn.Linear(3, 3), nn.Softplus(),
                          nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.GELU(),
                          nn.Linear(3, 3)),
], ids=["conv2d-groups-norms", "conv1d-circular-bn", "smooth-activations"])
def test_each_stacked_leaf_computes_its_own_network_exactly(make):
    torch.manual_seed(0)
    nets = [make() for _ in range(3)]
    shape = {nn.Conv2d: (2, 4, 4), nn.Conv1d: (2, 8), nn.Linear: (6,)}[type(nets[0][0])]
    stacked = stack_networks(nets, _gens(3), torch.randn(8, *shape))
    for step in range(2):  # training mode twice (running statistics), then eval
        xs = [torch.randn(5, *shape) for _ in nets]
        out = stacked(torch.cat(xs))
        grads = torch.randn_like(out)
        out.backward(grads)
        for i, (net, x) in enumerate(zip(nets, xs, strict=True)):
            own = net(x)
            assert torch.equal(out[5 * i:5 * (i + 1)], own), (step, i)
            own.backward(grads[5 * i:5 * (i + 1)])  # and each weight's gradient, exactly
            for name, p in net.named_parameters():
                assert torch.equal(stacked.get_parameter(name).grad[i], p.grad), (step, name)
        stacked.zero_grad()
        for net in nets:
            net.zero_grad()
    stacked.eval()
    xs = [torch.randn(5, *shape) for _ in nets]
    out = stacked(torch.cat(xs))
    for i, (net, x) in enumerate(zip(nets, xs, strict=True)):
        assert torch.equal(out[5 * i:5 * (i + 1)], net.eval()(x))
    state = stacked.state_dict()
    for i, net in enumerate(nets):
        for name, t in net.state_dict().items():
            assert torch.equal(state[name][i], t), name  # num_batches_tracked included


def test_a_stacked_linear_layer_reads_each_networks_rows_from_an_aligned_start():
    """19 rows of 30 features: network i's rows start 2,280·i bytes into the stack's input, off
    the 64-byte boundary of a tensor of its own, where F.linear rounds otherwise on some CPUs
    (AVX-512); the layer copies them to an aligned start, so each output is its own network's."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 30), nn.ReLU(), nn.Linear(30, 10)) for _ in range(4)]
    stacked = stack_networks(nets, _gens(4))
    xs = [torch.randn(19, 6) for _ in nets]
    out = stacked(torch.cat(xs))
    for i, (net, x) in enumerate(zip(nets, xs, strict=True)):
        assert torch.equal(out[19 * i:19 * (i + 1)], net(x)), i


@pytest.mark.parametrize("name, why", [
    ("WithScaled", "layer mid (Scaled) holds tensors l2lab does not stack"),
    ("Centred", "depends on the other networks' rows"),
    ("Noisy", "draws from torch's global random generator"),
])
def test_a_network_that_cannot_stack_says_why_and_trains_as_a_stack_of_one(own_package, name,
                                                                             why):
    from mylab import nets as own

    cls = getattr(own, name)
    nets = _nets(cls, 2, (1, 8, 8), 10)
    x = torch.randn(6, 1, 8, 8)
    state, rng = nets[0].state_dict(), torch.get_rng_state()
    with pytest.raises(NotStackable, match=re.escape(why)):
        stack_networks(nets, _gens(2), x)
    assert torch.equal(rng, torch.get_rng_state())
    one = stack_networks(nets[:1], _gens(1), x)  # a stack of one takes any network
    assert {n: t.shape[1:] for n, t in one.state_dict().items()} == \
        {n: t.shape for n, t in state.items()}
    torch.manual_seed(5)
    a = one(x)
    torch.manual_seed(5)
    assert torch.equal(a, nets[0](x))
    a.sum().backward()
    assert all(p.grad is not None for p in one.parameters())


def test_a_resnet1d_with_batchnorm_stacks_and_keeps_each_networks_statistics():
    nets = _nets(ResNet1d, 3, (1, 40), 10)
    stacked = stack_networks(nets, _gens(3), torch.randn(6, 1, 40))
    xs = [torch.randn(4, 1, 40) for _ in nets]
    out = stacked(torch.cat(xs))
    for i, (net, x) in enumerate(zip(nets, xs, strict=True)):
        assert torch.equal(out[4 * i:4 * (i + 1)], net(x))
        assert torch.equal(stacked.layer2[0].bn2.running_var[i], net.layer2[0].bn2.running_var)

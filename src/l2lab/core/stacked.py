"""K networks of one architecture as one stacked network: the layers every run trains with.

Every run is a stack (an ordinary run a stack of one), so these layers are the only kernels l2lab
trains with. A sweep trains K small networks that differ only in per-network settings (their
initialisation and shuffling order, their λ and selection, their optimizer's hyperparameters,
dropout rate and clipping: ``stackable.STACKED``), not in shapes or data. One at a time, they
leave the CPU (and a GPU far more) idle between tiny kernels, and Lightning's per-step overhead
is paid K times. Stacked, every layer runs once for all K (a batched matmul, a grouped
convolution) and the step overhead is paid once.

The K networks stay separate: activations flow as (K·B, ...) with network i's rows at [i·B,
(i+1)·B), no operation mixes the slices, and SGD/Adam/AdamW update each element on its own (one
param group per run of equal settings: ``module.SegmentedOptimizer``), so each network's
gradients, optimizer state and metrics are those it has in a stack of one: on CPU bit for bit
(``tests/test_engine.py``). Dropout draws each network's masks from that network's own
generator, seeded where the global generator stands after the network is built.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from l2lab.core.module import L2Module, SegmentedOptimizer, networks_at
from l2lab.core.regularization import Penalty, SelectedLayer
from l2lab.core.rules import NETWORKS

#: Parameter-free modules that treat every row of the batch on its own.
_ROWWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Identity, nn.Flatten, nn.MaxPool1d,
            nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


class NotStackable(ValueError):
    """The networks cannot be stacked (a layer kind this module does not vectorize)."""


class StackedLinear(nn.Module):
    """K ``nn.Linear`` of one shape: weight (K, out, in).

    On CUDA one batched matmul runs them all. On CPU each network's rows go through its own
    ``F.linear``: the CPU kernels choose their blocking and threading by the problem's size, so a
    batched matmul over K networks may round differently from the same network in a stack of
    one; a matmul per network is the same computation whatever K is.
    """

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.k = len(layers)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        has_bias = layers[0].bias is not None
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers])) \
            if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(self.k, -1, x.shape[-1])
        if x.device.type == "cpu":  # unbind, not [i]: its backward is one stack, where K
            # selects would each scatter into a zero tensor of all K networks (O(K²))
            biases = self.bias.unbind(0) if self.bias is not None else [None] * self.k
            return torch.cat([F.linear(xi, w, b) for xi, w, b in
                              zip(x.unbind(0), self.weight.unbind(0), biases, strict=True)])
        w = self.weight.transpose(1, 2)
        y = torch.baddbmm(self.bias.unsqueeze(1), x, w) if self.bias is not None else x.bmm(w)
        return y.reshape(-1, y.shape[-1])


class StackedConv(nn.Module):
    """K ``nn.Conv1d``/``nn.Conv2d`` of one shape.

    On CUDA one grouped convolution (groups = K) runs them all. On CPU each network's slice goes
    through its own convolution: the grouped kernel's weight gradient sums in another order, and
    training that amplifies rounding (Adam at a high learning rate) then drifts from the ordinary
    run by more than the promised rel 1e-4; a convolution per slice is the ordinary run's exactly.
    """

    def __init__(self, layers: Sequence[nn.Conv1d | nn.Conv2d]) -> None:
        super().__init__()
        first = layers[0]
        if first.groups != 1 or first.padding_mode != "zeros" or isinstance(first.padding, str):
            raise NotStackable(f"{type(first).__name__} with groups/padding_mode/'same' padding")
        self.k = len(layers)
        self.conv = F.conv1d if isinstance(first, nn.Conv1d) else F.conv2d
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers])) \
            if first.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, spatial = self.k, x.shape[2:]
        b = x.shape[0] // k
        args = (self.stride, self.padding, self.dilation)
        if x.device.type == "cpu":  # unbind: see StackedLinear
            xs = x.reshape(k, b, *x.shape[1:]).unbind(0)
            biases = self.bias.unbind(0) if self.bias is not None else [None] * k
            return torch.cat([self.conv(xi, w, bi, *args) for xi, w, bi in
                              zip(xs, self.weight.unbind(0), biases, strict=True)])
        # (K·B, C, ...) -> (B, K·C, ...): network i's channels become group i
        xg = x.reshape(k, b, *x.shape[1:]).transpose(0, 1).reshape(b, -1, *spatial)
        w = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = self.bias.reshape(-1) if self.bias is not None else None
        y = self.conv(xg, w, bias, *args, k)
        return y.reshape(b, k, -1, *y.shape[2:]).transpose(0, 1).reshape(k * b, -1, *y.shape[2:])


class StackedDropout(nn.Module):
    """Dropout with one rate and one generator per network, so that each keeps its own stream.

    On CPU ``F.dropout`` is ``x * bernoulli(1 - p) / (1 - p)`` drawn from the global generator; each
    network's generator starts where the global one stood after that network was built, so the
    masks equal the ordinary run's. A network with rate 0 gets a mask of ones and draws nothing,
    as its ordinary run (x · 1.0 is x). On CUDA the ordinary run uses a fused kernel, so the masks
    differ (statistically the same), as GPU runs differ in rounding anyway.
    """

    def __init__(self, p: float | Sequence[float], generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.generators = list(generators)
        ps = [float(p)] * len(self.generators) if isinstance(p, int | float) else \
            [float(v) for v in p]
        self.ps = ps
        self.p = ps[0] if len(set(ps)) == 1 else None  # one rate for all, or None

    def _generator(self, i: int, device: torch.device) -> torch.Generator:
        g = self.generators[i]
        if g.device != device:  # one seeded generator per network on the training device
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            g = self.generators[i] = torch.Generator(device).manual_seed(seed)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        k = len(self.generators)
        mask = torch.empty_like(x).reshape(k, -1, *x.shape[1:])
        if self.p is not None:
            for i in range(k):
                mask[i].bernoulli_(1.0 - self.p, generator=self._generator(i, x.device))
            return x * mask.div_(1.0 - self.p).reshape(x.shape)
        for i, p in enumerate(self.ps):
            if p == 0.0:
                mask[i].fill_(1.0)
            else:
                mask[i].bernoulli_(1.0 - p, generator=self._generator(i, x.device)).div_(1.0 - p)
        return x * mask.reshape(x.shape)


def stack_networks(nets: Sequence[nn.Module], generators: Sequence[torch.Generator]) -> nn.Module:
    """One network that computes all of ``nets`` at once; same layer names, stacked weights.

    The model's own ``forward`` runs unchanged: only its layers are swapped for stacked ones, so
    anything with an unknown parametrised or row-mixing layer (e.g. BatchNorm) is refused.
    """
    first = nets[0]
    if f"{type(first).__module__}.{type(first).__qualname__}" not in NETWORKS.values():
        raise NotStackable(f"model {type(first).__name__} is not one of l2lab's networks")
    stacked = copy.deepcopy(first)
    for name, module in first.named_modules():
        if not name:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = stacked.get_submodule(parent_name) if parent_name else stacked
        members = [n.get_submodule(name) for n in nets]
        if isinstance(module, nn.Linear):
            setattr(parent, attr, StackedLinear(members))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            setattr(parent, attr, StackedConv(members))
        elif isinstance(module, nn.Dropout):
            setattr(parent, attr, StackedDropout([m.p for m in members], generators))
        elif not isinstance(module, _ROWWISE) or any(True for _ in module.parameters()):
            raise NotStackable(f"layer {name} ({type(module).__name__}) is not vectorized")
    return stacked


def network_weights(stacked_state: dict[str, torch.Tensor], pos: int) -> dict[str, torch.Tensor]:
    """The state dict of the network at stack position ``pos`` (ordinary layer names and
    shapes), copied out of the stack."""
    return {name: v[pos].clone() for name, v in stacked_state.items()}


# -- building a stack from the ordinary pieces -------------------------------------------------
@dataclass
class StackMember:
    """One job's network, built as an ordinary run builds it (its own initialisation and dropout
    rate), its penalty (the layer selection and λ), the generator its dropout draws from, and
    its other per-network settings: the optimizer's hyperparameters, the penalty's mode, the
    gradient clipping (value, algorithm)."""

    net: nn.Module
    penalty: Penalty
    generator: torch.Generator
    optimizer: dict = field(default_factory=dict)
    mode: str = "loss"
    clip: tuple[float | None, str | None] = (None, None)


def stack_members(members: Sequence[StackMember], optimizer_class: type[torch.optim.Optimizer],
                  batch_size: int = 64,
                  replace_optimizer: Callable[[Any, torch.optim.Optimizer], None] | None = None
                  ) -> L2Module:
    """The module that trains ``members`` as one stack: stacked weights, per network its λ per
    layer, its selection, normalize, mode, clipping and optimizer settings. A stack of one is how
    an ordinary run trains.

    The penalty runs over the union of the members' selections, in the network's layer order; a
    layer a member does not select has λ = 0 for it, which adds exact zeros (to the penalty, to
    the gradient), so each member's numbers are those of its own selection.
    ``replace_optimizer`` (trainer, optimizer), the run layer's, lets networks that diverge leave
    the stack mid-fit (:meth:`L2Module.remove`); without it they train on as zeros.
    """
    first = members[0].net
    kinds = {type(m.penalty) for m in members}
    if len(kinds) > 1:
        raise NotStackable(f"the jobs use different penalties: {sorted(c.__name__ for c in kinds)}")
    sizes = {m.penalty.dataset_size for m in members}
    if len(sizes) > 1:
        raise NotStackable(f"the jobs train on different data sizes: {sorted(sizes)}")
    order = [name for name, _ in first.named_modules()]
    chosen = {s.name for m in members for s in m.penalty.selected}
    names = [n for n in order if n in chosen]
    net = stack_networks([m.net for m in members], [m.generator for m in members])
    own = [{s.name: s for s in m.penalty.selected} for m in members]
    with_bias = [any(n in o and o[n].bias is not None for o in own) for n in names]
    selected = [SelectedLayer(n, 0.0, net.get_submodule(n).weight,
                              net.get_submodule(n).bias if b else None)
                for n, b in zip(names, with_bias, strict=True)]
    penalty = kinds.pop().stack([m.penalty for m in members], selected)
    segments: list[tuple[int, int, dict]] = []
    for i, m in enumerate(members):  # runs of equal settings: one param group each
        if segments and segments[-1][2] == m.optimizer:
            segments[-1] = (segments[-1][0], i + 1, m.optimizer)
        else:
            segments.append((i, i + 1, m.optimizer))

    def make_optimizer(stacked: nn.Module) -> torch.optim.Optimizer:
        if len(segments) == 1:
            return optimizer_class(stacked.parameters(), **segments[0][2])
        return SegmentedOptimizer(stacked.parameters(), optimizer_class, segments)

    def restack(positions: Sequence[int], stacked: nn.Module) -> L2Module:
        """The stack of the networks at ``positions``, holding their weights and dropout
        streams as they stand in ``stacked`` (this stack's network, trained on)."""
        smaller = stack_members([members[p] for p in positions], optimizer_class, batch_size,
                                replace_optimizer)
        smaller.to(next(stacked.parameters()).device)
        smaller.net.load_state_dict({name: networks_at(t, positions)
                                     for name, t in stacked.state_dict().items()})
        for old, new in zip(stacked.modules(), smaller.net.modules(), strict=True):
            if isinstance(old, StackedDropout):  # each stream goes on where it stands
                new.generators = [old.generators[p] for p in positions]
        return smaller

    return L2Module(net, penalty, make_optimizer, batch_size=batch_size,
                    modes=[m.mode for m in members], clips=[m.clip for m in members],
                    selections=[m.penalty.layer_names for m in members],
                    restack=restack if replace_optimizer else None,
                    replace_optimizer=replace_optimizer)


def unstack_into(module: L2Module, nets: Sequence[nn.Module]) -> None:
    """Copy each network's trained weights back into its own (ordinary) network (a network that
    left the stack keeps what it had)."""
    state = module.net.state_dict()
    for pos, i in enumerate(module.slots):
        nets[i].load_state_dict(network_weights(state, pos))


def val_batch_size(k: int, rows: int = 65536) -> int:
    """Evaluation chunk: the ordinary 1024 examples while K·1024 rows stay small."""
    return max(1, min(1024, rows // k))


def default_max_models(net: nn.Module, splits, cfg, share: float = 0.5) -> int:
    """How many networks fit in ``share`` of the free memory of the training device.

    Per network: its parameters four times (weights, gradients, two optimizer moments) and the
    activations of a training batch (kept for the backward pass, with their gradients) and of an
    evaluation chunk, measured by one forward pass of a single example.
    """
    acts: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out[0].numel()))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net.eval()
        net(splits.train[0][:1])
        net.train()
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in net.parameters())
    per_net = 4 * (4 * params + sum(acts) * (3 * int(cfg.data.batch_size) + 1024))
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
    else:
        free = _mem_available()
    return max(1, int(share * free // per_net))


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def epochs_done(ckpt: Path) -> int:
    """Completed epochs saved in a run's checkpoint (0 when there is none). The file was found
    through a tag of the store, whose contents are not trusted: tensors and plain data only."""
    if not ckpt.exists():
        return 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return int(state.get("epoch", -1)) + 1


def merge_member_checkpoints(paths: Sequence[Path | None]) -> Path | None:
    """One checkpoint for a stack of stopped runs that continue together, merged from their own
    (each a stack of one, ``run.checkpoints.member_checkpoints``, all at the same epoch),
    written beside the first as ``stack.ckpt``: None unless every run has one."""
    if len(paths) < 2 or any(p is None or not p.exists() for p in paths):
        return None
    cks = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    first = cks[0]
    if len({c.get("epoch") for c in cks}) != 1:
        return None

    def joined(values: list):
        v = values[0]
        return torch.cat(values) if torch.is_tensor(v) and v.dim() > 0 else v

    opt = first["optimizer_states"][0]
    merged = {**first,
              "state_dict": {n: torch.cat([c["state_dict"][n] for c in cks])
                             for n in first["state_dict"]},
              "optimizer_states": [{
                  "param_groups": opt["param_groups"],
                  "state": {p: {key: joined([c["optimizer_states"][0]["state"][p][key]
                                             for c in cks])
                                for key in st} for p, st in opt["state"].items()}}],
              "callbacks": {key: {"members": [c["callbacks"][key] for c in cks]}
                            for key in first.get("callbacks", {})}}
    out = paths[0].parent / "stack.ckpt"
    torch.save(merged, out)
    return out

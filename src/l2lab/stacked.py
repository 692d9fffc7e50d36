"""K networks of one architecture trained as one: the module of the vectorized sweep.

A λ × seed sweep trains K small networks that differ only in their initialisation, their shuffling
order and their λ. One at a time, they leave the CPU (and a GPU far more) idle between tiny
kernels, and Lightning's per-step overhead is paid K times. Stacked, every layer runs once for all
K (a batched matmul, a grouped convolution) and the step overhead is paid once.

The K networks stay separate: activations flow as (K·B, ...) with network k's rows at
[k·B, (k+1)·B), no operation mixes the slices, and SGD/Adam/AdamW update each element on its own,
so each network's gradients, optimizer state and metrics are those it would have alone, up to
float rounding (tested against the ordinary path to rel 1e-4 per epoch). Dropout draws each
network's masks from that network's own generator, seeded as the ordinary run's, so on CPU the
masks are the very ones the ordinary run draws.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from l2lab.module import L2Module, nonfinite_message
from l2lab.regularization import L2Penalty, SelectedLayer

#: Optimizers whose update is elementwise (so one instance over stacked tensors equals K).
STACKABLE_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")
#: Parameter-free modules that treat every row of the batch on its own.
_ROWWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Identity, nn.Flatten, nn.MaxPool1d,
            nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


class NotStackable(ValueError):
    """The networks cannot be stacked (a layer kind this module does not vectorize)."""


class StackedLinear(nn.Module):
    """K ``nn.Linear`` of one shape: weight (K, out, in), a batched matmul."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.k = len(layers)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        has_bias = layers[0].bias is not None
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers])) \
            if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(self.k, -1, x.shape[-1])
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
        if x.device.type == "cpu":
            xs = x.reshape(k, b, *x.shape[1:])
            return torch.cat([
                self.conv(xs[i], self.weight[i], None if self.bias is None else self.bias[i],
                          *args) for i in range(k)])
        # (K·B, C, ...) -> (B, K·C, ...): network k's channels become group k
        xg = x.reshape(k, b, *x.shape[1:]).transpose(0, 1).reshape(b, -1, *spatial)
        w = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = self.bias.reshape(-1) if self.bias is not None else None
        y = self.conv(xg, w, bias, *args, k)
        return y.reshape(b, k, -1, *y.shape[2:]).transpose(0, 1).reshape(k * b, -1, *y.shape[2:])


class StackedDropout(nn.Module):
    """Dropout with one generator per network, so that each keeps its own random stream.

    On CPU ``F.dropout`` is ``x * bernoulli(1 - p) / (1 - p)`` drawn from the global generator; each
    network's generator starts where the global one stood after that network was built, so the
    masks equal the ordinary run's. On CUDA the ordinary run uses a fused kernel, so the masks
    differ (statistically the same), as GPU runs differ in rounding anyway.
    """

    def __init__(self, p: float, generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.p, self.generators = float(p), list(generators)

    def _generator(self, k: int, device: torch.device) -> torch.Generator:
        g = self.generators[k]
        if g.device != device:  # one seeded generator per network on the training device
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            g = self.generators[k] = torch.Generator(device).manual_seed(seed)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        k = len(self.generators)
        mask = torch.empty_like(x).reshape(k, -1, *x.shape[1:])
        for i in range(k):
            mask[i].bernoulli_(1.0 - self.p, generator=self._generator(i, x.device))
        return x * mask.div_(1.0 - self.p).reshape(x.shape)


def stack_networks(nets: Sequence[nn.Module], generators: Sequence[torch.Generator]) -> nn.Module:
    """One network that computes all of ``nets`` at once; same layer names, stacked weights.

    The model's own ``forward`` runs unchanged: only its layers are swapped for stacked ones, so
    anything with an unknown parametrised or row-mixing layer (e.g. BatchNorm) is refused.
    """
    first = nets[0]
    if not type(first).__module__.startswith("l2lab."):
        raise NotStackable(f"model {type(first).__name__} is not an l2lab model")
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
            setattr(parent, attr, StackedDropout(module.p, generators))
        elif not isinstance(module, _ROWWISE) or any(True for _ in module.parameters()):
            raise NotStackable(f"layer {name} ({type(module).__name__}) is not vectorized")
    return stacked


def member_state(stacked_state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Network k's own state dict (ordinary layer names and shapes), copied out of the stack."""
    return {name: v[k].clone() for name, v in stacked_state.items()}


class StackedL2Module(L2Module):
    """The ordinary module's objective for K networks at once: J_k = mean CCE_k + (λ_k/n)Σ||W||².

    The loss handed to Lightning is Σ_k J_k: the networks share no parameter, so the gradient of
    the sum w.r.t. network k's weights is that of J_k alone. Metrics are (K,) vectors;
    ``epoch_metrics`` is a list with one dict per network (``None`` for one that diverged, whose
    reason is in ``failures``).
    """

    def __init__(self, net: nn.Module, penalty: L2Penalty,
                 make_optimizer: Callable[[nn.Module, L2Penalty], torch.optim.Optimizer],
                 mode: str = "loss", batch_size: int = 64) -> None:
        super().__init__(net, penalty, make_optimizer, mode=mode, batch_size=batch_size)
        self.k = int(penalty.lams.shape[1])
        self.alive = [True] * self.k
        self.failures: dict[int, str] = {}
        self.epoch_metrics: list[dict[str, float] | None] = []  # type: ignore[assignment]

    def _ce_step(self, batch, split: str) -> tuple[torch.Tensor, int]:
        x, y = batch
        if split != "train":  # one evaluation set, shared: every network sees all of it
            x = x.expand(self.k, *x.shape).reshape(-1, *x.shape[1:])
            y = y.expand(self.k, *y.shape).reshape(-1)
        logits = self.net(x)
        ce = F.cross_entropy(logits, y, reduction="none").view(self.k, -1).mean(1)
        hit = (logits.detach().argmax(1) == y).float().view(self.k, -1).mean(1)
        n = y.numel() // self.k
        self._add(f"{split}/acc", hit, n)
        return ce, n

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ce, n = self._ce_step(batch, "train")
        if self.mode == "loss":
            l2 = self.penalty(n)
            loss = (ce + l2).sum()
        else:
            with torch.no_grad():
                l2 = self.penalty(self.batch_size)
            loss = ce.sum()
        self._add("train/ce", ce, n)
        self._add("train/l2", l2, n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``mode=optimizer``: each network's own weight decay 2λ_k/n on its selected tensors —
        added to the gradient (SGD, Adam: coupled) or applied to the weights (AdamW:
        decoupled), as ``weight_decay`` in that network's own parameter groups would."""
        if self.mode != "optimizer":
            return
        decoupled = isinstance(optimizer, torch.optim.AdamW) or \
            bool(optimizer.defaults.get("decoupled_weight_decay", False))
        lr = float(optimizer.param_groups[0]["lr"])
        decay = self.penalty.decay(self.batch_size)  # (L, K) float64
        with torch.no_grad():
            for layer, wd in zip(self.penalty.selected, decay, strict=True):
                for p in layer.params:
                    shape = (self.k,) + (1,) * (p.dim() - 1)
                    if decoupled:
                        p.mul_((1.0 - lr * wd).to(p.dtype).to(p.device).view(shape))
                    elif p.grad is not None:
                        p.grad.add_(p * wd.to(p.dtype).to(p.device).view(shape))

    def on_train_epoch_end(self) -> None:
        m = self._means("train/")
        sq = self.penalty.weight_sq_norms()
        sq_vals = torch.stack(list(sq.values())).tolist() if sq else []
        val, self._val_metrics = self._val_metrics, {}
        per_net: list[dict[str, float] | None] = []
        for k in range(self.k):
            if not self.alive[k]:
                per_net.append(None)
                continue
            d = {key: v[k] for key, v in m.items()}
            d["train/loss"] = d["train/ce"] + d["train/l2"]
            if not math.isfinite(d["train/loss"]):
                self.alive[k] = False
                self.failures[k] = nonfinite_message(self.current_epoch, d)
                self._silence(k)
                per_net.append(None)
                continue
            for name, values in zip(sq, sq_vals, strict=True):
                d[f"weights/sq_norm/{name}"] = values[k]
            d["weights/sq_norm_total"] = sum(d[f"weights/sq_norm/{name}"] for name in sq)
            d.update({key: v[k] for key, v in val.items()})
            if "val/ce" in d:
                d["gap/ce"] = d["val/ce"] - d["train/ce"]
                d["gap/acc"] = d["train/acc"] - d["val/acc"]
            per_net.append(d)
        self.epoch_metrics = per_net
        if not any(self.alive):
            self.trainer.should_stop = True

    def _silence(self, k: int) -> None:
        """A diverged network trains on as zeros: its NaNs never touch the others (no operation
        mixes slices), but zeros keep the stack's arithmetic quiet and fast."""
        with torch.no_grad():
            for p in self.net.parameters():
                p[k].zero_()
            for state in self.trainer.optimizers[0].state.values():
                for v in state.values():
                    if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == self.k:
                        v[k].zero_()

    def on_test_epoch_end(self) -> None:
        means = self._means("test/")
        self.test_metrics = [{key: v[k] for key, v in means.items()}  # type: ignore[assignment]
                             for k in range(self.k)]

    def unstack_into(self, nets: Sequence[nn.Module]) -> None:
        """Copy each network's trained weights back into its own (ordinary) network."""
        state = self.net.state_dict()
        for k, net in enumerate(nets):
            net.load_state_dict(member_state(state, k))


# -- building a stack from the ordinary pieces -------------------------------------------------
@dataclass
class Member:
    """One job's ordinary module (its own initialisation, penalty and optimizer factory) and the
    generator its dropout would draw from, as the ordinary run would have them."""

    module: L2Module
    generator: torch.Generator


def stack_modules(modules: Sequence[L2Module], generators: Sequence[torch.Generator],
                  make_optimizer: Callable[[nn.Module, L2Penalty], torch.optim.Optimizer]
                  ) -> StackedL2Module:
    """The stacked module of K ordinary ones: stacked weights, per-network λ per layer."""
    first = modules[0]
    names = [m.penalty.layer_names for m in modules]
    if any(n != names[0] for n in names):
        raise NotStackable(f"the jobs select different layers: {names}")
    net = stack_networks([m.net for m in modules], generators)
    selected = [
        SelectedLayer(s.name, s.lam, net.get_submodule(s.name).weight,
                      net.get_submodule(s.name).bias if s.bias is not None else None)
        for s in first.penalty.selected
    ]
    lams = torch.tensor([[s.lam for s in m.penalty.selected] for m in modules]).T  # (L, K)
    penalty = L2Penalty(selected, normalize=first.penalty.normalize,
                        dataset_size=first.penalty.dataset_size, lams=lams)
    return StackedL2Module(net, penalty, make_optimizer, mode=first.mode,
                           batch_size=first.batch_size)


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


class MemberCheckpoints:
    """Per-network checkpoints of a stacked fit, in the format of an ordinary run's
    ``last.ckpt``: its own weights and optimizer state, the shared loop state, and the ordinary
    recorder's state. ``resume=RUN_ID`` then continues any one job alone, the ordinary way."""

    def __init__(self, members: Sequence[Member], recorder_key: str) -> None:
        self.members, self.recorder_key = list(members), recorder_key
        # each job's ordinary optimizer (its own parameter groups), filled at every save
        self.optimizers = [m.module.make_optimizer(m.module.net, m.module.penalty)
                           for m in self.members]

    def __call__(self, trainer, states: Sequence[dict | None]) -> list[dict | None]:
        base = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
        stacked_state = base.pop("state_dict")
        stacked_opt = trainer.optimizers[0]
        by_name = dict(trainer.lightning_module.net.named_parameters())
        out: list[dict | None] = []
        for k, (member, opt, state) in enumerate(zip(self.members, self.optimizers, states,
                                                     strict=True)):
            if state is None:
                out.append(None)
                continue
            opt.state.clear()
            for name, p in member.module.net.named_parameters():
                stacked = stacked_opt.state.get(by_name[name])
                if stacked:
                    opt.state[p] = {key: _member_value(v, k) for key, v in stacked.items()}
            out.append({**base, "state_dict": member_state(stacked_state, k),
                        "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
                        "callbacks": {self.recorder_key: state}})
        return out


def _member_value(v, k: int):
    if torch.is_tensor(v):
        return v[k].clone() if v.dim() > 0 else v.clone()
    return v

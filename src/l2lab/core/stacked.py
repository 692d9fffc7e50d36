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
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from l2lab.core.module import L2Module, ReplaceOptimizer, SegmentedOptimizer, networks_at
from l2lab.core.networks import followed_by_norm
from l2lab.core.regularization import NETWORK_SHAPES, Penalty, SelectedLayer
from l2lab.core.schedules import MakeScheduler


class NotStackable(ValueError):
    """The networks cannot be stacked (a layer kind this module does not vectorize)."""


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` (4-D) is laid out channels-last and not also plainly contiguous (a tensor
    with one channel or one pixel is both: the plain path serves it)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous()


def to_groups(x: torch.Tensor, k: int) -> torch.Tensor:
    """(K·B, C, ...) -> (B, K·C, ...): network i's channels become channels i·C .. (i+1)·C - 1,
    so one grouped kernel (a convolution with K·groups, a batch norm) runs all K. A channels-last
    input gives a channels-last result (one copy either way), so a convolution on CUDA keeps
    its NHWC kernels."""
    if k == 1:
        return x
    b = x.shape[0] // k
    if _channels_last(x):
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(k, b, h, w, c).permute(1, 2, 3, 0, 4) \
            .reshape(b, h, w, k * c).permute(0, 3, 1, 2)
    return x.reshape(k, b, *x.shape[1:]).transpose(0, 1).reshape(b, -1, *x.shape[2:])


def from_groups(y: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`to_groups`: (B, K·C, ...) -> (K·B, C, ...), channels-last kept."""
    if k == 1:
        return y
    b = y.shape[0]
    if _channels_last(y):
        _, kc, h, w = y.shape
        return y.permute(0, 2, 3, 1).reshape(b, h, w, k, kc // k).permute(3, 0, 1, 2, 4) \
            .reshape(k * b, h, w, kc // k).permute(0, 3, 1, 2)
    return y.reshape(b, k, -1, *y.shape[2:]).transpose(0, 1).reshape(k * b, -1, *y.shape[2:])


def channels_last(net: nn.Module) -> bool:
    """Lay out the 2-D convolution weights of a stacked network channels-last (each network's
    (out, in, kh, kw) slice, so that the grouped weight :class:`StackedConv` reshapes them into
    is channels-last as a view); False when it has none (not convolutional: nothing to do).
    For CUDA, where cuDNN's NHWC kernels are the fast ones (Tensor Cores under bf16); the values
    are unchanged, and so is every tensor's shape."""
    found = False
    for m in net.modules():
        w = getattr(m, "weight", None)
        conv2d = isinstance(m, StackedConv) and m.conv is F.conv2d or isinstance(m, nn.Conv2d)
        if not conv2d or not isinstance(w, torch.Tensor) or w.dim() not in (4, 5):
            continue
        with torch.no_grad():
            w.data = w.data.contiguous(memory_format=torch.channels_last) if w.dim() == 4 \
                else w.data.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        found = True
    return found


class Widths:
    """The widths of a stack whose networks differ in width, as its forward goes: each padded
    layer (Linear, convolution) notes its networks' own output widths on dim 1 and the padded
    one; a dropout after it draws each network's mask at that network's own width. One per
    stacked network; ``current`` None: the last layer ran at one width."""

    def __init__(self) -> None:
        self.current: tuple[list[int], int] | None = None

    def at(self, x: torch.Tensor, what: str) -> list[int] | None:
        """Each network's own width of ``x`` (dim 1), the output of the padded layer before
        ``what``; None when that layer ran at one width."""
        if self.current is None:
            return None
        own, padded = self.current
        if x.shape[1] != padded:
            raise NotStackable(f"{what} whose input is not the padded layer's output before it "
                               "(networks of other widths)")
        return own


def network_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The K networks' rows of a stacked (K·B, ...) tensor, each a view of its slice."""
    return x.reshape(k, -1, *x.shape[1:]).unbind(0)


def _padded(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, ...]] | None]:
    """(the K tensors stacked, zero-padded at the end of each dim to the widest; each one's own
    shape, or None when they all have one shape)."""
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) == 1:
        return torch.stack([t.detach() for t in tensors]), None
    if len({len(s) for s in shapes}) != 1:
        raise NotStackable(f"its layers differ in rank: {sorted(set(shapes))}")
    widest = tuple(map(max, *shapes)) if len(shapes) > 1 else shapes[0]
    out = tensors[0].new_zeros((len(tensors), *widest))
    for row, t in zip(out, tensors, strict=True):
        row[tuple(slice(0, n) for n in t.shape)] = t.detach()
    return out, shapes


def _stacked_parameter(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    """A stacked parameter; where the networks differ in width, padded with zeros, each
    network's own shape kept on it (``regularization.NETWORK_SHAPES``: what the penalty, the
    logged norms and gradient clipping read at each network's own width)."""
    data, shapes = _padded(tensors)
    p = nn.Parameter(data)
    if shapes is not None:
        setattr(p, NETWORK_SHAPES, shapes)
    return p


def _own(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """One network's row of a padded stacked tensor, at that network's own shape (contiguous, as
    its ordinary run's tensor: the CPU kernels' order of operations follows the layout)."""
    if tuple(t.shape) == tuple(shape):
        return t
    return t[tuple(slice(0, n) for n in shape)].contiguous()


def _cut_channels(x: torch.Tensor, n: int) -> torch.Tensor:
    """A network's input at its own width: its first ``n`` features (dim 1)."""
    return x if x.shape[1] == n else x[:, :n].contiguous()


def _pad_channels(y: torch.Tensor, n: int) -> torch.Tensor:
    """A network's output padded with zeros to the stack's width ``n`` (dim 1)."""
    if y.shape[1] == n:
        return y
    return torch.cat([y, y.new_zeros((y.shape[0], n - y.shape[1], *y.shape[2:]))], 1)


#: torch's CPU allocator starts every tensor at a multiple of 64 bytes. ``F.linear`` on CPU rounds
#: otherwise when its input starts elsewhere (measured on an AVX-512 CPU: in the last bit when
#: ``x`` starts 4, 8 or 12 bytes past a 16-byte boundary; a weight or a gradient at any offset
#: made no difference), and in a stack a network's rows start i·B·features floats into the
#: stack's tensor.
ALIGN = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` where it starts on the allocator's boundary, else a copy that does (a copy is
    exact, and its gradient flows back unchanged)."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


class StackedLinear(nn.Module):
    """K ``nn.Linear``: weight (K, out, in).

    On CUDA one batched matmul runs them all. On CPU each network's rows go through its own
    ``F.linear``: the CPU kernels choose their blocking and threading by the problem's size, so a
    batched matmul over K networks may round differently from the same network in a stack of
    one; a matmul per network is the same computation whatever K is.

    Networks of other widths (``widths``) are zero-padded to the widest: on CPU each computes at
    its own width (its first ``in_k`` input features, its own weight, its output padded with
    zeros), its ordinary run's computation; on CUDA the batched matmul runs over the padded
    tensors, where a padded unit stays exactly zero when the activation has f(0) = 0
    (``stackable.pads_exactly``).
    """

    def __init__(self, layers: Sequence[nn.Linear], widths: Widths | None = None) -> None:
        super().__init__()
        self.k = len(layers)
        self.weight = _stacked_parameter([m.weight for m in layers])
        has_bias = layers[0].bias is not None
        self.bias = _stacked_parameter([m.bias for m in layers]) if has_bias else None
        self.shapes = getattr(self.weight, NETWORK_SHAPES, None)
        self.widths = widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.widths is not None:
            self.widths.current = None if self.shapes is None else \
                ([o for o, _ in self.shapes], self.weight.shape[1])
        if self.k == 1 and x.device.type == "cpu":  # a stack of one: the network's own
            # F.linear, without the unbind/cat (views, a copy) around it: the same numbers.
            # squeeze, not [0]: its backward is a view, where a select's writes its gradient
            # into a new zero tensor (~15 µs of a ~390 µs step: docs/performance.md)
            x = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a view: one node fewer
            return F.linear(_aligned(x), self.weight.squeeze(0),
                            self.bias.squeeze(0) if self.bias is not None else None)
        x = x.reshape(self.k, -1, x.shape[-1])
        if x.device.type == "cpu" and self.shapes is not None:
            out = self.weight.shape[1]
            biases = self.bias.unbind(0) if self.bias is not None else [None] * self.k
            return torch.cat([
                _pad_channels(F.linear(_aligned(_cut_channels(xi, i)), _own(w, (o, i)),
                                       None if b is None else _own(b, (o,))), out)
                for xi, w, b, (o, i) in zip(x.unbind(0), self.weight.unbind(0), biases,
                                            self.shapes, strict=True)])
        if x.device.type == "cpu":  # unbind, not [i]: its backward is one stack, where K
            # selects would each scatter into a zero tensor of all K networks (O(K²)); each
            # network's rows aligned, as its ordinary run's are
            biases = self.bias.unbind(0) if self.bias is not None else [None] * self.k
            return torch.cat([F.linear(_aligned(xi), w, b) for xi, w, b in
                              zip(x.unbind(0), self.weight.unbind(0), biases, strict=True)])
        w = self.weight.transpose(1, 2)
        y = torch.baddbmm(self.bias.unsqueeze(1), x, w) if self.bias is not None else x.bmm(w)
        return y.reshape(-1, y.shape[-1])


class StackedConv(nn.Module):
    """K ``nn.Conv1d``/``nn.Conv2d`` of one shape, with any stride, padding (also ``'same'``),
    dilation, groups, padding mode and bias.

    On CUDA one grouped convolution (groups = K·g) runs them all. On CPU each network's slice goes
    through its own convolution: the grouped kernel's weight gradient sums in another order, and
    training that amplifies rounding (Adam at a high learning rate) then drifts from the ordinary
    run by more than the promised rel 1e-4; a convolution per slice is the ordinary run's exactly.
    Networks of other channel counts pad as :class:`StackedLinear` (``groups=1`` only).
    """

    def __init__(self, layers: Sequence[nn.Conv1d | nn.Conv2d], widths: Widths | None = None
                 ) -> None:
        super().__init__()
        first = layers[0]
        self.widths = widths
        self.k = len(layers)
        self.conv = F.conv1d if isinstance(first, nn.Conv1d) else F.conv2d
        self.stride, self.dilation, self.groups = first.stride, first.dilation, first.groups
        self.padding: Any = first.padding
        self.pad: tuple[list[int], str] | None = None  # an explicit F.pad, as nn.Conv's own
        if first.padding_mode != "zeros":  # padded first, as nn.Conv pads: (left, right) per
            # dimension, last dimension first; 'same' puts the odd one on the right
            sizes = [(p, p) for p in first.padding] if not isinstance(first.padding, str) else \
                [(0, 0)] * len(first.kernel_size) if first.padding == "valid" else \
                [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                 for d, k in zip(first.dilation, first.kernel_size, strict=True)]
            self.pad = ([side for pair in reversed(sizes) for side in pair], first.padding_mode)
            self.padding = 0
        self.weight = _stacked_parameter([m.weight for m in layers])
        self.bias = _stacked_parameter([m.bias for m in layers]) \
            if first.bias is not None else None
        self.shapes = getattr(self.weight, NETWORK_SHAPES, None)
        if self.shapes is not None and first.groups != 1:
            raise NotStackable("grouped convolutions of other widths")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.widths is not None:
            self.widths.current = None if self.shapes is None else \
                ([s[0] for s in self.shapes], self.weight.shape[1])
        if self.pad is not None:
            x = F.pad(x, self.pad[0], mode=self.pad[1])
        k = self.k
        args = (self.stride, self.padding, self.dilation)
        if x.device.type == "cpu" and self.shapes is not None:  # each at its own width
            xs = network_rows(x, k)
            biases = self.bias.unbind(0) if self.bias is not None else [None] * k
            return torch.cat([
                _pad_channels(self.conv(_cut_channels(xi, s[1]), _own(w, s),
                                        None if bi is None else _own(bi, s[:1]), *args,
                                        self.groups), self.weight.shape[1])
                for xi, w, bi, s in zip(xs, self.weight.unbind(0), biases, self.shapes,
                                        strict=True)])
        if x.device.type == "cpu":  # unbind: see StackedLinear
            xs = network_rows(x, k)
            biases = self.bias.unbind(0) if self.bias is not None else [None] * k
            return torch.cat([self.conv(xi, w, bi, *args, self.groups) for xi, w, bi in
                              zip(xs, self.weight.unbind(0), biases, strict=True)])
        # (K·B, C, ...) -> (B, K·C, ...): network i's channels become groups i·g .. (i+1)·g - 1
        xg = to_groups(x, k)
        w = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return from_groups(self.conv(xg, w, bias, *args, k * self.groups), k)


class StackedBatchNorm(nn.Module):
    """K ``nn.BatchNorm1d``/``2d``: each network normalises its own rows with its own batch
    statistics and keeps its own running statistics, momentum and ``num_batches_tracked``; in
    eval mode each uses its own running statistics.

    The update is ``nn.BatchNorm``'s, written per network: the count, then the momentum (or the
    cumulative average when ``momentum`` is None), then ``F.batch_norm`` on its slice with views
    of its rows of the stacked statistics, which it updates in place. On CPU that is one call
    per network, the ordinary run's exactly. On CUDA one call over (B, K·C, ...) does all K:
    channels are normalised on their own, so network i's channels are its own.
    """

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        first = layers[0]
        self.k, self.eps = len(layers), first.eps
        self.momenta = [m.momentum for m in layers]
        self.track = first.track_running_stats
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers])) \
            if first.affine else None
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers])) \
            if first.affine else None
        if self.track:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, torch.stack([getattr(m, name) for m in layers]))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        counted = self.training and self.track
        if counted:
            self.num_batches_tracked.add_(1)
        # the count is read back only for a cumulative average (momentum None): no host-device
        # synchronisation in the step otherwise
        counts = self.num_batches_tracked.tolist() if counted and None in self.momenta \
            else [0] * k
        factors = [(1.0 / float(n) if m is None else m) if counted else (m or 0.0)
                   for m, n in zip(self.momenta, counts, strict=True)]
        stats = not self.training or self.track
        batch_stats = self.training or not self.track
        if x.device.type != "cpu" and len(set(factors)) == 1:
            y = F.batch_norm(
                to_groups(x, k), self.running_mean.view(-1) if stats else None,
                self.running_var.view(-1) if stats else None,
                self.weight.reshape(-1) if self.weight is not None else None,
                self.bias.reshape(-1) if self.bias is not None else None,
                batch_stats, factors[0], self.eps)
            return from_groups(y, k)
        xs = network_rows(x, k)
        ws = self.weight.unbind(0) if self.weight is not None else [None] * k
        bs = self.bias.unbind(0) if self.bias is not None else [None] * k
        means = self.running_mean.unbind(0) if stats else [None] * k
        varis = self.running_var.unbind(0) if stats else [None] * k
        return torch.cat([F.batch_norm(xi, mi, vi, wi, bi, batch_stats, f, self.eps)
                          for xi, mi, vi, wi, bi, f in zip(xs, means, varis, ws, bs, factors,
                                                           strict=True)])


class StackedAffineNorm(nn.Module):
    """K ``nn.LayerNorm`` or ``nn.GroupNorm``: they normalise each row on its own, so only their
    affine parameters (K, ...) are per network; one call per network's slice."""

    def __init__(self, layers: Sequence[nn.LayerNorm | nn.GroupNorm]) -> None:
        super().__init__()
        first = layers[0]
        self.k, self.eps = len(layers), first.eps
        self.groups = first.num_groups if isinstance(first, nn.GroupNorm) else None
        self.shape = None if self.groups else tuple(first.normalized_shape)
        w, b = first.weight, first.bias
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers])) \
            if w is not None else None
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers])) \
            if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        xs = network_rows(x, k)
        ws = self.weight.unbind(0) if self.weight is not None else [None] * k
        bs = self.bias.unbind(0) if self.bias is not None else [None] * k
        if self.groups is not None:
            return torch.cat([F.group_norm(xi, self.groups, wi, bi, self.eps)
                              for xi, wi, bi in zip(xs, ws, bs, strict=True)])
        return torch.cat([F.layer_norm(xi, self.shape, wi, bi, self.eps)
                          for xi, wi, bi in zip(xs, ws, bs, strict=True)])


class StackedEmbedding(nn.Module):
    """K ``nn.Embedding`` of one shape (no ``max_norm``, which rewrites rows in place): each
    network looks its rows up in its own table."""

    def __init__(self, layers: Sequence[nn.Embedding]) -> None:
        super().__init__()
        first = layers[0]
        if first.max_norm is not None or first.sparse:
            raise NotStackable("Embedding with max_norm or sparse gradients")
        self.k, self.padding_idx = len(layers), first.padding_idx
        self.scale = first.scale_grad_by_freq
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = network_rows(x, self.k)
        return torch.cat([F.embedding(xi, w, self.padding_idx, None, 2.0, self.scale)
                          for xi, w in zip(xs, self.weight.unbind(0), strict=True)])


#: Elementwise activations that a stack runs network by network on CPU (:class:`PerNetwork`).
#: ReLU, LeakyReLU, Hardtanh and their kind are exact (a comparison, a clamp, one
#: multiplication): they round alike wherever an element falls, so they run over all rows.
SMOOTH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Softplus,
    nn.Softsign, nn.LogSigmoid, nn.Hardsigmoid, nn.Hardswish, nn.Tanhshrink)


class PerNetwork(nn.Module):
    """An elementwise activation applied to each network's rows on their own, on CPU.

    ATen's CPU kernels compute a tensor in vector blocks and its last elements (fewer than a
    block) in scalar code, and for sigmoid, SiLU, ELU or softplus the two round differently
    (seen with AVX2 and AVX-512). Over the K·B rows at once a network's last elements fall in a
    vector block where its ordinary run computes them as the tail, so the stack would drift
    from it in the last bit; per network each tensor is the ordinary run's, and so is its
    rounding. Networks of other widths: each at its own width (``Widths``), padded with zeros
    after. On CUDA one kernel runs over all rows (GPU stacks agree within rounding anyway).
    """

    def __init__(self, fn: nn.Module, k: int, widths: Widths | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.k = k
        self.widths = widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.fn(x)
        rows = network_rows(x, self.k)
        own = self.widths.at(x, "an activation") if self.widths is not None else None
        if own is not None:
            return torch.cat([_pad_channels(self.fn(_cut_channels(xi, n)), x.shape[1])
                              for xi, n in zip(rows, own, strict=True)])
        return torch.cat([self.fn(xi) for xi in rows])


def _as_stack_of_one(module: nn.Module) -> None:
    """Make ``module`` (any module, with its children) a stack of one in place: each parameter
    and buffer gains a leading dimension of 1, as every stacked layer's, and its own ``forward``
    runs on views of them without it. How a network with a layer that cannot be stacked still
    trains (alone): its layer names, its numbers and its ``forward`` stay its own."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(p.detach().unsqueeze(0),
                                                     requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = b.unsqueeze(0).clone()
    # bound here, not a closure: a deep copy of the module then binds to the copy
    module.forward = types.MethodType(_forward_of_one, module)  # type: ignore[method-assign]


def _forward_of_one(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module's own ``forward`` on its stack-of-one tensors' only slice (views, so the
    gradients and any in-place update of a buffer reach the stacked tensors)."""
    slots = [(d, name, t) for sub in module.modules()
             for d in (sub._parameters, sub._buffers) for name, t in d.items() if t is not None]
    for d, name, t in slots:
        d[name] = t[0]
    try:
        return type(module).forward(module, *args, **kwargs)
    finally:
        for d, name, t in slots:
            d[name] = t


class StackedDropout(nn.Module):
    """Dropout with one rate and one generator per network, so that each keeps its own stream.

    On CPU ``F.dropout`` is ``x * bernoulli(1 - p) / (1 - p)`` drawn from the global generator; each
    network's generator starts where the global one stood after that network was built, so the
    masks equal the ordinary run's. A network with rate 0 gets a mask of ones and draws nothing,
    as its ordinary run (x · 1.0 is x). On CUDA the ordinary run uses a fused kernel, so the masks
    differ (statistically the same), as GPU runs differ in rounding anyway.
    """

    def __init__(self, p: float | Sequence[float], generators: Sequence[torch.Generator],
                 widths: Widths | None = None) -> None:
        super().__init__()
        self.generators = list(generators)
        self.widths = widths  # networks of other widths: each mask at its network's width
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

    def stream_states(self) -> list[dict[str, Any]]:
        """Where each network's stream stands: its generator's device type and state (a CPU
        byte tensor, also for a CUDA generator), for the checkpoint at an epoch's end."""
        return [{"device": g.device.type, "state": g.get_state()} for g in self.generators]

    def load_stream_states(self, states: Sequence[dict[str, Any]]) -> None:
        """Each network's stream goes on where :meth:`stream_states` found it, so that a resumed
        run draws the masks of the run never stopped. A CUDA stream resumes on the current CUDA
        device (the rank's: Lightning sets it before it restores); where there is none, the
        network keeps its seeded CPU generator (another device draws other masks anyway)."""
        for i, (st, g) in enumerate(zip(states, self.generators, strict=True)):
            saved = st["device"]
            if g.device.type == saved:
                g.set_state(st["state"].cpu())
            elif saved == "cuda" and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
                self.generators[i] = torch.Generator(device).set_state(st["state"].cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        k = len(self.generators)
        own = self.widths.at(x, "a dropout") if self.widths is not None else None
        if own is not None:
            return x * self._own_masks(x, own)
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

    def _own_masks(self, x: torch.Tensor, own: Sequence[int]) -> torch.Tensor:
        """Each network's mask drawn at its own width ``own`` (the layer before it ran padded),
        as its ordinary run draws it, then padded with zeros (a padded unit is zero, or on CPU,
        where each layer reads only its network's own features, not read)."""
        padded = x.shape[1]
        k = len(self.generators)
        rows = x.shape[0] // k
        masks = []
        for i, (p, n) in enumerate(zip(self.ps, own, strict=True)):
            m = x.new_empty((rows, n, *x.shape[2:]))
            if p == 0.0:
                m.fill_(1.0)
            else:
                m.bernoulli_(1.0 - p, generator=self._generator(i, x.device)).div_(1.0 - p)
            masks.append(_pad_channels(m, padded))
        return torch.cat(masks)


def _stacked_leaf(module: nn.Module, members: list[nn.Module],
                  generators: Sequence[torch.Generator], widths: Widths | None = None
                  ) -> nn.Module | None:
    """The stacked twin of a layer kind this module vectorizes (None: not one of them).
    ``widths``: the networks differ in width (only Linear and convolution layers may)."""
    if isinstance(module, nn.Linear):
        return StackedLinear(members, widths)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return StackedConv(members, widths)
    if type(module) is nn.Dropout:
        return StackedDropout([m.p for m in members], generators, widths)
    if isinstance(module, SMOOTH_ACTIVATIONS) and len(members) > 1:
        return PerNetwork(module, len(members), widths)
    shapes = {tuple(tuple(t.shape) for t in [*m.parameters(recurse=False),
                                              *m.buffers(recurse=False)]) for m in members}
    if len(shapes) > 1:
        raise NotStackable(f"its {type(module).__name__} layers differ in width (only Linear "
                           "and convolution layers stack at other widths)")
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return StackedBatchNorm(members)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return StackedAffineNorm(members)
    if isinstance(module, nn.Embedding):
        return StackedEmbedding(members)
    return None


def stack_networks(nets: Sequence[nn.Module], generators: Sequence[torch.Generator],
                   example: torch.Tensor | None = None) -> nn.Module:
    """One network that computes all of ``nets`` at once; same layer names, stacked tensors.

    The model's own ``forward`` runs unchanged on K·B rows: its leaves are swapped for stacked
    ones (Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm, GroupNorm, Embedding, Dropout);
    containers and parameter-free modules stay as they are. A stack of one takes any network:
    a module this file does not vectorize becomes a stack of one in place
    (:func:`_as_stack_of_one`). For K > 1 such a module raises :class:`NotStackable`, and so does
    a network that fails :func:`check_stack` on ``example`` (a few training inputs).
    """
    first = nets[0]
    stacked = copy.deepcopy(first)
    done: list[str] = []  # modules made a stack of one, with their children
    shapes = {tuple(tuple(t.shape) for t in n.state_dict().values()) for n in nets}
    widths = Widths() if len(shapes) > 1 else None  # networks of other widths
    for name, module in first.named_modules():
        if any(name.startswith(f"{d}.") for d in done):
            continue
        members = [n.get_submodule(name) for n in nets] if name else list(nets)
        twin = _stacked_leaf(module, members, generators, widths) if name else None
        if twin is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(stacked.get_submodule(parent_name) if parent_name else stacked, attr, twin)
            done.append(name)
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if not own:
            continue  # a container or a parameter-free module: its forward runs as it is
        if len(nets) > 1:
            raise NotStackable(f"layer {name or '(the network itself)'} "
                               f"({type(module).__name__}) holds tensors l2lab does not stack")
        _as_stack_of_one(stacked.get_submodule(name) if name else stacked)
        if not name:
            break
        done.append(name)
    if len(nets) > 1 and example is not None:
        check_stack(nets, stacked, generators, example)
    return stacked


def check_stack(nets: Sequence[nn.Module], stacked: nn.Module,
                generators: Sequence[torch.Generator], example: torch.Tensor) -> None:
    """Raise :class:`NotStackable` unless the stack computes what its networks compute, on
    different inputs per network (so that an operation mixing rows shows): in eval mode each
    network's output slice equals its own forward, and in training mode the forward draws
    nothing from torch's global generator (each network's random stream must be its own).
    Leaves every state as it found it."""
    k = len(nets)
    rows = max(1, min(2, len(example)))
    xs = [example[(i * rows + torch.arange(rows)) % len(example)] for i in range(k)]
    rng = torch.get_rng_state()
    streams = [g.get_state() for g in generators]
    state = {n: t.clone() for n, t in stacked.state_dict().items()}
    modes = [n.training for n in nets]
    try:
        with torch.no_grad():
            stacked.eval()
            try:
                out = stacked(torch.cat(xs))
            except Exception as e:  # noqa: BLE001 - any failure of the stacked forward
                raise NotStackable(f"its forward fails on the rows of {k} networks at once: "
                                   f"{type(e).__name__}: {e}") from None
            for i, (net, x) in enumerate(zip(nets, xs, strict=True)):
                own = net.eval()(x)
                if not torch.allclose(out[i * rows:(i + 1) * rows], own, rtol=1e-4, atol=1e-5):
                    raise NotStackable("its output for one network depends on the other "
                                       "networks' rows (its forward reads the batch size, or "
                                       "mixes rows)")
            stacked.train()
            before = torch.get_rng_state()
            stacked(torch.cat(xs))
            if not torch.equal(before, torch.get_rng_state()):
                raise NotStackable("its forward draws from torch's global random generator "
                                   "(e.g. F.dropout or Dropout2d), which one stream per network "
                                   "cannot share")
    finally:
        torch.set_rng_state(rng)
        for g, st in zip(generators, streams, strict=True):
            g.set_state(st)
        stacked.load_state_dict(state)
        stacked.train()
        for net, mode in zip(nets, modes, strict=True):
            net.train(mode)


def network_weights(stacked_state: dict[str, torch.Tensor], pos: int,
                    shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the network at stack position ``pos`` (ordinary layer names and
    shapes), copied out of the stack; ``shapes``: its own shape per tensor, where the stack pads
    networks of other widths (the padding, zeros, is cut off)."""
    return {name: _own(v[pos], shapes[name]).clone() if shapes else v[pos].clone()
            for name, v in stacked_state.items()}


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
                  replace_optimizer: ReplaceOptimizer | None = None,
                  example: torch.Tensor | None = None,
                  make_scheduler: MakeScheduler | None = None,
                  interval: str = "epoch") -> L2Module:
    """The module that trains ``members`` as one stack: stacked weights, per network its λ per
    layer, its selection, normalize, mode, clipping and optimizer settings. A stack of one is how
    an ordinary run trains.

    The penalty runs over the union of the members' selections, in the network's layer order; a
    layer a member does not select has λ = 0 for it, which adds exact zeros (to the penalty, to
    the gradient), so each member's numbers are those of its own selection.
    ``make_scheduler`` (optimizer -> a torch scheduler) gives each network the same schedule
    from its own base lr, stepped every ``interval`` (``schedules.NetworkSchedulers``).
    ``replace_optimizer`` (trainer, optimizer, schedulers), the run layer's, lets networks that
    diverge leave
    the stack mid-fit (:meth:`L2Module.remove`); without it they train on as zeros.
    ``example`` (a few training inputs) lets :func:`check_stack` prove a stack of K > 1 right
    before it trains: :class:`NotStackable` says why it is not.
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
    normalized = followed_by_norm(first, example) if example is not None else ()
    net = stack_networks([m.net for m in members], [m.generator for m in members], example)
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
                                replace_optimizer, make_scheduler=make_scheduler,
                                interval=interval)
        smaller.to(next(stacked.parameters()).device)
        into = smaller.net.state_dict()  # its widest may be narrower: cut to it
        smaller.net.load_state_dict({name: networks_at(t, positions, into[name].shape)
                                     for name, t in stacked.state_dict().items()})
        # each dropout's streams go on where they stand (the dropouts pair up in order; other
        # modules need not: a stack of one runs a smooth activation without PerNetwork)
        def dropouts(net: nn.Module) -> list[StackedDropout]:
            return [m for m in net.modules() if isinstance(m, StackedDropout)]

        for old, new in zip(dropouts(stacked), dropouts(smaller.net), strict=True):
            new.generators = [old.generators[p] for p in positions]
        return smaller

    return L2Module(net, penalty, make_optimizer, batch_size=batch_size,
                    modes=[m.mode for m in members], clips=[m.clip for m in members],
                    selections=[m.penalty.layer_names for m in members],
                    restack=restack if replace_optimizer else None,
                    replace_optimizer=replace_optimizer, normalized=normalized,
                    make_scheduler=make_scheduler, interval=interval)


def unstack_into(module: L2Module, nets: Sequence[nn.Module]) -> None:
    """Copy each network's trained weights back into its own (ordinary) network (a network that
    left the stack keeps what it had)."""
    state = module.net.state_dict()
    for pos, i in enumerate(module.slots):
        own = {name: t.shape for name, t in nets[i].state_dict().items()}
        nets[i].load_state_dict(network_weights(state, pos, own))


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
        return _padded([t[0] for t in values])[0] if torch.is_tensor(v) and v.dim() > 0 else v

    opt = first["optimizer_states"][0]
    merged = {**first,  # runs of other widths: each padded to the widest with zeros
              "state_dict": {n: joined([c["state_dict"][n] for c in cks])
                             for n in first["state_dict"]},
              "optimizer_states": [{
                  "param_groups": opt["param_groups"],
                  "state": {p: {key: joined([c["optimizer_states"][0]["state"][p][key]
                                             for c in cks])
                                for key in st} for p, st in opt["state"].items()}}],
              "callbacks": {key: {"members": [c["callbacks"][key] for c in cks]}
                            for key in first.get("callbacks", {})}}
    if first.get("lr_schedulers"):  # each run's schedule state (schedules.NetworkSchedulers)
        merged["lr_schedulers"] = [{"networks": [n for c in cks
                                                 for n in c["lr_schedulers"][0]["networks"]]}]
    if all("dropout_streams" in c for c in cks):  # each run's, by its place in the stack
        merged["dropout_streams"] = [s for c in cks for s in c["dropout_streams"]]
    else:  # a run stopped before they were saved: every stream from its seed, as then
        merged.pop("dropout_streams", None)
    merged.pop("torch_rng", None)  # a stack of several draws nothing from torch's generators
    out = paths[0].parent / "stack.ckpt"
    torch.save(merged, out)
    return out

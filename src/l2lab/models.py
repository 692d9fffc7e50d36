"""Networks with stable, readable layer names (``fc1``, ``conv1``, ``out``).

The names matter: ``regularization.layers`` patterns and the logged ``weights/sq_norm/<layer>``
metrics refer to them, so they are plain attributes, not indices in an ``nn.Sequential``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from l2lab.base import ConfigError
from l2lab.core.rules import ACTIVATIONS


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {list(ACTIVATIONS)}, got {name!r}.")
    return getattr(nn, ACTIVATIONS[name])()


class _Net(nn.Module):
    """What both networks share: the activation, the dropout and the dense head.

    The head is ``fc1 .. fcK -> out`` on the flattened input; each ``fc_i`` is followed by the
    activation and dropout. Built and run here only, so that MLP and CNN name, initialise (in
    registration order, from the same seeded generator) and apply it identically."""

    def __init__(self, activation: str, dropout: float) -> None:
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout!r}.")
        self.act = _activation(activation)
        self.drop = nn.Dropout(float(dropout))

    def _add_head(self, width: int, hidden: Sequence[int], num_classes: int) -> None:
        self.fc_names = []
        for i, h in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, int(h)))
            self.fc_names.append(f"fc{i}")
            width = int(h)
        self.out = nn.Linear(width, num_classes)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for name in self.fc_names:
            x = self.drop(self.act(getattr(self, name)(x)))
        return self.out(x)


class MLP(_Net):
    """Flatten -> [fc_i -> activation -> dropout] * len(hidden) -> out (logits)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256,),
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__(activation, dropout)
        width = 1
        for d in in_shape:
            width *= int(d)
        self._add_head(width, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(x)


def _per_layer(key: str, value: int | Sequence[int], n: int) -> list[int]:
    """One int for every conv layer, or a list with one entry per layer."""
    values = [value] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n or any(v < 0 for v in values):
        raise ConfigError(
            f"model.{key} must be an int >= 0 or a list of {n} of them (one per entry of "
            f"model.channels), got {value!r}.")
    return values


class CNN(_Net):
    """[conv_i -> activation -> (2-max-pool)] * len(channels) -> (adaptive avg-pool) -> fc_i -> out.

    The input's rank picks the convolution: (C, L) sequences such as MNIST-1D get ``Conv1d``,
    (C, H, W) images ``Conv2d``; the layer names (``conv1``, …) are the same either way, so
    ``regularization.layers`` patterns carry over. With the defaults (3-wide kernels, padding 1,
    max-pool while the map stays at least ``pooled`` wide, then an adaptive average pool to
    ``pooled``) one definition works for 1×28×28, 3×32×32, 1×8×8 and 1×40. ``pool=false`` and
    ``pooled=null`` give a plain strided stack whose flattened output feeds the dense part, as
    the MNIST-1D paper's ConvBase (kernels 5, 3, 3, stride 2, no pooling).
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (16, 32), hidden: Sequence[int] = (128,),
                 activation: str = "relu", dropout: float = 0.0,
                 kernel_size: int | Sequence[int] = 3, stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 1, pool: bool = True,
                 pooled: int | None = 4) -> None:
        super().__init__(activation, dropout)
        if len(in_shape) not in (2, 3):
            raise ConfigError(
                "model=cnn needs sequences (C, L) or images (C, H, W), got inputs of shape "
                f"{tuple(in_shape)}.")
        dims = len(in_shape) - 1
        conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
        n = len(channels)
        kernels = _per_layer("kernel_size", kernel_size, n)
        strides = _per_layer("stride", stride, n)
        pads = _per_layer("padding", padding, n)
        if any(s < 1 for s in strides) or any(k < 1 for k in kernels):
            raise ConfigError(f"model.kernel_size and model.stride must be >= 1, got "
                              f"{kernel_size!r} and {stride!r}.")
        self.conv_names, self.pool_after = [], []
        c, sizes = int(in_shape[0]), [int(d) for d in in_shape[1:]]
        for i, (ch, k, s, p) in enumerate(zip(channels, kernels, strides, pads, strict=True),
                                          start=1):
            setattr(self, f"conv{i}", conv(c, int(ch), kernel_size=k, stride=s, padding=p))
            self.conv_names.append(f"conv{i}")
            c, sizes = int(ch), [(d + 2 * p - k) // s + 1 for d in sizes]
            if min(sizes) < 1:
                raise ConfigError(
                    f"model=cnn: conv{i} leaves no output for inputs of shape {tuple(in_shape)}; "
                    "use fewer layers, smaller kernel_size/stride or more padding.")
            # Pool only while the map stays at least `pooled` wide (digits are only 8×8).
            floor = pooled or 1
            self.pool_after.append(bool(pool) and min(sizes) // 2 >= floor)
            if self.pool_after[-1]:
                sizes = [d // 2 for d in sizes]
        self.pool = (nn.MaxPool1d, nn.MaxPool2d)[dims - 1](2)
        self.squeeze = (None if pooled is None
                        else (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[dims - 1](int(pooled)))
        width = c
        for d in sizes if pooled is None else [int(pooled)] * dims:
            width *= d
        self._add_head(width, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, pool in zip(self.conv_names, self.pool_after, strict=True):
            x = self.act(getattr(self, name)(x))
            if pool:
                x = self.pool(x)
        if self.squeeze is not None:
            x = self.squeeze(x)
        return self._head(x)


# -- residual networks with BatchNorm -------------------------------------------------------------
class BasicBlock1d(nn.Module):
    """torchvision's ``BasicBlock`` in one dimension: conv-bn-act-conv-bn plus the shortcut (a
    strided 1×1 conv and bn where the shape changes), then the activation. Same layer names."""

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool,
                 activation: str) -> None:
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm1d(c) if batchnorm else nn.Identity()

        self.conv1 = nn.Conv1d(c_in, c_out, 3, stride, 1, bias=not batchnorm)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, 1, 1, bias=not batchnorm)
        self.bn2 = norm(c_out)
        self.act = _activation(activation)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride, bias=not batchnorm),
                                            norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + identity)


class ResNet1d(nn.Module):
    """A small 1-D ResNet for (C, L) signals such as MNIST-1D, so that BatchNorm and residual
    questions run offline on a CPU: stem ``conv1``-``bn1``-act, one stage ``layer<i>`` per entry
    of ``channels`` (``blocks`` basic blocks each, stride 2 from the second stage on), global
    average pool, ``fc``. The names follow torchvision's ResNet (``layer1.0.conv1``, ``fc``), so
    the same ``regularization.layers`` patterns work on both. ``batchnorm=false`` puts an
    identity where each BatchNorm was and gives the convolutions biases: the same network
    without normalization, for the with/without comparison."""

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (16, 32), blocks: int = 1, batchnorm: bool = True,
                 activation: str = "relu") -> None:
        super().__init__()
        if len(in_shape) != 2:
            raise ConfigError("model=resnet1d needs sequences (C, L) such as MNIST-1D's, got "
                              f"inputs of shape {tuple(in_shape)}.")
        if int(blocks) < 1 or not channels:
            raise ConfigError(f"model.blocks must be >= 1 and model.channels non-empty, got "
                              f"{blocks!r} and {list(channels)!r}.")
        c = int(channels[0])
        self.conv1 = nn.Conv1d(int(in_shape[0]), c, 3, 1, 1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm1d(c) if batchnorm else nn.Identity()
        self.act = _activation(activation)
        self.stages = []
        for i, width in enumerate(channels, start=1):
            stage = []
            for j in range(int(blocks)):
                stride = 2 if i > 1 and j == 0 else 1
                stage.append(BasicBlock1d(c, int(width), stride, bool(batchnorm), activation))
                c = int(width)
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            self.stages.append(f"layer{i}")
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(self.pool(x).flatten(1))


def resnet18(in_shape: Sequence[int], num_classes: int, cifar_stem: bool = False) -> nn.Module:
    """torchvision's ResNet-18, its first convolution fitted to the data's channels (1 for the
    digits and MNIST, 3 for CIFAR). ``cifar_stem``: the 3×3 stride-1 first convolution and no
    max-pool used for 32×32 images (the 7×7 stride-2 stem and pool shrink them 4× at once)."""
    from torchvision.models import resnet18 as torchvision_resnet18

    if len(in_shape) != 3:
        raise ConfigError("model=resnet18 needs images (C, H, W), got inputs of shape "
                          f"{tuple(in_shape)}.")
    net = torchvision_resnet18(weights=None, num_classes=num_classes)
    if cifar_stem:
        net.conv1 = nn.Conv2d(int(in_shape[0]), 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif int(in_shape[0]) != 3:
        net.conv1 = nn.Conv2d(int(in_shape[0]), 64, 7, 2, 3, bias=False)
    if cifar_stem or int(in_shape[0]) != 3:  # initialised as torchvision initialises its own
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net

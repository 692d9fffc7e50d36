"""Networks with stable, readable layer names (``fc1``, ``conv1``, ``out``).

The names matter: ``regularization.layers`` patterns and the logged ``weights/sq_norm/<layer>``
metrics refer to them, so they are plain attributes, not indices in an ``nn.Sequential``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from l2lab import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {list(ACTIVATIONS)}, got {name!r}.")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Flatten -> [fc_i -> activation -> dropout] * len(hidden) -> out (logits)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256,),
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout!r}.")
        self.act = _activation(activation)
        self.drop = nn.Dropout(float(dropout))
        width = 1
        for d in in_shape:
            width *= int(d)
        self.hidden_names = []
        for i, h in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, int(h)))
            self.hidden_names.append(f"fc{i}")
            width = int(h)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for name in self.hidden_names:
            x = self.drop(self.act(getattr(self, name)(x)))
        return self.out(x)


class CNN(nn.Module):
    """[conv_i 3x3 -> activation -> 2x2 max-pool] * len(channels) -> fc_i -> out.

    An adaptive average pool before the dense part fixes its input size, so one definition works
    for 1×28×28 (MNIST), 3×32×32 (CIFAR-10) and the 1×8×8 digits.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (16, 32), hidden: Sequence[int] = (128,),
                 activation: str = "relu", dropout: float = 0.0, pooled: int = 4) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ConfigError(
                f"model=cnn needs image inputs (C, H, W), got shape {tuple(in_shape)}.")
        self.act = _activation(activation)
        self.drop = nn.Dropout(float(dropout))
        self.conv_names, self.fc_names = [], []
        c = int(in_shape[0])
        size = min(int(in_shape[1]), int(in_shape[2]))
        for i, ch in enumerate(channels, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c, int(ch), kernel_size=3, padding=1))
            self.conv_names.append(f"conv{i}")
            c = int(ch)
        self.pool = nn.MaxPool2d(2)
        # Pool only while the map stays at least `pooled` wide (digits are only 8×8).
        self.pool_after = []
        for _ in channels:
            self.pool_after.append(size // 2 >= pooled)
            size = size // 2 if size // 2 >= pooled else size
        self.squeeze = nn.AdaptiveAvgPool2d(pooled)
        width = c * pooled * pooled
        for i, h in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, int(h)))
            self.fc_names.append(f"fc{i}")
            width = int(h)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, pool in zip(self.conv_names, self.pool_after, strict=False):
            x = self.act(getattr(self, name)(x))
            if pool:
                x = self.pool(x)
        x = self.squeeze(x).flatten(1)
        for name in self.fc_names:
            x = self.drop(self.act(getattr(self, name)(x)))
        return self.out(x)

"""Training-batch augmentation on the device (``data.augment``): a random crop from the image
zero-padded by ``pad`` pixels and a horizontal flip for images (N, C, H, W); a random circular
shift by up to ``pad`` steps for 1-D signals (N, C, L) or (N, L), MNIST-1D's own augmentation
(the ``mnist1d`` package's ``translate`` is a circular shift).

The draws are a pure function of (network seed, epoch), like the epoch's shuffling order
(``data.EpochShuffle``), in a numpy stream of their own, so:

* each network of a stack draws what its ordinary run draws, and two seeds see different crops;
* a resumed run, which starts again at an epoch boundary, draws what it would have drawn had it
  never stopped: there is no generator state to checkpoint;
* the draws are the same on every device (made on the host once per epoch, moved with the
  order), and the batch path on the device is a few gathers, no per-example Python.

The spec, for the plain loop (``core/reference.py``) and the docs: in epoch ``e`` of a network
seeded ``s``, ``rng = numpy.random.default_rng([AUG_STREAM, s, e])`` draws
``rng.integers(0, 2·pad + 1, size=(N, 2))`` for images (the crop's top and left corner in the
padded image), then ``rng.integers(0, 2, size=N)`` (1: flip), or ``rng.integers(0, 2·pad + 1,
size=(N, 1))`` for signals (shift = value − pad, as ``numpy.roll``); row ``j`` goes to the j-th
example the epoch visits. Zero padding is on the normalised inputs (the channel's mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from l2lab.base import ConfigError

#: Tells the augmentation stream of a (seed, epoch) apart from every other stream of that seed.
AUG_STREAM = 0x617567  # "aug"


def default_pad(in_shape: Sequence[int]) -> int:
    """``data.augment_pad`` when null: an eighth of the image's side or of the signal's length
    (4 for 32×32 as in the CIFAR recipes, 1 for the 8×8 digits, 5 for MNIST-1D's 40), at
    least 1."""
    return max(1, int(in_shape[-1]) // 8)


def resolve_pad(pad: object, in_shape: Sequence[int]) -> int:
    """The padding (images) or largest shift (signals) for data of ``in_shape`` (one example's
    shape): ``pad``, or :func:`default_pad` for None. Refused before training, naming the key,
    when it is negative or leaves nothing of the input (as large as a side or the length)."""
    if len(in_shape) not in (1, 2, 3):
        raise ConfigError(f"data.augment=true needs images (C, H, W) or signals (C, L) or (L,); "
                          f"this data's examples have shape {tuple(in_shape)}.")
    if pad is None:
        return default_pad(in_shape)
    size = min(int(s) for s in in_shape[-2:]) if len(in_shape) == 3 else int(in_shape[-1])
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < size:
        raise ConfigError(f"data.augment_pad must be an integer in [0, {size - 1}] for this "
                          f"data (examples of shape {tuple(in_shape)}), or null for "
                          f"{default_pad(in_shape)}; got {pad!r}.")
    return pad


class EpochAugment:
    """One network's augmentation draws for an epoch, a pure function of (seed, epoch); ``on``
    False draws the identity (no crop offset, no flip, no shift), so that a stack mixing
    augmented and plain networks gives the plain ones their own inputs exactly."""

    def __init__(self, seed: int, pad: int, on: bool = True) -> None:
        self.seed, self.pad, self.on = int(seed), int(pad), bool(on)

    def draws(self, n: int, epoch: int, image: bool) -> tuple[np.ndarray, np.ndarray]:
        """(offsets (n, 2) or (n, 1) in [0, 2·pad], flips (n,) bool) of epoch ``epoch``."""
        dims = 2 if image else 1
        if not self.on:
            return np.full((n, dims), self.pad, dtype=np.int64), np.zeros(n, dtype=bool)
        rng = np.random.default_rng([AUG_STREAM, self.seed, int(epoch)])
        offsets = rng.integers(0, 2 * self.pad + 1, size=(n, dims))
        flips = rng.integers(0, 2, size=n).astype(bool) if image else np.zeros(n, dtype=bool)
        return offsets, flips


def augment(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
            pad: int) -> torch.Tensor:
    """``x`` (a batch on its device) augmented row by row with ``offsets`` ((B, 2) or (B, 1),
    on x's device) and ``flips`` ((B,)): gathers, no per-example loop, no host synchronisation.
    Written into a copy of ``x`` so that the result has ``x``'s layout (strides): an augmented
    batch reaches the network as the plain batch would, which keeps CPU kernels (and so a
    stack's children) exact."""
    out = torch.empty_like(x)
    if x.dim() == 4:  # images: crop from the zero-padded image, then flip
        b, c, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
        across = torch.arange(w, device=x.device)
        cols = offsets[:, 1:2] + torch.where(flips[:, None], w - 1 - across, across)  # (B, W)
        picked = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
        return out.copy_(picked.gather(3, cols[:, None, None, :].expand(b, c, h, w)))
    # signals (B, C, L) or (B, L): a circular shift by offset − pad, as numpy.roll
    length = x.shape[-1]
    source = (torch.arange(length, device=x.device) - (offsets[:, 0:1] - pad)) % length  # (B, L)
    if x.dim() == 3:
        source = source[:, None, :].expand(x.shape)
    return out.copy_(x.gather(x.dim() - 1, source))

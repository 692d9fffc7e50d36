"""The plain PyTorch loop that is the executable spec of one run: what a researcher would write.

An independent second implementation, so that comparing it with the harness tests that the
harness is right, not only that its results do not depend on the stack size K. It imports nothing
of l2lab: the network is whatever ``cfg.model`` names (``hydra.utils.instantiate``, the model
classes being the one thing both sides share), trained as an ordinary ``nn.Module`` (its own
layers, BatchNorm included: ``train()`` to train, ``eval()`` to evaluate), and everything else
is written out again here: the shuffling (the documented order: epoch e of seed s is
``torch.randperm(N)`` from a generator seeded with s·1000003 + e), the layer selection (fnmatch
over ``named_modules()``), the penalty of each ``regularization`` preset as its plain formula,
``torch.optim``'s own ``weight_decay`` for ``mode=optimizer``, ``torch.nn.utils`` clipping,
``nn.Dropout`` on the global generator, and ``data.augment`` example by example (its documented
draws: :func:`augment_draws`). The caller passes the data split into tensors (any object
with ``train``, ``val`` and ``test`` pairs ``(x, y)``, ``test`` possibly None, and
``num_classes``).

The benchmarks time the harness against it (``bench``, ``bench --sweep``) and
``tests/test_reference.py`` (with ``tests/test_engine.py`` and ``tests/test_penalties.py``)
checks that the harness trains the same thing.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

VAL_BATCH = 1024
Metrics = dict[str, float]
#: ``regularization._target_`` -> (its terms, the share of λ on the L1 and on the L2 term
#: given ``l1_ratio``). The names are data here: the spec does not import the harness's classes.
PRESETS = {
    "l2lab.core.penalties.L2": (("l2",), lambda r: (0.0, 1.0)),
    "l2lab.core.penalties.L1": (("l1",), lambda r: (1.0, 0.0)),
    "l2lab.core.penalties.ElasticNet": (("l1", "l2"), lambda r: (r, 1.0 - r)),
}
DEFAULT_PENALTY = "l2lab.core.penalties.L2"  # a preset without ``_target_``


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the ``n`` training examples of a run seeded
    with ``seed``: a pure function of (seed, epoch), so that a resumed run, or a network in a
    stack, sees the same batches."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
            order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` in mini-batches of ``batch_size`` (the last one smaller), in ``order``."""
    order = torch.arange(len(y)) if order is None else order
    for idx in order.to(x.device).split(batch_size):
        yield x[idx], y[idx]


def augment_draws(n: int, seed: int, epoch: int, pad: int, image: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``data.augment``'s draws for epoch ``epoch`` of a run seeded ``seed``, as documented:
    numpy's ``default_rng([0x617567, seed, epoch])``; for images (top, left) of the crop in the
    zero-padded image, then whether to flip; for signals the shift + pad. Row j is for the j-th
    example the epoch visits."""
    rng = np.random.default_rng([0x617567, int(seed), int(epoch)])
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2 if image else 1))
    flips = rng.integers(0, 2, size=n) if image else np.zeros(n, dtype=np.int64)
    return offsets, flips


def augmented(x: torch.Tensor, offsets: np.ndarray, flips: np.ndarray, pad: int) -> torch.Tensor:
    """Each example of the batch ``x`` cropped from itself zero-padded by ``pad`` and flipped
    left-right (images), or rolled by ``offset − pad`` steps (signals)."""
    out = []
    for xi, off, flip in zip(x, offsets, flips, strict=True):
        if xi.dim() == 3:
            h, w = xi.shape[1:]
            top, left = int(off[0]), int(off[1])
            xi = F.pad(xi, (pad, pad, pad, pad))[:, top:top + h, left:left + w]
            xi = xi.flip(-1) if flip else xi
        else:
            xi = torch.roll(xi, int(off[0]) - pad, dims=-1)
        out.append(xi)
    return torch.stack(out)


def standard(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of a freshly allocated tensor, as a DataLoader's collate
    (``torch.stack``) hands batches. Tensors made from numpy views can carry odd strides on a
    size-1 axis (MNIST-1D's (N, 1, 40) comes as (40, 1, 1)), which CPU convolutions read as
    channels-last: their output then has another layout, and BatchNorm sums it in another order."""
    return t.clone(memory_format=torch.contiguous_format)


def build_net(cfg: DictConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``cfg.model`` for the data: its input shape, channels and class count go to the
    constructor under the names it accepts (``in_shape``, ``in_channels``, ``num_classes``;
    ``num_classes`` alone to one that takes ``**kwargs``)."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
             if k != "name"}
    params = inspect.signature(hydra.utils.get_object(model["_target_"])).parameters
    facts = {"in_shape": tuple(in_shape), "in_channels": int(in_shape[0]),
             "num_classes": int(num_classes)}
    given = {k: v for k, v in facts.items() if k in params}
    if not given and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        given = {"num_classes": int(num_classes)}
    return hydra.utils.instantiate(model, **given)


@dataclass(frozen=True)
class Layer:
    """A penalised layer: its ``named_modules()`` name, its λ, and the tensors penalised."""

    name: str
    lam: float
    weight: nn.Parameter
    tensors: tuple[nn.Parameter, ...]


def _patterns(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def _is_type(module: nn.Module, pattern: str) -> bool:
    """Whether ``module`` is a ``pattern`` (``Linear``, ``Conv*``, ``BatchNorm*``): the name of
    its ``torch.nn`` class matches, or that of one it derives from (a researcher's subclass of
    ``nn.Linear`` is a Linear; their own class's name is not a layer type)."""
    return any(fnmatch.fnmatchcase(c.__name__, pattern) for c in type(module).__mro__
               if c.__module__.startswith("torch.nn"))


def select(net: nn.Module, reg: Any) -> list[Layer]:
    """The layers ``reg`` selects, in ``named_modules()`` order: a module with a ``weight``
    parameter that is of a ``types`` class (:func:`_is_type`), whose name matches a ``layers``
    pattern and no ``exclude`` pattern, and whose weight has at least ``min_params`` elements.
    Its λ is that of the first ``lam_per_layer`` key matching its name, else ``lam``; its bias is
    penalised too when ``include_bias``."""
    layers = _patterns(reg.get("layers", ["*"]))
    exclude = _patterns(reg.get("exclude", []))
    types = _patterns(reg.get("types", ["Linear", "Conv1d", "Conv2d"]))
    per_layer = {str(k): float(v) for k, v in (reg.get("lam_per_layer") or {}).items()}
    min_params, include_bias = int(reg.get("min_params", 0)), bool(reg.get("include_bias"))
    chosen = []
    for name, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if not name or not isinstance(weight, nn.Parameter):
            continue
        if not any(_is_type(module, t) for t in types) \
                or not any(fnmatch.fnmatchcase(name, p) for p in layers) \
                or any(fnmatch.fnmatchcase(name, p) for p in exclude) \
                or weight.numel() < min_params:
            continue
        lam = next((v for k, v in per_layer.items() if fnmatch.fnmatchcase(name, k)),
                   float(reg.get("lam", 0.0)))
        bias = getattr(module, "bias", None)
        tensors = (weight, bias) if include_bias and isinstance(bias, nn.Parameter) else (weight,)
        chosen.append(Layer(name, lam, weight, tensors))
    if not chosen:
        raise ValueError(f"the regularization config selects no layer of {type(net).__name__}")
    return chosen


class PlainPenalty:
    """The preset's penalty, written out: over the selected layers,
    Σ_l (λ₁_l·Σ|w| + λ₂_l·Σw²) / n, with (λ₁, λ₂) = (0, λ) for L2, (λ, 0) for L1 and
    (r·λ, (1 − r)·λ) for elastic net (r = ``l1_ratio``); n the mini-batch's size
    (``normalize=batch``, the note's), the training set's (``dataset``) or 1 (``none``)."""

    def __init__(self, net: nn.Module, reg: Any, dataset_size: int) -> None:
        target = str(reg.get("_target_") or DEFAULT_PENALTY)
        if target not in PRESETS:
            raise ValueError(f"the reference loop knows {sorted(PRESETS)}, not {target}")
        self.names, shares = PRESETS[target]
        share1, share2 = shares(float(reg.get("l1_ratio", 0.5)))
        self.layers = select(net, reg)
        self.lams = [(share1 * s.lam, share2 * s.lam) for s in self.layers]
        self.normalize, self.dataset_size = str(reg.get("normalize", "batch")), dataset_size

    def n(self, batch_size: int) -> float:
        return {"batch": float(batch_size), "dataset": float(self.dataset_size)}.get(
            self.normalize, 1.0)

    def terms(self, batch_size: int) -> dict[str, torch.Tensor]:
        n, out = self.n(batch_size), {}
        if "l1" in self.names:
            out["l1"] = sum(lam1 * sum(p.abs().sum() for p in s.tensors)
                            for s, (lam1, _) in zip(self.layers, self.lams, strict=True)) / n
        if "l2" in self.names:
            out["l2"] = sum(lam2 * sum(p.pow(2).sum() for p in s.tensors)
                            for s, (_, lam2) in zip(self.layers, self.lams, strict=True)) / n
        return out

    def param_groups(self, net: nn.Module, batch_size: int) -> list[dict]:
        """``mode=optimizer`` (L2): torch's own weight_decay = 2λ/n on each selected tensor."""
        groups = [{"params": list(s.tensors), "weight_decay": 2.0 * lam2 / self.n(batch_size)}
                  for s, (_, lam2) in zip(self.layers, self.lams, strict=True)]
        chosen = {id(p) for s in self.layers for p in s.tensors}
        groups.append({"params": [p for p in net.parameters() if id(p) not in chosen],
                       "weight_decay": 0.0})
        return [g for g in groups if g["params"]]


def optimizer(cfg: DictConfig, net: nn.Module, penalty: PlainPenalty) -> torch.optim.Optimizer:
    """The config's optimizer; in ``mode=optimizer`` the selection as parameter groups with
    torch's own ``weight_decay = 2λ/n``."""
    opt_cfg = {k: v for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items()
               if k != "name"}
    partial = hydra.utils.instantiate(opt_cfg, _partial_=True)
    if cfg.regularization.get("mode", "loss") == "optimizer":
        return partial(penalty.param_groups(net, int(cfg.data.batch_size)))
    return partial(net.parameters())


def mean_cce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The note's (1/n) Σ_i CCE(ŷ_i, y_i): each example's CCE, averaged (``torch.mean``'s
    summation, where ``reduction="mean"`` sums in another order: an ulp apart)."""
    return F.cross_entropy(logits, y, reduction="none").mean()


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, prefix: str) -> Metrics:
    """Mean CCE and accuracy over ``(x, y)`` in eval mode (BatchNorm's running statistics,
    no dropout), in chunks of :data:`VAL_BATCH`."""
    net.eval()
    ce = hit = torch.zeros((), device=x.device)
    with torch.no_grad():
        for xb, yb in batches(x, y, VAL_BATCH):
            logits = net(xb)
            ce = ce + mean_cce(logits, yb) * len(yb)
            hit = hit + (logits.argmax(1) == yb).sum()
    net.train()
    return {f"{prefix}/ce": (ce / len(y)).item(), f"{prefix}/acc": (hit / len(y)).item()}


def train(cfg: DictConfig, splits: Any,
          device: torch.device | str = "cpu") -> tuple[nn.Module, list[Metrics]]:
    """Train ``cfg`` on ``splits``; returns the network and every epoch's metrics (the keys the
    harness logs but ``weights/eff_lr/*``), the test split's on the last epoch."""
    seed, bs = int(cfg.seed), int(cfg.data.batch_size)
    x_train, y_train = (standard(t).to(device) for t in splits.train)
    x_val, y_val = (standard(t).to(device) for t in splits.val)
    n = len(y_train)
    # train_eval/*: the first examples of the training subset, as many as val holds (1,024
    # without val), measured in eval mode at each epoch's end; the gap is taken against them
    eval_train = bool(cfg.trainer.get("eval_train", False))
    m_eval = min(n, len(y_val) or 1024)
    x_fit, y_fit = x_train[:m_eval], y_train[:m_eval]
    torch.manual_seed(seed)  # the initial weights, then dropout's masks, from this generator
    net = build_net(cfg, tuple(x_train.shape[1:]), int(splits.num_classes)).to(device)
    penalty = PlainPenalty(net, cfg.regularization, dataset_size=n)
    opt = optimizer(cfg, net, penalty)
    clip = cfg.trainer.get("gradient_clip_val")
    by_value = cfg.trainer.get("gradient_clip_algorithm") == "value"
    loss_mode = cfg.regularization.get("mode", "loss") == "loss"
    augment = bool(cfg.data.get("augment", False))
    pad = cfg.data.get("augment_pad")
    pad = max(1, int(x_train.shape[-1]) // 8) if pad is None else int(pad)
    history: list[Metrics] = []
    net.train()
    for epoch in range(int(cfg.trainer.max_epochs)):
        ce_sum = hits = torch.zeros((), device=device)
        sums = {name: torch.zeros((), device=device) for name in penalty.names}
        if augment:
            offsets, flips = augment_draws(n, seed, epoch, pad, x_train.dim() == 4)
        seen = 0
        for x, y in batches(x_train, y_train, bs, epoch_order(n, seed, epoch)):
            if augment:
                x = augmented(x, offsets[seen:seen + len(y)], flips[seen:seen + len(y)], pad)
            seen += len(y)
            logits = net(x)
            ce = mean_cce(logits, y)
            with torch.set_grad_enabled(loss_mode):  # the optimizer's decay: logged, not added
                terms = penalty.terms(len(y) if loss_mode else bs)
            loss = ce + sum(terms.values()) if loss_mode else ce
            opt.zero_grad()
            loss.backward()
            if clip and by_value:
                torch.nn.utils.clip_grad_value_(net.parameters(), clip)
            elif clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            with torch.no_grad():
                ce_sum = ce_sum + ce * len(y)
                for name, v in terms.items():
                    sums[name] = sums[name] + v * len(y)
                hits = hits + (logits.argmax(1) == y).sum()
        m = {"train/ce": (ce_sum / n).item(), "train/acc": (hits / n).item()}
        m.update({f"train/{name}": (v / n).item() for name, v in sums.items()})
        # what the optimizer minimises: under mode=optimizer the CE alone
        m["train/loss"] = m["train/ce"] + sum(m[f"train/{name}"] for name in sums) \
            if loss_mode else m["train/ce"]
        m["train/lr"] = float(opt.param_groups[0]["lr"])
        norms = {s.name: s.weight.detach().pow(2).sum().item() for s in penalty.layers}
        m.update({f"weights/sq_norm/{name}": v for name, v in norms.items()})
        m["weights/sq_norm_total"] = sum(norms.values())
        if eval_train:
            m.update(evaluate(net, x_fit, y_fit, "train_eval"))
        if len(y_val):
            m.update(evaluate(net, x_val, y_val, "val"))
            fit = "train_eval" if eval_train else "train"
            m["gap/ce"] = m["val/ce"] - m[f"{fit}/ce"]
            m["gap/acc"] = m[f"{fit}/acc"] - m["val/acc"]
        history.append(m)
    if splits.test is not None and history:
        history[-1].update(evaluate(net, *(standard(t).to(device) for t in splits.test),
                                    "test"))
    return net, history

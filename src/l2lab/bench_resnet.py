"""The pieces of ``python -m l2lab.bench --resnet`` (``bench.bench_resnet`` times them): ResNet-18
on CIFAR-shaped synthetic tensors, the GPU recipe.

Why: the main bench times a small MLP, where the harness's per-step overhead is all there is. A
ResNet-18 on 32×32 images (``experiment=cifar10_resnet18``'s network, optimizer and schedule) is
what a weight-decay study on images trains, and on a GPU it is kernel-bound: this says what the
harness costs there, and what stacking buys when each network is already large.

Two comparisons, each side warmed up once (untimed: cuDNN's autotuning, imports), then timed:

- ``harness`` against ``plain``, one epoch each: the harness (``engine.build_member`` +
  ``engine.lightning_fit`` with a real ``RunTracker`` on a temporary SQLite store, as the main
  bench's harness side) against a hand-written loop over the same data path: the tensors on the
  device (channels-last on CUDA), index batches in the harness's order, the same initial weights,
  SGD with Nesterov momentum, the per-step cosine schedule, L2 in the loss, bf16 autocast under
  ``trainer.precision=bf16-mixed`` (CUDA only: ``rules.effective_precision``).
- ``stack`` against ``sequential``: ``--stack`` K networks (a λ grid) trained as one stack,
  against the same K trained one after another through the harness (32-bit: jobs stack only at
  full precision, ``stackable.STACKABLE_TRAINER``), with each stacked network's weights compared
  with its ordinary run's.

The data are random (no real CIFAR here): the times are real, the accuracies meaningless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from l2lab.core.data import Splits
from l2lab.core.reference import epoch_order
from l2lab.core.rules import effective_precision
from l2lab.core.stacked import unstack_into
from l2lab.run import engine
from l2lab.tracking import tracker as tr

IMAGE = (3, 32, 32)
CLASSES = 10
#: The λ grid of the stack (the preset's, with one more value so that K = 8 by default).
LAMS = (0.0, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256)


def synthetic(n: int, seed: int = 0) -> Splits:
    """``n`` CIFAR-shaped standard-normal images with random labels, no val or test split."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *IMAGE, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return Splits("synthetic", (x, y), (x[:0], y[:0]), None, CLASSES)


def overrides(batch_size: int, epochs: int, precision: str, device: torch.device,
              lam: float = 0.032) -> list[str]:
    """The preset's recipe, one job, nothing measured but training (no val, no train_eval), and
    no augmentation: the plain loop has none, and both sides must train the same numbers."""
    return ["experiment=cifar10_resnet18", f"regularization.lam={lam}", "data.augment=false",
            f"data.batch_size={batch_size}", f"trainer.max_epochs={epochs}",
            f"trainer.precision={precision}", "trainer.eval_train=false", "data.val_size=0",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "seed=0"]


def run_plain(cfg: DictConfig, splits: Splits, device: torch.device) -> tuple[torch.nn.Module,
                                                                               dict[str, float]]:
    """The loop a researcher would write for the preset, on the same data path as the harness."""
    import pytorch_lightning as pl

    from l2lab.models import resnet18

    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.preserve_format
    seed, bs = int(cfg.seed), int(cfg.data.batch_size)
    lam, epochs = float(cfg.regularization.lam), int(cfg.trainer.max_epochs)
    bf16 = cuda and effective_precision(cfg.trainer.precision, cuda) == "bf16-mixed"
    x, y = (t.to(device) for t in splits.train)
    x = x.contiguous(memory_format=fmt)
    pl.seed_everything(seed, workers=False, verbose=False)  # as the harness seeds a network
    net = resnet18(IMAGE, CLASSES, cifar_stem=bool(cfg.model.cifar_stem)).to(device,
                                                                            memory_format=fmt)
    weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    opt = torch.optim.SGD(net.parameters(), lr=float(cfg.optimizer.lr),
                          momentum=float(cfg.optimizer.momentum),
                          nesterov=bool(cfg.optimizer.nesterov))
    steps = epochs * -(-len(y) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps,
                                                       eta_min=float(cfg.scheduler.eta_min))
    ce_sum = torch.zeros((), device=device)
    net.train()
    for epoch in range(epochs):
        ce_sum.zero_()
        for idx in epoch_order(len(y), seed, epoch).to(device).split(bs):
            xb, yb = x[idx], y[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                ce = F.cross_entropy(net(xb), yb, reduction="none").mean()
                loss = ce + lam / len(yb) * sum(w.pow(2).sum() for w in weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ce_sum += ce.detach() * len(yb)
    return net, {"train/ce": float(ce_sum / len(y))}


def timed(runs: list[dict[str, float]], steps: int, images: int) -> dict[str, Any]:
    best = min(r["seconds"] for r in runs)
    return {"times_s": [r["seconds"] for r in runs], "min_s": best, "steps_per_s": steps / best,
            "images_per_s": images / best, **{k: max(r[k] for r in runs) for k in runs[0]
                                               if k.endswith("_mib")}}


def fit_stack(cfgs: list[DictConfig], splits: Splits, out: Path) -> list[torch.nn.Module]:
    """``cfgs`` (one job each, differing in per-network keys) trained as one stack through the
    harness's engine, metrics dropped; each network's final weights."""
    from l2lab.run.recorder import Recorder

    members = [engine.build_member(c, splits, OmegaConf.to_container(c, resolve=True))
               for c in cfgs]
    module = engine.stack(cfgs[0], members, example=splits.train[0])
    recorder = Recorder([tr.NullTracker() for _ in cfgs],
                        [out / f"{i}.ckpt" for i in range(len(cfgs))])
    engine.lightning_fit(cfgs[0], module, splits, recorder, [int(c.seed) for c in cfgs], out)
    unstack_into(module, [m.net for m in members])
    return [m.net for m in members]

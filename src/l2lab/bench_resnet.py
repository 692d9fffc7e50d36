"""``python -m l2lab.bench --resnet``: ResNet-18 on CIFAR-shaped synthetic tensors, the GPU recipe.

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

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from l2lab.bench import _device, _rel_diff, compose_cfg, environment, measure, run_harness
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
    """The preset's recipe, one job, nothing measured but training (no val, no train_eval)."""
    return ["experiment=cifar10_resnet18", f"regularization.lam={lam}",
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


def _timed(runs: list[dict[str, float]], steps: int, images: int) -> dict[str, Any]:
    best = min(r["seconds"] for r in runs)
    return {"times_s": [r["seconds"] for r in runs], "min_s": best, "steps_per_s": steps / best,
            "images_per_s": images / best, **{k: max(r[k] for r in runs) for k in runs[0]
                                               if k.endswith("_mib")}}


def _weights_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(_rel_diff(sa[k], sb[k]) for k in sb if sb[k].is_floating_point())


def bench_resnet(args: argparse.Namespace) -> dict[str, Any]:
    """The two comparisons (module docstring), as one JSON-ready dict."""
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    precision = str(effective_precision(args.precision, cuda))
    epochs, bs, n, k = args.epochs, args.batch_size, args.train_size, args.stack
    splits = synthetic(n)
    steps = epochs * -(-n // bs)
    ov = overrides(bs, epochs, precision, device)
    cfg, warm = compose_cfg(ov), compose_cfg(overrides(bs, 1, precision, device))
    warm_splits = synthetic(min(n, 2 * bs), seed=1)
    grid = [compose_cfg(overrides(bs, epochs, "32-true", device, lam)) for lam in LAMS[:k]]
    result: dict[str, Any] = {
        "settings": {"case": "resnet18", "image_shape": list(IMAGE), "train_size": n,
                     "batch_size": bs, "epochs": epochs, "steps_per_epoch": steps // epochs,
                     "precision": precision, "channels_last": cuda, "stack_k": k,
                     "stack_lams": list(LAMS[:k]), "repeats": args.repeats,
                     "device": str(device)},
        "overrides": ov,
        "sides": {"harness": "engine (a stack of one): Lightning, per-epoch MLflow metrics "
                             "(SQLite) and last.ckpt",
                  "plain": "hand-written loop: same tensors, order, init, SGD Nesterov, "
                           "per-step cosine, L2 in the loss, autocast as the harness",
                  "stack": f"{k} networks (the λ grid) as one stack through the harness, 32-bit",
                  "sequential": f"the same {k} trained one after another through the harness"},
    }
    with tempfile.TemporaryDirectory(prefix="l2lab-bench-resnet-") as tmp:
        uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
        client = tr.connect(uri)
        exp = tr.experiment_id(client, "l2lab-bench-resnet", uri)

        def harness(c: DictConfig, s: Splits, tag: str) -> tuple[Any, dict[str, float]]:
            tracker = tr.RunTracker.start(client, exp, f"bench resnet {tag}", {})
            try:
                return measure(lambda: run_harness(c, s, tracker, Path(tmp) / tag), device)
            finally:
                tracker.finish("FINISHED")

        def stack(cfgs: list[DictConfig], s: Splits, tag: str) -> list[torch.nn.Module]:
            from l2lab.run.recorder import Recorder

            members = [engine.build_member(c, s, OmegaConf.to_container(c, resolve=True))
                       for c in cfgs]
            module = engine.stack(cfgs[0], members, example=s.train[0])
            recorder = Recorder([tr.NullTracker() for _ in cfgs],
                                [Path(tmp) / tag / f"{i}.ckpt" for i in range(len(cfgs))])
            engine.lightning_fit(cfgs[0], module, s, recorder, [int(c.seed) for c in cfgs],
                                 Path(tmp) / tag)
            unstack_into(module, [m.net for m in members])
            return [m.net for m in members]

        def sequential(cfgs: list[DictConfig], s: Splits, tag: str) -> list[torch.nn.Module]:
            return [run_harness(c, s, tr.NullTracker(), Path(tmp) / f"{tag}{i}")[0]
                    for i, c in enumerate(cfgs)]

        harness(warm, warm_splits, "warm")  # untimed
        run_plain(warm, warm_splits, device)
        times: dict[str, list[dict[str, float]]] = {"harness": [], "plain": []}
        for r in range(args.repeats):
            (h_net, h_m), h = harness(cfg, splits, f"h{r}")
            (p_net, p_m), p = measure(lambda: run_plain(cfg, splits, device), device)
            times["harness"].append(h)
            times["plain"].append(p)
        result["harness"] = {**_timed(times["harness"], steps, n * epochs),
                             "final_train_ce": h_m["train/ce"]}
        result["plain"] = {**_timed(times["plain"], steps, n * epochs),
                           "final_train_ce": p_m["train/ce"]}
        result["ratio_harness_over_plain"] = result["harness"]["min_s"] / result["plain"]["min_s"]
        result["agreement"] = {"max_weight_rel_diff": _weights_rel_diff(h_net, p_net),
                               "train_ce_rel_diff": abs(h_m["train/ce"] - p_m["train/ce"])
                               / max(abs(p_m["train/ce"]), 1e-12)}

        stack(grid[:2], warm_splits, "warm-stack")  # untimed: the stacked kernels' first call
        runs = {"stack": [], "sequential": []}
        for r in range(args.repeats):
            stacked, st = measure(lambda r=r: stack(grid, splits, f"s{r}"), device)
            alone, sq = measure(lambda r=r: sequential(grid, splits, f"q{r}"), device)
            runs["stack"].append(st)
            runs["sequential"].append(sq)
        for side in runs:
            result[side] = _timed(runs[side], k * steps, k * n * epochs)
        result["ratio_sequential_over_stack"] = \
            result["sequential"]["min_s"] / result["stack"]["min_s"]
        result["stack_agreement"] = {"max_weight_rel_diff": max(
            _weights_rel_diff(a, b) for a, b in zip(stacked, alone, strict=True))}
    result["env"] = environment(device)
    return result

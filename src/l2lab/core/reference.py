"""The plain PyTorch loop that is the executable spec of one run: what a researcher would write.

No Lightning, no MLflow, no stacking: one network, ``torch.optim`` with its own ``weight_decay``
(``mode=optimizer``), ``torch.nn.utils`` clipping, the note's loss. The benchmarks time the harness
against it (``bench``, ``bench --sweep``) and the tests check that the harness trains the same
thing (``tests/test_engine.py``). It builds the network, penalty, batches and seeds as the harness
does, so both start from the same weights and see the same batches.
"""

from __future__ import annotations

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from l2lab.core.data import Splits, TensorBatches
from l2lab.core.regularization import build_penalty
from l2lab.run.engine import build_net

VAL_BATCH = 1024
Metrics = dict[str, float]


def optimizer(cfg: DictConfig, net: torch.nn.Module, penalty) -> torch.optim.Optimizer:
    """The config's optimizer; in ``mode=optimizer`` the selection as parameter groups with
    torch's own ``weight_decay = 2λ/n``."""
    opt_cfg = {k: v for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items()
               if k != "name"}
    partial = hydra.utils.instantiate(opt_cfg, _partial_=True)
    if cfg.regularization.mode == "optimizer":
        return partial(penalty.param_groups(net, int(cfg.data.batch_size)))
    return partial(net.parameters())


def _evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, prefix: str) -> Metrics:
    net.eval()
    ce = hit = torch.zeros((), device=x.device)
    with torch.no_grad():
        for xb, yb in TensorBatches(x, y, VAL_BATCH):
            logits = net(xb)
            ce = ce + F.cross_entropy(logits, yb, reduction="sum")
            hit = hit + (logits.argmax(1) == yb).sum()
    net.train()
    return {f"{prefix}/ce": ce.item() / len(y), f"{prefix}/acc": hit.item() / len(y)}


def train(cfg: DictConfig, splits: Splits,
          device: torch.device | str = "cpu") -> tuple[torch.nn.Module, list[Metrics]]:
    """Train ``cfg`` on ``splits``; returns the network and every epoch's metrics (the keys the
    harness logs, but per-layer norms)."""
    seed, bs = int(cfg.seed), int(cfg.data.batch_size)
    torch.manual_seed(seed)  # as the harness's seed_everything: the same initial weights
    splits = splits.to(device)
    net = build_net(cfg, splits).to(device)
    penalty = build_penalty(net, cfg.regularization, dataset_size=len(splits.train[1]))
    opt = optimizer(cfg, net, penalty)
    clip = cfg.trainer.get("gradient_clip_val")
    by_value = cfg.trainer.get("gradient_clip_algorithm") == "value"
    loss_mode = cfg.regularization.mode == "loss"
    batches = TensorBatches(*splits.train, bs, shuffle=True, seed=seed)
    history: list[Metrics] = []
    for epoch in range(int(cfg.trainer.max_epochs)):
        batches.sampler.set_epoch(epoch)
        ce_sum = l2_sum = hits = torch.zeros((), device=device)
        for x, y in batches:
            logits = net(x)
            ce = F.cross_entropy(logits, y)
            with torch.set_grad_enabled(loss_mode):
                l2 = penalty(len(y) if loss_mode else bs)
            loss = ce + l2 if loss_mode else ce
            opt.zero_grad()
            loss.backward()
            if clip and by_value:
                torch.nn.utils.clip_grad_value_(net.parameters(), clip)
            elif clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            with torch.no_grad():
                ce_sum = ce_sum + ce * len(y)
                l2_sum = l2_sum + l2 * len(y)
                hits = hits + (logits.argmax(1) == y).sum()
        n = len(splits.train[1])
        m = {"train/ce": ce_sum.item() / n, "train/l2": l2_sum.item() / n,
             "train/acc": hits.item() / n}
        m["train/loss"] = m["train/ce"] + m["train/l2"]
        m["weights/sq_norm_total"] = sum(v.item() for v in penalty.weight_sq_norms().values())
        if len(splits.val[1]):
            m.update(_evaluate(net, *splits.val, "val"))
            m["gap/ce"] = m["val/ce"] - m["train/ce"]
        history.append(m)
    if splits.test is not None and history:
        history[-1].update(_evaluate(net, *splits.test, "test"))
    return net, history

"""The plain PyTorch loop that is the executable spec of one run: what a researcher would write.

No Lightning, no MLflow, no stacking, and nothing of the harness's penalty objects: one network,
the penalty written out below as the plain formula of each ``regularization`` preset (L2, L1,
elastic net), ``torch.optim`` with its own ``weight_decay`` (``mode=optimizer``), ``torch.nn.utils``
clipping. The benchmarks time the harness against it (``bench``, ``bench --sweep``) and the tests
check that the harness trains the same thing (``tests/test_engine.py``,
``tests/test_penalties.py``). It seeds, builds the network and batches as the harness does (and
selects layers by the one selection rule, ``regularization.select_layers``), so both start from
the same weights and see the same batches. It stands alone: nothing of run/ or config/.
"""

from __future__ import annotations

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from l2lab.core.data import Splits, TensorBatches
from l2lab.core.regularization import SelectedLayer, select_layers
from l2lab.core.rules import DEFAULT_PENALTY

VAL_BATCH = 1024
Metrics = dict[str, float]
#: ``regularization._target_`` -> (its terms, the share of λ on the L1 and on the L2 term
#: given ``l1_ratio``).
PRESETS = {
    "l2lab.core.penalties.L2": (("l2",), lambda r: (0.0, 1.0)),
    "l2lab.core.penalties.L1": (("l1",), lambda r: (1.0, 0.0)),
    "l2lab.core.penalties.ElasticNet": (("l1", "l2"), lambda r: (r, 1.0 - r)),
}


def build_net(cfg: DictConfig, splits: Splits) -> torch.nn.Module:
    """``cfg.model`` for the data's input shape and classes (as the harness builds it)."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
             if k != "name"}
    return hydra.utils.instantiate(model, in_shape=splits.in_shape,
                                   num_classes=splits.num_classes)


class PlainPenalty:
    """The preset's penalty, written out: over the selected layers,
    Σ_l (λ₁_l·Σ|w| + λ₂_l·Σw²) / n, with (λ₁, λ₂) = (0, λ) for L2, (λ, 0) for L1 and
    (r·λ, (1 − r)·λ) for elastic net (r = ``l1_ratio``)."""

    def __init__(self, net: torch.nn.Module, reg: DictConfig, dataset_size: int) -> None:
        target = str(reg.get("_target_") or DEFAULT_PENALTY)
        if target not in PRESETS:
            raise ValueError(f"the reference loop knows {sorted(PRESETS)}, not {target}")
        self.names, shares = PRESETS[target]
        share1, share2 = shares(float(reg.get("l1_ratio", 0.5)))
        self.layers: list[SelectedLayer] = select_layers(
            net, lam=reg.lam, layers=reg.layers, exclude=reg.exclude, types=reg.types,
            min_params=reg.min_params, lam_per_layer=reg.get("lam_per_layer") or {},
            include_bias=reg.include_bias)
        self.lams = [(share1 * s.lam, share2 * s.lam) for s in self.layers]
        self.normalize, self.dataset_size = str(reg.normalize), dataset_size

    def n(self, batch_size: int) -> float:
        return {"batch": float(batch_size), "dataset": float(self.dataset_size)}.get(
            self.normalize, 1.0)

    def terms(self, batch_size: int) -> dict[str, torch.Tensor]:
        n, out = self.n(batch_size), {}
        if "l1" in self.names:
            out["l1"] = sum(lam1 * sum(p.abs().sum() for p in s.params)
                            for s, (lam1, _) in zip(self.layers, self.lams, strict=True)) / n
        if "l2" in self.names:
            out["l2"] = sum(lam2 * sum(p.pow(2).sum() for p in s.params)
                            for s, (_, lam2) in zip(self.layers, self.lams, strict=True)) / n
        return out

    def param_groups(self, net: torch.nn.Module, batch_size: int) -> list[dict]:
        """``mode=optimizer`` (L2): torch's own weight_decay = 2λ/n on each selected tensor."""
        groups = [{"params": s.params, "weight_decay": 2.0 * lam2 / self.n(batch_size)}
                  for s, (_, lam2) in zip(self.layers, self.lams, strict=True)]
        chosen = {id(p) for s in self.layers for p in s.params}
        groups.append({"params": [p for p in net.parameters() if id(p) not in chosen],
                       "weight_decay": 0.0})
        return [g for g in groups if g["params"]]


def optimizer(cfg: DictConfig, net: torch.nn.Module, penalty: PlainPenalty
              ) -> torch.optim.Optimizer:
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
    penalty = PlainPenalty(net, cfg.regularization, dataset_size=len(splits.train[1]))
    opt = optimizer(cfg, net, penalty)
    clip = cfg.trainer.get("gradient_clip_val")
    by_value = cfg.trainer.get("gradient_clip_algorithm") == "value"
    loss_mode = cfg.regularization.mode == "loss"
    batches = TensorBatches(*splits.train, bs, shuffle=True, seed=seed)
    history: list[Metrics] = []
    for epoch in range(int(cfg.trainer.max_epochs)):
        batches.sampler.set_epoch(epoch)
        ce_sum = hits = torch.zeros((), device=device)
        sums = {name: torch.zeros((), device=device) for name in penalty.names}
        for x, y in batches:
            logits = net(x)
            ce = F.cross_entropy(logits, y)
            with torch.set_grad_enabled(loss_mode):
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
        n = len(splits.train[1])
        m = {"train/ce": ce_sum.item() / n, "train/acc": hits.item() / n}
        m.update({f"train/{name}": v.item() / n for name, v in sums.items()})
        m["train/loss"] = m["train/ce"] + sum(m[f"train/{name}"] for name in sums)
        m["weights/sq_norm_total"] = sum(s.weight.detach().pow(2).sum().item()
                                         for s in penalty.layers)
        if len(splits.val[1]):
            m.update(_evaluate(net, *splits.val, "val"))
            m["gap/ce"] = m["val/ce"] - m["train/ce"]
        history.append(m)
    if splits.test is not None and history:
        history[-1].update(_evaluate(net, *splits.test, "test"))
    return net, history

"""Which jobs of a sweep may train together as one stack of networks, decided from their composed
configs alone (light: the vectorized launcher imports it when Hydra starts)."""

from __future__ import annotations

import json
import math

from omegaconf import DictConfig, OmegaConf

STACKABLE_MODELS = ("l2lab.models.MLP", "l2lab.models.CNN")
#: Optimizers whose update is elementwise (so one instance over stacked tensors equals K).
STACKABLE_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")
ANY = object()
#: Trainer settings proven to act per network in a stack (``tests/test_engine.py``), with the
#: values allowed; any other setting or value makes the job train alone (a stack of one). For
#: example 16-bit precision would share one GradScaler: one overflow would skip every network's
#: step.
STACKABLE_TRAINER: dict[str, object] = {
    "max_epochs": ANY, "accelerator": ANY, "deterministic": ANY, "enable_progress_bar": ANY,
    "devices": (1, "1"), "num_nodes": (1,), "strategy": ("auto",),
    "precision": ("32-true", "32", 32), "gradient_clip_val": ANY,
    "gradient_clip_algorithm": (None, "norm", "value"),
}


def _stackable_trainer(trainer: dict) -> bool:
    for key, value in trainer.items():
        allowed = STACKABLE_TRAINER.get(key)
        if allowed is None or (allowed is not ANY and value not in allowed):  # type: ignore
            return False
    return True


def group_key(cfg: DictConfig) -> str | None:
    """What a job must share with others to be stacked with them; ``None``: train it alone."""
    try:
        tree = OmegaConf.to_container(task_config(cfg), resolve=True)
    except Exception:  # an interpolation error is the ordinary path's to report
        return None
    return shape_key(tree) if valid_lams(tree.get("regularization") or {}) else None


def shape_key(tree: dict) -> str | None:
    """:func:`group_key` of a resolved task config, its λ values not judged (a member's are its
    own: :func:`valid_lams`)."""
    reg = tree.get("regularization") or {}
    if (tree.get("resume") or tree.get("reuse")
            or (tree.get("model") or {}).get("_target_") not in STACKABLE_MODELS
            or (tree.get("optimizer") or {}).get("_target_") not in STACKABLE_OPTIMIZERS
            or not _stackable_trainer(tree.get("trainer") or {})):
        return None
    tree = {**tree, "regularization": {k: v for k, v in reg.items()
                                       if k not in ("lam", "lam_per_layer")}}
    tree.pop("seed", None)
    return json.dumps(tree, sort_keys=True, default=str)


def member_values(cfg: DictConfig) -> dict:
    """A job's values of the stacked keys (``composing.MEMBER_KEYS``), resolved."""
    reg = cfg.regularization
    per_layer = reg.get("lam_per_layer")
    return {"seed": cfg.seed, "regularization.lam": reg.lam,
            "regularization.lam_per_layer":
                OmegaConf.to_container(per_layer, resolve=True) if per_layer else {}}


def task_config(cfg: DictConfig) -> DictConfig:
    """The job's config as its task function sees it: without the ``hydra`` node."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def valid_lams(reg: dict) -> bool:
    """Jobs with a bad λ go the ordinary way, which records them FAILED with the reason."""
    values = [reg.get("lam"), *((reg.get("lam_per_layer") or {}).values())]
    try:
        return all(math.isfinite(float(v)) and float(v) >= 0 for v in values)
    except (TypeError, ValueError):
        return False

"""The config contract: typed schemas for every group, and the range checks.

Why here, and light: a typo or a bad value should cost a second, not the 10+ s it takes to import
torch, Lightning and MLflow. This module imports only Hydra and OmegaConf. Three layers:

* **types** — dataclasses registered in Hydra's ConfigStore (``schema/<group>/<name>``) and named
  in each YAML's defaults list, so Hydra itself refuses ``data.batch_size=1.5`` at composition,
  naming the key;
* **ranges** — :func:`validate` runs right after composition (λ ≥ 0 and finite, sizes, enums…);
* **keys** — :mod:`l2lab.config.cli` reads the command line before Hydra does and refuses
  unknown keys.

Also here, for the same reason, nothing else: the checks of ``tracking.uri`` and of the server's
login live in the stdlib-only :mod:`l2lab.tracking.store`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from l2lab.base import ConfigError
from l2lab.core import rules
from l2lab.core.rules import DEFAULT_PENALTY, MODES, NORMALIZE, check_lams, check_ratio

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
CLIP_ALGORITHMS = ("norm", "value")
#: ``trainer`` keys that l2lab reads itself and does not hand to Lightning's Trainer. Clipping is
#: per network (``L2Module.on_before_optimizer_step``; Lightning refuses its own under manual
#: optimization).
OWN_TRAINER_KEYS = ("eval_train", "gradient_clip_val", "gradient_clip_algorithm")
#: Dict-valued keys whose entries the user adds with ``+key.<name>=value`` (design.md §3).
OPEN_DICTS = ("regularization.lam_per_layer",)


# -- types ---------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = MISSING
    root: str = "data"
    download: bool = False
    train_size: int | None = None
    val_size: int = 0
    split_seed: int = 0
    batch_size: int = 64
    label_noise: float = 0.0
    # training batches only, per network from its own seed (core/augment.py); the pad, null:
    # an eighth of the image's side or the signal's length (4 for 32x32)
    augment: bool = False
    augment_pad: int | None = None


@dataclass
class DigitsDataConfig(DataConfig):
    """The digits' fixed held-out test split (``core/data.py``): 360 images, or 0 for none (a
    config logged before the split existed has no key, and means 0: what it trained on)."""

    test_size: int = 360


@dataclass
class MNIST1DDataConfig(DataConfig):
    """MNIST-1D's own sizes (``rules.MNIST1D_SIZES``: the ``mnist1d`` package's names and
    defaults), so that another split of generated sequences is a config."""

    num_samples: int = int(rules.MNIST1D_SIZES["num_samples"])
    train_split: float = float(rules.MNIST1D_SIZES["train_split"])


@dataclass
class MLPConfig:
    _target_: str = "l2lab.models.MLP"
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    dropout: float = 0.0


@dataclass
class CNNConfig:
    _target_: str = "l2lab.models.CNN"
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden: list[int] = field(default_factory=lambda: [128])
    activation: str = "relu"
    dropout: float = 0.0
    # an int or one per conv layer (experiment=mnist1d: [5, 3, 3]); pooled: null for no
    # adaptive pooling (the MNIST-1D paper's CNN)
    kernel_size: Any = 3
    stride: Any = 1
    padding: Any = 1
    pool: bool = True
    pooled: int | None = 4


@dataclass
class RegularizationConfig:
    """The keys every penalty shares (``core/penalties.py``): the selection, λ, n, mode."""

    _target_: str = DEFAULT_PENALTY
    name: str = MISSING
    lam: float = 1e-3
    layers: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=lambda: list(rules.LAYER_TYPES))
    min_params: int = 0
    lam_per_layer: dict[str, float] = field(default_factory=dict)
    include_bias: bool = False
    normalize: str = "batch"
    mode: str = "loss"


@dataclass
class ElasticNetConfig(RegularizationConfig):
    """Elastic net: ``lam`` split into λ₁ = l1_ratio·lam and λ₂ = (1 − l1_ratio)·lam."""

    _target_: str = "l2lab.core.penalties.ElasticNet"
    l1_ratio: float = 0.5


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    name: str = "adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    amsgrad: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    name: str = "adamw"


@dataclass
class SchedulerConfig:
    """``scheduler=none``: the optimizer's lr throughout (today's runs, bit for bit)."""

    name: str = "none"
    interval: str = "epoch"  # step: after every optimizer step; epoch: after every epoch


@dataclass
class CosineConfig(SchedulerConfig):
    """``CosineAnnealingLR`` from the base lr to ``eta_min`` over the run after ``warmup``
    intervals of ``LinearLR`` from ``warmup_start_factor`` × the base lr (``SequentialLR``)."""

    name: str = "cosine"
    warmup: int = 0
    warmup_start_factor: float = 0.1
    eta_min: float = 0.0


@dataclass
class StepConfig(SchedulerConfig):
    """``StepLR``: the lr times ``gamma`` every ``step_size`` intervals."""

    name: str = "step"
    step_size: int = 10
    gamma: float = 0.1


@dataclass
class OneCycleConfig(SchedulerConfig):
    """``OneCycleLR`` peaking at each network's base lr (``optimizer.lr``), momentum not cycled."""

    name: str = "onecycle"
    interval: str = "step"
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False


@dataclass
class TrainerConfig:
    max_epochs: int = 30
    accelerator: str = "auto"
    devices: Any = 1  # an int, a list of device ids, or "auto"
    precision: Any = "32-true"  # Lightning accepts "32-true", 32, "bf16-mixed", ...
    deterministic: bool = False
    enable_progress_bar: bool = False
    strategy: str = "auto"
    num_nodes: int = 1
    gradient_clip_val: float | None = None  # each network clipped by its own norm
    gradient_clip_algorithm: str | None = None  # norm (Lightning's default) or value
    eval_train: bool = True  # train_eval/* each epoch, and gap/* against it (design.md §4)


@dataclass
class ResNet1dConfig:
    _target_: str = "l2lab.models.ResNet1d"
    name: str = "resnet1d"
    channels: list[int] = field(default_factory=lambda: [16, 32])
    blocks: int = 1
    batchnorm: bool = True
    activation: str = "relu"


@dataclass
class ResNet18Config:
    _target_: str = "l2lab.models.resnet18"
    name: str = "resnet18"
    cifar_stem: bool = False


@dataclass
class TrackingConfig:
    uri: str | None = None
    flush_every_s: float = 5.0


@dataclass
class TrainConfig:
    """The primary config's own keys; the groups are typed by their own schemas."""

    data: Any = MISSING
    model: Any = MISSING
    regularization: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: Any = MISSING
    seed: int = 0
    resume: str | None = None
    reuse: bool = False
    experiment_name: str = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


SCHEMAS: dict[str, dict[str, type]] = {
    "data": {"data": DataConfig, "digits": DigitsDataConfig, "mnist1d": MNIST1DDataConfig},
    "model": {"mlp": MLPConfig, "cnn": CNNConfig, "resnet1d": ResNet1dConfig,
              "resnet18": ResNet18Config},  # model=custom: a network's own keys, untyped
    "regularization": {"regularization": RegularizationConfig, "elastic": ElasticNetConfig},
    "optimizer": {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamWConfig},
    "scheduler": {"none": SchedulerConfig, "cosine": CosineConfig, "step": StepConfig,
                  "onecycle": OneCycleConfig},
    "trainer": {"trainer": TrainerConfig},
}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (the YAML files name them in their defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


register()


# -- ranges --------------------------------------------------------------------------------------
def _fail(key: str, rule: str, value: object) -> ConfigError:
    return ConfigError(f"{key} must be {rule}, got {value!r}.")


def check_member(values: Mapping[str, Any]) -> None:
    """:func:`validate`'s checks of the keys in which the jobs of a stack differ (its
    ``stackable.STACKED``), in its order: for a job whose other keys passed ``validate`` as
    another job of its stack, the same first error."""
    check_lams(values["regularization.lam"], values["regularization.lam_per_layer"])
    _flag(values.get("data.augment", False), "data.augment")
    seed = values["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise _fail("seed", "an integer >= 0", seed)


def _flag(value: object, key: str) -> None:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)


def _int(cfg: Any, key: str, low: int, *, optional: bool = False, what: str = "") -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        rule = f"an integer >= {low}" + (" or null" if optional else "") + what
        raise _fail(key, rule, value)


def _choice(cfg: Any, key: str, allowed: Sequence[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}.")


def _number(cfg: Any, key: str, rule: str, ok) -> None:  # noqa: ANN001
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not ok(value):
        raise _fail(key, rule, value)


def validate(cfg: DictConfig) -> None:
    """Range checks that need no data and no torch: the first bad key is a ConfigError.

    Checks that need the dataset or the network (``train_size`` larger than the data, a layer
    pattern matching nothing) run later, in ``train``, still before any training.
    """
    reg = cfg.regularization
    check_lams(reg.get("lam"), reg.get("lam_per_layer"))
    if "l1_ratio" in reg:
        check_ratio(reg.get("l1_ratio"))
    _choice(cfg, "regularization.normalize", NORMALIZE)
    _choice(cfg, "regularization.mode", MODES)
    _int(cfg, "regularization.min_params", 0)
    for t in reg.get("types") or []:
        if why := rules.type_error(t):
            raise ConfigError(why)

    _choice(cfg, "data.name", rules.DATASETS)
    _int(cfg, "data.train_size", 1, optional=True, what=" (null: all)")
    _int(cfg, "data.val_size", 0)
    _int(cfg, "data.batch_size", 1)
    _int(cfg, "data.split_seed", 0)
    rules.check_label_noise(cfg.data.get("label_noise", 0.0))
    _flag(cfg.data.get("augment", False), "data.augment")
    _int(cfg, "data.augment_pad", 0, optional=True, what=" (null: an eighth of the input's side)")
    if "num_samples" in cfg.data or "train_split" in cfg.data:
        rules.check_mnist1d_sizes(cfg.data.get("num_samples"), cfg.data.get("train_split"))

    if OmegaConf.is_missing(cfg.model, "_target_"):
        raise ConfigError("model._target_ is not set: model=custom needs the network to build, "
                          "e.g. model=custom model._target_=mylab.nets.MyNet.")
    target = cfg.model.get("_target_")
    if why := rules.network_error(target):
        raise ConfigError(why)
    if "activation" in cfg.model and target in rules.NETWORKS.values():
        _choice(cfg, "model.activation", tuple(rules.ACTIVATIONS))
    if target in rules.OWN_NETWORKS:
        _number(cfg, "model.dropout", "a number in [0, 1)", lambda v: 0 <= v < 1)
    for key in ("model.hidden", "model.channels"):
        if target not in rules.NETWORKS.values():
            break
        sizes = OmegaConf.select(cfg, key)
        if sizes is not None and not all(isinstance(s, int) and s >= 1 for s in sizes):
            raise _fail(key, "a list of integers >= 1", list(sizes))

    _number(cfg, "optimizer.lr", "a number > 0", lambda v: v > 0)
    if str(cfg.optimizer.get("_target_", "")).split(".")[:2] != ["torch", "optim"]:
        raise _fail("optimizer._target_", "a torch.optim class", cfg.optimizer.get("_target_"))
    if float(cfg.optimizer.get("weight_decay") or 0.0) != 0.0:
        raise ConfigError(
            "optimizer.weight_decay must be 0: L2 is set by regularization.* and applied only to "
            "the selected layers; use regularization.mode=optimizer for decay in the optimizer."
        )
    if "momentum" in cfg.optimizer:
        _number(cfg, "optimizer.momentum", "a number >= 0", lambda v: v >= 0)

    _int(cfg, "trainer.max_epochs", 1)
    if "scheduler" in cfg:
        _check_scheduler(cfg)
    _choice(cfg, "trainer.accelerator", ACCELERATORS)
    devices = cfg.trainer.get("devices")
    if not (devices == "auto" or isinstance(devices, ListConfig | list) or
            (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)):
        raise _fail("trainer.devices", "an integer >= 1, a list of device ids, or auto", devices)
    if cfg.trainer.get("gradient_clip_val") is not None:
        _number(cfg, "trainer.gradient_clip_val", "a number >= 0 (or null)", lambda v: v >= 0)
    if cfg.trainer.get("gradient_clip_algorithm") is not None:
        _choice(cfg, "trainer.gradient_clip_algorithm", CLIP_ALGORITHMS)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise _fail("seed", "an integer >= 0", cfg.seed)
    if "flush_every_s" in cfg.get("tracking", {}):
        _number(cfg, "tracking.flush_every_s", "a number >= 0", lambda v: v >= 0)




def _check_scheduler(cfg: DictConfig) -> None:
    """The ``scheduler`` node's values, as torch's classes would refuse them, but before any
    training (``core/schedules.py`` builds them)."""
    _choice(cfg, "scheduler.name", rules.SCHEDULERS)
    _choice(cfg, "scheduler.interval", rules.INTERVALS)
    name = cfg.scheduler.name
    if name == "cosine":
        _int(cfg, "scheduler.warmup", 0)
        _number(cfg, "scheduler.warmup_start_factor", "a number in (0, 1]",
                lambda v: 0 < v <= 1)
        _number(cfg, "scheduler.eta_min", "a number >= 0", lambda v: v >= 0)
        if cfg.scheduler.interval == "epoch" and cfg.scheduler.warmup >= cfg.trainer.max_epochs:
            raise _fail("scheduler.warmup", "smaller than trainer.max_epochs "
                        f"({cfg.trainer.max_epochs}) with scheduler.interval=epoch",
                        cfg.scheduler.warmup)
    elif name == "step":
        _int(cfg, "scheduler.step_size", 1)
        _number(cfg, "scheduler.gamma", "a number > 0", lambda v: v > 0)
    elif name == "onecycle":
        _number(cfg, "scheduler.pct_start", "a number in (0, 1)", lambda v: 0 < v < 1)
        _choice(cfg, "scheduler.anneal_strategy", rules.ANNEAL_STRATEGIES)
        _number(cfg, "scheduler.div_factor", "a number > 0", lambda v: v > 0)
        _number(cfg, "scheduler.final_div_factor", "a number > 0", lambda v: v > 0)

"""``python -m l2lab.train [overrides]``: compose -> build -> fit -> record. One MLflow run per job.

``train(cfg)`` is a plain function (tests and ``reproduce`` call it directly); ``main`` is the thin
Hydra wrapper that returns the sweep objective (final ``val/ce``).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from l2lab import CONF_DIR, ConfigError
from l2lab import tracking as tr
from l2lab.data import TensorBatches, load_data
from l2lab.module import L2Module, NonFiniteLossError
from l2lab.regularization import L2Penalty, build_penalty, check_lam
from l2lab.sweep import SWEEP_INFO

_NAME_SKIP = ("hydra.", "tracking.", "experiment", "resume")


def run_name(overrides: Sequence[str], cfg: DictConfig, swept: Sequence[str] | None = None) -> str:
    """``["regularization.lam=0.01", "seed=1"]`` -> ``"lam=0.01 seed=1"`` (in a sweep, only the
    swept keys, so that the runs of one sweep read apart at a glance)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in tr.parse_overrides(overrides).items()
             if not k.startswith(_NAME_SKIP) and (swept is None or k in swept)]
    return " ".join(parts) or f"lam={cfg.regularization.lam} seed={cfg.seed}"


def _strip(node: DictConfig, *keys: str) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in keys}


def optimizer_factory(cfg: DictConfig):
    """A function (net, penalty) -> optimizer; in ``mode=optimizer`` the penalty's selection
    becomes parameter groups with weight_decay = 2λ/n and every other parameter gets none."""
    opt_cfg = _strip(cfg.optimizer, "name")
    target = str(opt_cfg.get("_target_", ""))
    if not target.startswith("torch.optim."):
        raise ConfigError(f"optimizer._target_ must be a torch.optim class, got {target!r}.")
    if float(opt_cfg.get("weight_decay", 0.0) or 0.0) != 0.0:
        raise ConfigError(
            "optimizer.weight_decay must be 0: L2 is set by regularization.* and applied only to "
            "the selected layers; use regularization.mode=optimizer for decay in the optimizer."
        )
    lr = opt_cfg.get("lr")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"optimizer.lr must be a number > 0, got {lr!r}.")
    mode, batch_size = cfg.regularization.mode, int(cfg.data.batch_size)
    partial = hydra.utils.instantiate(opt_cfg, _partial_=True)  # groups must stay plain dicts

    def make(net: torch.nn.Module, penalty: L2Penalty) -> torch.optim.Optimizer:
        params = penalty.param_groups(net, batch_size) if mode == "optimizer" else net.parameters()
        return partial(params)

    return make


def build_net(cfg: DictConfig, splits) -> torch.nn.Module:
    """The network of ``cfg.model`` for the data's input shape and classes."""
    model_cfg = _strip(cfg.model, "name")
    if not str(model_cfg.get("_target_", "")).startswith("l2lab.models."):
        raise ConfigError(f"model must be one of mlp, cnn (l2lab.models.*), got {cfg.model}.")
    try:
        return hydra.utils.instantiate(model_cfg, in_shape=splits.in_shape,
                                       num_classes=splits.num_classes)
    except Exception as e:  # instantiate wraps our ConfigError
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
        if cause:
            raise cause from None
        raise ConfigError(f"model: cannot build {model_cfg['_target_']}: {e}") from None


def build(cfg: DictConfig, splits) -> L2Module:
    """Network, penalty and module from the config; every check runs here, before training."""
    net = build_net(cfg, splits)
    penalty = build_penalty(net, cfg.regularization, dataset_size=len(splits.train[1]))
    return L2Module(net, penalty, optimizer_factory(cfg), mode=cfg.regularization.mode,
                    batch_size=int(cfg.data.batch_size))


def _quick_checks(cfg: DictConfig) -> None:
    """Checks that need no data, so that a bad λ fails before a dataset is read."""
    check_lam("regularization.lam", cfg.regularization.lam)
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}.")


def quiet_libraries() -> None:
    """Lightning's info lines (GPU available, tips) and deprecation chatter drown the per-epoch
    lines a researcher reads; keep warnings and errors."""
    import logging

    for name in ("pytorch_lightning", "lightning_fabric", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _sweep_info() -> dict | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        path = Path(hc.sweep.dir) / SWEEP_INFO
    except ValueError:  # not inside a Hydra app
        return None
    return json.loads(path.read_text()) if path.exists() else None


def _logged_config(client, run_id: str) -> DictConfig:
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "config/config.yaml", dst_path=tmp)
        return OmegaConf.create(yaml.safe_load(Path(path).read_text()))


def _resume_config(cfg: DictConfig, overrides: Sequence[str], logged: DictConfig) -> DictConfig:
    """The logged config, with only ``trainer.max_epochs`` taken from this invocation."""
    allowed = ("trainer.max_epochs", "resume", "tracking.uri")
    wrong = []
    for key in tr.parse_overrides(overrides):
        if key in allowed or key.startswith("hydra."):
            continue
        now, then = OmegaConf.select(cfg, key), OmegaConf.select(logged, key)
        if isinstance(now, DictConfig | Mapping) or now != then:
            wrong.append(f"{key} (logged {then!r}, given {now!r})")
    if wrong:
        raise ConfigError(
            "resume: only trainer.max_epochs may differ from the resumed run's logged config; "
            f"these differ: {', '.join(wrong)}."
        )
    out = logged.copy()
    with open_dict(out):
        out.trainer.max_epochs = cfg.trainer.max_epochs
        out.resume = cfg.resume
        out.tracking.uri = cfg.tracking.uri
    return out


def train(cfg: DictConfig, *, overrides: Sequence[str] = (), output_dir: Path | None = None,
          tags: Mapping[str, str] | None = None) -> dict[str, float]:
    """Train one configuration into one MLflow run and return its final metrics.

    The run is created first so that any later failure, a rejected config included, is recorded:
    FAILED with the tag ``l2lab.failure`` on errors, KILLED on Ctrl-C/SIGTERM; what was logged
    stays.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.tracking.uri = tr.resolve_uri(cfg.tracking.uri)
        if isinstance(cfg.regularization.lam, int) and not isinstance(cfg.regularization.lam, bool):
            cfg.regularization.lam = float(cfg.regularization.lam)  # "lam=0" logs as 0.0
    client = tr.connect(cfg.tracking.uri)
    sweep = _sweep_info()

    if cfg.resume:
        run = client.get_run(str(cfg.resume))
        cfg = _resume_config(cfg, overrides, _logged_config(client, run.info.run_id))
        output_dir = Path(run.data.tags["l2lab.output_dir"])
        ckpt = output_dir / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            raise ConfigError(f"resume: run {cfg.resume} has no checkpoint at {ckpt}.")
        tracker = tr.RunTracker.reopen(client, run.info.run_id)
        tracker.set_tags({"l2lab.resumed_max_epochs": cfg.trainer.max_epochs})
    else:
        ckpt = None
        output_dir = Path(output_dir or Path("outputs") / datetime.now().strftime(
            "%Y-%m-%d_%H-%M-%S-%f")).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        run_tags = {
            "l2lab.overrides": json.dumps(list(overrides)),
            "l2lab.output_dir": str(output_dir),
            **({"mlflow.source.git.commit": c} if (c := tr.git_commit(CONF_DIR.parent)) else {}),
            **({"l2lab.sweep_id": sweep["sweep_id"], "mlflow.parentRunId": sweep["parent_run_id"]}
               if sweep else {}),
            **(tags or {}),
        }
        exp = tr.experiment_id(client, str(cfg.experiment_name), cfg.tracking.uri)
        name = run_name(overrides, cfg, sweep.get("swept") if sweep else None)
        tracker = tr.RunTracker.start(client, exp, name, run_tags)
        print(f"l2lab: MLflow run {tracker.run_id} in experiment {cfg.experiment_name!r} "
              f"({cfg.tracking.uri})", flush=True)

    def on_sigterm(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if ckpt is None:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            tracker.log_params(tr.flatten_params(resolved))
            tracker.log_text(OmegaConf.to_yaml(resolved), "config/config.yaml")
            tracker.log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")
        _quick_checks(cfg)
        pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
        splits = load_data(cfg.data)
        module = build(cfg, splits)
        if ckpt is None:
            tracker.log_params({"l2.layers": ",".join(module.penalty.layer_names),
                                "l2.num_params": str(module.penalty.num_params)})
        # In a sweep, one line per job instead of one per epoch keeps the table readable.
        metrics = fit(cfg, module, splits, tracker, output_dir, ckpt, echo=sweep is None)
        if sweep:
            shown = ("train/ce", "val/ce", "gap/ce", "val/acc")
            print("  ".join([f"  -> {cfg.trainer.max_epochs} epochs"] + [
                f"{k}={metrics[k]:.4f}" for k in shown if k in metrics]), flush=True)
        tracker.log_state_dict(module.net, "model/state_dict.pt")
        tracker.finish("FINISHED")
        return metrics
    except (KeyboardInterrupt, SystemExit) as e:
        tracker.finish("KILLED", failure=f"interrupted ({tr.one_line(e)})")
        if sweep:  # the sweep stops here too, and its end callback will not run
            tr.RunTracker(client, sweep["parent_run_id"]).finish(
                "KILLED", failure=f"interrupted during run {tracker.run_id}")
        raise
    except BaseException as e:
        tracker.finish("FAILED", failure=tr.one_line(e))
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(cfg: DictConfig, module: L2Module, splits, tracker: tr.RunTracker, output_dir: Path,
        ckpt: Path | None, echo: bool = True) -> dict[str, float]:
    """Lightning training on tensors that live on the training device."""
    recorder = tr.EpochRecorder(tracker, output_dir / "checkpoints" / "last.ckpt", echo=echo)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = pl.Trainer(**trainer_kwargs, logger=False, callbacks=[recorder],
                         default_root_dir=str(output_dir), enable_model_summary=False,
                         num_sanity_val_steps=0)
    splits = splits.to(trainer.strategy.root_device)
    bs, seed = int(cfg.data.batch_size), int(cfg.seed)
    train_batches = TensorBatches(*splits.train, bs, shuffle=True, seed=seed)
    val_batches = TensorBatches(*splits.val, 1024) if len(splits.val[1]) else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(many workers|smaller than the logging).*")
        trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches,
                    ckpt_path=str(ckpt) if ckpt else None)
        final = dict(recorder.last[1]) if recorder.last else {}
        if splits.test is not None:
            trainer.test(module, dataloaders=TensorBatches(*splits.test, 1024), verbose=False)
            tracker.log_metrics(module.test_metrics, step=max(trainer.current_epoch - 1, 0))
            final.update(module.test_metrics)
    return final


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    quiet_libraries()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        metrics = train(cfg, overrides=list(hc.overrides.task),
                        output_dir=Path(hc.runtime.output_dir))
        return float(metrics.get("val/ce", math.nan))
    except (ConfigError, NonFiniteLossError) as e:
        print(f"l2lab: error: {e}", file=sys.stderr, flush=True)
        if multirun:  # a failed job must not stop the sweep: it is a FAILED child run
            return math.nan
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        if multirun:
            print(f"l2lab: job failed: {tr.one_line(e)}", file=sys.stderr, flush=True)
            return math.nan
        raise


if __name__ == "__main__":
    main()

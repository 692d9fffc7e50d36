"""``python -m l2lab.train [overrides]``: compose -> build -> fit -> record. One MLflow run per job.

``train(cfg)`` is a plain function (tests and ``reproduce`` call it directly); ``main`` is the thin
Hydra wrapper that returns the sweep objective (final ``val/ce``).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import uuid
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from l2lab import CONF_DIR, ConfigError, distributed
from l2lab import tracking as tr
from l2lab.data import StackedBatches, TensorBatches, load_data
from l2lab.module import L2Module, NonFiniteLossError
from l2lab.regularization import L2Penalty, build_penalty, check_lam
from l2lab.sweep import SWEEP_INFO

# conf/hydra/launcher/{ray,submitit_local}.yaml extend the plugins' schemas of the same name on
# purpose; Hydra warns about that on every composition.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")

_NAME_SKIP = ("hydra.", "tracking.", "experiment", "resume")


def run_name(overrides: Sequence[str], cfg: DictConfig, swept: Sequence[str] | None = None) -> str:
    """``["regularization.lam=0.01", "seed=1"]`` -> ``"lam=0.01 seed=1"`` (in a sweep, only the
    swept keys, so that the runs of one sweep read apart at a glance)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in tr.parse_overrides(overrides).items()
             if not k.startswith(_NAME_SKIP) and (swept is None or k in swept)]
    return " ".join(parts) or f"lam={cfg.regularization.lam} seed={cfg.seed}"


def _strip(node: DictConfig, *keys: str) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in keys}


def optimizer_factory(cfg: DictConfig, *, decay_groups: bool = True):
    """A function (net, penalty) -> optimizer; in ``mode=optimizer`` the penalty's selection
    becomes parameter groups with weight_decay = 2λ/n and every other parameter gets none
    (unless ``decay_groups=False``: the stacked module applies each network's decay itself)."""
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
        grouped = mode == "optimizer" and decay_groups
        params = penalty.param_groups(net, batch_size) if grouped else net.parameters()
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
    distributed.check(cfg)


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
    allowed = ("trainer.max_epochs", "resume")
    wrong = []
    for key in tr.parse_overrides(overrides):
        if key in allowed or key.startswith(("hydra.", "tracking.")):
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
        out.tracking = cfg.tracking
    return out


def start_run(client, cfg: DictConfig, overrides: Sequence[str], output_dir: Path,
              sweep: Mapping | None, tags: Mapping[str, str] | None = None) -> tr.RunTracker:
    """Create the job's MLflow run (named from its overrides; a sweep's child when in one)."""
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
    return tr.RunTracker.start(client, exp, name, run_tags)


def log_config(tracker: tr.RunTracker, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """The resolved config as params and as ``config/*.yaml`` (what ``reproduce`` re-runs)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker.log_params(tr.flatten_params(resolved))
    tracker.log_text(OmegaConf.to_yaml(resolved), "config/config.yaml")
    tracker.log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")


def log_selection(tracker: tr.RunTracker, penalty: L2Penalty,
                  tags: Mapping[str, str] | None = None) -> None:
    """The resolved layer selection as params (and any tags, in the same store call)."""
    tracker.log_params({"l2.layers": ",".join(penalty.layer_names),
                        "l2.num_params": str(penalty.num_params)}, tags=tags)


def job_line(cfg: DictConfig, metrics: Mapping[str, float]) -> str:
    """A sweep job's one line: its final numbers."""
    shown = ("train/ce", "val/ce", "gap/ce", "val/acc")
    return "  ".join([f"  -> {cfg.trainer.max_epochs} epochs"] + [
        f"{k}={metrics[k]:.4f}" for k in shown if k in metrics])


def _killed(client, trackers: Sequence[tr.RunTracker], sweep: Mapping | None,
            e: BaseException) -> None:
    """Ctrl-C/SIGTERM: every unfinished run KILLED, and the sweep's parent too (the sweep stops
    here, and its end callback will not run)."""
    for t in trackers:
        t.finish("KILLED", failure=f"interrupted ({tr.one_line(e)})")
    if sweep:
        tr.RunTracker(client, sweep["parent_run_id"]).finish(
            "KILLED", failure=f"interrupted during run {trackers[0].run_id}")


def train(cfg: DictConfig, *, overrides: Sequence[str] = (), output_dir: Path | None = None,
          tags: Mapping[str, str] | None = None) -> dict[str, float]:
    """Train one configuration into one MLflow run and return its final metrics.

    The run is created first so that any later failure, a rejected config included, is recorded:
    FAILED with the tag ``l2lab.failure`` on errors, KILLED on Ctrl-C/SIGTERM; what was logged
    stays.
    """
    cfg = _prepared(cfg)
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
        tracker = start_run(client, cfg, overrides, output_dir, sweep, tags)
        print(f"l2lab: MLflow run {tracker.run_id} in experiment {cfg.experiment_name!r} "
              f"({cfg.tracking.uri})", flush=True)

    def on_sigterm(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if ckpt is None:
            log_config(tracker, cfg, overrides)
        _quick_checks(cfg)
        pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
        splits = load_data(cfg.data)
        module = build(cfg, splits)
        if ckpt is None:
            log_selection(tracker, module.penalty)
        # In a sweep, one line per job instead of one per epoch keeps the table readable.
        metrics = fit(cfg, module, splits, tracker, output_dir, ckpt, echo=sweep is None)
        if sweep:
            print(job_line(cfg, metrics), flush=True)
        tracker.log_state_dict(module.net, "model/state_dict.pt")
        tracker.finish("FINISHED")
        return metrics
    except (KeyboardInterrupt, SystemExit) as e:
        _killed(client, [tracker], sweep, e)
        raise
    except BaseException as e:
        tracker.finish("FAILED", failure=tr.one_line(e))
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _flush_every_s(cfg: DictConfig) -> float:
    return float(cfg.tracking.get("flush_every_s", tr.FLUSH_EVERY_S))


def _lightning_fit(cfg: DictConfig, module: L2Module, splits, recorder: pl.Callback,
                   train_batches, output_dir: Path, ckpt: Path | None = None,
                   val_batch: int = 1024, tracker: tr.RunTracker | None = None):
    """One Lightning fit (and test, when the data has a test split) on tensors that live on the
    training device; returns the trainer. ``train_batches(splits, rank=, world=)`` makes the
    training batches (of this rank's shard of each global batch, under DDP)."""
    trainer = pl.Trainer(**distributed.trainer_kwargs(cfg), logger=False, callbacks=[recorder],
                         default_root_dir=str(output_dir), enable_model_summary=False,
                         num_sanity_val_steps=0)
    splits = splits.to(trainer.strategy.root_device)
    # trainer.devices=N: rank 0 starts the other ranks here; each batch is split across them
    with distributed.ranks(cfg, trainer, output_dir, ckpt, tracker) as shard, \
            warnings.catch_warnings():
        # data.val_size=0 (experiment=mnist1d, as the paper) has no val loop by design
        warnings.filterwarnings(
            "ignore", ".*(many workers|smaller than the logging|no `val_dataloader`).*")
        val_batches = TensorBatches(*splits.val, val_batch, **shard) if len(splits.val[1]) \
            else None
        trainer.fit(module, train_dataloaders=train_batches(splits, **shard),
                    val_dataloaders=val_batches, ckpt_path=str(ckpt) if ckpt else None)
        if splits.test is not None:
            trainer.test(module, dataloaders=TensorBatches(*splits.test, val_batch, **shard),
                         verbose=False)
    return trainer


def fit(cfg: DictConfig, module: L2Module, splits, tracker: tr.RunTracker, output_dir: Path,
        ckpt: Path | None, echo: bool = True) -> dict[str, float]:
    """Lightning training of one network; returns its final metrics."""
    recorder = tr.EpochRecorder(tracker, output_dir / "checkpoints" / "last.ckpt", echo=echo,
                                flush_every_s=_flush_every_s(cfg))
    bs, seed = int(cfg.data.batch_size), int(cfg.seed)
    trainer = _lightning_fit(
        cfg, module, splits, recorder,
        lambda s, **shard: TensorBatches(*s.train, bs, shuffle=True, seed=seed, **shard),
        output_dir, ckpt, tracker=tracker)
    final = dict(recorder.last[1]) if recorder.last else {}
    if module.test_metrics:
        tracker.log_metrics(module.test_metrics, step=max(trainer.current_epoch - 1, 0))
        final.update(module.test_metrics)
    return final


# -- the vectorized path: K jobs as one stack --------------------------------------------------
def train_group(cfgs: Sequence[DictConfig], overrides: Sequence[Sequence[str]],
                output_dirs: Sequence[Path], *, sweep: Mapping | None = None,
                max_models: int | None = None) -> list[dict[str, float] | BaseException]:
    """Train jobs whose configs differ only in λ, per-layer λ and seed as stacks of networks.

    Each job is its own MLflow run with everything an ordinary run records, plus the tag
    ``l2lab.vectorized_group``. A job rejected by validation, or whose loss diverges, ends FAILED
    with its reason while the others train on; Ctrl-C/SIGTERM ends every unfinished run KILLED.
    Returns, per job, its final metrics or the exception that ended it.
    """
    from l2lab import stacked

    cfgs = [_prepared(c) for c in cfgs]
    client = tr.connect(cfgs[0].tracking.uri)
    results: list[dict[str, float] | BaseException | None] = [None] * len(cfgs)
    trackers: list[tr.RunTracker] = []

    def fail(i: int, e: BaseException) -> None:
        results[i] = e
        trackers[i].finish("FAILED", failure=tr.one_line(e))

    def on_sigterm(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for cfg, ov, out in zip(cfgs, overrides, output_dirs, strict=True):
            trackers.append(start_run(client, cfg, ov, Path(out).resolve(), sweep))
            log_config(trackers[-1], cfg, ov)
        live = []
        for i, cfg in enumerate(cfgs):
            try:
                _quick_checks(cfg)
                live.append(i)
            except ConfigError as e:
                fail(i, e)
        try:
            splits = load_data(cfgs[0].data) if live else None
        except ConfigError as e:
            for i in live:
                fail(i, e)
            live = []
        members: dict[int, stacked.Member] = {}
        for i in live:  # each network built as the ordinary run builds it: same init
            try:
                pl.seed_everything(int(cfgs[i].seed), workers=False, verbose=False)
                module = build(cfgs[i], splits)
                members[i] = stacked.Member(module, torch.Generator().set_state(
                    torch.get_rng_state()))
            except ConfigError as e:
                fail(i, e)
        ids = list(members)
        cap = max_models or stacked.default_max_models(members[ids[0]].module.net, splits,
                                                       cfgs[ids[0]]) if ids else 1
        for start in range(0, len(ids), cap):
            chunk = ids[start:start + cap]
            _fit_stack(cfgs, chunk, members, splits, trackers, results,
                       [Path(d).resolve() for d in output_dirs])
        for i, tracker in enumerate(trackers):
            if isinstance(results[i], dict):
                tracker.log_state_dict(members[i].module.net, "model/state_dict.pt")
                tracker.finish("FINISHED")
        return results  # type: ignore[return-value]
    except (KeyboardInterrupt, SystemExit) as e:
        _killed(client, [t for t in trackers if not t.ended] or trackers, sweep, e)
        raise
    except BaseException as e:
        for i, t in enumerate(trackers):
            if not t.ended:
                fail(i, e)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fit_stack(cfgs, ids: list[int], members, splits, trackers, results,
               output_dirs: list[Path]) -> None:
    """One Lightning fit of the networks ``ids`` as one stack; fills ``results``."""
    from l2lab import stacked

    cfg0 = cfgs[ids[0]]
    group = uuid.uuid4().hex[:12]
    for i in ids:
        log_selection(trackers[i], members[i].module.penalty, {"l2lab.vectorized_group": group})
    module = stacked.stack_modules([members[i].module for i in ids],
                                   [members[i].generator for i in ids],
                                   optimizer_factory(cfg0, decay_groups=False))
    recorder = tr.StackedRecorder(
        [trackers[i] for i in ids],
        [output_dirs[i] / "checkpoints" / "last.ckpt" for i in ids],
        stacked.MemberCheckpoints([members[i] for i in ids], tr.EpochRecorder.__qualname__),
        flush_every_s=_flush_every_s(cfg0))
    bs, seeds = int(cfg0.data.batch_size), [int(cfgs[i].seed) for i in ids]
    _lightning_fit(cfg0, module, splits, recorder,
                   lambda s, **_: StackedBatches(*s.train, bs, seeds), output_dirs[ids[0]],
                   val_batch=stacked.val_batch_size(len(ids)))
    module.unstack_into([members[i].module.net for i in ids])
    for k, i in enumerate(ids):
        if k in module.failures:
            results[i] = NonFiniteLossError(module.failures[k])
            continue
        final = dict(recorder.last[k][1]) if recorder.last[k] else {}
        if module.test_metrics:
            test = module.test_metrics[k]
            trackers[i].log_metrics(test, step=recorder.last[k][0] if recorder.last[k] else 0)
            final.update(test)
        results[i] = final


def _prepared(cfg: DictConfig) -> DictConfig:
    """A copy with the tracking URI made absolute and an integer λ logged as a float."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.tracking.uri = tr.resolve_uri(cfg.tracking.uri)
        if isinstance(cfg.regularization.lam, int) and not isinstance(cfg.regularization.lam, bool):
            cfg.regularization.lam = float(cfg.regularization.lam)  # "lam=0" logs as 0.0
    return cfg


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

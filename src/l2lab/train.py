"""``python -m l2lab.train [overrides]``: compose -> build -> fit -> record. One MLflow run per job.

``train(cfg)`` is a plain function (tests and ``reproduce`` call it directly); ``main`` is the thin
Hydra wrapper that returns the sweep objective (final ``val/ce``).

This module imports only Hydra, OmegaConf and :mod:`l2lab.schema` at load time: ``--help``,
``--cfg`` and a bad key or value are answered in about a second, and torch, Lightning and MLflow
are imported once the config has passed :func:`l2lab.schema.validate`.
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
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from l2lab import CONF_DIR, ConfigError, schema
from l2lab.console import log, quiet_libraries, say  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # the heavy modules load only once a config is known to be good
    import pytorch_lightning as pl
    import torch

    from l2lab import tracking as tr
    from l2lab.module import L2Module
    from l2lab.regularization import L2Penalty

SWEEP_INFO = ".l2lab_sweep.json"  # written by l2lab.sweep.SweepCallback

# conf/hydra/launcher/{ray,submitit_local}.yaml extend the plugins' schemas of the same name on
# purpose; Hydra warns about that on every composition.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")

_NAME_SKIP = ("hydra.", "tracking.", "experiment", "resume", "reuse")


def run_name(overrides: Sequence[str], cfg: DictConfig, swept: Sequence[str] | None = None) -> str:
    """``["regularization.lam=0.01", "seed=1"]`` -> ``"lam=0.01 seed=1"`` (in a sweep, only the
    swept keys, so that the runs of one sweep read apart at a glance)."""
    from l2lab.tracking import parse_overrides

    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in parse_overrides(overrides).items()
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
    from l2lab.module import L2Module
    from l2lab.regularization import build_penalty

    net = build_net(cfg, splits)
    penalty = build_penalty(net, cfg.regularization, dataset_size=len(splits.train[1]))
    return L2Module(net, penalty, optimizer_factory(cfg), mode=cfg.regularization.mode,
                    batch_size=int(cfg.data.batch_size))


def _quick_checks(cfg: DictConfig) -> None:
    """Checks that need no data: the schema's ranges, then the multi-device settings."""
    from l2lab import distributed

    schema.validate(cfg)
    distributed.check(cfg)


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


def _job_label(name: str) -> str:
    """``#3 lam=0.01 seed=1`` in a sweep (Hydra's job number), the run name otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"#{HydraConfig.get().job.num} {name}"
    except (ValueError, AttributeError):
        return name


def _logged_config(client, run_id: str) -> DictConfig:
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "config/config.yaml", dst_path=tmp)
        return OmegaConf.create(yaml.safe_load(Path(path).read_text()))


def _resume_config(cfg: DictConfig, overrides: Sequence[str], logged: DictConfig) -> DictConfig:
    """The logged config, with only ``trainer.max_epochs`` taken from this invocation (when it
    is given there: otherwise the run keeps its own)."""
    from l2lab.tracking import parse_overrides

    allowed = ("trainer.max_epochs", "resume", "reuse")
    given = parse_overrides(overrides)
    wrong = []
    for key in given:
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
        if "trainer.max_epochs" in given:
            out.trainer.max_epochs = cfg.trainer.max_epochs
        out.resume = cfg.resume
        out.tracking = cfg.tracking
    return out


def epochs_done(ckpt: Path) -> int:
    """Completed epochs saved in a run's checkpoint (0 when there is none)."""
    import torch

    if not ckpt.exists():
        return 0
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return int(state.get("epoch", -1)) + 1


def ui_url(client, run_id: str, tracking_uri: str | None = None) -> str:
    """The run's page in the MLflow UI's training view: the tracking server's own UI, or
    ``make ui`` (127.0.0.1:5000) over a local store."""
    from l2lab import ui

    exp = client.get_run(run_id).info.experiment_id
    return ui.run_url(ui.ui_base(tracking_uri), exp, run_id)


def _summary(status: str, run_id: str, name: str, metrics: Mapping[str, float], epochs: int,
             output_dir: Path, url: str) -> str:
    shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in ("train/ce", "val/ce", "gap/ce", "test/acc")
                      if k in metrics)
    return (f"l2lab: run {run_id} ({name}) {status} after {epochs} epochs: {shown}\n"
            f"       folder: {output_dir}\n       UI: {url}  (make ui)")


def start_run(client, cfg: DictConfig, overrides: Sequence[str], output_dir: Path,
              sweep: Mapping | None, tags: Mapping[str, str] | None = None) -> tr.RunTracker:
    """Create the job's MLflow run (named from its overrides; a sweep's child when in one),
    tagged with its config's hash (``reuse`` and ``compare`` find runs of the same config)."""
    from l2lab import runs
    from l2lab import tracking as tr

    output_dir.mkdir(parents=True, exist_ok=True)
    run_tags = {
        "l2lab.overrides": json.dumps(list(overrides)),
        "l2lab.output_dir": str(output_dir),
        runs.HASH_TAG: runs.config_hash(cfg),
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
    from l2lab.tracking import flatten_params

    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker.log_params(flatten_params(resolved))
    tracker.log_text(OmegaConf.to_yaml(resolved), "config/config.yaml")
    tracker.log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")


def log_selection(tracker: tr.RunTracker, penalty: L2Penalty,
                  tags: Mapping[str, str] | None = None) -> None:
    """The resolved layer selection as params (and any tags, in the same store call)."""
    tracker.log_params({"l2.layers": ",".join(penalty.layer_names),
                        "l2.num_params": str(penalty.num_params)}, tags=tags)


def job_line(label: str, run_id: str, epochs: int, metrics: Mapping[str, float]) -> str:
    """A sweep job's one line when it ends: its number and name, run id and final numbers."""
    shown = ("train/ce", "val/ce", "gap/ce", "val/acc", "test/acc")
    return "  ".join([f"l2lab: {label}: run {run_id[:8]}, {epochs} epochs"] + [
        f"{k}={metrics[k]:.4f}" for k in shown if k in metrics])


def sigterm_as_interrupt(signum, frame) -> None:  # noqa: ANN001
    """SIGTERM ends a run as Ctrl-C does: KILLED, with what was logged kept."""
    raise KeyboardInterrupt("SIGTERM")


def _killed(client, trackers: Sequence[tr.RunTracker], sweep: Mapping | None,
            e: BaseException) -> None:
    """Ctrl-C/SIGTERM: every unfinished run KILLED, and the sweep's parent too (the sweep stops
    here, and its end callback will not run)."""
    from l2lab import tracking as tr

    for t in trackers:
        t.finish("KILLED", failure=f"interrupted ({tr.one_line(e)})")
    if sweep:
        during = f" during run {trackers[0].run_id}" if trackers else ""
        tr.RunTracker(client, sweep["parent_run_id"]).finish(
            "KILLED", failure=f"interrupted{during}")


def train(cfg: DictConfig, *, overrides: Sequence[str] = (), output_dir: Path | None = None,
          tags: Mapping[str, str] | None = None) -> dict[str, float]:
    """Train one configuration into one MLflow run and return its final metrics.

    The run is created first so that any later failure, a rejected config included, is recorded:
    FAILED with the tag ``l2lab.failure`` on errors, KILLED on Ctrl-C/SIGTERM; what was logged
    stays. With ``reuse=true`` a FINISHED run of the same config is returned instead of training
    (in a sweep, listed by a new child run tagged ``l2lab.reused_from``).
    """
    from l2lab import runs
    from l2lab import tracking as tr

    quiet_libraries()
    cfg = _prepared(cfg)
    client = tr.connect(cfg.tracking.uri)
    sweep = _sweep_info()

    if cfg.resume:
        try:
            run = client.get_run(str(cfg.resume))
        except Exception:
            raise ConfigError(f"resume: no run {cfg.resume!r} in {cfg.tracking.uri}.") from None
        rid, name = run.info.run_id, run.data.tags.get("mlflow.runName", run.info.run_id)
        cfg = _resume_config(cfg, overrides, _logged_config(client, rid))
        explicit = "trainer.max_epochs" in tr.parse_overrides(overrides)
        if not explicit and (last := run.data.tags.get("l2lab.resumed_max_epochs")):
            with open_dict(cfg):  # the target of the latest resume, not the first invocation's
                cfg.trainer.max_epochs = int(last)
        output_dir = Path(run.data.tags["l2lab.output_dir"])
        ckpt = output_dir / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            raise ConfigError(f"resume: run {cfg.resume} has no checkpoint at {ckpt}.")
        done, total = epochs_done(ckpt), int(cfg.trainer.max_epochs)
        if run.info.status == "FINISHED" and (done >= total or not explicit):
            say(f"l2lab: run {rid} ({name}) is FINISHED: {done} of {done} epochs trained, "
                f"nothing to resume. To train it longer: python -m l2lab.train resume={rid} "
                f"trainer.max_epochs={done + 10}  (any number > {done})")
            return dict(run.data.metrics)
        say(f"l2lab: resuming run {rid} ({name}) from epoch {done} of {total} "
            f"(was {run.info.status})")
        tracker = tr.RunTracker.reopen(client, rid)
        tracker.set_tags({"l2lab.resumed_max_epochs": cfg.trainer.max_epochs})
    else:
        ckpt = None
        name = run_name(overrides, cfg, sweep.get("swept") if sweep else None)
        if cfg.get("reuse"):
            exp = tr.experiment_id(client, str(cfg.experiment_name), cfg.tracking.uri)
            found = runs.find_finished(client, exp, runs.config_hash(cfg))
            if found is not None:
                return _reuse(client, found, exp, name, overrides, sweep, tags)
        output_dir = Path(output_dir or Path("outputs") / datetime.now().strftime(
            "%Y-%m-%d_%H-%M-%S-%f")).resolve()
        tracker = start_run(client, cfg, overrides, output_dir, sweep, tags)
        if not sweep:
            say(f"l2lab: run {tracker.run_id} ({name}) in experiment {cfg.experiment_name!r}, "
                f"{cfg.trainer.max_epochs} epochs")
    rid = tracker.run_id

    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        if ckpt is None:
            log_config(tracker, cfg, overrides)
        _quick_checks(cfg)
        import pytorch_lightning as pl

        from l2lab.data import load_data

        pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
        splits = load_data(cfg.data)
        module = build(cfg, splits)
        if ckpt is None:
            log_selection(tracker, module.penalty)
        # In a sweep, one line per job instead of one per epoch keeps the table readable.
        metrics = fit(cfg, module, splits, tracker, output_dir, ckpt, echo=sweep is None,
                      label=_job_label(name) if sweep else f"run {rid[:8]}")
        tracker.log_state_dict(module.net, "model/state_dict.pt")
        tracker.finish("FINISHED")
        epochs = int(cfg.trainer.max_epochs)
        if sweep:
            say(job_line(_job_label(name), rid, epochs, metrics))
        else:
            say(_summary("FINISHED", rid, name, metrics, epochs, output_dir,
                         ui_url(client, rid, cfg.tracking.uri)))
        return metrics
    except (KeyboardInterrupt, SystemExit) as e:
        _killed(client, [tracker], sweep, e)
        logged = len(tracker.logged_steps("train/loss"))
        saved = epochs_done(output_dir / "checkpoints" / "last.ckpt")
        since = f", resumes from its checkpoint at epoch {saved}" if saved < logged else ""
        say(f"\nl2lab: run {rid} ({name}) KILLED after {logged} of {cfg.trainer.max_epochs} "
            f"epochs ({tr.one_line(e)}{since}); continue it with: "
            f"python -m l2lab.train resume={rid}", err=True)
        raise
    except BaseException as e:
        tracker.finish("FAILED", failure=tr.one_line(e))
        if sweep:  # the job's one line
            say(f"l2lab: {_job_label(name)}: run {rid[:8]} FAILED: {e}", err=True)
            e.l2lab_reported = True  # type: ignore[attr-defined]
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reuse(client, found, exp: str, name: str, overrides: Sequence[str], sweep: dict | None,
           tags: Mapping[str, str] | None) -> dict[str, float]:
    """``reuse=true`` and a FINISHED run of the same config exists: no training. In a sweep a
    child run lists it (tag ``l2lab.reused_from``) so the sweep's table and figures include it."""
    from l2lab import runs

    metrics = dict(found.data.metrics)
    shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in ("train/ce", "val/ce", "gap/ce", "val/acc")
                      if k in metrics)
    src = found.info.run_id
    if sweep:
        listed = runs.list_reused(client, found, exp, name, {
            "l2lab.overrides": json.dumps(list(overrides)),
            "l2lab.sweep_id": sweep["sweep_id"], "mlflow.parentRunId": sweep["parent_run_id"],
            **(tags or {})})
        say(f"l2lab: {_job_label(name)}: reused run {src[:8]} (FINISHED, same config; listed as "
            f"{listed[:8]})  {shown}")
    else:
        say(f"l2lab: reuse: run {src} ({found.data.tags.get('mlflow.runName', '')}) already "
            f"FINISHED with this config; not trained again.  {shown}\n"
            f"       UI: {ui_url(client, src, found.data.params.get('tracking.uri'))}")
    return metrics


def _flush_every_s(cfg: DictConfig) -> float:
    from l2lab.recorder import FLUSH_EVERY_S

    return float(cfg.tracking.get("flush_every_s", FLUSH_EVERY_S))


def _lightning_fit(cfg: DictConfig, module: L2Module, splits, recorder: pl.Callback,
                   train_batches, output_dir: Path, ckpt: Path | None = None,
                   val_batch: int = 1024, tracker: tr.RunTracker | None = None,
                   label: str = "run", jobs: int = 1):
    """One Lightning fit (and test, when the data has a test split) on tensors that live on the
    training device; returns the trainer. ``train_batches(splits, rank=, world=)`` makes the
    training batches (of this rank's shard of each global batch, under DDP)."""
    import pytorch_lightning as pl

    from l2lab import distributed, progress
    from l2lab.data import TensorBatches

    callbacks = [recorder, *progress.callbacks(label, jobs, int(cfg.trainer.max_epochs))]
    trainer = pl.Trainer(**distributed.trainer_kwargs(cfg), logger=False, callbacks=callbacks,
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
        ckpt: Path | None, echo: bool = True, label: str = "run") -> dict[str, float]:
    """Lightning training of one network; returns its final metrics."""
    from l2lab.data import TensorBatches
    from l2lab.recorder import EpochRecorder

    recorder = EpochRecorder(tracker, output_dir / "checkpoints" / "last.ckpt", echo=echo,
                                flush_every_s=_flush_every_s(cfg))
    bs, seed = int(cfg.data.batch_size), int(cfg.seed)
    trainer = _lightning_fit(
        cfg, module, splits, recorder,
        lambda s, **shard: TensorBatches(*s.train, bs, shuffle=True, seed=seed, **shard),
        output_dir, ckpt, tracker=tracker, label=label)
    final = dict(recorder.last[1]) if recorder.last else {}
    if module.test_metrics:
        tracker.log_metrics(module.test_metrics, step=max(trainer.current_epoch - 1, 0))
        final.update(module.test_metrics)
    return final


# -- the vectorized path: K jobs as one stack --------------------------------------------------
def train_group(cfgs: Sequence[DictConfig], overrides: Sequence[Sequence[str]],
                output_dirs: Sequence[Path], *, sweep: Mapping | None = None,
                max_models: int | None = None, job_nums: Sequence[int] | None = None
                ) -> list[dict[str, float] | BaseException]:
    """Train jobs whose configs differ only in λ, per-layer λ and seed as stacks of networks.

    Each job is its own MLflow run with everything an ordinary run records, plus the tag
    ``l2lab.vectorized_group``. A job rejected by validation, or whose loss diverges, ends FAILED
    with its reason while the others train on; Ctrl-C/SIGTERM ends every unfinished run KILLED.
    Returns, per job, its final metrics or the exception that ended it; with ``job_nums`` (a
    sweep's job numbers) each job's line is printed as it ends, as an ordinary sweep job's is.
    """
    import pytorch_lightning as pl
    import torch

    from l2lab import stacked
    from l2lab import tracking as tr
    from l2lab.data import load_data

    cfgs = [_prepared(c) for c in cfgs]
    output_dirs = [Path(d).resolve() for d in output_dirs]
    client = tr.connect(cfgs[0].tracking.uri)
    results: list[dict[str, float] | BaseException | None] = [None] * len(cfgs)
    trackers: list[tr.RunTracker] = []

    def fail(i: int, e: BaseException) -> None:
        results[i] = e
        trackers[i].finish("FAILED", failure=tr.one_line(e))

    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        for cfg, ov, out in zip(cfgs, overrides, output_dirs, strict=True):
            trackers.append(start_run(client, cfg, ov, out, sweep))
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
        if ids and not max_models:
            max_models = stacked.default_max_models(members[ids[0]].module.net, splits,
                                                    cfgs[ids[0]])
        step = max_models or 1
        for start in range(0, len(ids), step):
            label = f"stack {start // step + 1}/{-(-len(ids) // step)}"
            _fit_stack(cfgs, ids[start:start + step], members, splits, trackers, results,
                       output_dirs, label=label)
        for i, tracker in enumerate(trackers):
            if isinstance(results[i], dict):
                tracker.log_state_dict(members[i].module.net, "model/state_dict.pt")
                tracker.finish("FINISHED")
        if job_nums is not None:  # each job's line, in job order, as ordinary sweep jobs say it
            swept = sweep.get("swept") if sweep else None
            for i, (cfg, ov, num) in enumerate(zip(cfgs, overrides, job_nums, strict=True)):
                label, rid = f"#{num} {run_name(ov, cfg, swept)}", trackers[i].run_id
                if isinstance(results[i], dict):
                    say(job_line(label, rid, int(cfg.trainer.max_epochs), results[i]))
                else:
                    say(f"l2lab: {label}: run {rid[:8]} FAILED: {results[i]}", err=True)
        return results  # type: ignore[return-value]
    except (KeyboardInterrupt, SystemExit) as e:
        _killed(client, [t for t in trackers if not t.ended], sweep, e)
        raise
    except BaseException as e:
        for i, t in enumerate(trackers):
            if not t.ended:
                fail(i, e)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fit_stack(cfgs, ids: list[int], members, splits, trackers, results,
               output_dirs: list[Path], label: str = "stack") -> None:
    """One Lightning fit of the networks ``ids`` as one stack; fills ``results``."""
    from l2lab import stacked
    from l2lab.data import StackedBatches
    from l2lab.module import NonFiniteLossError
    from l2lab.recorder import EpochRecorder, StackedRecorder

    cfg0 = cfgs[ids[0]]
    group = uuid.uuid4().hex[:12]
    for i in ids:
        log_selection(trackers[i], members[i].module.penalty, {"l2lab.vectorized_group": group})
    module = stacked.stack_modules([members[i].module for i in ids],
                                   [members[i].generator for i in ids],
                                   optimizer_factory(cfg0, decay_groups=False))
    recorder = StackedRecorder(
        [trackers[i] for i in ids],
        [output_dirs[i] / "checkpoints" / "last.ckpt" for i in ids],
        stacked.MemberCheckpoints([members[i] for i in ids], EpochRecorder.__qualname__),
        flush_every_s=_flush_every_s(cfg0))
    bs, seeds = int(cfg0.data.batch_size), [int(cfgs[i].seed) for i in ids]
    _lightning_fit(cfg0, module, splits, recorder,
                   lambda s, **_: StackedBatches(*s.train, bs, seeds), output_dirs[ids[0]],
                   val_batch=stacked.val_batch_size(len(ids)), label=label, jobs=len(ids))
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
    from l2lab.tracking import resolve_uri

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.tracking.uri = resolve_uri(cfg.tracking.uri)
        if isinstance(cfg.regularization.lam, int) and not isinstance(cfg.regularization.lam, bool):
            cfg.regularization.lam = float(cfg.regularization.lam)  # "lam=0" logs as 0.0
    return cfg


def _error(message: str) -> None:
    say(f"l2lab: error: {message}", err=True)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    """The Hydra task: one job. Returns the sweep objective, the final val/ce (nan when the job
    failed, so that a sweep goes on and an Optuna study records the trial as failed)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if not multirun:  # a single run's bad value or store: reported now, before heavy imports
        try:
            schema.validate(cfg)
            if (uri := schema.resolve_uri(cfg.tracking.uri)).startswith(("http://", "https://")):
                schema.probe_server(uri)
        except ConfigError as e:
            _error(str(e))
            sys.exit(2)
    try:
        metrics = train(cfg, overrides=list(hc.overrides.task),
                        output_dir=Path(hc.runtime.output_dir))
        return float(metrics.get("val/ce", math.nan))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        from l2lab.module import NonFiniteLossError
        from l2lab.tracking import one_line

        known = isinstance(e, ConfigError | NonFiniteLossError)
        if multirun:  # a failed job must not stop the sweep: it is a FAILED child run
            if not getattr(e, "l2lab_reported", False):
                _error(str(e) if known else f"job failed: {one_line(e)}")
            return math.nan
        if not known:
            raise
        _error(str(e))
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def main() -> None:
    """``python -m l2lab.train`` / ``l2lab-train``: unknown keys are refused (with the closest
    valid ones) before Hydra composes, so no run and no sweep starts on a typo."""
    argv = sys.argv[1:]
    other = ("--hydra-help", "--shell-completion", "-sc", "--info",  # or another primary config:
             "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
    if not any(a.split("=")[0] in other for a in argv):
        try:
            schema.check_overrides(schema.cli_overrides(argv))
        except ConfigError as e:
            print(f"l2lab: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        if "--help" in argv or "-h" in argv:  # Hydra's own --help takes seconds (schema.help_text)
            print(schema.help_text([a for a in schema.cli_overrides(argv)
                                    if not a.startswith(("hydra/", "hydra."))]))
            return
    hydra_main()


if __name__ == "__main__":
    main()

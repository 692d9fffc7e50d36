"""The one training path: build each job's network as an ordinary run would, stack them, fit, and
record every job into its own MLflow run.

An ordinary run is a stack of one; a vectorized sweep's group is a stack of K. Same module, same
kernels, same recorder: on CPU a child of a stack and its ordinary run are bit-identical for the
whole run. :func:`fit_jobs` is the run lifecycle both share: runs opened inside the interrupt
guard, each job's failure its own (FAILED with the reason; the others train on), Ctrl-C/SIGTERM
ends every unfinished run KILLED, and nothing already logged is lost.
"""

from __future__ import annotations

import json
import math
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from l2lab.base import CONF_DIR, ConfigError, last_checkpoint
from l2lab.config import schema
from l2lab.config.composing import YamlTemplate, dump_yaml, substitute, with_values
from l2lab.config.stackable import optimizer_key
from l2lab.core import rules
from l2lab.run import lifecycle
from l2lab.tracking import tracker as tr

if TYPE_CHECKING:
    import torch

    from l2lab.core.module import L2Module
    from l2lab.core.stacked import StackMember

_NAME_SKIP = ("hydra.", "tracking.", "experiment", "resume", "reuse")


# -- the config, as training needs it ----------------------------------------------------------
def prepared(cfg: DictConfig) -> DictConfig:
    """A copy with the tracking URI made absolute and an integer λ logged as a float."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.tracking.uri = tr.resolve_uri(cfg.tracking.uri)
        if isinstance(cfg.regularization.lam, int) and not isinstance(cfg.regularization.lam, bool):
            cfg.regularization.lam = float(cfg.regularization.lam)  # "lam=0" logs as 0.0
    return cfg


def run_name(overrides: Sequence[str], cfg: Mapping, swept: Sequence[str] | None = None) -> str:
    """``["regularization.lam=0.01", "seed=1"]`` -> ``"lam=0.01 seed=1"`` (in a sweep, only the
    swept keys, so that the runs of one sweep read apart at a glance)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in tr.parse_overrides(overrides).items()
             if not k.startswith(_NAME_SKIP) and (swept is None or k in swept)]
    return " ".join(parts) or f"lam={cfg['regularization']['lam']} seed={cfg['seed']}"


def quick_checks(cfg: DictConfig) -> None:
    """Checks that need no data: the schema's ranges, then the multi-device settings."""
    from l2lab.run import distributed

    schema.validate(cfg)
    distributed.check(cfg)


def _strip(node: DictConfig, *keys: str) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in keys}


def optimizer_factory(cfg: DictConfig) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    """A function net -> optimizer over all its parameters (the config's checks are
    ``schema.validate``'s). ``mode=optimizer`` decay is the module's (each network's own 2λ/n,
    ``module.L2Module``), so the optimizer has none."""
    opt_cfg = _strip(cfg.optimizer, "name")
    partial = hydra.utils.instantiate(opt_cfg, _partial_=True)
    return lambda net: partial(net.parameters())


def optimizer_settings(tree: Mapping[str, Any]) -> tuple[type, dict]:
    """(the optimizer class, its keyword arguments) of a resolved config: what a stack's
    networks share, and what each sets for itself."""
    opt = dict(tree["optimizer"])
    target = opt.pop("_target_")
    opt.pop("name", None)
    return hydra.utils.get_class(target), opt


def net_factory(cfg: DictConfig) -> Callable[..., torch.nn.Module]:
    """A function (splits, dropout=None) -> the network of ``cfg.model`` for the data's input
    shape and classes, with a job's own dropout rate (``core.networks``: any importable
    ``nn.Module`` class or factory, told in one paragraph when it does not import, build or
    answer (batch, classes); instantiated once per stack: a Hydra ``instantiate`` per job cost
    ~15 ms). The first network built is checked on two training examples."""
    from l2lab.core.networks import check_output, network_factory

    model_cfg = _strip(cfg.model)
    if why := rules.network_error(model_cfg.get("_target_")):
        raise ConfigError(why)
    build = network_factory(
        model_cfg, lambda node: hydra.utils.instantiate(node, _partial_=True))
    checked = False

    def make(splits, dropout: float | None = None) -> torch.nn.Module:
        nonlocal checked
        net = build(splits.in_shape, splits.num_classes, dropout)
        if not checked:
            check_output(net, splits.train[0], splits.num_classes, model_cfg["_target_"])
            checked = True
        return net

    return make


def build_net(cfg: DictConfig, splits) -> torch.nn.Module:
    """The network of ``cfg.model`` for the data's input shape and classes."""
    return net_factory(cfg)(splits)


def build_member(cfg: DictConfig, splits, tree: Mapping[str, Any] | None = None,
                 check_optimizer: bool = True,
                 make_net: Callable[..., torch.nn.Module] | None = None) -> StackMember:
    """One job's network, penalty and dropout generator, seeded by its own ``seed``, with its
    own per-network settings (``stackable.STACKED``) read from ``tree``, the job's resolved
    config (default: ``cfg``'s); every check that needs the network (layer patterns,
    ``lam_per_layer`` keys, a selection that selects nothing) runs here. The optimizer's checks
    and the network's factory are once per stack."""
    import pytorch_lightning as pl
    import torch

    from l2lab.core.regularization import build_penalty
    from l2lab.core.stacked import StackMember

    tree = OmegaConf.to_container(cfg, resolve=True) if tree is None else tree
    pl.seed_everything(int(tree["seed"]), workers=False, verbose=False)
    net = (make_net or net_factory(cfg))(splits, (tree.get("model") or {}).get("dropout"))
    reg = tree["regularization"]
    penalty = build_penalty(net, reg, dataset_size=len(splits.train[1]))
    if check_optimizer:
        optimizer_factory(cfg)  # its checks, before any training
    trainer = tree.get("trainer") or {}
    return StackMember(net, penalty, torch.Generator().set_state(torch.get_rng_state()),
                       optimizer=optimizer_settings(tree)[1], mode=str(reg.get("mode", "loss")),
                       clip=(trainer.get("gradient_clip_val"),
                             trainer.get("gradient_clip_algorithm")))


def scheduler_settings(cfg: DictConfig, train_size: int) -> tuple[Any, str]:
    """(optimizer -> the torch scheduler of ``cfg.scheduler``, or None; its interval). Its
    length is the whole run: ``trainer.max_epochs`` epochs, or as many optimizer steps (one per
    batch, the last one short)."""
    from l2lab.core.schedules import scheduler_factory

    node = cfg.get("scheduler")
    if node is None or node.name == "none":
        return None, "epoch"
    total = int(cfg.trainer.max_epochs)
    if node.interval == "step":
        total *= -(-int(train_size) // int(cfg.data.batch_size))
    return scheduler_factory(str(node.name), _strip(node, "name", "interval"), total), \
        str(node.interval)


def stack(cfg: DictConfig, members: Sequence[StackMember], example=None) -> L2Module:
    """The module that trains ``members`` (built by :func:`build_member`) as one stack;
    ``example`` (training inputs) proves a stack of several right first
    (``stacked.check_stack``), or ``NotStackable`` says why it is not. The schedule is the
    stack's (its jobs share it: ``stackable.shape_key``), each network's from its own lr."""
    from l2lab.compat.lightning import replace_optimizer
    from l2lab.core.stacked import stack_members

    cls, _ = optimizer_settings(OmegaConf.to_container(cfg, resolve=True))
    make_scheduler, interval = scheduler_settings(cfg, members[0].penalty.dataset_size)
    return stack_members(members, cls, batch_size=int(cfg.data.batch_size),
                         replace_optimizer=replace_optimizer,
                         example=example[:64] if example is not None else None,
                         make_scheduler=make_scheduler, interval=interval)


# -- fitting ------------------------------------------------------------------------------------
#: Optimizer steps per Lightning batch (``data.Chunks``): Lightning's ~0.4 ms per batch is paid
#: once per 64 steps (docs/performance.md, "The step in chunks").
STEPS_PER_BATCH = 64


def augment_pad(cfg: DictConfig, splits) -> int:
    """``data.augment_pad`` for this data (``augment.resolve_pad``: null is an eighth of the
    side or length); a bad value is a ConfigError naming the key, before training."""
    from l2lab.core.augment import resolve_pad

    return resolve_pad(cfg.data.get("augment_pad"), splits.in_shape)


def lightning_fit(cfg: DictConfig, module: L2Module, splits, recorder, seeds: Sequence[int],
                  output_dir: Path, ckpt: Path | None = None, tracker: Any = None,
                  label: str = "run", augments: Sequence[bool] | None = None) -> None:
    """One Lightning fit of a stack (and its test, when the data has a test split), on tensors
    that live on the training device. Under ``trainer.devices=N`` rank 0 starts the other ranks
    here and each takes its shard of every global batch. ``augments``: each network's
    ``data.augment`` (None: ``cfg``'s for every network), applied to training batches only."""
    import pytorch_lightning as pl

    from l2lab.compat.lightning import direct_steps
    from l2lab.console import quiet_libraries
    from l2lab.core.data import Chunks, StackedBatches, TensorBatches
    from l2lab.core.stacked import val_batch_size
    from l2lab.run import distributed, progress

    quiet_libraries()  # again: importing Lightning puts its INFO chatter back

    callbacks = [recorder, *progress.callbacks(label, module.k, int(cfg.trainer.max_epochs))]
    trainer = pl.Trainer(**distributed.trainer_kwargs(cfg), logger=False, callbacks=callbacks,
                         default_root_dir=str(output_dir), enable_model_summary=False,
                         num_sanity_val_steps=0)
    splits = splits.to(trainer.strategy.root_device, image_layout(module, splits,
                                                                  trainer.strategy.root_device))
    val_batch = val_batch_size(module.k)
    module.direct_steps = direct_steps(trainer, module)
    with distributed.ranks(cfg, trainer, output_dir, ckpt, tracker) as shard, \
            warnings.catch_warnings():
        # data.val_size=0 (experiment=mnist1d, as the paper) has no val loop by design
        warnings.filterwarnings(
            "ignore", ".*(many workers|smaller than the logging|no `val_dataloader`).*")
        evals = {"val": splits.val, "train_eval": splits.train_eval() if eval_train(cfg)
                 else None}
        evals = {split: xy for split, xy in evals.items() if xy is not None and len(xy[1])}
        module.eval_splits = tuple(evals)
        val = [TensorBatches(*xy, val_batch, **shard) for xy in evals.values()] or None
        if augments is None:
            augments = [bool(cfg.data.get("augment", False))] * len(seeds)
        pad = augment_pad(cfg, splits) if any(augments) else 0
        batches = StackedBatches(*splits.train, int(cfg.data.batch_size), list(seeds),
                                 **shard, augments=list(augments), pad=pad)
        # DDP: one step per Lightning batch (its wrapper expects one backward per forward)
        steps = STEPS_PER_BATCH if distributed.world_of(trainer) == 1 else 1
        trainer.fit(module, train_dataloaders=Chunks(batches, steps),
            val_dataloaders=val, ckpt_path=str(ckpt) if ckpt else None, weights_only=False)
        if splits.test is not None:
            trainer.test(module, dataloaders=TensorBatches(*splits.test, val_batch, **shard),
                         verbose=False)


def image_layout(module: L2Module, splits, device: torch.device) -> torch.memory_format:
    """Channels-last for image batches of a convolutional network on CUDA (cuDNN's NHWC kernels,
    Tensor Cores under bf16): the stack's 2-D convolution weights are laid out so here, before
    Lightning moves them (a move keeps the layout), and the data with them. Elsewhere (CPU,
    sequences, no Conv2d) everything stays as it is, so CPU numbers never change."""
    import torch

    from l2lab.core.stacked import channels_last

    if device.type == "cuda" and splits.train[0].dim() == 4 and channels_last(module.net):
        return torch.channels_last
    return torch.preserve_format


def eval_train(cfg: DictConfig) -> bool:
    """``trainer.eval_train``: measure the training subset in eval mode at each epoch's end
    (``train_eval/*``, which ``gap/*`` then uses). A config logged before the key existed (a
    resumed run) continues without the pass, so that its gap keeps one definition throughout."""
    return bool(cfg.trainer.get("eval_train", False))


def flush_every_s(cfg: DictConfig) -> float:
    from l2lab.run.recorder import FLUSH_EVERY_S

    return float(cfg.tracking.get("flush_every_s", FLUSH_EVERY_S))


# -- the run lifecycle ----------------------------------------------------------------------------
@dataclass
class Job:
    """One training job: its config and where it goes. A job of a stack is the config its
    stack's jobs share (``shared``) with its own ``values`` of the stacked keys
    (``stackable.STACKED``): its own config, ``cfg``, is made only when something needs it
    (~10 ms), while ``seed`` and the resolved ``tree`` cost microseconds. ``tracker`` is set for
    a run that is continued (``resume``), ``ckpt`` is the checkpoint it continues from."""

    shared: DictConfig
    overrides: list[str]
    output_dir: Path
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    tracker: tr.RunTracker | None = None
    ckpt: Path | None = None
    reopened: bool = False  # the same MLflow run continues (its params are logged already)
    logged_test: bool = False  # the run already holds test/* (continued after its test pass)
    result: dict[str, float] | BaseException | None = None
    values: dict[str, Any] = field(default_factory=dict)
    _cfg: DictConfig | None = field(default=None, repr=False)
    _tree: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def cfg(self) -> DictConfig:
        """The job's own config."""
        if not self.values:
            return self.shared
        if self._cfg is None:
            self._cfg = with_values(self.shared, self.values)
        return self._cfg

    @property
    def seed(self) -> int:
        return int(self.values["seed"] if self.values else self.shared.seed)

    @property
    def tree(self) -> dict[str, Any]:
        """The job's config, resolved, as plain containers (shared parts: read only)."""
        if self._tree is None:
            self._tree = OmegaConf.to_container(self.cfg, resolve=True)
        return self._tree

    @property
    def ckpt_path(self) -> Path:
        return last_checkpoint(self.output_dir)


def _settings(values: Mapping[str, Any]) -> str:
    """A job's stacked values other than seed and λ (those ``schema.check_member`` checks)."""
    return json.dumps({k: v for k, v in values.items() if k not in
                       ("seed", "regularization.lam", "regularization.lam_per_layer")},
                      sort_keys=True, default=str)


_WRITERS: dict[str, Any] = {}


def writer_for(uri: str, client) -> Any:
    """The group writer of a store (once per process and store: its path is chosen once)."""
    from l2lab.tracking.bulk import open_writer

    if uri not in _WRITERS:
        _WRITERS[uri] = open_writer(uri, client)
    return _WRITERS[uri]


def open_runs(client, writer, jobs: Sequence[Job], sweep: Mapping | None) -> None:
    """Create the jobs' MLflow runs (a sweep's children when in one), tagged with their config's
    hash (``reuse`` and ``compare`` find runs of the same config), with their config as params
    and artifacts (what ``reproduce`` re-runs): a few store round trips for all of them."""
    from l2lab.tracking import environment, runs

    commit = tr.git_commit(CONF_DIR.parent)
    env = environment.tags(jobs[0].tree["trainer"])  # once per stack: its K runs share it
    diff = environment.diff_artifact()
    tags_list = []
    for job in jobs:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        tags_list.append({
            "l2lab.overrides": json.dumps(list(job.overrides)),
            "l2lab.output_dir": str(job.output_dir),
            runs.HASH_TAG: runs.config_hash(job.tree),
            **({"mlflow.source.git.commit": commit} if commit else {}), **env,
            **({"l2lab.sweep_id": sweep["sweep_id"],
                "mlflow.parentRunId": sweep["parent_run_id"]} if sweep else {}),
            **job.tags,
        })
    cfg = jobs[0].shared
    exp = tr.experiment_id(client, str(cfg.experiment_name), cfg.tracking.uri)
    ids = writer.create_runs(exp, [j.name for j in jobs], tags_list)
    params, texts = {}, {}
    templates: dict[int, YamlTemplate] = {}  # per stack config: its jobs' config.yaml
    for job, rid in zip(jobs, ids, strict=True):
        job.tracker = tr.RunTracker(writer, rid)
        params[rid] = tr.flatten_params(job.tree)
        if job.values:
            if id(job.shared) not in templates:
                templates[id(job.shared)] = YamlTemplate(job.tree, list(job.values))  # any job's
            config = templates[id(job.shared)].render(job.values)
        else:
            config = dump_yaml(job.tree)
        texts[rid] = {"config/config.yaml": config,
                      "config/overrides.yaml": dump_yaml(list(job.overrides)), **diff}
    writer.log_params(params)
    writer.log_texts(texts)


def finish(writer, ends: Sequence[tuple[Job, str, str | None]]) -> None:
    """End runs together (a failure reason to ``l2lab.failure`` first, cut by the writer);
    each run once."""
    ends = [(j, status, why) for j, status, why in ends if not j.tracker.ended]
    if ends:
        writer.finish({j.tracker.run_id: (status, why) for j, status, why in ends})
        for j, _, _ in ends:
            j.tracker.ended = True


def save_weights(writer, job: Job, net: torch.nn.Module) -> None:
    """``model/state_dict.pt``: written in place into a local artifact store, else uploaded."""
    import torch

    path = writer.local_path(job.tracker.run_id, "model/state_dict.pt")
    if path is None:
        job.tracker.log_state_dict(net, "model/state_dict.pt")
        return
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    tmp.replace(path)


def fit_jobs(jobs: Sequence[Job], *, sweep: Mapping | None = None,
             max_models: int | None = None, vectorized: bool = False,
             echo: bool = False, on_open: Callable[[Job], None] | None = None,
             label: str = "run") -> None:
    """Open the runs of ``jobs``, build, fit, test and record them (configs that differ at most
    in the stacked keys, ``stackable.STACKED``) as stacks of at most ``max_models`` networks;
    fills each job's ``result`` with its final metrics or the exception that ended it. One job
    is an ordinary run; :func:`fit_configs` and :func:`fit_variants` make the jobs of a group.

    Raises :class:`lifecycle.Interrupted` on Ctrl-C/SIGTERM (every unfinished run, and the
    sweep's parent, KILLED first), and re-raises anything else that stops the whole stack (every
    unfinished run FAILED with the reason first).
    """
    from l2lab.core.data import load_data
    from l2lab.core.stacked import NotStackable

    client = tr.connect(jobs[0].shared.tracking.uri)
    writer = writer_for(jobs[0].shared.tracking.uri, client)
    opened: list[Job] = []

    def fail(job: Job, e: BaseException) -> None:
        job.result = e
        finish(writer, [(job, "FAILED", tr.one_line(e))])

    with lifecycle.interrupts():
        try:
            with lifecycle.held():  # a run exists in the store only with its tracker set
                if fresh := [j for j in jobs if j.tracker is None]:
                    open_runs(client, writer, fresh, sweep)
                opened.extend(jobs)
            for job in jobs:
                if on_open:
                    on_open(job)
            live, passed = [], set()  # (stack config, settings) one of their jobs passed in full
            for job in jobs:
                try:
                    seen = (id(job.shared), _settings(job.values))
                    if job.values and seen in passed:  # it differs only in seed and λ
                        schema.check_member(job.values)
                    else:
                        quick_checks(job.cfg)
                        passed.add(seen)
                    live.append(job)
                except ConfigError as e:
                    fail(job, e)
            try:
                splits = load_data(jobs[0].shared.data) if live else None
                if any(_augments(j) for j in live):
                    augment_pad(jobs[0].shared, splits)
            except ConfigError as e:
                for job in live:
                    fail(job, e)
                live = []
            members: dict[int, StackMember] = {}
            factories: dict[tuple, Callable] = {}  # per stack config and widths: its factory
            checked: set[int] = set()  # stack configs whose optimizer was checked
            for job in live:
                try:
                    key = (id(job.shared), _widths(job.values))
                    make = factories.get(key) or net_factory(
                        job.cfg if key[1] != "{}" else job.shared)
                    members[id(job)] = build_member(
                        job.shared, splits, job.tree,
                        check_optimizer=id(job.shared) not in checked, make_net=make)
                    factories[key] = make
                    checked.add(id(job.shared))
                except ConfigError as e:
                    fail(job, e)
            built = [j for j in live if id(j) in members]
            if built and not max_models:
                from l2lab.core.stacked import default_max_models

                widest = max(built, key=lambda j: _work(members[id(j)].net))
                max_models = default_max_models(members[id(widest)].net, splits, widest.shared)
            size = max(1, max_models or 1)
            chunks = [group[start:start + size] for group in _width_groups(built, members)
                      for start in range(0, len(group), size)]
            stacks = len(chunks)
            for s, chunk in enumerate(chunks):
                name = f"stack {s + 1}/{stacks}" if vectorized else label
                try:
                    _fit_stack(chunk, members, splits, writer, vectorized, echo, name)
                except NotStackable as e:  # raised before it trains: the jobs go one by one
                    print(f"{name}: its {len(chunk)} networks train one at a time: {e}",
                          flush=True)
                    for i, job in enumerate(chunk):
                        _fit_stack([job], members, splits, writer, vectorized, echo,
                                   f"{name}, job {i + 1}/{len(chunk)}")
            done = [j for j in built if isinstance(j.result, dict)]
            for job in done:
                save_weights(writer, job, members[id(job)].net)
            finish(writer, [(j, "FINISHED", None) for j in done])
        except lifecycle.Interrupted as e:
            with lifecycle.held():
                finish(writer, [(j, "KILLED", e.reason) for j in opened])
                if sweep:
                    during = f" during run {opened[0].tracker.run_id}" if opened else ""
                    tr.RunTracker(client, sweep["parent_run_id"]).finish(
                        "KILLED", failure=f"{e.reason}{during}")
            raise
        except BaseException as e:
            with lifecycle.held():
                for job in opened:
                    job.result = e
                finish(writer, [(j, "FAILED", tr.one_line(e)) for j in opened])
            raise


def _widths(values: Mapping[str, Any]) -> str:
    """A job's own layer widths (``stackable.WIDTH_KEYS``) that it sets: its network's key."""
    from l2lab.config.stackable import WIDTH_KEYS

    return json.dumps({k: values[k] for k in WIDTH_KEYS if k in values}, sort_keys=True)


def _shapes(net: torch.nn.Module) -> list[tuple[int, ...]]:
    """The weight shapes of a network's Linear and convolution layers, in order."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    return [tuple(m.weight.shape) for m in net.modules() if isinstance(m, kinds)]


def _work(net: torch.nn.Module) -> int:
    return sum(math.prod(s) for s in _shapes(net))


def _width_groups(jobs: Sequence[Job], members: Mapping[int, StackMember]) -> list[list[Job]]:
    """The jobs' stacks before ``max_models``: widths grouped by ``stackable.width_stacks`` (on
    CUDA, an activation with f(0) != 0 splits by width: ``stackable.pads_exactly``), widest
    stack first; in each, networks of equal optimizer settings side by side (one param group
    per setting), then widest first (so ``max_models`` cuts a stack at a change of width)."""
    import torch

    from l2lab.config.stackable import pads_exactly, width_stacks

    if not jobs:
        return []
    shared = jobs[0].shared
    accel = str(shared.trainer.get("accelerator", "auto"))
    cuda = accel in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    exact = pads_exactly((jobs[0].tree.get("model") or {}).get("activation"), cuda)
    shapes = [_shapes(members[id(j)].net) for j in jobs]
    work = {id(j): -sum(math.prod(s) for s in shape) for j, shape in zip(jobs, shapes,
                                                                          strict=True)}
    return [sorted((jobs[i] for i in g), key=lambda j: (optimizer_key(j.values), work[id(j)]))
            for g in width_stacks(shapes, exact)]


def _fit_stack(jobs: Sequence[Job], members: Mapping[int, StackMember], splits, writer,
               vectorized: bool, echo: bool, label: str) -> None:
    """One Lightning fit of ``jobs`` as one stack; fills each job's ``result``."""
    from l2lab.core.module import NonFiniteLossError
    from l2lab.core.stacked import unstack_into
    from l2lab.run.recorder import Recorder

    cfg0 = jobs[0].shared
    module = stack(cfg0, [members[id(j)] for j in jobs], splits.train[0])
    group = {"l2lab.vectorized_group": uuid.uuid4().hex[:12]} if vectorized else None
    selection = {j.tracker.run_id: {"l2.layers": ",".join(members[id(j)].penalty.layer_names),
                                    "l2.num_params": str(members[id(j)].penalty.num_params)}
                 for j in jobs if not j.reopened}  # a reopened run has it logged already
    if selection:
        writer.log_params(selection, tags={r: group for r in selection} if group else None)
    recorder = Recorder([j.tracker for j in jobs], [j.ckpt_path for j in jobs], echo=echo,
                        flush_every_s=flush_every_s(cfg0), writer=writer)
    ckpt = jobs[0].ckpt if len(jobs) == 1 else resume_stack(jobs)
    if label == "run" and len(jobs) == 1:  # a single run's progress names the run
        label = f"run {jobs[0].tracker.run_id[:8]}"
    lightning_fit(cfg0, module, splits, recorder, [j.seed for j in jobs],
                  jobs[0].output_dir, ckpt, tracker=jobs[0].tracker, label=label,
                  augments=[_augments(j) for j in jobs])
    unstack_into(module, [members[id(j)].net for j in jobs])
    for k, job in enumerate(jobs):
        if k in module.failures:
            job.result = NonFiniteLossError(module.failures[k])
            continue
        last = recorder.last[k]
        final = dict(last[1]) if last else {}
        if module.test_metrics:
            final.update(module.test_metrics[k])
        job.result = final
    tests = {j.tracker.run_id: [(recorder.last[k][0] if recorder.last[k] else 0,
                                 module.test_metrics[k], int(time.time() * 1000))]
             for k, j in enumerate(jobs)
             if module.test_metrics and k not in module.failures and not j.logged_test}
    if tests:  # test/* once, even for a run continued after its test pass
        writer.log_metrics(tests)


def _augments(job: Job) -> bool:
    """The job's ``data.augment`` (a per-network setting: ``stackable.STACKED``)."""
    return bool((job.tree.get("data") or {}).get("augment", False))


def resume_stack(jobs: Sequence[Job]) -> Path | None:
    from l2lab.core.stacked import merge_member_checkpoints

    return merge_member_checkpoints([j.ckpt for j in jobs]) if any(j.ckpt for j in jobs) else None


def fit_configs(cfgs: Sequence[DictConfig], overrides: Sequence[Sequence[str]],
                output_dirs: Sequence[Path], *, sweep: Mapping | None = None,
                max_models: int | None = None, job_nums: Sequence[int] | None = None
                ) -> list[dict[str, float] | BaseException]:
    """Jobs given as full configs, one per job, that differ only in stacked keys
    (``stackable.STACKED``): trained as stacks, each job its own MLflow run with everything an
    ordinary run records, plus the tag ``l2lab.vectorized_group``. Returns, per job, its final
    metrics or the exception that ended it. (:func:`fit_variants` with ``cfgs[0]`` and each
    job's values.)"""
    from l2lab.config.stackable import member_values

    return fit_variants(cfgs[0], [member_values(c) for c in cfgs], overrides, output_dirs,
                       sweep=sweep, max_models=max_models, job_nums=job_nums)


def fit_variants(cfg: DictConfig, values: Sequence[Mapping[str, Any]],
                 overrides: Sequence[Sequence[str]], output_dirs: Sequence[Path], *,
                 sweep: Mapping | None = None, max_models: int | None = None,
                 job_nums: Sequence[int] | None = None) -> list[dict[str, float] | BaseException]:
    """Jobs given as variants of one config (the vectorized launcher's groups): ``cfg`` and, per
    job, its ``values`` of the stacked keys (``stackable.STACKED``; all jobs of a group share
    every other key). No job gets a config of its own unless something needs one: per job the
    bookkeeping is microseconds. With ``job_nums`` (a sweep's job numbers) each job's line is
    printed, in job order, as an ordinary sweep job says it."""
    from l2lab.console import quiet_libraries

    quiet_libraries()
    swept = sweep.get("swept") if sweep else None
    base = prepared(cfg)
    tree = OmegaConf.to_container(base, resolve=True)
    jobs = []
    for v, ov, d in zip(values, overrides, output_dirs, strict=True):
        v = dict(v)
        lam = v.get("regularization.lam")
        if isinstance(lam, int) and not isinstance(lam, bool):
            v["regularization.lam"] = float(lam)  # as prepared(): "lam=0" logs as 0.0
        job = Job(base, list(ov), Path(d).resolve(), values=v, _tree=substitute(tree, v))
        job.name = run_name(job.overrides, job.tree, swept)
        jobs.append(job)
    groups = [jobs]
    if sweep and sweep.get("continuing"):  # a stopped sweep continues (l2lab.run.sweep)
        from l2lab.run.sweep import continue_stack

        groups = continue_stack(tr.connect(base.tracking.uri), sweep, jobs)
    for group in groups:
        fit_jobs(group, sweep=sweep, max_models=max_models, vectorized=True)
    if job_nums is not None:
        from l2lab.console import job_line, say

        epochs = int(base.trainer.max_epochs)
        shared = shared_failures(jobs)
        for job, num in zip(jobs, job_nums, strict=True):
            label, rid = f"#{num} {job.name}", job.tracker.run_id
            if isinstance(job.result, dict):
                say(job_line(label, rid, epochs, job.result))
            elif str(job.result) not in shared:
                say(f"l2lab: {label}: run {rid[:8]} FAILED: {job.result}", err=True)
            elif shared[str(job.result)][0] is job:  # said once, at its first job
                said = shared[str(job.result)]
                nums = [n for j, n in zip(jobs, job_nums, strict=True) if j in said]
                ids = ", ".join(j.tracker.run_id[:8] for j in said[:6])
                say(f"l2lab: {len(said)} jobs (#{', #'.join(map(str, nums[:6]))}"
                    f"{', …' if len(said) > 6 else ''}; runs {ids}{', …' if len(said) > 6 else ''}"
                    f") FAILED: {job.result}", err=True)
    return [job.result for job in jobs]  # type: ignore[misc]


def shared_failures(jobs: Sequence[Job]) -> dict[str, list[Job]]:
    """The failure messages that two or more jobs of a batch share (a selection matching no
    layer rejects every job alike), each with its jobs in order: said once, with the count."""
    by: dict[str, list[Job]] = {}
    for job in jobs:
        if not isinstance(job.result, dict):
            by.setdefault(str(job.result), []).append(job)
    return {text: group for text, group in by.items() if len(group) > 1}

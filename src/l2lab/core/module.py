"""The LightningModule: J_i = mean CCE_i + penalty_i (the note's (λ_i/n) Σ ||W||² for L2) for a
stack of K networks (K >= 1), network i its own row of every stacked tensor.

Every run is a stack: an ordinary run is a stack of one, a vectorized sweep a stack of K. One
module, one set of kernels, so a child of a vectorized sweep and its ordinary run are the same
computation (on CPU bit for bit; ``tests/test_engine.py``). The networks share no parameter and no
operation mixes their rows, so the gradient of Σ_i J_i w.r.t. network i's weights is that of J_i.
The module knows no penalty by name: it adds and logs whatever terms the penalty returns
(``regularization.Penalty``: ``train/l2``, ``train/l1``, ...).

Settings that act on the optimizer as a whole act per network here: gradient clipping uses each
network's own norm (or value) and its own threshold, and ``mode=optimizer`` applies each
network's own decay 2λ_i/n_i, after clipping, as torch's ``weight_decay`` would (coupled: to the
gradient for SGD/Adam; decoupled: to the weights for AdamW, with the network's own lr). Networks
of one stack may differ in mode: a network's λ is masked to 0 in the other mode's term, which
adds exact zeros. Per-step values stay on the device and become floats once per epoch.

A network that diverges leaves the stack at the end of its epoch (:meth:`L2Module.remove`): its
slices of the weights and of the optimizer state, and its rows of the batches, are cut out, so the
others stop paying for it; their numbers are unchanged (on CPU bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from l2lab.core.data import steps_of
from l2lab.core.regularization import NETWORK_SHAPES, Penalty, added, network_views
from l2lab.core.schedules import MakeScheduler, NetworkSchedulers

#: (trainer, optimizer, schedulers or None): give a running fit another optimizer and its
#: schedule (the run layer passes ``compat.lightning.replace_optimizer``; core imports no
#: private name of Lightning).
ReplaceOptimizer = Callable[[Any, torch.optim.Optimizer, Any], None]


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


def nonfinite_message(epoch: int, m: dict[str, float], terms: Sequence[str] = ("l2",)) -> str:
    """Why a run stopped: the epoch and the diverged numbers (the CCE and the penalty's
    ``terms``), and what to change."""
    parts = ", ".join(f"train/{t}={m[f'train/{t}']}" for t in ("ce", *terms))
    return (f"non-finite loss at epoch {epoch}: train/loss={m['train/loss']} ({parts}); "
            "lower optimizer.lr or regularization.lam")


class L2Module(pl.LightningModule):
    """K networks, stacked (``stacked.stack_networks``), trained on the note's objective.

    ``epoch_metrics`` is a list with one dict per network (``None`` for one that diverged, whose
    reason is in ``failures``); ``test_metrics`` likewise. Both, ``failures`` and ``alive`` are
    indexed by the network's place ``i`` among the K it started with; ``slots`` maps the stack's
    current positions ``pos`` to those indices (networks leave the stack: :meth:`remove`), and
    ``k`` is how many networks the stack holds now (``k`` is always a count here, never an index).
    """

    #: Cut diverged networks out of the stack (else they train on as zeros). Off only to
    #: measure what dead networks cost (``python -m l2lab.bench --dead``).
    drop_dead: bool = True

    def __init__(self, net: nn.Module, penalty: Penalty,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 mode: str = "loss", batch_size: int = 64, *,
                 modes: Sequence[str] | None = None,
                 clips: Sequence[tuple[float | None, str | None]] | None = None,
                 selections: Sequence[Sequence[str]] | None = None,
                 restack: Callable[[Sequence[int], nn.Module], L2Module] | None = None,
                 replace_optimizer: ReplaceOptimizer | None = None,
                 normalized: Sequence[str] = (),
                 make_scheduler: MakeScheduler | None = None,
                 interval: str = "epoch") -> None:
        super().__init__()
        # the module steps the optimizer itself (training_step): a Lightning batch may be
        # several optimizer steps
        self.automatic_optimization = False
        # optimizer -> one network's torch scheduler (None: the lr stays the optimizer's), and
        # whether it steps after every optimizer step or every epoch; shared by the networks
        self.make_scheduler, self.interval = make_scheduler, interval
        self.batch_size = int(batch_size)
        # layers a normalization follows: their effective lr, lr / ||W||^2, is logged
        self.normalized = frozenset(normalized)
        self._set_stack(net, penalty, make_optimizer, modes or [mode] * int(penalty.lams.shape[1]),
                        clips, selections)
        # (positions, net) -> the same stack built for the networks at those positions of this
        # one, holding their weights and dropout streams from ``net``: what remove() uses
        self.restack = restack
        self.replace_optimizer = replace_optimizer
        #: n -> None, counting n optimizer steps in ``trainer.global_step``: set where a step may
        #: bypass Lightning's backward and optimizer wrappers (:meth:`training_step`)
        self.direct_steps: Callable[[int], None] | None = None
        self.slots = list(range(self.k))
        self.alive = [True] * self.k
        self.failures: dict[int, str] = {}
        self.epoch_metrics: list[dict[str, float] | None] = []
        self.test_metrics: list[dict[str, float]] = []
        #: the split each validation loader measures, by its dataloader_idx (the run layer
        #: sets it: ``("val", "train_eval")``, either alone, or none)
        self.eval_splits: tuple[str, ...] = ("val",)
        self._val_metrics: dict[str, list[float]] = {}
        # the epoch's sums on the device, by (split, names): (len(names), K) per group
        self._sums: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        self._counts: dict[tuple[str, tuple[str, ...]], float] = {}

    def _set_stack(self, net: nn.Module, penalty: Penalty,
                   make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                   modes: Sequence[str],
                   clips: Sequence[tuple[float | None, str | None]] | None,
                   selections: Sequence[Sequence[str]] | None) -> None:
        """The stacked pieces and what is derived from them, per network of the stack."""
        self.net, self.penalty, self.make_optimizer = net, penalty, make_optimizer
        self.k = int(penalty.lams.shape[1])
        self.modes = list(modes)
        # per network (threshold, algorithm); None: the Trainer's, for every network
        self.clips = list(clips) if clips is not None else None
        self.selections = [list(s) for s in selections] if selections is not None \
            else [penalty.layer_names] * self.k
        loss = torch.tensor([m == "loss" for m in self.modes])
        lams = penalty.lams
        # λ in the loss (None: no network there) and in the optimizer's decay, per network;
        # buffers, so that they move to the device with the module and a step copies nothing
        # from the host (a copy per step would synchronise with it)
        for name, value in (
                ("_loss_lams", None if not loss.any() else lams if loss.all() else lams * loss),
                ("_opt_lams", None if loss.all() else lams if not loss.any() else lams * ~loss),
                ("_is_loss", loss.to(lams.device))):
            self.register_buffer(name, value, persistent=False)
        # the penalty's hook after each optimizer step, when its class has one (max-norm ...)
        self._after_step = type(penalty).after_step is not Penalty.after_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """The optimizer, and with a schedule Lightning's dict form, so that Lightning steps the
        schedule and saves its state in the checkpoint (resume goes on where it stopped)."""
        optimizer = self.make_optimizer(self.net)
        if self.make_scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self._schedulers(optimizer),
                                 "interval": self.interval}}

    def _schedulers(self, optimizer: torch.optim.Optimizer) -> NetworkSchedulers:
        """One torch scheduler per run of networks with equal optimizer settings (each run's
        own param group and base lr), as each network's ordinary run has one."""
        segments = [(a, b, opt) for a, b, _, opt in optimizer.segments] \
            if isinstance(optimizer, SegmentedOptimizer) else None
        return NetworkSchedulers(optimizer, self.make_scheduler, self.k, segments)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every random stream training draws from, where the epoch left it: restarted from the
        seed, a resumed run would draw other masks than the run never stopped. Each network's
        dropout streams (``dropout_streams``, by stack position, as ``lr_schedulers`` holds each
        network's schedule; none without dropout), and for a stack of one torch's global
        generators (``torch_rng``): a network l2lab cannot stack may draw from them in its
        forward (``F.dropout``), which a stack of several never does (``check_stack``).
        The shuffling order and augmentation draws need nothing: they are functions of (seed,
        epoch)."""
        if streams := dropout_streams(self.net):
            checkpoint["dropout_streams"] = streams
        if self.k == 1:
            device = next(self.net.parameters()).device
            checkpoint["torch_rng"] = {"cpu": torch.get_rng_state(), **(
                {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run's streams go on from its checkpoint (one written before they were
        saved: from the seed, as then). A CUDA state goes to the current device (the rank's:
        Lightning sets it before it restores)."""
        if "dropout_streams" in checkpoint:
            load_dropout_streams(self.net, checkpoint["dropout_streams"])
        rng = checkpoint.get("torch_rng") if self.k == 1 else None
        if rng is not None:
            torch.set_rng_state(rng["cpu"].cpu())
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"].cpu(), torch.cuda.current_device())

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Lightning's hook for a scheduler that is not one torch class (each network's); it
        checks that the hook exists when the fit starts (the module steps the schedule:
        :meth:`training_step`, :meth:`on_train_epoch_end`)."""
        scheduler.step()

    # -- accumulation on the device ------------------------------------------------------------
    def _add(self, split: str, values: Mapping[str, torch.Tensor], n: int) -> None:
        """Add n × each (K,) value to the epoch's sum of ``split/name``: one stack, multiply and
        add for all of a step's values, where a sum per key took three ops a key (each value's
        numbers are still its own v × n, added)."""
        group = (split, tuple(values))
        with torch.no_grad():
            v = torch.stack(list(values.values())) * n
        if group in self._sums:  # in place: the sum is the module's own tensor (made below)
            self._sums[group].add_(v)
        else:
            self._sums[group] = v
        self._counts[group] = self._counts.get(group, 0) + n

    def _means(self, splits: tuple[str, ...]) -> dict[str, list[float]]:
        """Epoch means (K values per ``split/name``), fetched from the device in one transfer.
        Under DDP the sums and counts are first added over ranks (one collective)."""
        groups = [g for g in self._sums if g[0] in splits]
        if not groups:
            return {}
        keys = [f"{split}/{name}" for split, names in groups for name in names]
        sums = torch.cat([self._sums.pop(g) for g in groups])  # (keys, K)
        ns = [float(self._counts.pop(g)) for g in groups]
        counts = torch.tensor([n for n, (_, names) in zip(ns, groups, strict=True) for _ in names],
                              dtype=sums.dtype, device=sums.device)
        if self.trainer.world_size > 1:
            flat = self.trainer.strategy.reduce(torch.cat([sums.flatten(), counts]),
                                                reduce_op="sum")
            sums, counts = flat[:sums.numel()].view_as(sums), flat[sums.numel():]
        return dict(zip(keys, (sums / counts[:, None]).tolist(), strict=True))

    def _ce_step(self, batch, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Each network's mean CCE and accuracy over the batch ((K,) each), and the batch's n.

        Training batches hold K blocks of rows, network i's at [i·b, (i+1)·b); an evaluation
        batch is shared and every network sees all of it. A DDP shard comes as ``(x, y, n)``, n
        the global batch size: it returns ΣCCE over the shard × world/n, so that DDP's mean of
        the ranks' gradients is the gradient of the global batch's mean CCE (whatever the shard
        sizes), and the sums added over ranks divided by world × n are the 1-process means.
        """
        x, y = batch[0], batch[1]
        if split != "train":
            x = x.expand(self.k, *x.shape).reshape(-1, *x.shape[1:])
            y = y.expand(self.k, *y.shape).reshape(-1)
        logits = self.net(x)
        ce = F.cross_entropy(logits, y, reduction="none").view(self.k, -1)
        hit = (logits.argmax(1) == y).float().view(self.k, -1)  # argmax: no graph
        if len(batch) == 3:
            n = int(batch[2])
            scale = self.trainer.world_size / n
            ce, hit = ce.sum(1) * scale, hit.sum(1) * scale
        else:
            n = ce.shape[1]
            ce, hit = ce.mean(1), hit.mean(1)  # the note's (1/n)ΣCCE, per network
        return ce, hit, n

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> None:
        """One Lightning batch: a chunk of mini-batches (``data.Chunks``), each one optimizer
        step, or one mini-batch. Manual optimization through Lightning's own optimizer and
        backward (its precision plugin and strategy), so each step is automatic optimization's:
        zero_grad, backward, ``on_before_optimizer_step`` (clipping, the ``mode=optimizer``
        decay), the step, then the schedule's per-step step and the penalty's ``after_step``.
        Why manual: Lightning's per-batch loop is paid once per chunk, not once per step; with
        ``direct_steps`` (set by the run layer: ``compat.lightning.direct_steps``) the step calls
        torch itself where Lightning's wrappers would add only hook dispatch."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers() if self.interval == "step" else None
        torch_optimizer, steps = optimizer.optimizer, 0
        for step in steps_of(batch):
            loss = self._loss(step)
            if self.direct_steps is not None:  # what Lightning's wrappers would do, less hooks
                torch_optimizer.zero_grad()
                loss.backward()
                self.on_before_optimizer_step(torch_optimizer)
                torch_optimizer.step()
            else:
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            steps += 1
            if scheduler is not None:
                scheduler.step()
            if self._after_step:
                self.penalty.after_step()
        if self.direct_steps is not None:
            self.direct_steps(steps)

    def _loss(self, batch) -> torch.Tensor:
        """Σ_i J_i over the stack for one mini-batch; the epoch's sums of its terms added."""
        ce, hit, n = self._ce_step(batch, "train")
        if self._loss_lams is not None:
            terms = self.penalty.terms(n, self._loss_lams)
            loss = ce + added(terms) if terms else ce
        else:
            loss = ce
        if self.k > 1:  # one network's (1,) is its own loss: backward takes it (a node fewer)
            loss = loss.sum()
        if self._opt_lams is not None:  # the optimizer step applies it; log the equivalent
            with torch.no_grad():  # with the nominal n
                decayed = self.penalty.terms(self.batch_size, self._opt_lams)
            terms = decayed if self._loss_lams is None else {
                name: torch.where(self._is_loss.to(ce.device), v.detach(), decayed[name])
                for name, v in terms.items()}
        self._add("train", {"acc": hit, "ce": ce, **terms}, n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip each network by its own gradient norm (or values), with its own threshold, then
        apply ``mode=optimizer`` decay: the order of an ordinary torch loop, where clipping
        precedes ``optimizer.step`` and the step adds weight decay. Lightning calls it after
        the backward (under 16-bit mixed precision, after unscaling the gradients)."""
        if self.clips and any(v for v, _ in self.clips):
            params = [p for p in self.net.parameters() if p.grad is not None]
            grads = [p.grad for p in params]
            by_value = [float(v) if v and a == "value" else None for v, a in self.clips]
            by_norm = [float(v) if v and (a or "norm") == "norm" else None
                       for v, a in self.clips]
            if any(v is not None for v in by_value):
                clip_values_per_network(grads, by_value)
            if any(v is not None for v in by_norm):
                clip_per_network(grads, self.k, by_norm,
                                 [getattr(p, NETWORK_SHAPES, None) for p in params])
        if self._opt_lams is not None:
            self._decay(optimizer)

    def _decay(self, optimizer: torch.optim.Optimizer) -> None:
        """Each network's weight decay 2λ_k/n_k on its selected tensors: added to the gradient
        (SGD, Adam: coupled) or applied to the weights (AdamW: decoupled, as torch does it,
        before the update, with the network's own lr)."""
        cls = optimizer_class(optimizer)
        decoupled = issubclass(cls, torch.optim.AdamW) or \
            bool(optimizer.defaults.get("decoupled_weight_decay", False))
        lr = torch.tensor(network_lrs(optimizer, self.k), dtype=torch.float64)
        decay = self.penalty.decay(self.batch_size, self._opt_lams)  # (L, K) float64
        mask = self.penalty.bias_mask
        with torch.no_grad():
            for i, (layer, wd) in enumerate(zip(self.penalty.selected, decay, strict=True)):
                for p in layer.params:
                    shape = (self.k,) + (1,) * (p.dim() - 1)
                    if mask is not None and p is layer.bias:
                        wd = wd * mask[i].double()  # 1.0 or 0.0: exact
                    if decoupled:
                        p.mul_((1.0 - lr * wd).to(p.dtype).to(p.device).view(shape))
                    elif p.grad is not None:
                        p.grad.add_(p * wd.to(p.dtype).to(p.device).view(shape))

    def on_train_epoch_end(self) -> None:
        if self.interval == "epoch" and self.make_scheduler is not None:
            # where Lightning's automatic optimization stepped it: after the epoch's last batch
            self.lr_schedulers().step()
        m = self._means(("train",))
        sq = self.penalty.weight_sq_norms()
        sq_vals = torch.stack(list(sq.values())).tolist() if sq else []
        val, self._val_metrics = self._val_metrics, {}
        per_net: list[dict[str, float] | None] = [None] * len(self.alive)
        dead: list[int] = []  # stack positions of the networks that diverged in this epoch
        names = self.penalty.TERMS
        # at epoch end: after the epoch's schedule steps (above), so the lr the next epoch
        # starts with
        lrs = network_lrs(self.trainer.optimizers[0], self.k)
        for pos, i in enumerate(self.slots):
            if not self.alive[i]:
                continue
            d = {key: v[pos] for key, v in m.items()}
            d["train/lr"] = lrs[pos]
            # what the optimizer minimises: ce + the terms added as the step adds them (a
            # constraint alone, max-norm, has none); under mode=optimizer the ce alone, the
            # decay's nominal terms logged under their own names (design.md §4)
            in_loss = names and self.modes[pos] == "loss"
            d["train/loss"] = d["train/ce"] + added({n: d[f"train/{n}"] for n in names}) \
                if in_loss else d["train/ce"]
            if not all(math.isfinite(d[f"train/{n}"]) for n in ("loss", *names)):
                self.alive[i] = False
                self.failures[i] = nonfinite_message(self.current_epoch, d, names)
                dead.append(pos)
                continue
            own = self.selections[pos]
            for name, values in zip(sq, sq_vals, strict=True):
                if name in own:
                    d[f"weights/sq_norm/{name}"] = values[pos]
                    if name in self.normalized:  # scale-invariant: L2 moves its effective lr
                        d[f"weights/eff_lr/{name}"] = lrs[pos] / values[pos]
            d["weights/sq_norm_total"] = sum(d[f"weights/sq_norm/{name}"] for name in sq
                                             if name in own)
            d.update({key: v[pos] for key, v in val.items()})
            if "val/ce" in d:  # against the eval-mode pass where there is one (design.md §4)
                train = "train_eval" if "train_eval/ce" in d else "train"
                d["gap/ce"] = d["val/ce"] - d[f"{train}/ce"]
                d["gap/acc"] = d[f"{train}/acc"] - d["val/acc"]
            per_net[i] = d
        self.epoch_metrics = per_net
        if not any(self.alive):
            self.trainer.should_stop = True
        elif dead:
            if self._can_remove():
                self.remove(dead)
            else:
                for pos in dead:
                    self._silence(pos)

    def _can_remove(self) -> bool:
        """Networks can leave the stack in a one-process fit whose batches can leave with them
        (under DDP every rank's wrapper holds the parameters: there they train on as zeros)."""
        return self.drop_dead and self.restack is not None \
            and self.replace_optimizer is not None and self.trainer.world_size == 1 \
            and hasattr(self.trainer.train_dataloader, "keep")

    def remove(self, positions: Sequence[int]) -> None:
        """Cut the networks at stack ``positions`` out of the stack, between two epochs: the
        stack is rebuilt for the others (``restack``, the code that built it), takes their
        slices of the weights and of the optimizer state, and the batches keep only their rows.
        What each remaining network computes does not depend on its neighbours, so its numbers
        are those it had in the larger stack (on CPU bit for bit: ``tests/test_engine.py``);
        a schedule goes on for each from where it stood.
        A measured choice: a dead network costs a live one's compute every step (zeros
        multiply as fast as numbers), while the rebuild costs less than one step (2-core CPU,
        default sweep with 24 of 48 networks dead: 7 ms, against 46 ms for a step of the 48
        and 21 ms for one of the 24 that stay; whole sweeps: ``python -m l2lab.bench --dead``)."""
        gone = set(positions)
        keep = [p for p in range(self.k) if p not in gone]
        if not keep or self.restack is None or self.replace_optimizer is None:
            raise ValueError("remove() needs restack and replace_optimizer, and a network that "
                             "stays")
        smaller = self.restack(keep, self.net)
        state = self.trainer.optimizers[0].state_dict()["state"]
        old = self.trainer.lr_scheduler_configs[0].scheduler \
            if self.make_scheduler is not None else None
        self._set_stack(smaller.net, smaller.penalty, smaller.make_optimizer, smaller.modes,
                        smaller.clips, smaller.selections)
        self.restack = smaller.restack  # positions in the smaller stack from now on
        self.slots = [self.slots[p] for p in keep]
        optimizer = self.make_optimizer(self.net)
        shapes = [p.shape for p in self.net.parameters()]  # a narrower widest: cut to it
        optimizer.load_state_dict({
            "state": {p: {key: networks_at(v, keep, shapes[p]) for key, v in st.items()}
                      for p, st in state.items()},
            "param_groups": optimizer.state_dict()["param_groups"]})
        schedulers = None
        if old is not None:
            schedulers = self._schedulers(optimizer)
            schedulers.load_state_dict(old.at(keep))
        self.replace_optimizer(self.trainer, optimizer, schedulers)
        self.trainer.train_dataloader.keep(keep)

    def _silence(self, pos: int) -> None:
        """A diverged network that cannot leave the stack trains on as zeros: its NaNs never
        touch the others (no operation mixes slices), but zeros keep the stack's arithmetic
        quiet and fast."""
        with torch.no_grad():
            for p in self.net.parameters():
                p[pos].zero_()
        zero_optimizer_state(self.trainer.optimizers[0], pos, self.k)

    # -- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """A chunk of the validation split, or of the training subset measured in eval mode
        (``train_eval``: no dropout, BatchNorm's running statistics, the weights the epoch
        ended with), every network on all of it."""
        split = self.eval_splits[dataloader_idx]
        ce, hit, n = self._ce_step(batch, split)
        self._add(split, {"acc": hit, "ce": ce}, n)

    def on_validation_epoch_end(self) -> None:
        means = self._means(("val", "train_eval"))
        if not self.trainer.sanity_checking:  # contract: no sanity-check values are logged
            self._val_metrics = means

    def test_step(self, batch, batch_idx: int) -> None:
        ce, hit, n = self._ce_step(batch, "test")
        self._add("test", {"acc": hit, "ce": ce}, n)

    def on_test_epoch_end(self) -> None:
        means = self._means(("test",))
        self.test_metrics = [{} for _ in self.alive]
        for pos, i in enumerate(self.slots):
            self.test_metrics[i] = {key: v[pos] for key, v in means.items()}


def dropout_streams(net: nn.Module) -> list[list[dict[str, Any]]]:
    """Per network of the stack ``net`` (by position), where each of its dropout layers' streams
    stands (``stacked.StackedDropout.stream_states``, in layer order): what a checkpoint keeps so
    that a resumed run, or a network of it resumed alone, draws on from there. Here, beside the
    checkpoint hooks that call it, since ``stacked`` imports this module."""
    layers = [m.stream_states() for m in net.modules() if hasattr(m, "stream_states")]
    k = len(layers[0]) if layers else 0
    return [[layer[pos] for layer in layers] for pos in range(k)]


def load_dropout_streams(net: nn.Module, streams: Sequence[Sequence[dict[str, Any]]]) -> None:
    """Set the dropout streams of the stack ``net`` from :func:`dropout_streams`' value (one
    entry per network, in stack order)."""
    layers = [m for m in net.modules() if hasattr(m, "load_stream_states")]
    if not layers:
        return
    if len(streams) != len(layers[0].generators) or \
            any(len(own) != len(layers) for own in streams):
        raise ValueError(f"the checkpoint holds dropout streams for {len(streams)} networks "
                         f"of {[len(own) for own in streams]} layers; the stack has "
                         f"{len(layers[0].generators)} networks of {len(layers)}")
    for j, layer in enumerate(layers):
        layer.load_stream_states([own[j] for own in streams])


def clip_per_network(grads: Sequence[torch.Tensor], k: int,
                     max_norm: float | Sequence[float | None],
                     shapes: Sequence[Sequence[Sequence[int]] | None] | None = None) -> None:
    """``torch.nn.utils.clip_grad_norm_`` for each of K stacked networks on its own: network i's
    total norm is the 2-norm of its per-tensor norms, and its gradients are scaled by
    min(1, max_norm_i / (norm + 1e-6)), exactly as torch computes it for one network. A network
    whose ``max_norm`` is None is left as it is (scaled by exactly 1.0). ``shapes``: per
    gradient, each network's own shape where a stack pads other widths (on CPU each norm is
    taken at its network's own width: ``regularization.network_views``)."""
    if not grads:
        return
    if grads[0].device.type == "cpu":  # one norm per network: independent of K (see _sq)
        shapes = shapes or [None] * len(grads)
        norms = torch.stack([torch.stack([torch.linalg.vector_norm(v, 2)
                                          for v in network_views(g, s)])
                             for g, s in zip(grads, shapes, strict=True)])
    else:
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(k, -1), 2, dim=1)
                             for g in grads])
    total = torch.linalg.vector_norm(norms, 2, dim=0)  # (K,)
    limits = [float(max_norm)] * k if isinstance(max_norm, int | float) else list(max_norm)
    coef = None
    for limit in dict.fromkeys(v for v in limits if v is not None):  # as torch: a float / norm
        own = torch.clamp(limit / (total + 1e-6), max=1.0)
        if coef is None and all(v == limit for v in limits):
            coef = own
            break
        mine = torch.tensor([v == limit for v in limits], device=total.device)
        coef = torch.where(mine, own, torch.ones_like(own) if coef is None else coef)
    for g in grads:
        g.mul_(coef.to(g.dtype).view((k,) + (1,) * (g.dim() - 1)))


def clip_values_per_network(grads: Sequence[torch.Tensor], limits: Sequence[float | None]) -> None:
    """``torch.nn.utils.clip_grad_value_`` for each stacked network with its own limit (None:
    not clipped): a clamp, exact whichever way it is computed."""
    for limit in dict.fromkeys(v for v in limits if v is not None):
        if all(v == limit for v in limits):
            for g in grads:
                g.clamp_(-limit, limit)
            return
        mine = [i for i, v in enumerate(limits) if v == limit]
        for g in grads:  # indexed, not viewed: the gradient of a channels-last weight
            g[mine] = g[mine].clamp(-limit, limit)  # (stacked.channels_last) has no (k, -1) view


class SegmentedOptimizer(torch.optim.Optimizer):
    """One optimizer class over K stacked networks whose hyperparameters differ: per run of
    networks [a, b) with equal settings, one torch optimizer (its own param group) over views
    ``p[a:b]`` of the stacked tensors, stepped on the views of their gradients. Each network's
    step is then its ordinary run's (same class, settings and elementwise kernels); the stack
    pays one optimizer call per distinct setting, not per network.

    Its ``state_dict`` is that of one optimizer over the stacked tensors (each state tensor with
    a leading K dimension), plus each segment's param groups, so that a member's checkpoint is a
    stack of one's (``member_checkpoints``).
    """

    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer],
                 segments: Sequence[tuple[int, int, dict]]) -> None:
        params = list(params)
        super().__init__(params, {})
        self.optimizer_class = optimizer_class
        self.segments = []
        for a, b, kwargs in segments:
            views = [p.detach()[a:b] for p in params]
            self.segments.append((a, b, views, optimizer_class(views, **kwargs)))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.param_groups[0]["params"]
        for a, b, views, opt in self.segments:
            for p, v in zip(params, views, strict=True):
                v.grad = None if p.grad is None else p.grad[a:b]
            opt.step()
            for v in views:
                v.grad = None
        return loss

    def param_groups_of(self, pos: int) -> list[dict]:
        """The param groups of the network at stack position ``pos``, as its stack of one's
        optimizer has them."""
        for a, b, _, opt in self.segments:
            if a <= pos < b:
                return opt.state_dict()["param_groups"]
        raise IndexError(pos)

    def lrs(self) -> list[float]:
        """Each network's learning rate."""
        return [float(opt.param_groups[0]["lr"]) for a, b, _, opt in self.segments
                for _ in range(a, b)]

    def optimizer_state_of(self, pos: int) -> list[dict]:
        """The optimizer state tensors of the network at stack position ``pos`` (views into
        its segment's, to zero in place)."""
        for a, b, views, opt in self.segments:
            if a <= pos < b:
                return [{key: v[pos - a] for key, v in opt.state.get(view, {}).items()
                         if torch.is_tensor(v) and v.dim() > 0} for view in views]
        raise IndexError(pos)

    def state_dict(self) -> dict:
        params = self.param_groups[0]["params"]
        state: dict[int, dict] = {}
        for i, p in enumerate(params):
            parts = [(a, b, opt.state.get(views[i], {})) for a, b, views, opt in self.segments]
            keys = list(dict.fromkeys(key for _, _, st in parts for key in st))
            merged = {}
            for key in keys:
                values = [st.get(key) for _, _, st in parts]
                shaped = [v for v in values if torch.is_tensor(v) and v.dim() > 0]
                if not shaped:  # a scalar ("step"): the same in every segment
                    v = next(v for v in values if v is not None)
                    merged[key] = v.clone() if torch.is_tensor(v) else v
                    continue
                merged[key] = torch.cat([
                    v if torch.is_tensor(v) and v.dim() > 0
                    else torch.zeros_like(p.detach()[a:b])
                    for (a, b, _), v in zip(parts, values, strict=True)])
            if merged:
                state[i] = merged
        return {"state": state, "param_groups": self.segments[0][3].state_dict()["param_groups"],
                "member_param_groups": [self.param_groups_of(pos)
                                        for pos in range(len(self.lrs()))]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Each segment gets its rows of the state, copied: a scalar such as Adam's ``step``
        is one tensor per param in the dict, which each segment's optimizer increments in
        place (torch keeps the loaded tensor), so segments must not share it."""
        for a, b, _, opt in self.segments:
            own = {i: {key: networks_at(v, range(a, b)) for key, v in st.items()}
                   for i, st in state_dict["state"].items()}
            opt.load_state_dict({"state": own,
                                 "param_groups": opt.state_dict()["param_groups"]})


def optimizer_class(optimizer: torch.optim.Optimizer) -> type:
    """The torch class that steps the networks (a segmented optimizer's inner class)."""
    return getattr(optimizer, "optimizer_class", type(optimizer))


def network_lrs(optimizer: torch.optim.Optimizer, k: int) -> list[float]:
    """Each of the K networks' learning rate."""
    if isinstance(optimizer, SegmentedOptimizer):
        return optimizer.lrs()
    return [float(optimizer.param_groups[0]["lr"])] * k


def networks_at(v, positions: Sequence[int], shape: Sequence[int] | None = None):
    """The networks at ``positions`` of a stacked value (tensors with one row per network on
    dim 0), copied; a 0-d tensor (an optimizer's step count) copied whole, anything else as is.
    ``shape``: the stacked tensor it goes into, when that one may be narrower (networks of other
    widths, padded to the widest: what is cut off is padding, zeros)."""
    if torch.is_tensor(v):
        if v.dim() == 0:
            return v.clone()
        out = v[list(positions)]
        if shape is not None and len(shape) == v.dim() and tuple(shape[1:]) != tuple(v.shape[1:]):
            out = out[(slice(None), *(slice(0, n) for n in shape[1:]))].contiguous()
        return out
    return v


def zero_optimizer_state(optimizer: torch.optim.Optimizer, pos: int, k: int) -> None:
    """Zero the optimizer state of the network at stack position ``pos`` (of ``k`` stacked
    networks) in place."""
    with torch.no_grad():
        if isinstance(optimizer, SegmentedOptimizer):
            for st in optimizer.optimizer_state_of(pos):
                for v in st.values():
                    v.zero_()
            return
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == k:
                    v[pos].zero_()

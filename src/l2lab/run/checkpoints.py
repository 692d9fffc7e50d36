"""Each network's ``last.ckpt`` cut from its stack's checkpoint: the run layer's, because the
stack's checkpoint comes from Lightning's private dump (``compat.lightning.dump_checkpoint``),
which ``core/`` does not import. The format is a stack of one's, so ``resume=RUN_ID`` continues
any run, a child of a stack included; ``core.stacked.merge_member_checkpoints`` joins such files
back into one stack's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from l2lab.compat.lightning import dump_checkpoint
from l2lab.core.module import networks_at
from l2lab.core.regularization import NETWORK_SHAPES


def stack_checkpoint(trainer: Any) -> dict:
    """The whole stack's checkpoint now, its tensors copied (one copy per stacked tensor): what
    :func:`member_checkpoints` splits later, though training has moved on."""
    dump = dump_checkpoint(trainer)

    def copied(v: Any) -> Any:
        if torch.is_tensor(v):
            return v.detach().clone()
        if isinstance(v, dict):
            return {key: copied(x) for key, x in v.items()}
        if isinstance(v, list):
            return [copied(x) for x in v]
        return v

    return {**{key: copied(v) if key in ("state_dict", "optimizer_states") else v
               for key, v in dump.items()}, _SHAPES: network_shapes(trainer)}


_SHAPES = "l2lab_network_shapes"  # in a stack_checkpoint taken in memory, never saved


def network_shapes(trainer: Any) -> tuple[dict[str, list], dict[int, list]]:
    """Each network's own shape per padded tensor of a stack of networks of other widths
    (``regularization.NETWORK_SHAPES``): by state_dict name, and by the optimizer's index of
    the parameter. Empty for a stack of one width."""
    module = trainer.lightning_module
    by_name = {name: getattr(p, NETWORK_SHAPES) for name, p in module.named_parameters()
               if hasattr(p, NETWORK_SHAPES)}
    by_index = {i: getattr(p, NETWORK_SHAPES) for i, p in enumerate(module.net.parameters())
                if hasattr(p, NETWORK_SHAPES)}
    return by_name, by_index


def _own(shapes: dict, key: Any, pos: int) -> tuple[int, ...] | None:
    """The stacked shape network ``pos`` alone has (a stack of one at its own width)."""
    own = shapes.get(key)
    return None if own is None else (1, *own[pos])


def member_checkpoints(trainer: Any, states: Sequence[dict | None], recorder_key: str,
                       base: dict | None = None,
                       slots: Sequence[int] | None = None) -> list[dict | None]:
    """Network i's ``last.ckpt``: the checkpoint of a stack of one holding network i alone (its
    weights, optimizer state and schedule, the shared loop state, its recorder state). From
    ``base`` (a :func:`stack_checkpoint` taken earlier) when given, else from the stack now.
    ``states`` (None: no checkpoint) and the result are indexed by network; ``slots`` says which
    network each position of the stack holds (``L2Module.slots``; default: network i at
    position i)."""
    base = dict(base) if base is not None else dump_checkpoint(trainer)
    by_name, by_index = base.pop(_SHAPES, None) or network_shapes(trainer)  # cut: own widths
    stacked_state = base.pop("state_dict")
    optimizer = base.pop("optimizer_states")[0]
    schedules = base.pop("lr_schedulers", None)  # one state per network (NetworkSchedulers)
    streams = base.pop("dropout_streams", None)  # per network (L2Module.on_save_checkpoint)
    base.pop("callbacks", None)
    out: list[dict | None] = [None] * len(states)
    for pos, i in enumerate(range(len(states)) if slots is None else slots):
        state = states[i]
        if state is None:
            continue
        groups = optimizer.get("member_param_groups")
        opt = {"param_groups": groups[pos] if groups else optimizer["param_groups"],
               "state": {p: {key: networks_at(v, [pos], _own(by_index, p, pos))
                             for key, v in st.items()}
                         for p, st in optimizer["state"].items()}}
        out[i] = {**base, "state_dict": {n: networks_at(v, [pos], _own(by_name, n, pos))
                                         for n, v in stacked_state.items()},
                  "optimizer_states": [opt], "callbacks": {recorder_key: state}}
        if schedules is not None:
            out[i]["lr_schedulers"] = [{"networks": [s["networks"][pos]]} for s in schedules]
        if streams is not None:
            out[i]["dropout_streams"] = [streams[pos]]
    return out

"""Multi-device training (``trainer.devices=N``, Lightning DDP) with one MLflow run.

Rank 0 is the job Hydra started: it creates and writes the run. It starts ranks 1..N-1 itself,
as ``python -m l2lab.run.ddp_worker HANDOFF`` with the torch.distributed environment set, before
``fit`` (Lightning then sees the processes as launched externally, and launches nothing). The
handoff file carries rank 0's effective config (after ``resume``), its output folder and
checkpoint, so the other ranks never compose a config, never read the store and never create a
run; in a multirun they do not re-run the sweep either. Rank 0 stops them when it is interrupted
or fails, and fails when one of them does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback

from l2lab.base import ConfigError
from l2lab.config.schema import OWN_TRAINER_KEYS
from l2lab.core.rules import effective_precision

STRATEGIES = ("auto", "ddp")
HANDOFF = "ddp_handoff.yaml"
_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK")
GRACE_S = 20.0  # how long rank 0 may take to notice a dead rank by itself before it is stopped


def check(cfg: DictConfig) -> None:
    """Refuse multi-device settings that cannot give one run equal to a 1-process run."""
    t = cfg.trainer
    nodes = t.get("num_nodes", 1)
    if nodes != 1:
        raise ConfigError(
            f"trainer.num_nodes must be 1, got {nodes!r}: l2lab trains on the devices of one "
            "machine (trainer.devices=N); spread a sweep over nodes with hydra/launcher=slurm or "
            "hydra/launcher=ray instead."
        )
    strategy = t.get("strategy", "auto")
    if _multi_device(t.get("devices", 1)) and strategy not in STRATEGIES:
        raise ConfigError(
            f"trainer.strategy must be one of {list(STRATEGIES)} when trainer.devices is not 1, "
            f"got {strategy!r}: l2lab starts the DDP ranks itself so that only rank 0 writes to "
            "MLflow (ddp_spawn, fsdp, deepspeed, ... are not supported)."
        )


def _multi_device(devices: Any) -> bool:
    """Whether ``devices`` may mean several ("auto" and -1 may)."""
    if isinstance(devices, int):
        return devices != 1
    if isinstance(devices, str):
        return devices.strip() != "1"
    return len(devices) != 1  # a list of device ids


def trainer_kwargs(cfg: DictConfig) -> dict:
    """``cfg.trainer`` as Trainer kwargs; multi-device runs get DDP with the plain environment
    (also under SLURM, whose environment would take the job's one task for the ranks)."""
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in OWN_TRAINER_KEYS:  # l2lab's own, not Lightning's
        kw.pop(key, None)
    if "precision" in kw:
        kw["precision"] = effective_precision(kw["precision"],
                                              on_cuda(kw.get("accelerator", "auto")))
    if kw.get("strategy", "auto") in STRATEGIES:
        from pytorch_lightning.plugins.environments import LightningEnvironment

        kw["plugins"] = [LightningEnvironment()]
    return kw


def on_cuda(accelerator: object) -> bool:
    """Whether Lightning's ``accelerator`` setting trains on a CUDA device here (``auto`` and
    ``gpu`` pick CUDA when torch sees one)."""
    import torch

    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def world_of(trainer) -> int:
    from pytorch_lightning.strategies import DDPStrategy

    return trainer.num_devices * trainer.num_nodes if isinstance(trainer.strategy, DDPStrategy) \
        else 1


def is_worker() -> bool:
    """True in ranks 1..N-1 started by :func:`ranks`."""
    return os.environ.get("L2LAB_DDP_HANDOFF") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Watch(threading.Thread):
    """Notices a rank that died. gloo makes rank 0 fail by itself within seconds; if it is still
    training after ``GRACE_S`` (NCCL may wait forever), the run is ended FAILED and rank 0 exits,
    so the run is never left RUNNING."""

    def __init__(self, procs: list[subprocess.Popen], tracker) -> None:
        super().__init__(daemon=True, name="l2lab-ddp-watch")
        self.procs, self.tracker, self.stop = procs, tracker, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            dead = [(r, p.returncode) for r, p in enumerate(self.procs, 1)
                    if p.poll() not in (None, 0)]
            if dead:
                if self.stop.wait(GRACE_S):
                    return
                rank, code = dead[0]
                if self.tracker is not None:
                    self.tracker.finish("FAILED",
                                        failure=f"DDP rank {rank} exited with code {code}")
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
                os._exit(1)


class _KeepSigterm(Callback):
    """Under DDP, Lightning's own SIGTERM handler broadcasts from inside the handler, which
    deadlocks against the collective the rank was in; put back l2lab's handler (an interrupt that
    ends the run KILLED) once Lightning has installed its own."""

    def __init__(self) -> None:
        self.handler = signal.getsignal(signal.SIGTERM)

    def _restore(self, *args: Any) -> None:
        signal.signal(signal.SIGTERM, self.handler)

    on_train_start = on_test_start = _restore


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL: the other ranks record nothing, and once rank 0 has left the collectives a
    gentler signal would leave them waiting in one (as Lightning does with its own ranks)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


@contextmanager
def ranks(cfg: DictConfig, trainer, output_dir: Path, ckpt: Path | None,
          tracker) -> Iterator[dict[str, int]]:
    """``{"rank": r, "world": n}`` for the body that fits. In rank 0 of a multi-device run:
    start the other ranks first, stop them if the body fails, and wait for them (and fail with
    them) after it."""
    world = world_of(trainer)
    if world > 1:
        trainer.callbacks.append(_KeepSigterm())
    if is_worker():
        yield {"rank": int(os.environ["LOCAL_RANK"]), "world": world}
        return
    if world == 1:
        try:
            yield {"rank": 0, "world": 1}
        finally:
            _destroy_group()
        return
    handoff = output_dir / HANDOFF
    handoff.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "config": OmegaConf.to_container(cfg, resolve=True), "output_dir": str(output_dir),
        "ckpt": str(ckpt) if ckpt else None})))
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "WORLD_SIZE": str(world), "NODE_RANK": "0", "LOCAL_RANK": "0"})
    procs = [subprocess.Popen([sys.executable, "-m", "l2lab.run.ddp_worker", str(handoff)],
                              env={**os.environ, "LOCAL_RANK": str(r),
                                   "L2LAB_DDP_HANDOFF": str(handoff)})
             for r in range(1, world)]
    watch = _Watch(procs, tracker)
    watch.start()
    try:
        yield {"rank": 0, "world": world}
        for r, p in enumerate(procs, 1):
            code = p.wait(timeout=300)
            if code != 0:
                raise RuntimeError(f"DDP rank {r} exited with code {code}")
    except BaseException:
        _stop(procs)
        raise
    finally:
        watch.stop.set()
        _destroy_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # a later job of this process starts a new group

"""Where the vectorized launcher's stacks train: in this process, on worker processes (one per
device), or as Ray tasks (one per stack).

Why a module of its own: the workers (spawned processes, Ray workers) import these functions by
name, which a Hydra plugin module, executed by Hydra's plugin scanner, is not safe to be. Each
worker calls :func:`l2lab.run.engine.fit_variants` exactly as the launcher does in-process, so a
stack records the same runs wherever it trains; the launcher keeps Hydra's per-job bookkeeping.

Light until used: Hydra imports the launcher (and so this module) at start-up.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

Results = list  # per job: its final metrics (a dict) or the exception that ended it


@dataclass
class Stack:
    """A group of jobs to train as one stack: what a worker needs, nothing of Hydra's."""

    cfg: DictConfig  # the jobs' shared config (without ``hydra``)
    values: list[dict[str, Any]]  # per job: its values of the stacked keys
    overrides: list[list[str]]
    output_dirs: list[str]
    job_nums: list[int] | None = None  # the sweep's job numbers: each job's line is printed


def fit_here(stack: Stack, sweep: Mapping | None, max_models: int | None) -> Results:
    """Train one stack in this process (the serial path, a worker process, a Ray task)."""
    from l2lab.console import quiet_libraries
    from l2lab.run.engine import fit_variants

    quiet_libraries()
    return fit_variants(stack.cfg, stack.values, stack.overrides, stack.output_dirs, sweep=sweep,
                        max_models=max_models, job_nums=stack.job_nums)


def cuda_devices() -> int:
    """CUDA devices this process may use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_devices(workers: int | None) -> list[int | None]:
    """One entry per worker process: the CUDA device it is pinned to, or ``None`` (CPU).

    ``workers`` null: one worker per visible CUDA device, none (train here) with fewer than two.
    An explicit ``workers`` (CPU testing, or several stacks a GPU) takes the devices round-robin.
    """
    n = cuda_devices()
    if workers is None:
        return list(range(n)) if n > 1 else []
    return [i % n if n else None for i in range(workers)] if workers > 1 else []


def _pin(device: int | None) -> None:
    """A worker's first act, before torch is imported: see only its own device. Ctrl-C reaches
    the workers from the terminal with the launcher; SIGTERM is forwarded by the launcher."""
    if device is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else None
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[device] if ids else str(device)


def on_workers(stacks: Sequence[Stack], devices: Sequence[int | None], sweep: Mapping | None,
               max_models: int | None) -> Iterator[tuple[int, Results | BaseException]]:
    """Train the stacks on one spawned worker process per device, each taking the next stack
    when it is free; yields (stack index, its results or the exception that ended it) as each
    ends. On SIGTERM the workers get it too (their runs end KILLED) before the launcher stops."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA
    pools = [cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_pin, initargs=(d,))
             for d in devices]
    free, pending, running = list(range(len(pools))), list(range(len(stacks))), {}

    def forward(signum, frame) -> None:  # noqa: ANN001
        for pool in pools:
            for proc in list((pool._processes or {}).values()):  # noqa: SLF001 (no public way)
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while pending or running:
            while free and pending:
                w, s = free.pop(0), pending.pop(0)
                running[pools[w].submit(fit_here, stacks[s], sweep, max_models)] = (w, s)
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                w, s = running.pop(future)
                free.append(w)
                try:
                    yield s, future.result()
                except Exception as e:  # the stack's runs are FAILED with the reason
                    yield s, e
    finally:
        signal.signal(signal.SIGTERM, previous)
        for pool in pools:  # an interrupted worker records its runs KILLED before it exits
            pool.shutdown(wait=True, cancel_futures=True)


def on_ray(stacks: Sequence[Stack], conf: Mapping[str, Any], sweep: Mapping | None,
           max_models: int | None) -> Iterator[tuple[int, Results | BaseException]]:
    """Each stack as one Ray task (``num_gpus=1`` with CUDA, else 0), on the cluster at
    ``ray.init.address`` or on a local instance; yields results as tasks end."""
    import ray

    init = {k: v for k, v in dict(conf.get("init") or {}).items() if v is not None}
    if not ray.is_initialized():
        ray.init(**init)
    remote = {k: v for k, v in dict(conf.get("remote") or {}).items() if v is not None}
    if "num_gpus" not in remote:
        remote["num_gpus"] = 1 if cuda_devices() else 0
    task = ray.remote(**remote)(fit_here)
    refs = {task.remote(s, sweep, max_models): i for i, s in enumerate(stacks)}
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                i = refs.pop(ref)
                try:
                    yield i, ray.get(ref)
                except Exception as e:
                    yield i, getattr(e, "cause", None) or e
    except BaseException:
        for ref in refs:
            ray.cancel(ref)
        raise

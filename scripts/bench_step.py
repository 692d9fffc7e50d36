"""Where the harness's step time goes, for the bench's single-run case (``python -m l2lab.bench``
with ``--hidden 32 --threads 1``): a developer's tool behind docs/performance.md, "The step in
chunks".

- ``step``: the module's step alone (``L2Module._loss``, backward, ``on_before_optimizer_step``,
  the torch step; no Lightning) against the plain loop's step (``core/reference.py``'s body) on
  the same batches, alternating in one process; CPU µs a step, the fastest of ``--rounds``.
- ``parts``: wall time of a whole harness run (no MLflow) and of its parts, per epoch, the
  fastest of ``--rounds`` runs, with the plain loop's whole run beside it. The parts are timed
  by wrapping Lightning's evaluation loop (a private class: pytorch-lightning 2.6) and l2lab's
  hooks.

    PYTHONPATH=src python scripts/bench_step.py [--epochs 100] [--train-size 400] [--rounds 7]

- ``--only module|plain --steps N``: N steps of one side and nothing else, for counting
  instructions, which a noisy machine does not change: run it under callgrind for two N, and
  the difference over the difference of N is one step's instructions. valgrind knows no
  AVX-512, so torch is kept to AVX2:

    ATEN_CPU_CAPABILITY=avx2 PYTHONPATH=src valgrind --tool=callgrind \
        --callgrind-out-file=/dev/null python scripts/bench_step.py --only module --steps 500
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from l2lab import bench
from l2lab.core import reference
from l2lab.core.data import StackedBatches, load_data
from l2lab.core.module import L2Module
from l2lab.run import engine
from l2lab.run import recorder as rec
from l2lab.tracking import tracker as tr


def steppers(cfg, splits) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """``(module, plain)``: each runs ``steps`` optimizer steps of its side on the same batches.
    The module's step alone (``_loss``, backward, ``on_before_optimizer_step``, the torch step;
    no Lightning) and the plain loop's (core/reference.py's step and accumulators)."""
    x, y = splits.train
    batches = list(StackedBatches(x, y, int(cfg.data.batch_size), [int(cfg.seed)]))
    module = engine.stack(cfg, [engine.build_member(cfg, splits)])
    opt = module.make_optimizer(module.net)
    torch.manual_seed(int(cfg.seed))
    net = reference.build_net(cfg, tuple(x.shape[1:]), int(splits.num_classes))
    penalty = reference.PlainPenalty(net, cfg.regularization, dataset_size=len(y))
    popt = reference.optimizer(cfg, net, penalty)

    def harness(steps: int) -> None:
        for i in range(steps):
            loss = module._loss(batches[i % len(batches)])
            opt.zero_grad()
            loss.backward()
            module.on_before_optimizer_step(opt)
            opt.step()
        module._sums.clear()
        module._counts.clear()

    def plain(steps: int) -> None:  # core/reference.py's step and accumulators
        ce_sum = hits = torch.zeros(())
        sums = {name: torch.zeros(()) for name in penalty.names}
        for i in range(steps):
            xb, yb = batches[i % len(batches)]
            logits = net(xb)
            ce = reference.mean_cce(logits, yb)
            terms = penalty.terms(len(yb))
            loss = ce + sum(terms.values())
            popt.zero_grad()
            loss.backward()
            popt.step()
            with torch.no_grad():
                ce_sum = ce_sum + ce * len(yb)
                for name, v in terms.items():
                    sums[name] = sums[name] + v * len(yb)
                hits = hits + (logits.argmax(1) == yb).sum()

    return harness, plain


def step_us(cfg, splits, steps: int, rounds: int) -> dict[str, float]:
    harness, plain = steppers(cfg, splits)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in (("plain", plain), ("module", harness)):
            t = time.process_time()
            fn(steps)
            us = (time.process_time() - t) / steps * 1e6
            best[name] = min(best.get(name, us), us)
    return {"module_us": best["module"], "plain_us": best["plain"],
            "ratio": best["module"] / best["plain"]}


def parts_ms(cfg, splits, rounds: int) -> dict[str, float]:
    from pytorch_lightning.loops import evaluation_loop

    acc: dict[str, float] = defaultdict(float)
    undo = []

    def wrap(owner, name: str, label: str) -> None:
        f = getattr(owner, name)
        undo.append((owner, name, f))

        @functools.wraps(f)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[label] += time.perf_counter() - t
        setattr(owner, name, timed)

    wrap(L2Module, "training_step", "training_step")
    wrap(evaluation_loop._EvaluationLoop, "run", "validation_loops")
    wrap(L2Module, "validation_step", "validation_step")
    wrap(rec.Recorder, "on_train_epoch_end", "recorder_epoch_end")
    wrap(rec, "stack_checkpoint", "in_memory_checkpoint")
    wrap(L2Module, "on_train_epoch_end", "module_epoch_end")
    epochs, best = int(cfg.trainer.max_epochs), None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(rounds + 1):  # the first warms up
                acc.clear()
                t = time.perf_counter()
                bench.run_harness(cfg, splits, tr.NullTracker(), Path(tmp) / str(i))
                harness = time.perf_counter() - t
                t = time.perf_counter()
                bench.run_plain(cfg, splits, torch.device("cpu"))
                plain = time.perf_counter() - t
                if i and (best is None or harness < best[0]):
                    best = (harness, plain, dict(acc))
    finally:
        for owner, name, f in undo:
            setattr(owner, name, f)
    harness, plain, parts = best
    return {"harness_s": harness, "plain_s": plain, "ratio": harness / plain,
            "per_epoch_ms": {k: v / epochs * 1e3 for k, v in parts.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", choices=("module", "plain"),
                   help="run 10 + --steps steps of this side and print nothing: for callgrind")
    p.add_argument("--steps", type=int, default=500)
    a = p.parse_args()
    torch.set_num_threads(1)
    args = bench.parse_args(["--epochs", str(a.epochs), "--train-size", str(a.train_size),
                             "--batch-size", str(a.batch_size), "--hidden", "32",
                             "--threads", "1"])
    cfg = bench.compose_cfg(bench.overrides_for(args, torch.device("cpu")))
    splits = load_data(cfg.data)
    if a.only:
        side = dict(zip(("module", "plain"), steppers(cfg, splits), strict=True))[a.only]
        side(10)  # lazy initialisation: the same in every run, whatever --steps
        side(a.steps)
        return
    out = {"step": step_us(cfg, splits, 2000, a.rounds),
           "parts": parts_ms(cfg, splits, min(a.rounds, 3)),
           "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

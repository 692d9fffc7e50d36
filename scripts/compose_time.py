#!/usr/bin/env python
"""Seconds to compose a sweep's jobs: Hydra's grid sweeper against hydra/sweeper=grouped.

    scripts/compose_time.py [--lams 200] [--seeds 5] [--sample 30] [--json]
    scripts/compose_time.py --bookkeeping [--lams 4 12]


A λ × seed grid on experiment=mnist1d_sweep (1000 jobs by default), composed in this process as
`python -m l2lab.train -m` does: the grouped sweeper's validation of the whole batch, then the
launcher taking every job's config (derived from its group's composition); Hydra's BasicSweeper
composes each job, timed on --sample jobs and scaled to the grid (composing 1000 takes minutes).
--bookkeeping: what the sweeper and the vectorized launcher spend per job, composition to
Hydra's job folder and .hydra/ files, with training (and so MLflow) stubbed out: two whole
`python -m l2lab.train -m experiment=mnist1d_sweep` sweeps of N and M jobs, (T(M) - T(N)) / (M - N).
Measured, not asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

import l2lab.config.schema  # noqa: F401  (the schemas conf/ names)
from l2lab import CONF_DIR
from l2lab.config.composing import SweepConfigs

STUB = """import sys, time
import l2lab.run.engine as e
import l2lab.train as t
e.fit_variants = lambda cfg, values, *a, **k: [{"val/ce": 1.0, "train/ce": 1.0} for _ in values]
sys.argv = ["l2lab.train", *sys.argv[1:]]
tic = time.perf_counter()
try:
    t.hydra_main()
finally:
    print("SECONDS", time.perf_counter() - tic, file=sys.stderr)
"""


def _lams(n: int) -> str:
    return ",".join(f"{1e-4 * 1.05 ** i:.6g}" for i in range(n))


def bookkeeping(lams: list[int], seeds: int) -> dict:
    """Seconds of a whole stubbed sweep of each size, and the cost per job between them."""
    seconds = []
    for n in lams:
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(
                [sys.executable, "-c", STUB, "-m", "experiment=mnist1d_sweep",
                 f"regularization.lam={_lams(n)}", f"seed=range(0,{seeds})",
                 "~hydra.callbacks.l2lab_sweep", f"hydra.sweep.dir={tmp}/m"],
                cwd=tmp, capture_output=True, text=True, check=True)
        seconds.append(float(r.stderr.rsplit("SECONDS", 1)[1]))
    jobs = [n * seeds for n in lams]
    return {"jobs": jobs, "seconds": [round(t, 2) for t in seconds],
            "ms_per_job": round((seconds[-1] - seconds[0]) / (jobs[-1] - jobs[0]) * 1e3, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bookkeeping", action="store_true", help="sweeper + launcher per job")
    ap.add_argument("--lams", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sample", type=int, default=30, help="jobs Hydra's sweeper composes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.bookkeeping:
        out = bookkeeping(args.lams or [4, 12], args.seeds)
        print(json.dumps(out) if args.json else
              f"{out['jobs']} jobs: {out['seconds']} s, {out['ms_per_job']} ms a job")
        return out
    args.lams = (args.lams or [200])[0]
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    master = loader.load_configuration(
        "train", overrides=["experiment=mnist1d_sweep"], run_mode=RunMode.MULTIRUN)
    parsed = OverridesParser.create().parse_overrides(
        [f"regularization.lam={_lams(args.lams)}", f"seed=range(0,{args.seeds})"])
    (batch,) = BasicSweeper.split_arguments(parsed, None)

    tic = time.perf_counter()  # Hydra's BasicSweeper.validate_batch_is_legal, on a sample
    for overrides in batch[:args.sample]:
        loader.load_sweep_config(master, list(overrides))
    basic = (time.perf_counter() - tic) / args.sample

    configs = SweepConfigs(loader)
    tic = time.perf_counter()
    configs.validate(master, batch)
    validated = time.perf_counter() - tic
    tic = time.perf_counter()
    for overrides in batch:
        configs.take(master, list(overrides))
    taken = time.perf_counter() - tic
    out = {"jobs": len(batch), "basic_s_per_job": round(basic, 4),
           "basic_s": round(basic * len(batch), 1), "grouped_compositions": configs.compositions,
           "grouped_validate_s": round(validated, 3), "grouped_take_s": round(taken, 3),
           "grouped_s": round(validated + taken, 3)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{len(batch)} jobs: BasicSweeper composes each, {basic * 1e3:.0f} ms a job "
              f"(on {args.sample}): {basic * len(batch):.1f} s; grouped: "
              f"{configs.compositions} composition(s), validation {validated:.2f} s, every job's "
              f"config taken {taken:.2f} s ({taken / len(batch) * 1e3:.2f} ms a job): "
              f"{validated + taken:.2f} s")
    return out


if __name__ == "__main__":
    main()

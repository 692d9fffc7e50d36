#!/usr/bin/env python
"""Wall time of the commands a researcher types most, before anything trains.

    scripts/startup_times.py [--repeat 3] [--json]

Each command runs in a fresh interpreter (as typed at a shell) in a temporary folder, with a
store path that does not exist, and is timed from start to exit; the median of --repeat runs is
printed. Also reports whether torch / pytorch_lightning / mlflow were imported on that path.
Measured, not asserted: the machine is shared and noisy (the issue's bounds: <= 3 s for the fast
commands, <= 5 s for a single run's config error).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROBE = ("import runpy, sys\nsys.argv = [{mod!r}, *{args!r}]\ncode = 0\n"
         "try:\n    runpy.run_module({mod!r}, run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code if isinstance(e.code, int) else 1\n"
         "heavy = [m for m in ('torch', 'pytorch_lightning', 'mlflow') if m in sys.modules]\n"
         "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\nsys.exit(code)\n")

COMMANDS = {
    "train --help": ("l2lab.train", ["--help"]),
    "train --cfg job": ("l2lab.train", ["--cfg", "job"]),
    "compare --help": ("l2lab.compare", ["--help"]),
    "reproduce --help": ("l2lab.reproduce", ["--help"]),
    "config error (regularization.lam=abc)": ("l2lab.train", ["regularization.lam=abc"]),
    "config error (data.val_size=-3)": ("l2lab.train", ["data.val_size=-3"]),
    "typo (+regularization.lamda=0.1)": ("l2lab.train", ["+regularization.lamda=0.1"]),
}


def time_one(module: str, args: list[str], cwd: str, env: dict) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PROBE.format(mod=module, args=args)], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    heavy = next((ln[6:] for ln in r.stderr.splitlines() if ln.startswith("HEAVY=")), "?")
    return elapsed, r.returncode, heavy or "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/none/mlflow.db"}
        for label, (module, cmd) in COMMANDS.items():
            times = []
            for _ in range(args.repeat):
                t, rc, heavy = time_one(module, cmd, tmp, env)
                times.append(t)
            results[label] = {"median_s": round(statistics.median(times), 2),
                              "min_s": round(min(times), 2), "exit": rc, "heavy_imports": heavy}
            if not args.json:
                print(f"{label:<40} {statistics.median(times):6.2f} s (min {min(times):.2f})  "
                      f"exit {rc}  heavy imports: {heavy}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m l2lab.bench --sweep``: the default λ sweep, whole processes, side by side.

Why: a researcher's alternative to the harness is a script that trains the same jobs in a loop.
This times, on one machine, interleaved and in rotated order, each as a whole process (start-up,
imports and data loading included, as a user waits for them):

- ``vectorized``: ``python -m l2lab.train -m experiment=lambda_sweep`` (stacked networks);
- ``basic``: the same sweep with ``hydra/launcher=basic`` (one job after another);
- ``plain``: ``l2lab.core.reference``, the plain PyTorch loop, training the same jobs one after
  another from the composed config with each job's λ and seed set on it (same data split,
  initialisation, batches, penalty, optimizer and settings; no logging);
- ``plain_stacked``: a plain stacked-model loop (``torch.func`` ``stack_module_state`` +
  ``functional_call`` + ``vmap``) over the same jobs; it mirrors an MLP with SGD and the note's
  loss only, and is left out (the result says why) for any other config;
- ``single`` / ``single_plain``: one ordinary run of the default config, harness vs plain script.

The harness sides report the seconds spent inside MLflow client calls (the ``mlflow_s`` the sweep
writes to its folder), and every side its final val/ce per λ, so that the sides can be seen to
train the same thing. Overrides after ``--`` apply to every side (``data=mnist1d`` trains
MNIST-1D on all of them).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

SWEEP_SIDES = ("vectorized", "basic", "plain", "plain_stacked")
SINGLE_SIDES = ("single", "single_plain")


def process_env() -> dict[str, Any]:
    """What a whole-process benchmark's JSON records of the machine it ran on: the load says how
    noisy its times were."""
    return {"python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "load_avg_1m_at_end": os.getloadavg()[0]}


# -- the plain children ------------------------------------------------------------------------

def _jobs(spec: dict) -> list[tuple[float, int]]:
    return [(float(lam), int(seed)) for lam in spec["lams"] for seed in spec["seeds"]]


def _job_cfg(spec: dict, lam: float, seed: int):
    """The job's composed config: exactly what the harness's sweep composes for it."""
    from hydra import compose, initialize_config_dir

    from l2lab.base import CONF_DIR
    from l2lab.config import schema  # noqa: F401 (registers the config schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*spec["overrides"], f"regularization.lam={lam}",
                                           f"seed={seed}"])


def plain_loop(spec: dict) -> list[float]:
    """The hand-written loop (``l2lab.core.reference``), one job after another; returns each job's
    final val/ce. The config is composed once and each job sets its λ and seed on it, as a
    script with its settings written out would (composing each job with Hydra would add ~0.4 s a
    job that no plain script pays); the jobs differ in nothing else."""
    from l2lab.core import reference
    from l2lab.core.data import load_data

    jobs = _jobs(spec)
    cfg = _job_cfg(spec, *jobs[0])
    splits = load_data(cfg.data)
    finals = []
    for lam, seed in jobs:
        cfg.regularization.lam, cfg.seed = lam, seed
        finals.append(reference.train(cfg, splits, spec.get("device", "cpu"))[1][-1]["val/ce"])
    return finals


def stacked_mirrors(cfg) -> str | None:
    """Why the plain torch.func loop cannot train what the harness trains for ``cfg`` (None:
    it can): it is the usual ensemble recipe, an MLP with SGD and the note's loss."""
    reg = cfg.regularization
    checks = {
        "model": cfg.model.name == "mlp" and float(cfg.model.get("dropout", 0)) == 0.0
        and cfg.model.get("activation", "relu") == "relu",
        "optimizer": cfg.optimizer.name == "sgd" and not cfg.optimizer.get("nesterov", False)
        and float(cfg.optimizer.get("dampening", 0)) == 0.0,
        "regularization": reg.mode == "loss" and reg.normalize == "batch"
        and list(reg.layers) == ["*"] and not reg.get("exclude") and not reg.include_bias
        and not reg.get("lam_per_layer") and int(reg.get("min_params", 0)) == 0,
        "trainer.gradient_clip_val": not cfg.trainer.get("gradient_clip_val"),
    }
    wrong = [k for k, ok in checks.items() if not ok]
    return None if not wrong else (
        f"the plain stacked loop (torch.func) mirrors only an MLP without dropout, plain SGD and "
        f"the note's loss over every layer's weights; these settings differ: {', '.join(wrong)}")


def plain_per_job(spec: dict) -> dict[str, float]:
    """Seconds per job of the plain loop training ``spec["jobs"]`` jobs of one composed config
    (λ and seed varied as a sweep varies them) in this process, imports, composition and data
    loading left out: the compute a job costs anywhere."""
    from l2lab.core import reference
    from l2lab.core.data import load_data

    cfg = _job_cfg(spec, 0.0, 0)
    splits = load_data(cfg.data)
    reference.train(cfg, splits)  # warm-up, untimed
    jobs = int(spec["jobs"])
    t0 = time.perf_counter()
    for i in range(jobs):
        cfg.regularization.lam, cfg.seed = 1e-3 * (i % 7), i
        reference.train(cfg, splits)
    return {"s_per_job": (time.perf_counter() - t0) / jobs}


def plain_stacked_loop(spec: dict) -> list[float]:
    """The same jobs as one vmap-ed stack (the usual torch.func ensemble recipe)."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    from l2lab.core.data import EpochShuffle, load_data
    from l2lab.models import MLP

    device = torch.device(spec.get("device", "cpu"))
    jobs = _jobs(spec)
    cfg = _job_cfg(spec, *jobs[0])
    if why := stacked_mirrors(cfg):
        raise ValueError(why)
    splits = load_data(cfg.data).to(device)
    nets = []
    for _, seed in jobs:
        torch.manual_seed(seed)
        nets.append(MLP(splits.in_shape, splits.num_classes, hidden=list(cfg.model.hidden)
                        ).to(device))
    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    weights = [k for k in params if k.endswith("weight")]
    lams = torch.tensor([lam for lam, _ in jobs], device=device)
    opt = torch.optim.SGD(params.values(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum)
    forward = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))
    x, y = splits.train
    xv, yv = splits.val
    shuffles = [EpochShuffle(len(y), seed, True) for _, seed in jobs]
    k, bs = len(jobs), int(cfg.data.batch_size)
    for epoch in range(int(cfg.trainer.max_epochs)):
        for s in shuffles:
            s.set_epoch(epoch)
        orders = torch.stack([s.order() for s in shuffles]).to(device)
        for idx in orders.split(bs, dim=1):
            logits = forward(params, buffers, x[idx])
            ce = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="none")
            sq = sum(params[w].pow(2).flatten(1).sum(1) for w in weights)
            loss = (ce.view(k, -1).mean(1) + lams * sq / idx.shape[1]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = forward(params, buffers, xv.expand(k, *xv.shape))
            val_ce = F.cross_entropy(logits.flatten(0, 1), yv.repeat(k), reduction="none")
            finals = val_ce.view(k, -1).mean(1).tolist()
    return finals


# -- the parent --------------------------------------------------------------------------------
GRID = ("regularization.lam", "seed")


def _spec(overrides: list[str]) -> dict:
    """The sweep's jobs and settings, read from the composed ``experiment=lambda_sweep`` config
    with the given overrides; a ``regularization.lam=a,b,…`` or ``seed=…`` override replaces
    that axis of its grid. The plain sides compose each job's config from the same overrides."""
    from hydra import compose, initialize_config_dir

    from l2lab.base import CONF_DIR
    from l2lab.config import schema  # noqa: F401 (registers the config schemas)

    grid = {k: v for k, _, v in (o.partition("=") for o in overrides) if k in GRID}
    rest = ["experiment=lambda_sweep", *(o for o in overrides if o.partition("=")[0] not in GRID)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=rest, return_hydra_config=True)
    params = {**cfg.hydra.sweeper.params, **grid}
    return {"overrides": rest,
            "lams": [float(v) for v in str(params["regularization.lam"]).split(",")],
            "seeds": [int(v) for v in str(params["seed"]).split(",")],
            "data": cfg.data.name, "model": cfg.model.name, "optimizer": cfg.optimizer.name,
            "hidden": list(cfg.model.hidden), "train_size": cfg.data.train_size,
            "val_size": cfg.data.val_size, "batch_size": cfg.data.batch_size,
            "epochs": cfg.trainer.max_epochs,
            # the plain sides train where the harness does (trainer.accelerator=auto)
            "device": "cuda" if _cuda(str(cfg.trainer.accelerator)) else "cpu",
            "stacked_refused": stacked_mirrors(cfg)}


def _cuda(accelerator: str) -> bool:
    import torch

    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def _timed(cmd: list[str], cwd: Path, env: dict,
           ok: tuple[int, ...] = (0,)) -> tuple[float, subprocess.CompletedProcess]:
    """A whole process, timed; ``ok``: the exit codes it may end with (a sweep whose diverged
    jobs FAILED, as they should, exits 1; but not with a traceback)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if r.returncode not in ok or (r.returncode != 0 and "Traceback" in r.stderr):
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return seconds, r


def _harness_sweep(side: str, spec: dict, overrides: list[str], tmp: Path,
                   env: dict) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{side}-"))
    store = _store(tmp, env)
    grid = [f"regularization.lam={','.join(map(str, spec['lams']))}",
            f"seed={','.join(map(str, spec['seeds']))}"]
    launcher = ["hydra/launcher=basic"] if side == "basic" else []
    cmd = [sys.executable, "-m", "l2lab.train", "-m", *spec["overrides"], *launcher, *grid,
           f"hydra.sweep.dir={work}/multirun/s", f"tracking.uri={store}"]
    seconds, _ = _timed(cmd, work, env)
    timing = json.loads((work / "multirun" / "s" / "timing.json").read_text())
    import csv

    with open(work / "multirun" / "s" / "report" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    return {"seconds": seconds, "mlflow_s": timing["mlflow_s"],
            "val_ce": {float(r["lam"]): float(r["val/ce_mean"]) for r in rows}}


def _store(tmp: Path, env: dict) -> str:
    """One SQLite store for every harness run, its schema created before any timing: a
    researcher's store exists after their first run (creating it costs a few seconds once)."""
    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    if not (tmp / "mlruns" / "mlflow.db").exists():
        subprocess.run([sys.executable, "-c", f"from l2lab.tracking import tracker; "
                        f"tracker.connect({uri!r})"], env=env, check=True, capture_output=True)
    return uri


def _plain(side: str, spec: dict, tmp: Path, env: dict) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "l2lab.bench_sweep", "--child", side, json.dumps(spec)]
    seconds, r = _timed(cmd, tmp, env)
    finals = json.loads(r.stdout.strip().splitlines()[-1])
    per_lam: dict[float, list[float]] = {}
    for (lam, _), v in zip(_jobs(spec), finals, strict=True):
        per_lam.setdefault(lam, []).append(v)
    return {"seconds": seconds, "val_ce": {k: statistics.mean(v) for k, v in per_lam.items()}}


def _single(side: str, spec: dict, tmp: Path, env: dict) -> dict[str, Any]:
    if side == "single_plain":
        return _plain("plain", spec, tmp, env)
    work = Path(tempfile.mkdtemp(dir=tmp, prefix="single-"))
    cmd = [sys.executable, "-m", "l2lab.train", f"tracking.uri={_store(tmp, env)}",
           *spec["overrides"], f"regularization.lam={spec['lams'][0]}",
           f"seed={spec['seeds'][0]}", f"hydra.run.dir={work}/out"]
    seconds, _ = _timed(cmd, work, env)
    return {"seconds": seconds}


def _stats(runs: list[dict]) -> dict[str, Any]:
    secs = [r["seconds"] for r in runs]
    out: dict[str, Any] = {"median_s": statistics.median(secs), "min_s": min(secs),
                           "times_s": secs}
    if "mlflow_s" in runs[0]:
        mlflow_s = statistics.median(r["mlflow_s"] for r in runs)
        out["mlflow_s"] = mlflow_s
        out["mlflow_share"] = mlflow_s / out["median_s"]
    if "val_ce" in runs[-1]:
        out["final_val_ce_per_lam"] = {f"{k:g}": v for k, v in runs[-1]["val_ce"].items()}
    return out


def bench_sweep(repeats: int, overrides: list[str], single: bool = True) -> dict[str, Any]:
    spec = _spec(overrides)
    # one ordinary run as the issue timed it: all the training examples (1200 then, 840 since
    # the digits hold out a test split), 30 epochs, batch 64
    single_spec = {**spec, "lams": [1e-3], "seeds": [0], "train_size": None, "batch_size": 64,
                   "epochs": 30, "overrides": [*spec["overrides"], "data.train_size=null",
                                               "data.batch_size=64", "trainer.max_epochs=30"]}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # each harness side writes a fresh store of its own
    sweep_sides = tuple(s for s in SWEEP_SIDES
                        if not (s == "plain_stacked" and spec["stacked_refused"]))
    sides = sweep_sides + (SINGLE_SIDES if single else ())
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="l2lab-bench-sweep-") as d:
        tmp = Path(d)
        for r in range(repeats):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                if side in ("vectorized", "basic"):
                    res = _harness_sweep(side, spec, overrides, tmp, env)
                elif side in ("plain", "plain_stacked"):
                    res = _plain(side, spec, tmp, env)
                else:
                    res = _single(side, single_spec, tmp, env)
                runs[side].append(res)
                print(f"l2lab.bench --sweep: repeat {r} {side}: {res['seconds']:.2f} s",
                      file=sys.stderr, flush=True)
    result: dict[str, Any] = {"settings": {**spec, "jobs": len(_jobs(spec)), "repeats": repeats,
                                           "overrides": overrides},
                              "sides": {s: _NOTES[s] for s in sides}}
    for side in sides:
        result[side] = _stats(runs[side])
    med = {s: result[s]["median_s"] for s in sides}
    result["ratios"] = {
        "vectorized_over_plain": med["vectorized"] / med["plain"],
        "basic_over_plain": med["basic"] / med["plain"],
        "basic_over_vectorized": med["basic"] / med["vectorized"],
    }
    if "plain_stacked" in med:
        result["ratios"].update({
            "plain_over_plain_stacked": med["plain"] / med["plain_stacked"],
            "vectorized_over_plain_stacked": med["vectorized"] / med["plain_stacked"]})
    else:
        result["sides"]["plain_stacked"] = f"not run: {spec['stacked_refused']}"
    if single:
        result["ratios"]["single_over_single_plain"] = med["single"] / med["single_plain"]
    ref = result["plain"]["final_val_ce_per_lam"]
    result["max_rel_diff_final_val_ce_vs_plain"] = {
        s: max(abs(result[s]["final_val_ce_per_lam"][k] - v) / abs(v) for k, v in ref.items())
        for s in sweep_sides if s != "plain"}
    result["env"] = process_env()
    return result


# -- start-up: python -m l2lab.train with the defaults against a plain script ------------------
def _harness_first_epoch(tmp: Path, env: dict) -> dict[str, float]:
    """``python -m l2lab.train`` with no overrides (the store from the environment, the cwd a
    fresh folder): seconds to its first epoch line, and to its end."""
    import re

    work = Path(tempfile.mkdtemp(dir=tmp, prefix="startup-"))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "l2lab.train"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = None
    for text in proc.stdout or ():
        if first is None and re.match(r"epoch\s+0\b", text):
            first = time.perf_counter() - t0
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"python -m l2lab.train failed ({proc.returncode}) in {work}")
    return {"first_epoch_s": first, "seconds": time.perf_counter() - t0}


def bench_startup(repeats: int) -> dict[str, Any]:
    """Time to the first epoch of ``python -m l2lab.train`` (defaults) against a plain script
    (``--child plain``: compose, load the data, train with ``l2lab.core.reference``) that trains
    the same job for one epoch, and both end to end (the default epochs), whole processes,
    interleaved in rotated order, into a SQLite store created beforehand."""
    from hydra import compose, initialize_config_dir

    from l2lab.base import CONF_DIR
    from l2lab.config import schema  # noqa: F401 (registers the config schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train")
    base = {"lams": [float(cfg.regularization.lam)], "seeds": [int(cfg.seed)],
            "device": "cuda" if _cuda(str(cfg.trainer.accelerator)) else "cpu"}
    plain_specs = {"plain_first_epoch": {**base, "overrides": ["trainer.max_epochs=1"]},
                   "plain": {**base, "overrides": []}}
    sides = ("harness", *plain_specs)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="l2lab-bench-startup-") as d:
        tmp = Path(d)
        env["MLFLOW_TRACKING_URI"] = _store(tmp, env)
        for r in range(repeats):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                res = _harness_first_epoch(tmp, env) if side == "harness" \
                    else _plain("plain", plain_specs[side], tmp, env)
                runs[side].append(res)
                print(f"l2lab.bench --startup: repeat {r} {side}: {res['seconds']:.2f} s",
                      file=sys.stderr, flush=True)
    med = {s: statistics.median(r["seconds"] for r in runs[s]) for s in sides}
    first = statistics.median(r["first_epoch_s"] for r in runs["harness"])
    return {"settings": {"epochs": int(cfg.trainer.max_epochs), "data": str(cfg.data.name),
                         "repeats": repeats},
            "sides": {"harness": "python -m l2lab.train (defaults), whole process; "
                                 "first_epoch_s: to its first epoch line",
                      "plain_first_epoch": "plain script (compose, data, l2lab.core.reference) "
                                           "training the same job for one epoch",
                      "plain": "the same plain script, the default epochs"},
            "harness": {"first_epoch_s": first, "median_s": med["harness"],
                        "times_s": [r["seconds"] for r in runs["harness"]],
                        "first_epoch_times_s": [r["first_epoch_s"] for r in runs["harness"]]},
            **{s: {"median_s": med[s], "times_s": [r["seconds"] for r in runs[s]]}
               for s in plain_specs},
            "startup_gap_s": first - med["plain_first_epoch"],
            "ratio_single_over_plain": med["harness"] / med["plain"],
            "env": process_env()}


# -- two factors: one stack against one stack per lr ------------------------------------------
TWO_FACTOR_LRS = "0.01,0.05"


def _summary(work: Path) -> dict[str, float]:
    """The sweep's summary.csv as {row without its numbers: mean final val/ce} (rows of runs
    that all failed have no mean: left out)."""
    import csv

    with open(work / "multirun" / "s" / "report" / "summary.csv") as f:
        reader = csv.DictReader(f)
        keys = reader.fieldnames[:reader.fieldnames.index("runs")]  # the row's condition, λ
        return {" ".join(f"{k}={r[k]}" for k in keys): float(r["val/ce_mean"]) for r in reader
                if r["val/ce_mean"]}


def _interleaved(label: str, sides: dict[str, Callable[[Path, str], list[str]]],
                 repeats: int, ok: tuple[int, ...] = (0,)) -> tuple[dict, dict]:
    """Whole sweeps side by side, the sides' order rotated each repeat, into one store made
    before any timing: ``sides`` maps a side to its command (from its work dir and the store's
    URI). Returns each side's seconds and its sweep's final val/ce per row (``_summary``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    names = list(sides)
    times: dict[str, list[float]] = {s: [] for s in names}
    finals: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="l2lab-bench-") as d:
        tmp = Path(d)
        store = _store(tmp, env)
        for r in range(repeats):
            shift = r % len(names)
            for side in names[shift:] + names[:shift]:
                work = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{side}-"))
                seconds, _ = _timed(sides[side](work, store), work, env, ok)
                times[side].append(seconds)
                finals[side] = _summary(work)
                print(f"l2lab.bench {label}: repeat {r} {side}: {seconds:.2f} s",
                      file=sys.stderr, flush=True)
    return times, finals


def bench_two_factor(repeats: int, overrides: list[str]) -> dict[str, Any]:
    """The default sweep's λ × seed grid crossed with learning rates (an ``optimizer.lr=a,b,…``
    override; default 0.01,0.05), two whole ``python -m l2lab.train -m`` processes side by side,
    interleaved: ``one_stack`` (every job in one stack: lr is a per-network setting) and
    ``per_lr`` (``hydra.launcher.max_models`` = the jobs of one lr: the stacks that grouping by
    lr gave before lr was stacked; jobs are ordered by their optimizer settings, so each stack
    holds one lr). Both must train the same numbers: each child equals its ordinary run."""
    lrs = next((o.partition("=")[2] for o in overrides if o.startswith("optimizer.lr=")),
               TWO_FACTOR_LRS)
    rest = [o for o in overrides if not o.startswith("optimizer.lr=")]
    spec = _spec(rest)
    per_lr = len(spec["lams"]) * len(spec["seeds"])
    extra = {"one_stack": [], "per_lr": [f"hydra.launcher.max_models={per_lr}"]}

    def command(side: str) -> Callable[[Path, str], list[str]]:
        return lambda work, store: [
            sys.executable, "-m", "l2lab.train", "-m", *spec["overrides"], f"optimizer.lr={lrs}",
            f"regularization.lam={','.join(map(str, spec['lams']))}",
            f"seed={','.join(map(str, spec['seeds']))}", *extra[side],
            f"hydra.sweep.dir={work}/multirun/s", f"tracking.uri={store}"]

    times, finals = _interleaved("--sweep --two-factor", {s: command(s) for s in extra}, repeats)
    med = {s: statistics.median(t) for s, t in times.items()}
    n_lrs = len(lrs.split(","))
    return {"settings": {**spec, "lrs": [float(v) for v in lrs.split(",")],
                         "jobs": per_lr * n_lrs, "repeats": repeats, "overrides": overrides},
            "sides": {"one_stack": f"python -m l2lab.train -m experiment=lambda_sweep with "
                                   f"{n_lrs} lr × {per_lr} jobs: one stack of {per_lr * n_lrs}",
                      "per_lr": f"the same with hydra.launcher.max_models={per_lr}: {n_lrs} "
                                f"stacks of {per_lr}, one per lr"},
            "seconds": times, "median_s": med,
            "ratio_per_lr_over_one_stack": med["per_lr"] / med["one_stack"],
            "same_final_val_ce": finals["one_stack"] == finals["per_lr"],
            "final_val_ce": finals["one_stack"],
            "env": process_env()}


WIDTHS = "[32,32],[64,64],[128,128]"


def bench_widths(repeats: int, overrides: list[str]) -> dict[str, Any]:
    """The default sweep's λ × seed grid crossed with MLP widths (a ``model.hidden=[a,a],…``
    override; default :data:`WIDTHS`), two whole ``python -m l2lab.train -m`` processes side by
    side, interleaved: ``one_stack`` (the widths zero-padded to the widest in one stack, as the
    2× rule, ``stackable.width_stacks``, allows for the default widths) and ``per_width``
    (``hydra.launcher.max_models`` = the jobs of one width: a stack is sorted by width, so each
    holds one width, the stacks a width sweep trained as before widths stacked). On CPU both
    train the same numbers: each child equals its ordinary run."""
    widths = next((o.partition("=")[2] for o in overrides if o.startswith("model.hidden=")),
                  WIDTHS)
    rest = [o for o in overrides if not o.startswith("model.hidden=")]
    spec = _spec(rest)
    per_width = len(spec["lams"]) * len(spec["seeds"])
    n_widths = widths.count("[")
    extra = {"one_stack": [], "per_width": [f"hydra.launcher.max_models={per_width}"]}

    def command(side: str) -> Callable[[Path, str], list[str]]:
        return lambda work, store: [
            sys.executable, "-m", "l2lab.train", "-m", *spec["overrides"],
            f"model.hidden={widths}", f"regularization.lam={','.join(map(str, spec['lams']))}",
            f"seed={','.join(map(str, spec['seeds']))}", *extra[side],
            f"hydra.sweep.dir={work}/multirun/s", f"tracking.uri={store}"]

    times, finals = _interleaved("--sweep --width-stack", {s: command(s) for s in extra}, repeats)
    med = {s: statistics.median(t) for s, t in times.items()}
    return {"settings": {**spec, "widths": widths, "jobs": per_width * n_widths,
                         "repeats": repeats, "overrides": overrides},
            "sides": {"one_stack": f"python -m l2lab.train -m experiment=lambda_sweep with "
                                   f"{n_widths} widths × {per_width} jobs: one padded stack",
                      "per_width": f"the same with hydra.launcher.max_models={per_width}: "
                                   f"{n_widths} stacks of {per_width}, one per width"},
            "seconds": times, "median_s": med,
            "ratio_per_width_over_one_stack": med["per_width"] / med["one_stack"],
            "same_final_val_ce": finals["one_stack"] == finals["per_width"],
            "final_val_ce": finals["one_stack"],
            "env": process_env()}


# -- dead networks: what a stack pays for them ------------------------------------------------
def _dying(n: int) -> list[float]:
    """n λ that diverge in the first epoch of the default sweep (1e8, 1e9, …)."""
    return [10.0 ** (8 + i) for i in range(n)]


def bench_dead(repeats: int, overrides: list[str]) -> dict[str, Any]:
    """What networks that diverge cost the stack they are in, three whole ``python -m
    l2lab.train -m`` processes side by side, interleaved: ``healthy`` (the sweep's λ × seed
    grid), ``dropped`` (the same grid and as many λ again that diverge in the first epoch: they
    leave the stack, ``L2Module.remove``) and ``kept`` (the same, with the diverged networks
    left in the stack as zeros, as before they were removed). The healthy runs must end with
    the same numbers on every side."""
    spec = _spec(overrides)
    dying = _dying(len(spec["lams"]))

    def command(side: str) -> Callable[[Path, str], list[str]]:
        def cmd(work: Path, store: str) -> list[str]:
            lams = spec["lams"] + (dying if side != "healthy" else [])
            args = ["-m", *spec["overrides"], f"regularization.lam={','.join(map(str, lams))}",
                    f"seed={','.join(map(str, spec['seeds']))}",
                    f"hydra.sweep.dir={work}/multirun/s", f"tracking.uri={store}"]
            return [sys.executable, "-m", "l2lab.train", *args] if side != "kept" else \
                [sys.executable, "-m", "l2lab.bench_sweep", "--child", "keep_dead",
                 json.dumps(args)]
        return cmd

    times, finals = _interleaved("--dead", {s: command(s) for s in ("healthy", "dropped", "kept")},
                                 repeats, ok=(0, 1))
    med = {s: statistics.median(t) for s, t in times.items()}
    healthy = len(spec["lams"]) * len(spec["seeds"])
    return {"settings": {**spec, "dying_lams": dying, "repeats": repeats,
                         "overrides": overrides},
            "sides": {"healthy": f"python -m l2lab.train -m experiment=lambda_sweep: "
                                 f"{healthy} networks",
                      "dropped": f"the same and {healthy} more that diverge in epoch 0 "
                                 f"(λ {dying[0]:g}…{dying[-1]:g}): they leave the stack",
                      "kept": "the same jobs as dropped, the diverged networks kept in the "
                              "stack as zeros (L2Module.drop_dead = False)"},
            "seconds": times, "median_s": med,
            "dead_cost_kept_over_healthy": med["kept"] / med["healthy"],
            "dead_cost_dropped_over_healthy": med["dropped"] / med["healthy"],
            "kept_over_dropped": med["kept"] / med["dropped"],
            "same_final_val_ce": finals["healthy"] == finals["dropped"] == finals["kept"],
            "final_val_ce": finals["healthy"],
            "env": process_env()}


def keep_dead_sweep(argv: list[str]) -> None:
    """``python -m l2lab.train ARGV`` in this process, diverged networks kept in their stack."""
    from l2lab.core.module import L2Module
    from l2lab.train import main as train_main

    L2Module.drop_dead = False
    sys.argv = ["l2lab.train", *argv]
    train_main()


# -- per-job cost ---------------------------------------------------------------------------------
PER_JOB = ["experiment=mnist1d_sweep", "data.train_size=500", "trainer.max_epochs=2"]
PER_JOB_SEEDS = 5
PLAIN_JOBS = 20


def _lams(n: int) -> list[float]:
    """n distinct λ, log-spaced over 1e-4..3 (0 first), as printed on a command line."""
    return [0.0] + [float(f"{1e-4 * (3e4 ** (i / max(n - 2, 1))):.6g}") for i in range(n - 1)]


def _scale_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _mnist1d(tmp: Path, env: dict) -> Path:
    """MNIST-1D's cache under ``tmp``, made outside the timings (a researcher's is there after
    one run)."""
    root = tmp / "data"
    subprocess.run([sys.executable, "-c", "from l2lab.core.data import load_data; load_data("
                    f"{{'name': 'mnist1d', 'root': {str(root)!r}, 'val_size': 500}})"],
                   env=env, check=True, capture_output=True)
    return root


def bench_per_job(sizes: tuple[int, int], overrides: list[str], repeats: int = 1
                  ) -> dict[str, Any]:
    """Whole-process time of an MNIST-1D sweep with tiny compute at two sizes M < N (λ × 5
    seeds, ``PER_JOB`` settings, vectorized launcher, one existing SQLite store); the
    bookkeeping per job is (T(N) − T(M)) / (N − M): what one more job costs."""
    env = _scale_env()
    out: dict[str, Any] = {"settings": {"overrides": [*PER_JOB, *overrides], "sizes": sizes,
                                        "seeds": PER_JOB_SEEDS, "repeats": repeats}}
    with tempfile.TemporaryDirectory(prefix="l2lab-bench-per-job-") as d:
        tmp = Path(d)
        store, root = _store(tmp, env), _mnist1d(tmp, env)
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for r in range(repeats):
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                lams = _lams(n // PER_JOB_SEEDS)
                work = Path(tempfile.mkdtemp(dir=tmp, prefix=f"n{n}-"))
                cmd = [sys.executable, "-m", "l2lab.train", "-m", *PER_JOB, *overrides,
                       f"data.root={root}", f"regularization.lam={','.join(map(str, lams))}",
                       f"seed={','.join(map(str, range(PER_JOB_SEEDS)))}",
                       f"hydra.sweep.dir={work}/multirun/s", f"tracking.uri={store}"]
                seconds, _ = _timed(cmd, work, env)
                times[n].append(seconds)
                print(f"l2lab.bench --per-job: repeat {r}, {n} jobs: {seconds:.2f} s",
                      file=sys.stderr, flush=True)
        # the compute of one job, side by side: the plain loop, in-process, the same config
        plain = []
        for _ in range(repeats):
            cmd = [sys.executable, "-m", "l2lab.bench_sweep", "--child", "plain_per_job",
                   json.dumps({"overrides": [*PER_JOB, *overrides, f"data.root={root}"],
                               "jobs": PLAIN_JOBS})]
            _, r = _timed(cmd, tmp, env)
            plain.append(json.loads(r.stdout.strip().splitlines()[-1])["s_per_job"])
    small, large = sizes
    med = {n: statistics.median(t) for n, t in times.items()}
    out["seconds"] = {str(n): t for n, t in times.items()}
    out["median_s"] = {str(n): v for n, v in med.items()}
    out["per_job_ms"] = 1000 * (med[large] - med[small]) / (large - small)
    out["plain_ms_per_job"] = 1000 * statistics.median(plain)
    out["plain_ms_per_job_each"] = [1000 * v for v in plain]
    out["bookkeeping_ms_per_job"] = out["per_job_ms"] - out["plain_ms_per_job"]
    out["notes"] = {
        "per_job_ms": "(T(N) - T(M)) / (N - M): what one more job adds to a whole sweep process "
                      "(vectorized launcher, one SQLite store), its compute included",
        "plain_ms_per_job": f"the plain loop (l2lab.core.reference) training {PLAIN_JOBS} "
                            "such jobs "
                            "one after another in one process: one job's compute without the "
                            "harness",
        "bookkeeping_ms_per_job": "per_job_ms - plain_ms_per_job: what the harness adds per job "
                                  "(negative: stacking saves more than the bookkeeping costs)"}
    out["env"] = process_env()
    return out


def bench_vs_run(n_lams: int, n_seeds: int, overrides: list[str], repeats: int = 1
                 ) -> dict[str, Any]:
    """Whole-process time of an MNIST-1D sweep of ``n_lams`` λ × ``n_seeds`` seeds
    (``experiment=mnist1d_sweep``, vectorized launcher) against one ordinary run of the same
    config (λ=1e-3, seed 0), interleaved, into one existing SQLite store: on a GPU the sweep's
    networks train as stacks, so the ratio says what the other jobs cost."""
    env = _scale_env()
    jobs = n_lams * n_seeds
    out: dict[str, Any] = {"settings": {"overrides": ["experiment=mnist1d_sweep", *overrides],
                                        "lams": n_lams, "seeds": n_seeds, "jobs": jobs,
                                        "repeats": repeats}}
    with tempfile.TemporaryDirectory(prefix="l2lab-bench-vs-run-") as d:
        tmp = Path(d)
        store, root = _store(tmp, env), _mnist1d(tmp, env)
        base = [sys.executable, "-m", "l2lab.train", "experiment=mnist1d_sweep", *overrides,
                f"data.root={root}", f"tracking.uri={store}"]
        lams = _lams(n_lams)
        times: dict[str, list[float]] = {"run": [], "sweep": []}
        for r in range(repeats):
            for side in (("run", "sweep") if r % 2 == 0 else ("sweep", "run")):
                work = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{side}-"))
                grid = [f"regularization.lam={','.join(map(str, lams))}",
                        f"seed={','.join(map(str, range(n_seeds)))}"]
                cmd = ([*base, "regularization.lam=1e-3", "seed=0", f"hydra.run.dir={work}/run"]
                       if side == "run" else
                       [*base[:3], "-m", *base[3:], *grid, f"hydra.sweep.dir={work}/multirun"])
                seconds, _ = _timed(cmd, work, env)
                times[side].append(seconds)
                print(f"l2lab.bench --vs-run: repeat {r}, {side}: {seconds:.2f} s",
                      file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out.update(seconds=times, median_s=med, ratio=med["sweep"] / med["run"],
               env=process_env(),
               notes={"run": "python -m l2lab.train experiment=mnist1d_sweep (one job), whole "
                             "process",
                      "sweep": f"python -m l2lab.train -m experiment=mnist1d_sweep with {n_lams} "
                               f"λ × {n_seeds} seeds, whole process",
                      "ratio": "sweep / run (medians)"})
    return out


_NOTES = {
    "vectorized": "python -m l2lab.train -m experiment=lambda_sweep (hydra/launcher=vectorized), "
                  "whole process, into an existing SQLite store",
    "basic": "the same sweep with hydra/launcher=basic (jobs one after another)",
    "plain": "plain PyTorch script: the same jobs one after another, no logging, whole process "
             "(on the device the harness uses)",
    "plain_stacked": "plain torch.func stacked loop (stack_module_state + vmap) over the same "
                     "jobs, whole process",
    "single": "python -m l2lab.train, one ordinary run (all 840 training examples, 30 epochs, "
              "batch 64, λ=1e-3, seed 0)",
    "single_plain": "plain PyTorch script, the same single job",
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="l2lab-bench --sweep", description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=("plain", "plain_stacked", "plain_per_job", "keep_dead"),
                   help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    if args.child == "keep_dead":
        keep_dead_sweep(spec)
        return
    child = {"plain": plain_loop, "plain_stacked": plain_stacked_loop,
             "plain_per_job": plain_per_job}[args.child]
    print(json.dumps(child(spec)))


if __name__ == "__main__":
    main()

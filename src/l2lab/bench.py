"""``python -m l2lab.bench``: the harness against a hand-written PyTorch loop, same training.

Why: the harness wraps a twenty-line training loop in Lightning, per-epoch MLflow logging and a
per-epoch checkpoint. This measures what that costs, in one process, on the same composed config,
the same data tensors on the same device, the same initial weights and the same batches, and it
checks that both sides end with the same weights, so that the times compare like with like.

Sides (interleaved, order rotated per repeat, each warmed up once with one epoch, untimed):

- ``harness``: ``engine.build_member`` + ``engine.lightning_fit`` with a real ``RunTracker`` on
  a temporary SQLite store, i.e. Lightning + per-epoch metrics to MLflow + per-epoch
  ``last.ckpt``. Creating and ending the MLflow run and loading the data are outside the timed
  region (once per run, not per epoch; the same for any loop).
- ``harness_no_mlflow``: the same with a tracker that drops metrics (Lightning + checkpoint), so
  that the MLflow share of the overhead can be read off.
- ``plain``: ``l2lab.core.reference.train``, the hand-written loop: seed, build
  net/penalty/optimizer, then ``for epoch: for x, y in batches: step`` and a validation pass at
  each epoch end.

Prints one JSON object on stdout (anything else the libraries print goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from l2lab.base import CONF_DIR, ConfigError, last_checkpoint
from l2lab.core import reference
from l2lab.core.data import Splits, load_data
from l2lab.core.stacked import unstack_into
from l2lab.run import engine
from l2lab.run.recorder import Recorder
from l2lab.tracking import tracker as tr

SIDES = ("harness", "harness_no_mlflow", "plain")
AGREE_RTOL = 1e-5
SIDE_NOTES = {
    "harness": "engine (a stack of one): Lightning, per-epoch MLflow metrics (SQLite) and "
               "last.ckpt; run creation/end and data loading not timed",
    "harness_no_mlflow": "the same with metrics dropped (Lightning + per-epoch last.ckpt)",
    "plain": "hand-written loop: same net init, batches, penalty, optimizer; val each epoch",
}

Metrics = dict[str, float]


# -- the two sides ---------------------------------------------------------------------------
def run_harness(cfg: DictConfig, splits: Splits, tracker: Any,
                out_dir: Path) -> tuple[torch.nn.Module, Metrics]:
    """What ``train.train`` does between loading the data and ending the run: a stack of one
    through the engine, with the recorder writing metrics and ``last.ckpt``."""
    member = engine.build_member(cfg, splits)
    module = engine.stack(cfg, [member])
    recorder = Recorder([tracker], [last_checkpoint(out_dir)],
                        flush_every_s=engine.flush_every_s(cfg))
    engine.lightning_fit(cfg, module, splits, recorder, [int(cfg.seed)], out_dir)
    unstack_into(module, [member.net])
    return member.net, dict(recorder.last[0][1])


def run_plain(cfg: DictConfig, splits: Splits,
              device: torch.device) -> tuple[torch.nn.Module, Metrics]:
    """The loop a researcher would write by hand (``l2lab.core.reference``)."""
    net, history = reference.train(cfg, splits, device)
    return net, history[-1]


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux), so each run's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mib(field: str) -> float | None:
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def _peak_rss_mib(per_run: bool) -> float:
    if per_run and (hwm := _proc_status_mib("VmHWM")) is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, float]]:
    """Run ``fn`` once: wall seconds (device synchronised), peak RSS, peak CUDA memory."""
    gc.collect()
    per_run = _reset_peak_rss()
    before = _proc_status_mib("VmRSS") if per_run else None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    stats = {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib(per_run)}
    if before is not None:  # what the run itself added on top of the process
        stats["rss_growth_mib"] = stats["peak_rss_mib"] - before
    if cuda:
        stats["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out, stats


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def agreement(nets: dict[str, torch.nn.Module], finals: dict[str, Metrics]) -> dict[str, Any]:
    """Largest relative difference of each harness side from the plain loop (weights, val/ce)."""
    ref, ref_sd = finals["plain"], nets["plain"].state_dict()
    out: dict[str, Any] = {}
    for side in SIDES[:-1]:
        sd = nets[side].state_dict()
        w = max(_rel_diff(sd[k], ref_sd[k]) for k in ref_sd)
        key = "val/ce" if "val/ce" in ref else "train/ce"
        m = abs(finals[side][key] - ref[key]) / max(abs(ref[key]), 1e-12)
        out[side] = {"max_weight_rel_diff": w, f"{key.replace('/', '_')}_rel_diff": m}
    out["same_result"] = all(v <= AGREE_RTOL for d in out.values() for v in d.values())
    return out


# -- the command -----------------------------------------------------------------------------
def weights_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest relative difference of two networks' floating-point tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return max(_rel_diff(sa[k], sb[k]) for k in sb if sb[k].is_floating_point())


def bench_resnet(args: argparse.Namespace) -> dict[str, Any]:
    """``--resnet``: ResNet-18 on CIFAR-shaped synthetic tensors, harness against a plain loop
    and a stack against the same networks in turn (``l2lab.bench_resnet``), as one JSON-ready
    dict."""
    from l2lab.bench_resnet import IMAGE, LAMS, fit_stack, overrides, run_plain, synthetic, timed
    from l2lab.core.rules import effective_precision

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    precision = str(effective_precision(args.precision, cuda))
    epochs, bs, n, k = args.epochs, args.batch_size, args.train_size, args.stack
    splits = synthetic(n)
    steps = epochs * -(-n // bs)
    ov = overrides(bs, epochs, precision, device)
    cfg, warm = compose_cfg(ov), compose_cfg(overrides(bs, 1, precision, device))
    warm_splits = synthetic(min(n, 2 * bs), seed=1)
    grid = [compose_cfg(overrides(bs, epochs, "32-true", device, lam)) for lam in LAMS[:k]]
    result: dict[str, Any] = {
        "settings": {"case": "resnet18", "image_shape": list(IMAGE), "train_size": n,
                     "batch_size": bs, "epochs": epochs, "steps_per_epoch": steps // epochs,
                     "precision": precision, "channels_last": cuda, "stack_k": k,
                     "stack_lams": list(LAMS[:k]), "repeats": args.repeats,
                     "device": str(device)},
        "overrides": ov,
        "sides": {"harness": "engine (a stack of one): Lightning, per-epoch MLflow metrics "
                             "(SQLite) and last.ckpt",
                  "plain": "hand-written loop: same tensors, order, init, SGD Nesterov, "
                           "per-step cosine, L2 in the loss, autocast as the harness",
                  "stack": f"{k} networks (the λ grid) as one stack through the harness, 32-bit",
                  "sequential": f"the same {k} trained one after another through the harness"},
    }
    with tempfile.TemporaryDirectory(prefix="l2lab-bench-resnet-") as tmp:
        uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
        client = tr.connect(uri)
        exp = tr.experiment_id(client, "l2lab-bench-resnet", uri)
        writer = engine.writer_for(uri, client)  # the store's writer, as train's runs have

        def harness(c: DictConfig, s: Splits, tag: str) -> tuple[Any, dict[str, float]]:
            tracker = tr.RunTracker.start(writer, exp, f"bench resnet {tag}", {})
            try:
                return measure(lambda: run_harness(c, s, tracker, Path(tmp) / tag), device)
            finally:
                tracker.finish("FINISHED")

        def sequential(cfgs: list[DictConfig], s: Splits, tag: str) -> list[torch.nn.Module]:
            return [run_harness(c, s, tr.NullTracker(), Path(tmp) / f"{tag}{i}")[0]
                    for i, c in enumerate(cfgs)]

        harness(warm, warm_splits, "warm")  # untimed
        run_plain(warm, warm_splits, device)
        times: dict[str, list[dict[str, float]]] = {"harness": [], "plain": []}
        for r in range(args.repeats):
            (h_net, h_m), h = harness(cfg, splits, f"h{r}")
            (p_net, p_m), p = measure(lambda: run_plain(cfg, splits, device), device)
            times["harness"].append(h)
            times["plain"].append(p)
        result["harness"] = {**timed(times["harness"], steps, n * epochs),
                             "final_train_ce": h_m["train/ce"]}
        result["plain"] = {**timed(times["plain"], steps, n * epochs),
                           "final_train_ce": p_m["train/ce"]}
        result["ratio_harness_over_plain"] = result["harness"]["min_s"] / result["plain"]["min_s"]
        result["agreement"] = {"max_weight_rel_diff": weights_rel_diff(h_net, p_net),
                               "train_ce_rel_diff": abs(h_m["train/ce"] - p_m["train/ce"])
                               / max(abs(p_m["train/ce"]), 1e-12)}

        # untimed: the stacked kernels' first call
        fit_stack(grid[:2], warm_splits, Path(tmp) / "warm-stack")
        runs = {"stack": [], "sequential": []}
        for r in range(args.repeats):
            stacked, st = measure(lambda r=r: fit_stack(grid, splits, Path(tmp) / f"s{r}"), device)
            alone, sq = measure(lambda r=r: sequential(grid, splits, f"q{r}"), device)
            runs["stack"].append(st)
            runs["sequential"].append(sq)
        for side in runs:
            result[side] = timed(runs[side], k * steps, k * n * epochs)
        result["ratio_sequential_over_stack"] = \
            result["sequential"]["min_s"] / result["stack"]["min_s"]
        result["stack_agreement"] = {"max_weight_rel_diff": max(
            weights_rel_diff(a, b) for a, b in zip(stacked, alone, strict=True))}
    result["env"] = environment(device)
    return result


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("l2lab.bench: --device cuda, but CUDA is not available.")
    return torch.device(name)


def overrides_for(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The config both sides train: digits, MLP, L2 λ=1e-3 in the loss, SGD."""
    ov = ["data=digits", "model=mlp", "regularization=l2", "regularization.lam=1e-3",
          "regularization.mode=loss", "optimizer=sgd", f"model.hidden=[{args.hidden}]",
          f"data.batch_size={args.batch_size}", f"trainer.max_epochs={args.epochs}",
          f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "trainer.devices=1",
          "seed=0"]
    # null: all 840 (the pool less val and the test split; the preset's own default is 200)
    ov.append(f"data.train_size={'null' if args.train_size is None else args.train_size}")
    return ov


def compose_cfg(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def environment(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) \
            if cpuinfo.exists() else None
        name = found.group(1).strip() if found else (platform.processor() or platform.machine())
    import mlflow

    from l2lab.tracking.environment import cpu_capability

    return {"python": platform.python_version(), "torch": torch.__version__,
            "lightning": pl.__version__, "mlflow": mlflow.__version__, "device": str(device),
            "device_name": name, "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None,
            "torch_threads": torch.get_num_threads(), "cpu_capability": cpu_capability(),
            "platform": platform.platform(),
            "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _summary(runs: list[dict[str, float]], epochs: int, steps: int) -> dict[str, Any]:
    secs = [r["seconds"] for r in runs]
    med = statistics.median(secs)
    out: dict[str, Any] = {
        "median_s": med, "min_s": min(secs), "s_per_epoch": med / epochs,
        "steps_per_s": steps * epochs / med, "times_s": secs,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }
    if "rss_growth_mib" in runs[0]:
        out["rss_growth_mib"] = max(r["rss_growth_mib"] for r in runs)
    if "cuda_max_allocated_mib" in runs[0]:
        out["cuda_max_allocated_mib"] = max(r["cuda_max_allocated_mib"] for r in runs)
    return out


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args.device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    per_run_rss = _reset_peak_rss()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = overrides_for(args, device)
    cfg = compose_cfg(overrides)
    warm = cfg.copy()
    with open_dict(warm):
        warm.trainer.max_epochs = 1
    splits = load_data(cfg.data).to(device)
    epochs, steps = int(cfg.trainer.max_epochs), len(splits.train[1])
    steps = (steps + int(cfg.data.batch_size) - 1) // int(cfg.data.batch_size)

    with tempfile.TemporaryDirectory(prefix="l2lab-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
        client = tr.connect(uri)
        exp = tr.experiment_id(client, "l2lab-bench", uri)
        writer = engine.writer_for(uri, client)  # the store's writer, as train's runs have
        store_writer = writer.backend

        def once(side: str, c: DictConfig, tag: str) -> tuple[Any, dict[str, float]]:
            out_dir = Path(tmp) / f"{side}-{tag}"
            if side == "plain":
                return measure(lambda: run_plain(c, splits, device), device)
            if side == "harness_no_mlflow":
                return measure(lambda: run_harness(c, splits, tr.NullTracker(), out_dir), device)
            tracker = tr.RunTracker.start(writer, exp, f"bench {tag}", {})
            try:
                return measure(lambda: run_harness(c, splits, tracker, out_dir), device)
            finally:
                tracker.finish("FINISHED")

        for side in SIDES:  # imports, lazy initialisation, the SQLite schema: not timed
            once(side, warm, "warmup")
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
        last: dict[str, tuple[torch.nn.Module, Metrics]] = {}
        for r in range(args.repeats):
            for side in SIDES[r % 3:] + SIDES[:r % 3]:  # rotated: no side always goes first
                last[side], stats = once(side, cfg, str(r))
                runs[side].append(stats)
                print(f"l2lab.bench: repeat {r} {side}: {stats['seconds']:.3f} s",
                      file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "settings": {"epochs": epochs, "train_size": len(splits.train[1]),
                     "val_size": len(splits.val[1]), "batch_size": int(cfg.data.batch_size),
                     "hidden": list(cfg.model.hidden), "steps_per_epoch": steps,
                     "repeats": args.repeats, "device": str(device)},
        "overrides": overrides,
        "sides": SIDE_NOTES,
        # the harness's metrics go through the writer train's runs get on this store
        "store_writer": store_writer,
    }
    for side in SIDES:
        result[side] = _summary(runs[side], epochs, steps)
        result[side]["final_train_ce"] = last[side][1]["train/ce"]
        if "val/ce" in last[side][1]:
            result[side]["final_val_ce"] = last[side][1]["val/ce"]
    plain = result["plain"]["median_s"]
    result["ratio_harness_over_plain"] = result["harness"]["median_s"] / plain
    result["ratio_harness_no_mlflow_over_plain"] = result["harness_no_mlflow"]["median_s"] / plain
    # min/min: on a busy machine the least-disturbed runs; closer to the intrinsic cost
    result["ratio_harness_over_plain_min"] = result["harness"]["min_s"] / result["plain"]["min_s"]
    agree = agreement({s: last[s][0] for s in SIDES}, {s: last[s][1] for s in SIDES})
    result["same_result"] = agree.pop("same_result")
    result["agreement"] = agree
    result["peak_rss"] = "per run: Linux VmHWM reset before each run; rss_growth_mib is the peak " \
        "above the RSS at its start" if per_run_rss else \
        "process high-water mark (getrusage ru_maxrss), not per side"
    result["env"] = environment(device)
    result["env"]["load_avg_1m_at_start"] = load_before  # other work on the machine: noise
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="l2lab-bench", description="Time the harness against a plain PyTorch loop "
        "doing the same training (digits, MLP, L2 λ=1e-3, SGD); prints one JSON object.")
    p.add_argument("--epochs", type=int, default=None, help="default 20; 1 with --resnet")
    p.add_argument("--train-size", type=int, default=None,
                   help="training examples (default: all the digits split leaves, 840; with "
                   "--resnet 45000, a CIFAR-10 epoch less its validation split)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64; 128 with --resnet")
    p.add_argument("--hidden", default="256,256", help="MLP widths, comma-separated")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per side, interleaved, after one untimed 1-epoch warm-up "
                   "(default 7; 3 with --sweep)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; 1 steadies a busy machine)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--sweep", action="store_true",
                   help="instead: the default λ sweep through the vectorized and the basic "
                   "launcher, a plain loop and a plain stacked loop, as whole processes "
                   "(--repeats defaults to 3 there; overrides after --)")
    p.add_argument("--startup", action="store_true",
                   help="instead: seconds to the first epoch of python -m l2lab.train (defaults) "
                   "against a plain script training the same job, and both end to end, whole "
                   "processes (--repeats defaults to 3 there)")
    p.add_argument("--two-factor", action="store_true",
                   help="with --sweep: the λ × seed grid crossed with learning rates "
                   "(optimizer.lr=a,b after --; default 0.01,0.05) as one stack against one "
                   "stack per lr, whole processes")
    p.add_argument("--width-stack", action="store_true",
                   help="with --sweep: the λ × seed grid crossed with MLP widths "
                   "(model.hidden=[a,a],[b,b] after --; default [32,32],[64,64],[128,128]) as "
                   "one padded stack against one stack per width, whole processes")
    p.add_argument("--dead", action="store_true",
                   help="instead: what networks that diverge cost their stack: the default "
                   "sweep alone, with as many diverging jobs again (removed from the stack), "
                   "and with them kept in it, whole processes (overrides after --)")
    p.add_argument("--per-job", nargs=2, type=int, metavar=("M", "N"), default=None,
                   help="instead: the bookkeeping cost per job, (T(N) - T(M)) / (N - M), from "
                   "whole MNIST-1D sweeps of M and N jobs with tiny compute (e.g. 20 500)")
    p.add_argument("--vs-run", nargs=2, type=int, metavar=("LAMS", "SEEDS"), default=None,
                   help="instead: a whole MNIST-1D sweep of LAMS λ × SEEDS seeds against one "
                   "ordinary run of the same config, and their ratio (e.g. 100 5 on a GPU)")
    p.add_argument("--double-descent", action="store_true",
                   help="instead: experiment=mnist1d_double_descent over a reduced grid "
                   "(--widths × --lams × --epochs, one seed, the noisy arm) against the MNIST-1D "
                   "notebook's plain loop (one network after another), whole processes")
    p.add_argument("--widths", default="2,12,61,300",
                   help="with --double-descent: the MLP widths h of 40-h-h-10, comma-separated")
    p.add_argument("--lams", default="0,0.1",
                   help="with --double-descent: the λ, comma-separated (one curve each)")
    p.add_argument("--resnet", action="store_true",
                   help="instead: ResNet-18 on CIFAR-shaped synthetic tensors "
                   "(experiment=cifar10_resnet18's recipe): one epoch of the harness against a "
                   "plain loop on the same data path, and --stack networks as one stack against "
                   "one after another (l2lab.bench_resnet)")
    p.add_argument("--stack", type=int, default=8, help="with --resnet: networks stacked (8)")
    p.add_argument("--precision", default="bf16-mixed",
                   help="with --resnet: trainer.precision of the harness/plain comparison "
                   "(bf16-mixed, the preset's; it applies on CUDA only, 32-true elsewhere)")
    p.add_argument("overrides", nargs="*",
                   help="with --sweep, --dead, --per-job, --vs-run or --double-descent: Hydra "
                   "overrides for every run")
    args = p.parse_args(argv)
    try:
        widths = [int(h) for h in args.hidden.split(",") if h.strip()]
    except ValueError:
        p.error(f"--hidden must be comma-separated integers, got {args.hidden!r}")
    if not widths or min(widths) < 1:
        p.error(f"--hidden must be comma-separated integers >= 1, got {args.hidden!r}")
    args.epochs = (1 if args.resnet else 20) if args.epochs is None else args.epochs
    args.batch_size = (128 if args.resnet else 64) if args.batch_size is None else args.batch_size
    if args.resnet and args.train_size is None:
        args.train_size = 45_000
    if min(args.epochs, args.repeats or 1, args.batch_size, args.threads or 1,
           args.stack, args.train_size or 1) < 1:
        p.error("--epochs, --repeats, --batch-size, --train-size, --threads and --stack must "
                "be >= 1")
    if args.resnet and args.stack > 8:
        p.error("--stack is at most 8 (bench_resnet.LAMS)")
    args.hidden = ",".join(map(str, widths))
    try:
        args.widths = [int(h) for h in args.widths.split(",") if h.strip()]
        args.lams = [float(x) for x in args.lams.split(",") if x.strip()]
    except ValueError:
        p.error(f"--widths takes integers and --lams numbers, comma-separated; got "
                f"{args.widths!r}, {args.lams!r}")
    if not args.widths or min(args.widths) < 1 or not args.lams or min(args.lams) < 0:
        p.error("--widths needs integers >= 1 and --lams numbers >= 0")
    if args.per_job and not (5 <= args.per_job[0] < args.per_job[1]):
        p.error("--per-job M N needs 5 <= M < N (jobs are λ × 5 seeds)")
    if (args.two_factor or args.width_stack) and not args.sweep:
        p.error("--two-factor and --width-stack go with --sweep")
    if args.vs_run and min(args.vs_run) < 1:
        p.error("--vs-run LAMS SEEDS needs LAMS, SEEDS >= 1")
    args.repeats = args.repeats or (3 if args.sweep or args.dead or args.startup
                                    else 1 if args.per_job or args.vs_run
                                    or args.double_descent or args.resnet else 7)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if args.resnet:
                result = bench_resnet(args)
            elif args.double_descent:
                from l2lab.bench_dd import bench_double_descent

                result = bench_double_descent(args.widths, args.lams, args.epochs,
                                              args.repeats, list(args.overrides))
            elif args.vs_run:
                from l2lab.bench_sweep import bench_vs_run

                result = bench_vs_run(*args.vs_run, list(args.overrides), args.repeats)
            elif args.dead:
                from l2lab.bench_sweep import bench_dead

                result = bench_dead(args.repeats, list(args.overrides))
            elif args.per_job:
                from l2lab.bench_sweep import bench_per_job

                result = bench_per_job(tuple(args.per_job), list(args.overrides), args.repeats)
            elif args.sweep and args.width_stack:
                from l2lab.bench_sweep import bench_widths

                result = bench_widths(args.repeats, list(args.overrides))
            elif args.startup:
                from l2lab.bench_sweep import bench_startup

                result = bench_startup(args.repeats)
            elif args.sweep and args.two_factor:
                from l2lab.bench_sweep import bench_two_factor

                result = bench_two_factor(args.repeats, list(args.overrides))
            elif args.sweep:
                from l2lab.bench_sweep import bench_sweep

                result = bench_sweep(args.repeats, list(args.overrides))
            else:
                result = bench(args)
        except ConfigError as e:
            print(f"l2lab.bench: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text, file=stdout, flush=True)


if __name__ == "__main__":
    main()

"""``python -m l2lab.bench --double-descent``: the double-descent preset against the notebook.

Why: the MNIST-1D repository's ``notebooks/deep-double-descent.ipynb`` trains one curve (one λ,
here none) over the widths with a plain loop, one network after another; issue 32 asks what the
harness's ``experiment=mnist1d_double_descent`` costs against it on the same machine. Two sides,
each a whole process (start-up, imports and data included, as a user waits for them), interleaved
and in rotated order, on a reduced grid (``--widths``, ``--lams``, ``--epochs``; one seed, the
noisy arm):

- ``harness``: ``python -m l2lab.train -m experiment=mnist1d_double_descent`` with that grid
  (vectorized launcher: the λ of one width are one stack), into an existing SQLite store;
- ``notebook``: the notebook's loop written out plainly: per λ (one curve), per width, one after
  another, an MLP 40-h-h-10 (ReLU), SGD lr 0.01 momentum 0.9, batch 100, shuffled each epoch,
  cross-entropy plus the note's L2 term (λ/n)·Σ‖W‖² over the weights (no biases), on the same
  composed data (the same noisy training labels, the clean test split).

Both report the optimizer steps they took (the harness: epochs read back from the store × the
batches per epoch; the notebook: counted) and each network's final test error, so that the
times are seen to be for the same amount of training. Prints one JSON object (``bench.main``).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

PRESET = "experiment=mnist1d_double_descent"
NOTES = {
    "harness": f"python -m l2lab.train -m {PRESET} over the grid (one seed, noisy arm), "
               "vectorized launcher, whole process, into an existing SQLite store",
    "notebook": "the notebook's plain loop: one network after another (per λ a curve over the "
                "widths), MLP 40-h-h-10, SGD lr 0.01 momentum 0.9, batch 100, no logging, "
                "whole process",
    "steps": "optimizer steps over all networks; the harness's from the epochs each child run "
             "logged × the batches per epoch",
    "ratio": "harness / notebook (medians)",
}


def grid_overrides(spec: dict) -> list[str]:
    """The preset's sweep cut to the grid: what both sides compose (the harness sweeps it)."""
    return [PRESET, *spec["overrides"], f"trainer.max_epochs={spec['epochs']}",
            f"seed={spec['seed']}", f"data.label_noise={spec['label_noise']}",
            f"data.root={spec['root']}"]


def compose_job(spec: dict, width: int, lam: float):
    from hydra import compose, initialize_config_dir

    from l2lab.base import CONF_DIR
    from l2lab.config import schema  # noqa: F401 (registers the config schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*grid_overrides(spec), f"model.hidden=[{width},{width}]",
                                           f"regularization.lam={lam}"])


def notebook_loop(spec: dict) -> dict[str, Any]:
    """The notebook's training, plainly: for each λ, for each width, a fresh MLP trained for
    ``epochs`` epochs; returns the steps taken and each network's final test and train error."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from l2lab.core.data import load_data

    cfg = compose_job(spec, spec["widths"][0], spec["lams"][0])
    splits = load_data(cfg.data)  # the same split and noisy labels as every job of the sweep
    x, y = splits.train[0].flatten(1), splits.train[1]
    x_test, y_test = splits.test[0].flatten(1), splits.test[1]
    lr, momentum = float(cfg.optimizer.lr), float(cfg.optimizer.momentum)
    bs, n = int(cfg.data.batch_size), len(y)
    steps, test_err, train_err = 0, {}, {}
    for lam in spec["lams"]:
        for h in spec["widths"]:
            torch.manual_seed(spec["seed"])
            net = nn.Sequential(nn.Linear(x.shape[1], h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                nn.Linear(h, int(splits.num_classes)))
            weights = [m.weight for m in net if isinstance(m, nn.Linear)]
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
            for _ in range(spec["epochs"]):
                for idx in torch.randperm(n).split(bs):
                    loss = F.cross_entropy(net(x[idx]), y[idx])
                    if lam:
                        loss = loss + lam / len(idx) * sum(w.pow(2).sum() for w in weights)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    steps += 1
            with torch.no_grad():
                key = f"{lam:g}/{h}"
                test_err[key] = 1 - (net(x_test).argmax(1) == y_test).float().mean().item()
                train_err[key] = 1 - (net(x).argmax(1) == y).float().mean().item()
    return {"steps": steps, "networks": len(test_err), "test_error": test_err,
            "train_error": train_err}


def _harness(spec: dict, tmp: Path, store: str, env: dict) -> dict[str, Any]:
    from l2lab.bench_sweep import _timed

    work = Path(tempfile.mkdtemp(dir=tmp, prefix="harness-"))
    cmd = [sys.executable, "-m", "l2lab.train", "-m", *grid_overrides(spec),
           "model.hidden=" + ",".join(f"[{h},{h}]" for h in spec["widths"]),
           "regularization.lam=" + ",".join(f"{lam:g}" for lam in spec["lams"]),
           f"hydra.sweep.dir={work}/multirun/{work.name}", f"tracking.uri={store}"]
    seconds, _ = _timed(cmd, work, env)  # the sweep's id: its folder's name, unique per repeat
    return {"seconds": seconds, **_read_back(store, work.name, spec)}


def _read_back(store: str, sweep_id: str, spec: dict) -> dict[str, Any]:
    """The sweep's children from the store: the epochs each trained (its train/ce history),
    turned into steps with the batches per epoch, and its final test error."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(
        exps, filter_string=f"tags.`l2lab.sweep_id` = '{sweep_id}'", max_results=5000)
        if r.data.tags.get("l2lab.role") != "sweep"]
    batches = math.ceil(spec["n_train"] / spec["batch_size"])
    steps, test_err = 0, {}
    for r in runs:
        epochs = len(client.get_metric_history(r.info.run_id, "train/ce"))
        steps += epochs * batches
        width = json.loads(r.data.params.get("model.hidden", "[0]"))[0]
        lam = float(r.data.params.get("regularization.lam", "nan"))
        test_err[f"{lam:g}/{width}"] = 1 - r.data.metrics.get("test/acc", math.nan)
    return {"steps": steps, "networks": len(runs), "test_error": test_err}


def _notebook(spec: dict, tmp: Path, env: dict) -> dict[str, Any]:
    from l2lab.bench_sweep import _timed

    cmd = [sys.executable, "-m", "l2lab.bench_dd", json.dumps(spec)]
    seconds, r = _timed(cmd, tmp, env)
    return {"seconds": seconds, **json.loads(r.stdout.strip().splitlines()[-1])}


def bench_double_descent(widths: list[int], lams: list[float], epochs: int, repeats: int,
                         overrides: list[str]) -> dict[str, Any]:
    """Time both sides ``repeats`` times, interleaved, on one machine; their steps, networks
    and test errors side by side, and the ratio of the medians."""
    from l2lab.bench_sweep import _scale_env, _store, process_env
    from l2lab.core.data import load_data

    env = _scale_env()
    with tempfile.TemporaryDirectory(prefix="l2lab-bench-dd-") as d:
        tmp = Path(d)
        spec: dict[str, Any] = {"widths": widths, "lams": lams, "epochs": epochs, "seed": 0,
                                "label_noise": 0.15, "overrides": overrides,
                                "root": str(tmp / "data")}
        cfg = compose_job(spec, widths[0], lams[0])
        splits = load_data(cfg.data)  # generates the data's cache outside the timings
        spec.update(n_train=len(splits.train[1]), batch_size=int(cfg.data.batch_size))
        store = _store(tmp, env)
        runs: dict[str, list[dict]] = {"harness": [], "notebook": []}
        for r in range(repeats):
            for side in (("harness", "notebook") if r % 2 == 0 else ("notebook", "harness")):
                res = (_harness(spec, tmp, store, env) if side == "harness"
                       else _notebook(spec, tmp, env))
                runs[side].append(res)
                print(f"l2lab.bench --double-descent: repeat {r} {side}: {res['seconds']:.2f} s",
                      file=sys.stderr, flush=True)
    out: dict[str, Any] = {"settings": {**{k: v for k, v in spec.items() if k != "root"},
                                        "networks": len(widths) * len(lams),
                                        "repeats": repeats, "preset": PRESET},
                           "notes": NOTES}
    for side, res in runs.items():
        secs = [x["seconds"] for x in res]
        last = res[-1]
        out[side] = {"median_s": statistics.median(secs), "times_s": secs,
                     "steps": last["steps"], "networks": last["networks"],
                     "test_error": dict(sorted(last["test_error"].items()))}
    out["ratio"] = out["harness"]["median_s"] / out["notebook"]["median_s"]
    out["env"] = process_env()
    return out


if __name__ == "__main__":  # the notebook side's child process
    print(json.dumps(notebook_loop(json.loads(sys.argv[1]))))

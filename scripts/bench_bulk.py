"""Store round trips and wall time of one stack's record: the group writer (its ``sqlite3`` and
its MLflow ORM backends) vs the public client.

K runs are created, get ~30 params and 3 tags, have E epochs x 14 metrics flushed one epoch at a
time (the worst case: live curves), and are finished -- once through ``RunWriter`` and once
through ``MlflowClient`` one run at a time, into fresh SQLite stores, side by side in one
process. Round trips are counted on the SQLAlchemy engine (transactions committed, statements
sent), and for the ``sqlite3`` backend by the writer (its transactions); CPU time is given
too, as wall time on a shared machine depends on its load.

    PYTHONPATH=src python scripts/bench_bulk.py [--runs 100] [--epochs 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _get_store
from sqlalchemy import event

from l2lab.compat import mlflow_sqlite as cs
from l2lab.tracking import bulk as gs
from l2lab.tracking import tracker as tr

KEYS = ["train/loss", "train/ce", "train/l2", "train/acc", "val/ce", "val/acc", "gap/ce",
        "gap/acc", "weights/sq_norm/fc1", "weights/sq_norm/fc2", "weights/sq_norm/out",
        "weights/sq_norm_total", "lr", "epoch_time"]


def params_of(k: int) -> dict[str, str]:
    return {**{f"group.p{i}": str(i) for i in range(28)}, "regularization.lam": f"{k * 1e-3:g}",
            "seed": str(k % 5)}


def metrics_of(k: int, e: int) -> dict[str, float]:
    return {key: (k + 1) * 0.001 + e + i * 0.01 for i, key in enumerate(KEYS)}


def by_group(uri: str, exp: str, runs: int, epochs: int, counts: dict, backend: str) -> None:
    real = cs.writable
    if backend == "sql":  # the sqlite3 writer declined: MLflow's ORM tables
        cs.writable = lambda db: "bench: the ORM writer"
    try:
        w = gs.open_writer(uri)
    finally:
        cs.writable = real
    assert w.backend == backend, w.why
    ids = w.create_runs(exp, [f"lam={k}" for k in range(runs)],
                        [{"l2lab.sweep_id": "bench", "l2lab.vectorized_group": "g"}] * runs)
    w.log_params({r: params_of(k) for k, r in enumerate(ids)},
                 {r: {"l2lab.overrides": f"lam={k}"} for k, r in enumerate(ids)})
    for e in range(epochs):
        now = int(time.time() * 1000)
        w.log_metrics({r: [(e, metrics_of(k, e), now)] for k, r in enumerate(ids)})
    w.finish({r: ("FINISHED", None) for r in ids})
    if backend == "sqlite":  # sqlite3 has no count of executemany calls: transactions only
        counts["transactions"], counts["statements"] = w.round_trips, None


def by_client(uri: str, exp: str, runs: int, epochs: int, counts: dict) -> None:
    c = MlflowClient(uri)
    ids = [c.create_run(exp, run_name=f"lam={k}", tags={
        "l2lab.sweep_id": "bench", "l2lab.vectorized_group": "g"}).info.run_id
        for k in range(runs)]
    for k, r in enumerate(ids):
        c.log_batch(r, params=[Param(a, b) for a, b in params_of(k).items()],
                    tags=[RunTag("l2lab.overrides", f"lam={k}")])
    for e in range(epochs):
        now = int(time.time() * 1000)
        for k, r in enumerate(ids):
            c.log_batch(r, metrics=[Metric(a, v, now, e) for a, v in metrics_of(k, e).items()])
    for r in ids:
        c.set_terminated(r, "FINISHED")


def measure(name: str, fn: Callable[..., None], template: Path, root: Path,
            runs: int, epochs: int) -> dict:
    db = root / name / "mlflow.db"
    db.parent.mkdir(parents=True)
    shutil.copy(template, db)
    uri = f"sqlite:///{db}"
    exp = tr.experiment_id(tr.connect(uri), "bench", uri)
    counts = {"transactions": 0, "statements": 0}
    engine = _get_store(uri).engine

    def on_commit(_conn) -> None:  # noqa: ANN001
        counts["transactions"] += 1

    def on_statement(*_args) -> None:  # noqa: ANN002
        counts["statements"] += 1

    event.listen(engine, "commit", on_commit)
    event.listen(engine, "before_cursor_execute", on_statement)
    t0, c0 = time.perf_counter(), time.process_time()
    fn(uri, exp, runs, epochs, counts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    event.remove(engine, "commit", on_commit)
    event.remove(engine, "before_cursor_execute", on_statement)
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT count(*) FROM metrics").fetchone()[0]
    assert rows == runs * epochs * len(KEYS), rows
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), **counts, "metric_rows": rows,
            "ms_per_run": round(1000 * wall / runs, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    try:
        template = root / "template.db"
        tr.connect(f"sqlite:///{template}")  # the schema once (slow), copied for each side
        with sqlite3.connect(template) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        out = {"runs": args.runs, "epochs": args.epochs, "metrics_per_epoch": len(KEYS),
               **{f"group_{b}": measure(f"group_{b}", functools.partial(by_group, backend=b),
                                        template, root, args.runs, args.epochs)
                  for b in ("sqlite", "sql")},
               "client": measure("client", by_client, template, root, args.runs, args.epochs)}
        out["speedup"] = {b: round(out["client"]["wall_s"] / out[f"group_{b}"]["wall_s"], 1)
                          for b in ("sqlite", "sql")}
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

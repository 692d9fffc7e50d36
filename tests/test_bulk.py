"""The group writer leaves exactly the record the public client leaves.

The same small sweep (a parent, K=5 children with params, tags, 20 epochs x 14 metrics in three
flushes, a run that fails with a reason and non-finite values, text and file artifacts) is written
once through ``RunWriter`` and once through ``MlflowClient``, one run and one call at a time, into
two real stores; then every run is read back through ``MlflowClient`` and compared.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, postgres_missing, stop_server, wait_healthy
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from l2lab import metrics
from l2lab.compat import mlflow as cm
from l2lab.compat import mlflow_sqlite as cs
from l2lab.tracking import bulk as gs
from l2lab.tracking import tracker as tr
from l2lab.tracking.bulk.sql import SqlRunWriter
from l2lab.tracking.bulk.sqlite import SqliteRunWriter

K, EPOCHS = 5, 20
KEYS = ["train/loss", "train/ce", "train/l2", "train/acc", "val/ce", "val/acc", "gap/ce",
        "gap/acc", "weights/sq_norm/fc1", "weights/sq_norm/fc2", "weights/sq_norm/out",
        "weights/sq_norm_total", "lr", "epoch_time"]
T0 = 1_700_000_000_000  # controlled times: both sides write the same timestamps
FAILED, FAIL_AT = 3, 12  # child 3 diverges at epoch 12
REASON = "NonFiniteLossError: train/loss is nan at epoch 12"


class ClientSide:
    """RunWriter's API done the ordinary way: the public client, one run and call at a time."""

    def __init__(self, uri: str) -> None:
        self.client = MlflowClient(uri)

    def create_runs(self, exp: str, names: Sequence[str], tags_list: Sequence[Mapping],
                    start_time: int) -> list[str]:
        return [self.client.create_run(exp, start_time=start_time, tags=dict(t),
                                       run_name=n).info.run_id
                for n, t in zip(names, tags_list, strict=True)]

    def log_params(self, params: Mapping, tags: Mapping | None = None) -> None:
        for r in {**params, **(tags or {})}:
            self.client.log_batch(r, params=[Param(k, str(v)) for k, v in
                                             params.get(r, {}).items()],
                                  tags=[RunTag(k, v) for k, v in (tags or {}).get(r, {}).items()])

    def set_tags(self, tags: Mapping) -> None:
        for r, kv in tags.items():
            self.client.log_batch(r, tags=[RunTag(k, v) for k, v in kv.items()])

    def log_metrics(self, epochs: Mapping) -> None:
        for r, eps in epochs.items():
            self.client.log_batch(r, metrics=[Metric(k, float(v), ts, step)
                                              for step, kv, ts in eps for k, v in kv.items()])

    def finish(self, ends: Mapping, end_time: int) -> None:
        for r, (status, why) in ends.items():
            if why:
                self.client.set_tag(r, "l2lab.failure", why)
            self.client.set_terminated(r, status=status, end_time=end_time)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_file(self, run_id: str, local_path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_dir)

    def log_texts(self, texts: Mapping) -> None:
        for r, files in texts.items():
            for f, t in files.items():
                self.log_text(r, t, f)

    def log_files(self, files: Mapping) -> None:
        for r, items in files.items():
            for f, d in items:
                self.log_file(r, f, d)


def epoch_metrics(k: int, epoch: int) -> dict[str, float]:
    rnd = random.Random(k * 1000 + epoch)
    m = {key: rnd.random() for key in KEYS}
    if k == FAILED and epoch == FAIL_AT:
        m.update({"train/loss": math.nan, "train/ce": math.inf, "train/l2": -math.inf})
    return m


def write_sweep(side: Any, exp: str, tmp: Path, k_runs: int = K) -> dict[str, str]:
    """The sweep, through ``side``; returns {l2lab.key tag: run id}."""
    (parent,) = side.create_runs(exp, ["sweep s1"], [{"l2lab.role": "sweep", "l2lab.key": "p",
                                                      "l2lab.sweep_id": "s1"}], start_time=T0)
    names = [f"lam={0.1 * k:g} seed=0" for k in range(k_runs)]
    tags = [{"mlflow.parentRunId": parent, "l2lab.sweep_id": "s1", "l2lab.key": f"c{k}",
             "l2lab.vectorized_group": "g1", "mlflow.user": "tester"} for k in range(k_runs)]
    kids = side.create_runs(exp, names, tags, start_time=T0 + 1)
    cfg = {"seed": 0, "model": {"hidden": [32, 16]}, "optimizer": {"lr": 0.01},
           "regularization": {"lam_per_layer": {"fc.*": 0.1}}}
    params = {r: {**tr.flatten_params({**cfg, "regularization": {
        **cfg["regularization"], "lam": 0.1 * k}}), "l2.layers": "fc1,fc2"}
              for k, r in enumerate(kids)}
    side.log_params(params, {r: {"l2lab.output_dir": f"/out/{k}"} for k, r in enumerate(kids)})
    side.log_params({kids[0]: params[kids[0]]})  # the same values again: a no-op
    side.set_tags({r: {"mlflow.source.git.commit": "abc123", "l2lab.output_dir": f"/o/{k}"}
                   for k, r in enumerate(kids)})  # overwrites a tag
    side.set_tags({kids[1]: {"mlflow.runName": "renamed"}})

    def flush(lo: int, hi: int) -> dict[str, list]:
        out = {}
        for k, r in enumerate(kids):
            last = FAIL_AT + 1 if k == FAILED else hi
            out[r] = [(e, epoch_metrics(k, e), T0 + 1000 * e + k) for e in range(lo, min(hi,
                                                                                      last))]
        return out

    first = flush(0, 7)
    first[kids[0]] += [(10, {"ooo": 1.0}, T0 + 100),  # a higher step, older timestamp
                       (5, {"tie": 0.1}, T0), (5, {"tie": 0.3}, T0), (5, {"tie": 0.2}, T0)]
    first[kids[1]] += [(2, {"dup": 1.0}, T0), (2, {"dup": 1.0}, T0)]  # exact duplicate
    side.log_metrics(first)
    second = flush(7, 14)
    second[kids[0]] += [(3, {"ooo": 2.0}, T0 + 500)]  # a lower step later: latest stays step 10
    side.log_metrics(second)
    third = flush(14, EPOCHS)
    third[kids[2]] = first[kids[2]][:2] + third[kids[2]]  # a re-sent flush: stored once
    third[kids[0]] += [(19, {"test/acc": 0.5}, T0 + 9), (19, {"test/acc": 0.7}, T0 + 9),
                       (19, {"test/acc": 0.6}, T0 + 10)]
    side.log_metrics(third)

    weights = tmp / "state_dict.pt"
    weights.write_bytes(bytes(range(256)) * 40)
    side.log_texts({r: {"config/config.yaml": f"seed: 0\nregularization:\n  lam: {0.1 * k:g}\n",
                        "config/overrides.yaml": f"- regularization.lam={0.1 * k:g}\n"}
                    for k, r in enumerate(kids)})
    side.log_files({r: [(weights, "model")] for k, r in enumerate(kids) if k != FAILED})
    side.log_file(kids[0], weights, None)  # at the artifact root
    side.finish({r: ("FAILED", REASON) if k == FAILED else ("FINISHED", None)
                 for k, r in enumerate(kids)}, end_time=T0 + 50_000)
    side.log_metrics({parent: [(0, {"runs_finished": k_runs - 1.0}, T0 + 50_001)]})
    side.log_text(parent, "lam,val/ce_mean\n0,0.5\n", "summary.csv")
    side.finish({parent: ("FINISHED", None)}, end_time=T0 + 50_002)
    return {"p": parent, **{f"c{k}": r for k, r in enumerate(kids)}}


def _walk(client: MlflowClient, run_id: str, path: str | None = None) -> list[Any]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _walk(client, run_id, f.path) if f.is_dir else [f]
    return out


def _metric(m: Metric) -> tuple:
    return (m.key, m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)


def read_back(uri: str, ids: Mapping[str, str], tmp: Path) -> dict[str, dict]:
    """Everything MlflowClient shows of each run, keyed by l2lab.key. Left out, because they
    differ between any two writes of the same sweep: the run ids and the artifact URI (it holds
    the run id) -- checked instead to be the experiment's location + /<run id>/artifacts -- and
    mlflow.parentRunId, which holds the parent's id: compared as the parent's key."""
    client = MlflowClient(uri)
    by_id = {v: k for k, v in ids.items()}
    out = {}
    for key, run_id in ids.items():
        run = client.get_run(run_id)
        exp = client.get_experiment(run.info.experiment_id)
        assert run.info.artifact_uri == f"{exp.artifact_location}/{run_id}/artifacts"
        tags = dict(run.data.tags)
        if "mlflow.parentRunId" in tags:
            tags["mlflow.parentRunId"] = by_id[tags["mlflow.parentRunId"]]
        history = sorted(_metric(m) for k in run.data.metrics
                         for m in client.get_metric_history(run_id, k))
        files = {}
        for f in _walk(client, run_id):
            local = client.download_artifacts(run_id, f.path, str(tmp / "dl" / key))
            files[f.path] = (f.file_size, Path(local).read_bytes())
        latest = {k: "nan" if math.isnan(v) else v for k, v in run.data.metrics.items()}
        info = run.info
        out[key] = {"status": info.status, "start": info.start_time, "end": info.end_time,
                    "name": info.run_name, "user": info.user_id, "stage": info.lifecycle_stage,
                    "params": dict(run.data.params), "tags": tags, "latest": latest,
                    "history": history, "artifacts": files}
    return out


def latest_rows(db: Path, ids: Mapping[str, str]) -> dict[str, list]:
    """``latest_metrics`` as stored (step and timestamp too: MlflowClient shows only values)."""
    with sqlite3.connect(db) as con:
        return {key: con.execute("SELECT key, value, step, timestamp, is_nan FROM latest_metrics "
                                 "WHERE run_uuid = ? ORDER BY key", (r,)).fetchall()
                for key, r in ids.items()}


@pytest.fixture(scope="module")
def template(store_template) -> Path:
    """An empty store with MLflow's schema (the session's: creating one takes ~10 s here)."""
    return store_template


def new_store(template: Path, tmp: Path, name: str) -> tuple[str, Path]:
    db = tmp / name / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    shutil.copy(template, db)
    return f"sqlite:///{db}", db


@pytest.fixture(scope="module")
def reference(template, tmp_path_factory) -> tuple[dict, dict]:
    """The sweep written the ordinary way, read back once for both paths of the group writer."""
    tmp = tmp_path_factory.mktemp("reference")
    uri, db = new_store(template, tmp, "client")
    ids = write_sweep(ClientSide(uri), tr.experiment_id(tr.connect(uri), "gs", uri), tmp)
    return read_back(uri, ids, tmp), latest_rows(db, ids)


def only(monkeypatch, path: str) -> None:
    """Make :func:`gs.open_writer` choose the backend ``path`` on a SQLite store at this
    MLflow's head: ``sqlite`` (its default), ``sql`` (the sqlite3 writer declined) or
    ``fallback`` (the public client: another alembic revision, unknown to both)."""
    if path != "sqlite":
        monkeypatch.setattr(cs, "writable", lambda db: "declined by the test")
    if path == "fallback":
        monkeypatch.setattr(cm, "head_revision", lambda: "0123456789ab")


BACKEND = {"sqlite": "sqlite", "sql": "sql", "fallback": "client"}


@pytest.mark.parametrize("path", ["sqlite", "sql", "fallback"])
def test_group_writer_leaves_the_record_the_public_client_leaves(tmp_path, monkeypatch, path,
                                                                  template, reference):
    uri, db = new_store(template, tmp_path, "group")
    only(monkeypatch, path)
    writer = gs.open_writer(uri)
    assert writer.backend == BACKEND[path], writer.why
    if path == "sqlite":  # the whole sweep written with MLflow never imported is checked by
        assert isinstance(writer, SqliteRunWriter)  # tests/test_train.py (a process)
    exp = tr.experiment_id(writer.client, "gs", uri)
    before = writer.round_trips
    ids = write_sweep(writer, exp, tmp_path)
    if path == "sql":
        # 2 creates, 2 params, 2 set_tags, 3 flushes (the one with a re-sent epoch: rolled back,
        # then MLflow's own store for each of the 4 runs in it), 2 finishes, 1 parent flush;
        # artifacts: none at all
        assert writer.round_trips - before == 2 + 2 + 2 + (1 + 1 + 1 + K - 1) + 2 + 1
    if path == "sqlite":  # the same, the re-sent epoch's flush in one transaction too
        assert writer.round_trips - before == 2 + 2 + 2 + 3 + 2 + 1
    want, want_latest = reference
    got = read_back(uri, ids, tmp_path)
    assert want["c1"]["name"] == "renamed" and want["c3"]["status"] == "FAILED"
    assert want["c3"]["tags"]["l2lab.failure"] == REASON
    assert len(want["c0"]["history"]) == EPOCHS * len(KEYS) + 2 + 3 + 3
    assert want["c0"]["latest"]["ooo"] == 1.0 and want["c0"]["latest"]["test/acc"] == 0.6
    assert want["c3"]["latest"]["train/loss"] == "nan"
    assert set(got) == set(want)
    for key in want:
        for field in want[key]:
            assert got[key][field] == want[key][field], (key, field)
    assert latest_rows(db, ids) == want_latest


@pytest.mark.parametrize("path", ["sqlite", "sql"])
def test_group_writer_keeps_the_busy_timeout_and_reads_back_steps(tmp_path, template,
                                                                   monkeypatch, path):
    uri, _ = new_store(template, tmp_path, "s")
    only(monkeypatch, path)
    writer = gs.open_writer(uri)
    assert writer.backend == path, writer.why
    exp = tr.experiment_id(writer.client, "gs", uri)
    ids = writer.create_runs(exp, ["a", "b"], [{}, {}])
    writer.log_metrics({ids[0]: [(0, {"x": 1.0}, T0), (1, {"x": 2.0}, T0)],
                        ids[1]: [(4, {"x": 1.0}, T0)]})
    assert writer.logged_steps(ids, "x") == {ids[0]: {0, 1}, ids[1]: {4}}
    if path == "sqlite":
        busy = writer._read("PRAGMA busy_timeout", [])[0][0]
    else:
        with writer._session() as s:
            from sqlalchemy import text

            busy = s.execute(text("PRAGMA busy_timeout")).scalar()
    assert busy == tr.SQLITE_BUSY_TIMEOUT_MS
    writer.finish({ids[0]: ("FAILED", "boom"), ids[1]: ("KILLED", "interrupted")})
    writer.reopen(ids)
    client = MlflowClient(uri)
    for r in ids:
        run = client.get_run(r)
        assert run.info.status == "RUNNING" and "l2lab.failure" not in run.data.tags
    path = writer.local_path(ids[0], "model/state_dict.pt")
    assert path == Path(tmp_path / "s/mlruns/artifacts" / ids[0] / "artifacts/model/state_dict.pt")
    with pytest.raises(ValueError):
        writer.local_path(ids[0], "../escape.txt")


def _write_group(uri: str, tag: str, start: float) -> None:
    """One sweep's group, as a vectorized job writes it: 5 runs, 20 epochs flushed 2 at a time."""
    w = gs.open_writer(uri)
    assert w.backend == "sqlite", w.why
    exp = tr.experiment_id(w.client, "gs", uri)
    while time.time() < start:
        time.sleep(0.01)
    ids = w.create_runs(exp, [f"{tag}{k}" for k in range(5)], [{"w": tag}] * 5)
    w.log_params({r: {"k": k} for k, r in enumerate(ids)})
    for e in range(0, EPOCHS, 2):
        w.log_metrics({r: [(s, {f"m{j}": s + j for j in range(14)}, T0 + s) for s in (e, e + 1)]
                       for r in ids})
    w.finish({r: ("FINISHED", None) for r in ids})


def test_concurrent_group_writers_lose_nothing(tmp_path, template):
    """Two processes (forked: MLflow's imports are done) write groups into one SQLite store at
    the same moment; every row of both is there."""
    uri, db = new_store(template, tmp_path, "shared")
    ctx = multiprocessing.get_context("fork")
    start = time.time() + 2
    procs = [ctx.Process(target=_write_group, args=(uri, tag, start)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    with sqlite3.connect(db) as con:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        assert q("SELECT count(*) FROM runs WHERE status = 'FINISHED'") == [(10,)]
        assert q("SELECT count(*) FROM metrics") == [(10 * EPOCHS * 14,)]
        assert q("SELECT count(*) FROM latest_metrics WHERE step = 19") == [(10 * 14,)]
        assert q("SELECT count(*) FROM params") == [(10,)]
        counts = q("SELECT run_uuid, count(DISTINCT step) FROM metrics GROUP BY run_uuid")
        assert sorted(n for _, n in counts) == [EPOCHS] * 10


# -- a team's store: PostgreSQL, directly (SQL path) and through its MLflow server (REST path) --
@pytest.mark.slow
@pytest.mark.skipif(bool(postgres_missing()), reason=postgres_missing() or "")
def test_group_writer_on_postgresql_directly_and_through_its_server(tmp_path, reference):
    """``scripts/mlflow_server.sh --local``: the same sweep written straight into its PostgreSQL
    (one transaction per call) and through the server (concurrent REST calls) reads back equal
    to the client-written reference."""
    port = free_port()
    pg_dir = Path(f"/tmp/l2lab-pg-gs-{os.getpid()}-{port}")  # postgres must enter it
    log = tmp_path / "server.log"
    with open(log, "w") as out:  # a file, not a pipe: the server's access log never blocks it
        server = subprocess.Popen(
            [str(Path(__file__).resolve().parents[1] / "scripts" / "mlflow_server.sh"), "--local",
             "--dir", str(pg_dir), "--port", str(port), "--artifacts", str(tmp_path / "art")],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW": str(Path(sys.executable).parent / "mlflow")})
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, server, 240, log.read_text)
        pg_port = re.search(r"throwaway PostgreSQL in .* on 127\.0\.0\.1:(\d+)",
                            log.read_text()).group(1)
        pg = f"postgresql://postgres@127.0.0.1:{pg_port}/mlflow"
        want, _ = reference
        for store, name in ((pg, "gs-pg"), (uri, "gs-rest")):
            writer = gs.open_writer(store)
            assert writer.backend == ("sql" if store == pg else "rest"), writer.why
            exp = writer.client.create_experiment(  # artifacts as local files, or the server's
                name, artifact_location=(tmp_path / name).as_uri() if store == pg else None)
            ids = write_sweep(writer, exp, tmp_path)
            got = read_back(store, ids, tmp_path / name)
            assert set(got) == set(want)
            for key in want:
                for field in want[key]:
                    assert got[key][field] == want[key][field], (store, key, field)
    finally:
        leftovers = stop_server(server, pg_dir, port)
    assert not leftovers, "the server script left processes behind"


# -- histories read back in bulk (the sweep summary, compare) --------------------------------
def _histories_store(template: Path, tmp: Path) -> tuple[str, list[str]]:
    """Four runs: full histories of the summary's keys (a NaN, +inf, a step logged twice, a
    timestamp tie), one key missing, one run with no metrics at all, a param that varies."""
    from l2lab.metrics import HISTORY as HISTORY_KEYS

    uri, _ = new_store(template, tmp, "hist")
    client = MlflowClient(uri)
    exp = tr.experiment_id(tr.connect(uri), "hist", uri)
    ids = []
    for k in range(4):
        r = client.create_run(exp, run_name=f"lam={k} seed=0",
                              tags={"l2lab.overrides": f'["regularization.lam={k}"]'}).info.run_id
        client.log_batch(r, params=[Param("regularization.lam", str(k)), Param("seed", "0")])
        keys = HISTORY_KEYS if k != 1 else HISTORY_KEYS[:2]  # run 1 lacks the weight norm
        metrics = [Metric(key, 1.0 / (1 + s + k + j), T0 + 10 * s, s)
                   for s in range(3 + k) for j, key in enumerate(keys)] if k != 3 else []
        if k == 0:
            metrics += [Metric("val/ce", math.nan, T0 + 5, 1),      # NaN, at a step logged twice
                        Metric("val/ce", 0.25, T0 + 99, 1),         # the same step again, later
                        Metric("train/ce", math.inf, T0 + 7, 2),
                        Metric("train/ce", 0.0, T0 + 10, 1),        # a (timestamp, step) tie
                        Metric("other", 3.0, T0, 0)]                # not a summary key
        if metrics:
            client.log_batch(r, metrics=metrics)
        client.set_terminated(r, status="FAILED" if k == 2 else "FINISHED")
        ids.append(r)
    return uri, ids


def _plain(x: Any) -> Any:
    """NaN-safe equality: floats by repr, containers and records element by element."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, Metric | cs.Metric):
        return (x.key, x.step, x.timestamp, repr(x.value))
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        return {f: _plain(getattr(x, f)) for f in x.__dataclass_fields__}
    return x


@pytest.mark.parametrize("path", ["sqlite", "sql", "fallback"])
def test_metric_histories_in_bulk_equal_each_runs_history(tmp_path, monkeypatch, path, template):
    from l2lab.metrics import HISTORY as HISTORY_KEYS

    uri, ids = _histories_store(template, tmp_path)
    client = MlflowClient(uri)
    keys = [*HISTORY_KEYS, "other", "never-logged"]
    want = {r: {k: client.get_metric_history(r, k) for k in keys} for r in ids}
    assert [m.step for m in want[ids[0]]["val/ce"]].count(1) == 3
    assert any(math.isnan(m.value) for m in want[ids[0]]["val/ce"])
    only(monkeypatch, path)
    writer = gs.open_writer(uri)
    assert writer.backend == BACKEND[path], writer.why
    before = writer.round_trips
    got = writer.metric_histories([*ids, ids[0]], keys)  # a repeated id is read once
    assert writer.round_trips - before == (len(ids) * len(keys) if path == "fallback" else 1)
    assert list(got) == ids
    assert _plain(got) == _plain(want)  # same rows, same order, NaN as NaN
    assert writer.metric_histories([], keys) == {}


@pytest.mark.parametrize("path", ["sqlite", "sql", "fallback"])
def test_load_records_reads_histories_in_bulk_with_the_same_records(tmp_path, monkeypatch, path,
                                                                     template):
    from l2lab.tracking import runs as rr

    uri, ids = _histories_store(template, tmp_path)
    client = MlflowClient(uri)
    found = [client.get_run(r) for r in ids]

    class Unnamed:  # a client that does not say its store: asked run by run, as before
        def __getattr__(self, name: str) -> Any:
            if name == "tracking_uri":
                raise AttributeError(name)
            return getattr(client, name)

    calls = []
    monkeypatch.setattr(client, "get_metric_history",
                        lambda *a, _f=client.get_metric_history: calls.append(a) or _f(*a))
    want = rr.load_records(Unnamed(), found)
    assert len(calls) == 3 * len(metrics.HISTORY)  # the run without metrics is not asked
    assert "nan" in repr(want[0].history["val/ce"]) and want[3].history == {}
    assert want[1].history["weights/sq_norm_total"] == []

    only(monkeypatch, path)
    bulk = []
    backend = {"sqlite": SqliteRunWriter, "sql": SqlRunWriter,
               "fallback": gs.ClientRunWriter}[path]
    real = backend.metric_histories
    monkeypatch.setattr(backend, "metric_histories",
                        lambda self, *a: bulk.append(self.backend) or real(self, *a))
    calls.clear()
    made = rr.load_records(client, found)  # a writer made on the client's store
    assert bulk == [BACKEND[path]]
    assert len(calls) == (3 * len(metrics.HISTORY) if path == "fallback" else 0)
    given = rr.load_records(client, found, writer=gs.open_writer(uri, client))
    assert _plain(made) == _plain(want) and _plain(given) == _plain(want)


# -- the backend choice and the errors: both backends are one interface -------------------------

def test_choose_mode_takes_each_branch(tmp_path, template, monkeypatch):
    """Every branch of the choice: a server, the SQL path, another alembic revision, another
    store class, a private name missing from this MLflow, a store that fails to open."""
    uri, db = new_store(template, tmp_path, "m")
    assert gs.choose_backend("http://127.0.0.1:1").backend == "rest"
    assert isinstance(gs.open_writer("https://example.invalid", MlflowClient(uri)),
                      gs.ClientRunWriter)
    assert gs.choose_backend(uri).backend == "sqlite"
    assert isinstance(gs.open_writer(uri), SqliteRunWriter)
    assert cs.writable(db) is None
    assert "not an MLflow store" in cs.writable(tmp_path / "none.db")
    with monkeypatch.context() as m:  # another MLflow: its own ORM writer decides
        m.setattr(cs, "WRITER_CHECKED_WITH", frozenset({"0.0.1"}))
        assert "is not one the SQLite writer was checked with" in cs.writable(db)
        ok = gs.choose_backend(uri)
    assert (ok.backend, ok.store is not None) == ("sql", True), ok.why
    monkeypatch.setattr(cs, "writable", lambda db: "declined by the test")
    assert isinstance(gs.open_writer(uri), SqlRunWriter)
    with monkeypatch.context() as m:
        m.setattr(cm, "head_revision", lambda: "0123456789ab")
        c = gs.choose_backend(uri)
        assert c.backend == "client" and "alembic revision" in c.why and "0123456789ab" in c.why
    with monkeypatch.context() as m:
        m.setattr(cm, "sql_store_class", lambda: type(None))
        c = gs.choose_backend(uri)
        assert c.backend == "client" and "not a plain SqlAlchemyStore" in c.why

    def missing() -> None:
        raise ImportError("cannot import name '_get_schema_version'")

    with monkeypatch.context() as m:
        m.setattr(cm, "check_all", missing)
        c = gs.choose_backend(uri)
        assert c.backend == "client" and "_get_schema_version" in c.why
        assert isinstance(gs.open_writer(uri), gs.ClientRunWriter)

    def broken(_uri: str) -> None:
        raise RuntimeError("database is locked")

    with monkeypatch.context() as m:
        m.setattr(cm, "tracking_store", broken)
        c = gs.choose_backend(uri)
        assert c.backend == "client" and "database is locked" in c.why


def _error(fn) -> tuple[str, str]:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as e:
        fn()
    return e.value.error_code, str(e.value.message)


def _errors_of(w: gs.RunWriter, uri: str) -> dict[str, tuple[str, str]]:
    """The errors one backend raises for each bad input, in a fresh store."""
    client = MlflowClient(uri)
    exp = tr.experiment_id(w.client, "errors", uri)
    gone = client.create_experiment("gone")
    client.delete_experiment(gone)
    ids = w.create_runs(exp, ["a", "b"], [{}, {}])
    w.log_params({ids[0]: {"p": 1}})
    client.delete_run(ids[1])
    return {
        "missing experiment": _error(lambda: w.create_runs("987654", ["x"], [{}])),
        "deleted experiment": _error(lambda: w.create_runs(gone, ["x"], [{}])),
        "name against tag": _error(lambda: w.create_runs(exp, ["x"], [{"mlflow.runName": "y"}])),
        "missing run": _error(lambda: w.log_params({"f" * 32: {"p": 1}})),
        "deleted run": _error(lambda: w.set_tags({ids[1]: {"t": "v"}})),
        "changed param": _error(lambda: w.log_params({ids[0]: {"p": 2}})),
        "bad param key": _error(lambda: w.log_params({ids[0]: {"../p": 1}})),
        "bad metric key": _error(lambda: w.log_metrics({ids[0]: [(0, {"../m": 1.0}, T0)]})),
        "finish deleted": _error(lambda: w.finish({ids[1]: ("FINISHED", None)})),
    }


@pytest.fixture(scope="module")
def bad_input_errors(template, tmp_path_factory) -> dict[str, dict[str, tuple[str, str]]]:
    """The errors each backend raises for the same bad inputs, each in a fresh store."""
    sqlite_uri, _ = new_store(template, tmp_path_factory.mktemp("errors-sqlite"), "e")
    sql_uri, _ = new_store(template, tmp_path_factory.mktemp("errors-sql"), "e")
    client_uri, _ = new_store(template, tmp_path_factory.mktemp("errors-client"), "e")
    lite = gs.open_writer(sqlite_uri)
    assert lite.backend == "sqlite", lite.why
    sql = SqlRunWriter(sql_uri, None, _sql_choice(sql_uri))
    assert sql.backend == "sql", sql.why
    return {"sqlite": _errors_of(lite, sqlite_uri), "sql": _errors_of(sql, sql_uri),
            "client": _errors_of(gs.ClientRunWriter(client_uri, None, gs.Choice("client", "")),
                                 client_uri)}


def _sql_choice(uri: str) -> gs.Choice:
    """The choice of MLflow's ORM writer for ``uri`` (the sqlite3 writer declined)."""
    real = cs.writable
    cs.writable = lambda db: "declined by the test"
    try:
        return gs.choose_backend(uri)
    finally:
        cs.writable = real


@pytest.mark.parametrize("case", ["missing experiment", "deleted experiment", "name against tag",
                                  "missing run", "deleted run", "changed param", "bad param key",
                                  "bad metric key", "finish deleted"])
@pytest.mark.parametrize("backend", ["sqlite", "sql"])
def test_every_backend_raises_the_clients_error_for_the_same_bad_input(bad_input_errors, case,
                                                                        backend):
    got, client = bad_input_errors[backend][case], bad_input_errors["client"][case]
    assert got[0] == client[0], (got, client)  # the same error code
    # the same message, up to the ids and the path MLflow's validation names
    norm = [re.sub(r"[0-9a-f]{32}|params\[\d+\]|tags\[\d+\]|metrics\[\d+\]", "<>", m)
            for m in (got[1], client[1])]
    assert norm[0] == norm[1], (got, client)

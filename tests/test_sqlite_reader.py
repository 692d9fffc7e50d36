"""l2lab.compat.mlflow_sqlite: a SQLite store read without MLflow gives, call for call, what the
public MlflowClient gives on the same store (the oracle), and declines what it does not know."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from l2lab.compat import mlflow as cm
from l2lab.compat import mlflow_sqlite as cs
from l2lab.tracking import connection


def _info(run) -> tuple:
    i = run.info
    return (i.run_id, i.run_name, i.experiment_id, i.user_id, i.status, i.start_time,
            i.end_time, i.lifecycle_stage, i.artifact_uri)


def _same_value(a: float) -> object:
    return "nan" if math.isnan(a) else a


def _run(run) -> tuple:
    d = run.data
    return (_info(run), dict(d.params), dict(d.tags),
            {k: _same_value(v) for k, v in d.metrics.items()})


def _history(ms) -> list[tuple]:
    return [(m.key, _same_value(m.value), m.timestamp, m.step) for m in ms]


@pytest.fixture
def populated(store: str, client: MlflowClient) -> dict:
    """Two experiments (one tagged), a deleted one; a sweep parent and children with tied start
    times, NaN and ±inf metrics, repeated steps, a deleted child, a run named only by its tag,
    and a run of another sweep."""
    a = client.create_experiment("a", tags={"k": "v", "mlflow.sharedViewState.x": "{}"})
    b = client.create_experiment("b")
    gone = client.create_experiment("gone")
    client.create_run(gone, run_name="in a deleted experiment")
    client.delete_experiment(gone)
    parent = client.create_run(a, run_name="sweep x", start_time=1000,
                               tags={"l2lab.role": "sweep", "l2lab.sweep_id": "x"}).info.run_id
    kids = []
    for i, start in enumerate((1001, 1001, 1003, 1002)):
        rid = client.create_run(a, run_name=f"lam={i}", start_time=start, tags={
            "l2lab.sweep_id": "x", "mlflow.parentRunId": parent}).info.run_id
        client.log_batch(rid, params=[Param("regularization.lam", str(i)), Param("seed", "0")],
                         tags=[RunTag("l2lab.overrides", f'["regularization.lam={i}"]')],
                         metrics=[Metric("val/ce", v, 5 + s, s) for s, v in
                                  enumerate((1.0, math.nan, 0.5, float("inf"), -float("inf")))]
                         + [Metric("train/ce", 0.3, 9, 0), Metric("train/ce", 0.2, 7, 0),
                            Metric("train/ce", 0.1, 7, 0), Metric("train/ce", math.nan, 11, 1),
                            Metric("train/ce", 0.05, 3, 2)])  # a later step, logged earlier
        kids.append(rid)
    client.set_terminated(kids[0], "FINISHED")
    client.set_terminated(kids[1], "FAILED")
    client.delete_run(kids[3])
    other = client.create_run(b, run_name="y", start_time=1001,
                              tags={"l2lab.sweep_id": "y"}).info.run_id
    client.log_metric(other, "val/ce", 2.0, step=0)
    with sqlite3.connect(store[len("sqlite:///"):]) as con:  # as runs logged by old clients
        con.execute("UPDATE runs SET name = '' WHERE run_uuid = ?", (kids[2],))
    return {"exps": [a, b], "parent": parent, "kids": kids, "other": other}


def test_each_read_is_the_clients_on_the_same_store(store, client, populated):
    reader = cs.open_reader(Path(store[len("sqlite:///"):]), store)
    assert isinstance(reader, cs.SqliteReader)
    want = [(e.experiment_id, e.name, e.tags) for e in client.search_experiments()]
    assert [(e.experiment_id, e.name, e.tags) for e in reader.search_experiments()] == want
    for e in populated["exps"]:
        assert reader.get_experiment(e).tags == client.get_experiment(e).tags
    exps = [e.experiment_id for e in client.search_experiments()]
    pid = populated["parent"]
    filters = ["", "tags.`l2lab.sweep_id` = 'x'", "tags.`l2lab.role` = 'sweep'",
               f"tags.l2lab.sweep_id = 'x' and tags.mlflow.parentRunId = '{pid}'",
               "tags.`l2lab.sweep_id` = 'nothing'"]
    for flt in filters:
        for order in (["attributes.start_time ASC"], ["attributes.start_time DESC"], None):
            for most in (1, 2, 50_000):
                got = reader.search_runs(exps, filter_string=flt, order_by=order,
                                         max_results=most)
                want = client.search_runs(exps, filter_string=flt, order_by=order,
                                          max_results=most)
                assert [_run(r) for r in got] == [_run(r) for r in want], (flt, order, most)
    assert reader.search_runs([], "") == []
    ids = [pid, *populated["kids"], populated["other"]]
    for rid in ids:
        assert _run(reader.get_run(rid)) == _run(client.get_run(rid))
        for key in ("val/ce", "train/ce", "absent"):
            assert _history(reader.get_metric_history(rid, key)) == _history(
                client.get_metric_history(rid, key))
    assert reader.get_run(populated["kids"][2]).info.run_name == "lam=2"  # from its tag
    from l2lab.tracking.bulk import open_writer

    bulk = open_writer(store, client).metric_histories(ids, ["val/ce", "train/ce"])
    got = reader.metric_histories(ids, ["val/ce", "train/ce"])
    assert {r: {k: _history(v) for k, v in h.items()} for r, h in got.items()} == {
        r: {k: _history(v) for k, v in h.items()} for r, h in bulk.items()}
    with pytest.raises(cs.NotFound):
        reader.get_run("0" * 32)
    with pytest.raises(NotImplementedError):
        reader.search_runs(exps, "metrics.`val/ce` < 1")
    with pytest.raises(NotImplementedError):
        reader.search_runs(exps, "", order_by=["metrics.`val/ce` ASC"])


def test_a_store_it_does_not_know_is_left_to_the_client(store, client, tmp_path):
    db = Path(store[len("sqlite:///"):])
    assert cs.open_reader(tmp_path / "absent.db", "sqlite:///absent") is None
    with sqlite3.connect(tmp_path / "other.db") as con:
        con.execute("CREATE TABLE t (x)")
    assert cs.open_reader(tmp_path / "other.db", "sqlite:///other") is None
    assert cs.open_reader(db, store) is not None
    with sqlite3.connect(db) as con:  # an MLflow whose schema moved on
        con.execute("UPDATE alembic_version SET version_num = '0123456789ab'")
    assert cs.open_reader(db, store) is None
    reader = connection.reader(store)
    assert not isinstance(reader, cs.SqliteReader) and hasattr(reader, "search_runs")


def test_experiments_in_another_workspace_are_left_to_the_client(store, client):
    db = Path(store[len("sqlite:///"):])
    client.create_experiment("w")
    with sqlite3.connect(db) as con:
        con.execute("UPDATE experiments SET workspace = 'team' WHERE name = 'w'")
    assert cs.open_reader(db, store) is None


def test_the_installed_mlflows_schema_is_one_the_reader_was_checked_against():
    """A new MLflow with a new schema fails here first: read its tables, then add its head."""
    assert cm.head_revision() in cs.KNOWN_REVISIONS


def test_an_experiment_tag_set_with_sqlite3_is_the_clients(store, client):
    """``set_experiment_tag`` without MLflow (a sweep's shared view) leaves what the client's
    leaves, overwrites as it does, and raises its errors for a missing or deleted experiment."""
    from mlflow.exceptions import MlflowException

    db = connection.sqlite_path(store)
    mine, theirs = client.create_experiment("mine"), client.create_experiment("theirs")
    view = '{"searchFilter": "tags.`mlflow.parentRunId` = \'abc\'", "orderByAsc": true}'
    for key, value in (("mlflow.sharedViewState.abc", view), ("note", "first"),
                       ("note", "second")):
        cs.set_experiment_tag(db, mine, key, value, 5)
        client.set_experiment_tag(theirs, key, value)
    assert client.get_experiment(mine).tags == client.get_experiment(theirs).tags
    assert client.get_experiment(mine).tags["note"] == "second"
    gone = client.create_experiment("gone")
    client.delete_experiment(gone)

    def error(fn, *args) -> tuple[str, str]:
        with pytest.raises(MlflowException) as e:
            fn(*args)
        return e.value.error_code, e.value.message

    for exp in ("987654", gone):
        assert error(cs.set_experiment_tag, db, exp, "k", "v", 5) == \
            error(client.set_experiment_tag, exp, "k", "v")
    assert error(cs.set_experiment_tag, db, mine, "../k", "v", 5)[0] == "INVALID_PARAMETER_VALUE"

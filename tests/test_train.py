"""End to end: real Lightning training into a real SQLite MLflow store, read back."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY, make_cfg, run_cli, runs_of

from l2lab import ConfigError
from l2lab.train import train

CONTRACT = ["train/loss", "train/ce", "train/l2", "train/acc", "val/ce", "val/acc", "gap/ce",
            "gap/acc", "train_eval/ce", "train_eval/acc", "weights/sq_norm/fc1",
            "weights/sq_norm/out", "weights/sq_norm_total"]


def test_three_epoch_run_is_recorded_as_the_contract_says(tmp_path, store, client):
    cfg = make_cfg(f"tracking.uri={store}", "regularization.lam=0.05")
    final = train(cfg, overrides=["regularization.lam=0.05"], output_dir=tmp_path / "out")
    (run,) = runs_of(client)
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    for key in CONTRACT:
        hist = client.get_metric_history(rid, key)
        assert [m.step for m in hist] == [0, 1, 2], key
    m = run.data.metrics
    assert m["train/loss"] == pytest.approx(m["train/ce"] + m["train/l2"], rel=1e-6)
    assert m["gap/ce"] == pytest.approx(m["val/ce"] - m["train_eval/ce"], rel=1e-6)
    assert m["gap/acc"] == pytest.approx(m["train_eval/acc"] - m["val/acc"], rel=1e-6)
    assert m["weights/sq_norm_total"] == pytest.approx(
        m["weights/sq_norm/fc1"] + m["weights/sq_norm/out"], rel=1e-6)
    assert final["val/ce"] == pytest.approx(m["val/ce"])
    # training actually learned something
    ce = [x.value for x in client.get_metric_history(rid, "train/ce")]
    assert ce[-1] < ce[0] < 2.5
    # the final weights are the logged artifact, and their norms match the logged metric
    state = torch.load(client.download_artifacts(rid, "model/state_dict.pt", str(tmp_path)))
    assert float((state["fc1.weight"] ** 2).sum()) == pytest.approx(m["weights/sq_norm/fc1"],
                                                                    rel=1e-5)
    # train/l2 (epoch mean) is λ/n·Σ||W||² with n = 40, between its start and end values
    assert 0 < m["train/l2"] < 0.05 / 40 * m["weights/sq_norm_total"] * 1.5
    p = run.data.params
    assert p["regularization.lam"] == "0.05" and p["data.train_size"] == "120"
    assert p["seed"] == "0" and p["optimizer.lr"] == "0.05" and p["model.hidden"] == "[32]"
    assert p["regularization.layers"] == '["*"]' and p["l2.layers"] == "fc1,out"
    assert int(p["l2.num_params"]) == 32 * 64 + 10 * 32
    assert p["tracking.uri"] == store
    t = run.data.tags
    assert t["mlflow.runName"] == "lam=0.05"
    assert json.loads(t["l2lab.overrides"]) == ["regularization.lam=0.05"]
    assert t["l2lab.output_dir"] == str((tmp_path / "out").resolve())
    arts = {a.path for a in client.list_artifacts(rid, "config")}
    assert arts == {"config/config.yaml", "config/overrides.yaml"}
    logged = yaml.safe_load(open(client.download_artifacts(rid, "config/config.yaml",
                                                           str(tmp_path))))
    assert logged["regularization"]["lam"] == 0.05 and logged["experiment_name"] == "digits-mlp"
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "artifacts").as_uri())


def test_a_run_into_an_existing_sqlite_store_never_imports_mlflow(tmp_path, store, client):
    """MLflow's import and store are ~1.9 s of a command's start, so a training command writes
    its record into a SQLite store it knows with sqlite3 alone. The first run must create its
    experiment, which MLflow's own store does (imported then); the second imports no MLflow
    module at all, and the client reads both records whole."""
    def run() -> set[str]:
        r = run_cli("l2lab.train", f"tracking.uri={store}", *TINY, "trainer.max_epochs=3",
                    cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}

    assert "mlflow" in run()  # a new experiment
    imported = run()
    assert "l2lab.tracking.bulk.sqlite" in imported
    assert not {m for m in imported if m.split(".")[0] in ("mlflow", "sqlalchemy", "alembic")}
    first, second = runs_of(client)
    for r in (first, second):
        assert r.info.status == "FINISHED" and r.data.params["trainer.max_epochs"] == "3"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/ce")] == [0, 1, 2]
    assert first.data.metrics == second.data.metrics  # the same run, written both ways


def test_same_config_gives_identical_histories_on_cpu(tmp_path, store, client):
    cfg = make_cfg(f"tracking.uri={store}", "model.dropout=0.2", "seed=7")
    a = train(cfg, output_dir=tmp_path / "a")
    b = train(cfg, output_dir=tmp_path / "b")
    assert a == b
    ids = [r.info.run_id for r in runs_of(client)]
    h = [[x.value for x in client.get_metric_history(i, "val/ce")] for i in ids]
    assert h[0] == h[1]
    c = train(make_cfg(f"tracking.uri={store}", "model.dropout=0.2", "seed=8"),
              output_dir=tmp_path / "c")
    assert c["val/ce"] != a["val/ce"]


def test_optimizer_mode_logs_the_equivalent_penalty(tmp_path, store, client):
    """train_size a multiple of batch_size: mode=loss and mode=optimizer train identically.
    train/loss is what each optimizer minimises: ce + l2 in the loss, the ce alone when the
    optimizer applies the decay (its nominal penalty keeps its own name, train/l2)."""
    loss = train(make_cfg(f"tracking.uri={store}", "regularization.lam=0.5", "optimizer.lr=0.1"),
                 output_dir=tmp_path / "l")
    opt = train(make_cfg(f"tracking.uri={store}", "regularization.lam=0.5", "optimizer.lr=0.1",
                         "regularization.mode=optimizer"), output_dir=tmp_path / "o")
    for k in ("train/ce", "val/ce", "weights/sq_norm_total", "train/l2"):
        assert opt[k] == pytest.approx(loss[k], rel=1e-4), k
    assert loss["train/loss"] == pytest.approx(loss["train/ce"] + loss["train/l2"], rel=1e-9)
    assert opt["train/loss"] == opt["train/ce"] and opt["train/l2"] > 0.01 * opt["train/ce"]


def test_a_dropout_runs_gap_is_against_the_training_set_in_eval_mode(tmp_path, store, client):
    """gap/* = val − train_eval/*, and train_eval/* is the final weights without dropout on a
    fixed subset of the training set as large as val (recomputed here by plain torch); the
    running train/ce (dropout on, weights moving) is another number. With
    trainer.eval_train=false there is no pass and the gap is against the running means."""
    import torch.nn.functional as F

    from l2lab.core.data import load_data
    from l2lab.run.engine import build_net

    over = ["model.dropout=0.5", "trainer.max_epochs=4", "data.train_size=120",
            "data.val_size=60"]
    cfg = make_cfg(f"tracking.uri={store}", *over)
    final = train(cfg, output_dir=tmp_path / "on")
    (run,) = runs_of(client)
    splits = load_data(cfg.data)
    x, y = splits.train_eval()
    assert len(y) == 60 and torch.equal(x, splits.train[0][:60])  # as large as val
    net = build_net(cfg, splits)
    net.load_state_dict(torch.load(client.download_artifacts(
        run.info.run_id, "model/state_dict.pt", str(tmp_path))))
    net.eval()
    with torch.no_grad():
        logits = net(x)
    ce = float(F.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    assert final["train_eval/ce"] == pytest.approx(ce, rel=1e-5)
    assert final["train_eval/acc"] == pytest.approx(acc, abs=1e-6)
    assert final["gap/ce"] == pytest.approx(final["val/ce"] - ce, rel=1e-5)
    assert final["gap/acc"] == pytest.approx(acc - final["val/acc"], abs=1e-6)
    assert abs(final["train/ce"] - ce) > 0.05  # dropout's running mean is not the fit
    net.train()  # (and the pass really had dropout off: in train mode the CE moves)
    with torch.no_grad():
        assert abs(float(F.cross_entropy(net(x), y)) - ce) > 1e-3

    off = train(make_cfg(f"tracking.uri={store}", *over, "trainer.eval_train=false"),
                output_dir=tmp_path / "off")
    assert not any(k.startswith("train_eval/") for k in off)
    assert off["gap/ce"] == pytest.approx(off["val/ce"] - off["train/ce"], rel=1e-6)
    assert off["train/ce"] == final["train/ce"]  # the pass changes no training


def test_regularization_none_keeps_norms_logged(tmp_path, store, client):
    out = train(make_cfg(f"tracking.uri={store}", "regularization=none"), output_dir=tmp_path)
    assert out["train/l2"] == 0.0 and out["weights/sq_norm_total"] > 0
    assert out["train/loss"] == out["train/ce"]


def test_the_package_exports_the_function_without_shadowing_the_module():
    """``l2lab.train`` is the module whatever was imported first; the function is
    ``l2lab.train_run`` before and after ``import l2lab.train`` (a fresh interpreter: this one
    has imported the module already)."""
    import subprocess
    import sys

    code = ("import types, l2lab; f = l2lab.train_run; import l2lab.train; "
            "print(f is l2lab.train_run is l2lab.train.train, "
            "isinstance(l2lab.train, types.ModuleType), sorted(l2lab.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")[-2]
    assert out == "True True ['CONF_DIR', 'ConfigError', 'load_runs', 'train_run']"
    fresh = subprocess.run([sys.executable, "-c", "import l2lab; l2lab.train"],
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 1 and "no attribute 'train'" in fresh.stderr


def test_default_store_and_env_uri(tmp_path, monkeypatch):
    from l2lab.tracking.tracker import resolve_uri

    assert resolve_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert resolve_uri("sqlite:///rel/x.db", cwd=tmp_path) == f"sqlite:///{tmp_path}/rel/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri(None) == "http://127.0.0.1:5999"
    assert resolve_uri("sqlite:////a/b.db") == "sqlite:////a/b.db"


@pytest.mark.parametrize("override, words", [
    ("regularization.lam=-0.1", ["regularization.lam", ">= 0"]),
    ("regularization.lam=nan", ["regularization.lam", "finite"]),
    ("regularization.layers=[conv*]", ["regularization.layers", "fc1, out"]),
    ("+regularization.lam_per_layer.fc7=0.2", ["regularization.lam_per_layer", "fc1, out"]),
    ("data.train_size=100000", ["data.train_size", "1377"]),
    ("data.val_size=5000", ["data.val_size"]),
    ("regularization.normalize=mean", ["regularization.normalize", "batch", "dataset"]),
    ("optimizer.lr=-1", ["optimizer.lr"]),
    ("optimizer.weight_decay=0.1", ["optimizer.weight_decay", "regularization.mode"]),
])
def test_bad_input_is_a_failed_run_with_the_reason(tmp_path, store, client, override, words):
    with pytest.raises(ConfigError) as e:
        train(make_cfg(f"tracking.uri={store}", override), output_dir=tmp_path)
    for w in words:
        assert w in str(e.value)
    (run,) = runs_of(client)  # recorded as FAILED, with the reason, and no metrics
    assert run.info.status == "FAILED" and words[0] in run.data.tags["l2lab.failure"]
    assert run.data.metrics == {}


@pytest.mark.parametrize("backend", ["sqlite", "sql"])
def test_a_long_failure_reason_is_cut_at_one_limit_by_both_writers(store, monkeypatch, backend):
    """The group writer (one SQL transaction: sqlite3's, or MLflow's ORM) and a run's own tracker
    (the client) record the same reason under the same tag, cut at the same length."""
    from l2lab.compat import mlflow_sqlite as cs
    from l2lab.tracking import tracker as tr
    from l2lab.tracking.bulk import open_writer

    if backend == "sql":
        monkeypatch.setattr(cs, "writable", lambda db: "declined by the test")
    writer = open_writer(store)
    assert writer.backend == backend, writer.why
    bulk, single = writer.create_runs(tr.experiment_id(writer.client, "cut", store),
                                      ["bulk", "single"], [{}, {}])
    reason = "NonFiniteLossError: " + "".join(f"{i:05d} " for i in range(2000))  # 12020 chars
    writer.finish({bulk: ("FAILED", reason)})
    tr.RunTracker(writer.client, single).finish("FAILED", reason)
    for rid in (bulk, single):
        run = writer.client.get_run(rid)
        assert run.info.status == "FAILED"
        assert run.data.tags["l2lab.failure"] == reason[:tr.FAILURE_MAX_CHARS]
    assert tr.FAILURE_TAG == "l2lab.failure" and 1000 < tr.FAILURE_MAX_CHARS < 8000


def test_bad_input_on_the_command_line_exits_nonzero_without_traceback(tmp_path, store):
    r = run_cli("l2lab.train", f"tracking.uri={store}", *TINY, "regularization.lam=-1",
                cwd=tmp_path)
    assert r.returncode == 2
    assert "regularization.lam must be a finite number >= 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_dataset_files_exit_nonzero(tmp_path, store):
    r = run_cli("l2lab.train", f"tracking.uri={store}", "data=mnist",
                f"data.root={tmp_path}/none", cwd=tmp_path)
    assert r.returncode != 0 and f"{tmp_path}/none/MNIST/raw" in r.stderr
    assert "data.download=true" in r.stderr

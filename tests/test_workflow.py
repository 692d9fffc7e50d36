"""The research workflow end to end: what a run says, the default's story, sweeps with rejected
jobs, Optuna, reuse, compare's grouping, load_runs, and the helper scripts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, make_cfg, run_cli, runs_of

import l2lab
from l2lab import compare, reproduce
from l2lab.train import train

ROOT = Path(__file__).resolve().parents[1]


def children(client, **tags) -> list:
    return [r for r in runs_of(client, **tags) if r.data.tags.get("l2lab.role") != "sweep"]


def test_a_run_says_what_happened_and_writes_it_to_train_log(tmp_path, store, client):
    r = run_cli("l2lab.train", f"tracking.uri={store}", *TINY, "regularization.lam=0.02",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs_of(client)
    rid, exp = run.info.run_id, run.info.experiment_id
    m = run.data.metrics
    folder, name = run.data.tags["l2lab.output_dir"], run.data.tags["mlflow.runName"]
    assert name.endswith("lam=0.02")
    first = f"l2lab: run {rid} ({name}) in experiment 'digits-mlp', 3 epochs"
    last = (f"l2lab: run {rid} ({name}) FINISHED after 3 epochs: train/ce={m['train/ce']:.4f}  "
            f"val/ce={m['val/ce']:.4f}  gap/ce={m['gap/ce']:.4f}")
    url = f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{rid}"
    for line in (first, last, f"folder: {folder}", f"UI: {url}"):
        assert line in r.stdout, (line, r.stdout)
    log = (Path(folder) / "train.log").read_text()
    assert first in log and last in log and url in log
    epochs = [ln for ln in r.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 3 and all(ln in log for ln in epochs)  # per-epoch lines too
    # quiet: no MLflow/alembic INFO lines, no library chatter on the console
    both = r.stdout + r.stderr
    assert "Creating initial MLflow database tables" not in both and "INFO" not in both
    assert "Context impl" not in both and "Traceback" not in both


def test_the_default_run_shows_overfitting(tmp_path, store):
    """Plain `python -m l2lab.train`: a 200-example subset of the digits, so that the gap
    between val and train CE is plain to see (README: gap/ce 0.40 at λ = 1e-3)."""
    cfg = make_cfg(f"tracking.uri={store}", tiny=False)
    assert cfg.data.train_size == 200 and cfg.regularization.lam == 1e-3
    final = train(cfg, output_dir=tmp_path / "default")
    assert final["gap/ce"] >= 0.2, final
    assert final["train/ce"] < 0.05 and final["val/acc"] > 0.85, final


def test_a_sweep_records_a_rejected_job_as_a_failed_child(tmp_path, store, client):
    r = run_cli("l2lab.train", "-m", "regularization.lam=-1,0.01", *TINY,
                f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/multirun/rej",
                cwd=tmp_path)
    assert r.returncode == 1
    runs = {c.data.params["regularization.lam"]: c for c in children(client)}
    bad, good = runs["-1.0"], runs["0.01"]
    assert bad.info.status == "FAILED" and bad.data.metrics == {}
    assert "regularization.lam must be a finite number >= 0" in bad.data.tags["l2lab.failure"]
    assert good.info.status == "FINISHED"
    assert f"l2lab: #0 lam=-1: run {bad.info.run_id[:8]} FAILED: regularization.lam must be a " \
        "finite number >= 0" in r.stderr  # the job's own line
    assert f"FAILED  lam=-1  ({bad.info.run_id}): ConfigError: regularization.lam must be" \
        in r.stdout  # the table names it
    assert "1 run(s) never trained" in r.stdout
    # one line per job as it ends (no per-epoch lines, no Hydra launcher lines)
    job_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("l2lab: #")]
    assert job_lines == [f"l2lab: #1 lam=0.01: run {good.info.run_id[:8]}, 3 epochs  "
                         f"train/ce={good.data.metrics['train/ce']:.4f}  "
                         f"val/ce={good.data.metrics['val/ce']:.4f}  "
                         f"gap/ce={good.data.metrics['gap/ce']:.4f}  "
                         f"val/acc={good.data.metrics['val/acc']:.4f}  "
                         f"test/acc={good.data.metrics['test/acc']:.4f}"], r.stdout
    assert "epoch   0" not in r.stdout and "#0 :" not in r.stdout
    summary = pd.read_csv(tmp_path / "multirun" / "rej" / "report" / "summary.csv")
    assert summary["lam"].tolist() == [0.01]  # no row of n/a for the rejected λ


def test_an_optuna_search_minimises_val_ce(tmp_path, store, client):
    r = run_cli("l2lab.train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
                "hydra.sweeper.sampler.seed=1", "regularization.lam=tag(log, interval(1e-4, 3))",
                *TINY, f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/multirun/opt",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = children(client)
    assert len(runs) == 4 and all(x.info.status == "FINISHED" for x in runs)
    lams = [float(x.data.params["regularization.lam"]) for x in runs]
    assert len(set(lams)) == 4 and all(1e-4 <= lam <= 3 for lam in lams)
    best = min(runs, key=lambda x: x.data.metrics["val/ce"])
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params["best.regularization.lam"]) == pytest.approx(
        float(best.data.params["regularization.lam"]))
    assert float(parent.data.tags["l2lab.best_value"]) == pytest.approx(
        best.data.metrics["val/ce"])
    summary = pd.read_csv(tmp_path / "multirun" / "opt" / "report" / "summary.csv")
    assert len(summary) == 4 and summary["runs"].tolist() == [1, 1, 1, 1]
    assert "Optuna study (minimises final val/ce): best regularization.lam=" in r.stdout
    figs = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/lambda_curve.png" in figs


def test_reuse_trains_only_the_new_lambda(tmp_path, store, client):
    common = [*TINY, f"tracking.uri={store}"]
    r = run_cli("l2lab.train", "-m", "regularization.lam=0,0.1", *common,
                f"hydra.sweep.dir={tmp_path}/multirun/a", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    first = {x.data.params["regularization.lam"]: x for x in children(client)}
    r = run_cli("l2lab.train", "-m", "regularization.lam=0,0.1,1", "reuse=true", *common,
                f"hydra.sweep.dir={tmp_path}/multirun/b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    second = {x.data.params["regularization.lam"]: x
              for x in children(client, **{"l2lab.sweep_id": "b"})}
    assert sorted(second) == ["0.0", "0.1", "1.0"]
    for lam in ("0.0", "0.1"):  # listed, not trained: the original's numbers and curves
        listed, orig = second[lam], first[lam]
        assert listed.data.tags["l2lab.reused_from"] == orig.info.run_id
        assert listed.data.metrics == orig.data.metrics
        assert len(client.get_metric_history(listed.info.run_id, "val/ce")) == 3
        assert f"reused run {orig.info.run_id[:8]}" in r.stdout
    new = second["1.0"]
    assert "l2lab.reused_from" not in new.data.tags and new.info.status == "FINISHED"
    assert new.data.tags["l2lab.output_dir"].startswith(str(tmp_path / "multirun" / "b"))
    assert not (tmp_path / "multirun" / "b" / "0" / "checkpoints").exists()  # nothing trained
    summary = pd.read_csv(tmp_path / "multirun" / "b" / "report" / "summary.csv")
    assert [f"{x:g}" for x in summary["lam"]] == ["0", "0.1", "1"]
    assert summary.loc[0, "val/ce_mean"] == pytest.approx(first["0.0"].data.metrics["val/ce"])
    # without reuse (the default) the same job trains again
    train(make_cfg(f"tracking.uri={store}", "regularization.lam=0.1"), output_dir=tmp_path / "c")
    assert len([x for x in children(client)
                if x.data.params["regularization.lam"] == "0.1"]) == 3


def test_compare_groups_by_config_and_does_not_pool_repeats(tmp_path, store, client, capsys):
    for seed in (0, 1):
        train(make_cfg(f"tracking.uri={store}", f"seed={seed}"),
              overrides=[f"seed={seed}"], output_dir=tmp_path / f"s{seed}")
    train(make_cfg(f"tracking.uri={store}", "regularization.lam=0.3"),
          overrides=["regularization.lam=0.3"], output_dir=tmp_path / "l")
    with pytest.raises(l2lab.ConfigError):
        train(make_cfg(f"tracking.uri={store}", "regularization.lam=-2"),
              overrides=["regularization.lam=-2"], output_dir=tmp_path / "bad")
    orig = next(x for x in runs_of(client) if x.data.params.get("seed") == "1"
                and x.data.params["regularization.lam"] == "0.001")
    assert reproduce.main([orig.info.run_id, "--tracking-uri", store,
                           "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert compare.main(["--experiment", "digits-mlp", "--tracking-uri", store,
                         "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "cmp" / "summary.csv")
    # two rows by config (λ), the seeds pooled, the reproduction not counted as a third seed
    assert summary["lam"].tolist() == [0.001, 0.3] and summary["runs"].tolist() == [2, 1]
    assert "Left out 1 run(s) that repeat a selected run (reproduction" in out
    assert "1 run(s) never trained" in out and "n/a" not in out
    assert "lam=-2" not in out  # the rejected run is counted, not listed

    # the same runs as a DataFrame, and as csv/json from compare
    df = l2lab.load_runs(experiment="digits-mlp", tracking_uri=store)
    assert len(df) == 5
    for col in ("run_id", "run_name", "status", "sweep_id", "regularization.lam", "seed",
                "optimizer.lr", "val/ce", "train/ce", "gap/ce", "best_val_ce", "best_epoch"):
        assert col in df.columns, col
    assert sorted(df["status"]) == ["FAILED", "FINISHED", "FINISHED", "FINISHED", "FINISHED"]
    ok = df[df["status"] == "FINISHED"]
    assert (ok["best_val_ce"] <= ok["val/ce"] + 1e-12).all()
    rid = orig.info.run_id
    history = [m.value for m in client.get_metric_history(rid, "val/ce")]
    row = df.set_index("run_id").loc[rid]
    assert row["best_val_ce"] == min(history) and row["best_epoch"] == history.index(min(history))
    assert row["seed"] == 1 and row["regularization.lam"] == pytest.approx(0.001)
    assert df[df["reproduced_from"] == rid].shape[0] == 1
    assert compare.main(["--experiment", "digits-mlp", "--tracking-uri", store,
                         "--format", "csv"]) == 0
    back = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert sorted(back["run_id"]) == sorted(df["run_id"]) and "best_val_ce" in back.columns
    assert compare.main(["--experiment", "digits-mlp", "--tracking-uri", store,
                         "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and {r["run_id"] for r in rows} == set(df["run_id"])
    assert len(l2lab.load_runs(run_ids=[rid], tracking_uri=store)) == 1


def test_download_script_explains_itself_and_fails_cleanly_offline(tmp_path):
    script = ROOT / "scripts" / "download_data.py"
    assert os.access(script, os.X_OK) and os.access(ROOT / "scripts" / "gpu_check.sh", os.X_OK)
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "data.root" in r.stdout and "cifar10" in r.stdout
    r = subprocess.run([sys.executable, str(script), "svhn"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown dataset(s) svhn" in r.stderr
    # no network: every connection goes to a closed local port
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, str(script), "mnist", "--root", str(tmp_path / "d")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "mnist: download failed" in r.stderr and "1 of 1 failed" in r.stderr
    assert "Traceback" not in r.stderr


def test_gpu_check_refuses_to_pass_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh runs for real there")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                       timeout=300)
    assert r.returncode == 3 and "no CUDA device" in r.stderr

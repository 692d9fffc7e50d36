"""Reproduction, interrupts, divergence, parallel jobs and an unreachable server."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, make_cfg, run_cli, runs_of

from l2lab import ConfigError, reproduce
from l2lab.train import train


def _history(client, rid: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(rid, key))


def test_reproduce_check_gives_identical_final_metrics(tmp_path, store, client, capsys):
    cfg = make_cfg(f"tracking.uri={store}", "regularization.lam=0.02", "model.dropout=0.1")
    train(cfg, overrides=["regularization.lam=0.02"], output_dir=tmp_path / "orig")
    (orig,) = runs_of(client)
    rc = reproduce.main([orig.info.run_id, "--check", "--tracking-uri", store,
                         "--out", str(tmp_path / "again")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "CPU, exact" in out and " NO" not in out and "val/ce" in out
    (new,) = runs_of(client, **{"l2lab.reproduced_from": orig.info.run_id})
    assert new.info.run_id != orig.info.run_id and new.info.status == "FINISHED"
    assert new.data.metrics == orig.data.metrics
    assert new.data.params["regularization.lam"] == "0.02"
    for key in ("val/ce", "weights/sq_norm_total"):
        assert [m.value for m in client.get_metric_history(new.info.run_id, key)] == \
            [m.value for m in client.get_metric_history(orig.info.run_id, key)]


def test_reproduce_check_fails_when_metrics_differ():
    rows = reproduce.compare_metrics({"val/ce": 0.5, "val/acc": 0.9},
                                     {"val/ce": 0.5000001, "val/acc": 0.9}, rtol=0.0)
    assert [r[3] for r in rows] == [True, False]  # sorted: val/acc, val/ce
    rows = reproduce.compare_metrics({"val/ce": 0.5}, {"val/ce": 0.5000001}, rtol=1e-4)
    assert rows[0][3]


@pytest.mark.parametrize("yaml_text, where", [
    ("model:\n  _target_: os.system\n  name: x\n", "as written"),
    ("evil: builtins.eval\nmodel:\n  _target_: ${evil}\n", "as written"),
    ('src: "{_target_: os.system}"\nmodel: ${oc.create:${src}}\n', "after resolving"),
    ("optimizer:\n  _target_: torch.hub.load\n", "as written"),
    ("x:\n  - _target_: subprocess.run\n", "as written"),
])
def test_foreign_targets_are_refused_before_anything_runs(yaml_text, where):
    with pytest.raises(ConfigError) as e:
        reproduce.safe_config(yaml_text)
    assert "refusing to reproduce" in str(e.value) and where in str(e.value)


def test_reproduce_refuses_a_tampered_copy(tmp_path, store, client, capsys):
    train(make_cfg(f"tracking.uri={store}"), output_dir=tmp_path / "orig")
    (orig,) = runs_of(client)
    text = Path(client.download_artifacts(orig.info.run_id, "config/config.yaml",
                                          str(tmp_path))).read_text()
    tampered = text.replace("_target_: torch.optim.SGD", "_target_: os.system")
    assert tampered != text
    copy = client.create_run(orig.info.experiment_id, run_name="tampered copy")
    client.log_text(copy.info.run_id, tampered, "config/config.yaml")
    client.log_text(copy.info.run_id, "[]\n", "config/overrides.yaml")
    client.set_terminated(copy.info.run_id)
    rc = reproduce.main([copy.info.run_id, "--tracking-uri", store])
    assert rc == 2
    err = capsys.readouterr().err
    assert "optimizer._target_ = 'os.system'" in err and "refusing" in err
    assert not runs_of(client, **{"l2lab.reproduced_from": copy.info.run_id})


def _wait_for_epochs(client, n: int, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        runs = runs_of(client) if Path(client.tracking_uri[len("sqlite:///"):]).exists() else []
        if runs and len(_history(client, runs[0].info.run_id)) >= n:
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError("training did not reach the epochs in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_marks_killed_keeps_epochs_and_resume_completes(tmp_path, store, client, sig):
    args = [sys.executable, "-m", "l2lab.train", f"tracking.uri={store}", *TINY,
            "trainer.max_epochs=400", "data.train_size=600", "data.batch_size=20",
            "tracking.flush_every_s=0.5"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    rid = _wait_for_epochs(client, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    signame = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err[-2000:]  # as a shell reports a signal's end
    run = client.get_run(rid)
    assert run.info.status == "KILLED", err[-2000:]
    # the reason names the signal (not Lightning's SystemExit), and no traceback
    assert run.data.tags["l2lab.failure"] == f"interrupted ({signame})"
    assert "Traceback" not in err and "SystemExit" not in err
    steps = _history(client, rid)
    e = len(steps)
    assert e >= 3 and steps == list(range(e))  # what was logged stays, no gaps
    # one line says what happened and how to go on; it is also in the run's train.log
    name = run.data.tags["mlflow.runName"]
    said = f"run {rid} ({name}) KILLED after {e} of 400 epochs (interrupted ({signame})"
    hint = f"{sys.executable} -m l2lab.train resume={rid}"
    assert said in err and hint in err, err[-2000:]
    (log,) = (tmp_path / "outputs").glob("*/train.log")
    assert said in log.read_text() and f"resume={rid}" in log.read_text()
    if sig != signal.SIGINT:
        return
    # the hint, pasted into a shell whose PATH has no virtualenv, continues the same run
    pasted = subprocess.Popen(["bash", "-c", f"exec {hint}"], cwd=tmp_path, text=True,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while client.get_run(rid).info.status != "RUNNING" and time.time() < deadline:
        assert pasted.poll() is None, pasted.communicate()[1][-2000:]
        time.sleep(0.2)
    _wait_for_epochs(client, e + 1, pasted)
    pasted.send_signal(signal.SIGINT)
    out, err = pasted.communicate(timeout=120)
    assert f"resuming run {rid} ({name}) from epoch" in out, (out + err)[-2000:]
    assert pasted.returncode == 130 and client.get_run(rid).info.status == "KILLED"
    e = len(_history(client, rid))
    # trained to another length than its params say: a new run continues it
    r = run_cli("l2lab.train", f"resume={rid}", f"trainer.max_epochs={e + 3}",
                f"tracking.uri={store}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"continuing run {rid} ({name}, KILLED after" in r.stdout, r.stdout[-2000:]
    (new,) = runs_of(client, **{"l2lab.continued_from": rid})
    nid = new.info.run_id
    assert f"FINISHED after {e + 3} epochs" in r.stdout
    assert new.info.status == "FINISHED" and new.data.params["trainer.max_epochs"] == str(e + 3)
    for key in ("train/loss", "val/ce", "weights/sq_norm_total"):
        assert _history(client, nid, key) == list(range(e + 3)), key  # each step exactly once
    old = client.get_run(rid)
    assert old.info.status == "KILLED" and old.data.tags["l2lab.continued_by"] == nid
    assert _history(client, rid) == list(range(e))  # the old run is left as it was
    # resuming a FINISHED run: a clear message and how to train longer; nothing changes
    r = run_cli("l2lab.train", f"resume={nid}", f"tracking.uri={store}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run {nid} ({new.data.tags['mlflow.runName']}) is FINISHED: {e + 3} of " \
        f"{e + 3} epochs trained, nothing to resume" in r.stdout, r.stdout[-2000:]
    assert f"resume={nid} trainer.max_epochs={e + 13}" in r.stdout
    assert len(runs_of(client)) == 2
    # resuming with another λ is refused, naming the key
    r = run_cli("l2lab.train", f"resume={rid}", "regularization.lam=0.5",
                f"tracking.uri={store}", cwd=tmp_path)
    assert r.returncode == 2 and "regularization.lam" in r.stderr and "resume" in r.stderr


def test_non_finite_loss_fails_the_run_with_the_reason(tmp_path, store, client):
    r = run_cli("l2lab.train", f"tracking.uri={store}", *TINY, "optimizer.lr=1e6",
                "trainer.max_epochs=20", cwd=tmp_path)
    assert r.returncode != 0
    m = re.search(r"non-finite loss at epoch (\d+): train/loss=(nan|inf)", r.stderr)
    assert m and "Traceback" not in r.stderr, r.stderr[-2000:]
    (run,) = runs_of(client)
    assert run.info.status == "FAILED"
    assert m.group(0) in run.data.tags["l2lab.failure"]
    # stopped at once: the epochs before the divergence are logged, nothing after
    assert _history(client, run.info.run_id) == list(range(int(m.group(1))))


def test_parallel_sweep_writes_every_job_into_one_fresh_store(tmp_path, store, client):
    r = run_cli("l2lab.train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                "regularization.lam=0,0.01,0.1,1", *TINY, f"tracking.uri={store}",
                f"hydra.sweep.dir={tmp_path}/multirun/par", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "database is locked" not in r.stderr and "duplicate column" not in r.stderr
    runs = [x for x in runs_of(client) if x.data.tags.get("l2lab.role") != "sweep"]
    assert len(runs) == 4 and all(x.info.status == "FINISHED" for x in runs)
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    assert all(x.data.tags["mlflow.parentRunId"] == parent.info.run_id for x in runs)
    for x in runs:
        for key in ("train/ce", "val/ce", "weights/sq_norm_total"):
            assert _history(client, x.info.run_id, key) == [0, 1, 2]


def test_unreachable_tracking_server_fails_fast(tmp_path):
    t0 = time.monotonic()
    r = run_cli("l2lab.train", "tracking.uri=http://127.0.0.1:9", *TINY, cwd=tmp_path,
                timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2
    assert "tracking.uri" in r.stderr and "http://127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 15, elapsed  # the contract's bound (design.md §6), not a benchmark
    assert not (tmp_path / "mlruns").exists()
    r = run_cli("l2lab.train", "-m", "regularization.lam=0,1", "tracking.uri=http://127.0.0.1:9",
                *TINY, f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "no MLflow tracking server answers" in r.stderr
    assert "Launching" not in r.stdout + r.stderr  # the sweep stopped before any job

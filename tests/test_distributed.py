"""Multi-device training (Lightning DDP on 2 CPU processes, gloo): one MLflow run, the numbers of
one process, interrupt and resume, refused settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_cfg, run_cli, runs_of

from l2lab import ConfigError
from l2lab.train import train

# Sizes that do not divide evenly: the last global batch (41 = 121 - 2*40) and the validation
# set (61) give the two ranks shards of different sizes.
DDP = ["data.train_size=121", "data.val_size=61", "data.batch_size=40", "model.hidden=[32]",
       "regularization.lam=0.5", "trainer.accelerator=cpu"]
KEYS = ("train/ce", "val/ce", "train/l2", "train/acc", "val/acc", "weights/sq_norm_total")


def _history(client, rid: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(rid, key))


def _ranks_alive(tmp_path: Path) -> list[int]:
    """PIDs of DDP ranks started for runs under tmp_path (their command names a handoff there)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "l2lab.run.ddp_worker" in cmd and str(tmp_path) in cmd:
            pids.append(int(d.name))
    return pids


def test_two_processes_give_the_numbers_of_one_in_one_run(tmp_path, store, client):
    one = train(make_cfg(*DDP, "trainer.max_epochs=4", f"tracking.uri={store}", tiny=False),
                output_dir=tmp_path / "one")
    (ref,) = runs_of(client)
    r = run_cli("l2lab.train", *DDP, "trainer.max_epochs=4", "trainer.devices=2",
                f"tracking.uri={store}", f"hydra.run.dir={tmp_path}/two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = runs_of(client)
    assert len(runs) == 2  # the 1-process reference and exactly one run for the 2 ranks
    (two,) = [x for x in runs if x.info.run_id != ref.info.run_id]
    assert two.info.status == "FINISHED"
    assert two.data.params["trainer.devices"] == "2"
    for key in ("train/ce", "val/ce", "train/l2"):
        assert two.data.metrics[key] == pytest.approx(one[key], rel=1e-3), key
    for key in KEYS:  # the whole per-epoch history, each epoch once
        h1, h2 = _history(client, ref.info.run_id, key), _history(client, two.info.run_id, key)
        assert [s for s, _ in h2] == [0, 1, 2, 3], key
        assert [v for _, v in h2] == pytest.approx([v for _, v in h1], rel=1e-3), key
    # training moved: this is not two copies of an untrained network
    assert two.data.metrics["train/ce"] < _history(client, two.info.run_id, "train/ce")[0][1]
    assert r.stdout.count(" in experiment ") == 1 and not _ranks_alive(tmp_path)


def _wait_for_epochs(client, n: int, proc: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        runs = runs_of(client) if Path(client.tracking_uri[len("sqlite:///"):]).exists() else []
        if runs and len(_history(client, runs[0].info.run_id, "train/loss")) >= n:
            return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError("training did not reach the epochs in time")


def test_sigterm_ends_the_run_killed_and_resume_continues_on_two_ranks(tmp_path, store,
                                                                         client):
    args = [sys.executable, "-m", "l2lab.train", *DDP, "trainer.max_epochs=2000",
            "trainer.devices=2", f"tracking.uri={store}", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rid = _wait_for_epochs(client, 2, proc)
    assert len(_ranks_alive(tmp_path)) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    run = client.get_run(rid)
    assert run.info.status == "KILLED", err[-2000:]
    assert run.data.tags["l2lab.failure"] == "interrupted (SIGTERM)"
    assert not _ranks_alive(tmp_path)  # rank 1 did not outlive rank 0
    e = len(_history(client, rid, "train/loss"))
    r = run_cli("l2lab.train", f"resume={rid}", f"trainer.max_epochs={e + 2}",
                f"tracking.uri={store}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # trained to another length than its params say: a new run continues it, on two ranks too
    (new,) = runs_of(client, **{"l2lab.continued_from": rid})
    assert new.info.status == "FINISHED" and len(runs_of(client)) == 2
    assert new.data.params["trainer.devices"] == "2"
    for key in ("train/loss", "val/ce"):
        assert [s for s, _ in _history(client, new.info.run_id, key)] == list(range(e + 2)), key


@pytest.mark.parametrize("override, key", [
    ("trainer.num_nodes=2", "trainer.num_nodes"),
    ("trainer.strategy=ddp_spawn", "trainer.strategy"),
])
def test_settings_that_cannot_work_are_refused_before_training(store, client, tmp_path,
                                                                override, key):
    cfg = make_cfg("trainer.devices=2", "trainer.accelerator=cpu", override,
                   f"tracking.uri={store}")
    with pytest.raises(ConfigError) as e:
        train(cfg, output_dir=tmp_path / "bad")
    assert key in str(e.value)
    (run,) = runs_of(client)
    assert run.info.status == "FAILED" and key in run.data.tags["l2lab.failure"]
    assert not run.data.metrics

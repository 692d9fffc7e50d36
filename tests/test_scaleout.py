"""Sweeps through the launchers of existing engines (Ray, submitit) and into a team store
(``scripts/mlflow_server.sh``: mlflow server on a real PostgreSQL)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, runs_of, wait_healthy
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from l2lab import CONF_DIR, compare

ROOT = CONF_DIR.parent
JOB = ["data.train_size=120", "data.val_size=60", "data.batch_size=40", "model.hidden=[32]",
       "trainer.max_epochs=3"]


def check_sweep(client: MlflowClient, r: subprocess.CompletedProcess, tmp_path: Path,
                lams: tuple[str, ...] = ("0.0", "0.1")) -> None:
    """One FINISHED parent, one FINISHED child per λ with every epoch logged, and the summary."""
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    assert parent.info.status == "FINISHED"
    children = runs_of(client, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(c.data.params["regularization.lam"] for c in children) == sorted(lams)
    for c in children:
        assert c.info.status == "FINISHED"
        for key in ("train/ce", "val/ce", "weights/sq_norm_total"):
            steps = [m.step for m in client.get_metric_history(c.info.run_id, key)]
            assert sorted(steps) == [0, 1, 2], key
    df = pd.read_csv(client.download_artifacts(parent.info.run_id, "summary.csv",
                                               str(tmp_path)))
    assert [f"{x:g}" for x in df["lam"]] == [f"{float(x):g}" for x in sorted(lams, key=float)]
    by_lam = {c.data.params["regularization.lam"]: c.data.metrics["val/ce"] for c in children}
    assert df["val/ce_mean"].tolist() == pytest.approx([by_lam[x] for x in sorted(lams,
                                                                                 key=float)])
    assert "lam" in r.stdout and "val/ce" in r.stdout


@pytest.mark.parametrize("launcher, target", [
    ("ray", "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_presets_compose(launcher, target):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    hl = cfg.hydra.launcher
    assert hl._target_ == target
    if launcher == "ray":
        assert hl.ray.init.address is None and hl.ray.remote.num_gpus == 0
        assert hl.ray.remote.num_cpus == 1
    else:
        assert hl.tasks_per_node == 1 and hl.nodes == 1


def test_ray_sweep_has_parent_children_and_summary(tmp_path, store, client):
    r = run_cli("l2lab.train", "-m", "hydra/launcher=ray",
                "+hydra.launcher.ray.init.num_cpus=2",
                "+hydra.launcher.ray.init.include_dashboard=false",
                "regularization.lam=0,0.1", *JOB, f"tracking.uri={store}",
                f"hydra.sweep.dir={tmp_path}/multirun/ray", cwd=tmp_path,
                env={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    check_sweep(client, r, tmp_path)
    assert "Ray Launcher is launching 2 jobs" in r.stdout + r.stderr


def test_submitit_local_sweep_has_parent_children_and_summary(tmp_path, store, client):
    r = run_cli("l2lab.train", "-m", "hydra/launcher=submitit_local",
                "regularization.lam=0,0.1", *JOB, f"tracking.uri={store}",
                f"hydra.sweep.dir={tmp_path}/multirun/sub", cwd=tmp_path)
    check_sweep(client, r, tmp_path)
    logs = glob.glob(f"{tmp_path}/multirun/sub/.submitit/*/*_log.out")
    assert len(logs) == 2  # each job ran as its own submitit job


# -- the team store ------------------------------------------------------------------------------
def _postgres_missing() -> str | None:
    if not (shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb")):
        return "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmd:
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return pids


def stop_server(server: subprocess.Popen, pg_dir: Path, port: int) -> list[int]:
    """Stop ``scripts/mlflow_server.sh`` (SIGTERM: it stops mlflow, then PostgreSQL), kill what
    it left behind and remove its data folder; returns the processes it left (none expected)."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    leftovers = _pids_with(str(pg_dir)) + _pids_with(f"--port {port}")
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(pg_dir, ignore_errors=True)
    return leftovers


@pytest.mark.skipif(bool(_postgres_missing()), reason=_postgres_missing() or "")
def test_parallel_sweep_into_mlflow_server_on_postgresql(tmp_path):
    port = _free_port()
    pg_dir = Path(f"/tmp/l2lab-pg-test-{os.getpid()}-{port}")  # postgres must enter it
    server = subprocess.Popen(
        [str(ROOT / "scripts" / "mlflow_server.sh"), "--local", "--dir", str(pg_dir),
         "--port", str(port), "--artifacts", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, server, 240, server.stdout.read)
        r = run_cli("l2lab.train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                    "regularization.lam=0,0.1", *JOB,
                    f"hydra.sweep.dir={tmp_path}/multirun/pg", cwd=tmp_path,
                    env={"MLFLOW_TRACKING_URI": uri})
        client = MlflowClient(uri)
        check_sweep(client, r, tmp_path)
        (child, *_) = runs_of(client, **{"l2lab.sweep_id": "pg"})
        assert client.list_artifacts(child.info.run_id, "model")  # artifacts served by it
        assert compare.main(["--tracking-uri", uri, "--sweep", "pg",
                             "--out", str(tmp_path / "cmp")]) == 0
        (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
        logged = pd.read_csv(client.download_artifacts(parent.info.run_id, "summary.csv",
                                                       str(tmp_path)))
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cmp" / "summary.csv"), logged)
    finally:
        leftovers = stop_server(server, pg_dir, port)
    assert not leftovers, "the server script left processes behind"

"""Sweeps through the launchers of existing engines (Ray, submitit) and into a team store
(``scripts/mlflow_server.sh``: mlflow server on a real PostgreSQL)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    TINY,
    check_sweep,
    free_port,
    postgres_missing,
    run_cli,
    runs_of,
    stop_server,
    wait_healthy,
)
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from l2lab import CONF_DIR, compare

ROOT = CONF_DIR.parent


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


@pytest.mark.slow
def test_ray_sweep_has_parent_children_and_summary(tmp_path, store, client):
    r = run_cli("l2lab.train", "-m", "hydra/launcher=ray",
                "+hydra.launcher.ray.init.num_cpus=2",
                "+hydra.launcher.ray.init.include_dashboard=false",
                "regularization.lam=0,0.1", *TINY, f"tracking.uri={store}",
                f"hydra.sweep.dir={tmp_path}/multirun/ray", cwd=tmp_path,
                env={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    check_sweep(client, r, tmp_path)
    assert "Ray Launcher is launching 2 jobs" in r.stdout + r.stderr


def test_submitit_local_sweep_has_parent_children_and_summary(tmp_path, store, client):
    r = run_cli("l2lab.train", "-m", "hydra/launcher=submitit_local",
                "regularization.lam=0,0.1", *TINY, f"tracking.uri={store}",
                f"hydra.sweep.dir={tmp_path}/multirun/sub", cwd=tmp_path)
    check_sweep(client, r, tmp_path)
    logs = glob.glob(f"{tmp_path}/multirun/sub/.submitit/*/*_log.out")
    assert len(logs) == 2  # each job ran as its own submitit job


# -- the team store ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(bool(postgres_missing()), reason=postgres_missing() or "")
def test_parallel_sweep_into_mlflow_server_on_postgresql(tmp_path):
    port = free_port()
    pg_dir = Path(f"/tmp/l2lab-pg-test-{os.getpid()}-{port}")  # postgres must enter it
    server = subprocess.Popen(
        [str(ROOT / "scripts" / "mlflow_server.sh"), "--local", "--dir", str(pg_dir),
         "--port", str(port), "--artifacts", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # this interpreter's mlflow, as the other server tests use
        env={**os.environ, "MLFLOW": str(Path(sys.executable).parent / "mlflow")})
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, server, 240, server.stdout.read)
        r = run_cli("l2lab.train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                    "regularization.lam=0,0.1", *TINY,
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

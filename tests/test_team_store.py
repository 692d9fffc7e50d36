"""A team store that lets in only its team: ``scripts/mlflow_server.sh`` with MLflow's basic-auth
app on a real PostgreSQL (``--local``: a throwaway one, loopback only), users made with
``scripts/mlflow_users.py``, and jobs that log in with MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, which must never be written anywhere.

One server for the module (starting it takes most of the time); the checks that need no server
come first."""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY, check_sweep, free_port, postgres_missing, run_cli, runs_of, stop_server
from mlflow.tracking import MlflowClient

from l2lab import CONF_DIR, ConfigError, compare
from l2lab.tracking import store

ROOT = CONF_DIR.parent
SERVER_SH = str(ROOT / "scripts" / "mlflow_server.sh")
USERS_PY = str(ROOT / "scripts" / "mlflow_users.py")
MLFLOW_BIN = str(Path(sys.executable).parent / "mlflow")  # the server of this test's venv
VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(autouse=True)
def _no_env_login(monkeypatch):
    """A developer's own login must not leak into these tests."""
    for name in VARS:
        monkeypatch.delenv(name, raising=False)


def _script(*args: str, env: dict | None = None, timeout: float = 60):
    full = {k: v for k, v in os.environ.items() if k not in VARS}
    return subprocess.run([SERVER_SH, *args], capture_output=True, text=True, timeout=timeout,
                          env={**full, "MLFLOW": MLFLOW_BIN, **(env or {})})


# -- no server needed ----------------------------------------------------------------------------
def test_server_script_help_is_its_usage_only():
    r = _script("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("A team's MLflow store")
    assert "--admin-password-file" in r.stdout and "--no-auth" in r.stdout
    assert "set -euo" not in r.stdout and "#" not in r.stdout


def test_beyond_loopback_the_script_wants_an_admin_password_file(tmp_path):
    t0 = time.monotonic()
    r = _script("--local", "--dir", str(tmp_path / "pg"), "--host", "0.0.0.0")
    assert r.returncode == 2
    assert "--admin-password-file" in r.stderr and "--no-auth" in r.stderr, r.stderr
    assert not (tmp_path / "pg").exists()  # refused before PostgreSQL or MLflow started
    assert time.monotonic() - t0 < 10
    r = _script("--local", "--host", "0.0.0.0", "--admin-password", "s3cret-on-argv")
    assert r.returncode == 2 and "--admin-password-file" in r.stderr
    weak = tmp_path / "weak"
    for text, why in (("password1234\n", "password1234"), ("short\n", "12 characters")):
        weak.write_text(text)
        r = _script("--local", "--host", "0.0.0.0", "--admin-password-file", str(weak))
        assert r.returncode == 2 and why in r.stderr, r.stderr


def test_no_auth_beyond_loopback_warns(tmp_path):
    # MLFLOW=/bin/false: the script runs up to starting the server, which then exits at once,
    # so that nothing listens beyond loopback during the test
    r = _script("--db", "postgresql://u:dbpass@127.0.0.1:1/mlflow", "--host", "0.0.0.0",
                "--no-auth", "--artifacts", str(tmp_path / "a"), env={"MLFLOW": "/bin/false"})
    assert "WARNING" in r.stdout and "without authentication" in r.stdout, r.stdout
    assert "dbpass" not in r.stdout + r.stderr  # the database's password is masked


def test_a_login_in_the_uri_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as e:
        store.resolve_uri("http://alice:hunter2-s3cret@mlflow.example:5000")
    msg = str(e.value)
    assert "hunter2-s3cret" not in msg and "http://mlflow.example:5000" in msg
    assert all(v in msg for v in VARS)


def test_ray_workers_get_the_login_through_ray_runtime_env_hook(monkeypatch):
    from ray._private.worker import _maybe_modify_runtime_env

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-for-the-workers")
    monkeypatch.setenv(store.RAY_HOOK, "l2lab.tracking.store.ray_runtime_env")
    env = _maybe_modify_runtime_env({"env_vars": {"OTHER": "1"}}, False)
    assert env["env_vars"] == {"OTHER": "1", "MLFLOW_TRACKING_USERNAME": "alice",
                               "MLFLOW_TRACKING_PASSWORD": "pw-for-the-workers"}


# -- the server ----------------------------------------------------------------------------------
def _rest(uri: str, path: str, login: tuple[str, str] | None = None, body: dict | None = None
          ) -> tuple[int, str]:
    request = urllib.request.Request(uri + path, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    if login:
        token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The authenticated store: an admin, a member (EDIT on digits-mlp) and a viewer (READ)."""
    if why := postgres_missing():
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("team")
    port = free_port()
    pg_dir = Path(f"/tmp/l2lab-pg-team-{os.getpid()}-{port}")  # postgres must enter it
    pw = {who: f"{who}-{secrets.token_urlsafe(12)}" for who in ("admin", "member", "viewer")}
    files = {who: _secret_file(tmp / f"{who}.pw", p) for who, p in pw.items()}
    (tmp / "tmpdir").mkdir()
    log = tmp / "server.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        server = subprocess.Popen(
            [SERVER_SH, "--local", "--dir", str(pg_dir), "--port", str(port), "--auth",
             "--admin-password-file", str(files["admin"]), "--artifacts", str(tmp / "artifacts"),
             "--", "--workers", "1"],  # one process: no worker restarts on a loaded machine
            cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW": MLFLOW_BIN, "TMPDIR": str(tmp / "tmpdir"),
                 # MLflow's GenAI job runners (7 huey processes): l2lab needs none
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"

    def answered() -> bool:
        try:
            return _rest(uri, "/api/2.0/mlflow/experiments/search?max_results=1",
                         ("admin", pw["admin"]))[0] == 200
        except OSError:  # not listening yet
            return False

    try:
        deadline = time.monotonic() + 600  # ~45 s on an idle 2-core machine
        while not answered():
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the authenticated server did not start"
            time.sleep(0.5)
        startup_s = time.monotonic() - t0
        print(f"\nauthenticated mlflow server on PostgreSQL: first admin request answered "
              f"{startup_s:.1f} s after start")
        users = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        for who, role in (("member", "member"), ("viewer", "viewer")):
            r = subprocess.run(
                [sys.executable, USERS_PY, "--admin-password-file", str(files["admin"]), "add",
                 who, "--password-file", str(files[who]), "--experiment", "digits-mlp",
                 "--role", role], capture_output=True, text=True, env=users, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
        pg_port = re.search(r"on 127\.0\.0\.1:(\d+)", log.read_text()).group(1)
        yield SimpleNamespace(uri=uri, pw=pw, tmp=tmp, log=log, pg_dir=pg_dir, pg_port=pg_port,
                              startup_s=startup_s)
    finally:
        leftovers = stop_server(server, pg_dir, port)
    assert not leftovers, "the server script left processes behind"
    # the private auth config (it holds the admin's password) is gone with the server
    assert not glob.glob(str(tmp / "tmpdir" / "l2lab-auth.*"))


@pytest.mark.slow  # the server (PostgreSQL + MLflow with auth): ~45 s to start
def test_the_store_needs_a_login(team):
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _rest(team.uri, search)[0] == 401
    assert _rest(team.uri, search, ("admin", "wrong-password-123"))[0] == 401
    assert _rest(team.uri, search, ("member", team.pw["viewer"]))[0] == 401
    assert _rest(team.uri, "/api/2.0/mlflow/runs/create", body={"experiment_id": "1"})[0] == 401
    status, text = _rest(team.uri, search, ("member", team.pw["member"]))
    assert status == 200 and "digits-mlp" in text


@pytest.mark.slow
def test_a_viewer_reads_but_cannot_write(team):
    viewer = ("viewer", team.pw["viewer"])
    status, text = _rest(team.uri, "/api/2.0/mlflow/experiments/get-by-name"
                                   "?experiment_name=digits-mlp", viewer)
    assert status == 200
    exp_id = json.loads(text)["experiment"]["experiment_id"]
    assert _rest(team.uri, "/api/2.0/mlflow/runs/create", viewer, {"experiment_id": exp_id}
                 )[0] == 403
    assert _rest(team.uri, "/api/2.0/mlflow/experiments/delete", viewer,
                 {"experiment_id": exp_id})[0] == 403


def _all_runs(uri: str, admin_pw: str, monkeypatch) -> list:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_pw)
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, max_results=1000)
    for name in VARS:
        monkeypatch.delenv(name)
    return runs


@pytest.mark.slow
def test_bad_logins_fail_before_training(team, tmp_path, monkeypatch):
    before = _all_runs(team.uri, team.pw["admin"], monkeypatch)
    cases = [  # (login, sweep?)
        ({}, False),
        ({"MLFLOW_TRACKING_USERNAME": "member", "MLFLOW_TRACKING_PASSWORD": "not-the-password"},
         False),
        ({"MLFLOW_TRACKING_USERNAME": "member", "MLFLOW_TRACKING_PASSWORD": "not-the-password"},
         True),
    ]
    for i, (login, sweep) in enumerate(cases):
        args = (["-m", "hydra/launcher=parallel", "regularization.lam=0,0.1",
                 f"hydra.sweep.dir={tmp_path}/sweep{i}"] if sweep
                else [f"hydra.run.dir={tmp_path}/run{i}"])
        t0 = time.monotonic()
        r = run_cli("l2lab.train", *args, *TINY, cwd=tmp_path, timeout=120,
                    env={"MLFLOW_TRACKING_URI": team.uri, **login})
        elapsed = time.monotonic() - t0
        print(f"bad login ({'sweep' if sweep else 'single run'}, "
              f"{'wrong password' if login else 'no login'}): error after {elapsed:.1f} s")
        assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
        assert all(v in r.stderr for v in VARS), r.stderr
        assert ("'member'" in r.stderr) == bool(login) and "401" in r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        out = r.stdout + r.stderr
        assert "train/ce=" not in out and not re.search(r"(?im)^epoch ", out)  # nothing trained
        assert not list(tmp_path.glob("**/checkpoints"))
        assert elapsed < 15, elapsed  # measured ~3 s (design.md §6's bound for a server)
    after = _all_runs(team.uri, team.pw["admin"], monkeypatch)
    assert len(after) == len(before)  # no run was created, so none is left RUNNING
    assert not [r for r in after if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_a_members_parallel_sweep_and_no_password_anywhere(team, tmp_path, monkeypatch):
    login = {"MLFLOW_TRACKING_USERNAME": "member", "MLFLOW_TRACKING_PASSWORD": team.pw["member"]}
    r = run_cli("l2lab.train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                "regularization.lam=0,0.1", *TINY, f"hydra.sweep.dir={tmp_path}/multirun/team",
                cwd=tmp_path, env={"MLFLOW_TRACKING_URI": team.uri, **login})
    for name, value in login.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(team.uri)
    check_sweep(client, r, tmp_path)
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    children = runs_of(client, **{"mlflow.parentRunId": parent.info.run_id})
    assert client.list_artifacts(children[0].info.run_id, "model")  # uploaded through the server
    assert compare.main(["--tracking-uri", team.uri, "--sweep", "team",
                         "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "summary.csv").exists()

    # The passwords (and the Authorization header that carries the member's) appear nowhere:
    # not in the store's or the users' database, the artifacts, the output folders, the logs.
    header = base64.b64encode(f"member:{team.pw['member']}".encode()).decode()
    secrets_ = [team.pw["member"], team.pw["admin"], header]
    dumps = []
    pg_dump = (sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump")) or ["pg_dump"])[-1]
    for db in ("mlflow", "mlflow_auth"):
        cmd = [pg_dump, "-h", "127.0.0.1", "-p", team.pg_port, "-U", "postgres", db]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        dump = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert dump.returncode == 0, dump.stderr
        dumps.append(dump.stdout)
    assert "digits-mlp" in dumps[0] and "member" in dumps[1]  # the dumps hold the data
    texts = {"pg_dump": "\n".join(dumps), "sweep output": r.stdout + r.stderr,
             "server log": team.log.read_text(),
             "postgres log": (team.pg_dir / "pgdata" / "server.log").read_text()}
    files = [p for d in (tmp_path, team.tmp / "artifacts") for p in Path(d).rglob("*")
             if p.is_file()]
    assert any(p.name == "state_dict.pt" for p in files)  # artifacts are among them
    assert any(p.parts[-2:] == (".hydra", "hydra.yaml") for p in files)  # Hydra's files too
    for p in files:
        texts[str(p)] = p.read_bytes().decode("latin-1")
    for where, text in texts.items():
        for secret in secrets_:
            assert secret not in text, f"a password is written in {where}"

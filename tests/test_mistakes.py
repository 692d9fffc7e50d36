"""What people type: run ids by prefix, misspelt options of a config group, a launcher whose
extra is missing. Each gets one paragraph and exit 2, fast, before anything heavy runs."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import run_cli

from l2lab import CONF_DIR, ConfigError
from l2lab.tracking.runs import resolve_run_id

IDS = ["abcdef01" + "0" * 24, "abcdef02" + "0" * 24, "123456ab" + "0" * 24]


@pytest.fixture
def id_store(tmp_path) -> str:
    """A store's ``runs`` table (the columns the lookup reads), with ids chosen to collide."""
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE runs (run_uuid TEXT, name TEXT, status TEXT, "
                    "lifecycle_stage TEXT, start_time INTEGER)")
        con.executemany("INSERT INTO runs VALUES (?, ?, 'KILLED', 'active', ?)",
                        [(rid, f"lam={i}", i) for i, rid in enumerate(IDS)])
        con.execute("INSERT INTO runs VALUES ('abcdef03', 'gone', 'FINISHED', 'deleted', 9)")
    return f"sqlite:///{db}"


def test_a_unique_prefix_of_six_or_more_is_the_run(id_store):
    assert resolve_run_id("123456", id_store) == IDS[2]
    assert resolve_run_id("ABCDEF01", id_store) == IDS[0]  # as copied from anywhere
    assert resolve_run_id(IDS[1], id_store) == IDS[1]


@pytest.mark.parametrize("given, said", [
    ("abcdef", f"'abcdef' matches 2 runs: {IDS[0]} (lam=0, KILLED); {IDS[1]} (lam=1, KILLED)"),
    ("fedcba98", "no run whose id starts with 'fedcba98'"),
    ("abc", "give the 32 hex digits or a unique prefix of at least 6"),
    ("lam=0.1", "is not a run id"),
])
def test_an_ambiguous_or_unknown_id_is_one_paragraph(id_store, given, said):
    with pytest.raises(ConfigError) as e:
        resolve_run_id(given, id_store, "resume")
    assert said in str(e.value) and str(e.value).startswith("resume: ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", [["l2lab.compare", "fedcba98"],
                                     ["l2lab.reproduce", "fedcba98"],
                                     ["l2lab.train", "resume=fedcba98"]])
def test_commands_refuse_an_unknown_id_in_one_paragraph(tmp_path, id_store, command):
    r = run_cli(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": id_store}, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no run whose id starts with 'fedcba98'" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("typo, closest", [
    ("data=mnsit", "data=mnist"),
    ("model=mpl", "model=mlp"),
    ("optimizer=adma", "optimizer=adam"),
    ("regularization=l2dense", "regularization=l2_dense"),
])
def test_a_misspelt_option_names_the_closest_and_the_groups_options(tmp_path, typo, closest):
    r = run_cli("l2lab.train", "-m", "seed=0,1", typo, cwd=tmp_path, timeout=60)
    group = typo.split("=")[0]
    # every option of the group, as conf/ has them (a preset added later is listed too)
    options = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
    assert closest.split("=")[1] in options.split(", ")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"Did you mean `{closest}`? Options of {group}: {options}." in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "mlruns").exists()


def test_valid_choices_pass_and_a_missing_plugin_names_its_extra(monkeypatch):
    from l2lab.config import cli

    cli.check_choices(["data=mnist1d", "model=mlp,cnn", "hydra/launcher=vectorized",
                       "experiment=lambda_search", "hydra/sweeper=optuna"])
    monkeypatch.setitem(cli._PLUGINS, ("hydra/launcher", "parallel"),
                        ("hydra_plugins.not_installed_launcher", "parallel"))
    monkeypatch.setitem(cli._PLUGINS, ("hydra/sweeper", "optuna"),
                        ("hydra_plugins.not_installed_sweeper", "optuna"))
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[parallel\]"'):
        cli.check_choices(["hydra/launcher=parallel"])
    # a preset that chooses the sweeper needs its extra too
    with pytest.raises(ConfigError, match=r'hydra/sweeper=optuna .*pip install -e "\.\[optuna\]"'):
        cli.check_choices(["experiment=lambda_search"])

"""Sweeps at scale: one composition per group of jobs (hydra/sweeper=grouped), and the vectorized
launcher's stacks trained on worker processes and as Ray tasks, recording what the serial
launcher records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, copy_store, make_cfg, run_cli, runs_of
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from hydra_plugins.l2lab_launchers.vectorized_launcher import HYDRA_JOB_KEYS
from hydra_plugins.l2lab_launchers.vectorized_launcher import to_yaml as launcher_yaml
from l2lab import CONF_DIR
from l2lab.config.composing import (
    SweepConfigs,
    YamlTemplate,
    dump_yaml,
    split,
    substitute,
    with_values,
)
from l2lab.config.stackable import (
    STACKED,
    group_key,
    member_lams,
    shape_key,
    task_config,
    valid_lams,
    values_of,
)
from l2lab.run.engine import fit_configs


def _loader_and_master(*overrides: str) -> tuple[ConfigLoaderImpl, DictConfig]:
    """Hydra's loader and the master config of `python -m l2lab.train -m OVERRIDES`."""
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    master = loader.load_configuration("train", overrides=list(overrides),
                                       run_mode=RunMode.MULTIRUN)
    return loader, master


def _batch(*sweep: str) -> list[list[str]]:
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(
        list(sweep)), None)
    return batch


def _node_types(cfg: DictConfig | ListConfig, path: str = "") -> dict[str, str]:
    """Every node's class, object type and element type: the schema's typing, not only values."""
    out = {path: f"{type(cfg).__name__}:{OmegaConf.get_type(cfg)}:{cfg._metadata.element_type}"}
    for key in (list(cfg.keys()) if isinstance(cfg, DictConfig) else range(len(cfg))):
        node = cfg._get_node(key)
        if isinstance(node, DictConfig | ListConfig):
            out.update(_node_types(node, f"{path}.{key}"))
        else:
            out[f"{path}.{key}"] = type(node).__name__
    return out


def test_jobs_that_differ_in_stackable_keys_are_derived_equal_to_their_composition():
    """3 λ × 2 seeds × 2 per-layer λ × 2 learning rates × 2 batch sizes: 2 compositions (one
    per batch size: the learning rate is a per-network setting) for 48 jobs, and every
    sampled derived config equals Hydra's own composition of that job, hydra node included
    (overrides.task, override_dirname, which here names the job's folder), node types included."""
    loader, master = _loader_and_master(
        "hydra/sweeper=grouped", "hydra/launcher=vectorized", "model=cnn",
        "hydra.sweep.subdir=${hydra.job.override_dirname}")
    batch = _batch("regularization.lam=0,1e-3,0.5", "seed=0,3",
                   "+regularization.lam_per_layer.fc1=0,0.25", "optimizer.lr=0.1,0.01",
                   "data.batch_size=32,64")
    assert len(batch) == 48
    configs = SweepConfigs(loader)
    configs.validate(master, batch)
    assert configs.compositions == 2  # one per batch size
    for overrides in batch[::5] + [batch[-1]]:
        derived = configs.take(master, overrides)
        composed = loader.load_sweep_config(master, list(overrides))
        assert OmegaConf.to_yaml(derived) == OmegaConf.to_yaml(composed), overrides
        assert _node_types(derived) == _node_types(composed)
        assert list(derived.hydra.overrides.task) == overrides
        assert derived.hydra.job.override_dirname == composed.hydra.job.override_dirname
        assert OmegaConf.is_struct(derived) and not OmegaConf.is_readonly(derived.hydra)
    assert configs.compositions == 2  # taking them composed nothing more
    # the launcher writes each stacked job's .hydra/ files with libyaml: the same documents
    assert yaml.safe_load(launcher_yaml(derived)) == yaml.safe_load(OmegaConf.to_yaml(derived))
    assert isinstance(configs.take(master, batch[3]).regularization.lam, float)


def test_a_member_is_its_derived_config_and_renders_its_documents():
    """Without a config of its own, a job is its composition plus its values: they make the
    config Hydra composes for it, its stack key, and (from templates) the very YAML documents
    of its config and hydra node; λ=0 stays as the schema converts it, λ=-1 trains alone."""
    loader, master = _loader_and_master("hydra/sweeper=grouped", "hydra/launcher=vectorized",
                                        "model=cnn")
    batch = _batch("regularization.lam=0,1e-3,-1", "seed=0,3",
                   "+regularization.lam_per_layer.fc1=0,0.25", "optimizer.lr=0.1,0.01",
                   "regularization.layers=[fc1],[fc1,out]", "model.activation=relu,tanh",
                   "model.hidden=[8],[16]")  # widths: member values (MLP, CNN)
    configs = SweepConfigs(loader)
    configs.validate(master, batch)
    templates: dict[int, tuple[YamlTemplate, YamlTemplate]] = {}
    for num, overrides in enumerate(batch):
        member = configs.member(master, overrides)
        full = configs.take(master, overrides)
        with open_dict(full):
            full.hydra.job.num = full.hydra.job.id = num
            full.hydra.runtime.output_dir = f"/sweep/{num}"
        task = OmegaConf.to_container(task_config(full))
        assert set(member.values) == set(values_of(task)) and set(member.values) <= set(STACKED)
        assert {"optimizer.lr", "model.dropout", "model.hidden"} <= set(member.values)
        own = OmegaConf.to_container(with_values(member.rep, member.values))
        own.pop("hydra")
        assert own == task and member.values["regularization.lam"] == full.regularization.lam
        assert member.task == list(full.hydra.overrides.task)
        assert member.dirname == full.hydra.job.override_dirname
        key = shape_key(OmegaConf.to_container(task_config(member.rep), resolve=True)) \
            if valid_lams(member_lams(member.values)) \
            else None
        assert key == group_key(full) and (key is None) == ("regularization.lam=-1" in overrides)
        if member.composition not in templates:
            rep = member.rep
            templates[member.composition] = (
                YamlTemplate({k: v for k, v in OmegaConf.to_container(rep).items()
                              if k != "hydra"}, list(member.values)),
                YamlTemplate({"hydra": OmegaConf.to_container(rep.hydra)}, HYDRA_JOB_KEYS))
        config_doc, hydra_doc = templates[member.composition]
        assert config_doc.render(member.values) == dump_yaml(task)
        assert hydra_doc.render({
            "hydra.job.num": num, "hydra.job.id": str(num),
            "hydra.job.override_dirname": member.dirname, "hydra.overrides.task": member.task,
            "hydra.runtime.output_dir": f"/sweep/{num}"}) == dump_yaml(
                {"hydra": OmegaConf.to_container(full.hydra)})
        assert yaml.safe_load(config_doc.render(member.values)) == yaml.safe_load(
            OmegaConf.to_yaml(task))
    assert len(templates) == 2 and configs.compositions == 2
    # a stacked value that is an interpolation: no member form, its own config as before
    configs.validate(master, [["seed=${data.split_seed}", "regularization.lam=0.5"]])
    assert configs.member(master, ["seed=${data.split_seed}", "regularization.lam=0.5"]) is None


def test_a_yaml_template_renders_what_dumping_gives_whatever_the_values():
    tree = {"a": {"b": "x", "c": [1, 2], "d": {"p": 1.0, "q": 2}}, "e": 0}
    template = YamlTemplate(tree, ["a.b", "a.c", "a.d", "e"])
    assert template.ok
    for values in (
        {"a.b": "y", "a.c": ["k=1", "j=2", "z"], "a.d": {"p": 0.5, "q": 3}, "e": 7},
        {"a.b": "'quoted' yes: no", "a.c": [1e-5, None, True], "a.d": {"p": 0, "q": 1}, "e": "1"},
        {"a.b": "two\nlines", "a.c": [], "a.d": {"q": 1, "p": 0}, "e": 1.0},  # fall back
        {"a.b": "a " * 80, "a.c": [{"x": 1}], "a.d": {}, "e": [1]},  # fall back
        {"a.b": {"nested": 1}, "a.c": "not a list", "a.d": {"p": 1, "r": 2}, "e": None},
    ):
        assert template.render(values) == dump_yaml(substitute(tree, values)), values
    assert tree == {"a": {"b": "x", "c": [1, 2], "d": {"p": 1.0, "q": 2}}, "e": 0}  # untouched


def test_every_value_is_still_type_checked_and_range_checks_stay_with_the_job():
    loader, master = _loader_and_master("hydra/sweeper=grouped")
    configs = SweepConfigs(loader)
    bad = ["regularization.lam=0.1", "seed=abc"]
    with pytest.raises(ConfigCompositionException) as hydra_says:
        loader.load_sweep_config(master, bad)
    with pytest.raises(ConfigCompositionException) as grouped_says:
        configs.validate(master, [["regularization.lam=0.1", "seed=1"], bad])
    assert str(grouped_says.value) == str(hydra_says.value) == "Error merging override seed=abc"
    assert configs.compositions == 2  # the representative, then Hydra's own word on the bad one
    configs.validate(master, [["regularization.lam=-1", "seed=2"], ["regularization.lam=nan",
                                                                    "seed=0"]])
    assert configs.compositions == 2  # composable: derived, and refused by the job (FAILED)
    assert configs.take(master, ["regularization.lam=-1", "seed=2"]).regularization.lam == -1.0


def test_overrides_that_touch_a_stacked_key_otherwise_are_composed():
    assert split(["seed=1", "~regularization.lam_per_layer"]) is not None  # no stacked per-layer
    assert split(["+regularization.lam_per_layer.fc1=1", "regularization.lam_per_layer={}"]) \
        is None
    assert split(["seed=1", "seed=2"]) is None
    assert split(["seed=${data.split_seed}", "regularization=none"])[0] == (
        "seed=<stacked>", "regularization=none")  # a group choice: applied before any value


def test_sweep_presets_use_the_grouped_sweeper():
    for preset in ("lambda_sweep", "mnist1d_sweep"):
        _, master = _loader_and_master(f"experiment={preset}")
        assert master.hydra.sweeper._target_.endswith("GroupedSweeper"), preset
        assert master.hydra.launcher._target_.endswith("VectorizedLauncher"), preset
        assert "regularization.lam" in master.hydra.sweeper.params


# -- stacks beyond one process -----------------------------------------------------------------
# 2 stacks (one per batch size: another data stream; an lr would stack) of 2 jobs
LAMS, SIZES = ("0", "0.1"), ("40", "20")
_TINY = [o for o in TINY if not o.startswith("data.batch_size=")]
SWEEP = ["-m", "hydra/launcher=vectorized", "hydra/sweeper=grouped",
         f"regularization.lam={','.join(LAMS)}", f"data.batch_size={','.join(SIZES)}", *_TINY]


def _read(client: MlflowClient, runs: list) -> dict[tuple[str, str], dict]:
    """Per job (λ, batch size): status, stack id, params but the store's URI, metric
    histories."""
    out = {}
    for c in runs:
        params = {k: v for k, v in c.data.params.items() if k != "tracking.uri"}
        out[(params["regularization.lam"], params["data.batch_size"])] = {
            "status": c.info.status, "group": c.data.tags.get("l2lab.vectorized_group"),
            "params": params,
            **{k: [(m.step, m.value) for m in sorted(client.get_metric_history(
                c.info.run_id, k), key=lambda m: m.step)] for k in c.data.metrics}}
    return out


@pytest.fixture(scope="module")
def serial(tmp_path_factory, store_template) -> dict[tuple[str, str], dict]:
    """The serial launcher's stacks: ``fit_configs`` in this process, as it calls it."""
    tmp = tmp_path_factory.mktemp("serial")
    store = copy_store(store_template, tmp)
    for bs in SIZES:
        ovs = [[f"regularization.lam={lam}", f"data.batch_size={bs}", *_TINY] for lam in LAMS]
        cfgs = [make_cfg(*ov, f"tracking.uri={store}", tiny=False) for ov in ovs]
        assert all(isinstance(r, dict) for r in fit_configs(
            cfgs, ovs, [tmp / f"{bs}-{lam}" for lam in LAMS]))
    client = MlflowClient(store)
    return _read(client, runs_of(client))


def _sweep(tmp_path, *extra: str) -> tuple[dict[tuple[str, str], dict], str]:
    """Run the sweep; its jobs as :func:`_read` gives them, and what it printed. The parent run
    ends FINISHED with its table and figures, as any sweep's. The store is new (no template):
    the worker processes create its schema together, as a user's first sweep does."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    r = run_cli("l2lab.train", *SWEEP, *extra, f"tracking.uri={store}",
                f"hydra.sweep.dir={tmp_path}/multirun", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    client = MlflowClient(store)
    (parent,) = runs_of(client, **{"l2lab.role": "sweep"})
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.csv",
                                                                          "figures"}
    assert "Sweep multirun: 4 runs" in r.stdout
    children = runs_of(client, **{"mlflow.parentRunId": parent.info.run_id})
    for c in children:  # Hydra's files of each job, as run_job writes them
        out = Path(c.data.tags["l2lab.output_dir"])
        written = {f: OmegaConf.load(out / ".hydra" / f) for f in
                   ("config.yaml", "hydra.yaml", "overrides.yaml")}
        assert str(written["config.yaml"].regularization.lam) == \
            c.data.params["regularization.lam"]
        assert written["hydra.yaml"].hydra.runtime.output_dir == str(out)
        assert list(written["overrides.yaml"]) == json.loads(c.data.tags["l2lab.overrides"])
        assert (out / "train.log").exists()
    return _read(client, children), r.stdout + r.stderr


def _same_as_serial(runs: dict, serial: dict) -> None:
    assert sorted(runs) == sorted(serial) and len(runs) == 4
    assert all(r["status"] == "FINISHED" for r in runs.values())
    assert len({r["group"] for r in runs.values()}) == 2  # 2 stacks, each of its 2 jobs
    for job, run in runs.items():
        keys = [k for k in serial[job] if "/" in k]
        assert "val/ce" in keys and "weights/sq_norm/fc1" in keys
        assert run["params"] == serial[job]["params"]
        for key in keys:  # CPU training is deterministic: the very same numbers
            once = key.startswith("test/")  # the digits' held-out split: at the last epoch
            assert [s for s, _ in run[key]] == ([2] if once else [0, 1, 2]), (job, key)
            assert run[key] == serial[job][key], (job, key)


def test_stacks_on_two_worker_processes_record_what_the_serial_launcher_does(tmp_path, serial):
    runs, printed = _sweep(tmp_path, "hydra.launcher.workers=2")
    assert "4 stacked in 2 group(s), trained on 2 worker processes" in printed
    _same_as_serial(runs, serial)


@pytest.mark.slow
def test_stacks_as_tasks_of_a_local_ray_instance_record_what_the_serial_launcher_does(
        tmp_path, serial):
    # a Ray task gets OMP_NUM_THREADS = its num_cpus; the CPU kernels' rounding follows the
    # thread count, so the task is given the serial run's threads to be compared exactly
    threads = torch.get_num_threads()
    runs, printed = _sweep(tmp_path, "hydra.launcher.backend=ray",
                           f"hydra.launcher.ray.init.num_cpus={max(2, threads)}",
                           f"hydra.launcher.ray.remote.num_cpus={threads}",
                           "+hydra.launcher.ray.init.include_dashboard=false")
    assert "4 stacked in 2 group(s), trained as Ray tasks" in printed
    _same_as_serial(runs, serial)


PROBE = """
import json
from hydra.experimental.callback import Callback


class Probe(Callback):
    def __init__(self, path):
        self.path = path

    def on_job_end(self, config, job_return, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({
                "num": config.hydra.job.num, "lam": config.regularization.lam,
                "bs": config.data.batch_size, "out": config.hydra.runtime.output_dir,
                "ret_lam": job_return.cfg.regularization.lam,
                "ret_num": job_return.hydra_cfg.hydra.job.num,
                "value": job_return.return_value}) + "\\n")
"""


def test_a_callback_with_job_hooks_sees_each_stacked_job_as_run_job_gives_it(tmp_path, serial):
    """A callback that acts at a job's end gets that job's own config and JobReturn (the
    launcher then makes each job's config; without such a callback it makes none)."""
    (tmp_path / "probe.py").write_text(PROBE)
    seen = tmp_path / "seen.jsonl"
    runs, _ = _sweep(tmp_path, "+hydra.callbacks.probe._target_=probe.Probe",
                     f"+hydra.callbacks.probe.path={seen}")
    _same_as_serial(runs, serial)
    lines = [json.loads(line) for line in seen.read_text().splitlines()]
    assert sorted(x["num"] for x in lines) == [0, 1, 2, 3]
    for x in lines:
        run = runs[(str(float(x["lam"])), str(x["bs"]))]
        assert x["ret_lam"] == x["lam"] and x["ret_num"] == x["num"]
        assert x["value"] == run["val/ce"][-1][1]
        assert x["out"] == str(tmp_path / "multirun" / str(x["num"]))

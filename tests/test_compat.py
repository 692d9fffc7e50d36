"""Every private name of MLflow, Hydra, OmegaConf, Lightning and torchmetrics that l2lab uses
(``l2lab/compat/``) imported and exercised, so that a release that moves or changes one fails
here, by name. And the launcher's copy of ``run_job``: a stacked job's ``.hydra/`` files equal
those Hydra's basic launcher writes for the same job."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import KNOWN, TINY, python_c, run_cli
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf, open_dict

from l2lab.compat import hydra as ch
from l2lab.compat import hydra_run_job as rj
from l2lab.compat import lightning as cl
from l2lab.compat import mlflow as cm
from l2lab.compat import mlflow_sqlite as cs
from l2lab.compat import omegaconf as co
from l2lab.compat import torchmetrics as ct

# A deprecation names the code that calls the deprecated name (``stacklevel``): a library's
# deprecation of a name l2lab uses is reported in l2lab's module, one inside a library in the
# library's. Both are errors here (pytest's module field is a regular expression matched from
# the start of the module's name); then the known third-party warnings, which win (later
# filters take precedence), stay ignored.
OURS = r"(l2lab|hydra_plugins\.l2lab_)"
LIBRARIES = r"(mlflow|hydra|omegaconf|pytorch_lightning|lightning_fabric|lightning)(\.|$)"
DEPRECATIONS_AS_ERRORS = (
    f"error::DeprecationWarning:{OURS}",
    f"error::FutureWarning:{OURS}",  # MLflow's and torch's deprecations are FutureWarnings
    f"error::DeprecationWarning:{LIBRARIES}",
    f"error::FutureWarning:{LIBRARIES}",
    "error::lightning_fabric.utilities.rank_zero.LightningDeprecationWarning",  # any module
    "error:(?s).*deprecated:UserWarning",  # OmegaConf's and Hydra's deprecations
)
pytestmark = [pytest.mark.filterwarnings(f) for f in (*DEPRECATIONS_AS_ERRORS, *KNOWN)]


@pytest.fixture(autouse=True)
def _hydra_deprecations_raise(monkeypatch):
    """Hydra's own switch: its deprecations raise ``HydraDeprecationError``, here and in the
    commands these tests start (they inherit the environment)."""
    monkeypatch.setenv("HYDRA_DEPRECATION_WARNINGS_AS_ERRORS", "1")


@pytest.mark.parametrize("module", ["l2lab.compat.mlflow", "hydra_plugins.l2lab_launchers",
                                    "mlflow.tracking.client", "hydra.core.utils",
                                    "omegaconf.omegaconf", "pytorch_lightning.trainer.trainer",
                                    "lightning_fabric.utilities"])
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_a_deprecation_in_l2lab_or_the_libraries_is_an_error_here(module, category):
    with pytest.raises(category):
        warnings.warn_explicit("old_name is deprecated", category, "x.py", 1, module=module)


def test_the_libraries_own_deprecation_channels_are_errors_here():
    from hydra._internal.deprecation_warning import deprecation_warning
    from hydra.errors import HydraDeprecationError
    from lightning_fabric.utilities.rank_zero import rank_zero_deprecation

    with pytest.raises(DeprecationWarning, match="gone"):  # from any module
        rank_zero_deprecation("gone in 2.7")
    with pytest.raises(HydraDeprecationError):
        deprecation_warning("gone in 1.4")
    with pytest.raises(UserWarning, match="register_resolver"):
        warnings.warn_explicit("register_resolver() is deprecated.", UserWarning, "x.py", 1,
                               module="omegaconf.omegaconf")


def quiet(r) -> None:
    """What a user sees of a command: no deprecation warning (run time quiets only
    ``console.KNOWN_WARNINGS``; Hydra's deprecations would have failed the command)."""
    assert not re.search(r"(Deprecation|Future)Warning|is deprecated", r.stderr), r.stderr[-3000:]


def test_known_third_party_warnings_and_others_modules_deprecations_stay_quiet():
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("The ``noload`` loader strategy is deprecated and will be removed",
                               DeprecationWarning, "x.py", 1,
                               module="mlflow.store.tracking.sqlalchemy_store")
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...",
                               FutureWarning, "x.py", 1,
                               module="pytorch_lightning.utilities._pytree")
        # another library's: shown (pytest's summary), not an error: none of compat/'s
        warnings.warn_explicit("x is deprecated", DeprecationWarning, "x.py", 1,
                               module="sklearn.utils")
    assert [str(w.message) for w in seen] == ["x is deprecated"]


@pytest.mark.parametrize("module,dist", [(cm, "mlflow"), (cs, "mlflow"), (ch, "hydra-core"),
                                         (co, "omegaconf"), (cl, "pytorch-lightning"),
                                         (rj, "hydra-core")])
def test_each_compat_module_names_the_minor_version_installed(module, dist):
    """The header's version is the installed minor: a new minor needs this module re-checked."""
    name, checked = module.CHECKED_WITH.split()
    assert name == dist
    installed = importlib.metadata.version(dist)
    assert installed.split(".")[:2] == checked.split(".")[:2], (installed, checked)


# -- MLflow ------------------------------------------------------------------------------------

def test_mlflow_store_schema_and_tables(tmp_path):
    from l2lab.tracking import tracker as tr

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr.connect(uri)  # creates the schema
    cm.check_all()
    store = cm.tracking_store(uri)
    assert type(store) is cm.sql_store_class()
    head = cm.head_revision()
    assert re.fullmatch(r"[0-9a-f]{12}", head)
    assert cm.schema_revision(store.engine) == head
    t = cm.sql_models()
    assert {m.__tablename__ for m in vars(t).values()} == {
        "experiments", "runs", "tags", "params", "metrics", "latest_metrics"}
    assert {"run_uuid", "key", "value", "timestamp", "step", "is_nan"} <= set(
        t.Metric.__table__.columns.keys())


def test_mlflow_runs_table_read_by_id_prefix_as_the_client_sees_it(tmp_path):
    """The ``runs`` table read without MLflow: the active runs whose id starts with a prefix,
    oldest first, as the public client finds them; a deleted run, a missing file and a database
    that is not a store give nothing."""
    from mlflow.tracking import MlflowClient

    from l2lab.tracking import tracker as tr

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr.connect(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    runs = [client.create_run(exp, run_name=f"r{i}", start_time=1000 + i).info for i in range(3)]
    client.set_terminated(runs[1].run_id, status="FAILED")
    client.delete_run(runs[2].run_id)
    db = tmp_path / "mlflow.db"
    assert {"run_uuid", "name", "status", "lifecycle_stage", "start_time"} <= set(
        cm.sql_models().Run.__table__.columns.keys())
    got = cs.sqlite_runs_with_prefix(db, "")
    assert got == [(runs[0].run_id, "r0", "RUNNING"), (runs[1].run_id, "r1", "FAILED")]
    for r in runs[:2]:
        want = [(x.info.run_id, x.info.run_name, x.info.status) for x in client.search_runs(
            [exp], filter_string=f"attributes.run_id LIKE '{r.run_id[:6]}%'")]
        assert cs.sqlite_runs_with_prefix(db, r.run_id[:6]) == want
    assert cs.sqlite_runs_with_prefix(db, runs[2].run_id) == []  # deleted
    assert cs.sqlite_runs_with_prefix(db, "g") == []
    assert cs.sqlite_runs_with_prefix(tmp_path / "absent.db", "") == []
    import sqlite3

    with sqlite3.connect(tmp_path / "other.db") as con:
        con.execute("CREATE TABLE t (x)")
    assert cs.sqlite_runs_with_prefix(tmp_path / "other.db", "") == []


def test_mlflow_validation_and_run_names():
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d+", cm.random_run_name())
    p = cm.validate_param("regularization.lam", "0.1", path="params[0]")
    assert (p.key, p.value) == ("regularization.lam", "0.1")
    t = cm.validate_tag("l2lab.role", "sweep", path="tags[0]")
    assert (t.key, t.value) == ("l2lab.role", "sweep")
    cm.validate_metric("val/ce", 0.5, 1, 0)
    for bad in (lambda: cm.validate_param("../p", "1", path="params[3]"),
                lambda: cm.validate_tag("../t", "1", path="tags[0]"),
                lambda: cm.validate_metric("../m", 1.0, 1, 0, path="metrics[2]")):
        with pytest.raises(MlflowException) as e:
            bad()
        assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match=r"metrics\[2\]"):
        cm.validate_metric("../m", 1.0, 1, 0, path="metrics[2]")
    with pytest.raises(MlflowException):
        cm.validate_metric("m", "abc", 1, 0)  # a value must be a number


def test_the_sqlite_writers_literals_are_mlflows_own_names():
    """What ``tracking/bulk/sqlite.py`` writes without importing MLflow, against MLflow."""
    from mlflow.entities import LifecycleStage, RunStatus, SourceType
    from mlflow.store.db.utils import _get_latest_schema_revision
    from mlflow.utils import validation as v
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
    from mlflow.utils.uri import append_to_uri_path

    assert (cs.RUN_NAME_TAG, cs.USER_TAG) == (MLFLOW_RUN_NAME, MLFLOW_USER)
    assert cs.ACTIVE == LifecycleStage.ACTIVE
    assert cs.SOURCE_UNKNOWN == SourceType.to_string(SourceType.UNKNOWN)
    assert cs.RUN_STATUSES == {RunStatus.to_string(s) for s in RunStatus.all_status()}
    assert (cs.MAX_KEY_LENGTH, cs.MAX_PARAM_VALUE_LENGTH, cs.MAX_TAG_VALUE_LENGTH) == (
        v.MAX_ENTITY_KEY_LENGTH, v.MAX_PARAM_VAL_LENGTH, v.MAX_TAG_VAL_LENGTH)
    assert _get_latest_schema_revision() in cs.KNOWN_REVISIONS
    assert importlib.metadata.version("mlflow") in cs.WRITER_CHECKED_WITH
    rid = "0123456789abcdef0123456789abcdef"
    for loc in ("file:///tmp/l2lab/mlruns/artifacts/1", "file:///tmp/a b/artifacts/2",
                "file:///tmp/x/", "file:///tmp//x", "/tmp/plain/3", "s3://bucket/p?q=1",
                "file:///tmp/x?y=1"):
        assert cs.run_artifact_uri(loc, rid) == append_to_uri_path(loc, rid, "artifacts"), loc
    for status in ("RUNNING", "FINISHED", "FAILED", "KILLED"):
        assert cs.run_status(status) == status
    with pytest.raises(Exception, match="Could not get run status"):
        cs.run_status("DONE")


#: names MLflow accepts, rejects, or cuts: the no-import checks must decide as MLflow or ask it
NAMES = ["regularization.lam", "train/ce", "weights/sq_norm/net.0", "a b:c-d_e", "x" * 250,
         "x" * 251, "", ".", "..", "../p", "/abs", "a//b", "a/./b", "a/", "tab\t", "nl\n",
         "ünïcode", "semi;colon", "a/../b"]
VALUES = ["0.1", "", "v" * 6000, "v" * 6001, "t" * 8001]  # cut at 6000 (params), 8000 (tags)


def test_the_sqlite_writers_checks_decide_as_mlflows_validation():
    """For each name and value: MLflow's ``_validate_*`` and the writer's check (which answers
    plainly valid input itself) raise the same error or store the same key and value."""
    def outcome(fn, *args, **kwargs) -> tuple:
        try:
            out = fn(*args, **kwargs)
        except MlflowException as e:
            return ("error", e.error_code, e.message)
        return ("ok", None if out is None else (out[0], out[1]) if isinstance(out, tuple)
                else (out.key, out.value))

    for name in NAMES:
        for value in VALUES:
            assert outcome(cs.checked_param, name, value, "params[0]") == \
                outcome(cm.validate_param, name, value, path="params[0]"), (name, value)
            assert outcome(cs.checked_tag, name, value, "tags[0]") == \
                outcome(cm.validate_tag, name, value, path="tags[0]"), (name, value)
        for value in (*VALUES, "e" * 20000, "e" * 20001):  # an experiment's: MLflow cuts none
            mine = outcome(cs.checked_experiment_tag, name, value)
            assert mine[0] != "ok" or mine[1] == (name, value)
            assert mine[:1 if mine[0] == "ok" else 3] == \
                outcome(cm.validate_experiment_tag, name, value)[:1 if mine[0] == "ok" else 3]
    key = "mlflow.trace.archivalRetention"  # a tag whose value MLflow checks further
    for value, ok in (('{"type": "duration", "value": "30d"}', "ok"), ("soon", "error")):
        assert outcome(cs.checked_experiment_tag, key, value)[0] == ok
        assert outcome(cm.validate_experiment_tag, key, value)[0] == ok
    for name in NAMES:
        for value, ts, step in ((0.5, 1, 0), (float("nan"), 0, 3), (1, 1, 0), (True, 1, 0),
                                (0.5, -1, 0), (0.5, 1, 2.5)):
            assert outcome(cs.check_metric, name, value, ts, step, "metrics[0]") == \
                outcome(cm.validate_metric, name, value, ts, step, path="metrics[0]"), \
                (name, value, ts, step)


# -- OmegaConf ---------------------------------------------------------------------------------

def test_omegaconf_str_representer_quotes_as_to_yaml_does():
    from l2lab.config.composing import dump_yaml

    tree = {"a": "true", "b": "1e-3", "c": "null", "d": "plain", "e": "0.1", "f": "${x}"}
    assert callable(co.yaml_str_representer())
    assert dump_yaml(tree) == OmegaConf.to_yaml(OmegaConf.create(tree))
    assert yaml.safe_load(dump_yaml(tree)) == tree  # strings stay strings


def test_omegaconf_child_node_leaves_interpolations_unresolved():
    cfg = OmegaConf.create({"x": 1, "y": "${x}", "z": {"w": 2}})
    assert co.child_node(cfg, "y")._value() == "${x}"
    assert OmegaConf.is_config(co.child_node(cfg, "z"))
    assert co.child_node(cfg, "x")._value() == 1


# -- torchmetrics (Lightning's import of it) ---------------------------------------------------

#: What torchmetrics imports at module level when it finds them installed, and l2lab never needs
#: for a run: 4 s of start-up on the 2-core CPU.
BACKENDS = ("torchvision", "scipy.signal", "matplotlib")


def _python(code: str, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (what a process imports is the subject) with warnings
    as errors; it prints one JSON line last."""
    import json

    full = {**os.environ, "PYTHONWARNINGS": "error", **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)
    out = python_c(code, env=full, cwd=cwd, timeout=600)
    return json.loads(out.strip().splitlines()[-1])


LOADED = f"[m for m in {BACKENDS!r} if m in sys.modules]"


@pytest.mark.slow
def test_lightning_imported_through_l2lab_skips_torchmetrics_optional_backends(tmp_path, store):
    """A run (Lightning's fit of an ``L2Module``, recorded in MLflow) in a process that imported
    l2lab first: none of torchmetrics' optional backends is imported, and torchvision is still
    there for l2lab's own models. The same process with the hook taken out (the control, so that
    this test fails without it) imports all three with Lightning."""
    overrides = [*TINY, f"tracking.uri={store}", "trainer.max_epochs=2"]
    run = f"""
import json, sys
from pathlib import Path
import l2lab
from hydra import compose, initialize_config_dir
from l2lab.train import train
with initialize_config_dir(config_dir=str(l2lab.CONF_DIR), version_base="1.3"):
    cfg = compose("train", overrides={overrides!r})
metrics = train(cfg, output_dir=Path("{tmp_path}") / "run")
import pytorch_lightning
loaded = {LOADED}
from l2lab.models import resnet18
net = resnet18((3, 32, 32), 10)
print(json.dumps({{"loaded": loaded, "val_ce": metrics["val/ce"],
                   "layers": len(list(net.modules()))}}))
"""
    control = f"""
import json, sys
import l2lab
from l2lab.compat import torchmetrics as ct
sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, ct._Finder)]
import pytorch_lightning
print(json.dumps({{"loaded": {LOADED}}}))
"""
    out = _python(run, cwd=tmp_path)
    assert out["loaded"] == [], out
    assert out["val_ce"] > 0 and out["layers"] > 50  # trained; torchvision's resnet18 built
    assert _python(control)["loaded"] == list(BACKENDS)


#: A stand-in torchmetrics with the two steps' places: the package asks lightning_utilities'
#: ``package_available("scipy")`` (and keeps the name), then imports its flags module.
FAKE_PACKAGE = """
from lightning_utilities.core.imports import package_available
SCIPY_AT_IMPORT = package_available("scipy")
from torchmetrics.utilities import imports
"""
ALL_FLAGS = "".join(f"{f} = True\n" for f in ct.OPTIONAL_BACKENDS) + "_TQDM_AVAILABLE = True\n"


def _fake_torchmetrics(root: Path, flags: str = ALL_FLAGS, package: str = FAKE_PACKAGE) -> dict:
    (root / "torchmetrics" / "utilities").mkdir(parents=True)
    (root / "torchmetrics" / "__init__.py").write_text(package)
    (root / "torchmetrics" / "utilities" / "__init__.py").write_text("")
    (root / "torchmetrics" / "utilities" / "imports.py").write_text(flags)
    return {"PYTHONPATH": os.pathsep.join([str(root), *sys.path])}


REPORT = """
import json, sys
import lightning_utilities.core.imports as lu
import torchmetrics
from torchmetrics.utilities import imports as i
print(json.dumps({"flags": {k: bool(v) for k, v in vars(i).items() if k.endswith("AVAILABLE")},
                  "scipy_at_import": torchmetrics.SCIPY_AT_IMPORT,
                  "restored": lu.package_available("scipy")
                              and torchmetrics.package_available is lu.package_available,
                  "hooks": [n for f in sys.meta_path if (n := type(f).__name__) == "_Finder"]}))
"""
AS_LIGHTNING = "import l2lab, sys, types; sys.modules['lightning_fabric'] = types.ModuleType('x')\n"


def test_torchmetrics_imported_by_lightning_has_its_optional_backends_off(tmp_path):
    out = _python(AS_LIGHTNING + REPORT, _fake_torchmetrics(tmp_path))
    assert out["flags"] == {**dict.fromkeys(ct.OPTIONAL_BACKENDS, False),
                            "_TQDM_AVAILABLE": True}  # only the backends it would import
    assert out["scipy_at_import"] is False  # so the package skips its scipy.signal import
    assert out["restored"] and out["hooks"] == []  # one shot: nothing left behind


@pytest.mark.parametrize("case", ["layout", "moved", "not_lightning", "imported_before"])
def test_torchmetrics_is_left_as_it_is_when_the_hook_does_not_apply(tmp_path, case):
    """Another layout (a flag renamed; the flags module no longer imported by the package): the
    flags stay as torchmetrics set them, with no warning (warnings are errors in the child), and
    the hook is gone once the package is imported. torchmetrics imported by someone else than
    Lightning, or before l2lab: the whole package, and no hook installed."""
    flags = ALL_FLAGS.replace("_MATPLOTLIB_AVAILABLE", "_MATPLOTLIB_FOUND") \
        if case == "layout" else ALL_FLAGS
    package = FAKE_PACKAGE.replace("from torchmetrics.utilities import imports", "") \
        if case == "moved" else FAKE_PACKAGE
    env = _fake_torchmetrics(tmp_path, flags, package)
    first = {"layout": AS_LIGHTNING, "moved": AS_LIGHTNING, "not_lightning": "import l2lab\n",
             "imported_before": "import torchmetrics, l2lab\n"}[case]
    out = _python(first + REPORT, env)
    assert all(out["flags"].values()), out
    assert out["hooks"] == [] and out["restored"]
    if case == "imported_before":
        assert _python("import json, torchmetrics\nfrom l2lab.compat import torchmetrics as ct\n"
                       "print(json.dumps(ct.lean_torchmetrics()))", env) is False


# -- Lightning ---------------------------------------------------------------------------------

def test_lightning_dump_checkpoint_without_writing(tmp_path):
    import pytorch_lightning as pl
    import torch

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, _i):
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)),
                                       batch_size=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Tiny(), data)
    ckpt = cl.dump_checkpoint(trainer)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2  # after fit: 1 epoch done
    assert set(ckpt["state_dict"]) == {"lin.weight", "lin.bias"}
    assert len(ckpt["optimizer_states"]) == 1 and "loops" in ckpt
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_lightning_replace_optimizer_mid_fit_steps_with_the_new_one(tmp_path):
    """After the first epoch the module swaps its parameter and optimizer for new ones (as
    ``L2Module.remove`` does): the following steps update the new parameter, with the new
    optimizer's lr, and the old one no longer moves."""
    import pytorch_lightning as pl
    import torch

    class Swapping(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.old = None

        def training_step(self, batch, _i):
            return (self.w * batch[0].sum()).sum()  # gradient: the batch's sum, 2 here

        def configure_optimizers(self):
            return torch.optim.SGD([self.w], lr=1.0)

        def on_train_epoch_end(self) -> None:
            if self.current_epoch == 0:
                self.old = self.w
                self.w = torch.nn.Parameter(torch.zeros(1))
                cl.replace_optimizer(self.trainer, torch.optim.SGD([self.w], lr=0.25))

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)),
                                       batch_size=1)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    module = Swapping()
    trainer.fit(module, data)
    assert module.old.item() == -8.0  # epoch 0: 4 steps of lr 1.0 × gradient 2
    assert module.w.item() == -2.0  # epoch 1: 4 steps of lr 0.25 × 2, on the new parameter
    assert trainer.optimizers[0].param_groups[0]["params"][0] is module.w


# -- Hydra -------------------------------------------------------------------------------------

def test_hydra_basic_sweeper_and_flush_loggers():
    from hydra.plugins.sweeper import Sweeper

    from hydra_plugins.l2lab_sweepers.grouped_sweeper import GroupedSweeper

    assert issubclass(ch.BasicSweeper, Sweeper) and issubclass(GroupedSweeper, ch.BasicSweeper)
    assert callable(ch.BasicSweeper.validate_batch_is_legal)
    flushed = []

    class Probe(logging.Handler):
        def emit(self, record):
            pass

        def flush(self):
            flushed.append(True)

    handler = Probe()
    logging.getLogger().addHandler(handler)
    try:
        ch.flush_loggers()
    finally:
        logging.getLogger().removeHandler(handler)
    assert flushed


def test_run_job_copy_lazy_return_and_job_hooks():
    """``JobReturn`` still has the fields the lazy return shadows; the configs are made once,
    when first read; a callback counts as having job hooks only if it overrides one."""
    import dataclasses

    from hydra.core.utils import JobReturn, JobStatus
    from hydra.experimental.callback import Callback

    assert {"cfg", "hydra_cfg", "overrides", "_return_value", "status"} <= {
        f.name for f in dataclasses.fields(JobReturn)}
    made = []
    cfg, hydra_cfg = OmegaConf.create({"a": 1}), OmegaConf.create({"hydra": {"b": 2}})
    ret = rj.completed(lambda: made.append(1) or (cfg, hydra_cfg), ["a=1"], 0.25)
    assert isinstance(ret, JobReturn) and made == []
    assert (ret.return_value, ret.status, ret.overrides) == (0.25, JobStatus.COMPLETED, ["a=1"])
    assert ret.cfg is cfg and ret.hydra_cfg is hydra_cfg and made == [1]
    other = OmegaConf.create({"a": 3})
    ret.cfg = other
    assert ret.cfg is other and ret.hydra_cfg is hydra_cfg and made == [1]

    class Quiet(Callback):
        def on_multirun_end(self, config, **kwargs):
            pass

    class Hooked(Callback):
        def on_job_end(self, config, job_return, **kwargs):
            pass

    def callbacks(*cs):
        return type("Callbacks", (), {"callbacks": list(cs)})()

    assert not rj.has_job_hooks(callbacks(Quiet()))
    assert rj.has_job_hooks(callbacks(Quiet(), Hooked()))
    assert rj.has_job_hooks(object())  # unknown: take run_job's own way


HOOKS = """
from hydra.experimental.callback import Callback


class Hooks(Callback):
    def on_job_end(self, config, job_return, **kwargs):
        pass
"""
# What differs by design between two launchers' jobs: the launcher's and sweeper's own settings,
# the folders, and the command line that chose them.
SKIP = ("hydra.launcher", "hydra.sweeper", "hydra.sweep.dir", "hydra.runtime.output_dir",
        "hydra.runtime.cwd", "hydra.overrides.hydra", "hydra.runtime.choices.hydra/launcher",
        "hydra.runtime.choices.hydra/sweeper", "hydra.callbacks.hooks", "hydra.job.name")


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out: dict = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _hydra_files(tmp_path: Path, name: str, *launcher: str) -> dict[int, dict[str, dict]]:
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    out = tmp_path / name
    r = run_cli("l2lab.train", "-m", *launcher, "regularization.lam=0,0.1", "seed=0",
                *TINY, "trainer.max_epochs=1", f"tracking.uri={store}",
                f"hydra.sweep.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    quiet(r)
    files = {}
    for job in (0, 1):
        files[job] = {f: _flat(yaml.safe_load((out / str(job) / ".hydra" / f).read_text()))
                      for f in ("config.yaml", "hydra.yaml")}
        files[job]["overrides.yaml"] = yaml.safe_load(
            (out / str(job) / ".hydra" / "overrides.yaml").read_text())
    return files


@pytest.mark.slow
def test_stacked_jobs_write_the_hydra_files_of_the_basic_launcher(tmp_path):
    """The launcher's copy of ``run_job`` (templates without job hooks; its own bookkeeping with
    them) against Hydra's basic launcher: every field of ``config.yaml``, ``hydra.yaml`` and
    ``overrides.yaml`` equal, apart from the launcher's and sweeper's settings and folders."""
    (tmp_path / "hooks.py").write_text(HOOKS)
    basic = _hydra_files(tmp_path, "basic", "hydra/launcher=basic", "hydra/sweeper=basic")
    stacked = _hydra_files(tmp_path, "stacked", "hydra/launcher=vectorized",
                           "hydra/sweeper=grouped")
    hooked = _hydra_files(tmp_path, "hooked", "hydra/launcher=vectorized",
                          "hydra/sweeper=grouped", "+hydra.callbacks.hooks._target_=hooks.Hooks")
    for other in (stacked, hooked):
        for job in (0, 1):
            assert other[job]["overrides.yaml"] == basic[job]["overrides.yaml"]
            assert other[job]["config.yaml"] == basic[job]["config.yaml"]
            a, b = basic[job]["hydra.yaml"], other[job]["hydra.yaml"]
            keep = [k for k in {*a, *b} if not k.startswith(SKIP)]
            assert len(keep) > 50
            diff = {k: (a.get(k), b.get(k)) for k in keep if a.get(k) != b.get(k)}
            assert not diff, diff
            assert b["hydra.runtime.output_dir"].endswith(f"/{job}")


# -- a run logged before the package moved -----------------------------------------------------

OLD = Path(__file__).parent / "data" / "run_before_the_move.json"


def test_a_run_logged_before_the_move_still_reproduces_and_is_reused(tmp_path):
    """The config, tags and params that l2lab wrote at commit 26a10fe (``l2lab.models.MLP`` as
    ``_target_``, the config hash of that code). Its final metrics are this machine's: the
    same overrides trained now, by today's code, in another store (exact CPU numbers depend on
    the CPU, and the numbers themselves are the engine's tests' business)."""
    import json

    from conftest import make_cfg
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from l2lab.tracking import runs as rr
    from l2lab.train import train

    old = json.loads(OLD.read_text())
    overrides = [o for o in yaml.safe_load(old["overrides_yaml"]) if not o.startswith("tracking.")]
    today = f"sqlite:///{tmp_path}/today/mlflow.db"
    cfg = make_cfg(*overrides, f"tracking.uri={today}", tiny=False)
    # today's digits hold out a test split, so the same overrides train on other data: another
    # identity; data.test_size=0 is what the old run trained on, and its identity
    assert rr.config_hash(cfg) != old["tags"][rr.HASH_TAG]
    before = ["data.test_size=0"]
    cfg = make_cfg(*overrides, *before, f"tracking.uri={today}", tiny=False)
    assert rr.config_hash(cfg) == old["tags"][rr.HASH_TAG]  # reuse's identity did not move
    with open_dict(cfg):  # the old config has no eval-mode pass either: train what it names
        del cfg.trainer.eval_train
    metrics = train(cfg, overrides=overrides, output_dir=tmp_path / "today-run")

    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(store)
    exp = client.create_experiment("digits-mlp")
    run = client.create_run(exp, run_name=old["tags"]["mlflow.runName"])
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, v) for k, v in old["params"].items()],
                     tags=[RunTag(k, v) for k, v in old["tags"].items()],
                     metrics=[Metric(k, float(v), 0, 2) for k, v in metrics.items()])
    client.log_text(rid, old["config_yaml"], "config/config.yaml")
    client.log_text(rid, old["overrides_yaml"], "config/overrides.yaml")
    client.set_terminated(rid, "FINISHED")

    r = run_cli("l2lab.reproduce", rid, "--check", "--tracking-uri", store, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "differ" not in r.stdout and "val/ce" in r.stdout
    quiet(r)

    r = run_cli("l2lab.train", *overrides, *before, "reuse=true", f"tracking.uri={store}",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    quiet(r)
    assert rid[:8] in r.stdout + r.stderr
    trained = [x for x in client.search_runs([exp], max_results=100)
               if x.data.tags.get(rr.HASH_TAG) == old["tags"][rr.HASH_TAG]
               and rr.REPRODUCED_TAG not in x.data.tags]
    assert [x.info.run_id for x in trained] == [rid]  # found, not trained again

"""Runs read back from MLflow: ``load_runs`` (a DataFrame for notebooks), and run identity.

A run's identity is the hash of its resolved config without the keys that do not change what is
trained (``tracking``, ``resume``, ``reuse``; ``hydra.*`` is never part of a job's config). It is
the tag ``l2lab.config_hash`` of every training run, which is how ``reuse=true`` finds a FINISHED
run of the same config, and how ``compare`` knows that a reproduction or a reuse listing repeats a
run rather than adding a seed. MLflow is imported only when a function here needs it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from l2lab import metrics as mt
from l2lab.core.rules import DEFAULT_PENALTY, MNIST1D_SIZES
from l2lab.records import RunRecord
from l2lab.tracking.tracker import FAILURE_TAG, parse_overrides

HASH_TAG = "l2lab.config_hash"
REUSED_TAG = "l2lab.reused_from"
REPRODUCED_TAG = "l2lab.reproduced_from"
_NOT_IDENTITY = ("tracking", "resume", "reuse", "hydra")
#: ``data`` keys that runs logged before they existed lack, with the value that trains as those did.
_ADDED_DATA_KEYS: dict[str, object] = {"label_noise": 0.0, "test_size": 0, "augment": False,
                                       **MNIST1D_SIZES}


def config_hash(cfg: DictConfig | Mapping) -> str:
    """16 hex digits identifying what a config trains (bookkeeping keys left out)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    tree = {k: v for k, v in tree.items() if k not in _NOT_IDENTITY}
    reg = tree.get("regularization")
    if isinstance(reg, Mapping):
        reg = dict(reg)
        if reg.get("_target_") == DEFAULT_PENALTY:
            # the default penalty was the only one before presets named their class: its runs
            # keep the identity they were logged with, so reuse still finds them
            del reg["_target_"]
        if isinstance(reg.get("lam_per_layer"), Mapping):
            # its patterns match first-wins: their order is part of what is trained
            reg["lam_per_layer"] = list(reg["lam_per_layer"].items())
        tree["regularization"] = reg
    trainer = tree.get("trainer")
    if isinstance(trainer, Mapping) and trainer.get("eval_train") is True:
        # the eval-mode pass changes what is logged, not what is trained: runs logged before
        # the key existed keep the identity they were logged with (false is a choice to see)
        tree["trainer"] = {k: v for k, v in trainer.items() if k != "eval_train"}
    if (tree.get("scheduler") or {}).get("name") == "none":
        # no schedule is what runs trained before there were schedules: same identity
        del tree["scheduler"]
    data = tree.get("data")
    if isinstance(data, Mapping):
        # keys added after runs were logged hash, at the value that means "as before", as if
        # absent: those runs keep their identity, so reuse still finds them
        tree["data"] = {k: v for k, v in data.items() if k not in _ADDED_DATA_KEYS
                        or v != _ADDED_DATA_KEYS[k]}
        if not data.get("augment"):  # no augmentation: its pad trains nothing
            tree["data"].pop("augment_pad", None)
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def find_finished(client, experiment_id: str, digest: str):
    """A FINISHED run of the experiment with this config hash (an original run rather than a
    listing of one), or None."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{HASH_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"], max_results=1000)
    originals = [r for r in found if REUSED_TAG not in r.data.tags]
    if originals:
        return originals[0]
    if found:  # only listings survive (the original was deleted?): their source, if present
        return found[0]
    return None


def list_reused(client, source, experiment_id: str, run_name: str,
                tags: Mapping[str, str]) -> str:
    """A FINISHED run that lists ``source`` in a sweep: its params, config artifacts and every
    metric's full history are copied (the sweep's figures need the curves), tagged
    ``l2lab.reused_from``. Returns the new run id."""
    from mlflow.entities import Param, RunTag

    src = source.info.run_id
    keep = {k: v for k, v in source.data.tags.items()
            if k in (HASH_TAG, "l2lab.output_dir", "mlflow.source.git.commit")}
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={**keep, **tags, REUSED_TAG: src})
    rid = run.info.run_id
    params = [Param(k, v) for k, v in source.data.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i:i + 100], synchronous=True)
    copy_history(client, source, rid)
    client.log_batch(rid, tags=[RunTag("l2lab.reused_epochs",
                                       source.data.params.get("trainer.max_epochs", ""))])
    for art in ("config/config.yaml", "config/overrides.yaml"):
        try:
            text = open(client.download_artifacts(src, art)).read()  # noqa: SIM115
        except Exception:  # an old run without it: the listing still has params and metrics
            continue
        client.log_text(rid, text, art)
    client.set_terminated(rid, status="FINISHED")
    return rid


def copy_history(client, source, run_id: str, skip: tuple[str, ...] = ()) -> None:
    """Every metric's full history of run ``source`` into run ``run_id`` (whole epochs a call),
    but for keys starting with one of ``skip``."""
    from l2lab.tracking.tracker import RunTracker

    points: dict[tuple[int, int], dict[str, float]] = {}
    for key in (k for k in source.data.metrics if not k.startswith(skip)):
        for m in client.get_metric_history(source.info.run_id, key):
            points.setdefault((m.step, m.timestamp), {})[key] = m.value
    RunTracker(client, run_id).log_epochs(
        [(step, points[(step, ts)], ts) for step, ts in sorted(points)])


def drop_repeats(runs: Sequence) -> tuple[list, list]:
    """Split off reproductions and reuse listings whose source run is also in ``runs``: they
    repeat a run (same config, same seed) and must not count as an extra seed."""
    ids = {r.info.run_id for r in runs}
    kept, dropped = [], []
    for r in runs:
        src = r.data.tags.get(REUSED_TAG) or r.data.tags.get(REPRODUCED_TAG)
        (dropped if src and src in ids else kept).append(r)
    return kept, dropped


SWEEP_ROLE = "sweep"  # tag l2lab.role of a sweep's parent run


def select(client, *, experiment: str | None = None, sweep: str | None = None,
           run_ids: Iterable[str] | None = None, latest_sweep: bool = False,
           option: str = "experiment") -> list:
    """Training runs (not sweep parents), oldest first: by ids, else by sweep id and/or
    experiment name. With none given: every training run of the store (``load_runs``), or with
    ``latest_sweep`` those of the most recently started sweep (``compare``). An unknown
    experiment, or no sweep to take, is a ``ConfigError`` naming ``option``."""
    from l2lab.base import ConfigError

    if run_ids:
        return [client.get_run(r) for r in run_ids]
    everything = client.search_experiments()
    exps = [e.experiment_id for e in everything]
    if experiment is not None:
        exps = [e.experiment_id for e in everything if e.name == experiment]
        if not exps:
            names = ", ".join(sorted(e.name for e in everything))
            raise ConfigError(f"{option}: no experiment {experiment!r}; there are: {names}.")
    elif sweep is None and latest_sweep:
        parents = client.search_runs(exps, filter_string=f"tags.`l2lab.role` = '{SWEEP_ROLE}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise ConfigError("no sweep in this store yet: run `make sweep` or name runs to "
                              "compare (--experiment NAME, --sweep ID, or RUN_IDs).")
        sweep = parents[0].data.tags["l2lab.sweep_id"]
    flt = f"tags.`l2lab.sweep_id` = '{sweep}'" if sweep else ""
    found = client.search_runs(exps, filter_string=flt, max_results=50_000,
                               order_by=["attributes.start_time ASC"])
    return [r for r in found if r.data.tags.get("l2lab.role") != SWEEP_ROLE]


def _number(text: str) -> Any:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return text
    return value if isinstance(value, int | float) and not isinstance(value, bool) else text


def to_frame(client, runs: Sequence):
    """One row per run: ids, status, sweep, params (numbers as numbers), final metrics, and the
    best val/ce with its epoch (from the val/ce history)."""
    import pandas as pd

    rows = []
    for r in runs:
        tags = r.data.tags
        row: dict[str, Any] = {
            "run_id": r.info.run_id, "run_name": tags.get("mlflow.runName", ""),
            "status": r.info.status, "sweep_id": tags.get("l2lab.sweep_id"),
            "experiment_id": r.info.experiment_id,
            "reused_from": tags.get(REUSED_TAG), "reproduced_from": tags.get(REPRODUCED_TAG),
            "failure": tags.get(FAILURE_TAG),
        }
        row.update({k: _number(v) for k, v in sorted(r.data.params.items())})
        row.update(sorted(r.data.metrics.items()))
        history = client.get_metric_history(r.info.run_id, mt.VAL_CE) if r.data.metrics else []
        finite = [(m.step, m.value) for m in history if not math.isnan(m.value)]
        if finite:
            step, value = min(sorted(finite), key=lambda p: p[1])
            row["best_val_ce"], row["best_epoch"] = value, step
        else:
            row["best_val_ce"], row["best_epoch"] = math.nan, math.nan
        rows.append(row)
    head = ["run_id", "run_name", "status", "sweep_id", "experiment_id", "reused_from",
            "reproduced_from", "failure"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=[*head, "best_val_ce", "best_epoch"])
    rest = [c for c in frame.columns if c not in head]
    return frame[head + rest]


def load_runs(experiment: str | None = None, sweep: str | None = None,
              run_ids: Iterable[str] | None = None, tracking_uri: str | None = None):
    """Runs of an MLflow store as a pandas DataFrame, one row per training run.

    Columns: ``run_id``, ``run_name``, ``status``, ``sweep_id`` (and ``experiment_id``,
    ``reused_from``, ``reproduced_from``, ``failure``), every param under its dot key
    (``regularization.lam``, ``seed``, ...), every final metric under its name (``val/ce``,
    ``gap/ce``, ...), and ``best_val_ce`` with its ``best_epoch``. With no selection: every
    training run of the store. ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI``, else
    ``./mlruns/mlflow.db``.

    >>> import l2lab
    >>> df = l2lab.load_runs(experiment="digits-mlp")
    >>> df.groupby("regularization.lam")["val/ce"].agg(["mean", "std", "count"])
    """
    from l2lab.console import quiet_libraries
    from l2lab.tracking import tracker as tr

    quiet_libraries()  # tr.reader imports MLflow only if it must
    client = tr.reader(tr.resolve_uri(tracking_uri))
    return to_frame(client, select(client, experiment=experiment, sweep=sweep, run_ids=run_ids))


# -- what the sweep summary and compare read back -------------------------------------------
_NOT_GROUPED = ("seed", "tracking.uri", "resume", "reuse", "experiment_name")


def varying_keys(runs: Iterable) -> list[str]:
    """Config keys (other than ``seed`` and bookkeeping) whose value differs between runs, as
    overridden or as logged in params: they make the rows of the summary table, so runs are
    pooled over seeds only when their configs are otherwise the same."""
    runs = list(runs)
    overrides = [parse_overrides(json.loads(r.data.tags.get("l2lab.overrides", "[]")))
                 for r in runs]
    keys = {k for ov in overrides for k in ov
            if not k.startswith("hydra.") and k not in _NOT_GROUPED}
    varying = {k for k in keys if len({ov.get(k) for ov in overrides}) > 1}
    trained = [r.data.params for r in runs if r.data.params]
    params = {k for p in trained for k in p if k not in _NOT_GROUPED and not k.startswith("l2.")}
    varying |= {k for k in params if len({p.get(k) for p in trained}) > 1}
    return sorted(varying, key=lambda k: (k != "regularization.lam", k))


def _histories(client, runs: Sequence, writer=None) -> dict[str, dict[str, list]]:
    """The histories of ``metrics.HISTORY`` and of each layer's ``weights/sq_norm/<layer>``
    ``{run_id: {key: [Metric, ...]}}`` of the runs that logged metrics, read together through
    a ``bulk.RunWriter`` (one SQL query per 500 runs, or the runs' calls concurrently for a
    server) instead of one store call per run and key.
    The writer is made on the client's own store when none is given; a client that does not say
    its store (``tracking_uri``) is asked run by run."""
    ids = [r.info.run_id for r in runs if r.data.metrics]
    if not ids:
        return {}
    uri = getattr(client, "tracking_uri", None)
    if writer is None and hasattr(client, "metric_histories"):  # connection.reader's: no MLflow
        writer = client
    if writer is None and isinstance(uri, str) and uri:
        from l2lab.tracking.bulk import open_writer

        writer = open_writer(uri, client)
    keys = [*mt.HISTORY, *sorted({k for r in runs for k in r.data.metrics
                                  if k.startswith(mt.WEIGHT_NORM_LAYER)})]  # per layer too
    if writer is not None:
        return writer.metric_histories(ids, keys)
    return {r: {k: client.get_metric_history(r, k) for k in keys} for r in ids}


def load_records(client, runs: Iterable, writer=None) -> list:
    """MLflow runs -> ``records.RunRecord`` (final values, test/* included, and the histories the
    figures need). The histories are read for all runs at once (``_histories``): through
    ``writer`` (a ``bulk.RunWriter`` on the client's store) when given."""
    runs = list(runs)
    keys = varying_keys(runs)
    histories = _histories(client, runs, writer)
    records = []
    for run in runs:
        params, tags = run.data.params, run.data.tags
        ov = parse_overrides(json.loads(tags.get("l2lab.overrides", "[]")))
        group = {k: ov.get(k, params.get(k, "")) for k in keys}
        try:
            lam = float(params.get("regularization.lam", "nan"))
        except ValueError:
            lam = math.nan
        history = {k: sorted((m.step, m.value) for m in points)
                   for k, points in histories.get(run.info.run_id, {}).items()}
        records.append(RunRecord(
            run_id=run.info.run_id, name=tags.get("mlflow.runName", run.info.run_id),
            status=run.info.status, swept=group, lam=lam,
            seed=int(params.get("seed", 0) or 0), failure=tags.get(FAILURE_TAG),
            final=dict(run.data.metrics), history=history,
            experiment_id=run.info.experiment_id, layers=logged_layers(params),
            lam_per_layer=logged_lam_per_layer(params)))
    return records


def logged_layers(params: Mapping[str, str]) -> tuple[str, ...] | None:
    """The penalised layers a run logged (``l2.layers``, comma-separated); None where absent."""
    text = params.get("l2.layers")
    return None if text is None else tuple(n for n in text.split(",") if n)


def logged_lam_per_layer(params: Mapping[str, str]) -> dict[str, float]:
    """``regularization.lam_per_layer`` as logged: one JSON value (keys MLflow rejects, or
    empty), or flattened to ``regularization.lam_per_layer.<pattern>`` keys."""
    key = "regularization.lam_per_layer"
    out: dict[str, float] = {}
    try:
        if key in params:
            out.update({str(k): float(v) for k, v in json.loads(params[key]).items()})
        for k, v in params.items():
            if k.startswith(key + "."):
                out[k[len(key) + 1:]] = float(v)
    except (ValueError, TypeError, AttributeError):  # not a mapping of numbers: none known
        return {}
    return out


# -- run ids as people type them ------------------------------------------------------------
MIN_PREFIX = 6


def resolve_run_id(prefix: str, uri: str, what: str = "run id") -> str:
    """The full id of the run whose id starts with ``prefix`` (6 or more characters: the job
    lines print 8). An unknown or ambiguous prefix is a one-paragraph ``ConfigError``. A SQLite
    store is asked directly (no MLflow import: the answer comes in well under a second)."""
    from l2lab.base import ConfigError

    given = str(prefix).strip().lower()
    if len(given) < MIN_PREFIX or not all(c in "0123456789abcdef" for c in given):
        raise ConfigError(
            f"{what}: {prefix!r} is not a run id: give the 32 hex digits or a unique prefix of at "
            f"least {MIN_PREFIX} (the lines print 8).")
    found = _runs_with_prefix(given, uri)
    if len(found) == 1:
        return found[0][0]
    if not found:
        raise ConfigError(
            f"{what}: no run whose id starts with {given!r} in {uri}. Check the store (the "
            "`tracking.uri` or MLFLOW_TRACKING_URI it was logged to); `python -m l2lab.compare "
            "--format csv` lists the runs there.")
    shown = "; ".join(f"{rid} ({name}, {status})" for rid, name, status in found[:10])
    more = f"; and {len(found) - 10} more" if len(found) > 10 else ""
    raise ConfigError(f"{what}: {given!r} matches {len(found)} runs: {shown}{more}. Give more "
                      "characters.")


def _runs_with_prefix(prefix: str, uri: str) -> list[tuple[str, str, str]]:
    """(id, name, status) of the active runs whose id starts with ``prefix``."""
    from l2lab.tracking.tracker import sqlite_path

    db = sqlite_path(uri)
    if db is not None:
        from l2lab.compat import mlflow_sqlite as cs

        return cs.sqlite_runs_with_prefix(db, prefix)
    from l2lab.tracking.tracker import connect

    client = connect(uri)
    if len(prefix) == 32:
        try:
            run = client.get_run(prefix)
            return [(run.info.run_id, run.info.run_name or "", run.info.status)]
        except Exception:
            return []
    exps = [e.experiment_id for e in client.search_experiments()]
    return [(r.info.run_id, r.info.run_name or "", r.info.status)
            for r in client.search_runs(exps, filter_string=f"attributes.run_id LIKE '{prefix}%'",
                                        max_results=100)]

"""The Hydra callback that turns a multirun into one MLflow parent run with its jobs as children.

Jobs may run in other processes (parallel launchers), so the parent run is created once, before
any job starts, and its id is handed over in a small file in the sweep directory. When the sweep
ends, the summary table and figures are built from what the store holds, printed and logged to
the parent; a sweep with a failed job ends FAILED and exits non-zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from l2lab.base import CONF_DIR, ConfigError, last_checkpoint

#: The sweep's parent run and experiment, handed to jobs in other processes (read by train.py and
#: the vectorized launcher).
SWEEP_INFO = ".l2lab_sweep.json"

# Hydra instantiates this callback for every run, a single one included: the reporting and
# tracking modules (matplotlib, torch, MLflow) are imported inside the hooks, when a sweep needs
# them, so that a single run's config error is still reported in about a second.


def sweep_children(client, info: dict) -> list:
    return client.search_runs(
        [info["experiment_id"]],
        filter_string=f"tags.l2lab.sweep_id = '{info['sweep_id']}' and "
                      f"tags.mlflow.parentRunId = '{info['parent_run_id']}'",
        max_results=10_000, order_by=["attributes.start_time ASC"])


def summarize_runs(client, runs: list, out_dir: Path, *, name_rejected: bool = True,
                   context=None, writer=None, by: list[str] | None = None
                   ) -> tuple[str, dict[str, Path], list]:
    """Table text, written files (``summary.csv``, figures, ``index.html``) and records for a set
    of runs (shared with ``compare``). The runs' histories are read in bulk (``writer``, a
    ``bulk.RunWriter`` on the client's store, if the caller has one; else one is made). ``by``:
    the condition keys (``compare --by``) instead of every varying key."""
    from l2lab.report import html as report
    from l2lab.tracking.runs import load_records

    records = load_records(client, runs, writer=writer)
    if by is not None:
        from l2lab.report.conditions import regroup
        from l2lab.tracking.tracker import parse_overrides

        records, _ = regroup(records, by, [
            {**r.data.params, **parse_overrides(json.loads(r.data.tags.get("l2lab.overrides",
                                                                           "[]")))}
            for r in runs])
    paths = report.write_report(records, out_dir, context)
    table = report.format_table(report.summarize(records), records, name_rejected=name_rejected)
    return table, paths, records


def reproduce_command(overrides: list[str], commit: str | None = None) -> list[str]:
    """The shell lines that run a sweep again: its overrides, quoted, at its git commit."""
    import shlex

    lines = [f"git checkout {commit}"] if commit else []
    return lines + [" ".join(["python -m l2lab.train -m", *map(shlex.quote, overrides)])]


def share_sweep_view(client, exp: str, parent_id: str) -> dict[str, str]:
    """Store the view of this sweep's children (all of them drawn: MLflow's own format,
    ``compat.mlflow``) on its experiment, keyed by the parent's id; returns ``{exp: key}`` for
    ``ui.UiLinks(views=...)``, whose chart link then opens it. Where the store refuses the tag,
    ``{}``: the link opens the plain chart view."""
    from l2lab.compat import mlflow as compat

    try:
        compat.share_view(client, exp, parent_id, compat.sweep_view_state(parent_id))
    except Exception:  # a read-only store: the link still opens the runs' charts
        return {}
    return {exp: parent_id}


def description(sweep_id: str, exp: str, parent: str, base: str, verdict: str = "",
                charts: str | None = None) -> str:
    """The parent run's description (MLflow's ``mlflow.note.content``, Markdown): where the
    report is, and how to chart val/ce against λ in the UI itself (``charts``: the link that
    opens this sweep's children, see :func:`share_sweep_view`)."""
    from l2lab.tracking import ui

    head = f"**Best λ**: {verdict}\n\n" if verdict else ""
    if charts and "viewStateShareKey=" in charts:
        how = (f"open [this sweep's charts]({charts}) (its children, every one drawn: the "
               f"val/ce learning curves, one line per run); ")
    else:
        how = (f"open the runs' [chart view]({ui.runs_url(base, exp, chart=True)}); in the runs "
               f"list on the left, expand this sweep (⊞ next to `sweep {sweep_id}`) so that its "
               f"children are charted, and show them all (the eye menu above the list: only the "
               f"first 10 are drawn by default); ")
    return (
        f"{head}λ sweep `{sweep_id}`. **Report**: Artifacts → `report/index.html` (the table "
        f"with 95% intervals over seeds, the figures, the verdict, links to every run): "
        f"[open it]({ui.run_url(base, exp, parent, 'report/index.html')}). The figures are "
        f"under `figures/`, the numbers in `summary.csv`.\n\n"
        f"**val/ce against λ in this UI**: {how}then *Add chart* → *Scatter chart*, X axis "
        f"`regularization.lam` (a param), Y axis `val/ce` (a metric).")


def swept_keys(overrides: list[str], sweeper_params: Mapping) -> list[str]:
    """Keys that take several values in this sweep (command line or ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in sweeper_params if str(k) not in keys]


#: The sweep this process runs (its SWEEP_INFO), for the stop handler of ``l2lab.train``.
ACTIVE: dict[str, Any] = {}


def continue_command(sweep_dir: Path, overrides: list[str], uri: str) -> str:
    """The command that continues this sweep: this very command line, pinned to its sweep folder
    (the sweep's identity), run by this interpreter from this folder, so that it works pasted
    into any shell, with or without the virtualenv. Its store is named when it came from the
    environment (a new shell may not have it)."""
    import shlex

    args = [a for a in sys.argv[1:] if not a.startswith("hydra.sweep.dir=")]
    if not any(a.startswith("-m") or a == "--multirun" for a in args):
        args = ["-m", *args]  # (a sweep that Hydra's config turned on)
    if os.environ.get("MLFLOW_TRACKING_URI") and not any(
            a.startswith("tracking.uri=") for a in args):
        args.append(f"tracking.uri={uri}")
    line = [sys.executable, "-m", "l2lab.train", *args, f"hydra.sweep.dir={sweep_dir}"]
    return f"cd {shlex.quote(os.getcwd())} && {' '.join(map(shlex.quote, line))}"


def continued(client, info_path: Path, uri: str) -> dict | None:
    """The earlier sweep of this folder, if it was in this store and was stopped (a sweep that
    ended, FINISHED or FAILED, is not continued: the folder then holds a new sweep, as before)."""
    if not info_path.exists():
        return None
    try:
        before = json.loads(info_path.read_text())
        if before.get("tracking_uri") != uri:
            return None
        status = client.get_run(before["parent_run_id"]).info.status
    except Exception:  # another store, a deleted parent, a damaged file: a new sweep
        return None
    return before if status in ("KILLED", "RUNNING") else None  # stopped (RUNNING: SIGKILL)


def stopped(signum: int) -> int:
    """Ctrl-C or SIGTERM reached the sweep's process: every run of the sweep still RUNNING (a
    worker that could not say so, a job between two steps) ends KILLED with the reason, then the
    one line that continues the whole sweep. Returns the exit code (128 + signal)."""
    from l2lab.run import lifecycle

    reason = lifecycle.Interrupted(signum).reason
    if not ACTIVE:
        return 128 + signum
    info = dict(ACTIVE)
    counts = {}
    with lifecycle.held(), contextlib.suppress(Exception):
        from l2lab.tracking import tracker as tr

        client = tr.connect(info["tracking_uri"])
        kids = sweep_children(client, info)
        for kid in kids:
            if kid.info.status == "RUNNING":
                tr.RunTracker(client, kid.info.run_id).finish("KILLED", failure=reason)
        parent = client.get_run(info["parent_run_id"])
        if parent.info.status == "RUNNING":
            tr.RunTracker(client, info["parent_run_id"]).finish("KILLED", failure=reason)
        for kid in sweep_children(client, info):
            counts[kid.info.status] = counts.get(kid.info.status, 0) + 1
    done = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs yet"
    print(f"\nl2lab: sweep {info['sweep_id']} stopped ({reason}; {done}). Continue the whole "
          f"sweep (finished jobs kept, stopped ones continued from their last completed epoch, "
          f"the rest trained) with:\n  {info['command']}", file=sys.stderr, flush=True)
    return 128 + signum


# -- a stopped sweep, continued ---------------------------------------------------------------
_SWEEP_RUNS: dict[str, dict[str, Any]] = {}


def sweep_runs(client, sweep: Mapping) -> dict[str, object]:
    """The sweep's children by config hash (the latest run of each), read once per process:
    before any job of the continued sweep has made a run."""
    from l2lab.tracking import runs

    if sweep["sweep_id"] not in _SWEEP_RUNS:
        found = {}
        for run in sweep_children(client, sweep):  # oldest first: the latest wins
            if runs.HASH_TAG in run.data.tags and runs.REUSED_TAG not in run.data.tags:
                found[run.data.tags[runs.HASH_TAG]] = run
        _SWEEP_RUNS[sweep["sweep_id"]] = found
    return _SWEEP_RUNS[sweep["sweep_id"]]


def continue_stack(client, sweep: Mapping, jobs: Sequence) -> list[list]:
    """The vectorized launcher's jobs of a continued sweep, as :mod:`l2lab.run.plan` plans one:
    kept ones get their run and result (they do not train); stopped ones are reopened. Returns the
    jobs to train in groups that can share a stack: the new ones, and the stopped ones by the
    epoch they continue from (a stack continues from one merged checkpoint)."""
    from l2lab.console import say
    from l2lab.core.stacked import epochs_done
    from l2lab.tracking import runs
    from l2lab.tracking import tracker as tr

    fresh: list = []
    stopped: dict[int, list] = {}
    found = sweep_runs(client, sweep)
    for job in jobs:
        run = found.get(runs.config_hash(job.tree))
        if run is None:
            fresh.append(job)
            continue
        rid = run.info.run_id
        if run.info.status in ("FINISHED", "FAILED"):
            job.tracker = tr.RunTracker(client, rid)
            job.tracker.ended = True
            job.result = dict(run.data.metrics) if run.info.status == "FINISHED" else \
                RuntimeError(f"kept (FAILED before): {run.data.tags.get(tr.FAILURE_TAG, '')}")
            continue
        ckpt = last_checkpoint(Path(run.data.tags["l2lab.output_dir"]))
        done = epochs_done(ckpt)
        job.tracker, job.reopened = tr.RunTracker.reopen(client, rid), True
        job.ckpt, job.logged_test = (ckpt if done else None), "test/ce" in run.data.metrics
        job.output_dir = ckpt.parent.parent
        stopped.setdefault(done, []).append(job)
    if stopped:
        say(f"l2lab: {sum(map(len, stopped.values()))} stopped job(s) continue as stacks from "
            f"epoch(s) {', '.join(map(str, sorted(stopped)))}; {len(fresh)} new")
    return [g for g in (fresh, *stopped.values()) if g]


def _write_timing(sweep_dir: Path) -> None:
    """Where the sweep's time went (read by ``l2lab.bench --sweep``): the seconds this process
    spent inside MLflow client calls (jobs in other processes are not counted)."""
    from l2lab.tracking import tracker as tr

    (sweep_dir / "timing.json").write_text(json.dumps({"mlflow_s": tr.MLFLOW_SECONDS[0]}))


def _exit_on_error(hook):
    """Hydra swallows exceptions raised in callbacks (a broken store would give a sweep that
    'succeeds' with no parent run), but not SystemExit: turn errors into a clear exit."""

    def wrapped(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            hook(self, config, **kwargs)
        except ConfigError as e:
            print(f"l2lab: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as e:
            from l2lab.tracking.tracker import one_line

            print(f"l2lab: sweep {hook.__name__} failed: {one_line(e)}", file=sys.stderr,
                  flush=True)
            sys.exit(1)

    return wrapped


def optuna_best(sweep_dir: Path) -> dict | None:
    """The study's result that hydra-optuna-sweeper writes into the sweep folder, if any."""
    path = sweep_dir / "optimization_results.yaml"
    if not path.exists():
        return None
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return data if "best_params" in data else None


def _quiet_optuna() -> None:
    """Optuna logs through colorlog, which writes colour codes whatever the stream: raw ANSI
    escapes in a log file or a CI log. Plain lines unless stderr is a terminal."""
    import logging
    import sys as _sys

    if "optuna" not in _sys.modules and not _optuna_sweeper():
        return
    try:
        import optuna
    except ImportError:
        return
    if _sys.stderr.isatty():
        return
    for handler in logging.getLogger(optuna.__name__).handlers:
        handler.setFormatter(logging.Formatter("[%(levelname)1.1s %(asctime)s] %(message)s"))


def _optuna_sweeper() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return "optuna" in str(HydraConfig.get().sweeper.get("_target_", ""))
    except (ValueError, AttributeError):
        return False


class SweepCallback(Callback):
    @_exit_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from l2lab.tracking import store

        uri = store.resolve_uri(config.tracking.uri)
        if uri.startswith(("http://", "https://")):
            # an absent server or a refused login: said in a second, before torch, Lightning and
            # MLflow load and before any run exists; then Ray workers get the login too
            store.probe_server(uri)
            if store.credentials():
                os.environ.setdefault(store.RAY_HOOK, "l2lab.tracking.store.ray_runtime_env")
        from l2lab.console import quiet_libraries
        from l2lab.tracking import tracker as tr
        from l2lab.tracking import ui

        quiet_libraries()
        _quiet_optuna()
        client = tr.connect(uri)
        exp = tr.experiment_id(client, str(config.experiment_name), uri)
        for key, value in tr.EXPERIMENT_KIND.items():  # also on experiments made before
            client.set_experiment_tag(exp, key, value)
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        swept = swept_keys(overrides, config.hydra.sweeper.get("params") or {})
        base = ui.ui_base(uri)
        tags = {"l2lab.sweep_id": sweep_dir.name, "l2lab.output_dir": str(sweep_dir),
                "l2lab.overrides": json.dumps(overrides), "l2lab.role": "sweep"}
        if commit := tr.git_commit(CONF_DIR.parent):
            tags["mlflow.source.git.commit"] = commit
        command = continue_command(sweep_dir, overrides, uri)
        before = continued(client, sweep_dir / SWEEP_INFO, uri)
        if before is not None:  # this folder's sweep was stopped: the same sweep continues
            parent = tr.RunTracker.reopen(client, before["parent_run_id"])
            info = {**before, "swept": swept, "continuing": True, "command": command}
        else:
            parent = tr.RunTracker.start(client, exp, f"sweep {sweep_dir.name}", tags)
            parent.set_tags({"mlflow.note.content": description(sweep_dir.name, exp,
                                                                 parent.run_id, base)})
            info = {"sweep_id": sweep_dir.name, "parent_run_id": parent.run_id,
                    "experiment_id": exp, "tracking_uri": uri, "swept": swept,
                    "command": command}
        (sweep_dir / SWEEP_INFO).write_text(json.dumps(info))
        ACTIVE.clear()
        ACTIVE.update(info)
        if before is not None:
            kids = sweep_children(client, info)
            counts = {s: sum(k.info.status == s for k in kids)
                      for s in ("FINISHED", "FAILED", "KILLED", "RUNNING")}
            print(f"l2lab: continuing sweep {sweep_dir.name}: {counts['FINISHED']} finished "
                  f"and {counts['FAILED']} failed job(s) kept, "
                  f"{counts['KILLED'] + counts['RUNNING']} stopped job(s) continue from their "
                  f"last completed epoch as the same runs, the others train\n"
                  f"       parent run: {ui.run_url(base, exp, parent.run_id)}", flush=True)
            return
        print(f"l2lab: sweep {sweep_dir.name} over {', '.join(swept) or '(no swept keys)'} in "
              f"experiment {config.experiment_name!r}; one line per job as it ends\n"
              f"       parent run: {ui.run_url(base, exp, parent.run_id)}", flush=True)

    @_exit_on_error
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from l2lab.report.html import ReportContext
        from l2lab.tracking import tracker as tr
        from l2lab.tracking import ui

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        info = json.loads((sweep_dir / SWEEP_INFO).read_text())
        client = tr.connect(info["tracking_uri"])
        parent = tr.RunTracker(client, info["parent_run_id"])
        exp, base = info["experiment_id"], ui.ui_base(info["tracking_uri"])
        failed = True
        try:
            runs = sweep_children(tr.reader(info["tracking_uri"]), info)  # sqlite3 when it can
            notes = []
            best = optuna_best(sweep_dir)
            if best:
                shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in best["best_params"].items())
                notes.append(f"Optuna study (minimises final val/ce): best {shown}, "
                             f"val/ce={float(best.get('best_value', 'nan')):.4f}")
            links = ui.UiLinks(base, share_sweep_view(client, exp, parent.run_id))
            context = ReportContext(
                title=f"λ sweep {info['sweep_id']} ({config.experiment_name})",
                links=links,
                parent=(exp, parent.run_id), notes=notes,
                commands=reproduce_command(list(config.hydra.overrides.task),
                                           tr.git_commit(CONF_DIR.parent)))
            table, paths, records = summarize_runs(client, runs, sweep_dir / "report",
                                                   context=context)
            failed = not runs or any(r.status != "FINISHED" for r in records)
            parent.log_file(paths["summary"])
            for path in paths.values():
                if path.suffix == ".png":
                    parent.log_file(path, "figures")
            parent.log_file(paths["report"], "report")
            if best:
                params = {f"best.{k}": str(v) for k, v in best["best_params"].items()}
                parent.log_params(params)
                parent.set_tags({"l2lab.best_params": json.dumps(best["best_params"]),
                                 "l2lab.best_value": str(best.get("best_value"))})
                table += f"\n{notes[0]}\n"
            from l2lab.report.conditions import headline

            verdict = headline(records)
            charts = links.runs(exp, chart=True)  # the report's chart link, the same
            parent.set_tags({"mlflow.note.content": description(
                info["sweep_id"], exp, parent.run_id, base, verdict, charts)})
            parent.log_text(table + "\n", "summary.txt")
            print(f"\nSweep {info['sweep_id']}: {len(runs)} runs\n\n{table}\n", flush=True)
            print(f"Report:  {paths['report']}  (figures beside it)\n"
                  f"In the UI: {ui.run_url(base, exp, parent.run_id, 'report/index.html')}\n"
                  f"           charts: {charts}", flush=True)
            _write_timing(sweep_dir)
            n_failed = sum(r.status != "FINISHED" for r in records)
            parent.finish("FAILED" if failed else "FINISHED",
                          failure=f"{n_failed} of {len(runs)} jobs did not finish" if failed
                          else None)
        except BaseException as e:
            parent.finish("FAILED", failure=f"summary failed: {tr.one_line(e)}")
            raise
        if failed:  # Hydra swallows exceptions raised in callbacks, not SystemExit
            sys.exit(1)

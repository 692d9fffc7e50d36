"""The Hydra callback that turns a multirun into one MLflow parent run with its jobs as children.

Jobs may run in other processes (parallel launchers), so the parent run is created once, before
any job starts, and its id is handed over in a small file in the sweep directory. When the sweep
ends, the summary table and figures are built from what the store holds, printed and logged to
the parent; a sweep with a failed job ends FAILED and exits non-zero.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from l2lab.base import CONF_DIR, ConfigError
from l2lab.train import SWEEP_INFO

# Hydra instantiates this callback for every run, a single one included: the reporting and
# tracking modules (matplotlib, torch, MLflow) are imported inside the hooks, when a sweep needs
# them, so that a single run's config error is still reported in about a second.


def sweep_children(client, info: dict) -> list:
    return client.search_runs(
        [info["experiment_id"]],
        filter_string=f"tags.l2lab.sweep_id = '{info['sweep_id']}' and "
                      f"tags.mlflow.parentRunId = '{info['parent_run_id']}'",
        max_results=10_000, order_by=["attributes.start_time ASC"])


def summarize_runs(client, runs: list, out_dir: Path, *,
                   name_rejected: bool = True) -> tuple[str, dict[str, Path], list]:
    """Table text, written files and records for a set of runs (shared with ``compare``)."""
    from l2lab import report
    from l2lab.runs import load_records

    records = load_records(client, runs)
    paths = report.write_report(records, out_dir)
    table = report.format_table(report.summarize(records), records, name_rejected=name_rejected)
    return table, paths, records


def swept_keys(overrides: list[str], sweeper_params: Mapping) -> list[str]:
    """Keys that take several values in this sweep (command line or ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in sweeper_params if str(k) not in keys]


def _write_timing(sweep_dir: Path) -> None:
    """Where the sweep's time went (read by ``l2lab.bench --sweep``): the seconds this process
    spent inside MLflow client calls (jobs in other processes are not counted)."""
    from l2lab import tracking as tr

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
            from l2lab.tracking import one_line

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


class SweepCallback(Callback):
    @_exit_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from l2lab import store

        uri = store.resolve_uri(config.tracking.uri)
        if uri.startswith(("http://", "https://")):
            # an absent server or a refused login: said in a second, before torch, Lightning and
            # MLflow load and before any run exists; then Ray workers get the login too
            store.probe_server(uri)
            if store.credentials():
                os.environ.setdefault(store.RAY_HOOK, "l2lab.store.ray_runtime_env")
        from l2lab import tracking as tr
        from l2lab.console import quiet_libraries

        quiet_libraries()
        client = tr.connect(uri)
        exp = tr.experiment_id(client, str(config.experiment_name), uri)
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        swept = swept_keys(overrides, config.hydra.sweeper.get("params") or {})
        tags = {"l2lab.sweep_id": sweep_dir.name, "l2lab.output_dir": str(sweep_dir),
                "l2lab.overrides": json.dumps(overrides), "l2lab.role": "sweep"}
        if commit := tr.git_commit(CONF_DIR.parent):
            tags["mlflow.source.git.commit"] = commit
        parent = tr.RunTracker.start(client, exp, f"sweep {sweep_dir.name}", tags)
        info = {"sweep_id": sweep_dir.name, "parent_run_id": parent.run_id,
                "experiment_id": exp, "tracking_uri": uri, "swept": swept}
        (sweep_dir / SWEEP_INFO).write_text(json.dumps(info))
        print(f"l2lab: sweep {sweep_dir.name} over {', '.join(swept) or '(no swept keys)'}: "
              f"parent MLflow run {parent.run_id} in experiment {config.experiment_name!r}; "
              f"one line per job as it ends", flush=True)

    @_exit_on_error
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from l2lab import tracking as tr

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        info = json.loads((sweep_dir / SWEEP_INFO).read_text())
        client = tr.connect(info["tracking_uri"])
        parent = tr.RunTracker(client, info["parent_run_id"])
        failed = True
        try:
            runs = sweep_children(client, info)
            table, paths, records = summarize_runs(client, runs, sweep_dir / "report")
            failed = not runs or any(r.status != "FINISHED" for r in records)
            parent.log_file(paths["summary"])
            for key in ("lambda_curve", "learning_curves", "weight_norms"):
                parent.log_file(paths[key], "figures")
            best = optuna_best(sweep_dir)
            if best:
                params = {f"best.{k}": str(v) for k, v in best["best_params"].items()}
                parent.log_params(params)
                parent.set_tags({"l2lab.best_params": json.dumps(best["best_params"]),
                                 "l2lab.best_value": str(best.get("best_value"))})
                shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in best["best_params"].items())
                table += (f"\nOptuna study (minimises final val/ce): best {shown}, "
                          f"val/ce={float(best.get('best_value', 'nan')):.4f}\n")
            parent.log_text(table + "\n", "summary.txt")
            print(f"\nSweep {info['sweep_id']}: {len(runs)} runs\n\n{table}\n", flush=True)
            print(f"Figures: {paths['summary'].parent / 'figures'}\n"
                  f"Parent MLflow run: {parent.run_id} (make ui, then open experiment "
                  f"{config.experiment_name!r})", flush=True)
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

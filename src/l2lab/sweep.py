"""The Hydra callback that turns a multirun into one MLflow parent run with its jobs as children.

Jobs may run in other processes (parallel launchers), so the parent run is created once, before
any job starts, and its id is handed over in a small file in the sweep directory. When the sweep
ends, the summary table and figures are built from what the store holds, printed and logged to
the parent; a sweep with a failed job ends FAILED and exits non-zero.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from l2lab import CONF_DIR, ConfigError, report
from l2lab import tracking as tr

SWEEP_INFO = ".l2lab_sweep.json"


def sweep_children(client, info: dict) -> list:
    return client.search_runs(
        [info["experiment_id"]],
        filter_string=f"tags.l2lab.sweep_id = '{info['sweep_id']}' and "
                      f"tags.mlflow.parentRunId = '{info['parent_run_id']}'",
        max_results=10_000, order_by=["attributes.start_time ASC"])


def summarize_runs(client, runs: list, out_dir: Path) -> tuple[str, dict[str, Path], list]:
    """Table text, written files and records for a set of runs (shared with ``compare``)."""
    records = tr.load_records(client, runs)
    paths = report.write_report(records, out_dir)
    table = report.format_table(report.summarize(records), records)
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
            print(f"l2lab: sweep {hook.__name__} failed: {tr.one_line(e)}", file=sys.stderr,
                  flush=True)
            sys.exit(1)

    return wrapped


class SweepCallback(Callback):
    @_exit_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        uri = tr.resolve_uri(config.tracking.uri)
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
        print(f"l2lab: sweep {sweep_dir.name}: parent MLflow run {parent.run_id} "
              f"in experiment {config.experiment_name!r}", flush=True)

    @_exit_on_error
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
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

"""``python -m l2lab.compare``: the sweep table and figures for any set of runs in MLflow.

With no selection it takes the latest sweep. ``--experiment`` takes every training run of an
experiment (several sweeps together: runs whose configs differ only in ``seed`` are pooled over
seeds). A reproduction (``l2lab.reproduced_from``) or a reuse listing (``l2lab.reused_from``) of
a run that is also selected repeats that run, not a new seed: it is left out, and the output says
so. ``--format csv|json`` prints one row per run instead (as ``l2lab.load_runs``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from l2lab.base import ConfigError

# tracking, sweep and runs (MLflow, torch, pandas) are imported once the arguments are parsed, so
# that `--help` answers at once.


def select_runs(client, *, experiment: str | None, sweep: str | None,
                run_ids: list[str]) -> tuple[list, str]:
    """The runs to compare (``tracking.runs.select``; the latest sweep when nothing is named)
    and a label for the output folder."""
    from l2lab.tracking import runs as rs

    runs = rs.select(client, experiment=experiment, sweep=sweep, run_ids=run_ids,
                     latest_sweep=True, option="--experiment")
    if run_ids:
        return runs, "runs"
    if not runs:
        raise ConfigError(f"no runs found for --sweep {sweep!r} / --experiment {experiment!r}.")
    if sweep is None and experiment is None:  # the latest sweep: named by its id
        sweep = runs[0].data.tags.get("l2lab.sweep_id")
    return runs, sweep or experiment or "runs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="l2lab-compare", description=__doc__.splitlines()[0],
                                 epilog="A reproduction or reuse listing of a selected run is "
                                 "left out (it repeats that run); runs that never trained get no "
                                 "row. --format prints every selected run, one row each.")
    ap.add_argument("run_ids", nargs="*", help="explicit MLflow run ids (or unique prefixes of "
                    "6 or more characters)")
    ap.add_argument("--experiment", help="every training run of this experiment")
    ap.add_argument("--sweep", help="the runs of this sweep id (its multirun folder name)")
    ap.add_argument("--out", type=Path, help="output folder (default: reports/<label>)")
    ap.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db")
    ap.add_argument("--by", action="append", metavar="KEY",
                    help="condition key(s) (repeat, or comma-separate): the best λ is found per "
                    "value of these keys, in place of every key that varies (default); keys "
                    "left out are pooled as replicates; --by none pools them all")
    ap.add_argument("--format", choices=("table", "csv", "json"), default="table",
                    help="table (default): the sweep table and figures; csv/json: one row per "
                    "run (params, final metrics, best val/ce and epoch) on stdout")
    args = ap.parse_args(argv)

    from l2lab.tracking import runs as rs
    from l2lab.tracking import tracker as tr

    try:  # ids as people type them (a prefix), answered before MLflow is imported
        uri = tr.resolve_uri(args.tracking_uri)
        ids = [rs.resolve_run_id(r, uri) for r in args.run_ids]
    except ConfigError as e:
        print(f"l2lab-compare: error: {e}", file=sys.stderr)
        return 2
    from l2lab.console import quiet_libraries
    from l2lab.run.sweep import summarize_runs

    quiet_libraries()  # tr.reader imports MLflow only if it must
    try:
        client = tr.reader(uri)
        runs, label = select_runs(client, experiment=args.experiment, sweep=args.sweep,
                                  run_ids=ids)
        by = condition_keys(args.by, runs)
    except ConfigError as e:
        print(f"l2lab-compare: error: {e}", file=sys.stderr)
        return 2
    if args.format != "table":
        frame = rs.to_frame(client, runs)
        text = frame.to_csv(index=False) if args.format == "csv" else \
            frame.to_json(orient="records", indent=1)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    runs, repeats = rs.drop_repeats(runs)
    out = args.out or Path("reports") / label
    context = report_context(client, runs, label, uri, argv)
    table, paths, _ = summarize_runs(client, runs, out, name_rejected=False, context=context,
                                     by=by)
    print(f"{len(runs)} runs ({label}) from {uri}\n\n{table}")
    pooled = [k for k in rs.varying_keys(runs) if k != "regularization.lam" and k not in (by or [])]
    if by is not None and pooled:
        print(f"Pooled over {', '.join(pooled)} (not in --by): their runs count as replicates of "
              "a cell, one seed's runs averaged for the paired tests.\n")
    if repeats:
        kinds = sorted({"reproduction" if rs.REPRODUCED_TAG in r.data.tags else "reuse listing"
                        for r in repeats})
        print(f"Left out {len(repeats)} run(s) that repeat a selected run ({' / '.join(kinds)}: "
              f"same config and seed, not an extra seed): "
              f"{', '.join(r.info.run_id[:8] for r in repeats)}\n")
    print(f"Report:  {paths['report']}\nSummary: {paths['summary']}\n"
          f"Figures: {paths['lambda_curve'].parent}")
    return 0


def condition_keys(by: list[str] | None, runs: list) -> list[str] | None:
    """The ``--by`` keys, checked against the selected runs' params and overrides (None: every
    varying key, the default; ``none``: no condition, every run pooled per λ)."""
    if not by:
        return None
    keys = [k.strip() for item in by for k in item.split(",") if k.strip()]
    if keys == ["none"]:
        return []
    import json

    from l2lab.tracking import runs as rs
    from l2lab.tracking.tracker import parse_overrides

    known = {k for r in runs for k in r.data.params}
    known |= {k for r in runs
              for k in parse_overrides(json.loads(r.data.tags.get("l2lab.overrides", "[]")))}
    bad = [k for k in keys if k not in known or k in ("regularization.lam", "seed")]
    if bad:
        varying = [k for k in rs.varying_keys(runs) if k != "regularization.lam"]
        raise ConfigError(
            f"--by: {', '.join(map(repr, bad))} is not a condition key of these runs (λ and seed "
            f"never are). Keys that vary in this selection: {', '.join(varying) or '(none)'}; "
            "any other logged param or override key (e.g. data.train_size, optimizer.lr, "
            "regularization) is allowed, or none.")
    return keys


def report_context(client, runs: list, label: str, uri: str, argv: list[str] | None):
    """The HTML report's title, UI links and commands: this comparison, and the command of each
    sweep whose runs are in it (from its parent run's overrides and git commit)."""
    import json
    import shlex

    from l2lab.report.html import ReportContext
    from l2lab.run.sweep import reproduce_command
    from l2lab.tracking import ui

    args = sys.argv[1:] if argv is None else argv
    commands = [" ".join(["python -m l2lab.compare", *map(shlex.quote, args)])]
    parents = sorted({r.data.tags["mlflow.parentRunId"] for r in runs
                      if "mlflow.parentRunId" in r.data.tags})
    shown = None
    for pid in parents[:20]:
        try:
            parent = client.get_run(pid)
        except Exception:  # a deleted parent: the runs are still compared
            continue
        tags = parent.data.tags
        overrides = json.loads(tags.get("l2lab.overrides", "[]"))
        commands.append(f"# sweep {tags.get('l2lab.sweep_id', pid)}:")
        commands += reproduce_command(overrides, tags.get("mlflow.source.git.commit"))
        shown = (parent.info.experiment_id, pid) if len(parents) == 1 else None
    views = {}
    if shown is not None:  # one sweep: its chart link opens the view its sweep shared, if any
        from l2lab.compat.mlflow import SHARED_VIEW_TAG

        with contextlib.suppress(Exception):
            if SHARED_VIEW_TAG + shown[1] in client.get_experiment(shown[0]).tags:
                views = {shown[0]: shown[1]}
    return ReportContext(title=f"l2lab compare: {label}",
                         links=ui.UiLinks(ui.ui_base(uri), views), parent=shown,
                         commands=commands)


def program() -> None:
    """The console script: :func:`main` as the whole process (``lifecycle.run_as_program``)."""
    from l2lab.run.lifecycle import run_as_program

    run_as_program(main)


if __name__ == "__main__":
    program()

"""The sweep's table as the terminal shows it: a row per combination of swept keys, mean ± std
over seeds, the 95% interval of val/ce, and each condition's best row marked (``*`` clear, ``~``
not). Kept apart from :mod:`l2lab.report.stats` (the numbers) because it needs the conditions
(:mod:`l2lab.report.conditions`), which are built on those numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from l2lab import metrics as mt
from l2lab.records import FAILURE_TAG
from l2lab.report import conditions as cd
from l2lab.report import numeric as nm
from l2lab.report.stats import (
    FINISHED,
    LAM_KEY,
    RunRecord,
    cell_columns,
    fmt_interval,
    fmt_stat,
    fmt_value,
    rejected,
    row_label,
    select_metric,
    short_key,
    trained,
    value_sort_key,
    verdict,
)

#: (header, summary column prefix, decimals) of the table's metric columns: the metrics
#: ``metrics.TABLE`` names (accuracies to 3 decimals), then each run's best val/ce and its epoch.
TABLE_METRICS: tuple[tuple[str, str, int], ...] = (
    *((m, m, 3 if m.endswith("/acc") else 4) for m in mt.TABLE),
    ("best val/ce", "best_val_ce", 4), ("best epoch", "best_epoch", 0),
)


def table_metrics(summary: pd.DataFrame, metric: str = mt.VAL_CE) -> list[tuple[str, str, int]]:
    """The metric columns the summary has; ``metric`` (what chose the best λ: test/ce without a
    validation split) joins them where the usual columns lack it."""
    shown = [m for m in TABLE_METRICS if f"{m[1]}_mean" in summary.columns]
    if metric not in {m[1] for m in shown} and f"{metric}_mean" in summary.columns:
        shown.insert(len(mt.SUMMARY), (metric, metric, 4))
    return shown


def format_table(summary: pd.DataFrame, runs: Sequence[RunRecord], *,
                 name_rejected: bool = True) -> str:
    """Fixed-width table for the terminal: mean ± std over seeds, the 95% t-interval of val/ce,
    failed runs listed with their reason, and the best row marked ``*`` when the paired test
    calls it clear and ``~`` when it does not.

    Failures are spelled out because a sweep whose best λ had half its seeds crash deserves a
    second look before anyone trusts the ranking. Runs that never trained have no row: a sweep
    names each (``name_rejected``), ``compare`` over many runs gives their count.
    """
    keys = cell_columns(summary)
    metric = select_metric(trained(runs))
    metrics = table_metrics(summary, metric)
    header = ([short_key(k) for k in keys] + ["runs"] + [m[0] for m in metrics]
              + [f"{metric} 95% CI"])
    ver = verdict(summary, runs)
    cond_keys, conds = cd.split(runs)
    marks = {best_row(summary, c.values, c.best_lam): c.verdict.mark for c in conds} \
        if cond_keys else {ver.best: ver.mark}
    body: list[list[str]] = []
    for pos in range(len(summary)):
        row = summary.iloc[pos]
        cells = [fmt_value(row[k]) for k in keys] + [str(int(row["runs"]))]
        for _, prefix, decimals in metrics:
            if prefix == "best_epoch":
                cells.append(fmt_epochs(row))
                continue
            cells.append(fmt_stat(float(row[f"{prefix}_mean"]), float(row[f"{prefix}_std"]),
                                  decimals))
        cells.append(fmt_interval(float(row[f"{metric}_lo"]), float(row[f"{metric}_hi"]), 4))
        body.append(cells)
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]

    def line(cells: list[str], mark: str) -> str:
        return mark + " " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    lines = [line(header, " "), "  " + "-" * (sum(widths) + 2 * (len(widths) - 1))]
    if not body:
        lines.append("  (no runs)")
    for pos, cells in enumerate(body):
        lines.append(line(cells, marks.get(pos, " ")))

    never = [r for r in runs if rejected(r)]
    problems = [r for r in runs if r.status != FINISHED and (name_rejected or not rejected(r))]
    if problems:
        lines.append("")
        lines += failure_lines(problems, len(runs))
    if never:
        lines.append("")
        lines.append(f"{len(never)} run(s) never trained (rejected config, or failed before the "
                     "first epoch): no row in the table" + ("." if name_rejected else
                                                           f"; see their {FAILURE_TAG} tag."))
    lines.append("")
    if metric != mt.VAL_CE:
        lines.append(f"No validation split (no run logged val/ce; data.val_size=0?): best λ "
                     f"chosen and judged on {metric}.")
    if cond_keys:
        lines += cd.format_conditions(cond_keys, conds)
        if (view := nm.view(cond_keys, conds)) is not None:
            lines += ["", *nm.verdict_lines(view)]
    elif ver.best is None:
        lines.append(f"  lowest mean {metric}: n/a (no finished runs)")
    else:
        lines += [f"! {w}" for c in conds for w in cd.warnings_of(c)]
        if selected := cd.selection_line(conds):
            lines.append(f"  {selected}")
        lines.append(f"{ver.mark} lowest mean {metric}: {row_label(summary, ver.best)}: "
                     f"{ver.text}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def failure_groups(problems: Sequence[RunRecord]
                   ) -> list[tuple[str, str, list[RunRecord]]]:
    """(status, reason, runs) of the runs that did not finish, in sweep order (λ, the other
    swept values, then seed: the table's order, not the order the store started them in), one
    group per shared reason: a rejected selection fails every job the same way, and is said
    once."""
    order = sorted(problems, key=lambda r: (
        float(r.lam) if math.isfinite(r.lam) else math.inf,
        tuple(value_sort_key(str(v)) for k, v in sorted(r.swept.items()) if k != LAM_KEY),
        r.seed))
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in order:
        groups.setdefault((run.status, run.failure or "no reason recorded"), []).append(run)
    return [(status, reason, members) for (status, reason), members in groups.items()]


def failure_lines(problems: Sequence[RunRecord], total: int) -> list[str]:
    """One line per run that did not finish with its reason; a reason shared by several runs
    once, with their count (:func:`failure_groups`)."""
    lines = []
    for status, reason, members in failure_groups(problems):
        if len(members) == 1:
            run = members[0]
            lines.append(f"{status}  {run.name}  ({run.run_id}): {reason}")
            continue
        who = (f"all {total} runs" if len(members) == total else
               f"{len(members)} runs ({', '.join(r.name for r in members[:6])}"
               f"{', …' if len(members) > 6 else ''})")
        lines.append(f"{status}  {who}: {reason}")
    return lines


def best_row(summary: pd.DataFrame, values: dict[str, str], lam: float) -> int | None:
    """The summary row of a condition's best λ."""
    for pos in range(len(summary)):
        row = summary.iloc[pos]
        if float(row["lam"]) == lam and all(str(row[k]) == str(v) for k, v in values.items()):
            return pos
    return None


def fmt_epochs(row: pd.Series) -> str:
    """The best epoch as its median and min-max range over seeds (:data:`EPOCH_RANGE`)."""
    median, lo, hi = (float(row[f"best_epoch_{s}"]) for s in ("median", "lo", "hi"))
    if math.isnan(median):
        return "n/a"
    if math.isnan(lo):
        return f"{median:g}"
    return f"{median:g} [{lo:g}–{hi:g}]"

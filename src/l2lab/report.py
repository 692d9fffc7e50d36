"""Summaries, terminal tables and figures for a λ sweep, built from plain run records.

This module deliberately knows nothing about MLflow, torch or Lightning: the caller converts
tracked runs into :class:`RunRecord` objects, so the reporting logic can be tested with
synthetic numbers and re-run offline on exported data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

LAM_KEY = "regularization.lam"
FINISHED = "FINISHED"
#: Final metrics summarised per group, in column order.
FINAL_METRICS: tuple[str, ...] = ("train/ce", "val/ce", "gap/ce", "val/acc")
#: Every column after the group-key columns, in order.
STAT_COLUMNS: tuple[str, ...] = (
    "lam",
    "runs",
    "failed",
    *(f"{m}_{s}" for m in FINAL_METRICS for s in ("mean", "std")),
    "best_val_ce_mean",
    "best_val_ce_std",
    "best_epoch_mean",
    "best_epoch_std",
)

FIGSIZE = (7.0, 4.5)
DPI = 120
TRAIN_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"
LAMBDA_LABEL = "λ (L2 strength)"
CE_LABEL = "final cross-entropy (nats)"
NORM_LABEL = r"$\Sigma\,\Vert W\Vert_F^2$ of selected layers"  # renders as Σ‖W‖²_F


@dataclass
class RunRecord:
    """One training run, already flattened out of the tracking store."""

    run_id: str
    name: str  # readable run name, e.g. "lam=0.01 seed=1"
    status: str  # "FINISHED" | "FAILED" | "KILLED" | "RUNNING"
    group: dict[str, str]  # swept keys other than `seed`; may be {}
    lam: float  # regularization.lam of the run (>= 0)
    seed: int
    failure: str | None = None  # reason, for FAILED runs
    final: dict[str, float] = field(default_factory=dict)  # last-epoch metric values
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> points


# --------------------------------------------------------------------------- grouping


@dataclass
class _Group:
    """Runs that differ only in seed; one summary row and one curve per group."""

    values: dict[str, str]
    lam: float
    runs: list[RunRecord]

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == FINISHED]


def rejected(run: RunRecord) -> bool:
    """A run that never trained an epoch (rejected by validation, or failed while building):
    FAILED with no metrics. It has no numbers to show, so it gets no table row or curve."""
    return run.status != FINISHED and not run.final and not any(run.history.values())


def _trained(runs: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if not rejected(r)]


def _group_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Union of swept keys, λ first so the table reads λ-major; `{}` groups fall back to λ."""
    keys: list[str] = []
    for run in runs:
        for key in run.group:
            if key not in keys:
                keys.append(key)
    if not keys:
        return [LAM_KEY]
    if LAM_KEY in keys:
        keys.remove(LAM_KEY)
        keys.insert(0, LAM_KEY)
    return keys


def _value_sort_key(value: str) -> tuple[int, float, str]:
    """Order swept values numerically when they parse as numbers (so "500" < "1000")."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _group_runs(runs: Sequence[RunRecord]) -> tuple[list[str], list[_Group]]:
    """Split runs into seed groups, sorted by λ then by the other keys.

    λ is part of the grouping identity even when it is not a swept key, so runs with different
    λ are never averaged together.
    """
    keys = _group_keys(runs)
    implicit_lam = not any(r.group for r in runs)
    groups: dict[tuple[tuple[str, ...], float], _Group] = {}
    for run in runs:
        lam = float(run.lam)
        if implicit_lam:
            values = {LAM_KEY: str(lam)}
        else:
            values = {k: str(run.group.get(k, "")) for k in keys}
        ident = (tuple(values[k] for k in keys), lam)
        if ident not in groups:
            groups[ident] = _Group(values=values, lam=lam, runs=[])
        groups[ident].runs.append(run)
    ordered = sorted(
        groups.values(),
        key=lambda g: (g.lam, tuple(_value_sort_key(g.values[k]) for k in keys)),
    )
    return keys, ordered


# --------------------------------------------------------------------------- statistics


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) over seeds; missing/NaN values are skipped, std is NaN for
    fewer than two values so a single seed is never mistaken for zero spread."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return mean, std


def _best_val(run: RunRecord) -> tuple[float, float]:
    """(min val/ce, its step) over the run's history: the early-stopping optimum, which tells
    how much of the final val/ce is due to training too long rather than to λ."""
    points = sorted(
        (int(s), float(v)) for s, v in run.history.get("val/ce", []) if not math.isnan(float(v))
    )
    if not points:
        return math.nan, math.nan
    step, value = min(points, key=lambda p: p[1])  # first occurrence on ties (sorted by step)
    return value, float(step)


def _final_value(run: RunRecord, metric: str) -> float:
    """A final metric; `gap/ce` is derived as val − train when the record lacks it."""
    if metric in run.final:
        return float(run.final[metric])
    if metric == "gap/ce" and "val/ce" in run.final and "train/ce" in run.final:
        return float(run.final["val/ce"]) - float(run.final["train/ce"])
    return math.nan


def summarize(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per seed group with mean/std of the final and best-epoch metrics.

    Only FINISHED runs feed the statistics (a crashed run's last values are not comparable);
    the others are counted in `failed` so a thin group is visible rather than silently small.
    Runs that never trained (:func:`rejected`) are left out: :func:`format_table` names them.
    """
    keys, groups = _group_runs(_trained(runs))
    rows: list[dict[str, object]] = []
    for group in groups:
        done = group.finished
        row: dict[str, object] = {k: group.values[k] for k in keys}
        row["lam"] = group.lam
        row["runs"] = len(done)
        row["failed"] = len(group.runs) - len(done)
        for metric in FINAL_METRICS:
            mean, std = _mean_std([_final_value(r, metric) for r in done])
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        best = [_best_val(r) for r in done]
        row["best_val_ce_mean"], row["best_val_ce_std"] = _mean_std([b[0] for b in best])
        row["best_epoch_mean"], row["best_epoch_std"] = _mean_std([b[1] for b in best])
        rows.append(row)
    columns = [*keys, *STAT_COLUMNS]
    frame = pd.DataFrame(rows, columns=columns)
    frame["lam"] = frame["lam"].astype(float)
    frame["runs"] = frame["runs"].astype(int)
    frame["failed"] = frame["failed"].astype(int)
    return frame


# --------------------------------------------------------------------------- text table


def _short_key(key: str) -> str:
    """Header for a group key: `regularization.lam` reads as `lam`."""
    return key.removeprefix("regularization.")


def _summary_group_columns(summary: pd.DataFrame) -> list[str]:
    """The group-key columns are everything before `lam` (see :func:`summarize`)."""
    columns = list(summary.columns)
    return columns[: columns.index("lam")] if "lam" in columns else []


def _fmt(mean: float, std: float, decimals: int) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _best_row(summary: pd.DataFrame) -> int | None:
    """Positional index of the lowest mean val/ce (ties: smallest λ), or None if none finished."""
    if summary.empty or "val/ce_mean" not in summary:
        return None
    values = summary["val/ce_mean"].to_numpy(dtype=float)
    if np.all(np.isnan(values)):
        return None
    return int(np.nanargmin(values))


def best_verdict(summary: pd.DataFrame) -> tuple[int | None, bool, str]:
    """(row, clear, why): the lowest mean val/ce is a *clear* best only when it is lower than the
    runner-up's by more than their combined std sqrt(s1² + s2²) over seeds; otherwise the ranking
    is within seed-to-seed noise, and a star would overstate it."""
    best = _best_row(summary)
    if best is None:
        return None, False, ""
    values = summary["val/ce_mean"].to_numpy(dtype=float)
    others = [i for i in range(len(values)) if i != best and np.isfinite(values[i])]
    if not others:
        return best, True, "the only row with finished runs"
    nxt = min(others, key=lambda i: values[i])
    diff = float(values[nxt] - values[best])
    s1, s2 = (float(summary.iloc[i]["val/ce_std"]) for i in (best, nxt))
    label = _row_label(summary, nxt)
    if math.isnan(s1) or math.isnan(s2):
        return best, False, (f"not a clear winner: {diff:.4f} below the next ({label}), but with "
                             "one run per row there is no seed-to-seed std to judge it (add "
                             "seeds, e.g. seed=0,1,2)")
    combined = math.hypot(s1, s2)
    if diff > combined:
        return best, True, (f"clear: {diff:.4f} below the next ({label}), more than their "
                            f"combined std {combined:.4f}")
    return best, False, (f"within noise: {diff:.4f} below the next ({label}), not more than "
                         f"their combined std {combined:.4f}")


def _row_label(summary: pd.DataFrame, pos: int) -> str:
    keys = _summary_group_columns(summary)
    return ", ".join(f"{_short_key(k)}={summary.iloc[pos][k]}" for k in keys)


def format_table(summary: pd.DataFrame, runs: list[RunRecord], *,
                 name_rejected: bool = True) -> str:
    """Fixed-width table for the terminal, failed runs listed with their reason, the best row
    marked ``*`` when it is clearly best and ``~`` when it is within noise of the next.

    Failures are spelled out because a sweep whose best λ had half its seeds crash deserves a
    second look before anyone trusts the ranking. Runs that never trained have no row: a sweep
    names each (``name_rejected``), ``compare`` over many runs gives their count.
    """
    keys = _summary_group_columns(summary)
    metric_cols: list[tuple[str, str, int]] = [
        ("train/ce", "train/ce", 4),
        ("val/ce", "val/ce", 4),
        ("gap/ce", "gap/ce", 4),
        ("val/acc", "val/acc", 3),
        ("best val/ce", "best_val_ce", 4),
        ("best epoch", "best_epoch", 1),
    ]
    header = [_short_key(k) for k in keys] + ["runs"] + [m[0] for m in metric_cols]
    best, clear, why = best_verdict(summary)
    mark = "*" if clear else "~"
    body: list[list[str]] = []
    for pos in range(len(summary)):
        row = summary.iloc[pos]
        cells = [str(row[k]) for k in keys] + [str(int(row["runs"]))]
        for _, prefix, decimals in metric_cols:
            cells.append(_fmt(float(row[f"{prefix}_mean"]), float(row[f"{prefix}_std"]), decimals))
        body.append(cells)
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]

    def line(cells: list[str], mark: str) -> str:
        return mark + " " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    lines = [line(header, " "), "  " + "-" * (sum(widths) + 2 * (len(widths) - 1))]
    if not body:
        lines.append("  (no runs)")
    for pos, cells in enumerate(body):
        lines.append(line(cells, mark if pos == best else " "))

    never = [r for r in runs if rejected(r)]
    problems = [r for r in runs if r.status != FINISHED and (name_rejected or not rejected(r))]
    if problems:
        lines.append("")
        for run in problems:
            reason = run.failure or "no reason recorded"
            lines.append(f"{run.status}  {run.name}  ({run.run_id}): {reason}")
    if never:
        lines.append("")
        lines.append(f"{len(never)} run(s) never trained (rejected config, or failed before the "
                     "first epoch): no row in the table" + ("." if name_rejected else
                                                           "; see their l2lab.failure tag."))

    lines.append("")
    if best is None:
        lines.append("* lowest mean val/ce: n/a (no finished runs)")
    else:
        lines.append(f"{mark} lowest mean val/ce: {_row_label(summary, best)} ({why})")
    return "\n".join(line.rstrip() for line in lines) + "\n"


# --------------------------------------------------------------------------- figures


def _new_figure() -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    return fig, ax


def _save(fig: Figure, path: Path) -> None:
    """Lay out and save; callers close the figure in `finally` so repeated reports leak none."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def _placeholder(ax: Axes, text: str) -> None:
    ax.text(
        0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="0.4"
    )
    ax.set_xticks([])  # a 0..1 scale would suggest data that is not there
    ax.set_yticks([])


def _lam_label(group: _Group) -> str:
    parts = [f"λ={group.lam:g}"]
    parts += [f"{_short_key(k)}={v}" for k, v in group.values.items() if k != LAM_KEY]
    return ", ".join(parts)


def _mean_curve(runs: Sequence[RunRecord], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean over seeds aligned by step; a step missing in some seeds averages the others."""
    series = []
    for run in runs:
        points = run.history.get(metric) or []
        if not points:
            continue
        s = pd.Series([float(v) for _, v in points], index=[int(st) for st, _ in points])
        series.append(s[~s.index.duplicated(keep="last")])
    if not series:
        return None
    mean = pd.concat(series, axis=1).sort_index().mean(axis=1, skipna=True).dropna()
    if mean.empty:
        return None
    return mean.index.to_numpy(dtype=float), mean.to_numpy(dtype=float)


def _decades(values: Sequence[np.ndarray]) -> float:
    """How many powers of ten the (positive) values span; decides whether minor ticks get labels."""
    flat = np.concatenate([np.asarray(v, dtype=float) for v in values])
    return float(np.log10(flat.max() / flat.min()))


def _group_colors(groups: Sequence[_Group]) -> list[tuple[float, float, float, float]]:
    """Viridis in λ order, stopping short of its pale yellow end so every line stays legible."""
    cmap = plt.get_cmap("viridis")
    n = len(groups)
    return [cmap(0.85 * i / (n - 1)) if n > 1 else cmap(0.3) for i in range(n)]


def _plot_lambda_curve(summary: pd.DataFrame, path: Path) -> None:
    """Final train/val CE vs λ: the U-shape of val/ce is the over- vs underfitting trade-off."""
    fig, ax = _new_figure()
    try:
        ax.set_xlabel(LAMBDA_LABEL)
        ax.set_ylabel(CE_LABEL)
        ax.set_title("Final cross-entropy vs L2 strength (mean ± std over seeds)")
        done = summary[summary["val/ce_mean"].notna() | summary["train/ce_mean"].notna()]
        if done.empty:
            _placeholder(ax, "no finished runs")
            _save(fig, path)
            return

        keys = _summary_group_columns(summary)
        others = [k for k in keys if k != LAM_KEY]
        combos = (
            [((), done)]
            if not others
            else [
                (c if isinstance(c, tuple) else (c,), d)
                for c, d in done.groupby(others, sort=False)
            ]
        )
        if len(combos) > 1:
            combos.sort(key=lambda cd: tuple(_value_sort_key(str(v)) for v in cd[0]))
        markers = "osD^vph<>"
        styles = ["-", "--", ":", "-."]
        positive = done.loc[done["lam"] > 0, "lam"]
        annotated_zero = False
        for i, (combo, data) in enumerate(combos):
            data = data.sort_values("lam")
            lam = data["lam"].to_numpy(dtype=float)
            suffix = ", ".join(f"{_short_key(k)}={v}" for k, v in zip(others, combo, strict=True))
            marker, style = markers[i % len(markers)], styles[i % len(styles)]
            for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
                mean = data[f"{split}/ce_mean"].to_numpy(dtype=float)
                std = data[f"{split}/ce_std"].to_numpy(dtype=float)
                label = f"{split} ({suffix})" if suffix else split
                ax.plot(lam, mean, linestyle=style, color=color, label=label)
                pos = lam > 0
                ax.plot(
                    lam[pos], mean[pos], linestyle="none", marker=marker, color=color, markersize=5
                )
                zero = lam == 0
                ax.plot(
                    lam[zero],
                    mean[zero],
                    linestyle="none",
                    marker=marker,
                    color=color,
                    markerfacecolor="white",
                    markeredgewidth=1.8,
                    markersize=9,
                )
                has_std = np.isfinite(std) & np.isfinite(mean)
                if has_std.any():
                    ax.errorbar(
                        lam[has_std],
                        mean[has_std],
                        yerr=std[has_std],
                        fmt="none",
                        ecolor=color,
                        elinewidth=1,
                        capsize=3,
                        alpha=0.8,
                    )
                if split == "val" and zero.any() and not annotated_zero:
                    ax.annotate(
                        "λ=0 (no L2)",
                        xy=(0.0, mean[zero][0]),
                        xytext=(12, 14),  # above: the best-λ note goes below the star
                        textcoords="offset points",
                        va="bottom",
                        fontsize=9,
                        arrowprops={"arrowstyle": "-", "color": "0.4"},
                    )
                    annotated_zero = True
            val_mean = data["val/ce_mean"].to_numpy(dtype=float)
            if np.isfinite(val_mean).any():
                j = int(np.nanargmin(val_mean))
                ax.plot(
                    [lam[j]],
                    [val_mean[j]],
                    marker="*",
                    markersize=16,
                    color=VAL_COLOR,
                    markeredgecolor="black",
                    linestyle="none",
                    zorder=5,
                )
                ax.annotate(
                    f"lowest val/ce\nλ={lam[j]:g}",
                    xy=(lam[j], val_mean[j]),
                    xytext=(10, -12),  # below: val/ce rises on both sides of its minimum
                    textcoords="offset points",
                    va="top",
                    fontsize=9,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
                )
        if len(positive):
            ax.set_xscale("symlog", linthresh=float(positive.min()))
        ax.margins(y=0.15)  # room for the annotations inside the axes
        ax.legend(fontsize="small", loc="best")
        ax.grid(True, alpha=0.3)
        _save(fig, path)
    finally:
        plt.close(fig)


def _plot_curves(
    groups: Sequence[_Group],
    colors: Sequence[tuple[float, float, float, float]],
    path: Path,
    *,
    weights: bool,
) -> None:
    """Learning curves (train dashed, val solid) or weight norms, one colour per λ group."""
    fig, ax = _new_figure()
    try:
        ax.set_xlabel("epoch")
        if weights:
            ax.set_ylabel(NORM_LABEL)
            ax.set_title("Weight norm during training (mean over seeds)")
        else:
            ax.set_ylabel("cross-entropy (nats)")
            ax.set_title("Learning curves (mean over seeds): val solid, train dashed")
        if not any(g.finished for g in groups):
            _placeholder(ax, "no finished runs")
            _save(fig, path)
            return

        handles: list[Line2D] = []
        all_values: list[np.ndarray] = []
        for group, color in zip(groups, colors, strict=True):
            done = group.finished
            if not done:
                continue
            drawn = False
            metrics = (
                [("weights/sq_norm_total", "-")]
                if weights
                else [("val/ce", "-"), ("train/ce", "--")]
            )
            for metric, style in metrics:
                curve = _mean_curve(done, metric)
                if curve is None:
                    continue
                steps, values = curve
                ax.plot(steps, values, linestyle=style, color=color, linewidth=1.6)
                all_values.append(values)
                drawn = True
            if drawn:
                handles.append(Line2D([], [], color=color, linewidth=2, label=_lam_label(group)))
        if not handles:
            _placeholder(ax, "no history recorded")
            _save(fig, path)
            return
        if not weights:
            handles += [
                Line2D([], [], color="0.3", linestyle="-", label="val"),
                Line2D([], [], color="0.3", linestyle="--", label="train"),
            ]
        if weights and all(np.all(v > 0) for v in all_values):
            ax.set_yscale("log")
            # Plain numbers (60, 40) read faster than 6×10¹ on a norm that spans few decades.
            plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(
                plain if _decades(all_values) < 1.0 else ticker.NullFormatter()
            )
        # Outside the axes: with many λ an inside legend would hide the curves it explains.
        ax.legend(
            handles=handles,
            fontsize="small",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0,
            ncol=2 if len(handles) > 14 else 1,
        )
        ax.grid(True, alpha=0.3)
        _save(fig, path)
    finally:
        plt.close(fig)


def write_report(runs: list[RunRecord], out_dir: Path) -> dict[str, Path]:
    """Write `summary.csv` and the three sweep figures into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out_dir / "summary.csv",
        "lambda_curve": fig_dir / "lambda_curve.png",
        "learning_curves": fig_dir / "learning_curves.png",
        "weight_norms": fig_dir / "weight_norms.png",
    }
    summary = summarize(runs)
    summary.to_csv(paths["summary"], index=False)

    _, groups = _group_runs(_trained(runs))
    colors = _group_colors(groups)
    _plot_lambda_curve(summary, paths["lambda_curve"])
    _plot_curves(groups, colors, paths["learning_curves"], weights=False)
    _plot_curves(groups, colors, paths["weight_norms"], weights=True)
    return paths

"""The sweep's figures: the λ curve with 95% bands, learning curves and weight norms per λ.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot, no
global backend switch at import (a notebook that imports l2lab keeps its own backend), and no
figure registry to leak. Constrained layout keeps the legends outside the axes (they would hide
curves with many λ) without clipping them, and without tight_layout's warnings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps, ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from l2lab import metrics as mt
from l2lab.report.stats import FINISHED, Cell, RunRecord, cell_columns, fmt_value, short_key

DPI = 120
TRAIN_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"
TIE_COLOR = "#e4e0f0"  # the λ not distinguishable from the best: a pale violet, not a band colour
LAMBDA_LABEL = "λ (penalty strength)"
CE_LABEL = "final cross-entropy (nats)"
NORM_LABEL = r"$\Sigma\,\Vert W\Vert_F^2$ of selected layers"  # renders as Σ‖W‖²_F
#: The y labels of the ``metrics.CURVES`` panels: in full, and in a grid of panels.
CURVE_LABELS = ("train cross-entropy (nats)", "val cross-entropy (nats)")
CURVE_LABELS_SHORT = ("train CE (nats)", "val CE (nats)")
#: Up to this many cells get distinct qualitative colours and a legend; more get a colour scale
#: in λ order with a labelled colour bar (a legend of 30 entries reads as badly as 30 colours).
MAX_LEGEND = 10
#: Up to this many conditions get a row of learning-curve panels each; more share one panel.
MAX_PANEL_ROWS = 4


def new_figure(width: float = 8.0, height: float = 4.6) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


def placeholder(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=14,
            color="0.4")
    ax.set_xticks([])  # a 0..1 scale would suggest data that is not there
    ax.set_yticks([])


def cell_label(cell: Cell) -> str:
    """λ and the condition, short: the key's last part (``train_size=500``), long values cut."""
    text = ", ".join([f"λ={fmt_value(cell.lam)}",
                      *(f"{k.rsplit('.', 1)[-1]}={fmt_value(v)}" for k, v in cell.values.items())])
    return text if len(text) <= 40 else text[:39] + "…"


def cell_colors(n: int) -> list[tuple[float, float, float, float]]:
    """Distinct colours (tab10) for a legend's worth of cells; beyond that a perceptual scale in
    group order (viridis, stopping short of its pale yellow end), read off a colour bar."""
    if n <= MAX_LEGEND:
        return [colormaps["tab10"](i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / (n - 1)) for i in range(n)]


def _colorbar(fig: Figure, axes: Sequence[Axes] | Axes, cells: Sequence[Cell],
              colors: Sequence) -> None:
    """A discrete colour bar: one band per cell, labelled with its λ (every k-th when many)."""
    n = len(cells)
    cmap = ListedColormap(list(colors))
    norm = BoundaryNorm(np.arange(n + 1) - 0.5, n)
    sm = _ScalarMappable(norm, cmap)
    bar = fig.colorbar(sm, ax=axes, pad=0.02, fraction=0.05)
    step = max(1, int(np.ceil(n / 20)))
    ticks = list(range(0, n, step))
    bar.set_ticks(ticks)
    bar.set_ticklabels([cell_label(cells[i]).removeprefix("λ=") if not cells[i].values
                        else cell_label(cells[i]) for i in ticks])
    bar.set_label("λ" if not any(g.values for g in cells) else "group")
    bar.ax.tick_params(labelsize="small")


def _ScalarMappable(norm, cmap):  # noqa: N802 (a constructor, named as one)
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=cmap)


def lambda_axis(ax: Axes, lams: np.ndarray) -> None:
    """Symlog x axis (so λ = 0 shows) with readable ticks: the swept λ values themselves when
    there are few, else every power of ten, always as plain numbers (0.001, not 10⁻³)."""
    positive = lams[lams > 0]
    if not positive.size:
        ax.set_xticks(sorted(set(lams.tolist())))
        return
    linthresh = float(positive.min())
    ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
    values = np.unique(lams)
    if values.size <= 10:
        ticks = values
    else:
        lo, hi = np.floor(np.log10(positive.min())), np.ceil(np.log10(positive.max()))
        ticks = np.concatenate([[0.0] if (lams == 0).any() else [],
                                10.0 ** np.arange(lo, hi + 1)])
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    if len(ticks) > 6:
        for label in ax.get_xticklabels():
            label.set_rotation(45)
            label.set_horizontalalignment("right")


def readable_log_y(ax: Axes, values: Sequence[np.ndarray]) -> None:
    """Log y when every value is positive and they span a decade or more; otherwise linear, so
    that a narrow range still gets several labelled ticks (a log axis over 40..60 has one)."""
    flat = np.concatenate([np.asarray(v, dtype=float) for v in values]) if values else np.array([])
    flat = flat[np.isfinite(flat)]
    if flat.size and np.all(flat > 0) and flat.max() / flat.min() >= 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    else:
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=6))


def plot_lambda_curve(summary: pd.DataFrame, path: Path) -> None:
    """Final train/val CE vs λ with the 95% t-interval over seeds as a band: the U-shape of
    val/ce is the over- vs underfitting trade-off. Every label is in the legend, outside the
    axes, so none covers a point."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.set_xlabel(LAMBDA_LABEL)
    ax.set_ylabel(CE_LABEL)
    ax.set_title("Final cross-entropy vs λ (mean, band: 95% interval over seeds)",
                 fontsize="medium")
    done = summary[summary["val/ce_mean"].notna() | summary["train/ce_mean"].notna()] \
        if not summary.empty else summary
    if done.empty:
        placeholder(ax, "no finished runs")
        save(fig, path)
        return
    others = [k for k in cell_columns(summary) if k != "lam"]
    combos = [((), done)] if not others else [
        (c if isinstance(c, tuple) else (c,), d) for c, d in done.groupby(others, sort=False)]
    markers, styles = "osD^vph<>", ["-", "--", ":", "-."]
    handles: list[Line2D] = []
    best_xy: tuple[float, float] | None = None
    for i, (combo, data) in enumerate(combos):
        data = data.sort_values("lam")
        lam = data["lam"].to_numpy(dtype=float)
        suffix = ", ".join(f"{short_key(k)}={fmt_value(v)}"
                           for k, v in zip(others, combo, strict=True))
        marker, style = markers[i % len(markers)], styles[i % len(styles)]
        for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
            mean = data[f"{split}/ce_mean"].to_numpy(dtype=float)
            lo = data[f"{split}/ce_lo"].to_numpy(dtype=float)
            hi = data[f"{split}/ce_hi"].to_numpy(dtype=float)
            label = f"{split} ({suffix})" if suffix else split
            (line,) = ax.plot(lam, mean, linestyle=style, color=color, marker=marker,
                              markersize=5, label=label)
            handles.append(line)
            ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(mean)
            if ok.any():
                ax.fill_between(lam[ok], lo[ok], hi[ok], color=color, alpha=0.2, linewidth=0)
            zero = lam == 0
            ax.plot(lam[zero], mean[zero], linestyle="none", marker=marker, color=color,
                    markerfacecolor="white", markeredgewidth=1.8, markersize=9)
        val = data["val/ce_mean"].to_numpy(dtype=float)
        if np.isfinite(val).any():
            j = int(np.nanargmin(val))
            if best_xy is None or val[j] < best_xy[1]:
                best_xy = (float(lam[j]), float(val[j]))
    if best_xy is not None:
        (star,) = ax.plot([best_xy[0]], [best_xy[1]], marker="*", markersize=16, color=VAL_COLOR,
                          markeredgecolor="black", linestyle="none", zorder=5,
                          label=f"lowest val/ce: λ={fmt_value(best_xy[0])}")
        handles.append(star)
    if (done["lam"] == 0).any():
        handles.append(Line2D([], [], marker="o", markerfacecolor="white", markeredgewidth=1.8,
                              color="0.3", linestyle="none", markersize=9, label="λ=0 (no L2)"))
    has_band = any(done[f"{s}/ce_lo"].notna().any() for s in ("train", "val"))
    if has_band:
        from matplotlib.patches import Patch

        handles.append(Patch(color="0.5", alpha=0.3, label="95% interval over seeds"))
    lambda_axis(ax, done["lam"].to_numpy(dtype=float))
    ax.grid(True, alpha=0.3)
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    save(fig, path)


def mean_curve(runs: Sequence[RunRecord], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean over seeds aligned by step; a step missing in some seeds averages the others (a
    step logged twice counts its last value; NaN is skipped). Plain dicts: a sweep has one
    curve per run, and a pandas Series each cost more than the figure."""
    sums: dict[int, list[float]] = {}
    for run in runs:
        last = {int(step): float(v) for step, v in run.history.get(metric) or []}
        for step, v in last.items():
            if not math.isnan(v):
                acc = sums.setdefault(step, [0.0, 0])
                acc[0] += v
                acc[1] += 1
    if not sums:
        return None
    steps = sorted(sums)
    return (np.array(steps, dtype=float),
            np.array([sums[st][0] / sums[st][1] for st in steps], dtype=float))


def plot_curves(cells: Sequence[Cell], path: Path, *, weights: bool) -> None:
    """Learning curves (train and val CE, side by side) or weight norms against epoch, mean
    over seeds, one colour per cell: distinct colours with a legend for up to MAX_LEGEND
    cells, a colour scale in λ order with a labelled colour bar beyond."""
    panels = [(mt.WEIGHT_NORM_TOTAL, NORM_LABEL)] if weights else \
        list(zip(mt.CURVES, CURVE_LABELS, strict=True))
    fig = new_figure(8.0 if weights else 11.0, 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fig.suptitle("Weight norm during training (mean over seeds)" if weights else
                 "Learning curves (mean over seeds)", fontsize="medium")
    shown = [g for g in cells if any(r.status == FINISHED for r in g.runs)]
    colors = cell_colors(len(shown))
    drawn_any = False
    for ax, (metric, ylabel) in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        values = []
        for cell, color in zip(shown, colors, strict=True):
            curve = mean_curve(cell.finished, metric)
            if curve is None:
                continue
            ax.plot(*curve, color=color, linewidth=1.6, label=cell_label(cell))
            values.append(curve[1])
        if not values:
            placeholder(ax, "no finished runs" if not shown else "no history recorded")
            continue
        drawn_any = True
        readable_log_y(ax, values)
        ax.grid(True, alpha=0.3)
    if drawn_any:
        if len(shown) <= MAX_LEGEND:
            handles = [Line2D([], [], color=c, linewidth=2, label=cell_label(g))
                       for g, c in zip(shown, colors, strict=True)]
            fig.legend(handles=handles, loc="outside right upper", fontsize="small")
        else:
            _colorbar(fig, list(axes), shown, colors)
    save(fig, path)


# --------------------------------------------------------------------------- conditions


def _panel_grid(fig: Figure, n: int) -> list[Axes]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n]


def plot_condition_curves(conditions: Sequence, path: Path) -> None:
    """One panel per condition (a :class:`l2lab.report.conditions.Condition`): final train and
    val CE against λ with their 95% bands, the condition's best λ starred and the λ not
    distinguishable from it shaded. Shared y, so the panels compare at a glance; titles are the
    short condition labels, the one legend sits outside the panels."""
    n = len(conditions)
    cols = min(n, 4)
    fig = new_figure(min(3.4 * cols + 1.6, 16.0), 3.2 * math.ceil(n / cols) + 0.6)
    keys = list(conditions[0].values) if conditions else []
    fig.suptitle("Final cross-entropy vs λ per "
                 + (keys[0].rsplit(".", 1)[-1] if len(keys) == 1 else "condition")
                 + " (mean over seeds)", fontsize="medium")
    axes = _panel_grid(fig, n)
    for ax, cond in zip(axes, conditions, strict=True):
        data = cond.summary[cond.summary["runs"] > 0].sort_values("lam")
        ax.set_title(cond.short, fontsize="small")
        ax.set_xlabel(LAMBDA_LABEL, fontsize="small")
        if data.empty:
            placeholder(ax, "no finished runs")
            continue
        lam = data["lam"].to_numpy(dtype=float)
        for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
            mean = data[f"{split}/ce_mean"].to_numpy(dtype=float)
            lo = data[f"{split}/ce_lo"].to_numpy(dtype=float)
            hi = data[f"{split}/ce_hi"].to_numpy(dtype=float)
            ax.plot(lam, mean, color=color, marker="o", markersize=4)
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                ax.fill_between(lam[ok], lo[ok], hi[ok], color=color, alpha=0.2, linewidth=0)
        ties = cond.tie_lams
        if len(ties) > 1:
            ax.axvspan(ties[0], ties[-1], color=TIE_COLOR, zorder=0)
        if math.isfinite(cond.best_lam):
            ax.plot([cond.best_lam], [cond.best_val], marker="*", markersize=14, color=VAL_COLOR,
                    markeredgecolor="black", linestyle="none", zorder=5)
        lambda_axis(ax, lam)
        ax.tick_params(labelsize="small")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(CE_LABEL)
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=TRAIN_COLOR, marker="o", label="train"),
               Line2D([], [], color=VAL_COLOR, marker="o", label="val"),
               Line2D([], [], marker="*", markersize=12, color=VAL_COLOR, markeredgecolor="black",
                      linestyle="none", label="best λ"),
               Patch(color=TIE_COLOR, label="λ not distinguishable\nfrom the best"),
               Patch(color=VAL_COLOR, alpha=0.2, label="95% interval")]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    save(fig, path)


def plot_best_lambda(keys: Sequence[str], conditions: Sequence, path: Path, *,
                     numeric: bool) -> None:
    """Best λ against the condition, the range of λ not distinguishable from it as an error bar:
    a number axis (log when every value is positive) for one numeric key, else one tick per
    condition. λ is on a symlog axis, so a best λ of 0 shows."""
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    shown = [c for c in conditions if math.isfinite(c.best_lam)]
    ax.set_ylabel("best λ (lowest mean final val/ce)")
    ax.set_title("Best λ per condition (bar: λ not distinguishable from it)", fontsize="medium")
    if not shown:
        placeholder(ax, "no finished runs")
        save(fig, path)
        return
    best = np.array([c.best_lam for c in shown])
    lo = np.array([c.tie_lams[0] for c in shown])
    hi = np.array([c.tie_lams[-1] for c in shown])
    if numeric:
        x = np.array([float(c.values[keys[0]]) for c in shown])
        ax.set_xlabel(keys[0])
        if np.all(x > 0):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.FixedLocator(x))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
    else:
        x = np.arange(len(shown), dtype=float)
        ax.set_xticks(x, [c.short for c in shown], rotation=20 if len(shown) > 2 else 0,
                      ha="right" if len(shown) > 2 else "center", fontsize="small")
        ax.set_xlim(-0.5, len(shown) - 0.5)
        ax.set_xlabel(", ".join(keys))
    ax.errorbar(x, best, yerr=[best - lo, hi - best], fmt="o", color=VAL_COLOR, ecolor="0.3",
                capsize=5, markersize=8, markeredgecolor="black")
    grid = np.unique(np.concatenate([c.summary["lam"].to_numpy(dtype=float) for c in shown]))
    positive = grid[grid > 0]
    if positive.size:
        ax.set_yscale("symlog", linthresh=float(positive.min()), linscale=0.5)
        ax.yaxis.set_major_locator(ticker.FixedLocator(grid))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylim(-0.3 * float(positive.min()) if (grid == 0).any() else positive.min() / 2,
                    float(positive.max()) * 2)
    ax.grid(True, alpha=0.3)
    save(fig, path)


def plot_heatmap(summary: pd.DataFrame, key: str, path: Path) -> None:
    """Mean final val/ce over λ (columns) × one numeric factor (rows), as in Loshchilov & Hutter
    2019, Fig. 2: each row's best cell boxed, the overall best starred, values written in the
    cells when the grid is small enough to read them."""
    from l2lab.report.conditions import heatmap_grid

    rows, lams, grid, row_best, low = heatmap_grid(summary, key)
    fig = new_figure(max(5.5, 0.9 * len(lams) + 3.0), max(3.2, 0.55 * len(rows) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
    ax.set_xticks(range(len(lams)), [f"{x:g}" for x in lams], fontsize="small",
                  rotation=45 if len(lams) > 6 else 0)
    ax.set_yticks(range(len(rows)), [fmt_value(v) for v in rows], fontsize="small")
    ax.set_xlabel("λ")
    ax.set_ylabel(key)
    ax.set_title("Mean final val/ce (box: each row's best λ; star: the lowest)",
                 fontsize="medium")
    from matplotlib.patches import Rectangle

    finite = np.isfinite(grid)
    if grid.size <= 120 and finite.any():
        mid = np.nanmean(grid)
        for i in range(len(rows)):
            for j in range(len(lams)):
                if finite[i, j]:
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center",
                            fontsize="x-small", color="white" if grid[i, j] > mid else "black")
    for i, j in enumerate(row_best):
        if j is not None:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=2))
    if low is not None:
        ax.plot([low[1]], [low[0] + 0.3], marker="*", markersize=14, color="red",
                markeredgecolor="white", linestyle="none")
    fig.colorbar(image, ax=ax, label="mean final val/ce (nats)")
    save(fig, path)


def plot_condition_histories(conditions: Sequence, path: Path, *, weights: bool) -> None:
    """Learning curves (train and val CE) or weight norms against epoch with one row of panels
    per condition and one colour per λ, the same λ the same colour in every row: 4 conditions ×
    8 λ read as 8 legend entries, not 32."""
    panels = [(mt.WEIGHT_NORM_TOTAL, NORM_LABEL)] if weights else \
        list(zip(mt.CURVES, CURVE_LABELS_SHORT, strict=True))
    n = len(conditions)
    fig = new_figure(4.0 * len(panels) + 2.2, 2.3 * n + 0.8)
    axes = fig.subplots(n, len(panels), squeeze=False, sharex=True)
    fig.suptitle(("Weight norm during training" if weights else "Learning curves")
                 + " per condition (mean over seeds)", fontsize="medium")
    lams = sorted({c.lam for cond in conditions for c in cond.cells
                   if any(r.status == FINISHED for r in c.runs)})
    colors = dict(zip(lams, cell_colors(len(lams)), strict=True))
    for row, cond in zip(axes, conditions, strict=True):
        for ax, (metric, ylabel) in zip(row, panels, strict=True):
            ax.set_ylabel(f"{cond.short}\n{ylabel}", fontsize="small")
            values = []
            for cell in cond.cells:
                curve = mean_curve(cell.finished, metric)
                if curve is not None:
                    ax.plot(*curve, color=colors[cell.lam], linewidth=1.5)
                    values.append(curve[1])
            if not values:
                placeholder(ax, "no history recorded")
                continue
            readable_log_y(ax, values)
            ax.tick_params(labelsize="small")
            ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    if len(lams) <= MAX_LEGEND:
        handles = [Line2D([], [], color=colors[lam], linewidth=2, label=f"λ={fmt_value(lam)}")
                   for lam in lams]
        fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    else:
        _colorbar(fig, list(axes.ravel()), [Cell({}, lam, []) for lam in lams],
                  [colors[lam] for lam in lams])
    save(fig, path)

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
from l2lab.report.stats import (
    FINISHED,
    Cell,
    RunRecord,
    cell_columns,
    fmt_value,
    number_of,
    short_key,
)

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


def side_legend(fig: Figure, handles: Sequence) -> None:
    """A figure's one legend: outside the panels on the right, centred in height (at the top it
    sat beside a suptitle, and a long one ran under it)."""
    fig.legend(handles=handles, loc="outside right center", fontsize="small")


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


def lambda_y_axis(ax: Axes, grid: np.ndarray) -> None:
    """λ on the y axis (best-λ figures): symlog, so that λ = 0 shows, one tick per grid λ."""
    positive = grid[grid > 0]
    if positive.size:
        ax.set_yscale("symlog", linthresh=float(positive.min()), linscale=0.5)
        ax.yaxis.set_major_locator(ticker.FixedLocator(grid))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylim(-0.3 * float(positive.min()) if (grid == 0).any() else positive.min() / 2,
                    float(positive.max()) * 2)


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
    side_legend(fig, handles)
    save(fig, path)


def layer_sum(run: RunRecord, metrics: Sequence[str]) -> dict[int, float]:
    """Per step, the sum of ``metrics`` (each layer's ‖W‖²), at the steps where every one is
    logged (a step logged twice counts its last value)."""
    per = [{int(step): float(v) for step, v in run.history.get(m) or []} for m in metrics]
    steps = set.intersection(*(set(p) for p in per)) if per else set()
    return {st: sum(p[st] for p in per) for st in steps}


def mean_curve(runs: Sequence[RunRecord], metric: str | tuple[str, ...]
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean over seeds aligned by step; a step missing in some seeds averages the others (a
    step logged twice counts its last value; NaN is skipped). ``metric`` a tuple: their sum per
    step (:func:`layer_sum`). Plain dicts: a sweep has one curve per run, and a pandas Series
    each cost more than the figure."""
    sums: dict[int, list[float]] = {}
    for run in runs:
        last = layer_sum(run, metric) if isinstance(metric, tuple) else \
            {int(step): float(v) for step, v in run.history.get(metric) or []}
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


def norm_layers(runs: Sequence[RunRecord]) -> list[str]:
    """The layers whose ‖W‖² (``weights/sq_norm/<layer>``) every finished run logged, in the
    first run's order: the weight-norm figure sums these for every condition, so that one
    training (λ = 0 under two layer selections) draws one curve. ``[]`` when a run logged none
    per layer (read without them): the figure then shows each run's own total."""
    prefix = mt.WEIGHT_NORM_LAYER
    sets = [[k.removeprefix(prefix) for k, v in r.history.items() if k.startswith(prefix) and v]
            for r in runs if r.status == FINISHED]
    if not sets or not all(sets):
        return []
    return [layer for layer in sets[0] if all(layer in other for other in sets[1:])]


def norm_panel(runs: Sequence[RunRecord]) -> tuple[str | tuple[str, ...], str]:
    """The weight-norm panel's metric (the common layers' sum, else each run's total) and its
    y label."""
    layers = norm_layers(runs)
    if not layers:
        return mt.WEIGHT_NORM_TOTAL, NORM_LABEL
    names = ", ".join(layers) if len(layers) <= 4 else f"{len(layers)} layers"
    return (tuple(mt.WEIGHT_NORM_LAYER + layer for layer in layers),
            r"$\Sigma\,\Vert W\Vert_F^2$ of " + names)


def norm_caption(runs: Sequence[RunRecord]) -> str:
    """What weight_norms.png sums, for its caption."""
    layers = norm_layers(runs)
    if not layers:
        return ("Σ‖W‖²_F of each run's own selected layers against epoch, mean over seeds: the "
                "mechanism (L2 is weight decay). Runs of different layer selections sum "
                "different layers here.")
    return (f"Σ‖W‖²_F over {', '.join(layers)} (the layers every run logged: the same for every "
            "condition, so that one training draws one curve) against epoch, mean over seeds: "
            "the mechanism (L2 is weight decay).")


#: The cross-entropy panels' y range ends at Tukey's upper fence of the points after epoch 0
#: (Q3 + FENCE·IQR): epoch 0 and a far-underfitting λ would otherwise squash the curves that
#: matter into a band. Lines above leave the panel, which names them.
FENCE = 1.5


def robust_ylim(ax: Axes, curves: Sequence[tuple[np.ndarray, np.ndarray]],
                labels: Sequence[str] = ()) -> bool:
    """Clip the y range to [lowest point, upper fence of the points from epoch 1 on] when some
    point lies above the fence; return whether it did (the panel then says so, naming the
    curves (``labels``) that lie wholly above)."""
    ys = np.concatenate([y for _, y in curves])
    later = np.concatenate([y[x >= 1] for x, y in curves])
    ys, later = ys[np.isfinite(ys)], later[np.isfinite(later)]
    if not later.size:
        return False
    q1, q3 = np.quantile(later, [0.25, 0.75])
    bottom, top = float(ys.min()), float(q3 + FENCE * (q3 - q1))
    if ys.max() <= top or top <= bottom:
        return False
    pad = 0.08 * (top - bottom)
    ax.set_yscale("linear")
    ax.set_ylim(bottom - pad, top + pad)
    ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=6))
    above = [name for name, (x, y) in zip(labels, curves, strict=False)
             if np.all(y[x >= 1] > top + pad)]
    ax.text(0.99, 0.99, "y cut at the upper fence of epochs ≥ 1"
            + (f"; above: {', '.join(above)}" if above else ""),
            transform=ax.transAxes, ha="right", va="top", fontsize="x-small", color="0.35")
    return True


def draw_curves(ax: Axes, curves: Sequence[tuple[np.ndarray, np.ndarray]], *,
                weights: bool, labels: Sequence[str] = ()) -> None:
    """The axes of a panel of curves: whole epochs; y log where they span decades, and for
    cross-entropy clipped to its robust range (:func:`robust_ylim`)."""
    readable_log_y(ax, [c[1] for c in curves])
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # epochs: no 0.25
    if not weights:
        robust_ylim(ax, curves, labels)


def plot_curves(cells: Sequence[Cell], path: Path, *, weights: bool) -> Figure:
    """Learning curves (train and val CE, side by side) or weight norms against epoch, mean
    over seeds, one colour per cell: distinct colours with a legend for up to MAX_LEGEND
    cells, a colour scale in λ order with a labelled colour bar beyond."""
    panels = [norm_panel([r for c in cells for r in c.runs])] if weights else \
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
        values, names = [], []
        for cell, color in zip(shown, colors, strict=True):
            curve = mean_curve(cell.finished, metric)
            if curve is None:
                continue
            ax.plot(*curve, color=color, linewidth=1.6, label=cell_label(cell))
            values.append(curve)
            names.append(cell_label(cell))
        if not values:
            placeholder(ax, "no finished runs" if not shown else "no history recorded")
            continue
        drawn_any = True
        draw_curves(ax, values, weights=weights, labels=names)
        ax.grid(True, alpha=0.3)
    if drawn_any:
        if len(shown) <= MAX_LEGEND:
            handles = [Line2D([], [], color=c, linewidth=2, label=cell_label(g))
                       for g, c in zip(shown, colors, strict=True)]
            side_legend(fig, handles)
        else:
            _colorbar(fig, list(axes), shown, colors)
    save(fig, path)
    return fig


# --------------------------------------------------------------------------- conditions


def _panel_grid(fig: Figure, n: int, cols: int | None = None) -> list[Axes]:
    cols = cols or min(n, 4)
    rows = math.ceil(n / cols)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n]


def plot_condition_curves(conditions: Sequence, path: Path, cols: int | None = None) -> Figure:
    """One panel per condition (a :class:`l2lab.report.conditions.Condition`): final train and
    val CE against λ with their 95% bands, the condition's best λ starred and the λ not
    distinguishable from it shaded. Shared y, so the panels compare at a glance; titles are the
    short condition labels, the one legend sits outside the panels. ``cols``: panels per row
    (an arm × a number: one row per arm)."""
    n = len(conditions)
    cols = cols or min(n, 4)
    fig = new_figure(min(3.4 * cols + 1.6, 16.0), 3.2 * math.ceil(n / cols) + 0.6)
    keys = list(conditions[0].values) if conditions else []
    fig.suptitle("Final cross-entropy vs λ per "
                 + (keys[0].rsplit(".", 1)[-1] if len(keys) == 1 else "condition")
                 + " (mean over seeds)", fontsize="medium")
    axes = _panel_grid(fig, n, cols)
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
    side_legend(fig, handles)
    save(fig, path)
    return fig


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
        x = np.array([number_of(c.values[keys[0]]) for c in shown], dtype=float)
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
    lambda_y_axis(ax, np.unique(np.concatenate([c.summary["lam"].to_numpy(dtype=float)
                                                for c in shown])))
    ax.grid(True, alpha=0.3)
    save(fig, path)


def heat_limits(grids: Sequence[np.ndarray]) -> tuple[float, float]:
    """One colour scale for one or several heatmaps: from the lowest cell to the highest cell
    next to some row's best (the best and its neighbours in λ). The cells that decide spread
    over the whole scale; worse cells (a far-off column) take the top colour (the bar's
    arrow) instead of squashing the rest into one colour."""
    cells, near = [], []
    for grid in grids:
        for row in np.asarray(grid, dtype=float):
            ok = np.isfinite(row)
            if not ok.any():
                continue
            cells += row[ok].tolist()
            j = int(np.nanargmin(row))
            near += [v for v in row[max(j - 1, 0):j + 2] if math.isfinite(v)]
    if not cells:
        return 0.0, 1.0
    lo, hi = min(cells), max(near)
    if hi <= lo:
        hi = max(cells) if max(cells) > lo else lo + 1e-6
    return lo, hi


def _draw_heatmap(ax: Axes, rows: Sequence[str], lams: Sequence[float], grid: np.ndarray,
                  row_best: Sequence[int | None], low: tuple[int, int] | None, norm, key: str):
    """One heatmap on ``ax``: values in the cells (when few enough to read), each row's best
    boxed (inset, so that two rows with the same best λ keep two boxes), the lowest starred."""
    from matplotlib.patches import Rectangle

    cmap = colormaps["viridis_r"]
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", origin="lower")
    ax.set_xticks(range(len(lams)), [f"{x:g}" for x in lams], fontsize="small",
                  rotation=45 if len(lams) > 6 else 0)
    ax.set_yticks(range(len(rows)), [fmt_value(v) for v in rows], fontsize="small")
    ax.set_xlabel("λ")
    ax.set_ylabel(key)
    finite = np.isfinite(grid)
    if grid.size <= 120 and finite.any():
        for i in range(len(rows)):
            for j in range(len(lams)):
                if finite[i, j]:
                    dark = float(norm(grid[i, j])) > 0.5  # viridis_r: high values are dark
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center",
                            fontsize="x-small", color="white" if dark else "black")
    inset = 0.07
    for i, j in enumerate(row_best):
        if j is not None:
            ax.add_patch(Rectangle((j - 0.5 + inset, i - 0.5 + inset), 1 - 2 * inset,
                                   1 - 2 * inset, fill=False, edgecolor="red", linewidth=2))
    if low is not None:
        ax.plot([low[1]], [low[0] + 0.3], marker="*", markersize=14, color="red",
                markeredgecolor="white", linestyle="none")
    return image


def _heat_colorbar(fig: Figure, image, axes, grids: Sequence[np.ndarray], hi: float) -> None:
    over = any(np.nanmax(g) > hi for g in grids if np.isfinite(g).any())
    fig.colorbar(image, ax=axes, extend="max" if over else "neither",
                 label="mean final val/ce (nats)" + ("; ▲: worse" if over else ""))


def plot_heatmap(summary: pd.DataFrame, key: str, path: Path) -> Figure:
    """Mean final val/ce over λ (columns) × one numeric factor (rows), as in Loshchilov & Hutter
    2019, Fig. 2: each row's best cell boxed, the overall best starred, values written in the
    cells when the grid is small enough to read them; the colour scale spans the cells near
    each row's best (:func:`heat_limits`)."""
    from matplotlib.colors import Normalize

    from l2lab.report.conditions import heatmap_grid

    rows, lams, grid, row_best, low = heatmap_grid(summary, key)
    fig = new_figure(max(5.5, 0.9 * len(lams) + 3.0), max(3.2, 0.55 * len(rows) + 1.8))
    ax = fig.add_subplot()
    lo, hi = heat_limits([grid])
    image = _draw_heatmap(ax, rows, lams, grid, row_best, low, Normalize(lo, hi), key)
    ax.set_title("Mean final val/ce (box: each row's best λ; star: the lowest)",
                 fontsize="medium")
    _heat_colorbar(fig, image, ax, [grid], hi)
    save(fig, path)
    return fig


def plot_arm_heatmaps(fac, path: Path) -> Figure:
    """One heatmap per arm (a :class:`l2lab.report.conditions.Factorial`), side by side on one
    colour scale: λ × the numeric factor, each row's best boxed, each arm's lowest starred."""
    from matplotlib.colors import Normalize

    from l2lab.report.conditions import heatmap_grid, tail

    parts = [(arm, *heatmap_grid(fac.summary(arm), fac.num_key)) for arm in fac.arms]
    lo, hi = heat_limits([p[3] for p in parts])
    width = max(len(p[2]) for p in parts)
    fig = new_figure(min(max(4.0, 0.75 * width + 1.6) * len(parts) + 1.4, 18.0),
                     max(3.2, 0.55 * max(len(p[1]) for p in parts) + 1.9))
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    fig.suptitle(f"Mean final val/ce over λ × {tail(fac.num_key)}, per {tail(fac.arm_key)} "
                 "(box: each row's best λ; star: the arm's lowest; one colour scale)",
                 fontsize="medium")
    image = None
    for ax, (arm, rows, lams, grid, row_best, low) in zip(axes, parts, strict=True):
        image = _draw_heatmap(ax, rows, lams, grid, row_best, low, Normalize(lo, hi),
                              tail(fac.num_key))
        ax.set_title(fmt_value(arm), fontsize="medium")
    _heat_colorbar(fig, image, list(axes), [p[3] for p in parts], hi)
    save(fig, path)
    return fig


def plot_arm_best_lambda(fac, path: Path) -> Figure:
    """Best λ against the numeric factor, one line per arm, each point's bar the λ not
    distinguishable from it; arms side by side a little apart (a log x axis: a factor) so that
    their bars do not hide each other."""
    from l2lab.report.conditions import tail

    fig = new_figure(7.5, 4.4)
    ax = fig.add_subplot()
    ax.set_xlabel(fac.num_key)
    ax.set_ylabel("best λ (lowest mean final val/ce)")
    ax.set_title(f"Best λ against {tail(fac.num_key)}, one line per {tail(fac.arm_key)} "
                 "(bar: λ not distinguishable from it)", fontsize="medium")
    levels = np.array([number_of(v) for v in fac.levels], dtype=float)
    log_x = bool(np.all(levels > 0))
    handles, grid = [], set()
    for k, arm in enumerate(fac.arms):
        sh = fac.shift(arm)
        grid |= {float(x) for c in fac.row(arm) for x in c.summary["lam"]}
        if not sh.points:
            continue
        x = np.array([number_of(p[0]) for p in sh.points], dtype=float)
        offset = (k - (len(fac.arms) - 1) / 2) * 0.04
        x = x * 10 ** offset if log_x else x + offset * (levels.max() - levels.min())
        best, lo, hi = (np.array([p[i] for p in sh.points]) for i in (1, 2, 3))
        color = colormaps["tab10"](k)
        (line,) = ax.plot(x, best, marker="o", color=color, linewidth=1.8, markersize=7,
                          markeredgecolor="black", label=fmt_value(arm))
        ax.errorbar(x, best, yerr=[best - lo, hi - best], fmt="none", ecolor=color, capsize=5,
                    linewidth=1.4)
        handles.append(line)
    if not handles:
        placeholder(ax, "no finished runs")
        save(fig, path)
        return fig
    if log_x:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator(levels))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    lambda_y_axis(ax, np.array(sorted(grid)))
    ax.grid(True, alpha=0.3)
    side_legend(fig, handles)
    save(fig, path)
    return fig


def plot_arm_histories(fac, path: Path, *, weights: bool) -> Figure:
    """Learning curves (val CE solid, train CE dashed) or weight norms against epoch: one row of
    panels per arm, one panel per value of the numeric factor, one colour per λ (the same in
    every panel), one shared legend."""
    from l2lab.report.conditions import tail

    runs = [r for c in fac.cells.values() for r in c.runs]
    metrics = [norm_panel(runs)] if weights else [(mt.VAL_CE, "CE (nats)"),
                                                  (mt.TRAIN_CE, "")]
    lams = sorted({cell.lam for c in fac.cells.values() for cell in c.cells if cell.finished})
    colors = dict(zip(lams, cell_colors(len(lams)), strict=True))
    rows, cols = len(fac.arms), len(fac.levels)
    fig = new_figure(min(3.3 * cols + 2.0, 18.0), 2.6 * rows + 1.0)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    fig.suptitle(("Weight norm" if weights else "Learning curves") + " per "
                 f"{tail(fac.arm_key)} (rows) and {tail(fac.num_key)} (columns), mean over "
                 "seeds", fontsize="medium")
    for r, arm in enumerate(fac.arms):
        for c, level in enumerate(fac.levels):
            ax = axes[r][c]
            ax.set_title(f"{fmt_value(arm)}, {tail(fac.num_key)}={fmt_value(level)}",
                         fontsize="small")
            cond = fac.cells.get((arm, level))
            curves, names = [], []
            for cell in cond.cells if cond is not None else []:
                for (metric, _), style in zip(metrics, ("-", "--"), strict=False):
                    curve = mean_curve(cell.finished, metric)
                    if curve is not None:
                        ax.plot(*curve, color=colors.get(cell.lam, "0.5"), linewidth=1.5,
                                linestyle=style)
                        curves.append(curve)
                        names.append(f"λ={fmt_value(cell.lam)}"
                                     + ("" if weights else f" {metric.split('/')[0]}"))
            if not curves:
                placeholder(ax, "no history recorded")
                continue
            draw_curves(ax, curves, weights=weights, labels=names)
            ax.tick_params(labelsize="small")
            ax.grid(True, alpha=0.3)
        axes[r][0].set_ylabel(metrics[0][1], fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    handles = [Line2D([], [], color=colors[lam], linewidth=2, label=f"λ={fmt_value(lam)}")
               for lam in lams]
    if not weights:
        handles += [Line2D([], [], color="0.3", linestyle="-", label="val"),
                    Line2D([], [], color="0.3", linestyle="--", label="train")]
    side_legend(fig, handles)
    save(fig, path)
    return fig


def plot_condition_histories(conditions: Sequence, path: Path, *, weights: bool) -> Figure:
    """Learning curves (train and val CE) or weight norms against epoch with one row of panels
    per condition and one colour per λ, the same λ the same colour in every row: 4 conditions ×
    8 λ read as 8 legend entries, not 32."""
    panels = [norm_panel([r for c in conditions for r in c.runs])] if weights else \
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
            values, names = [], []
            for cell in cond.cells:
                curve = mean_curve(cell.finished, metric)
                if curve is not None:
                    ax.plot(*curve, color=colors[cell.lam], linewidth=1.5)
                    values.append(curve)
                    names.append(f"λ={fmt_value(cell.lam)}")
            if not values:
                placeholder(ax, "no history recorded")
                continue
            draw_curves(ax, values, weights=weights, labels=names)
            ax.tick_params(labelsize="small")
            ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    if len(lams) <= MAX_LEGEND:
        handles = [Line2D([], [], color=colors[lam], linewidth=2, label=f"λ={fmt_value(lam)}")
                   for lam in lams]
        side_legend(fig, handles)
    else:
        _colorbar(fig, list(axes.ravel()), [Cell({}, lam, []) for lam in lams],
                  [colors[lam] for lam in lams])
    save(fig, path)
    return fig


def eff_lr_of(run: RunRecord) -> float | None:
    """The run's final effective learning rate, lr/‖W‖², averaged over its layers that a
    normalization follows (``weights/eff_lr/<layer>``); None where it logged none."""
    values = [v for k, v in run.final.items() if k.startswith(mt.EFF_LR) and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def plot_eff_lr(runs: Sequence[RunRecord], path: Path) -> Figure:
    """Effective learning rate against λ, one line per condition (mean over seeds, every seed
    a dot): with BatchNorm, L2 shrinks ‖W‖ of the layers before it, which cannot change what
    they compute, and so raises their lr/‖W‖² (van Laarhoven 2017)."""
    groups: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        if run.status != FINISHED or (value := eff_lr_of(run)) is None:
            continue
        label = ", ".join(f"{short_key(k)}={fmt_value(v)}" for k, v in sorted(run.swept.items())
                          if short_key(k) != "lam") or "all runs"
        groups.setdefault(label, {}).setdefault(run.lam, []).append(value)
    fig = new_figure()
    ax = fig.add_subplot()
    ax.set_xlabel(LAMBDA_LABEL)
    ax.set_ylabel("lr / ‖W‖² (mean over the layers before a normalization)")
    ax.set_title("Effective learning rate at the last epoch vs λ", fontsize="medium")
    handles = []
    for i, (label, by_lam) in enumerate(sorted(groups.items())):
        lams = np.array(sorted(by_lam), dtype=float)
        color = cell_colors(len(groups))[i]
        (line,) = ax.plot(lams, [np.mean(by_lam[v]) for v in lams], marker="o", color=color,
                          label=label)
        for lam in lams:
            ax.plot([lam] * len(by_lam[lam]), by_lam[lam], linestyle="none", marker=".",
                    color=color, alpha=0.5)
        handles.append(line)
    if groups:
        ax.set_yscale("log")
        lambda_axis(ax, np.array(sorted({v for g in groups.values() for v in g}), dtype=float))
        ax.grid(True, alpha=0.3)
        side_legend(fig, handles)
    else:
        placeholder(ax, "no run logged weights/eff_lr")
    save(fig, path)
    return fig


# --------------------------------------------------------------------------- a numeric condition


ENVELOPE_COLOR = "black"


def _band(ax: Axes, xs: np.ndarray, stats: Sequence[tuple[float, float, float]], **kw) -> None:
    lo = np.array([s[1] for s in stats], dtype=float)
    hi = np.array([s[2] for s in stats], dtype=float)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.fill_between(xs[ok], lo[ok], hi[ok], linewidth=0, **kw)


def plot_numeric(v, path: Path) -> Figure:
    """The metric against a numeric condition (a :class:`l2lab.report.numeric.NumericView`):
    one row per facet (a label-noise arm), two panels: the error (test, else val: solid; train
    error dashed) and the cross-entropy that chose the best λ, one colour per λ; in black the
    envelope of each value's best λ with its 95% interval over seeds (band), and a dotted line
    at the interpolation threshold. Log x for widths and any all-positive axis."""
    from matplotlib.patches import Patch

    from l2lab.report.numeric import peak

    lams = sorted({lam for f in v.facets for lam in f.lines})
    colors = dict(zip(lams, cell_colors(len(lams)), strict=True))
    rows = len(v.facets)
    fig = new_figure(11.5, 3.6 * rows + 0.8)
    axes = fig.subplots(rows, 2, squeeze=False, sharex=True)
    fig.suptitle(f"{v.error_name.capitalize()} and {v.ce_metric} against {v.name}, one line per "
                 f"λ (mean over seeds); black: each {v.name}'s best λ", fontsize="medium")
    xs_all = np.array(sorted({p.x for f in v.facets for pts in f.lines.values() for p in pts}))
    for (ax_err, ax_ce), f in zip(axes, v.facets, strict=True):
        for lam, pts in f.lines.items():
            x = np.array([p.x for p in pts])
            ax_err.plot(x, [p.error[0] for p in pts], color=colors[lam], marker="o",
                        markersize=3, linewidth=1.3)
            ax_err.plot(x, [p.train[0] for p in pts], color=colors[lam], linestyle="--",
                        linewidth=1.0, alpha=0.8)
            ax_ce.plot(x, [p.ce[0] for p in pts], color=colors[lam], marker="o", markersize=3,
                       linewidth=1.3)
        if f.envelope:
            x = np.array([p.x for p in f.envelope])
            for ax, which in ((ax_err, "error"), (ax_ce, "ce")):
                stats = [getattr(p, which) for p in f.envelope]
                _band(ax, x, stats, color="0.5", alpha=0.3, zorder=1)
                ax.plot(x, [s[0] for s in stats], color=ENVELOPE_COLOR, linewidth=2.4,
                        marker="s", markersize=5, zorder=4)
        for text, found, dy in (("λ=0 peak", peak(f.zero), 8),
                                ("best-λ peak", peak(f.envelope), -14)):
            if found is not None:  # the λ = 0 one above its point, the envelope's below
                ax_err.annotate(text, (found.x, found.height), textcoords="offset points",
                                xytext=(0, dy), ha="center", fontsize="x-small")
        if f.threshold is not None:
            for ax in (ax_err, ax_ce):
                ax.axvline(f.threshold, color="0.3", linestyle=":", linewidth=1.5)
            ax_err.text(f.threshold, 0.98, f" threshold {fmt_value(f.threshold)}",
                        transform=ax_err.get_xaxis_transform(), va="top", fontsize="x-small",
                        color="0.3")
        head = f"{f.label}: " if f.label else ""
        ax_err.set_title(f"{head}{v.error_name} (solid), train error (dashed)", fontsize="small")
        ax_ce.set_title(f"{head}final {v.ce_metric}", fontsize="small")
        ax_err.set_ylabel("error (1 − accuracy)")
        ax_ce.set_ylabel(f"{v.ce_metric} (nats)")
        ax_err.set_ylim(-0.02, 1.0)
        for ax in (ax_err, ax_ce):
            ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(f"{v.name} ({v.key})")
        if xs_all.size and np.all(xs_all > 0):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.FixedLocator(xs_all))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            if xs_all.size > 8:
                for label in ax.get_xticklabels():
                    label.set_rotation(45)
    handles = [Line2D([], [], color=colors[lam], linewidth=2, label=f"λ={fmt_value(lam)}")
               for lam in lams]
    handles += [Line2D([], [], color=ENVELOPE_COLOR, linewidth=2.4, marker="s",
                       label=f"best λ per {v.name}"),
                Patch(color="0.5", alpha=0.3, label="95% interval\nover seeds"),
                Line2D([], [], color="0.3", linestyle="--", label="train error"),
                Line2D([], [], color="0.3", linestyle=":", label="interpolation\nthreshold")]
    side_legend(fig, handles)
    save(fig, path)
    return fig

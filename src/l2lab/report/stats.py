"""The numbers of a λ sweep: one row per cell (the runs that differ only in seed), 95%
t-intervals, and the best-λ verdict.

This module knows nothing about MLflow, torch, Lightning or matplotlib: the caller converts tracked
runs into :class:`l2lab.records.RunRecord` objects, so the statistics can be tested on synthetic
rows with known answers and re-run offline on exported data.

The seeds of a sweep are *paired* across λ: seed k gives the same initialisation and the same
shuffling at every λ, so most of the seed-to-seed spread is shared by all rows. The verdict
therefore tests the per-seed differences (a paired t-test), which sees a small but consistent
difference that mean ± std over seeds would call noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from l2lab import metrics as mt
from l2lab.records import RunRecord

LAM_KEY = "regularization.lam"
FINISHED = "FINISHED"
STATS: tuple[str, ...] = ("mean", "std", "lo", "hi")
#: How each summarised quantity's 95% interval is made, so that it stays inside the quantity's
#: range with 2-5 seeds (a plain t-interval of 2 cross-entropies easily dips below zero):
#: ``positive`` (cross-entropy > 0): a t-interval on the log, i.e. for the geometric mean;
#: ``unit`` (accuracy): the t-interval intersected with [0, 1] (the true mean lies in [0, 1],
#: so the intersection keeps the interval's coverage); ``real`` (gap/ce, any sign): the
#: t-interval. The best epoch gets its median with the min-max range over seeds (see
#: :data:`EPOCH_RANGE`).
KINDS: dict[str, str] = {"train/ce": "positive", "val/ce": "positive", "test/ce": "positive",
                         "best_val_ce": "positive", "val/acc": "unit", "test/acc": "unit",
                         "gap/ce": "real"}
#: Said wherever the best epoch's range is shown.
EPOCH_RANGE = ("best epoch: median over seeds, with the min-max range over seeds (an integer "
               "count that often sits at the last epoch; min-max holds the median of the "
               "seeds' distribution with probability 1 - 2/2^n: 50% for 2 seeds, 75% for 3, "
               "94% for 5)")
#: The level of the intervals and of the verdict's test.
ALPHA = 0.05
#: The power at which "about M seeds would tell" is computed.
POWER = 0.8
MAX_SEEDS = 1000


def stat_columns(metrics: Sequence[str] = mt.SUMMARY) -> list[str]:
    """Every column after the λ and swept-key columns, in order."""
    return ["runs", "failed",
            *(f"{m}_{s}" for m in metrics for s in STATS),
            *(f"best_val_ce_{s}" for s in STATS),
            *(f"best_epoch_{s}" for s in ("mean", "std", "median", "lo", "hi"))]


#: The columns of a summary without test metrics (the default digits sweep), after ``lam``.
STAT_COLUMNS: tuple[str, ...] = tuple(stat_columns())


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """Runs that differ only in seed: one summary row and one curve per cell."""

    values: dict[str, str]  # the swept keys other than λ
    lam: float
    runs: list[RunRecord]

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == FINISHED]


def rejected(run: RunRecord) -> bool:
    """A run that never trained an epoch (rejected by validation, or failed while building):
    not FINISHED and no metrics. It has no numbers to show, so it gets no row or curve."""
    return run.status != FINISHED and not run.final and not any(run.history.values())


def trained(runs: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if not rejected(r)]


def all_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Swept keys other than λ (and seed), in order of first appearance."""
    keys: list[str] = []
    for run in runs:
        for key in run.swept:
            if key != LAM_KEY and key not in keys:
                keys.append(key)
    return keys


def is_preset(key: str, runs: Sequence[RunRecord]) -> bool:
    """A config group choice (``regularization=l2_dense``, ``experiment=...``): a key without a
    dot whose values are names, not numbers."""
    return "." not in key and any(value_sort_key(str(r.swept.get(key, "")))[0] == 1
                                  for r in runs if key in r.swept)


def folded_keys(runs: Sequence[RunRecord]) -> dict[str, str]:
    """Keys that vary only because a preset varies (``regularization.min_params`` when
    ``regularization=l2,l2_dense``), each mapped to that preset: the preset's name labels them.
    A key is folded when it lies under the preset (any key for ``experiment``, whose presets
    set keys everywhere) and each of the preset's values fixes its value."""
    keys = all_keys(runs)
    presets = [k for k in keys if is_preset(k, runs)]
    folded: dict[str, str] = {}
    for key in keys:
        for preset in presets:
            if key == preset or not (key.startswith(preset + ".") or preset == "experiment"):
                continue
            seen: dict[str, set[str]] = {}
            for r in runs:
                seen.setdefault(str(r.swept.get(preset, "")), set()).add(
                    str(r.swept.get(key, "")))
            if all(len(v) == 1 for v in seen.values()):
                folded[key] = preset
                break
    return folded


def other_keys(runs: Sequence[RunRecord]) -> list[str]:
    """The condition keys: swept keys other than λ and seed, in order of first appearance,
    without the keys a preset's name already says (:func:`folded_keys`)."""
    folded = folded_keys(runs)
    return [k for k in all_keys(runs) if k not in folded]


def number_of(value: object) -> float | None:
    """A swept value as a number, None where it is none: a number itself; a list of numbers
    (layer widths, ``model.hidden=[h,h]``) as ``h`` when every entry is equal (the width axis
    of a double-descent figure), else as their total width. The one place a width becomes a
    number: ordering, numeric conditions and their axes all read it from here."""
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        entries = [float(x) for x in text[1:-1].split(",") if x.strip()]
    except ValueError:
        return None
    if not entries:
        return None
    return entries[0] if len(set(entries)) == 1 else float(sum(entries))


def value_sort_key(value: str) -> tuple[int, float, str]:
    """Order swept values numerically when they read as numbers (so "500" < "1000", and widths
    "[2,2]" < "[10,10]"; :func:`number_of`); names after them, alphabetically."""
    number = number_of(value)
    if number is None:
        return (1, 0.0, str(value))
    return (0, number, "" if str(value).strip()[:1] != "[" else str(value))


def cells_of(runs: Sequence[RunRecord]) -> tuple[list[str], list[Cell]]:
    """Split runs into cells (the runs that differ only in seed), sorted by λ then by the other
    keys. λ is always part of a cell's identity (as a number: "1e-3" and "0.001" are one λ), so
    runs with different λ are never averaged together."""
    keys = other_keys(runs)
    cells: dict[tuple[float, tuple[str, ...]], Cell] = {}
    for run in runs:
        lam = float(run.lam)
        values = {k: str(run.swept.get(k, "")) for k in keys}
        ident = (lam, tuple(values[k] for k in keys))
        if ident not in cells:
            cells[ident] = Cell(values=values, lam=lam, runs=[])
        cells[ident].runs.append(run)
    ordered = sorted(cells.values(),
                     key=lambda g: (g.lam, tuple(value_sort_key(g.values[k]) for k in keys)))
    return keys, ordered


# --------------------------------------------------------------------------- statistics


# Student's t and the noncentral t from scipy.special, the functions scipy.stats.t and .nct call
# (stdtrit, stdtr, nctdtr): importing scipy.stats costs ~0.9 s of a 24-run compare, scipy.special
# ~0.1 s. tests/test_report.py checks each against scipy.stats.


def t_quantile(df: int, q: float = 1 - ALPHA / 2) -> float:
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    from scipy.special import stdtr

    return float(2 * stdtr(df, -abs(t)))


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Welch's two-sided p-value for the means of ``a`` and ``b`` (unequal variances; as
    ``scipy.stats.ttest_ind(b, a, equal_var=False)``)."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:  # no spread on either side: as scipy, certain if the means differ
        return 0.0 if b.mean() != a.mean() else math.nan
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t_two_sided_p(float((b.mean() - a.mean()) / np.sqrt(va + vb)), float(df))


def mean_std_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, sample std (ddof=1) and the half-width of the 95% t-interval of the mean over
    seeds; NaN values are skipped, std and interval are NaN for fewer than two values (one seed
    is never mistaken for zero spread)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, math.nan, math.nan
    std = float(arr.std(ddof=1))
    return mean, std, t_quantile(arr.size - 1) * std / math.sqrt(arr.size)


def interval(values: Sequence[float], kind: str = "real") -> tuple[float, float]:
    """The 95% interval of the mean over seeds, made to stay inside the quantity's range (see
    :data:`KINDS`); NaN for fewer than two values. ``positive`` falls back to the t-interval
    cut at 0 if some value is not positive (a log needs all of them)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size < 2:
        return math.nan, math.nan
    if kind == "range":
        return float(arr.min()), float(arr.max())
    if kind == "positive" and np.all(arr > 0):
        logs = np.log(arr)
        half = t_quantile(arr.size - 1) * float(logs.std(ddof=1)) / math.sqrt(arr.size)
        centre = float(logs.mean())
        return math.exp(centre - half), math.exp(centre + half)
    mean, _, half = mean_std_ci(arr)
    lo, hi = mean - half, mean + half
    if kind == "positive":
        lo = max(lo, 0.0)
    elif kind == "unit":
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return lo, hi


def describe(values: Sequence[float], kind: str) -> tuple[float, float, float, float]:
    """(mean, sample std, interval low, interval high) over seeds."""
    mean, std, _ = mean_std_ci(values)
    return (mean, std, *interval(values, kind))


def best_val(run: RunRecord) -> tuple[float, float]:
    """(min val/ce, its step) over the run's history: the early-stopping optimum, which tells
    how much of the final val/ce is due to training too long rather than to λ."""
    points = sorted((int(s), float(v)) for s, v in run.history.get("val/ce", [])
                    if not math.isnan(float(v)))
    if not points:
        return math.nan, math.nan
    step, value = min(points, key=lambda p: p[1])  # first occurrence on ties (sorted by step)
    return value, float(step)


def final_value(run: RunRecord, metric: str) -> float:
    """A final metric; ``gap/ce`` is derived as val − train when the record lacks it."""
    if metric in run.final:
        return float(run.final[metric])
    if metric == "gap/ce" and "val/ce" in run.final and "train/ce" in run.final:
        return float(run.final["val/ce"]) - float(run.final["train/ce"])
    return math.nan


def metrics_of(runs: Sequence[RunRecord]) -> list[str]:
    """The final metrics a summary shows: train/val always, test/* when some run has them."""
    return [*mt.SUMMARY, *(m for m in mt.SUMMARY_TEST if any(m in r.final for r in runs))]


def summarize(runs: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per cell: ``lam``, the other swept keys, then mean, std and the 95%
    interval (``_lo``, ``_hi``: inside the metric's range, see :data:`KINDS`) of the final
    metrics and of each run's best val/ce, and the best epoch's mean, std, median and min-max.

    Only FINISHED runs feed the statistics (a crashed run's last values are not comparable);
    the others are counted in ``failed`` so a thin cell is visible rather than silently small.
    Runs that never trained (:func:`rejected`) are left out: :func:`l2lab.report.table.format_table`
    names them.
    """
    kept = trained(runs)
    keys, cells = cells_of(kept)
    metrics = metrics_of(kept)
    rows: list[dict[str, object]] = []
    for cell in cells:
        done = cell.finished
        row: dict[str, object] = {"lam": cell.lam, **cell.values,
                                  "runs": len(done), "failed": len(cell.runs) - len(done)}
        for metric in metrics:
            stats = describe([final_value(r, metric) for r in done], KINDS.get(metric, "real"))
            row.update({f"{metric}_{s}": v for s, v in zip(STATS, stats, strict=True)})
        best = [best_val(r) for r in done]
        stats = describe([b[0] for b in best], "positive")
        row.update({f"best_val_ce_{s}": v for s, v in zip(STATS, stats, strict=True)})
        epochs = [b[1] for b in best if not math.isnan(b[1])]
        mean, std, _ = mean_std_ci(epochs)
        lo, hi = (min(epochs), max(epochs)) if len(epochs) >= 2 else (math.nan, math.nan)
        row.update({"best_epoch_mean": mean, "best_epoch_std": std,
                    "best_epoch_median": float(np.median(epochs)) if epochs else math.nan,
                    "best_epoch_lo": lo, "best_epoch_hi": hi})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["lam", *keys, *stat_columns(metrics)])
    frame["lam"] = frame["lam"].astype(float)
    frame[["runs", "failed"]] = frame[["runs", "failed"]].astype(int)
    return frame


def cell_columns(summary: pd.DataFrame) -> list[str]:
    """``lam`` and the other swept keys: every column before ``runs``."""
    columns = list(summary.columns)
    return columns[: columns.index("runs")] if "runs" in columns else []


# --------------------------------------------------------------------------- the verdict


@dataclass
class Verdict:
    """Is the row with the lowest mean val/ce clearly the best?"""

    best: int | None  # row of the lowest mean val/ce (None: no finished runs)
    clear: bool
    text: str  # "clear (p = …)" or "not distinguishable with N seeds; about M seeds would tell"
    rival: int | None = None  # the row hardest to tell from the best (largest p)
    p: float = math.nan
    seeds: int = 0  # seeds (pairs) the deciding test used
    seeds_needed: int | None = None  # about how many would give the test power POWER
    ties: list[int] = field(default_factory=list)  # rows not distinguishable from the best
    compared: bool = True  # False: no other row to compare with (no verdict, so no mark)

    @property
    def mark(self) -> str:
        """``*`` clear, ``~`` not, blank where nothing was compared (no row, or a lone one)."""
        if self.best is None or not self.compared:
            return " "
        return "*" if self.clear else "~"


def seeds_needed(diff: float, sd: float, *, alpha: float = ALPHA, power: float = POWER,
                 cap: int = MAX_SEEDS) -> int | None:
    """Smallest number of paired seeds at which a two-sided paired t-test at ``alpha`` would
    detect a mean difference ``diff`` with per-seed spread ``sd`` with probability ``power``
    (noncentral t); None when no number up to ``cap`` would (``diff`` 0 or tiny)."""
    from scipy.special import nctdtr, stdtrit

    if not (math.isfinite(diff) and math.isfinite(sd)) or diff == 0:
        return None
    if sd == 0:
        return 2
    n = np.arange(2, cap + 1)
    df = n - 1
    crit = stdtrit(df, 1 - alpha / 2)
    nc = abs(diff) / sd * np.sqrt(n)
    achieved = (1 - nctdtr(df, nc, crit)) + nctdtr(df, nc, -crit)
    ok = np.nonzero(achieved >= power)[0]
    return int(n[ok[0]]) if ok.size else None


def select_metric(runs: Sequence[RunRecord]) -> str:
    """The metric that chooses the best λ: val/ce; test/ce for runs without a validation split
    (``data.val_size=0``: their val/ce is never logged), so that such a sweep is judged on what
    it has rather than called "no finished runs"."""
    done = [r for r in runs if r.status == FINISHED]
    if any(math.isfinite(final_value(r, mt.VAL_CE)) for r in done):
        return mt.VAL_CE
    if any(math.isfinite(final_value(r, mt.TEST_CE)) for r in done):
        return mt.TEST_CE
    return mt.VAL_CE


def per_seed(cell: Cell, metric: str = mt.VAL_CE) -> dict[int, float]:
    """Final ``metric`` by seed; several runs of one seed in a cell (runs pooled over a key that
    ``compare --by`` left out) count as their mean, so that a seed is still one pair."""
    values: dict[int, list[float]] = {}
    for r in cell.finished:
        v = final_value(r, metric)
        if math.isfinite(v):
            values.setdefault(r.seed, []).append(v)
    return {s: float(np.mean(v)) for s, v in values.items()}


def compare(best: dict[int, float], other: dict[int, float]
             ) -> tuple[float, int, float, float, str] | None:
    """(p, seeds, mean difference, sd of the difference, test) of other − best: paired over the
    seeds both rows have when there are two or more, else Welch's test; None when neither row
    has the two values a test needs."""
    common = sorted(set(best) & set(other))
    if len(common) >= 2:
        d = np.array([other[s] - best[s] for s in common])
        sd = float(d.std(ddof=1))
        if sd == 0:
            p = 0.0 if d.mean() != 0 else 1.0
        else:  # the textbook statistic (scipy's warns on nearly equal differences)
            t = float(d.mean()) / (sd / math.sqrt(len(d)))
            p = t_two_sided_p(t, len(d) - 1)
        return p, len(common), float(d.mean()), sd, "paired"
    a, b = np.array(list(best.values())), np.array(list(other.values()))
    if len(a) >= 2 and len(b) >= 2:
        p = welch_p(a, b)
        sd = math.hypot(float(a.std(ddof=1)), float(b.std(ddof=1)))
        return p, min(len(a), len(b)), float(b.mean() - a.mean()), sd, "Welch"
    return None


def row_label(summary: pd.DataFrame, pos: int) -> str:
    row = summary.iloc[pos]
    return ", ".join(f"{short_key(k)}={fmt_value(row[k])}" for k in cell_columns(summary))


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (NaN kept as NaN, not counted): the family-wise
    error of "clear" stays at ALPHA over the comparisons made, where each was also chosen on
    the data it is judged on."""
    order = sorted((p, i) for i, p in enumerate(ps) if math.isfinite(p))
    out = [math.nan] * len(ps)
    m, running = len(order), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(summary: pd.DataFrame, runs: Sequence[RunRecord],
            metric: str | None = None) -> Verdict:
    """The best-λ verdict: the row with the lowest mean val/ce (:func:`select_metric`) against
    every other row, by a paired t-test over the seeds the two rows share (seed k has the same
    initialisation at every λ). It is *clear* when every comparison gives p < ALPHA; otherwise
    the row hardest to tell apart decides, with about how many seeds would tell them apart at
    POWER. A lone row is compared with nothing: no mark. ``metric``: default
    :func:`select_metric`."""
    metric = metric or select_metric(runs)
    if summary.empty or f"{metric}_mean" not in summary:
        return Verdict(None, False, "no finished runs")
    means = summary[f"{metric}_mean"].to_numpy(dtype=float)
    if np.all(np.isnan(means)):
        return Verdict(None, False, "no finished runs")
    best = int(np.nanargmin(means))  # ties: the smallest λ (rows are in λ order)
    _, cells = cells_of(trained(runs))
    seeds = [per_seed(g, metric) for g in cells]
    others = [i for i in range(len(means)) if i != best and np.isfinite(means[i])]
    if not others:
        return Verdict(best, False, "the only row with finished runs: nothing to compare",
                       compared=False)
    results = {i: compare(seeds[best], seeds[i]) for i in others}
    ties = [i for i, r in results.items() if r is None or not (r[0] < ALPHA and r[2] > 0)]
    untestable = [i for i, r in results.items() if r is None]
    if untestable:
        rival = min(untestable, key=lambda i: means[i])
        n = min(len(seeds[best]), len(seeds[rival]))
        return Verdict(best, False, (
            f"not distinguishable with {n} seed{'s' * (n != 1)}: a test needs two or more "
            f"per row (add seeds, e.g. seed=0,1,2,3,4)"), rival=rival, seeds=n, ties=ties)
    rival = max(others, key=lambda i: (results[i][0], -means[i]))
    p, n, diff, sd, test = results[rival]
    label = row_label(summary, rival)
    if p < ALPHA and diff > 0:
        return Verdict(best, True, (f"clear (p = {p:.2g}, {test} t-test over {n} seeds against "
                                    f"{label}, the closest)"), rival, p, n)
    need = seeds_needed(diff, sd)
    tell = (f"about {need} seeds would tell" if need is not None
            else f"more than {MAX_SEEDS} seeds would be needed to tell")
    return Verdict(best, False, (f"not distinguishable from {label} with {n} seeds (p = {p:.2g},"
                                 f" {test} t-test); {tell}"), rival, p, n, need, ties)


# --------------------------------------------------------------------------- text table


def short_key(key: str) -> str:
    """Header for a swept key: ``regularization.lam`` reads as ``lam``."""
    return key.removeprefix("regularization.")


def fmt_value(value: object) -> str:
    """A swept value as a reader wants it: numbers at 4 significant digits (an Optuna λ has 17),
    integers as integers, anything else as given."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return str(value)
    return f"{number:.4g}"


def fmt_stat(mean: float, spread: float, decimals: int) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    if spread is None or math.isnan(spread):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {spread:.{decimals}f}"


def fmt_interval(lo: float, hi: float, decimals: int) -> str:
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return ""
    return f"[{lo:.{decimals}f}, {hi:.{decimals}f}]"


#: (header, column prefix, decimals) of the table's metric columns.

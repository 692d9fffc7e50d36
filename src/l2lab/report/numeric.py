"""A numeric condition (a width, a training-set size): the metric against it, one line per λ.

Nakkiran, Venkat, Kakade & Ma (2021, "Optimal Regularization Can Mitigate Double Descent") ask
whether the test error of the unregularized network peaks at the interpolation threshold, and
whether the λ tuned for each model size removes that peak. Here that is read off a sweep whose
condition is a number (``model.hidden=[h,h]`` read as h, ``data.train_size``; see
:func:`l2lab.report.stats.number_of`): per λ, the error and the cross-entropy against the
condition, and the *envelope*: at each condition value, the point of its own best λ (chosen on
the metric that chose it everywhere else: val/ce, or test/ce without a validation split).

The verdict states, per value of any other condition key (a label-noise arm):

- the **interpolation threshold**: the smallest condition value whose mean train error at λ = 0
  is at most :data:`INTERPOLATED` (0.01). With noisy labels the train error is measured against
  the noisy labels, so "fits its training set" means it reaches ~0;
- the **peak** at λ = 0 and under the envelope: the interior local maximum of the mean error that
  rises most above the lowest mean at smaller values (:func:`peak`), its place and height;
- whether the envelope is **monotone** (non-increasing as the value grows): decided on the 95%
  intervals over seeds where there are two or more seeds (a rise counts when a larger value's
  interval lies wholly above a smaller one's), on the means alone with one seed.

Nothing here knows MLflow or matplotlib (:func:`l2lab.report.figures.plot_numeric` draws it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from l2lab import metrics as mt
from l2lab.report.conditions import Condition, label_of, tail
from l2lab.report.stats import FINISHED, Cell, describe, final_value, fmt_value, number_of

#: Mean train error at or below this counts as fitting the training set (the threshold's rule).
INTERPOLATED = 0.01

Stat = tuple[float, float, float]  # (mean, 95% interval low, high) over seeds; NaN where absent


@dataclass
class Point:
    """One λ at one condition value: the error, the train error and the cross-entropy."""

    x: float
    lam: float
    seeds: int
    error: Stat  # test error (1 − test/acc), else val error
    train: Stat  # train error: 1 − train_eval/acc (eval mode), else 1 − train/acc
    ce: Stat  # the selecting metric (val/ce; test/ce without a validation split)


@dataclass
class Peak:
    """An interior local maximum of a curve and the lowest point before it (the dip)."""

    x: float
    height: float
    dip_x: float
    dip: float

    @property
    def rise(self) -> float:
        return self.height - self.dip


@dataclass
class Facet:
    """The curves of one value of the other condition keys (all conditions when none)."""

    label: str  # "" when the numeric key is the only condition key
    lines: dict[float, list[Point]]  # λ -> its points, ascending in x
    envelope: list[Point]  # each value's best λ, ascending in x
    threshold: float | None = None  # the interpolation threshold; None: not reached / no λ = 0
    threshold_train: float = math.nan  # mean λ = 0 train error there
    zero: list[Point] = field(default_factory=list)  # the λ = 0 line ([] when not swept)

    @property
    def xs(self) -> list[float]:
        return [p.x for p in self.envelope]


@dataclass
class NumericView:
    """The numeric condition key, what the axes show, and one facet per value of the others."""

    key: str
    facets: list[Facet]
    error_name: str  # "test error" or "val error"
    train_name: str  # where the train error comes from
    ce_metric: str  # val/ce, or test/ce where it chose the best λ
    width: bool  # the values were layer-width lists ([h, h]): a log axis, "width" in the text

    @property
    def name(self) -> str:
        return "width" if self.width else tail(self.key)


def _error(run_final: dict[str, float], metric: str) -> float:
    value = run_final.get(metric, math.nan)
    return 1.0 - float(value) if math.isfinite(value) else math.nan


def train_error_metric(runs: Sequence) -> str:
    """The accuracy the train error is read from: the eval-mode pass where every run logged it
    (what the network computes once trained), else the running train/acc."""
    done = [r for r in runs if r.status == FINISHED]
    if done and all(mt.TRAIN_EVAL_ACC in r.final for r in done):
        return mt.TRAIN_EVAL_ACC
    return "train/acc"


def point(cell: Cell, x: float, error_metric: str, train_metric: str, ce_metric: str) -> Point:
    """A cell's means and 95% intervals over its finished seeds (errors kept inside [0, 1])."""
    done = cell.finished
    err = describe([_error(r.final, error_metric) for r in done], "unit")
    train = describe([_error(r.final, train_metric) for r in done], "unit")
    ce = describe([final_value(r, ce_metric) for r in done], "positive")
    seeds = sum(math.isfinite(_error(r.final, error_metric)) for r in done)
    return Point(x, cell.lam, seeds, (err[0], err[2], err[3]), (train[0], train[2], train[3]),
                 (ce[0], ce[2], ce[3]))


#: Condition keys that measure a size of the problem: the data's. A width is any key whose values
#: are lists of numbers (``model.hidden``, ``model.channels``). Other numbers (lr, dropout) have
#: no interpolation threshold to speak of, and keep the figures they had.
SIZE_KEYS = ("data.train_size", "data.num_samples")


def is_size(key: str, values: Sequence[str]) -> bool:
    """A size axis: a data-size key, or layer widths (every value a list of numbers)."""
    if not all(number_of(v) is not None for v in values):
        return False
    return key in SIZE_KEYS or all(str(v).strip().startswith("[") for v in values)


def numeric_axis(keys: Sequence[str], conditions: Sequence[Condition]) -> str | None:
    """The condition key to put on the x axis: a size (:func:`is_size`: a width, a training-set
    size) with three or more values; the one with the most values where several are; None
    where none is. Other keys (a label-noise arm) facet the figure."""
    candidates = []
    for key in keys:
        values = {c.values[key] for c in conditions}
        if len(values) >= 3 and is_size(key, sorted(values)):
            candidates.append((len({number_of(v) for v in values}), -keys.index(key), key))
    return max(candidates)[2] if candidates else None


def view(keys: Sequence[str], conditions: Sequence[Condition]) -> NumericView | None:
    """The numeric condition's curves, envelope and threshold, per value of the other keys;
    None where no key is numeric or two conditions of one facet read as the same number."""
    key = numeric_axis(keys, conditions)
    if key is None:
        return None
    runs = [r for c in conditions for r in c.runs]
    has_test = any(mt.TEST_ACC in r.final for r in runs if r.status == FINISHED)
    error_metric = mt.TEST_ACC if has_test else mt.VAL_ACC
    train_metric = train_error_metric(runs)
    ce_metric = conditions[0].metric
    others = [k for k in keys if k != key]
    groups: dict[str, list[Condition]] = {}
    for cond in conditions:
        groups.setdefault(label_of({k: cond.values[k] for k in others}) if others else "",
                          []).append(cond)
    facets = []
    for label, conds in groups.items():
        xs = [number_of(c.values[key]) for c in conds]
        if len(set(xs)) != len(xs):
            return None
        lines: dict[float, list[Point]] = {}
        envelope = []
        for x, cond in sorted(zip(xs, conds, strict=True), key=lambda t: t[0]):
            for cell in cond.cells:
                if cell.finished:
                    lines.setdefault(cell.lam, []).append(
                        point(cell, float(x), error_metric, train_metric, ce_metric))
            if cond.best_cell is not None:
                envelope.append(point(cond.best_cell, float(x), error_metric, train_metric,
                                      ce_metric))
        facet = Facet(label, dict(sorted(lines.items())), envelope, zero=lines.get(0.0, []))
        facet.threshold, facet.threshold_train = threshold(facet.zero)
        facets.append(facet)
    width = all(str(c.values[key]).strip().startswith("[") for c in conditions)
    return NumericView(key, facets, "test error" if has_test else "val error",
                       "eval-mode train error" if train_metric == mt.TRAIN_EVAL_ACC
                       else "train error", ce_metric, width)


def threshold(zero: Sequence[Point]) -> tuple[float | None, float]:
    """The interpolation threshold: the smallest value whose mean train error at λ = 0 is at
    most :data:`INTERPOLATED`, and that error; (None, NaN) where none reaches it."""
    for p in zero:
        if math.isfinite(p.train[0]) and p.train[0] <= INTERPOLATED:
            return p.x, p.train[0]
    return None, math.nan


def peak(points: Sequence[Point]) -> Peak | None:
    """The peak of a curve's mean error: among its interior local maxima (higher than both
    neighbours), the one that rises most above the lowest mean at smaller values. Not simply
    the highest point: at the smallest widths the network underfits, and its error is high
    without any peak. None where the curve has no interior local maximum."""
    pts = [p for p in points if math.isfinite(p.error[0])]
    best: Peak | None = None
    for i in range(1, len(pts) - 1):
        here = pts[i].error[0]
        if here > pts[i - 1].error[0] and here > pts[i + 1].error[0]:
            dip = min(pts[:i], key=lambda p: p.error[0])
            cand = Peak(pts[i].x, here, dip.x, dip.error[0])
            if best is None or cand.rise > best.rise:
                best = cand
    return best


@dataclass
class Monotone:
    """Whether the envelope's error is non-increasing as the value grows, and the worst rise."""

    monotone: bool
    on_intervals: bool  # decided on the 95% intervals (False: on the means, one seed)
    rise: tuple[Point, Point] | None  # (smaller value, larger value) of the largest rise seen


def monotone(envelope: Sequence[Point]) -> Monotone:
    """Non-increasing within the intervals: no larger value's 95% interval lies wholly above a
    smaller value's (any pair, not only neighbours). Where a point has no interval (one seed),
    it is decided on the means: any rise of the mean counts. The rise reported is the largest
    counted one, else the largest rise of the means (within the intervals)."""
    pts = [p for p in envelope if math.isfinite(p.error[0])]
    on_intervals = bool(pts) and all(math.isfinite(p.error[1]) for p in pts)
    counted, seen = [], []
    for i, a in enumerate(pts):
        for b in pts[i + 1:]:
            if b.error[0] > a.error[0]:
                seen.append((a, b))
            if (b.error[1] > a.error[2]) if on_intervals else (b.error[0] > a.error[0]):
                counted.append((a, b))

    def size(pair: tuple[Point, Point]) -> float:
        return pair[1].error[0] - pair[0].error[0]

    rise = max(counted or seen, key=size) if (counted or seen) else None
    return Monotone(not counted, on_intervals, rise)


# --------------------------------------------------------------------------- text


def _at(v: NumericView, x: float) -> str:
    return f"{v.name} {fmt_value(x)}"


def _stat(s: Stat) -> str:
    text = f"{s[0]:.3f}"
    return text if not math.isfinite(s[1]) else f"{text} [{s[1]:.3f}, {s[2]:.3f}]"


def peak_text(v: NumericView, found: Peak | None) -> str:
    if found is None:
        return (f"no peak: the mean {v.error_name} has no interior local maximum over "
                f"{v.name}")
    return (f"peak at {_at(v, found.x)}: {v.error_name} {found.height:.3f}, {found.rise:.3f} "
            f"above the dip at {_at(v, found.dip_x)} ({found.dip:.3f})")


def threshold_text(v: NumericView, f: Facet) -> str:
    rule = f"the smallest {v.name} whose mean {v.train_name} at λ=0 is ≤ {INTERPOLATED:g}"
    if not f.zero:
        return f"interpolation threshold: n/a (no λ=0 runs; {rule})"
    if not any(math.isfinite(p.train[0]) for p in f.zero):
        return "interpolation threshold: n/a (no run logged a train accuracy)"
    if f.threshold is None:
        low = min(p.train[0] for p in f.zero if math.isfinite(p.train[0]))
        return (f"interpolation threshold: not reached ({rule}; the lowest is {low:.3f})")
    first = " (already at the smallest)" if f.threshold == f.zero[0].x else ""
    return (f"interpolation threshold: {_at(v, f.threshold)}{first} ({rule}: "
            f"{f.threshold_train:.3f})")


def monotone_text(v: NumericView, m: Monotone) -> str:
    how = ("no larger " + v.name + "'s 95% interval over seeds lies wholly above a smaller "
           + v.name + "'s" if m.on_intervals else "decided on the means: one seed, no interval")
    if m.monotone:
        extra = ("" if m.rise is None else f"; the largest rise of the means, "
                 f"{m.rise[0].error[0]:.3f} at {_at(v, m.rise[0].x)} to {m.rise[1].error[0]:.3f} "
                 f"at {_at(v, m.rise[1].x)}, is within the intervals")
        return f"the best-λ envelope is monotone (non-increasing; {how}{extra})"
    a, b = m.rise  # type: ignore[misc]
    return (f"the best-λ envelope is not monotone: {v.error_name} {_stat(b.error)} at "
            f"{_at(v, b.x)} (λ={fmt_value(b.lam)}) above {_stat(a.error)} at {_at(v, a.x)} "
            f"(λ={fmt_value(a.lam)}) ({how})")


def verdict_lines(v: NumericView) -> list[str]:
    """The printed verdict: a heading, then per facet the threshold, the peak at λ = 0, the
    peak under the envelope and whether the envelope is monotone."""
    axis = f"{v.key}, [h, h] read as h" if v.width else v.key
    lines = [f"{v.error_name.capitalize()} against {v.name} ({axis}), one line per λ; "
             f"envelope: each {v.name}'s best λ (chosen on {v.ce_metric}):"]
    for f in v.facets:
        pre = f"  {f.label}: " if f.label else "  "
        lines.append(pre + threshold_text(v, f))
        lines.append(pre + ("λ=0: " + peak_text(v, peak(f.zero)) if f.zero
                            else "λ=0: not swept"))
        lines.append(pre + "best λ per " + v.name + ": " + peak_text(v, peak(f.envelope)))
        lines.append(pre + monotone_text(v, monotone(f.envelope)))
    return lines

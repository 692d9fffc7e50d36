"""How the best λ depends on a second factor: the sweep split into conditions.

Every varying key other than λ and ``seed`` makes a condition (``data.train_size=100``,
``regularization=l2_dense``); a preset's expanded keys are folded into its name
(:func:`l2lab.report.stats.folded_keys`). Within a condition λ is the only factor, so its best λ
(lowest mean final val/ce), the λ not distinguishable from it and its paired verdict answer the
question the sweep was run for. Across conditions each is taken at its *own* best λ and compared,
paired over seeds, with the lowest: the global lowest cell of a train-size sweep is of course at
the largest training set, which nobody asked.

Two cells that are the same training under two labels (λ = 0 under two layer selections: no
penalty is no penalty) are never rivals: they are detected by label (a zero λ on every layer of
every run, resolved with ``lam_per_layer``, and only penalty keys differ) or by data (identical
val/ce histories for every shared seed). ``lam=0`` with ``lam_per_layer.fc1=0.3`` penalises fc1:
it is a rival of ``lam=0`` alone.

Like :mod:`l2lab.report.stats`, nothing here knows MLflow, torch or matplotlib.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from l2lab import metrics as mt
from l2lab.report.stats import (
    ALPHA,
    LAM_KEY,
    MAX_SEEDS,
    Cell,
    RunRecord,
    Verdict,
    best_val,
    cells_of,
    compare,
    final_value,
    fmt_value,
    holm,
    other_keys,
    per_seed,
    seeds_needed,
    select_metric,
    summarize,
    trained,
    value_sort_key,
    verdict,
)

#: A condition label longer than this is cut (legends and table cells stay readable).
MAX_LABEL = 32


def tail(key: str) -> str:
    """A key as a label: its last part (``data.train_size`` -> ``train_size``)."""
    return key.rsplit(".", 1)[-1]


def label_of(values: Mapping[str, str]) -> str:
    """``train_size=100``; beside another key a preset reads as its name alone (``decoupled,
    lr=0.001``), so that the label is not cut to ``regularization=decoup…``."""
    parts = [fmt_value(v) if len(values) > 1 and is_preset_value(k, v)
             else f"{tail(k)}={fmt_value(v)}" for k, v in values.items()]
    text = ", ".join(parts) or "all runs"
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def is_preset_value(key: str, value: str) -> bool:
    """A config group's choice (``regularization=decoupled``): a key without a dot, a name."""
    return "." not in key and value_sort_key(value)[0] == 1


@dataclass
class Condition:
    """The runs of one value of the condition keys, with λ the only factor left."""

    values: dict[str, str]  # condition key -> value ({} for a sweep over λ and seed only)
    runs: list[RunRecord]  # trained runs; group reduced to λ
    summary: pd.DataFrame  # one row per λ (stats.summarize of ``runs``)
    verdict: Verdict  # its best λ against its other λ, paired over seeds
    cells: list[Cell] = field(default_factory=list)  # one per row of ``summary``
    too_short: tuple[int, int, int] | None = None  # (runs best at the last epoch, runs, epochs)
    narrow: str | None = None  # the sentence suggesting λ values to add
    metric: str = mt.VAL_CE  # what chose the best λ (stats.select_metric: test/ce without val)

    @property
    def label(self) -> str:
        return label_of(self.values)

    @property
    def short(self) -> str:
        """The label without the key when there is one key (a panel title, a tick label)."""
        if len(self.values) != 1:
            return self.label
        ((key, value),) = self.values.items()
        if value_sort_key(value)[0] == 0:  # a number says little without its key
            return f"{tail(key)}={fmt_value(value)}"
        text = fmt_value(value)
        return text if len(text) <= 24 else text[:23] + "…"

    @property
    def best_lam(self) -> float:
        return math.nan if self.verdict.best is None else float(self.summary["lam"].iloc[
            self.verdict.best])

    @property
    def best_cell(self) -> Cell | None:
        return None if self.verdict.best is None else self.cells[self.verdict.best]

    @property
    def tie_lams(self) -> list[float]:
        """The best λ and every λ not distinguishable from it, ascending."""
        if self.verdict.best is None:
            return []
        rows = [self.verdict.best, *self.verdict.ties]
        return sorted(float(self.summary["lam"].iloc[i]) for i in rows)

    @property
    def best_val(self) -> float:
        """Mean final :attr:`metric` (val/ce) at the best λ: what chose it."""
        return self.mean_at_best(self.metric)

    def mean_at_best(self, metric: str) -> float:
        column = f"{metric}_mean"
        if self.verdict.best is None or column not in self.summary:
            return math.nan
        return float(self.summary[column].iloc[self.verdict.best])


def regroup(runs: Sequence[RunRecord], by: Sequence[str],
            values: Sequence[Mapping[str, str]] | None = None) -> tuple[list[RunRecord], list[str]]:
    """Runs whose condition keys are exactly ``by`` (``compare --by``): the value of each key
    from the run's group, else from ``values`` (the run's params, for a key that does not vary).
    Returns the runs and the keys now pooled (varying keys left out of ``by``; their runs count
    as replicates, and several runs of one seed in a cell are averaged for the paired tests)."""
    pooled = sorted({k for r in runs for k in r.swept if k != LAM_KEY and k not in by})
    out = []
    for i, run in enumerate(runs):
        extra = values[i] if values is not None else {}
        group = {LAM_KEY: run.swept.get(LAM_KEY, fmt_value(run.lam))}
        group.update({k: str(run.swept.get(k, extra.get(k, ""))) for k in by})
        out.append(replace(run, swept=group))
    return out, pooled


def split(runs: Sequence[RunRecord]) -> tuple[list[str], list[Condition]]:
    """The condition keys and one :class:`Condition` per value of them (numeric order), each
    with its own summary, paired verdict and warnings. No condition keys: one condition."""
    kept = trained(runs)
    keys = other_keys(kept)
    metric = select_metric(kept)
    parts: dict[tuple[str, ...], list[RunRecord]] = {}
    for run in kept:
        parts.setdefault(tuple(str(run.swept.get(k, "")) for k in keys), []).append(run)
    conditions = []
    for ident in sorted(parts, key=lambda t: tuple(value_sort_key(v) for v in t)):
        sub = [replace(r, swept={LAM_KEY: r.swept.get(LAM_KEY, fmt_value(r.lam))})
               for r in parts[ident]]
        summary = summarize(sub)
        cond = Condition(dict(zip(keys, ident, strict=True)), sub, summary,
                         verdict(summary, sub, metric), cells_of(sub)[1], metric=metric)
        cond.too_short = too_short(cond)
        cond.narrow = narrow_grid(cond)
        conditions.append(cond)
    return keys, conditions


# --------------------------------------------------------------------------- warnings


def too_short(cond: Condition) -> tuple[int, int, int] | None:
    """(runs whose lowest val/ce is at their last epoch, finished runs with a history, epochs)
    when that is most of the runs the verdict is about: those of the best λ and of the λ not
    distinguishable from it. Their val/ce was still falling, so the verdict is about an
    unfinished race; the other λ (λ = 0 peaking early) must not outvote them."""
    if cond.verdict.best is None:
        return None
    rows = {cond.verdict.best, *cond.verdict.ties}
    ends = []
    for run in (r for i, c in enumerate(cond.cells) if i in rows for r in c.finished):
        steps = [int(s) for s, v in run.history.get("val/ce", []) if not math.isnan(float(v))]
        if len(steps) >= 2:
            ends.append((best_val(run)[1] == max(steps), max(steps) + 1))
    at_last = sum(e[0] for e in ends)
    if not ends or at_last * 2 <= len(ends):
        return None
    return at_last, len(ends), max(e[1] for e in ends)


def _nice(x: float) -> str:
    """The nearest 1, 2, 3 or 5 times a power of ten (in log distance): 9 -> 10, 0.0027 -> 0.003."""
    power = 10.0 ** math.floor(math.log10(x))
    steps = [power * m for m in (1, 2, 3, 5, 10)]
    return f"{float(f'{min(steps, key=lambda v: abs(math.log(v / x))):.3g}'):g}"


def narrow_grid(cond: Condition) -> str | None:
    """The sentence for a best λ at the grid's largest, or smallest non-zero, λ: the optimum may
    lie beyond the grid. It suggests two more λ at the grid's own spacing."""
    if not cond.verdict.compared:  # a lone λ (the others rejected) is no grid's edge
        return None
    best = cond.best_lam
    lams = sorted(float(x) for x, n in zip(cond.summary["lam"], cond.summary["runs"],
                                           strict=True) if x > 0 and n > 0)
    if not lams or not best > 0:
        return None
    if best == lams[-1]:
        ratio = lams[-1] / lams[-2] if len(lams) >= 2 else 10.0
        add, where = [best * ratio, best * ratio ** 2], "largest"
    elif best == lams[0]:
        ratio = lams[1] / lams[0]
        add, where = [best / ratio ** 2, best / ratio], "smallest non-zero"
    else:
        return None
    grid = sorted({*(float(x) for x in cond.summary["lam"]), *(float(_nice(a)) for a in add)})
    override = (f" (regularization.lam={','.join(f'{x:g}' for x in grid)})" if len(grid) <= 12
                else "")  # a search's many λ (Optuna): the values alone
    return (f"best λ={fmt_value(best)} is the grid's {where} λ: the optimum may lie beyond the "
            f"grid; add λ = {', '.join(_nice(a) for a in sorted(add))}{override}")


def warnings_of(cond: Condition) -> list[str]:
    lines = []
    if cond.too_short:
        at_last, n, epochs = cond.too_short
        which = "the best λ" if len(cond.tie_lams) <= 1 else "the best λ and its range"
        lines.append(f"training may be too short: {at_last} of {n} runs of {which} reach their "
                     f"lowest val/ce at the last epoch (val/ce still falling); try "
                     f"trainer.max_epochs={2 * epochs}")
    if cond.narrow:
        lines.append(cond.narrow)
    return lines


# --------------------------------------------------------------------------- across conditions


def penalised(run: RunRecord) -> bool:
    """Whether some layer of the run may carry a non-zero λ. A selected layer's λ is its first
    matching ``lam_per_layer`` value, else ``lam``; the logged patterns lose their order (MLflow
    params), so a layer counts as penalised when any pattern matching it is non-zero. Where the
    selection was not logged, every ``lam_per_layer`` value is taken to match a layer."""
    per_layer = run.lam_per_layer
    if run.layers is None:
        return run.lam != 0 or any(v != 0 for v in per_layer.values())
    for name in run.layers:
        hits = [v for key, v in per_layer.items() if fnmatch.fnmatchcase(name, key)]
        if any(v != 0 for v in hits) or (not hits and run.lam != 0):
            return True
    return False


def penalty_key(key: str) -> bool:
    """A key that acts only through the penalty (the preset, the selection, ``mode``,
    ``normalize``, ``lam_per_layer``...): with a zero λ on every layer it changes nothing that
    is trained (``mode=optimizer`` adds a decay of exactly 0, a loss term of 0 adds 0)."""
    return key == "regularization" or key.startswith("regularization.")


def same_training(a: Cell, a_values: Mapping[str, str], b: Cell,
                  b_values: Mapping[str, str]) -> bool:
    """Two cells that are one training under two labels: every run of both has a zero λ on
    every layer (:func:`penalised`) and only keys that act through the penalty differ
    (:func:`penalty_key`); or identical val/ce histories for every shared seed."""
    differ = [k for k in {*a_values, *b_values} if a_values.get(k) != b_values.get(k)]
    if differ and all(map(penalty_key, differ)) and a.runs and b.runs and not any(
            penalised(r) for r in (*a.runs, *b.runs)):
        return True
    ha = {r.seed: r.history.get("val/ce") for r in a.finished}
    hb = {r.seed: r.history.get("val/ce") for r in b.finished}
    common = set(ha) & set(hb)
    return bool(common) and all(ha[s] and ha[s] == hb[s] for s in common)


@dataclass
class Rivalry:
    """One condition at its best λ against the lowest condition at its best λ."""

    other: int  # index into the conditions
    same: bool  # the same training under two labels: not compared
    p: float = math.nan  # Holm-adjusted where Across.holm
    seeds: int = 0
    diff: float = math.nan  # other − lowest, mean final judged metric over paired seeds
    test: str = ""
    need: int | None = None
    p_raw: float = math.nan  # before any adjustment

    @property
    def clear(self) -> bool:
        return not self.same and self.p < ALPHA and self.diff > 0


@dataclass
class Across:
    lowest: int | None  # the condition with the lowest mean judged metric at its own best λ
    rivals: list[Rivalry]
    same_pairs: list[tuple[str, str, float]]  # (label, label, λ) cells that are one training
    chosen_on: str = mt.VAL_CE  # what chose each condition's best λ
    judged_on: str = mt.VAL_CE  # what the conditions are compared on at those λ
    holm: bool = True  # p-values Holm-adjusted (no held-out split to judge on)

    @property
    def comparisons(self) -> int:
        return sum(1 for r in self.rivals if r.test)


def held_out(conditions: Sequence[Condition], ranked: Sequence[int]) -> bool:
    """Every finished run at every ranked condition's best λ has a final test/ce: the verdict
    can be judged on data that chose nothing."""
    cells = [conditions[i].best_cell for i in ranked]
    return all(c is not None and c.finished and all(
        math.isfinite(final_value(r, mt.TEST_CE)) for r in c.finished) for c in cells)


def across(conditions: Sequence[Condition]) -> Across:
    """The conditions at their own best λ (chosen on val/ce) against the lowest of them, paired
    over seeds: on test/ce where every best λ's runs have it (selected on val, judged on test),
    else on the selecting metric with Holm-adjusted p-values. Also every pair of cells (at the
    same λ) that is the same training, to say so."""
    same_pairs = []
    for i, a in enumerate(conditions):
        for b in conditions[i + 1:]:
            for ca in a.cells:
                for cb in b.cells:
                    if ca.lam == cb.lam and same_training(ca, a.values, cb, b.values):
                        same_pairs.append((a.label, b.label, ca.lam))
    chosen = conditions[0].metric if conditions else mt.VAL_CE
    ranked = [i for i, c in enumerate(conditions) if math.isfinite(c.best_val)]
    if not ranked:
        return Across(None, [], same_pairs, chosen, chosen)
    test = chosen == mt.VAL_CE and held_out(conditions, ranked)
    judged = mt.TEST_CE if test else chosen
    low = min(ranked, key=lambda i: conditions[i].mean_at_best(judged))
    best_cell = conditions[low].best_cell
    rivals, spread = [], {}
    for i in ranked:
        if i == low:
            continue
        cell = conditions[i].best_cell
        if same_training(best_cell, conditions[low].values, cell, conditions[i].values):
            rivals.append(Rivalry(i, True))
            continue
        result = compare(per_seed(best_cell, judged), per_seed(cell, judged))
        if result is None:
            rivals.append(Rivalry(i, False))
            continue
        p, n, diff, spread[i], kind = result
        rivals.append(Rivalry(i, False, p, n, diff, kind, None, p))
    if not test:
        for r, p in zip(rivals, holm([r.p_raw for r in rivals]), strict=True):
            r.p = p
    for r in rivals:
        if r.test and not r.clear:
            r.need = seeds_needed(r.diff, spread[r.other])
    rivals.sort(key=lambda r: conditions[r.other].mean_at_best(judged))
    return Across(low, rivals, same_pairs, chosen, judged, holm=not test)


# --------------------------------------------------------------------------- text


def at_best(cond: Condition) -> str:
    return f"{cond.label} at λ={fmt_value(cond.best_lam)}"


def range_text(cond: Condition) -> str:
    ties = cond.tie_lams
    if len(ties) <= 1:
        return "range: this λ alone"
    return (f"range {fmt_value(ties[0])}–{fmt_value(ties[-1])}: "
            f"{', '.join(fmt_value(x) for x in ties)} not distinguishable")


def condition_line(cond: Condition) -> str:
    ver = cond.verdict
    if ver.best is None:
        return f"  {cond.label}: no finished runs"
    return (f"{ver.mark} {cond.label}: best λ={fmt_value(cond.best_lam)} "
            f"({cond.metric} {cond.best_val:.4f}; {range_text(cond)}): {ver.text}")


def layers_of(runs: Iterable[RunRecord]) -> str | None:
    """The layers the runs' selection penalised (``l2.layers``), e.g. ``fc2``; distinct
    selections joined by `` | ``; None where no run logged it."""
    seen: list[tuple[str, ...]] = []
    for run in runs:
        if run.layers is not None and run.layers not in seen:
            seen.append(run.layers)
    return " | ".join(", ".join(t) or "(none)" for t in seen) if seen else None


def selection_line(conditions: Sequence[Condition]) -> str | None:
    """Which layers each condition's selection penalised (``l2_dense: fc2``): a selection's
    effect is otherwise visible only in a param (``min_params=4096`` leaves out a 4,000-weight
    fc1). One list when every condition penalised the same layers."""
    known = [(c, layers) for c in conditions if (layers := layers_of(c.runs)) is not None]
    if not known:
        return None
    if len(known) == len(conditions) and len({layers for _, layers in known}) == 1:
        return f"penalised layers (l2.layers): {known[0][1]}"
    return "penalised layers (l2.layers): " + "; ".join(f"{c.short}: {layers}"
                                                        for c, layers in known)


def protocol_text(acr: Across) -> str:
    """Which data chose each best λ and which judged the conditions (said wherever the
    cross-condition verdict is)."""
    n = acr.comparisons
    holm_ = (f"p-values Holm-adjusted over the {n} comparison{'s' * (n != 1)} made" if n
             else "no comparison to adjust")
    if acr.judged_on != acr.chosen_on:
        return (f"protocol: each condition's best λ chosen on {acr.chosen_on}; the conditions "
                f"judged on the held-out {acr.judged_on} at those λ")
    if acr.chosen_on == mt.VAL_CE:
        return (f"protocol: no test split: each best λ chosen on val/ce and the conditions "
                f"judged on the same val/ce; {holm_}")
    return (f"protocol: no validation split: each best λ chosen and the conditions judged on "
            f"{acr.chosen_on}; {holm_}")


def rivalry_text(conditions: Sequence[Condition], acr: Across, r: Rivalry) -> str:
    other = conditions[r.other]
    shown = dict.fromkeys((acr.chosen_on, acr.judged_on))
    head = f"{at_best(other)} ({', '.join(f'{m} {other.mean_at_best(m):.4f}' for m in shown)})"
    if r.same:
        return (f"{head}: the same training as the lowest (no penalty under either label): "
                "not a rival")
    if r.test == "":
        return f"{head}: not testable (a test needs two or more seeds per cell)"
    how = f"{r.test} t-test over {r.seeds} seeds{', Holm-adjusted' if acr.holm else ''}"
    if r.clear:
        return f"{head}: higher by {r.diff:.4f}, clear (p = {r.p:.2g}, {how})"
    tell = (f"about {r.need} seeds would tell" if r.need is not None
            else f"more than {MAX_SEEDS} seeds would be needed to tell")
    return (f"{head}: not distinguishable (difference {r.diff:+.4f}, p = {r.p:.2g}, {how}); "
            f"{tell}")


def across_verdict(conditions: Sequence[Condition], acr: Across) -> str:
    """The one-line cross-condition verdict (the last line of the printed table), marked ``*``
    clear or ``~`` not; no mark where nothing was compared."""
    what = f"lowest mean {acr.judged_on} across conditions"
    if acr.lowest is None:
        return f"  {what}: n/a (no finished runs)"
    low = conditions[acr.lowest]
    real = [r for r in acr.rivals if not r.same]
    if not real:
        why = ("the others' best is the same training under another label" if acr.rivals
               else "no other condition with finished runs")
        return f"  {what}: {at_best(low)}: no rival ({why})"
    open_ = [r for r in real if not r.clear]
    if not open_:
        return f"* {what}: {at_best(low)}: clear against each other condition at its own best λ"
    r = max(open_, key=lambda r: (r.p if math.isfinite(r.p) else 2.0))
    how = (f"p = {r.p:.2g}, {r.test} t-test over {r.seeds} seeds"
           f"{', Holm-adjusted' if acr.holm else ''}" if r.test else "not testable with one seed")
    return (f"~ {what}: {at_best(low)}: not distinguishable from "
            f"{at_best(conditions[r.other])} ({how})")


def format_conditions(keys: Sequence[str], conditions: Sequence[Condition]) -> list[str]:
    """The lines printed after the table of a sweep with conditions: one per condition (best λ,
    its range, its verdict, and its warnings), the layers each selection penalised, then the
    conditions at their own best λ with the protocol, ending with the cross-condition verdict."""
    chosen = conditions[0].metric if conditions else mt.VAL_CE
    lines = [f"Per condition ({', '.join(keys)}): best λ = lowest mean final {chosen}; range = "
             "the λ not distinguishable from it (paired t-test over seeds, 5% level)"]
    for cond in conditions:
        lines.append(condition_line(cond))
        lines += [f"    ! {w}" for w in warnings_of(cond)]
    if selected := selection_line(conditions):
        lines.append(f"  {selected}")
    acr = across(conditions)
    lines += ["", "Across conditions, each at its own best λ (against the lowest, paired over "
              f"seeds); {protocol_text(acr)}:"]
    for a, b, lam in acr.same_pairs:
        lines.append(f"  note: {a} and {b} at λ={fmt_value(lam)} are the same training under "
                     "two labels (no penalty under either): never compared as rivals")
    lines += [f"  {rivalry_text(conditions, acr, r)}" for r in acr.rivals]
    lines.append(across_verdict(conditions, acr))
    fac = factorial(keys, conditions)
    if fac is not None:  # an arm × a number: the last lines answer how the best λ moves
        lines += ["", *factorial_lines(fac)]
    return lines


def numeric_key(keys: Sequence[str], conditions: Sequence[Condition]) -> bool:
    """One condition key with numeric values: best λ against it gets a number axis, and
    λ × it a heatmap."""
    return len(keys) == 1 and len(conditions) >= 2 and all(
        value_sort_key(c.values[keys[0]])[0] == 0 for c in conditions)


def best_table(conditions: Iterable[Condition]) -> pd.DataFrame:
    """Best λ per condition with its range and mean val/ce there (the cross-condition table)."""
    rows = []
    for c in conditions:
        ties = c.tie_lams
        rows.append({"condition": c.label, **c.values, "best_lam": c.best_lam,
                     "lam_lo": ties[0] if ties else np.nan, "lam_hi": ties[-1] if ties else np.nan,
                     "val_ce": c.best_val, "clear": c.verdict.clear})
    return pd.DataFrame(rows)


def heatmap_grid(summary: pd.DataFrame, key: str
                 ) -> tuple[list[str], list[float], np.ndarray, list[int | None],
                            tuple[int, int] | None]:
    """Mean final val/ce over (value of ``key``) × λ: the row values (numeric order), the λ
    (ascending), the grid (NaN where no finished run), each row's best column, and the lowest
    cell (row, column)."""
    data = summary[summary["runs"] > 0]
    lams = sorted(float(x) for x in data["lam"].unique())
    rows = sorted({str(v) for v in data[key]}, key=value_sort_key)
    grid = np.full((len(rows), len(lams)), np.nan)
    for _, r in data.iterrows():
        grid[rows.index(str(r[key])), lams.index(float(r["lam"]))] = float(r["val/ce_mean"])
    finite = np.isfinite(grid)
    row_best = [int(np.nanargmin(grid[i])) if finite[i].any() else None for i in range(len(rows))]
    low = None
    if finite.any():
        i, j = np.unravel_index(int(np.nanargmin(grid)), grid.shape)
        low = (int(i), int(j))
    return rows, lams, grid, row_best, low


def headline(runs: Sequence[RunRecord]) -> str:
    """The verdict in one line (the sweep parent's description): the best λ of each condition
    and the cross-condition verdict; without conditions, the table's verdict."""
    keys, conds = split(runs)
    if not keys:
        from l2lab.report.stats import row_label

        summary = summarize(runs)
        ver = verdict(summary, runs)
        return "" if ver.best is None else f"{row_label(summary, ver.best)}: {ver.text}"
    per = "; ".join(f"{c.label}: λ={fmt_value(c.best_lam)}" for c in conds
                    if math.isfinite(c.best_lam))
    fac = factorial(keys, conds)
    if fac is not None:  # the factorial question's answer, not the six cells' ranking
        return factorial_lines(fac)[-1][2:]
    return f"{per} (each condition's own best). {across_verdict(conds, across(conds))[2:]}"


# --------------------------------------------------------------------------- arm × numeric factor


@dataclass
class Shift:
    """How far one arm's best λ moves across the numeric factor (log10 units: decades)."""

    arm: str
    points: list[tuple[str, float, float, float]]  # (level, best λ, range low, range high)
    decades: float  # log10(best λ at the highest level / at the lowest); NaN where one is 0
    lo: float  # the least shift the ranges allow (−inf where a range reaches λ = 0)
    hi: float  # the most


@dataclass
class Factorial:
    """Two condition keys, one an arm (categorical: a preset, a mode), one numeric (lr, train
    size, width): the question is whether the best λ moves with the number, and whether it
    moves differently in each arm (Loshchilov & Hutter 2019, Fig. 2)."""

    arm_key: str
    num_key: str
    arms: list[str]  # arm values, in the conditions' order
    levels: list[str]  # numeric values, ascending
    cells: dict[tuple[str, str], Condition]  # (arm, level) -> its condition

    def row(self, arm: str) -> list[Condition]:
        """The arm's conditions, numeric order (levels without runs left out)."""
        return [self.cells[(arm, v)] for v in self.levels if (arm, v) in self.cells]

    @property
    def ordered(self) -> list[Condition]:
        """Every condition, arm by arm (a row of panels each), numeric order within an arm,
        whichever key the sweep named first."""
        return [c for arm in self.arms for c in self.row(arm)]

    def summary(self, arm: str) -> pd.DataFrame:
        """The arm's summary rows (λ × level), the level in column ``num_key``: what
        :func:`heatmap_grid` reads."""
        return pd.concat([c.summary.assign(**{self.num_key: c.values[self.num_key]})
                          for c in self.row(arm)], ignore_index=True)

    def shift(self, arm: str) -> Shift:
        """The arm's best λ at each level with its range, and the move from the lowest level
        to the highest in decades, with the bounds its ranges allow."""
        points = [(c.values[self.num_key], c.best_lam, c.tie_lams[0], c.tie_lams[-1])
                  for c in self.row(arm) if math.isfinite(c.best_lam)]
        if len(points) < 2:
            return Shift(arm, points, math.nan, -math.inf, math.inf)
        (_, b0, lo0, hi0), (_, b1, lo1, hi1) = points[0], points[-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            log = np.log10(np.array([b0, lo0, hi0, b1, lo1, hi1], dtype=float))
            decades = float(log[3] - log[0]) if b0 > 0 and b1 > 0 else math.nan
            lo, hi = float(log[4] - log[2]), float(log[5] - log[1])
        return Shift(arm, points, decades, lo if not math.isnan(lo) else -math.inf,
                     hi if not math.isnan(hi) else math.inf)


def factorial(keys: Sequence[str], conditions: Sequence[Condition]) -> Factorial | None:
    """The arm × numeric layout when the condition keys are exactly one categorical and one
    numeric key, each with two or more values; else None (one heatmap or none, as before)."""
    if len(keys) != 2 or not conditions:
        return None
    kinds = {k: {value_sort_key(c.values[k])[0] for c in conditions} for k in keys}
    arm = [k for k in keys if kinds[k] == {1}]
    num = [k for k in keys if kinds[k] == {0}]
    if len(arm) != 1 or len(num) != 1:
        return None
    arms = list(dict.fromkeys(c.values[arm[0]] for c in conditions))
    levels = sorted({c.values[num[0]] for c in conditions}, key=value_sort_key)
    if len(arms) < 2 or len(levels) < 2:
        return None
    return Factorial(arm[0], num[0], arms, levels,
                     {(c.values[arm[0]], c.values[num[0]]): c for c in conditions})


def _decades(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return "−∞" if x == -math.inf else "+∞" if x == math.inf else f"{x:+.1f}".replace("-", "−")


def _span(lo: float, hi: float) -> str:
    return "alone" if lo == hi else f"{fmt_value(lo)}–{fmt_value(hi)}"


def shift_line(fac: Factorial, sh: Shift) -> str:
    """One arm's answer: its best λ (with range) at each level, and how far it moves."""
    name = tail(fac.num_key)
    path = ", ".join(f"{fmt_value(b)} ({_span(lo, hi)}) at {name}={fmt_value(v)}"
                     for v, b, lo, hi in sh.points) or "no finished runs"
    head = f"{fmt_value(sh.arm)}: best λ (range) {path}"
    if len(sh.points) < 2:
        return f"{head}: its shift needs two {name} values with finished runs"
    span = f"across {name} {fmt_value(sh.points[0][0])}–{fmt_value(sh.points[-1][0])}"
    bounds = f"the ranges allow {_decades(sh.lo)} to {_decades(sh.hi)}"
    zero = [fmt_value(p[0]) for p in (sh.points[0], sh.points[-1]) if p[1] == 0]
    if len(zero) == 2:
        return f"{head}: λ = 0 at both ends, no move to measure in decades ({bounds})"
    if zero:
        return (f"{head}: moves an unbounded number of decades {span} (best λ = 0 at "
                f"{name}={zero[0]}, which has no log; {bounds})")
    return f"{head}: moves {_decades(sh.decades)} decades {span} ({bounds})"


def shifts_differ(shifts: Sequence[Shift]) -> tuple[bool, str]:
    """Whether the arms' shifts differ: clear when the bounds their ranges allow are apart for
    some pair of arms (then no choice of λ within the ranges makes the shifts equal)."""
    apart = [(a, b) for i, a in enumerate(shifts) for b in shifts[i + 1:]
             if a.hi < b.lo or b.hi < a.lo]
    each = "; ".join(f"{fmt_value(s.arm)} {_decades(s.decades)} ({_decades(s.lo)} to "
                     f"{_decades(s.hi)})" for s in shifts)
    if apart:
        pairs = ", ".join(f"{fmt_value(a.arm)} and {fmt_value(b.arm)}" for a, b in apart)
        return True, (f"the shift of the best λ differs between arms: {each} decades; the "
                      f"bounds of {pairs} are apart")
    return False, (f"the shift of the best λ does not differ distinguishably between arms: "
                   f"{each} decades; the bounds overlap (a finer λ grid or more seeds narrows "
                   "them)")


def factorial_lines(fac: Factorial) -> list[str]:
    """The factorial verdict: a line per arm, then whether the shift differs between arms."""
    shifts = [fac.shift(arm) for arm in fac.arms]
    clear, text = shifts_differ(shifts)
    return ([f"Best λ against {tail(fac.num_key)}, per {tail(fac.arm_key)} (range: λ not "
             "distinguishable from the best; a decade is a factor of 10 in λ):"]
            + [f"  {shift_line(fac, s)}" for s in shifts]
            + [f"{'*' if clear else '~'} {text}"])

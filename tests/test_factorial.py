"""An arm (a preset, a mode) beside a numeric factor (lr) in a λ sweep, and the report's figures:
the verdict per arm on how far the best λ moves, and the figures read back as matplotlib
objects (panels, titles, line labels, colour scales), on synthetic runs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from test_conditions import preset_sweep, record, size_sweep

from l2lab import metrics as mt
from l2lab.report import conditions as cd
from l2lab.report import figures
from l2lab.report.html import write_report
from l2lab.report.stats import RunRecord, summarize
from l2lab.report.table import format_table

LAMS = (0.0, 0.03, 0.1, 0.3, 1.0)
#: Each arm's best λ at each lr: L2 in the loss moves down a decade as lr grows tenfold (from 1
#: to 0.1), the decoupled decay stays at 0.3 (Loshchilov & Hutter 2019, Fig. 2).
BEST = {"l2": {"0.001": 1.0, "0.003": 0.3, "0.01": 0.1},
        "decoupled": {"0.001": 0.3, "0.003": 0.3, "0.01": 0.3}}
MODE = {"l2": "loss", "decoupled": "optimizer"}


def lr_sweep(best: dict[str, dict[str, float]] = BEST) -> list[RunRecord]:
    """regularization=l2,decoupled × optimizer.lr × λ × 3 seeds: val/ce = a bowl in log λ around
    the cell's best, a seed offset shared by every cell (paired seeds), and a small offset per
    (arm, lr) so that no two cells have the same history."""
    runs = []
    for a, (arm, row) in enumerate(best.items()):
        for i, (lr, b) in enumerate(row.items()):
            for lam in LAMS:
                for s in range(3):
                    bowl = 0.2 * (math.log10(max(lam, 1e-3)) - math.log10(b)) ** 2
                    val = 0.4 + 0.01 * (3 * a + i) + bowl + 0.01 * s + 0.0005 * (s * s % 3)
                    runs.append(record(lam, s, val, {"regularization": arm,
                                                     "regularization.mode": MODE[arm],
                                                     "optimizer.lr": lr}))
    return runs


# --------------------------------------------------------------------------- the verdict


def test_an_arm_beside_a_number_is_faceted_and_each_arms_shift_is_measured_in_decades():
    runs = lr_sweep()
    keys, conds = cd.split(runs)
    assert keys == ["regularization", "optimizer.lr"]  # the mode is folded into the preset
    fac = cd.factorial(keys, conds)
    assert fac is not None
    assert (fac.arm_key, fac.num_key) == ("regularization", "optimizer.lr")
    assert fac.arms == ["decoupled", "l2"] and fac.levels == ["0.001", "0.003", "0.01"]
    l2, dec = fac.shift("l2"), fac.shift("decoupled")
    assert [p[1] for p in l2.points] == [1.0, 0.3, 0.1]
    assert l2.decades == pytest.approx(-1.0) and (l2.lo, l2.hi) == pytest.approx((-1.0, -1.0))
    assert [p[1] for p in dec.points] == [0.3, 0.3, 0.3] and dec.decades == 0.0
    lines = format_table(summarize(runs), runs).splitlines()
    assert lines[-4] == ("Best λ against lr, per regularization (range: λ not distinguishable "
                         "from the best; a decade is a factor of 10 in λ):")
    assert lines[-2] == ("  l2: best λ (range) 1 (alone) at lr=0.001, 0.3 (alone) at lr=0.003, "
                         "0.1 (alone) at lr=0.01: moves −1.0 decades across lr 0.001–0.01 (the "
                         "ranges allow −1.0 to −1.0)")
    assert lines[-3].startswith("  decoupled: best λ (range) 0.3 (alone) at lr=0.001, ")
    assert lines[-3].endswith("moves +0.0 decades across lr 0.001–0.01 (the ranges allow "
                              "+0.0 to +0.0)")
    assert lines[-1] == ("* the shift of the best λ differs between arms: decoupled +0.0 (+0.0 "
                         "to +0.0); l2 −1.0 (−1.0 to −1.0) decades; the bounds of decoupled "
                         "and l2 are apart")
    assert cd.headline(runs) == lines[-1][2:]  # the parent's description answers the question
    # presets are labelled by name beside the number, never cut to "regularization=decoup…"
    assert [c.label for c in conds[:2]] == ["decoupled, lr=0.001", "decoupled, lr=0.003"]


def test_the_arm_is_found_whichever_key_the_sweep_names_first():
    runs = lr_sweep()
    for r in runs:  # optimizer.lr before regularization
        r.swept = {k: r.swept[k] for k in ("regularization.lam", "optimizer.lr",
                                           "regularization.mode", "regularization")}
    keys, conds = cd.split(runs)
    assert keys == ["optimizer.lr", "regularization"]
    fac = cd.factorial(keys, conds)
    assert (fac.arm_key, fac.num_key) == ("regularization", "optimizer.lr")
    assert [c.label for c in fac.ordered] == [
        f"lr={lr}, {arm}" for arm in ("decoupled", "l2") for lr in ("0.001", "0.003", "0.01")]
    assert fac.shift("l2").decades == pytest.approx(-1.0)


def test_the_shift_is_only_as_sure_as_the_ranges_and_lambda_zero_has_no_log():
    clear, text = cd.shifts_differ([cd.Shift("a", [], -1.0, -1.5, -0.5),
                                    cd.Shift("c", [], -0.5, -1.0, 0.0)])
    assert not clear and "does not differ distinguishably" in text
    assert "a −1.0 (−1.5 to −0.5); c −0.5 (−1.0 to +0.0) decades" in text
    # best λ = 0 at the first lr: the move has no size in decades, its bounds are unbounded
    runs = lr_sweep({"l2": {"0.001": 1e-9, "0.01": 0.1}, "decoupled": {"0.001": 0.3,
                                                                      "0.01": 0.3}})
    fac = cd.factorial(*cd.split(runs))
    l2 = fac.shift("l2")
    assert l2.points[0][1] == 0.0 and math.isnan(l2.decades) and l2.hi == math.inf
    line = cd.shift_line(fac, l2)
    assert "moves an unbounded number of decades across lr 0.001–0.01 (best λ = 0 at " \
           "lr=0.001, which has no log; the ranges allow " in line
    runs = lr_sweep({"l2": {"0.001": 1e-9, "0.01": 1e-9}, "decoupled": {"0.001": 0.3,
                                                                      "0.01": 0.3}})
    fac = cd.factorial(*cd.split(runs))
    assert "l2: best λ (range) 0 (" in cd.shift_line(fac, fac.shift("l2"))
    assert ": λ = 0 at both ends, no move to measure in decades (the ranges allow " in \
        cd.shift_line(fac, fac.shift("l2"))


def test_shifts_whose_bounds_touch_are_not_apart():
    touching = [cd.Shift("a", [], -1.0, -1.5, -0.5), cd.Shift("b", [], 0.0, -0.5, 0.5)]
    assert not cd.shifts_differ(touching)[0]
    apart = [cd.Shift("a", [], -1.0, -1.5, -0.6), cd.Shift("b", [], 0.0, -0.5, 0.5)]
    assert cd.shifts_differ(apart)[0]


@pytest.mark.parametrize("runs", [size_sweep, preset_sweep], ids=["number", "preset"])
def test_one_condition_key_is_not_a_factorial(runs):
    keys, conds = cd.split(runs())
    assert cd.factorial(keys, conds) is None
    assert "Best λ against" not in format_table(summarize(runs()), runs())


def test_two_numeric_keys_are_not_a_factorial_of_arms():
    runs = [record(lam, s, 0.5 + lam + 0.01 * s, {"optimizer.lr": lr, "data.train_size": n})
            for lam in (0.0, 0.1) for s in (0, 1) for lr in ("0.01", "0.1")
            for n in ("100", "200")]
    assert cd.factorial(*cd.split(runs)) is None


# --------------------------------------------------------------------------- figures


def test_the_factorial_report_draws_a_heatmap_per_arm_on_one_scale(tmp_path):
    runs = lr_sweep()
    paths = write_report(runs, tmp_path)
    assert {"heatmap", "best_lambda", "learning_curves", "weight_norms"} <= set(paths)
    fac = cd.factorial(*cd.split(runs))
    fig = figures.plot_arm_heatmaps(fac, tmp_path / "h.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["decoupled", "l2"]
    norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in panels}
    assert len(norms) == 1  # one colour scale
    grids = [cd.heatmap_grid(fac.summary(arm), fac.num_key)[2] for arm in fac.arms]
    assert norms.pop() == pytest.approx(figures.heat_limits(grids))
    for ax, grid in zip(panels, grids, strict=True):
        boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(boxes) == 3  # each lr's best λ
        np.testing.assert_allclose(ax.images[0].get_array(), grid)
    assert len(fig.axes) == 3  # and one colour bar
    assert "worse" in fig.axes[-1].get_ylabel()  # λ = 0's column is beyond the scale
    page = paths["report"].read_text()
    assert 'id="factorial"' in page and "the shift of the best λ differs between arms" in page
    assert "one heatmap per arm" in page


def test_best_lambda_against_the_number_has_one_line_per_arm(tmp_path):
    fac = cd.factorial(*cd.split(lr_sweep()))
    fig = figures.plot_arm_best_lambda(fac, tmp_path / "b.png")
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert sorted(lines) == ["decoupled", "l2"]
    assert list(lines["l2"].get_ydata()) == [1.0, 0.3, 0.1]
    assert list(lines["decoupled"].get_ydata()) == [0.3, 0.3, 0.3]
    x_l2, x_dec = lines["l2"].get_xdata(), lines["decoupled"].get_xdata()
    assert np.all(x_l2 != x_dec)  # set a little apart, so that their bars do not hide
    np.testing.assert_allclose(np.sqrt(x_l2 * x_dec), [0.001, 0.003, 0.01])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["decoupled", "l2"]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "symlog"


def test_learning_curves_are_a_row_of_panels_per_arm_with_one_legend(tmp_path):
    fac = cd.factorial(*cd.split(lr_sweep()))
    fig = figures.plot_arm_histories(fac, tmp_path / "c.png", weights=False)
    assert [ax.get_title() for ax in fig.axes] == [
        f"{arm}, lr={lr}" for arm in ("decoupled", "l2") for lr in ("0.001", "0.003", "0.01")]
    assert all(len(ax.get_lines()) == 2 * len(LAMS) for ax in fig.axes)  # val and train per λ
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "λ=0", "λ=0.03", "λ=0.1", "λ=0.3", "λ=1", "val", "train"]
    # one colour per λ, the same in every panel
    colours = [[ln.get_color() for ln in ax.get_lines()] for ax in fig.axes]
    assert all(c == colours[0] for c in colours)
    assert len(set(colours[0])) == len(LAMS)


def test_the_heatmap_scale_is_set_by_the_cells_near_each_rows_best(tmp_path):
    # the λ = 0 column is far worse (2.0): the scale ends at the worst neighbour of a best (0.6)
    grid = np.array([[2.0, 0.6, 0.4, 0.5, 0.9], [2.1, 0.5, 0.35, 0.45, 0.8]])
    assert figures.heat_limits([grid]) == (0.35, 0.6)
    # two rows with the same best λ keep two boxes that do not touch
    val = {"0.01": {0.0: 2.0, 0.01: 0.6, 0.1: 0.40, 1.0: 0.55},
           "0.1": {0.0: 2.1, 0.01: 0.5, 0.1: 0.35, 1.0: 0.45}}
    runs = [record(lam, s, v + 0.01 * s, {"optimizer.lr": lr})
            for lr, row in val.items() for lam, v in row.items() for s in (0, 1)]
    fig = figures.plot_heatmap(summarize(runs), "optimizer.lr", tmp_path / "h.png")
    ax = fig.axes[0]
    image: AxesImage = ax.images[0]
    assert image.norm.vmax == pytest.approx(0.605)  # λ = 0.01 beside the best, not λ = 0's 2
    boxes = sorted((p for p in ax.patches if isinstance(p, Rectangle)), key=lambda p: p.get_y())
    assert [round(p.get_x() + p.get_width() / 2, 6) for p in boxes] == [2.0, 2.0]
    assert boxes[0].get_y() + boxes[0].get_height() < boxes[1].get_y()  # a gap between them


def test_no_legend_covers_a_title(tmp_path):
    """Drawn, the figure legend's box overlaps neither the suptitle nor any panel title."""
    fac = cd.factorial(*cd.split(lr_sweep()))
    for fig in (figures.plot_arm_histories(fac, tmp_path / "c.png", weights=False),
                figures.plot_condition_histories(cd.split(size_sweep())[1], tmp_path / "d.png",
                                                 weights=False)):
        renderer = fig.canvas.get_renderer()
        legend = fig.legends[0].get_window_extent(renderer)
        titles = [fig._suptitle, *(ax.title for ax in fig.axes)]
        for title in titles:
            if title is not None and title.get_text():
                assert not legend.overlaps(title.get_window_extent(renderer)), title.get_text()


def test_the_ce_panels_clip_epoch_zero_and_a_far_underfitting_lambda(tmp_path):
    # λ = 3 stays at 2.3 and epoch 0 starts at 2.3; the others fall to 0.3-0.5
    hist = {0.0: [2.3, 0.6, 0.5, 0.5], 0.1: [2.3, 0.5, 0.4, 0.38], 0.3: [2.3, 0.55, 0.45, 0.4],
            1.0: [2.3, 0.7, 0.6, 0.55], 3.0: [2.3, 2.3, 2.3, 2.3]}
    runs = [record(lam, s, h[-1] + 0.01 * s, hist=[v + 0.01 * s for v in h])
            for lam, h in hist.items() for s in (0, 1)]
    _, cells = cd.cells_of(runs)
    fig = figures.plot_curves(cells, tmp_path / "c.png", weights=False)
    train, val = fig.axes[:2]
    top = val.get_ylim()[1]
    assert top < 1.0  # not 2.3: the curves that matter fill the panel
    (note,) = val.texts
    assert note.get_text() == "y cut at the upper fence of epochs ≥ 1; above: λ=3"
    later = np.array([v + 0.005 for lam, h in hist.items() for v in h[1:]])  # the seeds' means
    q1, q3 = np.quantile(later, [0.25, 0.75])
    assert top > q3 + figures.FENCE * (q3 - q1) > 0.705  # every λ but 3 in full after epoch 0
    # a panel with nothing far off keeps its whole range
    calm = [r for r in runs if r.lam in (0.1, 0.3)]
    for r in calm:
        r.history = {k: v[1:] for k, v in r.history.items()}
    fig = figures.plot_curves(cd.cells_of(calm)[1], tmp_path / "d.png", weights=False)
    assert not fig.axes[1].texts


def with_layers(run: RunRecord, layers: dict[str, float]) -> RunRecord:
    """``run`` with per-layer ‖W‖² histories (3 epochs) and their total."""
    for name, v in layers.items():
        run.history[mt.WEIGHT_NORM_LAYER + name] = [(e, v * (1 + e)) for e in range(3)]
    run.history[mt.WEIGHT_NORM_TOTAL] = [(e, sum(layers.values()) * (1 + e)) for e in range(3)]
    return run


def test_weight_norms_sum_the_same_layers_for_every_condition(tmp_path):
    """At λ = 0 the two presets are one training: each logged its own selection (l2 every layer,
    l2_dense fc2 alone), so each run's total differs, but the sum over the layers both logged
    (fc2) draws one curve."""
    runs = []
    for r in preset_sweep():
        layers = {"fc1": 400.0, "fc2": 250.0} if r.swept["regularization"] == "l2" else \
            {"fc2": 250.0}
        runs.append(with_layers(r, layers))
    assert figures.norm_layers(runs) == ["fc2"]
    keys, conds = cd.split(runs)
    fig = figures.plot_condition_histories(conds, tmp_path / "w.png", weights=True)
    zero = [ax.get_lines()[0] for ax in fig.axes]  # λ = 0, the first cell of each condition
    np.testing.assert_allclose(zero[0].get_ydata(), zero[1].get_ydata())
    np.testing.assert_allclose(zero[0].get_ydata(), [250.0, 500.0, 750.0])
    assert "fc2" in fig.axes[0].get_ylabel()
    page = write_report(runs, tmp_path / "r")["report"].read_text()
    assert "Σ‖W‖²_F over fc2 (the layers every run logged" in page
    # runs read without per-layer histories: each run's own total, and the caption says so
    plain = preset_sweep()
    assert figures.norm_layers(plain) == []
    assert "each run&#x27;s own selected layers" in write_report(
        plain, tmp_path / "p")["report"].read_text()


def test_the_condition_caption_names_the_violet_band(tmp_path):
    page = write_report(size_sweep(), tmp_path)["report"].read_text()
    assert "violet band: the λ not distinguishable" in page and "grey" not in page

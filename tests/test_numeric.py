"""l2lab.report.numeric: the metric against a numeric condition (width, train size), its
interpolation threshold, peaks and the best-λ envelope's monotonicity, on synthetic runs whose
answers are known (no training); and the hook into the printed table and the HTML report."""

from __future__ import annotations

import pytest

from l2lab.report import conditions as cd
from l2lab.report import numeric as nm
from l2lab.report.html import write_report
from l2lab.report.stats import RunRecord, number_of, summarize, value_sort_key
from l2lab.report.table import format_table

PNG = b"\x89PNG\r\n\x1a\n"
WIDTHS = (2, 4, 8, 16, 32, 64)
#: Test error per λ over WIDTHS: λ = 0 peaks at 16 (0.55, 0.10 above the dip at 8); λ = 0.1
#: falls throughout, and is best from width 8 on (test/ce follows the error).
TEST_ERR = {0.0: (0.60, 0.50, 0.45, 0.55, 0.50, 0.46), 0.1: (0.62, 0.52, 0.44, 0.42, 0.40, 0.39)}
#: Train error (eval mode) per λ: λ = 0 reaches ≤ 0.01 first at width 16.
TRAIN_ERR = {0.0: (0.50, 0.30, 0.10, 0.005, 0.0, 0.0), 0.1: (0.55, 0.35, 0.20, 0.1, 0.1, 0.1)}


def record(lam: float, seed: int, width: int, err: float, train_err: float,
           extra: dict[str, str] | None = None) -> RunRecord:
    """A finished run of the double-descent preset's kind: no validation split (test/ce chooses
    the best λ), width swept as ``model.hidden=[h,h]``."""
    return RunRecord(
        run_id=f"r{lam}-{seed}-{width}-{extra}", name=f"lam={lam:g} seed={seed}",
        status="FINISHED", swept={"regularization.lam": f"{lam:g}",
                                  "model.hidden": f"[{width},{width}]", **(extra or {})},
        lam=lam, seed=seed,
        final={"train/ce": 0.1, "test/ce": err + 0.5, "test/acc": 1 - err,
               "train_eval/acc": 1 - train_err, "train/acc": 0.5},
        history={"train/ce": [(0, 1.0), (1, 0.1)]})


def width_sweep(seeds: int = 3, lams=(0.0, 0.1), extra: dict[str, str] | None = None,
                ) -> list[RunRecord]:
    """λ × width × seed; seed s shifts every error by 0.01·(s − 1) (paired, mean unchanged)."""
    return [record(lam, s, w, TEST_ERR[lam][i] + 0.01 * (s - 1) * (seeds > 1),
                   TRAIN_ERR[lam][i], extra)
            for lam in lams for i, w in enumerate(WIDTHS) for s in range(seeds)]


def the_view(runs: list[RunRecord]) -> nm.NumericView:
    view = nm.view(*cd.split(runs))
    assert view is not None
    return view


def test_a_width_list_reads_as_its_width_and_orders_numerically():
    assert number_of("[47,47]") == 47.0 and number_of("[47, 47]") == 47.0
    assert number_of("[10,30]") == 40.0  # unequal layers: their total width
    assert number_of("500") == 500.0 and number_of("l2_dense") is None
    assert number_of("[a,b]") is None and number_of("[]") is None
    assert sorted(["[10,10]", "[2,2]", "[300,300]"], key=value_sort_key) == [
        "[2,2]", "[10,10]", "[300,300]"]
    keys, conds = cd.split(width_sweep())
    assert [c.values["model.hidden"] for c in conds] == [f"[{w},{w}]" for w in WIDTHS]


def test_the_curves_envelope_and_threshold_hold_the_known_numbers():
    view = the_view(width_sweep())
    assert (view.key, view.width, view.name) == ("model.hidden", True, "width")
    assert (view.error_name, view.ce_metric) == ("test error", "test/ce")
    assert view.train_name == "eval-mode train error"
    (facet,) = view.facets
    assert facet.xs == [float(w) for w in WIDTHS]
    assert [round(p.error[0], 6) for p in facet.lines[0.0]] == list(TEST_ERR[0.0])
    # each width's best λ (lowest test/ce): λ = 0 at 2 and 4, λ = 0.1 from 8 on
    assert [p.lam for p in facet.envelope] == [0.0, 0.0, 0.1, 0.1, 0.1, 0.1]
    assert [round(p.error[0], 6) for p in facet.envelope] == [0.60, 0.50, 0.44, 0.42, 0.40, 0.39]
    # the interval over 3 seeds: ± t(0.975, 2)·0.01/√3 = ± 0.02484
    lo, hi = facet.envelope[0].error[1:]
    assert lo == pytest.approx(0.60 - 0.024841, abs=1e-5)
    assert hi == pytest.approx(0.60 + 0.024841, abs=1e-5)
    assert facet.threshold == 16.0 and facet.threshold_train == pytest.approx(0.005)


def test_the_peak_is_the_local_maximum_rising_most_over_its_dip_not_the_highest_point():
    view = the_view(width_sweep())
    (facet,) = view.facets
    found = nm.peak(facet.zero)
    assert (found.x, found.dip_x) == (16.0, 8.0)
    assert found.height == pytest.approx(0.55) and found.rise == pytest.approx(0.10)
    assert nm.peak(facet.envelope) is None  # the envelope falls throughout
    # a wobble at small widths (0.61 after 0.60) rises less than the real peak: not chosen
    pts = [nm.Point(x, 0.0, 1, (e, e, e), (0, 0, 0), (0, 0, 0))
           for x, e in zip((1, 2, 3, 4, 5, 6, 7), (0.70, 0.60, 0.61, 0.50, 0.45, 0.54, 0.48),
                           strict=True)]
    assert nm.peak(pts).x == 6 and nm.peak(pts).rise == pytest.approx(0.09)


def test_the_verdict_lines_state_threshold_peaks_and_monotone_envelope():
    lines = nm.verdict_lines(the_view(width_sweep()))
    assert lines == [
        "Test error against width (model.hidden, [h, h] read as h), one line per λ; envelope: "
        "each width's best λ (chosen on test/ce):",
        "  interpolation threshold: width 16 (the smallest width whose mean eval-mode train "
        "error at λ=0 is ≤ 0.01: 0.005)",
        "  λ=0: peak at width 16: test error 0.550, 0.100 above the dip at width 8 (0.450)",
        "  best λ per width: no peak: the mean test error has no interior local maximum over "
        "width",
        "  the best-λ envelope is monotone (non-increasing; no larger width's 95% interval over "
        "seeds lies wholly above a smaller width's)"]


def test_an_envelope_with_a_clear_rise_is_not_monotone_and_names_it():
    """λ = 0 alone: the envelope is the λ = 0 curve; 0.45 [0.425, 0.475] at width 8 and
    0.55 [0.525, 0.575] at 16 do not overlap: a rise. 0.50 at 4 against 0.55 at 16 touch
    (0.525 = 0.525): within the intervals."""
    m = nm.monotone(the_view(width_sweep(lams=(0.0,))).facets[0].envelope)
    assert not m.monotone and m.on_intervals
    assert (m.rise[0].x, m.rise[1].x) == (8.0, 16.0)
    line = nm.verdict_lines(the_view(width_sweep(lams=(0.0,))))[-1]
    assert line == ("  the best-λ envelope is not monotone: test error 0.550 [0.525, 0.575] at "
                    "width 16 (λ=0) above 0.450 [0.425, 0.475] at width 8 (λ=0) (no larger "
                    "width's 95% interval over seeds lies wholly above a smaller width's)")


def test_one_seed_decides_on_the_means_and_says_so():
    view = the_view(width_sweep(seeds=1, lams=(0.0,)))
    m = nm.monotone(view.facets[0].envelope)
    assert not m.monotone and not m.on_intervals
    assert nm.verdict_lines(view)[-1].endswith("(decided on the means: one seed, no interval)")
    # within the intervals a small rise is allowed, and the line gives its size
    pts = [nm.Point(x, 0.1, 3, (e, e - 0.03, e + 0.03), (0, 0, 0), (0, 0, 0))
           for x, e in ((1, 0.5), (2, 0.45), (3, 0.46))]
    m = nm.monotone(pts)
    assert m.monotone and (m.rise[0].x, m.rise[1].x) == (2, 3)
    assert ", the largest rise of the means, 0.450 at width 2 to 0.460 at width 3, is within" \
        in nm.monotone_text(the_view(width_sweep()), m).replace(";", ",")


def test_an_arm_beside_the_width_gets_a_facet_each_and_a_threshold_each():
    runs = width_sweep(extra={"data.label_noise": "0.15"}) + [
        record(lam, s, w, 0.3, 0.2, {"data.label_noise": "0"})  # flat, never fits its labels
        for lam in (0.0, 0.1) for w in WIDTHS for s in range(3)]
    view = the_view(runs)
    assert view.key == "model.hidden"  # 6 widths beat 2 noise levels for the axis
    assert [f.label for f in view.facets] == ["label_noise=0", "label_noise=0.15"]
    lines = nm.verdict_lines(view)
    assert ("  label_noise=0: interpolation threshold: not reached (the smallest width whose "
            "mean eval-mode train error at λ=0 is ≤ 0.01; the lowest is 0.200)") in lines
    assert ("  label_noise=0.15: λ=0: peak at width 16: test error 0.550, 0.100 above the dip "
            "at width 8 (0.450)") in lines


def test_two_values_or_names_make_no_numeric_view():
    runs = [r for r in width_sweep() if r.swept["model.hidden"] in ("[2,2]", "[4,4]")]
    assert nm.view(*cd.split(runs)) is None
    named = [RunRecord(**{**r.__dict__, "swept": {**r.swept, "model.hidden": f"w{r.seed}"}})
             for r in width_sweep()]
    assert nm.view(*cd.split(named)) is None
    # a number that is no size (lr) keeps the figures it had: no threshold to speak of
    lr = [RunRecord(**{**r.__dict__, "swept": {"regularization.lam": r.swept[
        "regularization.lam"], "optimizer.lr": r.swept["model.hidden"].split(",")[0][1:]}})
          for r in width_sweep()]
    assert len(cd.split(lr)[1]) == len(WIDTHS) and nm.view(*cd.split(lr)) is None


def test_the_table_and_the_report_carry_the_verdict_and_the_figure(tmp_path):
    runs = width_sweep()
    text = format_table(summarize(runs), runs)
    assert "\nTest error against width (model.hidden, [h, h] read as h)" in text
    assert "  λ=0: peak at width 16: test error 0.550" in text
    paths = write_report(runs, tmp_path)
    assert paths["condition_curve"].read_bytes().startswith(PNG)
    page = paths["report"].read_text()
    assert 'id="numeric-verdict"' in page and "peak at width 16: test error 0.550" in page
    assert 'id="condition_curve"' in page

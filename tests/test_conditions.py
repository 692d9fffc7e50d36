"""l2lab.report.conditions and the intervals of l2lab.report.stats, on synthetic runs whose
answers are known (no training), and one small real sweep over λ × train size read back by the
sweep's own summary and by ``compare --by``."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, run_cli

from l2lab.report import conditions as cd
from l2lab.report.html import write_report
from l2lab.report.stats import RunRecord, interval, summarize
from l2lab.report.table import format_table

PNG = b"\x89PNG\r\n\x1a\n"


def record(lam: float, seed: int, val: float, group: dict[str, str] | None = None, *,
           hist: list[float] | None = None) -> RunRecord:
    """A finished run with final val/ce ``val``; its val/ce history is ``hist`` (default: a
    U-curve whose lowest point is before the last epoch, so training was long enough)."""
    hist = hist if hist is not None else [val + 0.3, val - 0.01, val]
    return RunRecord(
        run_id=f"r{lam}-{seed}-{sorted((group or {}).items())}", name=f"lam={lam:g} seed={seed}",
        status="FINISHED", swept={"regularization.lam": f"{lam:g}", **(group or {})}, lam=lam,
        seed=seed, final={"train/ce": val / 2, "val/ce": val, "gap/ce": val / 2, "val/acc": 0.9},
        history={"val/ce": list(enumerate(hist)), "train/ce": list(enumerate(hist))})


#: The best λ of each training-set size (the U-curve's bottom), and each size's level.
BEST = {"100": 0.3, "200": 0.3, "500": 0.03}
LEVEL = {"100": 0.9, "200": 0.8, "500": 0.5}
LAMS = (0.0, 0.03, 0.1, 0.3, 1.0)


def size_sweep(seeds: int = 3) -> list[RunRecord]:
    """λ × train size × seed: val/ce = level + 0.1·(log10 λ − log10 best)² + a seed offset
    shared by every cell (paired seeds), so each size's best λ is known."""
    runs = []
    for n, best in BEST.items():
        for lam in LAMS:
            for s in range(seeds):
                bowl = 0.1 * (math.log10(max(lam, 1e-3)) - math.log10(best)) ** 2
                runs.append(record(lam, s, LEVEL[n] + bowl + 0.01 * s + 0.0003 * (s * s % 3),
                                   {"data.train_size": n}))
    return runs


PRESET = {"regularization.min_params": {"l2": "0", "l2_dense": "1000"},
          "regularization.name": {"l2": "l2", "l2_dense": "l2_dense"},
          "regularization.types": {"l2": '["Linear","Conv1d","Conv2d"]',
                                    "l2_dense": '["Linear"]'}}


def preset_sweep() -> list[RunRecord]:
    """regularization=l2,l2_dense × λ × 2 seeds. At λ = 0 both are the same training (identical
    histories); l2 is best at 0.03, l2_dense at 0.3 and lower there."""
    val = {("l2", 0.0): 0.60, ("l2", 0.03): 0.50, ("l2", 0.1): 0.55, ("l2", 0.3): 0.80,
           ("l2_dense", 0.0): 0.60, ("l2_dense", 0.03): 0.58, ("l2_dense", 0.1): 0.52,
           ("l2_dense", 0.3): 0.45}
    runs = []
    for (preset, lam), v in val.items():
        group = {"regularization": preset, **{k: m[preset] for k, m in PRESET.items()}}
        for s in (0, 1):
            runs.append(record(lam, s, v + 0.02 * s + 0.001 * s * (lam > 0.1), group))
    return runs


# --------------------------------------------------------------------------- conditions


def test_each_train_size_gets_its_own_best_lambda_the_argmin_of_its_mean():
    runs = size_sweep()
    keys, conds = cd.split(runs)
    assert keys == ["data.train_size"]
    assert [c.values["data.train_size"] for c in conds] == ["100", "200", "500"]
    assert [c.best_lam for c in conds] == [0.3, 0.3, 0.03]
    for c in conds:  # the argmin of the condition's mean final val/ce, recomputed by hand
        means = pd.DataFrame([(r.lam, r.final["val/ce"]) for r in c.runs]).groupby(0)[1].mean()
        assert c.best_lam == means.idxmin()
        assert c.verdict.clear and c.tie_lams == [c.best_lam]
    text = format_table(summarize(runs), runs)
    lines = text.splitlines()
    per = [ln for ln in lines if ln[:1] in "*~" and "best λ=" in ln]
    assert [ln.split(":")[0] for ln in per] == ["* train_size=100", "* train_size=200",
                                                "* train_size=500"]
    assert "best λ=0.3 " in per[0] and "best λ=0.03 " in per[2]
    # one best row marked per condition in the table itself
    assert sum(ln.startswith("*") for ln in lines[:17]) == 3
    # the cross-condition verdict ends the conditions' lines: the largest set at its own λ,
    # clear; then the train size as a number: the error against it (l2lab.report.numeric)
    end = lines.index("Val error against train_size (data.train_size), one line per λ; "
                      "envelope: each train_size's best λ (chosen on val/ce):")
    assert lines[end - 2].startswith("* lowest mean val/ce across conditions: train_size=500 at "
                                     "λ=0.03: clear")
    assert lines[end + 1] == ("  interpolation threshold: n/a (no run logged a train accuracy)")
    assert "train_size=200 at λ=0.3 (val/ce 0.8" in text and "higher by 0.3" in text


def test_the_headline_names_each_conditions_best_lambda():
    assert cd.headline(size_sweep()) == (
        "train_size=100: λ=0.3; train_size=200: λ=0.3; train_size=500: λ=0.03 (each "
        "condition's own best). lowest mean val/ce across conditions: train_size=500 at "
        "λ=0.03: clear against each other condition at its own best λ")
    runs = [record(lam, s, 0.5 + abs(lam - 0.1) + 0.01 * s) for lam in (0.0, 0.1, 1.0)
            for s in (0, 1, 2)]
    assert cd.headline(runs).startswith("lam=0.1: clear (p = ")  # today's verdict


def test_a_preset_is_labelled_by_its_name_and_lambda_zero_is_not_a_rival(tmp_path):
    runs = preset_sweep()
    summary = summarize(runs)
    assert list(summary.columns[:2]) == ["lam", "regularization"]
    assert not any(k in c for c in summary.columns for k in ("min_params", "name", "types"))
    keys, conds = cd.split(runs)
    assert keys == ["regularization"]
    assert [(c.label, c.best_lam) for c in conds] == [("regularization=l2", 0.03),
                                                      ("regularization=l2_dense", 0.3)]
    acr = cd.across(conds)
    assert acr.lowest == 1 and len(acr.rivals) == 1
    rival = acr.rivals[0]
    assert not rival.same and rival.seeds == 2 and rival.diff == pytest.approx(0.05, abs=0.002)
    assert acr.same_pairs == [("regularization=l2", "regularization=l2_dense", 0.0)]
    text = format_table(summary, runs)
    assert "min_params" not in text and "types" not in text
    assert "regularization=l2 and regularization=l2_dense at λ=0 are the same training" in text
    assert "regularization=l2 at λ=0.03 (val/ce 0.5" in text
    assert "regularization=l2 at λ=0.03 (val/ce 0.5100): higher by 0.0495, clear (p = " in text
    assert text.splitlines()[-1] == (
        "* lowest mean val/ce across conditions: regularization=l2_dense at λ=0.3: clear "
        "against each other condition at its own best λ")
    # the λ = 0 cells are the same training: by label, and by data (identical histories)
    zero = [next(c for c in cond.cells if c.lam == 0) for cond in conds]
    assert cd.same_training(zero[0], conds[0].values, zero[1], conds[1].values)
    assert cd.same_training(zero[0], {"x": "a"}, zero[1], {"x": "b"})  # histories alone
    assert not cd.same_training(conds[0].cells[1], conds[0].values, conds[1].cells[1],
                                conds[1].values)

    paths = write_report(runs, tmp_path)
    page = paths["report"].read_text()
    assert 'id="best-lambda"' in page and page.count('class="condition"') == 2
    assert "min_params" not in page and "Conv1d" not in page
    assert "same training under two labels" in page


LAYERS = ("fc1", "fc2", "out")


def zero_lambda_pair(a: dict, b: dict, *, a_layers=LAYERS, b_layers=LAYERS, a_per=None,
                     b_per=None, lam: float = 0.0) -> bool:
    """Whether two cells at ``lam`` labelled ``a`` and ``b`` are called one training. Their
    histories differ (as two real trainings', or one training's on a GPU), so only the label
    rule can call them one."""
    cells = []
    for values, layers, per, base in ((a, a_layers, a_per, 0.5), (b, b_layers, b_per, 0.6)):
        runs = [replace(record(lam, s, base + 0.01 * s, values), layers=layers,
                        lam_per_layer=per or {}) for s in (0, 1)]
        cells.append(cd.cells_of(runs)[1][0])
    return cd.same_training(cells[0], a, cells[1], b)


def test_lam_per_layer_at_lambda_zero_is_another_training():
    fc1 = "regularization.lam_per_layer.fc1"
    # the sweep: lam=0 with fc1=0.3 penalises fc1; with fc1=0 nothing is penalised
    assert not zero_lambda_pair({fc1: "0"}, {fc1: "0.3"}, a_per={"fc1": 0.0},
                                b_per={"fc1": 0.3})
    # a non-zero pattern that matches no selected layer penalises nothing
    assert zero_lambda_pair({fc1: "0"}, {fc1: "0.3"}, a_per={"fc1": 0.0}, b_per={"fc1": 0.3},
                            a_layers=("fc2",), b_layers=("fc2",))
    # not logged (no l2.layers): a non-zero value is taken to penalise
    assert not zero_lambda_pair({fc1: "0"}, {fc1: "0.3"}, a_per={"fc1": 0.0},
                                b_per={"fc1": 0.3}, a_layers=None, b_layers=None)
    # the sweep read back: fc1=0.3 at λ=0 is a rival, not a note
    runs = [replace(record(lam, s, 0.5 + 0.05 * (v == "0.3") - 0.1 * lam + 0.01 * s,
                           {fc1: v}), layers=LAYERS, lam_per_layer={"fc1": float(v)})
            for lam in (0.0, 1.0) for v in ("0", "0.3") for s in (0, 1, 2)]
    _, conds = cd.split(runs)
    acr = cd.across(conds)
    assert acr.same_pairs == [] and [r.same for r in acr.rivals] == [False]
    assert "same training" not in format_table(summarize(runs), runs)


def test_two_selections_at_lambda_zero_are_one_training():
    l2, dense = {"regularization": "l2"}, {"regularization": "l2_dense"}
    assert zero_lambda_pair(l2, dense, b_layers=("fc2",))
    assert not zero_lambda_pair(l2, dense, b_layers=("fc2",), lam=0.1)
    # λ = 0 everywhere, with lam_per_layer zero too: still no penalty
    assert zero_lambda_pair(l2, dense, a_per={"fc*": 0.0}, b_layers=("fc2",))
    # a key outside the penalty differs: two trainings, whatever λ
    assert not zero_lambda_pair({"optimizer.lr": "0.1"}, {"optimizer.lr": "0.01"})


def test_mode_at_lambda_zero_is_one_training():
    # mode=optimizer at λ = 0 decays by exactly 0 (p·0 added, or p·(1 − lr·0)): as the loss mode
    loss, opt = {"regularization.mode": "loss"}, {"regularization.mode": "optimizer"}
    assert zero_lambda_pair(loss, opt)
    assert not zero_lambda_pair(loss, opt, lam=1e-3)
    assert not zero_lambda_pair(loss, opt, a_per={"fc1": 0.3})


def test_when_both_best_lambdas_are_zero_the_conditions_are_not_compared():
    runs = [r for r in preset_sweep() if r.lam == 0]
    _, conds = cd.split(runs)
    acr = cd.across(conds)
    assert [r.same for r in acr.rivals] == [True]
    last = cd.across_verdict(conds, acr)
    assert "no rival (the others' best is the same training" in last
    text = format_table(summarize(runs), runs)
    assert "p = 1" not in text and "no comparison to adjust" in text
    assert not text.splitlines()[-1].startswith(("*", "~"))  # nothing compared: no mark


def test_the_range_holds_the_lambdas_not_distinguishable_from_the_best():
    # λ = 0.1 and 0.3 differ by noise (+0.01, −0.012, +0.004 per seed); λ = 1 is 0.2 worse
    vals = {0.1: [0.50, 0.52, 0.51], 0.3: [0.51, 0.508, 0.514], 1.0: [0.70, 0.72, 0.71]}
    runs = [record(lam, s, v) for lam, vs in vals.items() for s, v in enumerate(vs)]
    (cond,) = cd.split(runs)[1]
    assert cond.best_lam == 0.1 and cond.tie_lams == [0.1, 0.3]
    assert not cond.verdict.clear
    assert "range 0.1–0.3: 0.1, 0.3 not distinguishable" in cd.range_text(cond)


def test_compare_by_regroups_and_pools_the_rest():
    runs = [record(lam, s, 0.5 + lam * (1 if lr == "0.1" else 2) + 0.01 * s,
                   {"data.train_size": n, "optimizer.lr": lr})
            for lam in (0.0, 0.1, 1.0) for n in ("100", "200") for lr in ("0.1", "0.01")
            for s in (0, 1)]
    by_lr, pooled = cd.regroup(runs, ["optimizer.lr"])
    assert pooled == ["data.train_size"]
    keys, conds = cd.split(by_lr)
    assert keys == ["optimizer.lr"] and len(conds) == 2
    assert all(len(c.cells[0].runs) == 4 for c in conds)  # 2 sizes × 2 seeds pooled per λ
    # a key that does not vary takes its value from the run's params
    fixed, _ = cd.regroup(runs[:2], ["trainer.max_epochs"], [{"trainer.max_epochs": "7"}] * 2)
    assert fixed[0].swept == {"regularization.lam": "0", "trainer.max_epochs": "7"}


def test_a_sweep_over_lambda_and_seed_only_keeps_its_output():
    runs = [record(lam, s, 0.5 + abs(lam - 0.1) + 0.01 * s) for lam in (0.0, 0.1, 1.0)
            for s in (0, 1, 2)]
    text = format_table(summarize(runs), runs)
    assert "Per condition" not in text and "across conditions" not in text
    assert text.splitlines()[-1].startswith("* lowest mean val/ce: lam=0.1: clear")


# --------------------------------------------------------------------------- warnings


def test_too_short_when_most_runs_are_best_at_their_last_epoch():
    # both λ still falling and not distinguishable (noise of ±0.01 per seed): 4 of 4 runs
    falling = [record(lam, s, v, hist=[0.9, 0.7, v]) for lam, vs in
               ((0.0, (0.50, 0.52)), (0.1, (0.51, 0.505))) for s, v in enumerate(vs)]
    (cond,) = cd.split(falling)[1]
    assert cond.tie_lams == [0.0, 0.1] and cond.too_short == (4, 4, 3)
    text = format_table(summarize(falling), falling)
    assert ("training may be too short: 4 of 4 runs of the best λ and its range reach their "
            "lowest val/ce at the last epoch (val/ce still falling); try "
            "trainer.max_epochs=6") in text
    # two of four still falling, and they are the worse λ: no warning
    mixed = [record(0.0, s, 0.5) for s in (0, 1)] + falling[2:]
    assert cd.split(mixed)[1][0].too_short is None


def test_too_short_sees_the_best_lambda_not_the_early_peaking_others():
    """The issue's MNIST-1D case: the best λ's runs peak at the last epoch, three other λ
    (λ = 0 among them) peak early and would outvote them if every run counted."""
    runs = [record(1.0, s, 0.3 + 0.01 * s, hist=[0.9, 0.6, 0.3 + 0.01 * s]) for s in range(3)]
    runs += [record(lam, s, 0.6 + lam + 0.01 * s) for lam in (0.0, 0.01, 0.1) for s in range(3)]
    (cond,) = cd.split(runs)[1]
    assert cond.best_lam == 1.0 and cond.verdict.clear
    assert cond.too_short == (3, 3, 3)
    assert "3 of 3 runs of the best λ reach" in format_table(summarize(runs), runs)


@pytest.mark.parametrize(("lams", "best", "expect"), [
    # the AdamW grid: best at its largest λ every time
    ((0, 0.1, 0.3, 1, 3), 3, "largest λ: the optimum may lie beyond the grid; add λ = 10, 30 "
                             "(regularization.lam=0,0.1,0.3,1,3,10,30)"),
    ((0, 1e-3, 1e-2, 1e-1), 1e-3, "smallest non-zero λ: the optimum may lie beyond the grid; "
                                  "add λ = 1e-05, 0.0001"),
    ((0, 0.1, 0.3, 1, 3), 0.3, None),
    ((0, 0.1, 0.3, 1, 3), 0, None),
])
def test_a_best_lambda_at_the_grid_edge_suggests_lambdas_to_add(lams, best, expect):
    runs = [record(float(lam), s, 0.5 + abs(math.log10(lam + 1e-9) - math.log10(best + 1e-9))
                   * 0.1 + 0.01 * s) for lam in lams for s in (0, 1)]
    (cond,) = cd.split(runs)[1]
    assert cond.best_lam == best
    if expect is None:
        assert cond.narrow is None
    else:
        assert expect in cond.narrow


# --------------------------------------------------------------------------- intervals


def test_intervals_stay_inside_each_metrics_range():
    # two cross-entropies far apart: a plain t-interval is [-2.9, 3.4]; the log one is positive
    lo, hi = interval([0.05, 0.5], "positive")
    assert 0 < lo < 0.05 and hi > 0.5
    logs = np.log([0.05, 0.5])
    assert lo == pytest.approx(math.exp(logs.mean() - 12.7062 * logs.std(ddof=1) / math.sqrt(2)),
                               rel=1e-4)
    # accuracy near 1: the t-interval cut to [0, 1]
    lo, hi = interval([0.97, 1.0, 0.99], "unit")
    assert hi == 1.0 and lo == pytest.approx(0.98667 - 4.3027 * np.std([0.97, 1, 0.99], ddof=1)
                                             / math.sqrt(3), rel=1e-4)
    # a cross-entropy of exactly 0 has no log: the t-interval cut at 0
    assert interval([0.0, 0.4], "positive")[0] == 0.0
    # the best epoch: min-max over seeds, so inside [0, max_epochs - 1]
    runs = [record(0.1, s, 0.5, hist=h) for s, h in enumerate(
        [[0.9, 0.4, 0.5, 0.6], [0.3, 0.5, 0.6, 0.7], [0.9, 0.8, 0.7, 0.6]])]
    row = summarize(runs).iloc[0]
    assert (row["best_epoch_median"], row["best_epoch_lo"], row["best_epoch_hi"]) == (1, 0, 3)
    for m in ("train/ce", "val/ce", "best_val_ce"):
        assert row[f"{m}_lo"] > 0


def test_the_log_t_interval_covers_the_geometric_mean_95_percent_of_the_time():
    """Known answer: 3 seeds from a log-normal with geometric mean 0.4 and a large spread (a
    plain t-interval would often cross 0). Over 4000 draws the interval holds 0.4 in 95% ± 1%,
    and its low end is never below 0."""
    rng = np.random.default_rng(7)
    draws = np.exp(np.log(0.4) + 0.8 * rng.standard_normal((4000, 3)))
    bounds = np.array([interval(d, "positive") for d in draws])
    cover = np.mean((bounds[:, 0] <= 0.4) & (0.4 <= bounds[:, 1]))
    assert abs(cover - 0.95) < 0.01
    assert (bounds[:, 0] > 0).all()
    plain = draws.mean(1) - 4.3027 * draws.std(1, ddof=1) / math.sqrt(3)
    assert (plain < 0).mean() > 0.7  # what the plain t-interval would have shown (75%)


# --------------------------------------------------------------------------- heatmap


def test_the_heatmap_marks_each_rows_best_and_the_lowest_cell(tmp_path):
    # λ × lr: at lr 0.01 the best λ is 1, at lr 0.1 it is 0.1; the lowest is (0.1, λ=0.1)
    val = {"0.01": {0.0: 0.9, 0.1: 0.7, 1.0: 0.6}, "0.1": {0.0: 0.6, 0.1: 0.4, 1.0: 0.8}}
    runs = [record(lam, s, v + 0.01 * s, {"optimizer.lr": lr})
            for lr, row in val.items() for lam, v in row.items() for s in (0, 1)]
    summary = summarize(runs)
    rows, lams, grid, row_best, low = cd.heatmap_grid(summary, "optimizer.lr")
    assert rows == ["0.01", "0.1"] and lams == [0.0, 0.1, 1.0]
    np.testing.assert_allclose(grid, [[0.905, 0.705, 0.605], [0.605, 0.405, 0.805]])
    assert row_best == [2, 1] and low == (1, 1)
    paths = write_report(runs, tmp_path)
    for name in ("heatmap", "best_lambda", "lambda_curve"):
        data = paths[name].read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000


def test_four_conditions_with_long_labels_draw_without_warnings(tmp_path):
    import warnings

    long = ["l2_dense_only_large_layers_variant", "l2_everything_including_conv_layers",
            "l2_first_layer_only", "none_at_all"]
    runs = [record(lam, s, 0.5 + 0.05 * i + abs(lam - 0.1), {"regularization": name})
            for i, name in enumerate(long) for lam in np.logspace(-3, 0.5, 8) for s in (0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(runs, tmp_path)
    labels = [c.label for c in cd.split(runs)[1]]
    assert all(len(label) <= cd.MAX_LABEL for label in labels)
    assert labels[0].endswith("…")
    assert paths["best_lambda"].read_bytes().startswith(PNG)
    assert "heatmap" not in paths  # names, not numbers: no heatmap


chromium = pytest.mark.skipif(
    __import__("browser").chromium_path() is None,
    reason="headless chromium is not installed (apt-get install chromium; .ci/run does)")


@chromium
def test_the_conditions_report_renders_with_decoded_nontrivial_images(tmp_path):
    """Chromium opens a train-size report: a section per size, the cross-condition table with
    each size's best λ, and five figures decoded to images with real content (hundreds of
    distinct colours, not a blank or a placeholder)."""
    from browser import Browser

    paths = write_report(size_sweep(), tmp_path)
    with Browser() as b:
        b.open_page(paths["report"].as_uri())
        images = b.evaluate("""[...document.images].map(i => {
            const c = document.createElement('canvas');
            c.width = i.naturalWidth; c.height = i.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(i, 0, 0);
            const d = g.getImageData(0, 0, c.width, c.height).data, seen = new Set();
            for (let k = 0; k < d.length; k += 4 * 7) seen.add(d[k] << 16 | d[k+1] << 8 | d[k+2]);
            return [i.id, i.naturalWidth, i.naturalHeight, seen.size]; })""")
        best = b.evaluate("[...document.querySelectorAll('#best-lambda tbody tr')]"
                          ".map(r => [...r.cells].slice(0, 2).map(c => c.innerText))")
        sections = b.evaluate("[...document.querySelectorAll('section.condition h3')]"
                              ".map(h => h.innerText)")
        verdict_text = b.evaluate("document.getElementById('verdict').innerText")
        wide = b.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert {i[0] for i in images} == {"lambda_curve", "learning_curves", "weight_norms",
                                      "best_lambda", "heatmap", "condition_curve"}
    assert all(w > 600 and h > 300 and colours > 100 for _, w, h, colours in images), images
    assert best == [["train_size=100", "0.3"], ["train_size=200", "0.3"],
                    ["train_size=500", "0.03"]]
    assert sections == ["train_size=100", "train_size=200", "train_size=500"]
    assert verdict_text.startswith("lowest mean val/ce across conditions: train_size=500 at "
                                   "λ=0.03: clear")
    assert wide  # no horizontal scrolling: figures and tables fit the page


# --------------------------------------------------------------------------- one real sweep


@pytest.fixture(scope="module")
def size_swept(tmp_path_factory):
    """λ × train size × 2 seeds (8 tiny jobs) into a fresh store."""
    root = tmp_path_factory.mktemp("conditions")
    store = f"sqlite:///{root}/mlruns/mlflow.db"
    tiny = [t for t in TINY if not t.startswith("data.train_size")]
    r = run_cli("l2lab.train", "-m", "regularization.lam=0,0.1", "data.train_size=80,120",
                "seed=0,1", *tiny, f"tracking.uri={store}", f"hydra.sweep.dir={root}/multirun/c1",
                cwd=root)
    return root, store, r


def test_a_real_sweep_prints_one_line_per_train_size_and_logs_the_figures(size_swept):
    root, store, r = size_swept
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    lines = [ln for ln in out.splitlines() if ln[:1] in "*~" and "best λ=" in ln]
    assert [ln[2:].split(":")[0] for ln in lines] == ["train_size=80", "train_size=120"]
    report = root / "multirun" / "c1" / "report"
    summary = pd.read_csv(report / "summary.csv")
    for line, n in zip(lines, (80, 120), strict=True):  # each named λ is that size's argmin
        rows = summary[summary["data.train_size"] == n]
        best = rows.loc[rows["val/ce_mean"].idxmin(), "lam"]
        assert f"best λ={best:g} " in line
    # each size's best λ chosen on val/ce, the sizes judged on the digits' held-out test split
    assert "lowest mean test/ce across conditions" in out
    assert "the conditions judged on the held-out test/ce at those λ" in out
    for name in ("best_lambda", "heatmap"):
        assert (report / "figures" / f"{name}.png").read_bytes().startswith(PNG)
    for col in ("train/ce", "val/ce", "best_val_ce"):
        assert (summary[f"{col}_lo"].dropna() >= 0).all()
    assert ((summary["best_epoch_lo"] >= 0) & (summary["best_epoch_hi"] <= 2)).all()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`l2lab.role` = 'sweep'")
    figs = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/best_lambda.png", "figures/heatmap.png"} <= figs
    note = parent.data.tags["mlflow.note.content"]  # the parent's description names each best λ
    assert note.startswith("**Best λ**: train_size=80: λ=") and "; train_size=120: λ=" in note
    # ... and links the shared view of its children (tests/test_shared_view.py opens one)
    key = f"viewStateShareKey={parent.info.run_id}"
    assert key in note and f"&{key}" in next(ln for ln in out.splitlines() if "charts: " in ln)
    page = (report / "index.html").read_text()
    assert f"&amp;{key}" in page  # the report's link: the same
    # the layers' ‖W‖² histories are read back: the weight norms sum the layers all runs logged
    assert "over fc1, out (the layers every run logged" in page
    tags = client.get_experiment(parent.info.experiment_id).tags
    assert "mlflow.sharedViewState." + parent.info.run_id in tags


def test_compare_by_picks_the_condition_keys(size_swept, tmp_path, capsys):
    root, store, r = size_swept
    assert r.returncode == 0
    from l2lab import compare

    assert compare.main(["--tracking-uri", store, "--sweep", "c1", "--by", "none",
                         "--out", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "Per condition" not in out and "Pooled over data.train_size" in out
    assert "lowest mean val/ce: lam=" in out  # today's single verdict over the pooled rows
    pooled = pd.read_csv(tmp_path / "none" / "summary.csv")
    assert list(pooled["runs"]) == [4, 4] and "data.train_size" not in pooled.columns
    assert compare.main(["--tracking-uri", store, "--sweep", "c1", "--by", "data.trian"]) == 2
    err = capsys.readouterr().err
    assert "--by: 'data.trian' is not a condition key" in err
    assert "Keys that vary in this selection: data.train_size" in err
    assert compare.main(["--tracking-uri", store, "--sweep", "c1", "--by", "data.train_size",
                         "--out", str(tmp_path / "by")]) == 0
    out = capsys.readouterr().out
    assert "Per condition (data.train_size)" in out and "Pooled" not in out
    assert (tmp_path / "by" / "figures" / "best_lambda.png").read_bytes().startswith(PNG)
    # one sweep compared: its report's chart link opens the view that sweep shared
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`l2lab.role` = 'sweep'")
    page = (tmp_path / "by" / "index.html").read_text()
    assert f"compareRunsMode=CHART&amp;viewStateShareKey={parent.info.run_id}" in page


def test_the_selection_and_lam_per_layer_are_read_back_from_the_params():
    from l2lab.tracking.runs import logged_lam_per_layer, logged_layers

    assert logged_layers({"l2.layers": "fc2"}) == ("fc2",)
    assert logged_layers({"l2.layers": "fc1,fc2,out"}) == LAYERS
    assert logged_layers({}) is None
    assert logged_lam_per_layer({"regularization.lam_per_layer.fc1": "0.3"}) == {"fc1": 0.3}
    assert logged_lam_per_layer({"regularization.lam_per_layer": '{"fc*": 0.1}'}) == {"fc*": 0.1}
    assert logged_lam_per_layer({"regularization.lam_per_layer": "{}"}) == {}


# --------------------------------------------------------------------------- the protocol


def with_test(run: RunRecord, test: float) -> RunRecord:
    return replace(run, final={**run.final, "test/ce": test, "test/acc": 0.8})


def dropout_sweep(test: bool) -> list[RunRecord]:
    """model.dropout=0,0.3 × λ × 3 seeds. On val/ce dropout 0.3 at λ=0.1 is the lowest (by
    0.05, clear); on the held-out test/ce the two conditions' best λ are level, within noise."""
    runs = []
    noise = (0.004, -0.006, 0.002)
    for p, base in (("0", 0.55), ("0.3", 0.50)):
        for lam in (0.0, 0.1, 1.0):
            for s in range(3):
                val = base + 0.2 * abs(lam - 0.1) + 0.01 * s
                run = record(lam, s, val, {"model.dropout": p})
                runs.append(with_test(run, 0.6 + 0.2 * abs(lam - 0.1) + 0.01 * s
                                      + (noise[s] if p == "0.3" else 0.0)) if test else run)
    return runs


def test_selected_on_val_judged_on_test(tmp_path):
    from scipy import stats

    _, conds = cd.split(dropout_sweep(test=True))
    assert [c.best_lam for c in conds] == [0.1, 0.1]  # each chosen on val/ce
    acr = cd.across(conds)
    assert (acr.chosen_on, acr.judged_on, acr.holm) == ("val/ce", "test/ce", False)
    (rival,) = acr.rivals
    by_seed = [[r.final["test/ce"] for r in sorted(c.best_cell.finished, key=lambda r: r.seed)]
               for c in conds]
    low, other = (1, 0) if np.mean(by_seed[1]) < np.mean(by_seed[0]) else (0, 1)
    assert acr.lowest == low and rival.other == other
    assert rival.p == pytest.approx(stats.ttest_rel(by_seed[other], by_seed[low]).pvalue)
    assert rival.p == rival.p_raw and not rival.clear
    assert cd.across(cd.split(dropout_sweep(test=False))[1]).rivals[0].clear  # on val/ce: clear
    runs = dropout_sweep(test=True)
    text = format_table(summarize(runs), runs)
    assert ("protocol: each condition's best λ chosen on val/ce; the conditions judged on the "
            "held-out test/ce at those λ") in text
    assert text.splitlines()[-1].startswith("~ lowest mean test/ce across conditions: ")
    assert "Holm" not in text
    page = write_report(runs, tmp_path)["report"].read_text()
    assert 'id="protocol"' in page and "held-out test/ce" in page
    assert "<th>test/ce at best λ</th>" in page


def test_without_a_test_split_the_p_values_are_holm_adjusted(tmp_path):
    from scipy import stats

    # three conditions; the lowest (c) against a and b, each paired over 3 seeds
    offsets = {"a": (0.03, 0.05, 0.02), "b": (0.02, 0.01, 0.035), "c": (0.0, 0.0, 0.0)}
    runs = [record(lam, s, 0.5 + abs(lam - 0.1) + 0.01 * s + offsets[k][s],
                   {"optimizer.name": k}) for k in offsets for lam in (0.0, 0.1)
            for s in range(3)]
    _, conds = cd.split(runs)
    acr = cd.across(conds)
    assert (acr.chosen_on, acr.judged_on, acr.holm) == ("val/ce", "val/ce", True)
    assert conds[acr.lowest].values == {"optimizer.name": "c"}
    raw = {conds[r.other].values["optimizer.name"]: r.p_raw for r in acr.rivals}
    for k in ("a", "b"):
        assert raw[k] == pytest.approx(stats.ttest_rel(
            np.array(offsets[k]) + 0.01 * np.arange(3), 0.01 * np.arange(3)).pvalue)
    lo, hi = sorted(raw.values())
    adjusted = sorted(r.p for r in acr.rivals)
    assert adjusted == pytest.approx([2 * lo, max(2 * lo, hi)])
    text = format_table(summarize(runs), runs)
    assert ("protocol: no test split: each best λ chosen on val/ce and the conditions judged "
            "on the same val/ce; p-values Holm-adjusted over the 2 comparisons made") in text
    assert "paired t-test over 3 seeds, Holm-adjusted" in text
    page = write_report(runs, tmp_path)["report"].read_text()
    assert "Protocol: no test split: each best λ chosen on val/ce" in page
    assert "p-values Holm-adjusted over the 2 comparisons made." in page
    # a test split on only some runs is no held-out verdict: Holm again
    part = [with_test(r, 0.6) if r.swept["optimizer.name"] == "a" else r for r in runs]
    assert cd.across(cd.split(part)[1]).holm


def test_holm_adjusts_step_down_and_keeps_nan():
    from l2lab.report.stats import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan, 0.01]) == pytest.approx([0.5, math.nan, 0.02], nan_ok=True)
    assert holm([0.3, 0.4]) == pytest.approx([0.6, 0.6])  # monotone in the raw order
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


# --------------------------------------------------------------------------- the selection


def test_the_layers_each_selection_penalised_are_named(tmp_path):
    layers = {"l2": LAYERS, "l2_dense": ("fc2",)}
    runs = [replace(r, layers=layers[r.swept["regularization"]]) for r in preset_sweep()]
    text = format_table(summarize(runs), runs)
    assert "  penalised layers (l2.layers): l2: fc1, fc2, out; l2_dense: fc2" in text
    page = write_report(runs, tmp_path)["report"].read_text()
    assert "<th>penalised layers</th>" in page and "<td>fc2</td>" in page
    assert "penalised layers (l2.layers): fc1, fc2, out" in page  # l2's section
    # one selection for every run: one list, also without conditions
    plain = [replace(record(lam, s, 0.5 + abs(lam - 0.1) + 0.01 * s), layers=("fc2",))
             for lam in (0.0, 0.1) for s in (0, 1)]
    assert "  penalised layers (l2.layers): fc2\n" in format_table(summarize(plain), plain)
    # nothing logged: no line
    assert "penalised" not in format_table(summarize(preset_sweep()), preset_sweep())

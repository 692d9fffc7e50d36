"""l2lab.report.stats, l2lab.report.figures and l2lab.report.html: statistics checked against
hand-computed numbers and known answers, figures as PNGs, and the HTML report rendered by a real
(headless) chromium."""

from __future__ import annotations

import ast
import math
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import python_c

from l2lab.report.html import ReportContext, write_report
from l2lab.report.stats import (
    STAT_COLUMNS,
    RunRecord,
    mean_std_ci,
    seeds_needed,
    summarize,
    verdict,
)
from l2lab.report.table import format_table
from l2lab.tracking.ui import UiLinks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SQRT2 = math.sqrt(2.0)


def make_run(
    lam_text: str,
    seed: int,
    train: float,
    val: float,
    acc: float,
    val_hist: list[float],
    *,
    status: str = "FINISHED",
    failure: str | None = None,
    extra_group: dict[str, str] | None = None,
) -> RunRecord:
    """A run whose final val/ce is `val`, with histories indexed by epoch 0..n-1."""
    n = len(val_hist)
    group = {"regularization.lam": lam_text, **(extra_group or {})}
    return RunRecord(
        run_id=f"r-{lam_text}-{seed}",
        name=f"lam={lam_text} seed={seed}",
        status=status,
        swept=group,
        lam=float(lam_text),
        seed=seed,
        failure=failure,
        final={"train/ce": train, "val/ce": val, "gap/ce": val - train, "val/acc": acc},
        history={
            "val/ce": list(enumerate(val_hist)),
            "train/ce": [(e, train + 0.5 * (n - 1 - e)) for e in range(n)],
            "weights/sq_norm_total": [(e, 10.0 / (1.0 + float(lam_text)) + e) for e in range(n)],
        },
    )


def sweep_runs() -> list[RunRecord]:
    """3 λ × 2 seeds, one FAILED run without history and one KILLED run with absurd values.

    λ=1e-3 is written as "1e-3" so that string sorting ("0.1" < "1e-3") would give a wrong order.
    """
    runs = [
        make_run("0.0", 1, 0.10, 0.60, 0.80, [0.9, 0.50, 0.55, 0.60]),
        make_run("0.0", 2, 0.12, 0.64, 0.78, [0.9, 0.60, 0.48, 0.64]),
        make_run("1e-3", 1, 0.30, 0.45, 0.86, [0.9, 0.60, 0.50, 0.45]),
        make_run("1e-3", 2, 0.34, 0.41, 0.88, [0.9, 0.50, 0.41, 0.41]),  # tie: first epoch wins
        make_run("0.1", 1, 0.80, 0.85, 0.70, [1.0, 0.90, 0.85, 0.85]),
        make_run("0.1", 2, 0.90, 0.95, 0.66, [1.1, 0.95, 0.96, 0.95]),
        RunRecord(
            run_id="r-fail",
            name="lam=1e-3 seed=3",
            status="FAILED",
            swept={"regularization.lam": "1e-3"},
            lam=1e-3,
            seed=3,
            failure="CUDA out of memory",
        ),
        make_run("0.1", 3, 99.0, 99.0, 0.0, [99.0], status="KILLED"),
    ]
    random.Random(0).shuffle(runs)
    return runs


@pytest.fixture(scope="module")
def summary() -> pd.DataFrame:
    return summarize(sweep_runs())


def row(frame: pd.DataFrame, lam: float) -> pd.Series:
    match = frame[np.isclose(frame["lam"], lam)]
    assert len(match) == 1
    return match.iloc[0]


def test_columns_and_order(summary: pd.DataFrame) -> None:
    assert list(summary.columns) == ["lam", *STAT_COLUMNS]  # one λ column, a number
    assert summary["lam"].tolist() == [0.0, 1e-3, 0.1]
    assert summary["runs"].tolist() == [2, 2, 2]
    # r-fail never trained (no metrics): no part of any row; the KILLED run counts as failed
    assert summary["failed"].tolist() == [0, 0, 1]


def test_final_metric_means_and_sample_stds(summary: pd.DataFrame) -> None:
    r0 = row(summary, 0.0)
    assert r0["train/ce_mean"] == pytest.approx(0.11)
    assert r0["train/ce_std"] == pytest.approx(0.02 / SQRT2)
    assert r0["val/ce_mean"] == pytest.approx(0.62)
    assert r0["val/ce_std"] == pytest.approx(0.04 / SQRT2)
    # 95% t-interval on the log (cross-entropy > 0), 1 degree of freedom: t = 12.706
    logs = np.log([0.60, 0.64])
    half = 12.7062 * logs.std(ddof=1) / SQRT2
    assert r0["val/ce_lo"] == pytest.approx(math.exp(logs.mean() - half), rel=1e-4)
    assert r0["val/ce_hi"] == pytest.approx(math.exp(logs.mean() + half), rel=1e-4)
    assert 0 < r0["val/ce_lo"] < 0.60 and r0["val/ce_hi"] > 0.64
    # accuracy and gap/ce: the t-interval (inside [0, 1] here: nothing to cut)
    assert r0["val/acc_hi"] == pytest.approx(0.79 + 12.7062 * 0.01, rel=1e-4)
    assert r0["gap/ce_lo"] == pytest.approx(0.51 - 12.7062 * 0.01, rel=1e-4)
    assert r0["gap/ce_mean"] == pytest.approx(0.51)
    assert r0["gap/ce_std"] == pytest.approx(0.02 / SQRT2)
    assert r0["val/acc_mean"] == pytest.approx(0.79)
    assert r0["val/acc_std"] == pytest.approx(0.02 / SQRT2)

    r1 = row(summary, 1e-3)  # the FAILED run must not enter the statistics
    assert r1["val/ce_mean"] == pytest.approx(0.43)
    assert r1["val/ce_std"] == pytest.approx(0.04 / SQRT2)
    assert r1["train/ce_mean"] == pytest.approx(0.32)

    r2 = row(summary, 0.1)  # nor the KILLED one with its 99.0 values
    assert r2["train/ce_mean"] == pytest.approx(0.85)
    assert r2["train/ce_std"] == pytest.approx(0.1 / SQRT2)
    assert r2["val/ce_mean"] == pytest.approx(0.90)
    assert r2["val/acc_mean"] == pytest.approx(0.68)


def test_best_val_ce_and_epoch(summary: pd.DataFrame) -> None:
    r0 = row(summary, 0.0)  # minima 0.50 @ 1 and 0.48 @ 2
    assert r0["best_val_ce_mean"] == pytest.approx(0.49)
    assert r0["best_val_ce_std"] == pytest.approx(0.02 / SQRT2)
    assert r0["best_epoch_mean"] == pytest.approx(1.5)
    assert r0["best_epoch_std"] == pytest.approx(1 / SQRT2)

    r1 = row(summary, 1e-3)  # 0.45 @ 3 and 0.41 @ 2 (tie with epoch 3 -> earliest)
    assert r1["best_val_ce_mean"] == pytest.approx(0.43)
    assert r1["best_epoch_mean"] == pytest.approx(2.5)

    r2 = row(summary, 0.1)  # 0.85 @ 2 and 0.95 @ 1 (first of the two 0.95)
    assert r2["best_val_ce_mean"] == pytest.approx(0.90)
    assert r2["best_val_ce_std"] == pytest.approx(0.1 / SQRT2)
    assert r2["best_epoch_mean"] == pytest.approx(1.5)


def test_single_run_has_nan_std() -> None:
    frame = summarize([make_run("0.01", 7, 0.2, 0.3, 0.9, [0.5, 0.25, 0.3])])
    assert len(frame) == 1
    r = frame.iloc[0]
    assert (r["runs"], r["failed"]) == (1, 0)
    assert r["val/ce_mean"] == pytest.approx(0.3)
    assert r["best_val_ce_mean"] == pytest.approx(0.25)
    assert r["best_epoch_mean"] == pytest.approx(1.0)
    for col in ("train/ce_std", "val/ce_std", "gap/ce_std", "val/acc_std", "best_epoch_std",
                "val/ce_lo", "val/ce_hi", "best_epoch_lo"):
        assert math.isnan(r[col])


def test_all_failed_group_gets_nan_row_and_never_trained_runs_get_none() -> None:
    diverged = make_run("1.0", 1, math.nan, math.nan, 0.1, [2.0], status="FAILED",
                        failure="non-finite loss")
    rejected = RunRecord("r-x", "lam=-1 seed=1", "FAILED", {"regularization.lam": "-1"}, -1.0, 1,
                         "regularization.lam must be a finite number >= 0")
    runs = sweep_runs() + [diverged, rejected]
    frame = summarize(runs)
    assert frame["lam"].tolist() == [0.0, 1e-3, 0.1, 1.0]  # no row for the rejected λ=-1
    last = row(frame, 1.0)
    assert (last["runs"], last["failed"]) == (0, 1)
    assert math.isnan(last["val/ce_mean"]) and math.isnan(last["best_epoch_mean"])
    text = format_table(frame, runs)  # a sweep names every failure, the rejected one included
    assert "FAILED  lam=-1 seed=1  (r-x): regularization.lam must be" in text
    assert "2 run(s) never trained" in text  # r-fail and r-x
    text = format_table(frame, runs, name_rejected=False)  # compare: a count, no names
    assert "(r-x)" not in text and "(r-fail)" not in text and "2 run(s) never trained" in text
    assert "non-finite loss" in text


def test_empty_groups_fall_back_to_lambda_and_gap_is_derived() -> None:
    runs = []
    for lam, seed, train, val in [(0.1, 1, 0.5, 0.6), (0.0, 1, 0.1, 0.7), (0.0, 2, 0.2, 0.9)]:
        runs.append(
            RunRecord(
                f"id{seed}{lam}",
                "n",
                "FINISHED",
                {},
                lam,
                seed,
                final={"train/ce": train, "val/ce": val},
            )
        )
    frame = summarize(runs)
    assert list(frame.columns) == ["lam", *STAT_COLUMNS]
    assert frame["lam"].tolist() == [0.0, 0.1]
    assert row(frame, 0.0)["gap/ce_mean"] == pytest.approx(0.65)  # (0.6 + 0.7) / 2
    assert math.isnan(row(frame, 0.0)["best_val_ce_mean"])  # no history recorded
    assert math.isnan(row(frame, 0.0)["val/acc_mean"])


def test_extra_group_keys_sorted_numerically() -> None:
    runs = [
        make_run(
            lam, seed, 0.3, 0.5 + seed / 100, 0.8, [0.6, 0.5], extra_group={"data.train_size": n}
        )
        for lam in ("0.01", "0.0")
        for n in ("1000", "500")
        for seed in (1, 2)
    ]
    frame = summarize(runs)
    assert list(frame.columns[:3]) == ["lam", "data.train_size", "runs"]
    assert frame["lam"].tolist() == [0.0, 0.0, 0.01, 0.01]
    assert frame["data.train_size"].tolist() == ["500", "1000", "500", "1000"]
    assert frame["runs"].tolist() == [2, 2, 2, 2]
    assert frame["val/ce_mean"].tolist() == pytest.approx([0.515] * 4)
    text = format_table(frame, runs)
    assert "train_size" in text.splitlines()[0]


def test_format_table(summary: pd.DataFrame) -> None:
    runs = sweep_runs()
    text = format_table(summary, runs)
    lines = text.splitlines()
    header = lines[0]
    assert "lam" in header and "regularization." not in header
    for col in ("runs", "train/ce", "val/ce", "gap/ce", "val/acc", "best val/ce", "best epoch",
                "val/ce 95% CI"):
        assert col in header
    assert "test/acc" not in header  # no run has a test split
    assert "FAILED  lam=1e-3 seed=3  (r-fail): CUDA out of memory" in text
    assert "KILLED  lam=0.1 seed=3  (r-0.1-3): no reason recorded" in text

    # Paired over seeds 1 and 2, λ=1e-3 beats λ=0 by (0.15, 0.23) and λ=0.1 by (0.40, 0.54): with
    # two seeds neither difference is significant at 5% (p = 0.13 and 0.094): marked "~".
    marked = [ln for ln in lines if ln.startswith("~") and "lowest" not in ln]
    assert len(marked) == 1 and "0.001" in marked[0]
    assert "0.4300 ± 0.0283" in marked[0]  # val/ce
    assert "0.870 ± 0.014" in marked[0]  # val/acc, 3 decimals
    assert "2.5 [2–3]" in marked[0]  # best epoch: median [min–max]
    assert "[0.2378, 0.7760]" in marked[0]  # exp(mean log ± 12.706 · sd log / √2): 0.45, 0.41
    assert lines[-1].startswith(
        "~ lowest mean val/ce: lam=0.001: not distinguishable from lam=0 with 2 seeds "
        "(p = 0.13, paired t-test); about 3 seeds "), lines[-1]
    # Rows are in λ order and columns line up (fixed width).
    rows = lines[2:5]
    assert [r[2:].split()[0] for r in rows] == ["0", "0.001", "0.1"]
    assert len({len(r) for r in [header, *rows]}) == 1


def test_format_table_single_run_and_all_failed() -> None:
    one = [make_run("0.01", 7, 0.2, 0.3, 0.9, [0.5, 0.25, 0.3])]
    text = format_table(summarize(one), one)
    assert "0.3000" in text and "±" not in text
    assert "FAILED" not in text
    # a lone row is compared with nothing: no verdict, so no mark (issue 30, item 7)
    assert text.splitlines()[-1] == ("  lowest mean val/ce: lam=0.01: the only row with "
                                     "finished runs: nothing to compare")

    failed = [
        RunRecord("a", "lam=0 seed=1", "FAILED", {"regularization.lam": "0.0"}, 0.0, 1, "boom"),
        RunRecord("b", "lam=1 seed=1", "FAILED", {"regularization.lam": "1.0"}, 1.0, 1, None),
    ]
    text = format_table(summarize(failed), failed)
    assert "FAILED  lam=0 seed=1  (a): boom" in text
    assert "(no runs)" in text  # neither trained: no rows
    assert text.splitlines()[-1] == "  lowest mean val/ce: n/a (no finished runs)"  # no mark
    assert not [ln for ln in text.splitlines() if ln.startswith(("*", "~"))]


# --------------------------------------------------------------------------- the verdict


def paired_rows(values: dict[str, list[float]]) -> list[RunRecord]:
    """One run per (λ, seed) with the given final val/ce per seed."""
    return [make_run(lam, seed, 0.1, v, 0.9, [v]) for lam, vals in values.items()
            for seed, v in enumerate(vals)]


def test_t_interval_matches_the_textbook() -> None:
    mean, std, half = mean_std_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (mean, std) == (3.0, pytest.approx(math.sqrt(2.5)))
    assert half == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5))  # t(0.975, 4)
    assert all(math.isnan(x) for x in mean_std_ci([1.0])[1:])


def test_a_consistent_difference_is_clear_when_paired() -> None:
    """Each seed's offset is shared by every λ (same init): the spread over seeds (0.1) is 50×
    the difference (0.01), yet the per-seed differences are all 0.01 ± 0.001 — clear, where
    mean ± std would call it noise."""
    offsets = [0.0, 0.1, -0.1, 0.2, -0.2]
    diffs = [0.010, 0.011, 0.009, 0.010, 0.0105]
    runs = paired_rows({"0.1": [0.4 + o for o in offsets],
                        "1.0": [0.4 + o + d for o, d in zip(offsets, diffs, strict=True)],
                        "3.0": [0.9 + o for o in offsets]})
    summary = summarize(runs)
    ver = verdict(summary, runs)
    assert (ver.best, ver.rival, ver.clear, ver.seeds) == (0, 1, True, 5)
    d = np.array(diffs)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    from scipy import stats

    assert ver.p == pytest.approx(2 * stats.t.sf(t, 4))
    assert ver.p < 1e-4
    assert ver.text.startswith(f"clear (p = {ver.p:.2g}, paired t-test over 5 seeds against "
                               "lam=1, the closest)")
    last = format_table(summary, runs).splitlines()[-1]
    assert last.startswith("* lowest mean val/ce: lam=0.1: clear (p = ")


def test_an_inconsistent_difference_is_not_distinguishable_and_says_how_many_seeds() -> None:
    # differences +0.02, -0.01, +0.015 (mean 0.00833, sd 0.01607): t = 0.898, 2 df, p = 0.464
    runs = paired_rows({"0.1": [0.40, 0.42, 0.41], "0.3": [0.42, 0.41, 0.425]})
    ver = verdict(summarize(runs), runs)
    assert (ver.best, ver.clear, ver.seeds) == (0, False, 3)
    assert ver.p == pytest.approx(0.4640, abs=1e-4)
    # power 0.8 at α = 0.05 for effect size 0.00833/0.01607 = 0.52: 32 pairs (noncentral t)
    assert ver.seeds_needed == seeds_needed(0.025 / 3, np.std([0.02, -0.01, 0.015], ddof=1))
    assert 28 <= ver.seeds_needed <= 34
    assert ver.text == (f"not distinguishable from lam=0.3 with 3 seeds (p = 0.46, paired "
                        f"t-test); about {ver.seeds_needed} seeds would tell")


def test_seeds_needed_known_values() -> None:
    # Cohen's d = 1 needs 10 pairs for power 0.8 at α = 0.05 (two-sided paired t-test; G*Power)
    assert seeds_needed(1.0, 1.0) == 10
    assert seeds_needed(0.5, 1.0) == 34
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(1e-6, 1.0) is None
    assert seeds_needed(0.1, 0.0) == 2


def test_the_t_functions_from_scipy_special_are_scipy_stats_own() -> None:
    """The report reads Student's t and the noncentral t from scipy.special (scipy.stats costs
    ~0.9 s to import); every value is scipy.stats', and seeds_needed's answer is the one the
    noncentral t of scipy.stats gives, over a grid of effects."""
    from scipy import stats as st

    from l2lab.report import stats

    for df in (1, 2, 3, 7, 29, 120):
        for q in (0.5, 0.9, 0.975, 0.995):
            assert stats.t_quantile(df, q) == st.t.ppf(q, df)
        for t in (0.0, 0.3, -1.7, 2.5, 12.0):
            assert stats.t_two_sided_p(t, df) == 2 * st.t.sf(abs(t), df)
    rng = np.random.default_rng(0)
    for n_a, n_b in ((2, 2), (3, 5), (10, 4)):
        for _ in range(20):
            a, b = rng.normal(0, rng.uniform(0.1, 2), n_a), rng.normal(0.5, 1, n_b)
            want = st.ttest_ind(b, a, equal_var=False).pvalue
            assert stats.welch_p(a, b) == pytest.approx(want, rel=1e-12, abs=1e-15)
    for a, b, want in (([1, 1], [1, 1], math.nan), ([1, 1], [2, 2], 0.0),  # no spread
                       ([1, 1], [2, 3], 0.20483276469913345)):  # scipy's ttest_ind, 1.17.1
        got = stats.welch_p(np.array(a, float), np.array(b, float))
        assert got == want or math.isnan(got) and math.isnan(want)

    def scipy_seeds(diff: float, sd: float) -> int | None:  # the former scipy.stats form
        n = np.arange(2, stats.MAX_SEEDS + 1)
        crit = st.t.ppf(1 - stats.ALPHA / 2, n - 1)
        nc = abs(diff) / sd * np.sqrt(n)
        achieved = st.nct.sf(crit, n - 1, nc) + st.nct.cdf(-crit, n - 1, nc)
        ok = np.nonzero(achieved >= stats.POWER)[0]
        return int(n[ok[0]]) if ok.size else None

    checked = 0
    for d in np.geomspace(0.02, 5, 200):
        assert seeds_needed(float(d), 1.0) == scipy_seeds(float(d), 1.0), d
        checked += seeds_needed(float(d), 1.0) is not None
    assert checked > 100  # the grid reaches answers, not only "no number would"


def test_the_closest_rival_decides_and_one_seed_cannot_be_tested() -> None:
    # λ=1 is further in mean than λ=0.3 but far noisier: it is the one the best is hardest to
    # tell from, so it decides (largest p)
    runs = paired_rows({"0.1": [0.40, 0.41, 0.42], "0.3": [0.45, 0.46, 0.47],
                        "1.0": [0.30, 0.60, 0.52]})
    ver = verdict(summarize(runs), runs)
    assert ver.rival == 2 and not ver.clear

    single = paired_rows({"0.01": [0.40], "0.1": [0.9]})
    ver = verdict(summarize(single), single)
    assert not ver.clear and ver.text.startswith("not distinguishable with 1 seed: a test needs")


def test_unpaired_seeds_fall_back_to_welch() -> None:
    runs = [make_run("0.1", s, 0.1, v, 0.9, [v]) for s, v in [(0, 0.40), (1, 0.41), (2, 0.39)]]
    runs += [make_run("1.0", s, 0.1, v, 0.9, [v]) for s, v in [(5, 0.60), (6, 0.61), (7, 0.62)]]
    ver = verdict(summarize(runs), runs)
    assert ver.clear and "Welch t-test" in ver.text


def test_test_metrics_get_a_column_and_lambda_prints_at_four_digits() -> None:
    runs = [make_run("0.012345678901234567", s, 0.1, 0.4 + s / 100, 0.9, [0.5]) for s in (0, 1)]
    for r, acc in zip(runs, (0.61, 0.63), strict=True):
        r.final.update({"test/acc": acc, "test/ce": 1.2})
    summary = summarize(runs)
    assert summary["test/acc_mean"].item() == pytest.approx(0.62)
    text = format_table(summary, runs)
    assert "test/acc" in text.splitlines()[0] and "0.620 ± 0.014" in text
    assert "0.01235" in text and "0.012345678" not in text


# --------------------------------------------------------------------------- files


def assert_report(paths: dict[str, Path], out_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """The files of a report; ``extra``: the figures of a sweep with conditions."""
    figs = ("lambda_curve", "learning_curves", "weight_norms", *extra)
    assert set(paths) == {"summary", "report", *figs}
    assert paths["summary"] == out_dir / "summary.csv"
    assert paths["report"] == out_dir / "index.html"
    for key in figs:
        path = paths[key]
        assert path == out_dir / "figures" / f"{key}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 5_000


def test_write_report_roundtrip(tmp_path: Path) -> None:
    runs = sweep_runs()
    out_dir = tmp_path / "nested" / "report"
    paths = write_report(runs, out_dir)
    assert_report(paths, out_dir)

    expected = summarize(runs)
    back = pd.read_csv(paths["summary"])
    assert list(back.columns) == list(expected.columns)
    numeric = ["lam", *STAT_COLUMNS]
    np.testing.assert_allclose(
        back[numeric].to_numpy(dtype=float),
        expected[numeric].to_numpy(dtype=float),
        rtol=1e-12,
        equal_nan=True,
    )


def test_write_report_single_run(tmp_path: Path) -> None:
    runs = [make_run("0.01", 7, 0.2, 0.3, 0.9, [0.5, 0.25, 0.3])]
    paths = write_report(runs, tmp_path)
    assert_report(paths, tmp_path)
    back = pd.read_csv(paths["summary"])
    assert len(back) == 1
    r = back.iloc[0]
    assert (r["lam"], r["runs"], r["failed"]) == (0.01, 1, 0)
    assert (r["train/ce_mean"], r["val/ce_mean"], r["val/acc_mean"]) == (0.2, 0.3, 0.9)
    assert r["gap/ce_mean"] == pytest.approx(0.1)
    assert (r["best_val_ce_mean"], r["best_epoch_median"]) == (0.25, 1.0)
    assert np.isnan(r["val/ce_std"]) and np.isnan(r["val/ce_lo"])  # one seed: no spread
    page = paths["report"].read_text()
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", page.split('id="summary"')[1].split("</table>")[0])
    cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", rows[1])]
    assert cells[:5] == ["0.01", "1", "0.2000", "0.3000", "0.1000"]  # λ, runs, train, val, gap
    assert cells[-1] == "seed 7" and 'class="ci"' not in rows[1]  # no interval for one seed
    assert "Lowest mean final val/ce: <b>λ = 0.01</b>: the only row with finished runs" in page
    assert page.count('src="data:image/png;base64,') == 3


def test_write_report_zero_lambda_only_and_extra_keys(tmp_path: Path) -> None:
    zero = [make_run("0", s, 0.1, 0.5 + s / 100, 0.8, [0.7, 0.5]) for s in (1, 2)]
    paths = write_report(zero, tmp_path / "zero")
    assert_report(paths, tmp_path / "zero")
    back = pd.read_csv(paths["summary"])
    assert back["lam"].tolist() == [0.0] and back["runs"].tolist() == [2]
    assert back["val/ce_mean"].item() == pytest.approx(0.515)
    assert 0 < back["val/ce_lo"].item() < 0.51 and back["val/ce_hi"].item() > 0.52
    page = paths["report"].read_text()
    assert "Lowest mean final val/ce: <b>λ = 0</b>: the only row with finished runs" in page
    assert "0.5150" in page and 'class="condition"' not in page  # no conditions: today's page

    extra = [
        make_run(lam, 1, 0.3, 0.5 + float(lam), 0.8, [0.6, 0.5], extra_group={"data.train_size": n})
        for lam in ("0.0", "0.001", "0.1")
        for n in ("500", "1000")
    ]
    paths = write_report(extra, tmp_path / "extra")
    assert_report(paths, tmp_path / "extra", ("best_lambda", "heatmap"))
    back = pd.read_csv(paths["summary"])
    assert list(back.columns[:3]) == ["lam", "data.train_size", "runs"]
    assert back[["lam", "data.train_size"]].values.tolist() == [
        [0.0, 500], [0.0, 1000], [0.001, 500], [0.001, 1000], [0.1, 500], [0.1, 1000]]
    assert back["val/ce_mean"].tolist() == pytest.approx([0.5, 0.5, 0.501, 0.501, 0.6, 0.6])
    page = paths["report"].read_text()
    assert page.count('class="condition"') == 2  # a section per train size
    assert "<h3>train_size=500</h3>" in page and "<h3>train_size=1000</h3>" in page
    assert 'id="best-lambda"' in page and page.count('src="data:image/png;base64,') == 5
    # one seed per cell: the verdicts say a test needs more
    assert "a test needs two or more per row" in page


def test_write_report_all_failed(tmp_path: Path) -> None:
    runs = [
        RunRecord("a", "lam=0 seed=1", "FAILED", {"regularization.lam": "0.0"}, 0.0, 1, "boom"),
        RunRecord("b", "lam=1 seed=1", "KILLED", {"regularization.lam": "1.0"}, 1.0, 1),
    ]
    paths = write_report(runs, tmp_path)
    assert_report(paths, tmp_path)
    back = pd.read_csv(paths["summary"])
    assert back.empty  # neither run trained an epoch: no rows, and placeholder figures
    assert "No finished runs" in paths["report"].read_text()


def test_many_lambdas_and_mixed_configs_draw_without_warnings(tmp_path: Path) -> None:
    """30 λ (a colour bar instead of a 30-entry legend) and a compare over two training sizes:
    constrained layout, no tight_layout warning, nothing printed."""
    import warnings

    lams = [f"{x:.6g}" for x in [0.0, *np.logspace(-4, 1, 29)]]
    many = [make_run(lam, s, 0.1 + float(lam), 0.5 + (float(lam) - 0.3) ** 2, 0.8,
                     [0.9, 0.6, 0.5]) for lam in lams for s in (0, 1)]
    mixed = [make_run(lam, s, 0.3, 0.5 + float(lam), 0.8, [0.6, 0.5],
                      extra_group={"data.train_size": n, "optimizer.lr": lr})
             for lam in ("0.0", "0.01", "0.1") for n in ("200", "1000") for lr in ("0.05", "0.1")
             for s in (0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_report(write_report(many, tmp_path / "many"), tmp_path / "many")
        assert_report(write_report(mixed, tmp_path / "mixed"), tmp_path / "mixed",
                      ("best_lambda",))  # two condition keys: no heatmap
    assert len(pd.read_csv(tmp_path / "many" / "summary.csv")) == 30


def test_write_report_empty(tmp_path: Path) -> None:
    paths = write_report([], tmp_path)
    assert_report(paths, tmp_path)
    assert "no runs" in format_table(summarize([]), [])


def test_figures_module_leaves_the_backend_alone() -> None:
    code = ("import matplotlib; matplotlib.use('svg'); "
            "import l2lab.report.html, l2lab.report.figures; "
            "print(matplotlib.get_backend())")
    assert python_c(code).strip() == "svg"


# --------------------------------------------------------------------------- the HTML report


def report_html(tmp_path: Path) -> tuple[dict[str, Path], list[RunRecord]]:
    runs = sweep_runs()
    for r in runs:
        r.experiment_id = "7"
    ctx = ReportContext(title="λ sweep s1 (digits-mlp)",
                        links=UiLinks("http://127.0.0.1:5000"),
                        parent=("7", "p" * 32), commands=["python -m l2lab.train -m 'seed=0,1'"])
    return write_report(runs, tmp_path, ctx), runs


def test_report_html_is_self_contained_with_links_and_command(tmp_path: Path) -> None:
    paths, runs = report_html(tmp_path)
    text = paths["report"].read_text()
    assert text.count('src="data:image/png;base64,') == 3  # embedded: one file to open or mail
    assert 'src="http' not in text and "<script" not in text
    link = ("http://127.0.0.1:5000/#/experiments/7/runs/r-1e-3-1?workflowType=machine_learning")
    assert f'href="{link}"' in text
    assert "/runs/pppppppppppppppppppppppppppppppp?workflowType=machine_learning" in text
    assert "compareRunsMode=CHART" in text
    assert "python -m l2lab.train -m &#x27;seed=0,1&#x27;" in text
    assert "not distinguishable from λ = 0 with 2 seeds" not in text  # labels are the table's
    assert "not distinguishable from lam=0 with 2 seeds" in text
    assert "CUDA out of memory" in text


def test_the_reports_chart_link_opens_the_sweeps_shared_view(tmp_path: Path) -> None:
    """The report's "chart view" and the console's "charts:" come from one builder: with the
    sweep's view shared on experiment 7, the report's link opens it (its children, not the
    experiment's every run); another experiment's link stays the plain chart view."""
    from l2lab.tracking import ui

    links = UiLinks("http://h:5000", {"7": "p" * 32})
    chart = links.runs("7", chart=True)
    assert chart == ui.charts_url("http://h:5000", "7", "p" * 32) == (
        "http://h:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&compareRunsMode=CHART&viewStateShareKey=" + "p" * 32)
    assert links.runs("8", chart=True).endswith("compareRunsMode=CHART")
    assert links.runs("7") == "http://h:5000/#/experiments/7/runs?workflowType=machine_learning"
    runs = sweep_runs()
    for r in runs:
        r.experiment_id = "7"
    paths = write_report(runs, tmp_path, ReportContext(links=links))
    assert f'href="{chart.replace("&", "&amp;")}"' in paths["report"].read_text()


chromium = pytest.mark.skipif(
    __import__("browser").chromium_path() is None,
    reason="headless chromium is not installed (apt-get install chromium; .ci/run does)")


@chromium
def test_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    """Headless chromium opens the report from disk: the table has one row per λ with its
    interval, the three figures are decoded images, the verdict and the command are shown."""
    from browser import Browser

    paths, _ = report_html(tmp_path)
    with Browser() as b:
        b.open_page(paths["report"].as_uri())
        rows = b.evaluate("[...document.querySelectorAll('#summary tbody tr')]"
                          ".map(r => [...r.cells].map(c => c.innerText.replace(/\\n/g, ' ')))")
        images = b.evaluate("[...document.images].map(i => [i.id, i.naturalWidth, "
                            "i.naturalHeight])")
        verdict_text = b.evaluate("document.getElementById('verdict').innerText")
        command = b.evaluate("document.getElementById('command').innerText")
        b.screenshot(tmp_path / "report.png")
    assert [r[0] for r in rows] == ["0", "0.001", "0.1"]
    assert rows[1][2].startswith("0.3200") and "[" in rows[1][2]  # train/ce with its interval
    assert rows[1][-1] == "seed 1, seed 2"  # seed 3 never trained: listed below, no row
    assert rows[2][-1] == "seed 1, seed 2, seed 3 (KILLED)"
    assert {i[0] for i in images} == {"lambda_curve", "learning_curves", "weight_norms"}
    assert all(w > 600 and h > 300 for _, w, h in images), images
    assert "Lowest mean final val/ce: λ = 0.001: not distinguishable" in verdict_text
    assert command == "python -m l2lab.train -m 'seed=0,1'"
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def test_mean_curve_averages_seeds_by_step_skipping_nan_and_keeping_a_steps_last_value():
    from l2lab.report.figures import mean_curve

    def run(points):
        return RunRecord("r", "n", "FINISHED", {}, 0.0, 0, None, {}, {"val/ce": points})

    runs = [run([(0, 1.0), (1, 2.0), (1, 4.0), (2, math.nan)]),  # step 1 logged twice
            run([(0, 3.0), (2, 5.0), (3, math.nan)]),
            run([])]
    steps, mean = mean_curve(runs, "val/ce")
    assert steps.tolist() == [0.0, 1.0, 2.0]  # step 3 has no finite value: left out
    assert mean.tolist() == [2.0, 4.0, 5.0]  # step 1: the last value of the one run with it
    assert mean_curve([run([(0, math.nan)])], "val/ce") is None


# --------------------------------------------------------------------------- layers


def _imported(package: str) -> dict[str, set[str]]:
    """Every module each file of ``l2lab.<package>`` imports (function bodies included)."""
    root = Path(__file__).resolve().parents[1] / "src" / "l2lab" / package
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        found[path.relative_to(root.parent).as_posix()] = names
    return found


def test_the_report_knows_no_store_and_tracking_builds_no_report():
    """design.md §9: ``report/`` takes plain records (``l2lab.records``) and its links from the
    caller, so it imports nothing of ``tracking/`` or MLflow; ``tracking/`` imports nothing of
    ``report/``."""
    def hits(package: str, banned: tuple[str, ...]) -> list[str]:
        return sorted(f"{f} imports {n}" for f, names in _imported(package).items()
                      for n in names if n.split(".")[0] in banned or n.startswith(banned))

    report = _imported("report")
    assert "report/stats.py" in report and "l2lab.records" in report["report/stats.py"]
    assert hits("report", ("l2lab.tracking", "mlflow")) == []
    assert hits("tracking", ("l2lab.report",)) == []


# --------------------------------------------------------------------------- degenerate sweeps


def rejected_run(lam: str, seed: int, reason: str) -> RunRecord:
    return RunRecord(f"r-{lam}-{seed}", f"lam={lam} seed={seed}", "FAILED",
                     {"regularization.lam": lam}, float(lam), seed, reason)


def test_an_error_shared_by_every_job_prints_once_with_the_count(tmp_path: Path) -> None:
    reason = "regularization.layers: pattern 'nope' matches no layer. Layer names: fc1, out."
    runs = [rejected_run(lam, s, reason) for lam in ("0.1", "0", "1", "0.01") for s in (1, 0)]
    text = format_table(summarize(runs), runs)
    assert text.count(reason) == 1
    assert f"FAILED  all 8 runs: {reason}" in text
    assert text.splitlines()[-1] == "  lowest mean val/ce: n/a (no finished runs)"  # no mark
    page = write_report(runs, tmp_path)["report"].read_text()
    assert page.count("matches no layer") == 1 and "(8 runs)" in page


def test_failed_runs_are_listed_in_sweep_order() -> None:
    # the store hands them back in start order; the listing follows λ, then seed
    runs = sweep_runs()[:2] + [rejected_run(lam, s, f"boom {lam} {s}")
                               for lam, s in (("1", 1), ("0.01", 2), ("1", 0), ("0.01", 0))]
    listed = [ln for ln in format_table(summarize(runs), runs).splitlines()
              if ln.startswith("FAILED")]
    assert [ln.split("  ")[1] for ln in listed] == [
        "lam=0.01 seed=0", "lam=0.01 seed=2", "lam=1 seed=0", "lam=1 seed=1"]


def test_a_lone_lambda_gets_no_mark_and_no_grid_edge_warning() -> None:
    # regularization.lam=-1,0.1: the rejected λ leaves one row, compared with nothing
    runs = [make_run("0.1", s, 0.2, 0.3 + s / 100, 0.9, [0.5, 0.25, 0.3]) for s in (1, 2)]
    runs += [rejected_run("-1", s, "regularization.lam must be >= 0") for s in (1, 2)]
    text = format_table(summarize(runs), runs)
    assert not [ln for ln in text.splitlines() if ln.startswith(("*", "~"))]
    assert "grid's largest" not in text and "nothing to compare" in text


def test_a_sweep_without_validation_split_is_judged_on_test(tmp_path: Path) -> None:
    # experiment=mnist1d: data.val_size=0, so the runs log train/* and test/* only
    runs = []
    for lam, test in (("0", 0.60), ("0.1", 0.45), ("1", 0.70)):
        for s in (0, 1):
            run = make_run(lam, s, 0.1, math.nan, 0.9, [])
            runs.append(RunRecord(run.run_id, run.name, "FINISHED", run.swept, run.lam, s,
                                  final={"train/ce": 0.1, "test/ce": test + 0.01 * s,
                                         "test/acc": 0.8}))
    text = format_table(summarize(runs), runs)
    assert "no finished runs" not in text
    assert ("No validation split (no run logged val/ce; data.val_size=0?): best λ chosen and "
            "judged on test/ce.") in text
    assert text.splitlines()[-1].startswith("* lowest mean test/ce: lam=0.1: clear (p = ")
    header, _, *rows = text.splitlines()[:5]
    assert "test/ce" in header.split() and header.endswith("test/ce 95% CI")
    assert "0.4550 ± 0.0071" in rows[1]  # λ = 0.1: the column it was judged on
    page = write_report(runs, tmp_path)["report"].read_text()
    assert 'id="no-validation"' in page and "Lowest mean final test/ce: <b>λ = 0.1</b>" in page
    assert "<th>test/ce</th>" in page


def test_the_effective_learning_rate_is_drawn_against_lam_per_condition(tmp_path):
    """weights/eff_lr/* (the layers a normalization follows) averaged per run, one line per
    condition at the mean over seeds; runs without it draw nothing and add no figure."""
    from l2lab.report import figures

    def run(lam: float, seed: int, bn: str, eff: dict[str, float]) -> RunRecord:
        final = {"train/ce": 0.1, "val/ce": 0.2, **{f"weights/eff_lr/{k}": v
                                                      for k, v in eff.items()}}
        return RunRecord(f"r{lam}{seed}{bn}", "n", "FINISHED",
                         {"regularization.lam": str(lam), "model.batchnorm": bn}, lam, seed,
                         final=final, history={"val/ce": [(0, 0.3), (1, 0.2)],
                                               "train/ce": [(0, 0.2), (1, 0.1)]})

    runs = [run(lam, s, "True", {"conv1": 0.01 * (1 + lam) * (1 + s), "conv2": 0.03})
            for lam in (0.0, 1.0) for s in (0, 1)]
    assert figures.eff_lr_of(runs[0]) == pytest.approx(0.02)
    fig = figures.plot_eff_lr(runs + [run(0.0, 0, "False", {})], tmp_path / "e.png")
    (ax,) = [a for a in fig.axes if a.get_legend_handles_labels()[0] or a.lines]
    (line,) = [ln for ln in ax.lines if ln.get_label() == "model.batchnorm=True"]
    assert list(line.get_ydata()) == pytest.approx([0.0225, 0.030])  # means over seeds
    assert ax.get_yscale() == "log"
    plain = [run(lam, s, "False", {}) for lam in (0.0, 1.0) for s in (0, 1)]
    assert "eff_lr" not in write_report(plain, tmp_path / "plain")
    assert write_report(runs, tmp_path / "bn")["eff_lr"].exists()

"""Tests for l2lab.report: statistics checked against hand-computed numbers, figures as PNGs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from l2lab.report import STAT_COLUMNS, RunRecord, format_table, summarize, write_report

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
        group=group,
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
            group={"regularization.lam": "1e-3"},
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
    assert list(summary.columns) == ["regularization.lam", *STAT_COLUMNS]
    assert summary["lam"].tolist() == [0.0, 1e-3, 0.1]
    assert summary["regularization.lam"].tolist() == ["0.0", "1e-3", "0.1"]
    assert summary["runs"].tolist() == [2, 2, 2]
    # r-fail never trained (no metrics): no part of any row; the KILLED run counts as failed
    assert summary["failed"].tolist() == [0, 0, 1]


def test_final_metric_means_and_sample_stds(summary: pd.DataFrame) -> None:
    r0 = row(summary, 0.0)
    assert r0["train/ce_mean"] == pytest.approx(0.11)
    assert r0["train/ce_std"] == pytest.approx(0.02 / SQRT2)
    assert r0["val/ce_mean"] == pytest.approx(0.62)
    assert r0["val/ce_std"] == pytest.approx(0.04 / SQRT2)
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
    for col in ("train/ce_std", "val/ce_std", "gap/ce_std", "val/acc_std", "best_epoch_std"):
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
    assert list(frame.columns) == ["regularization.lam", *STAT_COLUMNS]
    assert frame["lam"].tolist() == [0.0, 0.1]
    assert frame["regularization.lam"].tolist() == ["0.0", "0.1"]
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
    assert list(frame.columns[:3]) == ["regularization.lam", "data.train_size", "lam"]
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
    for col in ("runs", "train/ce", "val/ce", "gap/ce", "val/acc", "best val/ce", "best epoch"):
        assert col in header
    assert "FAILED  lam=1e-3 seed=3  (r-fail): CUDA out of memory" in text
    assert "KILLED  lam=0.1 seed=3  (r-0.1-3): no reason recorded" in text

    starred = [ln for ln in lines if ln.startswith("*") and "lowest" not in ln]
    assert len(starred) == 1 and "1e-3" in starred[0]
    assert "0.4300 ± 0.0283" in starred[0]  # val/ce
    assert "0.870 ± 0.014" in starred[0]  # val/acc, 3 decimals
    assert "2.5 ± 0.7" in starred[0]  # best epoch, 1 decimal
    # 0.62 - 0.43 = 0.19 > hypot(0.0283, 0.0283) = 0.04: a clear best
    assert lines[-1] == ("* lowest mean val/ce: lam=1e-3 (clear: 0.1900 below the next "
                         "(lam=0.0), more than their combined std 0.0400)")
    # Rows are in λ order and columns line up (fixed width).
    rows = [ln for ln in lines[2:5]]
    assert [r.split()[1] if r.startswith("*") else r.split()[0] for r in rows] == [
        "0.0",
        "1e-3",
        "0.1",
    ]
    assert len({len(r) for r in [header, *rows]}) == 1


def test_format_table_single_run_and_all_failed() -> None:
    one = [make_run("0.01", 7, 0.2, 0.3, 0.9, [0.5, 0.25, 0.3])]
    text = format_table(summarize(one), one)
    assert "0.3000" in text and "±" not in text
    assert "FAILED" not in text
    assert text.splitlines()[-1] == ("* lowest mean val/ce: lam=0.01 (the only row with "
                                     "finished runs)")

    failed = [
        RunRecord("a", "lam=0 seed=1", "FAILED", {"regularization.lam": "0.0"}, 0.0, 1, "boom"),
        RunRecord("b", "lam=1 seed=1", "FAILED", {"regularization.lam": "1.0"}, 1.0, 1, None),
    ]
    text = format_table(summarize(failed), failed)
    assert "FAILED  lam=0 seed=1  (a): boom" in text
    assert "(no runs)" in text  # neither trained: no rows
    assert "no finished runs" in text.splitlines()[-1]
    assert not [ln for ln in text.splitlines() if ln.startswith("*") and "lowest" not in ln]


def assert_report(paths: dict[str, Path], out_dir: Path) -> None:
    assert set(paths) == {"summary", "lambda_curve", "learning_curves", "weight_norms"}
    assert paths["summary"] == out_dir / "summary.csv"
    for key in ("lambda_curve", "learning_curves", "weight_norms"):
        path = paths[key]
        assert path == out_dir / "figures" / f"{key}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 5_000
    assert plt.get_fignums() == []  # every figure was closed


def test_write_report_roundtrip(tmp_path: Path) -> None:
    runs = sweep_runs()
    out_dir = tmp_path / "nested" / "report"
    paths = write_report(runs, out_dir)
    assert_report(paths, out_dir)

    expected = summarize(runs)
    back = pd.read_csv(paths["summary"])
    assert list(back.columns) == list(expected.columns)
    np.testing.assert_allclose(
        back["regularization.lam"].astype(float), expected["lam"], rtol=0, atol=0
    )
    numeric = list(STAT_COLUMNS)
    np.testing.assert_allclose(
        back[numeric].to_numpy(dtype=float),
        expected[numeric].to_numpy(dtype=float),
        rtol=1e-12,
        equal_nan=True,
    )


def test_write_report_single_run(tmp_path: Path) -> None:
    runs = [make_run("0.01", 7, 0.2, 0.3, 0.9, [0.5, 0.25, 0.3])]
    assert_report(write_report(runs, tmp_path), tmp_path)


def test_write_report_all_failed(tmp_path: Path) -> None:
    runs = [
        RunRecord("a", "lam=0 seed=1", "FAILED", {"regularization.lam": "0.0"}, 0.0, 1, "boom"),
        RunRecord("b", "lam=1 seed=1", "KILLED", {"regularization.lam": "1.0"}, 1.0, 1),
    ]
    paths = write_report(runs, tmp_path)
    assert_report(paths, tmp_path)
    back = pd.read_csv(paths["summary"])
    assert back.empty  # neither run trained an epoch: no rows, and placeholder figures


def test_write_report_zero_lambda_only_and_extra_keys(tmp_path: Path) -> None:
    zero = [make_run("0", s, 0.1, 0.5, 0.8, [0.7, 0.5]) for s in (1, 2)]
    assert_report(write_report(zero, tmp_path / "zero"), tmp_path / "zero")

    extra = [
        make_run(lam, 1, 0.3, 0.5 + float(lam), 0.8, [0.6, 0.5], extra_group={"data.train_size": n})
        for lam in ("0.0", "0.001", "0.1")
        for n in ("500", "1000")
    ]
    assert_report(write_report(extra, tmp_path / "extra"), tmp_path / "extra")


def test_write_report_empty(tmp_path: Path) -> None:
    paths = write_report([], tmp_path)
    assert_report(paths, tmp_path)
    assert "no runs" in format_table(summarize([]), [])


def _two_rows(best: tuple[float, float, float], nxt: tuple[float, float, float]) -> list:
    """Two λ with two seeds each: (mean-ish) val/ce values chosen per seed."""
    runs = []
    for lam, vals in (("0.01", best), ("0.1", nxt)):
        for seed, v in enumerate(vals[:2]):
            runs.append(make_run(lam, seed, 0.1, v, 0.9, [v]))
    return runs


def test_best_row_is_clear_only_beyond_the_combined_std() -> None:
    noisy = _two_rows((0.40, 0.50, 0), (0.46, 0.48, 0))  # means 0.45 vs 0.47, stds 0.07, 0.014
    text = format_table(summarize(noisy), noisy)
    last = text.splitlines()[-1]
    assert last.startswith("~ lowest mean val/ce: lam=0.01 (within noise: 0.0200 below the next "
                           "(lam=0.1), not more than their combined std 0.0721)"), last
    assert not [ln for ln in text.splitlines() if ln.startswith("*")]
    assert [ln for ln in text.splitlines() if ln.startswith("~")][0].split()[1] == "0.01"

    clear = _two_rows((0.40, 0.41, 0), (0.50, 0.52, 0))
    last = format_table(summarize(clear), clear).splitlines()[-1]
    assert last.startswith("* lowest mean val/ce: lam=0.01 (clear: 0.1050 below"), last

    single = [make_run("0.01", 0, 0.1, 0.40, 0.9, [0.4]), make_run("0.1", 0, 0.1, 0.9, 0.9, [0.9])]
    last = format_table(summarize(single), single).splitlines()[-1]
    assert last.startswith("~ lowest mean val/ce: lam=0.01 (not a clear winner") and \
        "no seed-to-seed std" in last

"""The metric names a run logs (design.md §4) and which view shows which of them.

Every line, table, figure and read-back that picks metrics by name reads its list here, so that a
metric added to a view (or a new penalty's term) is one edit, and the views cannot drift apart.
Standard library only: the report, the console and the fast command paths import it.
"""

from __future__ import annotations

from collections.abc import Mapping

TRAIN_LOSS = "train/loss"  # what the optimizer minimises; its steps mark an epoch as logged
TRAIN_CE = "train/ce"
TRAIN_L2 = "train/l2"
TRAIN_LR = "train/lr"  # each network's lr at the epoch's end (a schedule moves it)
VAL_CE = "val/ce"
VAL_ACC = "val/acc"
GAP_CE = "gap/ce"
GAP_ACC = "gap/acc"
#: The training subset in eval mode at epoch end (design.md §4); gap/* is against these where
#: they are logged, else against the running train means (``trainer.eval_train=false``).
TRAIN_EVAL_CE = "train_eval/ce"
TRAIN_EVAL_ACC = "train_eval/acc"
TEST_CE = "test/ce"
TEST_ACC = "test/acc"
WEIGHT_NORM_TOTAL = "weights/sq_norm_total"
#: ``weights/sq_norm/<layer>``: one layer's ||W||_F² (the figure sums the layers every run has).
WEIGHT_NORM_LAYER = "weights/sq_norm/"
EFF_LR = "weights/eff_lr/"  # + the name of a selected layer that a normalization follows

#: The final metrics the sweep summary (``summary.csv``, the table) gives per row, in column
#: order; also a reused run's line.
SUMMARY: tuple[str, ...] = (TRAIN_CE, VAL_CE, GAP_CE, VAL_ACC)
#: Joins the summary when some run of it has a test split.
SUMMARY_TEST: tuple[str, ...] = (TEST_CE, TEST_ACC)
#: The terminal table's metric columns (before best val/ce and its epoch), when present.
TABLE: tuple[str, ...] = (*SUMMARY, TEST_ACC)
#: A sweep job's line when it ends: what its row of the table shows.
JOB_LINE: tuple[str, ...] = TABLE
#: A single run's closing line (design.md §4: train/ce, val/ce, gap/ce and test/acc).
RUN_LINE: tuple[str, ...] = (TRAIN_CE, VAL_CE, GAP_CE, TEST_ACC)
#: A single run's line per epoch.
EPOCH_LINE: tuple[str, ...] = (TRAIN_CE, TRAIN_L2, TRAIN_EVAL_CE, VAL_CE, GAP_CE, VAL_ACC)
#: What a line that shows gap/* adds when the gap is against the running train means.
RUNNING_GAP = "(gap/* against the running train means: trainer.eval_train=false)"
#: The learning-curve panels of the figures, in panel order.
CURVES: tuple[str, ...] = (TRAIN_CE, VAL_CE)
#: The per-epoch histories read back for a report: the curves, the weight-norm figure, and
#: val/ce's lowest point (best val/ce and its epoch).
HISTORY: tuple[str, ...] = (*CURVES, WEIGHT_NORM_TOTAL)


def running_gap(metrics: Mapping[str, float]) -> bool:
    """Whether a run's gap/* is against the running train means (no eval-mode pass)."""
    return GAP_CE in metrics and TRAIN_EVAL_CE not in metrics


def shown(metrics: Mapping[str, float], names: tuple[str, ...]) -> str:
    """``"train/ce=0.1234  val/ce=..."``: the ``names`` a line shows, those present, 4 decimals
    (the one format of every such line); a gap against the running train means says so."""
    text = "  ".join(f"{k}={metrics[k]:.4f}" for k in names if k in metrics)
    if GAP_CE in names and running_gap(metrics):
        text += "  " + RUNNING_GAP
    return text

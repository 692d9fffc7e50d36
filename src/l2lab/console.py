"""What the researcher reads: harness lines on the console (and in the run's ``train.log``), with
the libraries' chatter turned down. Light: imported by every command before anything heavy."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping

from l2lab import metrics as mt

log = logging.getLogger("l2lab")
SHOWN = mt.JOB_LINE  # a job's line (the name resume.py reads)


def quiet_libraries() -> None:
    """Lightning's info lines (GPU available, tips), MLflow's ("Creating initial MLflow database
    tables") and deprecation chatter drown the lines a researcher reads; keep warnings and
    errors. MLflow configures its own logger when imported, so it is imported first."""
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow  # noqa: F401  (applies its logging config, which the lines below override)

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "mlflow",
                 "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def say(message: str, *, err: bool = False) -> None:
    """A harness line: printed for the researcher, and logged into the run's ``train.log``
    (Hydra's job logging sends INFO records to the file only)."""
    print(message, file=sys.stderr if err else sys.stdout, flush=True)
    log.info(message)


def job_line(label: str, run_id: str, epochs: int, metrics: Mapping[str, float]) -> str:
    """A sweep job's one line when it ends: its number and name, run id and final numbers."""
    return "  ".join(x for x in (f"l2lab: {label}: run {run_id[:8]}, {epochs} epochs",
                                 mt.shown(metrics, mt.JOB_LINE)) if x)

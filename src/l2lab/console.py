"""What the researcher reads: harness lines on the console (and in the run's ``train.log``), with
the libraries' chatter turned down. Light: imported by every command before anything heavy."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping

from l2lab import metrics as mt

log = logging.getLogger("l2lab")


#: Third-party warnings that l2lab cannot fix, each named by (message, category, the module that
#: reports it; regular expressions matched from the start, as ``warnings.filterwarnings`` does).
#: The only warnings a run silences, and the only ones the tests ignore (``tests/conftest.py``):
#: nothing is muted by category, so a library's deprecation of a name l2lab uses stays visible
#: (``tests/test_compat.py`` makes it an error).
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # MLflow 3's SQL store asks SQLAlchemy 2 for its deprecated ``noload`` loader
    (r"The ``noload`` loader strategy is deprecated", DeprecationWarning,
     r"mlflow\.store\.tracking\.sqlalchemy_store"),
    # Lightning's pytree helper builds torch's deprecated LeafSpec
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     r"pytorch_lightning\.utilities\._pytree"),
    # conf/hydra/launcher/{ray,submitit_local}.yaml extend the plugins' schemas of the same name
    # on purpose; Hydra reports it at a fixed depth of its stack, so in no fixed module
    (r"(?s).*is validated against ConfigStore schema", UserWarning, ""),
)


def quiet_warnings() -> None:
    """Ignore :data:`KNOWN_WARNINGS`, and nothing else."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_libraries() -> None:
    """Lightning's info lines (GPU available, tips) and MLflow's ("Creating initial MLflow
    database tables") drown the lines a researcher reads; keep warnings and errors, less the
    known third-party ones. MLflow sets its own logger's level from ``MLFLOW_LOGGING_LEVEL``
    when it is imported, so it is not imported here (a training run on the default store never
    imports it): the variable is set instead, unless the researcher set it."""
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "mlflow",
                 "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_warnings()


def say(message: str, *, err: bool = False) -> None:
    """A harness line: printed for the researcher, and logged into the run's ``train.log``
    (Hydra's job logging sends INFO records to the file only)."""
    print(message, file=sys.stderr if err else sys.stdout, flush=True)
    log.info(message)


def job_line(label: str, run_id: str, epochs: int, metrics: Mapping[str, float]) -> str:
    """A sweep job's one line when it ends: its number and name, run id and final numbers."""
    return "  ".join(x for x in (f"l2lab: {label}: run {run_id[:8]}, {epochs} epochs",
                                 mt.shown(metrics, mt.JOB_LINE)) if x)

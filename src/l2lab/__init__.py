"""l2lab: see how selective L2 regularization trades overfitting for underfitting."""

from pathlib import Path

__version__ = "0.1.0"

#: The top-level ``conf/`` folder (the package is installed editable, so it stays user-editable).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A bad user input, reported as one clear paragraph before any training starts."""


def __getattr__(name: str):
    """``l2lab.load_runs`` without importing pandas or MLflow on ``import l2lab``."""
    if name == "load_runs":
        from l2lab.runs import load_runs

        return load_runs
    raise AttributeError(f"module 'l2lab' has no attribute {name!r}")


__all__ = ["CONF_DIR", "ConfigError", "load_runs"]

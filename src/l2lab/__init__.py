"""l2lab: see how selective L2 regularization trades overfitting for underfitting."""

from l2lab.base import CONF_DIR, ConfigError

__version__ = "0.1.0"


def __getattr__(name: str):
    """``l2lab.load_runs``, ``l2lab.train`` without importing pandas,
    torch or MLflow on ``import l2lab``."""
    if name == "load_runs":
        from l2lab.tracking.runs import load_runs

        return load_runs
    if name == "train":
        from l2lab.train import train

        return train
    raise AttributeError(f"module 'l2lab' has no attribute {name!r}")


__all__ = ["CONF_DIR", "ConfigError", "load_runs", "train"]

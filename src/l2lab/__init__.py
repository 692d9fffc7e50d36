"""l2lab: see how selective L2 regularization trades overfitting for underfitting."""

from l2lab.base import CONF_DIR, ConfigError
from l2lab.compat.torchmetrics import lean_torchmetrics

# Before anything imports Lightning (core/module.py does at module level): Lightning's import of
# torchmetrics then skips torchmetrics' optional backends (torchvision, scipy.signal, matplotlib),
# seconds of every command's start-up. A no-op when torchmetrics is imported already.
lean_torchmetrics()

__version__ = "0.1.0"


def __getattr__(name: str):
    """``l2lab.load_runs`` and ``l2lab.train_run`` without importing pandas, torch or MLflow on
    ``import l2lab``. ``l2lab.train`` is the module (``python -m l2lab.train``) and nothing else:
    a lazy attribute of that name would be replaced by the module on any ``import l2lab.train``."""
    if name == "load_runs":
        from l2lab.tracking.runs import load_runs

        return load_runs
    if name == "train_run":
        from l2lab.train import train

        return train
    raise AttributeError(f"module 'l2lab' has no attribute {name!r}")


__all__ = ["CONF_DIR", "ConfigError", "load_runs", "train_run"]

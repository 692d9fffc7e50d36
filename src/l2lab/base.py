"""What every module shares: the config folder and the error for bad input (kept apart from the
package's ``__init__``, which re-exports the public names, so that no import cycle goes through
it)."""

from pathlib import Path

#: The top-level ``conf/`` folder (the package is installed editable, so it stays user-editable).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A bad user input, reported as one clear paragraph before any training starts."""


def last_checkpoint(output_dir: Path) -> Path:
    """Where a run keeps the checkpoint of its last completed epoch (``resume`` continues from
    it; a stack writes one per network, in each job's folder)."""
    return Path(output_dir) / "checkpoints" / "last.ckpt"

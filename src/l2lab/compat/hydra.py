"""Hydra's private names that l2lab uses (the grouped sweeper and the vectorized launcher).

Checked against hydra-core 1.3.2 and 1.3.8 (``pyproject.toml``: ``hydra-core>=1.3.2,<1.4``).
"""

from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: F401 (re-exported)

CHECKED_WITH = "hydra-core 1.3.8"


def flush_loggers() -> None:
    """What ``run_job`` does after a job: flush every logging handler (a job's log file is
    complete when its JobReturn is)."""
    from hydra.core.utils import _flush_loggers

    _flush_loggers()

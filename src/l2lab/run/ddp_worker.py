"""``python -m l2lab.run.ddp_worker HANDOFF``: rank 1..N-1 of a ``trainer.devices=N`` run.

Rank 0 (``l2lab.run.distributed``) starts these with rank 0's effective config, output folder and
checkpoint in the handoff file. A rank trains the same stack of one through the same engine, in
step with rank 0, and records nothing: only rank 0 talks to MLflow.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf


def worker_main(handoff: Path) -> None:
    """Rank 0's config, data and network, trained in step with it."""
    from l2lab.base import last_checkpoint
    from l2lab.console import quiet_libraries
    from l2lab.core.data import load_data
    from l2lab.run import engine, lifecycle
    from l2lab.run.recorder import Recorder
    from l2lab.tracking.tracker import NullTracker

    quiet_libraries()
    spec = OmegaConf.load(handoff)
    cfg = spec.config
    with lifecycle.interrupts():
        splits = load_data(cfg.data)
        module = engine.stack(cfg, [engine.build_member(cfg, splits)], splits.train[0])
        out = Path(spec.output_dir)
        recorder = Recorder([NullTracker()], [last_checkpoint(out)])
        engine.lightning_fit(cfg, module, splits, recorder, [int(cfg.seed)], out,
                             Path(spec.ckpt) if spec.ckpt else None)


if __name__ == "__main__":
    try:
        worker_main(Path(sys.argv[1]))
    except BaseException as e:  # noqa: BLE001  (an interrupt too: rank 0 reports the run)
        from l2lab.run.lifecycle import Interrupted

        sys.exit(e.exit_code if isinstance(e, Interrupted) else 1)

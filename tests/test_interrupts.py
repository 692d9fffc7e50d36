"""Stops at any point lose nothing: the last completed epoch is resumable, exactly; a stopped
sweep continues as one sweep."""

from __future__ import annotations

import signal

import pytest
from conftest import make_cfg, runs_of

from l2lab.run import lifecycle
from l2lab.run.resume import epochs_done
from l2lab.train import train

EPOCHS = ["trainer.max_epochs=6"]  # TINY: 3 batches an epoch


def _stop_at_batch(monkeypatch, n: int) -> None:
    """SIGINT to this process as the n-th training batch (1-based) is taken: mid-epoch."""
    from l2lab.core import data

    original, seen = data.StackedBatches.__iter__, [0]

    def batches(self):
        for batch in original(self):
            seen[0] += 1
            if seen[0] == n:
                signal.raise_signal(signal.SIGINT)
            yield batch

    monkeypatch.setattr(data.StackedBatches, "__iter__", batches)


def _histories(client, rid: str) -> dict[str, list[tuple[int, float]]]:
    keys = ("train/loss", "train/ce", "val/ce", "val/acc", "weights/sq_norm_total", "test/acc")
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(rid, k))
            for k in keys}


@pytest.mark.parametrize("batch, completed", [(11, 3), (2, 0)])
def test_a_run_stopped_anywhere_resumes_to_the_numbers_of_one_never_stopped(
        tmp_path, store, client, monkeypatch, batch, completed):
    uri = f"tracking.uri={store}"
    train(make_cfg(uri, *EPOCHS, "experiment_name=whole"), overrides=EPOCHS,
          output_dir=tmp_path / "whole")
    (whole,) = runs_of(client)
    _stop_at_batch(monkeypatch, batch)
    with pytest.raises(lifecycle.Interrupted):
        train(make_cfg(uri, *EPOCHS), overrides=EPOCHS, output_dir=tmp_path / "stopped")
    monkeypatch.undo()
    (stopped,) = [r for r in runs_of(client) if r.info.run_id != whole.info.run_id]
    rid = stopped.info.run_id
    assert client.get_run(rid).info.status == "KILLED"
    # no periodic save was due (flush_every_s=5): the stop wrote the last completed epoch
    ckpt = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert epochs_done(ckpt) == completed and ckpt.exists() == bool(completed)
    assert [s for s, _ in _histories(client, rid)["train/loss"]] == list(range(completed))
    ov = [f"resume={rid}"]
    train(make_cfg(uri, *EPOCHS, *ov), overrides=ov)
    assert client.get_run(rid).info.status == "FINISHED"
    assert _histories(client, rid) == _histories(client, whole.info.run_id)  # every step once

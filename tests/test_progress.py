"""The live progress line (epoch i/N, jobs, elapsed, ETA), the single-run summary's training-view
link, and plain (ANSI-free) Optuna log lines."""

from __future__ import annotations

import io
import logging
import re
from types import SimpleNamespace

from conftest import make_cfg

from l2lab.run import progress


def test_line_format_and_eta() -> None:
    assert progress.line("run 1a2b3c4d", 10, 40, 1, 20.0) == \
        "l2lab: run 1a2b3c4d: epoch 10/40, 1 job, 00:20 elapsed, ETA 01:00"
    # a resumed run (started at epoch 30): the rate is that of the epochs trained since
    assert progress.line("stack 1/1", 35, 40, 24, 10.0, start=30) == \
        "l2lab: stack 1/1: epoch 35/40, 24 jobs in the stack, 00:10 elapsed, ETA 00:10"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(cb: progress.Progress, epochs: int) -> None:
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=0)
    cb.on_train_start(trainer, None)
    for e in range(epochs):
        trainer.current_epoch = e
        cb.on_train_epoch_end(trainer, None)
    cb.on_train_end(trainer, None)


def test_a_terminal_gets_a_bar_updated_in_place_and_a_log_gets_plain_lines(monkeypatch, caplog):
    monkeypatch.delenv(progress.ENV, raising=False)
    tty = _Tty()
    _drive(progress.Progress("stack 1/1", 24, 5, stream=tty, every_s=0), 5)
    out = tty.getvalue()
    assert out.startswith("\rl2lab: stack 1/1 ×24:") and "/5 [" in out  # a tqdm bar, in place
    assert "epoch 2/5" not in out  # no plain lines on a terminal

    plain = io.StringIO()
    with caplog.at_level(logging.INFO, logger="l2lab"):
        _drive(progress.Progress("run 1a2b3c4d", 1, 5, stream=plain, every_s=0), 5)
    lines = plain.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [
        f"l2lab: run 1a2b3c4d: epoch {i}/5" for i in (1, 2, 3, 4)]  # not the last: done
    assert "\r" not in plain.getvalue() and "\x1b" not in plain.getvalue()
    assert [r.getMessage() for r in caplog.records] == lines  # also into train.log

    quiet = io.StringIO()
    _drive(progress.Progress("run x", 1, 50, stream=quiet, every_s=3600), 50)
    assert quiet.getvalue() == ""  # every ~10 s, not every epoch


def test_a_run_shows_progress_and_links_the_training_view(tmp_path, store, client, monkeypatch,
                                                           capfd):
    from l2lab.train import train

    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.setenv(progress.EVERY_ENV, "0")
    monkeypatch.chdir(tmp_path)
    final = train(make_cfg(f"tracking.uri={store}"), output_dir=tmp_path / "run")
    out, err = capfd.readouterr()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    rid, exp = run.info.run_id, run.info.experiment_id
    assert re.search(rf"l2lab: run {rid[:8]}: epoch 1/3, 1 job, \d\d:\d\d elapsed, ETA ", err), err
    assert f"UI: http://127.0.0.1:5000/#/experiments/{exp}/runs/{rid}" \
           f"?workflowType=machine_learning" in out
    assert f"test/acc={final['test/acc']:.4f}" in out  # digits: their held-out test split


def test_optuna_log_lines_carry_no_colour_codes() -> None:
    import optuna

    from l2lab.run.sweep import _quiet_optuna

    optuna.logging.get_logger("optuna")  # installs optuna's colorlog handler
    _quiet_optuna()  # pytest's stderr is not a terminal
    handlers = logging.getLogger("optuna").handlers
    assert handlers
    record = logging.LogRecord("optuna", logging.INFO, __file__, 1, "Trial 0 finished", None,
                               None)
    for h in handlers:
        assert "\x1b[" not in h.format(record) and "Trial 0 finished" in h.format(record)


def test_a_vectorized_sweeps_stacks_know_their_place_in_the_sweep(monkeypatch) -> None:
    monkeypatch.setattr(progress, "SWEEP", {})
    progress.sweep_started(45)
    plain = io.StringIO()
    for _ in range(2):  # two stacks of 16, each a group of its own ("stack 1/1")
        _drive(progress.Progress("stack 1/1", 16, 4, stream=plain, every_s=0), 4)
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("l2lab: stack 1, jobs 1-16 of 45: epoch 1/4, 16 jobs in the stack")
    assert lines[3].startswith("l2lab: stack 2, jobs 17-32 of 45: epoch 1/4")
    assert all(", sweep ETA " in ln for ln in lines) and progress.SWEEP["done"] == 32

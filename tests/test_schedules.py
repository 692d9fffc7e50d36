"""Learning-rate schedules (``scheduler=...``): torch's own classes, each network of a stack on its
own schedule from its own base lr, equal to its ordinary run bit for bit on CPU, and resumed with
no jump."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg
from test_engine import _assert_same_run, _history, _ordinary_and_stacked
from test_interrupts import _histories, _whole_and_stopped

from l2lab import ConfigError, reproduce
from l2lab.config import schema
from l2lab.core.module import SegmentedOptimizer
from l2lab.core.schedules import NetworkSchedulers, scheduler_factory
from l2lab.run.resume import logged_config as _logged_config
from l2lab.train import train

# TINY has 3 batches an epoch (120 / 40); cosine with 4 steps of warm-up, per step
COSINE = ["scheduler=cosine", "scheduler.interval=step", "scheduler.warmup=4",
          "scheduler.eta_min=0.001"]


@pytest.mark.parametrize("overrides, key, says", [
    (["scheduler=cosine", "scheduler.interval=hourly"], "scheduler.interval", "step, epoch"),
    (["scheduler=cosine", "scheduler.warmup=3"], "scheduler.warmup", "trainer.max_epochs"),
    (["scheduler=cosine", "scheduler.warmup_start_factor=0"], "scheduler.warmup_start_factor",
     "(0, 1]"),
    (["scheduler=step", "scheduler.gamma=-1"], "scheduler.gamma", "> 0"),
    (["scheduler=onecycle", "scheduler.anneal_strategy=cosine"], "scheduler.anneal_strategy",
     "cos, linear"),
    (["scheduler=onecycle", "scheduler.pct_start=1"], "scheduler.pct_start", "(0, 1)"),
])
def test_a_bad_schedule_is_one_paragraph_naming_the_key_and_what_it_may_be(overrides, key, says):
    with pytest.raises(ConfigError) as e:
        schema.validate(make_cfg(*overrides))
    assert str(e.value).startswith(key) and says in str(e.value) and "\n" not in str(e.value)


def test_the_default_is_no_schedule_and_each_kind_is_torchs_class():
    cfg = make_cfg()
    assert cfg.scheduler.name == "none"
    schema.validate(cfg)
    assert scheduler_factory("none", {}, 9) is None
    w = torch.nn.Parameter(torch.zeros(2))
    kinds = {"cosine": (dict(warmup=0, warmup_start_factor=0.1, eta_min=0.0),
                        torch.optim.lr_scheduler.CosineAnnealingLR),
             "step": (dict(step_size=2, gamma=0.5), torch.optim.lr_scheduler.StepLR),
             "onecycle": (dict(pct_start=0.3, anneal_strategy="cos", div_factor=25.0,
                               final_div_factor=1e4, three_phase=False),
                          torch.optim.lr_scheduler.OneCycleLR)}
    for name, (settings, cls) in kinds.items():
        assert type(scheduler_factory(name, settings, 9)(torch.optim.SGD([w], lr=0.1))) is cls
    warm = scheduler_factory("cosine", dict(warmup=2, warmup_start_factor=0.5, eta_min=0.0), 6)
    opt = torch.optim.SGD([w], lr=0.1)
    sched = warm(opt)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # linear from 0.05 to 0.1 over 2 steps, then the cosine from 0.1 over the 4 left
    assert lrs[:3] == pytest.approx([0.05, 0.075, 0.1])
    assert lrs[2:] == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 4)) / 2
                                     for t in range(5)])


def test_a_run_on_a_schedule_cannot_be_resumed_for_more_epochs():
    from l2lab.run.resume import resume_config

    ov = ["trainer.max_epochs=6", "resume=abc"]
    with pytest.raises(ConfigError, match="trainer.max_epochs cannot change .*scheduler=cosine"):
        resume_config(make_cfg(*COSINE, *ov), ov, make_cfg(*COSINE))
    assert resume_config(make_cfg(*ov), ov, make_cfg()).trainer.max_epochs == 6  # no schedule


def test_jobs_on_one_schedule_stack_whatever_their_lr_and_other_schedules_do_not():
    from l2lab.config.stackable import group_key

    def key(*ov: str) -> str | None:
        return group_key(make_cfg(*ov))

    assert key(*COSINE, "optimizer.lr=0.1", "seed=1") == key(*COSINE) is not None
    assert key(*COSINE) not in (key(), key(*COSINE[:-1]), key("scheduler=step"),
                                key(*COSINE, "scheduler.interval=epoch"))


def test_each_segment_follows_its_own_schedule_and_its_state_splits_per_network():
    """Three networks, two optimizer settings: the schedule of each run of equal settings
    starts from its own lr; the state has one entry per network, and a rebuilt optimizer
    loaded from it is back at the lr the schedule had reached (not at its base lr)."""
    params = [torch.nn.Parameter(torch.zeros(3, 4))]
    make = scheduler_factory("step", dict(step_size=1, gamma=0.5), 5)

    def segmented() -> SegmentedOptimizer:
        return SegmentedOptimizer(params, torch.optim.SGD, [(0, 2, {"lr": 0.2}),
                                                            (2, 3, {"lr": 0.05})])

    opt = segmented()
    sched = NetworkSchedulers(opt, make, 3, [(a, b, o) for a, b, _, o in opt.segments])
    for _ in range(2):
        params[0].grad = torch.ones(3, 4)
        opt.step()
        sched.step()
    assert opt.lrs() == sched.lrs() == [0.05, 0.05, 0.0125]
    state = sched.state_dict()
    assert len(state["networks"]) == 3 and state["networks"][2]["base_lrs"] == [0.05]
    again = segmented()
    assert again.lrs() == [0.2, 0.2, 0.05]
    NetworkSchedulers(again, make, 3, [(a, b, o) for a, b, _, o in again.segments]) \
        .load_state_dict(state)
    assert again.lrs() == [0.05, 0.05, 0.0125]
    assert sched.at([2])["networks"] == [state["networks"][2]]


@pytest.mark.parametrize("sched", [
    COSINE, ["scheduler=onecycle"],
    ["scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5"]],
    ids=["cosine", "onecycle", "step-per-epoch"])
def test_a_stack_on_a_schedule_equals_its_ordinary_runs_exactly(tmp_path, store, sched):
    """λ, seed and lr per network (two optimizer segments), each on its own schedule, and a
    network that diverges in epoch 0 and leaves the stack (the optimizer and the schedules are
    rebuilt without it): every metric (train/lr included) and the final weights, ==."""
    jobs = [["regularization.lam=0.01", "seed=0"], ["regularization.lam=0.3", "seed=1"],
            ["regularization.lam=0.01", "seed=1", "optimizer.lr=0.1"]]
    tiny = ["data.train_size=120", "data.val_size=60", "data.batch_size=40",
            "model.hidden=[32]", "trainer.max_epochs=4"]
    client, pairs, _ = _ordinary_and_stacked(
        tmp_path, store, jobs, *tiny, *sched,
        dying=[["regularization.lam=0.1", "seed=2", "optimizer.lr=1e30"]])
    for ordinary, child in pairs:
        _assert_same_run(client, ordinary, child, tmp_path)
    lrs = [[v for _, v in _history(client, o.info.run_id, "train/lr")] for o, _ in pairs]
    assert len(lrs[0]) == 4 and len(set(lrs[0])) == 4  # it moves every epoch
    assert lrs[0] == lrs[1] and lrs[2] != lrs[0]  # from each network's own base lr
    if sched == COSINE:  # at the end of epoch e, 3(e+1) steps; the cosine starts after 4
        t = [3 * (e + 1) - 4 for e in range(4)]
        want = [0.001 + (0.05 - 0.001) * (1 + math.cos(math.pi * s / 8)) / 2 for s in t]
        want[0] = 0.05 * (0.1 + 0.9 * 3 / 4)  # still warming up: LinearLR's 3rd of 4 steps
        assert lrs[0] == pytest.approx(want)


def test_a_scheduled_run_stopped_and_resumed_equals_one_never_stopped(
        tmp_path, store, client, monkeypatch):
    """Stopped in its third epoch, resumed from its last checkpoint (two epochs, six steps in:
    mid-cosine): the schedule goes on where it stood, every epoch's numbers as if never
    stopped."""
    uri = f"tracking.uri={store}"
    ov = ["trainer.max_epochs=4", *COSINE]
    whole, rid = _whole_and_stopped(tmp_path, store, client, monkeypatch, ov, 8)
    again = [f"resume={rid}"]  # the logged config, its scheduler node included
    train(make_cfg(uri, *ov, *again), overrides=again)
    assert client.get_run(rid).info.status == "FINISHED"
    for key in ("train/lr", *_histories(client, rid)):
        assert _history(client, rid, key) == _history(client, whole, key), key
    # the logged config holds the scheduler node: reproduce trains the same schedule again
    logged = _logged_config(client, whole)
    assert logged["scheduler"]["name"] == "cosine" and logged["scheduler"]["warmup"] == 4
    assert reproduce.main([whole, "--check", "--tracking-uri", store,
                           "--out", str(tmp_path / "again")]) == 0

"""``data.augment``: crop and flip for images, a circular shift for signals, on the training
batches only, each network from its own seed's draws: a child of a stack equals its ordinary run
bit for bit on CPU (whole runs, ==), a stopped and resumed run equals one never stopped, and
the default changes nothing (a run's numbers and config hash as before the key existed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg
from test_engine import _assert_same_run, _ordinary_and_stacked
from test_interrupts import _histories, _whole_and_stopped

from l2lab import ConfigError
from l2lab.config import schema
from l2lab.config.stackable import group_key
from l2lab.core import reference
from l2lab.core.augment import EpochAugment, augment, resolve_pad
from l2lab.core.data import StackedBatches
from l2lab.core.module import L2Module
from l2lab.tracking.runs import config_hash
from l2lab.train import train

CNN = ["model=cnn", "model.channels=[4,8]", "model.hidden=[16]"]
AUG = ["data.augment=true", "data.augment_pad=2"]


def _batches(x: torch.Tensor, seeds: list[int], augments: list[bool] | None, epoch: int = 0,
             pad: int = 2) -> list[torch.Tensor]:
    loader = StackedBatches(x, torch.zeros(len(x), dtype=torch.long), 8, seeds,
                            augments=augments, pad=pad)
    loader.sampler.set_epoch(epoch)
    return [xb for xb, _ in loader]


def test_crop_and_flip_are_the_documented_ones_example_by_example():
    """The batch path's gathers against the plain loop's per-example crop, flip and roll."""
    x = torch.randn(6, 3, 8, 8)
    offsets, flips = EpochAugment(5, 2).draws(6, 3, image=True)
    assert offsets.shape == (6, 2) and offsets.min() >= 0 and offsets.max() <= 4
    got = augment(x, torch.from_numpy(offsets), torch.from_numpy(flips), 2)
    assert torch.equal(got, reference.augmented(x, offsets, flips.astype(np.int64), 2))
    first = F.pad(x[0], (2, 2, 2, 2))[:, offsets[0, 0]:offsets[0, 0] + 8,
                                      offsets[0, 1]:offsets[0, 1] + 8]
    assert torch.equal(got[0], first.flip(-1) if flips[0] else first)
    assert (got == 0).any() and not torch.equal(got, x)  # padding shows, something moved
    signal = torch.randn(6, 1, 40)
    offsets, flips = EpochAugment(5, 4).draws(6, 0, image=False)
    got = augment(signal, torch.from_numpy(offsets), torch.from_numpy(flips), 4)
    for i in range(6):  # MNIST-1D's own translate: a circular shift, nothing lost
        assert torch.equal(got[i], torch.roll(signal[i], int(offsets[i, 0]) - 4, dims=-1))
    assert torch.equal(got.sort(-1).values, signal.sort(-1).values)
    # the plain loop's draws are the harness's (written again there, not imported)
    assert all(np.array_equal(a, b) for a, b in zip(
        EpochAugment(7, 3).draws(50, 2, True), reference.augment_draws(50, 7, 2, 3, True),
        strict=True))


def test_each_network_draws_from_its_own_seed_and_epoch():
    x = torch.randn(32, 1, 8, 8)
    plain = _batches(x, [0, 0], None)
    same = _batches(x, [0, 0], [True, True])
    two = _batches(x, [0, 1], [True, True])
    for p, s, t in zip(plain, same, two, strict=True):
        b = len(p) // 2
        assert torch.equal(s[:b], s[b:])  # one seed: the same crops
        assert not torch.equal(s[:b], p[:b])  # augmented
        assert torch.equal(t[:b], s[:b])  # network 0 does not see its neighbour's seed
    other = torch.cat([t[len(t) // 2:] for t in two])
    alone = torch.cat(_batches(x, [1], [True]))
    assert torch.equal(other, alone)  # network 1's rows are its stack of one's
    # another seed visits in another order: compare the draws themselves
    assert not np.array_equal(EpochAugment(0, 2).draws(32, 0, True)[0],
                              EpochAugment(1, 2).draws(32, 0, True)[0])
    assert not torch.equal(torch.cat(same), torch.cat(_batches(x, [0, 0], [True, True], 1)))
    # a network without augmentation, stacked beside one with, gets its plain rows exactly
    mixed = _batches(x, [0, 1], [True, False])
    for m, p in zip(mixed, _batches(x, [0, 1], None), strict=True):
        assert torch.equal(m[len(m) // 2:], p[len(p) // 2:])
        assert m.stride() == p.stride()


def test_val_test_and_train_eval_are_never_augmented(tmp_path, store, monkeypatch):
    """A whole run with augmentation: every evaluation batch the module gets is the split's own
    rows, in order; every training batch is augmented."""
    from l2lab.core import data

    seen: dict[str, list[torch.Tensor]] = {"val": [], "train_eval": [], "test": []}
    fit_eval, test_step = L2Module.validation_step, L2Module.test_step

    def spy_eval(self, batch, batch_idx, dataloader_idx=0):
        seen[self.eval_splits[dataloader_idx]].append(batch[0].clone())
        return fit_eval(self, batch, batch_idx, dataloader_idx)

    def spy_test(self, batch, batch_idx):
        seen["test"].append(batch[0].clone())
        return test_step(self, batch, batch_idx)

    calls = []
    original = data.augment
    monkeypatch.setattr(data, "augment", lambda x, *a: calls.append(len(x)) or original(x, *a))
    monkeypatch.setattr(L2Module, "validation_step", spy_eval)
    monkeypatch.setattr(L2Module, "test_step", spy_test)
    cfg = make_cfg(f"tracking.uri={store}", *CNN, *AUG, "trainer.eval_train=true")
    train(cfg, output_dir=tmp_path / "run")
    splits = data.load_data(cfg.data)
    epochs = int(cfg.trainer.max_epochs)
    assert calls == [40, 40, 40] * epochs  # every training batch, and nothing else
    assert torch.equal(torch.cat(seen["val"]), torch.cat([splits.val[0]] * epochs))
    assert torch.equal(torch.cat(seen["train_eval"]),
                       torch.cat([splits.train_eval()[0]] * epochs))
    assert torch.equal(torch.cat(seen["test"]), splits.test[0])


def test_a_stack_mixing_augmentation_equals_its_ordinary_runs_exactly(tmp_path, store):
    """λ × augment × seed as one stack, and a network that diverges in it and leaves (its rows
    and its draws leave with it): each child equals its ordinary run, every epoch and the final
    weights; augmentation changes the numbers."""
    jobs = [["data.augment=true", "seed=0"], ["data.augment=false", "seed=0"],
            ["data.augment=true", "seed=1", "regularization.lam=0.3"],
            ["data.augment=true", "seed=1"]]
    client, pairs, results = _ordinary_and_stacked(
        tmp_path, store, jobs, "data.train_size=130", "data.val_size=60", "data.batch_size=40",
        "trainer.max_epochs=3", "data.augment_pad=2", *CNN,
        dying=[["data.augment=true", "seed=2", "optimizer.lr=1e30"]])
    assert len({c.data.tags["l2lab.vectorized_group"] for _, c in pairs}) == 1
    for ordinary, child in pairs:
        _assert_same_run(client, ordinary, child, tmp_path)
    ce = [r["train/ce"] for r in results]
    assert ce[0] != ce[1] and ce[2] != ce[3] and ce[0] != ce[3]  # augment and seed matter


def test_a_shifted_mnist1d_run_trains_exactly_what_the_plain_loop_trains(
        tmp_path, store, mnist1d_root):
    from test_reference import _harness_equals_reference

    over = ["data=mnist1d", f"data.root={mnist1d_root}", "data.train_size=96",
            "data.val_size=64", "data.batch_size=32", "trainer.max_epochs=2", *CNN]
    final = _harness_equals_reference(tmp_path, store, *over, "data.augment=true", tiny=False)
    cfg = make_cfg(*over, tiny=False)
    from l2lab.core.data import load_data

    without, _ = reference.train(cfg, load_data(cfg.data))
    assert any(not torch.equal(v, final[k]) for k, v in without.state_dict().items())


def test_a_stopped_augmented_run_resumes_to_the_numbers_of_one_never_stopped(
        tmp_path, store, client, monkeypatch):
    """Stopped in its third epoch: the draws of every epoch are those of (seed, epoch), so the
    resumed epochs see the crops the run would have seen."""
    uri = f"tracking.uri={store}"
    ov = ["trainer.max_epochs=4", *CNN, *AUG]
    whole, rid = _whole_and_stopped(tmp_path, store, client, monkeypatch, ov, 8)
    again = [f"resume={rid}"]
    train(make_cfg(uri, *ov, *again), overrides=again)
    assert client.get_run(rid).info.status == "FINISHED"
    assert _histories(client, rid) == _histories(client, whole)


def test_the_default_changes_nothing_and_augment_is_a_per_network_setting():
    plain = make_cfg()
    assert plain.data.augment is False and plain.data.augment_pad is None
    old = {k: v for k, v in plain.data.items() if k not in ("augment", "augment_pad")}
    before = make_cfg()
    before.data = old  # a config logged before the keys existed
    assert config_hash(plain) == config_hash(before)
    on = make_cfg("data.augment=true")
    assert config_hash(on) != config_hash(plain)
    assert config_hash(make_cfg("data.augment=true", "data.augment_pad=2")) != config_hash(on)
    # the λ × augment grid is one stack; another pad is another stack
    assert group_key(on) == group_key(plain)
    assert group_key(make_cfg("data.augment=true", "data.augment_pad=2")) != group_key(on)


@pytest.mark.parametrize("overrides, key, says", [
    (["data.augment_pad=-1"], "data.augment_pad", ">= 0"),
    (["data.augment=maybe"], "data.augment", "maybe"),
])
def test_bad_augmentation_values_are_refused_naming_the_key(overrides, key, says):
    with pytest.raises(Exception) as e:
        schema.validate(make_cfg(*overrides))
    assert key in str(e.value) and says in str(e.value)


def test_a_pad_that_leaves_nothing_is_refused_before_training():
    with pytest.raises(ConfigError, match=r"data.augment_pad must be an integer in \[0, 7\]"):
        resolve_pad(8, (1, 8, 8))
    assert resolve_pad(None, (3, 32, 32)) == 4 and resolve_pad(None, (1, 8, 8)) == 1
    assert resolve_pad(None, (1, 40)) == 5 and resolve_pad(0, (1, 40)) == 0
    assert schema.check_member({"regularization.lam": 0.1, "regularization.lam_per_layer": {},
                                "seed": 0, "data.augment": True}) is None
    with pytest.raises(ConfigError, match="data.augment must be true or false"):
        schema.check_member({"regularization.lam": 0.1, "regularization.lam_per_layer": {},
                             "seed": 0, "data.augment": "sometimes"})


def test_the_report_compares_augment_as_a_condition_against_lambda():
    """A λ × data.augment × seed sweep: augment is a categorical condition (true/false, as
    the sweep names them), each with its own best λ, compared at their best λ."""
    from test_conditions import record

    from l2lab.report import conditions as cd

    runs = []
    for aug, best, level in (("false", 0.1, 0.6), ("true", 0.01, 0.5)):
        for lam in (0.0, 0.001, 0.01, 0.1, 1.0):
            for s in range(3):
                val = level + 0.05 * (np.log10(max(lam, 1e-4)) - np.log10(best)) ** 2 + 0.01 * s
                runs.append(record(lam, s, val, {"data.augment": aug}))
    keys, conds = cd.split(runs)
    assert keys == ["data.augment"] and [c.values["data.augment"] for c in conds] == \
        ["false", "true"]
    assert not cd.numeric_key(keys, conds)  # a bool is an arm, not a number axis
    assert [c.best_lam for c in conds] == [0.1, 0.01]
    (rival,) = cd.across(conds).rivals
    assert rival.clear  # augmented at its best λ beats plain at its own
    assert any("augment=true" in line for line in cd.format_conditions(keys, conds))


def test_ddp_shards_augment_their_rows_of_the_global_batch_as_one_process_does():
    x, y = torch.randn(30, 1, 8, 8), torch.arange(30)
    kw = {"augments": [True, False], "pad": 2}
    whole = list(StackedBatches(x, y, 8, [0, 1], **kw))
    shards = [list(StackedBatches(x, y, 8, [0, 1], rank=r, world=2, **kw)) for r in (0, 1)]
    for (xw, yw), *ranks in zip(whole, *shards, strict=True):
        per_net = xw.view(2, -1, 1, 8, 8)
        for r, (xs, ys, n) in enumerate(ranks):
            assert n == per_net.shape[1]  # the global batch size normalises
            assert torch.equal(xs.view(2, -1, 1, 8, 8), per_net[:, r::2])
            assert torch.equal(ys.view(2, -1), yw.view(2, -1)[:, r::2])

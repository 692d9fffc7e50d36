"""Several optimizer steps per Lightning batch (``data.Chunks``, ``L2Module.training_step``), and
the direct step beside Lightning's wrappers (``compat.lightning.direct_steps``): the same
batches, the same steps, the same numbers, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg

from l2lab.compat import lightning as cl
from l2lab.core.data import Chunks, StackedBatches, Steps, steps_of
from l2lab.run import progress

PROGRESS = progress.callbacks  # the run's own callbacks, before a test adds its counter
DIRECT = cl.direct_steps


def _loader(n: int = 70, batch: int = 10) -> StackedBatches:
    g = torch.Generator().manual_seed(0)
    return StackedBatches(torch.randn(n, 3, generator=g), torch.arange(n) % 4, batch, [5, 6])


def test_chunks_give_the_loaders_batches_in_order_and_take_none_ahead():
    loader = _loader()  # 7 batches of 2 networks × 10 rows
    chunks = Chunks(loader, 3)
    assert len(chunks) == 3 and chunks.sampler is loader.sampler
    for epoch in (0, 1):
        chunks.sampler.set_epoch(epoch)
        want = list(loader)
        it = iter(chunks)
        first, second = next(it), next(it)  # Lightning fetches one Lightning batch ahead
        got = list(first) + list(second) + [b for c in it for b in c]
        assert [len(c) for c in (first, second)] == [3, 3]
        assert len(got) == 7
        for (x, y), (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy)
    assert [len(c) for c in Chunks(loader, 64)] == [7]
    assert [len(c) for c in Chunks(loader, 1)] == [1] * 7
    with pytest.raises(ValueError, match="size must be >= 1"):
        Chunks(loader, 0)


def test_chunks_keep_the_loaders_networks():
    loader = _loader()
    chunks = Chunks(loader, 4)
    chunks.keep([1])
    x, y = next(iter(next(iter(chunks))))
    assert x.shape == (10, 3) and len(loader.sampler.shuffles) == 1


def test_a_lightning_batch_is_a_chunk_or_one_mini_batch():
    batch = (torch.zeros(2, 3), torch.zeros(2))
    assert list(steps_of(batch)) == [batch]
    chunk = Steps(iter([batch, batch]), 2)
    assert list(steps_of(chunk)) == [batch, batch]


def _fit(monkeypatch, tmp_path, overrides: list[str], steps: int, direct: bool):
    """A stack of two trained through ``engine.lightning_fit`` with ``steps`` optimizer steps per
    Lightning batch, the direct step or Lightning's wrappers: the weights, each network's epoch
    metrics, the trainer's global step and how many Lightning batches ran."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from l2lab.base import last_checkpoint
    from l2lab.core.data import load_data
    from l2lab.run import engine
    from l2lab.run.recorder import Recorder
    from l2lab.tracking.tracker import NullTracker

    seen: dict[str, object] = {"batches": 0}

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["batches"] += 1

        def on_train_end(self, trainer, pl_module):
            seen["global_step"] = trainer.global_step
            seen["direct"] = pl_module.direct_steps is not None

    monkeypatch.setattr(progress, "callbacks", lambda *a: [Count(), *PROGRESS(*a)])
    monkeypatch.setattr(engine, "STEPS_PER_BATCH", steps)
    monkeypatch.setattr(cl, "direct_steps",
                        DIRECT if direct else lambda trainer, module: None)
    cfgs = [make_cfg(*overrides, f"regularization.lam={lam}", "trainer.max_epochs=2")
            for lam in (0.01, 0.1)]
    splits = load_data(cfgs[0].data)
    members = [engine.build_member(c, splits, OmegaConf.to_container(c, resolve=True))
               for c in cfgs]
    module = engine.stack(cfgs[0], members, example=splits.train[0])
    recorder = Recorder([NullTracker(), NullTracker()],
                        [last_checkpoint(tmp_path / f"{steps}-{direct}-{i}") for i in (0, 1)])
    engine.lightning_fit(cfgs[0], module, splits, recorder, [0, 1], tmp_path)
    seen["per_epoch"] = -(-len(splits.train[1]) // int(cfgs[0].data.batch_size))
    weights = [p.detach().clone() for p in module.net.parameters()]
    return weights, module.epoch_metrics, seen


RECIPES = {
    "adam-clip-cosine-per-step-dropout": ["optimizer=adam", "optimizer.lr=0.01",
                                          "trainer.gradient_clip_val=0.05",
                                          "scheduler=cosine", "scheduler.interval=step",
                                          "model.dropout=0.2"],
    "sgd-decay-in-the-optimizer-step-schedule": ["optimizer=sgd", "optimizer.lr=0.1",
                                                 "regularization.mode=optimizer",
                                                 "scheduler=step", "scheduler.step_size=1"],
}


@pytest.mark.parametrize("recipe", RECIPES, ids=list(RECIPES))
def test_chunked_direct_steps_equal_one_wrapped_step_per_lightning_batch(recipe, monkeypatch,
                                                                         tmp_path):
    """The recipes touch every per-step hook: clipping and the decay before the step, the
    schedule after it (per step and per epoch), dropout's streams."""
    ov = RECIPES[recipe]
    w1, m1, s1 = _fit(monkeypatch, tmp_path, ov, steps=1, direct=False)
    w2, m2, s2 = _fit(monkeypatch, tmp_path, ov, steps=2, direct=True)
    w64, m64, s64 = _fit(monkeypatch, tmp_path, ov, steps=64, direct=True)
    n = s1["per_epoch"]  # optimizer steps an epoch, 2 epochs
    assert n > 2
    assert (s1["batches"], s2["batches"], s64["batches"]) == (2 * n, 2 * -(-n // 2), 2)
    assert s1["global_step"] == s2["global_step"] == s64["global_step"] == 2 * n
    assert (s1["direct"], s2["direct"], s64["direct"]) == (False, True, True)
    for w in (w2, w64):
        assert all(torch.equal(a, b) for a, b in zip(w1, w, strict=True))
    assert m1 == m2 == m64
    if "sgd" in recipe:  # stepped once an epoch (γ 0.1), logged as the next epoch's lr
        assert [m["train/lr"] for m in m1] == [pytest.approx(0.1 * 0.1 ** 2)] * 2


def test_direct_steps_only_where_lightnings_wrappers_add_nothing(tmp_path):
    """The direct step needs one device, 32-bit precision and no step hook besides the module's
    own ``on_before_optimizer_step``; its counter is the trainer's global step."""
    import pytorch_lightning as pl

    from l2lab.compat.lightning import direct_steps

    class Plain(pl.LightningModule):
        pass

    class Backward(pl.LightningModule):
        def on_after_backward(self) -> None:
            pass

    class OwnBackward(pl.LightningModule):
        def backward(self, loss, *args, **kwargs) -> None:
            loss.backward()

    class Hooked(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pass

    def trainer(**kw):
        return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu",
                          default_root_dir=tmp_path, **kw)

    count = direct_steps(trainer(), Plain())
    assert callable(count)
    assert direct_steps(trainer(), Backward()) is None
    assert direct_steps(trainer(), OwnBackward()) is None
    assert direct_steps(trainer(callbacks=[Hooked()]), Plain()) is None
    assert direct_steps(trainer(precision="bf16-mixed"), Plain()) is None
    t = trainer()
    direct_steps(t, Plain())(5)  # the counter behind a manual fit's global_step
    assert t.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed == 5

"""The GPU path's pieces that a CPU can check: channels-last regrouping of a stack's rows for
its grouped kernels, the stacked weights' layout, and mixed precision applying on CUDA only (a
GPU preset runs on a CPU in full precision, bit for bit the 32-bit run)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg

from l2lab.core.rules import effective_precision
from l2lab.core.stacked import channels_last, from_groups, stack_networks, to_groups
from l2lab.models import resnet18

CL = torch.channels_last


@pytest.mark.parametrize("k", [1, 3])
def test_regrouping_keeps_values_and_the_channels_last_layout(k):
    x = torch.randn(k * 4, 5, 6, 7)
    xl = x.contiguous(memory_format=CL)
    g, gl = to_groups(x, k), to_groups(xl, k)
    assert g.shape == (4, k * 5, 6, 7) and torch.equal(g, gl)
    assert gl.is_contiguous(memory_format=CL)
    for i in range(k):  # network i's rows became channels i·C .. (i+1)·C - 1
        assert torch.equal(g[:, i * 5:(i + 1) * 5], x[i * 4:(i + 1) * 4])
    back = from_groups(gl, k)
    assert torch.equal(back, x) and back.is_contiguous(memory_format=CL)
    assert torch.equal(from_groups(g, k), x)


def test_a_stacked_resnets_conv_weights_go_channels_last_with_their_values():
    torch.manual_seed(0)
    nets = [resnet18((3, 8, 8), 10, cifar_stem=True) for _ in range(2)]
    stacked = stack_networks(nets, [torch.Generator() for _ in nets])
    before = {k: v.clone() for k, v in stacked.state_dict().items()}
    assert channels_last(stacked)
    after = stacked.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    w = stacked.conv1.weight  # (K, out, in, kh, kw): the grouped view StackedConv takes
    assert w.reshape(-1, *w.shape[2:]).is_contiguous(memory_format=CL)
    # the grouped convolution on channels-last rows and weights is the plain one's
    x = torch.randn(2 * 3, 3, 8, 8)
    wg = w.reshape(-1, *w.shape[2:])
    plain = F.conv2d(to_groups(x, 2), wg.contiguous(), padding=1, groups=2)
    fast = F.conv2d(to_groups(x.contiguous(memory_format=CL), 2), wg, padding=1, groups=2)
    torch.testing.assert_close(from_groups(fast, 2), from_groups(plain, 2))
    assert not channels_last(stack_networks([torch.nn.Linear(3, 2)], [torch.Generator()]))


def test_mixed_precision_applies_on_cuda_only():
    from l2lab.run.distributed import trainer_kwargs

    assert effective_precision("bf16-mixed", on_cuda=True) == "bf16-mixed"
    assert effective_precision("bf16-mixed", on_cuda=False) == "32-true"
    assert effective_precision(16, on_cuda=False) == "32-true"
    assert effective_precision("64-true", on_cuda=False) == "64-true"
    kw = trainer_kwargs(make_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=cpu"))
    assert kw["precision"] == "32-true"


def test_a_bf16_mixed_run_on_cpu_is_the_32_bit_run_bit_for_bit(tmp_path, store):
    from l2lab.train import train

    ov = [f"tracking.uri={store}", "trainer.accelerator=cpu", "trainer.max_epochs=2"]
    full = train(make_cfg(*ov), output_dir=tmp_path / "a")
    mixed = train(make_cfg(*ov, "trainer.precision=bf16-mixed"), output_dir=tmp_path / "b")
    assert mixed == full


def test_per_network_value_clipping_takes_channels_last_gradients():
    """Mixed clip values in a stack index each network's rows: a channels-last weight's
    gradient (stacked.channels_last) has no (K, -1) view."""
    from l2lab.core.module import clip_values_per_network

    torch.manual_seed(0)
    plain = torch.randn(3, 2, 3, 3, 3) * 3
    g = plain.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # as channels_last
    clip_values_per_network([g], [0.5, None, 1.0])
    assert torch.equal(g[0], plain[0].clamp(-0.5, 0.5)) and torch.equal(g[1], plain[1])
    assert torch.equal(g[2], plain[2].clamp(-1.0, 1.0))
